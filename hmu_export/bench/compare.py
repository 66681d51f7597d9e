"""`bench --compare BASELINE.json`: each row's change against a stored run, with a verdict that
knows the noise.

Rows match on (backend, precision, device, copies, shape). For each pair the change is
p50(run) / p50(baseline) - 1 with a 95% interval:

- **bootstrap** when both rows carry per-call samples (``samples_ms``, bench/stability.py) with at
  least ``MIN_SAMPLES`` each: 2000 resamples of each side, the ratio of the two medians
  (seeded: the same files always give the same interval), rescaled onto the ratio of the rows'
  p50s (the stored quantiles' median can differ from the p50 over all calls by interpolation,
  and the change printed is always the p50s');
- **summary** otherwise (bench JSONs written before samples were stored): the median's standard
  error from the recorded dispersion, 1.2533 * sigma / sqrt(iters) with sigma = (p90 - p50) /
  1.2816 (the upper half of a normal: conservative for right-skewed latencies), or from the
  samples' order-statistic interval on the side that has them. A weaker verdict, and the
  report says so.

Verdict, with a noise floor ``threshold`` (default 5%, the run-to-run spread of a quiet 2-core
machine: two runs differ by that much with no code change, which no within-run statistic
sees): **slower** if the whole interval lies above 0 and the change is >= threshold,
**faster** mirrored, **same** if neither and the interval's half-width is <= threshold,
**unclear** if neither and the interval is wider (the data cannot tell a change of the
threshold's size from none; also any row with fewer than ``MIN_SAMPLES`` calls). A row that
either run found bimodal gets a higher floor, the distance between its modes (its p50 moves
between them as the calls' split changes from run to run, which no resampling of one run
sees), and is never called "same" (unclear instead). Other rows that either run flagged as
not settled keep their verdict, with the flags beside it.

Comparing never fails on a slowdown (exit 0: it reports); a baseline that is missing, not
JSON, not a bench result, from another model, or without a row in common is one ``error:``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import ArtifactError
from ..core.fileio import read_json_object

DEFAULT_THRESHOLD = 0.05
MIN_SAMPLES = 20
BOOTSTRAP = 2000
#: where the baselines of the machine classes live (one per CPU model: ``<slug>.json``)
BASELINES = Path(__file__).resolve().parents[2] / "benchmarks" / "baselines"
KEY_FIELDS = ("backend", "precision", "device", "copies")
VERDICTS = ("slower", "unclear", "faster", "same")
MACHINE_FLAGS = {"contended", "steal", "frequency"}  # bench/stability.py's flags about the machine


# --------------------------------------------------------------------------- files
def machine_slug(cpu: str) -> str:
    """File-name form of a CPU model: "Intel(R) Xeon(R) CPU @ 2.20GHz" ->
    "intel-xeon-cpu-2-20ghz"."""
    s = re.sub(r"\((r|tm)\)", "", cpu.lower())
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s or "unknown-cpu"


def baseline_path(cpu: str, root: Path | None = None) -> Path:
    """benchmarks/baselines/<slug of the CPU model>.json (or under ``root``)."""
    return Path(root if root is not None else BASELINES) / f"{machine_slug(cpu)}.json"


def load_run(path: Path, what: str = "baseline") -> dict[str, Any]:
    """A stored ``bench`` JSON (any version of the format), or ArtifactError in one line."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} {path} does not exist")
    data = read_json_object(path, ArtifactError, what)
    rows = data.get("results")
    if (not isinstance(rows, list) or not rows or not all(
            isinstance(r, dict) and {"backend", "shape", "p50_ms"} <= set(r) for r in rows)):
        raise ArtifactError(f"{what} {path} is not a forward bench result (no 'results' rows "
                            "with backend, shape and p50_ms; bench --generate results are not "
                            "compared)")
    return data


#: config fields that name files, not the model (the same weights may sit anywhere)
PATH_FIELDS = ("checkpoint", "path", "hmu_checkpoint")


def _model_identity(run: dict[str, Any]) -> dict[str, Any]:
    """Name, graph and model config of a run, in today's terms: fields that older JSONs lack
    take ModelConfig's defaults (what those runs had), n_heads 0 is resolved, paths are left
    out."""
    import dataclasses

    from ..core.config import ModelConfig
    m = run.get("model") or {}
    stored = m.get("config") or {}
    cfg = dataclasses.asdict(ModelConfig()) | stored if stored else {}
    if cfg.get("n_heads") == 0 and isinstance(cfg.get("d_model"), int):
        cfg["n_heads"] = max(1, cfg["d_model"] // 32)
    cfg = {k: v for k, v in cfg.items() if k not in PATH_FIELDS}
    return {"name": m.get("name"), "config": cfg, "graph": m.get("graph"), "axes": m.get("axes")}


def check_same_model(base: dict[str, Any], run: dict[str, Any], base_path: Path) -> None:
    a, b = _model_identity(base), _model_identity(run)
    if a == b:
        return
    diff = [f"name {a['name']!r} vs {b['name']!r}"] if a["name"] != b["name"] else []
    diff += [f"{k} {a['config'].get(k)!r} vs {b['config'].get(k)!r}"
             for k in sorted(set(a["config"]) | set(b["config"]))
             if a["config"].get(k) != b["config"].get(k)]
    diff += [f"{k} {a[k]!r} vs {b[k]!r}" for k in ("graph", "axes") if a[k] != b[k]]
    raise ArtifactError(f"baseline {base_path} is from another model ({'; '.join(diff[:4])}"
                        f"{'; ...' if len(diff) > 4 else ''}): compare runs of the same model")


# --------------------------------------------------------------------------- statistics
def _key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (*(r.get(k) for k in KEY_FIELDS), tuple(r["shape"]))


def _samples(r: dict[str, Any]) -> np.ndarray | None:
    s = r.get("samples_ms")
    if isinstance(s, list) and len(s) >= MIN_SAMPLES:
        return np.asarray(s, dtype=np.float64)
    return None


def bootstrap_change(a: np.ndarray, b: np.ndarray, n: int = BOOTSTRAP, seed: int = 0
                     ) -> tuple[float, float, float]:
    """(change, lo, hi): median(b)/median(a) - 1 and its 95% percentile-bootstrap interval."""
    rng = np.random.default_rng(seed)
    ma = np.median(a[rng.integers(0, a.size, (n, a.size))], axis=1)
    mb = np.median(b[rng.integers(0, b.size, (n, b.size))], axis=1)
    ratio = mb / ma
    lo, hi = np.percentile(ratio, [2.5, 97.5])
    return float(np.median(b) / np.median(a) - 1), float(lo - 1), float(hi - 1)


def mode_gap(r: dict[str, Any]) -> float:
    """How far a bimodal row's p50 can jump with no code change: the slower mode over the
    faster one, minus 1 (0 for a row without two modes)."""
    modes = (r.get("stability") or {}).get("modes")
    if not modes or len(modes) != 2 or not modes[0].get("ms"):
        return 0.0
    return max(float(modes[1]["ms"]) / float(modes[0]["ms"]) - 1, 0.0)


def _rel_se(r: dict[str, Any]) -> float:
    """Relative standard error of a row's p50: from its samples' order-statistic interval, else
    from p90 - p50 and the call count (rows of older JSONs)."""
    s = _samples(r)
    p50 = float(r["p50_ms"])
    if s is not None:
        from .stability import median_ci
        lo, hi = median_ci(s)
        return (hi - lo) / (2 * 1.96) / float(np.median(s))
    sigma = max(float(r.get("p90_ms", p50)) - p50, 0.0) / 1.2816
    if sigma == 0 and r.get("std_ms"):
        sigma = float(r["std_ms"])
    n = max(int(r.get("iters") or 1), 1)
    return 1.2533 * sigma / math.sqrt(n) / p50


def summary_change(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float, float]:
    """(change, lo, hi) from the two rows' p50s and their standard errors (log scale)."""
    ratio = float(b["p50_ms"]) / float(a["p50_ms"])
    se = math.hypot(_rel_se(a), _rel_se(b))
    return ratio - 1, ratio * math.exp(-1.96 * se) - 1, ratio * math.exp(1.96 * se) - 1


def verdict(change: float, lo: float, hi: float, threshold: float = DEFAULT_THRESHOLD) -> str:
    if lo > 0 and change >= threshold:
        return "slower"
    if hi < 0 and change <= -threshold:
        return "faster"
    return "same" if (hi - lo) / 2 <= threshold else "unclear"


# --------------------------------------------------------------------------- comparison
@dataclass
class Comparison:
    baseline: str
    threshold: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    only_baseline: list[str] = field(default_factory=list)
    only_run: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {v: sum(r["verdict"] == v for r in self.rows) for v in VERDICTS}

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "threshold": self.threshold, "counts": self.counts(),
                "rows": self.rows, "only_baseline": self.only_baseline,
                "only_run": self.only_run, "notes": self.notes}


def _label(r: dict[str, Any]) -> str:
    return f"{r['backend']} {'x'.join(map(str, r['shape']))} ({r.get('copies', 'included')})"


def _flags(r: dict[str, Any]) -> list[str]:
    st = r.get("stability")
    return [] if not st or st.get("settled") else list(st.get("flags", []))


def _settled(r: dict[str, Any]) -> bool | None:
    st = r.get("stability")
    return None if not st else bool(st.get("settled"))


def machine_notes(base: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """What differs between the two runs' machines and libraries (changes then mix causes)."""
    a, b = base.get("machine") or {}, run.get("machine") or {}
    notes = []
    if a.get("cpu") != b.get("cpu"):
        notes.append(f"other machine class: baseline CPU {a.get('cpu')!r}, run {b.get('cpu')!r} "
                     "(changes mix the machine and the code)")
    if a.get("threads") != b.get("threads"):
        notes.append(f"threads differ: baseline {a.get('threads')}, run {b.get('threads')}")
    va, vb = a.get("versions") or {}, b.get("versions") or {}
    libs = [f"{k} {va.get(k)} -> {vb.get(k)}" for k in sorted(set(va) | set(vb))
            if va.get(k) != vb.get(k)]
    if libs:
        notes.append("versions differ: " + ", ".join(libs))
    return notes


def compare_runs(base: dict[str, Any], run: dict[str, Any], *, baseline: str = "baseline",
                 threshold: float = DEFAULT_THRESHOLD, seed: int = 0) -> Comparison:
    """Match the rows of two bench results and give each pair its change and verdict."""
    check_same_model(base, run, Path(baseline))
    brows = {_key(r): r for r in base["results"]}
    rrows = {_key(r): r for r in run["results"]}
    common = [k for k in rrows if k in brows]
    if not common:
        def what(rows: dict[tuple[Any, ...], dict[str, Any]]) -> str:
            return ", ".join(sorted({_label(r) for r in rows.values()})[:6])
        raise ArtifactError(f"baseline {baseline} has no row in common with this run "
                            f"(baseline: {what(brows)}; run: {what(rrows)})")
    cmp = Comparison(baseline, threshold, notes=machine_notes(base, run))
    older = False
    for k in common:
        a, b = brows[k], rrows[k]
        sa, sb = _samples(a), _samples(b)
        if sa is not None and sb is not None:
            method = "bootstrap"
            # stored quantiles' medians may differ slightly from the rows' p50s (or, in any
            # hand-thinned file, a lot): the interval is rescaled onto the p50s' ratio
            sample_change, lo, hi = bootstrap_change(sa, sb, seed=seed)
            ratio = float(b["p50_ms"]) / float(a["p50_ms"])
            scale = ratio / (1 + sample_change)
            change, lo, hi = ratio - 1, scale * (1 + lo) - 1, scale * (1 + hi) - 1
        else:
            method = "summary"
            older |= "samples_ms" not in a or "samples_ms" not in b
            change, lo, hi = summary_change(a, b)
        floor = max(threshold, mode_gap(a), mode_gap(b))
        v = verdict(change, lo, hi, floor)
        few = min(int(a.get("iters") or 0), int(b.get("iters") or 0))
        if few < MIN_SAMPLES or (floor > threshold and v == "same"):
            v = "unclear"
        note = []
        if few < MIN_SAMPLES:
            note.append(f"{few} call(s)")
        if floor > threshold:
            note.append(f"bimodal: floor {100 * floor:.0f}%")
        if _flags(a):
            note.append("baseline: " + ",".join(_flags(a)))
        if _flags(b):
            note.append("run: " + ",".join(_flags(b)))
        cmp.rows.append({"backend": a["backend"], "precision": a.get("precision"),
                         "device": a.get("device"), "copies": a.get("copies"),
                         "shape": list(a["shape"]), "baseline_p50_ms": float(a["p50_ms"]),
                         "p50_ms": float(b["p50_ms"]), "change_pct": 100 * change,
                         "ci_pct": [100 * lo, 100 * hi], "floor_pct": 100 * floor,
                         "verdict": v, "method": method,
                         "baseline_settled": _settled(a), "settled": _settled(b),
                         "note": "; ".join(note)})
    cmp.only_baseline = [_label(r) for k, r in brows.items() if k not in rrows]
    cmp.only_run = [_label(r) for k, r in rrows.items() if k not in brows]
    for side, rows in (("baseline", base["results"]), ("run", run["results"])):
        busy = sum(bool(set(_flags(r)) & MACHINE_FLAGS) for r in rows)
        if busy:
            cmp.notes.append(f"the {side} was timed on a busy machine ({busy} row(s) flagged "
                             f"{'/'.join(sorted(MACHINE_FLAGS))}): its changes may be the "
                             "machine's, not the code's")
    if older:
        cmp.notes.append("a run without per-call samples (an older bench JSON): intervals from "
                         "its p50, p90 and call count, a weaker verdict than a bootstrap")
    return cmp


# --------------------------------------------------------------------------- text
HEADER = ["backend", "prec", "shape", "copies", "baseline p50 ms", "p50 ms", "change",
          "95% interval", "verdict", "note"]
#: the console's narrower table (the Markdown and JSON keep every column and the flags)
CONSOLE_HEADER = ["backend", "shape", "base ms", "p50 ms", "change", "95% interval", "verdict",
                  "settled"]


def _interval(r: dict[str, Any]) -> str:
    return f"{r['ci_pct'][0]:+.1f}..{r['ci_pct'][1]:+.1f}%"


def table_rows(cmp: Comparison) -> list[tuple[str, ...]]:
    return [(r["backend"], str(r["precision"]), "x".join(map(str, r["shape"])), str(r["copies"]),
             f"{r['baseline_p50_ms']:.3f}", f"{r['p50_ms']:.3f}", f"{r['change_pct']:+.1f}%",
             _interval(r), r["verdict"] + ("" if r["method"] == "bootstrap" else " (summary)"),
             r["note"]) for r in cmp.rows]


def console_rows(cmp: Comparison) -> list[tuple[str, ...]]:
    def settled(r: dict[str, Any]) -> str:
        a, b = r.get("baseline_settled"), r.get("settled")
        if a is None or b is None:
            return "?"
        return {(True, True): "both", (False, False): "neither", (True, False): "baseline",
                (False, True): "run"}[(a, b)]
    return [(r["backend"] + ("" if r["copies"] in (None, "included") else " (no copies)"),
             "x".join(map(str, r["shape"])), f"{r['baseline_p50_ms']:.3f}", f"{r['p50_ms']:.3f}",
             f"{r['change_pct']:+.1f}%", _interval(r),
             r["verdict"] + ("" if r["method"] == "bootstrap" else "*"), settled(r))
            for r in cmp.rows]


def summary_line(cmp: Comparison) -> str:
    c = cmp.counts()
    return (f"compare against {cmp.baseline}: " + ", ".join(f"{c[v]} {v}" for v in VERDICTS)
            + f" (noise floor {100 * cmp.threshold:g}%)")


def short_lines(cmp: Comparison) -> list[str]:
    """CI form: the summary, then one line per row that is not "same", then the notes."""
    lines = [summary_line(cmp)]
    for r in cmp.rows:
        if r["verdict"] != "same":
            lines.append(f"{r['verdict']}: {_label(r)} p50 {r['baseline_p50_ms']:.3f} -> "
                         f"{r['p50_ms']:.3f} ms ({r['change_pct']:+.1f}%, 95% "
                         f"{r['ci_pct'][0]:+.1f}..{r['ci_pct'][1]:+.1f}%)"
                         + (f" [{r['note']}]" if r["note"] else ""))
    return lines + [f"note: {n}" for n in extra_notes(cmp)]


def extra_notes(cmp: Comparison) -> list[str]:
    out = list(cmp.notes)
    if cmp.only_baseline:
        out.append("only in the baseline: " + ", ".join(cmp.only_baseline))
    if cmp.only_run:
        out.append("only in this run: " + ", ".join(cmp.only_run))
    return out


def to_markdown(cmp: Comparison) -> str:
    lines = [f"# Compare against {cmp.baseline}", "", summary_line(cmp), "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(cmp)]
    notes = extra_notes(cmp)
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
