"""`engine`: (re)build the TensorRT engine and recipe of an existing build folder."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ArtifactError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("engine", help="write build_engine.sh and build the TensorRT engine of a "
                                      "build folder (where TensorRT and a GPU exist)")
    p.add_argument("--artifacts", required=True, type=Path, help="build folder (has model.onnx)")
    p.add_argument("--require-engine", action="store_true",
                   help="exit non-zero when the engine cannot be built here")
    p.set_defaults(func=run)


def rebuild_engine(root: Path, require_engine: bool = False):  # type: ignore[no-untyped-def]
    """Re-run the engine stage on ``root`` and record it in its manifest; returns the result."""
    from ..artifacts import BuildLayout
    from ..engine import engine_stage
    from ..export import load_graph_contract
    from ..manifest import read_manifest, update_manifest, verify_artifacts
    from ..pipeline import BuildContext

    layout = BuildLayout(Path(root))
    manifest = read_manifest(layout.root)
    changed = [p for p in verify_artifacts(layout.root, manifest) if p == layout.onnx.name]
    if changed:
        raise ArtifactError(f"{layout.onnx} changed since the build (sha256 differs from "
                            "manifest.json): rebuild the folder with `python -m hmu_export build`")
    _, cfg, contract = load_graph_contract(layout.onnx)
    ctx = BuildContext(cfg, layout, require_engine=require_engine, contract=contract)
    result = engine_stage(ctx)
    update_manifest(layout.root, "engine", result, extra={"engine": ctx.data.get("engine", {})})
    return result


def run(args: argparse.Namespace) -> int:
    from .. import ui

    result = rebuild_engine(args.artifacts, args.require_engine)
    rows = [("engine", result.status, result.reason or "-")]
    ui.out.print(ui.table("TensorRT engine", ["stage", "status", "reason"], rows))
    recipe = Path(args.artifacts) / "build_engine.sh"
    ui.out.print(f"recipe: {recipe}")
    return 1 if result.status == "failed" else 0
