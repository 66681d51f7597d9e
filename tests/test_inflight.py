"""In-flight batching of the Triton generation model, without a server (fast, CI).

Two oracles, both independent of the batch scheduler under test:

- a stand-in decoder whose next token is a closed-form function of what one request alone has
  seen (its source ids, its own decoder inputs, its position): any leak between rows, a wrong
  position, a mask that lets a padded past or source column through, or a cache row moved to
  the wrong request changes the tokens;
- the real tiny graphs against Python's single-request ``Generator`` (greedy, sampling, beam,
  HMU noise, EOS), with requests joining and leaving at every step.
"""
from __future__ import annotations

import numpy as np
import pytest

import hmu_export.shipped.generate_model as tgm

V, BOS, EOS, PAD = 31, 1, 2, 0
SPEC = {"vocab_size": V, "latent_dim": 1, "pad_id": PAD, "bos_id": BOS, "eos_id": EOS,
        "batch_max": 4, "src_len_min": 1, "src_len_max": 16, "max_new_tokens_max": 12,
        "max_new_tokens_default": 6, "layers": 1, "heads": 1, "head_dim": 1}
POISON = 29  # a source id that makes the stand-in's logits NaN at the request's third step


def fake_steps(seen: list[dict[str, tuple]] | None = None) -> tgm.Steps:
    """Encoder: the source ids become cross K/V. Decoder: the past holds the decoder inputs;
    logits peak at (sum of attended source ids + attended past inputs + this input + 7 x
    position) mod V. ``seen`` records the feed shapes of every decoder call."""

    def encode(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kv = feeds["src_ids"].astype(np.float32)[:, None, :, None]
        return {"cross_key.0": kv, "cross_value.0": kv * 0}

    def decode(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if seen is not None:
            seen.append({k: v.shape for k, v in feeds.items()})
        tgt = feeds["tgt_ids"][:, 0]
        src = (feeds["cross_key.0"][:, 0, :, 0] * feeds["src_mask"]).sum(axis=1)
        past = (feeds["past_key.0"][:, 0, :, 0] * feeds["past_mask"]).sum(axis=1)
        pos = feeds["positions"][:, 0]
        peak = (src + past + tgt + 7 * pos).astype(np.int64) % V
        logits = np.zeros((len(tgt), 1, V), dtype=np.float32)
        logits[np.arange(len(tgt)), 0, peak] = 1.0
        poisoned = (feeds["cross_key.0"][:, 0, :, 0] == POISON).any(axis=1) & (pos == 2)
        logits[poisoned] = np.nan
        new = tgt.astype(np.float32)[:, None, None, None]
        return {"logits": logits,
                "present_key.0": np.concatenate([feeds["past_key.0"], new], axis=2),
                "present_value.0": np.concatenate([feeds["past_value.0"], new], axis=2)}

    return tgm.Steps(encode, decode, SPEC)


def alone(src: list[int], max_new: int) -> list[int]:
    """The stand-in's greedy tokens for one request on its own, in closed form."""
    inputs, out = [BOS], []
    for t in range(max_new):
        tok = (sum(src) + sum(inputs) + 7 * t) % V
        out.append(tok)
        if tok == EOS:
            break
        inputs.append(tok)
    return out


def slot(src: list[int], max_new: int, **params: object) -> tgm.Slot:
    opts = tgm.parse_options({k: str(v) if isinstance(v, float) else v
                              for k, v in params.items()}, max_new, SPEC)
    return tgm.new_slot(tgm.Job(src, opts))


def run(batch: tgm.RunningBatch, arrivals: list[list[tgm.Slot]], check=None) -> int:
    """Feed arrivals[i] to the queue before step i, until everything finished; steps run."""
    waiting, steps = tgm.Waiting(100), 0
    pending = list(arrivals)
    while pending or batch.slots or len(waiting):
        for s in (pending.pop(0) if pending else []):
            assert waiting.offer(s)
        batch.join(waiting.take(batch.free_rows))
        assert batch.rows <= SPEC["batch_max"]
        if batch.slots:
            batch.step()
            steps += 1
            if check is not None:
                check(batch)
    return steps


def test_requests_joining_and_leaving_get_their_own_tokens():
    rng = np.random.default_rng(4)
    reqs = [(rng.integers(3, V - 3, int(rng.integers(1, 17))).tolist(), int(rng.integers(1, 13)))
            for _ in range(40)]
    assert len({n for _, n in reqs}) > 5 and len({len(s) for s, _ in reqs}) > 5
    slots = [slot(src, n) for src, n in reqs]
    spread: list[list[tgm.Slot]] = []  # staggered: 0 to 3 arrivals before each step
    i = 0
    while i < len(slots):
        k = int(rng.integers(0, 4))
        spread.append(slots[i:i + k])
        i += k
    seen: list[dict] = []
    batch = tgm.RunningBatch(fake_steps(seen), SPEC)

    def compacted(b: tgm.RunningBatch) -> None:
        if b.slots:  # the cache is as long as the longest live request, no longer
            assert b.steps.state["past_mask"].shape[1] == max(s.t for s in b.slots)
            assert b.steps.state["src_mask"].shape[1] == max(len(s.job.row) for s in b.slots)

    run(batch, spread, compacted)
    for (src, n), s in zip(reqs, slots):
        assert s.job.error is None and s.job.tokens == alone(src, n), (src, n)
    assert any(t == EOS for s in slots for t in s.job.tokens)  # some left early by EOS
    assert max(f["tgt_ids"][0] for f in seen) == SPEC["batch_max"]  # the batch filled up
    assert batch.steps.state == {} and batch.rows == 0


def test_a_dropped_request_frees_its_rows_and_the_others_go_on():
    batch = tgm.RunningBatch(fake_steps(), SPEC)
    slots = [slot([4, 4, 5], 12), slot([6], 12), slot([7, 8], 12), slot([9] * 9, 12)]
    batch.join(slots)
    for _ in range(3):
        assert batch.step() == []
    batch.drop([slots[1], slots[3]])
    assert batch.rows == 2 and batch.free_rows == 2
    assert batch.steps.state["src_mask"].shape[1] == 3  # the 9-token source left the cache
    late = slot([10, 11], 5)
    batch.join([late])
    finished = []
    while batch.slots:
        finished += batch.step()
    for s in (slots[0], slots[2], late):
        assert s.job.tokens == alone(s.job.row, s.job.opts.max_new_tokens)
    assert len(slots[1].job.tokens) == 3 and slots[1] not in finished


def test_non_finite_logits_fail_that_request_alone():
    batch = tgm.RunningBatch(fake_steps(), SPEC)
    good, bad = slot([3, 4], 8), slot([POISON, 5], 8, noise_scale=2.0)
    batch.join([good, bad])
    finished = []
    while batch.slots:
        finished += batch.step()
    assert isinstance(bad.job.error, tgm.NonFiniteLogits) and bad.job.error.client
    assert "at step 3" in str(bad.job.error) and len(bad.job.tokens) == 2
    assert good.job.error is None and good.job.tokens == alone([3, 4], 8)
    assert finished.index(bad) < finished.index(good)


def test_the_waiting_queue_is_bounded_and_fifo():
    q = tgm.Waiting(3)
    beam = slot([3], 4, strategy="beam", num_beams=3)
    a, b, c = slot([4], 4), beam, slot([5], 4)
    assert [q.offer(s) for s in (a, b, c, slot([6], 4))] == [True, True, True, False]
    assert len(q) == 3
    assert q.take(3) == [a]  # the beam group (3 rows) does not fit the 2 rows left
    assert q.take(2) == []  # ... and the request behind it does not overtake it
    assert q.take(4) == [b, c]
    assert q.offer(a) and q.remove(lambda s: s is a) == [a] and len(q) == 0
    with pytest.raises(ValueError, match="max_queue_size"):
        tgm.Waiting(0)
    batch = tgm.RunningBatch(fake_steps(), SPEC)
    batch.join([slot([3], 4, strategy="beam", num_beams=3)])
    assert batch.rows == 3 and batch.free_rows == 1
    with pytest.raises(RuntimeError, match="do not fit"):
        batch.join([slot([3], 4, strategy="beam", num_beams=2)])


# --------------------------------------------------------------------------- real graphs
KINDS = [{}, {"strategy": "sample", "seed": 5, "temperature": 0.9, "top_k": 20},
         {"strategy": "beam", "num_beams": 2}, {"noise_scale": 1.0, "noise_seed": 3},
         {"strategy": "sample", "seed": 11, "top_p": 0.8},
         {"strategy": "beam", "num_beams": 3, "length_penalty": 0.6}]


RULES = {"repetition_penalty": 1.6, "no_repeat_ngram_size": 2, "bad_words_ids": ((5,), (7, 8)),
         "min_new_tokens": 2, "forced_eos_id": 23, "suppress_tokens": (9,)}


@pytest.mark.parametrize("eos, with_rules", [(None, False), (23, False), (None, True)])
def test_running_batch_equals_the_generator(gen_build, small_cfg, tmp_path, eos, with_rules):
    """The tiny model's graphs: 36 requests of every strategy, ragged sources and lengths,
    arriving one to three per step, each equal to its single-request Generator run (with an
    EOS the model produces; with the build's token rules, per row as the Generator applies
    them)."""
    from hmu_export.shipped.token_rules import TokenRules

    from hmu_export.deploy.triton.config import TritonOptions, parse_config
    from hmu_export.deploy.triton.repository import repository_from_artifacts
    from hmu_export.generate.generator import Generator

    repo = repository_from_artifacts(gen_build, tmp_path / "repo", TritonOptions()).root
    folder = repo / "hmu-tiny_generate"
    params = {k: v.string_value for k, v in
              parse_config((folder / "config.pbtxt").read_text()).parameters.items()}
    assert params["batching"] == "inflight" and int(params["max_queue_size"]) >= 1
    spec = {k: int(params[k]) for k in tgm.SPEC_KEYS}
    if eos is not None:
        spec["eos_id"] = eos
    rules = TokenRules(**RULES) if with_rules else None
    batch = tgm.RunningBatch(tgm.ort_steps(str(folder / "1"), params, spec), spec, rules)
    ref = Generator.from_build(gen_build, backend="onnxruntime")
    rng = np.random.default_rng(1)
    reqs = []
    for i in range(36):
        row = rng.integers(3, spec["vocab_size"], int(rng.integers(1, 17))).tolist()
        reqs.append((row, {**KINDS[i % len(KINDS)],
                           "max_new_tokens": int(rng.integers(1, 9))}))
    slots = [tgm.new_slot(tgm.Job(row, tgm.parse_options(
        {k: str(v) if isinstance(v, float) else v for k, v in kw.items()
         if k != "max_new_tokens"}, kw["max_new_tokens"], spec))) for row, kw in reqs]
    arrivals, i = [], 0
    while i < len(slots):
        k = int(rng.integers(0, 4))
        arrivals.append(slots[i:i + k])
        i += k
    waiting = tgm.Waiting(100)
    mixed = 0
    while arrivals or batch.slots or len(waiting):
        for s in (arrivals.pop(0) if arrivals else []):
            waiting.offer(s)
        batch.join(waiting.take(batch.free_rows))
        if batch.slots:
            mixed += len({s.job.opts.strategy for s in batch.slots}) > 1
            batch.step()
    assert mixed > 5  # greedy, sampling and beam rows really shared steps
    changed = False
    for (row, kw), s in zip(reqs, slots):
        extra = {} if eos is None else {"eos_id": eos}
        if rules is not None:
            extra["rules"] = rules
            changed |= s.job.tokens != ref.generate([row], **kw).sequences[0]
        assert s.job.error is None
        assert s.job.tokens == ref.generate([row], **kw, **extra).sequences[0], (row, kw)
    assert changed or rules is None, "the rules never changed a token: nothing was tested"
    if eos is not None:
        assert any(s.job.tokens and s.job.tokens[-1] == eos
                   and len(s.job.tokens) < s.job.opts.max_new_tokens for s in slots)
