"""Shared fixtures. Expensive artifacts (exports, builds) are made once per session."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# onnxruntime >= 1.29 writes a cache under $HOME/.cache: keep tests out of the real home.
_HOME = tempfile.mkdtemp(prefix="hmu-test-home-")
os.environ["HOME"] = _HOME
os.environ["XDG_CACHE_HOME"] = os.path.join(_HOME, ".cache")

from hmu_export.core.layout import BuildLayout  # noqa: E402
from hmu_export.core.config import BuildConfig, config_from_dict  # noqa: E402

SMALL = {
    "model": {"name": "hmu-tiny", "vocab_size": 61, "d_model": 32, "n_heads": 4,
              "n_encoder_layers": 1, "n_decoder_layers": 1, "d_ff": 64, "latent_dim": 16,
              "max_len": 32, "seed": 3},
    "profile": {"batch": [1, 2, 4], "src_len": [1, 8, 16], "tgt_len": [1, 4, 8]},
}

ISSUE_CONFIG = {  # the example config of issue #2
    "model": {"name": "hmu-small", "vocab_size": 517, "d_model": 192, "n_heads": 6,
              "n_encoder_layers": 3, "n_decoder_layers": 1, "d_ff": 384, "latent_dim": 48,
              "max_len": 128, "seed": 7},
    "profile": {"batch": [1, 4, 16], "src_len": [1, 48, 96], "tgt_len": [1, 16, 40]},
}


def seal(root: Path) -> Path:
    """Record a folder made by hand (not by `build`) in a manifest.json of a good build, as
    `build` records its files: commands read only folders that have one (open_build refuses
    a folder without a manifest). Call it again after adding files to such a folder."""
    from hmu_export.core.manifest import write_manifest
    return write_manifest(Path(root), stages={}, profile={}, versions={}, extra={"ok": True})


@pytest.fixture(scope="session")
def small_cfg() -> BuildConfig:
    """A tiny model (d=32, 1+1 layers) that exports in a few seconds."""
    return config_from_dict(SMALL)


@pytest.fixture(scope="session")
def small_model(small_cfg):
    from hmu_export.model import build_model
    return build_model(small_cfg.model)


@pytest.fixture(scope="session")
def small_export(small_cfg, small_model, tmp_path_factory) -> BuildLayout:
    """A folder holding checkpoint/ and model.onnx of the tiny model (no other stages) and the
    manifest.json that records them (``seal``)."""
    from hmu_export.export.onnx_export import export_onnx
    from hmu_export.core.fileio import sha256_file
    from hmu_export.model import save_checkpoint

    layout = BuildLayout(tmp_path_factory.mktemp("small_export"))
    weights, _ = save_checkpoint(small_model, layout.checkpoint_dir)
    export_onnx(small_model, small_cfg, layout.onnx, checkpoint_sha256=sha256_file(weights))
    seal(layout.root)  # a hand-made folder: its manifest is written explicitly
    return layout


@pytest.fixture(scope="session")
def gen_build(small_export, small_cfg, small_model, tmp_path_factory) -> Path:
    """The tiny export plus encoder.onnx / decoder.onnx (what `build` writes): the generation
    graphs the Triton generation models and the in-flight batch tests drive."""
    import shutil
    import warnings

    from hmu_export.export.onnx_export import export_graph
    from hmu_export.model.native import NativeSource

    root = tmp_path_factory.mktemp("gen") / "hmu-tiny"
    shutil.copytree(small_export.root, root)
    source = NativeSource(small_cfg.model, small_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for graph in ("encoder", "decoder"):
            export_graph(source, graph, small_cfg, root / f"{graph}.onnx")
    seal(root)
    return root


@pytest.fixture(scope="session")
def default_build(tmp_path_factory) -> Path:
    """A full `build` of the embedded default model (all stages), made once per session."""
    from hmu_export.build.pipeline import run_build

    out = tmp_path_factory.mktemp("default_build") / "hmu-default"
    outcome = run_build(BuildConfig().validate(), out)
    assert outcome.ok, outcome.failure
    return outcome.out_dir


@pytest.fixture(scope="session")
def hf_t5_build(tmp_path_factory) -> tuple[Path, Path]:
    """(folder root, build) of the tiny Hugging Face T5 of test_hf_source with a seeded HMU:
    checkpoint, every graph, optimized and FP16 graphs and parity; made once per session."""
    pytest.importorskip("transformers")
    import test_hf_source as HF

    from hmu_export.build.preflight import preflight
    from hmu_export.build.pipeline import run_build

    root = tmp_path_factory.mktemp("hf_build")
    HF._t5().save_pretrained(root / "t5")
    cfg = config_from_dict({
        "model": {"name": "t5-hmu", "source": "hf", "path": str(root / "t5")},
        "profile": {"batch": [1, 2, 3], "src_len": [1, 7, 12], "tgt_len": [1, 4, 8]},
        # Transformers 4 (the peers venv) saves max_length 20 into generation_config.json
        "generation": {"max_new_tokens": 8}})
    out = root / "out"
    outcome = run_build(cfg, out, model=preflight(cfg, out),
                        only=["checkpoint", "export", "optimize", "fp16", "parity"])
    assert outcome.ok, outcome.failure
    return root, outcome.out_dir
