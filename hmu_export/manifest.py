"""manifest.json: every artifact with its sha256, the stages' status, profile and versions.

Other tools read it (keep the documented fields): ``artifacts[{path, sha256, bytes}]``,
``stages{name: {status, reason?}}``, ``profile{batch, src_len, tgt_len}``, ``versions{}``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def list_artifacts(root: Path) -> list[dict[str, Any]]:
    """Every file under ``root`` except the manifest and hidden temp files, sorted by path."""
    rows = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == "manifest.json" or any(part.startswith(".") for part in Path(rel).parts):
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
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise ArtifactError(f"no manifest.json in {root}: not a build folder "
                            "(run `python -m hmu_export build` first)")
    data = read_json_object(path, ArtifactError, "manifest")
    if "artifacts" not in data or "stages" not in data:
        raise ArtifactError(f"corrupt manifest {path}: missing 'artifacts' or 'stages'")
    return data


def verify_artifacts(root: Path, manifest: dict[str, Any]) -> list[str]:
    """Paths whose bytes no longer match the manifest (missing files included)."""
    bad = []
    for row in manifest["artifacts"]:
        path = Path(root) / row["path"]
        if not path.is_file() or sha256_file(path) != row["sha256"]:
            bad.append(row["path"])
    return bad


def update_manifest(root: Path, stage: str, result: StageResult,
                    extra: dict[str, Any] | None = None) -> Path:
    """Record one stage run on an existing build and re-list its artifacts."""
    data = read_manifest(root)
    stages = dict(data["stages"])
    stages[stage] = result.to_dict()
    rest = {k: v for k, v in data.items()
            if k not in ("artifacts", "stages", "profile", "versions")}
    rest.update(extra or {})
    return write_manifest(Path(root), stages=stages, profile=data.get("profile", {}),
                          versions=data.get("versions", {}), extra=rest)
