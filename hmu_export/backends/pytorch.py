"""PyTorch backends: the source model itself, forward (parity's FP32 reference, FP16 on the CPU,
CUDA) and as generation steppers.

==================  ==========================================================================
torch               the model's own cached step: the source's encoder / decoder modules
torch-nocache       the full model re-run over the whole prefix every step (no split at all):
                    the independent reference
torch-cuda(-fp16)   the source's modules on a CUDA GPU, state kept on the device
==================  ==========================================================================

Every step backend reads the cache geometry from what the module source's contract declares,
never d_model // heads.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from ..core.config import BuildConfig
from ..core.layout import BuildLayout
from ..core.errors import BackendUnavailable
from ..core.io_contract import (DECODER, ENCODER, FULL, LOGITS, NOISE, PAST_MASK, POSITIONS,
                                SRC_IDS, SRC_MASK, TGT_IDS, GraphContract, past_key, past_value,
                                present_key, present_value)
from ..generate.stepper import (CacheSpec, CachedStepper, Stepper, cache_spec_from_dims,
                                next_row_state)
from ..runners import Runner, TorchRunner
from .registry import (BENCH_ONLY, EVERYWHERE, Backend, SourceModel, StepEntry, StepRequest,
                       forward, step)


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
        self._past_mask = np.zeros((src_ids.shape[0], 0), dtype=np.int64)  # host: tiny

    def step(self, new_ids: np.ndarray) -> np.ndarray:
        import torch

        positions, grown = next_row_state(self._past_mask, new_ids.shape[1])
        st = dict(self._state, **{TGT_IDS: self._t(new_ids.astype(np.int64)),
                                  POSITIONS: self._t(positions),
                                  PAST_MASK: self._t(self._past_mask)})
        with torch.inference_mode():
            outs = self.decoder(*(st[n] for n in self.dec_contract.input_names))
        out = dict(zip(self.dec_contract.output_names, outs))
        for i in range(self.spec.layers):
            self._state[past_key(i)] = out[present_key(i)]
            self._state[past_value(i)] = out[present_value(i)]
        self._past_mask = grown
        return out[LOGITS][:, -1, :].float().cpu().numpy()

    def select(self, rows: np.ndarray) -> None:
        import torch

        index = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.device)
        self._state = {k: v.index_select(0, index) for k, v in self._state.items()}
        self._past_mask = np.take(self._past_mask, rows, axis=0)


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


# --------------------------------------------------------------------------- registry
def torch_backends(cfg: BuildConfig, model: SourceModel, contract: GraphContract, *,
                   fp16: bool = True) -> list[Backend]:
    """The source model in PyTorch: FP32 on the CPU (parity's reference), FP16 on the CPU (a
    stand-in for GPU half precision), FP32 / FP16 on CUDA where PyTorch sees a GPU. ``fp16``
    false keeps the FP16 ones out of parity."""
    import torch

    def make(precision: str, device: str, label: str) -> Callable[[], Runner]:
        return lambda: TorchRunner(model, contract, [cfg.profile], precision=precision,
                                   device=device, label=label)

    half = EVERYWHERE if fp16 else BENCH_ONLY
    out = [Backend("torch", "fp32", make("fp32", "cpu", "torch"), uses=BENCH_ONLY),
           Backend("torch-fp16", "fp16", make("fp16", "cpu", "torch-fp16"), uses=half)]
    for precision in ("fp32", "fp16"):
        label = f"torch-cuda-{precision}"
        if torch.cuda.is_available():
            out.append(Backend(label, precision, make(precision, "cuda", label), device="cuda",
                               uses=half if precision == "fp16" else EVERYWHERE))
        else:
            out.append(Backend(label, precision, None, "no CUDA GPU visible to PyTorch",
                               device="cuda", uses=BENCH_ONLY))
    return out


@forward(order=40)
def forward_backends(layout: BuildLayout, cfg: BuildConfig, model: SourceModel,
                     contract: GraphContract, *, threads: int | None = None) -> list[Backend]:
    return torch_backends(cfg, model, contract, fp16=cfg.parity.fp16)


def _cuda_stepper(req: StepRequest) -> Stepper:
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable(f"{req.name}: CUDA is not available to PyTorch here")
    dtype = torch.float16 if req.name.endswith("fp16") else torch.float32
    return TorchDeviceStepper(req.source(), "cuda", dtype, req.name)


step(StepEntry("torch", 10, "fp32", "cpu", "the build's checkpoint (encoder / decoder modules)",
               lambda req: CachedStepper(TorchStepBackend(req.source()))))
step(StepEntry("torch-nocache", 11, "fp32", "cpu", "the build's checkpoint (full model)",
               lambda req: TorchNoCacheStepper(req.source())))
step(StepEntry("torch-cuda", 50, "fp32", "cuda", "the build's checkpoint and a CUDA GPU",
               _cuda_stepper))
step(StepEntry("torch-cuda-fp16", 51, "fp16", "cuda", "the build's checkpoint and a CUDA GPU",
               _cuda_stepper))
