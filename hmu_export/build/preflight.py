"""Checks before a build writes anything: the output, the model source, the machine's memory, the model's own generation settings."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from ..core.config import BuildConfig, GenerationConfig
from ..core.errors import ConfigError
from ..core.fileio import ensure_writable_dir
from ..core.io_contract import DECODER
from ..model.interface import ModelSource
from .folder import check_target, resolve_out


def estimate_memory(cfg: BuildConfig) -> tuple[int, str]:
    """Bytes a build may need at its peak (a deliberate over-estimate: the model, its checkpoint,
    export and ONNX Runtime copies, and activations of a few backends at the profile's max)."""
    m, p = cfg.model, cfg.profile
    d, f, z, v = m.d_model, m.d_ff, m.latent_dim, m.vocab_size
    heads = getattr(m, "heads", m.n_heads) or 1
    params = (3 * v * d + m.max_len * d + m.n_encoder_layers * (4 * d * d + 2 * d * f)
              + m.n_decoder_layers * (8 * d * d + 2 * d * f) + 3 * d * z + 3 * d * d)
    b, ls, lt = p.batch[2], p.src_len[2], p.tgt_len[2]
    acts = (b * (ls + lt) * (8 * d + f + 2 * z) + b * heads * (ls * ls + lt * lt + ls * lt)
            + 3 * b * lt * v)
    total = 4 * (8 * params + 8 * acts)
    return total, (f"~{params:.3g} parameters, ~{acts:.3g} activation values at the profile's "
                   f"max {b}x{ls}x{lt}")


def physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


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
    ensure_writable_dir(out.parent)
    source = sources.load(resolved)
    check_generation_options(cfg, source)
    return source


def model_generation(cfg: BuildConfig, source: ModelSource) -> GenerationConfig:
    """[generation] with what the model's own files fix: its start / end ids always, its
    decoding defaults (beams, token rules) where the config leaves a key at its default."""
    base = GenerationConfig()
    fixed = {k: v for k, v in source.generation_defaults().items()
             if k in ("bos_id", "eos_id") or getattr(cfg.generation, k) == getattr(base, k)}
    gen = replace(cfg.generation, **fixed)
    gen.validate(source.cfg, cfg.profile)
    return gen


def check_generation_options(cfg: BuildConfig, source: ModelSource) -> None:
    """Generation graphs only for a model whose own decoding settings every loop honours."""
    if cfg.generation.split_graphs and DECODER in source.graph_names():
        refusal = source.generation_options_refusal()
        if refusal:
            raise ConfigError(f"{refusal}: remove them, or set [generation] split_graphs = "
                              "false to build without generation graphs")
