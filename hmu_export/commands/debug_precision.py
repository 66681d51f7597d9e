"""`debug-precision`: find the nodes that must stay FP32 for FP16 parity (emulation backend)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .argtypes import finite


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("debug-precision",
                       help="bisect a build's graph for the smallest set of FP32 nodes that makes "
                            "FP16 parity pass (FP16 emulation in ONNX Runtime, no GPU needed)")
    p.add_argument("--artifacts", required=True, type=Path, help="build folder (has model.onnx)")
    p.add_argument("--shapes", default="", help="BxLSxLT[,...] feeds to check (default: the "
                                                "profile's opt and max shapes)")
    p.add_argument("--include", action="append", default=[], metavar="PREFIX",
                   help="only bisect nodes whose name starts with PREFIX (repeatable)")
    p.add_argument("--no-policy-pins", action="store_true",
                   help="start from nothing pinned instead of the FP32 pin policy")
    p.add_argument("--max-abs", type=finite, help="logits max-abs bound (default: FP16 policy)")
    p.add_argument("--max-rel-range", type=finite, help="max abs / logits range bound")
    p.add_argument("--min-top1", type=finite, help="decisive top-1 agreement bound, 0..1")
    p.add_argument("--json", type=Path, help="also write the result to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from . import ui
    from ..core.build_folder import open_build
    from ..core.config import parse_shapes
    from ..core.errors import ConfigError
    from ..core.fileio import write_json
    from ..core.io_contract import LOGITS, make_feeds
    from ..core.pins import pin_names, select_pins
    from ..verify.precision_debug import debug_precision
    from ..core.tolerance import tolerance_for

    build = open_build(args.artifacts)
    layout, proto, cfg = build.layout, build.proto, build.cfg
    p = cfg.profile
    shapes = (parse_shapes(args.shapes) if args.shapes else
              [(p.batch[1], p.src_len[1], p.tgt_len[1]), (p.batch[2], p.src_len[2], p.tgt_len[2])])
    for s in shapes:  # the graph serves its profile only (a longer source: an ONNX Runtime fault)
        if not p.contains(*s):
            raise ConfigError(f"--shapes {'x'.join(map(str, s))} lies outside the build's "
                              f"profile (batch {p.batch[0]}..{p.batch[2]}, src_len "
                              f"{p.src_len[0]}..{p.src_len[2]}, tgt_len "
                              f"{p.tgt_len[0]}..{p.tgt_len[2]})")
    feeds = [make_feeds(cfg.model, *s, seed=cfg.parity.seed, noise_scale=cfg.parity.noise_scale)
             for s in shapes]
    # the build's own FP16 budget: a trained model's config widens the absolute bound with its
    # logit range (the demo: 1.5), which the parity stage applies too
    tol = tolerance_for("fp16", fp16_max_abs=cfg.parity.fp16_max_abs)
    for field, value in (("max_abs", args.max_abs), ("max_rel_range", args.max_rel_range),
                         ("min_top1", args.min_top1)):
        if value is not None:
            if value < 0 or (field == "min_top1" and value > 1):
                bound = "in [0, 1]" if field == "min_top1" else ">= 0"
                raise ConfigError(f"--{field.replace('_', '-')} must be {bound}, got {value}")
            tol = replace(tol, **{field: value})
    base = [] if args.no_policy_pins else pin_names(select_pins(proto, cfg.engine))
    with ui.err.status("bisecting FP32 pins...") as status:
        res = debug_precision(layout.onnx, feeds, LOGITS, tol, base_pins=base,
                              include=args.include, progress=lambda m: status.update(m))
    rows = [(name, "policy") for name in res.base_pins] + [(name, "found") for name in res.pins]
    ui.out.print(ui.table("FP32 nodes needed for FP16 parity", ["node", "source"], rows))
    b, f = res.baseline, res.final
    ui.out.print(f"baseline (policy pins only): max abs {b.max_abs:.4g}, rel {b.rel_range:.3g}, "
                 f"top-1 {b.top1:.4f} -> {'pass' if b.passed else 'FAIL'}")
    ui.out.print(f"with {len(res.pins)} more FP32 node(s): max abs {f.max_abs:.4g}, rel "
                 f"{f.rel_range:.3g}, top-1 {f.top1:.4f}; {res.evaluations} evaluations over "
                 f"{res.candidates} candidates")
    if res.floor is not None:
        ui.out.print(f"floor (FP32 arithmetic, only inputs and embedding tables rounded to "
                     f"FP16): max abs {res.floor.max_abs:.4g}, rel {res.floor.rel_range:.3g}: "
                     "no pin goes below it")
    if res.pins:
        ui.out.print("add to --layerPrecisions and --layerOutputTypes in build_engine.sh: "
                     + ",".join(f"{n}:fp32" for n in res.pins))
    if args.json:
        write_json(args.json, res.to_dict() | {"tolerance": tol.to_dict(), "shapes": shapes})
        if (Path(args.artifacts) / "manifest.json").is_file():  # a report written inside the build
            from ..core.manifest import update_manifest
            update_manifest(args.artifacts, None, None, written=[args.json])
    return 0
