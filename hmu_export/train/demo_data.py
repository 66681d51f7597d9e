"""The demo task's data: Spanish cardinal numbers (0 <= n < 10^9) spelled out by num2words.

The split is a pure function of ``DATA_SEED``: per digit count (1..9) a fixed share of the
numbers goes to the test and dev sets, and training draws every other number, so the three
never meet. Uniform numbers rarely hold a zero group ("1000001", "20000", "300000000"), the
numbers people round to; so a quarter of every draw (held-out and training alike) is *sparse*:
each digit after the first is zero with probability 1/2. num2words is needed only to regenerate data (the ``train`` extra); what the
runtime reads is the committed JSONL (hmu_export/demo/numbers-es.*.jsonl).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..core.errors import HMUExportError
from ..core.fileio import write_text
from ..core.task_set import Pair as Pair  # the task-set reader lives in core (parity reads
from ..core.task_set import read_pairs as read_pairs  # task sets too); re-exported here

DATA_SEED = 2026
MAX_DIGITS = 9
#: held-out numbers per digit count: at most this many, and at most a tenth of the count
TEST_PER_DIGITS = 320
DEV_PER_DIGITS = 160
#: training draws a digit count with these weights (1..9 digits): the few small numbers
#: (0..999) get more than their share of the numbers, so every one of them is seen often
TRAIN_DIGIT_WEIGHTS = (2, 4, 8, 12, 12, 14, 16, 16, 16)
SPARSE_SHARE = 0.25  # of the draws of 4 or more digits


def _num2words() -> Callable[..., str]:
    try:
        from num2words import num2words
    except ImportError:
        raise HMUExportError("the demo data needs num2words: pip install 'hmu-export[train]'"
                             ) from None
    return num2words  # type: ignore[no-any-return]


def spell(n: int) -> str:
    """``2026`` -> ``"dos mil veintiséis"`` (num2words, Spanish, as it spells them)."""
    return _num2words()(n, lang="es")


def digit_range(digits: int) -> range:
    """The numbers with ``digits`` digits (0 counts as a 1-digit number)."""
    return range(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits)


@dataclass(frozen=True)
class Split:
    """Held-out numbers; training takes every number outside ``held``."""

    dev: tuple[int, ...]
    test: tuple[int, ...]

    @property
    def held(self) -> frozenset[int]:
        return frozenset(self.dev) | frozenset(self.test)


def draw(rng: random.Random, digits: int) -> int:
    """One number with ``digits`` digits: uniform, or (SPARSE_SHARE of the time, from 4 digits
    on) sparse."""
    pool = digit_range(digits)
    if digits < 4 or rng.random() >= SPARSE_SHARE:
        return rng.randrange(pool.start, pool.stop)
    n = rng.randrange(1, 10)
    for _ in range(digits - 1):
        n = 10 * n + (0 if rng.random() < 0.5 else rng.randrange(10))
    return n


def make_split(seed: int = DATA_SEED) -> Split:
    """Per digit count, min(TEST_PER_DIGITS, count // 10) test numbers and as many (at most
    DEV_PER_DIGITS) dev numbers, all distinct, drawn with ``draw`` from ``seed``."""
    rng = random.Random(seed)
    dev: list[int] = []
    test: list[int] = []
    for d in range(1, MAX_DIGITS + 1):
        pool = digit_range(d)
        n_test = min(TEST_PER_DIGITS, len(pool) // 10)
        n_dev = min(DEV_PER_DIGITS, len(pool) // 10)
        drawn: dict[int, None] = {}  # insertion-ordered set
        while len(drawn) < n_test + n_dev:
            drawn[draw(rng, d)] = None
        numbers = list(drawn)
        test += numbers[:n_test]
        dev += numbers[n_test:]
    return Split(tuple(sorted(dev)), tuple(sorted(test)))


class TrainSampler:
    """Training numbers from a seed: a digit count by TRAIN_DIGIT_WEIGHTS, then a number of
    that count (``draw``) that is not held out."""

    def __init__(self, split: Split, seed: int) -> None:
        self.rng = random.Random(seed)
        self.held = split.held
        self.digits = list(range(1, MAX_DIGITS + 1))

    def number(self) -> int:
        while True:
            n = draw(self.rng, self.rng.choices(self.digits, TRAIN_DIGIT_WEIGHTS)[0])
            if n not in self.held:
                return n

    def pairs(self, count: int) -> list[Pair]:
        return [(str(n), spell(n)) for n in (self.number() for _ in range(count))]


def pairs_of(numbers: Iterable[int]) -> list[Pair]:
    return [(str(n), spell(n)) for n in numbers]


def write_pairs(path: Path, pairs: Iterable[Pair]) -> Path:
    """JSON lines ``{"source": ..., "target": ...}``, written atomically."""
    lines = (json.dumps({"source": s, "target": t}, ensure_ascii=False) + "\n" for s, t in pairs)
    return write_text(Path(path), "".join(lines))
