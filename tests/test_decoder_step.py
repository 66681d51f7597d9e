"""The cached decoder step: same parameters as the full model, same logits at every position.

Oracle: the full teacher-forced forward (nn.TransformerDecoder with a causal mask), compared at
the same positions whether the target is fed at once (past 0), token by token with the cache,
or in chunks. Then the exported encoder / decoder graphs in ONNX Runtime at shapes the export
never saw (past 0, new 1, past 1..7), and against PyTorch.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from conftest import SMALL
from hmu_export.core.config import config_from_dict
from hmu_export.core.io_contract import (DECODER, ENCODER, cross_key, cross_value, past_key,
                                    past_value)
from hmu_export.model import HMUTransformer, build_model
from hmu_export.model.native import NativeSource

# Two decoder layers (the cache must thread through layers) and head_dim != 8 = SMALL's.
TWO_LAYER = {**SMALL, "model": {**SMALL["model"], "n_decoder_layers": 2, "n_heads": 2,
                                "name": "hmu-tiny-2"}}

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and spinning threads crawl on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _inputs(cfg, batch: int, src_len: int, tgt_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    v = cfg.model.vocab_size
    src = torch.randint(3, v, (batch, src_len), generator=g)
    mask = torch.ones(batch, src_len, dtype=torch.long)
    for row in range(1, batch, 2):  # every other row padded
        real = max(1, src_len - 2 - row)
        mask[row, real:] = 0
        src[row, real:] = cfg.model.pad_id
    tgt = torch.randint(3, v, (batch, tgt_len), generator=g)
    noise = torch.randn(batch, src_len, cfg.model.latent_dim, generator=g)
    return src, mask, tgt, noise


def _empty(model: HMUTransformer, batch: int) -> list[torch.Tensor]:
    out = []
    for layer in model.decoder.layers:
        a = layer.self_attn
        out += [torch.zeros(batch, a.num_heads, 0, a.head_dim)] * 2
    return out


@pytest.mark.parametrize("conf", [SMALL, TWO_LAYER], ids=["1-layer", "2-layer"])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_step_equals_full_model(conf, batch):
    cfg = config_from_dict(conf)
    model = build_model(cfg.model)
    src, mask, tgt, noise = _inputs(cfg, batch, 9, 7, seed=batch)
    with torch.no_grad():
        ref = model(src, mask, tgt, noise)
        memory, cross = model.encode_with_cache(src, mask, noise)
        # the whole target at past 0
        whole, present = model.decode_step(tgt, mask, cross, _empty(model, batch))
        assert (whole - ref).abs().max().item() <= 1e-5
        assert present[0].shape == (batch, cfg.model.heads, 7,
                                    cfg.model.d_model // cfg.model.heads)
        # one token at a time, the cache growing
        past, steps = _empty(model, batch), []
        for t in range(tgt.shape[1]):
            logits, past = model.decode_step(tgt[:, t:t + 1], mask, cross, past)
            steps.append(logits)
        assert (torch.cat(steps, 1) - ref).abs().max().item() <= 1e-5
        for a, b in zip(past, present):  # the grown cache is the whole-target cache
            assert (a - b).abs().max().item() <= 1e-5
        # chunks: 3 tokens, then 4 after a past of 3
        first, past = model.decode_step(tgt[:, :3], mask, cross, _empty(model, batch))
        second, _ = model.decode_step(tgt[:, 3:], mask, cross, past)
        assert (torch.cat([first, second], 1) - ref).abs().max().item() <= 1e-5
    # cross K/V are the memory projected by the cross-attention weights
    mha = model.decoder.layers[0].multihead_attn
    d = cfg.model.d_model
    k = memory @ mha.in_proj_weight[d:2 * d].T + mha.in_proj_bias[d:2 * d]
    k = k.reshape(batch, 9, mha.num_heads, -1).transpose(1, 2)
    assert (k - cross[0]).abs().max().item() <= 1e-5


def test_state_dict_unchanged():
    """The step code adds no parameter or buffer: old checkpoints keep loading."""
    cfg = config_from_dict(SMALL)
    model = HMUTransformer(cfg.model)
    keys = set(model.state_dict())
    ref = torch.nn.TransformerDecoderLayer(cfg.model.d_model, cfg.model.heads, cfg.model.d_ff,
                                           batch_first=True)
    dec_keys = {k for k in keys if k.startswith("decoder.layers.0.")}
    assert dec_keys == {f"decoder.layers.0.{k}" for k in ref.state_dict()}
    HMUTransformer(cfg.model).load_state_dict(model.state_dict(), strict=True)


def test_native_modules_follow_contract_order():
    cfg = config_from_dict(TWO_LAYER)
    source = NativeSource(cfg.model, build_model(cfg.model))
    enc_c, dec_c = source.contract(ENCODER), source.contract(DECODER)
    assert enc_c.output_names == ["memory", cross_key(0), cross_value(0), cross_key(1),
                                  cross_value(1)]
    assert dec_c.input_names[:4] == ["tgt_ids", "src_mask", "positions", "past_mask"]
    assert dec_c.input_names[4:] == [cross_key(0), cross_value(0), cross_key(1), cross_value(1),
                                     past_key(0), past_value(0), past_key(1), past_value(1)]
    src, mask, tgt, noise = _inputs(cfg, 2, 6, 4)
    with torch.no_grad():
        ref = source.model(src, mask, tgt, noise)
        enc_out = source.module(ENCODER)(src, mask, noise)
        assert len(enc_out) == len(enc_c.outputs)
        for spec, value in zip(enc_c.outputs, enc_out):
            fixed = [d for d in spec.dims if isinstance(d, int)]
            assert [value.shape[i] for i, d in enumerate(spec.dims) if isinstance(d, int)] == fixed
        h, hd = dec_c.inputs[4].dims[1], dec_c.inputs[4].dims[3]
        past = [torch.zeros(2, h, 0, hd)] * 4
        positions = torch.arange(4).expand(2, 4)
        out = source.module(DECODER)(tgt, mask, positions, torch.zeros(2, 0, dtype=torch.long),
                                     *enc_out[1:], *past)
        assert len(out) == len(dec_c.outputs)
        assert (out[0] - ref).abs().max().item() <= 1e-5
        assert out[1].shape == (2, h, 4, hd)


# --------------------------------------------------------------------------- ONNX
@pytest.fixture(scope="module")
def split_graphs(tmp_path_factory):
    """encoder.onnx / decoder.onnx of a 2-decoder-layer tiny model, exported once."""
    cfg = config_from_dict(TWO_LAYER)
    source = NativeSource(cfg.model, build_model(cfg.model)).eval()
    folder = tmp_path_factory.mktemp("split")
    for graph in (ENCODER, DECODER):
        _export_direct(source, graph, cfg, folder / f"{graph}.onnx")
    return cfg, source, folder


def _export_direct(source: NativeSource, graph: str, cfg, path) -> None:
    """torch.onnx.export (dynamo) with every contract axis dynamic; example sizes >= 2 on every
    axis (a size-1 example freezes its axis), past_len (3) != new_len (2)."""
    import onnx
    from torch.export import Dim

    contract = source.contract(graph)
    sizes = {"batch": 2, "src_len": 5, "past_len": 3, "new_len": 2}
    dims = {"batch": Dim("batch", min=1), "src_len": Dim("src_len", min=1, max=32),
            "past_len": Dim("past_len", min=0, max=31), "new_len": Dim("new_len", min=1, max=32)}
    g = torch.Generator().manual_seed(0)
    args = []
    for spec in contract.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in spec.dims]
        if spec.name == "past_mask":
            args.append(torch.ones(shape, dtype=torch.long))
        elif spec.name == "positions":
            args.append(torch.arange(3, 5).expand(shape[0], 2).contiguous())
        elif spec.dtype == "int64":
            args.append(torch.randint(1, 2 if spec.name == "src_mask" else cfg.model.vocab_size,
                                      shape, generator=g))
        else:
            args.append(torch.randn(shape, generator=g))
    ds = tuple({i: dims[d] for i, d in enumerate(s.dims) if isinstance(d, str)}
               for s in contract.inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(source.module(graph).eval(), tuple(args), dynamo=True,
                                 dynamic_shapes=ds, input_names=contract.input_names,
                                 output_names=contract.output_names, opset_version=18,
                                 optimize=True, verbose=False)
    prog.save(str(path))
    model = onnx.load(str(path))
    assert not [n for n in model.graph.node if n.op_type in ("If", "Loop")]


def _ort(path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("past,new", [(0, 1), (0, 2), (0, 3), (0, 4)]
                         + [(p, 1) for p in range(1, 8)])
@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_decoder_step_matches_torch(split_graphs, batch, past, new):
    cfg, source, folder = split_graphs
    enc, dec = _ort(folder / "encoder.onnx"), _ort(folder / "decoder.onnx")
    # the cache geometry is what the graph declares
    decl = {i.name: i.shape for i in dec.get_inputs()}
    heads, head_dim = decl[past_key(0)][1], decl[past_key(0)][3]
    assert isinstance(heads, int) and isinstance(head_dim, int)
    src, mask, tgt, noise = _inputs(cfg, batch, 6, past + new, seed=past * 10 + new)
    feeds = {"src_ids": src.numpy(), "src_mask": mask.numpy(), "noise": noise.numpy()}
    enc_out = dict(zip([o.name for o in enc.get_outputs()], enc.run(None, feeds)))
    model = source.model
    with torch.no_grad():
        ref = model(src, mask, tgt, noise)
        _, cross = model.encode_with_cache(src, mask, noise)
        _, past_kv = model.decode_step(tgt[:, :past], mask, cross, _empty(model, batch))
        step, present = model.decode_step(tgt[:, past:], mask, cross, past_kv)
    dfeeds = {"tgt_ids": tgt[:, past:].numpy(), "src_mask": mask.numpy(),
              "positions": np.tile(np.arange(past, past + new), (batch, 1)),
              "past_mask": np.ones((batch, past), dtype=np.int64)}
    layers = len(model.decoder.layers)
    for i in range(layers):
        dfeeds[cross_key(i)] = enc_out[cross_key(i)]
        dfeeds[cross_value(i)] = enc_out[cross_value(i)]
        dfeeds[past_key(i)] = past_kv[2 * i].numpy()
        dfeeds[past_value(i)] = past_kv[2 * i + 1].numpy()
    out = dict(zip([o.name for o in dec.get_outputs()], dec.run(None, dfeeds)))
    assert np.abs(out["logits"] - step.numpy()).max() <= 1e-4
    assert np.abs(out["logits"] - ref[:, past:].numpy()).max() <= 1e-4
    assert out["present_key.1"].shape == (batch, heads, past + new, head_dim)
    assert np.abs(out["present_value.1"] - present[3].numpy()).max() <= 1e-4
    # cross K/V on real source positions (padded ones are masked anyway)
    with torch.no_grad():
        _, cross_t = model.encode_with_cache(src, mask, noise)
    real = mask.numpy().astype(bool)[:, None, :, None]
    diff = np.abs(enc_out[cross_key(1)] - cross_t[2].numpy())
    assert np.where(real, diff, 0).max() <= 1e-4


def test_contract_cache_dims_are_the_modules():
    """The decoder contract's cache dims equal the module's real heads / head_dim."""
    cfg = config_from_dict(TWO_LAYER)
    source = NativeSource(cfg.model, build_model(cfg.model))
    spec = source.contract(DECODER).inputs[-1]
    attn = source.model.decoder.layers[-1].self_attn
    assert spec.dims[1] == attn.num_heads and spec.dims[3] == attn.head_dim


# --------------------------------------------------------------------------- per-row state
def _ragged_step_logits(step, tgt: torch.Tensor, joins: list[int], empty) -> list[torch.Tensor]:
    """Teacher-forced targets fed one token per step to one running batch in which row r
    starts at step joins[r]: before that its slots are padding (past_mask 0) and its logits
    are thrown away; its positions count its real slots only. ``step(ids, positions,
    past_mask, past) -> (logits, present)``. Returns each row's logits [tgt_len, vocab]."""
    b, lt = tgt.shape
    past, past_mask = empty, torch.zeros(b, 0, dtype=torch.long)
    fed = [0] * b
    rows: list[list[torch.Tensor]] = [[] for _ in range(b)]
    for t in range(max(joins) + lt):
        live = [t >= joins[r] and fed[r] < lt for r in range(b)]
        ids = torch.tensor([[tgt[r, fed[r]] if live[r] else 0] for r in range(b)])
        positions = past_mask.sum(1, keepdim=True)
        logits, past = step(ids, positions, past_mask, past)
        for r in range(b):
            if live[r]:
                rows[r].append(logits[r, -1])
                fed[r] += 1
        past_mask = torch.cat([past_mask, torch.tensor([[int(x)] for x in live])], 1)
    return [torch.stack(r) for r in rows]


@pytest.mark.parametrize("conf", [SMALL, TWO_LAYER], ids=["1-layer", "2-layer"])
def test_rows_at_different_steps_share_a_batch(conf):
    """Rows joining at steps 0, 3, 1 (left and inner padding slots, per-row positions) get the
    logits the full model gives each row alone."""
    cfg = config_from_dict(conf)
    model = build_model(cfg.model)
    src, mask, tgt, noise = _inputs(cfg, 3, 9, 5, seed=4)
    with torch.no_grad():
        ref = model(src, mask, tgt, noise)
        _, cross = model.encode_with_cache(src, mask, noise)
        got = _ragged_step_logits(
            lambda ids, pos, pm, past: model.decode_step(ids, mask, cross, past, pos, pm),
            tgt, [0, 3, 1], _empty(model, 3))
    for r in range(3):
        assert (got[r] - ref[r]).abs().max().item() <= 1e-5


def test_onnx_decoder_rows_at_different_steps(split_graphs):
    """The exported decoder with a padded past and per-row positions (shapes and paddings the
    export never saw) equals the full model per row."""
    cfg, source, folder = split_graphs
    enc, dec = _ort(folder / "encoder.onnx"), _ort(folder / "decoder.onnx")
    src, mask, tgt, noise = _inputs(cfg, 4, 7, 4, seed=8)
    enc_out = dict(zip([o.name for o in enc.get_outputs()],
                       enc.run(None, {"src_ids": src.numpy(), "src_mask": mask.numpy(),
                                      "noise": noise.numpy()})))
    names = [o.name for o in dec.get_outputs()]
    layers = len(source.model.decoder.layers)

    def step(ids, pos, pm, past):
        feeds = {"tgt_ids": ids.numpy(), "src_mask": mask.numpy(), "positions": pos.numpy(),
                 "past_mask": pm.numpy()}
        for i in range(layers):
            feeds[cross_key(i)], feeds[cross_value(i)] = enc_out[cross_key(i)], enc_out[cross_value(i)]
            feeds[past_key(i)], feeds[past_value(i)] = past[2 * i].numpy(), past[2 * i + 1].numpy()
        out = dict(zip(names, dec.run(None, feeds)))
        return (torch.from_numpy(out["logits"]),
                [torch.from_numpy(out[f"present_{k}.{i}"]) for i in range(layers)
                 for k in ("key", "value")])

    with torch.no_grad():
        ref = source.model(src, mask, tgt, noise)
    got = _ragged_step_logits(step, tgt, [2, 0, 1, 4], _empty(source.model, 4))
    for r in range(4):
        assert (got[r] - ref[r]).abs().max().item() <= 1e-4


def without_row_state(src, dst) -> None:
    """A copy of a decoder graph whose positions / past_mask inputs carry other names: what a
    build made before per-row decoder state looks like to a runtime (no such inputs)."""
    import onnx

    proto = onnx.load(str(src))
    rename = {"positions": "legacy_positions", "past_mask": "legacy_past_mask"}
    for value in proto.graph.input:
        value.name = rename.get(value.name, value.name)
    for node in proto.graph.node:
        for k, name in enumerate(node.input):
            node.input[k] = rename.get(name, name)
    onnx.save(proto, str(dst))


def test_old_decoder_graph_is_refused_by_every_runtime(split_graphs, tmp_path):
    """ONNX Runtime step backend and the Triton repository writer refuse an old decoder graph
    in one line that says to rebuild."""
    import shutil

    from hmu_export.backends.ort import OrtStepBackend
    from hmu_export.core.errors import ArtifactError
    from hmu_export.deploy.triton.generation import cache_geometry

    _, _, folder = split_graphs
    shutil.copy(folder / "encoder.onnx", tmp_path / "encoder.onnx")
    without_row_state(folder / "decoder.onnx", tmp_path / "decoder.onnx")
    for call in (lambda: OrtStepBackend(tmp_path / "encoder.onnx", tmp_path / "decoder.onnx"),
                 lambda: cache_geometry(tmp_path / "encoder.onnx", tmp_path / "decoder.onnx")):
        with pytest.raises(ArtifactError, match="rebuild it") as info:
            call()
        assert "\n" not in str(info.value) and "positions / past_mask" in str(info.value)


def test_old_decoder_graph_is_refused(tmp_path):
    """A decoder graph without positions / past_mask (a build made before per-row state) is
    refused in one line that says to rebuild."""
    from hmu_export.core.errors import ArtifactError
    from hmu_export.generate.stepper import cache_spec_from_dims

    dims = {"tgt_ids": ("batch", "new_len"), "src_mask": ("batch", "src_len"),
            "past_key.0": ("batch", 2, "past_len", 4), "past_value.0": ("batch", 2, "past_len", 4)}
    with pytest.raises(ArtifactError, match="rebuild") as info:
        cache_spec_from_dims(dims, {"noise": ("batch", "src_len", 8)})
    assert "\n" not in str(info.value)
