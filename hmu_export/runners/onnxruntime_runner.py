"""ONNX Runtime runner: CPU here, CUDA / TensorRT execution providers where installed."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..config import ProfileConfig
from ..errors import ArtifactError, BackendUnavailable
from ..io_contract import GraphContract
from .base import Runner

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider"}


def resolve_providers(names: Sequence[str]) -> list[str]:
    """Map short names to ORT providers, refusing ones this onnxruntime build lacks."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    out = []
    for name in names:
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full not in have:
            raise BackendUnavailable(f"ONNX Runtime provider {full} is not available "
                                     f"(have: {', '.join(have)})")
        out.append(full)
    return out


def session_options(threads: int | None = None, optimization: str = "all"):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    level = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
             "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
             "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
             "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
    opts.graph_optimization_level = level
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return opts


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, path: Path, contract: GraphContract,
                 profiles: Sequence[ProfileConfig] | None = None, *,
                 providers: Sequence[str] = ("cpu",), precision: str = "fp32",
                 threads: int | None = None, vocab_size: int | None = None,
                 label: str | None = None, sess_options=None) -> None:  # type: ignore[no-untyped-def]
        import onnxruntime as ort

        super().__init__(contract, profiles, precision=precision, vocab_size=vocab_size,
                         label=label or f"onnxruntime-{providers[0]}")
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"ONNX graph not found: {path}")
        self.path = path
        self.providers = resolve_providers(providers)
        opts = sess_options or session_options(threads)
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=self.providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise ArtifactError(f"ONNX Runtime cannot load {path}: "
                                f"{str(exc).splitlines()[0]}") from None
        names = [i.name for i in self.session.get_inputs()]
        if names != contract.input_names:
            raise ArtifactError(f"{path} has inputs {names}, contract expects "
                                f"{contract.input_names}")

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self.contract.output_names, dict(feeds))
        return dict(zip(self.contract.output_names, outs))
