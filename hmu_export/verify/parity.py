"""Parity suite: do the artifacts compute what PyTorch computes, across the shape profile?

The reference is the build's *source* model in PyTorch FP32 (the native HMUTransformer, or the
graph module of another source, e.g. the paper's reference implementation), and the suite is
driven by the graph's I/O contract: its feeds, the axes of its grid (a classifier has no
tgt_len) and its outputs. Every available backend runs a grid of shapes (derived from the
profile: min, opt, max and odd sizes between, 1 included; odd rows padded) with the same noise
as the reference.
Per output it reports max abs error, max error relative to the reference's range, cosine
similarity and top-1 agreement, judged by the precision's tolerance (tolerance.py). Beyond the
grid it checks the HMU-specific promises: the noise input is live, zero noise is the VAE's mean
path, and padding never changes real positions. Element-wise checks go through Polygraphy's
``CompareFunc.simple`` so they mean what ``polygraphy run --atol`` means.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..core.layout import BuildLayout
from ..core.config import BuildConfig
from ..core.errors import InputError
from ..core.fileio import write_json, write_png, write_text
from ..core.io_contract import (BATCH, CLASS_LOGITS, LOGITS, NOISE, SRC_IDS, SRC_LEN, SRC_MASK,
                          TGT_IDS, GraphContract)
from ..model import HMUTransformer
from ..backends.registry import Backend, discover_backends
from ..runners import Runner, TorchRunner
from ..runners.torch_runner import native_model, graph_of
from ..core.tolerance import Tolerance, tolerance_for
from ..core.grid import AXIS_LABEL, GRID_AXES, Shape, TOP1_OUTPUTS, contract_feeds, derive_grid, grid_axes, in_profile, primary_output, profile_ranges, project


def describe_reference(model: Any, cfg: BuildConfig, contract: GraphContract) -> str:
    """What the parity reference is, for the report: e.g. "torch-cpu fp32 (reference
    implementation: HMU_mod, after_encoder)"."""
    if native_model(model, graph_of(contract)) is not None:
        return "torch-cpu fp32 (native HMUTransformer)"
    layout = getattr(model, "layout", None)
    if getattr(model, "source", "") == "reference" and layout is not None:
        if layout.classifier:
            what = f"{layout.variant} classifier, pool {cfg.model.pool}"
        else:
            what = f"{layout.variant}, {cfg.model.hmu_position}"
        return f"torch-cpu fp32 (reference implementation: {what})"
    return f"torch-cpu fp32 ({getattr(model, 'source', '') or type(model).__name__} source, " \
           f"{graph_of(contract)} graph)"


# ----------------------------------------------------------------------------- metrics
@dataclass
class Row:
    backend: str
    precision: str
    shape: list[int]
    output: str
    max_abs: float
    max_rel_range: float
    cosine: float
    top1_agreement: float | None
    passed: bool
    reasons: list[str] = field(default_factory=list)


def _real_positions(spec_positional: bool, mask: np.ndarray, arr: np.ndarray) -> np.ndarray:
    """Values at real source positions only (padded ones are meaningless for intermediates)."""
    if not spec_positional:
        return arr
    return arr[mask.astype(bool)]


def compare_arrays(ref: np.ndarray, got: np.ndarray, tol: Tolerance, *, top1: bool
                   ) -> tuple[dict[str, float | None], list[str]]:
    """Metrics and the list of violated bounds (empty = pass)."""
    reasons: list[str] = []
    if got.shape != ref.shape:
        return ({"max_abs": float("inf"), "max_rel_range": float("inf"), "cosine": 0.0,
                 "top1_agreement": 0.0 if top1 else None},
                [f"shape {list(got.shape)} != reference {list(ref.shape)}"])
    r64, g64 = ref.astype(np.float64), got.astype(np.float64)
    if not np.isfinite(g64).all():
        reasons.append("non-finite values")
    diff = np.abs(r64 - g64)
    max_abs = float(np.nanmax(diff)) if diff.size else 0.0
    if not np.isfinite(max_abs):
        max_abs = float("inf")
    rng = float(r64.max() - r64.min()) if r64.size else 0.0
    # A constant reference (one logit, vocab_size 1, a 1x1x1 shape) has no range: judge the
    # absolute error there instead of dividing by zero.
    max_rel = max_abs / rng if rng > 0 else max_abs
    denom = float(np.linalg.norm(r64) * np.linalg.norm(g64))
    cosine = float(np.dot(r64.ravel(), g64.ravel()) / denom) if denom > 0 else float(
        max_abs == 0)
    agreement: float | None = None
    if top1:
        ref2 = r64.reshape(-1, r64.shape[-1])
        got2 = g64.reshape(-1, g64.shape[-1])
        top2 = np.sort(ref2, axis=-1)[:, -2:] if ref2.shape[-1] > 1 else None
        decisive = (top2[:, 1] - top2[:, 0] > 2 * tol.max_abs) if top2 is not None else \
            np.ones(len(ref2), bool)
        if decisive.any():
            agreement = float(np.mean(ref2[decisive].argmax(-1) == got2[decisive].argmax(-1)))
        else:
            agreement = 1.0
        if agreement < tol.min_top1:
            reasons.append(f"top1 {agreement:.4f} < {tol.min_top1}")
    if not max_abs <= tol.max_abs:
        reasons.append(f"max_abs {max_abs:.3g} > {tol.max_abs:g}")
    if not max_rel <= tol.max_rel_range:
        reasons.append(f"max_rel_range {max_rel:.3g} > {tol.max_rel_range:g}")
    if not cosine >= tol.min_cosine:
        reasons.append(f"cosine {cosine:.7f} < {tol.min_cosine}")
    return ({"max_abs": max_abs, "max_rel_range": max_rel, "cosine": cosine,
             "top1_agreement": agreement}, reasons)


def polygraphy_allclose(ref: np.ndarray, got: np.ndarray, atol: float) -> bool:
    """Polygraphy's element-wise check (max error statistic), as `polygraphy run --atol` does."""
    from polygraphy.comparator import CompareFunc
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR  # our report carries the figures

    func = CompareFunc.simple(atol=atol, rtol=0.0, check_error_stat="max", check_shapes=True)
    res = func(IterationResult({"out": got}, runner_name="candidate"),
               IterationResult({"out": ref}, runner_name="reference"))
    return bool(res["out"])


# ----------------------------------------------------------------------------- checks
@dataclass
class Check:
    backend: str
    name: str
    passed: bool
    value: float
    detail: str


def reference_logits(model: HMUTransformer, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.inference_mode():
        return model(t[SRC_IDS], t[SRC_MASK], t[TGT_IDS], t[NOISE]).numpy()


def reference_mean_path(model: HMUTransformer, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    """PyTorch logits along the VAE's mean path (z = mu), computed without any noise tensor."""
    t = {k: torch.from_numpy(v) for k, v in feeds.items() if k != NOISE}
    with torch.inference_mode():
        out = model.forward_all(t[SRC_IDS], t[SRC_MASK], t[TGT_IDS], None, mean=True)
    return out[LOGITS].numpy()


def _row_unpadded(contract: GraphContract, feeds: Mapping[str, np.ndarray], row: int,
                  real: int) -> dict[str, np.ndarray]:
    """One row of a padded feed, cut to its ``real`` source positions."""
    out = {}
    for spec in contract.inputs:
        idx = tuple(slice(row, row + 1) if d == BATCH else slice(0, real) if d == SRC_LEN
                    else slice(None) for d in spec.dims)
        out[spec.name] = feeds[spec.name][idx]
    return out


def padding_masked(model: Any, cfg: BuildConfig, contract: GraphContract) -> str:
    """Empty when padded source positions are masked out of the graph's outputs, else why not."""
    if CLASS_LOGITS in contract.output_names and cfg.model.pool != "masked_mean":
        return (f"not applicable: pool = \"{cfg.model.pool}\" averages over every source "
                "position, padding included, by design (as the reference classifier's "
                "AdaptiveAvgPool1d does), so padding changes the class logits; "
                "model.pool = \"masked_mean\" makes them independent of it")
    return ""


def hmu_checks(runner: Runner, model: "HMUTransformer | Any", cfg: BuildConfig, tol: Tolerance,
               shape: Shape, contract: GraphContract | None = None,
               reference: Runner | None = None) -> list[Check]:
    """Noise live, zero noise = mean path (where the source has one), padding never changes
    real positions (where padding is masked). ``shape`` is over the contract's grid axes;
    ``reference`` is the source's FP32 runner (made here when not given)."""
    contract = contract or runner.contract
    axes = grid_axes(contract)
    sizes = dict(zip(axes, project(shape, axes)))
    out = primary_output(contract)
    native = native_model(model, graph_of(contract))
    if native is None and reference is None:
        reference = TorchRunner(model, contract, [cfg.profile], label="torch-cpu")

    def ref_out(f: Mapping[str, np.ndarray]) -> np.ndarray:
        if native is not None:
            return reference_logits(native, f)
        assert reference is not None
        return reference.infer(f)[out]

    def feeds_at(sz: Mapping[str, int], seed: int, **kw: float) -> dict[str, np.ndarray]:
        return contract_feeds(contract, cfg, sz, seed=seed, **kw)

    checks: list[Check] = []
    feeds = feeds_at(sizes, cfg.parity.seed + 1, noise_scale=1.0)
    other = dict(feeds, noise=feeds_at(sizes, cfg.parity.seed + 2)[NOISE])
    # Other noise must move the outputs exactly as it moves PyTorch's: a dead noise input
    # (folded to a constant, disconnected) shows up as a zero change against a large one.
    got_delta = runner.infer(other)[out] - runner.infer(feeds)[out]
    ref_delta = ref_out(other) - ref_out(feeds)
    ref_change = float(np.abs(ref_delta).max())
    err = float(np.abs(got_delta - ref_delta).max())
    live = ref_change > 1e-3 if cfg.model.use_hmu else ref_change == 0.0
    checks.append(Check(runner.label, "noise_live", live and err <= 2 * tol.max_abs, err,
                        f"noise A -> B moves {out} by up to {ref_change:.3g} in PyTorch; the "
                        f"backend's move differs by {err:.3g} (bound {2 * tol.max_abs:.3g})"))
    if native is not None:
        zero = dict(feeds, noise=np.zeros_like(feeds[NOISE]))
        err = float(np.abs(runner.infer(zero)[LOGITS] - reference_mean_path(native, zero)).max())
        checks.append(Check(runner.label, "zero_noise_is_mean_path", err <= tol.max_abs, err,
                            f"max |logits(noise=0) - PyTorch mean path (z=mu)| = {err:.3g}"))
    else:
        checks.append(Check(runner.label, "zero_noise_is_mean_path", True, 0.0,
                            "not applicable: the source has no separate mean path (z = mu) to "
                            "compare with; zero noise is an ordinary input of its forward"))
    ls = sizes.get(SRC_LEN, 0)
    why_not = padding_masked(model, cfg, contract)
    if why_not:
        checks.append(Check(runner.label, "padding_invariance", True, 0.0, why_not))
    elif ls >= 2:
        padded = feeds_at(dict(sizes, batch=max(sizes[BATCH], 2)), cfg.parity.seed + 3)
        row = 1  # the feed generators pad odd rows
        real = int(padded[SRC_MASK][row].sum())
        single = _row_unpadded(contract, padded, row, real)
        # Garbage in the padded tail (ids and noise) must not leak into real positions either.
        rng = np.random.default_rng(cfg.parity.seed)
        padded[SRC_IDS][row, real:] = rng.integers(0, cfg.model.vocab_size, ls - real)
        noise_spec = next((s for s in contract.inputs if s.name == NOISE), None)
        if noise_spec is not None and noise_spec.dims[1] == SRC_LEN:
            padded[NOISE][row, real:] = rng.standard_normal(
                (ls - real, cfg.model.latent_dim)).astype(np.float32) * 10
        try:
            a = runner.infer(padded)[out][row]
            solo = runner.infer(single)[out][0]
            perr = float(np.abs(a - solo).max())
            checks.append(Check(runner.label, "padding_invariance", perr <= tol.max_abs, perr,
                                f"row with {real}/{ls} real tokens vs the same row unpadded: "
                                f"max abs {perr:.3g}"))
        except InputError as exc:  # the unpadded length lies outside the profile
            checks.append(Check(runner.label, "padding_invariance", True, 0.0,
                                f"not applicable: {exc}"))
    return checks


# ----------------------------------------------------------------------------- suite
@dataclass
class ParityReport:
    passed: bool
    results: list[Row]
    checks: list[Check]
    skipped: dict[str, str]
    grid: list[Shape]
    tolerances: dict[str, dict[str, float]]
    reference: str = "torch-cpu fp32"
    axes: tuple[str, ...] = GRID_AXES  # what each grid shape's sizes are
    output: str = LOGITS  # the primary output (top-1, heatmap, summary)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reference": self.reference, "axes": list(self.axes),
                "output": self.output,
                "grid": [list(s) for s in self.grid], "tolerances": self.tolerances,
                "results": [asdict(r) for r in self.results],
                "checks": [asdict(c) for c in self.checks], "skipped_backends": self.skipped}

    def failures(self) -> list[str]:
        out = [f"{r.backend} {r.output} {'x'.join(map(str, r.shape))}: {'; '.join(r.reasons)}"
               for r in self.results if not r.passed]
        out += [f"{c.backend} {c.name}: {c.detail}" for c in self.checks if not c.passed]
        return out


def run_parity(model: "HMUTransformer | Any", cfg: BuildConfig, backends: list[Backend],
               contract: GraphContract, *, shapes: Sequence[Sequence[int]] | None = None,
               on_step: Callable[[str], None] | None = None) -> ParityReport:
    """Run every available backend over the grid against the source model in PyTorch FP32.

    ``model`` is the native HMUTransformer or any ModelSource; ``shapes`` are BxLsxLt (cut down
    to the contract's axes: a classifier's grid has no tgt_len) or already over those axes."""
    axes = grid_axes(contract)
    if shapes is None:
        grid = derive_grid(cfg.profile, cfg.parity.extra_shapes, axes)
    else:
        grid = list(dict.fromkeys(project(s, axes) for s in shapes))
    for shape in grid:
        if not in_profile(cfg.profile, axes, shape):
            raise InputError(f"parity shape {'x'.join(map(str, shape))} lies outside the profile "
                             f"({profile_ranges(cfg.profile, axes)})")
    reference = TorchRunner(model, contract, [cfg.profile], label="torch-cpu")
    feeds = {s: contract_feeds(contract, cfg, dict(zip(axes, s)), seed=cfg.parity.seed,
                               noise_scale=cfg.parity.noise_scale) for s in grid}
    refs = {s: reference.infer(feeds[s]) for s in grid}
    rows: list[Row] = []
    checks: list[Check] = []
    skipped: dict[str, str] = {}
    tolerances: dict[str, dict[str, float]] = {}
    opt_shape = tuple(cfg.profile.axis(a).opt for a in axes)
    for backend in backends:
        if not backend.available:
            skipped[backend.label] = backend.skip_reason
            continue
        tol = tolerance_for(backend.precision, cfg.parity.fp32_max_abs,
                            cfg.parity.fp16_max_abs)
        tolerances[backend.precision] = tol.to_dict()
        assert backend.make is not None
        with backend.make() as runner:
            for shape in grid:
                if on_step:
                    on_step(f"{backend.label} {'x'.join(map(str, shape))}")
                # Feeds validated, outputs not refused: a NaN / Inf output is a failed row of
                # the report (compare_arrays flags it), not the end of the whole run.
                runner.validate(feeds[shape])
                got = runner.infer(feeds[shape], check=False)
                mask = feeds[shape][SRC_MASK]
                for spec in contract.outputs:
                    ref = _real_positions(spec.src_positional, mask, refs[shape][spec.name])
                    out = _real_positions(spec.src_positional, mask, got[spec.name])
                    is_logits = spec.name in TOP1_OUTPUTS
                    if is_logits:  # top-1 needs the vocabulary (class) axis
                        ref, out = refs[shape][spec.name], got[spec.name]
                    # Intermediates have no tokens: judge them by closeness only.
                    otol = tol if is_logits else Tolerance(tol.max_abs, tol.max_rel_range,
                                                           tol.min_cosine, 0.0)
                    metrics, reasons = compare_arrays(ref, out, otol, top1=is_logits)
                    if not reasons and not polygraphy_allclose(ref, out, otol.max_abs):
                        reasons.append("polygraphy CompareFunc.simple rejected the output")
                    rows.append(Row(backend.label, backend.precision, list(shape), spec.name,
                                    passed=not reasons, reasons=reasons,
                                    **metrics))  # type: ignore[arg-type]
            if on_step:
                on_step(f"{backend.label} checks")
            checks.extend(hmu_checks(runner, model, cfg, tol, opt_shape, contract, reference))
    passed = bool(rows) and all(r.passed for r in rows) and all(c.passed for c in checks)
    return ParityReport(passed, rows, checks, skipped, grid, tolerances,
                        describe_reference(model, cfg, contract), axes, primary_output(contract))


# ----------------------------------------------------------------------------- reports
def _fmt(x: float | None, spec: str = ".2e") -> str:
    return "-" if x is None else format(x, spec)


def markdown(report: ParityReport) -> str:
    dims = " x ".join(AXIS_LABEL.get(a, a) for a in report.axes)
    lines = [f"# Parity report: {'PASSED' if report.passed else 'FAILED'}", "",
             f"Reference: {report.reference}. Grid: {len(report.grid)} shapes ({dims}), "
             "odd rows padded, same noise for every backend.", "", "## Tolerances", "",
             "| precision | max_abs | max_rel_range | min_cosine | min_top1 |",
             "|---|---|---|---|---|"]
    for prec, t in sorted(report.tolerances.items()):
        lines.append(f"| {prec} | {t['max_abs']:g} | {t['max_rel_range']:g} | "
                     f"{t['min_cosine']} | {t['min_top1']} |")
    lines += ["", "## Worst case per backend and output", "",
              "| backend | precision | output | worst shape | max_abs | max_rel_range | "
              "min cosine | min top1 | rows passed |", "|---|---|---|---|---|---|---|---|---|"]
    keyed: dict[tuple[str, str, str], list[Row]] = {}
    for r in report.results:
        keyed.setdefault((r.backend, r.precision, r.output), []).append(r)
    for (backend, prec, output), rs in keyed.items():
        worst = max(rs, key=lambda r: r.max_abs)
        tops = [r.top1_agreement for r in rs if r.top1_agreement is not None]
        lines.append(f"| {backend} | {prec} | {output} | {'x'.join(map(str, worst.shape))} | "
                     f"{worst.max_abs:.2e} | {max(r.max_rel_range for r in rs):.2e} | "
                     f"{min(r.cosine for r in rs):.7f} | {_fmt(min(tops) if tops else None, '.4f')}"
                     f" | {sum(r.passed for r in rs)}/{len(rs)} |")
    lines += ["", "## HMU checks", "", "| backend | check | passed | detail |", "|---|---|---|---|"]
    for c in report.checks:
        lines.append(f"| {c.backend} | {c.name} | {'yes' if c.passed else 'NO'} | {c.detail} |")
    if report.skipped:
        lines += ["", "## Skipped backends", ""]
        lines += [f"- {k}: {v}" for k, v in report.skipped.items()]
    lines += ["", f"## All rows ({report.output})", "",
              "| backend | shape | max_abs | max_rel_range | cosine | top1 | passed |",
              "|---|---|---|---|---|---|---|"]
    for r in report.results:
        if r.output == report.output:
            lines.append(f"| {r.backend} | {'x'.join(map(str, r.shape))} | {r.max_abs:.2e} | "
                         f"{r.max_rel_range:.2e} | {r.cosine:.7f} | "
                         f"{_fmt(r.top1_agreement, '.4f')} | {'yes' if r.passed else 'NO'} |")
    fails = report.failures()
    if fails:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in fails]
    return "\n".join(lines) + "\n"


def heatmap(report: ParityReport, path: Path) -> Path:
    """PNG: log10(max abs error / tolerance) of the primary output (logits, class_logits); one
    panel per backend, rows (B, Ls), columns Lt (one column when the grid has no Lt), each cell
    annotated with its max abs error."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logits = [r for r in report.results if r.output == report.output]
    backends = list(dict.fromkeys(r.backend for r in logits)) or ["(none)"]

    def row_of(s: Sequence[int]) -> tuple[int, ...]:
        return tuple(s[:2])

    def col_of(s: Sequence[int]) -> int:
        return s[2] if len(s) > 2 else 0

    rows = sorted({row_of(s) for s in report.grid})
    cols = sorted({col_of(s) for s in report.grid})
    fig, axes = plt.subplots(1, len(backends), squeeze=False, sharey=True,
                             layout="constrained",
                             figsize=(2.4 + (0.75 * len(cols) + 0.4) * len(backends),
                                      1.6 + 0.3 * len(rows)))
    im = None
    for ax, backend in zip(axes[0], backends):
        data = np.full((len(rows), len(cols)), np.nan)
        for r in logits:
            if r.backend == backend:
                tol = report.tolerances[r.precision]["max_abs"]
                i, j = rows.index(row_of(r.shape)), cols.index(col_of(r.shape))
                data[i, j] = np.log10(max(r.max_abs, 1e-12) / tol)
                ax.text(j, i, f"{r.max_abs:.0e}", ha="center", va="center", fontsize=6)
        im = ax.imshow(data, aspect="auto", cmap="RdYlGn_r", vmin=-3, vmax=1)
        has_lt = len(report.axes) > 2
        ax.set_xticks(range(len(cols)), [str(c) if has_lt else "-" for c in cols], fontsize=7)
        if ax is axes[0][0]:
            ax.set_yticks(range(len(rows)), [" ".join(f"{AXIS_LABEL.get(a, a)}{v}" for a, v in
                                                       zip(report.axes, rw)) for rw in rows],
                          fontsize=7)
        ax.set_xlabel("Lt" if has_lt else "")
        ax.set_title(backend, fontsize=9)
    fig.suptitle(f"{report.output} max abs error vs PyTorch (color: log10 error/tolerance, > 0 fails); "
                 f"{'PASSED' if report.passed else 'FAILED'}", fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
    return write_png(fig, path)


def write_reports(report: ParityReport, folder: Path, json_path: Path | None = None
                  ) -> list[Path]:
    paths = [write_json(json_path or folder / "report.json", report.to_dict()),
             write_text(folder / "report.md", markdown(report)),
             heatmap(report, folder / "heatmap.png")]
    return paths


def summary(report: ParityReport) -> dict[str, Any]:
    """Compact figures for the manifest: worst error of the primary output (logits or
    class_logits) per backend."""
    worst: dict[str, float] = {}
    for r in report.results:
        if r.output == report.output:
            worst[r.backend] = max(worst.get(r.backend, 0.0), r.max_abs)
    return {"passed": report.passed, "reference": report.reference, "shapes": len(report.grid),
            "worst_logits_max_abs": worst, "skipped": report.skipped,
            "failures": report.failures()[:10]}


def load_report(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def layout_backends(root: Path, cfg: BuildConfig, model: "HMUTransformer | Any",
                    contract: GraphContract,
                    only: list[str] | None = None) -> list[Backend]:
    found = discover_backends(BuildLayout(root), cfg, model, contract)
    if only:
        unknown = sorted(set(only) - {b.label for b in found})
        if unknown:
            raise InputError(f"unknown backend(s) {', '.join(unknown)} (this build has: "
                             f"{', '.join(b.label for b in found)})")
        found = [b for b in found if b.label in only]
    return found
