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
    # 1 encoder self-attn + 1 decoder self-attn -> Attention; 1 cross-attn -> MultiHeadAttention
    assert {"Attention", "MultiHeadAttention", "SkipLayerNormalization"} <= ops
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
