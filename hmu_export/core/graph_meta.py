"""What an exported graph records about itself (``hmu_export.*`` metadata: the build config and
the graph's contract), read back with onnx alone: no torch here."""
from __future__ import annotations

import json
from pathlib import Path

import onnx

from .config import BuildConfig
from .errors import HMUExportError
from .io_contract import GraphContract, full_contract


META_PREFIX = "hmu_export."


def graph_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props
            if p.key.startswith(META_PREFIX)}


def load_graph_contract(path: Path) -> tuple[onnx.ModelProto, BuildConfig, GraphContract]:
    """Model, build config and contract recorded in an exported graph's metadata."""
    from .config import config_from_dict
    from .errors import ArtifactError

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError / OSError for corrupt or missing files
        raise ArtifactError(f"cannot read ONNX graph {path}: {exc}") from None
    meta = graph_metadata(proto)
    if "config" not in meta:
        raise ArtifactError(f"{path} was not exported by hmu_export (no {META_PREFIX}config)")
    try:
        data = json.loads(meta["config"])
        if not isinstance(data, dict):
            raise ValueError(f"not a JSON object but {type(data).__name__}")
        cfg = config_from_dict(data)
    except (ValueError, HMUExportError) as exc:  # JSONDecodeError is a ValueError
        raise ArtifactError(f"corrupt metadata in {path}: {META_PREFIX}config: {exc}") from None
    if "contract" in meta:
        try:
            return proto, cfg, GraphContract.from_dict(json.loads(meta["contract"]))
        except (ValueError, TypeError, KeyError, AttributeError, HMUExportError) as exc:
            raise ArtifactError(f"corrupt metadata in {path}: {META_PREFIX}contract: "
                                f"{type(exc).__name__}: {exc}") from None
    return proto, cfg, full_contract(cfg.model, cfg.export.diagnostics)
