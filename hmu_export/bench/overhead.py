"""What the HMU costs in latency: the same build with an identity in place of the HMU.

The same weights without the HMU run in the same harness as the build (PyTorch eager, and the
optimized ONNX graph when the build has one), with-HMU and identity calls interleaved so that
machine drift cancels; each call's time is the runner's own. Native builds only: the identity
copy is a native HMUTransformer with ``use_hmu = false``.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .flops import model_flops
from ..core.io_contract import full_contract, make_feeds
from ..runners import OnnxRuntimeRunner, Runner, TorchRunner

if TYPE_CHECKING:
    from .timing import BenchSettings, Loaded


def _without_hmu(loaded: "Loaded") -> Any:
    """The same weights with an identity where the HMU stands."""
    from ..model import HMUTransformer

    cfg = dataclasses.replace(loaded.cfg.model, use_hmu=False)
    m = HMUTransformer(cfg)
    state = {k: v for k, v in loaded.model.state_dict().items() if not k.startswith("hmu.")}
    m.load_state_dict(state)
    return m.eval()


def _optimized_pair(loaded: "Loaded", model_nohmu: Any, workdir: Path
                    ) -> tuple[Path, Path] | None:
    """(with, without) HMU optimized graphs; the identity one is exported + optimized here."""
    from ..export.onnx_export import export_onnx
    from ..export.optimize import optimize_graph

    with_hmu = loaded.layout.onnx_optimized
    if not with_hmu.is_file():
        return None
    cfg = dataclasses.replace(loaded.cfg, model=dataclasses.replace(loaded.cfg.model,
                                                                     use_hmu=False))
    plain, opt = workdir / "nohmu.onnx", workdir / "nohmu.opt.onnx"
    export_onnx(model_nohmu, cfg, plain)
    optimize_graph(plain, opt, cfg, model_nohmu)
    return with_hmu, opt


def _runner_pairs(loaded: "Loaded", nohmu: Any, pair: tuple[Path, Path] | None, threads: int
                  ) -> list[tuple[str, Runner, Runner]]:
    from ..runners.onnxruntime_runner import forward_session_options

    contract = loaded.contract
    pairs: list[tuple[str, Runner, Runner]] = [
        ("torch", TorchRunner(loaded.model, contract, label="torch"),
         TorchRunner(nohmu, full_contract(nohmu.cfg), label="torch-nohmu"))]
    if pair:
        # No spinning: two sessions run alternately, and a spinning pool would steal the
        # cores from the other session right after each of its own runs.
        with_hmu, without = (
            OnnxRuntimeRunner(path, contract, label=f"onnxruntime-opt-{i}",
                              sess_options=forward_session_options(threads, spinning=False))
            for i, path in enumerate(pair))
        pairs.append(("onnxruntime-opt", with_hmu, without))
    return pairs


def measure_hmu_overhead(loaded: "Loaded", shapes: Sequence[Sequence[int]],
                         s: "BenchSettings", threads: int, *, workdir: Path | None = None,
                         progress: Callable[[str, int], None] | None = None
                         ) -> list[dict[str, Any]]:
    """% latency (p50, with vs identity) per backend and shape, runs interleaved A/B."""
    from .timing import runner_step

    nohmu = _without_hmu(loaded)
    hmu_params, total = loaded.model.hmu_parameter_share()
    param_pct = 100.0 * hmu_params / total
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hmu-nohmu-") as tmp:
        wd = Path(workdir) if workdir else Path(tmp)
        wd.mkdir(parents=True, exist_ok=True)
        pairs = _runner_pairs(loaded, nohmu, _optimized_pair(loaded, nohmu, wd), threads)
        try:
            for shape in shapes:
                feeds = make_feeds(loaded.cfg.model, *shape, seed=s.seed,
                                   noise_scale=loaded.cfg.parity.noise_scale)
                for label, with_hmu, without in pairs:
                    ta, tb = _interleaved(runner_step(with_hmu, feeds),
                                          runner_step(without, feeds), s)
                    pa, pb = float(np.median(ta)), float(np.median(tb))
                    rows.append({"backend": label, "shape": list(shape), "with_hmu_p50_ms": pa,
                                 "without_hmu_p50_ms": pb,
                                 "latency_overhead_pct": 100.0 * (pa - pb) / pb if pb else None,
                                 "parameter_overhead_pct": param_pct,
                                 "flop_overhead_pct": 100.0 * model_flops(loaded.cfg.model,
                                                                          *shape).hmu
                                 / model_flops(nohmu.cfg, *shape).total})
                if progress:
                    progress(f"HMU overhead {'x'.join(map(str, shape))}", 0)
        finally:
            for _, a, b in pairs:
                a.close()
                b.close()
    return rows


def _interleaved(a: Callable[[], float], b: Callable[[], float], s: "BenchSettings"
                 ) -> tuple[np.ndarray, np.ndarray]:
    """ms of ``a`` and ``b`` (each returns its own time), called alternately."""
    for _ in range(s.warmup):
        a()
        b()
    ta: list[float] = []
    tb: list[float] = []
    t_start = time.perf_counter()
    while len(ta) < s.max_iters and (len(ta) < s.min_iters
                                      or time.perf_counter() - t_start < 2 * s.min_seconds):
        ta.append(float(a()))
        tb.append(float(b()))
    return np.asarray(ta), np.asarray(tb)
