"""Task sets: JSON lines of ``{"source": ..., "target": ...}`` texts that a build's model
should map one to the other (the demo's numbers-to-words test set, a user's own).

Parity measures exact-match accuracy on them; the trainer writes and reads them. A file is
read in bounded lines (a line over ``MAX_LINE_BYTES`` or a file over ``MAX_FILE_BYTES`` is an
error naming it, never an unbounded read), and every problem is one line naming file and line.
"""
from __future__ import annotations

from pathlib import Path

from .errors import InputError
from .fileio import json_lines

Pair = tuple[str, str]

MAX_LINE_BYTES = 64 * 1024
MAX_FILE_BYTES = 256 * 1024 * 1024


def read_pairs(path: str | Path, limit: int = 0) -> list[Pair]:
    """(source, target) texts of a JSONL task set, the first ``limit`` (0: all)."""
    path = Path(path)
    out: list[Pair] = []
    try:
        if path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
            raise InputError(f"task set {path} is over {MAX_FILE_BYTES >> 20} MiB")
    except OSError as exc:
        raise InputError(f"cannot read task set {path}: {exc.strerror or exc}") from None
    for where, obj in json_lines(path, "task set", MAX_LINE_BYTES):
        if limit and len(out) >= limit:
            break
        out.append(_pair(obj, where))
    if not out:
        raise InputError(f"task set {path} holds no examples")
    return out


def _pair(obj: object, where: str) -> Pair:
    if not (isinstance(obj, dict) and isinstance(obj.get("source"), str)
            and isinstance(obj.get("target"), str)):
        raise InputError(f'{where}: expected {{"source": "...", "target": "..."}} with '
                         "text values")
    extra = sorted(set(obj) - {"source", "target"})
    if extra:
        raise InputError(f"{where}: unknown key(s) {', '.join(map(repr, extra))} (a line "
                         'holds "source" and "target")')
    for key in ("source", "target"):
        text = obj[key]
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"{where}: {key} holds a lone surrogate (not Unicode text)"
                             ) from None
        if not text.strip():
            raise InputError(f"{where}: {key} is empty")
    return obj["source"], obj["target"]
