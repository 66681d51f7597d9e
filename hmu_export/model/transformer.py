"""HMUTransformer: embeddings -> Transformer encoder -> HMU -> causal decoder -> LM head.

Read top to bottom. ``forward`` takes the I/O contract's tensors in contract order, so the
exporter can trace it directly.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
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

    def hmu_parameter_share(self) -> tuple[int, int]:
        """(HMU parameters, all parameters)."""
        total = sum(p.numel() for p in self.parameters())
        return sum(p.numel() for p in self.hmu.parameters()), total

    def freeze_all_but_hmu(self) -> None:
        """The paper's fine-tuning recipe: only the HMU (and its VAE) learns."""
        for name, p in self.named_parameters():
            p.requires_grad = name.startswith("hmu.")


class DiagnosticsWrapper(nn.Module):
    """Exports the contract's diagnostic outputs alongside the logits."""

    def __init__(self, model: HMUTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, src_ids, src_mask, tgt_ids, noise):  # type: ignore[no-untyped-def]
        out = self.model.forward_all(src_ids, src_mask, tgt_ids, noise)
        return out["logits"], out["encoder_out"], out["hmu_gate"], out["hmu_out"]
