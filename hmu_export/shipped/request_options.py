"""One generation request's options: names, types and ranges, checked in one place.

The CLI flags of ``python -m hmu_export generate``, the Python API
(``hmu_export.generate.GenerationOptions``), the Triton generation models' request parameters,
the ``[generation]`` TOML section and a Hugging Face folder's ``generation_config.json`` all go
through ``parse`` / ``check`` / ``validate`` here, so a value is accepted or refused the same way,
with the same words, wherever it enters.

The limits, and why:

- ``seed`` / ``noise_seed``: integers in [0, 2**64 - 1] (numpy's generators take any
  non-negative integer; 2**64 keeps them inside an unsigned 64-bit integer for every client).
- ``temperature``: a finite number in [TEMPERATURE_MIN, TEMPERATURE_MAX]. Sampling divides the
  logits by it: below 1e-3 the quotient of an ordinary float32 logit stays finite but a
  subnormal temperature (1e-310) overflows it to infinity, and the "sample" is no longer the
  argmax it tends to. One rule everywhere (Python, Triton, C++): a temperature below the minimum
  is **refused**, never silently turned into greedy decoding; ask for ``strategy greedy`` for
  the argmax.
- ``length_penalty``: finite, |lp| <= LENGTH_PENALTY_MAX. Beam scores divide by length ** lp;
  10 keeps that finite for any length below 1e30 (400 overflowed a Python float).
- ``noise_scale``: a finite number in [0, NOISE_SCALE_MAX] (the HMU noise's standard
  deviation; 1e39 is infinity in float32 and turned every logit into NaN). Noise given as
  values (the C++ program's noise.npy) must lie within +-NOISE_ABS_MAX.
- ``top_k`` in [0, TOP_K_MAX] (0 = off), ``top_p`` in (0, 1] (1 = off), ``num_beams`` >= 1 and,
  for beam search, at most the profile's batch max (beams are batch rows), ``max_new_tokens``
  in [1, the profile's tgt_len max].

Standard library only and free of package imports: the Triton generation model loads this file
from its own folder (the server has no hmu_export package).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

STRATEGIES = ("greedy", "sample", "beam")
SEED_MAX = 2**64 - 1
TEMPERATURE_MIN = 1e-3
TEMPERATURE_MAX = 1e3
LENGTH_PENALTY_MAX = 10.0
NOISE_SCALE_MAX = 100.0
NOISE_ABS_MAX = 1e4  # |noise| given as values; N(0, NOISE_SCALE_MAX**2) draws stay far inside
TOP_K_MAX = 2**31 - 1

#: every request option and its kind
KINDS: dict[str, str] = {
    "strategy": "str", "max_new_tokens": "int", "num_beams": "int", "length_penalty": "float",
    "early_stopping": "bool", "temperature": "float", "top_k": "int", "top_p": "float",
    "seed": "int", "noise_scale": "float", "noise_seed": "int",
}
_WHAT = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}
_MAX_TEXT = 64  # a number written longer than this is not one (and int() of 1 MB is slow)


class OptionError(ValueError):
    """A request option with the wrong type or outside its range; the message names it."""


def show(value: Any, limit: int = 40) -> str:
    """``repr`` of a value, cut short (a 1 MB string must not become a 1 MB error line)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def parse(name: str, value: Any, *, text: bool = False) -> Any:
    """``value`` as option ``name``'s type, or OptionError. ``text``: numbers and booleans may
    also come as strings (CLI flags, Triton request parameters: the python backend passes
    bool / int / str only, so clients send floats as strings)."""
    kind = KINDS.get(name)
    if kind is None:
        raise OptionError(f"unknown option {show(name)} (known: {', '.join(KINDS)})")
    bad = OptionError(f"{name} must be {_WHAT[kind]}, got {show(value)}")
    if kind == "str":
        if not isinstance(value, str):
            raise bad
        return value.strip()
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if text and isinstance(value, str) and value.strip().lower() in ("true", "false", "1",
                                                                         "0"):
            return value.strip().lower() in ("true", "1")
        raise bad
    if isinstance(value, bool):
        raise bad
    if kind == "int":
        if isinstance(value, numbers.Integral):
            return int(value)
        if text and isinstance(value, str):
            s = value.strip()
            if 0 < len(s) <= _MAX_TEXT and s.lstrip("+-").isdigit() and s.isascii():
                return int(s)
        raise bad
    if isinstance(value, (numbers.Integral, numbers.Real)):
        try:
            out = float(value)
        except OverflowError:  # an int beyond the float range
            raise OptionError(f"{name} must be a finite number, got {show(value)}") from None
    elif text and isinstance(value, str) and 0 < len(value.strip()) <= _MAX_TEXT:
        try:
            out = float(value.strip())
        except ValueError:
            raise bad from None
    else:
        raise bad
    if not math.isfinite(out):
        raise OptionError(f"{name} must be a finite number, got {show(value)}")
    return out


def check(name: str, value: Any) -> None:
    """Range check of one parsed option (OptionError naming it)."""
    def fail(rule: str) -> None:
        raise OptionError(f"{name} must be {rule}, got {show(value)}")

    if name == "strategy":
        if value not in STRATEGIES:
            fail(f"one of {', '.join(STRATEGIES)}")
    elif name in ("seed", "noise_seed"):
        if not 0 <= value <= SEED_MAX:
            fail(f"in [0, {SEED_MAX}]")
    elif name == "temperature":
        if not TEMPERATURE_MIN <= value <= TEMPERATURE_MAX:
            fail(f"in [{TEMPERATURE_MIN:g}, {TEMPERATURE_MAX:g}] (for the argmax, use strategy "
                 "greedy)")
    elif name == "length_penalty":
        if not -LENGTH_PENALTY_MAX <= value <= LENGTH_PENALTY_MAX:
            fail(f"in [{-LENGTH_PENALTY_MAX:g}, {LENGTH_PENALTY_MAX:g}]")
    elif name == "noise_scale":
        if not 0 <= value <= NOISE_SCALE_MAX:
            fail(f"in [0, {NOISE_SCALE_MAX:g}] (0 = the HMU's mean path)")
    elif name == "top_k":
        if not 0 <= value <= TOP_K_MAX:
            fail(f"in [0, {TOP_K_MAX}] (0 = off)")
    elif name == "top_p":
        if not 0 < value <= 1:
            fail("in (0, 1] (1 = off)")
    elif name == "num_beams":
        if value < 1:
            fail(">= 1")
    elif name == "max_new_tokens":
        if value < 1:
            fail(">= 1")


def check_profile(values: Mapping[str, Any], *, max_new_tokens_max: int | None = None,
                  batch_max: int | None = None) -> None:
    """What the build's profile bounds: max_new_tokens by its tgt_len max, beams (batch rows)
    by its batch max."""
    n = values.get("max_new_tokens")
    if max_new_tokens_max is not None and n is not None and not 1 <= n <= max_new_tokens_max:
        raise OptionError(f"max_new_tokens must be in [1, {max_new_tokens_max}] (the profile's "
                          f"tgt_len max), got {show(n)}")
    beams = values.get("num_beams")
    if batch_max is not None and values.get("strategy") == "beam" and beams is not None \
            and beams > batch_max:
        raise OptionError(f"num_beams {beams} exceeds the profile's batch max ({batch_max}): "
                          "each beam is a batch row")


def validate(values: Mapping[str, Any], *, text: bool = False,
             max_new_tokens_max: int | None = None, batch_max: int | None = None
             ) -> dict[str, Any]:
    """Every option of ``values`` parsed and checked (unknown names refused), then the
    profile's bounds; the parsed values. ``None`` values are left out (not set)."""
    if not isinstance(values, Mapping):
        raise OptionError(f"options must be a mapping of names to values, got {show(values)}")
    unknown = sorted(str(k) for k in values if k not in KINDS)
    if unknown:
        raise OptionError(f"unknown option(s) {', '.join(show(k) for k in unknown[:5])} "
                          f"(known: {', '.join(KINDS)})")
    out: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        out[name] = parse(name, value, text=text)
        if not (name == "max_new_tokens" and max_new_tokens_max is not None):
            check(name, out[name])  # else check_profile states the whole range
    check_profile(out, max_new_tokens_max=max_new_tokens_max, batch_max=batch_max)
    return out
