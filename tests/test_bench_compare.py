"""`bench --compare`: two stored runs (tests/data: two real `bench` runs of the default model on
a shared 2-core AMD EPYC while other processes used ~1.5 cores, samples included), older JSONs
without samples (benchmarks/), the
verdict rule on made-up samples, bad baselines as one `error:` line, and the CI short compare
(reports, never fails on a slowdown). No timing assertions."""
from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from hmu_export.bench import compare as C
from hmu_export.commands.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
RUN1, RUN2 = DATA / "bench-run-1.json", DATA / "bench-run-2.json"
OLD = ROOT / "benchmarks" / "results-hmu-default.json"  # written before samples were stored
OTHER_MODEL = ROOT / "benchmarks" / "results-hmu-bench-d256.json"
GENERATION = ROOT / "benchmarks" / "generate-cpu-hmu-default.json"


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["bench", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def synthetic_pair(scale: float, sd: float = 0.1, n: int = 200) -> tuple[dict, dict]:
    """Two one-row runs of the default model: samples ~ N(10, sd) ms and the same times
    scaled by ``scale`` (independent draws)."""
    base = load(RUN1)
    row = next(r for r in base["results"] if r["backend"] == "onnxruntime-opt")
    a_s = np.random.default_rng(0).normal(10.0, sd, n)
    b_s = np.random.default_rng(1).normal(10.0, sd, n) * scale

    def run(samples: np.ndarray) -> dict:
        r = dict(row, samples_ms=[float(x) for x in samples], iters=n,
                 p50_ms=float(np.median(samples)), p90_ms=float(np.percentile(samples, 90)))
        r.pop("stability")
        return dict(base, results=[r])
    return run(a_s), run(b_s)


# --------------------------------------------------------------------------- verdicts
@pytest.mark.parametrize("scale, expected", [(1.0, "same"), (1.02, "same"), (1.25, "slower"),
                                             (0.8, "faster")])
def test_verdict_on_clean_samples(scale, expected):
    a, b = synthetic_pair(scale)
    cmp = C.compare_runs(a, b)
    (row,) = cmp.rows
    assert row["method"] == "bootstrap"
    assert row["verdict"] == expected, row
    assert row["change_pct"] == pytest.approx(100 * (scale - 1), abs=1.5)
    assert row["ci_pct"][0] <= row["change_pct"] <= row["ci_pct"][1]


def test_a_noisy_change_is_unclear_not_slower():
    """+8% on times whose spread is +-30%: with 30 calls the interval is wider than the noise
    floor, so the verdict does not claim a change."""
    a, b = synthetic_pair(1.08, sd=3.0, n=30)
    (row,) = C.compare_runs(a, b).rows
    assert row["verdict"] == "unclear", row


def test_verdict_rule():
    assert C.verdict(0.10, 0.06, 0.14) == "slower"
    assert C.verdict(0.03, 0.01, 0.05) == "same"      # real but under the noise floor
    assert C.verdict(-0.10, -0.14, -0.06) == "faster"
    assert C.verdict(0.10, -0.05, 0.25) == "unclear"  # could be none, could be +25%
    assert C.verdict(0.0, -0.2, 0.2) == "unclear"
    assert C.verdict(0.12, 0.02, 0.2, threshold=0.15) == "same"  # under a 15% floor


def test_two_stored_runs(capsys, tmp_path):
    """Run 2 against run 1 through the CLI: every common row with a verdict; written as
    compare.json / compare.md; seeded, so the same files give the same verdicts."""
    rc, out, err = cli(capsys, "--compare", RUN1, "--current", RUN2, "--out", tmp_path)
    assert rc == 0 and err == ""
    data = load(tmp_path / "compare.json")
    assert len(data["rows"]) == len(load(RUN2)["results"]) == 9
    assert all(r["method"] == "bootstrap" for r in data["rows"])
    rows = {(r["backend"], "x".join(map(str, r["shape"]))): r for r in data["rows"]}
    # The two runs as they were: other processes used ~1.5 of the 2 cores, 7 of the 9 rows
    # bimodal in one run or both (e.g. onnxruntime-opt 1x64x32: 1.6 ms 58% / 13.9 ms 42%).
    # A bimodal row's floor is its modes' distance, so nothing there is called a change:
    # torch 1x64x64 848 -> 102 ms is "unclear", not "faster".
    torch = rows[("torch", "1x64x64")]
    assert torch["change_pct"] == pytest.approx(-88.0, abs=0.1)
    assert torch["ci_pct"][1] < 0 and torch["floor_pct"] > 100
    assert torch["verdict"] == "unclear" and "bimodal: floor" in torch["note"]
    # onnxruntime-opt 8x128x64: unimodal, 121.8 -> 115.0 ms (-5.7%), interval -12.4..+3.9%:
    # wider than the 5% floor both ways, so unclear too
    opt = rows[("onnxruntime-opt", "8x128x64")]
    assert opt["floor_pct"] == 5 and opt["verdict"] == "unclear"
    assert opt["ci_pct"][0] < opt["change_pct"] < 0 < opt["ci_pct"][1]
    assert data["counts"] == {"slower": 0, "unclear": 9, "faster": 0, "same": 0}
    assert any("busy machine" in n for n in data["notes"])
    assert out.startswith(f"compare against {RUN1}: 0 slower, 9 unclear, 0 faster, 0 same")
    assert "note the run was timed on a busy machine (9 row(s)" in out
    md = (tmp_path / "compare.md").read_text()
    assert md.startswith(f"# Compare against {RUN1}") and "| onnxruntime-opt |" in md
    again = C.compare_runs(load(RUN1), load(RUN2), baseline=str(RUN1))
    assert [r["ci_pct"] for r in again.rows] == [r["ci_pct"] for r in data["rows"]]


def test_a_bimodal_row_needs_more_than_its_modes_distance():
    """+30% between two bimodal runs (modes 10 / 14 ms) is within how far such a p50 moves by
    itself: unclear. Three times slower is beyond it: slower."""
    def bimodal_run(scale: float, seed: int) -> dict:
        base = load(RUN1)
        row = next(r for r in base["results"] if r["backend"] == "onnxruntime-opt")
        r_ = np.random.default_rng(seed)
        t = np.where(r_.random(400) < 0.4, r_.normal(14, 0.2, 400), r_.normal(10, 0.2, 400))
        t *= scale
        from hmu_export.bench.stability import assess
        r = dict(row, samples_ms=[float(x) for x in t], iters=t.size,
                 p50_ms=float(np.median(t)), stability=assess(t))
        assert "bimodal" in r["stability"]["flags"]
        return dict(base, results=[r])
    (row,) = C.compare_runs(bimodal_run(1.0, 0), bimodal_run(1.3, 1)).rows
    assert row["floor_pct"] == pytest.approx(40, abs=3) and row["verdict"] == "unclear"
    (row,) = C.compare_runs(bimodal_run(1.0, 0), bimodal_run(3.0, 1)).rows
    assert row["verdict"] == "slower"
    (row,) = C.compare_runs(bimodal_run(1.0, 0), bimodal_run(1.0, 1)).rows
    assert row["verdict"] == "unclear"  # never "same" with a floor that wide


def test_a_run_against_itself_claims_no_change():
    cmp = C.compare_runs(load(RUN2), load(RUN2))
    assert {r["verdict"] for r in cmp.rows} <= {"same", "unclear"}
    assert all(r["change_pct"] == 0 for r in cmp.rows)


def test_older_json_without_samples(capsys):
    """benchmarks/results-hmu-default.json predates samples and some config fields: it still
    compares, by the summary method, and says that the verdict is weaker."""
    cmp = C.compare_runs(load(OLD), load(OLD))
    assert cmp.rows and all(r["method"] == "summary" and r["verdict"] == "same"
                            for r in cmp.rows)
    assert any("without per-call samples" in n for n in cmp.notes)
    rc, out, err = cli(capsys, "--compare", OLD, "--current", RUN2, "--short")
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith(f"compare against {OLD}: ")
    assert any(line.startswith("note: a run without per-call samples") for line in lines)
    assert any(line.startswith("note: only in the baseline: ") for line in lines)
    # the stored quiet run vs the contended one: p50 7.8 -> 115 ms at 8x128x64
    assert "slower: onnxruntime-opt 8x128x64 (included) p50 7.833 -> 114.960 ms" in out


# --------------------------------------------------------------------------- bad input
def bad_runs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    not_json = tmp_path / "not.json"
    not_json.write_text("{ this is not json")
    no_common = tmp_path / "no_common.json"
    d = load(RUN1)
    for r in d["results"]:
        r["shape"] = [4, 16, 8]
    no_common.write_text(json.dumps(d))
    not_object = tmp_path / "list.json"
    not_object.write_text("[1, 2]")
    return {"missing": (tmp_path / "absent.json", "does not exist"),
            "not json": (not_json, "corrupt baseline"),
            "not an object": (not_object, "not a JSON object"),
            "generation result": (GENERATION, "is not a forward bench result"),
            "other model": (OTHER_MODEL, ("is from another model (name 'hmu-bench-d256' vs "
                                          "'hmu-default'; d_ff 1024 vs 256")),
            "no common rows": (no_common, "has no row in common with this run")}


def test_bad_baselines_are_one_error_line(capsys, tmp_path):
    for what, (path, message) in bad_runs(tmp_path).items():
        rc, _, err = cli(capsys, "--compare", path, "--current", RUN2)
        assert rc == 2, what
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, (what, err)
        assert "Traceback" not in err


def test_bad_options_are_one_error_line(capsys, tmp_path):
    for argv, message in [(["--current", RUN2], "need --compare"),
                          (["--short", "--artifacts", tmp_path], "need --compare"),
                          (["--compare", RUN1, "--generate", "--artifacts", tmp_path],
                           "not --generate"),
                          (["--compare", RUN1, "--current", RUN2, "--compare-threshold", "-1"],
                           "--compare-threshold"),
                          (["--quick"], "--artifacts is required")]:
        rc, _, err = cli(capsys, *argv)
        assert rc == 2 and err.count("\n") == 1 and message in err, (argv, err)


def test_a_bad_baseline_fails_before_the_bench_runs(capsys, tmp_path):
    """The baseline is read before minutes of timing; the build folder is never opened."""
    rc, _, err = cli(capsys, "--artifacts", tmp_path / "no-build", "--compare",
                     tmp_path / "absent.json")
    assert rc == 2 and "absent.json does not exist" in err


def test_machine_differences_are_noted():
    a, b = load(RUN1), copy.deepcopy(load(RUN2))
    b["machine"]["cpu"] = "Intel(R) Xeon(R) CPU @ 2.20GHz"
    b["machine"]["versions"]["onnxruntime"] = "9.9.9"
    notes = C.compare_runs(a, b).notes
    assert any(n.startswith("other machine class: baseline CPU 'AMD EPYC'") for n in notes)
    assert any("onnxruntime 1.32.0 -> 9.9.9" in n for n in notes)


# --------------------------------------------------------------------------- baselines
def test_machine_slug():
    assert C.machine_slug("AMD EPYC") == "amd-epyc"
    assert C.machine_slug("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz") == \
        "intel-xeon-platinum-8375c-cpu-2-90ghz"
    assert C.machine_slug("") == "unknown-cpu"


def test_each_stored_baseline_is_a_bench_run_named_after_its_cpu():
    files = sorted(C.BASELINES.glob("*.json"))
    assert files, f"no baseline in {C.BASELINES}"
    for f in files:
        run = C.load_run(f)
        assert f.name == f"{C.machine_slug(run['machine']['cpu'])}.json"
        assert all({"samples_ms", "samples_kind", "stability"} <= set(r)
                   for r in run["results"])


def test_compare_auto_finds_the_machine_class(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(C, "BASELINES", tmp_path)
    rc, out, err = cli(capsys, "--compare", "auto", "--current", RUN2, "--short")
    assert rc == 0 and err == ""
    assert "no baseline for this machine class ('AMD EPYC')" in out
    assert str(tmp_path / "amd-epyc.json") in out
    shutil.copy(RUN1, tmp_path / "amd-epyc.json")
    rc, out, err = cli(capsys, "--compare", "auto", "--current", RUN2, "--short")
    assert rc == 0 and out.startswith(f"compare against {tmp_path / 'amd-epyc.json'}: ")


def test_short_compare_reports_a_slowdown_and_exits_0(capsys):
    """CI's form: a slowdown is a line in the log, never a failed job."""
    a, b = synthetic_pair(1.5)
    rows = C.compare_runs(a, b).rows
    assert rows[0]["verdict"] == "slower"
    rc, out, _ = cli(capsys, "--compare", OLD, "--current", RUN2, "--short")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"compare against {OLD}: 6 slower, ")
    assert any(line.startswith("slower: torch 8x128x64 (included) p50 12.694 -> 578.560 ms")
               for line in lines)
    assert not any(line.startswith("same:") for line in lines)  # short: only the changes


# --------------------------------------------------------------------------- CI step
@pytest.fixture(scope="module")
def default_model_build(tmp_path_factory) -> Path:
    """The default model's checkpoint, graphs and optimized graphs (what `bench` times), built by
    the pipeline's first stages (a folder with its manifest: commands read only verified builds):
    the baselines' model, without the rest of a build."""
    from hmu_export.build.pipeline import run_build
    from hmu_export.core.config import BuildConfig

    out = tmp_path_factory.mktemp("ci_compare") / "hmu-default"
    outcome = run_build(BuildConfig().validate(), out, only=["checkpoint", "export", "optimize"])
    assert outcome.ok, outcome.failure
    return outcome.out_dir


@pytest.mark.slow
def test_ci_short_compare_against_this_machine_class(default_model_build, tmp_path, capsys):
    """The CI step: a short bench of the default model against benchmarks/baselines/<this CPU
    model>.json. It reports (a warning per slower row, in pytest's summary) and never fails on
    a slowdown; only a broken compare fails."""
    from hmu_export.bench.machine import cpu_model

    baseline = C.baseline_path(cpu_model())
    if not baseline.is_file():
        pytest.skip(f"no baseline for this machine class: {baseline}")
    rc, out, err = cli(capsys, "--artifacts", default_model_build, "--shapes", "1x64x32,8x128x64",
                       "--backends", "torch,onnxruntime,onnxruntime-opt", "--no-hmu-overhead",
                       "--min-seconds", "0.5", "--settle-seconds", "1", "--compare", "auto",
                       "--short", "--out", tmp_path)
    assert rc == 0, err
    data = load(tmp_path / "compare.json")
    assert len(data["rows"]) == 6
    summary = next(line for line in out.splitlines() if line.startswith("compare against"))
    print(summary)
    for r in data["rows"]:
        if r["verdict"] == "slower":
            warnings.warn(f"bench compare: {r['backend']} {'x'.join(map(str, r['shape']))} "
                          f"p50 {r['baseline_p50_ms']:.3f} -> {r['p50_ms']:.3f} ms "
                          f"({r['change_pct']:+.1f}%) [{r['note']}]", stacklevel=1)
