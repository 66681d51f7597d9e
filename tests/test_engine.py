"""TensorRT engine stage without TensorRT: profiles, pins, trtexec recipe, engine records."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import onnx
import pytest

from hmu_export.build.stages import engine as stage_mod
from hmu_export.deploy import tensorrt as engine_mod
from hmu_export.core.layout import BuildLayout
from hmu_export.core.config import ProfileConfig
from hmu_export.core.errors import ArtifactError, BackendUnavailable, ConfigError, InputError
from hmu_export.core.fileio import sha256_file
from hmu_export.core.manifest import FAILED, SKIPPED, read_manifest, write_manifest
from hmu_export.core.pins import select_pins
from hmu_export.runners.tensorrt_runner import (RuntimeInfo, TrtRunner, check_engine_record,
                                                read_engine_record, select_profile)

HMU_PINS = ["hmu/vae/Exp", "hmu/norm_input/LayerNormalization",
            "hmu/norm_latent/LayerNormalization", "hmu/gate_mlp/1/Sigmoid",
            "hmu/fusion_proj/2/LayerNormalization"]
H100 = RuntimeInfo("10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")


def _no_trt():
    raise BackendUnavailable("TensorRT is not installed or cannot load (No module named "
                             "'tensorrt')")


@pytest.fixture
def folder(small_export, tmp_path, monkeypatch):
    """A copy of the tiny export with a manifest, on a machine without TensorRT."""
    root = tmp_path / "build"
    shutil.copytree(small_export.root, root)
    write_manifest(root, stages={}, profile={}, versions={})
    monkeypatch.setattr(stage_mod, "probe_runtime", _no_trt)
    return root


def _ctx(cfg, root):
    from hmu_export.core.io_contract import full_contract
    from hmu_export.build.context import BuildContext
    return BuildContext(cfg, BuildLayout(root), contract=full_contract(cfg.model))


def test_profile_shapes_cover_every_dynamic_input(small_cfg):
    from hmu_export.core.io_contract import full_contract
    shapes = engine_mod.input_shapes(full_contract(small_cfg.model), small_cfg.profile)
    # conftest SMALL: batch 1/2/4, src_len 1/8/16, tgt_len 1/4/8, latent 16
    assert shapes == {"src_ids": ((1, 1), (2, 8), (4, 16)),
                      "src_mask": ((1, 1), (2, 8), (4, 16)),
                      "tgt_ids": ((1, 1), (2, 4), (4, 8)),
                      "noise": ((1, 1, 16), (2, 8, 16), (4, 16, 16))}


def test_pins_chosen_by_name_from_the_exported_graph(small_export, small_cfg):
    model = onnx.load(str(small_export.onnx))
    assert sorted(p.name for p in select_pins(model)) == sorted(HMU_PINS)
    soft = select_pins(model, dataclasses.replace(small_cfg.engine, pin_softmax=True))
    softmax = [p.name for p in soft if p.op_type == "Softmax"]
    assert softmax and all(n.endswith("Softmax") for n in softmax)
    assert {p.name for p in soft} >= set(HMU_PINS)
    with pytest.raises(ConfigError, match="not a node"):
        select_pins(model, extra=["hmu/typo"])


def test_stage_skips_with_reason_and_writes_recipe(folder, small_cfg):
    ctx = _ctx(small_cfg, folder)
    res = stage_mod.engine_stage(ctx)
    assert res.status == SKIPPED and "TensorRT is not installed" in res.reason
    recipe = folder / "build_engine.sh"
    assert recipe.stat().st_mode & stat.S_IXUSR
    subprocess.run(["bash", "-n", str(recipe)], check=True)
    text = recipe.read_text()
    for part in ["--onnx=model.onnx", "--fp16",
                 "--minShapes=src_ids:1x1,src_mask:1x1,tgt_ids:1x1,noise:1x1x16",
                 "--optShapes=src_ids:2x8,src_mask:2x8,tgt_ids:2x4,noise:2x8x16",
                 "--maxShapes=src_ids:4x16,src_mask:4x16,tgt_ids:4x8,noise:4x16x16",
                 "--precisionConstraints=obey", "--timingCacheFile=timing.cache",
                 "--saveEngine=model.fp16.plan", "--builderOptimizationLevel=3",
                 "--memPoolSize=workspace:4096M"]:
        assert part in text, part
    layer_prec = next(a for a in text.split() if a.startswith("--layerPrecisions="))
    assert sorted(layer_prec.split("=", 1)[1].split(",")) == sorted(f"{p}:fp32" for p in HMU_PINS)
    assert "--profile=" not in text  # one profile: the TensorRT 8-compatible spelling
    rec = ctx.data["engine"]
    assert rec["built"] is False and "TensorRT" in rec["skip_reason"]
    assert [p["name"] for p in rec["pins"]] == [p.name for p in
                                                select_pins(onnx.load(str(folder / "model.onnx")))]
    assert rec["onnx_sha256"] == sha256_file(folder / "model.onnx")
    assert rec["profiles"] == [{"batch": [1, 2, 4], "src_len": [1, 8, 16], "tgt_len": [1, 4, 8]}]


def test_extra_profiles_and_build_options_reach_the_recipe(folder, small_cfg):
    extra = ProfileConfig(batch=(1, 1, 1), src_len=(1, 4, 8), tgt_len=(1, 1, 2))
    eng = dataclasses.replace(small_cfg.engine, extra_profiles=(extra,), fp16=False,
                              version_compatible=True, hardware_compatibility="ampere_plus",
                              builder_optimization_level=5, workspace_mib=512)
    cfg = dataclasses.replace(small_cfg, engine=eng).validate()
    stage_mod.engine_stage(_ctx(cfg, folder))
    text = (folder / "build_engine.sh").read_text()
    assert "--profile=0" in text and "--profile=1" in text
    assert "--maxShapes=src_ids:1x8,src_mask:1x8,tgt_ids:1x2,noise:1x8x16" in text
    assert "--fp16" not in text
    for part in ["--versionCompatible", "--hardwareCompatibilityLevel=ampere+",
                 "--builderOptimizationLevel=5", "--memPoolSize=workspace:512M"]:
        assert part in text, part


FAKE_TRTEXEC = """#!/usr/bin/env bash
echo "[11/25/2026-10:00:00] [I] === Device Information ==="
echo "[11/25/2026-10:00:00] [I] Selected Device: NVIDIA H100 80GB HBM3"
echo "[11/25/2026-10:00:00] [I] Compute Capability: 9.0"
echo "[11/25/2026-10:00:00] [I] TensorRT version: 10.13.0"
echo "$@" > trtexec.args
for a in "$@"; do case "$a" in --saveEngine=*) echo plan > "${a#--saveEngine=}";; esac; done
"""


@pytest.fixture
def recipe_built(folder, small_cfg, tmp_path):
    """The folder after running build_engine.sh with a stand-in trtexec (no GPU needed)."""
    stage_mod.engine_stage(_ctx(small_cfg, folder))
    fake = tmp_path / "trtexec"
    fake.write_text(FAKE_TRTEXEC)
    fake.chmod(0o755)
    env = dict(os.environ, TRTEXEC=str(fake))
    subprocess.run(["bash", str(folder / "build_engine.sh")], check=True, env=env,
                   cwd=tmp_path, capture_output=True)
    return folder


def test_recipe_records_what_the_engine_is_tied_to(recipe_built):
    rec = read_engine_record(recipe_built)
    assert rec["tensorrt"] == "10.13.0"
    assert rec["gpu"] == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    assert rec["onnx_sha256"] == sha256_file(recipe_built / "model.onnx")
    assert rec["engine_sha256"] == sha256_file(recipe_built / "model.fp16.plan")
    assert rec["flags"]["fp16"] is True and rec["profiles"][0]["batch"] == [1, 2, 4]
    # the same runtime and graph are accepted (trtexec logs 3 version components)
    check_engine_record(rec, rec["onnx_sha256"], H100)


def test_mismatched_engines_are_refused_with_rebuild_hint(recipe_built):
    rec = read_engine_record(recipe_built)
    sha = rec["onnx_sha256"]
    cases = [
        (rec, "0" * 64, H100, "another model.onnx"),
        (rec, sha, dataclasses.replace(H100, tensorrt="10.14.1.2"), "TensorRT 10.13.0"),
        (rec, sha, RuntimeInfo("10.13.0.35", "NVIDIA L4", "8.9"), "built for NVIDIA H100"),
        (rec, sha, dataclasses.replace(H100, gpu_name="NVIDIA H200"), "this GPU is NVIDIA H200"),
        ({k: v for k, v in rec.items() if k != "tensorrt"}, sha, H100, "no TensorRT version"),
    ]
    for record, onnx_sha, runtime, msg in cases:
        with pytest.raises(ArtifactError, match=msg) as exc:
            check_engine_record(record, onnx_sha, runtime, recipe_built)
        assert "rebuild" in str(exc.value)


def test_compatibility_flags_relax_the_checks(recipe_built):
    rec = read_engine_record(recipe_built)
    sha = rec["onnx_sha256"]
    vc = dict(rec, flags=dict(rec["flags"], version_compatible=True))
    check_engine_record(vc, sha, dataclasses.replace(H100, tensorrt="10.14.1.2"))
    with pytest.raises(ArtifactError):  # older runtime or another major: never
        check_engine_record(vc, sha, dataclasses.replace(H100, tensorrt="10.12.0.1"))
    with pytest.raises(ArtifactError):
        check_engine_record(vc, sha, dataclasses.replace(H100, tensorrt="11.0.0.1"))
    amp = dict(rec, flags=dict(rec["flags"], hardware_compatibility="ampere_plus"))
    check_engine_record(amp, sha, RuntimeInfo("10.13.0.35", "NVIDIA L4", "8.9"))
    with pytest.raises(ArtifactError):
        check_engine_record(amp, sha, RuntimeInfo("10.13.0.35", "Tesla T4", "7.5"))


def test_runner_refuses_before_loading(recipe_built, small_cfg):
    from hmu_export.core.io_contract import full_contract
    contract = full_contract(small_cfg.model)
    with pytest.raises(ArtifactError, match="built for NVIDIA H100"):
        TrtRunner(recipe_built, contract, runtime=RuntimeInfo("10.13.0.35", "NVIDIA L4", "8.9"))
    (recipe_built / "model.fp16.plan").write_text("tampered")
    with pytest.raises(ArtifactError, match="differs from the engine"):
        TrtRunner(recipe_built, contract, runtime=H100)
    (recipe_built / "model.fp16.plan").unlink()
    with pytest.raises(ArtifactError, match="no TensorRT engine"):
        TrtRunner(recipe_built, contract, runtime=H100)


def test_profile_selection():
    wide = ProfileConfig((1, 4, 8), (1, 64, 128), (1, 32, 64))
    short = ProfileConfig((1, 1, 1), (1, 8, 16), (1, 4, 8))
    assert select_profile([wide, short], 1, 10, 5) == 1  # the tighter one that fits
    assert select_profile([wide, short], 4, 10, 5) == 0
    assert select_profile([wide, short], 1, 100, 5) == 0
    with pytest.raises(InputError, match="outside every engine profile"):
        select_profile([wide, short], 9, 10, 5)


def test_engine_command_updates_the_manifest(folder, monkeypatch):
    from hmu_export.commands.cli import main
    from hmu_export.runners import tensorrt_runner
    monkeypatch.setattr(tensorrt_runner, "probe_runtime", _no_trt)
    assert main(["engine", "--artifacts", str(folder)]) == 0
    man = read_manifest(folder)
    assert man["stages"]["engine"]["status"] == SKIPPED
    assert "build_engine.sh" in {a["path"] for a in man["artifacts"]}
    assert man["engine"]["pins"] and man["engine"]["built"] is False
    assert main(["engine", "--artifacts", str(folder), "--require-engine"]) == 1
    man = read_manifest(folder)
    assert man["stages"]["engine"]["status"] == FAILED
    assert man["stages"]["engine"]["reason"].startswith("engine required: TensorRT")


def test_engine_command_refuses_a_changed_graph(folder, capsys):
    from hmu_export.commands.cli import main
    write_manifest(folder, stages={}, profile={}, versions={})
    with open(folder / "model.onnx", "ab") as f:
        f.write(b"\0")
    assert main(["engine", "--artifacts", str(folder)]) != 0
    assert "changed since the build" in capsys.readouterr().err


def test_recipe_json_is_valid_even_with_odd_gpu_names(folder, small_cfg, tmp_path):
    stage_mod.engine_stage(_ctx(small_cfg, folder))
    fake = tmp_path / "trtexec"
    fake.write_text(FAKE_TRTEXEC.replace("NVIDIA H100 80GB HBM3", 'GPU "quoted" name'))
    fake.chmod(0o755)
    subprocess.run(["bash", str(folder / "build_engine.sh")], check=True,
                   env=dict(os.environ, TRTEXEC=str(fake)), capture_output=True)
    rec = json.loads((folder / "engine.json").read_text())
    assert rec["gpu"]["name"] == "GPU quoted name"
    assert Path(folder / "build_engine.log").is_file()


def test_decoder_recipe_has_the_per_row_state_in_every_profile(small_cfg):
    """The decoder step's trtexec profiles give positions [batch, new_len] and past_mask
    [batch, past_len] the same ranges as the cache: past 0 in the first-step profile, the
    profile's past_len range in the step profile (where in-flight rows also join)."""
    from pathlib import Path

    from hmu_export.core.graph_kinds import graph_contract
    from hmu_export.core.io_contract import CacheLayout
    from hmu_export.core.layout import BuildLayout
    from hmu_export.deploy.tensorrt import trtexec_args

    contract = graph_contract("decoder", small_cfg.model, CacheLayout(1, 4, 8))
    args = trtexec_args(small_cfg, contract, [], BuildLayout(Path("/nowhere")), "decoder")
    shapes = [dict(item.split(":") for item in a.split("=", 1)[1].split(","))
              for a in args if a.startswith(("--minShapes", "--optShapes", "--maxShapes"))]
    assert len(shapes) == 6  # two profiles x min / opt / max
    past_max = small_cfg.profile.past_len[2]
    for i, s in enumerate(shapes):
        past = s["past_key.0"].split("x")[2]
        assert s["past_mask"] == f"{s['tgt_ids'].split('x')[0]}x{past}"
        assert s["positions"] == s["tgt_ids"]
    assert [s["past_mask"].split("x")[1] for s in shapes] == ["0", "0", "0", "1", "3",
                                                              str(past_max)]
