"""Registry of model sources: ``[model] source = ...`` -> a ModelSource.

``resolve`` fills the architecture fields a source can read from its files (the reference
checkpoint's tensors, a Transformers config.json), so everything downstream sees one resolved
ModelConfig; ``load`` returns the model itself, weights loaded.
"""
from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..core.config import ModelConfig
from .interface import ModelSource

# name -> "module:function" for (resolve, load): sources are imported only when used.
_REGISTRY: dict[str, tuple[str, ...]] = {
    "native": ("hmu_export.model.sources:_native_resolve", "hmu_export.model.sources:_native_load"),
    "reference": ("hmu_export.model.reference:resolve_config",
                  "hmu_export.model.reference:load_source"),
    # (resolve, load[, load_saved]): a third entry rebuilds the model from a build's checkpoint/
    "hf": ("hmu_export.model.hf:resolve_config", "hmu_export.model.hf:load_source",
           "hmu_export.model.hf:load_saved"),
}


def _func(ref: str) -> Callable:
    mod, name = ref.split(":")
    return getattr(importlib.import_module(mod), name)


def resolve(cfg: ModelConfig) -> ModelConfig:
    """The config with every field the source's files determine filled in (validated)."""
    out = _func(_REGISTRY[cfg.source][0])(cfg)
    out.validate()
    return out


def load(cfg: ModelConfig) -> ModelSource:
    """The model of a resolved config, in eval mode, weights loaded."""
    return _func(_REGISTRY[cfg.source][1])(cfg).eval()


def load_saved(cfg: ModelConfig, weights: Path) -> ModelSource:
    """A source rebuilt from a build's checkpoint/ (its resolved config + saved weights)."""
    loader = _REGISTRY[cfg.source][2] if len(_REGISTRY[cfg.source]) > 2 else None
    if loader:
        return _func(loader)(cfg, weights).eval()
    return load(replace(cfg, checkpoint=str(weights))).eval()


def _native_resolve(cfg: ModelConfig) -> ModelConfig:
    return cfg


def _native_load(cfg: ModelConfig) -> ModelSource:
    from .checkpoint import build_model
    from .native import NativeSource
    return NativeSource(cfg, build_model(cfg))


def generation_refusal(cfg: ModelConfig) -> str:
    """Why a model of this config cannot generate ("" when it can), without loading it."""
    if cfg.is_classifier:
        return "this model is a classifier: it has nothing to generate"
    if cfg.source == "reference":
        return ("the reference implementation's decoder is not causal (it was trained seeing "
                "the whole target), so token-by-token generation would be meaningless; serve "
                "its full graph (model.onnx) instead")
    return ""
