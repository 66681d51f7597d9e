"""Checkpoints: safetensors weights + a JSON model config. Pickles are never unpickled freely."""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from ..core.config import ModelConfig, build_section
from ..core.errors import CheckpointError, ConfigError
from ..core.fileio import atomic_path, read_json_object, write_json
from .transformer import HMUTransformer

if TYPE_CHECKING:
    from .interface import ModelSource

WEIGHTS_FILE = "model.safetensors"
#: One key only: safetensors writes its metadata map in a random order per process, so two keys
#: made the same weights hash differently from one build to the next (seen on the default build:
#: 33 header bytes differed), and with them every graph that records the checkpoint's sha256.
METADATA = {"format": "pt"}
CONFIG_FILE = "config.json"


def save_checkpoint(model: HMUTransformer, folder: Path) -> tuple[Path, Path]:
    """Write ``model.safetensors`` and ``config.json`` atomically; returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    with atomic_path(weights) as tmp:
        write_checkpoint_weights(model, tmp)
    with atomic_path(config) as tmp:
        write_checkpoint_config(model, tmp)
    return weights, config


def write_checkpoint_weights(model: HMUTransformer, path: Path) -> None:
    """The native checkpoint's ``model.safetensors`` bytes, written at ``path`` as it is."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=METADATA)


def write_checkpoint_config(model: HMUTransformer, path: Path) -> None:
    """The native checkpoint's ``config.json`` (its model config), written at ``path``."""
    import json

    text = json.dumps(asdict(replace(model.cfg, checkpoint="")), indent=2, sort_keys=True)
    Path(path).write_text(text + "\n", encoding="utf-8")


def check_regular_file(path: Path, what: str = "checkpoint") -> None:
    """``path`` is a regular file, or a CheckpointError that says what it is instead."""
    import stat

    try:
        mode = Path(path).stat().st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"{what} {path} is a directory: name the weights file in it "
                              f"(e.g. {Path(path) / WEIGHTS_FILE})")
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
                else "a block device" if stat.S_ISBLK(mode) else "a socket"
                if stat.S_ISSOCK(mode) else "special")
        raise CheckpointError(f"{what} {path} is not a regular file (it is {kind})")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, or from a weights-only torch file (no code executed)."""
    from ..core.fileio import pending_file_set

    check_regular_file(path)
    journal = pending_file_set(path)
    if journal is not None:
        raise CheckpointError(f"{path} is one of several files whose replacement was "
                              f"interrupted (journal {journal}): run the command that wrote "
                              "it again with the same output to finish it")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"corrupt safetensors checkpoint {path}: {exc}") from None
    if path.suffix in (".pt", ".pth", ".bin"):
        import warnings
        try:
            with warnings.catch_warnings():  # the refusal below says it in one line
                warnings.simplefilter("ignore")
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"refusing checkpoint {path}: not a weights-only file "
                                  f"({first})") from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
        return obj
    raise CheckpointError(f"unsupported checkpoint format '{path.suffix}' for {path} "
                          "(use .safetensors, or a weights-only .pt)")


def _names(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def is_derived(key: str, patterns: Sequence[str]) -> bool:
    """Whether ``key`` matches one of ``[model] derived_keys`` (names or fnmatch patterns)."""
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def key_mismatch(have: Mapping[str, Sequence[int]], want: Mapping[str, Sequence[int]],
                 derived: Sequence[str] = ()) -> tuple[str, list[str]]:
    """(problem, derived keys left out) of a checkpoint whose tensors have the shapes ``have``
    for a model whose state dict has the shapes ``want``: problem is "" when every key of the
    model is in the checkpoint with its shape, none is unexpected, and every missing one matches
    ``derived`` (the model recomputes those); else one line naming the keys."""
    missing = sorted(set(want) - set(have))
    left_out = [k for k in missing if is_derived(k, derived)]
    missing = [k for k in missing if k not in left_out]
    unexpected = sorted(set(have) - set(want))
    shaped = sorted(k for k in set(have) & set(want)
                    if tuple(have[k]) != tuple(want[k]))
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensor(s): {_names(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {_names(unexpected)}")
    if shaped:
        k = shaped[0]
        first = f"'{k}' is {list(have[k])}, the model's {list(want[k])}"
        parts.append(f"1 with another shape: {first}" if len(shaped) == 1 else
                     f"{len(shaped)} with another shape: {_names(shaped)} ({first})")
    problem = "; ".join(parts)
    if missing and not unexpected and not shaped:
        problem += (" (weights the model recomputes on load may be named in [model] "
                    "derived_keys)")
    return problem, left_out


def load_weights(model: HMUTransformer, path: Path, derived: Sequence[str] = ()) -> None:
    """Load weights into ``model``: every key of the model must be in the file with its shape
    (or be ``derived``: left as the model computes it), none unexpected, all finite; else one
    CheckpointError naming the keys."""
    state = read_state_dict(path)
    own = model.state_dict()
    problem, _ = key_mismatch({k: tuple(v.shape) for k, v in state.items()},
                              {k: tuple(v.shape) for k, v in own.items()}, derived)
    if problem:
        raise CheckpointError(f"checkpoint {path} does not match the config: {problem}")
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"checkpoint {path}: '{key}' has dtype {tensor.dtype}")
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            raise CheckpointError(f"checkpoint {path}: '{key}' holds "
                                  f"{int((~finite).sum())} non-finite value(s) (NaN or Inf)")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)


def build_model(cfg: ModelConfig) -> HMUTransformer:
    """The seeded model for ``cfg``, with the checkpoint's weights when one is named."""
    if cfg.checkpoint:
        check_saved_config(cfg, Path(cfg.checkpoint))
    model = HMUTransformer(cfg)
    if cfg.checkpoint:
        load_weights(model, Path(cfg.checkpoint), cfg.derived_keys)
    return model.eval()


# Fields that change what a checkpoint computes although every tensor keeps its shape
# (n_heads above all), or that its shapes follow.
ARCHITECTURE = ("vocab_size", "d_model", "n_heads", "n_encoder_layers", "n_decoder_layers",
                "d_ff", "latent_dim", "max_len", "use_hmu", "pad_id", "num_classes", "pool",
                "hmu_position")


def check_saved_config(cfg: ModelConfig, weights: Path) -> None:
    """When the weights' folder carries our config.json (``save_checkpoint`` writes one), the
    architecture it records must be the config's: same shapes can still be another model."""
    saved = Path(weights).parent / CONFIG_FILE
    if not saved.is_file():
        return
    data = read_json_object(saved, CheckpointError, "checkpoint config")
    fields = {f for f in ModelConfig.__dataclass_fields__}
    if not {"d_model", "n_heads"} <= set(data) or not set(data) <= fields:
        return  # another tool's config.json (e.g. Transformers'): not ours to compare
    try:
        ck = build_section(ModelConfig, data, "model")
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint config {saved}: {exc}") from None
    for key in ARCHITECTURE:
        if not hasattr(cfg, key):
            continue
        want, got = getattr(cfg, key), getattr(ck, key)
        if key == "n_heads":  # 0 means d_model // 32: compare what each resolves to
            want, got = getattr(cfg, "heads", want), getattr(ck, "heads", got)
        if want != got:
            raise CheckpointError(f"checkpoint {weights} does not match the config: it was "
                                  f"saved with model.{key} = {got!r} ({saved}), the config says "
                                  f"{want!r}")


def read_checkpoint_config(folder: Path) -> ModelConfig:
    """The validated model config a checkpoint folder records (any source), or one line."""
    config = folder / CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(f"checkpoint config not found: {config}")
    data = read_json_object(config, CheckpointError, "checkpoint config")
    try:
        cfg = build_section(ModelConfig, data, "model")
        cfg.validate()
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint config {config}: {exc}") from None
    return cfg


def load_checkpoint(folder: Path) -> HMUTransformer:
    """A model from a folder written by ``save_checkpoint``."""
    model = HMUTransformer(read_checkpoint_config(folder))
    load_weights(model, folder / WEIGHTS_FILE)
    return model.eval()


def save_source_state(source: "ModelSource", folder: Path) -> tuple[Path, Path]:
    """The generic ``checkpoint/`` of a source: its module's state dict under its own key names
    and its resolved config (paths dropped: the build holds everything)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    # Tied weights (a shared embedding and LM head) are one storage, which safetensors refuses
    # to write twice: every later tensor of a storage already seen is cloned (only those, so
    # saving does not double the model's memory).
    state, seen = {}, set()
    for k, v in source.torch_module().state_dict().items():
        ptr = v.untyped_storage().data_ptr()
        state[k] = (v.detach().clone() if ptr in seen else v.detach()).contiguous()
        seen.add(ptr)
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata=METADATA)
    write_json(config, asdict(replace(source.cfg, checkpoint="", path="", hmu_checkpoint="")))
    return weights, config
