"""Token rules (generation_config.json options that change tokens) against Transformers itself.

Oracles: Transformers' own LogitsProcessor classes on the same scores and prefixes, and
Transformers' ``generate`` reading the same generation_config.json, with the HMU applied.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.generation import logits_process as LP  # noqa: E402

import test_hf_source as HF  # noqa: E402  (tiny model builders and the HMU-applied memory)

from hmu_export.core.config import BuildConfig, ProfileConfig, config_from_dict  # noqa: E402
from hmu_export.core.errors import ConfigError, InputError  # noqa: E402
from hmu_export.shipped.token_rules import TokenRules  # noqa: E402

EOS = 2


def _hf_processors(rules: dict, max_len: int) -> LP.LogitsProcessorList:
    """The processors Transformers builds for these options, in its order (prompt length 1)."""
    procs = []
    if rules.get("repetition_penalty", 1.0) != 1.0:
        procs.append(LP.RepetitionPenaltyLogitsProcessor(rules["repetition_penalty"]))
    if rules.get("no_repeat_ngram_size", 0):
        procs.append(LP.NoRepeatNGramLogitsProcessor(rules["no_repeat_ngram_size"]))
    if rules.get("bad_words_ids"):
        procs.append(LP.NoBadWordsLogitsProcessor(rules["bad_words_ids"], EOS))
    if rules.get("min_new_tokens", 0):
        procs.append(LP.MinNewTokensLengthLogitsProcessor(1, rules["min_new_tokens"], EOS))
    if rules.get("forced_bos_token_id") is not None:
        procs.append(LP.ForcedBOSTokenLogitsProcessor(rules["forced_bos_token_id"]))
    if rules.get("forced_eos_token_id") is not None:
        procs.append(LP.ForcedEOSTokenLogitsProcessor(max_len, rules["forced_eos_token_id"]))
    if rules.get("suppress_tokens"):
        procs.append(LP.SuppressTokensLogitsProcessor(rules["suppress_tokens"]))
    if rules.get("begin_suppress_tokens"):
        begin = 2 if rules.get("forced_bos_token_id") is not None else 1
        procs.append(LP.SuppressTokensAtBeginLogitsProcessor(rules["begin_suppress_tokens"],
                                                              begin))
    return LP.LogitsProcessorList(procs)


CASES = [
    {"repetition_penalty": 1.7},
    {"no_repeat_ngram_size": 2},
    {"no_repeat_ngram_size": 3},
    {"bad_words_ids": [[5], [7, 8], [3, 4, 6], [EOS]]},
    {"min_new_tokens": 4},
    {"forced_bos_token_id": 9},
    {"forced_eos_token_id": 11},
    {"suppress_tokens": [1, 6]},
    {"begin_suppress_tokens": [3, 12]},
    {"forced_bos_token_id": 9, "begin_suppress_tokens": [3, 12]},
    {"repetition_penalty": 0.8, "no_repeat_ngram_size": 2, "bad_words_ids": [[4], [6, 7]],
     "min_new_tokens": 2, "forced_eos_token_id": 5, "suppress_tokens": [13]},
]
OURS = {"forced_bos_token_id": "forced_bos_id", "forced_eos_token_id": "forced_eos_id"}


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(c))
def test_rules_equal_transformers_processors(case):
    rng = np.random.default_rng(len(json.dumps(case)))
    vocab, max_new = 16, 10
    rules = TokenRules.from_mapping({OURS.get(k, k): v for k, v in case.items()})
    hit = 0
    for cur in range(1, max_new + 1):  # every step: start token + cur - 1 generated
        prefixes = rng.integers(3, 6, size=(5, cur))  # a small alphabet: repeats, n-grams
        prefixes[:, 0] = 0  # the start token
        if cur >= 3:
            prefixes[0, -2:] = [7, 7]  # bad-word and n-gram prefixes actually occur
            prefixes[1, -2:] = [3, 4]
        scores = rng.standard_normal((5, vocab)) * 3
        want = _hf_processors(case, max_new + 1)(torch.from_numpy(prefixes),
                                                  torch.from_numpy(scores.copy())).numpy()
        got = rules.apply(scores.copy(), prefixes.tolist(), max_new=max_new, eos_ids=[EOS])
        np.testing.assert_array_equal(got, want)
        hit += int((got != scores).any())
    assert hit, "the rule never changed a score: the case tests nothing"


def test_neutral_rules_change_nothing_and_bad_rules_are_named():
    scores = np.arange(12.0).reshape(2, 6)
    assert not TokenRules().active
    assert TokenRules().apply(scores.copy(), [[0], [0]], max_new=3, eos_ids=[2]).tolist() == \
        scores.tolist()
    problems = TokenRules(bad_words_ids=((4, 99),), forced_eos_id=7).problems(vocab_size=6)
    assert any("99" in p for p in problems) and any("forced_eos_id 7" in p for p in problems)
    with pytest.raises(ConfigError, match="generation.repetition_penalty"):
        config_from_dict({"generation": {"repetition_penalty": 0.0}})
    with pytest.raises(ConfigError, match="outside"):
        config_from_dict({"generation": {"suppress_tokens": [10**6]}})


# ----------------------------------------------------------------------------- end to end
OPTIONS = {
    "greedy": {"no_repeat_ngram_size": 2, "repetition_penalty": 1.4, "bad_words_ids": [[5], [7, 8]],
               "forced_bos_token_id": 4, "forced_eos_token_id": EOS, "min_new_tokens": 3,
               "suppress_tokens": [9], "begin_suppress_tokens": [10]},
    "beam": {"num_beams": 3, "length_penalty": 0.7, "no_repeat_ngram_size": 2, "min_length": 4,
             "repetition_penalty": 1.2, "bad_words_ids": [[6]]},
}


@pytest.fixture(scope="module")
def bart_folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("bart-rules")
    HF._bart().save_pretrained(base / "plain")
    out = {"plain": base / "plain"}
    for name, opts in OPTIONS.items():
        folder = base / name
        shutil.copytree(base / "plain", folder)
        path = folder / "generation_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **opts}))
        out[name] = folder
    return out


def _generator(folder):
    from hmu_export.backends.pytorch import TorchStepBackend
    from hmu_export.generate.stepper import CachedStepper
    from hmu_export.generate.generator import Generator
    from hmu_export.model import hf as H
    from hmu_export.build.preflight import model_generation

    src = H.load_source(H.resolve_config(HF.ModelConfig(source="hf", path=str(folder))))
    cfg = BuildConfig(model=src.cfg, profile=ProfileConfig(batch=(1, 4, 12), src_len=(1, 8, 16),
                                                           tgt_len=(1, 8, 16)))
    cfg = replace(cfg, generation=model_generation(cfg, src))
    return src, Generator(CachedStepper(TorchStepBackend(src)), cfg), cfg


def _hf_generate(src, x: dict, max_new: int) -> list[list[int]]:
    """Transformers' generate with the folder's own generation_config (HMU applied)."""
    from transformers.modeling_outputs import BaseModelOutput
    with torch.no_grad():
        mem = BaseModelOutput(last_hidden_state=HF._memory(src, x))
        out = src.hf_model.generate(encoder_outputs=mem, attention_mask=x["src_mask"],
                                    max_new_tokens=max_new)
    eos = src.hf_model.generation_config.eos_token_id
    return [row[:row.index(eos) + 1] if eos in row else row for row in out[:, 1:].tolist()]


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_generate_honours_generation_config_like_transformers(bart_folders, name):
    src, gen, cfg = _generator(bart_folders[name])
    _, plain, _ = _generator(bart_folders["plain"])
    assert cfg.generation.strategy == ("beam" if name == "beam" else "greedy")
    changed = False
    for b, seed in ((2, 1), (3, 2)):
        x = HF._batch(src, b=b, ls=8, seed=seed, noise_scale=0.0)
        rows = [r[:int(m.sum())] for r, m in zip(x["src_ids"].tolist(), x["src_mask"])]
        want = _hf_generate(src, x, 10)
        assert gen.generate(rows, max_new_tokens=10).sequences == want
        changed |= plain.generate(rows, max_new_tokens=10,
                                  strategy=cfg.generation.strategy).sequences != want
    assert changed, "the options never changed a token: the test would pass without them"


def test_request_options_override_the_folder(bart_folders):
    _, gen, _ = _generator(bart_folders["greedy"])
    rows = [[5, 6, 7, 8]]
    forced = gen.generate(rows, max_new_tokens=4).sequences
    assert forced[0][0] == 4  # forced_bos_token_id
    free = gen.generate(rows, max_new_tokens=4, rules=TokenRules()).sequences
    assert free != forced
    with pytest.raises(InputError, match="outside"):
        gen.generate(rows, max_new_tokens=4, rules=TokenRules(suppress_tokens=(500,)))


def test_unimplemented_options_are_refused_before_building(bart_folders, tmp_path):
    from hmu_export.build.preflight import preflight

    folder = tmp_path / "div"
    shutil.copytree(bart_folders["plain"], folder)
    path = folder / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_beams": 4,
                                "num_beam_groups": 2, "diversity_penalty": 0.5}))
    cfg = config_from_dict({"model": {"source": "hf", "path": str(folder)},
                            "profile": {"batch": [1, 2, 4], "src_len": [1, 8, 16],
                                        "tgt_len": [1, 8, 16]}})
    with pytest.raises(ConfigError) as info:
        preflight(cfg, tmp_path / "out")
    msg = str(info.value)
    assert "\n" not in msg and "diversity_penalty = 0.5" in msg and "split_graphs" in msg
    assert not (tmp_path / "out").exists()
    off = config_from_dict({**cfg.to_dict(), "generation": {"split_graphs": False}})
    preflight(off, tmp_path / "out")  # the full graph alone builds


@pytest.mark.parametrize("name", ["t5", "bart", "marian"])
def test_beam_search_equals_transformers_generate(name, tmp_path_factory):
    """Plain beam search (no token rules), each family, a ragged batch, length penalties below
    and above 1: Transformers' generate with the HMU applied is the oracle."""
    from transformers.modeling_outputs import BaseModelOutput

    folder = tmp_path_factory.mktemp(f"beam-{name}")
    HF.BUILDERS[name]().save_pretrained(folder)
    src, gen, cfg = _generator(folder)
    eos = cfg.generation.eos_id
    x = HF._batch(src, b=3, ls=8, seed=3, noise_scale=0.0)
    rows = [r[:int(m.sum())] for r, m in zip(x["src_ids"].tolist(), x["src_mask"])]
    for lp in (0.5, 2.0):
        with torch.no_grad():
            mem = BaseModelOutput(last_hidden_state=HF._memory(src, x))
            out = src.hf_model.generate(encoder_outputs=mem, attention_mask=x["src_mask"],
                                        max_new_tokens=10, num_beams=3, length_penalty=lp,
                                        early_stopping=False, do_sample=False)
        want = [r[:r.index(eos) + 1] if eos in r else r for r in out[:, 1:].tolist()]
        got = gen.generate(rows, max_new_tokens=10, strategy="beam", num_beams=3,
                           length_penalty=lp).sequences
        assert got == want, (lp, got, want)


# ----------------------------------------------------------------------------- issues 19 / 21
def _folder_with(bart_folders, tmp_path, **options):
    folder = tmp_path / "f"
    shutil.copytree(bart_folders["plain"], folder)
    path = folder / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **options}))
    return folder


def _preflight(folder, tmp_path):
    from hmu_export.build.preflight import preflight

    cfg = config_from_dict({"model": {"source": "hf", "path": str(folder)},
                            "profile": {"batch": [1, 2, 4], "src_len": [1, 8, 16],
                                        "tgt_len": [1, 8, 16]}})
    return preflight(cfg, tmp_path / "out")


@pytest.mark.parametrize("options,words", [
    ({"suppress_tokens": "abc"}, "suppress_tokens must be a list, got str"),
    ({"bad_words_ids": "oops"}, "bad_words_ids must be a list, got str"),
    ({"bad_words_ids": [["x"]]}, "bad_words_ids[0][0] must be an integer, got 'x'"),
    ({"begin_suppress_tokens": [1.5]}, "begin_suppress_tokens[0] must be an integer"),
    ({"suppress_tokens": [500]}, "suppress_tokens holds token id 500, outside [0, 100)"),
    ({"bad_words_ids": [[5, -3]]}, "bad_words_ids holds token id -3, outside [0, 100)"),
    ({"num_beams": "x"}, "num_beams must be an integer, got 'x'"),
    ({"num_beams": 3, "length_penalty": 400}, "length_penalty must be in [-10, 10], got 400"),
    ({"num_beams": 3, "length_penalty": 1e308}, "length_penalty must be in [-10, 10]"),
    ({"do_sample": True, "temperature": 1e-310}, "temperature must be in [0.001, 1000]"),
    ({"repetition_penalty": "high"}, "repetition_penalty must be a number"),
    ({"decoder_start_token_id": 500}, "decoder_start_token_id 500 is outside the vocabulary"),
    ({"eos_token_id": "2"}, "eos_token_id must be a token id (an integer)"),
    ({"max_length": 1}, "max_length 1 leaves no token to generate"),
    ({"num_beams": 8}, "num_beams 8 exceeds the profile's batch max (4)"),
    ({"eos_token_id": [2, 77]}, "eos_token_id = [2, 77]"),
])
def test_bad_generation_config_is_one_config_error_naming_the_key(bart_folders, tmp_path,
                                                                  options, words):
    """generation_config.json values of the wrong type, outside the vocabulary or the request
    schema's ranges were ValueErrors (or built "ok" and failed every generate): one ConfigError
    naming the key, before the build writes anything."""
    folder = _folder_with(bart_folders, tmp_path, **options)
    with pytest.raises(ConfigError) as info:
        _preflight(folder, tmp_path)
    msg = str(info.value)
    assert words in msg and "\n" not in msg, msg
    assert "generation_config.json" in msg or "generation settings" in msg, msg
    assert not (tmp_path / "out").exists()


def test_max_length_follows_transformers(bart_folders, tmp_path):
    """max_length counts the decoder start token of an encoder-decoder model: max_length 5 is 4
    new tokens in Transformers (it gave 8 here); max_new_tokens, when set, wins."""
    folder = _folder_with(bart_folders, tmp_path, max_length=5)
    src, gen, cfg = _generator(folder)
    assert cfg.generation.max_new_tokens == 4
    x = HF._batch(src, b=2, ls=8, seed=4, noise_scale=0.0)
    rows = [r[:int(m.sum())] for r, m in zip(x["src_ids"].tolist(), x["src_mask"])]
    from transformers.modeling_outputs import BaseModelOutput
    with torch.no_grad():  # Transformers' generate with the folder's own length limit
        mem = BaseModelOutput(last_hidden_state=HF._memory(src, x))
        out = src.hf_model.generate(encoder_outputs=mem, attention_mask=x["src_mask"])
    want = [r[:r.index(EOS) + 1] if EOS in r else r for r in out[:, 1:].tolist()]
    assert max(len(r) for r in want) == 4
    assert gen.generate(rows).sequences == want
    both = _folder_with(bart_folders, tmp_path / "b", max_length=5, max_new_tokens=6)
    assert _generator(both)[2].generation.max_new_tokens == 6
    with pytest.raises(ConfigError, match="max_new_tokens must be in \\[1, profile.tgt_len "
                                          "max = 16\\], got 19 .*max_new_tokens = 19"):
        _preflight(_folder_with(bart_folders, tmp_path / "c", max_length=20), tmp_path / "c")


def test_generation_toml_meets_the_request_schema():
    base = {"profile": {"batch": [1, 2, 4], "src_len": [1, 8, 16], "tgt_len": [1, 8, 16]}}
    for gen, words in (({"length_penalty": 400.0}, "generation.length_penalty must be in"),
                       ({"temperature": 1e-310}, "generation.temperature must be in"),
                       ({"noise_scale": 1e39}, "generation.noise_scale must be in"),
                       ({"strategy": "beam", "num_beams": 8},
                        "generation.num_beams 8 exceeds the profile's batch max (4)"),
                       ({"top_k": -1}, "generation.top_k must be in"),
                       ({"suppress_tokens": [512]}, "generation.suppress_tokens holds token id "
                                                    "512")):
        with pytest.raises(ConfigError) as info:
            config_from_dict({**base, "generation": gen})
        assert words in str(info.value), str(info.value)
    config_from_dict({**base, "generation": {"num_beams": 8}})  # greedy: beams unused
