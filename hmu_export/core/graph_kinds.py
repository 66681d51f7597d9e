"""The graph kinds a build can export, declared once: file, contract, profile axes, pin policy.

A new kind is one row here (plus the module that builds it in each model source): export,
layouts, engine recipes and the sources' ``contract()`` read this table instead of branching
on names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .config import ModelConfig
from .io_contract import (BATCH, CLASSIFIER, DECODER, ENCODER, FULL, NEW_LEN, PAST_LEN, SRC_LEN,
                          TGT_LEN, CacheLayout, GraphContract, classifier_contract,
                          decoder_contract, encoder_contract, full_contract)

ContractFn = Callable[[ModelConfig, "CacheLayout | None", bool], GraphContract]


@dataclass(frozen=True)
class GraphKind:
    name: str
    file: str  # where a build writes it (variants: <stem>.opt.onnx, <stem>.fp16.onnx)
    contract: ContractFn  # (model config, the source's cache layout, diagnostics) -> contract
    axes: tuple[str, ...]  # the profile axes its inputs vary along
    #: the HMU lives in it, so its sensitive nodes (LayerNorm, Exp, gate Sigmoid) get FP32 pins
    hmu_pins: bool
    #: needs the source's decoder cache layout (heads, head_dim per layer)
    needs_cache: bool = False


GRAPH_KINDS: dict[str, GraphKind] = {k.name: k for k in (
    GraphKind(FULL, "model.onnx", lambda m, c, d: full_contract(m, d),
              (BATCH, SRC_LEN, TGT_LEN), hmu_pins=True),
    GraphKind(CLASSIFIER, "model.onnx", lambda m, c, d: classifier_contract(m),
              (BATCH, SRC_LEN), hmu_pins=True),
    GraphKind(ENCODER, "encoder.onnx", lambda m, c, d: encoder_contract(m, c),  # type: ignore[arg-type]
              (BATCH, SRC_LEN), hmu_pins=True, needs_cache=True),
    GraphKind(DECODER, "decoder.onnx", lambda m, c, d: decoder_contract(m, c),  # type: ignore[arg-type]
              (BATCH, SRC_LEN, PAST_LEN, NEW_LEN), hmu_pins=False, needs_cache=True),
)}

#: graph name -> the file a build writes it to
GRAPH_FILES = {name: kind.file for name, kind in GRAPH_KINDS.items()}


def graph_contract(name: str, model: ModelConfig, cache: CacheLayout | None = None,
                   diagnostics: bool = False) -> GraphContract:
    """The contract of graph kind ``name`` for ``model`` (KeyError for an unknown kind)."""
    kind = GRAPH_KINDS[name]
    if kind.needs_cache and cache is None:
        raise ValueError(f"the {name} graph needs the source's cache layout")
    return kind.contract(model, cache, diagnostics)
