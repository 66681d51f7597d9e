"""One runner interface for every backend: feeds dict -> outputs dict (Polygraphy's shape).

Feeds are validated against the I/O contract and the shape profile(s) before a runtime sees
them, so a wrong dtype or an out-of-profile shape is a one-line InputError, not a crash deep
inside a runtime.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..config import ProfileConfig
from ..errors import HMUExportError
from ..io_contract import GraphContract, feed_shape, validate_feeds


class NonFiniteOutput(HMUExportError):
    """A runner computed NaN or Inf from valid feeds (inputs too large for the precision, or an
    overflow inside the backend): refused instead of returned as a success."""


def check_finite_outputs(outputs: Mapping[str, np.ndarray], label: str,
                         feeds: Mapping[str, np.ndarray] | None = None) -> None:
    """Raise NonFiniteOutput naming the first output that holds NaN or Inf."""
    for name, arr in outputs.items():
        arr = np.asarray(arr)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            where = ""
            if feeds is not None:
                try:
                    where = " at shape " + "x".join(map(str, feed_shape(feeds)))
                except (KeyError, ValueError, IndexError):  # not a full-graph feed
                    where = ""
            raise NonFiniteOutput(f"{label}: output '{name}' has {bad} non-finite value(s) of "
                                  f"{arr.size}{where} (an input, e.g. noise, overflows the "
                                  f"backend's arithmetic)")


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
        """Outputs by contract name.

        ``check`` validates the feeds before the run and refuses NaN / Inf outputs after it
        (NonFiniteOutput); ``check=False`` skips both (benchmark loops).
        """
        if not check:
            return self._infer(feeds)
        self.validate(feeds)
        outputs = self._infer(feeds)
        check_finite_outputs(outputs, self.label, feeds)
        return outputs

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Release sessions / device memory."""

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
