"""`finetune`: HMU-only training lowers the eval loss of a frozen base; nothing else moves."""
from __future__ import annotations

import json
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
    assert rc != 0 and err == ["error: --steps must be >= 1, got 0"]


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
