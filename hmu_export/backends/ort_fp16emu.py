"""ONNX Runtime on the build's FP16 graphs (``*.fp16.onnx``): FP16 storage emulated on the CPU,
a stand-in for GPU FP16, forward and as a generation step backend."""
from __future__ import annotations

from ..core.config import BuildConfig
from ..core.errors import BackendUnavailable
from ..core.io_contract import GraphContract
from ..core.layout import BuildLayout
from ..generate.stepper import CachedStepper, Stepper
from ..runners import OnnxRuntimeRunner
from ..runners.onnxruntime_runner import tuned_session_options
from .ort import OrtStepBackend, spinning, split_graphs
from .registry import BENCH_ONLY, EVERYWHERE, Backend, SourceModel, StepEntry, StepRequest, forward, step


@forward(order=30)
def forward_backends(layout: BuildLayout, cfg: BuildConfig, model: SourceModel,
             contract: GraphContract, *, threads: int | None = None) -> list[Backend]:
    """ORT on the FP16 graph (a stand-in for GPU FP16: it emulates FP16 storage) as a registry
    entry; parity runs it when ``[parity] fp16`` is on. (The PyTorch half-precision backends
    of the source model are the registry's own.)"""

    label, uses = "onnxruntime-fp16emu", EVERYWHERE if cfg.parity.fp16 else BENCH_ONLY
    path = layout.onnx_fp16
    if not path.is_file():
        return [Backend(label, "fp16", None, f"{path.name} not found (fp16 stage skipped?)",
                        uses=uses)]
    return [Backend(label, "fp16", lambda: OnnxRuntimeRunner(
        path, contract, [cfg.profile], precision="fp16", vocab_size=cfg.model.vocab_size,
        label=label, threads=threads), uses=uses)]


def _stepper(req: StepRequest) -> Stepper:
    split_graphs(req.layout)
    enc, dec = split_graphs(req.layout, "fp16")
    if not (enc.is_file() and dec.is_file()):
        raise BackendUnavailable(f"{req.root} has no {enc.name} / {dec.name} (the build's FP16 "
                                 "stage did not write them)")
    return CachedStepper(OrtStepBackend(enc, dec, name=req.name, sess_options=tuned_session_options(
        req.threads, spinning=spinning(req.threads))))


step(StepEntry("onnxruntime-fp16emu", 40, "fp16", "cpu", "encoder.fp16.onnx + decoder.fp16.onnx",
               _stepper, ort_threads=True))
