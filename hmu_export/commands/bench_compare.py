"""`bench --compare`: the options' checks and the printed / written report (the comparison
itself is bench/compare.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..bench.compare import (CONSOLE_HEADER, baseline_path, compare_runs, console_rows,
                             extra_notes, load_run, short_lines, summary_line, to_markdown)
from ..bench.machine import cpu_model
from ..core.errors import ConfigError
from ..core.fileio import write_json, write_text
from . import ui


def check_compare_args(args: Any) -> None:
    """--current/--short/--compare-threshold need --compare; --compare is the forward bench's."""
    if args.compare is None:
        raise ConfigError("--current and --short need --compare BASELINE.json (or auto)")
    if args.generate:
        raise ConfigError("--compare applies to the forward bench, not --generate")
    if not 0 <= args.compare_threshold < 100:
        raise ConfigError(f"--compare-threshold must be a percentage in [0, 100), got "
                          f"{args.compare_threshold}")


def load_baseline(args: Any, cpu: str | None = None) -> tuple[Path, dict[str, Any]] | None:
    """(path, data) of --compare's baseline; None (after saying so) when --compare auto finds
    no baseline for this machine class, which is a report, not an error."""
    if args.compare != "auto":
        return Path(args.compare), load_run(Path(args.compare))
    if cpu is None:
        cpu = cpu_model()
    path = baseline_path(cpu)
    if not path.is_file():
        ui.out.print(f"compare: no baseline for this machine class ({cpu!r}): expected {path}; "
                     f"record one with `bench ... --json {path}`")
        return None
    return path, load_run(path)


def compare_report(args: Any, baseline: tuple[Path, dict[str, Any]] | None,
                   run: dict[str, Any], out_dir: Path | None = None) -> int:
    """Print the comparison (table, or --short lines); write compare.json/.md into
    ``out_dir`` when given. Exit status 0 whatever the verdicts."""
    if baseline is None:
        return 0
    path, base = baseline
    cmp = compare_runs(base, run, baseline=str(path), threshold=args.compare_threshold / 100)
    if args.short:
        for line in short_lines(cmp):
            ui.out.print(line, highlight=False, markup=False)
    else:
        ui.out.print(summary_line(cmp), highlight=False, markup=False)
        ui.out.print(ui.table("", CONSOLE_HEADER, console_rows(cmp)))
        if any(r["method"] != "bootstrap" for r in cmp.rows):
            ui.out.print("* from recorded p50/p90 and call counts, not samples (weaker)")
        for n in extra_notes(cmp):
            ui.out.print(f"[yellow]note[/yellow] {n}", highlight=False)
    if out_dir is not None:
        write_json(Path(out_dir) / "compare.json", cmp.to_dict())
        write_text(Path(out_dir) / "compare.md", to_markdown(cmp))
        ui.out.print(f"wrote {Path(out_dir) / 'compare.json'}, {Path(out_dir) / 'compare.md'}")
    return 0


def compare_stored(args: Any) -> int:
    """`bench --compare BASELINE --current RUN.json`: two stored runs, no timing."""
    run = load_run(args.current, "run")
    baseline = load_baseline(args, cpu=(run.get("machine") or {}).get("cpu") or "")
    return compare_report(args, baseline, run, args.out)
