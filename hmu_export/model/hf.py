"""Hugging Face seq2seq models (T5, BART, Marian) with an HMU between encoder and decoder.

``[model] source = "hf"`` with ``path`` = a local ``save_pretrained`` folder. The Transformers
model supplies the weights (and the test oracle); the computation of every graph is written
here, per family, from the Transformers layers' own submodules, because the graphs need what
Transformers' forward does not give: the cross-attention K/V as encoder outputs, a decoder step
that takes them plus a self-attention past as plain tensors (the onnxruntime-genai Whisper
layout), per-row positions and a mask over a padded past (rows at different steps share one
batch: the decoder contract's ``positions`` / ``past_mask``), and no data-dependent Python
branches (no ``If`` node).

Per family:
- T5: RMS layer norms, no attention scaling, a relative position bias computed in the first
  block and shared by all blocks (bidirectional in the encoder; in a decoder step per row, for
  the row's query positions against its keys' positions, a cache slot's position being its
  rank among the row's real slots), ``d_kv`` heads that need not be
  d_model / heads, tied LM head scaled by d_model**-0.5 when the config says so.
- BART: word embeddings scaled inside ``embed_tokens``, learned positions with offset 2, a
  layernorm after the embeddings, post-norm layers, ``final_logits_bias``.
- Marian: like BART, but sinusoidal positions (no offset), embeddings scaled by sqrt(d_model)
  when ``scale_embedding``, no embedding layernorm.

The HMU takes the encoder's ``last_hidden_state``; its output is the memory the decoder
cross-attends to. Without ``hmu_checkpoint`` it is seeded with ``model.seed`` (untrained).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.config import ModelConfig
from ..core.errors import CheckpointError, ConfigError
from ..core.io_contract import DECODER, ENCODER, FULL, CacheLayout
from .hmu import HMU, IdentityHMU
from .interface import ModelSource
from .tokenizer import copy_tokenizer, tokenizer_files

T5, BART, MARIAN = "T5ForConditionalGeneration", "BartForConditionalGeneration", "MarianMTModel"
SUPPORTED = (T5, BART, MARIAN)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
#: T5 has no position table; relative positions have no hard bound. Profiles need one.
T5_MAX_LEN = 512
#: ModelConfig's latent_dim default: a resolved hf config replaces it with d_model // 2. A TOML
#: that sets any other value keeps it (an explicit 64 cannot be told from the default).
_DEFAULT_LATENT = next(f.default for f in dataclasses.fields(ModelConfig) if f.name == "latent_dim")
#: generation_config.json options that change tokens and that every loop honours:
#: Transformers' name -> our [generation] key (hmu_export/shipped/token_rules.py for the token rules).
HONOURED_OPTIONS: dict[str, str] = {
    "num_beams": "num_beams", "length_penalty": "length_penalty",
    "early_stopping": "early_stopping", "repetition_penalty": "repetition_penalty",
    "no_repeat_ngram_size": "no_repeat_ngram_size", "bad_words_ids": "bad_words_ids",
    "min_new_tokens": "min_new_tokens", "forced_bos_token_id": "forced_bos_id",
    "forced_eos_token_id": "forced_eos_id", "suppress_tokens": "suppress_tokens",
    "begin_suppress_tokens": "begin_suppress_tokens",
}
#: options that change tokens and that no loop here implements, with the value that leaves
#: tokens alone: a folder that sets one is refused (never silently ignored).
REFUSED_OPTIONS: dict[str, Any] = {
    "encoder_no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0,
    "sequence_bias": None, "diversity_penalty": 0.0, "num_beam_groups": 1,
    "exponential_decay_length_penalty": None, "penalty_alpha": None, "guidance_scale": None,
    "renormalize_logits": False, "remove_invalid_values": False, "num_return_sequences": 1,
    "forced_decoder_ids": None, "constraints": None, "force_words_ids": None,
    "watermarking_config": None,
}
#: sampling warpers: honoured (temperature, top_k, top_p) or refused only when do_sample is set
SAMPLING_HONOURED = ("temperature", "top_k", "top_p")
SAMPLING_REFUSED: dict[str, Any] = {"typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
                                    "min_p": None, "top_h": None}


# ----------------------------------------------------------------------------- config
def _folder(cfg: ModelConfig) -> Path:
    if not cfg.path:
        raise ConfigError('model.path must name a local save_pretrained folder for source "hf"')
    path = Path(cfg.path)
    if not path.is_dir():
        raise ConfigError(f"model.path {path} is not a folder (expected a save_pretrained folder "
                          "with config.json and weights)")
    return path


def _config_json(path: Path) -> dict:
    file = path / "config.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} has no config.json (expected a save_pretrained folder)") from None
    except (OSError, ValueError) as exc:  # not UTF-8, not JSON, an integer too long
        raise ConfigError(f"cannot read {file}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"cannot read {file}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file} does not hold a JSON object")
    return data


#: the config.json ``model_type`` each supported architecture belongs to
MODEL_TYPES = {T5: "t5", BART: "bart", MARIAN: "marian"}


def architecture(path: Path) -> str:
    """The folder's supported architecture, or a one-line ConfigError naming what it has
    (also when its ``model_type`` belongs to another family: Transformers would then build
    the architecture from a config it does not describe)."""
    data = _config_json(path)
    archs = data.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else "none given"
    if arch not in SUPPORTED:
        raise ConfigError(f"{path}: architecture {arch} is not supported by source \"hf\" "
                          f"(supported: {', '.join(SUPPORTED)})")
    model_type = data.get("model_type")
    if model_type != MODEL_TYPES[arch]:
        raise ConfigError(f"{path / 'config.json'}: model_type {model_type!r} contradicts "
                          f"architectures {arch} (which is model_type {MODEL_TYPES[arch]!r}); "
                          "the folder's config does not describe its model")
    return arch


def _weights_file(path: Path) -> Path:
    """The weights file Transformers reads from the folder (its order: safetensors first)."""
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"{path} has config.json but no weights (expected one of "
                          f"{', '.join(WEIGHT_FILES)})")


def _shards(index: Path) -> list[Path]:
    """The shard files an index names, each a plain file name inside the model folder: a name
    that leaves the folder (``../x``, an absolute path) is refused before anything reads it.
    A shard that is a symbolic link is followed (the Hugging Face cache's layout)."""
    from ..core.fileio import read_json_object
    data = read_json_object(index, CheckpointError, "weights index")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"corrupt weights index {index}: no 'weight_map' object")
    names = []
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"corrupt weights index {index}: '{key}' maps to {name!r}")
        parts = Path(name).parts
        if (Path(name).is_absolute() or "\\" in name or "\0" in name or not parts
                or any(p in ("..", ".") for p in parts)):
            raise CheckpointError(f"weights index {index} names shard {name!r} for '{key}', "
                                  "which leaves the model folder: refusing to read it")
        if name not in names:
            names.append(name)
    for name in names:
        shard = index.parent / name
        if not shard.is_file():
            raise CheckpointError(f"weights index {index} names shard {name}, which is not a "
                                  "file in the model folder")
    return [index.parent / n for n in names]


def _check_weights(path: Path) -> None:
    weights = _weights_file(path)
    if weights.name.endswith(".index.json"):
        _shards(weights)


def file_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape in the folder's weights (headers only for safetensors)."""
    weights = _weights_file(path)
    files = _shards(weights) if weights.name.endswith(".index.json") else [weights]
    out: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            if file.suffix == ".safetensors":
                from safetensors import safe_open
                with safe_open(str(file), "pt") as f:
                    for key in f.keys():
                        out[key] = tuple(f.get_slice(key).get_shape())
            else:
                from .weights import read_state_dict
                out.update({k: tuple(v.shape) for k, v in read_state_dict(file).items()})
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for a corrupt file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"corrupt weights file {file}: {first}") from None
    return out


def check_hf_keys(hf: nn.Module, have: dict[str, tuple[int, ...]], path: Path,
                  derived: tuple[str, ...]) -> None:
    """Every weight of the loaded Transformers model came from the folder's file: Transformers
    initialises a missing one at random (with only a notice), which would build a model that
    is not the user's. A key counts as present when the file holds it or a key tied to it (one
    storage: T5's shared embedding and LM head); keys Transformers declares it never saves
    (recomputed on load: Marian's sinusoidal positions) and ``[model] derived_keys`` may be
    absent; file keys Transformers declares unused (T5's legacy cross-attention bias) are
    ignored. Anything else missing, unexpected or of another shape is one CheckpointError."""
    import re

    from .weights import key_mismatch

    state = hf.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for key, t in state.items():
        if t.numel():
            groups.setdefault(t.untyped_storage().data_ptr(), []).append(key)
    covered = {k for g in groups.values() if any(k2 in have for k2 in g) for k in g}
    never_saved = list(getattr(hf, "_keys_to_ignore_on_save", None) or [])
    unused = list(getattr(hf, "_keys_to_ignore_on_load_unexpected", None) or [])
    want = {k: tuple(t.shape) for k, t in state.items()
            if not (k in covered and k not in have)
            and not any(re.search(p, k) for p in never_saved if k not in have)}
    file = {k: s for k, s in have.items() if k in state or not any(re.search(p, k)
                                                                    for p in unused)}
    problem, _ = key_mismatch(file, want, derived)
    if problem:
        raise CheckpointError(f"the weights in {path} do not match its config.json: {problem}")


def _hf_config(path: Path) -> Any:
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a bad config
        raise ConfigError(f"cannot read {path / 'config.json'}: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


@dataclass(frozen=True)
class Geometry:
    """What the graphs need from the Transformers config, family by family."""

    family: str
    vocab_size: int
    d_model: int
    heads: int  # decoder attention heads (the cache's)
    head_dim: int
    encoder_layers: int
    decoder_layers: int
    d_ff: int
    max_len: int
    pad_id: int


def geometry(arch: str, hc: Any) -> Geometry:
    pad = hc.pad_token_id if hc.pad_token_id is not None else 0
    if arch == T5:
        return Geometry(arch, hc.vocab_size, hc.d_model, hc.num_heads, hc.d_kv, hc.num_layers,
                        hc.num_decoder_layers, hc.d_ff, T5_MAX_LEN, pad)
    if arch == MARIAN and hc.decoder_vocab_size != hc.vocab_size:
        raise ConfigError(f"Marian with decoder_vocab_size {hc.decoder_vocab_size} != vocab_size "
                          f"{hc.vocab_size} is not supported (one vocabulary for src and tgt ids)")
    if hc.d_model % hc.decoder_attention_heads:
        raise ConfigError(f"d_model {hc.d_model} is not divisible by decoder_attention_heads "
                          f"{hc.decoder_attention_heads}")
    return Geometry(arch, hc.vocab_size, hc.d_model, hc.decoder_attention_heads,
                    hc.d_model // hc.decoder_attention_heads, hc.encoder_layers,
                    hc.decoder_layers, hc.encoder_ffn_dim, hc.max_position_embeddings, pad)


def _hmu_state(path: Path) -> dict[str, torch.Tensor]:
    from .weights import read_state_dict
    if not path.is_file():
        raise CheckpointError(f"HMU checkpoint not found: {path}")
    state = read_state_dict(path)
    if state and all(k.startswith("hmu.") for k in state):  # a "hmu."-prefixed export
        state = {k[4:]: v for k, v in state.items()}
    return state


def _checkpoint_latent(path: Path, d_model: int) -> int:
    w = _hmu_state(path).get("vae.mu.weight")
    if w is None or w.ndim != 2:
        raise CheckpointError(f"HMU checkpoint {path} has no 2-D vae.mu.weight "
                              "(expected the HMU keys vae.*, norm_*, gate_mlp.0.*, fusion_proj.*)")
    if w.shape[1] != d_model:
        raise CheckpointError(f"HMU checkpoint {path} is for d_model {w.shape[1]}, the model at "
                              f"model.path has d_model {d_model}")
    return int(w.shape[0])


def resolve_config(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with the architecture fields read from the folder's config.json.

    latent_dim: the HMU checkpoint's when one is given (a different explicit value is an
    error); else d_model // 2 unless the TOML set a value other than ModelConfig's default.
    """
    path = _folder(cfg)
    arch = architecture(path)
    _check_weights(path)
    if cfg.hmu_position != "after_encoder":
        raise ConfigError('source "hf" puts the HMU after the encoder: model.hmu_position must '
                          f"be after_encoder, got {cfg.hmu_position!r}")
    if cfg.is_classifier:
        raise ConfigError('source "hf" is a seq2seq model: model.num_classes must be 0')
    g = geometry(arch, _hf_config(path))
    latent = cfg.latent_dim if cfg.latent_dim != _DEFAULT_LATENT else max(1, g.d_model // 2)
    if cfg.hmu_checkpoint and cfg.use_hmu:
        found = _checkpoint_latent(Path(cfg.hmu_checkpoint), g.d_model)
        if cfg.latent_dim != _DEFAULT_LATENT and cfg.latent_dim != found:
            raise CheckpointError(f"HMU checkpoint {cfg.hmu_checkpoint} has latent_dim {found}, "
                                  f"the config sets model.latent_dim = {cfg.latent_dim}")
        latent = found
    return replace(cfg, vocab_size=g.vocab_size, d_model=g.d_model, n_heads=g.heads,
                   n_encoder_layers=g.encoder_layers, n_decoder_layers=g.decoder_layers,
                   d_ff=g.d_ff, max_len=g.max_len, pad_id=g.pad_id, latent_dim=latent,
                   dropout=0.0)


@dataclass(frozen=True)
class HFGeneration:
    """Token ids and token-changing options of the folder's generation config."""

    bos_id: int  # decoder_start_token_id: the first decoder input, never part of the output
    eos_id: int  # the first one when the config lists several
    eos_ids: tuple[int, ...]
    pad_id: int
    #: [generation] keys the folder's generation config sets (strategy, beams, token rules)
    defaults: dict[str, Any] = field(default_factory=dict)
    #: options set to a token-changing value that no loop implements (name -> value)
    refused: dict[str, Any] = field(default_factory=dict)

    def refusal(self, where: Path | str) -> str:
        if not self.refused:
            return ""
        named = ", ".join(f"{k} = {v!r}" for k, v in self.refused.items())
        return (f"{where} sets {named}, which changes tokens and which hmu-export's generation "
                "loops do not implement")


def generation_settings(cfg: ModelConfig) -> HFGeneration:
    """Generation ids for ``[generation]`` (bos_id = decoder_start_token_id, eos_id) and the
    folder's decoding defaults, read from generation_config.json when the folder has one, else
    from config.json. Every value is checked where it enters: a wrong type or a token id outside
    the vocabulary is one ConfigError naming the file and the key."""
    from transformers import GenerationConfig
    path = _folder(cfg)
    hc = _hf_config(path)
    file = path / "generation_config.json"
    try:
        gc = (GenerationConfig.from_pretrained(str(path), local_files_only=True)
              if file.is_file() else GenerationConfig.from_model_config(hc))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"cannot read {file}: {first}") from None
    where = str(file) if file.is_file() else str(path / "config.json")

    def pick(name: str) -> Any:
        v = getattr(gc, name, None)
        return v if v is not None else getattr(hc, name, None)

    def token(name: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{where}: {name} must be a token id (an integer), got {v!r}")
        vocab = getattr(hc, "vocab_size", None)
        if isinstance(vocab, int) and not 0 <= v < vocab:
            raise ConfigError(f"{where}: {name} {v} is outside the vocabulary [0, {vocab})")
        return v

    start = pick("decoder_start_token_id")
    start_key = "decoder_start_token_id"
    if start is None:
        start, start_key = pick("bos_token_id"), "bos_token_id"
    eos = pick("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    pad = pick("pad_token_id")
    if start is None or not eos_ids:
        raise ConfigError(f"{path}: the config names no decoder_start_token_id or eos_token_id")
    start = token(start_key, start)
    eos_ids = tuple(token("eos_token_id", e) for e in eos_ids)
    pad = 0 if pad is None else token("pad_token_id", pad)
    defaults, refused = _decoding_defaults(gc, where, getattr(hc, "vocab_size", None))
    if len(set(eos_ids)) > 1:
        # Transformers stops on any of them; the loops here (Python, Triton, C++) stop on one.
        refused["eos_token_id"] = list(eos_ids)
    return HFGeneration(start, eos_ids[0], eos_ids, pad, defaults, refused)


def _decoding_defaults(gc: Any, where: str = "generation_config.json",
                       vocab: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """([generation] values, refused options) of a Transformers GenerationConfig. Each value
    meets the [generation] TOML's types and the request schema's ranges
    (hmu_export/shipped/request_options.py); a bad one is a ConfigError naming ``where`` and its
    key, never a traceback."""
    from ..core.config import GenerationConfig, coerce_field
    from ..shipped import request_options as ro
    from ..shipped.token_rules import TokenRules

    def typed(hf_key: str, key: str, v: Any) -> Any:
        v = coerce_field(GenerationConfig, key, v, f"{where}: {hf_key}")
        if key in ro.KINDS:
            try:
                ro.check(key, v)
            except ro.OptionError as exc:
                raise ConfigError(f"{where}: {exc}" if hf_key == key
                                  else f"{where}: {hf_key}: {exc}") from None
        return v

    out: dict[str, Any] = {}
    refused = {k: getattr(gc, k) for k, neutral in REFUSED_OPTIONS.items()
               if getattr(gc, k, neutral) not in (neutral, None)}
    beams = typed("num_beams", "num_beams", getattr(gc, "num_beams", None) or 1)
    do_sample = getattr(gc, "do_sample", None) or False
    if not isinstance(do_sample, bool):
        raise ConfigError(f"{where}: do_sample must be true or false, got {do_sample!r}")
    if do_sample:
        if beams > 1:
            refused["do_sample"] = f"True with num_beams = {beams} (beam sampling)"
        out["strategy"] = "sample"
        for key in SAMPLING_HONOURED:
            if getattr(gc, key, None) is not None:
                out[key] = typed(key, key, getattr(gc, key))
        refused.update({k: getattr(gc, k) for k, neutral in SAMPLING_REFUSED.items()
                        if getattr(gc, k, neutral) not in (neutral, None)})
    elif beams > 1:
        out["strategy"] = "beam"
    for hf_key, key in HONOURED_OPTIONS.items():
        v = getattr(gc, hf_key, None)
        if v is None:
            continue
        if hf_key == "early_stopping" and not isinstance(v, bool):
            refused[hf_key] = v  # "never": a different stopping rule
            continue
        if hf_key == "forced_eos_token_id" and isinstance(v, (list, tuple)):
            if len(v) != 1:
                refused[hf_key] = v
                continue
            v = v[0]
        out[key] = typed(hf_key, key, v)
    min_length = typed("min_length", "min_new_tokens", getattr(gc, "min_length", None) or 0)
    if min_length > 1:  # counts the decoder start token: min_length L = L - 1 new tokens
        out["min_new_tokens"] = max(int(out.get("min_new_tokens", 0)), min_length - 1)
    # Transformers' length limit: max_new_tokens when set, else max_length, which counts the
    # decoder start token of an encoder-decoder model (max_length 5 = 4 new tokens).
    max_new = getattr(gc, "max_new_tokens", None)
    max_length = getattr(gc, "max_length", None)
    if max_new is not None:
        out["max_new_tokens"] = typed("max_new_tokens", "max_new_tokens", max_new)
    elif max_length is not None:
        length = typed("max_length", "max_new_tokens", max_length)
        if length < 2:
            raise ConfigError(f"{where}: max_length {length} leaves no token to generate (it "
                              "counts the decoder start token)")
        out["max_new_tokens"] = length - 1
    rules = TokenRules.from_mapping(out)
    for problem in rules.problems(vocab) if isinstance(vocab, int) else []:
        raise ConfigError(f"{where}: {problem}")
    return out, refused


# ----------------------------------------------------------------------------- attention
def _split(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """[B, L, H*D] -> [B, H, L, D]."""
    return x.unflatten(-1, (heads, head_dim)).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
            scaling: float) -> torch.Tensor:
    """softmax(q k^T * scaling + bias) v, merged back to [B, Lq, H*D]."""
    scores = torch.matmul(q, k.transpose(-1, -2))
    if scaling != 1.0:
        scores = scores * scaling
    probs = torch.softmax(scores + bias, dim=-1)
    return torch.matmul(probs, v).transpose(1, 2).flatten(2)


def _padding_bias(src_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, 1, Ls]: 0 for tokens, the dtype's minimum for padding (as Transformers does)."""
    pad = (src_mask[:, None, None, :] == 0).to(dtype)
    return pad * torch.finfo(dtype).min


def _causal_bias(positions: torch.Tensor, total: int, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, new, total]: query at absolute position p sees keys 0..p."""
    keys = torch.arange(total, device=positions.device)
    future = (keys[None, :] > positions[:, None]).to(dtype)
    return (future * torch.finfo(dtype).min)[None, None]


def _positions(new_len: int, past_len: int | torch.SymInt, device: torch.device) -> torch.Tensor:
    return torch.arange(new_len, device=device) + past_len  # type: ignore[return-value]


def _row_state(tgt_ids: torch.Tensor, past: list[torch.Tensor],
               positions: torch.Tensor | None, past_mask: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [B, new], past_mask [B, past]) of a decoder step: as given (the decoder
    contract's per-row state), else every row holding past = past_key.shape[2] tokens."""
    batch, new = tgt_ids.shape
    past_len = past[0].shape[2]
    if positions is None:
        positions = _positions(new, past_len, tgt_ids.device).expand(batch, new)
    if past_mask is None:
        past_mask = torch.ones((batch, past_len), dtype=torch.long, device=tgt_ids.device)
    return positions, past_mask


def _row_self_bias(past_mask: torch.Tensor, new: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, new, past+new]: every new token sees its row's real cache slots (never a padding
    slot) and the new tokens up to itself; the dtype's minimum elsewhere."""
    batch, past_len = past_mask.shape
    low = torch.finfo(dtype).min
    slots = ((past_mask == 0).to(dtype) * low)[:, None, None, :].expand(batch, 1, new, past_len)
    idx = torch.arange(new, device=past_mask.device)
    causal = ((idx[None, :] > idx[:, None]).to(dtype) * low)[None, None].expand(batch, 1, new, new)
    return torch.cat([slots, causal], dim=-1)


# ----------------------------------------------------------------------------- model
class HFHMUModel(nn.Module):
    """A Transformers seq2seq model with an HMU on its encoder output. ``hf`` holds the
    Transformers model (its weights are the only parameters besides ``hmu``)."""

    def __init__(self, hf: nn.Module, hmu: nn.Module, geom: Geometry) -> None:
        super().__init__()
        self.hf: Any = hf  # Transformers' modules: their attributes are not typed
        self.hmu = hmu
        self.geom = geom

    # The three pieces every graph is made of ------------------------------------
    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """The encoder's last_hidden_state [B, Ls, d_model]."""
        raise NotImplementedError

    def cross_kv(self, memory: torch.Tensor) -> list[torch.Tensor]:
        """[cross_key.0, cross_value.0, cross_key.1, ...], each [B, H, Ls, head_dim]."""
        raise NotImplementedError

    def decode(self, tgt_ids: torch.Tensor, src_mask: torch.Tensor, cross: list[torch.Tensor],
               past: list[torch.Tensor] | None, positions: torch.Tensor | None = None,
               past_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits [B, new, V] of ``tgt_ids`` after ``past`` ([past_key.0, past_value.0, ...] or
        None for the full graph: one sequence from position 0), and the presents (past + new
        keys/values per layer). A step takes the decoder contract's per-row ``positions``
        [B, new] and ``past_mask`` [B, past] (None: every row holds the whole past)."""
        raise NotImplementedError

    # Compositions -------------------------------------------------------------------
    def memory(self, src_ids: torch.Tensor, src_mask: torch.Tensor,
               noise: torch.Tensor) -> torch.Tensor:
        return self.hmu(self.encode(src_ids, src_mask), noise)

    def forward(self, src_ids: torch.Tensor, src_mask: torch.Tensor, tgt_ids: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, Lt, V] of tgt_ids (decoder input ids)."""
        memory = self.memory(src_ids, src_mask, noise)
        return self.decode(tgt_ids, src_mask, self.cross_kv(memory), None)[0]


class _T5(HFHMUModel):
    enc_buckets: torch.Tensor
    dec_buckets: torch.Tensor

    def __init__(self, hf: Any, hmu: nn.Module, geom: Geometry) -> None:
        super().__init__(hf, hmu, geom)
        # bucket[rel + md] for rel in [-md, md] (md = max_distance): every |rel| >= md lands in
        # the last bucket, so clamping rel to that range is exact. Built here, with
        # Transformers' own bucket function, so the graphs hold a lookup table, not its logs.
        from transformers.models.t5.modeling_t5 import T5Attention
        for name, stack in (("enc_buckets", hf.encoder), ("dec_buckets", hf.decoder)):
            att = stack.block[0].layer[0].SelfAttention
            md = att.relative_attention_max_distance
            table = T5Attention._relative_position_bucket(
                torch.arange(-md, md + 1, dtype=torch.long), bidirectional=not stack.is_decoder,
                num_buckets=att.relative_attention_num_buckets, max_distance=md)
            self.register_buffer(name, table, persistent=False)

    def _embed(self, stack: Any, ids: torch.Tensor) -> torch.Tensor:
        return stack.embed_tokens(ids)

    def _position_bias(self, stack: Any, queries: torch.Tensor, total: int) -> torch.Tensor:
        """[1, H, len(queries), total]: the first block's relative position bias."""
        att = stack.block[0].layer[0].SelfAttention
        md = att.relative_attention_max_distance
        table = self.dec_buckets if stack.is_decoder else self.enc_buckets
        keys = torch.arange(total, device=queries.device)
        rel = (keys[None, :] - queries[:, None]).clamp(-md, md) + md
        return att.relative_attention_bias(table[rel]).permute(2, 0, 1)[None]

    def _self_attention(self, layer: Any, h: torch.Tensor, bias: torch.Tensor,
                        past_k: torch.Tensor | None = None, past_v: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        att = layer.SelfAttention
        x = layer.layer_norm(h)
        hd, nh = att.key_value_proj_dim, att.n_heads
        q, k, v = _split(att.q(x), nh, hd), _split(att.k(x), nh, hd), _split(att.v(x), nh, hd)
        if past_k is not None and past_v is not None:
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        return h + att.o(_attend(q, k, v, bias, 1.0)), k, v

    def encode(self, src_ids, src_mask):  # type: ignore[no-untyped-def]
        enc = self.hf.encoder
        h = self._embed(enc, src_ids)
        queries = torch.arange(src_ids.shape[1], device=src_ids.device)
        bias = self._position_bias(enc, queries, src_ids.shape[1]) + _padding_bias(src_mask,
                                                                                   h.dtype)
        for block in enc.block:
            h = self._self_attention(block.layer[0], h, bias)[0]
            h = block.layer[-1](h)
        return enc.final_layer_norm(h)

    def cross_kv(self, memory):  # type: ignore[no-untyped-def]
        out = []
        for block in self.hf.decoder.block:
            att = block.layer[1].EncDecAttention
            hd, nh = att.key_value_proj_dim, att.n_heads
            out += [_split(att.k(memory), nh, hd), _split(att.v(memory), nh, hd)]
        return out

    def _row_position_bias(self, stack: Any, queries: torch.Tensor, keys: torch.Tensor
                           ) -> torch.Tensor:
        """[B, H, new, total]: the first block's relative position bias per row, for query
        positions [B, new] against key positions [B, total]."""
        att = stack.block[0].layer[0].SelfAttention
        md = att.relative_attention_max_distance
        table = self.dec_buckets if stack.is_decoder else self.enc_buckets
        rel = (keys[:, None, :] - queries[:, :, None]).clamp(-md, md) + md
        return att.relative_attention_bias(table[rel]).permute(0, 3, 1, 2)

    def decode(self, tgt_ids, src_mask, cross, past, positions=None, past_mask=None):  # type: ignore[no-untyped-def]
        dec = self.hf.decoder
        h = self._embed(dec, tgt_ids)
        new = tgt_ids.shape[1]
        if past is None:  # the full graph: one sequence from position 0
            queries = _positions(new, 0, tgt_ids.device)
            self_bias = self._position_bias(dec, queries, new) + _causal_bias(queries, new,
                                                                              h.dtype)
        else:  # a step: per-row positions; a real slot's position is its rank among real slots
            positions, past_mask = _row_state(tgt_ids, past, positions, past_mask)
            keys = torch.cat([torch.cumsum(past_mask, dim=1) - 1, positions], dim=1)
            self_bias = (self._row_position_bias(dec, positions, keys)
                         + _row_self_bias(past_mask, new, h.dtype))
        cross_bias = _padding_bias(src_mask, h.dtype)
        presents = []
        for i, block in enumerate(dec.block):
            pk, pv = (past[2 * i], past[2 * i + 1]) if past is not None else (None, None)
            h, k, v = self._self_attention(block.layer[0], h, self_bias, pk, pv)
            presents += [k, v]
            ca = block.layer[1]
            att = ca.EncDecAttention
            q = _split(att.q(ca.layer_norm(h)), att.n_heads, att.key_value_proj_dim)
            h = h + att.o(_attend(q, cross[2 * i], cross[2 * i + 1], cross_bias, 1.0))
            h = block.layer[-1](h)
        h = dec.final_layer_norm(h)
        config = self.hf.config  # Transformers < 5 scales exactly when the head is tied
        if getattr(config, "scale_decoder_outputs", config.tie_word_embeddings):
            h = h * (self.hf.model_dim ** -0.5)
        return self.hf.lm_head(h), presents


class _Bart(HFHMUModel):
    """BART and Marian (post-norm layers; they differ in embeddings and positions)."""

    @property
    def _marian(self) -> bool:
        return self.geom.family == MARIAN

    def _embed(self, stack: Any, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self._marian:
            h = stack.embed_tokens(ids) * stack.embed_scale
            return h + nn.functional.embedding(positions, stack.embed_positions.weight)
        h = stack.embed_tokens(ids)  # BartScaledWordEmbedding applies embed_scale itself
        h = h + nn.functional.embedding(positions + stack.embed_positions.offset,
                                        stack.embed_positions.weight)
        return stack.layernorm_embedding(h)

    @staticmethod
    def _qkv(att: Any, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        nh, hd = att.num_heads, att.head_dim
        return (_split(att.q_proj(x), nh, hd), _split(att.k_proj(x), nh, hd),
                _split(att.v_proj(x), nh, hd))

    @staticmethod
    def _ffn(layer: Any, h: torch.Tensor) -> torch.Tensor:
        return layer.final_layer_norm(h + layer.fc2(layer.activation_fn(layer.fc1(h))))

    def encode(self, src_ids, src_mask):  # type: ignore[no-untyped-def]
        enc = self.hf.model.encoder
        h = self._embed(enc, src_ids, _positions(src_ids.shape[1], 0, src_ids.device))
        bias = _padding_bias(src_mask, h.dtype)
        for layer in enc.layers:
            att = layer.self_attn
            q, k, v = self._qkv(att, h)
            h = layer.self_attn_layer_norm(h + att.out_proj(_attend(q, k, v, bias, att.scaling)))
            h = self._ffn(layer, h)
        return h

    def cross_kv(self, memory):  # type: ignore[no-untyped-def]
        out = []
        for layer in self.hf.model.decoder.layers:
            att = layer.encoder_attn
            out += [_split(att.k_proj(memory), att.num_heads, att.head_dim),
                    _split(att.v_proj(memory), att.num_heads, att.head_dim)]
        return out

    def decode(self, tgt_ids, src_mask, cross, past, positions=None, past_mask=None):  # type: ignore[no-untyped-def]
        dec = self.hf.model.decoder
        new = tgt_ids.shape[1]
        if past is None:  # the full graph: one sequence from position 0
            positions = _positions(new, 0, tgt_ids.device)
            h = self._embed(dec, tgt_ids, positions)
            self_bias = _causal_bias(positions, new, h.dtype)
        else:
            positions, past_mask = _row_state(tgt_ids, past, positions, past_mask)
            h = self._embed(dec, tgt_ids, positions)
            self_bias = _row_self_bias(past_mask, new, h.dtype)
        cross_bias = _padding_bias(src_mask, h.dtype)
        presents = []
        for i, layer in enumerate(dec.layers):
            att = layer.self_attn
            q, k, v = self._qkv(att, h)
            if past is not None:
                k, v = torch.cat([past[2 * i], k], dim=2), torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            h = layer.self_attn_layer_norm(h + att.out_proj(_attend(q, k, v, self_bias,
                                                                    att.scaling)))
            ca = layer.encoder_attn
            q = _split(ca.q_proj(h), ca.num_heads, ca.head_dim)
            a = _attend(q, cross[2 * i], cross[2 * i + 1], cross_bias, ca.scaling)
            h = layer.encoder_attn_layer_norm(h + ca.out_proj(a))
            h = self._ffn(layer, h)
        return self.hf.lm_head(h) + self.hf.final_logits_bias, presents


# ----------------------------------------------------------------------------- graphs
class _Full(nn.Module):
    """(src_ids, src_mask, tgt_ids, noise) -> (logits,) [+ encoder_out, hmu_gate, hmu_out]."""

    def __init__(self, model: HFHMUModel, diagnostics: bool = False) -> None:
        super().__init__()
        self.model = model
        self.diagnostics = diagnostics

    def forward(self, src_ids, src_mask, tgt_ids, noise):  # type: ignore[no-untyped-def]
        m = self.model
        if not self.diagnostics:
            return (m(src_ids, src_mask, tgt_ids, noise),)
        v = m.encode(src_ids, src_mask)
        if isinstance(m.hmu, HMU):
            trace = m.hmu.trace(v, noise)
            out, gate = trace.out, trace.gate
        else:
            out, gate = m.hmu(v, noise), torch.ones_like(v)
        logits = m.decode(tgt_ids, src_mask, m.cross_kv(out), None)[0]
        return logits, v, gate, out


class _Encoder(nn.Module):
    """(src_ids, src_mask, noise) -> (memory, cross_key.0, cross_value.0, ...)."""

    def __init__(self, model: HFHMUModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, src_ids, src_mask, noise):  # type: ignore[no-untyped-def]
        memory = self.model.memory(src_ids, src_mask, noise)
        return (memory, *self.model.cross_kv(memory))


class _Decoder(nn.Module):
    """(tgt_ids, src_mask, positions, past_mask, cross_key.0, cross_value.0, ..., past_key.0,
    past_value.0, ...) -> (logits, present_key.0, present_value.0, ...): one graph for past_len
    0 and every step, rows at different steps in one batch."""

    def __init__(self, model: HFHMUModel) -> None:
        super().__init__()
        self.model = model
        self.layers = model.geom.decoder_layers

    def forward(self, tgt_ids, src_mask, positions, past_mask, *kv):  # type: ignore[no-untyped-def]
        n = 2 * self.layers
        if len(kv) != 2 * n:
            raise TypeError(f"decoder step takes {2 * n} cache tensors, got {len(kv)}")
        logits, presents = self.model.decode(tgt_ids, src_mask, list(kv[:n]), list(kv[n:]),
                                             positions, past_mask)
        return (logits, *presents)


# ----------------------------------------------------------------------------- source
def _load_hf(path: Path, arch: str, derived: tuple[str, ...] = ()) -> nn.Module:
    """Transformers' model of the folder, every weight checked against the file (check_hf_keys)."""
    import transformers
    from transformers.utils import logging as hf_logging
    cls = getattr(transformers, arch)
    have = file_tensor_shapes(path)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the tool shows its own progress
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report: the check below says it in one line
    try:
        model = cls.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager",
                                    local_files_only=True)
    except Exception as exc:  # transformers raises many types for bad weights
        _name_shape_mismatch(cls, path, have)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot load {arch} from {path}: {first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    check_hf_keys(model, have, path, derived)
    return model.eval()


def _name_shape_mismatch(cls: Any, path: Path, have: dict[str, tuple[int, ...]]) -> None:
    """When loading failed over tensors whose shapes the config contradicts, say which (and
    which are unexpected)."""
    import re

    from .weights import key_mismatch
    try:
        with torch.device("meta"):
            skeleton = cls._from_config(_hf_config(path), attn_implementation="eager")
        want = {k: tuple(t.shape) for k, t in skeleton.state_dict().items()}
    except Exception:  # noqa: BLE001 - only a better message was at stake
        return
    unused = list(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or [])
    odd = {k: s for k, s in have.items() if tuple(want.get(k, s)) != s or (
        k not in want and not any(re.search(p, k) for p in unused))}
    if odd:
        problem, _ = key_mismatch(odd, {k: want[k] for k in odd if k in want})
        raise CheckpointError(f"the weights in {path} do not match its config.json: {problem}")


def build_hmu(cfg: ModelConfig) -> tuple[nn.Module, bool]:
    """(HMU, trained): loaded from ``hmu_checkpoint`` with exact key and shape checks, or
    seeded with ``cfg.seed`` (untrained); an identity when ``use_hmu`` is false."""
    if not cfg.use_hmu:
        return IdentityHMU(), False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        hmu = HMU(cfg.d_model, cfg.latent_dim)
    if not cfg.hmu_checkpoint:
        return hmu, False
    path = Path(cfg.hmu_checkpoint)
    state = _hmu_state(path)
    want = hmu.state_dict()
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"]
                 if missing else []) + ([f"unexpected {', '.join(extra[:4])}"
                                         f"{' ...' if len(extra) > 4 else ''}"] if extra else [])
        raise CheckpointError(f"HMU checkpoint {path} does not hold the HMU's keys: "
                              f"{'; '.join(parts)}")
    for key, ref in want.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"HMU checkpoint {path}: {key} has shape {list(state[key].shape)}, the model "
                f"(d_model {cfg.d_model}, latent_dim {cfg.latent_dim}) needs {list(ref.shape)}")
    hmu.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return hmu, True


class HFSource(ModelSource):
    source = "hf"

    def __init__(self, cfg: ModelConfig, model: HFHMUModel, hmu_trained: bool) -> None:
        super().__init__(cfg)
        self.model = model
        #: False when the HMU was seeded (no hmu_checkpoint): manifests say "untrained"
        self.hmu_trained = hmu_trained

    def save(self, folder: Path) -> tuple[Path, Path]:
        """The generic checkpoint plus the base model's config.json and the folder's tokenizer
        (``load_saved`` rebuilds the architecture from them)."""
        out = super().save(folder)
        save_hf_config(self, folder)
        return out

    @property
    def hmu_status(self) -> str:
        if not self.cfg.use_hmu:
            return "off"
        return "trained" if self.hmu_trained else f"untrained (seeded with model.seed {self.cfg.seed})"

    @functools.cached_property
    def _generation(self) -> HFGeneration | None:
        """The folder's generation settings, read once (None when rebuilt from a build: its
        [generation] already holds them)."""
        return generation_settings(self.cfg) if self.cfg.path else None

    def generation_defaults(self) -> dict[str, Any]:
        g = self._generation
        return {} if g is None else {"bos_id": g.bos_id, "eos_id": g.eos_id, **g.defaults}

    def generation_options_refusal(self) -> str:
        g = self._generation
        return "" if g is None else g.refusal(Path(self.cfg.path) / "generation_config.json")

    @property
    def hf_model(self) -> nn.Module:
        """The Transformers model itself (the parity oracle's model)."""
        return self.model.hf

    def torch_module(self) -> nn.Module:
        return self.model

    def cache_layout(self) -> CacheLayout:
        g = self.model.geom
        return CacheLayout(g.decoder_layers, g.heads, g.head_dim)

    def module(self, graph: str, diagnostics: bool = False) -> nn.Module:
        if graph == FULL:
            return _Full(self.model, diagnostics)
        if graph == ENCODER:
            return _Encoder(self.model)
        if graph == DECODER:
            return _Decoder(self.model)
        raise KeyError(f"hf source has no '{graph}' graph")


def load_source(cfg: ModelConfig) -> HFSource:
    """The resolved config's model: Transformers weights from ``path``, the HMU inserted."""
    path = _folder(cfg)
    arch = architecture(path)
    _check_weights(path)
    hf = _load_hf(path, arch, cfg.derived_keys)
    geom = geometry(arch, hf.config)
    if (geom.d_model, geom.vocab_size) != (cfg.d_model, cfg.vocab_size):
        raise ConfigError(f"model config (d_model {cfg.d_model}, vocab {cfg.vocab_size}) does not "
                          f"match {path} (d_model {geom.d_model}, vocab {geom.vocab_size}): "
                          "resolve the config first")
    hmu, trained = build_hmu(cfg)
    core = (_T5 if arch == T5 else _Bart)(hf, hmu, geom)
    source = HFSource(cfg, core.eval(), trained)
    if tokenizer_files(path):  # it travels with the build: check it now, not at generate
        from .tokenizer import check_tokenizer
        gen = source._generation
        check_tokenizer(path, geom.vocab_size, gen.eos_ids if gen is not None else ())
    return source


HF_CONFIG_DIR = "hf"  # inside a build's checkpoint/: the Transformers config of the base model


def save_hf_config(source: HFSource, folder: Path) -> Path:
    """The base model's config.json (no weights: they are in the build's model.safetensors),
    so ``load_saved`` can rebuild the same architecture from the build alone."""
    out = Path(folder) / HF_CONFIG_DIR
    out.mkdir(parents=True, exist_ok=True)
    source.hf_model.config.to_json_file(str(out / "config.json"))
    (out / "hmu.json").write_text(json.dumps({"trained": source.hmu_trained}) + "\n")
    # The folder's tokenizer, when it has one, travels with the build (`generate --text`).
    src = Path(source.cfg.path) if source.cfg.path else None
    if src is not None and src.is_dir():
        copy_tokenizer(src, out)
    return out / "config.json"


def load_saved(cfg: ModelConfig, weights: Path) -> HFSource:
    """An hf source rebuilt from a build's checkpoint/: architecture from ``hf/config.json``,
    every weight (base model and HMU) from ``model.safetensors``."""
    import transformers

    from .weights import read_state_dict

    conf = Path(weights).parent / HF_CONFIG_DIR / "config.json"
    if not conf.is_file():
        raise CheckpointError(f"{conf} not found: this build's checkpoint cannot be rebuilt")
    arch = architecture(conf.parent)
    hf_conf = transformers.AutoConfig.from_pretrained(str(conf.parent), local_files_only=True)
    hf = getattr(transformers, arch)._from_config(hf_conf, attn_implementation="eager",
                                                  dtype=torch.float32)
    geom = geometry(arch, hf.config)
    hmu, _ = build_hmu(replace(cfg, hmu_checkpoint=""))
    core = (_T5 if arch == T5 else _Bart)(hf, hmu, geom)
    state = read_state_dict(Path(weights))
    try:
        missing, unexpected = core.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of another shape
        raise CheckpointError(f"{weights} does not match {conf}: "
                              f"{str(exc).strip().splitlines()[-1].strip()}") from None
    tied = {k for k in missing if k.endswith(("embed_tokens.weight", "lm_head.weight"))}
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"{weights} does not match {conf}: missing "
                              f"{sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]}")
    status = conf.parent / "hmu.json"
    trained = bool(json.loads(status.read_text()).get("trained")) if status.is_file() else False
    return HFSource(cfg, core.eval(), trained)
