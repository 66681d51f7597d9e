"""Stage quantize: int8 (and int4 weight-only) CPU graphs of every exported graph.

What the stage records, per graph and variant: how many weight nodes were quantized, which were
kept FP32 by the policy, the weight bytes, and the top-1 agreement of the primary graph with its
FP32 graph on the parity grid's opt shape (a sanity figure: quality itself is task accuracy,
judged where the build has a task set). A quantized graph that does not load is never written.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ...core.manifest import FAILED, OK, SKIPPED, StageResult
from ..context import Stage

if TYPE_CHECKING:
    from ..context import BuildContext


def _agreement(ctx: "BuildContext", variant: str) -> dict[str, Any]:
    """Top-1 agreement and max abs logit difference of the primary graph's ``variant`` against
    the exported FP32 graph at the profile's opt shape (same feeds, zero noise: the mean path)."""
    from ...core.grid import contract_feeds, grid_axes, primary_output
    from ...runners import OnnxRuntimeRunner

    assert ctx.contract is not None
    contract, cfg = ctx.contract, ctx.cfg
    axes = grid_axes(contract)
    sizes = {a: cfg.profile.axis(a).opt for a in axes}
    feeds = contract_feeds(contract, cfg, sizes, seed=cfg.parity.seed, noise_scale=0.0)
    out = primary_output(contract)
    ref = OnnxRuntimeRunner(ctx.layout.onnx, contract, [cfg.profile]).infer(feeds)[out]
    assert ctx.source is not None
    got = OnnxRuntimeRunner(ctx.layout.graph(ctx.source.graph_names()[0], variant), contract,
                            [cfg.profile]).infer(feeds)[out]
    top1 = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
    return {"shape": sizes, "top1_agreement": round(top1, 6),
            "max_abs": float(np.abs(ref - got).max())}


def quantize_stage(ctx: "BuildContext") -> StageResult:
    from ...export.quantize import (cpu_has_vnni, quantize_int4, quantize_int8, reduce_range,
                                    variants, weight_bytes)

    q = ctx.cfg.int8
    if not q.enabled:
        return StageResult(SKIPPED, reason="int8.enabled = false")
    assert ctx.source is not None
    scope = ctx.source.hmu_scope
    graphs = list(ctx.contracts) or [ctx.source.graph_names()[0]]
    details: dict[str, Any] = {"reduce_range": reduce_range(q), "cpu_vnni": cpu_has_vnni(),
                               "graphs": {}, "agreement": {}}
    for variant in variants(q):
        quantize = quantize_int8 if variant == "int8" else quantize_int4
        for graph in graphs:
            src, dst = ctx.layout.graph(graph), ctx.layout.graph(graph, variant)
            res = quantize(src, dst, q, hmu_scope=scope)
            details["graphs"][dst.name] = {"quantized_nodes": res.quantized,
                                           "kept_fp32": res.kept_fp32,
                                           "weight_bytes": weight_bytes(dst),
                                           "fp32_weight_bytes": weight_bytes(src)}
        details["agreement"][variant] = _agreement(ctx, variant)
    ctx.data["quantize"] = details
    over = _judge_on_task(ctx, graphs, details)
    if over:
        return StageResult(FAILED, reason="; ".join(over) + " (not shipped: their graphs were "
                           "removed; see int8.max_exact_match_drop)", details=details)
    return StageResult(OK, details=details)


def _judge_on_task(ctx: "BuildContext", graphs: list[str], details: dict[str, Any]) -> list[str]:
    """The quality budget on the build's task set (where it has one): each quantized variant's
    exact match against the FP32 graphs'. A variant over budget is removed from the build
    (never shipped silently); the failures are returned. The rows are kept for parity's
    task table."""
    from ...verify.task_accuracy import run_task_accuracy
    from ..task_inputs import task_generators, task_tokenizer

    tok = task_tokenizer(ctx)
    if tok is None:
        return []
    from ...export.quantize import variants

    names = ["onnxruntime"] + [f"onnxruntime-{v}" for v in variants(ctx.cfg.int8)]
    report = run_task_accuracy(ctx.layout.root, ctx.cfg, tok, task_generators(ctx),
                               backends=names, reference="onnxruntime", noise=False)
    ctx.data["task_rows"] = {r.backend: r for r in report.rows}
    details["task"] = {r.backend: {"exact": round(r.exact, 6), "correct": r.correct,
                                   "total": r.total, "token_agreement": r.token_agreement}
                       for r in report.rows}
    failures = report.failures()
    for variant in variants(ctx.cfg.int8):
        name = f"onnxruntime-{variant}"
        if any(f.startswith(name + " ") for f in failures):
            for graph in graphs:
                ctx.layout.graph(graph, variant).unlink(missing_ok=True)
            details["graphs"] = {k: v for k, v in details["graphs"].items()
                                 if f".{variant}." not in k}
            ctx.data["task_rows"].pop(name, None)
    return failures


STAGE = Stage("quantize", quantize_stage, False,
              reads=("model.onnx", "encoder.onnx", "decoder.onnx"),
              writes=("model.int8.onnx", "encoder.int8.onnx", "decoder.int8.onnx",
                      "model.int4.onnx", "encoder.int4.onnx", "decoder.int4.onnx"))
