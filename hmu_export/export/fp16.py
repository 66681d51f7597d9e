"""FP16-emulation graph and backends: measure the FP16 budget on a machine without a GPU.

``model.fp16.onnx`` is ``model.onnx`` converted by onnxconverter-common with FP32 graph I/O
(``keep_io_types``) and the policy's pins (pins.py) kept in FP32 (``node_block_list``), so it
carries the same precision decisions as the TensorRT build. ONNX Runtime CPU runs it by
casting FP16 tensors to FP32 around most kernels: it emulates FP16 *storage* (every
intermediate rounded to FP16, overflow above 65504), not FP16 accumulation. PyTorch ``.half()``
on CPU is the second, independent FP16 stand-in (no pins: every op in half).
See docs/fp16.md for what each one measures and the figures.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import onnx

from ..core.errors import ArtifactError
from ..core.fileio import atomic_path

if TYPE_CHECKING:
    pass

# Clamp like TensorRT does (weights outside FP16's range are clamped to +-65504), not to the
# converter's default 1e4, so the emulation fails where the engine would.
FP16_MAX = 65504.0
FP16_MIN_POSITIVE = 5.960464477539063e-08  # smallest FP16 subnormal


def _detach_consumed_outputs(model: onnx.ModelProto) -> None:
    """Give graph outputs that other nodes also read (the diagnostic ``encoder_out``) their own
    Identity. The converter keeps such a tensor FP32 for the output *and* its internal readers,
    which then mix FP32 and FP16 inputs (ORT: "Type parameter (T) ... bound to different types")."""
    outputs = {o.name for o in model.graph.output}
    read = {i for n in model.graph.node for i in n.input}
    for name in sorted(outputs & read):
        inner = f"{name}__internal"
        for node in model.graph.node:
            node.output[:] = [inner if o == name else o for o in node.output]
            node.input[:] = [inner if i == name else i for i in node.input]
        model.graph.node.append(onnx.helper.make_node("Identity", [inner], [name],
                                                      name=f"output/{name}/Identity"))


def convert_to_fp16(model: onnx.ModelProto, keep_fp32: Sequence[str] = ()) -> onnx.ModelProto:
    """An FP16 copy of ``model`` with FP32 inputs/outputs and the named nodes kept in FP32."""
    import warnings

    from onnxconverter_common import float16

    missing = sorted(set(keep_fp32) - {n.name for n in model.graph.node})
    if missing:
        raise ArtifactError(f"cannot keep '{missing[0]}' in FP32: no such node in the graph")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _detach_consumed_outputs(copy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the converter warns on every clamped value
        # op_block_list is left at None: passing a list REPLACES the converter's default list.
        fp16 = float16.convert_float_to_float16(
            copy, min_positive_val=FP16_MIN_POSITIVE, max_finite_val=FP16_MAX,
            keep_io_types=True, node_block_list=list(keep_fp32) + _casts_to_fp32(copy))
    _pinned_weights_in_fp32(model, fp16, set(keep_fp32))
    _pinned_inputs_in_fp32(fp16, set(keep_fp32), {i.name for i in model.graph.input
                                                   if i.type.tensor_type.elem_type
                                                   == onnx.TensorProto.FLOAT})
    _pinned_outputs_in_fp32(fp16, set(keep_fp32))
    _prune_unread(fp16)
    return fp16


def _pinned_weights_in_fp32(src: onnx.ModelProto, fp16: onnx.ModelProto,
                            pinned: set[str]) -> None:
    """Feed pinned nodes their weights in FP32, as a TensorRT layer pinned to FP32 gets them.

    The exporter lists every initializer in ``value_info``, so the converter rounds a pinned
    node's weights to FP16 like any other and casts them back (a Cast-to-FLOAT of an FP16
    initializer before the node): the node then computes in FP32 on FP16-rounded weights, and
    a weight beyond 65504 stays clamped (docs/fp16.md, "Two emulation bugs"). Here such an input
    is rewired to an FP32 copy of the original initializer; Casts and FP16 initializers left
    without readers are removed."""
    originals = {i.name: i for i in src.graph.initializer
                 if i.data_type == onnx.TensorProto.FLOAT}
    producer = {o: n for n in fp16.graph.node for o in n.output}
    inits = {i.name for i in fp16.graph.initializer}
    added: set[str] = set()
    for node in fp16.graph.node:
        if node.name not in pinned:
            continue
        for k, name in enumerate(node.input):
            cast = producer.get(name)
            if cast is None or _cast_to(cast) != onnx.TensorProto.FLOAT:
                continue
            source = cast.input[0]
            if source not in inits or source not in originals:
                continue
            weight = f"{source}__fp32"
            if weight not in added:
                kept = onnx.TensorProto()
                kept.CopyFrom(originals[source])
                kept.name = weight
                fp16.graph.initializer.append(kept)
                added.add(weight)
            node.input[k] = weight


def _pinned_inputs_in_fp32(fp16: onnx.ModelProto, pinned: set[str], fp32_inputs: set[str]
                           ) -> None:
    """Let a pinned node read an FP32 value directly, as TensorRT does for a layer pinned with
    ``--layerPrecisions`` *and* ``--layerOutputTypes`` fp32 (build_engine.sh sets both).

    The converter casts every pinned node's output to FP16 and back to FP32 before the next
    pinned node (and the FP32 graph input ``noise`` likewise), so two adjacent pins still
    rounded the tensor between them to FP16. Here a pinned node's input
    ``Cast(FLOAT)(Cast(FLOAT16)(t))`` becomes ``t`` when ``t`` is FP32 (a graph input or
    another pinned node's output); unpinned readers keep the FP16 copy."""
    producer = {o: n for n in fp16.graph.node for o in n.output}

    def fp32_source(name: str) -> str | None:
        up = producer.get(name)
        if _cast_to(up) != onnx.TensorProto.FLOAT:
            return None
        half = producer.get(up.input[0])  # type: ignore[union-attr]
        if _cast_to(half) != onnx.TensorProto.FLOAT16:
            return None
        src = half.input[0]  # type: ignore[union-attr]
        origin = producer.get(src)
        return src if src in fp32_inputs or (origin is not None and origin.name in pinned) \
            else None

    for node in fp16.graph.node:
        if node.name in pinned:
            node.input[:] = [fp32_source(i) or i for i in node.input]


def _pinned_outputs_in_fp32(fp16: onnx.ModelProto, pinned: set[str]) -> None:
    """A pinned node that writes a graph output writes it in FP32. The converter put a Cast to
    FP16 there and declared the output FP16, despite ``keep_io_types``."""
    producer = {o: n for n in fp16.graph.node for o in n.output}
    for out in fp16.graph.output:
        cast = producer.get(out.name)
        if _cast_to(cast) != onnx.TensorProto.FLOAT16:
            continue
        source = producer.get(cast.input[0])  # type: ignore[union-attr]
        if source is None or source.name not in pinned:
            continue
        source.output[:] = [out.name if o == cast.input[0] else o  # type: ignore[union-attr]
                            for o in source.output]
        fp16.graph.node.remove(cast)
        out.type.tensor_type.elem_type = onnx.TensorProto.FLOAT


def _cast_to(node: onnx.NodeProto | None) -> int | None:
    """The element type a Cast node makes; None for anything else."""
    if node is None or node.op_type != "Cast":
        return None
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _prune_unread(model: onnx.ModelProto) -> None:
    """Remove Cast nodes and initializers that nothing reads any more (graph outputs kept)."""
    outputs = {o.name for o in model.graph.output}
    while True:
        read = {i for n in model.graph.node for i in n.input} | outputs
        dead = [n for n in model.graph.node if n.op_type == "Cast" and n.output[0] not in read]
        if not dead:
            break
        for node in dead:
            model.graph.node.remove(node)
    read = {i for n in model.graph.node for i in n.input} | outputs
    unread = [i for i in model.graph.initializer if i.name not in read]
    for init in unread:
        model.graph.initializer.remove(init)
    live = {i.name for i in model.graph.initializer} | {o for n in model.graph.node
                                                        for o in n.output}
    unread_info = [v for v in model.graph.value_info if v.name not in live]
    for info in unread_info:
        model.graph.value_info.remove(info)


def _casts_to_fp32(model: onnx.ModelProto) -> list[str]:
    """Cast nodes that make FP32 (Transformers' masks: bool -> float). The converter retypes
    their outputs to FP16 but leaves ``to = FLOAT``, a graph ONNX Runtime refuses ("Type
    (tensor(float16)) of output arg ... of node (Cast) does not match"); kept in FP32, they are
    followed by the converter's own cast to FP16."""
    names = []
    for node in model.graph.node:
        if node.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT
                                          for a in node.attribute):
            if not node.name:
                node.name = f"cast_to_fp32/{node.output[0]}"
            names.append(node.name)
    return names


def write_fp16_model(src: Path, dst: Path, keep_fp32: Sequence[str]) -> Path:
    """Convert the graph at ``src`` and write it atomically to ``dst`` (one file, no external data)."""
    model = onnx.load(str(src))
    return save_fp16_model(convert_to_fp16(model, keep_fp32), Path(dst))


def save_fp16_model(fp16: onnx.ModelProto, dst: Path) -> Path:
    """Write a converted graph atomically, only once ONNX Runtime loads it (build and command)."""
    with atomic_path(Path(dst)) as tmp:
        onnx.save_model(fp16, str(tmp), save_as_external_data=False)
        _check_loads(tmp)
    return Path(dst)


def _check_loads(path: Path) -> None:
    """Verify before the rename: a converted graph that ONNX Runtime rejects is never written."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises Fail / InvalidGraph / RuntimeException
        raise ArtifactError(f"the FP16 graph does not load in ONNX Runtime: "
                            f"{str(exc).splitlines()[0]}") from None
