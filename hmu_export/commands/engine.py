"""`engine`: (re)build the TensorRT engine and recipe of an existing build folder."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("engine", help="write build_engine.sh and build the TensorRT engine of a "
                                      "build folder (where TensorRT and a GPU exist)")
    p.add_argument("--artifacts", required=True, type=Path, help="build folder (has model.onnx)")
    p.add_argument("--require-engine", action="store_true",
                   help="exit non-zero when the engine cannot be built here")
    p.set_defaults(func=run)


def rebuild_engine(root: Path, require_engine: bool = False):  # type: ignore[no-untyped-def]
    """Re-run the engine stage on ``root`` and record it in its manifest; returns the result."""
    from ..core.build_folder import open_build
    from ..runners.tensorrt_runner import RECORD_FILE
    from ..build.stages.engine import engine_stage
    from ..core.manifest import update_manifest
    from ..build.context import BuildContext

    build = open_build(root)  # a verified build: every file matches its manifest
    layout, cfg, contract = build.layout, build.cfg, build.contract
    ctx = BuildContext(cfg, layout, require_engine=require_engine, contract=contract)
    result = engine_stage(ctx)
    update_manifest(layout.root, "engine", result, extra={"engine": ctx.data.get("engine", {})},
                    written=[layout.recipe, layout.root / RECORD_FILE, layout.engine,
                             layout.timing_cache])
    return result


def run(args: argparse.Namespace) -> int:
    from . import ui

    result = rebuild_engine(args.artifacts, args.require_engine)
    rows = [("engine", result.status, result.reason or "-")]
    ui.out.print(ui.table("TensorRT engine", ["stage", "status", "reason"], rows))
    recipe = Path(args.artifacts) / "build_engine.sh"
    ui.out.print(f"recipe: {recipe}")
    if result.status == "failed":
        ui.err.print(f"error: engine stage failed: {result.reason}", markup=False,
                     highlight=False)
        return 1
    return 0
