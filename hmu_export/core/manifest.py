"""manifest.json: every artifact with its sha256, the stages' status, profile and versions.

Other tools read it (keep the documented fields): ``artifacts[{path, sha256, bytes}]``,
``stages{name: {status, reason?}}``, ``profile{batch, src_len, tgt_len}``, ``versions{}``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ArtifactError
from .fileio import read_json_object, sha256_file, write_json

MANIFEST_VERSION = 1
OK, SKIPPED, FAILED = "ok", "skipped", "failed"


@dataclass
class StageResult:
    status: str  # ok | skipped | failed
    reason: str = ""
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "seconds": round(self.seconds, 3)}
        if self.reason:
            out["reason"] = self.reason
        if self.details:
            out["details"] = self.details
        return out


def list_artifacts(root: Path, only: Callable[[str], bool] | None = None
                   ) -> list[dict[str, Any]]:
    """Every file under ``root`` (or those whose relative path passes ``only``) except the
    manifest and hidden temp files, sorted by path."""
    rows = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == "manifest.json" or any(part.startswith(".") for part in Path(rel).parts):
            continue
        if only is not None and not only(rel):
            continue
        rows.append({"path": rel, "sha256": sha256_file(path), "bytes": path.stat().st_size})
    return rows


def write_manifest(root: Path, *, stages: dict[str, StageResult] | dict[str, dict[str, Any]],
                   profile: dict[str, list[int]], versions: dict[str, str],
                   extra: dict[str, Any] | None = None) -> Path:
    data: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "artifacts": list_artifacts(root),
        "stages": {k: (v.to_dict() if isinstance(v, StageResult) else v)
                   for k, v in stages.items()},
        "profile": profile,
        "versions": versions,
    }
    data.update(extra or {})
    return write_json(root / "manifest.json", data)


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of a build folder, checked against its schema (one-line ArtifactError)."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        old = interrupted_swap(Path(root))
        if old is not None:
            raise ArtifactError(f"{root} is missing: a build was interrupted while replacing it "
                                f"and the previous build is in {old} (the next `build` into "
                                f"{root} restores it first, or rename it back)")
        raise ArtifactError(f"no manifest.json in {root}: not a build folder "
                            "(run `python -m hmu_export build` first)")
    data = read_json_object(path, ArtifactError, "manifest")
    validate_manifest(data, path)
    return data


def failed_build(data: dict[str, Any]) -> str:
    """Why a manifest records a failed build ("" for a good one): a build that failed is kept
    as ``<out>.failed/`` for inspection only, and no command reads it as a build."""
    if data.get("ok") is not False:
        return ""
    stages = data.get("stages") if isinstance(data.get("stages"), dict) else {}
    for name, st in stages.items():
        if isinstance(st, dict) and st.get("status") == FAILED:
            reason = str(st.get("reason", "")).splitlines()
            return f"stage '{name}' failed" + (f": {reason[0]}" if reason else "")
    return "it did not finish"


def refuse_failed(data: dict[str, Any], root: Path) -> None:
    """An ArtifactError when the manifest of ``root`` records a failed build."""
    why = failed_build(data)
    if why:
        raise ArtifactError(f"{root} is a failed build, kept for inspection only ({why}): no "
                            "command reads it; fix the failure and run `build` again")


def interrupted_swap(out: Path) -> Path | None:
    """The hidden previous build that an interrupted swap left beside a missing ``out``."""
    out = Path(out).absolute()
    if not out.name:
        return None
    old = out.with_name(f".{out.name}.old")
    return old if old.is_dir() and not out.exists() else None


_SHA256_HEX = frozenset("0123456789abcdef")


def validate_manifest(data: dict[str, Any], path: Path) -> None:
    """The documented fields have the documented types; names the first one that does not."""
    def bad(msg: str) -> ArtifactError:
        return ArtifactError(f"corrupt manifest {path}: {msg}")

    if "artifacts" not in data or "stages" not in data:
        raise bad("missing 'artifacts' or 'stages'")
    rows = data["artifacts"]
    if not isinstance(rows, list):
        raise bad(f"'artifacts' must be a list, got {type(rows).__name__}")
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise bad(f"artifacts[{i}] must be an object, got {type(row).__name__}")
        for key in ("path", "sha256", "bytes"):
            if key not in row:
                raise bad(f"artifacts[{i}] has no '{key}'")
        rel, digest, size = row["path"], row["sha256"], row["bytes"]
        if not isinstance(rel, str) or not rel:
            raise bad(f"artifacts[{i}].path must be a non-empty string, got {rel!r}")
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _SHA256_HEX:
            raise bad(f"artifacts[{i}].sha256 must be 64 lowercase hex digits, got {digest!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise bad(f"artifacts[{i}].bytes must be an integer >= 0, got {size!r}")
        check_relative(rel, path)
        if rel in seen:
            raise bad(f"'{rel}' is listed twice")
        seen.add(rel)
    stages = data["stages"]
    if not isinstance(stages, dict):
        raise bad(f"'stages' must be an object, got {type(stages).__name__}")
    for name, st in stages.items():
        if not isinstance(st, dict) or st.get("status") not in (OK, SKIPPED, FAILED):
            raise bad(f"stages.{name} must be an object with status ok, skipped or failed")
        if not isinstance(st.get("reason", ""), str):
            raise bad(f"stages.{name}.reason must be a string")
    for key in ("profile", "versions"):
        if key in data and not isinstance(data[key], dict):
            raise bad(f"'{key}' must be an object, got {type(data[key]).__name__}")


def check_relative(rel: str, manifest: Path) -> None:
    """A manifest path names a file inside the build: relative, no '..', no backslash."""
    parts = rel.split("/")
    if (rel.startswith("/") or "\\" in rel or "\0" in rel or any(p in ("", ".", "..")
                                                                 for p in parts)):
        raise ArtifactError(f"corrupt manifest {manifest}: artifact path {rel!r} is not a plain "
                            "relative path inside the build folder")


def verify_artifacts(root: Path, manifest: dict[str, Any]) -> list[str]:
    """Paths whose bytes no longer match the manifest (missing files included), then files in
    the folder that the manifest does not list (``'<path> (not listed)'``)."""
    root = Path(root)
    real_root = root.resolve()
    bad = []
    for row in manifest["artifacts"]:
        path = root / row["path"]
        if not path.resolve().is_relative_to(real_root):  # a symlink out of the folder
            bad.append(f"{row['path']} (outside the build folder)")
        elif (not path.is_file() or path.stat().st_size != row["bytes"]
              or sha256_file(path) != row["sha256"]):
            bad.append(row["path"])
    listed = {row["path"] for row in manifest["artifacts"]} | {"manifest.json"}
    for path in sorted(p for p in root.rglob("*") if not p.is_dir() or p.is_symlink()):
        rel = path.relative_to(root).as_posix()
        if rel not in listed:
            bad.append(f"{rel} (not listed)")
    return bad


def bytecode_hint(bad: list[str]) -> str:
    """How to avoid the one unlisted file a user makes without meaning to: the __pycache__ a
    tritonserver writes into the build's own triton/ folder (still refused: a .pyc runs in
    place of its source)."""
    if not any("__pycache__/" in b for b in bad):
        return ""
    return ("; __pycache__ is Python's bytecode cache, written when a tritonserver served this "
            "folder: delete it, and serve with PYTHONDONTWRITEBYTECODE=1 (`python -m "
            "hmu_export triton` sets it) or from a copy")


def verify_build(root: Path) -> dict[str, Any]:
    """The manifest, once every file matches it; else an ArtifactError naming the files."""
    data = read_manifest(root)
    bad = verify_artifacts(root, data)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ArtifactError(f"{len(bad)} artifact(s) in {root} changed since the build "
                            f"(manifest.json disagrees): {shown}{bytecode_hint(bad)}")
    return data


def update_manifest(root: Path, stage: str | None, result: StageResult | None,
                    extra: dict[str, Any] | None = None, *,
                    written: list[Path] | None = None) -> Path:
    """Record one stage run on an existing build. Only the rows of ``written`` (files, or
    folders meaning every file under them, the command's own outputs) are re-hashed; every
    other row stays as the build recorded it, so a changed file is never laundered."""
    root = Path(root)
    data = read_manifest(root)
    stages = dict(data["stages"])
    if stage is not None and result is not None:
        stages[stage] = result.to_dict()
    real_root = root.resolve()
    prefixes = []
    for w in written or []:
        w = Path(w)
        full = w.resolve()  # as the command wrote it: absolute, or relative to the cwd
        if full.is_relative_to(real_root):
            prefixes.append(full.relative_to(real_root).as_posix())

    def mine(rel: str) -> bool:
        return any(rel == p or rel.startswith(p + "/") for p in prefixes)

    rows = [r for r in data["artifacts"] if not mine(r["path"])]
    rows += list_artifacts(root, only=mine)
    rest = {k: v for k, v in data.items()
            if k not in ("artifacts", "stages", "profile", "versions")}
    rest.update(extra or {})
    out: dict[str, Any] = {**rest, "manifest_version": data.get("manifest_version",
                                                                MANIFEST_VERSION),
                           "artifacts": sorted(rows, key=lambda r: r["path"]),
                           "stages": stages, "profile": data.get("profile", {}),
                           "versions": data.get("versions", {})}
    return write_json(root / "manifest.json", out)
