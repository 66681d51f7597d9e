"""ONNX Runtime on the build's optimized graphs (``*.opt.onnx``: fusions baked in) with the tuned
session options: the CPU fast path, forward and as a generation step backend."""
from __future__ import annotations

from ..core.config import BuildConfig
from ..core.io_contract import GraphContract
from ..core.layout import BuildLayout
from ..generate.stepper import CachedStepper, Stepper
from ..runners import OnnxRuntimeRunner
from ..runners.onnxruntime_runner import forward_session_options, tuned_session_options
from .ort import OrtStepBackend, spinning, split_graphs
from .registry import Backend, SourceModel, StepEntry, StepRequest, forward, step


@forward(order=20)
def forward_backends(layout: BuildLayout, cfg: BuildConfig, model: SourceModel,
                     contract: GraphContract, *, threads: int | None = None) -> list[Backend]:
    """The optimized graph, run with the tuned session options, as an FP32 backend (registry
    entry: parity and bench)."""

    label = "onnxruntime-opt"
    if not cfg.export.optimize:
        return [Backend(label, "fp32", None, "export.optimize = false")]
    if not layout.onnx_optimized.is_file():
        return [Backend(label, "fp32", None, f"{layout.onnx_optimized.name} not found")]
    return [Backend(label, "fp32", lambda: OnnxRuntimeRunner(
        layout.onnx_optimized, contract, [cfg.profile], vocab_size=cfg.model.vocab_size,
        label=label, sess_options=forward_session_options(threads)))]


def _stepper(req: StepRequest) -> Stepper:
    """The optimized encoder / decoder where the build has them, else the plain graphs."""
    enc, dec = split_graphs(req.layout)
    enc_o, dec_o = split_graphs(req.layout, "opt")
    enc, dec = (enc_o if enc_o.is_file() else enc), (dec_o if dec_o.is_file() else dec)
    return CachedStepper(OrtStepBackend(enc, dec, name=req.name, sess_options=tuned_session_options(
        req.threads, spinning=spinning(req.threads))))


step(StepEntry("onnxruntime-opt", 30, "fp32", "cpu",
               "encoder.opt.onnx + decoder.opt.onnx (else the plain graphs)", _stepper,
               ort_threads=True))
