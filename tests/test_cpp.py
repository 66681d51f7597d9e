"""The C++ program cpp/hmu_infer: built with CMake, run on exported graphs, compared with PyTorch.

The build fetches ONNX Runtime from npm (cpp/fetch_deps.sh) once per session into the git-ignored
cpp/third_party/ and compiles into a temporary folder. Error cases are checked against the
Python validator's own messages (hmu_export.core.io_contract.validate_feeds), so the two cannot drift.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from hmu_export.core.config import BuildConfig
from hmu_export.core.errors import InputError
from hmu_export.core.io_contract import full_contract, make_feeds, validate_feeds
from hmu_export.runners import TorchRunner

ROOT = Path(__file__).resolve().parents[1]
CPP = ROOT / "cpp"
FP32_MAX_ABS = 1e-4


def _run(cmd: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _need_tools() -> None:
    missing = [t for t in ("cmake", "c++", "bash") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"C++ toolchain missing: {', '.join(missing)}")


def _fetch(dep: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    return _run(["bash", str(CPP / "fetch_deps.sh"), dep], env=env)


def _cmake_build(build_dir: Path, *flags: str) -> Path:
    configure = _run(["cmake", "-S", str(CPP), "-B", str(build_dir),
                      "-DCMAKE_BUILD_TYPE=Release", *flags])
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    build = _run(["cmake", "--build", str(build_dir), "-j2"])
    assert build.returncode == 0, build.stdout[-5000:] + build.stderr[-3000:]
    exe = build_dir / "hmu_infer"
    assert exe.is_file()
    return exe


@pytest.fixture(scope="session")
def hmu_infer(tmp_path_factory) -> Path:
    """cpp/hmu_infer with the ONNX Runtime backend, built once per session."""
    _need_tools()
    if shutil.which("npm") is None:
        pytest.fail("npm is needed to fetch ONNX Runtime for the C++ build (cpp/fetch_deps.sh)")
    fetched = _fetch("ort")
    assert fetched.returncode == 0, f"cpp/fetch_deps.sh ort failed: {fetched.stderr[-2000:]}"
    return _cmake_build(tmp_path_factory.mktemp("cpp_build"))


@pytest.fixture(scope="session")
def default_export(tmp_path_factory):
    """model.onnx of the embedded default model (d=128, 2+2 layers, vocab 512), no other stages."""
    from hmu_export.export.onnx_export import export_onnx
    from hmu_export.model import build_model

    cfg = BuildConfig().validate()
    model = build_model(cfg.model)
    path = tmp_path_factory.mktemp("default_export") / "model.onnx"
    export_onnx(model, cfg, path)
    return cfg, model, path


def _write_feeds(folder: Path, feeds: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in feeds.items():
        np.save(folder / f"{name}.npy", arr)
    return folder


def _infer(exe: Path, model: Path, feeds: dict[str, np.ndarray], work: Path,
           *extra: str) -> dict[str, np.ndarray]:
    inputs = _write_feeds(work / "in", feeds)
    out = work / "out"
    res = _run([str(exe), "--model", str(model), "--inputs", str(inputs), "--outputs", str(out),
                *extra], timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert "wrote logits" in res.stdout
    return {p.stem: np.load(p) for p in out.glob("*.npy")}


def _assert_matches_torch(got: dict[str, np.ndarray], model, cfg, feeds) -> float:
    ref = TorchRunner(model, full_contract(cfg.model), [cfg.profile]).infer(feeds)["logits"]
    assert set(got) == {"logits"}
    assert got["logits"].dtype == np.float32
    assert got["logits"].shape == ref.shape
    err = float(np.max(np.abs(got["logits"] - ref)))
    assert err <= FP32_MAX_ABS, f"max abs {err:.3g} > {FP32_MAX_ABS}"
    return err


# ---- parity with PyTorch -------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 16, 8), (2, 8, 4), (3, 5, 7), (4, 16, 8)],
                         ids=lambda s: "x".join(map(str, s)))
def test_small_model_matches_torch(hmu_infer, small_export, small_cfg, small_model, shape,
                                   tmp_path):
    """Batch 1, maximum lengths (16, 8) and the maximum batch of the tiny model's profile."""
    feeds = make_feeds(small_cfg.model, *shape, seed=11)
    got = _infer(hmu_infer, small_export.onnx, feeds, tmp_path)
    _assert_matches_torch(got, small_model, small_cfg, feeds)


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 128, 64), (3, 37, 20), (8, 128, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_default_model_matches_torch(hmu_infer, default_export, shape, tmp_path):
    """The default-size model at batch 1, the profile's maximum lengths and maximum batch."""
    cfg, model, path = default_export
    assert cfg.profile.src_len[2] == 128 and cfg.profile.tgt_len[2] == 64
    assert cfg.profile.batch[2] == 8
    feeds = make_feeds(cfg.model, *shape, seed=5)
    got = _infer(hmu_infer, path, feeds, tmp_path, "--threads", "2")
    _assert_matches_torch(got, model, cfg, feeds)


def test_zero_noise_is_the_mean_path(hmu_infer, small_export, small_cfg, small_model, tmp_path):
    """Noise is a real input: zeros (mean path) and seeded noise give different, correct logits."""
    feeds = make_feeds(small_cfg.model, 2, 8, 4, seed=2)
    noisy = _infer(hmu_infer, small_export.onnx, feeds, tmp_path / "a")
    feeds0 = dict(feeds, noise=np.zeros_like(feeds["noise"]))
    mean = _infer(hmu_infer, small_export.onnx, feeds0, tmp_path / "b")
    _assert_matches_torch(mean, small_model, small_cfg, feeds0)
    assert float(np.max(np.abs(noisy["logits"] - mean["logits"]))) > 1e-3


def test_reads_npy_format_2_and_profile_from_manifest(hmu_infer, small_export, small_cfg,
                                                      small_model, tmp_path):
    """A graph without hmu_export metadata takes its profile from manifest.json next to it."""
    proto = onnx.load(str(small_export.onnx))
    del proto.metadata_props[:]
    folder = tmp_path / "build"
    folder.mkdir()
    onnx.save(proto, str(folder / "model.onnx"))
    feeds = make_feeds(small_cfg.model, 2, 16, 8, seed=4)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, arr in feeds.items():  # .npy format 2.0 (4-byte header length)
        with open(inputs / f"{name}.npy", "wb") as fh:
            np.lib.format.write_array(fh, arr, version=(2, 0))

    def run() -> subprocess.CompletedProcess:
        return _run([str(hmu_infer), "--model", str(folder / "model.onnx"), "--inputs",
                     str(inputs), "--outputs", str(tmp_path / "out")])

    res = run()  # no metadata, no manifest: the profile is unknown, which is an error
    assert res.returncode == 2 and "no hmu_export.config metadata" in res.stderr
    assert len(res.stderr.splitlines()) == 1
    manifest = {"config": small_cfg.to_dict(), "profile": small_cfg.profile.to_dict()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    res = run()
    assert res.returncode == 0, res.stderr
    got = {"logits": np.load(tmp_path / "out" / "logits.npy")}
    _assert_matches_torch(got, small_model, small_cfg, feeds)
    # The manifest's profile is enforced: batch 5 exceeds its max of 4.
    big = make_feeds(small_cfg.model, 5, 4, 4)
    _write_feeds(inputs, big)
    res = run()
    assert res.returncode == 2
    assert res.stderr.strip() == ("hmu_infer: error: shape outside the profile: batch=5, "
                                  "src_len=4, tgt_len=4 (allowed: batch 1..4, src_len 1..16, "
                                  "tgt_len 1..8)")


# ---- errors: one line, non-zero exit, the same words as Python -----------------------------

def _bad_feeds(case: str, cfg) -> dict[str, np.ndarray]:
    f = make_feeds(cfg.model, 2, 8, 4, seed=1)
    if case == "dtype":
        f["src_ids"] = f["src_ids"].astype(np.int32)
    elif case == "noise_dtype":
        f["noise"] = f["noise"].astype(np.float64)
    elif case == "rank":
        f["src_mask"] = f["src_mask"][:, :, None]
    elif case == "inconsistent":
        f["src_mask"] = np.ones((2, 7), np.int64)
    elif case == "latent":
        f["noise"] = f["noise"][:, :, :5].copy()
    elif case == "batch_over_profile":
        f = make_feeds(cfg.model, 5, 8, 4)
    elif case == "src_len_over_profile":
        f = make_feeds(cfg.model, 2, 17, 4)
    elif case == "tgt_len_over_profile":
        f = make_feeds(cfg.model, 2, 8, 9)
    elif case == "empty":
        f["tgt_ids"] = np.zeros((2, 0), np.int64)
    elif case == "mask_values":
        f["src_mask"][0, 0] = 2
    elif case == "mask_empty_row":
        f["src_mask"][1, :] = 0
    elif case == "vocab_high":
        f["tgt_ids"][1, 2] = cfg.model.vocab_size
    elif case == "vocab_negative":
        f["src_ids"][0, 0] = -3
    elif case == "noise_nan":
        f["noise"][1, 2, 3] = np.nan
    else:  # pragma: no cover
        raise AssertionError(case)
    return f


FEED_CASES = ["dtype", "noise_dtype", "rank", "inconsistent", "latent", "batch_over_profile",
              "src_len_over_profile", "tgt_len_over_profile", "empty", "mask_values",
              "mask_empty_row", "vocab_high", "vocab_negative", "noise_nan"]


def _assert_one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("hmu_infer: error: ")
    return lines[0][len("hmu_infer: error: "):]


@pytest.mark.parametrize("case", FEED_CASES)
def test_feed_errors_match_python(hmu_infer, small_export, small_cfg, case, tmp_path):
    feeds = _bad_feeds(case, small_cfg)
    with pytest.raises(InputError) as py_err:
        validate_feeds(full_contract(small_cfg.model), feeds, [small_cfg.profile],
                       small_cfg.model.vocab_size)
    inputs = _write_feeds(tmp_path / "in", feeds)
    res = _run([str(hmu_infer), "--model", str(small_export.onnx), "--inputs", str(inputs),
                "--outputs", str(tmp_path / "out")])
    assert _assert_one_line_error(res) == str(py_err.value)
    assert not (tmp_path / "out").exists()  # nothing is written on error


def _garbage(path: Path, data: bytes) -> None:
    path.write_bytes(data)


@pytest.mark.parametrize("case,expect", [
    ("missing_model", "model file not found"),
    ("missing_inputs_dir", "inputs folder not found"),
    ("missing_file", "missing input(s): noise"),
    ("not_npy", "not a .npy file"),
    ("truncated_npy", "truncated .npy data"),
    ("fortran_npy", "Fortran-order"),
    ("huge_shape_npy", "truncated .npy data (shape [1000000000000000, 1000000000000000]"),
    ("corrupt_model", "ONNX Runtime cannot load"),
    ("unknown_flag", "unknown argument '--fast'"),
    ("bad_backend", "--backend must be ort or trt"),
    ("no_model_flag", "missing --model"),
    ("bad_threads", "--threads must be a positive integer"),
    ("trt_not_built", "built without TensorRT"),
])
def test_usage_errors_print_one_line(hmu_infer, small_export, small_cfg, case, expect, tmp_path):
    feeds = make_feeds(small_cfg.model, 2, 8, 4)
    inputs = _write_feeds(tmp_path / "in", feeds)
    model = str(small_export.onnx)
    args = ["--inputs", str(inputs), "--outputs", str(tmp_path / "out")]
    if case == "missing_model":
        model = str(tmp_path / "nope.onnx")
    elif case == "missing_inputs_dir":
        args[1] = str(tmp_path / "nope")
    elif case == "missing_file":
        (inputs / "noise.npy").unlink()
    elif case == "not_npy":
        _garbage(inputs / "tgt_ids.npy", b"this is not numpy")
    elif case == "truncated_npy":
        data = (inputs / "noise.npy").read_bytes()
        _garbage(inputs / "noise.npy", data[: len(data) - 40])
    elif case == "fortran_npy":
        np.save(inputs / "noise.npy", np.asfortranarray(feeds["noise"]))
    elif case == "huge_shape_npy":  # a corrupt header must not make the program allocate
        with open(inputs / "noise.npy", "wb") as fh:
            np.lib.format.write_array_header_1_0(
                fh, {"descr": "<f4", "fortran_order": False, "shape": (10**15, 10**15)})
            fh.write(b"\0" * 64)
    elif case == "corrupt_model":
        model = str(tmp_path / "model.onnx")
        _garbage(Path(model), b"\x08\x07garbage" * 10)
    elif case == "unknown_flag":
        args += ["--fast"]
    elif case == "bad_backend":
        args += ["--backend", "tvm"]
    elif case == "bad_threads":
        args += ["--threads", "0"]
    elif case == "trt_not_built":
        args += ["--backend", "trt"]
    cmd = [str(hmu_infer)] + ([] if case == "no_model_flag" else ["--model", model]) + args
    msg = _assert_one_line_error(_run(cmd))
    assert expect in msg


def test_help(hmu_infer):
    res = _run([str(hmu_infer), "--help"])
    assert res.returncode == 0 and "--backend ort|trt" in res.stdout


# ---- TensorRT backend: compiled and linked against real TensorRT 10 headers ----------------

def test_tensorrt_backend_compiles_and_links(hmu_infer, small_export, small_cfg, small_model,
                                             tmp_path_factory, tmp_path):
    """TensorRT headers from PyPI (kernel-lens) + CUDA runtime wheels; nothing runs without a GPU.

    The linked program must still run the ONNX Runtime backend on this machine, and `--backend
    trt` must fail with one line (no libnvinfer here) instead of crashing.
    """
    fetched = _fetch("trt")
    if fetched.returncode != 0:
        pytest.skip("TensorRT/CUDA headers could not be fetched from PyPI: "
                    + (fetched.stderr.strip().splitlines() or ["?"])[-1])
    exe = _cmake_build(tmp_path_factory.mktemp("cpp_build_trt"), "-DHMU_WITH_TENSORRT=ON")
    feeds = make_feeds(small_cfg.model, 2, 8, 4)
    got = _infer(exe, small_export.onnx, feeds, tmp_path / "ort")
    _assert_matches_torch(got, small_model, small_cfg, feeds)

    build = tmp_path / "build"
    build.mkdir()
    (build / "model.fp16.plan").write_bytes(b"not an engine")
    inputs = _write_feeds(tmp_path / "in", feeds)
    env = dict(os.environ, HMU_NVINFER_LIB="libnvinfer-absent.so.10")
    res = _run([str(exe), "--model", str(build / "model.fp16.plan"), "--inputs", str(inputs),
                "--outputs", str(tmp_path / "out")], env=env)
    assert "TensorRT runtime not found" in _assert_one_line_error(res)


# ---- core checks without a runtime: the TensorRT backend's profile choice (issue 11, item 20) --

def test_core_checks_pick_the_tightest_profile(hmu_infer):
    """hmu_core_test (cpp/tests/core_test.cpp, built with hmu_infer): pick_profile takes the
    tightest profile that holds a shape, as Python's select_profile does, so extra_profiles are
    used from C++ too; the TensorRT backend calls this function."""
    exe = hmu_infer.parent / "hmu_core_test"
    assert exe.is_file(), "cpp/CMakeLists.txt no longer builds hmu_core_test"
    res = _run([str(exe)], timeout=60)
    assert res.returncode == 0, res.stderr
    assert "checks passed" in res.stdout


def test_cpp_profile_rule_matches_python():
    """The same cases as core_test.cpp's first block, through Python's select_profile."""
    from hmu_export.core.config import ProfileConfig
    from hmu_export.runners.tensorrt_runner import select_profile

    profiles = [ProfileConfig(batch=(1, 4, 8), src_len=(1, 64, 128), tgt_len=(1, 32, 64)),
                ProfileConfig(batch=(1, 1, 2), src_len=(1, 8, 16), tgt_len=(1, 4, 8)),
                ProfileConfig(batch=(1, 2, 4), src_len=(1, 16, 32), tgt_len=(1, 8, 16))]
    cases = {(1, 8, 4): 1, (2, 16, 8): 1, (3, 16, 8): 2, (1, 17, 4): 2, (8, 128, 64): 0,
             (1, 1, 1): 1}
    assert {s: select_profile(profiles, *s) for s in cases} == cases
    source = (CPP / "tests" / "core_test.cpp").read_text()
    for (b, ls, lt), index in cases.items():
        assert f"pick(profiles, {b}, {ls}, {lt}) == {index}" in source


# ---- graphs of the reference source (hmu_infer reads the contract from the graph) ----------

@pytest.fixture(scope="session")
def reference_graphs(tmp_path_factory):
    """model.onnx of a reference GLUE classifier and of a reference seq2seq with HMU_mod after
    the decoder (noise [batch, tgt_len, latent]), from .pt files saved as run_experiments.py
    saves them."""
    from dataclasses import replace

    sys.path.insert(0, str(Path(__file__).parent))
    from reference_oracle import make_reference_model, save_reference_pt

    from hmu_export.core.config import ModelConfig, ProfileConfig
    from hmu_export.export.onnx_export import export_graph
    from hmu_export.model import sources

    folder = tmp_path_factory.mktemp("reference_graphs")
    out = {}
    for name, flags, position in (("classifier", dict(classifier=True), "after_encoder"),
                                  ("full", dict(gated=True, after_decoder=True),
                                   "after_decoder")):
        model = make_reference_model(vocab_size=40, d_model=32, nhead=1, layers=(1, 1),
                                     d_ff=64, latent_dim=8, max_len=16, seed=5, **flags)
        pt = save_reference_pt(model, folder / f"{name}.pt")
        mcfg = sources.resolve(ModelConfig(source="reference", checkpoint=str(pt),
                                           hmu_position=position))
        cfg = replace(BuildConfig(), model=mcfg,
                      profile=ProfileConfig(batch=(1, 2, 3), src_len=(1, 4, 8),
                                            tgt_len=(1, 3, 6))).validate()
        res = export_graph(sources.load(mcfg), name, cfg, folder / f"{name}.onnx")
        out[name] = (cfg, res.contract, res.path)
    return out


@pytest.mark.parametrize("graph", ["classifier", "full"])
def test_reference_graphs_match_onnxruntime(hmu_infer, reference_graphs, graph, tmp_path):
    import onnxruntime as ort

    from hmu_export.core.io_contract import spec_feeds

    cfg, contract, path = reference_graphs[graph]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for i, (b, ls, lt) in enumerate([(1, 1, 1), (2, 5, 3), (3, 8, 6)]):
        feeds = spec_feeds(contract, cfg.model, {"batch": b, "src_len": ls, "tgt_len": lt},
                           seed=i)
        work = tmp_path / str(i)
        inputs = _write_feeds(work / "in", feeds)
        res = _run([str(hmu_infer), "--model", str(path), "--inputs", str(inputs),
                    "--outputs", str(work / "out")], timeout=120)
        assert res.returncode == 0 and res.stderr == "", res.stderr
        name = contract.output_names[0]
        assert f"wrote {name} " in res.stdout
        got = {p.stem: np.load(p) for p in (work / "out").glob("*.npy")}
        assert set(got) == set(contract.output_names)
        want = sess.run([name], feeds)[0]
        assert got[name].shape == want.shape == ((b, cfg.model.num_classes) if graph ==
                                                 "classifier" else (b, lt,
                                                                    cfg.model.vocab_size))
        assert float(np.max(np.abs(got[name] - want))) <= FP32_MAX_ABS
