"""ONNX Runtime on the build's int8 graphs (``*.int8.onnx``: int8 weights, int8 activations
quantized per call or, ``[int8] mode = "static"``, with calibrated QDQ scales), forward and as a
generation step backend. Their quality is judged by task accuracy against FP32 (the quantize
stage's budget), not by the FP32 / FP16 logit tolerances: parity's numeric grid leaves them out."""
from __future__ import annotations

from ..core.config import BuildConfig
from ..core.io_contract import GraphContract
from ..core.layout import BuildLayout
from .ort import variant_forward, variant_stepper
from .registry import BENCH_ONLY, Backend, SourceModel, StepEntry, forward, step

WHY = "the build's quantize stage did not write it, or its quality budget failed"


@forward(order=35)
def forward_backends(layout: BuildLayout, cfg: BuildConfig, model: SourceModel,
                     contract: GraphContract, *, threads: int | None = None) -> list[Backend]:
    return variant_forward(layout, cfg, contract, label="onnxruntime-int8", variant="int8",
                           precision="int8", threads=threads, uses=BENCH_ONLY, why_missing=WHY)


step(StepEntry("onnxruntime-int8", 42, "int8", "cpu",
               "encoder.int8.onnx + decoder.int8.onnx", variant_stepper("int8", WHY),
               ort_threads=True))
