"""TensorRT: the build's FP16 engine of the primary graph (parity and bench), where TensorRT and a
GPU exist; elsewhere listed with the reason it cannot run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.config import BuildConfig
from ..core.errors import BackendUnavailable
from ..core.io_contract import GraphContract
from ..core.layout import BuildLayout
from ..runners.tensorrt_runner import TrtRunner, probe_runtime
from .registry import Backend, SourceModel, forward


@forward(order=50)
def forward_backends(layout: BuildLayout, cfg: BuildConfig, model: SourceModel,
                     contract: GraphContract, *, threads: int | None = None) -> list[Backend]:
    """The TensorRT engine as a registry entry (parity and bench), or the reason it cannot run
    here (any graph: a graph without tgt_ids, the classifier, picks its profile by the axes it
    has)."""

    runner_cls: Any = TrtRunner if "tgt_ids" in contract.input_names else _contract_trt_runner()

    precision = "fp16" if cfg.engine.fp16 else "fp32"
    if not layout.engine.is_file():
        return [Backend("tensorrt", precision, None, f"no engine ({layout.engine.name} not built)")]
    try:
        runtime = probe_runtime()
    except BackendUnavailable as exc:
        return [Backend("tensorrt", precision, None, str(exc))]
    root: Path = layout.root
    return [Backend("tensorrt", precision, lambda: runner_cls(
        root, contract, vocab_size=cfg.model.vocab_size, runtime=runtime))]


def _contract_trt_runner() -> type:
    """TrtRunner choosing its optimization profile from the axes the contract's inputs have
    (the base class reads batch / src_len / tgt_len of a full-graph feed)."""
    import numpy as np

    from ..core.errors import InputError

    class ContractTrtRunner(TrtRunner):
        def _infer(self, feeds):  # type: ignore[no-untyped-def]
            sizes: dict[str, int] = {}
            for spec in self.contract.inputs:
                for d, n in zip(spec.dims, feeds[spec.name].shape):
                    if isinstance(d, str) and d in ("batch", "src_len", "tgt_len"):
                        sizes[d] = int(n)
            fits = [i for i, p in enumerate(self.profiles)
                    if all(p.axis(a).contains(v) for a, v in sizes.items())]
            if not fits:
                raise InputError(f"shape {sizes} is outside every engine profile")
            index = min(fits, key=lambda i: (self.profiles[i].batch[2]
                                             * self.profiles[i].src_len[2], i))
            if index != self._profile:
                self._runner.set_profile(index)
                self._profile = index
            feed = dict(feeds)
            with self.timed():
                out = self._runner.infer(feed)
            return {name: np.asarray(out[name], dtype=np.float32)
                    for name in self.contract.output_names}

    return ContractTrtRunner
