"""ONNX Runtime runner: CPU here, CUDA / TensorRT execution providers where installed."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..core.config import ProfileConfig
from ..core.errors import ArtifactError, BackendUnavailable, InputError
from ..core.io_contract import LOGITS, GraphContract
from .base import Runner

CONFIG_METADATA_KEY = "hmu_export.config"  # export.py's META_PREFIX + "config"

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
        graph_vocab = graph_vocab_size(self.session)
        if vocab_size is not None and graph_vocab is not None and vocab_size != graph_vocab:
            raise ArtifactError(f"{path} has a vocabulary of {graph_vocab} tokens, the caller "
                                f"says {vocab_size}")
        if self.vocab_size is None:  # token ids are checked against the graph's own vocabulary
            self.vocab_size = graph_vocab

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = dict(feeds)
        try:
            with self.timed():
                outs = self.session.run(self.contract.output_names, feed)
        except Exception as exc:  # ORT's own error types (unchecked feeds reach it here)
            text = str(exc).strip()
            raise InputError(f"ONNX Runtime failed on {self.path.name}: "
                             f"{text.splitlines()[0] if text else type(exc).__name__}") from None
        return dict(zip(self.contract.output_names, outs))


def graph_vocab_size(session) -> int | None:  # type: ignore[no-untyped-def]
    """The vocabulary a graph was built for: ``model.vocab_size`` of its ``hmu_export.config``
    metadata, else the fixed last dim of its ``logits`` output; None when it states neither."""
    try:
        meta = session.get_modelmeta().custom_metadata_map or {}
        config = json.loads(meta.get(CONFIG_METADATA_KEY, ""))
        vocab = config["model"]["vocab_size"]
        if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab >= 1:
            return vocab
    except (ValueError, TypeError, KeyError, AttributeError):  # absent or malformed metadata
        pass
    for out in session.get_outputs():
        if out.name == LOGITS and out.shape and isinstance(out.shape[-1], int) \
                and out.shape[-1] >= 1:
            return int(out.shape[-1])
    return None


# --------------------------------------------------------------------------- session options
def cpu_threads() -> int:
    """Cores this process may run on (cgroup/affinity aware), the default intra-op threads."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


#: ONNX Runtime graph optimizers whose fused kernel is slower on CPU than the ops it replaces
#: (docs/performance.md): onnxruntime 1.32's SkipLayerNormalization takes 4-9x the time of
#: Add + LayerNormalization at d=128 (1.19 ms vs 0.25 ms at 8x128 tokens, one thread).
SLOW_CPU_FUSIONS: tuple[str, ...] = ("SkipLayerNormFusion",)
#: the session config key that names optimizers to leave out (comma-separated)
DISABLE_OPTIMIZERS_KEY = "optimization.disable_specified_optimizers"


def tuned_session_options(threads: int | None = None, *, spinning: bool = True,
                          optimization: str = "all",
                          disabled_optimizers: Sequence[str] = ()):  # type: ignore[no-untyped-def]
    """Session options measured fastest here for one request at a time (docs/performance.md).

    intra-op threads = cores (ORT's default also counts hyper-threads), one inter-op thread and
    sequential execution (this graph has no parallel branches worth a second pool), full graph
    optimization at load (layout transforms are CPU-specific, so they happen at load, never in
    the saved file), memory patterns and the CPU arena on (shapes repeat in serving loops).
    ``spinning=False`` lets idle workers sleep: slower per request, kinder to a shared machine.
    ``disabled_optimizers``: ORT optimizers left out at load (``forward_session_options``).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
    opts.intra_op_num_threads = threads or cpu_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_mem_pattern = True
    opts.enable_cpu_mem_arena = True
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if disabled_optimizers:
        opts.add_session_config_entry(DISABLE_OPTIMIZERS_KEY, ",".join(disabled_optimizers))
    return opts


def forward_session_options(threads: int | None = None, *, spinning: bool = True,
                            optimization: str = "all"):  # type: ignore[no-untyped-def]
    """The tuned options for the forward graph (``model.opt.onnx``): ``SLOW_CPU_FUSIONS`` off,
    so ORT does not fuse back at load what the optimize stage saved unfused."""
    return tuned_session_options(threads, spinning=spinning, optimization=optimization,
                                 disabled_optimizers=SLOW_CPU_FUSIONS)


# --------------------------------------------------------------------------- from a build
def cpu_count() -> int:
    from .onnxruntime_runner import cpu_threads
    return cpu_threads()


def generation_threads() -> int:
    """Default runtime threads for generation: every core but one, which the loop itself needs
    between steps (sampling, cache bookkeeping); at least one."""
    return max(1, cpu_count() - 1)
