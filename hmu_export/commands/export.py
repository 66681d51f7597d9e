"""`export`: only the PyTorch -> ONNX stage, from a build's checkpoint or a config."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from . import ui
from ..core.layout import DEFAULT_ROOT, BuildLayout
from ..core.config import load_config
from ..core.build_folder import open_build
from ..export.onnx_export import export_onnx
from ..core.pins import sensitive_nodes
from ..core.fileio import sha256_file
from ..core.manifest import OK, StageResult, update_manifest
from ..model import build_model, save_checkpoint
from ..model.weights import WEIGHTS_FILE
from ..model.weights import load_checkpoint


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export model.onnx only (re-export a build, or from a "
                                      "config without the other stages)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--artifacts", type=Path,
                     help="existing build folder: re-export its checkpoint into its model.onnx")
    src.add_argument("--config", type=Path, help="TOML config (default: embedded default)")
    p.add_argument("--out", type=Path, help="with --config: output folder (default: "
                                           "engines/<name>)")
    p.add_argument("--opset", type=int, help="override export.opset (18-20)")
    p.add_argument("--diagnostics", action="store_true",
                   help="add encoder_out / hmu_gate / hmu_out outputs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.artifacts:
        build = open_build(args.artifacts)
        layout, model = build.layout, load_checkpoint(build.layout.checkpoint_dir)
        cfg = build.cfg
        cfg = dataclasses.replace(cfg, model=model.cfg)
    else:
        cfg = load_config(args.config)
        layout = BuildLayout(args.out or DEFAULT_ROOT / cfg.model.name)
        model = build_model(cfg.model)
        save_checkpoint(model, layout.checkpoint_dir)
    written = [layout.onnx] + ([] if args.artifacts else [layout.checkpoint_dir])
    export_cfg = dataclasses.replace(
        cfg.export, opset=args.opset or cfg.export.opset,
        diagnostics=args.diagnostics or cfg.export.diagnostics)
    cfg = dataclasses.replace(cfg, export=export_cfg).validate()
    with ui.err.status("exporting to ONNX..."):
        res = export_onnx(model, cfg, layout.onnx,
                          checkpoint_sha256=sha256_file(layout.checkpoint_dir / WEIGHTS_FILE))
    import onnx
    details = {"opset": cfg.export.opset, "sha256": res.sha256,
               "validation_max_abs": res.validation_max_abs,
               "sensitive_nodes": sensitive_nodes(onnx.load(str(res.path)))}
    if layout.manifest.is_file():
        update_manifest(layout.root, "export", StageResult(OK, seconds=res.seconds,
                                                           details=details), written=written)
    ui.out.print(ui.table("export", ("file", "sha256", "seconds", "max abs vs torch"),
                          [(str(res.path), res.sha256[:16], f"{res.seconds:.1f}",
                            f"{res.validation_max_abs:.1e}")]))
    return 0
