"""The FP32 pin policy applied to a PyTorch FP16 model, module by module.

``torch-cuda-fp16`` is the whole model in ``.half()``: no pins, unlike the TensorRT engine. To
see what a pin does to real FP16 arithmetic on a GPU (scripts/device_check.sh), the pinned
modules run in FP32 inside an otherwise half model: inputs cast to float32, weights float32,
output cast back to half (what the next FP16 layer would read). Graph pins are node names
``<module path>/<OpType>``; a node maps to the module that holds it (``hmu/vae/Exp`` ->
``hmu.vae``), so a pin of one op inside a larger module keeps that whole module FP32: a
slightly larger FP32 set than the engine's, said so in the report.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..core.errors import ConfigError


def policy_modules(model: nn.Module) -> list[str]:
    """The modules of core/pins.py's default pins: the HMU's LayerNorms, its VAE (``exp``)
    and its gate sigmoid."""
    hmu = getattr(model, "hmu", None)
    if hmu is None:
        return []
    out = [f"hmu.{name}" for name, mod in hmu.named_modules()
           if isinstance(mod, (nn.LayerNorm, nn.Sigmoid))]
    if hasattr(hmu, "vae"):
        out.append("hmu.vae")
    return out


def request_modules(model: nn.Module, requests: Iterable[str]) -> list[str]:
    """Modules for pin requests (node names or ``scope/`` as in ``engine.fp32_pins``)."""
    known = {name for name, _ in model.named_modules() if name}
    out = []
    for request in requests:
        parts = request.rstrip("/").split("/") if request.endswith("/") else \
            request.split("/")[:-1]
        while parts and ".".join(parts) not in known:
            parts = parts[:-1]
        if not parts:
            raise ConfigError(f"FP32 pin '{request}' names no module of the PyTorch model")
        out.append(".".join(parts))
    return out


def outermost(names: Iterable[str]) -> list[str]:
    """Drop a module when one of its ancestors is in the set too (sorted, no duplicates)."""
    unique = sorted(set(names))
    return [n for n in unique if not any(n.startswith(a + ".") for a in unique if a != n)]


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    return value


def keep_fp32(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Run the named modules of a half model in FP32; returns the outermost set applied."""
    modules = dict(model.named_modules())
    applied = outermost(names)
    half = next((p.dtype for p in model.parameters()), torch.float16)
    for name in applied:
        module = modules[name]
        module.float()
        module.register_forward_pre_hook(
            lambda _m, args, kwargs: (_cast(args, torch.float32),
                                      {k: _cast(v, torch.float32) for k, v in kwargs.items()}),
            with_kwargs=True)
        module.register_forward_hook(lambda _m, _args, out: _cast(out, half))
    return applied
