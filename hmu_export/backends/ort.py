"""ONNX Runtime on the exported graphs as a user gets them (default session options): the
primary graph forward (CPU, and CUDA / TensorRT execution providers where this onnxruntime has
them), and ``encoder.onnx`` + ``decoder.onnx`` as a generation step backend.

Every step backend reads the cache geometry from the graph's declared inputs (fixed dims),
never from d_model // heads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from ..core.config import BuildConfig
from ..core.errors import ArtifactError, BackendUnavailable
from ..core.io_contract import (DECODER, ENCODER, FULL, LOGITS, NOISE, SRC_IDS, SRC_MASK,
                                GraphContract, past_key, row_state_refusal)
from ..core.layout import BuildLayout
from ..generate.stepper import CacheSpec, CachedStepper, Stepper, cache_spec_from_dims
from ..runners import OnnxRuntimeRunner, Runner
from ..runners.onnxruntime_runner import cpu_count, session_options, tuned_session_options
from .registry import BENCH_ONLY, Backend, SourceModel, StepEntry, StepRequest, forward, step

#: ONNX Runtime execution providers run on the primary graph where this onnxruntime has them
ORT_DEVICE_PROVIDERS = {"onnxruntime-cuda": "CUDAExecutionProvider",
                        "onnxruntime-tensorrt": "TensorrtExecutionProvider"}


# --------------------------------------------------------------------------- onnxruntime
class OrtStepBackend:
    """encoder / decoder graphs in two ONNX Runtime sessions (CPU provider here).

    Feeds go in as numpy arrays (ORT wraps contiguous arrays without a copy); the cache comes
    back as the arrays ORT returns and is fed to the next step as is."""

    def __init__(self, encoder: Path, decoder: Path, *, name: str = "onnxruntime",
                 sess_options=None, providers: tuple[str, ...] = ("CPUExecutionProvider",)  # type: ignore[no-untyped-def]
                 ) -> None:
        import onnxruntime as ort

        self.name = name
        self.paths = (Path(encoder), Path(decoder))
        sessions = []
        for path in self.paths:
            if not path.is_file():
                raise ArtifactError(f"ONNX graph not found: {path}")
            try:
                sessions.append(ort.InferenceSession(str(path), sess_options,
                                                     providers=list(providers)))
            except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
                raise ArtifactError(f"ONNX Runtime cannot load {path}: "
                                    f"{str(exc).splitlines()[0]}") from None
        self.enc, self.dec = sessions
        self._enc_in = [i.name for i in self.enc.get_inputs()]
        self._dec_in = [i.name for i in self.dec.get_inputs()]
        self._enc_out = [o.name for o in self.enc.get_outputs()]
        self._dec_out = [o.name for o in self.dec.get_outputs()]
        for path, names in ((self.paths[0], (SRC_IDS, SRC_MASK, NOISE)),
                            (self.paths[1], (SRC_MASK, past_key(0)))):
            have = self._enc_in if path == self.paths[0] else self._dec_in
            missing = [n for n in names if n not in have]
            if missing:
                raise ArtifactError(f"{path} lacks generation input(s) {', '.join(missing)}")
        refusal = row_state_refusal(self._dec_in, str(self.paths[1]))
        if refusal:
            raise ArtifactError(refusal)
        if LOGITS not in self._dec_out:
            raise ArtifactError(f"{self.paths[1]} has no '{LOGITS}' output")
        self._spec = cache_spec_from_dims({i.name: tuple(i.shape) for i in self.dec.get_inputs()},
                           {i.name: tuple(i.shape) for i in self.enc.get_inputs()})

    def cache_spec(self) -> CacheSpec:
        return self._spec

    def encode(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.enc.run(self._enc_out, {n: feeds[n] for n in self._enc_in})
        return dict(zip(self._enc_out, outs))

    def decode(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.dec.run(self._dec_out, {n: feeds[n] for n in self._dec_in})
        return dict(zip(self._dec_out, outs))




def split_graphs(layout: BuildLayout, variant: str = "") -> tuple[Path, Path]:
    """encoder / decoder graph files of a variant ("", "opt", "fp16"); the plain graphs must
    exist (a build of a version without generation graphs is refused in one line)."""
    enc, dec = layout.graph(ENCODER), layout.graph(DECODER)
    if not (enc.is_file() and dec.is_file()):
        raise ArtifactError(f"{layout.root} has no {enc.name} / {dec.name}: rebuild it with a "
                            "version that exports the generation graphs")
    if not variant:
        return enc, dec
    return layout.graph(ENCODER, variant), layout.graph(DECODER, variant)


def spinning(threads: int) -> bool:
    """Spinning pool workers preempt the Python loop between steps when they take every core:
    measured p99/p50 of 13 with spinning on 2 threads / 2 cores, 1.6 without
    (docs/generation.md)."""
    return threads < cpu_count()


def variant_forward(layout: BuildLayout, cfg: BuildConfig, contract: GraphContract, *,
                    label: str, variant: str, precision: str, threads: int | None,
                    uses: frozenset[str], why_missing: str, tuned: bool = True) -> list[Backend]:
    """ORT on ``model.<variant>.onnx`` (a converted primary graph), with the tuned session
    options (else ORT's defaults with ``threads``)."""
    path = layout.graph(FULL, variant)
    if not path.is_file():
        return [Backend(label, precision, None, f"{path.name} not found ({why_missing})",
                        uses=uses)]
    return [Backend(label, precision, lambda: OnnxRuntimeRunner(
        path, contract, [cfg.profile], precision=precision, vocab_size=cfg.model.vocab_size,
        label=label, threads=None if tuned else threads,
        sess_options=tuned_session_options(threads) if tuned else None), uses=uses)]


def variant_stepper(variant: str, why_missing: str) -> Callable[[StepRequest], Stepper]:
    """A step backend over ``encoder.<variant>.onnx`` + ``decoder.<variant>.onnx``."""
    def make(req: StepRequest) -> Stepper:
        split_graphs(req.layout)
        enc, dec = split_graphs(req.layout, variant)
        if not (enc.is_file() and dec.is_file()):
            raise BackendUnavailable(f"{req.root} has no {enc.name} / {dec.name} ({why_missing})")
        return CachedStepper(OrtStepBackend(enc, dec, name=req.name,
                                            sess_options=tuned_session_options(
                                                req.threads, spinning=spinning(req.threads))))
    return make


# --------------------------------------------------------------------------- registry
def onnxruntime_backends(layout: BuildLayout, cfg: BuildConfig, contract: GraphContract, *,
                         threads: int | None = None) -> list[Backend]:
    """ONNX Runtime on the primary graph as a user gets it (all graph optimizations): the CPU,
    then CUDA / TensorRT execution providers where this onnxruntime build has them."""
    import onnxruntime as ort

    path = layout.onnx
    if not path.is_file():
        return [Backend("onnxruntime", "fp32", None, f"{path.name} not found")]

    def make(label: str, *providers: str) -> Callable[[], Runner]:
        return lambda: OnnxRuntimeRunner(path, contract, [cfg.profile], providers=providers,
                                         vocab_size=cfg.model.vocab_size, label=label,
                                         threads=threads)

    out = [Backend("onnxruntime", "fp32", make("onnxruntime", "cpu"))]
    have = ort.get_available_providers()
    for label, provider in ORT_DEVICE_PROVIDERS.items():
        if provider in have:
            out.append(Backend(label, "fp32", make(label, provider, "cpu"), device="cuda"))
        else:
            out.append(Backend(label, "fp32", None, f"{provider} not in this onnxruntime build "
                               f"(have: {', '.join(have)})", device="cuda", uses=BENCH_ONLY))
    return out


@forward(order=10)
def forward_backends(layout: BuildLayout, cfg: BuildConfig, model: SourceModel,
                     contract: GraphContract, *, threads: int | None = None) -> list[Backend]:
    return onnxruntime_backends(layout, cfg, contract, threads=threads)


step(StepEntry("onnxruntime", 20, "fp32", "cpu", "encoder.onnx + decoder.onnx",
               lambda req: CachedStepper(OrtStepBackend(
                   *split_graphs(req.layout), name=req.name,
                   sess_options=session_options(req.threads))),
               ort_threads=True))
