"""Stage export: every graph of the source, each exported once (the others in worker processes)."""
from __future__ import annotations

from pathlib import Path
from typing import Any
from ...core.config import BuildConfig
from ...core.io_contract import DECODER
from ...core.manifest import OK, StageResult
from ..context import BuildContext
from ..context import Stage


def stage_export(ctx: BuildContext) -> StageResult:
    """Export every graph of the source once (dynamo tracing dominates the build's time)."""
    import onnx

    from ...core.pins import sensitive_nodes
    from ...core.graph_kinds import GRAPH_FILES
    from ...core.io_contract import ENCODER

    assert ctx.source is not None
    graphs: dict[str, Any] = {}
    pins: dict[str, list[str]] = {}
    names = [g for g in ctx.source.graph_names()
             if ctx.cfg.generation.split_graphs or g not in (ENCODER, DECODER)]
    results = _export_all(ctx, names)
    for i, graph in enumerate(names):
        res = results[graph]
        ctx.contracts[graph] = res.contract
        if i == 0:
            ctx.contract = res.contract
        pins[graph] = sensitive_nodes(onnx.load(str(res.path)), ctx.source.hmu_scope)
        graphs[graph] = {"file": GRAPH_FILES[graph], "sha256": res.sha256,
                         "seconds": round(res.seconds, 2),
                         "validation_max_abs": res.validation_max_abs,
                         "contract": res.contract.to_dict()}
    primary = ctx.source.graph_names()[0]
    ctx.data["sensitive_nodes"] = pins[primary]
    ctx.data["graph_pins"] = pins
    ctx.data["graphs"] = graphs
    worst = max(g["validation_max_abs"] for g in graphs.values())
    return StageResult(OK, details={"opset": ctx.cfg.export.opset, "graphs": list(graphs),
                                    "validation_max_abs": worst,
                                    "sensitive_nodes": ctx.data["sensitive_nodes"]})


def export_workers(cfg: BuildConfig, graphs: int) -> int:
    """Processes exporting graphs beside the main one: dynamo tracing is single-threaded Python,
    so each core can trace its own graph (``[export] workers``: 0 = one per spare core)."""
    from ...runners.onnxruntime_runner import cpu_threads

    want = cfg.export.workers if cfg.export.workers > 0 else cpu_threads() - 1
    return max(0, min(want, graphs - 1))


def _export_all(ctx: BuildContext, names: list[str]) -> dict[str, Any]:
    """Export ``names``: the primary graph here, the others in spawned processes that rebuild
    the model from the checkpoint stage's files (the same weights, so the same bytes)."""
    import concurrent.futures as cf
    import multiprocessing

    from ...export.onnx_export import export_graph
    from ...core.graph_kinds import GRAPH_FILES

    assert ctx.source is not None
    ckpt = ctx.layout.checkpoint_dir
    workers = export_workers(ctx.cfg, len(names)) if (ckpt / "config.json").is_file() else 0

    def here(i: int, graph: str) -> Any:
        assert ctx.source is not None
        return export_graph(ctx.source, graph, ctx.cfg, ctx.layout.root / GRAPH_FILES[graph],
                            checkpoint_sha256=ctx.checkpoint_sha256,
                            diagnostics=ctx.cfg.export.diagnostics and i == 0)

    if not workers:
        return {g: here(i, g) for i, g in enumerate(names)}
    with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {g: pool.submit(_export_in_child, str(ckpt), g, ctx.cfg,
                                  str(ctx.layout.root / GRAPH_FILES[g]), ctx.checkpoint_sha256)
                   for g in names[1:]}
        out = {names[0]: here(0, names[0])}
        for g, fut in futures.items():
            out[g] = fut.result()
    return out


def _export_in_child(checkpoint_dir: str, graph: str, cfg: BuildConfig, path: str,
                     checkpoint_sha256: str) -> Any:
    import torch

    from ...export.onnx_export import export_graph
    from ...model.checkpoint import load_source_checkpoint

    torch.set_num_threads(1)
    source = load_source_checkpoint(Path(checkpoint_dir))
    return export_graph(source, graph, cfg, Path(path), checkpoint_sha256=checkpoint_sha256)


STAGE = Stage("export", stage_export, True,
              reads=("checkpoint/",),
              writes=("model.onnx", "encoder.onnx", "decoder.onnx"))
