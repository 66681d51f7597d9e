"""Step backends for the generation loop (hmu_export/generate.py).

==================  ==========================================================================
torch               the model's own cached step: NativeSource's encoder / decoder modules
torch-nocache       the full model re-run over the whole prefix every step (no split at all):
                    the independent reference
onnxruntime         encoder.onnx + decoder.onnx, default session options
onnxruntime-opt     encoder.opt.onnx / decoder.opt.onnx where the build has them (else the plain
                    graphs), sessions with optimize.tuned_session_options
onnxruntime-fp16emu encoder.fp16.onnx + decoder.fp16.onnx (FP16 storage emulated on CPU)
==================  ==========================================================================

Every backend reads the cache geometry from what the graph declares: ONNX inputs' fixed dims,
or the module source's contract, never d_model // heads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from ..core.layout import BuildLayout
from ..core.config import BuildConfig
from ..core.errors import ArtifactError, BackendUnavailable, InputError
from ..generate.stepper import CacheSpec, CachedStepper, Stepper
from ..core.io_contract import (DECODER, ENCODER, FULL, LOGITS, NOISE, SRC_IDS, SRC_MASK,
                           TGT_IDS, GraphContract, past_key, past_value, present_key,
                           present_value)
from ..generate.stepper import cache_spec_from_dims
from ..runners.onnxruntime_runner import cpu_count, generation_threads
from ..model.checkpoint import load_build_source

BACKENDS = ("torch", "torch-nocache", "onnxruntime", "onnxruntime-opt", "onnxruntime-fp16emu",
            "torch-cuda", "torch-cuda-fp16")


def spec_from_contracts(encoder: GraphContract, decoder: GraphContract) -> CacheSpec:
    """Cache geometry from declared input dims (past_key.i: [batch, heads, past, head_dim])."""
    dec = {s.name: s.dims for s in decoder.inputs}
    enc = {s.name: s.dims for s in encoder.inputs}
    return cache_spec_from_dims(dec, enc)


# --------------------------------------------------------------------------- torch
class TorchStepBackend:
    """The model source's encoder and decoder-step modules on CPU tensors (zero-copy numpy)."""

    def __init__(self, source, name: str = "torch") -> None:  # type: ignore[no-untyped-def]
        self.name = name
        self.source = source
        self.encoder = source.module(ENCODER).eval()
        self.decoder = source.module(DECODER).eval()
        self.enc_contract = source.contract(ENCODER)
        self.dec_contract = source.contract(DECODER)
        self._spec = spec_from_contracts(self.enc_contract, self.dec_contract)

    def cache_spec(self) -> CacheSpec:
        return self._spec

    @staticmethod
    def _run(module, contract: GraphContract, feeds: Mapping[str, np.ndarray]  # type: ignore[no-untyped-def]
             ) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            outs = module(*(torch.from_numpy(np.ascontiguousarray(feeds[n]))
                            for n in contract.input_names))
        return {n: o.numpy() for n, o in zip(contract.output_names, outs)}

    def encode(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._run(self.encoder, self.enc_contract, feeds)

    def decode(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._run(self.decoder, self.dec_contract, feeds)


class TorchDeviceStepper(Stepper):
    """The source's encoder / decoder-step modules with the whole state (cross K/V, cache) kept
    as tensors on ``device`` in ``dtype``: only the new ids go in and the last position's logits
    come out per step (``torch-cuda``, ``torch-cuda-fp16``: real GPU arithmetic)."""

    def __init__(self, source, device: str, dtype, name: str) -> None:  # type: ignore[no-untyped-def]
        import copy

        import torch

        self.name = name
        self.device, self.dtype = torch.device(device), dtype
        source = copy.deepcopy(source)  # never move the caller's model
        source.to(self.device, dtype)
        self.encoder = source.module(ENCODER).eval()
        self.decoder = source.module(DECODER).eval()
        self.enc_contract = source.contract(ENCODER)
        self.dec_contract = source.contract(DECODER)
        self.spec = spec_from_contracts(self.enc_contract, self.dec_contract)
        self.latent_dim = self.spec.latent_dim
        self._state: dict = {}

    def _t(self, a: np.ndarray):  # type: ignore[no-untyped-def]
        import torch

        t = torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
        return t.to(self.dtype) if t.is_floating_point() else t

    def start(self, src_ids: np.ndarray, src_mask: np.ndarray, noise: np.ndarray) -> None:
        import torch

        feeds = {SRC_IDS: self._t(src_ids), SRC_MASK: self._t(src_mask), NOISE: self._t(noise)}
        with torch.inference_mode():
            outs = self.encoder(*(feeds[n] for n in self.enc_contract.input_names))
        state = dict(zip(self.enc_contract.output_names, outs))
        state[SRC_MASK] = feeds[SRC_MASK]
        s = self.spec
        empty = torch.zeros((src_ids.shape[0], s.heads, 0, s.head_dim), device=self.device,
                            dtype=self.dtype)
        for i in range(s.layers):
            state[past_key(i)] = state[past_value(i)] = empty
        self._state = state

    def step(self, new_ids: np.ndarray) -> np.ndarray:
        import torch

        st = dict(self._state, **{TGT_IDS: self._t(new_ids.astype(np.int64))})
        with torch.inference_mode():
            outs = self.decoder(*(st[n] for n in self.dec_contract.input_names))
        out = dict(zip(self.dec_contract.output_names, outs))
        for i in range(self.spec.layers):
            self._state[past_key(i)] = out[present_key(i)]
            self._state[past_value(i)] = out[present_value(i)]
        return out[LOGITS][:, -1, :].float().cpu().numpy()

    def select(self, rows: np.ndarray) -> None:
        import torch

        index = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.device)
        self._state = {k: v.index_select(0, index) for k, v in self._state.items()}


class TorchNoCacheStepper(Stepper):
    """The full teacher-forced model over BOS + every token so far, each step."""

    def __init__(self, source, name: str = "torch-nocache") -> None:  # type: ignore[no-untyped-def]
        self.name = name
        self.full = source.module(FULL).eval()
        contract = source.contract(FULL)
        self.latent_dim = int(next(s.dims[2] for s in contract.inputs if s.name == NOISE))
        self._state: dict[str, np.ndarray] = {}

    def start(self, src_ids: np.ndarray, src_mask: np.ndarray, noise: np.ndarray) -> None:
        self._state = {"src_ids": src_ids, "src_mask": src_mask, "noise": noise,
                       "prefix": np.zeros((src_ids.shape[0], 0), dtype=np.int64)}

    def step(self, new_ids: np.ndarray) -> np.ndarray:
        import torch

        s = self._state
        s["prefix"] = np.concatenate([s["prefix"], new_ids.astype(np.int64)], axis=1)
        with torch.inference_mode():
            (logits, *_) = self.full(*(torch.from_numpy(np.ascontiguousarray(s[k]))
                                       for k in ("src_ids", "src_mask", "prefix", "noise")))
        return logits[:, -1, :].numpy()

    def select(self, rows: np.ndarray) -> None:
        self._state = {k: np.take(v, rows, axis=0) for k, v in self._state.items()}


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


def stepper_from_build(root: str | Path, backend: str, *, threads: int | None = None
                       ) -> tuple[Stepper, BuildConfig]:
    """(stepper, build config) for ``backend`` over a build folder."""
    from ..core.build_folder import open_build

    if backend not in BACKENDS:
        raise InputError(f"unknown generation backend {backend!r} (use {', '.join(BACKENDS)})")
    folder = open_build(root)
    return make_stepper(folder.layout.root, folder.cfg, backend, threads=threads,
                        load_source=lambda: load_build_source(folder)), folder.cfg


def make_stepper(root: Path, cfg: BuildConfig, backend: str, *, threads: int | None = None,
                 load_source=None) -> Stepper:  # type: ignore[no-untyped-def]
    """A stepper over the graphs in ``root`` (any folder: the build stage uses its staging
    folder) or, for torch backends, over the source ``load_source()`` returns."""
    if backend not in BACKENDS:
        raise InputError(f"unknown generation backend {backend!r} (use {', '.join(BACKENDS)})")
    from ..model.sources import generation_refusal

    root = Path(root)
    refusal = generation_refusal(cfg.model)
    if refusal:
        raise InputError(f"cannot generate: {refusal}")
    if backend.startswith("torch"):
        if load_source is None:
            raise InputError(f"backend {backend} needs the build's checkpoint")
        if backend.startswith("torch-cuda"):
            import torch

            if not torch.cuda.is_available():
                raise BackendUnavailable(f"{backend}: CUDA is not available to PyTorch here")
            dtype = torch.float16 if backend.endswith("fp16") else torch.float32
            return TorchDeviceStepper(load_source(), "cuda", dtype, backend)
        source = load_source()
        if backend == "torch":
            return CachedStepper(TorchStepBackend(source))
        return TorchNoCacheStepper(source)
    from ..runners.onnxruntime_runner import tuned_session_options

    threads = threads or generation_threads()
    # Spinning pool workers preempt the Python loop between steps when they take every core:
    # measured p99/p50 of 13 with spinning on 2 threads / 2 cores, 1.6 without (docs/generation.md).
    spin = threads < cpu_count()
    layout = BuildLayout(root)
    enc, dec = layout.graph(ENCODER), layout.graph(DECODER)
    if not (enc.is_file() and dec.is_file()):
        raise ArtifactError(f"{root} has no {enc.name} / {dec.name}: rebuild it with a version "
                            "that exports the generation graphs")
    if backend == "onnxruntime":
        from ..runners.onnxruntime_runner import session_options

        return CachedStepper(OrtStepBackend(enc, dec, name=backend,
                                            sess_options=session_options(threads)))
    if backend == "onnxruntime-opt":
        enc_o, dec_o = layout.graph(ENCODER, "opt"), layout.graph(DECODER, "opt")
        enc, dec = (enc_o if enc_o.is_file() else enc), (dec_o if dec_o.is_file() else dec)
        return CachedStepper(OrtStepBackend(enc, dec, name=backend,
                                            sess_options=tuned_session_options(threads,
                                                                               spinning=spin)))
    enc, dec = layout.graph(ENCODER, "fp16"), layout.graph(DECODER, "fp16")
    if not (enc.is_file() and dec.is_file()):
        raise BackendUnavailable(f"{root} has no {enc.name} / {dec.name} (the build's FP16 stage "
                                 "did not write them)")
    return CachedStepper(OrtStepBackend(enc, dec, name=backend,
                                        sess_options=tuned_session_options(threads,
                                                                           spinning=spin)))
