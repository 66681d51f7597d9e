"""ONNX Runtime-optimized graph for the CPU path (issue #5 fills this in)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .manifest import SKIPPED, StageResult

if TYPE_CHECKING:
    from .pipeline import BuildContext


def optimize_stage(ctx: "BuildContext") -> StageResult:
    return StageResult(SKIPPED, reason="not implemented yet")
