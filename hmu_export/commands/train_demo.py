"""`train-demo`: retrain the shipped demo model (or its T5 twin) from a seed."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from . import ui
from .argtypes import finite as _float
from .argtypes import integer as _int
from .argtypes import positive_int as _positive_int


def register(sub: argparse._SubParsersAction) -> None:
    from ..train.demo_trainer import DemoOptions

    d = DemoOptions()
    p = sub.add_parser("train-demo", help="train the demo model (Spanish numbers to words): "
                                          "base model, then the HMU alone (needs the [train] "
                                          "extra)")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder: model/ (checkpoint + tokenizer), stage logs, "
                        "summary.json")
    p.add_argument("--t5", action="store_true",
                   help="train the Hugging Face T5 twin instead (a save_pretrained folder in "
                        "--out, then its HMU alone: hmu.safetensors; needs the [hf] extra "
                        "too)")
    p.add_argument("--steps", type=_positive_int,
                   help=f"training steps (stage 1 of the native model; default {d.steps}, "
                        "--t5: its own default)")
    p.add_argument("--hmu-steps", type=_positive_int, default=d.hmu_steps,
                   help=f"stage 2: HMU-only finetune steps, default {d.hmu_steps}")
    p.add_argument("--batch-size", type=_positive_int, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=_float, help=f"peak learning rate, default {d.lr}")
    p.add_argument("--seed", type=_int, default=d.seed,
                   help=f"model init, training order and noise seed, default {d.seed} (the "
                        "dev/test split has its own fixed seed)")
    p.add_argument("--threads", type=_positive_int, default=d.threads,
                   help=f"torch threads, default {d.threads} (results are reproducible for "
                        "one thread count)")
    p.add_argument("--eval-limit", type=_int, default=0,
                   help="evaluate on N dev and N test examples only (quick runs; 0 = all)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..core.errors import ConfigError
    from ..train.demo_trainer import DemoOptions

    cores = os.cpu_count() or 1
    if args.threads > cores:  # torch.set_num_threads(100000) ends in a segmentation fault
        raise ConfigError(f"--threads {args.threads} exceeds this machine's {cores} cores")
    given = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size),
                               ("lr", args.lr)) if v is not None}
    if args.t5:
        from ..core.fileio import write_json
        from ..train.demo_t5 import T5Options, train_t5, train_t5_hmu
        t5 = replace(T5Options(), seed=args.seed, threads=args.threads,
                     eval_limit=args.eval_limit, **given)
        res = train_t5(args.out, t5, log=_log)
        hmu = train_t5_hmu(res.folder, steps=args.hmu_steps, seed=args.seed,
                           eval_limit=args.eval_limit, log=_log)
        write_json(res.folder / "training.json", dict(res.summary, hmu=hmu))
        ui.out.print(f"T5 twin: {res.folder} (HMU: hmu.safetensors)", markup=False,
                     highlight=False)
        return 0
    from ..train.demo_trainer import train_demo
    opts = replace(DemoOptions(), hmu_steps=args.hmu_steps, seed=args.seed,
                   threads=args.threads, eval_limit=args.eval_limit, **given)
    res = train_demo(args.out, opts, log=_log)
    ui.out.print(f"model: {res.model_dir}", markup=False, highlight=False)
    ui.out.print(f"summary: {res.out / 'summary.json'}", markup=False, highlight=False)
    return 0


def _log(line: str) -> None:
    ui.err.print(line, markup=False, highlight=False)
