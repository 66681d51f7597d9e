"""`parity`: run the parity grid on an existing build folder."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import ui
from ..core.build_folder import open_build
from ..core.config import parse_shapes
from ..core.errors import ConfigError
from ..core.manifest import FAILED, OK, StageResult, update_manifest
from ..verify.parity import layout_backends, run_parity, summary, write_reports
from ..model.checkpoint import load_build_source
from ..model.native import reference_model


def shapes_arg(text: str) -> list[tuple[int, int, int]]:
    """argparse type for BxLSxLT lists (argparse only turns ArgumentTypeError into usage errors)."""
    try:
        return parse_shapes(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("parity", help="compare a build's artifacts with PyTorch over a grid")
    p.add_argument("--artifacts", type=Path, required=True, help="build folder")
    p.add_argument("--shapes", type=shapes_arg, help="BxLSxLT[,BxLSxLT...] instead of the "
                                                      "profile-derived grid")
    p.add_argument("--backends", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   help="comma-separated backend labels (default: every available one)")
    p.add_argument("--json", type=Path, help="also write the JSON report here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..core.fileio import output_kind, write_json

    if args.backends == []:  # "--backends ," would otherwise mean every backend
        raise ConfigError("--backends is empty: name at least one backend, or leave it out "
                          "for every available one")
    if args.json:  # a folder, a dangling link, a path below a file: refused before any work
        output_kind(args.json)
    build = open_build(args.artifacts)
    layout, cfg, contract = build.layout, build.cfg, build.contract
    source = load_build_source(build)
    # The native HMUTransformer keeps its own reference path; other sources run their graphs.
    model = reference_model(source)
    backends = layout_backends(layout.root, cfg, model, contract, args.backends)
    with ui.progress() as bar:
        task = bar.add_task("parity", total=None)
        report = run_parity(model, cfg, backends, contract, shapes=args.shapes,
                            on_step=lambda s: bar.update(task, description=s, advance=1))
    write_reports(report, layout.parity_dir)
    try:
        if args.json:
            write_json(args.json, report.to_dict())
    finally:  # the new parity/ is recorded even when --json fails (/dev/full): the build verifies
        if layout.manifest.is_file():
            wrote_json = args.json is not None and Path(args.json).exists()
            update_manifest(layout.root, "parity", StageResult(
                OK if report.passed else FAILED, details=summary(report)),
                extra={"parity": summary(report)},
                written=[layout.parity_dir] + ([args.json] if wrote_json else []))
    rows = []
    for backend in dict.fromkeys(r.backend for r in report.results):
        rs = [r for r in report.results if r.backend == backend and r.output == report.output]
        tops = [r.top1_agreement for r in rs if r.top1_agreement is not None]
        rows.append((backend, rs[0].precision, len(rs), f"{max(r.max_abs for r in rs):.2e}",
                     f"{min(r.cosine for r in rs):.6f}", f"{min(tops):.4f}" if tops else "-",
                     "pass" if all(r.passed for r in rs) else "FAIL"))
    ui.out.print(ui.table(f"parity: {'PASSED' if report.passed else 'FAILED'} "
                          f"({len(report.grid)} shapes) vs {report.reference} -> "
                          f"{layout.parity_dir}",
                          ("backend", "precision", "shapes", f"max abs ({report.output})",
                           "min cosine",
                           "min top1", "result"), rows))
    for c in report.checks:
        if not c.passed:
            ui.err.print(f"[red]check failed[/red] {c.backend} {c.name}: {c.detail}")
    for name, reason in report.skipped.items():
        ui.err.print(f"[yellow]skipped[/yellow] {name}: {reason}")
    if not report.passed:
        why = (report.failures()[0] if report.failures() else
               "no backend ran (" + "; ".join(f"{n}: {r}" for n, r in report.skipped.items())
               + ")" if report.skipped else "no result")
        ui.err.print(f"error: parity failed: {why}", markup=False, highlight=False)
        return 1
    return 0
