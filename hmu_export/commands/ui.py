"""Terminal output: progress on stderr, results (tables) on stdout, via rich."""
from __future__ import annotations

from typing import Iterable, Sequence

from rich.console import Console
from rich.table import Table

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

STATUS_STYLE = {"ok": "green", "skipped": "yellow", "failed": "red", "pass": "green",
                "FAIL": "red"}


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> Table:
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col, overflow="fold")
    for row in rows:
        cells = []
        for cell in row:
            text = str(cell)
            style = STATUS_STYLE.get(text)
            cells.append(f"[{style}]{text}[/{style}]" if style else text)
        t.add_row(*cells)
    return t


def progress(transient: bool = True):  # type: ignore[no-untyped-def]
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, transient=transient)
