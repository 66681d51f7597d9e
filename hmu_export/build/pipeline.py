"""`build`: a pipeline of named stages (Model Navigator's shape) recorded in manifest.json.

The whole build happens in a staging folder beside the target. Only a build whose required
stages passed replaces the target folder, so a failed or interrupted build never leaves a
half-written artifact where a previous good build was; a failed one is kept as ``<out>.failed``
for inspection.
"""
from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..core.layout import BuildLayout
from ..core.config import BuildConfig
from ..core.errors import ArtifactError, HMUExportError
from ..core.fileio import write_text
from ..core.io_contract import full_contract
from ..core.manifest import FAILED, StageResult, write_manifest
from ..model import HMUTransformer
from ..model.interface import ModelSource
from .context import BuildContext, Stage, as_source
from .folder import LOG_FILE, remove_stale_staging, replace_dir, current_umask, check_target, failed_dir, lock_output, recover_swap, resolve_out
from .preflight import check_generation_options, model_generation, preflight


#: the build, in order: each name is a module of build/stages/ that declares its ``STAGE``
PIPELINE = ("checkpoint", "export", "optimize", "fp16", "quantize", "engine", "parity", "triton")


def _stage(name: str) -> Stage:
    return importlib.import_module(f"{__package__}.stages.{name}").STAGE


STAGES: list[Stage] = [_stage(n) for n in PIPELINE]


@dataclass
class BuildOutcome:
    out_dir: Path
    stages: dict[str, StageResult]
    ok: bool
    seconds: float
    manifest: Path
    failure: str = ""
    log: Path | None = None  # <out>.failed/build.log when a stage raised a bug's exception
    notes: list[str] = field(default_factory=list)  # e.g. an interrupted swap restored


def _versions() -> dict[str, str]:
    from ..export.onnx_export import versions
    return versions()


def run_build(cfg: BuildConfig, out_dir: Path, *, require_engine: bool = False,
              on_stage: Callable[[str, StageResult | None], None] | None = None,
              only: list[str] | None = None,
              model: "HMUTransformer | ModelSource | None" = None,
              force: bool = False) -> BuildOutcome:
    """Run the stages into a staging folder, then move it to ``out_dir`` if it succeeded.

    The output is locked (``.<out>.lock`` beside it) for the whole build: a second build into
    it is refused at once. Each build stages into its own ``.<out>.staging-*`` folder, which
    never outlives the build."""
    t0 = time.perf_counter()
    out_dir = resolve_out(out_dir)
    if model is None:
        model = preflight(cfg, out_dir, force)
    with lock_output(out_dir):
        notes = [n for n in (recover_swap(out_dir), recover_swap(failed_dir(out_dir))) if n]
        check_target(out_dir, force)
        remove_stale_staging(out_dir)
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-",
                                            dir=out_dir.parent))
            os.chmod(staging, 0o777 & ~current_umask())
        except OSError as exc:
            raise ArtifactError(f"output folder {out_dir.parent} is not writable: "
                                f"{exc.strerror or exc}") from None
        try:
            outcome = _run_stages(cfg, out_dir, staging, model, require_engine, on_stage, only,
                                  t0)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    outcome.notes = notes
    return outcome


def _run_stages(cfg: BuildConfig, out_dir: Path, staging: Path,
                model: "HMUTransformer | ModelSource",
                require_engine: bool, on_stage: Callable[[str, StageResult | None], None] | None,
                only: list[str] | None, t0: float) -> BuildOutcome:
    source = as_source(cfg, model)
    check_generation_options(cfg, source)
    cfg = replace(cfg, model=source.cfg,  # resolved: sizes a source reads from its files
                  generation=model_generation(cfg, source))
    ctx = BuildContext(cfg, BuildLayout(staging), require_engine=require_engine or
                       cfg.engine.require, source=source)
    failure, log = "", None
    for stage in map(lambda s: Stage(*s), STAGES):
        name, fn = stage.name, stage.run
        if only is not None and name not in only:
            continue
        if on_stage:
            on_stage(name, None)
        s0 = time.perf_counter()
        bug = False
        try:
            result = fn(ctx)
        except HMUExportError as exc:
            result = StageResult(FAILED, reason=str(exc))
        except Exception as exc:  # a bug: keep the evidence in the failed build's build.log
            bug = True
            first = (str(exc).strip().splitlines() or [""])[0]
            write_text(staging / LOG_FILE, f"stage '{name}' raised an unexpected exception\n\n"
                                           + traceback.format_exc())
            log = failed_dir(out_dir) / LOG_FILE
            result = StageResult(FAILED, reason=f"unexpected {type(exc).__name__}"
                                                f"{': ' + first if first else ''} (a bug; "
                                                f"traceback in {LOG_FILE})")
        result.seconds = time.perf_counter() - s0
        ctx.stages[name] = result
        if on_stage:
            on_stage(name, result)
        if result.status == FAILED and (bug or stage.is_required(ctx)):
            failure = f"stage '{name}' failed: {result.reason}"
            break
    ok = not failure
    extra = {"name": cfg.model.name, "config": cfg.to_dict(),
             "contract": (ctx.contract or full_contract(cfg.model, cfg.export.diagnostics)
                          ).to_dict(),
             "checkpoint_sha256": ctx.checkpoint_sha256, "ok": ok,
             "build_seconds": round(time.perf_counter() - t0, 3)}
    extra.update({k: v for k, v in ctx.data.items() if k in ("parameters", "sensitive_nodes",
                                                              "engine", "parity", "graphs",
                                                              "graph_pins", "generation_parity", "quantize",
                                                              "hmu_status", "task")})
    write_manifest(staging, stages=ctx.stages, profile=cfg.profile.to_dict(),
                   versions=_versions(), extra=extra)
    final = out_dir if ok else failed_dir(out_dir)
    replace_dir(staging, final)
    return BuildOutcome(final, ctx.stages, ok, time.perf_counter() - t0,
                        final / "manifest.json", failure, log)


