"""Triton repository generation: three configs, schema + semantic validation, bad configs refused.

Expected values are written from the tiny model's config in conftest.SMALL (vocab 61, latent 16,
batch 1..4, src_len 1..16, tgt_len 1..8), not read back from the code under test.
"""
from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from hmu_export.core.layout import BuildLayout
from hmu_export.commands.cli import main
from hmu_export.core.config import ProfileConfig
from hmu_export.core.errors import ArtifactError
from hmu_export.core.io_contract import full_contract
from hmu_export.core.manifest import OK, SKIPPED, StageResult, read_manifest, write_manifest
from hmu_export.deploy.triton.config import TritonConfigError, TritonOptions, check_config_text
from hmu_export.deploy.triton.repository import repository_from_artifacts, write_repository
from hmu_export.build.stages.triton import triton_stage
from hmu_export.deploy.triton.client import make_noise
from hmu_export.shipped.python_model import RequestError, complete_feeds
from conftest import seal  # noqa: E402

TRT, ORT, PY = "hmu-tiny_tensorrt", "hmu-tiny_onnx", "hmu-tiny_python"


def _parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def _io(conf: mc.ModelConfig) -> dict[str, tuple[str, list[int], bool]]:
    return {t.name: (mc.DataType.Name(t.data_type), list(t.dims), getattr(t, "optional", False))
            for t in list(conf.input) + list(conf.output)}


@pytest.fixture(scope="module")
def repo(small_export, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    res = repository_from_artifacts(small_export.root, out)
    assert res.root == out
    return out


@pytest.fixture()
def build_copy(small_export, tmp_path) -> BuildLayout:
    """A private copy of the tiny build folder (tests may add a plan or a manifest to it)."""
    root = tmp_path / "build"
    root.mkdir()
    shutil.copy(small_export.onnx, root / "model.onnx")
    seal(root)
    return BuildLayout(root)


def test_repository_layout(repo, small_export):
    assert sorted(p.name for p in repo.iterdir()) == sorted(["README.md", TRT, ORT, PY,
                                                             "stub_watchdog.py"])
    assert (repo / ORT / "1" / "model.onnx").read_bytes() == small_export.onnx.read_bytes()
    assert (repo / PY / "1" / "model.onnx").read_bytes() == small_export.onnx.read_bytes()
    assert "class TritonPythonModel" in (repo / PY / "1" / "model.py").read_text()
    assert not (repo / TRT / "1" / "model.plan").exists()  # no engine on this machine
    assert "model.plan" in (repo / "README.md").read_text()


def test_configs_follow_the_contract(repo):
    want = {"src_ids": ("TYPE_INT64", [-1], False), "src_mask": ("TYPE_INT64", [-1], False),
            "tgt_ids": ("TYPE_INT64", [-1], False), "noise": ("TYPE_FP32", [-1, 16], False),
            "logits": ("TYPE_FP32", [-1, 61], False)}
    for name in (TRT, ORT, PY):
        conf = _parse(repo / name / "config.pbtxt")
        assert conf.name == name
        assert conf.max_batch_size == 4
        got = _io(conf)
        if name == PY:  # the python model fills in noise itself when it is not sent
            assert got.pop("noise") == ("TYPE_FP32", [-1, 16], True)
            got["noise"] = want["noise"]
        assert got == want
        assert list(conf.dynamic_batching.preferred_batch_size) == [2, 4]
        assert conf.dynamic_batching.max_queue_delay_microseconds == 100
    trt = _parse(repo / TRT / "config.pbtxt")
    assert trt.platform == "tensorrt_plan"
    assert [(g.kind, list(g.profile)) for g in trt.instance_group] == [
        (mc.ModelInstanceGroup.KIND_GPU, ["0"])]
    assert _parse(repo / ORT / "config.pbtxt").platform == "onnxruntime_onnx"
    py = _parse(repo / PY / "config.pbtxt")
    assert py.backend == "python"
    assert py.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    params = {k: v.string_value for k, v in py.parameters.items()}
    assert params == {"onnx_file": "model.onnx", "vocab_size": "61", "intra_op_threads": "1",
                      "input.src_ids": "int64[batch,src_len]",
                      "input.src_mask": "int64[batch,src_len]",
                      "input.tgt_ids": "int64[batch,tgt_len]",
                      "input.noise": "float32[batch,src_len,16]",
                      "src_len_min": "1", "src_len_max": "16", "tgt_len_min": "1",
                      "tgt_len_max": "8"}


def test_plan_is_included_when_built(build_copy, tmp_path):
    build_copy.engine.write_bytes(b"not really a plan")
    seal(build_copy.root)  # the plan is part of the build, as the engine stage records it
    res = repository_from_artifacts(build_copy.root, tmp_path / "repo")
    assert res.plan_included
    assert (tmp_path / "repo" / TRT / "1" / "model.plan").read_bytes() == b"not really a plan"


def test_extra_profiles_are_named_and_cap_the_batch(small_cfg, small_export, tmp_path):
    extra = ProfileConfig(batch=(1, 1, 2), src_len=(1, 4, 8), tgt_len=(1, 2, 4))
    cfg = dataclasses.replace(small_cfg, engine=dataclasses.replace(
        small_cfg.engine, extra_profiles=(extra,))).validate()
    contract = full_contract(cfg.model)
    write_repository(small_export, cfg, contract, tmp_path / "repo")
    trt = _parse(tmp_path / "repo" / TRT / "config.pbtxt")
    assert list(trt.instance_group[0].profile) == ["0", "1"]
    assert trt.max_batch_size == 2  # Triton checks max_batch_size against every named profile
    assert list(trt.dynamic_batching.preferred_batch_size) == [2]
    assert _parse(tmp_path / "repo" / ORT / "config.pbtxt").max_batch_size == 4


def test_onnx_tensorrt_accelerator_option(small_cfg, small_export, tmp_path):
    write_repository(small_export, small_cfg, full_contract(small_cfg.model), tmp_path / "r",
                     TritonOptions(onnx_tensorrt_accelerator=True))
    conf = _parse(tmp_path / "r" / ORT / "config.pbtxt")
    (acc,) = conf.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP16"


# ---------------------------------------------------------------------------- bad configs

BAD_EDITS = {
    "syntax": ("max_batch_size: 4", "max_batch_size 4 }", 'schema'),
    "unknown field": ("max_batch_size: 4", "max_batch_size: 4\nmax_batch: 4", 'max_batch'),
    "bad enum": ("TYPE_FP32", "TYPE_FLOAT", 'TYPE_FLOAT'),
    "input name": ('name: "src_mask"', 'name: "attention_mask"', 'attention_mask'),
    "dtype": ('name: "src_ids"\n  data_type: TYPE_INT64', 'name: "src_ids"\n  data_type: TYPE_INT32', 'TYPE_INT32'),
    "latent dim": ("dims: 16", "dims: 15", 'noise'),
    "rank": ('name: "tgt_ids"\n  data_type: TYPE_INT64\n  dims: -1',
             'name: "tgt_ids"\n  data_type: TYPE_INT64\n  dims: -1\n  dims: -1', 'tgt_ids'),
    "max batch": ("max_batch_size: 4", "max_batch_size: 16", 'max_batch_size 16'),
    "preferred > max": ("preferred_batch_size: 4", "preferred_batch_size: 8", 'preferred batch size 8'),
    "missing profile": ('profile: "0"', 'profile: "3"', "profile '3'"),
    "cpu plan": ("KIND_GPU", "KIND_CPU", 'KIND_GPU'),
    "optional input": ('name: "src_ids"\n  data_type: TYPE_INT64\n  dims: -1',
                       'name: "src_ids"\n  data_type: TYPE_INT64\n  dims: -1\n  optional: true', 'optional'),
    "no batching, dims unchanged": ("max_batch_size: 4", "max_batch_size: 0", 'src_ids'),
}


@pytest.mark.parametrize("what", sorted(BAD_EDITS))
def test_bad_tensorrt_configs_are_rejected(repo, small_cfg, small_export, what):
    text = (repo / TRT / "config.pbtxt").read_text()
    contract, profiles = full_contract(small_cfg.model), [small_cfg.profile]
    check_config_text(text, contract, profiles, onnx_path=small_export.onnx)  # the good one
    old, new, match = BAD_EDITS[what]
    assert old in text
    with pytest.raises(TritonConfigError, match=re.escape(match)):
        check_config_text(text.replace(old, new, 1), contract, profiles,
                          onnx_path=small_export.onnx)


def test_python_config_bad_profile_parameter(repo, small_cfg):
    text = (repo / PY / "config.pbtxt").read_text()
    contract = full_contract(small_cfg.model)
    check_config_text(text, contract, [small_cfg.profile])
    bad = text.replace('key: "src_len_max"\n  value {\n    string_value: "16"',
                       'key: "src_len_max"\n  value {\n    string_value: "99"')
    assert bad != text
    with pytest.raises(TritonConfigError, match="src_len"):
        check_config_text(bad, contract, [small_cfg.profile])


def test_config_checked_against_the_graph(repo, small_cfg, small_export, tmp_path):
    """A graph whose noise input is not what the contract says makes a valid config fail."""
    proto = onnx.load(str(small_export.onnx))
    noise = next(v for v in proto.graph.input if v.name == "noise")
    noise.type.tensor_type.shape.dim[2].dim_value = 8
    other = tmp_path / "other.onnx"
    onnx.save(proto, str(other))
    text = (repo / ORT / "config.pbtxt").read_text()
    contract = full_contract(small_cfg.model)
    with pytest.raises(TritonConfigError, match="noise"):
        check_config_text(text, contract, [small_cfg.profile], onnx_path=other)


def test_bad_options_write_nothing(small_cfg, small_export, tmp_path):
    out = tmp_path / "repo"
    with pytest.raises(TritonConfigError, match="count"):
        write_repository(small_export, small_cfg, full_contract(small_cfg.model), out,
                         TritonOptions(instance_count=0))
    assert not out.exists()
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------- stage + command

def test_stage_writes_into_the_build(build_copy, small_cfg, small_model):
    from hmu_export.build.context import BuildContext

    ctx = BuildContext(small_cfg, build_copy, model=small_model,
                       contract=full_contract(small_cfg.model))
    res = triton_stage(ctx)
    assert res.status == OK, res.reason
    assert res.details["models"]["python"] == PY
    assert (build_copy.triton_dir / PY / "1" / "model.onnx").is_file()
    off = dataclasses.replace(small_cfg, triton=dataclasses.replace(small_cfg.triton,
                                                                     enabled=False))
    assert triton_stage(BuildContext(off, build_copy)).status == SKIPPED


def test_command_writes_repo_and_updates_manifest(build_copy, capsys):
    write_manifest(build_copy.root, stages={"export": StageResult(OK)}, profile={}, versions={})
    assert main(["triton", "--artifacts", str(build_copy.root), "--instances", "2"]) == 0
    conf = _parse(build_copy.triton_dir / ORT / "config.pbtxt")
    assert conf.instance_group[0].count == 2
    manifest = read_manifest(build_copy.root)
    assert manifest["stages"]["triton"]["status"] == "ok"
    paths = {row["path"] for row in manifest["artifacts"]}
    assert f"triton/{PY}/config.pbtxt" in paths and f"triton/{PY}/1/model.py" in paths
    assert PY in capsys.readouterr().out


def test_command_errors_are_one_line(tmp_path, capsys):
    assert main(["triton", "--artifacts", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    (tmp_path / "empty").mkdir()
    assert main(["triton", "--artifacts", str(tmp_path / "empty")]) == 2
    assert "model.onnx" in capsys.readouterr().err


# ---------------------------------------------------------------------------- noise + python model

def test_make_noise():
    assert not make_noise(2, 3, 4).any()
    a, b = make_noise(2, 3, 4, seed=5, temperature=0.5), make_noise(2, 3, 4, 5, 0.5)
    assert a.dtype == np.float32 and a.shape == (2, 3, 4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, make_noise(2, 3, 4, seed=6, temperature=0.5))
    big = make_noise(64, 64, 64, seed=1, temperature=2.0)
    assert abs(float(big.std()) - 2.0) < 0.05
    with pytest.raises(RequestError):
        make_noise(1, 1, 1, temperature=-1.0)


SPEC = {"vocab_size": 61, "input.src_ids": "int64[batch,src_len]",
        "input.src_mask": "int64[batch,src_len]", "input.tgt_ids": "int64[batch,tgt_len]",
        "input.noise": "float32[batch,src_len,16]", "src_len_min": 1, "src_len_max": 16,
        "tgt_len_min": 1, "tgt_len_max": 8}


def _feeds(b=2, ls=5, lt=3) -> dict[str, np.ndarray]:
    return {"src_ids": np.full((b, ls), 3, np.int64), "src_mask": np.ones((b, ls), np.int64),
            "tgt_ids": np.full((b, lt), 4, np.int64)}


def test_python_model_fills_noise_from_parameters():
    got = complete_feeds(_feeds(), {"seed": 9, "temperature": "0.25"}, SPEC)["noise"]
    np.testing.assert_array_equal(got, make_noise(2, 5, 16, 9, 0.25))
    assert not complete_feeds(_feeds(), {}, SPEC)["noise"].any()


@pytest.mark.parametrize("edit,match", [
    (lambda f: f.update(src_mask=f["src_mask"][:, :4]), "src_mask"),
    (lambda f: f.update(tgt_ids=f["tgt_ids"][:1]), "batch"),
    (lambda f: f.update(src_ids=np.full((2, 17), 3, np.int64),
                        src_mask=np.ones((2, 17), np.int64)), "src_len 17"),
    (lambda f: f.update(tgt_ids=np.full((2, 3), 61, np.int64)), "token ids"),
    (lambda f: f.update(src_mask=np.zeros((2, 5), np.int64)), "no real token"),
    (lambda f: f.update(noise=np.zeros((2, 5, 8), np.float32)), "noise"),
    (lambda f: f.update(noise=np.full((2, 5, 16), np.nan, np.float32)), "non-finite"),
])
def test_python_model_rejects_contract_violations(edit, match):
    feeds = _feeds()
    edit(feeds)
    with pytest.raises(RequestError, match=match):
        complete_feeds(feeds, {}, SPEC)


def test_python_model_rejects_bad_parameters():
    with pytest.raises(RequestError, match="temperature"):
        complete_feeds(_feeds(), {"temperature": "warm"}, SPEC)


def test_foreign_folder_is_not_overwritten(small_export, tmp_path):
    out = tmp_path / "models"
    out.mkdir()
    (out / "someone_elses_model").mkdir()
    with pytest.raises(ArtifactError, match="not empty"):
        repository_from_artifacts(small_export.root, out)
    assert [p.name for p in out.iterdir()] == ["someone_elses_model"]
    empty = tmp_path / "empty"
    empty.mkdir()
    repository_from_artifacts(small_export.root, empty)
    (empty / PY / "stale.txt").write_text("left from an older run")
    repository_from_artifacts(small_export.root, empty)  # our own repository: replaced whole
    assert not (empty / PY / "stale.txt").exists()
    assert (empty / PY / "config.pbtxt").is_file()


def test_build_writes_a_valid_repository(small_cfg, tmp_path):
    """The build's triton stage (after export) leaves three configs that pass every check."""
    from hmu_export.build.pipeline import run_build

    outcome = run_build(small_cfg, tmp_path / "b", only=["checkpoint", "export", "triton"])
    assert outcome.ok, outcome.failure
    assert outcome.stages["triton"].status == OK
    layout = BuildLayout(outcome.out_dir)
    contract = full_contract(small_cfg.model)
    for name in (TRT, ORT, PY):
        check_config_text((layout.triton_dir / name / "config.pbtxt").read_text(), contract,
                          [small_cfg.profile], onnx_path=layout.onnx)
    listed = {row["path"] for row in read_manifest(layout.root)["artifacts"]}
    assert {f"triton/{n}/config.pbtxt" for n in (TRT, ORT, PY)} <= listed


# ---------------------------------------------------------------------------- every graph's python model
# A classifier (src_ids, src_mask, noise -> class_logits [B, 3]) and a full graph with the HMU
# after the decoder (noise [B, tgt_len, 8]) of the reference source: vocab 40, latent 8,
# batch 1..4, src_len 1..6, tgt_len 1..5 (tests/triton_reference.py).

import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from triton_reference import reference_graph  # noqa: E402

REF = {"classifier": "ref-cls_python", "after_decoder": "ref-dec_python"}
REF_PARAMS = {
    "classifier": {"input.src_ids": "int64[batch,src_len]", "input.src_mask": "int64[batch,src_len]",
                   "input.noise": "float32[batch,src_len,8]", "src_len_min": "1",
                   "src_len_max": "6", "vocab_size": "40"},
    "after_decoder": {"input.src_ids": "int64[batch,src_len]",
                      "input.src_mask": "int64[batch,src_len]",
                      "input.tgt_ids": "int64[batch,tgt_len]",
                      "input.noise": "float32[batch,tgt_len,8]", "src_len_min": "1",
                      "src_len_max": "6", "tgt_len_min": "1", "tgt_len_max": "5",
                      "vocab_size": "40"},
}


@pytest.fixture(scope="module")
def ref_repos(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """kind -> (build folder, repository written from it)."""
    out = {}
    for kind in REF:
        build = reference_graph(kind, tmp_path_factory)
        out[kind] = (build, repository_from_artifacts(
            build, tmp_path_factory.mktemp("refrepo") / "repo").root)
    return out


@pytest.mark.parametrize("kind", list(REF))
def test_every_graph_gets_a_python_model_that_follows_its_contract(ref_repos, kind):
    build, repo = ref_repos[kind]
    name = REF[kind]
    assert (repo / name / "1" / "model.onnx").read_bytes() == (build / "model.onnx").read_bytes()
    assert "class TritonPythonModel" in (repo / name / "1" / "model.py").read_text()
    conf = _parse(repo / name / "config.pbtxt")
    assert conf.backend == "python" and conf.max_batch_size == 4
    ids, fp = ("TYPE_INT64", [-1], False), ("TYPE_FP32", [-1, 8], True)
    want = {"src_ids": ids, "src_mask": ids, "noise": fp}
    if kind == "classifier":
        want["class_logits"] = ("TYPE_FP32", [3], False)
    else:
        want.update(tgt_ids=ids, logits=("TYPE_FP32", [-1, 40], False))
    assert _io(conf) == want
    params = {k: v.string_value for k, v in conf.parameters.items()}
    assert {k: v for k, v in params.items() if k not in ("onnx_file", "intra_op_threads")} == \
        REF_PARAMS[kind]
    readme = (repo / "README.md").read_text()
    assert "No python-backend model" not in readme
    axis = "src_len" if kind == "classifier" else "tgt_len"
    assert f"make_noise(B, {axis}, 8, seed, temperature)" in readme
    assert f"`noise` (float32 [batch, {axis}, 8])" in readme


def test_every_model_states_the_noise_axes_and_the_client_reads_them(ref_repos):
    """An after-decoder build's noise spans tgt_len: its onnx (and tensorrt) configs say so too,
    so a client of those models needs no noise_axis; a wrong statement is refused."""
    from hmu_export.core.graph_meta import load_graph_contract
    from hmu_export.deploy.triton.client import HMUTritonClient

    build, repo = ref_repos["after_decoder"]
    _, cfg, contract = load_graph_contract(build / "model.onnx")
    text = (repo / "ref-dec_onnx" / "config.pbtxt").read_text()
    conf = _parse(repo / "ref-dec_onnx" / "config.pbtxt")
    assert conf.parameters["input.noise"].string_value == "float32[batch,tgt_len,8]"
    check_config_text(text, contract, [cfg.profile], onnx_path=build / "model.onnx")
    with pytest.raises(TritonConfigError, match="input.noise"):
        check_config_text(text.replace("batch,tgt_len,8", "batch,src_len,8"), contract,
                          [cfg.profile], onnx_path=build / "model.onnx")

    class _Server:  # what tritonclient.http returns for get_model_config
        def get_model_config(self, model):
            return {"parameters": {"input.noise": {"string_value":
                                                   conf.parameters["input.noise"].string_value}}}

    client = HMUTritonClient.__new__(HMUTritonClient)
    client.client, client.model, client.url, client.noise_axis = _Server(), "ref-dec_onnx", "", None
    assert client._noise_axis() == "tgt_len"


@pytest.mark.parametrize("kind,old,new,match", [
    ("after_decoder", "float32[batch,tgt_len,8]", "float32[batch,src_len,8]", "input.noise"),
    ("after_decoder", 'key: "tgt_len_max"\n  value {\n    string_value: "5"',
     'key: "tgt_len_max"\n  value {\n    string_value: "9"', "tgt_len [1, 9]"),
    ("after_decoder", 'key: "tgt_len_min"', 'key: "tgt_len_low"', "tgt_len_min"),
    ("classifier", 'key: "input.src_mask"', 'key: "input.src_masks"', "describe inputs"),
    ("classifier", 'string_value: "int64[batch,src_len]"', 'string_value: "int32[batch,src_len]"',
     "input.src_"),
])
def test_python_model_parameters_are_checked_against_the_contract(ref_repos, kind, old, new,
                                                                  match):
    from hmu_export.core.graph_meta import load_graph_contract

    build, repo = ref_repos[kind]
    _, cfg, contract = load_graph_contract(build / "model.onnx")
    text = (repo / REF[kind] / "config.pbtxt").read_text()
    check_config_text(text, contract, [cfg.profile], onnx_path=build / "model.onnx")
    assert old in text
    with pytest.raises(TritonConfigError, match=re.escape(match)):
        check_config_text(text.replace(old, new, 1), contract, [cfg.profile],
                          onnx_path=build / "model.onnx")


# A stand-in for Triton's triton_python_backend_utils: the few names model.py uses. The served
# tests (test_triton_server.py) run the same file under the real one.
class _Tensor:
    def __init__(self, name: str, array: np.ndarray):
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class _Error:
    def __init__(self, message: str):
        self.text = message


class _Response:
    def __init__(self, output_tensors=None, error=None):
        self.outputs = {t.name: t.array for t in output_tensors or []}
        self.error = error


class _Request:
    def __init__(self, feeds: dict[str, np.ndarray], params: dict | None = None):
        self.feeds, self.params = feeds, params or {}

    def parameters(self) -> str:
        return json.dumps(self.params)


def _fake_pb_utils() -> types.ModuleType:
    mod = types.ModuleType("triton_python_backend_utils")
    mod.Tensor, mod.InferenceResponse, mod.TritonError = _Tensor, _Response, _Error
    mod.get_input_tensor_by_name = lambda req, name: (
        _Tensor(name, req.feeds[name]) if name in req.feeds else None)
    return mod


def _load_python_model(repo: Path, name: str, monkeypatch):
    """model.py of the repository, initialized as Triton does (config as JSON)."""
    from google.protobuf import json_format

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    spec = importlib.util.spec_from_file_location(f"served_{name.replace('-', '_')}",
                                                  repo / name / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    conf = _parse(repo / name / "config.pbtxt")
    model.initialize({"model_config": json_format.MessageToJson(
        conf, preserving_proto_field_name=True), "model_repository": str(repo / name),
        "model_version": "1"})
    return model


def _drawn(seed: int, temperature: float, shape: tuple[int, ...]) -> np.ndarray:
    """The documented server-side noise (docs/triton.md), written out here."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * \
        np.float32(temperature)


def _ids(rng, b: int, n: int) -> np.ndarray:
    return rng.integers(1, 40, (b, n)).astype(np.int64)


@pytest.mark.parametrize("kind", list(REF))
def test_python_model_execute_equals_onnxruntime(ref_repos, kind, monkeypatch):
    """One execute() with requests of two shapes, server-drawn, sent and zero noise, and bad
    requests: each good one equals ONNX Runtime on the graph with the same noise, each bad one
    fails alone with its own line."""
    import onnxruntime as ort

    build, repo = ref_repos[kind]
    model = _load_python_model(repo, REF[kind], monkeypatch)
    sess = ort.InferenceSession(str(build / "model.onnx"), providers=["CPUExecutionProvider"])
    out_name = "class_logits" if kind == "classifier" else "logits"
    rng = np.random.default_rng(5)

    def feeds(b: int, ls: int, lt: int) -> dict[str, np.ndarray]:
        f = {"src_ids": _ids(rng, b, ls), "src_mask": np.ones((b, ls), np.int64)}
        f["src_mask"][-1, ls - 1:] = 0 if ls > 1 else 1
        if kind != "classifier":
            f["tgt_ids"] = _ids(rng, b, lt)
        return f

    def noise_len(ls: int, lt: int) -> int:
        return ls if kind == "classifier" else lt

    a, b, c = feeds(2, 6, 3), feeds(1, 6, 3), feeds(3, 4, 5)
    sent = rng.standard_normal((1, noise_len(6, 3), 8)).astype(np.float32)
    bad_token = dict(feeds(1, 6, 3))
    bad_token["src_ids"] = bad_token["src_ids"].copy()
    bad_token["src_ids"][0, 0] = 40
    wrong_noise = dict(a, noise=np.zeros((2, noise_len(3, 6), 8), np.float32))  # other axis
    too_long = feeds(1, 7, 3)
    requests = [_Request(a, {"seed": 3, "temperature": "0.5"}), _Request(dict(b, noise=sent)),
                _Request(bad_token), _Request(c), _Request(a, {"seed": -1}),
                _Request(wrong_noise), _Request(too_long)]
    responses = model.execute(requests)
    assert len(responses) == len(requests)

    def ort_out(f: dict[str, np.ndarray], noise: np.ndarray) -> np.ndarray:
        return sess.run([out_name], dict(f, noise=noise))[0]

    want = [ort_out(a, _drawn(3, 0.5, (2, noise_len(6, 3), 8))), ort_out(b, sent), None,
            ort_out(c, np.zeros((3, noise_len(4, 5), 8), np.float32))]
    for got, ref in zip(responses, want):
        if ref is None:
            continue
        assert got.error is None, got.error.text
        assert list(got.outputs) == [out_name]
        np.testing.assert_allclose(got.outputs[out_name], ref, rtol=0, atol=1e-5)
    # the drawn noise matters (a server that ignored it would fail the first comparison)
    assert np.abs(want[0] - ort_out(a, np.zeros_like(_drawn(3, 0.5, (2, noise_len(6, 3), 8))))
                  ).max() > 1e-3
    errors = {i: responses[i].error.text for i in (2, 4, 5, 6)}
    assert all(responses[i].outputs == {} for i in errors)
    assert "token ids outside [0, 40)" in errors[2]
    assert "'seed' must be in" in errors[4]
    axis = "src_len" if kind == "classifier" else "tgt_len"  # the axis the noise spans
    assert f"input 'noise' has {axis} {noise_len(3, 6)}" in errors[5], errors[5]
    assert "src_len 7 is outside the profile [1, 6]" in errors[6]
    assert all("\n" not in e and "internal error" not in e for e in errors.values()), errors
