"""Deprecated import path kept for users' code (README before 0.3): the client lives in
``hmu_export.deploy.triton.client``."""
from .deploy.triton.client import HMUTritonClient, make_noise

__all__ = ["HMUTritonClient", "make_noise"]
