"""Exact-match accuracy of the demo task with the project's generator (greedy by default).

The trainer's measure (a torch model in memory); a build's per-backend figures are the parity
stage's task accuracy (hmu_export/verify/task_accuracy.py, ``[task]`` in the config).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..core.config import BuildConfig, ProfileConfig
from ..generate.generator import Generator

#: rows per generate call when the caller's profile allows it
EVAL_BATCH = 256


@dataclass
class Accuracy:
    correct: int
    total: int
    #: digit count -> [correct, total]
    by_digits: dict[int, list[int]] = field(default_factory=dict)
    #: the first few misses: (source, expected, got)
    misses: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def exact(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"exact": round(self.exact, 6), "correct": self.correct, "total": self.total,
                "by_digits": {str(k): v for k, v in sorted(self.by_digits.items())},
                "misses": [list(m) for m in self.misses]}


def exact_match(gen: Generator, tok: Any, pairs: Sequence[tuple[str, str]],
                noise_scale: float = 0.0, batch: int | None = None, keep_misses: int = 10
                ) -> Accuracy:
    """Greedy outputs of ``gen`` for every source, decoded with ``tok`` (a ``tokenizers``
    Tokenizer), compared with the target text exactly."""
    size = min(batch or EVAL_BATCH, gen.cfg.profile.batch[2])
    by: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    misses: list[tuple[str, str, str]] = []
    correct = 0
    for i in range(0, len(pairs), size):
        chunk = pairs[i:i + size]
        ids = [enc.ids for enc in tok.encode_batch([s for s, _ in chunk])]
        seqs = gen.generate(ids, strategy="greedy", noise_scale=noise_scale).sequences
        texts = tok.decode_batch([list(s) for s in seqs], skip_special_tokens=True)
        for (src, want), got in zip(chunk, texts):
            ok = got.strip() == want
            correct += ok
            cell = by[len(src.strip())]
            cell[0] += ok
            cell[1] += 1
            if not ok and len(misses) < keep_misses:
                misses.append((src, want, got))
    return Accuracy(correct, len(pairs), dict(by), misses)


def model_generator(model: Any) -> Generator:
    """A generator over a native model in memory (the torch backend: its cached step), with a
    profile wide enough for EVAL_BATCH rows."""
    from ..backends.pytorch import TorchStepBackend
    from ..model.native import NativeSource

    cfg = BuildConfig(model=model.cfg,
                      profile=ProfileConfig(batch=(1, EVAL_BATCH, EVAL_BATCH))).validate()
    return Generator(TorchStepBackend(NativeSource(model.cfg, model.eval())), cfg)
