"""Task accuracy: does every artifact still *solve the task* the user's model was trained for?

Numeric parity says how far logits moved; on a trained model the question a user asks is
whether the answers changed. Where the build's config names a task set (``[task] path``, JSON
lines of source / target texts; the default demo model has one), every generation backend
(FP32, FP16 emulation, int8, int4) generates greedily on the mean path for every source with
the build's tokenizer, and the decoded text is compared with the target exactly. FP32 backends
must reach the PyTorch model's accuracy *exactly* (they compute the same function); reduced
precisions report their drop and token agreement with the PyTorch outputs, and the int8 budget
(``[int8] max_exact_match_drop``) is judged on them.

The *noise sweep* measures the paper's "controlled variation" on a real model: at each HMU
noise scale, accuracy and how many distinct outputs one input gets over several noise draws.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..core.config import BuildConfig
from ..core.errors import BackendUnavailable, InputError
from ..core.task_set import Pair, read_pairs

#: the backends measured, in report order, and their precision
TASK_BACKENDS = (("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime-opt", "fp32"),
                 ("onnxruntime-fp16emu", "fp16"), ("onnxruntime-int8", "int8"),
                 ("onnxruntime-int4", "int4"))
REFERENCE = "torch"
NOISE_BACKEND = "onnxruntime"


@dataclass
class TaskRow:
    backend: str
    precision: str
    correct: int
    total: int
    #: fraction of the reference's output tokens matched position by position
    token_agreement: float
    #: outputs identical to the reference's, as a fraction
    same_output: float
    seconds: float
    misses: list[list[str]] = field(default_factory=list)  # the first few [source, want, got]

    @property
    def exact(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass
class NoiseRow:
    scale: float
    exact: float  # mean exact match over the draws
    distinct: float  # mean number of distinct outputs per input over the draws
    draws: int
    total: int


@dataclass
class TaskReport:
    path: str
    total: int
    rows: list[TaskRow] = field(default_factory=list)
    noise: list[NoiseRow] = field(default_factory=list)
    noise_backend: str = ""
    skipped: dict[str, str] = field(default_factory=dict)  # backend -> why it did not run
    budget_points: float | None = None  # the int8 / int4 budget, in exact-match points
    fp16_budget_points: float | None = None  # the FP16 one
    reference: str = REFERENCE  # the FP32 rows are held to this backend's accuracy

    def row(self, backend: str) -> TaskRow | None:
        return next((r for r in self.rows if r.backend == backend), None)

    def failures(self) -> list[str]:
        """FP32 backends that do not reach the reference's accuracy exactly, and quantized ones
        over the budget."""
        ref = self.row(self.reference)
        if ref is None:
            return []
        out = []
        for r in self.rows:
            if r.precision == "fp32" and r.correct != ref.correct:
                out.append(f"{r.backend} solves {r.correct}/{r.total} of the task set, "
                           f"{ref.backend} {ref.correct}/{ref.total} (FP32 must be equal)")
            drop = 100 * (ref.exact - r.exact)
            budget = {"int8": self.budget_points, "int4": self.budget_points,
                      "fp16": self.fp16_budget_points}.get(r.precision)
            if budget is not None and drop > budget + 1e-9:
                out.append(f"{r.backend} exact match {100 * r.exact:.2f}% is {drop:.2f} points "
                           f"below FP32 {100 * ref.exact:.2f}% (budget {budget:g} points)")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "total": self.total, "reference": self.reference,
                "noise_backend": self.noise_backend, "budget_points": self.budget_points,
                "fp16_budget_points": self.fp16_budget_points, "skipped": self.skipped,
                "rows": [dict(asdict(r), exact=round(r.exact, 6)) for r in self.rows],
                "noise": [asdict(n) for n in self.noise], "failures": self.failures()}

    def summary(self) -> dict[str, Any]:
        return {"total": self.total,
                "exact": {r.backend: round(r.exact, 6) for r in self.rows},
                "noise": {f"{n.scale:g}": [round(n.exact, 4), round(n.distinct, 3)]
                          for n in self.noise},
                "passed": not self.failures()}


# ----------------------------------------------------------------------------- evaluation
def load_task(cfg: BuildConfig, tokenizer: Any) -> list[Pair]:
    """The config's task set, every target checked against the tokenizer (a target it cannot
    encode could never be matched: one line naming file and line)."""
    pairs = read_pairs(cfg.task.path, cfg.task.limit)
    unk = getattr(tokenizer.tok, "unk_token_id", None)
    if unk is not None:
        for n, (_, target) in enumerate(pairs, 1):
            if unk in tokenizer.tok(target)["input_ids"]:
                raise InputError(f"{cfg.task.path}: example {n}: the tokenizer cannot encode "
                                 f"the target {target[:80]!r} (unknown token)")
    return pairs


def generate_texts(gen: Any, tokenizer: Any, sources: Sequence[str], batch: int,
                   **options: Any) -> tuple[list[str], list[list[int]]]:
    """(decoded texts, token ids) of ``gen`` for every source, ``batch`` rows per call."""
    texts: list[str] = []
    seqs: list[list[int]] = []
    for i in range(0, len(sources), batch):
        ids = tokenizer.encode(sources[i:i + batch])
        out = gen.generate(ids, **options).sequences
        seqs += [list(s) for s in out]
        texts += tokenizer.decode(out)
    return texts, seqs


def _agreement(ref: Sequence[Sequence[int]], got: Sequence[Sequence[int]]) -> tuple[float, float]:
    tokens = matched = same = 0
    for r, g in zip(ref, got):
        tokens += len(r)
        matched += sum(a == b for a, b in zip(r, g))
        same += list(r) == list(g)
    return (matched / tokens if tokens else 1.0), (same / len(ref) if ref else 1.0)


def run_task_accuracy(root: Path, cfg: BuildConfig, tokenizer: Any,
                      make_generator: Callable[[str], Any], *,
                      backends: Sequence[str] | None = None,
                      reuse: dict[str, TaskRow] | None = None, reference: str = REFERENCE,
                      noise: bool = True, log: Callable[[str], None] | None = None
                      ) -> TaskReport:
    """Exact match of every backend on the task set, then the noise sweep. ``make_generator``
    gives a Generator for a step backend's name (BackendUnavailable: reported as skipped);
    ``reuse`` holds rows already measured (the quantize stage's). PyTorch runs on one thread
    meanwhile: its small per-step ops gain nothing from a second thread (measured on the demo
    model, 2-core EPYC: 160 examples in 0.5 s on one thread, 1.7 s on two), and on a busy
    machine the thread barriers made the torch row 90x slower than ONNX Runtime's."""
    with _one_torch_thread():
        return _run(root, cfg, tokenizer, make_generator, backends, reuse, reference, noise, log)


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(root: Path, cfg: BuildConfig, tokenizer: Any, make_generator: Callable[[str], Any],
         backends: Sequence[str] | None, reuse: dict[str, TaskRow] | None, reference: str,
         noise: bool, log: Callable[[str], None] | None) -> TaskReport:
    pairs = load_task(cfg, tokenizer)
    sources = [s for s, _ in pairs]
    targets = [t.strip() for _, t in pairs]
    batch = cfg.profile.batch[2]
    report = TaskReport(str(cfg.task.path), len(pairs),
                        budget_points=cfg.int8.max_exact_match_drop,
                        fp16_budget_points=cfg.parity.fp16_max_exact_match_drop,
                        reference=reference)
    names = list(backends) if backends is not None else [b for b, _ in TASK_BACKENDS]
    precision = dict(TASK_BACKENDS)
    ref_seqs: list[list[int]] | None = None
    for name in ([reference] + [n for n in names if n != reference]):
        if reuse and name in reuse and name != reference:
            report.rows.append(reuse[name])
            continue
        try:
            gen = make_generator(name)
        except BackendUnavailable as exc:
            if name == reference:
                raise
            report.skipped[name] = str(exc)
            continue
        t0 = time.perf_counter()
        texts, seqs = generate_texts(gen, tokenizer, sources, batch, strategy="greedy",
                                     noise_scale=0.0)
        seconds = time.perf_counter() - t0
        if ref_seqs is None:
            ref_seqs = seqs
        agree, same = _agreement(ref_seqs, seqs)
        correct = [t.strip() == want for t, want in zip(texts, targets)]
        misses = [[s, want, got] for s, want, got, ok in zip(sources, targets, texts, correct)
                  if not ok][:10]
        report.rows.append(TaskRow(name, precision.get(name, "fp32"), sum(correct), len(pairs),
                                   round(agree, 6), round(same, 6), round(seconds, 3), misses))
        if log:
            log(f"task accuracy {name}: {sum(correct)}/{len(pairs)} in {seconds:.1f} s")
    if noise and cfg.task.noise_limit and NOISE_BACKEND in names:
        report.noise_backend = NOISE_BACKEND
        report.noise = noise_sweep(make_generator(NOISE_BACKEND), tokenizer, cfg,
                                   pairs[:cfg.task.noise_limit])
    return report


def noise_sweep(gen: Any, tokenizer: Any, cfg: BuildConfig, pairs: Sequence[Pair]
                ) -> list[NoiseRow]:
    """Accuracy and distinct outputs per input at each noise scale (greedy decoding: the HMU
    noise is the only source of variation; draw d uses noise seed d)."""
    sources = [s for s, _ in pairs]
    targets = [t.strip() for _, t in pairs]
    batch = cfg.profile.batch[2]
    rows = []
    for scale in cfg.task.noise_scales:
        draws = 1 if scale == 0 else cfg.task.noise_draws
        outs = [generate_texts(gen, tokenizer, sources, batch, strategy="greedy",
                               noise_scale=scale, noise_seed=d)[0] for d in range(draws)]
        exact = sum(t.strip() == want for texts in outs for t, want in zip(texts, targets))
        distinct = sum(len({texts[i].strip() for texts in outs}) for i in range(len(pairs)))
        rows.append(NoiseRow(scale, exact / (draws * len(pairs)), distinct / len(pairs), draws,
                             len(pairs)))
    return rows


# ----------------------------------------------------------------------------- reports
def markdown(report: TaskReport) -> str:
    lines = [f"# Task accuracy ({report.total} examples of {Path(report.path).name})", "",
             "Greedy, mean path (noise 0), the build's tokenizer; exact match of the decoded "
             "text. FP32 backends must equal the PyTorch model; FP16 is held to a drop of at "
             f"most {report.fp16_budget_points} points, int8 / int4 to "
             f"{report.budget_points} points.", "",
             "| backend | precision | exact match | correct | token agreement | same output as "
             "torch | seconds |", "|---|---|---|---|---|---|---|"]
    for r in report.rows:
        lines.append(f"| {r.backend} | {r.precision} | {100 * r.exact:.2f}% | {r.correct}/"
                     f"{r.total} | {100 * r.token_agreement:.2f}% | {100 * r.same_output:.2f}% "
                     f"| {r.seconds:.1f} |")
    for name, why in report.skipped.items():
        lines.append(f"| {name} | | skipped: {why} | | | | |")
    if report.noise:
        lines += ["", f"## Accuracy against HMU noise scale ({report.noise_backend}, "
                  f"{report.noise[0].total} examples)", "",
                  "| noise scale | draws | exact match | distinct outputs per input |",
                  "|---|---|---|---|"]
        lines += [f"| {n.scale:g} | {n.draws} | {100 * n.exact:.2f}% | {n.distinct:.2f} |"
                  for n in report.noise]
    fails = report.failures()
    lines += ["", "**passed**" if not fails else "**failed**: " + "; ".join(fails)]
    return "\n".join(lines) + "\n"


def plot(report: TaskReport, path: Path) -> Path | None:
    """Accuracy and distinct outputs against noise scale (None when there is no sweep)."""
    if not report.noise:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..core.fileio import write_png

    scales = [n.scale for n in report.noise]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(scales, [100 * n.exact for n in report.noise], "o-", color="tab:blue")
    ax.set_xlabel("HMU noise scale")
    ax.set_ylabel("exact match (%)", color="tab:blue")
    ax.set_ylim(0, 102)
    ax2 = ax.twinx()
    ax2.plot(scales, [n.distinct for n in report.noise], "s--", color="tab:orange")
    ax2.set_ylabel("distinct outputs per input", color="tab:orange")
    ax2.set_ylim(bottom=0.9)
    ax.set_title(f"Controlled variation ({report.noise_backend}, {report.noise[0].total} inputs)")
    fig.tight_layout()
    return write_png(fig, path)


def write_task_reports(report: TaskReport, folder: Path) -> list[Path]:
    from ..core.fileio import write_json, write_text

    folder.mkdir(parents=True, exist_ok=True)
    out = [write_json(folder / "task.json", report.to_dict()),
           write_text(folder / "task.md", markdown(report))]
    png = plot(report, folder / "task_noise.png")
    return out + ([png] if png else [])
