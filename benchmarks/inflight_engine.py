"""Static vs in-flight batching of the generation model's step engine, in-process (no server).

Why: `loadtest` measures the served model, where per-token responses, the client and the
server share the CPU with the decoder; this isolates the engine: the same requests (uniform
source 1..128, max_new_tokens 8..64, greedy) generated (a) static: chunks of the batch max run
to their longest (finished rows leave), (b) in-flight: a running batch refilled between steps.
Both give identical tokens (checked). Usage:
    python benchmarks/inflight_engine.py engines/hmu-default/triton/hmu-default_generate_stream
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

import hmu_export.shipped.generate_model as tgm
from hmu_export.deploy.triton.config import parse_config


def main(folder: Path, n: int = 160, seed: int = 0) -> None:
    params = {k: v.string_value for k, v in
              parse_config((folder / "config.pbtxt").read_text()).parameters.items()}
    spec = {k: int(params[k]) for k in tgm.SPEC_KEYS}
    rng = np.random.default_rng(seed)
    reqs = [(rng.integers(3, spec["vocab_size"], int(rng.integers(1, spec["src_len_max"] + 1)))
             .tolist(), int(rng.integers(8, spec["max_new_tokens_max"] + 1))) for _ in range(n)]
    steps = tgm.ort_steps(str(folder / "1"), params, spec)
    jobs = [tgm.Job(r, tgm.parse_options({}, m, spec)) for r, m in reqs]
    t0 = time.perf_counter()
    for i in range(0, n, spec["batch_max"]):
        tgm.generate_sequential(steps, jobs[i:i + spec["batch_max"]], spec)
    static = time.perf_counter() - t0
    batch, waiting = tgm.RunningBatch(steps, spec), tgm.Waiting(n)
    slots = [tgm.new_slot(tgm.Job(r, tgm.parse_options({}, m, spec))) for r, m in reqs]
    for s in slots:
        waiting.offer(s)
    t0, count = time.perf_counter(), 0
    while len(waiting) or batch.slots:
        batch.join(waiting.take(batch.free_rows))
        batch.step()
        count += 1
    inflight = time.perf_counter() - t0
    assert [j.tokens for j in jobs] == [s.job.tokens for s in slots]
    tokens = sum(len(j.tokens) for j in jobs)
    print(f"{n} requests, {tokens} tokens: static {tokens / static:.0f} tokens/s, in-flight "
          f"{tokens / inflight:.0f} tokens/s ({count} steps, {inflight / count * 1e3:.2f} ms "
          f"per step of up to {spec['batch_max']} rows), in-flight / static "
          f"{static / inflight:.2f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
