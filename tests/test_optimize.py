"""The optimized CPU graph: fused ops present, loads in plain ONNX Runtime, matches model.onnx."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from hmu_export.core.layout import BuildLayout
from hmu_export.core.errors import ParityFailure
from hmu_export.core.io_contract import full_contract, make_feeds
from hmu_export.model import HMUTransformer
from hmu_export.backends.ort_opt import forward_backends as backends
from hmu_export.export.optimize import optimize_graph


@pytest.fixture(scope="module")
def optimized(small_export, small_cfg, small_model, tmp_path_factory):
    layout = BuildLayout(tmp_path_factory.mktemp("opt"))
    shutil.copy(small_export.onnx, layout.onnx)
    report = optimize_graph(layout.onnx, layout.onnx_optimized, small_cfg, small_model)
    return layout, report


def _plain(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def test_contains_fused_ops(optimized, small_cfg):
    layout, report = optimized
    ops = {n.op_type for n in onnx.load(str(layout.onnx_optimized)).graph.node}
    # 1 encoder self-attn + 1 decoder self-attn -> Attention; 1 cross-attn -> MultiHeadAttention;
    # the HMU's GELU -> BiasGelu; SkipLayerNormalization left out (slower on CPU than Add + LN)
    assert {"Attention", "MultiHeadAttention", "BiasGelu"} <= ops
    assert not ops & {"SkipLayerNormalization", "Erf"}
    # GELU; the VAE's 0.5 * logvar and both embedding scales; the gated mix
    assert report.rewrites == {"erf_gelu": 1, "fold_scale": 3, "gate_mix": 1}
    assert set(report.attention.values()) == {"fused"}
    assert len(report.attention) == small_cfg.model.n_encoder_layers + 2 * small_cfg.model.n_decoder_layers
    assert report.to_dict()["nodes_after"] < report.to_dict()["nodes_before"] / 2


def test_plain_ort_matches_original(optimized, small_cfg):
    layout, _ = optimized
    ref, opt = _plain(layout.onnx), _plain(layout.onnx_optimized)
    for shape in [(1, 1, 1), (1, 16, 8), (3, 9, 5), (4, 16, 8)]:
        feeds = make_feeds(small_cfg.model, *shape, seed=5)
        assert feeds["src_mask"].min() == 0 or shape[0] == 1 or shape[1] == 1
        a, b = ref.run(None, feeds)[0], opt.run(None, feeds)[0]
        assert a.shape == b.shape == (shape[0], shape[2], small_cfg.model.vocab_size)
        assert np.max(np.abs(a - b)) < 1e-4, shape


def test_matches_pytorch(optimized, small_cfg, small_model):
    import torch
    layout, _ = optimized
    feeds = make_feeds(small_cfg.model, 4, 16, 8, seed=1)
    with torch.inference_mode():
        ref = small_model(*(torch.from_numpy(feeds[k]) for k in
                            ("src_ids", "src_mask", "tgt_ids", "noise"))).numpy()
    got = _plain(layout.onnx_optimized).run(None, feeds)[0]
    assert np.max(np.abs(got - ref)) < 1e-4


def test_metadata_kept(optimized):
    layout, _ = optimized
    keys = {p.key for p in onnx.load(str(layout.onnx_optimized)).metadata_props}
    assert "hmu_export.config" in keys and "hmu_export.contract" in keys


def test_wrong_weights_fail_parity(small_export, small_cfg, tmp_path):
    """The parity check is real: fusing with another model's attention weights is refused."""
    other = HMUTransformer(dataclasses.replace(small_cfg.model, seed=99)).eval()
    dst = tmp_path / "bad.opt.onnx"
    with pytest.raises(ParityFailure, match="disagrees"):
        optimize_graph(small_export.onnx, dst, small_cfg, other)
    assert not dst.exists()


def test_parity_backend(optimized, small_cfg, small_model):
    layout, _ = optimized
    contract = full_contract(small_cfg.model)
    (backend,) = backends(layout, small_cfg, small_model, contract)
    assert backend.label == "onnxruntime-opt" and backend.precision == "fp32"
    runner = backend.make()
    feeds = make_feeds(small_cfg.model, 2, 8, 4)
    ref = _plain(layout.onnx).run(None, feeds)[0]
    assert np.max(np.abs(runner.infer(feeds)["logits"] - ref)) < 1e-4
    missing = backends(BuildLayout(layout.root / "nope"), small_cfg, small_model, contract)
    assert not missing[0].available and "not found" in missing[0].skip_reason


def test_stage_skips_when_disabled(small_cfg, tmp_path):
    from hmu_export.build.stages.optimize import optimize_stage
    from hmu_export.build.context import BuildContext

    cfg = dataclasses.replace(small_cfg, export=dataclasses.replace(small_cfg.export,
                                                                    optimize=False))
    res = optimize_stage(BuildContext(cfg, BuildLayout(tmp_path)))
    assert res.status == "skipped" and "optimize" in res.reason
    assert not (tmp_path / "model.opt.onnx").exists()


# --------------------------------------------------------------------------- elementwise rewrites
def _run(model, feeds):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _model(nodes, inputs, outputs, inits):
    from onnx import helper
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, 1, s)
                                           for n, s in inputs],
                              [helper.make_tensor_value_info(n, 1, None) for n in outputs],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_rewrites_compute_the_same_functions():
    """Each rewrite on the exporter's pattern, against the formula in numpy (independent of
    both graphs): GELU with erf, a scalar after a Linear and after a Gather, the gated mix."""
    import math

    from onnx import helper, numpy_helper

    from hmu_export.export.optimize import rewrite_elementwise

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    table = rng.standard_normal((10, 8)).astype(np.float32)
    c = {"sqrt2": np.float32(math.sqrt(2)), "one": np.float32(1), "half": np.float32(0.5),
         "three": np.float32(3)}
    inits = [numpy_helper.from_array(np.array(v), k) for k, v in c.items()]
    inits += [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b"),
              numpy_helper.from_array(table, "table")]
    nodes = [  # gelu(x): (0.5 * (1 + erf(x / sqrt2))) * x, as torch.onnx writes nn.GELU
        helper.make_node("Div", ["x", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["half", "e1"], ["h"]),
        helper.make_node("Mul", ["x", "h"], ["gelu"]),
        # 0.5 * (x W + b)
        helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["lin"]),
        helper.make_node("Mul", ["lin", "half"], ["half_lin"]),
        # 3 * table[ids]
        helper.make_node("Gather", ["table", "ids"], ["emb"]),
        helper.make_node("Mul", ["emb", "three"], ["emb3"]),
        # g * a + (1 - g) * b
        helper.make_node("Mul", ["g", "a"], ["ga"]), helper.make_node("Sub", ["one", "g"], ["g1"]),
        helper.make_node("Mul", ["g1", "bb"], ["gb"]), helper.make_node("Add", ["ga", "gb"], ["mix"])]
    inputs = [("x", [2, 3, 8]), ("g", [2, 3, 8]), ("a", [2, 3, 8]), ("bb", [2, 3, 8])]
    model = _model(nodes, inputs, ["gelu", "half_lin", "emb3", "mix"], inits)
    model.graph.input.append(helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2, 3]))
    feeds = {n: rng.standard_normal((2, 3, 8)).astype(np.float32) for n, _ in inputs}
    feeds["g"] = 1 / (1 + np.exp(-feeds["g"]))
    feeds["ids"] = rng.integers(0, 10, (2, 3))

    done = rewrite_elementwise(model)
    assert done == {"erf_gelu": 1, "fold_scale": 2, "gate_mix": 1}
    ops = [n.op_type for n in model.graph.node]
    assert "Erf" not in ops and "Gelu" in ops and ops.count("Mul") == 1 and ops.count("Sub") == 1
    gelu, half_lin, emb3, mix = _run(model, feeds)
    x = feeds["x"].astype(np.float64)
    erf = np.vectorize(math.erf)
    np.testing.assert_allclose(gelu, 0.5 * x * (1 + erf(x / math.sqrt(2))), atol=1e-6)
    np.testing.assert_allclose(half_lin, 0.5 * (x @ w + bias), atol=1e-5)
    np.testing.assert_array_equal(emb3, table[feeds["ids"]] * np.float32(3))
    g, a, b = feeds["g"], feeds["a"], feeds["bb"]
    np.testing.assert_allclose(mix, g * a + (1 - g) * b, atol=1e-6)


def test_rewrites_leave_other_patterns_alone():
    """A GELU-like chain with another constant, a scale on a tensor used twice, a scale after
    the Gather of a table something else reads too (tied weights: folding would copy it) and a
    mix with 2 - g are not the patterns: nothing is rewritten."""
    from onnx import helper, numpy_helper

    from hmu_export.export.optimize import rewrite_elementwise

    inits = [numpy_helper.from_array(np.array(v, np.float32), k)
             for k, v in {"c13": 1.3, "one": 1.0, "two": 2.0, "half": 0.5}.items()]
    inits.append(numpy_helper.from_array(np.eye(4, dtype=np.float32), "w"))
    inits.append(numpy_helper.from_array(np.zeros(4, np.float32), "b"))
    inits.append(numpy_helper.from_array(np.ones((5, 4), np.float32), "tab"))
    nodes = [helper.make_node("Div", ["x", "c13"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Gather", ["tab", "ids"], ["t1"]),
             helper.make_node("Mul", ["t1", "two"], ["t2"]),
             helper.make_node("Gather", ["tab", "ids"], ["t3"]),
             helper.make_node("Add", ["e", "one"], ["e1"]),
             helper.make_node("Mul", ["half", "e1"], ["h"]), helper.make_node("Mul", ["x", "h"], ["y"]),
             helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["lin"]),
             helper.make_node("Mul", ["lin", "half"], ["s"]),  # lin is also an output
             helper.make_node("Mul", ["x", "x"], ["ga"]), helper.make_node("Sub", ["two", "x"], ["g1"]),
             helper.make_node("Mul", ["g1", "x"], ["gb"]), helper.make_node("Add", ["ga", "gb"], ["m"])]
    model = _model(nodes, [("x", [2, 4])], ["y", "lin", "s", "m", "t2", "t3"], inits)
    model.graph.input.append(helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2]))
    before = [n.op_type for n in model.graph.node]
    assert rewrite_elementwise(model) == {"erf_gelu": 0, "fold_scale": 0, "gate_mix": 0}
    assert [n.op_type for n in model.graph.node] == before


def test_forward_sessions_keep_skip_layer_norm_unfused(tmp_path):
    """forward_session_options really switches ORT's SkipLayerNormFusion off at load (the
    tuned options alone fuse Add + LayerNormalization)."""
    from onnx import helper, numpy_helper

    from hmu_export.runners.onnxruntime_runner import (forward_session_options,
                                                       tuned_session_options)

    inits = [numpy_helper.from_array(np.ones(8, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(8, np.float32), "beta")]
    nodes = [helper.make_node("Add", ["x", "r"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"], axis=-1)]
    model = _model(nodes, [("x", ["B", "L", 8]), ("r", ["B", "L", 8])], ["y"], inits)
    src = tmp_path / "addln.onnx"
    onnx.save(model, str(src))
    ran = {}
    for name, opts in (("tuned", tuned_session_options(1)), ("forward", forward_session_options(1))):
        opts.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
        ran[name] = {n.op_type for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node}
    assert "SkipLayerNormalization" in ran["tuned"]
    assert "SkipLayerNormalization" not in ran["forward"] and "LayerNormalization" in ran["forward"]
