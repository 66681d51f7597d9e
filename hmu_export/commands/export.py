"""`export`: only the PyTorch -> ONNX stage, from a build's checkpoint or a config."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from . import ui
from ..core.layout import DEFAULT_ROOT
from ..core.config import BuildConfig, load_config
from ..core.build_folder import open_build
from ..export.onnx_export import export_onnx
from ..core.pins import sensitive_nodes
from ..core.fileio import sha256_file
from ..core.manifest import OK, StageResult, update_manifest
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
                                           "engines/<name>), written as `build` writes one: "
                                           "checkpoint/, model.onnx and manifest.json")
    p.add_argument("--opset", type=int, help="override export.opset (18-20)")
    p.add_argument("--diagnostics", action="store_true",
                   help="add encoder_out / hmu_gate / hmu_out outputs")
    p.set_defaults(func=run)


def _overrides(cfg: BuildConfig, args: argparse.Namespace) -> BuildConfig:
    export_cfg = dataclasses.replace(
        cfg.export, opset=args.opset or cfg.export.opset,
        diagnostics=args.diagnostics or cfg.export.diagnostics)
    return dataclasses.replace(cfg, export=export_cfg).validate()


def run(args: argparse.Namespace) -> int:
    if not args.artifacts:
        return _from_config(args)
    build = open_build(args.artifacts)
    layout, model = build.layout, load_checkpoint(build.layout.checkpoint_dir)
    cfg = _overrides(dataclasses.replace(build.cfg, model=model.cfg), args)
    with ui.err.status("exporting to ONNX..."):
        res = export_onnx(model, cfg, layout.onnx,
                          checkpoint_sha256=sha256_file(layout.checkpoint_dir / WEIGHTS_FILE))
    import onnx
    details = {"opset": cfg.export.opset, "sha256": res.sha256,
               "validation_max_abs": res.validation_max_abs,
               "sensitive_nodes": sensitive_nodes(onnx.load(str(res.path)))}
    update_manifest(layout.root, "export", StageResult(OK, seconds=res.seconds,
                                                       details=details), written=[layout.onnx])
    _print(str(res.path), res.sha256, res.seconds, res.validation_max_abs)
    return 0


def _from_config(args: argparse.Namespace) -> int:
    """A build of the checkpoint and export stages only, made as `build` makes one (output
    refused when it is not ours, locked, staged, manifest written, swapped in whole), with
    model.onnx alone: the generation graphs are left out (``split_graphs = false``)."""
    from ..build.folder import resolve_out
    from ..build.pipeline import run_build
    from ..build.preflight import preflight

    cfg = _overrides(load_config(args.config), args)
    cfg = dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation,
                                                                  split_graphs=False))
    out = resolve_out(args.out or DEFAULT_ROOT / cfg.model.name)
    with ui.err.status("exporting to ONNX..."):
        outcome = run_build(cfg, out, model=preflight(cfg, out), only=["checkpoint", "export"])
    if not outcome.ok:
        ui.err.print(f"error: {outcome.failure} (see {outcome.log or outcome.out_dir})",
                     markup=False, highlight=False)
        return 1
    export = outcome.stages["export"]
    onnx_path = outcome.out_dir / "model.onnx"
    _print(str(onnx_path), sha256_file(onnx_path), export.seconds,
           float(export.details.get("validation_max_abs", 0.0)))
    return 0


def _print(path: str, sha256: str, seconds: float, max_abs: float) -> None:
    ui.out.print(ui.table("export", ("file", "sha256", "seconds", "max abs vs torch"),
                          [(path, sha256[:16], f"{seconds:.1f}", f"{max_abs:.1e}")]))
