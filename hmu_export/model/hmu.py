"""The Hippocampus Memory Unit, as in the paper's reference listing (section 2.2).

Differences from the listing are deliberate and export-driven: the VAE noise is an explicit
argument (a graph must not contain a random op), and submodule names are fixed because the
exporter turns them into stable ONNX node names that later stages pin to FP32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class TokenVAE(nn.Module):
    """Token-level VAE: single Linear heads for mu / logvar and a single Linear decoder."""

    def __init__(self, d_model: int, latent_dim: int) -> None:
        super().__init__()
        self.mu = nn.Linear(d_model, latent_dim)
        self.logvar = nn.Linear(d_model, latent_dim)
        self.decoder = nn.Linear(latent_dim, d_model)

    def forward(self, v: torch.Tensor, noise: torch.Tensor | None = None, *, mean: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (reconstruction, mu, logvar). ``noise=None`` samples (training only);
        ``mean=True`` decodes z = mu directly (the reference for the zero-noise path)."""
        mu = self.mu(v)
        logvar = self.logvar(v)
        if mean:
            return self.decoder(mu), mu, logvar
        std = torch.exp(0.5 * logvar)
        if noise is None:
            noise = torch.randn_like(std)
        z = mu + std * noise
        return self.decoder(z), mu, logvar


@dataclass
class HMUTrace:
    """Intermediate tensors, for diagnostics and per-stage parity."""

    out: torch.Tensor
    gate: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor


class HMU(nn.Module):
    def __init__(self, d_model: int, latent_dim: int) -> None:
        super().__init__()
        self.vae = TokenVAE(d_model, latent_dim)
        self.norm_input = nn.LayerNorm(d_model)
        self.norm_latent = nn.LayerNorm(d_model)
        self.gate_mlp = nn.Sequential(nn.Linear(2 * d_model, d_model), nn.Sigmoid())
        self.fusion_proj = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(),
                                         nn.LayerNorm(d_model))

    def trace(self, v: torch.Tensor, noise: torch.Tensor | None = None, *, mean: bool = False
              ) -> HMUTrace:
        v_latent, mu, logvar = self.vae(v, noise, mean=mean)
        v_norm = self.norm_input(v)
        v_latent_norm = self.norm_latent(v_latent)
        gate = self.gate_mlp(torch.cat([v_norm, v_latent_norm], dim=-1))
        fused = gate * v_norm + (1 - gate) * v_latent_norm
        return HMUTrace(self.fusion_proj(fused), gate, mu, logvar)

    def forward(self, v: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """``noise`` is used as given (zeros = mean path); ``None`` samples N(0, I)."""
        return self.trace(v, noise).out

    @staticmethod
    def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """Per-token KL(q(z|v) || N(0, I)), the VAE term for fine-tuning the HMU alone."""
        return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)


class IdentityHMU(nn.Module):
    """Stands where the HMU stands, so the same graph can be built without it (overhead baseline)."""

    def forward(self, v: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return v
