"""`info`: what a build folder holds, its stages, and whether its files still match."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import ui
from ..core.manifest import bytecode_hint, failed_build, read_manifest, verify_artifacts


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a build's manifest and verify artifact hashes")
    p.add_argument("--artifacts", type=Path, required=True, help="build folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    data = read_manifest(args.artifacts)
    ui.out.print(ui.table(f"stages of {args.artifacts}", ("stage", "status", "reason"),
                          [(k, v.get("status"), v.get("reason", ""))
                           for k, v in data["stages"].items()]))
    ui.out.print(ui.table("artifacts", ("path", "bytes", "sha256"),
                          [(a["path"], f"{a['bytes']:,}", a["sha256"][:16])
                           for a in data["artifacts"]]))
    bad = verify_artifacts(args.artifacts, data)
    if bad:
        ui.err.print(f"error: {len(bad)} artifact(s) changed since the build: {', '.join(bad)}"
                     f"{bytecode_hint(bad)}", markup=False, highlight=False)
        return 1
    why = failed_build(data)
    if why:  # shown for inspection, and said: no other command reads it
        ui.err.print(f"error: {args.artifacts} is a failed build, kept for inspection only "
                     f"({why}); fix the failure and run `build` again", markup=False,
                     highlight=False)
        return 1
    return 0
