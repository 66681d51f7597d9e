"""Opening an existing build folder: one place that checks it and reads what it records."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from .layout import BuildLayout
from .config import BuildConfig
from .errors import ArtifactError
from .graph_meta import load_graph_contract
from .io_contract import GraphContract



@dataclass(frozen=True)
class BuildFolder:
    layout: BuildLayout
    cfg: BuildConfig
    contract: GraphContract
    proto: onnx.ModelProto  # model.onnx, loaded without external weights


def open_build(root: str | Path, verify: bool = True) -> BuildFolder:
    """Config and contract recorded in a build's model.onnx, or a one-line ArtifactError.

    Every command that reads a build opens it here. The folder must hold a manifest.json of a
    build that succeeded: a folder without one is nobody's verified build (files could have
    been swapped with the manifest removed), and ``<out>.failed/`` is for inspection only.
    With ``verify`` (always, except right after a caller verified it) every file must match the
    manifest first (hashes, sizes, nothing unlisted), so no command ever computes from, or
    records over, a tampered artifact. ``export --config`` and ``build`` write manifests; a
    folder made by hand (tests) gets one with ``core.manifest.write_manifest``."""
    from .manifest import interrupted_swap, read_manifest, refuse_failed, verify_build

    layout = BuildLayout(Path(root))
    if not layout.root.is_dir():
        old = interrupted_swap(layout.root)
        if old is not None:
            raise ArtifactError(f"artifacts folder not found: {layout.root} (a build was "
                                f"interrupted while replacing it; the previous build is in "
                                f"{old}: the next `build` into it restores it first, or rename "
                                "it back)")
        raise ArtifactError(f"artifacts folder not found: {layout.root}")
    if layout.manifest.is_file():  # a failed build is named as one, whatever it lacks
        refuse_failed(read_manifest(layout.root), layout.root)
    elif layout.root.name.endswith(".failed"):
        raise ArtifactError(f"{layout.root} is the folder of a failed build (kept for "
                            "inspection only): no command reads it; fix the failure and run "
                            "`build` again")
    if not layout.onnx.is_file():
        raise ArtifactError(f"{layout.onnx} not found: not a build folder (run "
                            "`python -m hmu_export build` first)")
    if not layout.manifest.is_file():
        raise ArtifactError(f"{layout.root} has no manifest.json, so nothing in it can be "
                            "verified: commands read only builds made by `build` (or "
                            "`export --config`); build it again")
    if verify:
        verify_build(layout.root)
    proto, cfg, contract = load_graph_contract(layout.onnx)
    return BuildFolder(layout, cfg, contract, proto)
