"""The one backend registry: every way to run a build's primary graph, for parity and bench.

``discover_backends(layout, cfg, model, contract)`` lists named backends, each with a label,
a precision, whether it can run here (else why not) and a factory for its Runner. The PyTorch
backends of the source model and ONNX Runtime on the exported graph are listed here; a stage
module that writes a runnable artifact adds its own through a
``backends(layout, cfg, model, contract, *, threads=None)`` function (optimize.py:
onnxruntime-opt, fp16.py: onnxruntime-fp16emu, engine.py: tensorrt), so a new backend never
means editing parity or bench. Stage modules are imported here lazily and import this module
lazily, so there is no import cycle.

``uses`` says which consumers want an entry: parity leaves out its own reference (torch FP32),
FP16 stand-ins when ``[parity] fp16 = false``, and GPU backends this machine lacks (bench lists
those as skipped, because its default set names them).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

from ..core.layout import BuildLayout
from ..core.config import BuildConfig
from ..core.io_contract import GraphContract
from ..runners import OnnxRuntimeRunner, Runner, TorchRunner

if TYPE_CHECKING:
    from ..model import HMUTransformer
    from ..model.interface import ModelSource

#: the source model: the native HMUTransformer (its full graph, diagnostics included) or any
#: ModelSource (the graph module the contract names)
SourceModel = Union["HMUTransformer", "ModelSource"]

PARITY, BENCH = "parity", "bench"
EVERYWHERE = frozenset({PARITY, BENCH})
BENCH_ONLY = frozenset({BENCH})

TORCH = "torch"  # this module's torch_backends, in CONTRIBUTORS' order
#: after ONNX Runtime: modules contributing entries through their ``backends`` function, and
#: the source model's PyTorch backends, in report order
CONTRIBUTORS = ("hmu_export.export.optimize", "hmu_export.export.fp16", TORCH, "hmu_export.deploy.tensorrt")
#: ONNX Runtime execution providers run on the primary graph where this onnxruntime has them
ORT_DEVICE_PROVIDERS = {"onnxruntime-cuda": "CUDAExecutionProvider",
                        "onnxruntime-tensorrt": "TensorrtExecutionProvider"}


@dataclass
class Backend:
    label: str  # unique in a report, e.g. "onnxruntime", "onnxruntime-fp16emu", "tensorrt"
    precision: str  # "fp32" | "fp16": selects the tolerance policy
    make: Callable[[], Runner] | None  # None when unavailable
    skip_reason: str = ""
    device: str = "cpu"  # "cpu" | "cuda": where it computes (bench rows say so)
    uses: frozenset[str] = EVERYWHERE

    @property
    def available(self) -> bool:
        return self.make is not None


def discover_backends(layout: BuildLayout, cfg: BuildConfig, model: SourceModel,
                      contract: GraphContract, *, use: str | None = PARITY,
                      threads: int | None = None) -> list[Backend]:
    """Every backend of the build for ``use`` (``None``: all of them), in report order.
    ``threads`` sets ONNX Runtime's intra-op threads (None: its default)."""
    found = onnxruntime_backends(layout, cfg, contract, threads=threads)
    for name in CONTRIBUTORS:
        if name == TORCH:
            found += torch_backends(cfg, model, contract, fp16=cfg.parity.fp16)
            continue
        contribute = getattr(importlib.import_module(name), "backends", None)
        if contribute is not None:
            found.extend(contribute(layout, cfg, model, contract, threads=threads))
    return [b for b in found if use is None or use in b.uses]


def torch_backends(cfg: BuildConfig, model: SourceModel, contract: GraphContract, *,
                   fp16: bool = True) -> list[Backend]:
    """The source model in PyTorch: FP32 on the CPU (parity's reference), FP16 on the CPU (a
    stand-in for GPU half precision), FP32 / FP16 on CUDA where PyTorch sees a GPU. ``fp16``
    false keeps the FP16 ones out of parity."""
    import torch

    def make(precision: str, device: str, label: str) -> Callable[[], Runner]:
        return lambda: TorchRunner(model, contract, [cfg.profile], precision=precision,
                                   device=device, label=label)

    half = EVERYWHERE if fp16 else BENCH_ONLY
    out = [Backend("torch", "fp32", make("fp32", "cpu", "torch"), uses=BENCH_ONLY),
           Backend("torch-fp16", "fp16", make("fp16", "cpu", "torch-fp16"), uses=half)]
    for precision in ("fp32", "fp16"):
        label = f"torch-cuda-{precision}"
        if torch.cuda.is_available():
            out.append(Backend(label, precision, make(precision, "cuda", label), device="cuda",
                               uses=half if precision == "fp16" else EVERYWHERE))
        else:
            out.append(Backend(label, precision, None, "no CUDA GPU visible to PyTorch",
                               device="cuda", uses=BENCH_ONLY))
    return out


def onnxruntime_backends(layout: BuildLayout, cfg: BuildConfig, contract: GraphContract, *,
                         threads: int | None = None) -> list[Backend]:
    """ONNX Runtime on the primary graph as a user gets it (all graph optimizations): the CPU,
    then CUDA / TensorRT execution providers where this onnxruntime build has them."""
    import onnxruntime as ort

    path = layout.onnx
    if not path.is_file():
        return [Backend("onnxruntime", "fp32", None, f"{path.name} not found")]

    def make(label: str, *providers: str) -> Callable[[], Runner]:
        return lambda: OnnxRuntimeRunner(path, contract, [cfg.profile], providers=providers,
                                         vocab_size=cfg.model.vocab_size, label=label,
                                         threads=threads)

    out = [Backend("onnxruntime", "fp32", make("onnxruntime", "cpu"))]
    have = ort.get_available_providers()
    for label, provider in ORT_DEVICE_PROVIDERS.items():
        if provider in have:
            out.append(Backend(label, "fp32", make(label, provider, "cpu"), device="cuda"))
        else:
            out.append(Backend(label, "fp32", None, f"{provider} not in this onnxruntime build "
                               f"(have: {', '.join(have)})", device="cuda", uses=BENCH_ONLY))
    return out
