"""`finetune`: HMU-only training lowers the eval loss of a frozen base; nothing else moves."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from hmu_export.commands.cli import main
from hmu_export.core.config import config_from_dict
from hmu_export.train.finetune import FinetuneOptions, finetune
from hmu_export.model.hmu import HMU
from tests.conftest import SMALL

HMU_KEYS = {f"{m}.{p}" for m in ("vae.mu", "vae.logvar", "vae.decoder", "norm_input",
                                 "norm_latent", "gate_mlp.0", "fusion_proj.0", "fusion_proj.2")
            for p in ("weight", "bias")}


def _toml(path: Path, model: dict, profile: dict | None = None) -> Path:
    lines = ["[model]"] + [f"{k} = {json.dumps(v)}" for k, v in model.items()]
    if profile:
        lines += ["[profile]"] + [f"{k} = {json.dumps(v)}" for k, v in profile.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _task(path: Path, n: int, seed: int, lo: int = 3, hi: int = 12) -> Path:
    """tgt = src reversed, each id + 1, ids from a small range of the vocabulary."""
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            src = [r.randint(lo, hi) for _ in range(r.randint(3, 8))]
            f.write(json.dumps({"src": src, "tgt": [t + 1 for t in reversed(src)]}) + "\n")
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest, and the suite shares the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(_one_thread, tmp_path_factory):
    from hmu_export.model import sources

    tmp = tmp_path_factory.mktemp("finetune")
    cfg = config_from_dict(SMALL)
    base = sources.load(sources.resolve(cfg.model)).torch_module()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    res = finetune(cfg, _task(tmp / "train.jsonl", 256, 0), tmp / "hmu.safetensors",
                   eval_data=_task(tmp / "eval.jsonl", 64, 1),
                   options=FinetuneOptions(steps=100, lr=3e-3, batch_size=16, seed=0),
                   merge_into=tmp / "merged", progress=False)
    return res, before, tmp


def test_finetune_lowers_eval_loss(trained):
    res, _, _ = trained
    print(f"eval CE: original HMU {res.eval_before:.4f}, trained HMU {res.eval_after:.4f}")
    assert res.eval_after < res.eval_before - 0.5
    assert len(res.history) == 100
    log = [json.loads(line) for line in res.log.read_text().splitlines()]
    assert {"step", "loss", "ce", "kl"} <= set(log[0])
    assert log[-1]["eval"]["ce_original_hmu"] == pytest.approx(res.eval_before)
    assert log[-1]["eval"]["ce_trained_hmu"] == pytest.approx(res.eval_after)
    if res.plot is not None:
        assert res.plot.read_bytes()[:4] == b"\x89PNG"


def test_only_hmu_changes_and_output_keys(trained):
    from safetensors.torch import load_file

    from hmu_export.model.weights import read_state_dict

    res, before, _ = trained
    saved = load_file(str(res.out))
    assert set(saved) == HMU_KEYS
    merged = read_state_dict(res.merged)
    assert set(merged) == set(before)
    changed = set()
    for key, ref in before.items():
        if key.startswith("hmu."):
            assert torch.equal(merged[key], saved[key[4:]])
            changed |= {key} if not torch.equal(merged[key], ref) else set()
        else:
            assert torch.equal(merged[key], ref), f"base weight {key} changed"
    assert changed  # the HMU did learn
    # The saved HMU loads into an HMU of the model's sizes, and is a valid native checkpoint.
    HMU(SMALL["model"]["d_model"], SMALL["model"]["latent_dim"]).load_state_dict(saved)


def test_merged_checkpoint_builds_the_trained_model(trained):
    from dataclasses import replace

    from hmu_export.train.finetune import _batches, eval_ce
    from hmu_export.model import sources

    res, _, tmp = trained
    cfg = config_from_dict(SMALL)
    src = sources.load(replace(cfg.model, checkpoint=str(res.merged)))
    from hmu_export.train.finetune import read_examples
    ex = read_examples(tmp / "eval.jsonl", 61, 32)
    ce = eval_ce(src.module("full"), _batches(ex, 16, cfg.generation.bos_id, 0), 16)
    assert ce == pytest.approx(res.eval_after, abs=1e-5)


def test_cli_and_bad_data(tmp_path, capsys):
    conf = _toml(tmp_path / "c.toml", SMALL["model"], SMALL["profile"])
    data = _task(tmp_path / "train.jsonl", 8, 2)
    out = tmp_path / "o" / "hmu.safetensors"
    assert main(["finetune", "--config", str(conf), "--data", str(data), "--out", str(out),
                 "--steps", "3", "--batch-size", "4"]) == 0
    text = capsys.readouterr().out
    assert "fine-tuned" in text and out.is_file()
    assert (tmp_path / "o" / "hmu.log.jsonl").is_file()

    cases = {
        "json": ('{"src": [3, 4], "tgt": [5]}\n{"src": [3,\n', "2: not valid JSON"),
        "vocab": ('{"src": [3, 61], "tgt": [5]}\n', "1: src id 61 is outside the vocabulary"),
        "empty": ("\n\n", "holds no examples"),
        "emptyseq": ('{"src": [], "tgt": [5]}\n', "1: src is empty"),
        "long": (json.dumps({"src": [3] * 33, "tgt": [5]}) + "\n", "more than the model's max_len"),
        "text": ('{"src": "hello", "tgt": "world"}\n', "1: src is text, which needs a tokenizer"),
        "shape": ('[1, 2]\n', '1: expected an object'),
    }
    for name, (content, msg) in cases.items():
        bad = tmp_path / f"{name}.jsonl"
        bad.write_text(content)
        rc = main(["finetune", "--config", str(conf), "--data", str(bad), "--out", str(out),
                   "--steps", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc != 0 and len(err) == 1 and err[0].startswith("error: "), (name, err)
        assert msg in err[0], (name, err)
    rc = main(["finetune", "--config", str(conf), "--data", str(data), "--out", str(out),
               "--steps", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and err == ["error: --steps must be in [1, 10,000,000], got 0"]


def test_hf_t5_output_loads_as_hmu_checkpoint(tmp_path):
    pytest.importorskip("transformers")
    from dataclasses import replace

    from hmu_export.model import hf as H
    from tests.test_hf_source import _t5

    folder = tmp_path / "t5"
    _t5().save_pretrained(folder)
    conf = _toml(tmp_path / "c.toml", {"source": "hf", "path": str(folder), "seed": 5})
    r = random.Random(3)
    with open(tmp_path / "d.jsonl", "w") as f:
        for _ in range(32):
            src = [r.randint(3, 20) for _ in range(r.randint(3, 7))]
            f.write(json.dumps({"src": src, "tgt": src[::-1] + [1]}) + "\n")
    out = tmp_path / "hmu.safetensors"
    assert main(["finetune", "--config", str(conf), "--data", str(tmp_path / "d.jsonl"),
                 "--out", str(out), "--steps", "30", "--lr", "3e-3", "--batch-size", "8"]) == 0
    log = [json.loads(line) for line in (tmp_path / "hmu.log.jsonl").read_text().splitlines()]
    ev = log[-1]["eval"]
    print(f"hf t5 eval CE (train data): original {ev['ce_original_hmu']:.4f}, "
          f"trained {ev['ce_trained_hmu']:.4f}")
    assert ev["ce_trained_hmu"] < ev["ce_original_hmu"]
    cfg = H.resolve_config(replace(config_from_dict({"model": {"source": "hf",
                                                               "path": str(folder)}}).model,
                                   hmu_checkpoint=str(out)))
    src = H.load_source(cfg)
    assert src.hmu_trained
    from safetensors.torch import load_file
    saved = load_file(str(out))
    assert set(saved) == HMU_KEYS
    for k, v in src.model.hmu.state_dict().items():
        assert torch.equal(v, saved[k])


def test_hf_text_lines_with_a_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from hmu_export.train.finetune import _tokenizer, read_examples
    from tests.test_hf_source import _t5

    model = _t5()
    folder = tmp_path / "t5"
    model.save_pretrained(folder)
    words = ["<pad>", "</s>", "<unk>"] + [chr(ord("a") + i) for i in range(26)]
    words += [f"w{i}" for i in range(len(words), model.config.vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                         eos_token="</s>", unk_token="<unk>"
                                         ).save_pretrained(folder)
    data = tmp_path / "d.jsonl"
    data.write_text('{"src": "a b c", "tgt": "c b a"}\n{"src": "d e", "tgt": [5, 4, 1]}\n')
    cfg = config_from_dict({"model": {"source": "hf", "path": str(folder)}})
    assert read_examples(data, 96, 512, _tokenizer(cfg)) == [([3, 4, 5, 1], [5, 4, 3, 1]),
                                                             ([6, 7, 1], [5, 4, 1])]
    conf = _toml(tmp_path / "c.toml", {"source": "hf", "path": str(folder)})
    assert main(["finetune", "--config", str(conf), "--data", str(data),
                 "--out", str(tmp_path / "h.safetensors"), "--steps", "2"]) == 0


# ----------------------------------------------------------------- issues 19 / 21: hostile input

def _one_error(argv, capsys) -> str:
    """The one `error:` line of a failed run (progress lines may precede it on stderr)."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert rc != 0 and len(errors) == 1 and "Traceback" not in err, (rc, err)
    return errors[0]


def _outputs(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included) with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


@pytest.fixture
def first_run(tmp_path):
    """A finished finetune (weights, log, plot, merged checkpoint) to be kept or replaced."""
    conf = _toml(tmp_path / "c.toml", SMALL["model"], SMALL["profile"])
    data = _task(tmp_path / "train.jsonl", 8, 2)
    out = tmp_path / "o" / "hmu.safetensors"
    args = ["finetune", "--config", conf, "--data", data, "--out", out, "--steps", "2",
            "--batch-size", "4", "--merge-into", tmp_path / "o" / "merged"]
    assert main([str(a) for a in args]) == 0
    return args, tmp_path / "o", _outputs(tmp_path / "o")


def test_data_lines_are_read_with_a_bound(tmp_path, capsys, monkeypatch):
    from hmu_export.train import finetune as ft

    conf = _toml(tmp_path / "c.toml", SMALL["model"], SMALL["profile"])
    out = tmp_path / "hmu.safetensors"
    line = _one_error(["finetune", "--config", conf, "--data", "/dev/zero", "--out", out], capsys)
    assert "/dev/zero:1: the line is longer than 1,048,576 bytes" in line
    monkeypatch.setattr(ft, "MAX_LINE_BYTES", 64)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"src": [3, 4], "tgt": [5]}) + "\n"
                    + json.dumps({"src": [3] * 30, "tgt": [5]}) + "\n")
    assert ":2: the line is longer than 64 bytes" in _one_error(
        ["finetune", "--config", conf, "--data", long, "--out", out], capsys)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"src": [3], "tgt": [4]}\n\xff\xfe\n')
    assert ":2: not UTF-8" in _one_error(
        ["finetune", "--config", conf, "--data", bad, "--out", out], capsys)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: read as empty, never waited on
    assert "holds no examples" in _one_error(
        ["finetune", "--config", conf, "--data", fifo, "--out", out], capsys)
    assert not out.exists()


class _Tok:
    """A stand-in tokenizer: one id per character (what the rule is applied before)."""

    def __call__(self, text=None, text_target=None):
        t = text if text is not None else text_target
        return {"input_ids": [3 + (ord(c) % 20) for c in t] + [1]}


def test_source_text_follows_the_generate_text_rule(tmp_path):
    from hmu_export.core.errors import InputError
    from hmu_export.model.tokenizer import Tokenizer
    from hmu_export.train.finetune import read_examples

    cases = {"empty": ('{"src": "", "tgt": "b"}', "src text is empty"),
             "blank": ('{"src": " \\t ", "tgt": "b"}', "src text is empty"),
             "surrogate": ('{"src": "a\\ud800b", "tgt": "b"}', "lone surrogate"),
             "tgt surrogate": ('{"src": "a", "tgt": "\\udfff"}', "tgt text holds")}
    for name, (line, needle) in cases.items():
        path = tmp_path / "d.jsonl"
        path.write_text(line + "\n")
        with pytest.raises(InputError) as info:
            read_examples(path, 61, 32, _Tok())
        assert needle in str(info.value) and ":1:" in str(info.value), name
    # the same rule, word for word, as generate --text
    for text, needle in ((" \t ", "is empty"), ("a\ud800b", "lone surrogate")):
        with pytest.raises(InputError, match=needle):
            Tokenizer(_Tok()).encode([text])
    path.write_text('{"src": "ab", "tgt": ""}\n')  # an empty target text is a target (EOS)
    assert read_examples(path, 61, 32, _Tok()) == [(_Tok()("ab")["input_ids"], [1])]


def test_a_diverging_run_keeps_the_old_outputs(first_run, capsys):
    args, folder, before = first_run
    for lr in ("1e30", "1e38"):
        line = _one_error(args[:-2] + ["--lr", lr, "--steps", "3", "--merge-into",
                                       folder / "merged"], capsys)
        assert "training diverged" in line and "non-finite" in line and "kept" in line
        assert _outputs(folder) == before  # all old, no staging or temporary file left


def test_a_failure_between_outputs_leaves_all_old(first_run, capsys, monkeypatch):
    import errno

    from hmu_export.train import finetune as ft

    args, folder, before = first_run

    def full_disk(*a, **k):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ft, "_plot", full_disk)  # after the weights and the log were staged
    line = _one_error(args, capsys)
    assert "No space left on device" in line and "earlier outputs are kept" in line
    assert _outputs(folder) == before


def test_an_unwritable_log_path_is_refused_before_training(first_run, capsys):
    args, folder, before = first_run
    (folder / "hmu.log.jsonl").unlink()
    (folder / "hmu.log.jsonl").mkdir()
    line = _one_error(args, capsys)
    assert "hmu.log.jsonl" in line and "it is a folder" in line
    before.pop("hmu.log.jsonl")
    assert _outputs(folder) == before


def test_without_a_plot_the_old_plot_goes_with_the_old_weights(first_run, monkeypatch):
    from hmu_export.train import finetune as ft

    args, folder, before = first_run
    monkeypatch.setattr(ft, "_plot", lambda *a, **k: None)  # no matplotlib
    assert main([str(a) for a in args]) == 0
    after = _outputs(folder)
    assert "hmu.loss.png" not in after and after["hmu.safetensors"] != before["hmu.safetensors"]


KILL = """
import os, sys
sys.path.insert(0, {root!r})
calls = []
real = os.replace
def replace(a, b):
    if not str(b).endswith(".commit.json"):
        calls.append(b)
    if len(calls) == 2:  # killed after the first output was put in place, before the second
        os._exit(9)
    return real(a, b)
os.replace = replace
from hmu_export.commands.cli import main
sys.exit(main({argv!r}))
"""


def test_a_kill_during_the_commit_is_finished_by_the_next_run(first_run, tmp_path, capsys):
    import subprocess
    import sys

    from hmu_export.core.errors import CheckpointError
    from hmu_export.model.weights import read_state_dict

    args, folder, before = first_run
    argv = [str(a) for a in args[:-2]] + ["--steps", "3"]  # no --merge-into this time
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", KILL.format(root=root, argv=argv)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 9, proc.stderr
    journal = folder / ".hmu.safetensors.commit.json"
    assert journal.is_file()  # the commit had started: mixed until it is finished
    mixed = _outputs(folder)
    assert mixed["hmu.safetensors"] != before["hmu.safetensors"]
    assert mixed["hmu.log.jsonl"] == before["hmu.log.jsonl"]
    with pytest.raises(CheckpointError, match="interrupted"):
        read_state_dict(folder / "hmu.safetensors")
    # the next run (here one refused for its data) finishes the commit first
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[1]\n")
    _one_error(argv[:3] + ["--data", str(bad)] + argv[5:], capsys)
    after = _outputs(folder)
    assert not journal.exists() and not any(".staging" in k for k in after)
    log = [json.loads(x) for x in after["hmu.log.jsonl"].decode().splitlines()]
    assert log[-1]["steps"] == 3 and len(log) == 4  # the killed run's log, complete
    assert after["hmu.safetensors"] != before["hmu.safetensors"]
    assert after["hmu.loss.png"] != before["hmu.loss.png"]
    read_state_dict(folder / "hmu.safetensors")  # readable again
