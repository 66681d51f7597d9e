"""Stage engine: TensorRT engines where TensorRT and a GPU exist, and the trtexec recipe for every graph always."""
from __future__ import annotations

from typing import TYPE_CHECKING
from ...core.errors import BackendUnavailable, HMUExportError
from ...core.fileio import sha256_file, write_json, write_text
from ...core.manifest import FAILED, OK, SKIPPED, StageResult
from ...runners.tensorrt_runner import RECORD_FILE, RuntimeInfo, probe_runtime
from ...deploy.tensorrt import build_engine, engine_record, flags, graph_profiles, load_contract_of, profile_rows, render_recipe, render_split_recipe, split_engine_name
from ..context import Stage
if TYPE_CHECKING:
    from ..context import BuildContext


def engine_stage(ctx: "BuildContext") -> StageResult:
    """Write the recipe always; build the engine where TensorRT and a GPU exist."""
    import onnx

    from ...core.io_contract import full_contract
    from ...core.pins import select_pins

    cfg, layout = ctx.cfg, ctx.layout
    contract = ctx.contract or full_contract(cfg.model, cfg.export.diagnostics)
    pins = select_pins(onnx.load(str(layout.onnx), load_external_data=False), cfg.engine)
    names = [p.name for p in pins]
    onnx_sha = sha256_file(layout.onnx)
    split = [(g, ctx.contracts[g] if g in getattr(ctx, "contracts", {}) else
              load_contract_of(layout.graph(g)),
              [p.name for p in select_pins(onnx.load(str(layout.graph(g)),
                                                     load_external_data=False), cfg.engine,
                                                 split=True)])
             for g in layout.split_graphs()]
    recipe = render_recipe(cfg, contract, names, layout, onnx_sha)
    if split:
        recipe += render_split_recipe(cfg, layout, split)
    write_text(layout.recipe, recipe)
    layout.recipe.chmod(0o755)
    record = engine_record(cfg, layout, pins, onnx_sha, contract)
    if split:
        record["generation_engines"] = {g: {"engine": split_engine_name(g), "pins": list(pn),
                                            "profiles": profile_rows(c, graph_profiles(cfg, g))}
                                        for g, c, pn in split}
    ctx.data["engine"] = record
    details = {"recipe": layout.recipe.name, "pins": names,
               "profiles": record["profiles"]}
    try:
        runtime: RuntimeInfo = probe_runtime()
    except BackendUnavailable as exc:
        record["skip_reason"] = str(exc)
        reason = f"{exc}; {layout.recipe.name} builds it on a GPU machine"
        if ctx.require_engine:  # --require-engine / engine.require: a missing engine fails
            return StageResult(FAILED, reason=f"engine required: {reason}", details=details)
        return StageResult(SKIPPED, reason=reason, details=details)
    record.update(runtime.to_dict())
    try:
        record.update(build_engine(layout, cfg, contract, names))
        for g, c, pn in split:
            built = build_engine(layout, cfg, c, pn, graph=g)
            built.update(runtime.to_dict(), onnx_sha256=sha256_file(layout.graph(g)),
                         **record["generation_engines"][g], flags=flags(cfg, pn))
            write_json(layout.root / f"{g}.engine.json", built)
    except HMUExportError:
        raise
    except Exception as exc:  # TensorRT/Polygraphy raise many types (PolygraphyException...)
        record["error"] = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        return StageResult(FAILED, reason=f"TensorRT build failed: {record['error']}",
                           details=details)
    record["built"] = True
    write_json(layout.root / RECORD_FILE, {k: v for k, v in record.items() if k != "built"})
    details.update({k: record[k] for k in ("tensorrt", "gpu", "build_seconds",
                                           "pins_not_found")})
    return StageResult(OK, details=details)


def engine_required(ctx: "BuildContext") -> bool:
    """--require-engine / engine.require: then a missing or failed engine fails the build."""
    return ctx.require_engine


STAGE = Stage("engine", engine_stage, engine_required,
              reads=("model.onnx", "encoder.onnx", "decoder.onnx", "graph_pins"),
              writes=("model.fp16.plan", "encoder.fp16.plan", "decoder.fp16.plan", "timing.cache", "build_engine.sh"))
