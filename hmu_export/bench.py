"""Latency / throughput benchmark of every backend of a build, measured like trtexec.

Per (backend, shape): warm-up runs, then timed runs until both a minimum count and a minimum
time are reached (stable p99 needs many samples); p50/p90/p95/p99/mean/std, sequences/s and
tokens/s ((Ls + Lt) * B per call). Every backend gets the same feeds (same noise) at a shape,
and torch's threads are set to ONNX Runtime's intra-op threads. GPU rows time with CUDA events
around the compute only ("copies": "excluded") and with host<->device copies included, as
trtexec reports GPU compute and end-to-end latency separately.

Efficiency: analytic matmul FLOPs per shape (hmu_export/flops.py) over p50, as a fraction of
this machine's sgemm peak measured in the same run. HMU overhead: the same harness on the same
weights with an identity in place of the HMU, runs interleaved so machine drift cancels.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .artifacts import BuildLayout
from .config import BuildConfig
from .errors import ArtifactError, ConfigError
from .fileio import atomic_path, write_json, write_text
from .flops import model_flops
from .io_contract import GraphContract, make_feeds

DEFAULT_BACKENDS = ("torch", "onnxruntime", "onnxruntime-opt", "torch-cuda-fp16",
                    "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt")


@dataclass(frozen=True)
class BenchSettings:
    warmup: int = 10
    min_iters: int = 50
    min_seconds: float = 2.0
    max_iters: int = 5000
    threads: int = 0  # 0 = every core this process may use
    seed: int = 0
    peak_seconds: float = 1.5  # time spent measuring the sgemm peak

    @classmethod
    def quick(cls) -> "BenchSettings":
        return cls(warmup=1, min_iters=3, min_seconds=0.0, max_iters=3, peak_seconds=0.1)


@dataclass
class Stats:
    times_ms: np.ndarray

    def row(self) -> dict[str, float]:
        t = self.times_ms
        p = np.percentile(t, [50, 90, 95, 99])
        return {"p50_ms": float(p[0]), "p90_ms": float(p[1]), "p95_ms": float(p[2]),
                "p99_ms": float(p[3]), "mean_ms": float(t.mean()), "std_ms": float(t.std()),
                "iters": int(t.size)}


@dataclass
class Timed:
    """One benchmarkable backend: ``step()`` runs one call; ``device_ms()`` (optional) returns
    the GPU time of the last call measured with device events (copies excluded)."""

    backend: str
    precision: str
    setup: Callable[[dict[str, np.ndarray]], Callable[[], Any]]
    device: str = "cpu"
    device_timer: Callable[[dict[str, np.ndarray]], Callable[[], float]] | None = None


@dataclass
class BenchReport:
    machine: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    hmu_overhead: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "model": self.model, "settings": self.settings,
                "results": self.results, "skipped": self.skipped,
                "hmu_overhead": self.hmu_overhead}


# --------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict[str, Any]:
    """What a reader needs to compare figures: CPU, cores, GPU, library versions, load."""
    import onnx
    import onnxruntime as ort
    import torch

    from . import __version__
    info: dict[str, Any] = {
        "cpu": _cpu_model(), "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads, "torch_threads": torch.get_num_threads(), "ort_intra_op_threads": threads,
        "platform": platform.platform(), "python": platform.python_version(),
        "versions": {"hmu_export": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": ort.__version__, "numpy": np.__version__},
        "ort_providers": ort.get_available_providers(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["loadavg_start"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    try:
        import tensorrt  # type: ignore[import-not-found]
        info["versions"]["tensorrt"] = tensorrt.__version__
    except Exception:  # noqa: BLE001 - absent or broken TensorRT is the normal case here
        info["versions"]["tensorrt"] = None
    return info


def sgemm_peak(threads: int, seconds: float = 1.5) -> dict[str, Any]:
    """Best FP32 matmul GFLOP/s of torch, numpy (BLAS) and ONNX Runtime (MLAS) on square matrices,
    with the same thread count as the benchmark: the machine's practical compute ceiling."""
    import torch

    torch.set_num_threads(threads)
    best: dict[str, Any] = {"gflops": 0.0, "library": "", "n": 0}
    rng = np.random.default_rng(0)
    per = max(seconds / 6, 0.01)
    for n in (256, 512, 1024):
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        libs: list[tuple[str, Callable[[], Any]]] = [("torch", lambda: torch.mm(ta, tb)),
                                                    ("numpy", lambda: a @ b)]
        ort_mm = _ort_matmul(b, threads)  # MLAS, the kernels ONNX Runtime itself uses
        if ort_mm is not None:
            libs.append(("onnxruntime", lambda: ort_mm(a)))
        for lib, fn in libs:
            fn()
            reps, t0 = 0, time.perf_counter()
            best_t = float("inf")
            while reps < 3 or time.perf_counter() - t0 < per:
                s = time.perf_counter()
                fn()
                best_t = min(best_t, time.perf_counter() - s)
                reps += 1
            g = 2 * n ** 3 / best_t / 1e9
            if g > best["gflops"]:
                best = {"gflops": round(g, 2), "library": lib, "n": n}
    return best


def _ort_matmul(b: np.ndarray, threads: int) -> Callable[[np.ndarray], Any] | None:
    """x -> x @ b as a one-node ONNX Runtime graph (b a constant), or None if it fails."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        n = b.shape[0]
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "b"], ["y"])], "sgemm",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
            [numpy_helper.from_array(b, "b")])
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        from .optimize import tuned_session_options
        sess = ort.InferenceSession(proto.SerializeToString(), tuned_session_options(threads),
                                    providers=["CPUExecutionProvider"])
        return lambda x: sess.run(None, {"x": x})
    except Exception:  # noqa: BLE001 - the peak then comes from torch / numpy alone
        return None


# --------------------------------------------------------------------------- timing
def time_calls(step: Callable[[], Any], s: BenchSettings, *, device: bool = False
               ) -> np.ndarray:
    """Per-call milliseconds after warm-up, until min_iters and min_seconds are both reached.
    With ``device``, ``step`` itself returns its time in ms (GPU events), else wall time."""
    for _ in range(s.warmup):
        step()
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < s.max_iters and (len(times) < s.min_iters
                                         or time.perf_counter() - t_start < s.min_seconds):
        t0 = time.perf_counter()
        got = step()
        times.append(float(got) if device else (time.perf_counter() - t0) * 1e3)
    return np.asarray(times, dtype=np.float64)


# --------------------------------------------------------------------------- backends
@dataclass
class Loaded:
    cfg: BuildConfig
    layout: BuildLayout
    contract: GraphContract
    model: Any  # HMUTransformer


def load_build(artifacts: Path) -> Loaded:
    """Config, contract and PyTorch model of a build folder (checkpoint/ + model.onnx)."""
    from .build_folder import open_build

    build = open_build(artifacts)
    if build.cfg.model.source != "native":
        from .errors import InputError
        raise InputError(f"bench measures native builds only for now; {artifacts} was built from "
                         f"model.source = \"{build.cfg.model.source}\" ({build.contract.name} "
                         "graph): use `parity` to check it, or time model.onnx with "
                         "onnxruntime_perf_test / trtexec")
    return Loaded(build.cfg, build.layout, build.contract, build.load_model())


def _torch_backend(model: Any, precision: str, device: str, threads: int) -> Timed:
    import torch

    cast: list[Any] = []

    def get() -> Any:
        if not cast:
            cast.append(_cast(model, precision, device))
        return cast[0]

    def setup(feeds: dict[str, np.ndarray]) -> Callable[[], Any]:
        torch.set_num_threads(threads)
        m = get()
        dtype = torch.float16 if precision == "fp16" else torch.float32

        def step() -> Any:  # numpy in, numpy out: copies included, like every other backend
            t = {k: torch.from_numpy(v).to(device) for k, v in feeds.items()}
            with torch.inference_mode():
                out = m(t["src_ids"], t["src_mask"], t["tgt_ids"], t["noise"].to(dtype))
            r = out.float().cpu().numpy()
            return r
        return step

    timer = None
    if device.startswith("cuda"):
        def timer(feeds: dict[str, np.ndarray]) -> Callable[[], float]:
            m = get()
            dtype = torch.float16 if precision == "fp16" else torch.float32
            t = {k: torch.from_numpy(v).to(device) for k, v in feeds.items()}
            t["noise"] = t["noise"].to(dtype)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

            def run() -> float:
                start.record()
                with torch.inference_mode():
                    m(t["src_ids"], t["src_mask"], t["tgt_ids"], t["noise"])
                end.record()
                end.synchronize()
                return float(start.elapsed_time(end))
            return run
    label = "torch" if device == "cpu" and precision == "fp32" else f"torch-{device}-{precision}"
    return Timed(label, precision, setup, device=device, device_timer=timer)


def _cast(model: Any, precision: str, device: str) -> Any:
    """A private copy on ``device`` in ``precision`` (the caller's model is never cast)."""
    import torch

    from .model import HMUTransformer
    if precision == "fp32" and device == "cpu":
        return model
    m = HMUTransformer(model.cfg)
    m.load_state_dict(model.state_dict())
    dtype = torch.float16 if precision == "fp16" else torch.float32
    return m.to(device=device, dtype=dtype).eval()


def _ort_backend(label: str, path: Path, opts_fn: Callable[[], Any], providers: list[str],
                 io_binding: bool, output: str) -> Timed:
    def setup(feeds: dict[str, np.ndarray]) -> Callable[[], Any]:
        sess = _ort_session(path, opts_fn, providers)
        if not io_binding:
            return lambda: sess.run([output], feeds)[0]
        # I/O binding: inputs bound once and the output kept in an ORT-owned buffer; the result
        # is still copied to numpy each call, so the comparison with other backends stays fair.
        binding = sess.io_binding()
        for k, v in feeds.items():
            binding.bind_cpu_input(k, v)
        binding.bind_output(output, "cpu")

        def step() -> Any:
            sess.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]
        return step
    device = "cuda" if any("CUDA" in p or "Tensorrt" in p for p in providers) else "cpu"
    return Timed(label, "fp32", setup, device=device)


def _ort_session(path: Path, opts_fn: Callable[[], Any], providers: list[str]) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), opts_fn(), providers=providers)
    except Exception as exc:  # ORT raises its own types
        raise ArtifactError(f"ONNX Runtime cannot load {path}: "
                            f"{str(exc).splitlines()[0]}") from None


def resolve_backends(names: Sequence[str], loaded: Loaded, threads: int
                     ) -> tuple[list[Timed], list[dict[str, str]]]:
    """Runnable backends among ``names`` and a skip reason for each of the others."""
    import onnxruntime as ort
    import torch

    from .optimize import tuned_session_options
    from .runners.onnxruntime_runner import session_options

    layout, out_name = loaded.layout, loaded.contract.output_names[0]
    have = ort.get_available_providers()
    runnable: list[Timed] = []
    skipped: list[dict[str, str]] = []

    def skip(name: str, why: str) -> None:
        skipped.append({"backend": name, "reason": why})

    def default_opts() -> Any:  # ORT as a user gets it: all optimizations, threads set
        return session_options(threads)

    def tuned_opts() -> Any:
        return tuned_session_options(threads)

    for name in names:
        if name == "torch":
            runnable.append(_torch_backend(loaded.model, "fp32", "cpu", threads))
        elif name in ("torch-cuda-fp16", "torch-cuda-fp32"):
            if not torch.cuda.is_available():
                skip(name, "no CUDA GPU visible to PyTorch")
            else:
                runnable.append(_torch_backend(loaded.model, name.rsplit("-", 1)[1], "cuda",
                                               threads))
        elif name == "onnxruntime":
            runnable.append(_ort_backend(name, layout.onnx, default_opts,
                                         ["CPUExecutionProvider"], False, out_name))
        elif name == "onnxruntime-opt":
            if not layout.onnx_optimized.is_file():
                skip(name, f"{layout.onnx_optimized.name} not in the build (export.optimize off?)")
            else:
                runnable.append(_ort_backend(name, layout.onnx_optimized, tuned_opts,
                                             ["CPUExecutionProvider"], True, out_name))
        elif name in ("onnxruntime-cuda", "onnxruntime-tensorrt"):
            prov = "CUDAExecutionProvider" if name.endswith("cuda") else "TensorrtExecutionProvider"
            if prov not in have:
                skip(name, f"{prov} not in this onnxruntime build (have: {', '.join(have)})")
            else:
                runnable.append(_ort_backend(name, layout.onnx, default_opts,
                                             [prov, "CPUExecutionProvider"], False, out_name))
        elif name == "tensorrt":
            if not layout.engine.is_file():
                skip(name, f"no {layout.engine.name} in the build (TensorRT/GPU absent at build)")
            else:
                runnable.extend(_discovered(loaded, "tensorrt", skip))
        else:
            extra = _discovered(loaded, name, skip)
            if not extra and not any(s["backend"] == name for s in skipped):
                raise ConfigError(f"unknown backend '{name}' (known: "
                                  f"{', '.join(DEFAULT_BACKENDS)} or a parity backend label)")
            runnable.extend(extra)
    return runnable, skipped


def _discovered(loaded: Loaded, label: str, skip: Callable[[str, str], None]) -> list[Timed]:
    """A backend contributed by a stage module (e.g. the TensorRT engine), via its Runner."""
    from .parity_backends import discover_backends

    for b in discover_backends(loaded.layout, loaded.cfg, loaded.model, loaded.contract):
        if b.label != label:
            continue
        if not b.available or b.make is None:
            skip(label, b.skip_reason or "unavailable")
            return []
        make = b.make

        def setup(feeds: dict[str, np.ndarray], make: Callable[[], Any] = make) -> Callable[[], Any]:
            runner = make()
            sync = getattr(runner, "sync", None)

            def step() -> Any:
                out = runner.infer(feeds, check=False)
                if sync:
                    sync()
                return out
            return step
        return [Timed(label, b.precision, setup)]
    return []


# --------------------------------------------------------------------------- run
def check_shapes(cfg: BuildConfig, shapes: Iterable[tuple[int, int, int]]) -> None:
    """Benchmarks run the build's artifacts, which serve only shapes inside its profile."""
    p = cfg.profile
    for b, ls, lt in shapes:
        if not p.contains(b, ls, lt):
            raise ConfigError(
                f"shape {b}x{ls}x{lt} lies outside the build's profile (batch {p.batch[0]}.."
                f"{p.batch[2]}, src_len {p.src_len[0]}..{p.src_len[2]}, tgt_len {p.tgt_len[0]}.."
                f"{p.tgt_len[2]}); rebuild with a [profile] that covers it")


def default_shapes(cfg: BuildConfig, quick: bool = False) -> list[tuple[int, int, int]]:
    """Batch 1 and max over a sweep of source lengths (target = opt), plus the opt point."""
    p = cfg.profile
    if quick:
        return [(p.batch[0], p.src_len[1], p.tgt_len[1]), (p.batch[2], p.src_len[2], p.tgt_len[2])]
    lens = sorted({p.src_len[0], max(p.src_len[0], p.src_len[2] // 4), p.src_len[1], p.src_len[2]})
    shapes = [(b, ls, p.tgt_len[2]) for b in sorted({p.batch[0], p.batch[2]}) for ls in lens]
    return sorted(set(shapes) | {(p.batch[1], p.src_len[1], p.tgt_len[1])})


def _row(t: Timed, shape: tuple[int, int, int], times: np.ndarray, flops: int,
         peak_gflops: float, threads: int, copies: str) -> dict[str, Any]:
    b, ls, lt = shape
    st = Stats(times).row()
    sec = st["p50_ms"] / 1e3
    achieved = flops / sec / 1e9 if sec > 0 else 0.0
    return {"backend": t.backend, "precision": t.precision, "shape": [b, ls, lt],
            "device": t.device, "copies": copies, "threads": threads, **st,
            "seq_per_s": b / sec if sec else 0.0, "tokens_per_s": b * (ls + lt) / sec if sec else 0.0,
            "gflop": flops / 1e9, "gflops_per_s": achieved,
            "peak_fraction": achieved / peak_gflops if peak_gflops else None}


def run_bench(artifacts: Path, shapes: Sequence[tuple[int, int, int]] | None = None,
              backends: Sequence[str] = DEFAULT_BACKENDS, *, settings: BenchSettings | None = None,
              quick: bool = False, hmu_overhead: bool = True,
              progress: Callable[[str, int], None] | None = None,
              workdir: Path | None = None) -> BenchReport:
    """Measure ``backends`` x ``shapes`` on a build; ``progress(desc, total)`` ticks per row."""
    import torch

    s = settings or (BenchSettings.quick() if quick else BenchSettings())
    loaded = load_build(Path(artifacts))
    shapes = list(shapes) if shapes else default_shapes(loaded.cfg, quick)
    check_shapes(loaded.cfg, shapes)
    from .optimize import cpu_threads
    threads = s.threads or cpu_threads()
    torch.set_num_threads(threads)
    report = BenchReport(machine_info(threads))
    report.machine["sgemm_peak"] = sgemm_peak(threads, s.peak_seconds)
    peak = report.machine["sgemm_peak"]["gflops"]
    hmu_params, total_params = loaded.model.hmu_parameter_share()
    report.model = {"name": loaded.cfg.model.name, "config": dataclasses.asdict(loaded.cfg.model),
                    "parameters": total_params, "hmu_parameters": hmu_params}
    report.settings = dataclasses.asdict(s) | {"threads": threads}
    runnable, report.skipped = resolve_backends(list(backends), loaded, threads)
    total = len(runnable) * len(shapes) + (len(shapes) if hmu_overhead else 0)
    if progress:
        progress("start", total)
    for shape in shapes:
        feeds = make_feeds(loaded.cfg.model, *shape, seed=s.seed,
                           noise_scale=loaded.cfg.parity.noise_scale)
        flops = model_flops(loaded.cfg.model, *shape).total
        for t in runnable:
            step = t.setup(feeds)
            report.results.append(_row(t, shape, time_calls(step, s), flops, peak, threads,
                                       "included"))
            if t.device_timer is not None:
                report.results.append(_row(t, shape, time_calls(t.device_timer(feeds), s,
                                                                device=True),
                                           flops, peak, threads, "excluded"))
            if progress:
                progress(f"{t.backend} {shape[0]}x{shape[1]}x{shape[2]}", 0)
    if hmu_overhead:
        report.hmu_overhead = measure_hmu_overhead(loaded, shapes, s, threads,
                                                   workdir=workdir, progress=progress)
    try:
        report.machine["loadavg_end"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    return report


# --------------------------------------------------------------------------- HMU overhead
def _without_hmu(loaded: Loaded) -> Any:
    """The same weights with an identity where the HMU stands."""
    from .model import HMUTransformer

    cfg = dataclasses.replace(loaded.cfg.model, use_hmu=False)
    m = HMUTransformer(cfg)
    state = {k: v for k, v in loaded.model.state_dict().items() if not k.startswith("hmu.")}
    m.load_state_dict(state)
    return m.eval()


def _optimized_pair(loaded: Loaded, model_nohmu: Any, workdir: Path) -> tuple[Path, Path] | None:
    """(with, without) HMU optimized graphs; the identity one is exported + optimized here."""
    from .export import export_onnx
    from .optimize import optimize_graph

    with_hmu = loaded.layout.onnx_optimized
    if not with_hmu.is_file():
        return None
    cfg = dataclasses.replace(loaded.cfg, model=dataclasses.replace(loaded.cfg.model,
                                                                     use_hmu=False))
    plain, opt = workdir / "nohmu.onnx", workdir / "nohmu.opt.onnx"
    export_onnx(model_nohmu, cfg, plain)
    optimize_graph(plain, opt, cfg, model_nohmu)
    return with_hmu, opt


def measure_hmu_overhead(loaded: Loaded, shapes: Sequence[tuple[int, int, int]],
                         s: BenchSettings, threads: int, *, workdir: Path | None = None,
                         progress: Callable[[str, int], None] | None = None
                         ) -> list[dict[str, Any]]:
    """% latency (p50, with vs identity) per backend and shape, runs interleaved A/B."""
    from .optimize import tuned_session_options

    nohmu = _without_hmu(loaded)
    hmu_params, total = loaded.model.hmu_parameter_share()
    param_pct = 100.0 * hmu_params / total
    out_name = loaded.contract.output_names[0]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hmu-nohmu-") as tmp:
        wd = Path(workdir) if workdir else Path(tmp)
        wd.mkdir(parents=True, exist_ok=True)
        pair = _optimized_pair(loaded, nohmu, wd)

        def tuned() -> Any:
            # No spinning: two sessions run alternately, and a spinning pool would steal the
            # cores from the other session right after each of its own runs.
            return tuned_session_options(threads, spinning=False)

        for shape in shapes:
            feeds = make_feeds(loaded.cfg.model, *shape, seed=s.seed,
                               noise_scale=loaded.cfg.parity.noise_scale)
            pairs = [("torch", _torch_backend(loaded.model, "fp32", "cpu", threads).setup(feeds),
                      _torch_backend(nohmu, "fp32", "cpu", threads).setup(feeds))]
            if pair:
                a = _ort_backend("x", pair[0], tuned, ["CPUExecutionProvider"], True,
                                 out_name).setup(feeds)
                b = _ort_backend("x", pair[1], tuned, ["CPUExecutionProvider"], True,
                                 out_name).setup(feeds)
                pairs.append(("onnxruntime-opt", a, b))
            for label, with_fn, without_fn in pairs:
                ta, tb = _interleaved(with_fn, without_fn, s)
                pa, pb = float(np.median(ta)), float(np.median(tb))
                rows.append({"backend": label, "shape": list(shape), "with_hmu_p50_ms": pa,
                             "without_hmu_p50_ms": pb,
                             "latency_overhead_pct": 100.0 * (pa - pb) / pb if pb else None,
                             "parameter_overhead_pct": param_pct,
                             "flop_overhead_pct": 100.0 * model_flops(loaded.cfg.model, *shape).hmu
                             / model_flops(nohmu.cfg, *shape).total})
            if progress:
                progress(f"HMU overhead {shape[0]}x{shape[1]}x{shape[2]}", 0)
    return rows


def _interleaved(a: Callable[[], Any], b: Callable[[], Any], s: BenchSettings
                 ) -> tuple[np.ndarray, np.ndarray]:
    for _ in range(s.warmup):
        a()
        b()
    ta: list[float] = []
    tb: list[float] = []
    t_start = time.perf_counter()
    while len(ta) < s.max_iters and (len(ta) < s.min_iters
                                      or time.perf_counter() - t_start < 2 * s.min_seconds):
        for fn, acc in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            acc.append((time.perf_counter() - t0) * 1e3)
    return np.asarray(ta), np.asarray(tb)


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
             "| backend | prec | B×Ls×Lt | copies | p50 ms | p90 | p95 | p99 | mean | std | "
             "seq/s | tok/s | GFLOP/s | % peak | iters |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.results:
        pf = r.get("peak_fraction")
        lines.append(
            f"| {r['backend']} | {r['precision']} | {'×'.join(map(str, r['shape']))} | "
            f"{r['copies']} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['p95_ms']:.3f} | "
            f"{r['p99_ms']:.3f} | {r['mean_ms']:.3f} | {r['std_ms']:.3f} | {r['seq_per_s']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {r['gflops_per_s']:.1f} | "
            f"{'' if pf is None else f'{100 * pf:.1f}'} | {r['iters']} |")
    sp = speedups(report)
    if sp:
        lines += ["", "Speedup over PyTorch eager FP32 (p50, same run):", "",
                  "| backend | B×Ls×Lt | speedup |", "|---|---|---|"]
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
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def write_outputs(report: BenchReport, out_dir: Path, json_path: Path | None = None
                  ) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {"json": Path(json_path) if json_path else out_dir / "bench.json",
             "markdown": out_dir / "bench.md", "png": out_dir / "bench.png"}
    write_json(paths["json"], report.to_dict())
    write_text(paths["markdown"], to_markdown(report))
    plot(report, paths["png"])
    return paths
