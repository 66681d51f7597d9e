"""Opening an existing build folder: one place that checks it and reads what it records."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from .artifacts import BuildLayout
from .config import BuildConfig
from .errors import ArtifactError
from .export import load_graph_contract
from .io_contract import GraphContract
from .model import HMUTransformer, load_checkpoint


@dataclass(frozen=True)
class BuildFolder:
    layout: BuildLayout
    cfg: BuildConfig
    contract: GraphContract
    proto: onnx.ModelProto  # model.onnx, loaded without external weights

    def load_model(self) -> HMUTransformer:
        """The PyTorch reference from the build's checkpoint/."""
        return load_checkpoint(self.layout.checkpoint_dir)


def open_build(root: str | Path) -> BuildFolder:
    """Config and contract recorded in a build's model.onnx, or a one-line ArtifactError."""
    layout = BuildLayout(Path(root))
    if not layout.root.is_dir():
        raise ArtifactError(f"artifacts folder not found: {layout.root}")
    if not layout.onnx.is_file():
        raise ArtifactError(f"{layout.onnx} not found: not a build folder (run "
                            "`python -m hmu_export build` first)")
    proto, cfg, contract = load_graph_contract(layout.onnx)
    return BuildFolder(layout, cfg, contract, proto)
