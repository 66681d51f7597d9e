"""Parity of the generation graphs: does a cached decoder loop compute what the full model does?

Two checks, both against oracles that share no code with the cached path:
- *Step parity*: ``encoder.onnx`` once, then ``decoder.onnx`` fed in chunks (the whole target at
  past 0, one token at a time, mixed chunks) must give the logits ``model.onnx`` gives for the
  same positions, over a grid with past 0, new 1, padded rows and the profile's maxima; and
  *in flight* (chunks ``"inflight"``): rows joining a running batch at different steps (their
  past padded on the left, ``past_mask`` 0) and leaving when done (cache compacted), each row
  at its own positions, must give every row the full graph's logits.
- *Token parity*: greedy tokens of every FP32 backend equal ``torch-nocache`` (the full PyTorch
  model re-run over the whole prefix each step) at several batch sizes with ragged rows. FP16
  backends report token agreement and the first divergent step instead of failing on it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..core.layout import BuildLayout
from ..core.config import BuildConfig
from ..core.io_contract import (DECODER, ENCODER, LOGITS, NOISE, PAST_MASK, POSITIONS, SRC_IDS,
                                SRC_MASK, TGT_IDS, cross_key, cross_value, make_feeds, past_key,
                                past_value, present_key, present_value, row_state_refusal)

FP32_BACKENDS = ("torch", "onnxruntime", "onnxruntime-opt")
FP16_BACKENDS = ("onnxruntime-fp16emu",)


@dataclass
class StepRow:
    variant: str  # "" (exported graphs) or "opt"
    batch: int
    src_len: int
    tgt_len: int
    chunks: list[int]  # new_len of each decoder call ([] for the in-flight case)
    max_abs: float
    passed: bool


@dataclass
class TokenRow:
    backend: str
    precision: str
    batch: int
    src_lens: list[int]
    agreement: float  # fraction of reference tokens matched position by position
    first_divergence: int | None  # step of the first differing token (None: identical)
    exact: bool
    passed: bool
    seconds: float


@dataclass
class GenerationParityReport:
    reference: str
    steps: list[StepRow] = field(default_factory=list)
    tokens: list[TokenRow] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    tolerance: float = 1e-4

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.steps) and all(r.passed for r in self.tokens)

    def failures(self) -> list[str]:
        out = [f"decoder{'.' + r.variant if r.variant else ''} step logits at B={r.batch} "
           f"{'(in flight) ' if not r.chunks else ''}"
               f"Ls={r.src_len} Lt={r.tgt_len} chunks={r.chunks}: max abs {r.max_abs:.2e} > "
               f"{self.tolerance:g}" for r in self.steps if not r.passed]
        out += [f"{r.backend} greedy tokens differ from {self.reference} at B={r.batch} (first at "
                f"step {r.first_divergence})" for r in self.tokens if not r.passed]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "passed": self.passed, "tolerance": self.tolerance,
                "steps": [asdict(r) for r in self.steps],
                "tokens": [asdict(r) for r in self.tokens], "skipped": self.skipped,
                "failures": self.failures()}

    def summary(self) -> dict[str, Any]:
        worst = max((r.max_abs for r in self.steps), default=0.0)
        per_backend: dict[str, Any] = {}
        for r in self.tokens:
            b = per_backend.setdefault(r.backend, {"exact": True, "min_agreement": 1.0})
            b["exact"] = b["exact"] and r.exact
            b["min_agreement"] = min(b["min_agreement"], r.agreement)
        return {"passed": self.passed, "step_cases": len(self.steps),
                "worst_step_max_abs": worst, "greedy_vs_reference": per_backend,
                "reference": self.reference, "skipped": self.skipped,
                "failures": self.failures()[:10]}


# ----------------------------------------------------------------------------- step parity
def step_cases(cfg: BuildConfig) -> list[tuple[int, int, int, list[int]]]:
    """(batch, src_len, tgt_len, chunks) cases: past 0 with the whole target, one token at a
    time up to the profile's max, and a mixed chunking; padded rows wherever batch >= 2."""
    p = cfg.profile
    lt_max = min(p.tgt_len[2], p.past_len[2] + 1)  # type: ignore[index]
    new_max = p.new_len[2]  # type: ignore[index]
    cases: list[tuple[int, int, int, list[int]]] = []
    for b, ls in ((p.batch[0], p.src_len[0]), (max(p.batch[0], min(3, p.batch[2])), p.src_len[1]),
                  (p.batch[2], p.src_len[2])):
        cases.append((b, ls, 1, [1]))  # past 0, new 1: the first generation step
        whole = min(lt_max, new_max)
        cases.append((b, ls, whole, [whole]))  # past 0, the whole target at once
        cases.append((b, ls, lt_max, [1] * lt_max))  # one token per call up to past max
        mixed, left = [], min(lt_max, 7)
        while left:
            n = min(left, 1 + len(mixed) % 3, new_max)
            mixed.append(n)
            left -= n
        cases.append((b, ls, sum(mixed), mixed))
    seen: set[tuple] = set()
    out = []
    for c in cases:
        key = (c[0], c[1], c[2], tuple(c[3]))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _session(path: Path):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _declared_cache(dec) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    """(layers, heads, head_dim) from the decoder graph's declared past_key inputs."""
    shapes = {i.name: i.shape for i in dec.get_inputs()}
    layers = sum(1 for n in shapes if n.startswith("past_key."))
    heads, head_dim = shapes[past_key(0)][1], shapes[past_key(0)][3]
    return layers, int(heads), int(head_dim)


def run_step_parity(layout: BuildLayout, cfg: BuildConfig, variant: str = "",
                    on_step: Callable[[str], None] | None = None) -> list[StepRow]:
    """Decoder-step logits vs the full graph's (plain CPU ORT on both sides)."""
    full = _session(layout.onnx)
    enc = _session(layout.graph(ENCODER, variant))
    dec = _session(layout.graph(DECODER, variant))
    layers, heads, head_dim = _declared_cache(dec)
    enc_out = [o.name for o in enc.get_outputs()]
    dec_out = [o.name for o in dec.get_outputs()]
    refusal = row_state_refusal([i.name for i in dec.get_inputs()],
                                str(layout.graph(DECODER, variant)))
    if refusal:
        from ..core.errors import ArtifactError
        raise ArtifactError(refusal)
    tol = cfg.parity.fp32_max_abs
    rows = []
    for b, ls, lt, chunks in step_cases(cfg):
        if on_step:
            on_step(f"decoder{'.' + variant if variant else ''} steps B={b} Ls={ls} Lt={lt}")
        feeds = make_feeds(cfg.model, b, ls, lt, seed=cfg.parity.seed,
                           noise_scale=cfg.parity.noise_scale)
        ref = full.run([LOGITS], feeds)[0]
        memory = dict(zip(enc_out, enc.run(enc_out, {k: feeds[k] for k in
                                                     (SRC_IDS, SRC_MASK, NOISE)})))
        state = {SRC_MASK: feeds[SRC_MASK], PAST_MASK: np.zeros((b, 0), dtype=np.int64)}
        empty = np.zeros((b, heads, 0, head_dim), dtype=np.float32)
        for i in range(layers):
            state[cross_key(i)], state[cross_value(i)] = memory[cross_key(i)], memory[cross_value(i)]
            state[past_key(i)], state[past_value(i)] = empty, empty
        got, pos = [], 0
        for n in chunks:
            step = dict(state, **{TGT_IDS: feeds[TGT_IDS][:, pos:pos + n],
                                  POSITIONS: np.tile(np.arange(pos, pos + n, dtype=np.int64),
                                                     (b, 1))})
            out = dict(zip(dec_out, dec.run(dec_out, step)))
            got.append(out[LOGITS])
            for i in range(layers):
                state[past_key(i)], state[past_value(i)] = out[present_key(i)], out[present_value(i)]
            state[PAST_MASK] = np.ones((b, pos + n), dtype=np.int64)
            pos += n
        err = float(np.max(np.abs(np.concatenate(got, axis=1) - ref)))
        rows.append(StepRow(variant, b, ls, lt, list(chunks), err, err <= tol))
    for b, ls, lt, joins in inflight_cases(cfg):
        if on_step:
            on_step(f"decoder{'.' + variant if variant else ''} in flight B={b} Ls={ls} Lt={lt}")
        feeds = make_feeds(cfg.model, b, ls, lt, seed=cfg.parity.seed + 1,
                           noise_scale=cfg.parity.noise_scale)
        ref = full.run([LOGITS], feeds)[0]
        memory = dict(zip(enc_out, enc.run(enc_out, {k: feeds[k] for k in
                                                     (SRC_IDS, SRC_MASK, NOISE)})))
        got_rows = inflight_logits(dec, dec_out, feeds, memory, layers, joins)
        err = max(float(np.max(np.abs(got_rows[r] - ref[r]))) for r in range(b))
        rows.append(StepRow(variant, b, ls, lt, [], err, err <= tol))
    return rows


def inflight_cases(cfg: BuildConfig) -> list[tuple[int, int, int, list[int]]]:
    """(batch, src_len, tgt_len, join step of each row): rows join a running batch at
    different steps and leave when their target is fed, within the profile's batch and
    past_len maxima (a row's past never exceeds tgt_len - 1; padding slots count too)."""
    p = cfg.profile
    lt = max(2, min(p.tgt_len[2], p.past_len[2] + 1, 6))  # type: ignore[index]
    b = max(2, min(p.batch[2], 4))
    # join steps 0, 2, 1, 3, ...: the batch's past (the oldest row's) stays below lt
    joins = [(0, 2, 1, 3)[r % 4] % lt for r in range(b)]
    joins[0] = 0
    if p.batch[2] < 2 or p.past_len[2] < 1:  # type: ignore[index]
        return []
    return [(b, p.src_len[1], lt, joins)]


def inflight_logits(dec, dec_out: list[str], feeds: dict[str, np.ndarray],  # type: ignore[no-untyped-def]
                    memory: dict[str, np.ndarray], layers: int, joins: list[int]
                    ) -> list[np.ndarray]:
    """Per-row logits [tgt_len, vocab] of teacher-forced targets fed one token per step to a
    running batch: row r joins at step joins[r] (its cache padded to the batch's past with
    past_mask 0), leaves after its last token (rows dropped, all-padding columns trimmed)."""
    b, lt = feeds[TGT_IDS].shape
    heads, head_dim = memory[cross_key(0)].shape[1], memory[cross_key(0)].shape[3]
    live: list[int] = []  # original rows in the batch, in batch order
    fed = {r: 0 for r in range(b)}
    out_rows: dict[int, list[np.ndarray]] = {r: [] for r in range(b)}
    past: dict[str, np.ndarray] = {}
    past_mask = np.zeros((0, 0), dtype=np.int64)
    names = [f(i) for i in range(layers) for f in (past_key, past_value)]
    t = 0
    while len(live) or any(fed[r] < lt for r in range(b)):
        joining = [r for r in range(b) if joins[r] == t]
        if joining:
            plen = past_mask.shape[1]
            add = np.zeros((len(joining), heads, plen, head_dim), dtype=np.float32)
            for n in names:
                past[n] = add if not live else np.concatenate([past[n], add], axis=0)
            past_mask = np.concatenate([past_mask.reshape(len(live), plen),
                                        np.zeros((len(joining), plen), dtype=np.int64)], axis=0)
            live += joining
        if live:
            idx = np.asarray(live)
            step = {TGT_IDS: np.asarray([[feeds[TGT_IDS][r, fed[r]]] for r in live]),
                    SRC_MASK: feeds[SRC_MASK][idx], PAST_MASK: past_mask,
                    POSITIONS: past_mask.sum(axis=1, dtype=np.int64)[:, None]}
            for i in range(layers):
                step[cross_key(i)] = memory[cross_key(i)][idx]
                step[cross_value(i)] = memory[cross_value(i)][idx]
            step.update({n: past[n] for n in names})
            out = dict(zip(dec_out, dec.run(dec_out, step)))
            for j, r in enumerate(live):
                out_rows[r].append(out[LOGITS][j, -1])
                fed[r] += 1
            for i in range(layers):
                past[past_key(i)], past[past_value(i)] = out[present_key(i)], out[present_value(i)]
            past_mask = np.concatenate([past_mask, np.ones((len(live), 1), dtype=np.int64)], 1)
            keep = [j for j, r in enumerate(live) if fed[r] < lt]
            if len(keep) < len(live):  # leave: drop rows, trim columns no row uses
                past_mask = past_mask[keep]
                used = np.flatnonzero(past_mask.any(axis=0))
                first = int(used[0]) if used.size else past_mask.shape[1]
                past_mask = past_mask[:, first:]
                for n in names:
                    past[n] = past[n][keep][:, :, first:]
                live = [live[j] for j in keep]
        t += 1
    return [np.stack(out_rows[r]) for r in range(b)]


# ----------------------------------------------------------------------------- token parity
def token_inputs(cfg: BuildConfig, seed: int = 0) -> list[list[list[int]]]:
    """Ragged source batches at batch 1, 3 and the profile's max (lengths within the profile)."""
    p, m = cfg.profile, cfg.model
    rng = np.random.default_rng([seed, 17])
    batches = []
    for b in sorted({p.batch[0], max(p.batch[0], min(3, p.batch[2])), p.batch[2]}):
        lens = rng.integers(p.src_len[0], p.src_len[2] + 1, size=b)
        lens[0] = p.src_len[2]  # one row at the profile's max length
        low = 3 if m.vocab_size > 3 else 0  # keep BOS/EOS ids out of sources where possible
        batches.append([rng.integers(low, m.vocab_size, size=int(n)).tolist() for n in lens])
    return batches


def compare_tokens(ref: Sequence[Sequence[int]], got: Sequence[Sequence[int]]
                   ) -> tuple[float, int | None]:
    """(agreement over reference positions, first divergent step or None)."""
    total = matched = 0
    first: int | None = None
    for r, g in zip(ref, got):
        total += max(len(r), len(g))
        for t in range(max(len(r), len(g))):
            same = t < len(r) and t < len(g) and r[t] == g[t]
            matched += same
            if not same and (first is None or t < first):
                first = t
    return (matched / total if total else 1.0), first


def run_token_parity(root: Path, cfg: BuildConfig, load_source: Callable[[], Any],
                     backends: Sequence[str] | None = None,
                     on_step: Callable[[str], None] | None = None
                     ) -> tuple[list[TokenRow], dict[str, str]]:
    from ..backends.registry import make_stepper
    from ..core.errors import HMUExportError
    from ..generate.generator import Generator

    def gen(name: str) -> Generator:
        return Generator(make_stepper(root, cfg, name, load_source=load_source), cfg)

    names = list(backends) if backends else list(FP32_BACKENDS + FP16_BACKENDS)
    reference = gen("torch-nocache")
    batches = token_inputs(cfg, cfg.parity.seed)
    refs = []
    for src in batches:
        if on_step:
            on_step(f"torch-nocache greedy B={len(src)}")
        refs.append(reference.generate(src, strategy="greedy").sequences)
    rows, skipped = [], {}
    for name in names:
        try:
            g = gen(name)
        except HMUExportError as exc:
            skipped[name] = str(exc)
            continue
        precision = "fp16" if "fp16" in name else "fp32"
        for src, ref in zip(batches, refs):
            if on_step:
                on_step(f"{name} greedy B={len(src)}")
            res = g.generate(src, strategy="greedy")
            agree, first = compare_tokens(ref, res.sequences)
            exact = first is None
            rows.append(TokenRow(name, precision, len(src), [len(r) for r in src], agree, first,
                                 exact, exact or precision == "fp16", round(res.seconds, 4)))
    return rows, skipped


def run_generation_parity(root: Path, cfg: BuildConfig, load_source: Callable[[], Any], *,
                          backends: Sequence[str] | None = None,
                          on_step: Callable[[str], None] | None = None
                          ) -> GenerationParityReport:
    """Step parity on the exported (and optimized) graphs, then token parity per backend.
    ``load_source`` gives the PyTorch model (torch backends, and the torch-nocache reference)."""
    layout = BuildLayout(Path(root))
    report = GenerationParityReport("torch-nocache", tolerance=cfg.parity.fp32_max_abs)
    report.steps += run_step_parity(layout, cfg, "", on_step)
    if layout.graph(ENCODER, "opt").is_file() and layout.graph(DECODER, "opt").is_file():
        report.steps += run_step_parity(layout, cfg, "opt", on_step)
    report.tokens, report.skipped = run_token_parity(Path(root), cfg, load_source, backends,
                                                     on_step)
    return report


def markdown(report: GenerationParityReport) -> str:
    lines = [f"# Generation parity: {'PASSED' if report.passed else 'FAILED'}", "",
             f"Reference for tokens: `{report.reference}` (the full PyTorch model re-run over the "
             "whole prefix every step). Step logits: `decoder.onnx` fed in chunks vs "
             f"`model.onnx` at the same positions, FP32 tolerance {report.tolerance:g}.", "",
             "| graphs | B | Ls | Lt | chunks | max abs | |", "|---|---|---|---|---|---|---|"]
    for r in report.steps:
        chunks = "in flight" if not r.chunks else ",".join(map(str, r.chunks)) \
            if len(r.chunks) <= 6 else \
            f"{r.chunks[0]} x{len(r.chunks)}" if len(set(r.chunks)) == 1 else f"{len(r.chunks)} calls"
        lines.append(f"| {'opt' if r.variant else 'exported'} | {r.batch} | {r.src_len} | "
                     f"{r.tgt_len} | {chunks} | {r.max_abs:.1e} | {'ok' if r.passed else 'FAIL'} |")
    lines += ["", "| backend | precision | B | agreement | first divergent step | |",
              "|---|---|---|---|---|---|"]
    for t in report.tokens:
        lines.append(f"| {t.backend} | {t.precision} | {t.batch} | {100 * t.agreement:.1f}% | "
                     f"{'-' if t.first_divergence is None else t.first_divergence} | "
                     f"{'exact' if t.exact else ('reported' if t.passed else 'FAIL')} |")
    for name, why in report.skipped.items():
        lines.append(f"\nSkipped `{name}`: {why}")
    return "\n".join(lines) + "\n"


def write_generation_reports(report: GenerationParityReport, folder: Path) -> None:
    from ..core.fileio import write_json, write_text

    write_json(Path(folder) / "generation.json", report.to_dict())
    write_text(Path(folder) / "generation.md", markdown(report))


