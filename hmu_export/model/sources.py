"""Registry of model sources: ``[model] source = ...`` -> a ModelSource, and what each declares.

A source is one module (native.py, reference.py, hf.py) defining ``resolve_config(cfg)`` (fills
the architecture fields its files determine, so everything downstream sees one resolved
ModelConfig), ``load_source(cfg)`` (the model, weights loaded) and optionally
``load_saved(cfg, weights)`` (rebuild it from a build's checkpoint/), plus its line here: the
facts other floors ask about a source, so none of them tests a source's name.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

from ..core.config import ModelConfig
from .interface import ModelSource


@dataclass(frozen=True)
class SourceEntry:
    module: str  # the module defining resolve_config / load_source [/ load_saved]
    #: why autoregressive generation is meaningless for it ("" when it generates)
    generation_refusal: str = ""
    #: the same model can be built without its HMU (bench measures the HMU's overhead)
    hmu_removable: bool = False
    #: its model folder is a Transformers folder that peers (Transformers, Optimum,
    #: CTranslate2) load as it is, and that may carry its own tokenizer
    transformers_folder: bool = False
    #: ``finetune --merge-into`` writes a full checkpoint of it with the trained HMU
    merges_hmu: bool = False


SOURCES: dict[str, SourceEntry] = {
    "native": SourceEntry("hmu_export.model.native", hmu_removable=True, merges_hmu=True),
    "reference": SourceEntry(
        "hmu_export.model.reference",
        generation_refusal="the reference implementation's decoder is not causal (it was "
                           "trained seeing the whole target), so token-by-token generation "
                           "would be meaningless; serve its full graph (model.onnx) instead"),
    "hf": SourceEntry("hmu_export.model.hf", transformers_folder=True),
}


def entry(cfg: ModelConfig) -> SourceEntry:
    """What the config's source declares."""
    return SOURCES[cfg.source]


def _module(cfg: ModelConfig) -> ModuleType:
    return importlib.import_module(entry(cfg).module)  # imported only when used


def resolve(cfg: ModelConfig) -> ModelConfig:
    """The config with every field the source's files determine filled in (validated)."""
    out = _module(cfg).resolve_config(cfg)
    out.validate()
    return out


def load(cfg: ModelConfig) -> ModelSource:
    """The model of a resolved config, in eval mode, weights loaded."""
    return _module(cfg).load_source(cfg).eval()


def load_saved(cfg: ModelConfig, weights: Path) -> ModelSource:
    """A source rebuilt from a build's checkpoint/ (its resolved config + saved weights)."""
    loader = getattr(_module(cfg), "load_saved", None)
    if loader is not None:
        return loader(cfg, weights).eval()
    return load(replace(cfg, checkpoint=str(weights))).eval()


def generation_refusal(cfg: ModelConfig) -> str:
    """Why a model of this config cannot generate ("" when it can), without loading it."""
    if cfg.is_classifier:
        return "this model is a classifier: it has nothing to generate"
    return entry(cfg).generation_refusal
