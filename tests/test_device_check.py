"""The CPU-side parts of the GPU check (hmu_export/devtools/gpu_check.py, scripts/device_check.sh).

The GPU run itself happens on a lent machine; here: argument parsing, where the JSON goes, the
torch-cuda backends refusing cleanly without CUDA, and a dry run of every section on the CPU
with the tiny model (the same code the GPU runs, device "cpu").
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hmu_export.devtools import gpu_check
from hmu_export.core.errors import BackendUnavailable

from conftest import SMALL

ROOT = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


def _toml(data: dict) -> str:
    lines = []
    for table, fields in data.items():
        lines.append(f"[{table}]")
        for k, v in fields.items():
            lines.append(f"{k} = {json.dumps(list(v) if isinstance(v, tuple) else v)}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(_toml(SMALL))
    return path


def test_arguments_and_defaults():
    args = gpu_check.parse_args([])
    assert args.device == "cuda" and args.grid == "full" and args.init_scales == [1.0, 2.0]
    assert not args.pytest and not args.build and args.budget_s == gpu_check.DEFAULT_BUDGET_S
    args = gpu_check.parse_args(["--device", "cpu", "--bench-shapes", "1x2x3,4X5X6",
                                 "--init-scales", "1,2.5", "--pytest", "--no-pytest",
                                 "--iters", "3"])
    assert args.bench_shapes == [(1, 2, 3), (4, 5, 6)] and args.init_scales == [1.0, 2.5]
    assert not args.pytest and args.iters == 3


@pytest.mark.parametrize("argv", [["--device", "tpu"], ["--bench-shapes", "1x2"],
                                  ["--bench-shapes", "0x2x2"], ["--init-scales", "1,nan"],
                                  ["--iters", "0"], ["--budget-s", "-1"], ["--grid", "huge"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        gpu_check.parse_args(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_out_path(tmp_path):
    assert gpu_check.out_path(None, {"OUT": str(tmp_path)}) == tmp_path / "device_check.json"
    assert gpu_check.out_path(None, {}) == Path("device_check.json")
    assert gpu_check.out_path(str(tmp_path), {}) == tmp_path / "device_check.json"
    assert gpu_check.out_path(str(tmp_path / "new"), {}) == tmp_path / "new" / "device_check.json"
    assert gpu_check.out_path(str(tmp_path / "r.json"), {}) == tmp_path / "r.json"


@no_cuda
def test_torch_cuda_backends_refuse_cleanly_without_cuda(small_cfg, small_model, tmp_path,
                                                         capsys):
    from hmu_export.core.io_contract import full_contract

    with pytest.raises(BackendUnavailable) as info:
        gpu_check.torch_device_backends(small_model, small_cfg, full_contract(small_cfg.model),
                                        "cuda")
    assert "CUDA is not available" in str(info.value) and "\n" not in str(info.value)
    out = tmp_path / "r.json"
    assert gpu_check.main(["--device", "cuda", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: device cuda: CUDA is not available")
    data = json.loads(out.read_text())
    assert data["passed"] is False and "CUDA is not available" in data["error"]


def test_dry_run_on_the_cpu_writes_one_json(tiny_config, tmp_path, capsys):
    """Every GPU section, on the CPU, with the tiny model: parity passes (FP32 and FP16 budgets),
    bench rows are figures, the summary is printed, skipped sections say why."""
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    rc = gpu_check.main(["--device", "cpu", "--config", str(tiny_config), "--out", str(out),
                         "--grid", "quick", "--init-scales", "1", "--warmup", "1",
                         "--iters", "2", "--bench-shapes", "1x8x4,4x16x8", "--threads", "1"])
    assert torch.get_num_threads() == threads  # restored for the rest of the session
    printed = capsys.readouterr().out
    data = json.loads((out / "device_check.json").read_text())
    assert rc == 0, printed
    assert data["schema"] == gpu_check.SCHEMA and data["dry_run"] is True and data["passed"]
    assert data["model"]["name"] == "hmu-tiny"
    assert data["sections"]["pytest"] == {"skipped": "not asked for"}
    assert data["sections"]["build"] == {"skipped": "not asked for"}
    parity = data["sections"]["parity"]
    (model,) = parity["models"]  # no checkpoint in the tiny config: the seeded model only
    assert model["model"] == "seeded" and parity["fp32_pins"] == ["encoder/"]
    assert set(model["backends"]) == {"torch-cpu-dryrun", "torch-cpu-dryrun-fp16",
                                      "torch-cpu-dryrun-fp16-pinned"}
    assert "encoder" in model["fp32_modules"] and "hmu.vae" in model["fp32_modules"]
    assert model["backends"]["torch-cpu-dryrun-fp16-pinned"]["passed"]
    fp16 = model["backends"]["torch-cpu-dryrun-fp16"]
    assert fp16["passed"] and fp16["precision"] == "fp16" and fp16["tolerance"]["max_abs"] == 0.5
    assert model["backends"]["torch-cpu-dryrun"]["worst_max_abs"] <= 1e-4
    rows = data["sections"]["bench"]["rows"]
    assert [(r["precision"], r["shape"]) for r in rows] == [
        ("fp32", "1x8x4"), ("fp32", "4x16x8"), ("fp16", "1x8x4"), ("fp16", "4x16x8")]
    assert all(r["device_ms"]["p50"] > 0 and r["e2e_ms"]["p50"] > 0 for r in rows)
    assert "PASSED" in printed and "torch-cpu-dryrun-fp16-pinned" in printed


def test_parity_models_seed_the_init_scales_and_keep_the_trained_one():
    """With the trained default, --init-scales changed nothing (the checkpoint overrode the
    seeded weights): both rows measured the trained model."""
    from hmu_export.core.config import demo_config

    cfg = demo_config()
    models = gpu_check.parity_models(cfg, [1.0, 2.0])
    assert [(k, m.checkpoint, m.init_scale) for k, m in models] == [
        ("trained", cfg.model.checkpoint, 1.0), ("seeded", "", 1.0), ("seeded", "", 2.0)]


def test_pinned_modules_run_in_fp32_inside_a_half_model(small_model):
    """The pinned row's modules compute in FP32 (their weights are float32 and the FP16 model's
    output moves), the rest stays half; an unknown pin is one error."""
    import copy

    from hmu_export.core.errors import ConfigError
    from hmu_export.devtools import torch_pins

    half = copy.deepcopy(small_model).half()
    names = torch_pins.outermost(torch_pins.policy_modules(half)
                                 + torch_pins.request_modules(half, ["encoder/"]))
    assert torch_pins.request_modules(half, ["hmu/vae/Exp"]) == ["hmu.vae"]
    applied = torch_pins.keep_fp32(half, names)
    assert "encoder" in applied and not any(a.startswith("encoder.") for a in applied)
    assert half.encoder.layers[0].linear1.weight.dtype == torch.float32
    assert half.decoder.layers[0].linear1.weight.dtype == torch.float16
    with pytest.raises(ConfigError, match="names no module"):
        torch_pins.request_modules(half, ["nowhere/"])


def test_a_failing_section_is_recorded_and_the_rest_still_runs(tiny_config, tmp_path,
                                                                monkeypatch):
    """A section that fails (here parity, by a bug) is recorded; bench still runs; exit 1."""
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")
    monkeypatch.setattr(gpu_check, "parity_section", broken)
    out = tmp_path / "r.json"
    rc = gpu_check.main(["--device", "cpu", "--config", str(tiny_config), "--out", str(out),
                         "--warmup", "1", "--iters", "1", "--bench-shapes", "9x8x4,1x8x4",
                         "--threads", "1"])
    data = json.loads(out.read_text())
    assert rc == 1 and data["passed"] is False
    assert data["sections"]["parity"]["error"] == "internal error: RuntimeError: boom"
    assert "bench shape 9x8x4 is outside the profile" in data["sections"]["bench"]["error"]


def test_time_budget_skips_sections(tiny_config, tmp_path):
    out = tmp_path / "r.json"
    gpu_check.main(["--device", "cpu", "--config", str(tiny_config), "--out", str(out),
                    "--budget-s", "1"])
    data = json.loads(out.read_text())
    assert data["sections"]["parity"]["skipped"].startswith("time budget")
    assert data["sections"]["bench"]["skipped"].startswith("time budget")


def test_device_script_runs_the_module(tiny_config, tmp_path):
    """scripts/device_check.sh end to end as a CPU dry run (no .whl folder needed here)."""
    script = ROOT / "scripts" / "device_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "--target /tmp/site .whl/*.whl" in text and "-m hmu_export.devtools.gpu_check" in text
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "o"), HMU_SKIP_WHEELS="1")
    res = subprocess.run(["bash", str(script), str(tmp_path / "d.json"), "--device", "cpu",
                          "--no-pytest", "--no-build", "--config", str(tiny_config),
                          "--grid", "quick", "--init-scales", "1", "--warmup", "1", "--iters",
                          "1", "--bench-shapes", "1x8x4", "--threads", "1"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["passed"] and data["environment"]["device"] == "cpu"


# ---- on a CUDA machine only (pytest -m gpu; scripts/device_check.sh runs these) -------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_torch_cuda_runners_match_the_cpu_reference(small_cfg, small_model):
    import numpy as np

    from hmu_export.core.io_contract import full_contract, make_feeds
    from hmu_export.runners import TorchRunner
    from hmu_export.runners.base import NonFiniteOutput
    from hmu_export.core.tolerance import FP16, FP32

    contract = full_contract(small_cfg.model)
    ref = TorchRunner(small_model, contract, [small_cfg.profile])
    fp32 = TorchRunner(small_model, contract, [small_cfg.profile], device="cuda")
    fp16 = TorchRunner(small_model, contract, [small_cfg.profile], device="cuda",
                       precision="fp16")
    for shape in [(1, 1, 1), (3, 7, 5), (4, 16, 8)]:
        feeds = make_feeds(small_cfg.model, *shape, seed=4)
        want = ref.infer(feeds)["logits"]
        assert np.abs(fp32.infer(feeds)["logits"] - want).max() <= FP32.max_abs
        assert np.abs(fp16.infer(feeds)["logits"] - want).max() <= FP16.max_abs
    feeds = make_feeds(small_cfg.model, 2, 4, 3, seed=1)
    feeds["noise"] = np.full_like(feeds["noise"], 3e38)
    with pytest.raises(NonFiniteOutput):
        fp32.infer(feeds)
