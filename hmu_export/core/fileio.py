"""Atomic writes and hashing: an artifact is either complete and verified, or absent."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from .errors import ArtifactError, InputError


#: where a path names a file descriptor or a device, not a file (/dev/stdout, /proc/self/fd/1)
STREAM_DIRS = ("/dev/", "/proc/")


def output_kind(target: Path) -> tuple[str, Path]:
    """How ``target`` is written, as (kind, path): ``"file"`` (a regular file, or none yet:
    written beside it and renamed over it) at ``path``, which is the file a symbolic link
    resolves to (the link itself is kept); or ``"stream"`` (a character device such as
    /dev/null, a FIFO, or a descriptor alias under /dev or /proc such as /dev/stdout): written
    in place, appended, never renamed over. Anything else (a folder, a block device, a socket,
    a dangling link) is a one-line ArtifactError: nothing is written."""
    target = Path(target)
    absolute = os.path.abspath(target)
    try:
        st: os.stat_result | None = os.stat(target)  # follows links
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise ArtifactError(f"cannot write {target}: {exc.strerror or exc}") from None
    if st is None:
        if os.path.islink(target):
            raise ArtifactError(f"cannot write {target}: it is a symbolic link to "
                                f"{os.readlink(target)}, which does not exist (nothing written)")
        if absolute.startswith(STREAM_DIRS):
            raise ArtifactError(f"cannot write {target}: no such device or descriptor")
        return "file", target
    mode = st.st_mode
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode) or (
            absolute.startswith(STREAM_DIRS) and not stat.S_ISDIR(mode)):
        return "stream", target
    if stat.S_ISREG(mode):
        return "file", Path(os.path.realpath(target)) if os.path.islink(target) else target
    kind = ("a folder" if stat.S_ISDIR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    raise ArtifactError(f"cannot write {target}: it is {kind} (name a file; nothing written)")


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path; on success its bytes become ``target``, else nothing changes.

    A regular file (or a new one) is replaced by a rename from beside it, keeping the old
    file's permissions; a symbolic link is kept and the file it points to is replaced. A
    character device (/dev/null), a FIFO or a descriptor alias (/dev/stdout) is never renamed
    over: the bytes are written into it (a FIFO without a reader is an error, not a hang).
    Folders, block devices and sockets are refused (``output_kind``)."""
    kind, real = output_kind(Path(target))
    if kind == "stream":
        with _streamed(Path(target)) as tmp:
            yield tmp
        return
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent)
    except OSError as exc:
        raise ArtifactError(f"cannot write to {real.parent}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        try:  # an existing file keeps its mode; a new one gets the usual umask-derived mode
            mode = stat.S_IMODE(os.stat(real).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~current_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, real)
    except OSError as exc:  # disk full, quota, I/O error: one line, nothing half-written
        raise ArtifactError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


#: how long a FIFO may go without a reader before writing to it is an error
FIFO_WAIT_S = 5.0


def _open_stream(target: Path) -> int:
    """``target`` opened for appending; a FIFO gets FIFO_WAIT_S for a reader to open it (an
    unread FIFO would block a plain open forever), then an ArtifactError."""
    import time

    deadline = time.monotonic() + FIFO_WAIT_S
    while True:
        try:
            return os.open(target, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            if time.monotonic() >= deadline:
                raise ArtifactError(f"cannot write {target}: it is a FIFO and no process "
                                    f"opened it for reading within {FIFO_WAIT_S:g} s") from None
            time.sleep(0.05)


@contextlib.contextmanager
def _streamed(target: Path) -> Iterator[Path]:
    """Yield a private temporary file; on success copy it into the device, FIFO or descriptor
    ``target`` (opened for appending, never truncated or replaced)."""
    import fcntl

    fd, name = tempfile.mkstemp(prefix="hmu-export-", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        out = _open_stream(target)
        try:
            flags = fcntl.fcntl(out, fcntl.F_GETFL)
            fcntl.fcntl(out, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
            with open(tmp, "rb") as src:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(out, view):]
        finally:
            os.close(out)
    except OSError as exc:  # /dev/full, a closed pipe, an I/O error: one line
        raise ArtifactError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(target: Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return target


def write_png(fig: Any, target: Path) -> Path:
    """A matplotlib figure saved whole (temporary file, then rename) and closed: every report
    plot is written this way."""
    import matplotlib.pyplot as plt

    with atomic_path(Path(target)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(target)


def write_json(target: Path, data: Any) -> Path:
    return write_text(target, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json_object(path: Path, error: type[Exception], what: str) -> dict[str, Any]:
    """A JSON object from ``path``, or ``error`` naming ``what`` is corrupt (one line)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise error(f"corrupt {what} {path}: {exc}") from None
    except RecursionError:
        raise error(f"corrupt {what} {path}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise error(f"corrupt {what} {path}: not a JSON object")
    return data


def open_input(path: Path, what: str) -> BinaryIO:
    """``path`` opened for reading (binary): a regular file, a character device or a FIFO (a
    pipe). The open never blocks: a FIFO without a writer reads as empty (a plain open() would
    wait for a writer forever). A missing path, a folder, a block device or a socket is one
    InputError naming ``what`` ("data file", "input")."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{what} {path} is a folder: name a file")
    if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
        raise InputError(f"{what} {path} is not a file (a block device or a socket)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


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


# ------------------------------------------------------------------ files replaced together
JOURNAL_SUFFIX = ".commit.json"


class FileSet:
    """Files replaced as one unit (e.g. fine-tuned weights, their log and their plot).

    ``path(final)`` gives the path to write each file at, in a staging folder beside it (the
    same file system, so a rename puts it in place). ``commit()`` then writes a journal (its
    list of staged -> final renames) beside every final file, renames each staged file over
    its final path, removes what ``remove`` named, and deletes the journals. A failure or a
    kill before the journals exist leaves every final file as it was (``close``, or the next
    ``recover_file_set``, removes the staging folders); a kill after is finished by
    ``recover_file_set`` (it renames what is still staged). So the set is all old or all new,
    and until a kill is recovered ``pending_file_set`` tells readers the file is mid-commit."""

    def __init__(self, journal_name: str) -> None:
        self.journal_name = journal_name  # e.g. ".hmu.safetensors.commit.json", per folder
        self.staged: dict[Path, Path] = {}  # final -> staged
        self.removed: list[Path] = []
        self.folders: dict[Path, Path] = {}  # parent -> its staging folder
        self.created: list[Path] = []  # parents made for the set (removed if never committed)
        self.committed = False

    def path(self, final: Path) -> Path:
        """Where to write ``final``'s new bytes (its staging copy)."""
        kind, real = output_kind(Path(final))
        if kind != "file":
            raise ArtifactError(f"cannot write {final}: it is not a regular file")
        real = Path(os.path.realpath(real))
        if real not in self.staged:
            staging = self.folders.get(real.parent)
            if staging is None:
                try:
                    missing = [p for p in (real.parent, *real.parent.parents) if not p.exists()]
                    real.parent.mkdir(parents=True, exist_ok=True)
                    self.created += missing
                    staging = Path(tempfile.mkdtemp(prefix=f"{self.journal_name}.staging-",
                                                    dir=real.parent))
                except OSError as exc:
                    raise ArtifactError(f"cannot write to {real.parent}: "
                                        f"{exc.strerror or exc}") from None
                self.folders[real.parent] = staging
            self.staged[real] = staging / real.name
        return self.staged[real]

    def remove(self, final: Path) -> None:
        """Delete ``final`` (an earlier output that this set no longer has) on commit, instead
        of replacing it."""
        real = Path(os.path.realpath(final))
        staged = self.staged.pop(real, None)
        if staged is not None:
            staged.unlink(missing_ok=True)
        self.removed.append(real)

    def commit(self) -> None:
        journal = {"files": [[str(s), str(f)] for f, s in self.staged.items()],
                   "remove": [str(r) for r in self.removed],
                   "staging": [str(s) for s in self.folders.values()]}
        try:
            for staged in self.staged.values():
                if not staged.is_file():
                    raise ArtifactError(f"{staged.name} was not written")
                os.chmod(staged, _final_mode(staged, self.staged))
                _fsync(staged)
            parents = sorted({f.parent for f in self.staged} | {r.parent for r in self.removed})
            for parent in parents:
                write_json(parent / self.journal_name, journal)
        except OSError as exc:
            self._drop_journals()
            raise ArtifactError(f"cannot write {self.journal_name[1:-len(JOURNAL_SUFFIX)]} "
                                f"and its companions: {exc.strerror or exc}") from None
        except ArtifactError:
            self._drop_journals()
            raise
        _apply_journal(journal, [p / self.journal_name for p in parents])
        self.committed = True

    def _drop_journals(self) -> None:
        for parent in {f.parent for f in self.staged} | {r.parent for r in self.removed}:
            (parent / self.journal_name).unlink(missing_ok=True)

    def close(self) -> None:
        """Remove the staging folders (after a commit they are empty; after a failure they
        hold the uncommitted files)."""
        import shutil

        for staging in self.folders.values():
            shutil.rmtree(staging, ignore_errors=True)
        if not self.committed:
            for folder in self.created:  # deepest first; only if still empty
                try:
                    folder.rmdir()
                except OSError:
                    pass

    def __enter__(self) -> "FileSet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _final_mode(staged: Path, staged_map: dict[Path, Path]) -> int:
    final = next(f for f, s in staged_map.items() if s == staged)
    try:
        return stat.S_IMODE(os.stat(final).st_mode)  # a replaced file keeps its mode
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _apply_journal(journal: dict[str, Any], copies: list[Path]) -> None:
    """Rename every staged file still there over its final path, remove what is listed, then
    the staging folders and the journal copies (each step can be repeated after a kill)."""
    import shutil

    try:
        for staged, final in journal.get("files", []):
            if Path(staged).exists():
                os.replace(staged, final)
        for gone in journal.get("remove", []):
            Path(gone).unlink(missing_ok=True)
        for staging in journal.get("staging", []):
            shutil.rmtree(staging, ignore_errors=True)
        for copy in copies:
            copy.unlink(missing_ok=True)
    except OSError as exc:
        raise ArtifactError(f"cannot put the new files in place ({exc.strerror or exc}); the "
                            f"next run finishes it (journal {copies[0]})") from None


def recover_file_set(journal: Path) -> str | None:
    """Finish a FileSet commit that a kill interrupted (its journal ``journal`` is still
    there), and remove staging folders of sets that never reached their commit. Returns a
    note when something was finished. Call it holding the outputs' lock."""
    import shutil

    journal = Path(journal)
    for stale in journal.parent.glob(f"{journal.name}.staging-*"):
        if stale.is_dir() and not stale.is_symlink() and not journal.is_file():
            shutil.rmtree(stale, ignore_errors=True)
    if not journal.is_file():
        return None
    data = read_json_object(journal, ArtifactError, "commit journal")
    files = data.get("files", [])
    if not isinstance(files, list) or not all(isinstance(p, list) and len(p) == 2 and
                                              all(isinstance(x, str) for x in p)
                                              for p in files):
        raise ArtifactError(f"corrupt commit journal {journal}: remove it (and the staging "
                            "folders beside it) by hand")
    parents = {Path(f).parent for _, f in files} | {Path(r).parent
                                                     for r in data.get("remove", [])}
    _apply_journal(data, [p / journal.name for p in parents] + [journal])
    return f"finished an interrupted commit of {', '.join(Path(f).name for _, f in files)}"


def pending_file_set(path: Path) -> Path | None:
    """The journal of an interrupted FileSet commit that ``path`` belongs to (its files are
    then a mix of old and new until the next run of the command that wrote them), or None."""
    path = Path(os.path.realpath(path))
    for journal in path.parent.glob(f".*{JOURNAL_SUFFIX}"):
        try:
            data = json.loads(journal.read_text(encoding="utf-8"))
            finals = {f for _, f in data.get("files", [])} | set(data.get("remove", []))
        except (OSError, ValueError, TypeError, AttributeError):
            continue
        if str(path) in finals:
            return journal
    return None


def text_lines(path: Path, what: str, max_line_bytes: int, hint: str = ""
               ) -> Iterator[tuple[int, str]]:
    """(line number, text) of a text file, each line read with a bound and decoded as UTF-8;
    every problem is one InputError naming file and line (``hint`` ends the too-long one). The
    file is opened with ``open_input`` (a FIFO without a writer reads as empty)."""
    f = open_input(path, what)
    with f:
        n = 0
        while True:
            n += 1
            try:
                raw = f.readline(max_line_bytes + 2)
            except OSError as exc:
                raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
            if not raw:
                return
            body = raw[:-1] if raw.endswith(b"\n") else raw
            if len(body) > max_line_bytes:
                raise InputError(f"{path}:{n}: the line is longer than {max_line_bytes:,} "
                                 f"bytes, the limit of one {what} line{hint}")
            try:
                yield n, body.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}:{n}: not UTF-8 text (byte {exc.start})") from None


def json_lines(path: Path, what: str, max_line_bytes: int, hint: str = ""
               ) -> Iterator[tuple[str, Any]]:
    """(where, value) of every non-blank line of a JSON-lines file read by ``text_lines``;
    ``where`` is ``path:line`` for the caller's own one-line errors about the value."""
    for n, line in text_lines(path, what, max_line_bytes, hint):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            yield where, json.loads(line)
        except RecursionError:
            raise InputError(f"{where}: JSON nested too deeply") from None
        except ValueError as exc:
            raise InputError(f"{where}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
