"""End to end through the command line, and every bad input of issue #2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hmu_export.commands.cli import main
from hmu_export.core.fileio import sha256_file
from hmu_export.model import HMUTransformer, save_checkpoint

from conftest import SMALL

ROOT = Path(__file__).resolve().parents[1]


def _toml(tmp_path: Path, extra: str = "", model: dict | None = None) -> Path:
    m = {**SMALL["model"], **(model or {})}
    lines = ["[model]"] + [f"{k} = {json.dumps(v)}" for k, v in m.items()]
    lines += ["[profile]"] + [f"{k} = {json.dumps(v)}" for k, v in SMALL["profile"].items()]
    # These builds test the pipeline, not generation (tests/test_generate_cli.py does, and the
    # default build below has the split graphs): the full graph only keeps them quick.
    if "[generation]" not in extra:
        extra += "\n[generation]\nsplit_graphs = false\n"
    path = tmp_path / "cfg.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


@pytest.fixture(scope="module")
def cli_build(tmp_path_factory):
    """The README command, verbatim, in a fresh folder: `python -m hmu_export build`."""
    cwd = tmp_path_factory.mktemp("readme")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "hmu_export", "build"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, cwd / "engines" / "hmu-default"


def test_default_build_end_to_end(cli_build):
    proc, out = cli_build
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "stage" in proc.stdout and "parity" in proc.stdout  # the summary table
    manifest = json.loads((out / "manifest.json").read_text())
    paths = {a["path"] for a in manifest["artifacts"]}
    assert {"model.onnx", "checkpoint/model.safetensors", "checkpoint/config.json",
            "parity/report.json", "parity/report.md", "parity/heatmap.png"} <= paths
    for art in manifest["artifacts"]:
        assert sha256_file(out / art["path"]) == art["sha256"], art["path"]
        assert (out / art["path"]).stat().st_size == art["bytes"]
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk - paths == {"manifest.json"}  # every artifact is listed
    assert manifest["profile"] == {"batch": [1, 4, 8], "src_len": [1, 64, 128],
                                   "tgt_len": [1, 32, 64], "past_len": [0, 31, 63],
                                   "new_len": [1, 1, 64]}
    # the generation graphs and their parity report are part of every seq2seq build
    assert {"encoder.onnx", "decoder.onnx", "encoder.opt.onnx", "decoder.opt.onnx",
            "encoder.fp16.onnx", "decoder.fp16.onnx", "parity/generation.json",
            "parity/generation.md"} <= paths
    gen = json.loads((out / "parity" / "generation.json").read_text())
    assert gen["passed"] is True and gen["reference"] == "torch-nocache"
    assert {r["backend"] for r in gen["tokens"] if r["exact"]} >= {"torch", "onnxruntime",
                                                                   "onnxruntime-opt"}
    for stage in ("checkpoint", "export", "parity"):
        assert manifest["stages"][stage]["status"] == "ok"
    assert all(s["status"] in ("ok", "skipped") for s in manifest["stages"].values())
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest["versions"])
    report = json.loads((out / "parity" / "report.json").read_text())
    assert report["passed"] is True
    ort_rows = [r for r in report["results"] if r["backend"] == "onnxruntime"]
    # the trained default's bound (its logits span ~35: demo_config scales the absolute bound)
    bound = manifest["config"]["parity"]["fp32_max_abs"]
    assert bound <= 1e-3
    assert ort_rows and max(r["max_abs"] for r in ort_rows if r["output"] == "logits") < bound


def test_readme_generate_spells_2026(cli_build):
    """The README's first command ends with `generate --text "2026"` on the trained default."""
    proc, out = cli_build
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    gen = subprocess.run([sys.executable, "-m", "hmu_export", "generate", "--artifacts", str(out),
                          "--text", "2026"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert "dos mil veintiséis" in gen.stdout
    task = json.loads((out / "parity" / "task.json").read_text())
    rows = {r["backend"]: r for r in task["rows"]}
    assert rows["torch"]["total"] >= 2000 and not task["failures"]
    # the three FP32 backends solve exactly the same examples as the PyTorch model
    assert rows["onnxruntime"]["correct"] == rows["onnxruntime-opt"]["correct"] == \
        rows["torch"]["correct"]
    assert [n["scale"] for n in task["noise"]] == [0.0, 0.25, 0.5, 1.0, 2.0]
    assert {"onnxruntime-fp16emu", "onnxruntime-int8", "onnxruntime-int4"} <= set(rows)


def test_single_stage_commands_on_a_build(cli_build, tmp_path, capsys):
    _, out = cli_build
    before = sha256_file(out / "model.onnx")
    assert main(["export", "--artifacts", str(out)]) == 0
    assert sha256_file(out / "model.onnx") == before  # reproducible re-export
    js = tmp_path / "p.json"
    assert main(["parity", "--artifacts", str(out), "--shapes", "1x1x1,3x7x5,8x128x64",
                 "--backends", "onnxruntime", "--json", str(js)]) == 0
    data = json.loads(js.read_text())
    assert sorted({tuple(r["shape"]) for r in data["results"]}) == [(1, 1, 1), (3, 7, 5),
                                                                    (8, 128, 64)]
    assert main(["info", "--artifacts", str(out)]) == 0  # hashes still match after updates
    (out / "parity" / "report.md").write_text("tampered")
    assert main(["info", "--artifacts", str(out)]) == 1
    assert "changed since the build" in capsys.readouterr().err


def _run_error(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("extra, model, needle", [
    ("", {"d_modle": 8}, "unknown key 'model.d_modle'"),
    ("", {"d_model": "big"}, "model.d_model must be an integer"),
    ("", {"n_heads": 5}, "must divide model.d_model"),
    ("[engine]\nworkspace_mib = 0\n", None, "engine.workspace_mib"),
])
def test_bad_config_fields(tmp_path, capsys, extra, model, needle):
    cfg = _toml(tmp_path, extra, model)
    assert needle in _run_error(["build", "--config", str(cfg), "--out",
                                 str(tmp_path / "o")], capsys)
    assert not (tmp_path / "o").exists()


def test_min_gt_opt_in_profile(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[profile]\nbatch = [4, 2, 8]\n")
    assert "profile.batch: min (4) > opt (2)" in _run_error(["build", "--config", str(cfg)],
                                                            capsys)


def test_missing_config(tmp_path, capsys):
    assert "config file not found" in _run_error(
        ["build", "--config", str(tmp_path / "nope.toml")], capsys)


def test_missing_checkpoint(tmp_path, capsys):
    cfg = _toml(tmp_path, model={"checkpoint": "missing.safetensors"})
    assert "checkpoint not found" in _run_error(["build", "--config", str(cfg), "--out",
                                                 str(tmp_path / "o")], capsys)
    assert not (tmp_path / "o").exists()


def test_corrupt_checkpoint(tmp_path, capsys):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00garbage" * 10)
    cfg = _toml(tmp_path, model={"checkpoint": "bad.safetensors"})
    assert "corrupt safetensors" in _run_error(["build", "--config", str(cfg), "--out",
                                                str(tmp_path / "o")], capsys)
    assert not (tmp_path / "o").exists()


def test_mismatched_checkpoint(tmp_path, capsys, small_cfg):
    from dataclasses import replace
    other = HMUTransformer(replace(small_cfg.model, d_model=64, latent_dim=32))
    save_checkpoint(other, tmp_path / "ck")
    cfg = _toml(tmp_path, model={"checkpoint": "ck/model.safetensors"})
    assert "does not match the config" in _run_error(["build", "--config", str(cfg), "--out",
                                                      str(tmp_path / "o")], capsys)


def test_unsafe_pickle_checkpoint(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    cfg = _toml(tmp_path, model={"checkpoint": "evil.pt"})
    assert "not a weights-only file" in _run_error(["build", "--config", str(cfg), "--out",
                                                    str(tmp_path / "o")], capsys)


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "not writable" in _run_error(["build", "--config", str(_toml(tmp_path)), "--out",
                                         str(blocker / "sub" / "out")], capsys)


def test_parity_shapes_outside_profile(small_export, capsys):
    assert "outside the profile" in _run_error(
        ["parity", "--artifacts", str(small_export.root), "--shapes", "64x1x1"], capsys)


def test_bad_shapes_syntax(small_export, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse: usage + one error line, exit 2
        main(["parity", "--artifacts", str(small_export.root), "--shapes", "1x2"])
    assert exc.value.code == 2
    assert "bad shape '1x2'" in capsys.readouterr().err


def test_parity_on_a_folder_that_is_not_a_build(tmp_path, capsys):
    assert "not a build folder" in _run_error(["parity", "--artifacts", str(tmp_path)], capsys)


def test_failed_build_keeps_the_previous_good_one(tmp_path, capsys, monkeypatch):
    from hmu_export.build import pipeline
    from hmu_export.core.manifest import FAILED, StageResult

    cfg = _toml(tmp_path)
    out = tmp_path / "o"
    first_ok = [s for s in pipeline.STAGES if s[0] in ("checkpoint", "export")]
    monkeypatch.setattr(pipeline, "STAGES", first_ok)
    assert main(["build", "--config", str(cfg), "--out", str(out)]) == 0
    good = sha256_file(out / "model.onnx")
    monkeypatch.setattr(pipeline, "STAGES", first_ok + [
        ("parity", lambda ctx: StageResult(FAILED, reason="planted failure"), True)])
    assert main(["build", "--config", str(cfg), "--out", str(out)]) == 1
    assert "planted failure" in capsys.readouterr().err
    assert sha256_file(out / "model.onnx") == good  # untouched
    failed = json.loads((tmp_path / "o.failed" / "manifest.json").read_text())
    assert failed["stages"]["parity"] == {"status": "failed", "reason": "planted failure",
                                          "seconds": failed["stages"]["parity"]["seconds"]}
    assert failed["ok"] is False


def test_build_exports_the_configured_checkpoint(tmp_path, small_cfg, monkeypatch):
    """A trained checkpoint named in the config is what the graph computes, not the seeded model."""
    import numpy as np
    import onnxruntime as ort
    from dataclasses import replace

    from hmu_export.build import pipeline
    from hmu_export.core.graph_meta import graph_metadata
    from hmu_export.core.io_contract import make_feeds
    from hmu_export.model import build_model, load_checkpoint

    trained = HMUTransformer(replace(small_cfg.model, seed=1234)).eval()  # other weights
    save_checkpoint(trained, tmp_path / "ck")
    cfg = _toml(tmp_path, model={"checkpoint": "ck/model.safetensors"})
    monkeypatch.setattr(pipeline, "STAGES", [s for s in pipeline.STAGES
                                             if s[0] in ("checkpoint", "export", "parity")])
    out = tmp_path / "o"
    assert main(["build", "--config", str(cfg), "--out", str(out)]) == 0
    copied = load_checkpoint(out / "checkpoint")
    for k, v in trained.state_dict().items():
        assert torch.equal(v, copied.state_dict()[k]), k
    import onnx
    meta = graph_metadata(onnx.load(str(out / "model.onnx")))
    assert meta["checkpoint_sha256"] == sha256_file(out / "checkpoint" / "model.safetensors")
    assert "ck/model.safetensors" not in meta["config"]  # recorded by hash, not by path
    feeds = make_feeds(small_cfg.model, 2, 8, 4)
    got = ort.InferenceSession(str(out / "model.onnx")).run(["logits"], feeds)[0]
    with torch.inference_mode():
        args = [torch.from_numpy(feeds[k]) for k in ("src_ids", "src_mask", "tgt_ids", "noise")]
        want = trained(*args).numpy()
        seeded = build_model(small_cfg.model)(*args).numpy()
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(got - seeded).max() > 1e-2


def _engine_buildable() -> bool:
    from hmu_export.core.errors import BackendUnavailable
    from hmu_export.runners.tensorrt_runner import probe_runtime
    try:
        probe_runtime()
        return True
    except BackendUnavailable:
        return False


@pytest.mark.skipif(_engine_buildable(), reason="TensorRT and a GPU are here: the engine builds")
def test_require_engine_turns_the_skip_into_a_failure(tmp_path, capsys, monkeypatch):
    from hmu_export.build import pipeline

    cfg = _toml(tmp_path)
    monkeypatch.setattr(pipeline, "STAGES", [s for s in pipeline.STAGES
                                             if s[0] in ("checkpoint", "export", "engine")])
    assert main(["build", "--config", str(cfg), "--out", str(tmp_path / "a")]) == 0
    ok = json.loads((tmp_path / "a" / "manifest.json").read_text())
    reason = ok["stages"]["engine"]["reason"]
    assert ok["stages"]["engine"]["status"] == "skipped" and reason
    assert (tmp_path / "a" / "build_engine.sh").is_file()  # the recipe is written either way
    capsys.readouterr()
    assert main(["build", "--config", str(cfg), "--out", str(tmp_path / "b"),
                 "--require-engine"]) == 1
    err = capsys.readouterr().err
    assert "stage 'engine' failed: engine required: " + reason in err
    assert not (tmp_path / "b").exists()
    failed = json.loads((tmp_path / "b.failed" / "manifest.json").read_text())
    assert failed["stages"]["engine"]["status"] == "failed"


def test_diagnostic_build_end_to_end(tmp_path):
    """A graph with encoder_out / hmu_gate / hmu_out outputs goes through every stage: same
    node names (pins, fusions), FP16 copy that loads, per-output parity rows."""
    import onnx

    from hmu_export.core.pins import sensitive_nodes

    cfg = _toml(tmp_path, "[export]\ndiagnostics = true\n")
    out = tmp_path / "o"
    assert main(["build", "--config", str(cfg), "--out", str(out)]) == 0
    # [generation] split_graphs = false: the full graph only, no generation graphs or report
    assert not (out / "encoder.onnx").exists() and not (out / "decoder.onnx").exists()
    assert not (out / "parity" / "generation.json").exists()
    assert sensitive_nodes(onnx.load(str(out / "model.onnx"))) == [
        "hmu/vae/Exp", "hmu/norm_input/LayerNormalization", "hmu/norm_latent/LayerNormalization",
        "hmu/gate_mlp/1/Sigmoid", "hmu/fusion_proj/2/LayerNormalization"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["stages"]["optimize"]["details"]["attention"].values()) == {"fused"}
    report = json.loads((out / "parity" / "report.json").read_text())
    seen = {(r["backend"], r["output"]) for r in report["results"]}
    for backend in ("onnxruntime", "onnxruntime-opt", "onnxruntime-fp16emu"):
        for output in ("logits", "encoder_out", "hmu_gate", "hmu_out"):
            assert (backend, output) in seen
    assert report["passed"] is True
