"""HMUTransformer: embeddings -> Transformer encoder -> HMU -> causal decoder -> LM head.

Read top to bottom. ``forward`` takes the I/O contract's tensors in contract order, so the
exporter can trace it directly.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..core.config import ModelConfig
from .hmu import HMU, IdentityHMU


class HMUTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.src_embed = nn.Embedding(cfg.vocab_size, d)
        self.tgt_embed = nn.Embedding(cfg.vocab_size, d)
        self.pos_embed = nn.Embedding(cfg.max_len, d)
        enc_layer = nn.TransformerEncoderLayer(d, cfg.heads, cfg.d_ff, cfg.dropout,
                                               batch_first=True)
        # No nested tensors: the fast path zeroes padded positions, which the graph does not.
        self.encoder = nn.TransformerEncoder(enc_layer, cfg.n_encoder_layers,
                                             enable_nested_tensor=False)
        self.hmu: nn.Module = HMU(d, cfg.latent_dim) if cfg.use_hmu else IdentityHMU()
        dec_layer = nn.TransformerDecoderLayer(d, cfg.heads, cfg.d_ff, cfg.dropout,
                                               batch_first=True)
        self.decoder = nn.TransformerDecoder(dec_layer, cfg.n_decoder_layers)
        self.lm_head = nn.Linear(d, cfg.vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Seeded, layer-distinct weights (the Transformer modules clone one layer otherwise)."""
        gen = torch.Generator().manual_seed(self.cfg.seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() >= 2:
                    std = self.cfg.init_scale / math.sqrt(p.shape[-1])
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
                elif name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02 * self.cfg.init_scale)
                else:  # LayerNorm weights
                    p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.02)

    def _embed(self, table: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return table(ids) * math.sqrt(self.cfg.d_model) + self.pos_embed(pos)

    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(self._embed(self.src_embed, src_ids),
                            src_key_padding_mask=src_mask == 0)

    def decode(self, memory: torch.Tensor, src_mask: torch.Tensor, tgt_ids: torch.Tensor
               ) -> torch.Tensor:
        lt = tgt_ids.shape[1]
        causal = torch.triu(torch.full((lt, lt), float("-inf"), device=tgt_ids.device),
                            diagonal=1)
        h = self.decoder(self._embed(self.tgt_embed, tgt_ids), memory, tgt_mask=causal,
                         tgt_is_causal=True, memory_key_padding_mask=src_mask == 0)
        return self.lm_head(h)

    def forward_all(self, src_ids: torch.Tensor, src_mask: torch.Tensor, tgt_ids: torch.Tensor,
                    noise: torch.Tensor | None, *, mean: bool = False) -> dict[str, torch.Tensor]:
        """Logits plus the diagnostic tensors named in the I/O contract.
        ``mean=True`` takes the VAE's mean path (z = mu) without any noise tensor."""
        v = self.encode(src_ids, src_mask)
        if isinstance(self.hmu, HMU):
            tr = self.hmu.trace(v, noise, mean=mean)
            memory, gate = tr.out, tr.gate
        else:
            memory, gate = self.hmu(v, noise), torch.ones_like(v)
        logits = self.decode(memory, src_mask, tgt_ids)
        return {"logits": logits, "encoder_out": v, "hmu_gate": gate, "hmu_out": memory}

    def forward(self, src_ids: torch.Tensor, src_mask: torch.Tensor, tgt_ids: torch.Tensor,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        memory = self.hmu(self.encode(src_ids, src_mask), noise)
        return self.decode(memory, src_mask, tgt_ids)

    # ------------------------------------------------------------------ cached generation
    # The same parameters as ``decode`` (state_dict unchanged), computed step by step with an
    # attention cache. Plain matmul / softmax ops, no data-dependent control flow: one exported
    # graph serves the first call (past_len 0) and every later step, with no If node.

    def encode_with_cache(self, src_ids: torch.Tensor, src_mask: torch.Tensor,
                          noise: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(memory, [cross_key.0, cross_value.0, cross_key.1, ...]), K/V [B, H, Ls, head_dim]:
        every decoder layer's cross-attention keys and values, computed once per request."""
        memory = self.hmu(self.encode(src_ids, src_mask), noise)
        cross: list[torch.Tensor] = []
        for layer in self.decoder.layers:
            mha = layer.multihead_attn
            d = mha.embed_dim
            w, b = mha.in_proj_weight, mha.in_proj_bias
            cross.append(_heads(F.linear(memory, w[d:2 * d], b[d:2 * d]), mha.num_heads))
            cross.append(_heads(F.linear(memory, w[2 * d:], b[2 * d:]), mha.num_heads))
        return memory, cross

    def decode_step(self, tgt_ids: torch.Tensor, src_mask: torch.Tensor,
                    cross_kv: list[torch.Tensor], past_kv: list[torch.Tensor],
                    positions: torch.Tensor | None = None, past_mask: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits of ``tgt_ids`` [B, new] placed after the cached slots, and the grown cache
        [past_key.0, past_value.0, ...] -> [present_key.0, present_value.0, ...].

        ``cross_kv`` / ``past_kv`` alternate key, value per decoder layer. Per-row state (the
        decoder contract): ``positions`` [B, new] are the new tokens' absolute positions and
        ``past_mask`` [B, past] marks the cache slots that hold a token of the row (0 = a
        padding slot, never attended to); None = every row holds past = past_key.shape[2]
        tokens. Attention is causal within the new tokens; padded source positions are masked
        in cross attention. Post-norm layer order as ``nn.TransformerDecoderLayer``:
        norm1(x+sa), norm2(x+ca), norm3(x+ff)."""
        batch, new = tgt_ids.shape
        past = past_kv[0].shape[2]
        if positions is None:
            positions = (torch.arange(new, device=tgt_ids.device) + past).expand(batch, new)
        if past_mask is None:
            past_mask = torch.ones((batch, past), dtype=torch.long, device=tgt_ids.device)
        x = self.tgt_embed(tgt_ids) * math.sqrt(self.cfg.d_model) + self.pos_embed(positions)
        neg_inf = torch.tensor(float("-inf"), dtype=x.dtype, device=x.device)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        # [B, 1, new, past+new]: a real past slot is visible to every new token; new key j is
        # visible to new query i iff j <= i
        idx = torch.arange(new, device=tgt_ids.device)
        causal = torch.where(idx[None, :] > idx[:, None], neg_inf, zero)
        slots = torch.where(past_mask == 0, neg_inf, zero)[:, None, None, :]
        self_bias = torch.cat([slots.expand(batch, 1, new, past),
                               causal[None, None].expand(batch, 1, new, new)], dim=-1)
        # [B, 1, 1, Ls]: padded source positions are never attended to
        pad = torch.where((src_mask == 0)[:, None, None, :], neg_inf, zero)
        present: list[torch.Tensor] = []
        for i, layer in enumerate(self.decoder.layers):
            sa, ca = layer.self_attn, layer.multihead_attn
            q, k, v = F.linear(x, sa.in_proj_weight, sa.in_proj_bias).chunk(3, dim=-1)
            k = torch.cat([past_kv[2 * i], _heads(k, sa.num_heads)], dim=2)
            v = torch.cat([past_kv[2 * i + 1], _heads(v, sa.num_heads)], dim=2)
            present += [k, v]
            h = _attend(_heads(q, sa.num_heads), k, v, self_bias)
            x = layer.norm1(x + sa.out_proj(h))
            d = ca.embed_dim
            q = F.linear(x, ca.in_proj_weight[:d], ca.in_proj_bias[:d])
            h = _attend(_heads(q, ca.num_heads), cross_kv[2 * i], cross_kv[2 * i + 1], pad)
            x = layer.norm2(x + ca.out_proj(h))
            x = layer.norm3(x + layer.linear2(layer.activation(layer.linear1(x))))
        return self.lm_head(x), present

    def hmu_parameter_share(self) -> tuple[int, int]:
        """(HMU parameters, all parameters)."""
        total = sum(p.numel() for p in self.parameters())
        return sum(p.numel() for p in self.hmu.parameters()), total

    def freeze_all_but_hmu(self) -> None:
        """The paper's fine-tuning recipe: only the HMU (and its VAE) learns."""
        for name, p in self.named_parameters():
            p.requires_grad = name.startswith("hmu.")


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H*hd] -> [B, H, L, hd]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
            ) -> torch.Tensor:
    """Scaled dot-product attention with an additive mask (0 / -inf), as nn.MultiheadAttention
    computes it; [B, H, Lq, hd] -> [B, Lq, H*hd]."""
    scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-2, -1)) + bias
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out.transpose(1, 2).flatten(2)


class DiagnosticsWrapper(nn.Module):
    """Exports the contract's diagnostic outputs alongside the logits."""

    def __init__(self, model: HMUTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, src_ids, src_mask, tgt_ids, noise):  # type: ignore[no-untyped-def]
        out = self.model.forward_all(src_ids, src_mask, tgt_ids, noise)
        return out["logits"], out["encoder_out"], out["hmu_gate"], out["hmu_out"]
