"""Token rules: what a model's generation config says about which token may come next.

Transformers' ``generation_config.json`` carries options that change tokens (repetition
penalty, no-repeat n-grams, bad words, minimum length, forced first / last token, suppressed
tokens). ``TokenRules`` applies them to one step's scores with Transformers' semantics and
order (RepetitionPenalty, NoRepeatNGram, NoBadWords, MinLength / MinNewTokens, ForcedBOS,
ForcedEOS, SuppressTokens, SuppressTokensAtBegin): a row's *prefix* is the decoder input so far,
the start token included, as Transformers' ``input_ids`` are. Greedy and sampling apply the
rules to raw logits, beam search to log-probabilities, as Transformers does.

Numpy only and free of package imports: the Triton generation model loads this file from its
own folder (the server has no hmu_export package).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np

NEG_INF = -np.inf


def _show(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _id(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {_show(value)}")
    return int(value)


def _ids(value: Any, name: str) -> tuple[int, ...]:
    if not _is_list(value) or not all(isinstance(t, (int, np.integer))
                                      and not isinstance(t, bool) for t in value):
        raise ValueError(f"{name} must be a list of token ids (integers), got {_show(value)}")
    return tuple(int(t) for t in value)


@dataclass(frozen=True)
class TokenRules:
    """Neutral by default; ``-1`` switches a forced token off."""

    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    min_new_tokens: int = 0
    forced_bos_id: int = -1
    forced_eos_id: int = -1
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "TokenRules":
        """From a config table / JSON object: unknown keys are ignored, lists become tuples;
        a value of the wrong type is a ValueError naming its key (``"abc"`` is no token list)."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            v = data[f.name]
            if f.name == "bad_words_ids":
                if not _is_list(v) or not all(_is_list(seq) for seq in v):
                    raise ValueError(f"bad_words_ids must be a list of token-id lists, got "
                                     f"{_show(v)}")
                v = tuple(_ids(seq, f.name) for seq in v)
            elif f.name in ("suppress_tokens", "begin_suppress_tokens"):
                v = _ids(v, f.name)
            elif f.name == "repetition_penalty":
                if isinstance(v, bool) or not isinstance(v, (int, float, np.integer,
                                                             np.floating)):
                    raise ValueError(f"repetition_penalty must be a number, got {_show(v)}")
                v = float(v)
            else:
                v = _id(v, f.name)
            kwargs[f.name] = v
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(map(list, v)) if f.name == "bad_words_ids"
                         else list(v) if isinstance(v, tuple) else v)
                for f in fields(self) for v in (getattr(self, f.name),)}

    @property
    def active(self) -> bool:
        return self != TokenRules()

    def problems(self, vocab_size: int) -> list[str]:
        """What makes these rules unusable with a vocabulary of ``vocab_size`` (empty if none)."""
        out = []
        if not (self.repetition_penalty > 0 and np.isfinite(self.repetition_penalty)):
            out.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            out.append(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if self.min_new_tokens < 0:
            out.append(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        for name in ("forced_bos_id", "forced_eos_id"):
            v = getattr(self, name)
            if v != -1 and not 0 <= v < vocab_size:
                out.append(f"{name} {v} is outside [0, {vocab_size}) (-1 = off)")
        for name, ids in (("bad_words_ids", [t for seq in self.bad_words_ids for t in seq]),
                          ("suppress_tokens", list(self.suppress_tokens)),
                          ("begin_suppress_tokens", list(self.begin_suppress_tokens))):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                out.append(f"{name} holds token id {bad[0]}, outside [0, {vocab_size})")
        if any(len(seq) == 0 for seq in self.bad_words_ids):
            out.append("bad_words_ids holds an empty sequence")
        return out

    def apply(self, scores: np.ndarray, prefixes: Sequence[Sequence[int]], *,
              max_new: int | Sequence[int], eos_ids: Sequence[int]) -> np.ndarray:
        """``scores`` [rows, vocab] (float64, modified in place and returned) for the next token
        of each row; ``prefixes[r]`` is row r's decoder input so far (start token first);
        ``max_new`` the request's max_new_tokens, or one per row (ForcedEOS fires at the last
        step)."""
        if not self.active:
            return scores
        eos = [e for e in eos_ids if e >= 0]
        for r, prefix in enumerate(prefixes):
            row = scores[r]
            cur = len(prefix)
            last = max_new if isinstance(max_new, int) else max_new[r]
            if self.repetition_penalty != 1.0:
                seen = np.unique(np.asarray(prefix, dtype=np.int64))
                s = row[seen]
                row[seen] = np.where(s < 0, s * self.repetition_penalty,
                                     s / self.repetition_penalty)
            n = self.no_repeat_ngram_size
            if n > 0 and cur >= n:
                tail = list(prefix[cur + 1 - n:])
                for i in range(cur - n + 1):
                    if list(prefix[i:i + n - 1]) == tail:
                        row[prefix[i + n - 1]] = NEG_INF
            for seq in self.bad_words_ids:
                if len(seq) == 1 and seq[0] in eos:
                    continue  # Transformers never bans EOS through bad_words_ids
                k = len(seq) - 1
                if k == 0 or (k <= cur and tuple(prefix[cur - k:]) == seq[:-1]):
                    row[seq[-1]] = NEG_INF
            if cur - 1 < self.min_new_tokens:
                row[eos] = NEG_INF
            if self.forced_bos_id >= 0 and cur == 1:
                row[:] = NEG_INF
                row[self.forced_bos_id] = 0.0
            if self.forced_eos_id >= 0 and cur == last:
                row[:] = NEG_INF
                row[self.forced_eos_id] = 0.0
            if self.suppress_tokens:
                row[list(self.suppress_tokens)] = NEG_INF
            begin = 2 if self.forced_bos_id >= 0 else 1
            if self.begin_suppress_tokens and cur == begin:
                row[list(self.begin_suppress_tokens)] = NEG_INF
        return scores
