"""`build`: a pipeline of named stages (Model Navigator's shape) recorded in manifest.json.

The whole build happens in a staging folder beside the target. Only a build whose required
stages passed replaces the target folder, so a failed or interrupted build never leaves a
half-written artifact where a previous good build was; a failed one is kept as ``<out>.failed``
for inspection.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .artifacts import BuildLayout
from .config import BuildConfig
from .errors import ArtifactError, HMUExportError
from .fileio import ensure_writable_dir, sha256_file
from .io_contract import GraphContract, full_contract
from .manifest import FAILED, OK, StageResult, write_manifest
from .model import HMUTransformer


@dataclass
class BuildContext:
    cfg: BuildConfig
    layout: BuildLayout
    require_engine: bool = False
    model: HMUTransformer | None = None
    contract: GraphContract | None = None
    checkpoint_sha256: str = ""
    # Data handed from stage to stage (pins, optimized-graph flags...), also put in the manifest.
    data: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, StageResult] = field(default_factory=dict)


StageFn = Callable[[BuildContext], StageResult]


def stage_checkpoint(ctx: BuildContext) -> StageResult:
    from .model import build_model, save_checkpoint

    model = ctx.model if ctx.model is not None else build_model(ctx.cfg.model)
    weights, _ = save_checkpoint(model, ctx.layout.checkpoint_dir)
    ctx.model = model
    ctx.checkpoint_sha256 = sha256_file(weights)
    hmu, total = model.hmu_parameter_share()
    ctx.data["parameters"] = {"total": total, "hmu": hmu,
                              "hmu_share": round(hmu / total, 6) if total else 0.0}
    src = ctx.cfg.model.checkpoint or "seeded"
    return StageResult(OK, details={"source": src, "parameters": ctx.data["parameters"]})


def stage_export(ctx: BuildContext) -> StageResult:
    from .export import export_onnx, sensitive_nodes

    assert ctx.model is not None
    res = export_onnx(ctx.model, ctx.cfg, ctx.layout.onnx, checkpoint_sha256=ctx.checkpoint_sha256)
    ctx.contract = res.contract
    import onnx
    ctx.data["sensitive_nodes"] = sensitive_nodes(onnx.load(str(res.path)))
    return StageResult(OK, details={"opset": ctx.cfg.export.opset, "sha256": res.sha256,
                                    "validation_max_abs": res.validation_max_abs,
                                    "sensitive_nodes": ctx.data["sensitive_nodes"]})


def stage_optimize(ctx: BuildContext) -> StageResult:
    from .optimize import optimize_stage
    return optimize_stage(ctx)


def stage_fp16(ctx: BuildContext) -> StageResult:
    from .fp16 import fp16_stage
    return fp16_stage(ctx)


def stage_engine(ctx: BuildContext) -> StageResult:
    from .engine import engine_stage
    return engine_stage(ctx)


def stage_parity(ctx: BuildContext) -> StageResult:
    from .parity import parity_stage
    return parity_stage(ctx)


def stage_triton(ctx: BuildContext) -> StageResult:
    from .triton import triton_stage
    return triton_stage(ctx)


# name, function, required (a failure fails the build)
STAGES: list[tuple[str, StageFn, bool]] = [
    ("checkpoint", stage_checkpoint, True),
    ("export", stage_export, True),
    ("optimize", stage_optimize, True),
    ("fp16", stage_fp16, False),
    ("engine", stage_engine, False),
    ("parity", stage_parity, True),
    ("triton", stage_triton, True),
]


@dataclass
class BuildOutcome:
    out_dir: Path
    stages: dict[str, StageResult]
    ok: bool
    seconds: float
    manifest: Path
    failure: str = ""


def _versions() -> dict[str, str]:
    from .export import versions
    return versions()


def preflight(cfg: BuildConfig, out_dir: Path) -> HMUTransformer:
    """User errors (unwritable output, missing / corrupt / mismatched checkpoint) are reported
    here, before anything is written or shown."""
    from .model import build_model

    out_dir = Path(out_dir)
    ensure_writable_dir(out_dir.parent if out_dir.parent != Path("") else Path("."))
    return build_model(cfg.model)


def run_build(cfg: BuildConfig, out_dir: Path, *, require_engine: bool = False,
              on_stage: Callable[[str, StageResult | None], None] | None = None,
              only: list[str] | None = None, model: HMUTransformer | None = None
              ) -> BuildOutcome:
    """Run the stages into a staging folder, then move it to ``out_dir`` if it succeeded."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if model is None:
        model = preflight(cfg, out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.staging")
    if staging.exists():
        shutil.rmtree(staging)
    ensure_writable_dir(staging)
    ctx = BuildContext(cfg, BuildLayout(staging), require_engine=require_engine or
                       cfg.engine.require, model=model)
    failure = ""
    for name, fn, required in STAGES:
        if only is not None and name not in only:
            continue
        if on_stage:
            on_stage(name, None)
        s0 = time.perf_counter()
        try:
            result = fn(ctx)
        except HMUExportError as exc:
            result = StageResult(FAILED, reason=str(exc))
        result.seconds = time.perf_counter() - s0
        ctx.stages[name] = result
        if on_stage:
            on_stage(name, result)
        if result.status == FAILED and (required or name == "engine"):
            failure = f"stage '{name}' failed: {result.reason}"
            break
    ok = not failure
    extra = {"name": cfg.model.name, "config": cfg.to_dict(),
             "contract": (ctx.contract or full_contract(cfg.model, cfg.export.diagnostics)
                          ).to_dict(),
             "checkpoint_sha256": ctx.checkpoint_sha256, "ok": ok,
             "build_seconds": round(time.perf_counter() - t0, 3)}
    extra.update({k: v for k, v in ctx.data.items() if k in ("parameters", "sensitive_nodes",
                                                              "engine", "parity")})
    write_manifest(staging, stages=ctx.stages, profile=cfg.profile.to_dict(),
                   versions=_versions(), extra=extra)
    final = out_dir if ok else out_dir.with_name(out_dir.name + ".failed")
    _replace_dir(staging, final)
    return BuildOutcome(final, ctx.stages, ok, time.perf_counter() - t0,
                        final / "manifest.json", failure)


def _replace_dir(src: Path, dst: Path) -> None:
    old = dst.with_name(f".{dst.name}.old")
    try:
        if old.exists():
            shutil.rmtree(old)
        if dst.exists():
            dst.rename(old)
        src.rename(dst)
        if old.exists():
            shutil.rmtree(old)
    except OSError as exc:
        raise ArtifactError(f"cannot move the build into {dst}: {exc.strerror or exc}") from None
