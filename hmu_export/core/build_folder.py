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

    With ``verify`` (every command that reads a build), a folder with a manifest.json must
    match it file for file first (hashes, sizes, nothing unlisted), so no command ever computes
    from, or records over, a tampered artifact. A folder without one (a bare ``export``) is
    read as it is; commands record nothing in it."""
    from .manifest import interrupted_swap, verify_build

    layout = BuildLayout(Path(root))
    if not layout.root.is_dir():
        old = interrupted_swap(layout.root)
        if old is not None:
            raise ArtifactError(f"artifacts folder not found: {layout.root} (a build was "
                                f"interrupted while replacing it; the previous build is in "
                                f"{old}: the next `build` into it restores it first, or rename "
                                "it back)")
        raise ArtifactError(f"artifacts folder not found: {layout.root}")
    if not layout.onnx.is_file():
        raise ArtifactError(f"{layout.onnx} not found: not a build folder (run "
                            "`python -m hmu_export build` first)")
    if verify and layout.manifest.is_file():
        verify_build(layout.root)
    proto, cfg, contract = load_graph_contract(layout.onnx)
    return BuildFolder(layout, cfg, contract, proto)
