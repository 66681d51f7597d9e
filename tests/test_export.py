import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from hmu_export.core.config import config_from_dict
from hmu_export.export.onnx_export import RANDOM_OPS, export_onnx
from hmu_export.core.pins import sensitive_nodes
from hmu_export.core.graph_meta import graph_metadata, load_graph_contract
from hmu_export.core.fileio import sha256_file
from hmu_export.core.io_contract import make_feeds
from hmu_export.model import build_model

from conftest import ISSUE_CONFIG


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _torch_logits(model, feeds):
    with torch.inference_mode():
        return model(*(torch.from_numpy(feeds[k])
                       for k in ("src_ids", "src_mask", "tgt_ids", "noise"))).numpy()


def test_axes_are_dynamic_in_the_graph(small_export):
    g = onnx.load(str(small_export.onnx)).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(g.input) + list(g.output)}
    assert dims == {"src_ids": ["batch", "src_len"], "src_mask": ["batch", "src_len"],
                    "tgt_ids": ["batch", "tgt_len"], "noise": ["batch", "src_len", 16],
                    "logits": ["batch", "tgt_len", 61]}


@pytest.mark.parametrize("shape", [(1, 1, 1), (4, 16, 8), (3, 11, 5), (2, 2, 7)])
def test_graph_matches_torch_at_shapes_not_used_for_export(small_export, small_model, small_cfg,
                                                           shape):
    # export used (2, 8, 4): every shape here differs on at least one axis, 1 and max included
    feeds = make_feeds(small_cfg.model, *shape, seed=5)
    got = _session(small_export.onnx).run(["logits"], feeds)[0]
    np.testing.assert_allclose(got, _torch_logits(small_model, feeds), atol=1e-4, rtol=0)


def test_noise_is_live_and_no_random_op(small_export, small_cfg):
    g = onnx.load(str(small_export.onnx)).graph
    assert not {n.op_type for n in g.node} & RANDOM_OPS
    sess = _session(small_export.onnx)
    feeds = make_feeds(small_cfg.model, 2, 8, 4)
    a = sess.run(["logits"], feeds)[0]
    b = sess.run(["logits"], dict(feeds, noise=feeds["noise"] * 0))[0]
    c = sess.run(["logits"], dict(feeds))[0]
    assert np.abs(a - b).max() > 1e-2
    np.testing.assert_array_equal(a, c)  # deterministic: same noise, same output


def test_sensitive_nodes_have_stable_names(small_export):
    names = sensitive_nodes(onnx.load(str(small_export.onnx)))
    assert names == ["hmu/vae/Exp", "hmu/norm_input/LayerNormalization",
                     "hmu/norm_latent/LayerNormalization", "hmu/gate_mlp/1/Sigmoid",
                     "hmu/fusion_proj/2/LayerNormalization"]


def test_metadata_records_config_versions_and_checkpoint(small_export, small_cfg):
    proto, cfg, contract = load_graph_contract(small_export.onnx)
    meta = graph_metadata(proto)
    assert cfg.model == small_cfg.model and cfg.profile == small_cfg.profile
    assert meta["checkpoint_sha256"] == sha256_file(small_export.checkpoint_dir /
                                                    "model.safetensors")
    versions = json.loads(meta["versions"])
    assert versions["torch"] == torch.__version__.split("+")[0]
    assert contract.input_names == ["src_ids", "src_mask", "tgt_ids", "noise"]
    assert proto.opset_import[0].version == 18


def test_export_is_reproducible(small_export, small_model, small_cfg, tmp_path):
    again = export_onnx(small_model, small_cfg, tmp_path / "again.onnx",
                        checkpoint_sha256=sha256_file(small_export.checkpoint_dir /
                                                      "model.safetensors"))
    assert again.sha256 == sha256_file(small_export.onnx)
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


def test_diagnostic_outputs(small_cfg, small_model, tmp_path):
    cfg = config_from_dict({**small_cfg.to_dict(), "export": {"diagnostics": True}})
    res = export_onnx(small_model, cfg, tmp_path / "diag.onnx")
    assert res.contract.output_names == ["logits", "encoder_out", "hmu_gate", "hmu_out"]
    feeds = make_feeds(cfg.model, 3, 9, 5)
    outs = dict(zip(res.contract.output_names, _session(res.path).run(None, feeds)))
    with torch.inference_mode():
        ref = small_model.forward_all(*(torch.from_numpy(feeds[k]) for k in
                                        ("src_ids", "src_mask", "tgt_ids", "noise")))
    real = feeds["src_mask"].astype(bool)
    for name in ("encoder_out", "hmu_gate", "hmu_out"):
        np.testing.assert_allclose(outs[name][real], ref[name].numpy()[real], atol=1e-4)


def test_issue_config_matches_on_the_whole_parity_grid(tmp_path):
    """Issue #2's example config: ORT FP32 within 1e-4 of PyTorch at every grid point."""
    from hmu_export.core.layout import BuildLayout
    from hmu_export.core.grid import derive_grid
    from hmu_export.verify.parity import layout_backends, run_parity

    cfg = config_from_dict(ISSUE_CONFIG)
    model = build_model(cfg.model)
    res = export_onnx(model, cfg, BuildLayout(tmp_path).onnx)
    backends = layout_backends(tmp_path, cfg, model, res.contract, ["onnxruntime"])
    report = run_parity(model, cfg, backends, res.contract)
    assert report.passed, report.failures()
    assert len(report.results) == len(derive_grid(cfg.profile)) >= 27
    assert max(r.max_abs for r in report.results) < 1e-4
