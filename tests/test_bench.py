"""`bench --quick` through the CLI on a small build; FLOP count vs an independent count."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from hmu_export.core.layout import BuildLayout
from hmu_export.commands.cli import main
from hmu_export.bench.flops import model_flops, onnx_matmul_flops
from hmu_export.core.io_contract import make_feeds
from conftest import seal  # noqa: E402

ROW_KEYS = {"backend", "precision", "shape", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms",
            "std_ms", "seq_per_s", "tokens_per_s"}


@pytest.fixture(scope="module")
def small_build(small_export, small_cfg, small_model, tmp_path_factory) -> BuildLayout:
    from hmu_export.export.optimize import optimize_graph

    layout = BuildLayout(tmp_path_factory.mktemp("bench_build"))
    shutil.copytree(small_export.checkpoint_dir, layout.checkpoint_dir)
    shutil.copy(small_export.onnx, layout.onnx)
    optimize_graph(layout.onnx, layout.onnx_optimized, small_cfg, small_model)
    seal(layout.root)
    return layout


@pytest.fixture(scope="module")
def quick_report(small_build, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_out")
    rc = main(["bench", "--artifacts", str(small_build.root), "--quick", "--shapes",
               "1x8x4,4x16x8", "--json", str(out / "r.json"), "--out", str(out)])
    assert rc == 0
    return out, json.loads((out / "r.json").read_text())


def test_report_structure(quick_report):
    out, data = quick_report
    m = data["machine"]
    for key in ("cpu", "logical_cores", "threads", "torch_threads", "ort_intra_op_threads",
                "versions", "sgemm_peak"):
        assert key in m, key
    assert m["torch_threads"] == m["ort_intra_op_threads"] == m["threads"]
    assert m["sgemm_peak"]["gflops"] > 0
    rows = data["results"]
    assert {r["backend"] for r in rows} >= {"torch", "onnxruntime", "onnxruntime-opt"}
    assert {tuple(r["shape"]) for r in rows} == {(1, 8, 4), (4, 16, 8)}
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p95_ms"] <= r["p99_ms"]
        b, ls, lt = r["shape"]
        assert r["seq_per_s"] == pytest.approx(b * 1e3 / r["p50_ms"])
        assert r["tokens_per_s"] == pytest.approx(r["seq_per_s"] * (ls + lt))
        assert r["peak_fraction"] > 0


def test_unavailable_backends_are_skipped_with_reason(quick_report):
    _, data = quick_report
    import torch
    skipped = {s["backend"]: s["reason"] for s in data["skipped"]}
    assert "tensorrt" in skipped and skipped["tensorrt"]
    if not torch.cuda.is_available():
        assert "torch-cuda-fp16" in skipped


def test_hmu_overhead_reported(quick_report, small_model):
    _, data = quick_report
    rows = data["hmu_overhead"]
    assert {r["backend"] for r in rows} == {"torch", "onnxruntime-opt"}
    hmu, total = small_model.hmu_parameter_share()
    for r in rows:
        assert r["parameter_overhead_pct"] == pytest.approx(100 * hmu / total)
        assert r["with_hmu_p50_ms"] > 0 and r["without_hmu_p50_ms"] > 0


def test_markdown_and_png(quick_report):
    out, _ = quick_report
    md = (out / "bench.md").read_text()
    assert "| backend |" in md and "onnxruntime-opt" in md and "Skipped" in md
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shape_outside_profile_is_a_clear_error(small_build, capsys):
    rc = main(["bench", "--artifacts", str(small_build.root), "--quick", "--shapes", "1x99x4"])
    assert rc == 2
    assert "outside the build's profile" in capsys.readouterr().err
    # a classifier's BxLS form on a seq2seq build: the graph's axes are named in one line
    assert main(["bench", "--artifacts", str(small_build.root), "--quick", "--shapes", "1x8"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "give BxLSxLT" in err[0] and err[0].startswith("error: ")


def test_parity_and_bench_take_their_backends_from_one_registry(small_build, small_cfg,
                                                                small_model):
    """Parity's entries are bench's, minus parity's own reference (torch FP32) and the GPU
    backends this machine lacks; same precision and availability on both sides."""
    import torch

    from hmu_export.backends.registry import discover_backends
    from hmu_export.core.io_contract import full_contract

    contract = full_contract(small_cfg.model)
    parity = {b.label: b for b in discover_backends(small_build, small_cfg, small_model, contract)}
    bench = {b.label: b for b in discover_backends(small_build, small_cfg, small_model, contract,
                                                   use="bench")}
    assert "torch" in bench and "torch" not in parity
    assert {"onnxruntime", "onnxruntime-opt", "tensorrt"} <= set(parity) < set(bench)
    for label, b in parity.items():
        assert (bench[label].precision, bench[label].available) == (b.precision, b.available)
    if not torch.cuda.is_available():
        assert not bench["torch-cuda-fp16"].available and "torch-cuda-fp16" not in parity


def test_unknown_backend_and_missing_folder(small_build, tmp_path, capsys):
    assert main(["bench", "--artifacts", str(small_build.root), "--quick", "--backends",
                 "nonsense", "--no-hmu-overhead", "--out", str(tmp_path)]) == 2
    assert "unknown backend" in capsys.readouterr().err
    assert main(["bench", "--artifacts", str(tmp_path / "none"), "--quick"]) == 2


@pytest.fixture(scope="module")
def nohmu_export(small_cfg, tmp_path_factory):
    from hmu_export.export.onnx_export import export_onnx
    from hmu_export.model import build_model

    cfg = dataclasses.replace(small_cfg, model=dataclasses.replace(small_cfg.model, use_hmu=False))
    path = tmp_path_factory.mktemp("nohmu") / "nohmu.onnx"
    export_onnx(build_model(cfg.model), cfg, path)
    return cfg, path


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 16, 8), (3, 5, 7)])
def test_flops_match_graph_count(small_cfg, small_export, nohmu_export, shape):
    """Analytic count == MatMul/Gemm FLOPs summed over the exported graph's real operand shapes,
    with the HMU and with an identity in its place."""
    feeds = make_feeds(small_cfg.model, *shape)
    with_hmu = model_flops(small_cfg.model, *shape)
    assert with_hmu.total == onnx_matmul_flops(str(small_export.onnx), feeds)
    cfg, path = nohmu_export
    without = model_flops(cfg.model, *shape)
    assert without.hmu == 0 and with_hmu.hmu > 0
    assert without.total == onnx_matmul_flops(str(path), feeds)


# --------------------------------------------------------------------------- runners time themselves
class _FakeClock:
    """Stands in for time.perf_counter: moves only when a fake step advances it."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _ort_runner(small_export, small_cfg):
    from hmu_export.core.io_contract import full_contract
    from hmu_export.runners import OnnxRuntimeRunner

    return OnnxRuntimeRunner(small_export.onnx, full_contract(small_cfg.model), [small_cfg.profile])


def test_runner_time_covers_a_slow_session_run(small_export, small_cfg):
    import time

    runner = _ort_runner(small_export, small_cfg)
    with pytest.raises(RuntimeError):
        runner.last_inference_time()  # nothing has run yet
    real = runner.session

    class SlowSession:
        def run(self, names, feeds):
            time.sleep(0.05)
            return real.run(names, feeds)

    runner.session = SlowSession()
    out = runner.infer(make_feeds(small_cfg.model, 2, 8, 4))
    assert out["logits"].shape == (2, 4, small_cfg.model.vocab_size)
    assert runner.last_inference_time() >= 0.05


def test_runner_time_excludes_feed_checks(small_export, small_cfg):
    """A fake clock: feed validation 'takes' 100 s, the session run 0.25 s; the runner
    reports the run alone, and bench's samples are the runner's times, not its own clock."""
    from hmu_export.bench.timing import BenchSettings, runner_step, time_calls

    runner = _ort_runner(small_export, small_cfg)
    clock = runner.clock = _FakeClock()
    real, check = runner.session, runner.validate

    class FakeSession:
        def run(self, names, feeds):
            clock.now += 0.25
            return real.run(names, feeds)

    def slow_validate(feeds):
        clock.now += 100.0
        check(feeds)

    runner.session, runner.validate = FakeSession(), slow_validate
    feeds = make_feeds(small_cfg.model, 1, 8, 4)
    runner.infer(feeds)
    assert runner.last_inference_time() == pytest.approx(0.25)
    times = time_calls(runner_step(runner, feeds), BenchSettings.quick())
    assert times.size == BenchSettings.quick().min_iters
    assert times == pytest.approx([250.0] * times.size)


def test_torch_runner_and_unmarked_runners_time_themselves(small_cfg, small_model):
    import numpy as np

    from hmu_export.core.io_contract import full_contract
    from hmu_export.runners import Runner, TorchRunner

    contract = full_contract(small_cfg.model)
    torch_runner = TorchRunner(small_model, contract, [small_cfg.profile])
    clock = torch_runner.clock = _FakeClock()
    forward = torch_runner._forward

    def slow_forward(args):
        clock.now += 0.5
        return forward(args)

    torch_runner._forward = slow_forward
    torch_runner.infer(make_feeds(small_cfg.model, 2, 8, 4))
    assert torch_runner.last_inference_time() == pytest.approx(0.5)

    class Unmarked(Runner):  # no `with self.timed()`: the whole _infer is its time
        def _infer(self, feeds):
            self.clock.now += 2.0
            return {"logits": np.zeros((1, 4, small_cfg.model.vocab_size), np.float32)}

    plain = Unmarked(contract)
    plain.clock = _FakeClock()
    plain.infer(make_feeds(small_cfg.model, 1, 8, 4), check=False)
    assert plain.last_inference_time() == pytest.approx(2.0)
