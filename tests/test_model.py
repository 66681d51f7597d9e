from pathlib import Path

import numpy as np
import pytest
import torch

from hmu_export.core.config import ModelConfig
from hmu_export.core.errors import CheckpointError
from hmu_export.model import HMU, HMUTransformer, build_model, load_checkpoint, save_checkpoint
from hmu_export.model.weights import load_weights

CFG = ModelConfig(vocab_size=37, d_model=16, n_heads=2, n_encoder_layers=1, n_decoder_layers=1,
                  d_ff=32, latent_dim=8, max_len=20, seed=1)


def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _np(t):
    return t.detach().double().numpy()


def numpy_hmu(h: HMU, v: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """The paper's equations (1)-(6), written independently in float64 numpy."""
    lin = lambda m, x: x @ _np(m.weight).T + _np(m.bias)  # noqa: E731
    mu, logvar = lin(h.vae.mu, v), lin(h.vae.logvar, v)
    z = mu + np.exp(0.5 * logvar) * eps
    v_lat = lin(h.vae.decoder, z)
    vn = _ln(v, _np(h.norm_input.weight), _np(h.norm_input.bias))
    ln = _ln(v_lat, _np(h.norm_latent.weight), _np(h.norm_latent.bias))
    g = 1 / (1 + np.exp(-lin(h.gate_mlp[0], np.concatenate([vn, ln], -1))))
    fused = g * vn + (1 - g) * ln
    pre = lin(h.fusion_proj[0], fused)
    from math import erf
    gelu = pre * 0.5 * (1 + np.vectorize(erf)(pre / np.sqrt(2)))
    return _ln(gelu, _np(h.fusion_proj[2].weight), _np(h.fusion_proj[2].bias))


def test_hmu_matches_hand_written_reference():
    torch.manual_seed(0)
    h = HMU(16, 8).eval()
    with torch.no_grad():
        for p in h.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # move LayerNorm weights off 1/0
    v = torch.randn(2, 5, 16) * 3
    eps = torch.randn(2, 5, 8)
    got = h(v, eps)
    want = numpy_hmu(h, _np(v), _np(eps))
    assert got.shape == (2, 5, 16)
    np.testing.assert_allclose(_np(got), want, atol=2e-5)


def test_noise_semantics():
    torch.manual_seed(0)
    h = HMU(16, 8).eval()
    v = torch.randn(2, 5, 16)
    zeros = torch.zeros(2, 5, 8)
    # zeros = mean path (z = mu), computed without any noise tensor
    torch.testing.assert_close(h(v, zeros), h.trace(v, mean=True).out)
    # a given tensor is used as given: same noise, same output; other noise, other output
    eps = torch.randn(2, 5, 8)
    torch.testing.assert_close(h(v, eps), h(v, eps.clone()))
    assert (h(v, eps) - h(v, zeros)).abs().max() > 1e-3
    # None samples: two calls differ
    assert (h(v, None) - h(v, None)).abs().max() > 1e-4


def test_transformer_shapes_and_identity_variant():
    m = HMUTransformer(CFG).eval()
    src = torch.randint(1, 37, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    tgt = torch.randint(1, 37, (3, 4))
    noise = torch.zeros(3, 7, 8)
    assert m(src, mask, tgt, noise).shape == (3, 4, 37)
    with torch.no_grad():
        out = m.forward_all(src, mask, tgt, noise)
    assert out["hmu_gate"].shape == (3, 7, 16)
    assert float(out["hmu_gate"].min()) >= 0 and float(out["hmu_gate"].max()) <= 1
    base = HMUTransformer(ModelConfig(**{**CFG.__dict__, "use_hmu": False})).eval()
    hmu, total = m.hmu_parameter_share()
    assert hmu == sum(p.numel() for p in m.hmu.parameters()) > 0
    assert total - hmu == sum(p.numel() for p in base.parameters())
    # without the HMU the decoder memory is the encoder output itself
    bout = base.forward_all(src, mask, tgt, noise)
    torch.testing.assert_close(bout["hmu_out"], bout["encoder_out"])


def test_hmu_parameter_count_matches_formula():
    d, lat = CFG.d_model, CFG.latent_dim
    want = 2 * (d * lat + lat) + (lat * d + d) + 2 * 2 * d + (2 * d * d + d) + (d * d + d) + 2 * d
    assert HMUTransformer(CFG).hmu_parameter_share()[0] == want


def test_layers_are_distinct_and_seeded():
    a, b = HMUTransformer(CFG), HMUTransformer(CFG)
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka
    cfg2 = ModelConfig(**{**CFG.__dict__, "n_encoder_layers": 2})
    m = HMUTransformer(cfg2)
    w0 = m.encoder.layers[0].linear1.weight
    w1 = m.encoder.layers[1].linear1.weight
    assert not torch.equal(w0, w1)


def test_padding_does_not_change_real_positions_in_torch():
    m = HMUTransformer(CFG).eval()
    src = torch.randint(1, 37, (1, 5))
    tgt = torch.randint(1, 37, (1, 3))
    noise = torch.randn(1, 5, 8)
    solo = m(src, torch.ones(1, 5, dtype=torch.long), tgt, noise)
    src_p = torch.cat([src, torch.randint(1, 37, (1, 4))], 1)
    mask_p = torch.tensor([[1] * 5 + [0] * 4])
    noise_p = torch.cat([noise, torch.randn(1, 4, 8) * 10], 1)
    torch.testing.assert_close(m(src_p, mask_p, tgt, noise_p), solo, atol=1e-5, rtol=0)


def test_freeze_all_but_hmu():
    m = HMUTransformer(CFG)
    m.freeze_all_but_hmu()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("hmu.") for n in trainable)


def test_checkpoint_roundtrip(tmp_path):
    m = HMUTransformer(CFG)
    with torch.no_grad():
        m.lm_head.bias.add_(1.0)
    save_checkpoint(m, tmp_path)
    back = load_checkpoint(tmp_path)
    assert back.cfg == CFG
    for k, v in m.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_corrupt_checkpoint(tmp_path):
    save_checkpoint(HMUTransformer(CFG), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        load_checkpoint(tmp_path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        build_model(ModelConfig(**{**CFG.__dict__, "checkpoint": str(tmp_path / "x.safetensors")}))


def test_mismatched_checkpoint(tmp_path):
    save_checkpoint(HMUTransformer(CFG), tmp_path)
    other = ModelConfig(**{**CFG.__dict__, "d_model": 32, "latent_dim": 16})
    with pytest.raises(CheckpointError, match="does not match the config"):
        load_weights(HMUTransformer(other), tmp_path / "model.safetensors")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_unsafe_pickle_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"w": _Evil()}, path)
    with pytest.raises(CheckpointError, match="not a weights-only file"):
        load_weights(HMUTransformer(CFG), path)
    assert "pwned" not in capsys.readouterr().out


def test_weights_only_pt_is_accepted(tmp_path):
    m = HMUTransformer(CFG)
    path = tmp_path / "w.pt"
    torch.save(m.state_dict(), path)
    other = HMUTransformer(ModelConfig(**{**CFG.__dict__, "seed": 99}))
    load_weights(other, path)
    assert torch.equal(other.lm_head.weight, m.lm_head.weight)


def _saved_state(tmp_path, edit) -> "Path":
    from safetensors.torch import load_file, save_file
    save_checkpoint(HMUTransformer(CFG), tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))
    return path


def test_every_wrong_key_is_named_in_one_line(tmp_path):
    """Issue 19: missing, unexpected and wrongly shaped keys are all named, not the first."""
    def edit(s):
        s.pop("hmu.vae.mu.bias")
        s.pop("lm_head.weight")
        s["spare.weight"] = torch.zeros(3)
        s["hmu.vae.mu.weight"] = torch.zeros(9, 16)
    path = _saved_state(tmp_path, edit)
    with pytest.raises(CheckpointError) as info:
        load_weights(HMUTransformer(CFG), path)
    msg = str(info.value)
    assert "\n" not in msg
    assert "missing 2" in msg and "'hmu.vae.mu.bias'" in msg and "'lm_head.weight'" in msg
    assert "1 unexpected: 'spare.weight'" in msg
    assert "'hmu.vae.mu.weight' is [9, 16], the model's [8, 16]" in msg


def test_derived_keys_leave_only_the_named_weights_to_the_model(tmp_path):
    path = _saved_state(tmp_path, lambda s: s.pop("hmu.vae.mu.bias"))
    with pytest.raises(CheckpointError, match="derived_keys"):
        build_model(ModelConfig(**{**CFG.__dict__, "checkpoint": str(path)}))
    model = build_model(ModelConfig(**{**CFG.__dict__, "checkpoint": str(path),
                                       "derived_keys": ("hmu.vae.mu.*",)}))
    seeded = HMUTransformer(CFG)  # the key left out keeps the model's own (seeded) value
    assert torch.equal(model.hmu.vae.mu.bias, seeded.hmu.vae.mu.bias)
    with pytest.raises(CheckpointError, match="unexpected"):  # never excuses an extra key
        load_weights(HMUTransformer(CFG), _saved_state(
            tmp_path, lambda s: s.update({"x.weight": torch.zeros(1)})), derived=("x.*",))
