"""Memory a model of a config needs, estimated from its sizes alone: the build refuses what the
machine cannot hold, and ``deploy`` sizes pods from the same figure."""
from __future__ import annotations

import os

from .config import BuildConfig


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
