"""Calibration feeds for static int8: what each graph meets in service, recorded.

Static QDQ fixes every activation's scale before the graph ever runs, so the feeds that set
those scales must look like real inputs. The decoder step especially: it takes past K/V caches
that only real generation produces. ``record_feeds`` therefore runs greedy generation with the
FP32 graphs through the same Generator a user runs and keeps a copy of every encoder call's
and every decoder step's feeds; the full graph gets each source with its generated target,
teacher-forced (BOS + tokens, as parity and a forward user feed it). ``random_feeds`` is the
fallback for a build without calibration data (the manifest says which was used).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..core.config import BuildConfig
from ..core.io_contract import (AXIS_TO_PROFILE, DECODER, ENCODER, FULL, NOISE, SRC_IDS,
                                SRC_MASK, TGT_IDS, TGT_LEN, GraphContract)
from ..generate.stepper import CacheSpec, StepBackend

Feeds = dict[str, np.ndarray]


@dataclass
class CalibrationFeeds:
    """Feeds per graph name (``full``, ``encoder``, ``decoder``), and where they came from."""

    graphs: dict[str, list[Feeds]] = field(default_factory=dict)
    source: str = "random"  # the calibration file, or "random"
    samples: int = 0  # source examples generated from (random: feeds per graph)
    skipped: int = 0  # sources longer than the profile's src_len max
    random: list[str] = field(default_factory=list)  # graphs calibrated on random feeds
    note: str = ""  # why they were

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {"source": self.source, "samples": self.samples,
                                  "skipped": self.skipped,
                                  "feeds": {g: len(f) for g, f in self.graphs.items()},
                                  "random_feeds": self.random}
        return dict(out, note=self.note) if self.note else out


class _Recorder:
    """A StepBackend that keeps every feed it passes on. It keeps the arrays themselves, no
    copies: the stepper replaces its state with new arrays (ORT's outputs, ``np.take``) and
    never writes into one, so a request's cross K/V is held once, not once per step."""

    def __init__(self, inner: StepBackend) -> None:
        self.inner = inner
        self.name = inner.name
        self.encoder: list[Feeds] = []
        self.decoder: list[Feeds] = []

    def cache_spec(self) -> CacheSpec:
        return self.inner.cache_spec()

    def encode(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.encoder.append(dict(feeds))
        return self.inner.encode(feeds)

    def decode(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.decoder.append(dict(feeds))
        return self.inner.decode(feeds)


def record_feeds(encoder: Path, decoder: Path, cfg: BuildConfig,
                 sources: Sequence[Sequence[int]], *, full: GraphContract | None,
                 input_names: Mapping[str, Sequence[str]], label: str) -> CalibrationFeeds:
    """Greedy generation (mean path) with the FP32 ``encoder`` / ``decoder`` graphs on the
    tokenized ``sources``, ``profile.batch`` opt rows per call; every graph's feeds recorded,
    cut to its ``input_names``. Sources longer than the profile allows are skipped (counted)."""
    from ..backends.ort import OrtStepBackend
    from ..generate.generator import Generator

    recorder = _Recorder(OrtStepBackend(encoder, decoder, name="calibration"))
    gen = Generator(recorder, cfg)
    limit = cfg.profile.src_len[2]
    fits = [list(s) for s in sources if 0 < len(s) <= limit]
    out = CalibrationFeeds(source=label, samples=len(fits), skipped=len(sources) - len(fits))
    full_feeds: list[Feeds] = []
    batch = cfg.profile.batch[1]
    for i in range(0, len(fits), batch):
        first = len(recorder.encoder)
        res = gen.generate(fits[i:i + batch], strategy="greedy", noise_scale=0.0)
        if full is not None:
            full_feeds.append(teacher_forced(recorder.encoder[first], res.sequences, cfg, full))
    out.graphs[ENCODER] = [_cut(f, input_names[ENCODER]) for f in recorder.encoder]
    out.graphs[DECODER] = [_cut(f, input_names[DECODER]) for f in recorder.decoder]
    if full is not None:
        out.graphs[FULL] = full_feeds
    return out


def teacher_forced(enc: Feeds, sequences: Sequence[Sequence[int]], cfg: BuildConfig,
                   contract: GraphContract) -> Feeds:
    """The full graph's feeds for one generated batch: the encoder's source and noise, and
    BOS + the generated tokens as the decoder input (padded with pad_id, within tgt_len)."""
    longest = cfg.profile.tgt_len[2]
    bos, pad = cfg.generation.bos_id, cfg.model.pad_id
    rows = [([bos] + list(s))[:longest] for s in sequences]
    width = max(len(r) for r in rows)
    tgt = np.full((len(rows), width), pad, dtype=np.int64)
    for k, r in enumerate(rows):
        tgt[k, :len(r)] = r
    out: Feeds = {SRC_IDS: enc[SRC_IDS], SRC_MASK: enc[SRC_MASK], TGT_IDS: tgt}
    noise = next((s for s in contract.inputs if s.name == NOISE), None)
    if noise is not None:  # the mean path; its length axis is the source's or the target's
        length = tgt.shape[1] if noise.dims[1] == TGT_LEN else enc[SRC_IDS].shape[1]
        out[NOISE] = np.zeros((tgt.shape[0], length, int(noise.dims[2])), dtype=np.float32)
    return {k: v for k, v in out.items() if k in contract.input_names}


def calibration_file(cfg: BuildConfig) -> tuple[str, str]:
    """(config key, path) of the calibration data: ``[int8] calibration``, else ``[task] dev``
    (a held-out split, never the judged set); ("", "") when neither is set."""
    if cfg.int8.calibration:
        return "int8.calibration", cfg.int8.calibration
    return ("task.dev", cfg.task.dev) if cfg.task.dev else ("", "")


def calibration_sources(cfg: BuildConfig) -> list[str]:
    """The first ``calibration_samples`` source texts of the calibration file; a bad file or
    line is one InputError naming the key, the file and the line."""
    from ..core.errors import InputError
    from ..core.task_set import read_pairs

    key, path = calibration_file(cfg)
    try:
        return [s for s, _ in read_pairs(path, cfg.int8.calibration_samples)]
    except InputError as exc:
        raise InputError(f"{key}: {exc}") from None


def random_feeds(contract: GraphContract, cfg: BuildConfig, count: int, *, seed: int = 0
                 ) -> list[Feeds]:
    """``count`` feeds at random in-profile sizes (mean path): the fallback without data."""
    from ..core.io_contract import spec_feeds

    rng = np.random.default_rng(seed)
    axes = sorted({d for s in contract.inputs for d in s.dims if isinstance(d, str)})
    out = []
    for k in range(count):
        ranges = {a: cfg.profile.axis(AXIS_TO_PROFILE[a]) for a in axes}
        sizes = {a: int(rng.integers(r.min, r.max + 1)) for a, r in ranges.items()}
        out.append(spec_feeds(contract, cfg.model, sizes, seed=seed + k, noise_scale=0.0))
    return out


def _cut(feeds: Feeds, names: Sequence[str]) -> Feeds:
    return {n: feeds[n] for n in names}
