"""The project's own HMUTransformer as a model source."""
from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from ..io_contract import FULL, CacheLayout
from .interface import ModelSource
from .transformer import DiagnosticsWrapper, HMUTransformer


class _Full(nn.Module):
    """Full teacher-forced graph: (src_ids, src_mask, tgt_ids, noise) -> (logits,)."""

    def __init__(self, model: HMUTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, src_ids, src_mask, tgt_ids, noise):  # type: ignore[no-untyped-def]
        return (self.model(src_ids, src_mask, tgt_ids, noise),)


class NativeSource(ModelSource):
    source = "native"

    def __init__(self, cfg: ModelConfig, model: HMUTransformer | None = None) -> None:
        super().__init__(cfg)
        self.model = model if model is not None else HMUTransformer(cfg)

    def torch_module(self) -> nn.Module:
        return self.model

    def cache_layout(self) -> CacheLayout:
        return CacheLayout(self.cfg.n_decoder_layers, self.cfg.heads,
                           self.cfg.d_model // self.cfg.heads)

    def module(self, graph: str, diagnostics: bool = False) -> nn.Module:
        if graph == FULL:
            return DiagnosticsWrapper(self.model) if diagnostics else _Full(self.model)
        raise KeyError(f"native source has no '{graph}' graph yet")
