"""`bench --generate`: time to first token, per-token latency and tokens/s of the generation loop.

Every backend runs the same loop (hmu_export/generate/generator.py) on the same sources. Greedy decoding
with EOS ignored, so every run makes exactly ``new_tokens`` tokens on every backend and the
figures compare like with like. On an hf build the same run also times third-party generators
(hmu_export/bench/peers.py) on the same sources, and reports our ``onnxruntime-opt`` over each.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..core.errors import HMUExportError, InputError

DEFAULT_GENERATION_BACKENDS = ("torch", "torch-nocache", "onnxruntime", "onnxruntime-opt")


@dataclass
class GenerationBenchReport:
    model: dict[str, Any]
    machine: dict[str, Any]
    settings: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from .peers import peer_ratios
        return {"model": self.model, "machine": self.machine, "settings": self.settings,
                "results": self.results, "skipped": self.skipped,
                "ratios": ratios(self.results),
                "peer_ratios": peer_ratios(self.results, self.settings.get("num_beams", 1))}


def _sources(batch: int, src_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng([seed, batch, src_len])
    low = 3 if vocab > 3 else 0
    return rng.integers(low, vocab, size=(batch, src_len)).tolist()


def run_generation_bench(root: Path, *, backends: Sequence[str] = DEFAULT_GENERATION_BACKENDS,
                         batches: Sequence[int] = (1, 8), src_len: int = 64,
                         new_tokens: int = 64, runs: int = 5, warmup: int = 1,
                         threads: int | None = None, peers: Sequence[str] | None = None,
                         beams: int = 1, progress: Callable[[str], None] | None = None
                         ) -> GenerationBenchReport:
    """``peers``: third-party generators to time too (bench_peers.PEERS); None = all of them
    on an hf build, none otherwise. ``beams`` > 1: beam search of that width for everyone
    (every batch row times ``beams`` must fit the profile's batch max)."""
    from .machine import machine_info
    from ..core.build_folder import open_build
    from ..generate.generator import Generator

    build = open_build(root)
    cfg = build.cfg
    p = cfg.profile
    for b in batches:
        if not p.axis("batch").contains(b):
            raise InputError(f"batch {b} is outside the build's profile ({p.batch[0]}.."
                             f"{p.batch[2]})")
    if not p.axis("src_len").contains(src_len):
        raise InputError(f"source length {src_len} is outside the profile ({p.src_len[0]}.."
                         f"{p.src_len[2]})")
    if beams < 1 or max(batches) * beams > p.batch[2]:
        raise InputError(f"{max(batches)} rows x {beams} beams must be within the profile's "
                         f"batch max ({p.batch[2]})")
    if not 1 <= new_tokens <= p.tgt_len[2]:
        raise InputError(f"new tokens must be in [1, {p.tgt_len[2]}] (the profile's tgt_len "
                         f"max), got {new_tokens}")
    from .peers import resolve_peers
    peers = resolve_peers(peers, cfg.model.source)
    from ..runners.onnxruntime_runner import generation_threads

    threads = threads or generation_threads()
    import torch
    torch.set_num_threads(threads)  # the same cores for PyTorch as for ONNX Runtime
    report = GenerationBenchReport(
        model={"name": cfg.model.name, "source": cfg.model.source, "d_model": cfg.model.d_model,
               "layers": [cfg.model.n_encoder_layers, cfg.model.n_decoder_layers],
               "vocab_size": cfg.model.vocab_size},
        machine=machine_info(threads),
        settings={"batches": list(batches), "src_len": src_len, "new_tokens": new_tokens,
                  "runs": runs, "warmup": warmup, "threads": threads,
                  "strategy": "beam" if beams > 1 else "greedy", "num_beams": beams,
                  "peers": list(peers)})
    gens: dict[str, Generator] = {}
    for name in backends:
        try:
            gens[name] = Generator.from_build(root, name, threads=threads)
        except HMUExportError as exc:
            report.skipped.append({"backend": name, "reason": str(exc)})
    for b in batches:
        src = _sources(b, src_len, cfg.model.vocab_size, 0)
        for name, gen in gens.items():
            if progress:
                progress(f"{name} batch {b}")
            kw = dict(max_new_tokens=new_tokens, ignore_eos=True, num_beams=beams,
                      strategy="beam" if beams > 1 else "greedy")
            for _ in range(warmup):
                gen.generate(src, **kw)
            ttft, lat, tps = [], [], []
            for _ in range(runs):
                res = gen.generate(src, **kw)
                ttft.append(res.ttft_s)
                lat.extend(res.token_latencies_s)
                tps.append(res.tokens_per_s)
                made = {len(s) for s in res.sequences}
                if made != {new_tokens}:  # every backend must do the same work
                    raise InputError(f"{name} made {sorted(made)} tokens, not {new_tokens}")
            report.results.append(result_row(name, b, src_len, new_tokens, ttft, lat, tps,
                                             runs))
    if peers:
        from .peers import run_peers, versions
        report.settings["peer_versions"] = versions()
        rows, skipped = run_peers(
            build, peers, batches, lambda b: _sources(b, src_len, cfg.model.vocab_size, 0),
            src_len=src_len, new_tokens=new_tokens, runs=runs, warmup=warmup, threads=threads,
            row=result_row, beams=beams, progress=progress)
        report.results += rows
        report.skipped += skipped
    return report


def result_row(backend: str, batch: int, src_len: int, new_tokens: int,
               ttft_s: Sequence[float] | None, latencies_s: Sequence[float] | None,
               tokens_per_s: Sequence[float], runs: int) -> dict[str, Any]:
    """One report row: medians over runs, per-token percentiles over every step of every run
    (None where the generator gives no per-token hook)."""
    lat_ms = np.asarray(latencies_s) * 1e3 if latencies_s else None
    return {"backend": backend, "batch": batch, "src_len": src_len, "new_tokens": new_tokens,
            "ttft_ms": float(np.median(ttft_s) * 1e3) if ttft_s else None,
            "per_token_p50_ms": None if lat_ms is None else float(np.percentile(lat_ms, 50)),
            "per_token_p99_ms": None if lat_ms is None else float(np.percentile(lat_ms, 99)),
            "tokens_per_s": float(np.median(tokens_per_s)), "runs": runs}


def ratios(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """tokens/s of each backend over torch (cached) and torch-nocache, per batch."""
    out = []
    by = {(r["backend"], r["batch"]): r for r in results}
    for r in results:
        row = {"backend": r["backend"], "batch": r["batch"],
               "p99_over_p50": r["per_token_p99_ms"] / r["per_token_p50_ms"]
               if r["per_token_p50_ms"] and r["per_token_p99_ms"] is not None else None}
        for base in ("torch", "torch-nocache"):
            ref = by.get((base, r["batch"]))
            row[f"vs_{base}"] = r["tokens_per_s"] / ref["tokens_per_s"] if ref else None
        out.append(row)
    return out


def to_markdown(report: GenerationBenchReport) -> str:
    s, m = report.settings, report.machine
    how = "Greedy" if s.get("num_beams", 1) == 1 else f"Beam search ({s['num_beams']} beams)"
    lines = [f"# Generation benchmark: {report.model['name']}", "",
             f"{how}, {s['src_len']} source tokens, {s['new_tokens']} new tokens, median of "
             f"{s['runs']} runs after {s['warmup']} warm-up; {s['threads']} threads; "
             f"{m.get('cpu', '')}.", "",
             "| backend | batch | TTFT ms | per-token p50 ms | p99 ms | p99/p50 | tokens/s | "
             "x torch | x torch-nocache |", "|---|---|---|---|---|---|---|---|---|"]
    rat = {(r["backend"], r["batch"]): r for r in ratios(report.results)}

    for r in report.results:
        q = rat[(r["backend"], r["batch"])]
        lines.append(f"| {r['backend']}{_peer_note(r)} | {r['batch']} | {fmt(r['ttft_ms'])} | "
                     f"{fmt(r['per_token_p50_ms'], 3)} | {fmt(r['per_token_p99_ms'], 3)} | "
                     f"{fmt(q['p99_over_p50'])} | {r['tokens_per_s']:.1f} | "
                     f"{fmt(q['vs_torch'])} | {fmt(q['vs_torch-nocache'])} |")
    from .peers import peer_ratios
    pr = peer_ratios(report.results, s.get("num_beams", 1))
    if pr:
        lines += ["", "## Ours over each peer (tokens/s)", "",
                  "| ours | peer | batch | ours tok/s | peer tok/s | ratio | target | met |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in pr:
            met = "-" if p["meets_target"] is None else ("yes" if p["meets_target"] else "no")
            target = "-" if p["target"] is None else f">= {p['target']:g}"
            lines.append(f"| {p['ours']} | {p['peer']} | {p['batch']} | "
                         f"{p['ours_tokens_per_s']:.1f} | "
                         f"{p['peer_tokens_per_s']:.1f} | {p['ratio']:.2f} | {target} | {met} |")
    for sk in report.skipped:
        lines.append(f"\nSkipped `{sk['backend']}`: {sk['reason']}")
    return "\n".join(lines) + "\n"


def fmt(x: float | None, digits: int = 2) -> str:
    """A figure for a table; '-' where it was not measurable."""
    return "-" if x is None else f"{x:.{digits}f}"


def _peer_note(row: dict[str, Any]) -> str:
    return f" (peer, HMU {row['hmu']})" if row.get("peer") else ""


def plot(report: GenerationBenchReport, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..core.fileio import write_png

    batches = report.settings["batches"]
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.6), squeeze=False)
    for ax, b in zip(axes[0], batches):
        rows = [r for r in report.results if r["batch"] == b]
        names = [r["backend"] for r in rows]
        ax.barh(names, [r["tokens_per_s"] for r in rows], color="#4c72b0")
        for i, r in enumerate(rows):
            ax.text(r["tokens_per_s"], i, f" {r['tokens_per_s']:.0f}", va="center", fontsize=8)
        ax.set_title(f"batch {b}: tokens/s (higher is better)")
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"{report.model['name']}: generation, {report.settings['src_len']} source / "
                 f"{report.settings['new_tokens']} new tokens")
    fig.tight_layout()
    return write_png(fig, path)


def write_outputs(report: GenerationBenchReport, out_dir: Path, json_path: Path | None = None
                  ) -> dict[str, Path]:
    from ..core.fileio import write_json, write_text

    out_dir = Path(out_dir)
    paths = {"json": Path(json_path) if json_path else out_dir / "generate.json",
             "markdown": out_dir / "generate.md", "png": out_dir / "generate.png"}
    write_json(paths["json"], report.to_dict())
    write_text(paths["markdown"], to_markdown(report))
    plot(report, paths["png"])
    return paths
