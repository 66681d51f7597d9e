"""Tiny graphs of the reference source for the Triton tests: the classifier graph and the full
graph with the HMU after the decoder (noise over tgt_len), each exported once per session into
a folder that `repository_from_artifacts` reads (model.onnx with its recorded config/contract).

Shared by test_triton.py and test_triton_server.py through a module-level cache, so a session
running both exports each graph once (about 7 s each on 2 cores).
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from reference_oracle import make_reference_model, save_reference_pt  # noqa: E402

# heads = d_model // 32 = 1 (the reference runs' rule); vocab 40, latent 8, 3 classes
SIZES = dict(vocab_size=40, d_model=32, nhead=1, layers=(1, 1), d_ff=64, latent_dim=8,
             max_len=16, num_classes=3)
PROFILE = {"batch": [1, 2, 4], "src_len": [1, 4, 6], "tgt_len": [1, 3, 5]}
KINDS = {"classifier": ("ref-cls", dict(classifier=True)),
         "after_decoder": ("ref-dec", dict(after_decoder=True))}
_made: dict[str, Path] = {}


def reference_graph(kind: str, tmp_path_factory) -> Path:
    """Build folder (model.onnx only) of the ``kind`` graph, exported on first use."""
    if kind in _made:
        return _made[kind]
    from hmu_export.core.config import config_from_dict
    from hmu_export.export.onnx_export import export_graph
    from hmu_export.model import sources

    name, flags = KINDS[kind]
    root = tmp_path_factory.mktemp(name)
    model = make_reference_model(seed=21, **flags, **SIZES)
    pt = save_reference_pt(model, root / "weights.pt")
    cfg = config_from_dict({"model": {"name": name, "source": "reference", "checkpoint": str(pt),
                                      "hmu_position": ("after_decoder" if kind == "after_decoder"
                                                       else "after_encoder")},
                            "profile": PROFILE})
    cfg = replace(cfg, model=sources.resolve(cfg.model)).validate()
    build = root / "build"
    build.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_graph(sources.load(cfg.model), "classifier" if kind == "classifier" else "full",
                     cfg, build / "model.onnx")
    from conftest import seal
    seal(build)  # made by hand: its manifest is written explicitly
    _made[kind] = build
    return build
