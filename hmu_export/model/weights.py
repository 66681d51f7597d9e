"""Checkpoints: safetensors weights + a JSON model config. Pickles are never unpickled freely."""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

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
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata=METADATA)
    cfg = replace(model.cfg, checkpoint="")
    write_json(config, asdict(cfg))
    return weights, config


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
    check_regular_file(path)
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


def load_weights(model: HMUTransformer, path: Path) -> None:
    """Load weights into ``model``, naming the first missing, unexpected or mis-shaped tensor."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing:
        raise CheckpointError(f"checkpoint {path} does not match the config: missing "
                              f"{len(missing)} tensor(s), e.g. '{missing[0]}'")
    if unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the config: unexpected "
                              f"tensor '{unexpected[0]}'")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise CheckpointError(f"checkpoint {path} does not match the config: '{key}' has "
                                  f"shape {list(tensor.shape)}, expected {list(own[key].shape)}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"checkpoint {path}: '{key}' has dtype {tensor.dtype}")
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            raise CheckpointError(f"checkpoint {path}: '{key}' holds "
                                  f"{int((~finite).sum())} non-finite value(s) (NaN or Inf)")
    model.load_state_dict({k: v.float() for k, v in state.items()})


def build_model(cfg: ModelConfig) -> HMUTransformer:
    """The seeded model for ``cfg``, with the checkpoint's weights when one is named."""
    if cfg.checkpoint:
        check_saved_config(cfg, Path(cfg.checkpoint))
    model = HMUTransformer(cfg)
    if cfg.checkpoint:
        load_weights(model, Path(cfg.checkpoint))
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


def load_checkpoint(folder: Path) -> HMUTransformer:
    """A model from a folder written by ``save_checkpoint``."""
    config = folder / CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(f"checkpoint config not found: {config}")
    data = read_json_object(config, CheckpointError, "checkpoint config")
    try:
        cfg = build_section(ModelConfig, data, "model")
        cfg.validate()
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint config {config}: {exc}") from None
    model = HMUTransformer(cfg)
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
