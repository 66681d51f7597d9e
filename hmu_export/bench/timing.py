"""How bench times a call: its settings, the clock loop, the statistics, and the loaded build every measurement shares."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
import numpy as np
from ..core.layout import BuildLayout
from ..core.config import BuildConfig
from ..core.io_contract import GraphContract
from ..core.grid import grid_axes
from ..runners import Runner
from ..model.native import reference_model
from ..model.transformer import HMUTransformer
from ..model.checkpoint import load_build_source


@dataclass(frozen=True)
class BenchSettings:
    warmup: int = 10
    min_iters: int = 50
    min_seconds: float = 2.0
    max_iters: int = 5000
    threads: int = 0  # 0 = every core this process may use
    seed: int = 0
    peak_seconds: float = 1.5  # time spent measuring the sgemm peak
    settle_seconds: float = 4.0  # extra time per row while its times are not settled

    @classmethod
    def quick(cls) -> "BenchSettings":
        return cls(warmup=1, min_iters=3, min_seconds=0.0, max_iters=3, peak_seconds=0.1,
                   settle_seconds=0.0)


@dataclass
class Stats:
    times_ms: np.ndarray

    def row(self) -> dict[str, float]:
        t = self.times_ms
        p = np.percentile(t, [50, 90, 95, 99])
        return {"p50_ms": float(p[0]), "p90_ms": float(p[1]), "p95_ms": float(p[2]),
                "p99_ms": float(p[3]), "mean_ms": float(t.mean()), "std_ms": float(t.std()),
                "iters": int(t.size)}


# --------------------------------------------------------------------------- timing
def time_calls(step: Callable[[], float], s: BenchSettings) -> np.ndarray:
    """Per-call milliseconds after warm-up, until min_iters and min_seconds are both reached,
    then on while the times are not settled (bench/stability.py) for up to settle_seconds more;
    ``step`` runs one call and returns its time in ms (a runner's own inference time, or a
    device timer's)."""
    from .stability import repeat_until_settled

    for _ in range(s.warmup):
        step()
    return np.asarray(repeat_until_settled(step, min_iters=s.min_iters,
                                           min_seconds=s.min_seconds, max_iters=s.max_iters,
                                           settle_seconds=s.settle_seconds), dtype=np.float64)


def runner_step(runner: Runner, feeds: dict[str, np.ndarray]) -> Callable[[], float]:
    """One unchecked inference; its time is the runner's own (around the runtime call)."""
    def step() -> float:
        runner.infer(feeds, check=False)
        return runner.last_inference_time() * 1e3
    return step


# --------------------------------------------------------------------------- build
@dataclass
class Loaded:
    cfg: BuildConfig
    layout: BuildLayout
    contract: GraphContract
    model: Any  # the native HMUTransformer, or the ModelSource of any other source

    @property
    def native(self) -> bool:
        """The native HMUTransformer (analytic FLOPs; the same model builds without its HMU)."""
        return isinstance(self.model, HMUTransformer)

    @property
    def axes(self) -> tuple[str, ...]:
        """The profile axes of the build's graph: (batch, src_len, tgt_len), or (batch, src_len)
        for a classifier."""
        return grid_axes(self.contract)


def load_build(artifacts: Path) -> Loaded:
    """Config, contract and PyTorch source model of a build folder (any model source)."""
    from ..core.build_folder import open_build

    build = open_build(artifacts)
    return Loaded(build.cfg, build.layout, build.contract,
                  reference_model(load_build_source(build)))
