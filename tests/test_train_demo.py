"""train-demo for a few steps (CI's share of the demo trainer): it writes a loadable native
checkpoint with its tokenizer, the stage-1 loss falls, the HMU stage lowers the dev CE, and the
committed held-out sets are disjoint and cover every digit count."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("num2words", reason="the [train] extra (num2words) is not installed")


def test_a_few_steps_write_a_loadable_model_and_learn(tmp_path):
    from hmu_export.commands.cli import main
    from hmu_export.model.weights import load_checkpoint

    out = tmp_path / "demo"
    assert main(["train-demo", "--out", str(out), "--steps", "8", "--hmu-steps", "3",
                 "--eval-limit", "4", "--threads", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage1"]["loss_last"] < summary["stage1"]["loss_first"]
    assert summary["stage2"]["dev_ce_after"] < summary["stage2"]["dev_ce_before"]
    model = load_checkpoint(out / "model")
    assert (out / "model" / "tokenizer.json").is_file()
    assert model.cfg.vocab_size >= summary["data"]["vocabulary"]


def test_the_committed_sets_are_disjoint_and_cover_every_digit_count():
    from hmu_export import demo

    dev = [json.loads(line) for line in demo.DEV_SET.read_text().splitlines()]
    test = [json.loads(line) for line in demo.TEST_SET.read_text().splitlines()]
    assert len(test) >= 2000
    assert not {r["source"] for r in dev} & {r["source"] for r in test}
    assert {len(r["source"]) for r in test} == set(range(1, 10))
    from num2words import num2words
    for r in test[::97]:  # an independent oracle: the data generator itself
        assert r["target"] == num2words(int(r["source"]), lang="es")


def test_a_users_folder_or_a_file_is_refused_as_out(tmp_path, capsys):
    from hmu_export.commands.cli import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    (tmp_path / "afile").write_text("x")
    for out, needle in ((mine, "holds no train-demo output"), (tmp_path / "afile", "not a folder")):
        assert main(["train-demo", "--out", str(out), "--steps", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep"


def test_the_t5_twin_a_few_steps_writes_a_folder_with_a_trained_hmu(tmp_path):
    pytest.importorskip("transformers")
    from hmu_export.commands.cli import main
    from hmu_export.core.config import ModelConfig
    from hmu_export.model import sources

    out = tmp_path / "t5"
    assert main(["train-demo", "--t5", "--out", str(out), "--steps", "4", "--hmu-steps", "2",
                 "--eval-limit", "4", "--threads", "1"]) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json",
                 "generation_config.json", "hmu.safetensors"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "training.json").read_text())
    assert summary["hmu"]["steps"] == 2
    assert summary["hmu"]["dev_ce_trained_hmu"] < summary["hmu"]["dev_ce_seeded_hmu"]
    assert not (out / "hmu-train").exists()
    cfg = sources.resolve(ModelConfig(source="hf", path=str(out),
                                      hmu_checkpoint=str(out / "hmu.safetensors")))
    assert sources.load(cfg).hmu_status == "trained"
    # a class name Transformers 4 (Optimum's pin) can load too, not 5's TokenizersBackend
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "backend" not in tok_cfg


def test_more_threads_than_cores_is_one_error_not_a_crash(tmp_path):
    """Found by scripts/hostile.py: `--threads 100000` reached torch.set_num_threads and the
    process died of a segmentation fault. Run in a subprocess: a crash must not take pytest."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "hmu_export", "train-demo", "--out",
                           str(tmp_path / "o"), "--steps", "1", "--threads", "100000"],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(repo)))
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "exceeds this machine's" in err[0], err
    assert not (tmp_path / "o").exists()
