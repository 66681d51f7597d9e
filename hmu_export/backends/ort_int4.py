"""ONNX Runtime on the build's int4 graphs (``*.int4.onnx``: int4 weight-only MatMulNBits), forward and as a
generation step backend. Their quality is judged by task accuracy against FP32 (the quantize
stage's budget), not by the FP32 / FP16 logit tolerances: parity's numeric grid leaves them out."""
from __future__ import annotations

from ..core.config import BuildConfig
from ..core.io_contract import GraphContract
from ..core.layout import BuildLayout
from .ort import variant_forward, variant_stepper
from .registry import BENCH_ONLY, Backend, SourceModel, StepEntry, forward, step

WHY = "the build's quantize stage did not write it, or its quality budget failed"


@forward(order=36)
def forward_backends(layout: BuildLayout, cfg: BuildConfig, model: SourceModel,
                     contract: GraphContract, *, threads: int | None = None) -> list[Backend]:
    return variant_forward(layout, cfg, contract, label="onnxruntime-int4", variant="int4",
                           precision="int4", threads=threads, uses=BENCH_ONLY, why_missing=WHY)


step(StepEntry("onnxruntime-int4", 44, "int4", "cpu",
               "encoder.int4.onnx + decoder.int4.onnx", variant_stepper("int4", WHY),
               ort_threads=True))
