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
        """From a config table / JSON object: unknown keys are ignored, lists become tuples."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            v = data[f.name]
            if f.name == "bad_words_ids":
                v = tuple(tuple(int(t) for t in seq) for seq in v)
            elif f.name in ("suppress_tokens", "begin_suppress_tokens"):
                v = tuple(int(t) for t in v)
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
        ids = [t for seq in self.bad_words_ids for t in seq]
        ids += list(self.suppress_tokens) + list(self.begin_suppress_tokens)
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            out.append(f"token id {bad[0]} in the token rules is outside [0, {vocab_size})")
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
