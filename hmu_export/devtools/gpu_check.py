"""GPU checks for a lent CUDA machine, run by ``scripts/device_check.sh``; one JSON of figures.

The machine has PyTorch with CUDA, onnx and ONNX Runtime (CPU) but no TensorRT and no internet,
so the checks are the ones PyTorch on the GPU can make:

- ``pytest``: the GPU-marked tests (``pytest -m gpu``);
- ``build``: ``python -m hmu_export build`` of the embedded default model (its parity stage adds
  ``torch-cuda-fp16`` by itself when CUDA is there), with each stage's status;
- ``parity``: the parity grid of the trained default model (when the config names a
  checkpoint) and of seeded models at init_scale 1 and 2, with ``torch-cuda`` (FP32, judged by
  the FP32 policy), ``torch-cuda-fp16`` (real FP16 arithmetic on the GPU, every op in half) and
  ``torch-cuda-fp16-pinned`` (the same with the FP32 pin policy's modules, plus ``--fp32-pins``,
  kept FP32: devtools/torch_pins.py), judged by the FP16 budget of hmu_export/core/tolerance.py
  (docs/fp16.md), against PyTorch FP32 on the CPU. Real FP16 arithmetic is what CPU emulation
  cannot show: an activation overflowing between two ops;
- ``bench``: forward latency of PyTorch FP32 / FP16 on the GPU at a few shapes (CUDA events,
  inputs already on the device) and end to end (numpy in, numpy out).

``--device cpu`` runs the same code on the CPU as a dry run (what CI tests). Each section has a
share of one time budget and the JSON is rewritten after each, so a run that is cut short still
leaves what it measured. ``python -m hmu_export.devtools.gpu_check --help`` lists the options.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..core.errors import BackendUnavailable, ConfigError, HMUExportError

SCHEMA = 1
JSON_NAME = "device_check.json"
DEFAULT_BUDGET_S = 420.0  # the whole run; device_check.sh allows 480 s
SECTIONS = ("pytest", "build", "parity", "bench")
# The pinned FP16 row's extra pins: the scope that halved the 2x-activation model's worst
# emulated FP16 error (docs/fp16.md, issue 17 item 6); the CUDA confirmation is this row.
DEFAULT_FP32_PINS = ("encoder/",)
ROOT = Path(__file__).resolve().parents[2]

Shape = tuple[int, int, int]


# ----------------------------------------------------------------------------- arguments
def _shapes(text: str) -> list[Shape]:
    out = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"shapes are BxLsxLt with positive sizes, got "
                                             f"'{item.strip()}'")
        out.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return out


def _scales(text: str) -> list[float]:
    try:
        vals = [float(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"init scales are numbers, got '{text}'") from None
    if not vals or not all(np.isfinite(v) and v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"init scales must be finite and > 0, got '{text}'")
    return vals


def _pins(text: str) -> list[str]:
    pins = [p.strip() for p in text.split(",") if p.strip()]
    if not all("/" in p for p in pins):
        raise argparse.ArgumentTypeError(f"FP32 pins are node names or 'scope/', got '{text}'")
    return pins


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hmu_export.devtools.gpu_check",
                                description="GPU checks for a lent CUDA machine; one JSON.")
    p.add_argument("--out", help=f"JSON file, or a folder for {JSON_NAME} (default: $OUT, "
                                 "else the current folder)")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (dry run)")
    p.add_argument("--config", help="build config TOML (default: the embedded default model)")
    p.add_argument("--init-scales", type=_scales, default=[1.0, 2.0],
                   help="parity models' init_scale values (default 1,2)")
    p.add_argument("--fp32-pins", type=_pins, default=list(DEFAULT_FP32_PINS),
                   help="node names / 'scope/' kept FP32 in the pinned FP16 row, beside the "
                        "policy's and the config's engine.fp32_pins (default: encoder/; "
                        "docs/fp16.md)")
    p.add_argument("--grid", choices=("full", "quick"), default="full",
                   help="full: the profile's parity grid; quick: its corner shapes")
    p.add_argument("--bench-shapes", type=_shapes, default=None,
                   help="BxLsxLt list (default: 1xoptxopt, 1xmaxxmax, maxxmaxxmax of the profile)")
    p.add_argument("--warmup", type=_positive, default=10)
    p.add_argument("--iters", type=_positive, default=50)
    p.add_argument("--pytest", action=argparse.BooleanOptionalAction, default=False,
                   help="run the GPU-marked tests")
    p.add_argument("--build", action=argparse.BooleanOptionalAction, default=False,
                   help="run `python -m hmu_export build`")
    p.add_argument("--threads", type=_positive, default=None,
                   help="PyTorch CPU threads (default: PyTorch's choice)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"time budget of the whole run (default {DEFAULT_BUDGET_S:g} s)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if not args.device == "cpu" and not (args.device == "cuda" or args.device.startswith("cuda:")):
        build_parser().error(f"--device must be cuda, cuda:N or cpu, got '{args.device}'")
    if not np.isfinite(args.budget_s) or args.budget_s <= 0:
        build_parser().error("--budget-s must be a positive number of seconds")
    return args


def out_path(arg: str | None, env: dict[str, str] | None = None) -> Path:
    """The JSON file: ``arg`` (a folder gets device_check.json), else $OUT/, else ./."""
    env = dict(os.environ) if env is None else env
    if arg is None:
        return Path(env.get("OUT") or ".") / JSON_NAME
    path = Path(arg)
    if path.is_dir() or arg.endswith(("/", os.sep)) or path.suffix.lower() != ".json":
        return path / JSON_NAME
    return path


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def _sig(x: float | None, digits: int = 3) -> float | None:
    """A figure for people: 3 significant digits (3.1e-06, not 3.0994415283203125e-06)."""
    if x is None or not np.isfinite(x):
        return None if x is None else float(x)
    return float(f"{x:.{digits}g}")


# ----------------------------------------------------------------------------- environment
def require_device(device: str) -> None:
    """BackendUnavailable (one line) when ``device`` is CUDA and PyTorch has none."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"device {device}: CUDA is not available to PyTorch "
                                     f"{torch.__version__} on this machine")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise BackendUnavailable(f"device {device}: this machine has "
                                     f"{torch.cuda.device_count()} CUDA device(s)")


def environment(device: str) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "onnx": onnx.__version__, "onnxruntime": ort.__version__,
        "cuda_available": bool(torch.cuda.is_available()), "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        props = torch.cuda.get_device_properties(dev)
        env["gpu"] = {"name": props.name, "compute_capability": f"{props.major}.{props.minor}",
                      "memory_gib": round(props.total_memory / 2**30, 1),
                      "multiprocessors": props.multi_processor_count}
        env["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return env


# ----------------------------------------------------------------------------- backends
def torch_device_backends(model: Any, cfg: Any, contract: Any, device: str,
                          fp32_modules: Sequence[str] | None = None) -> list[Any]:
    """The parity backends PyTorch gives on ``device``: FP32 and real FP16 arithmetic, and
    with ``fp32_modules`` FP16 with those modules kept FP32 (the pin policy's stand-in).

    ``torch-cuda`` / ``torch-cuda-fp16`` / ``-fp16-pinned`` on a GPU (``torch-cpu-dryrun``...
    on the CPU). Refuses with BackendUnavailable when the device is CUDA and there is none.
    """
    from ..backends.registry import Backend
    from ..runners import TorchRunner
    from .torch_pins import keep_fp32

    require_device(device)
    base = "torch-cuda" if device.startswith("cuda") else "torch-cpu-dryrun"

    def make(precision: str, label: str, pins: Sequence[str] = ()) -> Callable[[], Any]:
        def runner() -> Any:
            r = TorchRunner(model, contract, [cfg.profile], precision=precision,
                            device=device, label=label)
            keep_fp32(r.model, pins)  # r.model is the runner's private copy
            return r
        return runner
    out = [Backend(base, "fp32", make("fp32", base)),
           Backend(f"{base}-fp16", "fp16", make("fp16", f"{base}-fp16"))]
    if fp32_modules is not None:
        out.append(Backend(f"{base}-fp16-pinned", "fp16",
                           make("fp16", f"{base}-fp16-pinned", fp32_modules)))
    return out


def parity_models(cfg: Any, scales: Sequence[float]) -> list[tuple[str, Any]]:
    """(label, model config): the config's trained checkpoint when it names one, then a
    seeded model per init_scale. (init_scale only shapes a seeded initialization: with a
    checkpoint it changed nothing, and both "init_scale" rows measured the trained model.)"""
    out = [("trained", cfg.model)] if cfg.model.checkpoint else []
    return out + [("seeded", replace(cfg.model, checkpoint="", init_scale=float(s)))
                  for s in scales]


def _corner_grid(cfg: Any) -> list[Shape]:
    p = cfg.profile
    shapes = {(p.batch[0], p.src_len[0], p.tgt_len[0]), (p.batch[1], p.src_len[1], p.tgt_len[1]),
              (p.batch[2], p.src_len[2], p.tgt_len[2]), (1, p.src_len[2], p.tgt_len[2])}
    return sorted(s for s in shapes if p.contains(*s))


def default_bench_shapes(cfg: Any) -> list[Shape]:
    p = cfg.profile
    shapes = [(p.batch[0], p.src_len[1], p.tgt_len[1]), (p.batch[0], p.src_len[2], p.tgt_len[2]),
              (p.batch[2], p.src_len[2], p.tgt_len[2])]
    return list(dict.fromkeys(shapes))


# ----------------------------------------------------------------------------- sections
def parity_section(cfg: Any, device: str, scales: Sequence[float], grid: str,
                   log: Callable[[str], None] = print,
                   fp32_pins: Sequence[str] = DEFAULT_FP32_PINS) -> dict[str, Any]:
    """Per model and backend: worst figures over the grid, pass/fail, first failures."""
    from ..core.io_contract import full_contract
    from ..model import build_model
    from ..core.grid import derive_grid
    from ..verify.parity import run_parity
    from .torch_pins import outermost, policy_modules, request_modules

    out: dict[str, Any] = {"grid": grid, "fp32_pins": list(fp32_pins), "models": []}
    for kind, mcfg in parity_models(cfg, scales):
        scfg = replace(cfg, model=mcfg)
        model = build_model(mcfg)
        contract = full_contract(mcfg)
        shapes = derive_grid(scfg.profile) if grid == "full" else _corner_grid(scfg)
        modules = outermost(policy_modules(model) + request_modules(
            model, [*cfg.engine.fp32_pins, *fp32_pins]))
        entry: dict[str, Any] = {"model": kind, "init_scale": mcfg.init_scale,
                                 "shapes": len(shapes), "fp32_modules": modules,
                                 "backends": {}}
        for backend in torch_device_backends(model, scfg, contract, device, modules):
            t0 = time.perf_counter()
            log(f"parity: {kind} init_scale {mcfg.init_scale:g}, {backend.label}, "
                f"{len(shapes)} shapes")
            try:
                report = run_parity(model, scfg, [backend], contract, shapes=shapes)
            except HMUExportError as exc:  # e.g. NonFiniteOutput: FP16 overflowed on the GPU
                entry["backends"][backend.label] = {"precision": backend.precision,
                                                    "passed": False, "error": str(exc)}
                continue
            entry["backends"][backend.label] = summarize_parity(report, backend.precision,
                                                                time.perf_counter() - t0)
        out["models"].append(entry)
    out["passed"] = all(b.get("passed") for m in out["models"] for b in m["backends"].values())
    return out


def summarize_parity(report: Any, precision: str, seconds: float) -> dict[str, Any]:
    rows = [r for r in report.results if r.output == getattr(report, "output", "logits")]
    worst = max(rows, key=lambda r: r.max_abs) if rows else None
    worst_rel = max(rows, key=lambda r: r.max_rel_range) if rows else None
    tops = [r.top1_agreement for r in rows if r.top1_agreement is not None]
    return {
        "precision": precision, "passed": bool(report.passed),
        "tolerance": report.tolerances.get(precision),
        "rows_passed": sum(r.passed for r in rows), "rows": len(rows),
        "worst_max_abs": _sig(worst.max_abs) if worst else None,
        "worst_shape": "x".join(map(str, worst.shape)) if worst else None,
        "max_rel_range": _sig(worst_rel.max_rel_range) if worst_rel else None,
        "worst_rel_shape": "x".join(map(str, worst_rel.shape)) if worst_rel else None,
        "min_cosine": _sig(min(r.cosine for r in rows), 9) if rows else None,
        "min_top1": _sig(min(tops), 4) if tops else None,
        "checks": {c.name: c.passed for c in report.checks},
        "failures": report.failures()[:5], "seconds": round(seconds, 1),
    }


def bench_section(cfg: Any, device: str, shapes: Sequence[Shape], warmup: int, iters: int,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """PyTorch forward latency, FP32 and FP16: device time (inputs resident) and end to end."""
    import torch

    from ..core.io_contract import full_contract, make_feeds
    from ..model import build_model
    from ..runners import TorchRunner

    require_device(device)
    model = build_model(cfg.model)
    contract = full_contract(cfg.model)
    rows: list[dict[str, Any]] = []
    for precision in ("fp32", "fp16"):
        runner = TorchRunner(model, contract, [cfg.profile], precision=precision, device=device)
        for shape in shapes:
            if not cfg.profile.contains(*shape):
                raise ConfigError(f"bench shape {'x'.join(map(str, shape))} is outside the profile")
            log(f"bench: {precision} {'x'.join(map(str, shape))}")
            feeds = make_feeds(cfg.model, *shape, seed=0)
            t = {k: torch.from_numpy(v).to(runner.device) for k, v in feeds.items()}
            t["noise"] = t["noise"].to(runner.dtype)

            def forward() -> None:
                with torch.inference_mode():
                    runner.model.forward_all(t["src_ids"], t["src_mask"], t["tgt_ids"],
                                             t["noise"])
            device_ms = _time(forward, runner, warmup, iters)
            e2e_ms = _time(lambda: runner.infer(feeds, check=False), runner, warmup, iters,
                           events=False)
            rows.append({"precision": precision, "shape": "x".join(map(str, shape)),
                         "device_ms": device_ms, "e2e_ms": e2e_ms})
    by = {(r["precision"], r["shape"]): r for r in rows}
    for r in rows:  # FP16 speed-up over FP32 at the same shape
        if r["precision"] == "fp16":
            base = by[("fp32", r["shape"])]["device_ms"]["p50"]
            r["speedup_vs_fp32"] = _sig(base / r["device_ms"]["p50"]) if r["device_ms"]["p50"] \
                else None
    return {"warmup": warmup, "iters": iters, "timer": "cuda events" if device != "cpu"
            else "perf_counter", "rows": rows}


def _time(fn: Callable[[], Any], runner: Any, warmup: int, iters: int, events: bool = True
          ) -> dict[str, float | None]:
    import torch

    cuda = runner.device.type == "cuda"
    for _ in range(warmup):
        fn()
    runner.sync()
    times = []
    for _ in range(iters):
        if cuda and events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(float(start.elapsed_time(end)))
        else:
            t0 = time.perf_counter()
            fn()
            runner.sync()
            times.append((time.perf_counter() - t0) * 1e3)
    ms = np.array(times)
    return {"p50": _sig(float(np.percentile(ms, 50))), "p90": _sig(float(np.percentile(ms, 90))),
            "min": _sig(float(ms.min()))}


def _subprocess(cmd: list[str], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                             env=env)
    except subprocess.TimeoutExpired:
        return {"rc": None, "error": f"timed out after {timeout:.0f} s",
                "seconds": round(time.perf_counter() - t0, 1)}
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    return {"rc": res.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "tail": lines[-15:]}


def pytest_section(timeout: float) -> dict[str, Any]:
    out = _subprocess([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs",
                       "-p", "no:cacheprovider", "--continue-on-collection-errors", "tests"],
                      timeout)
    tail = out.get("tail") or []
    out["summary"] = tail[-1] if tail else ""
    # rc 5: no test selected; the skips (-rs) say why (e.g. no TensorRT here)
    out["passed"] = out.get("rc") in (0, 5)
    return out


def _build(timeout: float, config: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hmu-device-build-") as tmp:
        dest = Path(tmp) / "hmu-default"
        cmd = [sys.executable, "-m", "hmu_export", "build", "--out", str(dest)]
        if config:
            cmd += ["--config", config]
        out = _subprocess(cmd, timeout)
        manifest = dest / "manifest.json"
        if manifest.is_file():
            try:
                data = json.loads(manifest.read_text())
                stages = data.get("stages") or {}
                if isinstance(stages, dict):
                    out["stages"] = {k: {"status": v.get("status"), "reason": v.get("reason")}
                                     if isinstance(v, dict) else v for k, v in stages.items()}
            except (OSError, ValueError) as exc:
                out["manifest_error"] = str(exc).splitlines()[0]
    out["passed"] = out.get("rc") == 0
    return out


# ----------------------------------------------------------------------------- main
def run_checks(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every asked-for section; the JSON (``args.out``) is rewritten after each."""
    import torch

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run_checks(args, log)
    finally:
        torch.set_num_threads(threads)


def _run_checks(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from ..core.config import load_config

    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    path = out_path(args.out)
    result: dict[str, Any] = {"schema": SCHEMA, "tool": "hmu_export.devtools.gpu_check",
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "dry_run": args.device == "cpu", "sections": {}}
    result["environment"] = environment(args.device)
    cfg = load_config(args.config)
    result["model"] = {"name": cfg.model.name, "d_model": cfg.model.d_model,
                       "layers": [cfg.model.n_encoder_layers, cfg.model.n_decoder_layers],
                       "vocab_size": cfg.model.vocab_size, "profile": cfg.profile.to_dict()}
    write_json(path, result)
    # (name, wanted, minimum seconds it needs, share of what is left, run)
    plan: list[tuple[str, bool, float, float, Callable[[float], dict[str, Any]]]] = [
        ("pytest", args.pytest, 20, 0.35, lambda t: pytest_section(t)),
        ("build", args.build, 40, 0.45, lambda t: _build(t, args.config)),
        ("parity", True, 10, 1.0, lambda t: parity_section(cfg, args.device, args.init_scales,
                                                           args.grid, log, args.fp32_pins)),
        ("bench", True, 5, 1.0, lambda t: bench_section(
            cfg, args.device, args.bench_shapes or default_bench_shapes(cfg), args.warmup,
            args.iters, log)),
    ]
    for name, wanted, need, share, run in plan:
        if not wanted:
            result["sections"][name] = {"skipped": "not asked for"}
            continue
        left = deadline - time.monotonic()
        if left < need:
            result["sections"][name] = {"skipped": f"time budget: {left:.0f} s left"}
            continue
        log(f"== {name}")
        t0 = time.perf_counter()
        try:
            section = run(max(need, left * share))
        except HMUExportError as exc:
            section = {"passed": False, "error": str(exc)}
        except Exception as exc:  # a bug: recorded, and the other sections still run
            section = {"passed": False, "error": f"internal error: {type(exc).__name__}: "
                                                 f"{(str(exc).splitlines() or [''])[0]}"}
        section.setdefault("seconds", round(time.perf_counter() - t0, 1))
        result["sections"][name] = section
        write_json(path, result)
    ran = [s for s in result["sections"].values() if "skipped" not in s]
    result["passed"] = bool(ran) and all(s.get("passed", "error" not in s) for s in ran)
    result["seconds"] = round(time.monotonic() - t_start, 1)
    write_json(path, result)
    result["path"] = str(path)
    return result


def summary_lines(result: dict[str, Any]) -> list[str]:
    gpu = (result.get("environment") or {}).get("gpu") or {}
    lines = [f"device: {gpu.get('name') or result.get('environment', {}).get('device')}  "
             f"torch {result.get('environment', {}).get('torch')}"]
    for name, sec in result.get("sections", {}).items():
        state = ("skipped (" + sec["skipped"] + ")" if "skipped" in sec
                 else "ok" if sec.get("passed", "error" not in sec) else "FAIL")
        extra = f"  {sec['error']}" if "error" in sec else ""
        lines.append(f"{name:7s} {state}{extra}")
        if name == "parity" and "models" in sec:
            for m in sec["models"]:
                for label, b in m["backends"].items():
                    lines.append(f"  {m.get('model', '')} init_scale {m['init_scale']:g} "
                                 f"{label:29s} {'ok' if b.get('passed') else 'FAIL'}  max abs "
                                 f"{b.get('worst_max_abs')}  rel {b.get('max_rel_range')}  "
                                 f"top1 {b.get('min_top1')}"
                                 + (f"  {b['error']}" if "error" in b else ""))
        if name == "bench" and "rows" in sec:
            for r in sec["rows"]:
                lines.append(f"  {r['precision']} {r['shape']:10s} device p50 "
                             f"{r['device_ms']['p50']} ms  e2e p50 {r['e2e_ms']['p50']} ms")
    lines.append(f"{'PASSED' if result.get('passed') else 'FAILED'} in "
                 f"{result.get('seconds')} s -> {result.get('path')}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        require_device(args.device)
    except BackendUnavailable as exc:
        path = out_path(args.out)
        write_json(path, {"schema": SCHEMA, "tool": "hmu_export.devtools.gpu_check", "passed": False,
                          "error": str(exc), "environment": environment("cpu")})
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        result = run_checks(args, log=lambda s: print(s, flush=True))
    except HMUExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print("\n".join(summary_lines(result)))
    return 0 if result["passed"] else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
