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
        return float16.convert_float_to_float16(
            copy, min_positive_val=FP16_MIN_POSITIVE, max_finite_val=FP16_MAX,
            keep_io_types=True, node_block_list=list(keep_fp32) + _casts_to_fp32(copy))


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
