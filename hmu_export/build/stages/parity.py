"""Stage parity: every backend against the source model, and generation parity."""
from __future__ import annotations

from typing import Any

from ...core.manifest import FAILED, OK, StageResult
from ...backends.registry import discover_backends
from ...core.io_contract import DECODER, ENCODER
from ...verify.generation_parity import run_generation_parity, write_generation_reports
from ...verify.parity import run_parity, summary, write_reports
from ..context import Stage


def parity_stage(ctx: Any) -> StageResult:
    """Build stage: the grid over every backend the build produced; reports under parity/."""
    assert ctx.contract is not None
    # The native HMUTransformer keeps its own path; any other source is run through its graphs.
    model = ctx.model if ctx.model is not None else ctx.source
    assert model is not None
    backends = discover_backends(ctx.layout, ctx.cfg, model, ctx.contract)
    report = run_parity(model, ctx.cfg, backends, ctx.contract)
    write_reports(report, ctx.layout.parity_dir)
    ctx.data["parity"] = summary(report)
    if not report.passed:
        first = report.failures()[0] if report.failures() else "no backend ran"
        return StageResult(FAILED, reason=f"parity failed: {first}", details=ctx.data["parity"])
    gen = generation_parity_stage(ctx)
    details = dict(ctx.data["parity"], generation=gen) if gen is not None else ctx.data["parity"]
    if gen is not None and not gen["passed"]:
        return StageResult(FAILED, reason=f"generation parity failed: {gen['failures'][0]}",
                           details=details)
    task = task_accuracy_stage(ctx)
    if task is not None:
        details = dict(details, task=task.summary())
        if task.failures():
            return StageResult(FAILED, reason=f"task accuracy failed: {task.failures()[0]}",
                               details=details)
    return StageResult(OK, details=details)


def task_accuracy_stage(ctx: Any) -> Any:
    """Exact match on the config's task set for every generation backend, and the noise
    sweep (None without a task set or split graphs); reports parity/task.*."""
    from ...verify.task_accuracy import run_task_accuracy, write_task_reports
    from ..task_inputs import task_generators, task_tokenizer

    tok = task_tokenizer(ctx)
    if tok is None or not ctx.layout.split_graphs() == [ENCODER, DECODER]:
        return None
    report = run_task_accuracy(ctx.layout.root, ctx.cfg, tok, task_generators(ctx),
                               reuse=ctx.data.get("task_rows"))
    write_task_reports(report, ctx.layout.parity_dir)
    ctx.data["task"] = report.summary()
    return report


def generation_parity_stage(ctx: Any) -> dict[str, Any] | None:
    """The build's generation parity (None when the build has no split graphs)."""
    if not ctx.layout.split_graphs() == [ENCODER, DECODER]:
        return None
    source = ctx.source
    report = run_generation_parity(ctx.layout.root, ctx.cfg, lambda: source)
    write_generation_reports(report, ctx.layout.parity_dir)
    ctx.data["generation_parity"] = report.summary()
    return ctx.data["generation_parity"]


STAGE = Stage("parity", parity_stage, True,
              reads=("checkpoint/", "every runnable graph and engine"),
              writes=("parity/ (task.* where the config has a task set)",))
