"""Test oracle: the paper author's reference code (GitHub Sauvageduck24/HMU, MIT licence,
``src/models/htransformer.py`` and the classifiers of ``run_experiments.py`` at commit 96e0247),
transcribed as literally as possible. The only change: ``torch.randn_like`` in the VAE is replaced
by an ``eps`` tensor passed down from ``forward``, so a test can feed the exported graph and
this oracle the same noise. Dropout modules are kept (they are identities in eval mode).

Written independently of ``hmu_export.model.reference`` (the code under test): do not import it.

``save_reference_pt`` writes a ``.pt`` exactly as ``run_experiments.py`` does
(``torch.save(model.state_dict(), path)``); ``make_reference_model`` moves every LayerNorm's
weight and bias away from 1 / 0 first, so that a missing or misplaced norm cannot hide.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class PositionalEncoding(nn.Module):
    def __init__(self, d_model: int, max_len: int = 10000):
        super().__init__()
        pe = torch.zeros(max_len, d_model)
        position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2).float()
                             * (-torch.log(torch.tensor(10000.0)) / d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        pe = pe.unsqueeze(0)
        self.register_buffer('pe', pe)

    def forward(self, x):
        if x.dim() == 2:
            x = x.unsqueeze(0)
        if x.size(1) <= self.pe.size(1):
            x = x + self.pe[:, :x.size(1), :]
        else:
            raise ValueError("sequence longer than the positional encoding")
        return x


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model, nhead, dropout=0.1):
        super().__init__()
        assert d_model % nhead == 0
        self.d_model = d_model
        self.nhead = nhead
        self.d_k = d_model // nhead
        self.q_linear = nn.Linear(d_model, d_model)
        self.k_linear = nn.Linear(d_model, d_model)
        self.v_linear = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query, key, value, mask=None):
        B, Lq, _ = query.size()
        _, Lk, _ = key.size()
        Q = self.q_linear(query).view(B, Lq, self.nhead, self.d_k).transpose(1, 2)
        K = self.k_linear(key).view(B, Lk, self.nhead, self.d_k).transpose(1, 2)
        V = self.v_linear(value).view(B, Lk, self.nhead, self.d_k).transpose(1, 2)
        scores = torch.matmul(Q, K.transpose(-2, -1)) / (self.d_k ** 0.5)
        if mask is not None:
            scores = scores.masked_fill(mask == 0, float('-inf'))
        attn = F.softmax(scores, dim=-1)
        attn = self.dropout(attn)
        context = torch.matmul(attn, V)
        context = context.transpose(1, 2).contiguous().view(B, Lq, self.d_model)
        return self.out_proj(context)


class FeedForward(nn.Module):
    def __init__(self, d_model, dim_feedforward, dropout=0.1, activation="relu"):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = F.relu if activation == "relu" else F.gelu

    def forward(self, x):
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class EncoderLayer(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward, dropout=0.1, activation="relu"):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, nhead, dropout)
        self.ff = FeedForward(d_model, dim_feedforward, dropout, activation)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src, src_mask=None):
        src2 = self.self_attn(src, src, src, src_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.ff(src)
        src = self.norm2(src + self.dropout2(src2))
        return src


class DecoderLayer(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward, dropout=0.1, activation="relu"):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, nhead, dropout)
        self.cross_attn = MultiHeadAttention(d_model, nhead, dropout)
        self.ff = FeedForward(d_model, dim_feedforward, dropout, activation)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None):
        tgt2 = self.self_attn(tgt, tgt, tgt, tgt_mask)
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.cross_attn(tgt, memory, memory, memory_mask)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.ff(tgt)
        tgt = self.norm3(tgt + self.dropout3(tgt2))
        return tgt


class Encoder(nn.Module):
    def __init__(self, d_model, nhead, num_layers, dim_feedforward, dropout=0.1, activation="relu"):
        super().__init__()
        self.layers = nn.ModuleList([
            EncoderLayer(d_model, nhead, dim_feedforward, dropout, activation)
            for _ in range(num_layers)
        ])
        self.norm = nn.LayerNorm(d_model)

    def forward(self, src, src_mask=None):
        if src.dim() == 2:
            src = src.unsqueeze(0)
        for layer in self.layers:
            src = layer(src, src_mask)
        return self.norm(src)


class Decoder(nn.Module):
    def __init__(self, d_model, nhead, num_layers, dim_feedforward, dropout=0.1, activation="relu"):
        super().__init__()
        self.layers = nn.ModuleList([
            DecoderLayer(d_model, nhead, dim_feedforward, dropout, activation)
            for _ in range(num_layers)
        ])
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None):
        if tgt.dim() == 2:
            tgt = tgt.unsqueeze(0)
        if memory.dim() == 2:
            memory = memory.unsqueeze(0)
        for layer in self.layers:
            tgt = layer(tgt, memory, tgt_mask, memory_mask)
        return self.norm(tgt)


class VAE(nn.Module):
    def __init__(self, d_model: int, latent_dim: int):
        super().__init__()
        self.fc_mu = nn.Linear(d_model, latent_dim)
        self.fc_logvar = nn.Linear(d_model, latent_dim)
        self.fc_dec = nn.Linear(latent_dim, d_model)

    def reparameterize(self, mu, logvar, eps):
        std = torch.exp(0.5 * logvar)
        # reference: eps = torch.randn_like(std)
        return mu + eps * std

    def forward(self, x, eps):
        mu = self.fc_mu(x)
        logvar = self.fc_logvar(x)
        z = self.reparameterize(mu, logvar, eps)
        return self.fc_dec(z)


class HMU(nn.Module):
    def __init__(self, d_model: int, latent_dim: int):
        super().__init__()
        self.vae = VAE(d_model, latent_dim)
        self.norm = nn.LayerNorm(d_model * 2)
        self.norm_output = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model + d_model, d_model * 2),
            nn.GELU(),
            nn.Linear(d_model * 2, d_model)
        )

    def forward(self, v, eps):
        v_auto = self.vae(v, eps)
        fused = torch.cat([v, v_auto], dim=-1)
        fused = self.norm(fused)
        fused = self.mlp(fused)
        fused = fused + v
        fused = self.norm_output(fused)
        return fused


class HMU_mod(nn.Module):
    def __init__(self, d_model: int, latent_dim: int):
        super().__init__()
        self.norm_input = nn.LayerNorm(d_model)
        self.norm_latent = nn.LayerNorm(d_model)
        self.gate_mlp = nn.Sequential(
            nn.Linear(d_model * 2, d_model),
            nn.Sigmoid()
        )
        self.fusion_proj = nn.Sequential(
            nn.Linear(d_model, d_model),
            nn.GELU(),
            nn.LayerNorm(d_model)
        )
        self.vae = VAE(d_model, latent_dim)

    def forward(self, v, eps):
        v_latent = self.vae(v, eps)
        v_norm = self.norm_input(v)
        v_latent_norm = self.norm_latent(v_latent)
        gate_input = torch.cat([v_norm, v_latent_norm], dim=-1)
        gate = self.gate_mlp(gate_input)
        fused = gate * v_norm + (1 - gate) * v_latent_norm
        output = self.fusion_proj(fused)
        return output


class HMUTransformer(nn.Module):
    """``hmu_cls``: HMU (the reference's choice) or HMU_mod (a user who swapped it in)."""

    def __init__(self, vocab_size=32000, d_model=512, nhead=8, num_encoder_layers=6,
                 num_decoder_layers=6, dim_feedforward=2048, dropout=0.1, activation="relu",
                 latent_dim=256, max_len=4096, hmu_cls=HMU):
        super().__init__()
        self.d_model = d_model
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.pos_encoder = PositionalEncoding(d_model, max_len)
        self.encoder_layer = Encoder(d_model, nhead, num_encoder_layers, dim_feedforward, dropout,
                                     activation)
        self.hmu = hmu_cls(d_model, latent_dim)
        self.decoder = Decoder(d_model, nhead, num_decoder_layers, dim_feedforward, dropout,
                               activation)
        self.pos_decoder = PositionalEncoding(d_model, max_len)
        self.output_proj = nn.Linear(d_model, vocab_size)

    def forward(self, src, tgt, eps):
        src = self._ensure_batch_first(src)
        tgt = self._ensure_batch_first(tgt)
        src_embed = self._maybe_embed(src)
        tgt_embed = self._maybe_embed(tgt)
        src_embed = self.pos_encoder(src_embed)
        tgt_embed = self.pos_decoder(tgt_embed)
        memory = self.encoder_layer(src_embed)
        memory = self.hmu(memory, eps)
        dec_out = self.decoder(tgt_embed, memory)
        return self.output_proj(dec_out)

    def encode(self, src, eps):
        if src.dim() == 1:
            src = src.unsqueeze(0)
        if not torch.is_floating_point(src):
            src_embed = self.embedding(src)
            src_embed = self.pos_encoder(src_embed)
        else:
            src_embed = src
        v = self.encoder_layer(src_embed)
        v = self.hmu(v, eps)
        return v

    def _ensure_batch_first(self, x):
        return x.unsqueeze(0) if x.dim() == 1 else x

    def _maybe_embed(self, x):
        return self.embedding(x) if x.dtype == torch.long else x


class HMUTransformerAfterDecoder(HMUTransformer):
    """Same modules and keys; the HMU acts on the decoder output (eps: [B, tgt_len, latent]).
    ``encode`` is inherited: the reference's also applies the HMU after the encoder."""

    def forward(self, src, tgt, eps):
        src = self._ensure_batch_first(src)
        tgt = self._ensure_batch_first(tgt)
        src_embed = self._maybe_embed(src)
        tgt_embed = self._maybe_embed(tgt)
        src_embed = self.pos_encoder(src_embed)
        tgt_embed = self.pos_decoder(tgt_embed)
        memory = self.encoder_layer(src_embed)
        dec_out = self.decoder(tgt_embed, memory)
        dec_out = self.hmu(dec_out, eps)
        return self.output_proj(dec_out)


class GLUEClassifier(nn.Module):
    """run_experiments.py's GLUEClassifier (AGNewsClassifier is the same with 4 classes)."""

    def __init__(self, encoder, d_model, num_classes=2):
        super().__init__()
        self.encoder = encoder
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.classifier = nn.Linear(d_model, num_classes)

    def forward(self, src, eps):
        x = self.encoder.encode(src, eps)
        x = x.transpose(1, 2)
        x = self.pool(x).squeeze(-1)
        return self.classifier(x)


# ------------------------------------------------------------------------------ test helpers
def make_reference_model(*, classifier: bool = False, gated: bool = False,
                         after_decoder: bool = False, vocab_size: int = 50, d_model: int = 64,
                         nhead: int = 2, layers: tuple[int, int] = (2, 1), d_ff: int = 128,
                         latent_dim: int = 32, max_len: int = 96, num_classes: int = 3,
                         seed: int = 0) -> nn.Module:
    """A reference model built as run_experiments.py's create_model builds one (any sizes),
    seeded, with LayerNorm affine parameters moved away from 1 / 0 and larger Linear weights
    (so logits are far from ties and a missing op shows)."""
    torch.manual_seed(seed)
    cls = HMUTransformerAfterDecoder if after_decoder else HMUTransformer
    model = cls(vocab_size=vocab_size, d_model=d_model, nhead=nhead,
                num_encoder_layers=layers[0], num_decoder_layers=layers[1],
                dim_feedforward=d_ff, latent_dim=latent_dim, dropout=0.1, max_len=max_len,
                hmu_cls=HMU_mod if gated else HMU)
    if classifier:
        model = GLUEClassifier(model, d_model=d_model, num_classes=num_classes)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.copy_(1.0 + 0.5 * torch.randn_like(mod.weight))
                mod.bias.copy_(0.3 * torch.randn_like(mod.bias))
            elif isinstance(mod, nn.Linear):
                mod.weight.mul_(2.0)
                mod.bias.copy_(0.1 * torch.randn_like(mod.bias))
    return model.eval()


def save_reference_pt(model: nn.Module, path: Path) -> Path:
    """Exactly run_experiments.py's ``torch.save(current_model.state_dict(), path)``."""
    torch.save(model.state_dict(), str(path))
    return Path(path)


@torch.no_grad()
def oracle_forward(model: nn.Module, src_ids, eps, tgt_ids=None) -> torch.Tensor:
    """Output of the reference forward (numpy or torch inputs), given the VAE's eps."""
    src, e = torch.as_tensor(src_ids), torch.as_tensor(eps)
    if isinstance(model, GLUEClassifier):
        return model(src, e)
    return model(src, torch.as_tensor(tgt_ids), e)
