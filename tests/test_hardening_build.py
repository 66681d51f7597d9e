"""Issue 11, build-folder side: no data loss, no laundered tampering, one `error:` line per
user mistake, nothing stale left behind. Small builds (checkpoint + export at most)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from hmu_export.build import pipeline
from hmu_export.core.layout import BuildLayout
from hmu_export.commands.cli import main
from hmu_export.core.config import config_from_dict
from hmu_export.core.errors import ArtifactError, BackendUnavailable, CheckpointError, ConfigError
from hmu_export.core.fileio import exclusive_lock, sha256_file
from hmu_export.core.manifest import FAILED, OK, SKIPPED, StageResult, read_manifest, update_manifest

from conftest import SMALL, seal


def _toml(tmp_path: Path, model: dict | None = None, extra: str = "") -> Path:
    m = {**SMALL["model"], **(model or {})}
    lines = ["[model]"] + [f"{k} = {json.dumps(v)}" for k, v in m.items()]
    lines += ["[profile]"] + [f"{k} = {json.dumps(v)}" for k, v in SMALL["profile"].items()]
    path = tmp_path / "cfg.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def _one_error(argv, capsys, code: int | None = None) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and (code is None or rc == code), (rc, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _stale(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".staging" in p.name or
                  p.name.endswith(".old"))


def _stages(*names: str):
    return [s for s in pipeline.STAGES if s[0] in names]


def tiny_graph(cfg, config_meta: str | None = None):  # type: ignore[no-untyped-def]
    """A two-node ONNX graph carrying our metadata: commands open it like an export (the real
    export takes minutes on a loaded 2-core machine; these tests never run the graph)."""
    import onnx
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["h"], name="relu"),
                               helper.make_node("Sigmoid", ["h"], ["y"], name="sig")],
                              "tiny", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 9
    onnx.helper.set_model_props(proto, {"hmu_export.config": config_meta if config_meta
                                        is not None else cfg.to_json()})
    return proto


@pytest.fixture(scope="module")
def mini_build(small_cfg, tmp_path_factory) -> Path:
    """A real checkpoint stage plus a tiny graph, with a manifest: every command opens it."""
    import onnx

    from hmu_export.core.manifest import write_manifest
    out = tmp_path_factory.mktemp("mini") / "b"
    outcome = pipeline.run_build(small_cfg, out, only=["checkpoint"])
    assert outcome.ok, outcome.failure
    onnx.save(tiny_graph(small_cfg), str(out / "model.onnx"))
    data = read_manifest(out)
    write_manifest(out, stages=data["stages"], profile=data["profile"],
                   versions=data["versions"], extra={k: v for k, v in data.items() if k not in (
                       "artifacts", "stages", "profile", "versions", "manifest_version")})
    assert main(["info", "--artifacts", str(out)]) == 0
    return out


@pytest.fixture
def build_copy(mini_build, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(mini_build, dst)
    return dst


# ----------------------------------------------------------------- 1, 2, 13: what --out may be

def test_a_folder_of_user_files_is_refused_and_kept(tmp_path, capsys, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    line = _one_error(["build", "--config", _toml(tmp_path), "--out", mine], capsys)
    assert "not empty" in line and "--force" in line
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert _stale(tmp_path) == []
    monkeypatch.setattr(pipeline, "STAGES", _stages("checkpoint"))
    assert main(["build", "--config", str(_toml(tmp_path)), "--out", str(mine), "--force"]) == 0
    assert (mine / "manifest.json").is_file() and not (mine / "thesis.tex").exists()


def test_a_regular_file_as_out_is_refused_before_building(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    line = _one_error(["build", "--config", _toml(tmp_path), "--out", target, "--force"],
                      capsys)
    assert "is a file" in line
    assert target.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.toml", "notes.txt"]


def test_out_dot_is_resolved_and_refused(tmp_path, capsys, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert "current folder" in _one_error(["build", "--config", _toml(tmp_path), "--out", "."],
                                          capsys)
    assert "current folder" in _one_error(["build", "--config", _toml(tmp_path), "--out", ".."],
                                          capsys)
    assert list(here.iterdir()) == [] and _stale(tmp_path) == []


@pytest.mark.parametrize("name", ["a\0b", "two\nlines", "x" * 300, "..", " padded"])
def test_model_names_must_be_folder_names(name):
    with pytest.raises(ConfigError, match="model.name must be a plain folder name"):
        config_from_dict({**SMALL, "model": {**SMALL["model"], "name": name}})


# ------------------------------------------------------------------- 3: a recoverable swap

class Killed(BaseException):
    """Stands for kill -9: nothing after it runs (no rollback, no except OSError)."""


def _fail_rename_of_staging(monkeypatch, exc: BaseException) -> None:
    real = Path.rename

    def rename(self, target):  # type: ignore[no-untyped-def]
        if ".staging-" in self.name:
            raise exc
        return real(self, target)
    monkeypatch.setattr(Path, "rename", rename)


def test_a_kill_between_the_renames_is_repaired_by_the_next_run(small_cfg, tmp_path,
                                                                monkeypatch, capsys):
    out = tmp_path / "o"
    first = pipeline.run_build(small_cfg, out, only=["checkpoint"])
    good = read_manifest(out)
    with monkeypatch.context() as m:
        _fail_rename_of_staging(m, Killed())
        with pytest.raises(Killed):
            pipeline.run_build(small_cfg, out, only=["checkpoint"])
    assert first.ok and not out.exists() and (tmp_path / ".o.old").is_dir()
    # commands that read it say what happened, in one line
    line = _one_error(["info", "--artifacts", out], capsys)
    assert "interrupted" in line and ".o.old" in line
    # the next build (under the lock) restores it before anything else
    assert pipeline.recover_swap(out) is not None
    assert read_manifest(out) == good and not (tmp_path / ".o.old").exists()


def test_a_failed_second_rename_rolls_back_at_once(small_cfg, tmp_path, monkeypatch):
    out = tmp_path / "o"
    pipeline.run_build(small_cfg, out, only=["checkpoint"])
    good = sha256_file(out / "manifest.json")
    _fail_rename_of_staging(monkeypatch, OSError(errno.EXDEV, "Invalid cross-device link"))
    with pytest.raises(ArtifactError, match="cannot move the build"):
        pipeline.run_build(small_cfg, out, only=["checkpoint"])
    assert sha256_file(out / "manifest.json") == good
    assert _stale(tmp_path) == []


def test_the_next_build_restores_then_replaces(small_cfg, tmp_path):
    out = tmp_path / "o"
    pipeline.run_build(small_cfg, out, only=["checkpoint"])
    out.rename(tmp_path / ".o.old")  # the state a kill between the renames leaves
    outcome = pipeline.run_build(small_cfg, out, only=["checkpoint"])
    assert outcome.ok and outcome.notes and "restored" in outcome.notes[0]
    assert not (tmp_path / ".o.old").exists()


# ----------------------------------------------------- 4: one build at a time per output

def test_a_second_build_into_a_locked_output_is_refused(small_cfg, tmp_path, capsys):
    out = tmp_path / "o"
    with exclusive_lock(tmp_path / ".o.lock", "test"):
        with pytest.raises(ArtifactError, match="in use by another process"):
            pipeline.run_build(small_cfg, out, only=["checkpoint"])
        assert "in use by another process" in _one_error(
            ["build", "--config", _toml(tmp_path), "--out", out], capsys)
    assert not out.exists() and _stale(tmp_path) == []


def test_each_build_stages_in_its_own_hidden_folder(small_cfg, tmp_path, monkeypatch):
    seen = []

    def spy(ctx):  # type: ignore[no-untyped-def]
        seen.append(ctx.layout.root)
        return StageResult(OK)
    monkeypatch.setattr(pipeline, "STAGES", _stages("checkpoint") + [("spy", spy, True)])
    out = tmp_path / "o"
    for _ in range(2):
        assert pipeline.run_build(small_cfg, out).ok
    assert seen[0] != seen[1] and all(p.name.startswith(".o.staging-") for p in seen)
    assert _stale(tmp_path) == []
    assert all(not a["path"].startswith(".") for a in read_manifest(out)["artifacts"])
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode


# --------------------------------------------- 5, 6, 14: verify first, never launder

def _tamper(root: Path) -> None:
    with open(root / "checkpoint" / "config.json", "a") as f:
        f.write(" ")


@pytest.mark.parametrize("argv", [
    ["parity"], ["triton"], ["triton", "--smoke"], ["engine"], ["export"], ["bench", "--quick"],
    ["debug-precision"],
])
def test_commands_refuse_a_tampered_build(build_copy, capsys, argv):
    _tamper(build_copy)
    line = _one_error(argv + ["--artifacts", build_copy], capsys)
    assert "changed since the build" in line and "checkpoint/config.json" in line
    assert "changed since the build" in _one_error(["info", "--artifacts", build_copy], capsys)


def test_update_manifest_rehashes_only_what_the_command_wrote(build_copy):
    before = {a["path"]: a for a in read_manifest(build_copy)["artifacts"]}
    _tamper(build_copy)
    (build_copy / "parity").mkdir()
    (build_copy / "parity" / "report.md").write_text("new")
    update_manifest(build_copy, "parity", StageResult(OK), written=[build_copy / "parity"])
    after = {a["path"]: a for a in read_manifest(build_copy)["artifacts"]}
    assert after["checkpoint/config.json"] == before["checkpoint/config.json"]
    assert "parity/report.md" in after
    assert main(["info", "--artifacts", str(build_copy)]) == 1


@pytest.mark.parametrize("row", [
    {"path": "../../../etc/passwd"}, {"path": "/etc/passwd"}, {"path": "a/../../x"},
    {"path": "checkpoint/../../x"},
])
def test_info_refuses_paths_outside_the_build(build_copy, capsys, row):
    data = read_manifest(build_copy)
    data["artifacts"].append({"sha256": "0" * 64, "bytes": 1, **row})
    (build_copy / "manifest.json").write_text(json.dumps(data))
    assert "not a plain relative path" in _one_error(["info", "--artifacts", build_copy], capsys)


def test_info_reports_unlisted_files(build_copy, capsys):
    data = read_manifest(build_copy)
    data["artifacts"] = [a for a in data["artifacts"] if a["path"] != "model.onnx"]
    (build_copy / "manifest.json").write_text(json.dumps(data))
    (build_copy / "extra.bin").write_bytes(b"x")
    assert main(["info", "--artifacts", str(build_copy)]) == 1
    err = capsys.readouterr().err
    assert "model.onnx (not listed)" in err and "extra.bin (not listed)" in err


def test_a_served_folders_bytecode_cache_is_refused_with_the_way_out(build_copy, capsys):
    """A tritonserver run on the build's own triton/ folder leaves __pycache__ there: still
    refused (a .pyc runs instead of its source), with how to avoid it; our launcher writes none."""
    from hmu_export.deploy.triton.server import server_env

    model = build_copy / "triton" / "m_generate" / "1"
    (model / "__pycache__").mkdir(parents=True)
    (model / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"\x00" * 16)
    line = _one_error(["info", "--artifacts", build_copy], capsys)
    assert "triton/m_generate/1/__pycache__/model.cpython-311.pyc (not listed)" in line
    assert "PYTHONDONTWRITEBYTECODE=1" in line
    assert _env_of(server_env)["PYTHONDONTWRITEBYTECODE"] == "1"


def _env_of(server_env):  # type: ignore[no-untyped-def]
    class Dist:  # the one field server_env reads
        libs = Path("/nonexistent/libs")
    return server_env(Dist())


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d.update(artifacts=5), "'artifacts' must be a list"),
    (lambda d: d["artifacts"][0].pop("bytes"), "has no 'bytes'"),
    (lambda d: d.update(stages=[]), "'stages' must be an object"),
    (lambda d: d["artifacts"][0].update(bytes="lots"), "bytes must be an integer"),
    (lambda d: d["artifacts"][0].update(sha256=None), "sha256 must be"),
    (lambda d: d["stages"].update(x={"status": "great"}), "stages.x"),
    (lambda d: d.update(profile=[1]), "'profile' must be an object"),
])
def test_malformed_manifests_are_one_line(build_copy, capsys, edit, needle):
    data = read_manifest(build_copy)
    edit(data)
    (build_copy / "manifest.json").write_text(json.dumps(data))
    assert needle in _one_error(["info", "--artifacts", build_copy], capsys)
    assert needle in _one_error(["parity", "--artifacts", build_copy], capsys)


@pytest.mark.parametrize("meta", ["{", "[]", '{"model": {"d_model": "x"}}'])
def test_malformed_graph_metadata_is_one_line(mini_build, small_cfg, tmp_path, capsys, meta):
    import onnx
    root = tmp_path / "bare"
    shutil.copytree(mini_build / "checkpoint", root / "checkpoint")
    onnx.save(tiny_graph(small_cfg, meta), str(root / "model.onnx"))
    seal(root)  # its files verify: the graph's own metadata is what is wrong
    assert "corrupt metadata" in _one_error(["parity", "--artifacts", root], capsys)


def test_commands_on_a_build_keep_info_passing(build_copy, monkeypatch):
    from hmu_export.build.stages import engine as engine_mod

    def no_trt():  # type: ignore[no-untyped-def]
        raise BackendUnavailable("TensorRT is not installed")
    monkeypatch.setattr(engine_mod, "probe_runtime", no_trt)
    assert main(["engine", "--artifacts", str(build_copy)]) == 0
    assert main(["info", "--artifacts", str(build_copy)]) == 0


# ------------------------------------------------------------- 9: no silent NaN

@pytest.mark.parametrize("section, key, value", [
    ("model", "init_scale", "nan"), ("parity", "noise_scale", "inf"),
    ("parity", "fp32_max_abs", "nan"), ("parity", "fp32_max_abs", "inf"),
])
def test_non_finite_config_numbers_are_refused(tmp_path, capsys, section, key, value):
    extra = f"[{section}]\n{key} = {value}\n" if section != "model" else ""
    model = None
    if section == "model":
        path = _toml(tmp_path)
        path.write_text(path.read_text().replace("[model]", f"[model]\n{key} = {value}"))
    else:
        path = _toml(tmp_path, model, extra)
    line = _one_error(["build", "--config", path, "--out", tmp_path / "o"], capsys)
    assert f"{section}.{key} must be a finite number" in line


def test_non_finite_weights_are_refused_at_load(small_model, tmp_path):
    from safetensors.torch import save_file

    from hmu_export.model import build_model
    state = {k: v.clone().contiguous() for k, v in small_model.state_dict().items()}
    key = next(iter(state))
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match="non-finite"):
        build_model(replace(small_model.cfg, checkpoint=str(tmp_path / "w.safetensors")))


def test_a_constant_reference_is_judged_by_absolute_error():
    from hmu_export.verify.parity import compare_arrays
    from hmu_export.core.tolerance import tolerance_for
    ref = np.full((1, 1, 1), 2.5, np.float32)  # vocab_size 1 at shape 1x1x1: no range
    metrics, reasons = compare_arrays(ref, ref + np.float32(1e-6), tolerance_for("fp32"),
                                      top1=True)
    assert reasons == [] and np.isfinite(metrics["max_rel_range"])


# ----------------------------------------------- 11, 12, 16: clean failures, nothing stale

@pytest.mark.parametrize("model, profile", [
    ({"max_len": 10**9}, None), ({"d_ff": 10**11}, None), ({"d_model": 2**24, "n_heads": 1}, None),
    (None, {"batch": [1, 1, 10**6]}),
])
def test_sizes_this_machine_cannot_hold_are_refused_first(tmp_path, capsys, model, profile):
    path = _toml(tmp_path, model)
    if profile:
        path.write_text(path.read_text().replace('batch = [1, 2, 4]',
                                                 f'batch = {json.dumps(profile["batch"])}'))
    line = _one_error(["build", "--config", path, "--out", tmp_path / "o"], capsys)
    assert "GiB of memory" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.toml"]


def test_disk_full_while_saving_is_a_clean_failure(small_cfg, tmp_path, monkeypatch):
    import safetensors.torch

    def full(*a, **k):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    outcome = pipeline.run_build(small_cfg, tmp_path / "o", only=["checkpoint"])
    assert not outcome.ok and "No space left on device" in outcome.failure
    assert _stale(tmp_path) == [] and not (tmp_path / "o").exists()


def test_disk_full_while_drawing_the_heatmap_is_one_line(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from hmu_export.verify.parity import ParityReport, heatmap

    def full(*a, **k):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Figure, "savefig", full)
    report = ParityReport(True, [], [], {}, [(1, 1, 1)], {})
    with pytest.raises(ArtifactError, match="No space left on device"):
        heatmap(report, tmp_path / "heatmap.png")
    assert list(tmp_path.iterdir()) == []


def test_a_bug_in_a_stage_keeps_the_failed_build_with_its_traceback(tmp_path, capsys,
                                                                    monkeypatch):
    def boom(ctx):  # type: ignore[no-untyped-def]
        raise RuntimeError("planted bug")
    monkeypatch.setattr(pipeline, "STAGES", _stages("checkpoint") + [("export", boom, False)])
    out = tmp_path / "o"
    rc = main(["build", "--config", str(_toml(tmp_path)), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "planted bug" in errors[0]
    log = tmp_path / "o.failed" / "build.log"
    assert str(log) in errors[0]
    assert "Traceback" in log.read_text() and "RuntimeError: planted bug" in log.read_text()
    assert read_manifest(tmp_path / "o.failed")["stages"]["export"]["status"] == FAILED
    assert _stale(tmp_path) == [] and not out.exists()


# --------------------------------------------------------------- 17: base install

def test_the_build_works_without_tritonclient(small_cfg, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "tritonclient" or m.startswith("tritonclient.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "tritonclient", None)
    outcome = pipeline.run_build(small_cfg, tmp_path / "o", only=["checkpoint", "triton"])
    assert outcome.ok, outcome.failure
    triton = read_manifest(tmp_path / "o")["stages"]["triton"]
    assert triton["status"] == SKIPPED and "tritonclient" in triton["reason"]


# ------------------------------------------------------------------- 18: smaller

def test_engine_require_engine_says_why(build_copy, capsys, monkeypatch):
    from hmu_export.build.stages import engine as engine_mod

    def no_trt():  # type: ignore[no-untyped-def]
        raise BackendUnavailable("TensorRT is not installed")
    monkeypatch.setattr(engine_mod, "probe_runtime", no_trt)
    assert main(["engine", "--artifacts", str(build_copy), "--require-engine"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: engine stage failed: engine required")


def test_a_malicious_pickle_is_refused_without_warnings(tmp_path):
    from hmu_export.model.weights import read_state_dict

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="not a weights-only file"):
            read_state_dict(tmp_path / "evil.pt")
    assert caught == [] and not (tmp_path / "pwned").exists()


def test_checkpoints_that_are_not_files_say_what_they_are(tmp_path, capsys):
    from hmu_export.model.weights import read_state_dict
    (tmp_path / "dir.safetensors").mkdir()
    os.mkfifo(tmp_path / "fifo.safetensors")
    for path, needle in ((Path("/dev/zero"), "not a regular file (it is a character device)"),
                         (tmp_path / "dir.safetensors", "is a directory"),
                         (tmp_path / "fifo.safetensors", "not a regular file (it is a FIFO)"),
                         (tmp_path / "none.safetensors", "not found")):
        with pytest.raises(CheckpointError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            read_state_dict(path)
    line = _one_error(["build", "--config", _toml(tmp_path, {"checkpoint": "fifo.safetensors"}),
                       "--out", tmp_path / "o"], capsys)
    assert "FIFO" in line


def test_stage_details_are_formatted_for_people():
    from hmu_export.commands.build import _detail
    text = _detail("optimize", StageResult(OK, details={
        "parity_max_abs": 3.0994415283203125e-06, "nodes_after": 1234, "seconds": 0.25}))
    assert "parity_max_abs=3.1e-06" in text and "nodes_after=1,234" in text
    assert "seconds" not in text


# ------------------------------------------------------------------ 19, 21, 22

def test_the_fp16_stage_checks_its_graph_loads(mini_build, small_cfg, tmp_path, monkeypatch):
    from hmu_export.build.context import BuildContext
    from hmu_export.build.stages.fp16 import fp16_stage
    from hmu_export.export import fp16

    shutil.copy(mini_build / "model.onnx", tmp_path / "model.onnx")

    def rejects(path):  # type: ignore[no-untyped-def]
        raise ArtifactError("the FP16 graph does not load in ONNX Runtime: planted")
    monkeypatch.setattr(fp16, "_check_loads", rejects)
    with pytest.raises(ArtifactError, match="planted"):
        fp16_stage(BuildContext(small_cfg, BuildLayout(tmp_path)))
    assert not (tmp_path / "model.fp16.onnx").exists()


def test_engine_requiredness_comes_from_the_stage_table(small_cfg, tmp_path, monkeypatch):
    engine_row = _stages("engine")[0]

    def trt_failed(ctx):  # type: ignore[no-untyped-def]
        return StageResult(FAILED, reason="TensorRT build failed: planted")
    stages = _stages("checkpoint") + [("engine", trt_failed, engine_row[2])]
    monkeypatch.setattr(pipeline, "STAGES", stages)
    relaxed = pipeline.run_build(small_cfg, tmp_path / "a")
    assert relaxed.ok and relaxed.stages["engine"].status == FAILED
    strict = pipeline.run_build(small_cfg, tmp_path / "b", require_engine=True)
    assert not strict.ok and "planted" in strict.failure


def test_a_checkpoint_config_with_other_heads_is_refused(small_model, tmp_path, capsys):
    from hmu_export.model import build_model, save_checkpoint
    save_checkpoint(small_model, tmp_path / "ck")  # n_heads 4, d_model 32
    cfg = replace(small_model.cfg, n_heads=2, checkpoint=str(tmp_path / "ck/model.safetensors"))
    with pytest.raises(CheckpointError, match="n_heads = 4"):
        build_model(cfg)
    build_model(replace(cfg, n_heads=4))  # the same architecture loads
    line = _one_error(["build", "--config", _toml(tmp_path, {
        "n_heads": 2, "checkpoint": "ck/model.safetensors"}), "--out", tmp_path / "o"], capsys)
    assert "model.n_heads = 4" in line


# ----------------------------------------------------------------------- 15: bench threads

def test_bench_threads_are_bounded_by_the_cores(build_copy, capsys):
    line = _one_error(["bench", "--artifacts", build_copy, "--quick", "--threads", "100000"],
                      capsys)
    assert f"0..{os.cpu_count()}" in line


def test_a_command_run_with_a_relative_build_path_records_its_files(build_copy, monkeypatch):
    """README style: `parity --artifacts engines/x --json engines/x/p.json` from the project
    folder passes cwd-relative paths; what the command wrote is re-hashed, so `info` stays
    clean afterwards (they were joined to the build folder twice before)."""
    from hmu_export.core.manifest import update_manifest

    monkeypatch.chdir(build_copy.parent)
    rel = build_copy.name
    (build_copy / "extra.json").write_text("{}")
    update_manifest(rel, None, None, written=[f"{rel}/extra.json"])
    assert main(["info", "--artifacts", rel]) == 0
    assert "extra.json" in {r["path"] for r in read_manifest(build_copy)["artifacts"]}


# ------------------------------------------- issue 21: only verified, successful builds are read

READERS = [["parity"], ["triton"], ["engine"], ["export"], ["bench", "--quick"],
           ["debug-precision"], ["generate", "--text", "a"], ["generate", "--input", "IN"]]


def _argv(argv: list[str], root: Path, tmp_path: Path) -> list[str]:
    inp = tmp_path / "in.json"
    inp.write_text('{"src_ids": [[3, 4]]}')
    return [str(inp) if a == "IN" else a for a in argv] + ["--artifacts", str(root)]


@pytest.mark.parametrize("argv", READERS, ids=lambda a: " ".join(a))
def test_a_folder_without_manifest_is_refused_by_every_reader(build_copy, tmp_path, capsys,
                                                              argv):
    (build_copy / "manifest.json").unlink()
    line = _one_error(_argv(argv, build_copy, tmp_path), capsys)
    assert "has no manifest.json" in line and str(build_copy) in line


def _failed_copy(build_copy: Path) -> Path:
    """A build that failed, as run_build keeps it: ``<out>.failed/`` whose manifest says so."""
    failed = build_copy.with_name(build_copy.name + ".failed")
    build_copy.rename(failed)
    data = read_manifest(failed)
    data["ok"] = False
    data["stages"]["parity"] = {"status": FAILED, "reason": "logits differ by 3.2"}
    (failed / "manifest.json").write_text(json.dumps(data))
    return failed


@pytest.mark.parametrize("argv", READERS + [["deploy"]], ids=lambda a: " ".join(a))
def test_a_failed_build_is_refused_naming_it(build_copy, tmp_path, capsys, argv):
    failed = _failed_copy(build_copy)
    if argv == ["deploy"]:
        (failed / "triton").mkdir()
        argv = ["deploy", "--repository", str(failed / "triton"), "--target", "k8s", "--pvc",
                "c", "--out", str(tmp_path / "d")]
        line = _one_error(argv, capsys)
    else:
        line = _one_error(_argv(argv, failed, tmp_path), capsys)
    assert "is a failed build" in line and "logits differ by 3.2" in line


def test_info_shows_a_failed_build_and_says_so(build_copy, capsys):
    failed = _failed_copy(build_copy)
    assert main(["info", "--artifacts", str(failed)]) == 1
    captured = capsys.readouterr()
    assert "parity" in captured.out  # the stages are shown for inspection
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and "is a failed build" in errors[0]


def test_a_real_failed_build_folder_is_refused(tmp_path, capsys, monkeypatch):
    def boom(ctx):  # type: ignore[no-untyped-def]
        raise ArtifactError("planted failure")
    monkeypatch.setattr(pipeline, "STAGES", _stages("checkpoint") + [("export", boom, True)])
    out = tmp_path / "o"
    assert main(["build", "--config", str(_toml(tmp_path)), "--out", str(out)]) == 1
    capsys.readouterr()
    line = _one_error(_argv(["generate", "--input", "IN"], tmp_path / "o.failed", tmp_path),
                      capsys)
    assert "is a failed build" in line and "planted failure" in line


def test_export_from_a_config_writes_a_verified_folder(tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["export", "--config", str(_toml(tmp_path)), "--out", str(out)]) == 0
    data = read_manifest(out)
    assert data["ok"] is True and {"checkpoint", "export"} <= set(data["stages"])
    assert {a["path"] for a in data["artifacts"]} >= {"model.onnx",
                                                      "checkpoint/model.safetensors"}
    assert not (out / "encoder.onnx").exists()  # model.onnx only
    assert main(["info", "--artifacts", str(out)]) == 0
    assert main(["export", "--artifacts", str(out)]) == 0  # re-export, recorded
    assert main(["info", "--artifacts", str(out)]) == 0
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    assert "not empty" in _one_error(["export", "--config", _toml(tmp_path), "--out", user],
                                     capsys)
    assert (user / "notes.txt").read_text() == "keep" and sorted(user.iterdir()) == [
        user / "notes.txt"]


# -------------------------------------- issue 21: output paths are never renamed over


def _fifo_reader(path: Path):  # type: ignore[no-untyped-def]
    import threading
    got: list[bytes] = []

    def read() -> None:
        with open(path, "rb") as f:
            got.append(f.read())
    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t, got


def test_atomic_writes_to_devices_fifos_and_links(tmp_path):
    from hmu_export.core.fileio import write_json, write_text

    write_text(Path("/dev/null"), "x")  # written into, not replaced
    assert Path("/dev/null").is_char_device()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t, got = _fifo_reader(fifo)
    write_json(fifo, {"a": 1})
    t.join(10)
    assert json.loads(got[0]) == {"a": 1} and fifo.is_fifo()
    target = tmp_path / "real.json"
    target.write_text("old")
    os.chmod(target, 0o640)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_json(link, {"b": 2})
    assert link.is_symlink() and json.loads(target.read_text()) == {"b": 2}
    assert (target.stat().st_mode & 0o777) == 0o640  # the replaced file keeps its mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link.json", "real.json"]


@pytest.mark.parametrize("make, needle", [
    (lambda p: p.mkdir(), "it is a folder"),
    (lambda p: p.symlink_to(p.parent / "missing"), "does not exist"),
    (lambda p: os.mkfifo(p), "no process opened it for reading"),
])
def test_unwritable_output_kinds_are_one_line(tmp_path, monkeypatch, make, needle):
    from hmu_export.core import fileio
    monkeypatch.setattr(fileio, "FIFO_WAIT_S", 0.2)
    target = tmp_path / "out.json"
    make(target)
    with pytest.raises(ArtifactError, match=needle):
        fileio.write_json(target, {"a": 1})
    assert not target.is_file() or target.is_symlink()


def test_a_command_json_to_devices_fifo_and_link(small_export, tmp_path):
    """`parity --json` (every command's --json and file --out go through the same writer)."""
    build = tmp_path / "b"
    shutil.copytree(small_export.root, build)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t, got = _fifo_reader(fifo)
    mine = tmp_path / "mine.json"
    mine.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(mine)
    for target in ("/dev/null", str(fifo), str(link)):
        assert main(["parity", "--artifacts", str(build), "--backends", "onnxruntime",
                     "--shapes", "1x2x2", "--json", target]) == 0
    t.join(10)
    assert Path("/dev/null").is_char_device() and fifo.is_fifo() and link.is_symlink()
    assert json.loads(got[0])["passed"] and json.loads(mine.read_text())["passed"]
    assert main(["info", "--artifacts", str(build)]) == 0


@pytest.mark.parametrize("target", ["dangling", "below-a-file", "/dev/full"])
def test_parity_with_an_unwritable_json_keeps_the_build_verifying(small_export, tmp_path,
                                                                   capsys, target):
    """Found by scripts/hostile.py: parity rewrote parity/ in the build, then failed on --json
    before recording it, so the build no longer matched its manifest."""
    build = tmp_path / "b"
    shutil.copytree(small_export.root, build)
    if target == "dangling":
        (tmp_path / "ln").symlink_to(tmp_path / "nowhere")
        out = str(tmp_path / "ln")
    elif target == "below-a-file":
        (tmp_path / "f").write_text("mine")
        out = str(tmp_path / "f" / "r.json")
    else:
        out = target
    assert "cannot write" in _one_error(["parity", "--artifacts", build, "--backends",
                                         "onnxruntime", "--shapes", "1x2x2", "--json", out],
                                        capsys)
    assert main(["info", "--artifacts", str(build)]) == 0


@pytest.mark.parametrize("flag", ["--settle-seconds", "--compare-threshold"])
def test_bench_refuses_nan_seconds_and_thresholds(small_export, capsys, flag):
    """Found by scripts/hostile.py: `--settle-seconds nan` ran the bench (exit 0)."""
    with pytest.raises(SystemExit) as info:
        main(["bench", "--artifacts", str(small_export.root), "--quick", flag, "nan"])
    assert info.value.code == 2 and "must be finite" in capsys.readouterr().err


def test_parity_refuses_an_empty_backend_list(small_export, capsys):
    """Found by scripts/hostile.py: `--backends ,` ran every backend (bench refuses it)."""
    assert "--backends is empty" in _one_error(
        ["parity", "--artifacts", small_export.root, "--backends", ","], capsys)


def test_parity_with_only_absent_backends_says_why(small_export, capsys):
    """Found by scripts/hostile.py: `--backends tensorrt` without TensorRT ended in an empty
    `error: parity failed: ` line."""
    from hmu_export.runners.tensorrt_runner import probe_runtime
    try:
        probe_runtime()
    except BackendUnavailable:
        pass
    else:
        pytest.skip("TensorRT runs here: the backend is not absent")
    rc = main(["parity", "--artifacts", str(small_export.root), "--backends", "tensorrt",
               "--shapes", "1x2x2"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert rc == 1 and len(err) == 1 and "tensorrt" in err[0].split("parity failed:")[1], err
