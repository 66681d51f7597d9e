"""Latency / throughput benchmark of every backend of a build, measured like trtexec.

Backends are the registry's (backends/registry.py, the same entries parity runs); each is a
Runner that times itself (``last_inference_time``: the runtime call, not feed preparation).
Per (backend, shape): warm-up runs, then timed runs until both a minimum count and a minimum
time are reached (stable p99 needs many samples); p50/p90/p95/p99/mean/std, sequences/s and
tokens/s (B x the sum of the length axes per call). Shapes and feeds come from the build's
graph contract (B x Ls x Lt, or B x Ls for a classifier), so every model source benches alike.
Every backend gets the same feeds (same noise) at a shape, and torch's threads are set to ONNX
Runtime's intra-op threads. GPU rows time with CUDA events around the compute only ("copies":
"excluded") and with host<->device copies included, as trtexec reports GPU compute and
end-to-end latency separately.

Efficiency: matmul FLOPs per shape over p50, as a fraction of this machine's sgemm peak
measured in the same run: the native model's analytic count (flops.py), any other source's
counted on its graph. HMU overhead (native builds; bench_overhead.py): the same harness on the
same weights with an identity in place of the HMU; other sources list it as a skipped part.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..backends.registry import BENCH, Backend, discover_backends
from ..core.config import BuildConfig
from ..core.errors import ConfigError
from ..core.fileio import write_json, write_png, write_text
from .flops import matmul_flop_counter, model_flops
from ..core.io_contract import BATCH, SRC_LEN
from ..core.grid import AXIS_LABEL, GRID_AXES, in_profile, contract_feeds, profile_ranges
from ..runners import Runner
from .stability import Watch, cell, row_fields, run_notes
from .timing import BenchSettings, Loaded, Stats, load_build, runner_step, time_calls
from .machine import machine_info, sgemm_peak

DEFAULT_BACKENDS = ("torch", "onnxruntime", "onnxruntime-opt", "torch-cuda-fp16",
                    "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt")


@dataclass
class BenchReport:
    machine: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    hmu_overhead: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    #: parts of the report this build cannot have (e.g. the HMU overhead of a non-native
    #: source), each with the reason: {"part", "reason"}
    skipped_parts: list[dict[str, str]] = field(default_factory=list)
    axes: tuple[str, ...] = GRID_AXES  # the graph's axes, the order of every row's "shape"

    def to_dict(self) -> dict[str, Any]:
        out = {"machine": self.machine, "model": self.model, "settings": self.settings,
               "results": self.results, "skipped": self.skipped,
               "hmu_overhead": self.hmu_overhead}
        if self.skipped_parts:  # only builds that lack a part (a native build's keys stay)
            out["skipped_parts"] = self.skipped_parts
        return out

    @property
    def shape_label(self) -> str:
        """Column title of a shape: "B×Ls×Lt", "B×Ls" for a classifier."""
        return "×".join(AXIS_LABEL[a] for a in self.axes)


def timed_row(backend: Backend, axes: Sequence[str], shape: Sequence[int],
              step: Callable[[], float], s: BenchSettings, flops: int, peak_gflops: float,
              threads: int, copies: str) -> dict[str, Any]:
    """A result row with its samples and stability (what the machine did while it was timed)."""
    watch = Watch()
    times = time_calls(step, s)
    return _row(backend, axes, shape, times, flops, peak_gflops, threads, copies
                ) | row_fields(times, watch.stop())


def resolve_backends(names: Sequence[str], loaded: Loaded, threads: int
                     ) -> tuple[list[Backend], list[dict[str, str]]]:
    """Runnable registry entries among ``names`` and a skip reason for each of the others."""
    found = {b.label: b for b in discover_backends(loaded.layout, loaded.cfg, loaded.model,
                                                   loaded.contract, use=BENCH, threads=threads)}
    runnable: list[Backend] = []
    skipped: list[dict[str, str]] = []
    for name in names:
        if name not in found:
            raise ConfigError(f"unknown backend '{name}' (known: {', '.join(found)})")
        if found[name].available:
            runnable.append(found[name])
        else:
            skipped.append({"backend": name, "reason": found[name].skip_reason or "unavailable"})
    return runnable, skipped


# --------------------------------------------------------------------------- shapes
def shape_text(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def check_shapes(cfg: BuildConfig, shapes: Iterable[Sequence[int]],
                 axes: Sequence[str] = GRID_AXES) -> None:
    """Benchmarks run the build's artifacts: one size per axis of its graph, each inside the
    build's profile."""
    p = cfg.profile
    form = "x".join(AXIS_LABEL[a].upper() for a in axes)
    for shape in shapes:
        if len(shape) != len(axes):
            raise ConfigError(f"shape {shape_text(shape)} has {len(shape)} size(s), the build's "
                              f"graph has {len(axes)} axes ({', '.join(axes)}): give {form}")
        if not in_profile(p, axes, shape):
            raise ConfigError(f"shape {shape_text(shape)} lies outside the build's profile "
                              f"({profile_ranges(p, axes)}); rebuild with a [profile] that "
                              "covers it")


def default_shapes(cfg: BuildConfig, quick: bool = False,
                   axes: Sequence[str] = GRID_AXES) -> list[tuple[int, ...]]:
    """Batch min and max over a sweep of source lengths (target = max), plus the opt point;
    with ``quick`` only (batch min, opt lengths) and the maxima. Over the graph's axes."""
    p = cfg.profile
    lo, opt, hi = ({a: getattr(p, a)[i] for a in axes} for i in range(3))
    if quick:
        return [tuple([lo[BATCH]] + [opt[a] for a in axes[1:]]), tuple(hi[a] for a in axes)]
    s0, s1, s2 = p.src_len
    lens = sorted({s0, max(s0, s2 // 4), s1, s2})
    shapes = {tuple({BATCH: b, SRC_LEN: ls}.get(a, hi[a]) for a in axes)
              for b in {lo[BATCH], hi[BATCH]} for ls in lens}
    return sorted(shapes | {tuple(opt[a] for a in axes)})


def flop_counter(loaded: Loaded) -> Callable[[Sequence[int], dict[str, np.ndarray]], int]:
    """Matmul FLOPs of one forward at (shape, feeds): the native model's analytic count, else
    counted on the build's graph (any source: the operands' real shapes; graph loaded once)."""
    if loaded.native:
        return lambda shape, feeds: model_flops(loaded.cfg.model, *shape).total
    count = matmul_flop_counter(str(loaded.layout.onnx))
    return lambda shape, feeds: count(feeds)


def _row(backend: Backend, axes: Sequence[str], shape: Sequence[int], times: np.ndarray,
         flops: int, peak_gflops: float, threads: int, copies: str) -> dict[str, Any]:
    st = Stats(times).row()
    sec = st["p50_ms"] / 1e3
    b = shape[0]
    tokens = b * sum(v for a, v in zip(axes, shape) if a != BATCH)
    achieved = flops / sec / 1e9 if sec > 0 else 0.0
    return {"backend": backend.label, "precision": backend.precision, "shape": list(shape),
            "device": backend.device, "copies": copies, "threads": threads, **st,
            "seq_per_s": b / sec if sec else 0.0, "tokens_per_s": tokens / sec if sec else 0.0,
            "gflop": flops / 1e9, "gflops_per_s": achieved,
            "peak_fraction": achieved / peak_gflops if peak_gflops else None}


# --------------------------------------------------------------------------- run
def run_bench(artifacts: Path, shapes: Sequence[Sequence[int]] | None = None,
              backends: Sequence[str] = DEFAULT_BACKENDS, *, settings: BenchSettings | None = None,
              quick: bool = False, hmu_overhead: bool = True,
              progress: Callable[[str, int], None] | None = None,
              workdir: Path | None = None) -> BenchReport:
    """Measure ``backends`` x ``shapes`` on a build; ``progress(desc, total)`` ticks per row."""
    import torch

    s = settings or (BenchSettings.quick() if quick else BenchSettings())
    loaded = load_build(Path(artifacts))
    axes = loaded.axes
    shapes = [tuple(x) for x in shapes] if shapes else default_shapes(loaded.cfg, quick, axes)
    check_shapes(loaded.cfg, shapes, axes)
    from ..runners.onnxruntime_runner import cpu_threads
    threads = s.threads or cpu_threads()
    torch.set_num_threads(threads)
    report = BenchReport(machine_info(threads), axes=axes)
    report.machine["sgemm_peak"] = sgemm_peak(threads, s.peak_seconds)
    peak = report.machine["sgemm_peak"]["gflops"]
    hmu_params, total_params = loaded.model.hmu_parameter_share()
    report.model = {"name": loaded.cfg.model.name, "config": dataclasses.asdict(loaded.cfg.model),
                    "parameters": total_params, "hmu_parameters": hmu_params}
    if not loaded.native:
        report.model |= {"graph": loaded.contract.name, "axes": list(axes),
                         "flops": f"counted on {loaded.layout.onnx.name} (MatMul/Gemm operands)"}
    report.settings = dataclasses.asdict(s) | {"threads": threads}
    runnable, report.skipped = resolve_backends(list(backends), loaded, threads)
    overhead = hmu_overhead and _hmu_overhead_possible(loaded, report)
    total = len(runnable) * len(shapes) + (len(shapes) if overhead else 0)
    if progress:
        progress("start", total)
    runners: dict[str, Runner] = {}
    shape_flops = flop_counter(loaded)
    try:
        for shape in shapes:
            feeds = contract_feeds(loaded.contract, loaded.cfg, dict(zip(axes, shape)),
                                   seed=s.seed, noise_scale=loaded.cfg.parity.noise_scale)
            flops = shape_flops(shape, feeds)
            for b in runnable:
                if b.label not in runners:
                    runners[b.label] = _make(b)
                runner = runners[b.label]
                report.results.append(timed_row(b, axes, shape, runner_step(runner, feeds), s,
                                                flops, peak, threads, "included"))
                timer = runner.device_timer(feeds)
                if timer is not None:
                    report.results.append(timed_row(b, axes, shape, timer, s, flops, peak,
                                                    threads, "excluded"))
                if progress:
                    progress(f"{b.label} {shape_text(shape)}", 0)
    finally:
        for runner in runners.values():
            runner.close()
    if overhead:
        from .overhead import measure_hmu_overhead
        report.hmu_overhead = measure_hmu_overhead(loaded, shapes, s, threads,
                                                   workdir=workdir, progress=progress)
    try:
        report.machine["loadavg_end"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    return report


def _make(backend: Backend) -> Runner:
    assert backend.make is not None  # resolve_backends keeps available entries only
    return backend.make()


def _hmu_overhead_possible(loaded: Loaded, report: BenchReport) -> bool:
    """Whether the HMU overhead can be measured on this build; if not, the report says why."""
    if loaded.native:
        return True
    report.skipped_parts.append({
        "part": "hmu_overhead",
        "reason": f"needs an identity-HMU copy of the model, which only the native "
                  f"HMUTransformer can make (this build's source is "
                  f"\"{loaded.cfg.model.source}\")"})
    return False


# --------------------------------------------------------------------------- outputs
def speedups(report: BenchReport, base: str = "torch") -> list[dict[str, Any]]:
    """p50 speedup of every backend over ``base`` at each shape (same run)."""
    ref = {tuple(r["shape"]): r["p50_ms"] for r in report.results
           if r["backend"] == base and r["copies"] == "included"}
    return [{"backend": r["backend"], "shape": r["shape"], "speedup": ref[tuple(r["shape"])]
             / r["p50_ms"]} for r in report.results
            if r["backend"] != base and tuple(r["shape"]) in ref and r["copies"] == "included"]


def to_markdown(report: BenchReport) -> str:
    m = report.machine
    lines = [f"# Benchmark: {report.model.get('name', '')}", "",
             f"- CPU: {m['cpu']} ({m['usable_cores']} usable cores), threads: {m['threads']} "
             f"(torch = ORT intra-op)",
             f"- GPU: {m['gpu'] or 'none'}",
             f"- sgemm peak: {m['sgemm_peak']['gflops']:.1f} GFLOP/s "
             f"({m['sgemm_peak']['library']}, n={m['sgemm_peak']['n']})",
             f"- load average (1/5/15 min) at start: {m.get('loadavg_start')}, "
             f"end: {m.get('loadavg_end')}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v), "",
             f"| backend | prec | {report.shape_label} | copies | p50 ms | p90 | p95 | p99 | "
             "mean | std | "
             "seq/s | tok/s | GFLOP/s | % peak | iters | stability |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.results:
        pf = r.get("peak_fraction")
        lines.append(
            f"| {r['backend']} | {r['precision']} | {'×'.join(map(str, r['shape']))} | "
            f"{r['copies']} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['p95_ms']:.3f} | "
            f"{r['p99_ms']:.3f} | {r['mean_ms']:.3f} | {r['std_ms']:.3f} | {r['seq_per_s']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {r['gflops_per_s']:.1f} | "
            f"{'' if pf is None else f'{100 * pf:.1f}'} | {r['iters']} | {cell(r)} |")
    notes = run_notes(m, report.results)
    if notes:  # a p50 is not printed as settled when it is not (bench/stability.py)
        lines += ["", "Stability:", ""] + [f"- {n}" for n in notes]
    sp = speedups(report)
    if sp:
        lines += ["", "Speedup over PyTorch eager FP32 (p50, same run):", "",
                  f"| backend | {report.shape_label} | speedup |", "|---|---|---|"]
        lines += [f"| {x['backend']} | {'×'.join(map(str, x['shape']))} | {x['speedup']:.2f}× |"
                  for x in sp]
    if report.hmu_overhead:
        lines += ["", "HMU overhead (same weights, identity in place of the HMU, interleaved runs):",
                  "", "| backend | B×Ls×Lt | with HMU p50 ms | without | latency % | params % | "
                  "FLOPs % |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {h['backend']} | {'×'.join(map(str, h['shape']))} | "
                  f"{h['with_hmu_p50_ms']:.3f} | {h['without_hmu_p50_ms']:.3f} | "
                  f"{h['latency_overhead_pct']:+.1f} | {h['parameter_overhead_pct']:.2f} | "
                  f"{h['flop_overhead_pct']:.2f} |" for h in report.hmu_overhead]
    if report.skipped:
        lines += ["", "Skipped:", ""] + [f"- {x['backend']}: {x['reason']}" for x in report.skipped]
    if report.skipped_parts:
        lines += ["", "Not measured on this build:", ""] + [
            f"- {x['part']}: {x['reason']}" for x in report.skipped_parts]
    return "\n".join(lines) + "\n"


def plot(report: BenchReport, path: Path) -> Path:
    """p50 latency against source length, one line per backend (one panel per batch size)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["shape"][0] for r in report.results})
    fig, axes = plt.subplots(1, max(1, len(batches)), figsize=(5 * max(1, len(batches)), 4),
                             squeeze=False)
    for ax, b in zip(axes[0], batches):
        series: dict[str, list[tuple[int, float]]] = {}
        for r in report.results:
            if r["shape"][0] == b:
                key = f"{r['backend']} ({r['precision']}{', no copies' if r['copies'] == 'excluded' else ''})"
                series.setdefault(key, []).append((r["shape"][1], r["p50_ms"]))
        for key, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
        ax.set_title(f"batch {b}")
        ax.set_xlabel("source length Ls (target length as in the run)")
        ax.set_ylabel("p50 latency (ms)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report.model.get('name', '')}: latency vs sequence length")
    fig.tight_layout()
    return write_png(fig, path)


def write_outputs(report: BenchReport, out_dir: Path, json_path: Path | None = None
                  ) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {"json": Path(json_path) if json_path else out_dir / "bench.json",
             "markdown": out_dir / "bench.md", "png": out_dir / "bench.png"}
    write_json(paths["json"], report.to_dict())
    write_text(paths["markdown"], to_markdown(report))
    plot(report, paths["png"])
    return paths
