"""Peak RSS and weight bytes of one generator, alone in its own process (issue 17's table).

Loads one of our step backends or one peer over a build, generates once at the benchmark's
shape (greedy, exactly NEW tokens per row), and prints one JSON line: peak RSS of the whole
process up to then (``ru_maxrss``, so it includes Python, torch and the runtime; for a peer
also the Transformers model its converter loads, as a user's process would) and the bytes of the
weights it loaded (our graph files; CTranslate2's model.bin converted at that precision; the
Transformers safetensors).

Usage: python benchmarks/rss_probe.py BUILD NAME [BATCH SRC_LEN NEW THREADS]
NAME: an ours backend (onnxruntime-opt, onnxruntime-int8, ...) or transformers /
ctranslate2-fp32 / ctranslate2-int8.
"""
from __future__ import annotations

import json
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv: list[str]) -> int:
    build, name = Path(argv[0]), argv[1]
    batch, src_len, new, threads = (int(x) for x in (argv[2:6] or (1, 32, 32, 1)))
    import torch
    torch.set_num_threads(threads)
    from hmu_export.core.build_folder import open_build

    b = open_build(build)
    rng = np.random.default_rng([0, batch, src_len])
    ids = rng.integers(3, b.cfg.model.vocab_size, size=(batch, src_len))
    before = _rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        if name.startswith(("onnxruntime", "torch")):
            from hmu_export.generate.generator import Generator
            from hmu_export.core.layout import BuildLayout

            gen = Generator.from_build(build, name, threads=threads)
            res = gen.generate(ids.tolist(), max_new_tokens=new, ignore_eos=True)
            made = {len(s) for s in res.sequences}
            peak = _rss_mib()
            variant = {"onnxruntime-opt": "opt", "onnxruntime-int8": "int8",
                       "onnxruntime-int4": "int4"}.get(name, "")
            lay = BuildLayout(build)
            weights = sum(lay.graph(g, variant).stat().st_size for g in ("encoder", "decoder"))
        else:
            from hmu_export.bench.peers import load_peers, time_peer
            from hmu_export.model.checkpoint import load_build_source

            base = "ctranslate2" if name.startswith("ctranslate2") else name
            peers, skipped = load_peers(load_build_source(b), b.cfg, [base], Path(tmp), threads)
            peer = next((p for p in peers if p.name == name), None)
            if peer is None:
                print(json.dumps({"name": name, "skipped": skipped}))
                return 1
            runs = time_peer(peer, ids, new, runs=1, warmup=0)
            made = {len(s) for s in runs[0].sequences} if not isinstance(runs, str) else set()
            peak = _rss_mib()  # before the size-only conversion below
            if name.startswith("ctranslate2"):  # the file CTranslate2 ships at that precision
                from hmu_export.bench.peers import Ids, convert_ctranslate2

                gen = b.cfg.generation
                out = convert_ctranslate2(
                    Path(tmp) / "base", Path(tmp) / "ct2-stored", b.cfg.model.vocab_size,
                    Ids(int(gen.bos_id), int(gen.eos_id), int(b.cfg.model.pad_id)), 2,
                    None if name.endswith("fp32") else "int8")
                weights = (out / "model.bin").stat().st_size
            else:
                weights = sum(f.stat().st_size for f in (Path(tmp) / "base").glob("*.safetensors"))
    print(json.dumps({"name": name, "peak_rss_mib": round(peak, 1),
                      "rss_before_load_mib": round(before, 1), "weight_bytes": weights,
                      "tokens_per_row": sorted(made)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
