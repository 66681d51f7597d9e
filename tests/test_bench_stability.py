"""bench/stability.py: bimodal / noisy / drifting / clean detection on synthetic per-call times,
the repeat-until-settled policy on a fake clock, and the machine readers on fake /proc, /sys.
No timing assertions: every time here is made up."""
from __future__ import annotations

import json

import numpy as np
import pytest

from hmu_export.bench import stability as S

N = 300


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def clean(seed: int = 0, n: int = N) -> np.ndarray:
    return rng(seed).normal(10.0, 0.1, n)


def bimodal(seed: int = 0, n: int = N) -> np.ndarray:
    """The issue's run: p50 13.2 ms, a second mode near 48 ms holding 30% of the calls."""
    r = rng(seed)
    return np.where(r.random(n) < 0.3, r.normal(48.0, 3.0, n), r.normal(13.2, 0.5, n))


def test_clean_times_are_settled():
    for seed in range(5):
        st = S.assess(clean(seed))
        assert st["settled"] and st["flags"] == [] and st["text"] == "settled", st
        assert "modes" not in st
        assert st["p50_ci_ms"][0] <= 10.0 + 0.05 and st["p50_ci_ms"][1] >= 10.0 - 0.05


def test_bimodal_run_is_flagged_with_its_modes():
    for seed in range(5):
        st = S.assess(bimodal(seed))
        assert not st["settled"]
        assert "bimodal" in st["flags"] and "noisy" in st["flags"]
        fast, slow = st["modes"]
        assert fast["ms"] == pytest.approx(13.2, rel=0.05)
        assert slow["ms"] == pytest.approx(48.0, rel=0.1)
        assert fast["weight"] == pytest.approx(0.7, abs=0.1)
        assert f"bimodal ({fast['ms']:.3g} ms" in st["text"]
        assert f"/ {slow['ms']:.3g} ms" in st["text"]


def test_close_modes_are_bimodal_too():
    r = rng(3)
    t = np.where(r.random(N) < 0.5, r.normal(12.0, 0.2, N), r.normal(10.0, 0.2, N))
    assert S.two_modes(t) is not None


@pytest.mark.parametrize("name, times", [
    ("normal", lambda r: r.normal(10, 0.3, N)),
    ("right-skewed", lambda r: 10 * r.lognormal(0, 0.05, N)),
    ("exponential tail", lambda r: 10 + r.exponential(0.5, N)),
    ("uniform", lambda r: r.uniform(10, 13, N)),
    ("2% outliers", lambda r: np.where(r.random(N) < 0.02, 30.0, r.normal(10, 0.3, N))),
])
def test_one_hump_is_not_bimodal(name, times):
    """A 2-means split of one hump (normal D ~ 2.7, exponential / uniform <= 3.7) is not two
    modes: the separation threshold (4) must hold for every shape here."""
    for seed in range(10):
        assert S.two_modes(times(rng(seed))) is None, (name, seed)


def test_noisy_run_is_flagged_but_not_bimodal():
    t = 10 * rng(1).lognormal(0, 0.3, N)  # p10..p90 ~ 77% of p50
    st = S.assess(t)
    assert "noisy" in st["flags"] and "bimodal" not in st["flags"]
    assert st["spread_pct"] > 20
    assert "noisy (p10-p90" in st["text"]


def test_drift_is_flagged():
    t = np.concatenate([rng(0).normal(10, 0.05, 150), rng(1).normal(12, 0.05, 150)])
    st = S.assess(t)
    assert "drifting" in st["flags"]
    assert st["drift_pct"] == pytest.approx(20, abs=1)
    assert S.drift(clean()) == pytest.approx(0, abs=0.01)
    assert "drifting" not in S.sample_flags(rng(0).permutation(t))  # same times, no order


def test_few_samples_say_nothing_else():
    assert S.sample_flags([1.0, 5.0, 50.0]) == ["few-samples"]
    st = S.assess([1.0, 1.0, 1.0])
    assert not st["settled"] and st["flags"] == ["few-samples"]


def test_median_interval_narrows_with_more_calls():
    for n in (30, 3000):  # a ~95% interval: it holds the true median in ~95% of the runs
        cover = np.mean([lo < 10 < hi for lo, hi in
                         (S.median_ci(rng(seed).normal(10, 1, n)) for seed in range(200))])
        assert 0.9 <= cover <= 0.99, (n, cover)
    wide = S.median_ci(rng(0).normal(10, 1, 30))
    narrow = S.median_ci(rng(0).normal(10, 1, 3000))
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 4
    assert "p50-unsettled" in S.sample_flags(rng(0).normal(10, 1.0, 30))
    assert "p50-unsettled" not in S.sample_flags(rng(0).normal(10, 0.1, 30))


def test_machine_flags():
    quiet = {"others_cpu_cores": 0.02, "steal_fraction": 0.0, "cpu_mhz": [2600.0, 2600.0]}
    assert S.machine_flags(quiet) == []
    assert S.machine_flags(quiet | {"others_cpu_cores": 1.3}) == ["contended"]
    assert S.machine_flags(quiet | {"steal_fraction": 0.2}) == ["steal"]
    assert S.machine_flags(quiet | {"cpu_mhz": [3500.0, 2200.0]}) == ["frequency"]
    assert S.machine_flags({"others_cpu_cores": None, "steal_fraction": None,
                            "cpu_mhz": [None, None]}) == []
    st = S.assess(clean(), quiet | {"others_cpu_cores": 1.3})
    assert not st["settled"] and st["flags"] == ["contended"]
    assert "other processes busy (1.30 cores)" in st["text"]


# --------------------------------------------------------------------------- repeat policy
class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_step(times: np.ndarray, clock: FakeClock):
    """Returns the next made-up time and advances the fake clock by it."""
    it = iter(times)

    def step() -> float:
        t = float(next(it))
        clock.now += t / 1e3
        return t
    return step


def test_settled_times_stop_at_the_minimum():
    clock = FakeClock()
    out = S.repeat_until_settled(fake_step(clean(n=5000), clock), min_iters=50, min_seconds=0,
                                 max_iters=5000, settle_seconds=60, clock=clock)
    assert len(out) == 50


def test_unsettled_times_repeat_until_the_budget_ends():
    clock = FakeClock()
    times = bimodal(n=100000)
    out = S.repeat_until_settled(fake_step(times, clock), min_iters=50, min_seconds=0,
                                 max_iters=100000, settle_seconds=5, clock=clock)
    assert 50 < len(out) < 100000
    assert clock.now == pytest.approx(5, abs=0.1)  # the budget, not the call cap, ended it
    assert out == pytest.approx(list(times[:len(out)]))


def test_repeat_respects_the_call_cap_and_a_zero_budget():
    clock = FakeClock()
    out = S.repeat_until_settled(fake_step(bimodal(n=1000), clock), min_iters=50, min_seconds=0,
                                 max_iters=120, settle_seconds=1e9, clock=clock)
    assert len(out) == 120
    clock = FakeClock()
    out = S.repeat_until_settled(fake_step(bimodal(n=1000), clock), min_iters=50, min_seconds=0,
                                 max_iters=1000, settle_seconds=0, clock=clock)
    assert len(out) == 50


def test_noise_that_goes_away_settles():
    """Busy for the first 100 calls, quiet after: repeating ends once the quiet calls dominate
    (the run is still reported as it is, never trimmed)."""
    clock = FakeClock()
    times = np.concatenate([bimodal(n=100), clean(n=100000)])
    out = S.repeat_until_settled(fake_step(times, clock), min_iters=100, min_seconds=0,
                                 max_iters=100000, settle_seconds=600, clock=clock)
    assert 100 < len(out) < 100000
    assert S.settled(out)


def test_bounded_samples_keep_every_call_or_the_distribution():
    t = np.arange(150, dtype=float)[::-1] / 7
    s, kind = S.bounded_samples(t)
    assert kind == "calls" and s == [round(v, 4) for v in t]  # call order kept
    big = bimodal(n=1000)
    s, kind = S.bounded_samples(big)
    assert kind == "quantiles" and len(s) == S.SAMPLES_MAX and s == sorted(s)
    assert np.median(s) == pytest.approx(np.median(big), rel=0.01)
    assert S.two_modes(s) is not None  # the shape survives
    # every 5th call would have kept the call order but not necessarily the median
    assert np.percentile(s, 90) == pytest.approx(np.percentile(big, 90), rel=0.02)


def test_row_fields_are_json():
    fields = S.row_fields(bimodal(), {"seconds": 1.0, "loadavg_1min": [0.1, 0.2],
                                      "cpu_mhz": [None, None], "others_cpu_cores": 0.0,
                                      "steal_fraction": 0.0})
    back = json.loads(json.dumps(fields))
    assert back["stability"]["flags"][0] == "bimodal"
    assert len(back["samples_ms"]) == S.SAMPLES_MAX and back["samples_kind"] == "quantiles"


# --------------------------------------------------------------------------- readers
def test_cpu_mhz_prefers_cpufreq_then_cpuinfo(tmp_path):
    assert S.read_cpu_mhz(tmp_path) is None
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text("processor\t: 0\ncpu MHz\t\t: 2000.0\n\n"
                                           "processor\t: 1\ncpu MHz\t\t: 3000.0\n")
    assert S.read_cpu_mhz(tmp_path) == 2500.0
    for i, khz in enumerate((3500000, 1500000)):
        d = tmp_path / f"sys/devices/system/cpu/cpu{i}/cpufreq"
        d.mkdir(parents=True)
        (d / "scaling_cur_freq").write_text(f"{khz}\n")
        (d / "cpuinfo_max_freq").write_text("3600000\n")
    assert S.read_cpu_mhz(tmp_path) == 2500.0
    assert S.read_cpu_max_mhz(tmp_path) == 3600.0


def test_cpu_times_from_proc_stat(tmp_path):
    assert S.read_cpu_times(tmp_path) is None
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/stat").write_text("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 1 2 3 4\n")
    hz = __import__("os").sysconf("SC_CLK_TCK")
    busy, steal, total = S.read_cpu_times(tmp_path)
    assert busy == pytest.approx(150 / hz) and steal == pytest.approx(40 / hz)
    assert total == pytest.approx(1000 / hz)


def test_watch_records_the_machine():
    ctx = S.Watch().stop()
    assert set(ctx) == {"seconds", "loadavg_1min", "cpu_mhz", "others_cpu_cores",
                        "steal_fraction"}
    assert ctx["others_cpu_cores"] is None  # under half a second: ticks say nothing


def test_run_notes():
    machine = {"loadavg_start": [3.5, 2.0, 1.0], "usable_cores": 2}
    few = {"backend": "torch", "shape": [1, 8, 4], "copies": "included", "p50_ms": 1.0,
           "iters": 3, "stability": S.assess([1.0, 1.1, 1.2])}
    bi = {"backend": "onnxruntime-opt", "shape": [8, 128, 64], "copies": "included",
          "p50_ms": 13.2, "iters": N, "stability": S.assess(bimodal())}
    ok = {"backend": "onnxruntime", "shape": [1, 8, 4], "copies": "included", "p50_ms": 10.0,
          "iters": N, "stability": S.assess(clean())}
    notes = S.run_notes(machine, [few, few, bi, ok])
    assert notes[0].startswith("machine busy before the run: 1-min load 3.50 on 2")
    assert notes[1].startswith("2 row(s) with 3 call(s) each: too few to judge")
    assert notes[2].startswith("onnxruntime-opt 8x128x64 (included): p50 13.200 ms is not a "
                               "settled figure: bimodal")
    assert len(notes) == 3
    assert S.run_notes({"loadavg_start": [0.1, 0.1, 0.1], "usable_cores": 2}, [ok]) == []
    assert S.cell(ok) == "ok" and S.cell(few) == "few" and S.cell(bi).startswith("bimodal")
