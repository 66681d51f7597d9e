"""`build`: config -> checkpoint -> ONNX -> optimized/FP16 graphs -> engine -> parity -> Triton."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import ui
from ..core.layout import DEFAULT_ROOT
from ..core.config import load_config
from ..core.manifest import StageResult
from ..build.pipeline import STAGES, run_build
from ..build.preflight import preflight
from ..build.folder import lock_output, resolve_out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build every artifact for a model (default: the embedded "
                                     "default model into engines/<name>/)")
    p.add_argument("--config", type=Path, help="TOML config (default: the embedded default)")
    p.add_argument("--out", type=Path, help="output folder (default: engines/<model name>)")
    p.add_argument("--require-engine", action="store_true",
                   help="fail when the TensorRT engine cannot be built here")
    p.add_argument("--force", action="store_true",
                   help="replace --out even when it is a non-empty folder that holds no build "
                        "(everything in it is deleted)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    out = resolve_out(args.out or DEFAULT_ROOT / cfg.model.name)
    model = preflight(cfg, out, force=args.force)
    with lock_output(out):  # a second build into `out` is refused here, before any output
        ui.err.print(f"[bold]hmu-export build[/bold] {cfg.model.name} -> {out}")
        with ui.progress(transient=False) as bar:
            task = bar.add_task("build", total=len(STAGES))

            def on_stage(name: str, result: StageResult | None) -> None:
                if result is None:
                    bar.update(task, description=f"{name}")
                else:
                    bar.advance(task)

            outcome = run_build(cfg, out, require_engine=args.require_engine,
                                on_stage=on_stage, model=model, force=args.force)
    for note in outcome.notes:
        ui.err.print(f"[yellow]note[/yellow]: {note}")
    rows = [(name, r.status, f"{r.seconds:.1f}s", r.reason or _detail(name, r))
            for name, r in outcome.stages.items()]
    ui.out.print(ui.table(f"build {cfg.model.name}: {'ok' if outcome.ok else 'FAILED'} in "
                          f"{outcome.seconds:.1f}s -> {outcome.out_dir}",
                          ("stage", "status", "time", "detail"), rows))
    if not outcome.ok:
        ui.err.print(f"error: {outcome.failure} (see {outcome.log or outcome.out_dir})",
                     markup=False, highlight=False)
        return 1
    return 0


def _detail(name: str, r: StageResult) -> str:
    d = r.details
    if name == "checkpoint" and "parameters" in d:
        p = d["parameters"]
        return f"{p['total']:,} params, HMU {100 * p['hmu_share']:.2f}%"
    if name == "export" and "validation_max_abs" in d:
        return f"opset {d['opset']}, max abs vs torch {d['validation_max_abs']:.1e}"
    if name == "parity" and "worst_logits_max_abs" in d:
        worst = ", ".join(f"{k} {v:.1e}" for k, v in d["worst_logits_max_abs"].items())
        text = f"{d['shapes']} shapes; worst logits max abs: {worst}"
        gen = d.get("generation")
        if gen:
            exact = [k for k, v in gen["greedy_vs_reference"].items() if v["exact"]]
            text += (f"; decoder steps vs full graph {gen['worst_step_max_abs']:.1e}, greedy "
                     f"tokens = {gen['reference']} on {', '.join(exact) or 'none'}")
        return text
    shown = {"seconds"}  # already in the time column
    return ", ".join(f"{k}={_number(v)}" for k, v in d.items()
                     if k not in shown and isinstance(v, (str, int, float)))[:100]


def _number(v: object) -> str:
    """Numbers for people: ``3.1e-06``, ``0.25``, ``1,234``; other values as they are."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.2g}" if v and not 1e-3 <= abs(v) < 1e4 else f"{v:.4g}"
