"""Stage fp16: FP16 graphs with the FP32 pins of each graph kept."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING
import onnx
from ...core.manifest import OK, SKIPPED, StageResult
from ...export.fp16 import convert_to_fp16, save_fp16_model
from ..context import Stage
if TYPE_CHECKING:
    from ..context import BuildContext


def fp16_stage(ctx: "BuildContext") -> StageResult:
    """Write ``model.fp16.onnx`` with the FP32 pins; skipped when parity.fp16 is off."""
    from ...core.pins import pin_names, select_pins

    if not ctx.cfg.parity.fp16:
        return StageResult(SKIPPED, reason="parity.fp16 is false")
    t0 = time.perf_counter()
    model = onnx.load(str(ctx.layout.onnx))
    pins = select_pins(model, ctx.cfg.engine)
    names = pin_names(pins)
    fp16 = convert_to_fp16(model, names)
    save_fp16_model(fp16, ctx.layout.onnx_fp16)
    ctx.data.setdefault("pins", [p.to_dict() for p in pins])
    details: dict = {"path": ctx.layout.onnx_fp16.name, "fp32_nodes": names,
                     "casts": sum(1 for n in fp16.graph.node if n.op_type == "Cast")}
    for graph in ctx.layout.split_graphs():
        # Each graph keeps its own pins: the HMU (and so every pin) lives in the encoder graph.
        split = onnx.load(str(ctx.layout.graph(graph)))
        split_pins = pin_names(select_pins(split, ctx.cfg.engine, split=True))
        save_fp16_model(convert_to_fp16(split, split_pins), ctx.layout.graph(graph, "fp16"))
        details[graph] = {"path": ctx.layout.graph(graph, "fp16").name, "fp32_nodes": split_pins}
    details["seconds"] = round(time.perf_counter() - t0, 3)
    return StageResult(OK, details=details)


STAGE = Stage("fp16", fp16_stage, False,
              reads=("model.onnx", "encoder.onnx", "decoder.onnx", "graph_pins"),
              writes=("model.fp16.onnx", "encoder.fp16.onnx", "decoder.fp16.onnx"))
