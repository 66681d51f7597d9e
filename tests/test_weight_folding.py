"""A tied LM head (MatMul over a Transpose of the embedding matrix, as Hugging Face T5 / BART /
Marian export) is quantized when the policy asks for it, kept FP32 (and not copied) when it
does not, and the int8 graph still computes the FP32 graph's logits closely."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from hmu_export.core.config import Int8Config
from hmu_export.export.quantize import quantize_int4, quantize_int8

VOCAB, D = 300, 64


def _tied_graph(path: Path) -> Path:
    """ids -> Gather(W) -> MatMul(., Transpose(W)) -> logits, node names as the hf wrapper's."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((VOCAB, D)).astype(np.float32), "shared")
    nodes = [helper.make_node("Gather", ["shared", "ids"], ["emb"], name="hf/embed/Gather"),
             helper.make_node("Transpose", ["shared"], ["wt"], name="hf/lm_head/Transpose",
                              perm=[1, 0]),
             helper.make_node("MatMul", ["emb", "wt"], ["logits"], name="hf/lm_head/MatMul")]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "t"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "t", VOCAB])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def _run(path: Path, ids: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"ids": ids})[0]


def test_a_tied_lm_head_is_quantized_when_the_policy_allows(tmp_path):
    src = _tied_graph(tmp_path / "m.onnx")
    ids = np.arange(24, dtype=np.int64).reshape(2, 12) * 7 % VOCAB
    ref = _run(src, ids)
    res = quantize_int8(src, tmp_path / "m.int8.onnx", Int8Config(keep_lm_head=False))
    assert res.quantized == 1 and res.kept_fp32 == []
    q = onnx.load(str(tmp_path / "m.int8.onnx"))
    ops = Counter(n.op_type for n in q.graph.node)
    assert ops["MatMulInteger"] == 1 and ops["Transpose"] == 0, ops
    got = _run(tmp_path / "m.int8.onnx", ids)
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.95
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    res4 = quantize_int4(src, tmp_path / "m.int4.onnx", Int8Config(keep_lm_head=False))
    assert res4.quantized == 1
    got4 = _run(tmp_path / "m.int4.onnx", ids)
    assert np.mean(got4.argmax(-1) == ref.argmax(-1)) >= 0.9


def test_a_kept_tied_lm_head_stays_as_exported(tmp_path):
    """keep_lm_head (the default) also covers a Hugging Face wrapper's hf/lm_head/ scope, and the
    kept head gets no transposed FP32 copy of the embedding matrix."""
    src = _tied_graph(tmp_path / "m.onnx")
    res = quantize_int8(src, tmp_path / "m.int8.onnx", Int8Config())
    assert res.quantized == 0
    q = onnx.load(str(tmp_path / "m.int8.onnx"))
    assert [i.name for i in q.graph.initializer] == ["shared"]
    assert Counter(n.op_type for n in q.graph.node)["Transpose"] == 1
