"""Is a bench row's p50 a settled figure? Detection on per-call times, and the repeat policy.

A p50 printed from a bimodal or noisy run reads like a fact and is not one (issue 20: a 13.2 ms
p50 with a 48 ms p90 on a shared 2-core machine). Every row of ``bench`` therefore carries a
``stability`` object (``assess``), and timing goes on past the minimum until the sample settles
or a time budget ends (``repeat_until_settled``).

Flags (a row is *settled* when it has none):

- ``few-samples``: fewer than ``Policy.min_samples`` calls (``--quick``): nothing can be said.
- ``bimodal``: the best two-group split of the sorted times (1-D 2-means) gives a minor group
  of at least 10% of the calls whose mean lies at least 10% above/below the other's, with
  Ashman's D >= 4 (a 2-means split of a unimodal normal gives D ~ 2.7, of an exponential or a
  uniform spread <= 3.7, so 4 is a separation, not a split of one hump).
- ``noisy``: (p90 - p10) / p50 > 20%.
- ``drifting``: the median of the last third of the calls differs from the first third's by
  more than 5% (and by more than both thirds' 95% median intervals): the machine changed
  during the row.
- ``p50-unsettled``: the distribution-free 95% interval of the median (order statistics) is
  wider than +-2% of it.
- ``contended``: other processes used more than 0.25 cores on average while the row was
  timed (``/proc/stat`` busy time minus this process's own CPU time), ``steal``: the
  hypervisor took more than 5% of the CPU time, ``frequency``: the mean CPU clock changed
  by more than 5% between the row's start and end (``/sys/.../cpufreq`` or ``/proc/cpuinfo``).

Load averages (1 min) before/after each row are recorded but not flagged (the bench's own
threads raise them); a busy machine *before* the run is a report-level note.
The functions on times are pure (lists or arrays of milliseconds); the readers return None
where the machine does not expose the figure.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

#: at most this many per-call times are stored per row (bounded_samples)
SAMPLES_MAX = 200

FLAG_TEXT = {
    "few-samples": "too few calls to judge",
    "bimodal": "bimodal",
    "noisy": "noisy",
    "drifting": "drifting",
    "p50-unsettled": "p50 not settled",
    "contended": "other processes busy",
    "steal": "hypervisor steal",
    "frequency": "CPU clock changed",
}
#: flags that more calls can clear (the repeat policy looks at these only)
SAMPLE_FLAGS = ("few-samples", "bimodal", "noisy", "drifting", "p50-unsettled")


@dataclass(frozen=True)
class Policy:
    min_samples: int = 20
    noisy_spread: float = 0.20        # (p90 - p10) / p50
    bimodal_weight: float = 0.10      # minor group's share of the calls
    bimodal_separation: float = 4.0   # Ashman's D of the two groups
    bimodal_gap: float = 0.10         # distance of the group means, relative to the lower
    drift: float = 0.05               # last third's median vs first third's
    ci_target: float = 0.02           # 95% interval half-width of the median, relative
    contended_cores: float = 0.25     # other processes' mean CPU use (cores)
    steal: float = 0.05               # share of CPU time stolen by the hypervisor
    freq_change: float = 0.05         # relative change of the mean CPU clock


POLICY = Policy()


# --------------------------------------------------------------------------- on times
def _arr(times: Sequence[float] | np.ndarray) -> np.ndarray:
    return np.asarray(times, dtype=np.float64).ravel()


def spread(times: Sequence[float] | np.ndarray) -> float:
    """(p90 - p10) / p50, 0 for fewer than two calls."""
    t = _arr(times)
    if t.size < 2:
        return 0.0
    p10, p50, p90 = np.percentile(t, [10, 50, 90])
    return float((p90 - p10) / p50) if p50 > 0 else 0.0


def median_ci(times: Sequence[float] | np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """Distribution-free ~95% interval of the median: the order statistics n/2 -+ z*sqrt(n)/2."""
    t = np.sort(_arr(times))
    n = t.size
    if n == 0:
        return (math.nan, math.nan)
    half = z * math.sqrt(n) / 2
    lo = max(math.floor(n / 2 - half), 0)
    hi = min(math.ceil(n / 2 + half), n - 1)
    return float(t[lo]), float(t[hi])


def two_modes(times: Sequence[float] | np.ndarray, policy: Policy = POLICY
              ) -> list[dict[str, float]] | None:
    """The two modes [{"ms", "weight"}, ...] (faster first) if the times are bimodal, else None.

    Best 2-means split of the sorted times (prefix sums, O(n)); bimodal if the minor group
    holds >= ``bimodal_weight`` of the calls, the group means differ by >= ``bimodal_gap`` and
    Ashman's D = sqrt(2) |m1 - m2| / sqrt(s1^2 + s2^2) >= ``bimodal_separation``."""
    x = np.sort(_arr(times))
    n = x.size
    if n < max(policy.min_samples, 4):
        return None
    c, c2 = np.cumsum(x), np.cumsum(x * x)
    k = np.arange(1, n)
    s1, q1 = c[:-1], c2[:-1]
    s2, q2 = c[-1] - s1, c2[-1] - q1
    sse = (q1 - s1 ** 2 / k) + (q2 - s2 ** 2 / (n - k))
    i = int(np.argmin(sse)) + 1
    a, b = x[:i], x[i:]
    weight = min(a.size, b.size) / n
    ma, mb = float(a.mean()), float(b.mean())
    pooled = math.sqrt(float(a.var() + b.var()))
    sep = math.inf if pooled == 0 else math.sqrt(2) * (mb - ma) / pooled
    if (weight >= policy.bimodal_weight and ma > 0 and (mb - ma) / ma >= policy.bimodal_gap
            and sep >= policy.bimodal_separation):
        return [{"ms": float(np.median(a)), "weight": a.size / n},
                {"ms": float(np.median(b)), "weight": b.size / n}]
    return None


def drift(times: Sequence[float] | np.ndarray) -> float | None:
    """median(last third) / median(first third) - 1, in call order; None under 9 calls."""
    t = _arr(times)
    if t.size < 9:
        return None
    third = t.size // 3
    first, last = float(np.median(t[:third])), float(np.median(t[-third:]))
    return last / first - 1 if first > 0 else None


def _drifting(t: np.ndarray, policy: Policy) -> bool:
    d = drift(t)
    if d is None or abs(d) <= policy.drift:
        return False
    third = t.size // 3
    (a_lo, a_hi), (b_lo, b_hi) = median_ci(t[:third]), median_ci(t[-third:])
    return b_lo > a_hi or b_hi < a_lo  # the two thirds' intervals do not overlap


def sample_flags(times: Sequence[float] | np.ndarray, policy: Policy = POLICY) -> list[str]:
    """The flags that the times alone raise (see the module docstring)."""
    t = _arr(times)
    if t.size < policy.min_samples:
        return ["few-samples"]
    flags = []
    if two_modes(t, policy):
        flags.append("bimodal")
    if spread(t) > policy.noisy_spread:
        flags.append("noisy")
    if _drifting(t, policy):
        flags.append("drifting")
    p50 = float(np.median(t))
    lo, hi = median_ci(t)
    if p50 > 0 and (hi - lo) / 2 / p50 > policy.ci_target:
        flags.append("p50-unsettled")
    return flags


def settled(times: Sequence[float] | np.ndarray, policy: Policy = POLICY) -> bool:
    return not sample_flags(times, policy)


def repeat_until_settled(step: Callable[[], float], *, min_iters: int, min_seconds: float,
                         max_iters: int, settle_seconds: float, policy: Policy = POLICY,
                         clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Per-call times of ``step``: at least ``min_iters`` calls and ``min_seconds``; then more
    rounds (each a quarter of the calls so far, at least 10) while the times are not settled
    and ``settle_seconds`` more have not passed; never more than ``max_iters`` calls."""
    times: list[float] = []
    t0 = clock()
    while len(times) < max_iters and (len(times) < min_iters or clock() - t0 < min_seconds):
        times.append(float(step()))
    deadline = t0 + max(min_seconds, 0.0) + max(settle_seconds, 0.0)
    while (settle_seconds > 0 and len(times) < max_iters and clock() < deadline
           and not settled(times, policy)):
        target = min(max_iters, len(times) + max(10, len(times) // 4))
        while len(times) < target and clock() < deadline:
            times.append(float(step()))
    return times


def bounded_samples(times: Sequence[float] | np.ndarray, limit: int = SAMPLES_MAX
                    ) -> tuple[list[float], str]:
    """(values, kind), at most ``limit`` values rounded to 0.1 us: every call in call order
    (kind "calls") when they fit, else ``limit`` evenly spaced quantiles of all the calls
    (kind "quantiles": quantile (i + 0.5) / limit, ascending), which keep the distribution and
    its median exactly, where every k-th call would not (a bimodal row's subsample median can
    fall in the other mode). The call order matters for drift, which ``assess`` judges on every
    call before this."""
    t = _arr(times)
    if t.size <= limit:
        return [round(float(v), 4) for v in t], "calls"
    q = np.percentile(t, (np.arange(limit) + 0.5) / limit * 100)
    return [round(float(v), 4) for v in q], "quantiles"


# --------------------------------------------------------------------------- machine readers
def read_loadavg() -> list[float] | None:
    try:
        return [round(v, 3) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def read_cpu_mhz(root: Path = Path("/")) -> float | None:
    """Mean current clock of the CPUs in MHz: cpufreq's scaling_cur_freq where the kernel has
    it, else /proc/cpuinfo's "cpu MHz" (a VM often shows a fixed figure there); None if
    neither is readable."""
    cur = []
    for f in sorted((root / "sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/scaling_cur_freq")):
        try:
            cur.append(int(f.read_text().strip()) / 1000.0)
        except (OSError, ValueError):
            pass
    if cur:
        return round(sum(cur) / len(cur), 1)
    try:
        lines = (root / "proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    mhz = []
    for line in lines:
        if line.lower().startswith("cpu mhz"):
            try:
                mhz.append(float(line.split(":", 1)[1]))
            except (IndexError, ValueError):
                pass
    return round(sum(mhz) / len(mhz), 1) if mhz else None


def read_cpu_max_mhz(root: Path = Path("/")) -> float | None:
    vals = []
    for f in (root / "sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/cpuinfo_max_freq"):
        try:
            vals.append(int(f.read_text().strip()) / 1000.0)
        except (OSError, ValueError):
            pass
    return max(vals) if vals else None


def read_cpu_times(root: Path = Path("/")) -> tuple[float, float, float] | None:
    """(busy, steal, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        first = (root / "proc/stat").read_text().splitlines()[0].split()
        v = [int(x) for x in first[1:]]
    except (OSError, IndexError, ValueError):
        return None
    if first[0] != "cpu" or len(v) < 4:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    user, nice, system, idle = v[:4]
    iowait, irq, softirq, steal = (v + [0] * 8)[4:8]
    busy = user + nice + system + irq + softirq
    return busy / hz, steal / hz, (busy + idle + iowait + steal) / hz


class Watch:
    """What the machine did while a row was timed: 1-min load before/after, mean CPU clock
    before/after, other processes' CPU use and hypervisor steal over the interval."""

    def __init__(self) -> None:
        self.load = read_loadavg()
        self.mhz = read_cpu_mhz()
        self.cpu = read_cpu_times()
        t = os.times()
        self.own = t.user + t.system
        self.t0 = time.perf_counter()

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.t0
        t = os.times()
        own = t.user + t.system - self.own
        cpu, load, mhz = read_cpu_times(), read_loadavg(), read_cpu_mhz()
        ctx: dict[str, Any] = {
            "seconds": round(wall, 3),
            "loadavg_1min": [self.load[0] if self.load else None, load[0] if load else None],
            "cpu_mhz": [self.mhz, mhz], "others_cpu_cores": None, "steal_fraction": None}
        # /proc/stat counts in clock ticks (10 ms): under half a second says nothing
        if self.cpu and cpu and wall >= 0.5:
            busy, steal, total = (b - a for a, b in zip(self.cpu, cpu))
            ctx["others_cpu_cores"] = round(max(busy - own, 0.0) / wall, 3)
            ctx["steal_fraction"] = round(steal / total, 4) if total > 0 else None
        return ctx


def machine_flags(ctx: dict[str, Any] | None, policy: Policy = POLICY) -> list[str]:
    if not ctx:
        return []
    flags = []
    if (ctx.get("others_cpu_cores") or 0) > policy.contended_cores:
        flags.append("contended")
    if (ctx.get("steal_fraction") or 0) > policy.steal:
        flags.append("steal")
    a, b = (ctx.get("cpu_mhz") or [None, None])
    if a and b and abs(b / a - 1) > policy.freq_change:
        flags.append("frequency")
    return flags


# --------------------------------------------------------------------------- per row
def assess(times: Sequence[float] | np.ndarray, ctx: dict[str, Any] | None = None,
           policy: Policy = POLICY) -> dict[str, Any]:
    """The row's ``stability`` object: settled, flags, the figures behind them, the machine
    context (``Watch.stop()``) and one line of text."""
    t = _arr(times)
    flags = sample_flags(t, policy) + machine_flags(ctx, policy)
    out: dict[str, Any] = {"settled": not flags, "flags": flags}
    if t.size:
        p50 = float(np.median(t))
        lo, hi = median_ci(t)
        d = drift(t)
        out |= {"spread_pct": round(100 * spread(t), 2), "p50_ci_ms": [round(lo, 4), round(hi, 4)],
                "p50_ci_pct": round(100 * (hi - lo) / 2 / p50, 2) if p50 > 0 else None,
                "drift_pct": None if d is None else round(100 * d, 2)}
        modes = two_modes(t, policy)
        if modes:
            out["modes"] = modes
    if ctx:
        out["machine"] = ctx
    out["text"] = describe(out)
    return out


def row_fields(times: Sequence[float] | np.ndarray, ctx: dict[str, Any] | None = None,
               policy: Policy = POLICY) -> dict[str, Any]:
    """What a bench row gains: bounded samples (``samples_ms``, ``samples_kind``) and
    ``stability``."""
    samples, kind = bounded_samples(times)
    return {"samples_ms": samples, "samples_kind": kind,
            "stability": assess(times, ctx, policy)}


def describe(st: dict[str, Any]) -> str:
    """One line: "settled" or the flags with their figures."""
    if st.get("settled"):
        return "settled"
    parts = []
    for f in st.get("flags", []):
        if f == "bimodal" and st.get("modes"):
            a, b = st["modes"]
            parts.append(f"bimodal ({a['ms']:.3g} ms {100 * a['weight']:.0f}% / "
                         f"{b['ms']:.3g} ms {100 * b['weight']:.0f}%)")
        elif f == "noisy" and st.get("spread_pct") is not None:
            parts.append(f"noisy (p10-p90 {st['spread_pct']:.0f}% of p50)")
        elif f == "drifting" and st.get("drift_pct") is not None:
            parts.append(f"drifting ({st['drift_pct']:+.0f}% first to last third)")
        elif f == "p50-unsettled" and st.get("p50_ci_pct") is not None:
            parts.append(f"p50 not settled (+-{st['p50_ci_pct']:.1f}%)")
        elif f == "contended" and st.get("machine"):
            parts.append(f"other processes busy ({st['machine']['others_cpu_cores']:.2f} cores)")
        elif f == "steal" and st.get("machine"):
            parts.append(f"hypervisor steal ({100 * st['machine']['steal_fraction']:.0f}%)")
        elif f == "frequency" and st.get("machine"):
            a, b = st["machine"]["cpu_mhz"]
            parts.append(f"CPU clock {a:.0f} -> {b:.0f} MHz")
        else:
            parts.append(FLAG_TEXT.get(f, f))
    return ", ".join(parts)


# --------------------------------------------------------------------------- per run
def run_notes(machine: dict[str, Any], results: Sequence[dict[str, Any]]) -> list[str]:
    """Report-level lines: a busy machine at start, and which rows' p50 is not settled (rows
    whose only flag is few-samples, as every --quick row, are one line)."""
    notes = []
    load = machine.get("loadavg_start")
    cores = machine.get("usable_cores") or machine.get("logical_cores") or 1
    if load and load[0] >= 0.5 * cores:
        notes.append(f"machine busy before the run: 1-min load {load[0]:.2f} on {cores} "
                     "core(s); every figure is suspect")
    few = [r for r in results if r.get("stability", {}).get("flags") == ["few-samples"]]
    if few:
        n = sorted({r["iters"] for r in few})
        notes.append(f"{len(few)} row(s) with {', '.join(map(str, n))} call(s) each: too few to "
                     "judge stability; their p50s are indicative only")
    for r in results:
        st = r.get("stability")
        if st and not st["settled"] and st["flags"] != ["few-samples"]:
            notes.append(f"{r['backend']} {'x'.join(map(str, r['shape']))} ({r['copies']}): "
                         f"p50 {r['p50_ms']:.3f} ms is not a settled figure: {st['text']}")
    return notes


CELL = {"few-samples": "few", "p50-unsettled": "p50±", "contended": "busy",
        "frequency": "clock"}


def cell(row: dict[str, Any]) -> str:
    """A short table cell: "ok", or the flags (abbreviated)."""
    st = row.get("stability")
    if not st:
        return ""
    return "ok" if st["settled"] else ",".join(CELL.get(f, f) for f in st["flags"])
