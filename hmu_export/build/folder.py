"""A build's output folder: refusing what is not ours, one build per output (lock), the staging folder swapped in whole."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator
from ..core.errors import ArtifactError
from ..core.fileio import ensure_writable_dir, exclusive_lock, read_json_object


LOG_FILE = "build.log"


def resolve_out(out_dir: str | Path) -> Path:
    """``--out`` as an absolute path with a real name (``.``, ``..``, ``sub/..`` resolved)."""
    out = Path(out_dir).expanduser().resolve()
    if not out.name:
        raise ArtifactError(f"cannot build into {out}: choose a named folder for --out")
    return out


def failed_dir(out: Path) -> Path:
    return out.with_name(out.name + ".failed")


def is_build_folder(path: Path) -> bool:
    """A folder holding our manifest.json (a previous build, good or failed)."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        data = read_json_object(manifest, ArtifactError, "manifest")
    except ArtifactError:
        return False
    return "manifest_version" in data and "artifacts" in data


def check_target(out: Path, force: bool = False) -> None:
    """Refuse, before anything is built, to replace what is not ours: a file or other non-folder
    (even with --force), or a non-empty folder without our manifest.json (unless --force)."""
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        cwd = None
    if cwd is not None and cwd.is_relative_to(out):  # `--out .`: replaced from under the shell
        raise ArtifactError(f"--out {out} is (or contains) the current folder, which a build "
                            "replaces as a whole: name a folder outside it (e.g. --out ../NAME "
                            "from its parent)")
    for path, what in ((out, "--out"), (failed_dir(out), "the failed-build folder")):
        if not path.exists() and not path.is_symlink():
            continue
        if path.is_symlink() or not path.is_dir():
            kind = "a symbolic link" if path.is_symlink() else (
                "a file" if path.is_file() else "not a folder")
            raise ArtifactError(f"{what} {path} exists and is {kind}: choose another path "
                                "(nothing was written)")
        if force or is_build_folder(path) or (path / LOG_FILE).is_file():
            continue
        if any(path.iterdir()):
            raise ArtifactError(f"{what} {path} is not empty and holds no build of hmu_export "
                                "(no manifest.json): choose an empty or new folder, or pass "
                                "--force to replace it and everything in it")


def recover_swap(dst: Path) -> str | None:
    """Finish or undo a swap that a kill interrupted (``replace_dir`` renames ``dst`` to
    ``.<dst>.old``, then the staging folder to ``dst``). Call it under the output's lock."""
    old = dst.with_name(f".{dst.name}.old")
    if not old.exists() and not old.is_symlink():
        return None
    if old.is_symlink() or not old.is_dir():
        raise ArtifactError(f"{old} exists and is not a folder of a previous build: remove it")
    try:
        if dst.exists() or dst.is_symlink():  # both renames happened: only cleanup was cut
            shutil.rmtree(old)
            return None
        old.rename(dst)  # killed between the renames: the previous build comes back
    except OSError as exc:
        raise ArtifactError(f"cannot restore the previous build {old} to {dst}: "
                            f"{exc.strerror or exc}") from None
    return f"restored the previous build {dst} (an earlier build was interrupted replacing it)"


HELD: set[Path] = set()  # outputs this process has locked (lock_output is re-entrant)


@contextlib.contextmanager
def lock_output(out: Path) -> Iterator[None]:
    """One build per output at a time: an exclusive lock on ``.<out>.lock`` beside it (a second
    build into it is refused at once with one line). Re-entrant within this process."""
    out = resolve_out(out)
    if out in HELD:
        yield
        return
    ensure_writable_dir(out.parent)
    with exclusive_lock(out.parent / f".{out.name}.lock", f"the output {out}"):
        HELD.add(out)
        try:
            yield
        finally:
            HELD.discard(out)


def remove_stale_staging(out: Path) -> None:
    """Staging folders of builds that died (we hold the lock, so none is in use)."""
    for stale in out.parent.glob(f".{out.name}.staging*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_dir(src: Path, dst: Path) -> None:
    """Put ``src`` where ``dst`` is: ``dst`` -> ``.<dst>.old``, ``src`` -> ``dst``, drop the old.
    A failed second rename is rolled back at once; a kill between the renames is repaired by
    ``recover_swap`` on the next build (and reported by commands that read ``dst``)."""
    old = dst.with_name(f".{dst.name}.old")
    try:
        if old.exists():
            shutil.rmtree(old)
        if dst.exists():
            dst.rename(old)
        try:
            src.rename(dst)
        except OSError:
            if old.exists() and not dst.exists():
                old.rename(dst)  # roll back: the previous build stays where it was
            raise
    except OSError as exc:
        raise ArtifactError(f"cannot move the build into {dst}: {exc.strerror or exc}") from None
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
