"""Build the artifacts the CPU benchmark needs (checkpoint, model.onnx, model.opt.onnx).

Runs the library's own build stages (checkpoint, export, optimize), so the figures come from the
same graphs a full `python -m hmu_export build` writes.
Usage: python benchmarks/prepare.py [CONFIG.toml] OUT_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

from hmu_export.core.config import load_config
from hmu_export.build.pipeline import run_build


def main(argv: list[str]) -> int:
    config, out = (argv[0], argv[1]) if len(argv) == 2 else (None, argv[0])
    outcome = run_build(load_config(config), Path(out), only=["checkpoint", "export", "optimize"])
    for name, res in outcome.stages.items():
        print(f"{name}: {res.status} {res.reason} ({res.seconds:.1f} s)")
    if not outcome.ok:
        print(outcome.failure, file=sys.stderr)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
