"""What the generation loop drives: a ``Stepper`` (start, step, select rows), the cache
geometry the graphs declare, and ``CachedStepper`` over any encoder / decoder-step backend.

Step backends (hmu_export/backends/) import this module; the loop (generator.py) imports the
backend registry: neither imports the other's module back."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Mapping, Protocol, runtime_checkable

import numpy as np

from ..core.errors import ArtifactError
from ..core.io_contract import (LOGITS, NOISE, PAST_MASK, POSITIONS, SRC_IDS, SRC_MASK, TGT_IDS,
                                cross_key, cross_value, past_key, past_value, present_key,
                                present_value, row_state_refusal)


@dataclass(frozen=True)
class CacheSpec:
    """Cache geometry as the graphs declare it (read back from their inputs)."""

    layers: int
    heads: int
    head_dim: int
    latent_dim: int  # last dim of the encoder's noise input


@runtime_checkable
class StepBackend(Protocol):
    """Runs the encoder and decoder-step graphs on numpy feeds (contract names)."""

    name: str

    def encode(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """src_ids, src_mask, noise -> memory, cross_key.{i}, cross_value.{i}."""

    def decode(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """tgt_ids, src_mask, positions, past_mask, cross K/V, past K/V -> logits,
        present_key.{i}, present_value.{i}."""

    def cache_spec(self) -> CacheSpec:
        """Layers / heads / head_dim / latent read from the graph's declared inputs."""


class Stepper(ABC):
    """One request's generation state over some model (see module docstring)."""

    name: str = ""
    latent_dim: int = 0

    @abstractmethod
    def start(self, src_ids: np.ndarray, src_mask: np.ndarray, noise: np.ndarray) -> None:
        """Begin a request: encode the (padded) source."""

    @abstractmethod
    def step(self, new_ids: np.ndarray) -> np.ndarray:
        """Feed ``new_ids`` [rows, new] after everything fed so far; logits [rows, vocab] of the
        last new position."""

    @abstractmethod
    def select(self, rows: np.ndarray) -> None:
        """Keep rows ``rows`` (indices into the current batch, repeats allowed), in that order."""


def next_row_state(past_mask: np.ndarray, new: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions [B, new], the past_mask after the step [B, past+new]) of a step feeding
    ``new`` tokens per row: a row's next position is the number of tokens it holds."""
    held = past_mask.sum(axis=1, dtype=np.int64)[:, None]
    positions = held + np.arange(new, dtype=np.int64)[None, :]
    grown = np.concatenate([past_mask, np.ones((past_mask.shape[0], new), dtype=np.int64)],
                           axis=1)
    return positions, grown


class CachedStepper(Stepper):
    """Drives a StepBackend: encoder once, then one decoder step per token with the KV cache
    (and the decoder contract's per-row state: positions, past_mask)."""

    def __init__(self, backend: StepBackend) -> None:
        self.backend = backend
        self.name = backend.name
        self.spec = backend.cache_spec()
        self.latent_dim = self.spec.latent_dim
        n = self.spec.layers
        self._cross_names = [f(i) for i in range(n) for f in (cross_key, cross_value)]
        self._past_names = [f(i) for i in range(n) for f in (past_key, past_value)]
        self._present_names = [f(i) for i in range(n) for f in (present_key, present_value)]
        self._state: dict[str, np.ndarray] = {}
        #: the source row each batch row decodes: state that depends on the source alone (its
        #: mask, the cross K/V) is the same for rows of one source, so a select that keeps
        #: every row on its source (beams reordered inside their group) copies none of it
        self._source_of_row = np.zeros(0, dtype=np.int64)

    def start(self, src_ids: np.ndarray, src_mask: np.ndarray, noise: np.ndarray) -> None:
        out = self.backend.encode({SRC_IDS: src_ids, SRC_MASK: src_mask, NOISE: noise})
        s = self.spec
        empty = np.zeros((src_ids.shape[0], s.heads, 0, s.head_dim), dtype=np.float32)
        self._state = {SRC_MASK: src_mask,
                       PAST_MASK: np.zeros((src_ids.shape[0], 0), dtype=np.int64)}
        self._state.update({name: out[name] for name in self._cross_names})
        self._state.update({name: empty for name in self._past_names})
        self._source_of_row = np.arange(src_ids.shape[0], dtype=np.int64)

    def step(self, new_ids: np.ndarray) -> np.ndarray:
        feeds = dict(self._state)
        feeds[TGT_IDS] = new_ids
        feeds[POSITIONS], grown = next_row_state(self._state[PAST_MASK], new_ids.shape[1])
        out = self.backend.decode(feeds)
        for past, present in zip(self._past_names, self._present_names):
            self._state[past] = out[present]  # as returned: no copy
        self._state[PAST_MASK] = grown
        return out[LOGITS][:, -1, :]

    def select(self, rows: np.ndarray) -> None:
        sources = self._source_of_row[rows]
        same = np.array_equal(sources, self._source_of_row)
        fixed = (SRC_MASK, *self._cross_names) if same else ()
        self._state = {k: v if k in fixed else np.take(v, rows, axis=0)
                       for k, v in self._state.items()}
        self._source_of_row = sources


def cache_spec_from_dims(dec: Mapping[str, tuple], enc: Mapping[str, tuple]) -> CacheSpec:
    """Cache geometry from declared input dims (past_key.i: [batch, heads, past, head_dim])."""
    layers = 0
    while past_key(layers) in dec:
        layers += 1
    if not layers:
        raise ArtifactError("decoder graph declares no past_key.0 input")
    refusal = row_state_refusal(list(dec))
    if refusal:
        raise ArtifactError(refusal)
    dims = dec[past_key(0)]
    heads, head_dim = dims[1], dims[3]
    latent = enc[NOISE][2] if NOISE in enc else None
    for name, value in (("heads", heads), ("head_dim", head_dim), ("noise latent", latent)):
        if not isinstance(value, int):
            raise ArtifactError(f"generation graphs must declare a fixed {name}, got {value!r}")
    return CacheSpec(layers, heads, head_dim, latent)  # type: ignore[arg-type]
