"""The reference source (hmu_export.model.reference) against an independent oracle of the paper
author's code (tests/reference_oracle.py), on .pt files saved exactly as run_experiments.py
saves them: seq2seq and classifier, HMU and gated HMU_mod, HMU after the encoder or the decoder.
"""
from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from reference_oracle import (make_reference_model, oracle_forward,  # noqa: E402
                              save_reference_pt)

from hmu_export.core.config import ModelConfig  # noqa: E402
from hmu_export.core.errors import CheckpointError, ConfigError, HMUExportError  # noqa: E402
from hmu_export.model.reference import load_source, resolve_config  # noqa: E402

VOCAB, D, LAYERS, D_FF, LATENT, MAX_LEN, CLASSES = 50, 64, (2, 1), 128, 32, 96, 3


@dataclass(frozen=True)
class Case:
    classifier: bool
    gated: bool
    after_decoder: bool

    @property
    def name(self) -> str:
        kind = "classifier" if self.classifier else "seq2seq"
        hmu = "HMU_mod" if self.gated else "HMU"
        return f"{kind}-{hmu}-{'after_decoder' if self.after_decoder else 'after_encoder'}"

    @property
    def position(self) -> str:
        return "after_decoder" if self.after_decoder else "after_encoder"


CASES = [Case(False, False, False), Case(False, True, False), Case(False, False, True),
         Case(False, True, True), Case(True, False, False), Case(True, True, False)]
IDS = [c.name for c in CASES]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """case -> (oracle model, .pt path), built once per module."""
    folder = tmp_path_factory.mktemp("reference_pt")
    out = {}
    for i, case in enumerate(CASES):
        model = make_reference_model(classifier=case.classifier, gated=case.gated,
                                     after_decoder=case.after_decoder, vocab_size=VOCAB,
                                     d_model=D, layers=LAYERS, d_ff=D_FF, latent_dim=LATENT,
                                     max_len=MAX_LEN, num_classes=CLASSES, seed=i)
        prefix = "glue" if case.classifier else "results"
        out[case] = (model, save_reference_pt(model, folder / f"{prefix}_{case.name}.pt"))
    return out


def _cfg(path: Path, case: Case, **kw) -> ModelConfig:
    return ModelConfig(source="reference", checkpoint=str(path), hmu_position=case.position, **kw)


def _source(made, case: Case, **kw):
    return load_source(resolve_config(_cfg(made[case][1], case, **kw)))


def _feeds(case: Case, batch: int, src_len: int, tgt_len: int, seed: int = 0) -> dict:
    rng = np.random.default_rng([seed, batch, src_len, tgt_len])
    feeds = {"src_ids": rng.integers(1, VOCAB, (batch, src_len)).astype(np.int64),
             "src_mask": np.ones((batch, src_len), np.int64)}
    if not case.classifier:
        feeds["tgt_ids"] = rng.integers(1, VOCAB, (batch, tgt_len)).astype(np.int64)
    noise_len = tgt_len if case.after_decoder else src_len
    feeds["noise"] = rng.standard_normal((batch, noise_len, LATENT)).astype(np.float32)
    return feeds


def _oracle(made, case: Case, feeds: dict) -> np.ndarray:
    return oracle_forward(made[case][0], feeds["src_ids"], feeds["noise"],
                          feeds.get("tgt_ids")).numpy()


def _run_module(module, feeds: dict, names: list[str]) -> np.ndarray:
    with torch.no_grad():
        return module(*(torch.from_numpy(feeds[n]) for n in names))[0].numpy()


def _names(case: Case) -> list[str]:
    return (["src_ids", "src_mask", "noise"] if case.classifier
            else ["src_ids", "src_mask", "tgt_ids", "noise"])


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------- config inference
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_resolve_config_reads_the_architecture_from_the_tensors(made, case):
    cfg = resolve_config(_cfg(made[case][1], case))
    assert (cfg.vocab_size, cfg.d_model, cfg.n_encoder_layers, cfg.n_decoder_layers, cfg.d_ff,
            cfg.latent_dim, cfg.max_len) == (VOCAB, D) + LAYERS + (D_FF, LATENT, MAX_LEN)
    assert cfg.num_classes == (CLASSES if case.classifier else 0)
    assert cfg.n_heads == 0 and cfg.heads == D // 32  # the reference runs' rule
    assert cfg.hmu_position == case.position
    cfg.validate()
    assert resolve_config(_cfg(made[case][1], case, n_heads=4)).heads == 4


def test_resolve_config_accepts_safetensors(made, tmp_path):
    from safetensors.torch import save_file
    case = CASES[1]
    state = {k: v.contiguous() for k, v in made[case][0].state_dict().items()}
    path = tmp_path / "htransformer.safetensors"
    save_file(state, str(path))
    src = load_source(resolve_config(_cfg(path, case)))
    feeds = _feeds(case, 2, 6, 4)
    assert np.array_equal(_run_module(src.module("full"), feeds, _names(case)),
                          _oracle(made, case, feeds))


# --------------------------------------------------------------------------- torch forward
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_torch_forward_equals_the_reference_forward(made, case):
    src = _source(made, case)
    graph = "classifier" if case.classifier else "full"
    assert src.graph_names() == (graph,)
    assert set(src.torch_module().state_dict()) == set(made[case][0].state_dict())
    module = src.module(graph)
    for shape in ((2, 7, 5), (3, 12, 1), (1, 1, 3)):
        feeds = _feeds(case, *shape)
        got, want = _run_module(module, feeds, _names(case)), _oracle(made, case, feeds)
        assert got.shape == want.shape
        assert np.max(np.abs(got - want)) <= 1e-5
    hmu, total = src.hmu_parameter_share()
    assert 0 < hmu < total


def test_layer_norms_are_not_identities(made):
    """The fixtures' norms differ from 1/0, so dropping any norm would change the logits."""
    for model, _ in made.values():
        norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
        assert norms and all(float((n.weight.detach() - 1).abs().min()) > 0 for n in norms)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[5]], ids=lambda c: c.name)
def test_src_mask_hides_padding_like_a_shorter_input(made, case):
    """Zeros in src_mask mask padded keys (the reference never masked): a padded row then
    gives what the reference gives for the unpadded sequence."""
    kw = {"pool": "masked_mean"} if case.classifier else {}
    module = _source(made, case, **kw).module("classifier" if case.classifier else "full")
    feeds = _feeds(case, 2, 9, 4)
    real = 5
    feeds["src_mask"][1, real:] = 0
    feeds["src_ids"][1, real:] = 0
    got = _run_module(module, feeds, _names(case))
    short = {k: v[1:2] for k, v in feeds.items()}
    short["src_ids"] = short["src_ids"][:, :real]
    if not case.after_decoder:
        short["noise"] = short["noise"][:, :real]
    assert np.max(np.abs(got[1:2] - _oracle(made, case, short))) <= 1e-5
    assert np.max(np.abs(got[0:1] - _oracle(made, case, {k: v[0:1] for k, v in feeds.items()}))
                  ) <= 1e-5


def test_generation_is_refused_with_one_line(made):
    for case in (CASES[0], CASES[4]):
        msg = _source(made, case).generation_refusal()
        assert msg and "\n" not in msg


# --------------------------------------------------------------------------- ONNX export
def _export(module, case: Case) -> "onnx.ModelProto":  # noqa: F821
    from torch.export import Dim

    from hmu_export.export.onnx_export import stabilize_node_names

    b, s, t = Dim("batch", min=1), Dim("src_len", min=1, max=MAX_LEN), \
        Dim("tgt_len", min=1, max=MAX_LEN)
    axes = {"src_ids": {0: b, 1: s}, "src_mask": {0: b, 1: s}, "tgt_ids": {0: b, 1: t},
            "noise": {0: b, 1: t if case.after_decoder else s}}
    names = _names(case)
    example = _feeds(case, 2, 6, 3)  # >= 2 on every dynamic axis (facts.md)
    logging.getLogger("torch").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, tuple(torch.from_numpy(example[n]) for n in names), dynamo=True,
            dynamic_shapes={n: axes[n] for n in names}, input_names=names,
            output_names=["class_logits" if case.classifier else "logits"], optimize=True,
            verbose=False)
    proto = program.model_proto
    stabilize_node_names(proto)
    return proto


def _ort(proto):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def _check_onnx(made, case: Case, sess, shapes) -> float:
    worst = 0.0
    for shape in shapes:
        feeds = _feeds(case, *shape, seed=1)
        got = sess.run(None, feeds)[0]
        want = _oracle(made, case, feeds)
        assert got.shape == want.shape
        err = float(np.max(np.abs(got - want)))
        assert err <= 1e-4, (case.name, shape, err)
        assert np.array_equal(got.argmax(-1), want.argmax(-1)), (case.name, shape)
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=lambda c: c.name)
def test_onnx_export_equals_the_reference_forward(made, case):
    """The exported graph (the module export_graph exports) in ONNX Runtime vs the oracle at
    several shapes, all-ones mask (the reference's own behaviour); the HMU's pins are found."""
    from hmu_export.core.pins import sensitive_nodes

    src = _source(made, case)
    graph = "classifier" if case.classifier else "full"
    proto = _export(src.module(graph), case)
    assert [i.name for i in proto.graph.input] == _names(case)
    assert not any(n.op_type.startswith("Random") for n in proto.graph.node)
    pins = sensitive_nodes(proto)
    ops = {p.rsplit("/", 1)[-1].split("_")[0] for p in pins}
    assert {"LayerNormalization", "Exp"} <= ops
    assert ("Sigmoid" in ops) == case.gated
    assert all(p.startswith("hmu/") for p in pins)
    _check_onnx(made, case, _ort(proto), [(2, 7, 5), (3, 16, 2), (1, 1, 4)])


@pytest.mark.slow
def test_onnx_export_of_the_other_variants_equals_the_reference_forward(made):
    """The four remaining variants, exported as one graph (one export instead of four keeps
    the suite short); each output is its variant's graph module, as exported alone."""
    from torch import nn

    others = [c for c in CASES if c not in (CASES[0], CASES[5])]
    modules = [_source(made, c).module("classifier" if c.classifier else "full") for c in others]

    class All(nn.Module):
        def __init__(self):
            super().__init__()
            self.parts = nn.ModuleList(modules)

        def forward(self, src_ids, src_mask, tgt_ids, noise, noise_tgt):
            outs = []
            for case, part in zip(others, self.parts):
                eps = noise_tgt if case.after_decoder else noise
                args = (src_ids, src_mask, eps) if case.classifier else \
                    (src_ids, src_mask, tgt_ids, eps)
                outs.append(part(*args)[0])
            return tuple(outs)

    from torch.export import Dim
    b, s, t = Dim("batch", min=1), Dim("src_len", min=1, max=MAX_LEN), \
        Dim("tgt_len", min=1, max=MAX_LEN)
    names = ["src_ids", "src_mask", "tgt_ids", "noise", "noise_tgt"]
    dyn = {"src_ids": {0: b, 1: s}, "src_mask": {0: b, 1: s}, "tgt_ids": {0: b, 1: t},
           "noise": {0: b, 1: s}, "noise_tgt": {0: b, 1: t}}

    def feeds_of(batch, ls, lt, seed=2):
        a, c = _feeds(Case(False, False, False), batch, ls, lt, seed), \
            _feeds(Case(False, False, True), batch, ls, lt, seed)
        return {**a, "noise_tgt": c["noise"]}

    example = feeds_of(2, 6, 3)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        proto = torch.onnx.export(All().eval(), tuple(torch.from_numpy(example[n]) for n in names),
                                  dynamo=True, dynamic_shapes=dyn, input_names=names,
                                  optimize=True, verbose=False).model_proto
    sess = _ort(proto)
    for shape in ((2, 7, 5), (3, 16, 2)):
        feeds = feeds_of(*shape)
        for case, got in zip(others, sess.run(None, feeds)):
            own = {k: v for k, v in feeds.items() if k != "noise_tgt"}
            if case.after_decoder:
                own["noise"] = feeds["noise_tgt"]
            want = _oracle(made, case, own)
            assert np.max(np.abs(got - want)) <= 1e-4, case.name
            assert np.array_equal(got.argmax(-1), want.argmax(-1)), case.name


# --------------------------------------------------------------------------- refusals
def test_unknown_layout_names_missing_and_unexpected_keys(made, tmp_path):
    case = CASES[0]
    state = dict(made[case][0].state_dict())
    state.pop("hmu.norm_output.weight")
    state["hmu.extra_gate.weight"] = torch.zeros(3)
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        resolve_config(_cfg(path, case))
    msg = _one_line(info.value)
    assert "hmu.norm_output.weight" in msg and "hmu.extra_gate.weight" in msg
    assert "missing" in msg or "misses" in msg
    assert "unexpected" in msg


def test_native_and_baseline_checkpoints_are_named(made, tmp_path):
    from hmu_export.model.transformer import HMUTransformer
    path = tmp_path / "native.pt"
    torch.save(HMUTransformer(ModelConfig()).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        resolve_config(_cfg(path, CASES[0]))
    assert "native" in _one_line(info.value)
    state = {k: v for k, v in made[CASES[0]][0].state_dict().items() if not k.startswith("hmu.")}
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        resolve_config(_cfg(path, CASES[0]))
    assert "StandardTransformer" in _one_line(info.value)
    state = {k: v for k, v in made[CASES[0]][0].state_dict().items()
             if not k.startswith("hmu.norm_output.")}
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        resolve_config(_cfg(path, CASES[0]))
    assert "7e88a89" in _one_line(info.value)


def test_wrong_shape_is_named(made, tmp_path):
    state = dict(made[CASES[1]][0].state_dict())
    state["hmu.gate_mlp.0.weight"] = torch.zeros(D, D)
    path = tmp_path / "shape.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        resolve_config(_cfg(path, CASES[1]))
    assert "hmu.gate_mlp.0.weight" in _one_line(info.value)


def test_truncated_file_is_refused(made, tmp_path):
    data = made[CASES[0]][1].read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        resolve_config(_cfg(path, CASES[0]))
    _one_line(info.value)


class _Payload:
    """Unpickling this would create a file: weights-only loading must refuse it."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused_without_running_it(made, tmp_path):
    payload = _Payload()
    payload.marker = str(tmp_path / "pwned")
    state = dict(made[CASES[0]][0].state_dict())
    state["extra"] = payload
    path = tmp_path / "evil.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        resolve_config(_cfg(path, CASES[0]))
    _one_line(info.value)
    assert not (tmp_path / "pwned").exists()


def test_heads_that_do_not_divide_d_model_are_refused(made):
    with pytest.raises(ConfigError) as info:
        resolve_config(_cfg(made[CASES[0]][1], CASES[0], n_heads=5))
    assert "n_heads" in _one_line(info.value)


def test_a_user_field_contradicting_the_tensors_is_refused(made):
    with pytest.raises(ConfigError) as info:
        resolve_config(_cfg(made[CASES[0]][1], CASES[0], d_model=32))
    msg = _one_line(info.value)
    assert "d_model" in msg and "64" in msg
    with pytest.raises(ConfigError):
        resolve_config(_cfg(made[CASES[0]][1], CASES[0], num_classes=4))
    # a shorter max_len than the pe buffer is a profile limit, not a contradiction
    assert resolve_config(_cfg(made[CASES[0]][1], CASES[0], max_len=64)).max_len == 64


def test_missing_checkpoint_setting_is_refused():
    with pytest.raises(HMUExportError) as info:
        resolve_config(ModelConfig(source="reference"))
    assert "checkpoint" in _one_line(info.value)
