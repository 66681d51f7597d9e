"""The generation loop: strategies, per-row EOS, validation, and every backend's tokens.

Oracles written here, independently of hmu_export.generate.generator: a plain greedy loop over the full
model's forward (one row at a time, no padding, no cache), and an exhaustive search over every
sequence of a tiny vocabulary for beam search.
"""
from __future__ import annotations

import itertools
import shutil
import warnings

import numpy as np
import pytest
import torch

from conftest import SMALL
from hmu_export.core.config import config_from_dict
from hmu_export.core.errors import BackendUnavailable, HMUExportError, InputError
from hmu_export.generate.stepper import CacheSpec
from hmu_export.generate.generator import GenerationOptions, Generator, log_softmax, sample_tokens
from hmu_export.model import build_model
from hmu_export.model.native import NativeSource

TWO_LAYER = {**SMALL, "model": {**SMALL["model"], "n_decoder_layers": 2, "name": "hmu-tiny-2"},
             "profile": {"batch": [1, 2, 8], "src_len": [1, 8, 16], "tgt_len": [1, 4, 12]}}
ROWS = [[5, 17, 9], [4, 4], [7, 8, 9, 10, 11, 12, 13, 3]]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and spinning threads crawl on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

@pytest.fixture(scope="module")
def tiny():
    cfg = config_from_dict(TWO_LAYER)
    return cfg, NativeSource(cfg.model, build_model(cfg.model)).eval()


def _torch(tiny, nocache: bool = False) -> Generator:
    from hmu_export.backends.pytorch import TorchNoCacheStepper, TorchStepBackend

    cfg, source = tiny
    return Generator(TorchNoCacheStepper(source) if nocache else TorchStepBackend(source), cfg)


def reference_greedy(model, cfg, row: list[int], max_new: int, eos: int, bos: int,
                     noise_scale: float = 0.0, noise_seed: int = 0) -> list[int]:
    """Greedy over the full model's forward: argmax of the last position, append, repeat."""
    src = torch.tensor([row])
    mask = torch.ones_like(src)
    noise = torch.zeros(1, len(row), cfg.model.latent_dim)
    tgt, out = [bos], []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(src, mask, torch.tensor([tgt]), noise)
            tok = int(logits[0, -1].argmax())
            out.append(tok)
            if tok == eos:
                break
            tgt.append(tok)
    return out


# --------------------------------------------------------------------------- greedy
def test_greedy_equals_full_model_loop(tiny):
    cfg, source = tiny
    gen = _torch(tiny)
    res = gen.generate(ROWS, max_new_tokens=10)
    for row, seq in zip(ROWS, res.sequences):
        assert seq == reference_greedy(source.model, cfg, row, 10, cfg.generation.eos_id,
                                       cfg.generation.bos_id)
    assert res.steps == 10 and len(res.token_latencies_s) == 9 and res.ttft_s > 0
    assert res.tokens_per_s > 0 and res.new_tokens == 30
    assert res.to_dict()["sequences"] == res.sequences


def test_greedy_batch_1(tiny):
    cfg, source = tiny
    res = _torch(tiny).generate([ROWS[2]], max_new_tokens=12)
    assert res.sequences[0] == reference_greedy(source.model, cfg, ROWS[2], 12, 2, 1)


def test_per_row_eos(tiny):
    """Rows stop at their own EOS (kept), nothing after; others keep going."""
    cfg, source = tiny
    gen = _torch(tiny)
    free = gen.generate(ROWS, max_new_tokens=10, eos_id=0)  # pad id: never produced here
    # pick as EOS a token row 0 produces early but that some row does not produce at all
    counts = {t: sum(t in s for s in free.sequences) for s in free.sequences for t in s}
    eos = next((t for t in free.sequences[0] if counts[t] < 3), free.sequences[0][1])
    res = gen.generate(ROWS, max_new_tokens=10, eos_id=eos)
    lengths = set()
    for row, full, seq in zip(ROWS, free.sequences, res.sequences):
        want = reference_greedy(source.model, cfg, row, 10, eos, 1)
        assert seq == want
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert seq == full[:cut]
        assert eos not in seq[:-1]
        lengths.add(len(seq))
    assert len(lengths) > 1, "expected ragged outputs"
    nocache = _torch(tiny, nocache=True).generate(ROWS, max_new_tokens=10, eos_id=eos)
    assert nocache.sequences == res.sequences


def test_cached_and_nocache_agree_with_noise(tiny):
    """Noise drawn once per request: the cached and the full-prefix loops see the same sample."""
    a = _torch(tiny).generate(ROWS, max_new_tokens=8, noise_scale=1.5, noise_seed=4)
    b = _torch(tiny, nocache=True).generate(ROWS, max_new_tokens=8, noise_scale=1.5,
                                            noise_seed=4)
    assert a.sequences == b.sequences
    zero = _torch(tiny).generate(ROWS, max_new_tokens=8)
    assert zero.sequences != a.sequences  # noise reaches the decoder


# --------------------------------------------------------------------------- sampling
def test_sampling(tiny):
    gen = _torch(tiny)
    greedy = gen.generate(ROWS, max_new_tokens=8).sequences
    assert gen.generate(ROWS, max_new_tokens=8, strategy="sample", top_k=1,
                        temperature=3.0, seed=5).sequences == greedy
    kw = dict(max_new_tokens=8, strategy="sample", temperature=2.0, top_p=0.95)
    a = gen.generate(ROWS, seed=11, **kw).sequences
    assert gen.generate(ROWS, seed=11, **kw).sequences == a
    assert _torch(tiny, nocache=True).generate(ROWS, seed=11, **kw).sequences == a
    assert any(gen.generate(ROWS, seed=s, **kw).sequences != a for s in (12, 13, 14))


def test_sample_tokens_distribution():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.2]] * 40000))
    freq = np.bincount(sample_tokens(logits, rng), minlength=3) / 40000
    assert np.abs(freq - [0.5, 0.3, 0.2]).max() < 0.01
    # nucleus 0.6 keeps the two most likely tokens (0.5 before the second < 0.6)
    freq = np.bincount(sample_tokens(logits, rng, top_p=0.6), minlength=3) / 40000
    assert freq[2] == 0 and abs(freq[0] - 0.625) < 0.01
    freq = np.bincount(sample_tokens(logits, rng, top_k=2), minlength=3) / 40000
    assert freq[2] == 0 and abs(freq[0] - 0.625) < 0.01
    # temperature -> 0 is greedy; ties go to the first index like argmax
    tie = np.array([[1.0, 3.0, 3.0, 0.0]])
    assert sample_tokens(tie, rng, top_k=1)[0] == 1 == tie.argmax()


# --------------------------------------------------------------------------- beam search
def test_beam_one_equals_greedy(tiny):
    gen = _torch(tiny)
    greedy = gen.generate(ROWS, max_new_tokens=8).sequences
    assert gen.generate(ROWS, max_new_tokens=8, strategy="beam", num_beams=1).sequences == greedy


def test_beam_on_model_matches_nocache(tiny):
    kw = dict(max_new_tokens=6, strategy="beam", num_beams=3, eos_id=5)
    a = _torch(tiny).generate(ROWS[:2], **kw)
    b = _torch(tiny, nocache=True).generate(ROWS[:2], **kw)
    assert a.sequences == b.sequences


class TableBackend:
    """A fake step backend over a tiny vocabulary: the logits are a seeded function of the
    source row and the whole prefix, and the prefix lives only in the KV cache (so a beam
    reorder that forgot the cache would change the scores)."""

    name = "table"

    def __init__(self, vocab: int, seed: int = 0, scale: float = 1.5) -> None:
        self.vocab, self.seed, self.scale = vocab, seed, scale
        self.calls = 0

    def cache_spec(self) -> CacheSpec:
        return CacheSpec(layers=1, heads=1, head_dim=1, latent_dim=2)

    def logits(self, src_key: int, prefix: tuple[int, ...]) -> np.ndarray:
        rng = np.random.default_rng([self.seed, src_key, len(prefix), *prefix])
        return rng.standard_normal(self.vocab) * self.scale

    def encode(self, feeds):
        key = (feeds["src_ids"] * feeds["src_mask"]).sum(axis=1).astype(np.float32)
        cross = np.broadcast_to(key[:, None, None, None], (len(key), 1, 1, 1)).copy()
        return {"memory": np.zeros((len(key), 1, 1), np.float32), "cross_key.0": cross,
                "cross_value.0": cross}

    def decode(self, feeds):
        self.calls += 1
        past = feeds["past_key.0"]
        new = feeds["tgt_ids"].astype(np.float32)[:, None, :, None]
        hist = np.concatenate([past, new], axis=2)
        b, n = feeds["tgt_ids"].shape
        logits = np.zeros((b, n, self.vocab), np.float32)
        for r in range(b):
            key = int(feeds["cross_key.0"][r, 0, 0, 0])
            toks = tuple(int(t) for t in hist[r, 0, :, 0])
            for j in range(n):
                logits[r, j] = self.logits(key, toks[:past.shape[2] + j + 1])
        return {"logits": logits, "present_key.0": hist, "present_value.0": hist}


def exhaustive_best(backend: TableBackend, src_key: int, bos: int, eos: int, max_new: int,
                    lp: float) -> tuple[list[int], float]:
    """Every sequence that ends at EOS or at max_new tokens; best sum log-prob / len**lp."""
    best: tuple[list[int], float] = ([], -np.inf)
    for n in range(1, max_new + 1):
        for seq in itertools.product(range(backend.vocab), repeat=n):
            if eos in seq[:-1] or (n < max_new and seq[-1] != eos):
                continue
            total, prefix = 0.0, (bos,)
            for tok in seq:
                total += float(log_softmax(backend.logits(src_key, prefix)
                                           .astype(np.float32)[None])[0, tok])
                prefix += (tok,)
            score = total / n ** lp
            if score > best[1] + 1e-12:
                best = (list(seq), score)
    return best


def _table_cfg(vocab: int):
    return config_from_dict({"model": {**SMALL["model"], "vocab_size": vocab},
                             "profile": {"batch": [1, 2, 64], "src_len": [1, 4, 8],
                                         "tgt_len": [1, 4, 8]}})


@pytest.mark.parametrize("lp", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_finds_exhaustive_best(lp, seed):
    vocab, max_new = 4, 4
    cfg = _table_cfg(vocab)
    backend = TableBackend(vocab, seed=seed)
    rows = [[3, 1], [2, 3, 3]]
    # (vocab-1)**(max_new-1) = 27 live prefixes at most: 27 beams keep every one of them
    res = Generator(backend, cfg).generate(rows, strategy="beam", num_beams=27,
                                           max_new_tokens=max_new, length_penalty=lp)
    for row, seq in zip(rows, res.sequences):
        want, _ = exhaustive_best(backend, sum(row), 1, 2, max_new, lp)
        assert seq == want
        assert 2 not in seq[:-1] and len(seq) <= max_new


def test_beam_search_small_k_and_early_stopping():
    vocab, max_new = 6, 4
    cfg = _table_cfg(vocab)
    backend = TableBackend(vocab, seed=3, scale=2.5)
    gen = Generator(backend, cfg)
    rows = [[3, 1], [2, 5]]
    calls = {}
    for early in (False, True):
        backend.calls = 0
        res = gen.generate(rows, strategy="beam", num_beams=3, max_new_tokens=max_new,
                           early_stopping=early, length_penalty=1.0)
        calls[early] = backend.calls
        for seq in res.sequences:
            assert seq and len(seq) <= max_new and 2 not in seq[:-1]
    assert calls[True] <= calls[False]


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("src,kw,match", [
    ([[5, 61]], {}, "outside"),
    ([[5, -1]], {}, "outside"),
    ([[5], []], {}, "empty"),
    ([], {}, "batch"),
    ([[5]] * 9, {}, "batch"),
    ([list(range(3, 20))], {}, "source length"),
    ([[5]], {"max_new_tokens": 13}, "max_new_tokens"),
    ([[5]], {"max_new_tokens": 0}, "max_new_tokens"),
    ([[5]], {"strategy": "nucleus"}, "strategy"),
    ([[5]], {"strategy": "sample", "temperature": 0.0}, "temperature"),
    ([[5]], {"top_p": 0.0}, "top_p"),
    ([[5]], {"num_beams": 0}, "num_beams"),
    ([[5]] * 3, {"strategy": "beam", "num_beams": 3}, "beams"),
    ([[5]], {"noise_scale": -1.0}, "noise_scale"),
    ([[5, "a"]], {}, "non-integer"),
    ("hello", {}, "list"),
])
def test_bad_requests_are_one_line_input_errors(tiny, src, kw, match):
    with pytest.raises(InputError, match=match) as info:
        _torch(tiny).generate(src, **kw)
    assert "\n" not in str(info.value)


def test_options_defaults_come_from_the_build(tiny):
    cfg, _ = tiny
    opts = _torch(tiny).options()
    assert opts.max_new_tokens == cfg.generation.new_tokens(cfg.profile)
    assert (opts.bos_id, opts.eos_id, opts.noise_scale) == (1, 2, 0.0)
    assert isinstance(opts, GenerationOptions)


# --------------------------------------------------------------------------- ONNX backends
@pytest.fixture(scope="module")
def tiny_build(tiny, tmp_path_factory):
    """A build folder with model.onnx, encoder.onnx, decoder.onnx and the checkpoint."""
    from hmu_export.export.onnx_export import export_graph
    from hmu_export.model import save_checkpoint

    cfg, source = tiny
    root = tmp_path_factory.mktemp("gen_build") / "hmu-tiny-2"
    save_checkpoint(source.model, root / "checkpoint")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for graph, name in (("full", "model.onnx"), ("encoder", "encoder.onnx"),
                            ("decoder", "decoder.onnx")):
            export_graph(source, graph, cfg, root / name)
    from conftest import seal
    seal(root)  # made by hand: its manifest is written explicitly
    return root


@pytest.mark.parametrize("backend", ["onnxruntime", "onnxruntime-opt", "torch"])
def test_backends_from_build_equal_nocache(tiny_build, backend):
    ref = Generator.from_build(tiny_build, backend="torch-nocache", threads=1)
    gen = Generator.from_build(tiny_build, backend=backend, threads=1)
    assert gen.backend == backend
    for rows in (ROWS, ROWS[1:2], [[9, 9, 9, 9], [3]]):
        for kw in ({"max_new_tokens": 12}, {"max_new_tokens": 12, "eos_id": 23},
                   {"max_new_tokens": 5, "noise_scale": 1.0, "noise_seed": 2}):
            assert gen.generate(rows, **kw).sequences == ref.generate(rows, **kw).sequences
    kw = {"strategy": "sample", "seed": 3, "temperature": 1.5, "max_new_tokens": 6}
    assert gen.generate(ROWS, **kw).sequences == ref.generate(ROWS, **kw).sequences
    kw = {"strategy": "beam", "num_beams": 2, "max_new_tokens": 6}
    assert gen.generate(ROWS[:2], **kw).sequences == ref.generate(ROWS[:2], **kw).sequences


def test_onnx_cache_geometry_read_from_graph(tiny_build):
    from hmu_export.backends.ort import OrtStepBackend

    b = OrtStepBackend(tiny_build / "encoder.onnx", tiny_build / "decoder.onnx")
    cfg = config_from_dict(TWO_LAYER)
    assert b.cache_spec() == CacheSpec(2, cfg.model.heads, cfg.model.d_model // cfg.model.heads,
                                       cfg.model.latent_dim)


def test_from_build_errors(tiny_build, tmp_path):
    with pytest.raises(BackendUnavailable, match="fp16"):
        Generator.from_build(tiny_build, backend="onnxruntime-fp16emu")
    with pytest.raises(InputError, match="unknown generation backend"):
        Generator.from_build(tiny_build, backend="tensorflow")
    bare = tmp_path / "bare"
    shutil.copytree(tiny_build, bare)
    (bare / "decoder.onnx").unlink()
    with pytest.raises(HMUExportError, match="decoder.onnx"):
        Generator.from_build(bare, backend="onnxruntime")


def test_ignore_eos_always_fills_max_new_tokens():
    cfg = _table_cfg(5)
    gen = Generator(TableBackend(5, seed=7), cfg)
    first = gen.generate([[3]], max_new_tokens=4, ignore_eos=True).sequences[0]
    stopped = gen.generate([[3]], max_new_tokens=4, eos_id=first[0])
    assert stopped.sequences == [first[:1]] and stopped.steps == 1
    full = gen.generate([[3]], max_new_tokens=4, eos_id=first[0], ignore_eos=True)
    assert full.sequences == [first] and full.steps == 4
    beam = gen.generate([[3]], strategy="beam", num_beams=2, max_new_tokens=4,
                        eos_id=first[0], ignore_eos=True)
    assert len(beam.sequences[0]) == 4
