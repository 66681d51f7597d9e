"""TensorRT and CUDA FP16 on a real GPU. Skipped (with the reason) where either is missing;
runnable as it stands on a machine with a CUDA GPU and the `tensorrt` wheel:
``python -m pytest tests/test_tensorrt_gpu.py -q -rs``."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from hmu_export.core.errors import ArtifactError, BackendUnavailable, InputError
from hmu_export.core.io_contract import full_contract, make_feeds
from hmu_export.core.tolerance import tolerance_for


def _runtime():
    from hmu_export.runners.tensorrt_runner import probe_runtime
    try:
        return probe_runtime()
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


def _cuda():
    import torch
    if not torch.cuda.is_available():
        pytest.skip("PyTorch sees no CUDA GPU")


@pytest.mark.gpu
def test_torch_cuda_fp16_within_budget(small_cfg, small_model):
    _cuda()
    from hmu_export.runners import TorchRunner
    contract = full_contract(small_cfg.model)
    ref, half = TorchRunner(small_model, contract), TorchRunner(small_model, contract,
                                                               precision="fp16", device="cuda")
    tol = tolerance_for("fp16")
    for shape in [(1, 1, 1), (4, 16, 8)]:
        feeds = make_feeds(small_cfg.model, *shape)
        r, h = ref.infer(feeds)["logits"], half.infer(feeds)["logits"]
        assert np.isfinite(h).all()
        assert np.abs(h - r).max() <= tol.max_abs


@pytest.fixture(scope="module")
def built(small_export, small_cfg, tmp_path_factory):
    runtime = _runtime()
    from hmu_export.core.layout import BuildLayout
    from hmu_export.core.config import ProfileConfig
    from hmu_export.build.stages.engine import engine_stage
    from hmu_export.build.context import BuildContext
    root = tmp_path_factory.mktemp("trt") / "build"
    shutil.copytree(small_export.root, root)
    short = ProfileConfig(batch=(1, 1, 2), src_len=(1, 4, 8), tgt_len=(1, 2, 4))
    cfg = dataclasses.replace(small_cfg, engine=dataclasses.replace(
        small_cfg.engine, extra_profiles=(short,), workspace_mib=1024)).validate()
    ctx = BuildContext(cfg, BuildLayout(root), contract=full_contract(cfg.model))
    res = engine_stage(ctx)
    assert res.status == "ok", res.reason
    return root, cfg, runtime, ctx.data["engine"]


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engine_built_with_pins_and_record(built):
    root, _, runtime, record = built
    assert (root / "model.fp16.plan").stat().st_size > 0
    assert (root / "timing.cache").is_file()
    assert record["tensorrt"] == runtime.tensorrt and record["built"] is True
    assert record["pins_not_found"] == [], "pins must name TensorRT layers"


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engine_parity_and_profiles(built, small_model):
    from hmu_export.runners import TorchRunner
    from hmu_export.runners.tensorrt_runner import TrtRunner
    root, cfg, runtime, _ = built
    contract = full_contract(cfg.model)
    ref = TorchRunner(small_model, contract)
    tol = tolerance_for("fp16")
    with TrtRunner(root, contract, vocab_size=cfg.model.vocab_size, runtime=runtime) as trt:
        for shape in [(1, 1, 1), (1, 8, 4), (4, 16, 8), (2, 3, 5)]:  # both profiles
            feeds = make_feeds(cfg.model, *shape)
            got, want = trt.infer(feeds)["logits"], ref.infer(feeds)["logits"]
            assert np.abs(got - want).max() <= tol.max_abs, shape
        with pytest.raises(InputError):
            trt.infer(make_feeds(cfg.model, 8, 4, 4))


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engine_for_another_gpu_is_refused(built):
    from hmu_export.runners.tensorrt_runner import TrtRunner
    root, cfg, runtime, _ = built
    other = dataclasses.replace(runtime, gpu_name=runtime.gpu_name + " (other)")
    with pytest.raises(ArtifactError, match="rebuild"):
        TrtRunner(root, full_contract(cfg.model), runtime=other)
