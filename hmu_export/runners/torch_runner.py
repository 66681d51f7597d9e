"""The PyTorch reference runner (eager), FP32 or FP16, CPU or CUDA.

It runs the native ``HMUTransformer`` (its full graph, diagnostics included, through
``forward_all``) or any graph of any model source (``source.module(graph)``, whose forward takes
the contract's inputs in contract order and returns its outputs in contract order).
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
import torch

from ..core.config import ProfileConfig
from ..core.errors import BackendUnavailable, InputError
from ..core.io_contract import GraphContract
from ..model import HMUTransformer
from .base import Runner

if TYPE_CHECKING:
    from ..model.interface import ModelSource


FP16_OVERFLOW = 65520.0  # float32 values from here up round to inf in float16


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, model: "HMUTransformer | ModelSource", contract: GraphContract,
                 profiles: Sequence[ProfileConfig] | None = None, *, precision: str = "fp32",
                 device: str = "cpu", label: str | None = None) -> None:
        super().__init__(contract, profiles, precision=precision,
                         vocab_size=model.cfg.vocab_size, label=label or f"torch-{device}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable("CUDA is not available to PyTorch on this machine")
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"precision must be fp32 or fp16, got {precision}")
        self.device = torch.device(device)
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.graph = graph_of(contract)
        native = native_model(model, self.graph)
        self.module: torch.nn.Module | None = None
        if native is not None:
            # A private copy, so FP16 casting never touches the caller's reference model.
            self.model = HMUTransformer(native.cfg)
            self.model.load_state_dict(native.state_dict())
            self.model = self.model.to(device=self.device, dtype=self.dtype).eval()
        else:  # any source, any graph: a private copy of the source, moved, then its module
            source = copy.deepcopy(model)
            source.to(self.device, self.dtype).eval()
            self.model = source.torch_module()
            self.module = source.module(self.graph).eval()

    def validate(self, feeds: Mapping[str, np.ndarray]) -> None:
        """The contract's checks, then the noise as this runner will hold it (float16 overflows
        at 65504, where float32 noise is still finite)."""
        super().validate(feeds)
        noise = feeds.get("noise")
        if self.dtype == torch.float16 and noise is not None and noise.size:
            peak = float(np.abs(noise).max())
            if peak >= FP16_OVERFLOW:
                raise InputError(f"input 'noise' overflows float16 (max |noise| {peak:.3g} > "
                                 f"{float(np.finfo(np.float16).max):g}) on {self.label}")

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        host = [np.ascontiguousarray(feeds[spec.name]) for spec in self.contract.inputs]
        # Timed like an ONNX Runtime run from numpy: copies to the device, the forward and the
        # copies back (which also wait for the device) are the inference.
        with self.timed():
            outs = self._forward(self._to_device(host))
            result = [o.float().cpu().numpy() for o in outs]
        return dict(zip(self.contract.output_names, result))

    def _to_device(self, host: Sequence[np.ndarray]) -> list[torch.Tensor]:
        args = []
        for x in (torch.from_numpy(a).to(self.device) for a in host):
            args.append(x.to(self.dtype) if x.is_floating_point() else x)
        return args

    def _forward(self, args: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The contract's outputs, in contract order, from its inputs on the device."""
        with torch.inference_mode():
            if self.module is None:
                out = self.model.forward_all(*args)
                return [out[name] for name in self.contract.output_names]
            got = self.module(*args)
        return [got] if isinstance(got, torch.Tensor) else list(got)

    def device_timer(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], float] | None:
        """CUDA only: the forward on inputs already on the GPU, timed by CUDA events (ms)."""
        if self.device.type != "cuda":
            return None
        args = self._to_device([np.ascontiguousarray(feeds[s.name]) for s in self.contract.inputs])
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)

        def run() -> float:
            start.record()
            self._forward(args)
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        return run

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def graph_of(contract: GraphContract) -> str:
    """The graph name (full / encoder / decoder / classifier) a contract describes."""
    return contract.name[len("hmu_"):] if contract.name.startswith("hmu_") else contract.name


def native_model(model: "HMUTransformer | ModelSource", graph: str) -> HMUTransformer | None:
    """The native HMUTransformer when ``model`` is one (or wraps one) and the graph is the full
    one: then the runner keeps its original path (``forward_all``, diagnostics included)."""
    if isinstance(model, HMUTransformer):
        return model
    from ..model.native import NativeSource

    if isinstance(model, NativeSource) and graph == "full":
        return model.model
    return None
