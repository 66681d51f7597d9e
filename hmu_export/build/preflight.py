"""Checks before a build writes anything: the output, the model source, the machine's memory, the model's own generation settings."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from ..core.config import BuildConfig, GenerationConfig
from ..core.errors import ConfigError
from ..core.fileio import ensure_writable_dir
from ..core.io_contract import DECODER
from ..model.interface import ModelSource
from .folder import check_target, resolve_out
from ..core.memory import estimate_memory, physical_memory


def check_memory(cfg: BuildConfig) -> None:
    need, detail = estimate_memory(cfg)
    have = physical_memory()
    if have is not None and need > have:
        raise ConfigError(f"this model cannot be built here: it needs about {need / 2**30:.3g} "
                          f"GiB of memory ({detail}) and this machine has "
                          f"{have / 2**30:.3g} GiB; reduce model sizes or profile maxima")


def preflight(cfg: BuildConfig, out_dir: Path, force: bool = False) -> ModelSource:
    """User errors (output that is not ours or unwritable, a model too large for this machine,
    missing / corrupt / mismatched checkpoint) are reported here, before anything is written."""
    from ..model import sources

    out = resolve_out(out_dir)
    check_target(out, force)
    resolved = sources.resolve(cfg.model)
    cfg = replace(cfg, model=resolved).validate()
    check_memory(cfg)
    check_calibration(cfg)
    ensure_writable_dir(out.parent)
    source = sources.load(resolved)
    check_generation_options(cfg, source)
    model_generation(cfg, source)  # the model's own generation settings meet the schema now
    return source


def check_calibration(cfg: BuildConfig) -> None:
    """Static int8's calibration file is read before anything is written: a bad line is one
    error naming file and line (the part of it a build reads: calibration_samples lines)."""
    from ..export.calibration import calibration_file, calibration_sources

    if cfg.int8.enabled and cfg.int8.mode in ("static", "auto") and calibration_file(cfg)[1]:
        calibration_sources(cfg)


def model_generation(cfg: BuildConfig, source: ModelSource) -> GenerationConfig:
    """[generation] with what the model's own files fix: its start / end ids always, its
    decoding defaults (beams, token rules) where the config leaves a key at its default."""
    base = GenerationConfig()
    fixed = {k: v for k, v in source.generation_defaults().items()
             if k in ("bos_id", "eos_id") or getattr(cfg.generation, k) == getattr(base, k)}
    gen = replace(cfg.generation, **fixed)
    try:
        gen.validate(source.cfg, cfg.profile)
    except ConfigError as exc:
        own = {k: v for k, v in fixed.items() if k not in ("bos_id", "eos_id")}
        if not own:
            raise
        named = ", ".join(f"{k} = {v!r}" for k, v in own.items())
        raise ConfigError(f"{exc} (with the model's own generation settings: {named}; set the "
                          "key in [generation] to override it)") from None
    return gen


def check_generation_options(cfg: BuildConfig, source: ModelSource) -> None:
    """Generation graphs only for a model whose own decoding settings every loop honours."""
    if cfg.generation.split_graphs and DECODER in source.graph_names():
        refusal = source.generation_options_refusal()
        if refusal:
            raise ConfigError(f"{refusal}: remove them, or set [generation] split_graphs = "
                              "false to build without generation graphs")
