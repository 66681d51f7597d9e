"""Atomic writes and hashing: an artifact is either complete and verified, or absent."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import ArtifactError


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` only on success."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise ArtifactError(f"cannot write to {target.parent}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # mkstemp creates 0600 files; artifacts get the usual umask-derived mode instead.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, target)
    except OSError as exc:  # disk full, quota, I/O error: one line, nothing half-written
        raise ArtifactError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(target: Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return target


def write_json(target: Path, data: Any) -> Path:
    return write_text(target, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json_object(path: Path, error: type[Exception], what: str) -> dict[str, Any]:
    """A JSON object from ``path``, or ``error`` naming ``what`` is corrupt (one line)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise error(f"corrupt {what} {path}: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"corrupt {what} {path}: not a JSON object")
    return data


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if needed) or raise a one-line
    ArtifactError at once when another process holds it. The lock dies with its process."""
    import fcntl

    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ArtifactError(f"cannot create the lock file {lock_path}: "
                            f"{exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ArtifactError(f"{what} is in use by another process (lock {lock_path}); "
                                "wait for it to finish") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock; the file stays (removing it would race)


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` and prove it is writable, or raise a one-line ArtifactError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as exc:
        raise ArtifactError(f"output folder {path} is not writable: "
                            f"{exc.strerror or exc}") from None
    return path
