"""One runner interface for every backend: feeds dict -> outputs dict (Polygraphy's shape).

Feeds are validated against the I/O contract and the shape profile(s) before a runtime sees
them, so a wrong dtype or an out-of-profile shape is a one-line InputError, not a crash deep
inside a runtime.

Every runner times itself, as Polygraphy's runners do (``last_inference_time()``): the host
wall time of its last inference, measured around the runtime call only (a subclass wraps its
session run in ``with self.timed():``; host<->device copies belong to that call, feed checks
and Python-side preparation do not). A subclass that does not mark its call is timed around
its whole ``_infer``. ``bench`` builds its statistics from these times.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from ..core.config import ProfileConfig
from ..core.errors import HMUExportError
from ..core.io_contract import GraphContract, feed_shape, validate_feeds


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
    #: the clock ``timed()`` reads (seconds); a test may replace it with a fake one
    clock: Callable[[], float] = staticmethod(time.perf_counter)

    def __init__(self, contract: GraphContract, profiles: Sequence[ProfileConfig] | None = None,
                 *, precision: str = "fp32", vocab_size: int | None = None,
                 label: str | None = None) -> None:
        self.contract = contract
        self.profiles = list(profiles) if profiles else []
        self.precision = precision
        self.vocab_size = vocab_size
        self.label = label or self.backend
        self._inference_time: float | None = None

    def validate(self, feeds: Mapping[str, np.ndarray]) -> None:
        validate_feeds(self.contract, feeds, self.profiles or None, self.vocab_size)

    def infer(self, feeds: Mapping[str, np.ndarray], *, check: bool = True
              ) -> dict[str, np.ndarray]:
        """Outputs by contract name.

        ``check`` validates the feeds before the run and refuses NaN / Inf outputs after it
        (NonFiniteOutput); ``check=False`` skips both (benchmark loops).
        """
        if check:
            self.validate(feeds)
        self._inference_time = None
        start = self.clock()
        outputs = self._infer(feeds)
        if self._inference_time is None:  # the subclass did not mark its runtime call
            self._inference_time = self.clock() - start
        if check:
            check_finite_outputs(outputs, self.label, feeds)
        return outputs

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Wrap the runtime call of ``_infer`` (session run, engine execution) in this."""
        start = self.clock()
        try:
            yield
        finally:
            self._inference_time = self.clock() - start

    def last_inference_time(self) -> float:
        """Seconds the last ``infer`` spent in the runtime call (Polygraphy's
        ``last_inference_time``); RuntimeError before the first inference."""
        if self._inference_time is None:
            raise RuntimeError(f"{self.label}: no inference has run yet")
        return self._inference_time

    def device_timer(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], float] | None:
        """A callable that runs the graph on ``feeds`` already on the device and returns the
        device's own time of that run in ms (copies excluded), or None where the runner has no
        device clock (CPU runtimes)."""
        return None

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Release sessions / device memory."""

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
