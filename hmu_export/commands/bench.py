"""`bench`: latency / throughput of every backend of a build (JSON, Markdown table, PNG plot)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from . import ui
from .argtypes import finite
from ..bench.forward import DEFAULT_BACKENDS, run_bench, speedups, write_outputs
from ..bench.timing import BenchSettings
from ..core.config import parse_shapes
from ..core.errors import ConfigError
from ..bench.stability import cell, run_notes

#: the longest --min-seconds (per backend and shape): more is a typo, not a benchmark
MAX_MIN_SECONDS = 3600


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="measure latency and throughput of a build's backends",
        description="Warm-up, then timed runs (p50/p90/p95/p99, mean, std, seq/s, tokens/s) for "
                    "each backend at each shape; same feeds for every backend. Writes "
                    "bench.json, bench.md and bench.png.")
    p.add_argument("--artifacts", type=Path, default=None,
                   help="a build folder (required unless --current compares a stored run)")
    p.add_argument("--shapes", default="", help="BxLSxLT[,BxLSxLT...] inside the build's profile; "
                   "BxLS[,...] for a classifier build (its graph has no target axis) "
                   "(default: a sweep over source length at batch min and max)")
    p.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                   help=f"comma-separated (default: {','.join(DEFAULT_BACKENDS)}); absent ones "
                        "are reported as skipped with the reason")
    p.add_argument("--quick", action="store_true", help="a few iterations (CI smoke test)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads = ORT intra-op threads (default: usable cores)")
    p.add_argument("--min-seconds", type=finite, default=None,
                   help="minimum timed seconds per backend and shape (default 2, quick 0)")
    p.add_argument("--settle-seconds", type=finite, default=None,
                   help="extra seconds per backend and shape while its times are not settled "
                        "(default 4, quick 0; bench/stability.py)")
    p.add_argument("--compare", default=None, metavar="BASELINE.json|auto",
                   help="compare with a stored bench JSON: each row's p50 change and a "
                        "noise-aware verdict (faster/same/slower/unclear); 'auto' = "
                        "benchmarks/baselines/<this CPU model>.json. Reports, never fails on "
                        "a slowdown")
    p.add_argument("--current", type=Path, default=None, metavar="RUN.json",
                   help="--compare this stored run instead of running the bench")
    p.add_argument("--compare-threshold", type=finite, default=5.0, metavar="PCT",
                   help="--compare: smallest change called faster/slower (default 5%%, the "
                        "run-to-run spread of a quiet machine)")
    p.add_argument("--short", action="store_true",
                   help="--compare: a summary line and the rows that are not 'same' (for CI)")
    p.add_argument("--no-hmu-overhead", action="store_true",
                   help="skip the with/without-HMU comparison (it exports an identity model)")
    p.add_argument("--json", type=Path, default=None, help="JSON report path "
                   "(default OUT/bench.json)")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing: ONNX Runtime's profiler on model.onnx and "
                        "model.opt.onnx at --shapes, kernel time per op type and per model "
                        "part (HMU, encoder, decoder, ...); writes profile.json / profile.md")
    p.add_argument("--profile-runs", type=int, default=50,
                   help="--profile: profiled runs per graph and shape (after 10 warm-up)")
    p.add_argument("--generate", action="store_true",
                   help="benchmark generation instead (TTFT, per-token p50/p99, tokens/s of "
                        "torch, torch-nocache, onnxruntime, onnxruntime-opt at batch 1 and 8)")
    p.add_argument("--new-tokens", type=int, default=64, help="--generate: tokens per run")
    p.add_argument("--src-len", type=int, default=64, help="--generate: source tokens")
    p.add_argument("--batches", default="1,8", help="--generate: batch sizes")
    p.add_argument("--runs", type=int, default=5, help="--generate: timed runs")
    p.add_argument("--beams", type=int, default=1,
                   help="--generate: beam search of this width for every backend and peer "
                        "(default 1: greedy); batch x beams must fit the profile")
    p.add_argument("--peers", default=None,
                   help="--generate on an hf build: third-party generators timed in the same run "
                        "(default: transformers,optimum,ctranslate2; absent ones are skipped "
                        "with the reason)")
    p.add_argument("--no-peers", action="store_true", help="--generate: time no peers")
    p.add_argument("--task", nargs="?", const="", default=None, metavar="JSONL",
                   help="benchmark real requests on a task set instead: exact match and "
                        "tokens/s of our FP32 / int8 / int4 backends and, on an hf build, the "
                        "peers (default set: the build's [task] path); batch = the first of "
                        "--batches")
    p.add_argument("--task-limit", type=int, default=0,
                   help="--task: the first N examples only (default: all)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for bench.json/.md/.png (default ARTIFACTS/bench)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.current is not None or args.compare is not None or args.short:
        from .bench_compare import check_compare_args
        check_compare_args(args)
        if args.current is not None:
            from .bench_compare import compare_stored
            return compare_stored(args)
    if args.artifacts is None:
        raise ConfigError("--artifacts is required (or --current RUN.json with --compare)")
    # one size per axis of the build's graph (BxLSxLT, or BxLS for a classifier): checked there
    shapes = parse_shapes(args.shapes, sizes=None) if args.shapes else None
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends:
        raise ConfigError("--backends is empty")
    cores = os.cpu_count() or 1
    if not 0 <= args.threads <= cores:
        raise ConfigError(f"--threads must be in 0..{cores} (this machine's cores; 0 = all "
                          f"usable), got {args.threads}")
    if args.min_seconds is not None and not 0 <= args.min_seconds <= MAX_MIN_SECONDS:
        raise ConfigError(f"--min-seconds must be in [0, {MAX_MIN_SECONDS}] (seconds per backend "
                          f"and shape), got {args.min_seconds:g}")
    if args.profile:
        return run_profile(args, shapes)
    if args.task is not None:
        return run_task(args, backends if args.backends != ",".join(DEFAULT_BACKENDS)
                        else None)
    if args.generate:
        return run_generate(args, backends if args.backends != ",".join(DEFAULT_BACKENDS)
                            else None)
    settings = BenchSettings.quick() if args.quick else BenchSettings()
    if args.min_seconds is not None:
        settings = BenchSettings(**{**settings.__dict__, "min_seconds": args.min_seconds})
    if args.settle_seconds is not None:
        if args.settle_seconds < 0:
            raise ConfigError(f"--settle-seconds must be >= 0, got {args.settle_seconds}")
        settings = BenchSettings(**{**settings.__dict__, "settle_seconds": args.settle_seconds})
    baseline = None
    if args.compare is not None:  # a bad baseline is an error before minutes of timing
        from .bench_compare import load_baseline
        baseline = load_baseline(args)
    settings = BenchSettings(**{**settings.__dict__, "threads": args.threads})
    out_dir = args.out or (args.artifacts / "bench")

    with ui.progress() as bar:
        task = bar.add_task("bench", total=None)

        def tick(desc: str, total: int) -> None:
            if desc == "start":
                bar.update(task, total=total)
            else:
                bar.update(task, advance=1, description=desc)

        report = run_bench(args.artifacts, shapes, backends, settings=settings, quick=args.quick,
                           hmu_overhead=not args.no_hmu_overhead, progress=tick)
    paths = write_outputs(report, out_dir, args.json)
    if (args.artifacts / "manifest.json").is_file():  # list what bench wrote inside the build
        from ..core.manifest import update_manifest
        update_manifest(args.artifacts, None, None, written=list(paths.values()))

    shape_col = report.shape_label.replace("×", "x")
    rows = [(r["backend"], r["precision"], "x".join(map(str, r["shape"])), r["copies"],
             f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['seq_per_s']:.1f}",
             f"{r['tokens_per_s']:.0f}",
             "" if r["peak_fraction"] is None else f"{100 * r['peak_fraction']:.1f}", cell(r))
            for r in report.results]
    ui.out.print(ui.table(f"bench: {report.model['name']} ({report.machine['threads']} threads, "
                          f"sgemm peak {report.machine['sgemm_peak']['gflops']:.1f} GFLOP/s)",
                          ["backend", "prec", shape_col, "copies", "p50 ms", "p99 ms", "seq/s",
                           "tok/s", "% peak", "stability"], rows))
    for note in run_notes(report.machine, report.results):
        ui.out.print(f"[yellow]stability[/yellow] {note}", highlight=False)
    sp = speedups(report)
    if sp:
        ui.out.print(ui.table("speedup over torch eager FP32 (p50)", ["backend", shape_col, "x"],
                              [(x["backend"], "x".join(map(str, x["shape"])),
                                f"{x['speedup']:.2f}") for x in sp]))
    if report.hmu_overhead:
        ui.out.print(ui.table("HMU overhead", ["backend", "BxLsxLt", "latency %", "params %"],
                              [(h["backend"], "x".join(map(str, h["shape"])),
                                f"{h['latency_overhead_pct']:+.1f}",
                                f"{h['parameter_overhead_pct']:.2f}")
                               for h in report.hmu_overhead]))
    for s in report.skipped:
        ui.out.print(f"[yellow]skipped[/yellow] {s['backend']}: {s['reason']}")
    for part in report.skipped_parts:
        ui.out.print(f"[yellow]not measured[/yellow] {part['part']}: {part['reason']}")
    ui.out.print(f"wrote {paths['json']}, {paths['markdown']}, {paths['png']}")
    if baseline is not None:
        from .bench_compare import compare_report
        compare_report(args, baseline, report.to_dict(), out_dir)
    return 0


def peer_names(args: argparse.Namespace) -> list[str] | None:
    """--peers / --no-peers: the peers named, [] for none, None for the default."""
    if args.no_peers and args.peers:
        raise ConfigError("--peers and --no-peers contradict each other")
    if args.no_peers:
        return []
    return None if args.peers is None else [x.strip() for x in args.peers.split(",")
                                            if x.strip()]


def run_generate(args: argparse.Namespace, backends: list[str] | None) -> int:
    from ..bench.generation import (DEFAULT_GENERATION_BACKENDS, fmt, ratios,
                                    run_generation_bench, write_outputs as write_generation)
    from ..bench.peers import peer_ratios

    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--batches must be comma-separated integers, got {args.batches!r}"
                          ) from None
    if args.runs < 1 or args.new_tokens < 1 or args.src_len < 1 or not batches or \
            min(batches) < 1 or args.beams < 1:
        raise ConfigError("--runs, --new-tokens, --src-len, --beams and --batches must be >= 1")
    if args.runs > 10_000:
        raise ConfigError(f"--runs must be at most 10,000, got {args.runs}")
    runs = 2 if args.quick else args.runs
    peers = peer_names(args)
    with ui.progress() as bar:
        task = bar.add_task("bench --generate", total=None)
        report = run_generation_bench(
            args.artifacts, backends=backends or DEFAULT_GENERATION_BACKENDS, batches=batches,
            src_len=args.src_len, new_tokens=args.new_tokens, runs=runs,
            warmup=0 if args.quick else 1, threads=args.threads or None, peers=peers,
            beams=args.beams, progress=lambda d: bar.update(task, description=d, advance=1))
    out_dir = args.out or (args.artifacts / "bench")
    paths = write_generation(report, out_dir, args.json)
    if (args.artifacts / "manifest.json").is_file():
        from ..core.manifest import update_manifest
        update_manifest(args.artifacts, None, None, written=list(paths.values()))
    rat = {(r["backend"], r["batch"]): r for r in ratios(report.results)}
    rows = [(r["backend"], str(r["batch"]), fmt(r["ttft_ms"]), fmt(r["per_token_p50_ms"], 3),
             fmt(r["per_token_p99_ms"], 3), f"{r['tokens_per_s']:.1f}",
             "-" if rat[(r["backend"], r["batch"])]["vs_torch"] is None
             else f"{rat[(r['backend'], r['batch'])]['vs_torch']:.2f}")
            for r in report.results]
    ui.out.print(ui.table(f"generation: {report.model['name']}, {args.src_len} source / "
                          f"{args.new_tokens} new tokens", ["backend", "batch", "TTFT ms",
                                                            "p50 ms/token", "p99 ms/token",
                                                            "tokens/s", "x torch"], rows))
    pr = peer_ratios(report.results, args.beams)
    if pr:
        ui.out.print(ui.table("ours over peers (tokens/s)",
                              ["ours", "peer", "batch", "ratio", "target"],
                              [(p["ours"], p["peer"], str(p["batch"]), f"{p['ratio']:.2f}",
                                "-" if p["target"] is None else
                                f">= {p['target']:g} ({'met' if p['meets_target'] else 'missed'})")
                               for p in pr]))
    for s in report.skipped:
        ui.out.print(f"[yellow]skipped[/yellow] {s['backend']}: {s['reason']}")
    ui.out.print(f"wrote {paths['json']}, {paths['markdown']}, {paths['png']}")
    return 0


def run_task(args: argparse.Namespace, backends: list[str] | None) -> int:
    """``bench --task``: exact match and tokens/s on a task set (bench/task_bench.py)."""
    from ..bench.task_bench import DEFAULT_TASK_BACKENDS, run_task_bench, write_outputs

    try:
        batch = int(args.batches.split(",")[0])
    except ValueError:
        raise ConfigError(f"--batches must be comma-separated integers, got {args.batches!r}"
                          ) from None
    if args.task_limit < 0:
        raise ConfigError(f"--task-limit must be >= 0, got {args.task_limit}")
    peers = peer_names(args)
    with ui.progress() as bar:
        task = bar.add_task("bench --task", total=None)
        report = run_task_bench(
            args.artifacts, task=Path(args.task) if args.task else None,
            backends=backends or DEFAULT_TASK_BACKENDS, peers=peers, batch=batch,
            limit=args.task_limit, threads=args.threads or None,
            progress=lambda d: bar.update(task, description=d, advance=1))
    paths = write_outputs(report, args.out or (args.artifacts / "bench"), args.json)
    if (args.artifacts / "manifest.json").is_file():
        from ..core.manifest import update_manifest
        update_manifest(args.artifacts, None, None, written=list(paths.values()))
    ui.out.print(ui.table(f"task: {report.model['name']}, {report.settings['examples']} "
                          f"examples, batch {batch}",
                          ["backend", "HMU", "exact match", "tokens/s"],
                          [(r.backend + (" (peer)" if r.peer else ""), r.hmu,
                            f"{100 * r.exact:.2f}%", f"{r.tokens_per_s:.1f}")
                           for r in report.rows]))
    for s in report.skipped:
        ui.out.print(f"[yellow]skipped[/yellow] {s['backend']}: {s['reason']}")
    ui.out.print(f"wrote {paths['json']}, {paths['markdown']}")
    return 0


def run_profile(args: argparse.Namespace, shapes: list[tuple[int, ...]] | None) -> int:
    """``bench --profile``: where the time goes, per op type and per part (bench/profile.py)."""
    from ..bench.profile import profile_build, write_profiles

    if not shapes:
        raise ConfigError("--profile needs --shapes (e.g. 1x64x64,8x128x64)")
    if not 1 <= args.profile_runs <= 10_000:
        raise ConfigError(f"--profile-runs must be in 1..10000, got {args.profile_runs}")
    with ui.progress() as bar:
        bar.add_task("bench --profile", total=None)
        profiles = profile_build(args.artifacts, shapes, threads=args.threads,
                                 runs=args.profile_runs)
    out_dir = args.out or (args.artifacts / "bench")
    paths = write_profiles(profiles, out_dir)
    if (args.artifacts / "manifest.json").is_file():  # list what it wrote inside the build
        from ..core.manifest import update_manifest
        update_manifest(args.artifacts, None, None, written=list(paths.values()))
    for p in profiles:
        where = f"{p.graph} at {'x'.join(map(str, p.shape))}, {p.threads} threads"
        ui.out.print(ui.table(
            f"{where}: run {p.run_ms:.3f} ms, kernels {p.kernel_ms:.3f} ms",
            ["op type", "calls", "ms/run", "share %"],
            [(r["key"], r["calls"], f"{r['ms']:.3f}", f"{r['share_pct']:.1f}")
             for r in p.by_op[:12]]))
        ui.out.print(ui.table(f"{where}: per part", ["part", "calls", "ms/run", "share %",
                                                     "op types ORT ran"],
                              [(r["key"], r["calls"], f"{r['ms']:.3f}", f"{r['share_pct']:.1f}",
                                ", ".join(f"{k} {v}" for k, v in
                                          p.ops_by_part.get(r["key"], {}).items()))
                               for r in p.by_part]))
    ui.out.print("the profiler inflates short kernels and counts waits for descheduled threads; "
                 "shares, not totals (bench measures latency)")
    ui.out.print(f"wrote {paths['json']}, {paths['markdown']}")
    return 0
