"""Task accuracy in the build (issue 17 item 4): exact match of every generation backend on the
task set, judged against an independent oracle (a plain greedy loop over the PyTorch model's
full forward, one example at a time, decoded with the `tokenizers` library directly), the noise
sweep, the int8 budget and the task set's bad input."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from hmu_export import demo
from hmu_export.core.config import ProfileConfig, TaskConfig, demo_config
from hmu_export.core.errors import InputError
from hmu_export.core.task_set import read_pairs

pytestmark = pytest.mark.skipif(not demo.CHECKPOINT.is_file(),
                                reason="the trained demo model is not in this checkout")

LIMIT = 48


def _oracle_correct(pairs: list[tuple[str, str]]) -> list[bool]:
    """Greedy decoding over the full (uncached) PyTorch forward, batch 1, mean path."""
    import torch
    from tokenizers import Tokenizer

    from hmu_export.model.weights import load_checkpoint

    model = load_checkpoint(demo.MODEL_DIR)
    tok = Tokenizer.from_file(str(demo.MODEL_DIR / "tokenizer.json"))
    out = []
    with torch.no_grad():
        for src, want in pairs:
            ids = torch.tensor([tok.encode(src).ids])
            mask = torch.ones_like(ids)
            noise = torch.zeros(1, ids.shape[1], model.cfg.latent_dim)
            tgt = [1]  # BOS
            for _ in range(31):
                logits = model(ids, mask, torch.tensor([tgt]), noise)
                nxt = int(logits[0, -1].argmax())
                if nxt == 2:  # EOS
                    break
                tgt.append(nxt)
            got = tok.decode(tgt[1:], skip_special_tokens=True)
            out.append(got.strip() == want)
    return out


@pytest.fixture(scope="module")
def task_build(tmp_path_factory):
    from hmu_export.build.pipeline import run_build

    root = tmp_path_factory.mktemp("task_build")
    pairs = read_pairs(demo.TEST_SET, LIMIT)
    # one deliberately wrong target: the accuracy must drop by exactly that example
    pairs[5] = (pairs[5][0], pairs[5][1] + " mil")
    task = root / "task.jsonl"
    task.write_text("".join(json.dumps({"source": s, "target": t}, ensure_ascii=False) + "\n"
                            for s, t in pairs), encoding="utf-8")
    # A small profile keeps the build quick. Its numeric grid has FP16 rows outside the FP16
    # relative budget on the trained model (random token ids; onnxruntime-fp16emu 8x10x9 rel
    # 0.034, torch-fp16 16x10x16 rel 0.067). Not an overflow and not fixed by any pin that is
    # not fitted to this one seed: near-tie attention positions where even FP32 backends differ
    # most (docs/fp16.md, issue 17 item 6 (b)). So FP16 stays off here; the default build's
    # FP16 rows (64 shapes, worst rel 0.019) and FP16 task row are checked in tests/test_cli.py.
    base = demo_config()
    cfg = replace(base, parity=replace(base.parity, fp16=False),
                  profile=ProfileConfig(batch=(1, 8, 16), src_len=(1, 10, 16),
                                        tgt_len=(1, 16, 32)),
                  task=TaskConfig(path=str(task), dev=str(demo.DEV_SET),
                                  noise_scales=(0.0, 2.0), noise_draws=3,
                                  noise_limit=16)).validate()
    outcome = run_build(cfg, root / "out", only=["checkpoint", "export", "optimize", "fp16",
                                                 "quantize", "parity"])
    assert outcome.ok, outcome.failure
    return outcome.out_dir, pairs


def test_the_demo_int8_is_static_calibrated_on_the_dev_split(task_build):
    """`[int8] mode = "auto"` with the demo's `[task] dev`: static QDQ int8, calibrated on the
    dev split (never the judged test set)."""
    out, _ = task_build
    q = json.loads((out / "manifest.json").read_text())["stages"]["quantize"]["details"]
    assert q["mode"] == "static" and "task.dev" in q["mode_reason"]
    assert q["calibration"]["source"] == str(demo.DEV_SET) and not q["calibration"]["random_feeds"]


def test_every_fp32_backend_solves_what_the_oracle_solves(task_build):
    out, pairs = task_build
    report = json.loads((out / "parity" / "task.json").read_text())
    oracle = _oracle_correct(pairs)
    assert not oracle[5]  # the tampered target cannot be matched
    rows = {r["backend"]: r for r in report["rows"]}
    assert {"torch", "onnxruntime", "onnxruntime-opt", "onnxruntime-int8",
            "onnxruntime-int4"} <= set(rows)  # (FP16: the default build's, tests/test_cli.py)
    for name in ("torch", "onnxruntime", "onnxruntime-opt"):
        assert rows[name]["correct"] == sum(oracle), name
        assert rows[name]["total"] == LIMIT
    # a trained model: the oracle itself gets (almost) every untampered example right
    assert sum(oracle) >= LIMIT - 3
    assert report["failures"] == []
    md = (out / "parity" / "task.md").read_text()
    assert "onnxruntime-int8" in md and "noise scale" in md
    assert (out / "parity" / "task_noise.png").stat().st_size > 1000
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"]["exact"]["torch"] == pytest.approx(sum(oracle) / LIMIT, abs=1e-6)


def test_the_noise_sweep_varies_outputs_only_with_noise(task_build):
    out, pairs = task_build
    report = json.loads((out / "parity" / "task.json").read_text())
    sweep = {n["scale"]: n for n in report["noise"]}
    assert sweep[0.0]["distinct"] == 1.0 and sweep[0.0]["draws"] == 1
    oracle = _oracle_correct(pairs[:16])
    assert sweep[0.0]["exact"] == pytest.approx(sum(oracle) / 16)
    assert sweep[2.0]["draws"] == 3 and 1.0 <= sweep[2.0]["distinct"] <= 3.0


def test_generate_text_spells_numbers_with_the_build_tokenizer(task_build, capsys):
    from hmu_export.commands.cli import main

    out, _ = task_build
    assert main(["generate", "--artifacts", str(out), "--text", "2026"]) == 0
    assert "dos mil veintiséis" in capsys.readouterr().out


def test_int8_over_its_budget_is_removed_and_fails_the_stage(tmp_path, monkeypatch):
    """The quantize stage's judgement on a report whose int8 row misses the budget (the real
    model meets it, so the miss is injected in the report the stage reads)."""
    from hmu_export.build.stages import quantize as stage
    from hmu_export.verify import task_accuracy as ta

    def fake_run(root, cfg, tok, make, *, backends, reference, noise):
        rep = ta.TaskReport("t.jsonl", 100, budget_points=cfg.int8.max_exact_match_drop,
                            reference=reference)
        rep.rows = [ta.TaskRow("onnxruntime", "fp32", 100, 100, 1.0, 1.0, 0.1),
                    ta.TaskRow("onnxruntime-int8", "int8", 99, 100, 0.99, 0.99, 0.1),
                    ta.TaskRow("onnxruntime-int4", "int4", 100, 100, 1.0, 1.0, 0.1)]
        return rep

    monkeypatch.setattr(ta, "run_task_accuracy", fake_run)
    monkeypatch.setattr("hmu_export.build.task_inputs.task_tokenizer", lambda ctx: object())
    monkeypatch.setattr("hmu_export.build.task_inputs.task_generators", lambda ctx: None)

    from hmu_export.core.layout import BuildLayout

    layout = BuildLayout(tmp_path)
    graphs = ["full", "encoder", "decoder"]
    for v in ("int8", "int4"):
        for g in graphs:
            layout.graph(g, v).write_bytes(b"x")

    class Ctx:
        cfg = demo_config()
        data: dict = {}
    Ctx.layout = layout
    details = {"graphs": {f"{g}.{v}.onnx": {} for g in ("model", "encoder", "decoder")
                          for v in ("int8", "int4")}}
    failures = stage._judge_on_task(Ctx, graphs, details)
    assert len(failures) == 1 and "onnxruntime-int8" in failures[0] and "1.00 points" in failures[0]
    assert not layout.graph("decoder", "int8").exists()
    assert layout.graph("decoder", "int4").exists()
    assert set(details["graphs"]) == {f"{g}.int4.onnx" for g in ("model", "encoder", "decoder")}


def test_report_failures_hold_fp32_to_the_reference_exactly():
    from hmu_export.verify.task_accuracy import TaskReport, TaskRow

    rep = TaskReport("t", 10, budget_points=0.5)
    rep.rows = [TaskRow("torch", "fp32", 10, 10, 1.0, 1.0, 0.1),
                TaskRow("onnxruntime", "fp32", 9, 10, 0.9, 0.9, 0.1),
                TaskRow("onnxruntime-fp16emu", "fp16", 9, 10, 0.9, 0.9, 0.1)]
    fails = rep.failures()
    assert len(fails) == 1 and fails[0].startswith("onnxruntime solves 9/10")


@pytest.mark.parametrize("line, words", [
    ("{not json", "not valid JSON"),
    ('{"source": "1"}', "expected"),
    ('{"source": "1", "target": "uno", "extra": 1}', "unknown key"),
    ('{"source": " ", "target": "uno"}', "source is empty"),
    ('[' * 100000 + ']' * 100000, "the line is longer than 65,536 bytes"),
])
def test_a_bad_task_line_is_one_error_naming_file_and_line(tmp_path, line, words):
    p = tmp_path / "t.jsonl"
    p.write_text('{"source": "1", "target": "uno"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(InputError) as exc:
        read_pairs(p)
    msg = str(exc.value)
    assert words in msg and "\n" not in msg
    assert f"{p}:2" in msg


def test_a_missing_task_set_and_an_unencodable_target_are_one_line(tmp_path):
    from hmu_export.core.config import BuildConfig
    from hmu_export.model.tokenizer import Tokenizer, load_hf_tokenizer
    from hmu_export.verify.task_accuracy import load_task

    with pytest.raises(InputError, match="task set not found"):
        read_pairs(tmp_path / "nope.jsonl")
    p = tmp_path / "t.jsonl"
    p.write_text('{"source": "1", "target": "uno"}\n{"source": "2", "target": "zwei"}\n',
                 encoding="utf-8")
    tok = Tokenizer(load_hf_tokenizer(demo.MODEL_DIR))
    cfg = replace(BuildConfig(), task=TaskConfig(path=str(p)))
    with pytest.raises(InputError, match=r"example 2: the tokenizer cannot encode the target "
                                         r"'zwei'"):
        load_task(cfg, tok)


def test_task_path_is_relative_to_the_toml(tmp_path, monkeypatch):
    from hmu_export.core.config import load_config

    (tmp_path / "sub").mkdir()
    toml = tmp_path / "sub" / "b.toml"
    toml.write_text('[task]\npath = "data/t.jsonl"\n')
    monkeypatch.chdir(tmp_path)
    assert load_config(toml).task.path == str(tmp_path / "sub" / "data" / "t.jsonl")


def test_no_config_builds_the_trained_demo():
    from hmu_export.core.config import load_config

    cfg = load_config(None)
    assert Path(cfg.model.checkpoint) == demo.CHECKPOINT
    assert Path(cfg.task.path) == demo.TEST_SET


def test_bench_task_counts_what_the_oracle_solves(task_build, tmp_path, capsys):
    """`bench --task` (real requests, each row until its EOS): our FP32 row solves exactly what
    the independent oracle solves; every row counts its tokens and time; a missing task file
    is one line."""
    from hmu_export.commands.cli import main

    out, pairs = task_build
    dest = tmp_path / "bench"
    assert main(["bench", "--artifacts", str(out), "--task", "--backends",
                 "onnxruntime,onnxruntime-int8", "--batches", "8", "--out", str(dest)]) == 0
    data = json.loads((dest / "task_bench.json").read_text())
    rows = {r["backend"]: r for r in data["rows"]}
    assert set(rows) == {"onnxruntime", "onnxruntime-int8"}
    assert rows["onnxruntime"]["correct"] == sum(_oracle_correct(pairs))
    assert rows["onnxruntime"]["total"] == len(pairs) == data["settings"]["examples"]
    for r in rows.values():
        # at least one token (EOS) per row, at most the generation limit
        assert len(pairs) <= r["tokens"] <= len(pairs) * data["settings"]["max_new_tokens"]
        assert r["seconds"] > 0 and r["hmu"] == "applied" and not r["peer"]
    assert "| onnxruntime-int8 | applied |" in (dest / "task_bench.md").read_text()
    capsys.readouterr()
    assert main(["bench", "--artifacts", str(out), "--task", str(tmp_path / "nope.jsonl"),
                 "--backends", "onnxruntime"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.jsonl" in err[0], err
    bad = tmp_path / "bad.jsonl"  # a target the tokenizer cannot encode: file and example
    bad.write_text('{"source": "1", "target": "uno"}\n{"source": "2", "target": "zwei"}\n',
                   encoding="utf-8")
    assert main(["bench", "--artifacts", str(out), "--task", str(bad), "--backends",
                 "onnxruntime"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl: example 2" in err[0] and "zwei" in err[0], err
