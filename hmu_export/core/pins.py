"""FP32 pin policy: which nodes of the exported graph stay in FP32 when the rest runs in FP16.

The policy is chosen by node *name* from the exported graph (export.py names nodes after the
module path, e.g. ``hmu/norm_input/LayerNormalization``), so the same list drives the TensorRT
build (``--layerPrecisions``), the FP16-emulation graph (``node_block_list``) and the manifest.

Why these nodes (docs/fp16.md has the measurements):
- HMU LayerNorms: the mean of squares of large activations overflows FP16 (65504); TensorRT
  computes normalization in FP32 by default, pinning makes it a checked constraint and keeps
  the normalized output in FP32 for the gate.
- ``hmu/vae/Exp`` (exp(0.5 * logvar)): FP16 overflows for 0.5 * logvar > 11.09.
- ``hmu/gate_mlp/1/Sigmoid``: the gate g and 1 - g are both used; near saturation FP16 keeps
  only ~3 decimal digits of 1 - g.
- Softmax (attention) only when ``engine.pin_softmax``: the measurements did not need it.
- ``engine.fp32_pins``: named nodes, or every compute node under a ``scope/`` (module path).
  No node of the measured models overflows FP16 (largest activation ~55 against 65504); their
  FP16 error is rounding that later layers amplify, so the earliest layers are the ones worth
  keeping in FP32 where a model needs it: ``"encoder/"`` halved the worst emulated error of the
  2x-activation model (docs/fp16.md, "Issue 17 item 6").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import onnx

from .config import EngineConfig
from .errors import ConfigError

REASONS = {
    "LayerNormalization": "normalization of large activations overflows FP16",
    "Exp": "exp(0.5*logvar) overflows FP16 above 11.09",
    "Sigmoid": "saturated gate: FP16 loses 1-g",
    "Softmax": "attention softmax pinned by engine.pin_softmax",
}

# Ops that only compute shapes, indices or masks: never pinned by a scope (nor bisected by
# debug-precision). Data-movement ops (Reshape, Transpose...) are pinned: their outputs are
# FP16 tensors too, so two FP32 nodes joined by a Transpose would still round between them.
NON_COMPUTE_OPS = frozenset({
    "Shape", "Size", "Constant", "ConstantOfShape", "Range", "Equal", "Not", "And", "Or",
    "Less", "Greater", "Trilu"})


@dataclass(frozen=True)
class Pin:
    name: str  # ONNX node name == TensorRT layer name (the ONNX parser keeps node names)
    op_type: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "op_type": self.op_type, "reason": self.reason}


def select_pins(model: onnx.ModelProto, engine: EngineConfig | None = None,
                extra: Iterable[str] = (), *, split: bool = False) -> list[Pin]:
    """The FP32 pins for ``model``: HMU-sensitive nodes, softmax if configured,
    ``engine.fp32_pins``, plus ``extra``.

    Named pins (``extra``, e.g. found by ``debug-precision``, and ``fp32_pins``) must exist in
    the graph, and a ``scope/`` must hold a compute node, so a typo cannot silently pin nothing.
    A ``split`` graph (encoder / decoder step) holds part of the model: configured pins of the
    other part are skipped there (the full graph has checked them).
    """
    engine = engine or EngineConfig()
    by_name = {n.name: n for n in model.graph.node}
    names = list(sensitive_nodes(model))
    if engine.pin_softmax:
        names += [n.name for n in model.graph.node if n.op_type == "Softmax"]
    reasons = {}
    for request in (*engine.fp32_pins, *extra):
        found = resolve_pin(model, request, required=not (split and request in engine.fp32_pins))
        reasons.update({n: f"engine.fp32_pins '{request}'" for n in found
                        if request in engine.fp32_pins and request.endswith("/")})
        names += found
    seen: set[str] = set()
    pins = []
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        op = by_name[name].op_type
        pins.append(Pin(name, op, reasons.get(name) or REASONS.get(op, "pinned by request")))
    return pins


def resolve_pin(model: onnx.ModelProto, request: str, required: bool = True) -> list[str]:
    """The nodes a pin request names: itself, or for ``scope/`` every compute node under it.
    ConfigError when it names nothing (unless not ``required``)."""
    if request.endswith("/"):
        found = [n.name for n in model.graph.node
                 if n.name.startswith(request) and n.op_type not in NON_COMPUTE_OPS]
    else:
        found = [n.name for n in model.graph.node if n.name == request]
    if not found and required:
        raise ConfigError(f"FP32 pin '{request}' is not a node of the graph (node names look "
                          "like hmu/norm_input/LayerNormalization; a scope ends with '/')")
    return found


def pin_names(pins: Iterable[Pin]) -> list[str]:
    return [p.name for p in pins]


def sensitive_nodes(model: onnx.ModelProto, scope: str = "hmu") -> list[str]:
    """HMU nodes whose FP16 error matters most: its LayerNorms, the VAE's exp, the gate sigmoid.
    ``scope`` is the HMU's module path ("hmu", or "encoder/hmu" inside a wrapper)."""
    ops = {"LayerNormalization", "Exp", "Sigmoid"}
    prefix = scope.replace(".", "/") + "/"
    return [n.name for n in model.graph.node if n.name.startswith(prefix) and n.op_type in ops]
