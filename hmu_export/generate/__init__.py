"""Floor 2: autoregressive generation over any step backend (greedy, sampling, beam search).

``from hmu_export.generate import Generator`` is the documented entry point (README)."""
from .generator import GenerationOptions, GenerationResult, Generator

__all__ = ["Generator", "GenerationOptions", "GenerationResult"]
