"""FP16-emulation graph (issue #3 fills this in)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .manifest import SKIPPED, StageResult

if TYPE_CHECKING:
    from .pipeline import BuildContext


def fp16_stage(ctx: "BuildContext") -> StageResult:
    return StageResult(SKIPPED, reason="not implemented yet")
