"""hmu-export: deployable inference artifacts for Transformers with a Hippocampus Memory Unit."""

__version__ = "0.1.0"
