"""The paper author's reference implementation (GitHub Sauvageduck24/HMU, MIT) as a model source.

A ``state_dict`` saved by the reference's ``run_experiments.py`` (``torch.save(model.state_dict(),
"results/htransformer.pt")``) loads here with ``strict=True``: the modules below keep the
reference's attribute names. What the reference computes, and this module reproduces:

- a hand-written post-norm Transformer: ``q_linear/k_linear/v_linear/out_proj`` attention with
  scores divided by sqrt(d_k), ``ff.linear1 -> ReLU -> ff.linear2``, ``norm1..3`` after each
  residual, and a final LayerNorm ``norm`` closing the encoder and the decoder;
- one shared, unscaled ``embedding`` for source and target, sinusoidal ``pe`` buffers
  ``(1, max_len, d)`` (``pos_encoder``, ``pos_decoder``), an untied ``output_proj``;
- **no masks at all**: a bidirectional encoder, a non-causal decoder (every target position sees
  the whole target), no padding mask. ``src_mask`` is an input here: all ones reproduces the
  reference exactly; zeros hide padded keys from encoder self-attention and cross-attention;
- the HMU: ``HMU`` (the one ``HMUTransformer`` uses: ``LN_out(v + MLP(LN_2d([v; VAE(v)])))``) or
  the gated ``HMU_mod`` (the paper's listing), told apart by their keys; placed after the encoder
  (``HMUTransformer``) or after the decoder (``HMUTransformerAfterDecoder``; same keys, so the
  user states ``hmu_position``). The VAE draws ``randn_like`` on every call, also in eval; here
  that draw is the ``noise`` input (eps);
- classifiers (``GLUEClassifier`` / ``AGNewsClassifier``): ``encoder.encode(src)`` (encoder ->
  HMU, for both transformer classes), mean over **all** positions, then a ``classifier`` Linear.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import ModelConfig
from ..core.errors import CheckpointError, ConfigError
from ..core.io_contract import CLASSIFIER, FULL
from .weights import read_state_dict
from .interface import ModelSource

HMU_PLAIN, HMU_GATED = "HMU", "HMU_mod"
REPO = "Sauvageduck24/HMU"


# ---------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """Which reference model a state dict holds."""

    classifier: bool
    variant: str  # HMU_PLAIN | HMU_GATED

    @property
    def prefix(self) -> str:
        return "encoder." if self.classifier else ""

    def describe(self) -> str:
        hmu = "gated HMU_mod" if self.variant == HMU_GATED else "HMU"
        if self.classifier:
            return f"reference classifier (HMUTransformer under 'encoder.' + 'classifier', {hmu})"
        return f"reference seq2seq HMUTransformer ({hmu})"


LAYOUTS = tuple(Layout(c, v) for c in (False, True) for v in (HMU_PLAIN, HMU_GATED))


@dataclass(frozen=True)
class Dims:
    """Architecture read from the tensors (heads cannot be: the user states them)."""

    vocab_size: int
    d_model: int
    n_encoder_layers: int
    n_decoder_layers: int
    d_ff: int
    latent_dim: int
    max_len: int
    num_classes: int


# ---------------------------------------------------------------------------------- modules
class PositionalEncoding(nn.Module):
    """Sinusoidal positions as a ``pe`` buffer (1, max_len, d), added to batch-first input."""

    def __init__(self, d_model: int, max_len: int) -> None:
        super().__init__()
        position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
        div = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div)
        pe[:, 1::2] = torch.cos(position * div)[:, : d_model // 2]
        self.register_buffer("pe", pe.unsqueeze(0))  # overwritten by the checkpoint's own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[:, : x.shape[1], :]


class MultiHeadAttention(nn.Module):
    """Post-norm block's attention: separate projections with bias, scores / sqrt(d_k)."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads, self.d_k = heads, d_model // heads
        self.q_linear = nn.Linear(d_model, d_model)
        self.k_linear = nn.Linear(d_model, d_model)
        self.v_linear = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_keep: torch.Tensor | None = None) -> torch.Tensor:
        b, lq, d = query.shape
        lk = key.shape[1]
        q = self.q_linear(query).view(b, lq, self.heads, self.d_k).transpose(1, 2)
        k = self.k_linear(key).view(b, lk, self.heads, self.d_k).transpose(1, 2)
        v = self.v_linear(value).view(b, lk, self.heads, self.d_k).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) / (self.d_k ** 0.5)
        if key_keep is not None:  # the reference never masks; all-ones keeps it exact
            scores = scores.masked_fill(~key_keep[:, None, None, :],
                                        torch.finfo(scores.dtype).min)
        context = torch.matmul(F.softmax(scores, dim=-1), v)
        return self.out_proj(context.transpose(1, 2).contiguous().view(b, lq, d))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.relu(self.linear1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, d_ff: int) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, heads)
        self.ff = FeedForward(d_model, d_ff)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x, x, x, keep))
        return self.norm2(x + self.ff(x))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, d_ff: int) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, heads)
        self.cross_attn = MultiHeadAttention(d_model, heads)
        self.ff = FeedForward(d_model, d_ff)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, memory: torch.Tensor,
                memory_keep: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x, x, x))  # no causal mask: as the reference trained
        x = self.norm2(x + self.cross_attn(x, memory, memory, memory_keep))
        return self.norm3(x + self.ff(x))


class Encoder(nn.Module):
    def __init__(self, d_model: int, heads: int, layers: int, d_ff: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d_model, heads, d_ff) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, keep)
        return self.norm(x)


class Decoder(nn.Module):
    def __init__(self, d_model: int, heads: int, layers: int, d_ff: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(d_model, heads, d_ff) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, memory: torch.Tensor,
                memory_keep: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, memory, memory_keep)
        return self.norm(x)


class VAE(nn.Module):
    """Token-level VAE; ``eps`` is the reference's ``randn_like`` draw, given as an input."""

    def __init__(self, d_model: int, latent_dim: int) -> None:
        super().__init__()
        self.fc_mu = nn.Linear(d_model, latent_dim)
        self.fc_logvar = nn.Linear(d_model, latent_dim)
        self.fc_dec = nn.Linear(latent_dim, d_model)

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.fc_mu(x), self.fc_logvar(x)
        std = torch.exp(0.5 * logvar)
        return self.fc_dec(mu + eps * std)


class HMU(nn.Module):
    """Non-gated HMU (the one ``HMUTransformer`` builds): LN_out(v + MLP(LN([v; VAE(v)])))."""

    def __init__(self, d_model: int, latent_dim: int) -> None:
        super().__init__()
        self.vae = VAE(d_model, latent_dim)
        self.norm = nn.LayerNorm(d_model * 2)
        self.norm_output = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model * 2, d_model * 2), nn.GELU(),
                                 nn.Linear(d_model * 2, d_model))

    def forward(self, v: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        fused = self.mlp(self.norm(torch.cat([v, self.vae(v, eps)], dim=-1)))
        return self.norm_output(fused + v)


class HMUGated(nn.Module):
    """Gated HMU (``HMU_mod``, the paper's listing): g*LN(v) + (1-g)*LN(VAE(v)) -> proj."""

    def __init__(self, d_model: int, latent_dim: int) -> None:
        super().__init__()
        self.norm_input = nn.LayerNorm(d_model)
        self.norm_latent = nn.LayerNorm(d_model)
        self.gate_mlp = nn.Sequential(nn.Linear(d_model * 2, d_model), nn.Sigmoid())
        self.fusion_proj = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(),
                                         nn.LayerNorm(d_model))
        self.vae = VAE(d_model, latent_dim)

    def forward(self, v: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        v_latent = self.vae(v, eps)
        v_norm, v_latent_norm = self.norm_input(v), self.norm_latent(v_latent)
        gate = self.gate_mlp(torch.cat([v_norm, v_latent_norm], dim=-1))
        return self.fusion_proj(gate * v_norm + (1 - gate) * v_latent_norm)


def _keep(src_mask: torch.Tensor) -> torch.Tensor:
    return src_mask != 0


class ReferenceTransformer(nn.Module):
    """``HMUTransformer`` / ``HMUTransformerAfterDecoder`` with the reference's key names.

    ``forward`` is the full graph: (src_ids, src_mask, tgt_ids, noise) -> (logits,)."""

    def __init__(self, cfg: ModelConfig, variant: str) -> None:
        super().__init__()
        d, heads = cfg.d_model, cfg.heads
        self.after_decoder = cfg.hmu_position == "after_decoder"
        self.embedding = nn.Embedding(cfg.vocab_size, d)
        self.pos_encoder = PositionalEncoding(d, cfg.max_len)
        self.encoder_layer = Encoder(d, heads, cfg.n_encoder_layers, cfg.d_ff)
        self.hmu = (HMUGated if variant == HMU_GATED else HMU)(d, cfg.latent_dim)
        self.decoder = Decoder(d, heads, cfg.n_decoder_layers, cfg.d_ff)
        self.pos_decoder = PositionalEncoding(d, cfg.max_len)
        self.output_proj = nn.Linear(d, cfg.vocab_size)

    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor,
               noise: torch.Tensor) -> torch.Tensor:
        """The reference's ``encode``: encoder -> HMU (what the classifiers pool)."""
        x = self.encoder_layer(self.pos_encoder(self.embedding(src_ids)), _keep(src_mask))
        return self.hmu(x, noise)

    def forward(self, src_ids: torch.Tensor, src_mask: torch.Tensor, tgt_ids: torch.Tensor,
                noise: torch.Tensor) -> tuple[torch.Tensor]:
        keep = _keep(src_mask)
        memory = self.encoder_layer(self.pos_encoder(self.embedding(src_ids)), keep)
        if not self.after_decoder:
            memory = self.hmu(memory, noise)
        out = self.decoder(self.pos_decoder(self.embedding(tgt_ids)), memory, keep)
        if self.after_decoder:
            out = self.hmu(out, noise)
        return (self.output_proj(out),)


def _pool(x: torch.Tensor, src_mask: torch.Tensor, pool: str) -> torch.Tensor:
    if pool == "masked_mean":
        m = src_mask.to(x.dtype).unsqueeze(-1)
        return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
    return x.mean(dim=1)  # the reference: AdaptiveAvgPool1d over every position, padding too


class ReferenceClassifier(nn.Module):
    """``GLUEClassifier`` / ``AGNewsClassifier``: the transformer under ``encoder``."""

    def __init__(self, cfg: ModelConfig, variant: str) -> None:
        super().__init__()
        self.pool = cfg.pool
        self.encoder = ReferenceTransformer(replace(cfg, hmu_position="after_encoder"), variant)
        self.classifier = nn.Linear(cfg.d_model, cfg.num_classes)

    def forward(self, src_ids: torch.Tensor, src_mask: torch.Tensor,
                noise: torch.Tensor) -> tuple[torch.Tensor]:
        x = self.encoder.encode(src_ids, src_mask, noise)
        return (self.classifier(_pool(x, src_mask, self.pool)),)


class _ClassifierGraph(nn.Module):
    """The classifier graph over the same parameters, with the HMU at the top-level scope
    ``hmu`` (so exported node names read ``hmu/...`` as in every other graph)."""

    def __init__(self, model: ReferenceClassifier) -> None:
        super().__init__()
        enc = model.encoder
        self.pool = model.pool
        self.embedding, self.pos_encoder = enc.embedding, enc.pos_encoder
        self.encoder_layer, self.hmu, self.classifier = enc.encoder_layer, enc.hmu, model.classifier

    def forward(self, src_ids: torch.Tensor, src_mask: torch.Tensor,
                noise: torch.Tensor) -> tuple[torch.Tensor]:
        x = self.encoder_layer(self.pos_encoder(self.embedding(src_ids)), _keep(src_mask))
        x = self.hmu(x, noise)
        return (self.classifier(_pool(x, src_mask, self.pool)),)


def build_module(cfg: ModelConfig, layout: Layout) -> nn.Module:
    return (ReferenceClassifier if layout.classifier else ReferenceTransformer)(cfg, layout.variant)


# ---------------------------------------------------------------------------------- source
class ReferenceSource(ModelSource):
    """A model trained with the reference code; graphs ``full`` or ``classifier``."""

    source = "reference"
    hmu_scope = "hmu"

    def __init__(self, cfg: ModelConfig, model: nn.Module, layout: Layout) -> None:
        super().__init__(cfg)
        self.model, self.layout = model, layout

    def torch_module(self) -> nn.Module:
        return self.model

    def generation_refusal(self) -> str:
        if self.layout.classifier:
            return "a classifier checkpoint has no decoder to generate with"
        return ("the reference decoder has no causal mask (each target position attends to the "
                "whole target, as it was trained), so token-by-token generation would not "
                "reproduce it; use the full graph")

    def module(self, graph: str, diagnostics: bool = False) -> nn.Module:
        if diagnostics:
            raise ConfigError("export.diagnostics is not available for model.source = "
                              "\"reference\" (its HMU has no gate output in every variant)")
        if graph == CLASSIFIER and self.layout.classifier:
            return _ClassifierGraph(self.model)
        if graph == FULL and not self.layout.classifier:
            return self.model
        raise KeyError(f"reference source ({self.layout.describe()}) has no '{graph}' graph")


# ---------------------------------------------------------------------------------- reading
_LAYER = re.compile(r"^(encoder_layer|decoder)\.layers\.(\d+)\.")


def _count_layers(state: dict, prefix: str, stack: str) -> int:
    idx = {int(m.group(2)) for k in state if k.startswith(prefix)
           for m in [_LAYER.match(k[len(prefix):])] if m and m.group(1) == stack}
    return max(idx) + 1 if idx else 0


def _guess_layout(state: dict) -> Layout:
    classifier = any(k.startswith(("encoder.embedding.", "encoder.encoder_layer.",
                                   "encoder.hmu.")) for k in state) or "classifier.weight" in state
    prefix = "encoder." if classifier else ""
    gated = any(k.startswith(prefix + "hmu.gate_mlp.") or k.startswith(prefix + "hmu.norm_input.")
                for k in state)
    return Layout(classifier, HMU_GATED if gated else HMU_PLAIN)


def _read_dims(state: dict, layout: Layout) -> Dims | None:
    p = layout.prefix
    try:
        vocab, d = state[p + "embedding.weight"].shape
        return Dims(
            vocab_size=int(vocab), d_model=int(d),
            n_encoder_layers=_count_layers(state, p, "encoder_layer"),
            n_decoder_layers=_count_layers(state, p, "decoder"),
            d_ff=int(state[p + "encoder_layer.layers.0.ff.linear1.weight"].shape[0]),
            latent_dim=int(state[p + "hmu.vae.fc_mu.weight"].shape[0]),
            max_len=int(state[p + "pos_encoder.pe"].shape[1]),
            num_classes=int(state["classifier.weight"].shape[0]) if layout.classifier else 0)
    except (KeyError, ValueError, IndexError):
        return None


def _expected_shapes(layout: Layout, dims: Dims) -> dict[str, tuple[int, ...]]:
    """Every key and shape of the reference model with these dims (what build_module's
    state_dict holds; heads change no shape)."""
    d, f, z, v = dims.d_model, dims.d_ff, dims.latent_dim, dims.vocab_size
    out: dict[str, tuple[int, ...]] = {}

    def linear(name: str, n_in: int, n_out: int) -> None:
        out[name + ".weight"], out[name + ".bias"] = (n_out, n_in), (n_out,)

    def norm(name: str, n: int = d) -> None:
        out[name + ".weight"], out[name + ".bias"] = (n,), (n,)

    def block(name: str, attns: tuple[str, ...], norms: int) -> None:
        for attn in attns:
            for proj in ("q_linear", "k_linear", "v_linear", "out_proj"):
                linear(f"{name}.{attn}.{proj}", d, d)
        linear(f"{name}.ff.linear1", d, f)
        linear(f"{name}.ff.linear2", f, d)
        for k in range(1, norms + 1):
            norm(f"{name}.norm{k}")

    out["embedding.weight"] = (v, d)
    out["pos_encoder.pe"] = out["pos_decoder.pe"] = (1, dims.max_len, d)
    for i in range(dims.n_encoder_layers):
        block(f"encoder_layer.layers.{i}", ("self_attn",), 2)
    norm("encoder_layer.norm")
    for i in range(dims.n_decoder_layers):
        block(f"decoder.layers.{i}", ("self_attn", "cross_attn"), 3)
    norm("decoder.norm")
    linear("hmu.vae.fc_mu", d, z)
    linear("hmu.vae.fc_logvar", d, z)
    linear("hmu.vae.fc_dec", z, d)
    if layout.variant == HMU_GATED:
        norm("hmu.norm_input")
        norm("hmu.norm_latent")
        linear("hmu.gate_mlp.0", 2 * d, d)
        linear("hmu.fusion_proj.0", d, d)
        norm("hmu.fusion_proj.2")
    else:
        norm("hmu.norm", 2 * d)
        norm("hmu.norm_output")
        linear("hmu.mlp.0", 2 * d, 2 * d)
        linear("hmu.mlp.2", 2 * d, d)
    linear("output_proj", d, v)
    if not layout.classifier:
        return out
    out = {"encoder." + k: s for k, s in out.items()}
    linear("classifier", d, dims.num_classes)
    return out


def _sample(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:n])
    return shown + (", ..." if len(keys) > n else "")


def _looks_like(state: dict) -> str:
    keys = set(state)
    if {"src_embed.weight", "tgt_embed.weight"} <= keys:
        return "this project's native model (use model.source = \"native\")"
    tops = sorted({k.split(".")[0] for k in keys})
    if "embedding.weight" in keys and "encoder_layer.norm.weight" in keys and not any(
            k.startswith("hmu.") for k in keys):
        return "the reference's StandardTransformer baseline (no HMU to export)"
    for p in ("", "encoder."):
        if p + "hmu.norm.weight" in keys and p + "hmu.norm_output.weight" not in keys:
            return ("the HMU of the reference's first commit 7e88a89 (no norm_output, no "
                    "residual), which is not supported")
    return f"{len(keys)} tensor(s) under {', '.join(repr(t) for t in tops[:6])}"


def inspect_state(state: dict, path: Path) -> tuple[Layout, Dims]:
    """The layout and dims of a reference state dict, or one line saying why it is none."""
    layout = _guess_layout(state)
    dims = _read_dims(state, layout)
    if dims is not None and dims.n_encoder_layers and dims.n_decoder_layers:
        want = _expected_shapes(layout, dims)
        if set(want) == set(state):
            for key, shape in want.items():
                if tuple(state[key].shape) != shape:
                    raise CheckpointError(
                        f"checkpoint {path} looks like a {layout.describe()} but '{key}' has "
                        f"shape {list(state[key].shape)}, expected {list(shape)} for d_model "
                        f"{dims.d_model}, d_ff {dims.d_ff}, latent {dims.latent_dim}")
                if not state[key].is_floating_point():
                    raise CheckpointError(f"checkpoint {path}: '{key}' has dtype "
                                          f"{state[key].dtype}, expected floating point")
            return layout, dims
    # No layout matches: report the nearest one by key names (dims do not change names).
    best: tuple[int, Layout, list[str], list[str]] | None = None
    for cand in LAYOUTS:
        p = cand.prefix
        n_enc = max(1, _count_layers(state, p, "encoder_layer"))
        n_dec = max(1, _count_layers(state, p, "decoder"))
        names = set(_expected_shapes(cand, Dims(8, 8, n_enc, n_dec, 8, 8, 4, 2)))
        missing, unexpected = sorted(names - set(state)), sorted(set(state) - names)
        score = len(missing) + len(unexpected)
        if best is None or score < best[0]:
            best = (score, cand, missing, unexpected)
    assert best is not None
    _, cand, missing, unexpected = best
    raise CheckpointError(
        f"checkpoint {path} matches no reference layout: it looks like {_looks_like(state)}; "
        f"against the nearest ({cand.describe()}) it misses {len(missing)} key(s) "
        f"({_sample(missing) or 'none'}) and has {len(unexpected)} unexpected "
        f"({_sample(unexpected) or 'none'})")


def _read(cfg: ModelConfig) -> tuple[Path, dict]:
    if not cfg.checkpoint:
        raise ConfigError("model.source = \"reference\" needs model.checkpoint (the .pt that the "
                          "reference's run_experiments.py saved, or a safetensors copy)")
    path = Path(cfg.checkpoint)
    return path, read_state_dict(path)


def resolve_config(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with every architecture field read from the reference checkpoint's tensors."""
    path, state = _read(cfg)
    layout, dims = inspect_state(state, path)
    defaults = ModelConfig()
    out: dict[str, object] = {}
    for f in fields(Dims):
        have, user, default = getattr(dims, f.name), getattr(cfg, f.name), getattr(defaults, f.name)
        if f.name == "max_len" and user != default and 2 <= user <= have:
            out[f.name] = user  # a shorter profile limit than the pe buffer is fine
            continue
        if user != default and user != have:
            raise ConfigError(f"model.{f.name} = {user} contradicts checkpoint {path} "
                              f"({f.name} {have} from its tensors); remove the line")
        out[f.name] = have
    if cfg.n_heads and dims.d_model % cfg.n_heads:
        raise ConfigError(f"model.n_heads ({cfg.n_heads}) must divide d_model ({dims.d_model}, "
                          f"read from checkpoint {path})")
    if not cfg.n_heads and dims.d_model < 32:
        raise ConfigError(f"checkpoint {path} has d_model {dims.d_model} < 32, so the reference "
                          "rule heads = d_model // 32 gives 0: set model.n_heads")
    if not cfg.use_hmu:
        raise ConfigError("model.use_hmu = false is not supported for model.source = "
                          "\"reference\" (its checkpoints always hold an HMU)")
    if layout.classifier:  # encode() applies the HMU after the encoder in both classes
        out["hmu_position"] = "after_encoder"
    if not 0 <= cfg.pad_id < dims.vocab_size:
        raise ConfigError(f"model.pad_id ({cfg.pad_id}) must be below the checkpoint's vocab "
                          f"size {dims.vocab_size}")
    return replace(cfg, **out)


def load_source(cfg: ModelConfig) -> ReferenceSource:
    """The reference model of a resolved config, weights loaded strictly, in eval mode."""
    path, state = _read(cfg)
    layout, dims = inspect_state(state, path)
    if (cfg.d_model, cfg.vocab_size, cfg.latent_dim) != (dims.d_model, dims.vocab_size,
                                                         dims.latent_dim):
        raise CheckpointError(f"checkpoint {path} changed since the config was resolved")
    model = build_module(replace(cfg, max_len=dims.max_len), layout)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not load into the {layout.describe()}: "
                              f"{str(exc).splitlines()[0]}") from None
    return ReferenceSource(cfg, model.eval(), layout)
