"""Stage triton: the Triton model repository of the build."""
from __future__ import annotations

from typing import TYPE_CHECKING
from ...core.errors import BackendUnavailable
from ...core.manifest import OK, SKIPPED, StageResult
from ...deploy.triton.config import require_schema
from ...deploy.triton.repository import write_repository
from ..context import Stage
if TYPE_CHECKING:
    from ..context import BuildContext


def triton_stage(ctx: "BuildContext") -> StageResult:
    """Build stage: the repository goes to ``<build>/triton/``."""
    from ...core.io_contract import full_contract

    if not ctx.cfg.triton.enabled:
        return StageResult(SKIPPED, reason="triton.enabled = false")
    try:
        require_schema()
    except BackendUnavailable as exc:  # a base install builds; the reason goes in the manifest
        return StageResult(SKIPPED, reason=str(exc))
    contract = ctx.contract or full_contract(ctx.cfg.model, ctx.cfg.export.diagnostics)
    res = write_repository(ctx.layout, ctx.cfg, contract)
    details = {"models": res.models, "plan_included": res.plan_included,
               "generation_precisions": res.generation_precisions,
               "validated": "schema+semantic"}
    if res.notes:
        details["notes"] = res.notes
    return StageResult(OK, details=details)


STAGE = Stage("triton", triton_stage, True,
              reads=("model.onnx", "encoder.onnx", "decoder.onnx", "model.fp16.plan", "checkpoint/hf/"),
              writes=("triton/",))
