"""The quantize stage: int8 / int4 graphs written with ONNX Runtime's tools, the policy's FP32
nodes kept, the graphs close to FP32, and the int8 / int4 backends in generate."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import SMALL
from hmu_export.build import pipeline
from hmu_export.core.config import Int8Config, config_from_dict
from hmu_export.core.errors import ConfigError
from hmu_export.export.quantize import cpu_has_vnni, excluded_nodes, reduce_range

FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 {extra}\nbogomips\t: 4000\n"


@pytest.fixture(scope="module")
def qbuild(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quant") / "b"
    outcome = pipeline.run_build(config_from_dict(SMALL).validate(), out)
    assert outcome.ok, outcome.failure
    return outcome.out_dir


def test_vnni_decides_reduce_range():
    assert cpu_has_vnni(FLAGS.format(extra="avx512_vnni")) is True
    assert cpu_has_vnni(FLAGS.format(extra="avx_vnni")) is True
    assert cpu_has_vnni(FLAGS.format(extra="avx512f")) is False
    auto = Int8Config()
    assert reduce_range(auto, FLAGS.format(extra="avx512_vnni")) is False
    assert reduce_range(auto, FLAGS.format(extra="")) is True
    assert reduce_range(Int8Config(reduce_range="off"), FLAGS.format(extra="")) is False


def test_every_graph_gets_int8_and_int4_and_the_manifest_lists_them(qbuild):
    manifest = json.loads((qbuild / "manifest.json").read_text())
    listed = {a["path"] for a in manifest["artifacts"]}
    for stem in ("model", "encoder", "decoder"):
        for variant in ("int8", "int4"):
            assert f"{stem}.{variant}.onnx" in listed
    stage = manifest["stages"]["quantize"]
    assert stage["status"] == "ok"
    assert stage["details"]["reduce_range"] == (not cpu_has_vnni())


def test_the_hmu_and_lm_head_stay_fp32_and_the_rest_is_quantized(qbuild):
    int8 = onnx.load(str(qbuild / "model.int8.onnx"))
    ops = Counter(n.op_type for n in int8.graph.node)
    assert ops["MatMulInteger"] > 0 and ops["DynamicQuantizeLinear"] > 0
    by_name = {n.name: n for n in int8.graph.node}
    for name in ("hmu/gate_mlp/0/MatMul", "hmu/vae/mu/MatMul", "lm_head/MatMul"):
        assert by_name[name].op_type == "MatMul", name  # untouched FP32 MatMul
    int4 = onnx.load(str(qbuild / "decoder.int4.onnx"))
    nbits = [n for n in int4.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(not n.name.startswith("lm_head/") for n in nbits)


def test_quantized_logits_stay_close_to_fp32(qbuild, small_cfg):
    from hmu_export.core.grid import contract_feeds
    from hmu_export.core.io_contract import full_contract
    from hmu_export.runners import OnnxRuntimeRunner

    contract = full_contract(small_cfg.model)
    feeds = contract_feeds(contract, small_cfg, {"batch": 4, "src_len": 16, "tgt_len": 8},
                           seed=1, noise_scale=0.0)
    ref = OnnxRuntimeRunner(qbuild / "model.onnx", contract).infer(feeds)["logits"]
    # measured here: int8 >= 0.9995, int4 >= 0.986 (d=32 weights, one int4 block per row);
    # a broken scale or a wrong axis gives cosines near 0
    for variant, min_cos in (("int8", 0.999), ("int4", 0.97)):
        got = OnnxRuntimeRunner(qbuild / f"model.{variant}.onnx", contract).infer(feeds)["logits"]
        a, b = ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1])
        cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        assert cos.min() > min_cos, (variant, cos.min())
        assert not np.array_equal(ref, got), variant  # it really is another graph


def test_generate_runs_the_quantized_step_backends(qbuild, capsys):
    from hmu_export.commands.cli import main

    src = qbuild.parent / "in.json"
    src.write_text(json.dumps({"src_ids": [[5, 17, 9], [4, 4]]}))
    for backend in ("onnxruntime-int8", "onnxruntime-int4"):
        out = qbuild.parent / f"{backend}.json"
        assert main(["generate", "--artifacts", str(qbuild), "--input", str(src), "--backend",
                     backend, "--max-new-tokens", "4", "--json", str(out)]) == 0
        data = json.loads(out.read_text())
        assert data["backend"] == backend and len(data["sequences"]) == 2


def test_an_exclude_that_names_no_node_is_a_config_error(qbuild):
    model = onnx.load(str(qbuild / "model.onnx"))
    with pytest.raises(ConfigError, match="int8.exclude: 'decodr/' names no node"):
        excluded_nodes(model, Int8Config(exclude=("decodr/",)))
    kept = excluded_nodes(model, Int8Config(keep_hmu=False, keep_lm_head=False,
                                            exclude=("decoder/layers/0/linear1/MatMul",)))
    assert kept == ["decoder/layers/0/linear1/MatMul"]


def test_disabled_int8_is_a_skipped_stage_and_an_unavailable_backend(tmp_path):
    cfg = config_from_dict({**SMALL, "int8": {"enabled": False}}).validate()
    out = pipeline.run_build(cfg, tmp_path / "b", only=["checkpoint", "export", "quantize"])
    assert out.stages["quantize"].status == "skipped"
    assert not list((tmp_path / "b").glob("*.int8.onnx"))
    from hmu_export.backends.registry import make_stepper
    from hmu_export.core.errors import BackendUnavailable
    with pytest.raises(BackendUnavailable, match="has no encoder.int8.onnx"):
        make_stepper(tmp_path / "b", cfg, "onnxruntime-int8")


def test_a_quantized_graph_that_does_not_load_is_never_written(qbuild, tmp_path, monkeypatch):
    from hmu_export.core.errors import ArtifactError
    from hmu_export.export import quantize

    def rejects(path, what):  # type: ignore[no-untyped-def]
        raise ArtifactError(f"the {what} graph does not load in ONNX Runtime: planted")
    monkeypatch.setattr(quantize, "_check_loads", rejects)
    with pytest.raises(ArtifactError, match="planted"):
        quantize.quantize_int8(qbuild / "model.onnx", tmp_path / "model.int8.onnx", Int8Config())
    assert not list(tmp_path.iterdir())
