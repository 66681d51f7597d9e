"""The one I/O contract: names, dtypes and dynamic axes of every exported graph.

The exporter, runners, parity suite, Triton configs and the C++ program all read it from here
(the C++ program reads the same facts from the graph itself and checks them the same way).
A contract describes *a* graph, so split graphs (encoder+HMU / decoder step) can be added later.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .config import ModelConfig, ProfileConfig
from .errors import InputError

# Names of the dynamic axes, shared with the ONNX graph's dim_params and the profile's fields.
BATCH, SRC_LEN, TGT_LEN = "batch", "src_len", "tgt_len"
PAST_LEN, NEW_LEN, TOTAL_LEN = "past_len", "new_len", "total_len"  # decoder-step graph
AXIS_TO_PROFILE = {BATCH: "batch", SRC_LEN: "src_len", TGT_LEN: "tgt_len", PAST_LEN: "past_len",
                   NEW_LEN: "new_len"}
EMPTY_OK = frozenset({PAST_LEN})  # a zero-length past is the first decoder call

# Graph names (one spec each: core/graph_kinds.py declares their files, axes and pins).
FULL, ENCODER, DECODER, CLASSIFIER = "full", "encoder", "decoder", "classifier"
MEMORY, CLASS_LOGITS = "memory", "class_logits"


def cross_key(i: int) -> str:
    return f"cross_key.{i}"


def cross_value(i: int) -> str:
    return f"cross_value.{i}"


def past_key(i: int) -> str:
    return f"past_key.{i}"


def past_value(i: int) -> str:
    return f"past_value.{i}"


def present_key(i: int) -> str:
    return f"present_key.{i}"


def present_value(i: int) -> str:
    return f"present_value.{i}"

SRC_IDS, SRC_MASK, TGT_IDS, NOISE = "src_ids", "src_mask", "tgt_ids", "noise"
# Per-row decoder state (decoder step graph): rows at different steps share one batch.
POSITIONS, PAST_MASK = "positions", "past_mask"
#: decoder-step inputs a build made before per-row decoder state lacks
ROW_STATE_INPUTS = (POSITIONS, PAST_MASK)
LOGITS, ENCODER_OUT, HMU_GATE, HMU_OUT = "logits", "encoder_out", "hmu_gate", "hmu_out"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "int64" | "float32"
    dims: tuple[str | int, ...]  # a str is a dynamic axis name, an int a fixed size
    doc: str = ""
    # Outputs whose values at padded source positions are meaningless (compare real ones only).
    src_positional: bool = False

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)


@dataclass(frozen=True)
class GraphContract:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def output(self, name: str) -> TensorSpec:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def axes(self) -> list[str]:
        """Dynamic axis names of the inputs, in first-seen order."""
        seen: dict[str, None] = {}
        for spec in self.inputs:
            for d in spec.dims:
                if isinstance(d, str):
                    seen.setdefault(d)
        return list(seen)

    @classmethod
    def from_dict(cls, data: dict) -> "GraphContract":
        def one(d: dict) -> TensorSpec:
            return TensorSpec(str(d["name"]), str(d["dtype"]), tuple(d["dims"]), str(d.get("doc", "")),
                              bool(d.get("src_positional", False)))
        return cls(str(data["name"]), tuple(one(d) for d in data["inputs"]),
                   tuple(one(d) for d in data["outputs"]))

    def to_dict(self) -> dict:
        def one(s: TensorSpec) -> dict:
            out = {"name": s.name, "dtype": s.dtype, "dims": list(s.dims), "doc": s.doc}
            if s.src_positional:
                out["src_positional"] = True
            return out
        return {"name": self.name, "inputs": [one(s) for s in self.inputs],
                "outputs": [one(s) for s in self.outputs]}


def full_contract(model: ModelConfig, diagnostics: bool = False) -> GraphContract:
    """Contract of the full encoder -> HMU -> decoder graph."""
    d, latent, vocab = model.d_model, model.latent_dim, model.vocab_size
    inputs = (
        TensorSpec(SRC_IDS, "int64", (BATCH, SRC_LEN), "source token ids"),
        TensorSpec(SRC_MASK, "int64", (BATCH, SRC_LEN), "1 = real token, 0 = padding"),
        TensorSpec(TGT_IDS, "int64", (BATCH, TGT_LEN), "decoder input ids (causal)"),
        TensorSpec(NOISE, "float32",
                   (BATCH, TGT_LEN if model.hmu_position == "after_decoder" else SRC_LEN, latent),
                   "VAE noise eps: zeros = mean path, N(0, t^2) = temperature t"),
    )
    outputs = [TensorSpec(LOGITS, "float32", (BATCH, TGT_LEN, vocab), "next-token logits")]
    if diagnostics:
        outputs += [
            TensorSpec(ENCODER_OUT, "float32", (BATCH, SRC_LEN, d), "encoder output v",
                       src_positional=True),
            TensorSpec(HMU_GATE, "float32", (BATCH, SRC_LEN, d), "HMU gate g",
                       src_positional=True),
            TensorSpec(HMU_OUT, "float32", (BATCH, SRC_LEN, d), "HMU output (decoder memory)",
                       src_positional=True),
        ]
    return GraphContract("hmu_full", inputs, tuple(outputs))


@dataclass(frozen=True)
class CacheLayout:
    """Per-decoder-layer attention cache geometry, as the model source states it (T5's d_kv
    need not be d_model / heads). Runtimes read it back from the graphs' declared inputs."""

    layers: int
    heads: int
    head_dim: int


def encoder_contract(model: ModelConfig, cache: CacheLayout) -> GraphContract:
    """Encoder + HMU, run once per request: the decoder memory and every layer's cross K/V."""
    inputs = full_contract(model).inputs
    inputs = tuple(s for s in inputs if s.name != TGT_IDS)
    kv = (BATCH, cache.heads, SRC_LEN, cache.head_dim)
    outputs = [TensorSpec(MEMORY, "float32", (BATCH, SRC_LEN, model.d_model),
                          "HMU output, the decoder's memory", src_positional=True)]
    for i in range(cache.layers):
        outputs += [TensorSpec(cross_key(i), "float32", kv, f"layer {i} cross-attention keys",
                               src_positional=True),
                    TensorSpec(cross_value(i), "float32", kv,
                               f"layer {i} cross-attention values", src_positional=True)]
    return GraphContract("hmu_encoder", inputs, tuple(outputs))


def decoder_contract(model: ModelConfig, cache: CacheLayout) -> GraphContract:
    """One decoder step over ``new_len`` tokens after ``past_len`` cache slots (0 on the first
    call): one graph for every step, no If node.

    Per-row state, so that rows at different steps share one batch (in-flight batching):
    ``positions`` [batch, new_len] are the absolute positions of each row's new tokens, and
    ``past_mask`` [batch, past_len] says which cache slots hold one of the row's tokens (1) and
    which are padding (0). A row's real slots hold its tokens 0, 1, ... in cache order (padding
    may sit anywhere, e.g. on the left of a row that joined late), so its next positions are
    ``past_mask.sum(1) + arange(new_len)``. New tokens attend causally among themselves and to
    every real slot of their row; padded slots are never attended to. A uniform batch is
    ``positions = past_len + arange(new_len)`` and ``past_mask`` all ones."""
    inputs = [TensorSpec(TGT_IDS, "int64", (BATCH, NEW_LEN), "decoder input ids of this step"),
              TensorSpec(SRC_MASK, "int64", (BATCH, SRC_LEN), "1 = real token, 0 = padding"),
              TensorSpec(POSITIONS, "int64", (BATCH, NEW_LEN),
                         "absolute position of each new token of each row"),
              TensorSpec(PAST_MASK, "int64", (BATCH, PAST_LEN),
                         "1 = cache slot holds a token of the row, 0 = padding slot")]
    kv_src = (BATCH, cache.heads, SRC_LEN, cache.head_dim)
    kv_past = (BATCH, cache.heads, PAST_LEN, cache.head_dim)
    kv_total = (BATCH, cache.heads, TOTAL_LEN, cache.head_dim)
    for i in range(cache.layers):
        inputs += [TensorSpec(cross_key(i), "float32", kv_src, "from the encoder graph"),
                   TensorSpec(cross_value(i), "float32", kv_src, "from the encoder graph")]
    for i in range(cache.layers):
        inputs += [TensorSpec(past_key(i), "float32", kv_past, "self-attention keys so far"),
                   TensorSpec(past_value(i), "float32", kv_past, "self-attention values so far")]
    outputs = [TensorSpec(LOGITS, "float32", (BATCH, NEW_LEN, model.vocab_size),
                          "next-token logits of the new positions")]
    for i in range(cache.layers):
        outputs += [TensorSpec(present_key(i), "float32", kv_total, "past + new keys"),
                    TensorSpec(present_value(i), "float32", kv_total, "past + new values")]
    return GraphContract("hmu_decoder", tuple(inputs), tuple(outputs))


def row_state_refusal(decoder_inputs: Sequence[str], where: str = "the decoder graph") -> str:
    """Empty when a decoder-step graph takes the per-row state inputs, else the one line that
    refuses it (a build made before them)."""
    missing = [n for n in ROW_STATE_INPUTS if n not in decoder_inputs]
    if not missing:
        return ""
    return (f"{where} has no {' / '.join(missing)} input (built before per-row decoder "
            "state): rebuild it with this version")


def uniform_row_state(batch: int, past_len: int, new_len: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(positions, past_mask) of a batch whose rows all hold ``past_len`` tokens."""
    pos = np.broadcast_to(np.arange(past_len, past_len + new_len, dtype=np.int64),
                          (batch, new_len))
    return np.ascontiguousarray(pos), np.ones((batch, past_len), dtype=np.int64)


def classifier_contract(model: ModelConfig) -> GraphContract:
    """Encoder + HMU + pooling + classifier head."""
    inputs = tuple(s for s in full_contract(model).inputs if s.name != TGT_IDS)
    outputs = (TensorSpec(CLASS_LOGITS, "float32", (BATCH, model.num_classes), "class logits"),)
    return GraphContract("hmu_classifier", inputs, outputs)


def feed_shape(feeds: Mapping[str, np.ndarray]) -> tuple[int, int, int]:
    """(B, Ls, Lt) of a full-graph feed."""
    b, ls = feeds[SRC_IDS].shape
    return int(b), int(ls), int(feeds[TGT_IDS].shape[1])


def validate_feeds(contract: GraphContract, feeds: Mapping[str, np.ndarray],
                   profiles: Sequence[ProfileConfig] | ProfileConfig | None = None,
                   vocab_size: int | None = None) -> None:
    """Raise InputError naming the first violation of the contract or the shape profile(s)."""
    missing = [n for n in contract.input_names if n not in feeds]
    if missing:
        raise InputError(f"missing input(s): {', '.join(missing)}")
    extra = sorted(set(feeds) - set(contract.input_names))
    if extra:
        raise InputError(f"unknown input(s): {', '.join(extra)} "
                         f"(expected {', '.join(contract.input_names)})")
    bound: dict[str, int] = {}
    for spec in contract.inputs:
        arr = feeds[spec.name]
        if not isinstance(arr, np.ndarray):
            raise InputError(f"input '{spec.name}' must be a numpy array, got {type(arr).__name__}")
        if arr.dtype != spec.np_dtype:
            raise InputError(f"input '{spec.name}' has dtype {arr.dtype}, expected {spec.dtype}")
        if arr.ndim != len(spec.dims):
            raise InputError(f"input '{spec.name}' has rank {arr.ndim} (shape {list(arr.shape)}), "
                             f"expected rank {len(spec.dims)} {list(spec.dims)}")
        for axis, (dim, size) in enumerate(zip(spec.dims, arr.shape)):
            if isinstance(dim, int):
                if size != dim:
                    raise InputError(f"input '{spec.name}' dim {axis} is {size}, expected {dim}")
            elif bound.setdefault(dim, size) != size:
                raise InputError(f"input '{spec.name}' dim {axis} ({dim}) is {size}, but another "
                                 f"input has {dim} = {bound[dim]}")
            if size < 1 and dim not in EMPTY_OK:
                raise InputError(f"input '{spec.name}' dim {axis} ({dim}) is empty")
    if profiles is not None:
        plist = [profiles] if isinstance(profiles, ProfileConfig) else list(profiles)
        sizes = {AXIS_TO_PROFILE[k]: v for k, v in bound.items() if k in AXIS_TO_PROFILE}
        if plist and not any(all(p.axis(a).contains(v) for a, v in sizes.items()) for p in plist):
            desc = ", ".join(f"{a}={v}" for a, v in sizes.items())
            ranges = " | ".join(", ".join(f"{a} {p.axis(a).min}..{p.axis(a).max}" for a in sizes)
                                for p in plist)
            raise InputError(f"shape outside the profile: {desc} (allowed: {ranges})")
    if SRC_MASK in feeds:
        mask = feeds[SRC_MASK]
        if not np.isin(mask, (0, 1)).all():
            raise InputError(f"input '{SRC_MASK}' must hold only 0 (pad) and 1 (token)")
        if mask.size and (mask.sum(axis=1) == 0).any():
            raise InputError(f"input '{SRC_MASK}' has a row with no real token")
    if PAST_MASK in feeds and not np.isin(feeds[PAST_MASK], (0, 1)).all():
        raise InputError(f"input '{PAST_MASK}' must hold only 0 (padding slot) and 1 (token)")
    if POSITIONS in feeds and feeds[POSITIONS].size and int(feeds[POSITIONS].min()) < 0:
        raise InputError(f"input '{POSITIONS}' has a negative position")
    if vocab_size is not None:
        for name in (SRC_IDS, TGT_IDS):
            if name in feeds and feeds[name].size:
                lo, hi = int(feeds[name].min()), int(feeds[name].max())
                if lo < 0 or hi >= vocab_size:
                    raise InputError(f"input '{name}' has token ids outside [0, {vocab_size}): "
                                     f"min {lo}, max {hi}")
    if NOISE in feeds and not np.isfinite(feeds[NOISE]).all():
        raise InputError(f"input '{NOISE}' has non-finite values")


def make_feeds(model: ModelConfig, batch: int, src_len: int, tgt_len: int, *, seed: int = 0,
               noise_scale: float = 1.0, pad: bool = True) -> dict[str, np.ndarray]:
    """Deterministic feeds for one shape. With ``pad``, every other row is padded at the end."""
    rng = np.random.default_rng([seed, batch, src_len, tgt_len])
    low = 1 if model.vocab_size > 1 else 0
    src = rng.integers(low, model.vocab_size, size=(batch, src_len), dtype=np.int64)
    tgt = rng.integers(low, model.vocab_size, size=(batch, tgt_len), dtype=np.int64)
    mask = np.ones((batch, src_len), dtype=np.int64)
    if pad and src_len > 1:
        for row in range(1, batch, 2):
            real = int(rng.integers(1, src_len))  # 1 .. src_len-1 real tokens
            mask[row, real:] = 0
            src[row, real:] = model.pad_id
    noise = (rng.standard_normal((batch, src_len, model.latent_dim)) * noise_scale)
    return {SRC_IDS: src, SRC_MASK: mask, TGT_IDS: tgt, NOISE: noise.astype(np.float32)}


def spec_feeds(contract: GraphContract, model: ModelConfig, sizes: Mapping[str, int], *,
               seed: int = 0, noise_scale: float = 1.0, pad: bool = True
               ) -> dict[str, np.ndarray]:
    """Deterministic feeds for any graph at the named axis sizes (a declared feed generator,
    Optimum's dummy inputs). Odd rows are padded; float inputs other than noise (cross K/V,
    caches) are N(0, 1) stand-ins, fine for graph-vs-module checks."""
    key = [seed] + [int(sizes[a]) for a in sorted(sizes)]
    rng = np.random.default_rng(key)
    out: dict[str, np.ndarray] = {}
    low = 1 if model.vocab_size > 1 else 0
    for spec in contract.inputs:
        shape = tuple(int(sizes[d]) if isinstance(d, str) else d for d in spec.dims)
        if spec.name in (SRC_MASK, PAST_MASK, POSITIONS):
            out[spec.name] = np.ones(shape, dtype=np.int64)  # filled below
        elif spec.dtype == "int64":
            out[spec.name] = rng.integers(low, model.vocab_size, size=shape, dtype=np.int64)
        elif spec.name == NOISE:
            out[spec.name] = (rng.standard_normal(shape) * noise_scale).astype(np.float32)
        else:
            out[spec.name] = rng.standard_normal(shape).astype(np.float32)
    if pad and SRC_MASK in out and out[SRC_MASK].shape[1] > 1:
        mask = out[SRC_MASK]
        for row in range(1, mask.shape[0], 2):
            real = int(rng.integers(1, mask.shape[1]))
            mask[row, real:] = 0
            if SRC_IDS in out:
                out[SRC_IDS][row, real:] = model.pad_id
    if PAST_MASK in out:  # odd rows joined late: their first slots are left padding
        pm = out[PAST_MASK]
        if pad:
            for row in range(1, pm.shape[0], 2):
                pm[row, :int(rng.integers(0, pm.shape[1] + 1))] = 0
    if POSITIONS in out:
        held = out[PAST_MASK].sum(axis=1) if PAST_MASK in out else 0
        new = out[POSITIONS].shape[1]
        out[POSITIONS] = (np.asarray(held, dtype=np.int64).reshape(-1, 1)
                          + np.arange(new, dtype=np.int64)[None, :]) * np.ones_like(out[POSITIONS])
    return out
