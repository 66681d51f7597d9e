"""Stage optimize: ONNX Runtime-optimized graphs for the CPU fast path, each checked against its exported graph."""
from __future__ import annotations

from typing import TYPE_CHECKING
from ...core.manifest import FAILED, OK, SKIPPED, StageResult
from ...export.optimize import optimize_graph, optimize_split_graph
from ..context import Stage
if TYPE_CHECKING:
    from ..context import BuildContext


def optimize_stage(ctx: "BuildContext") -> StageResult:
    """Build stage: model.opt.onnx (attention fused, parity-checked against model.onnx) and
    the ORT-optimized encoder / decoder-step graphs."""
    if not ctx.cfg.export.optimize:
        return StageResult(SKIPPED, reason="export.optimize = false")
    if not ctx.layout.onnx.is_file():
        return StageResult(FAILED, reason=f"{ctx.layout.onnx.name} not found")
    report = optimize_graph(ctx.layout.onnx, ctx.layout.onnx_optimized, ctx.cfg, ctx.model)
    details = report.to_dict()
    for graph, contract in getattr(ctx, "contracts", {}).items():
        if graph in ("encoder", "decoder"):
            details[graph] = optimize_split_graph(ctx.layout.graph(graph),
                                                  ctx.layout.graph(graph, "opt"), contract,
                                                  ctx.cfg)
    ctx.data["optimize"] = details
    return StageResult(OK, details=details)


STAGE = Stage("optimize", optimize_stage, True,
              reads=("model.onnx", "encoder.onnx", "decoder.onnx"),
              writes=("model.opt.onnx", "encoder.opt.onnx", "decoder.opt.onnx"))
