"""Find the smallest set of nodes that must stay FP32 for FP16 parity to pass.

In the spirit of ``polygraphy debug precision``, on the FP16-emulation backend (ONNX Runtime on
an onnxconverter-common FP16 graph) so it runs without a GPU. Candidates are the graph's
nodes that carry float data, in topological order. Each round binary-searches the shortest prefix of
candidates that, pinned to FP32 together with what is already pinned, makes the graph pass;
the last node of that prefix is needed, so it is pinned and the search repeats on the nodes
before it. The result is irreducible (dropping any one pin fails again) assuming that pinning
more nodes never hurts; it costs about ``len(result) * log2(candidates)`` evaluations.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx

from ..core.errors import ParityFailure
from ..core.pins import NON_COMPUTE_OPS  # shape / index / mask ops: never candidates
from ..export.fp16 import convert_to_fp16
from ..core.tolerance import Tolerance

Feeds = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Check:
    """Outcome of one FP16 evaluation against the FP32 reference."""

    passed: bool
    max_abs: float
    rel_range: float
    top1: float  # agreement at decisive positions (the tolerance module's definition)
    finite: bool

    def to_dict(self) -> dict[str, float | bool]:
        return {"passed": self.passed, "max_abs": self.max_abs, "rel_range": self.rel_range,
                "top1": self.top1, "finite": self.finite}


@dataclass
class BisectResult:
    pins: list[str]  # nodes to keep in FP32, beyond base_pins
    base_pins: list[str]
    candidates: int
    evaluations: int
    baseline: Check  # FP16 with only base_pins
    final: Check  # FP16 with base_pins + pins
    log: list[tuple[int, bool]] = field(default_factory=list)  # (pinned count, passed)
    floor: Check | None = None  # FP32 arithmetic on FP16-rounded inputs (input_rounding_floor)

    def to_dict(self) -> dict[str, object]:
        return {"pins": self.pins, "base_pins": self.base_pins, "candidates": self.candidates,
                "evaluations": self.evaluations, "baseline": self.baseline.to_dict(),
                "final": self.final.to_dict(),
                "input_rounding_floor": self.floor.to_dict() if self.floor else None}


def compare(ref: np.ndarray, got: np.ndarray, tol: Tolerance) -> Check:
    """max abs, max abs / range, decisive top-1 agreement (last axis = classes) vs ``tol``."""
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    finite = bool(np.isfinite(got).all())
    if not finite:
        return Check(False, math.inf, math.inf, 0.0, False)
    err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    span = float(ref.max() - ref.min()) if ref.size else 0.0
    rel = err / span if span > 0 else (0.0 if err == 0 else math.inf)
    top1 = 1.0
    if ref.ndim >= 1 and ref.shape[-1] > 1:
        flat_ref, flat_got = ref.reshape(-1, ref.shape[-1]), got.reshape(-1, ref.shape[-1])
        part = np.partition(flat_ref, -2, axis=-1)
        decisive = (part[:, -1] - part[:, -2]) > 2 * tol.max_abs
        if decisive.any():
            agree = flat_ref.argmax(-1) == flat_got.argmax(-1)
            top1 = float(agree[decisive].mean())
    passed = err <= tol.max_abs and rel <= tol.max_rel_range and top1 >= tol.min_top1
    return Check(passed, err, rel, top1, finite)


def candidate_nodes(model: onnx.ModelProto, include: Sequence[str] = (),
                    exclude: Iterable[str] = ()) -> list[str]:
    """Float-computing nodes in graph (topological) order, optionally under name prefixes."""
    skip = set(exclude)
    out = []
    for node in model.graph.node:
        if node.op_type in NON_COMPUTE_OPS or node.name in skip or not node.name:
            continue
        if include and not any(node.name.startswith(p) for p in include):
            continue
        out.append(node.name)
    return out


class Fp16Evaluator:
    """Runs the FP16 copy of a graph (with a given FP32 set) on ORT CPU against references."""

    def __init__(self, model: onnx.ModelProto, feeds: Sequence[Feeds], output: str,
                 tol: Tolerance, references: Sequence[np.ndarray] | None = None) -> None:
        self.model, self.feeds, self.output, self.tol = model, list(feeds), output, tol
        self.evaluations = 0
        self.references = list(references) if references is not None else [
            self._run(model, f) for f in self.feeds]

    def _run(self, model: onnx.ModelProto, feeds: Feeds) -> np.ndarray:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = min(2, os.cpu_count() or 1)
        sess = ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        return np.asarray(sess.run([self.output], dict(feeds))[0])

    def __call__(self, fp32_nodes: Sequence[str]) -> Check:
        """The first failing feed's check, else the one closest to failing."""
        self.evaluations += 1
        fp16 = convert_to_fp16(self.model, list(fp32_nodes))
        worst: Check | None = None
        for ref, feeds in zip(self.references, self.feeds):
            chk = compare(ref, self._run(fp16, feeds), self.tol)
            if not chk.passed:
                return chk
            if worst is None or chk.rel_range > worst.rel_range:
                worst = chk
        assert worst is not None, "no feeds"
        return worst


def bisect_fp32_set(check: Callable[[Sequence[str]], Check], candidates: Sequence[str],
                    base: Sequence[str] = (),
                    progress: Callable[[str], None] | None = None) -> BisectResult:
    """Smallest (irreducible) subset of ``candidates`` to keep FP32 so that ``check`` passes."""
    say = progress or (lambda msg: None)
    evaluations = 0

    def run(nodes: Sequence[str]) -> Check:
        nonlocal evaluations
        evaluations += 1
        return check(list(base) + list(nodes))

    baseline = run([])
    log: list[tuple[int, bool]] = [(0, baseline.passed)]
    if baseline.passed:
        return BisectResult([], list(base), len(candidates), evaluations, baseline, baseline, log)
    everything = run(candidates)
    log.append((len(candidates), everything.passed))
    if not everything.passed:
        raise ParityFailure(
            f"FP16 fails even with all {len(candidates)} candidate nodes in FP32 (max abs "
            f"{everything.max_abs:.3g}): the error comes from elsewhere (graph inputs, a "
            "non-candidate op) or the tolerance is too strict")
    pinned: list[str] = []
    pool = list(candidates)
    while True:
        # Known: pinned alone fails, pinned + pool passes. Find the shortest passing prefix.
        lo, hi = 0, len(pool)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            res = run(pinned + pool[:mid])
            log.append((len(pinned) + mid, res.passed))
            lo, hi = (lo, mid) if res.passed else (mid, hi)
        needed = pool[hi - 1]
        pinned.append(needed)
        pool = pool[:hi - 1]
        say(f"needs FP32: {needed} ({len(pinned)} so far, {evaluations} evaluations)")
        final = run(pinned)
        log.append((len(pinned), final.passed))
        if final.passed:
            break
    return BisectResult(sorted(pinned, key=list(candidates).index), list(base), len(candidates),
                        evaluations, baseline, final, log)


def input_rounding_floor(evaluator: Fp16Evaluator) -> Check:
    """The error left when *nothing* computes in FP16 but the inputs are FP16 values: float
    graph inputs and embedding tables (a Gather's float initializer) rounded, FP32 arithmetic.
    No pin can go below it; a row where it is a large share of the budget is ill-conditioned
    there (docs/fp16.md, issue 17 item 6: up to a third of the relative budget on some rows of
    the trained model's grid)."""
    from onnx import numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(evaluator.model)
    tables = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    for init in model.graph.initializer:
        if init.name in tables and init.data_type == onnx.TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(_fp16_round(numpy_helper.to_array(init)),
                                                  init.name))
    worst: Check | None = None
    for ref, feeds in zip(evaluator.references, evaluator.feeds):
        rounded = {k: _fp16_round(v) if v.dtype == np.float32 else v for k, v in feeds.items()}
        chk = compare(ref, evaluator._run(model, rounded), evaluator.tol)
        if worst is None or chk.rel_range > worst.rel_range:
            worst = chk
    assert worst is not None, "no feeds"
    return worst


def _fp16_round(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(np.float16).astype(np.float32)


def debug_precision(onnx_path: Path, feeds: Sequence[Feeds], output: str, tol: Tolerance, *,
                    base_pins: Sequence[str] = (), include: Sequence[str] = (),
                    progress: Callable[[str], None] | None = None) -> BisectResult:
    """Bisect the graph at ``onnx_path`` against its own FP32 outputs on ``feeds``; the result
    also carries the input-rounding floor."""
    model = onnx.load(str(onnx_path))
    evaluator = Fp16Evaluator(model, feeds, output, tol)
    floor = input_rounding_floor(evaluator)
    cands = candidate_nodes(model, include, exclude=base_pins)
    try:
        result = bisect_fp32_set(evaluator, cands, base_pins, progress)
    except ParityFailure as exc:
        raise ParityFailure(f"{exc}; rounding only the inputs to FP16 already gives max abs "
                            f"{floor.max_abs:.3g}, rel {floor.rel_range:.3g}") from None
    result.floor = floor
    return result
