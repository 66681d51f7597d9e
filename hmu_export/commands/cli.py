"""Command line: parse, call the library, print. Each command lives in hmu_export/commands/."""
from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from ..core.errors import HMUExportError

COMMANDS = ("build", "export", "parity", "engine", "debug_precision", "triton", "bench", "info",
            "generate", "finetune", "deploy", "train_demo", "loadtest")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hmu_export",
        description="Turn an encoder -> HMU -> decoder Transformer into verified inference "
                    "artifacts (ONNX, TensorRT FP16, Triton, C++).")
    parser.add_argument("--version", action="version", version=f"hmu-export {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"hmu_export.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HMUExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
