"""One runner interface for every backend: feeds dict -> outputs dict (Polygraphy's shape).

Feeds are validated against the I/O contract and the shape profile(s) before a runtime sees
them, so a wrong dtype or an out-of-profile shape is a one-line InputError, not a crash deep
inside a runtime.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..config import ProfileConfig
from ..io_contract import GraphContract, validate_feeds


class Runner:
    backend: str = "base"

    def __init__(self, contract: GraphContract, profiles: Sequence[ProfileConfig] | None = None,
                 *, precision: str = "fp32", vocab_size: int | None = None,
                 label: str | None = None) -> None:
        self.contract = contract
        self.profiles = list(profiles) if profiles else []
        self.precision = precision
        self.vocab_size = vocab_size
        self.label = label or self.backend

    def validate(self, feeds: Mapping[str, np.ndarray]) -> None:
        validate_feeds(self.contract, feeds, self.profiles or None, self.vocab_size)

    def infer(self, feeds: Mapping[str, np.ndarray], *, check: bool = True
              ) -> dict[str, np.ndarray]:
        """Outputs by contract name. ``check=False`` skips validation (benchmark loops)."""
        if check:
            self.validate(feeds)
        return self._infer(feeds)

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Release sessions / device memory."""

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
