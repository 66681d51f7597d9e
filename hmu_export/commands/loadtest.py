"""`loadtest`: open-loop load on the Triton streaming generation model, static vs in-flight
batching (the work is bench/loadtest.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import ui


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "loadtest", help="load-test a Triton repository's streaming generation model "
                         "(static vs in-flight batching)",
        description="Start the bundled tritonserver, drive open-loop Poisson arrivals at each "
                    "rate with mixed-length requests, and report requests/s, tokens/s, TTFT "
                    "and end-to-end p50/p95/p99, errors and server RSS per rate and batching "
                    "mode, as JSON, Markdown and a plot.")
    p.add_argument("--repository", required=True, type=Path, metavar="DIR",
                   help="a Triton repository written by `triton` (or a build's triton/)")
    p.add_argument("--model", metavar="NAME", help="the *_generate_stream model (default: the "
                                                   "only one in DIR)")
    p.add_argument("--rates", default="2,4,8,16", metavar="R1,R2,...",
                   help="offered requests/s, one run each (default: 2,4,8,16)")
    p.add_argument("--duration", type=float, default=20.0, metavar="S",
                   help="seconds of arrivals per rate (default: 20)")
    p.add_argument("--requests", type=int, default=0, metavar="N",
                   help="requests per rate instead of rate x duration")
    p.add_argument("--modes", default="static,inflight", metavar="M1,M2",
                   help="batching modes to compare (default: static,inflight)")
    p.add_argument("--no-low-rate", action="store_true",
                   help="skip the extra run at 70%% of static's saturation rate")
    p.add_argument("--new-tokens", default="0,0", metavar="LO,HI",
                   help="max_new_tokens range per request (default: 1/8 .. all of the max)")
    p.add_argument("--sample-share", type=float, default=0.3, metavar="F",
                   help="share of seeded sampling requests, the rest greedy (default: 0.3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", type=Path, metavar="JSONL",
                   help="take the requests' inputs from a task set's sources, tokenized with "
                        "the model's tokenizer (the default build's: "
                        "hmu_export/demo/numbers-es.test.jsonl); default: random token ids")
    p.add_argument("--out", type=Path, metavar="BASE",
                   help="write BASE.json, BASE.md and BASE.png (default: loadtest-<model>)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bench.loadtest import LoadSettings, parse_rates, run_loadtest, write_report
    from ..core.errors import InputError

    try:
        lo, hi = (int(x) for x in args.new_tokens.split(","))
    except ValueError:
        raise InputError(f"--new-tokens must be LO,HI integers, got {args.new_tokens!r}") \
            from None
    settings = LoadSettings(rates=parse_rates(args.rates), duration_s=args.duration,
                            max_requests=args.requests,
                            modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
                            low_rate=not args.no_low_rate, sample_share=args.sample_share,
                            new_tokens=(lo, hi), seed=args.seed,
                            task=str(args.task) if args.task else "")
    settings.check()
    report = run_loadtest(args.repository, settings, model_name=args.model,
                          log=lambda line: ui.err.print(line, highlight=False, markup=False))
    base = args.out or Path(f"loadtest-{report['model']}")
    paths = write_report(report, base)
    rows = [(t["target"], t["value"], "not judged" if t["met"] is None else
             "met" if t["met"] else "missed") for t in report["targets"]]
    ui.out.print(ui.table("load-test targets", ["target", "value", "verdict"], rows))
    ui.out.print("wrote " + ", ".join(str(p) for p in paths))
    return 0
