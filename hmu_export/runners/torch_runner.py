"""The PyTorch reference runner (eager), FP32 or FP16, CPU or CUDA."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from ..config import ProfileConfig
from ..errors import BackendUnavailable, InputError
from ..io_contract import GraphContract
from ..model import HMUTransformer
from .base import Runner


FP16_OVERFLOW = 65520.0  # float32 values from here up round to inf in float16


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, model: HMUTransformer, contract: GraphContract,
                 profiles: Sequence[ProfileConfig] | None = None, *, precision: str = "fp32",
                 device: str = "cpu", label: str | None = None) -> None:
        super().__init__(contract, profiles, precision=precision,
                         vocab_size=model.cfg.vocab_size, label=label or f"torch-{device}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable("CUDA is not available to PyTorch on this machine")
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"precision must be fp32 or fp16, got {precision}")
        self.device = torch.device(device)
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        # A private copy, so FP16 casting never touches the caller's reference model.
        self.model = HMUTransformer(model.cfg)
        self.model.load_state_dict(model.state_dict())
        self.model = self.model.to(device=self.device, dtype=self.dtype).eval()

    def validate(self, feeds: Mapping[str, np.ndarray]) -> None:
        """The contract's checks, then the noise as this runner will hold it (float16 overflows
        at 65504, where float32 noise is still finite)."""
        super().validate(feeds)
        noise = feeds.get("noise")
        if self.dtype == torch.float16 and noise is not None and noise.size:
            peak = float(np.abs(noise).max())
            if peak >= FP16_OVERFLOW:
                raise InputError(f"input 'noise' overflows float16 (max |noise| {peak:.3g} > "
                                 f"{float(np.finfo(np.float16).max):g}) on {self.label}")

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        t = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in feeds.items()}
        t["noise"] = t["noise"].to(self.dtype)
        with torch.inference_mode():
            out = self.model.forward_all(t["src_ids"], t["src_mask"], t["tgt_ids"], t["noise"])
        return {name: out[name].float().cpu().numpy() for name in self.contract.output_names}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
