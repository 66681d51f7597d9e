"""Stage quantize: int8 (and int4 weight-only) CPU graphs of every exported graph.

int8 is dynamic, or static QDQ (``[int8] mode``) calibrated on feeds recorded from greedy
generation with the FP32 graphs on the calibration file (``[int8] calibration``, else the
task's dev split), random in-profile feeds without one (the manifest says which).

What the stage records, per graph and variant: how many weight nodes were quantized, which were
kept FP32 by the policy, the weight bytes, and the top-1 agreement of the primary graph with its
FP32 graph on the parity grid's opt shape (a sanity figure: quality itself is task accuracy,
judged where the build has a task set). A quantized graph that does not load is never written.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ...core.errors import ConfigError
from ...core.manifest import FAILED, OK, SKIPPED, StageResult
from ..context import Stage

if TYPE_CHECKING:
    from ...export.calibration import CalibrationFeeds
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
    from ...export.quantize import (cpu_has_vnni, quantize_int4, quantize_int8,
                                    quantize_int8_static, reduce_range, variants, weight_bytes)

    q = ctx.cfg.int8
    if not q.enabled:
        return StageResult(SKIPPED, reason="int8.enabled = false")
    assert ctx.source is not None
    scope = ctx.source.hmu_scope
    graphs = list(ctx.contracts) or [ctx.source.graph_names()[0]]
    mode, why = int8_mode(ctx, graphs)
    details: dict[str, Any] = {"reduce_range": reduce_range(q), "cpu_vnni": cpu_has_vnni(),
                               "mode": mode, "mode_reason": why, "graphs": {}, "agreement": {}}
    calibration = None
    if mode == "static":
        calibration = calibration_feeds(ctx, graphs)
        details["calibration"] = dict(calibration.summary(), method=q.calibration_method,
                                      activation_type=q.activation_type,
                                      pre_process=q.pre_process,
                                      quantize_outputs=q.quantize_outputs)
    for variant in variants(q):
        for graph in graphs:
            src, dst = ctx.layout.graph(graph), ctx.layout.graph(graph, variant)
            if variant == "int4":
                res = quantize_int4(src, dst, q, hmu_scope=scope)
            elif calibration is not None:
                res = quantize_int8_static(src, dst, q, calibration.graphs[graph],
                                           hmu_scope=scope)
            else:
                res = quantize_int8(src, dst, q, hmu_scope=scope)
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


def int8_mode(ctx: "BuildContext", graphs: list[str]) -> tuple[str, str]:
    """(the int8 mode this build uses, why). ``auto`` is static when real calibration feeds
    can be recorded (calibration data, a tokenizer's generation graphs), dynamic otherwise:
    static QDQ scales are fixed, so a row's tokens do not depend on the rest of its batch
    (dynamic int8 quantizes each activation tensor over the whole batch; docs/int8.md), at the
    same measured quality and speed on the trained models."""
    from ...core.io_contract import DECODER, ENCODER
    from ...export.calibration import calibration_file

    mode = ctx.cfg.int8.mode
    if mode != "auto":
        return mode, "[int8] mode"
    key, path = calibration_file(ctx.cfg)
    if not path:
        return "dynamic", ("auto: no calibration data ([int8] calibration and [task] dev are "
                           "empty); tokens depend on the batch's other rows")
    if not (ENCODER in graphs and DECODER in graphs):
        return "dynamic", f"auto: {key} set, but the build has no generation graphs to record with"
    return "static", f"auto: calibrated on {key} (batch-invariant tokens)"


def calibration_feeds(ctx: "BuildContext", graphs: list[str]) -> "CalibrationFeeds":
    """Static int8's calibration feeds for every graph: recorded from greedy generation with
    the FP32 graphs on ``[int8] calibration`` (else ``[task] dev``) when the build has the
    generation graphs and a tokenizer; random in-profile feeds otherwise (``source`` says
    which, ``note`` why)."""
    from ...core.io_contract import DECODER, ENCODER, FULL, NOISE, SRC_IDS, SRC_MASK, TGT_IDS
    from ...export.calibration import (CalibrationFeeds, calibration_file, calibration_sources,
                                       random_feeds, record_feeds)
    from ..task_inputs import build_tokenizer

    cfg = ctx.cfg
    key, path = calibration_file(cfg)
    contracts = {g: ctx.contracts[g] for g in graphs if g in ctx.contracts}
    feeds, note = CalibrationFeeds(), ""
    if not path:
        note = "no calibration data: [int8] calibration and [task] dev are empty"
    elif not (ENCODER in contracts and DECODER in contracts):
        note = f"{path} not used: the build has no generation graphs to record feeds with"
    else:
        tok = build_tokenizer(ctx, key, path)
        assert tok is not None
        sources = calibration_sources(cfg)
        full = contracts.get(FULL)
        if full is not None and not set(full.input_names) <= {SRC_IDS, SRC_MASK, TGT_IDS, NOISE}:
            full, note = None, "the full graph has inputs teacher forcing cannot fill"
        feeds = record_feeds(ctx.layout.graph(ENCODER), ctx.layout.graph(DECODER), cfg,
                             tok.encode(sources), full=full, label=path,
                             input_names={g: c.input_names for g, c in contracts.items()})
        if not feeds.samples:
            raise ConfigError(f"{key}: none of the first {len(sources)} sources of {path} fits "
                              f"the profile's src_len max ({cfg.profile.src_len[2]} tokens)")
    for graph in graphs:
        if graph not in feeds.graphs:
            contract = contracts.get(graph) or ctx.contract
            assert contract is not None
            feeds.graphs[graph] = random_feeds(contract, cfg, RANDOM_FEEDS, seed=cfg.parity.seed)
            feeds.random.append(graph)
    feeds.note = note
    return feeds


#: random calibration feeds per graph (the fallback)
RANDOM_FEEDS = 64


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
