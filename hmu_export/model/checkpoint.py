"""Checkpoints: safetensors weights + a JSON model config. Pickles are never unpickled freely."""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..config import ModelConfig, _build
from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_path, read_json_object, write_json
from .transformer import HMUTransformer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_checkpoint(model: HMUTransformer, folder: Path) -> tuple[Path, Path]:
    """Write ``model.safetensors`` and ``config.json`` atomically; returns both paths."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "producer": "hmu_export"})
    cfg = replace(model.cfg, checkpoint="")
    write_json(config, asdict(cfg))
    return weights, config


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, or from a weights-only torch file (no code executed)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"corrupt safetensors checkpoint {path}: {exc}") from None
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
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
    model.load_state_dict({k: v.float() for k, v in state.items()})


def build_model(cfg: ModelConfig) -> HMUTransformer:
    """The seeded model for ``cfg``, with the checkpoint's weights when one is named."""
    model = HMUTransformer(cfg)
    if cfg.checkpoint:
        load_weights(model, Path(cfg.checkpoint))
    return model.eval()


def load_checkpoint(folder: Path) -> HMUTransformer:
    """A model from a folder written by ``save_checkpoint``."""
    config = folder / CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(f"checkpoint config not found: {config}")
    data = read_json_object(config, CheckpointError, "checkpoint config")
    try:
        cfg = _build(ModelConfig, data, "model")
        cfg.validate()
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint config {config}: {exc}") from None
    model = HMUTransformer(cfg)
    load_weights(model, folder / WEIGHTS_FILE)
    return model.eval()
