"""What every model source gives the rest of the tool: graphs as modules, contracts, HMU facts.

Export, runners, parity and bench talk to a ``ModelSource``; they never construct a concrete
model. A source is one module (native.py / reference.py / hf.py) registered in sources.py.

Each exported graph is a plain ``nn.Module`` whose ``forward`` takes the contract's inputs in
contract order (torch tensors) and returns a tuple of the contract's outputs in contract order,
so the exporter and the torch runners treat every graph and every source alike.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.config import ModelConfig
from ..core.graph_kinds import GRAPH_KINDS, graph_contract
from ..core.io_contract import CLASSIFIER, DECODER, ENCODER, FULL, CacheLayout, GraphContract


class ModelSource(ABC):
    """A trained (or seeded) encoder -> HMU -> decoder model, whatever code defined it."""

    #: registry name ("native", "reference", "hf")
    source: str = ""
    #: module-path prefix of the HMU inside every graph: its nodes are the FP32 pins
    hmu_scope: str = "hmu"

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg  # resolved: every architecture field holds the model's real value

    # ------------------------------------------------------------------ graphs
    def graph_names(self) -> tuple[str, ...]:
        """Graphs this model exports; the first one is the primary graph (model.onnx)."""
        if self.cfg.is_classifier:
            return (CLASSIFIER,)
        if self.generation_refusal():
            return (FULL,)
        return (FULL, ENCODER, DECODER)

    def contract(self, graph: str, diagnostics: bool = False) -> GraphContract:
        kind = GRAPH_KINDS[graph]
        return graph_contract(graph, self.cfg, self.cache_layout() if kind.needs_cache else None,
                              diagnostics)

    @abstractmethod
    def module(self, graph: str, diagnostics: bool = False) -> nn.Module:
        """The graph as a module: forward(*contract inputs) -> tuple(contract outputs)."""

    def cache_layout(self) -> CacheLayout:
        """Decoder self/cross-attention cache geometry (only for sources that generate)."""
        raise NotImplementedError(f"{self.source} source has no decoder cache")

    def generation_defaults(self) -> dict[str, Any]:
        """``[generation]`` values the model's own files fix (e.g. Transformers'
        decoder_start_token_id / eos_token_id); empty when the config decides."""
        return {}

    def generation_refusal(self) -> str:
        """Empty when autoregressive generation is meaningful, else why not (one line)."""
        return ""

    def generation_options_refusal(self) -> str:
        """Empty unless the model's own generation settings ask for decoding that no loop here
        implements (one line naming the options): generation graphs are then refused."""
        return ""

    # ------------------------------------------------------------------ facts
    @abstractmethod
    def torch_module(self) -> nn.Module:
        """The whole underlying model (parameters, state_dict, .to())."""

    def hmu_parameter_share(self) -> tuple[int, int]:
        """(HMU parameters, all parameters)."""
        mod = self.torch_module()
        total = sum(p.numel() for p in mod.parameters())
        hmu = sum(p.numel() for n, p in mod.named_parameters()
                  if n.startswith(self.hmu_scope + ".") or f".{self.hmu_scope}." in n)
        return hmu, total

    def to(self, device: str | torch.device, dtype: torch.dtype = torch.float32) -> "ModelSource":
        """Moves the model in place (callers copy first when they must keep the original)."""
        self.torch_module().to(device=device, dtype=dtype)
        return self

    def save(self, folder: Path) -> tuple[Path, Path]:
        """Write the build's ``checkpoint/`` (weights, resolved config, and whatever else
        ``sources.load_saved`` needs to rebuild this source); returns (weights, config)."""
        from .weights import save_source_state
        return save_source_state(self, folder)

    def eval(self) -> "ModelSource":
        self.torch_module().eval()
        return self
