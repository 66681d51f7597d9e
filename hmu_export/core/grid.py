"""Shape grids over a profile and feeds at a shape: what parity checks, bench times and optimize compares, for any graph kind."""
from __future__ import annotations

import itertools
from typing import Iterable, Mapping, Sequence
import numpy as np
from .config import BuildConfig, ProfileConfig
from .io_contract import BATCH, CLASS_LOGITS, LOGITS, NOISE, SRC_IDS, SRC_LEN, SRC_MASK, TGT_IDS, TGT_LEN, GraphContract, make_feeds, spec_feeds


Shape = tuple[int, ...]  # sizes of the contract's grid axes, in GRID_AXES order


GRID_AXES = (BATCH, SRC_LEN, TGT_LEN)


AXIS_LABEL = {BATCH: "B", SRC_LEN: "Ls", TGT_LEN: "Lt"}


TOP1_OUTPUTS = (LOGITS, CLASS_LOGITS)  # outputs with a class / vocabulary axis last


# ----------------------------------------------------------------------------- contract
def grid_axes(contract: GraphContract) -> tuple[str, ...]:
    """The profile axes a graph's inputs use (batch, src_len, tgt_len; a classifier has no
    tgt_len), in GRID_AXES order."""
    used = set(contract.axes)
    return tuple(a for a in GRID_AXES if a in used)


def project(shape: Sequence[int], axes: Sequence[str]) -> Shape:
    """A shape over ``axes``: a BxLsxLt triple is cut down to them, a shape already over them
    is kept."""
    if len(shape) == len(axes):
        return tuple(int(v) for v in shape)
    return tuple(int(shape[GRID_AXES.index(a)]) for a in axes)


def primary_output(contract: GraphContract) -> str:
    """The output a report leads with: logits, class_logits, else the first one."""
    for name in TOP1_OUTPUTS:
        if name in contract.output_names:
            return name
    return contract.output_names[0]


def _native_full_feeds(contract: GraphContract) -> bool:
    """The native full graph's inputs (noise over the source): make_feeds applies as it is."""
    noise = next((s for s in contract.inputs if s.name == NOISE), None)
    return (contract.input_names == [SRC_IDS, SRC_MASK, TGT_IDS, NOISE] and noise is not None
            and tuple(noise.dims[:2]) == (BATCH, SRC_LEN))


def contract_feeds(contract: GraphContract, cfg: BuildConfig, sizes: Mapping[str, int], *,
                   seed: int, noise_scale: float = 1.0) -> dict[str, np.ndarray]:
    """Feeds of any graph at the named axis sizes: ``make_feeds`` for the full graph with noise
    over the source (so the native model's figures never change), ``spec_feeds`` otherwise."""
    if _native_full_feeds(contract):
        return make_feeds(cfg.model, sizes[BATCH], sizes[SRC_LEN], sizes[TGT_LEN], seed=seed,
                          noise_scale=noise_scale)
    return spec_feeds(contract, cfg.model, sizes, seed=seed, noise_scale=noise_scale)


def in_profile(profile: ProfileConfig, axes: Sequence[str], shape: Shape) -> bool:
    return all(profile.axis(a).contains(v) for a, v in zip(axes, shape))


def profile_ranges(profile: ProfileConfig, axes: Sequence[str]) -> str:
    """``batch 1..4, src_len 1..16``: the profile's range of each axis, for error lines."""
    return ", ".join(f"{a} {profile.axis(a).min}..{profile.axis(a).max}" for a in axes)


# ----------------------------------------------------------------------------- grid
def _odd_between(a: int, b: int) -> int | None:
    """An odd size strictly between a and b, nearest their middle (None if there is none)."""
    mid = (a + b) // 2
    for c in (mid, mid + 1, mid - 1, mid + 2, mid - 2):
        if a < c < b and c % 2:
            return c
    return None


def axis_values(lo: int, opt: int, hi: int) -> list[int]:
    """min, opt, max, 1 when inside, and an odd size between min and opt (else opt and max):
    odd sizes catch kernels that only work on even or aligned lengths."""
    vals = {lo, opt, hi}
    if lo <= 1 <= hi:
        vals.add(1)
    odd = _odd_between(lo, opt)
    if odd is None:
        odd = _odd_between(opt, hi)
    if odd is not None:
        vals.add(odd)
    return sorted(vals)


def derive_grid(profile: ProfileConfig, extra: Iterable[Sequence[int]] = (),
                axes: Sequence[str] = GRID_AXES) -> list[Shape]:
    """Full product of each axis's values, plus any extra shapes (BxLsxLt, cut down to
    ``axes``), deduplicated and sorted."""
    values = [axis_values(*getattr(profile, a)) for a in axes]
    grid = set(itertools.product(*values)) | {project(s, axes) for s in extra}
    return sorted(grid)
