"""`finetune`: train only the HMU (and its VAE) of a frozen model; write its weights."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import ui
from .argtypes import finite as _float
from .argtypes import integer as _int


def register(sub: argparse._SubParsersAction) -> None:
    from ..train.finetune import FinetuneOptions

    d = FinetuneOptions()
    p = sub.add_parser("finetune", help="fine-tune only the HMU of a frozen model (cross-entropy "
                                        "+ weighted VAE KL); writes hmu.safetensors")
    p.add_argument("--config", type=Path, help="TOML config (default: the embedded model)")
    p.add_argument("--data", type=Path, required=True,
                   help='training JSON lines: {"src": [ids], "tgt": [ids]} (or text with a '
                        "tokenizer in the hf model folder)")
    p.add_argument("--eval", type=Path, help="eval JSON lines (default: the training data)")
    p.add_argument("--out", type=Path, required=True,
                   help="HMU weights (.safetensors); the log (.log.jsonl) and loss curve "
                        "(.loss.png) are written beside it")
    p.add_argument("--merge-into", type=Path,
                   help="native source: also write a full checkpoint folder (model.safetensors "
                        "+ config.json) with the trained HMU, for [model] checkpoint")
    p.add_argument("--steps", type=_int, default=d.steps, help=f"default {d.steps}")
    p.add_argument("--lr", type=_float, default=d.lr, help=f"AdamW learning rate, default {d.lr}")
    p.add_argument("--batch-size", type=_int, default=d.batch_size,
                   help=f"default {d.batch_size}")
    p.add_argument("--kl-weight", type=_float, default=d.kl_weight,
                   help=f"weight of the VAE's mean per-token KL, default {d.kl_weight}")
    p.add_argument("--seed", type=_int, default=d.seed, help="shuffling and noise seed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..core.config import load_config
    from ..train.finetune import FinetuneOptions, finetune

    cfg = load_config(args.config).validate()
    opts = FinetuneOptions(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                           kl_weight=args.kl_weight, seed=args.seed)
    res = finetune(cfg, args.data, args.out, eval_data=args.eval, options=opts,
                   merge_into=args.merge_into)
    on = "eval data" if res.eval_on == "eval" else "training data (no --eval)"
    ui.out.print(ui.table(f"eval cross-entropy on the {on}, mean path (noise 0)",
                          ("HMU", "eval CE"),
                          [("original (untrained)", f"{res.eval_before:.4f}"),
                           ("fine-tuned", f"{res.eval_after:.4f}"),
                           ("change", f"{res.eval_after - res.eval_before:+.4f}")]))
    ui.out.print(f"HMU weights: {res.out}", markup=False, highlight=False)
    ui.out.print(f"loss log:    {res.log}", markup=False, highlight=False)
    if res.plot:
        ui.out.print(f"loss curve:  {res.plot}", markup=False, highlight=False)
    if res.merged:
        ui.out.print(f"native checkpoint: {res.merged}", markup=False, highlight=False)
    return 0
