"""ONNX Runtime on the build's FP16 graphs (``*.fp16.onnx``): FP16 storage emulated on the CPU,
a stand-in for GPU FP16, forward and as a generation step backend."""
from __future__ import annotations

from ..core.config import BuildConfig
from ..core.io_contract import GraphContract
from ..core.layout import BuildLayout
from .ort import variant_forward, variant_stepper
from .registry import BENCH_ONLY, EVERYWHERE, Backend, SourceModel, StepEntry, forward, step

WHY = "the build's FP16 stage did not write it"


@forward(order=30)
def forward_backends(layout: BuildLayout, cfg: BuildConfig, model: SourceModel,
                     contract: GraphContract, *, threads: int | None = None) -> list[Backend]:
    """ORT on the FP16 graph (a stand-in for GPU FP16: it emulates FP16 storage); parity runs it
    when ``[parity] fp16`` is on. (PyTorch's half-precision backends are in pytorch.py.)"""
    return variant_forward(layout, cfg, contract, label="onnxruntime-fp16emu", variant="fp16",
                           precision="fp16", threads=threads,
                           uses=EVERYWHERE if cfg.parity.fp16 else BENCH_ONLY, why_missing=WHY,
                           tuned=False)


step(StepEntry("onnxruntime-fp16emu", 40, "fp16", "cpu", "encoder.fp16.onnx + decoder.fp16.onnx",
               variant_stepper("fp16", WHY), ort_threads=True))
