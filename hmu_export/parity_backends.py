"""Which backends the parity suite (and the benchmark) can run on a build folder.

Each stage module that writes a runnable artifact contributes its own entries through a
``parity_backends(layout, cfg, model, contract)`` function, so adding a backend never means
editing the parity suite. ``model`` is the build's source model (the native HMUTransformer or a
ModelSource), ``contract`` the primary graph's: every backend runs that graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

from .artifacts import BuildLayout
from .config import BuildConfig
from .io_contract import GraphContract
from .model import HMUTransformer
from .runners import OnnxRuntimeRunner, Runner

if TYPE_CHECKING:
    from .model.interface import ModelSource

#: what the parity reference runs: the native HMUTransformer (its full graph, diagnostics
#: included) or any model source (the graph module the contract names)
SourceModel = Union[HMUTransformer, "ModelSource"]


@dataclass
class Backend:
    label: str  # unique in a report, e.g. "onnxruntime", "onnxruntime-fp16emu", "tensorrt"
    precision: str  # "fp32" | "fp16": selects the tolerance policy
    make: Callable[[], Runner] | None  # None when unavailable
    skip_reason: str = ""

    @property
    def available(self) -> bool:
        return self.make is not None


def _onnxruntime_fp32(layout: BuildLayout, cfg: BuildConfig, model: SourceModel,
                      contract: GraphContract) -> list[Backend]:
    if not layout.onnx.is_file():
        return [Backend("onnxruntime", "fp32", None, f"{layout.onnx.name} not found")]
    return [Backend("onnxruntime", "fp32", lambda: OnnxRuntimeRunner(
        layout.onnx, contract, [cfg.profile], vocab_size=cfg.model.vocab_size,
        label="onnxruntime"))]


def discover_backends(layout: BuildLayout, cfg: BuildConfig, model: SourceModel,
                      contract: GraphContract) -> list[Backend]:
    from . import engine, fp16, optimize

    found = _onnxruntime_fp32(layout, cfg, model, contract)
    for module in (optimize, fp16, engine):
        contribute = getattr(module, "parity_backends", None)
        if contribute is not None:
            found.extend(contribute(layout, cfg, model, contract))
    return found
