"""TensorRT runner (Polygraphy's TrtRunner underneath) and the engine's build record.

A serialized engine only runs on the TensorRT version and GPU that built it (unless it was built
version- or hardware-compatible), and it silently computes a different model if model.onnx
changed since. So every engine has a record, ``engine.json`` beside it (written by the build
stage or by ``build_engine.sh``), and the runner refuses an engine whose record does not match
the graph, the runtime or the GPU, with a message that says how to rebuild.

Nothing here needs TensorRT to import; ``probe_runtime`` says why TensorRT cannot be used.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.layout import BuildLayout
from ..core.config import ProfileConfig
from ..core.errors import ArtifactError, BackendUnavailable, InputError
from ..core.fileio import read_json_object, sha256_file
from ..core.io_contract import GraphContract, feed_shape
from .base import Runner

RECORD_FILE = "engine.json"
REBUILD = ("rebuild it on this machine: `python -m hmu_export engine --artifacts {root}` "
           "or `{root}/build_engine.sh`")


@dataclass(frozen=True)
class RuntimeInfo:
    """What an engine is tied to: the TensorRT version and the GPU."""

    tensorrt: str
    gpu_name: str
    compute_capability: str  # "major.minor", e.g. "9.0"

    def to_dict(self) -> dict[str, Any]:
        return {"tensorrt": self.tensorrt,
                "gpu": {"name": self.gpu_name, "compute_capability": self.compute_capability}}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def gpu_info() -> tuple[str, str]:
    """(name, compute capability) of GPU 0, from PyTorch's CUDA or nvidia-smi."""
    try:
        import torch
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return torch.cuda.get_device_name(0), f"{major}.{minor}"
    except Exception:  # a CPU-only torch build or a broken driver: fall back to nvidia-smi
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BackendUnavailable(f"no CUDA GPU visible (nvidia-smi: {_first_line(exc)})") from None
    line = out.strip().splitlines()[0] if out.strip() else ""
    if "," not in line:
        raise BackendUnavailable("no CUDA GPU visible (nvidia-smi listed none)")
    name, cc = (s.strip() for s in line.split(",", 1))
    return name, cc


def probe_runtime() -> RuntimeInfo:
    """TensorRT version and GPU, or BackendUnavailable saying which one is missing and why."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or OSError from missing libnvinfer/libnvonnxparser
        raise BackendUnavailable(f"TensorRT is not installed or cannot load "
                                 f"({_first_line(exc)})") from None
    if not hasattr(trt, "Builder"):  # tensorrt-stubs alone makes `tensorrt` a namespace package
        raise BackendUnavailable("TensorRT is not installed (only its type stubs are)")
    name, cc = gpu_info()
    return RuntimeInfo(str(trt.__version__), name, cc)


def _version_parts(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.strip().split("."):
        if not p.isdigit():
            break
        parts.append(int(p))
    return tuple(parts)


def _cc(v: str) -> tuple[int, int]:
    parts = _version_parts(v)
    if len(parts) < 2:
        raise ArtifactError(f"bad compute capability '{v}' in the engine record")
    return parts[0], parts[1]


def check_engine_record(record: Mapping[str, Any], onnx_sha256: str, runtime: RuntimeInfo,
                        root: Path | str = "DIR") -> None:
    """Refuse (ArtifactError) an engine whose record does not match the graph or this runtime."""
    how = REBUILD.format(root=root)
    built_trt = str(record.get("tensorrt") or "")
    gpu = record.get("gpu") or {}
    if not built_trt or not gpu.get("compute_capability"):
        raise ArtifactError(f"the engine's record has no TensorRT version or GPU; {how}")
    if record.get("onnx_sha256") != onnx_sha256:
        raise ArtifactError(f"the engine was built from another model.onnx (sha256 "
                            f"{str(record.get('onnx_sha256'))[:12]}, graph is {onnx_sha256[:12]}); "
                            f"{how}")
    flags = record.get("flags") or {}
    have, want = _version_parts(runtime.tensorrt), _version_parts(built_trt)
    if flags.get("version_compatible"):
        # Version-compatible plans run on the same or a later TensorRT of the same major.
        ok = bool(have) and bool(want) and have[0] == want[0] and have >= want
    else:
        n = max(3, min(len(have), len(want)))  # trtexec logs 3 components, Python has 4
        ok = bool(have) and have[:n] == want[:n]
    if not ok:
        raise ArtifactError(f"the engine was built with TensorRT {built_trt}, this runtime is "
                            f"TensorRT {runtime.tensorrt}; {how}")
    level = flags.get("hardware_compatibility", "none")
    built_cc, run_cc = _cc(str(gpu["compute_capability"])), _cc(runtime.compute_capability)
    if level == "ampere_plus":
        ok = run_cc >= (8, 0)
    elif level == "same_compute_capability":
        ok = run_cc == built_cc
    else:
        ok = run_cc == built_cc and str(gpu.get("name", "")) == runtime.gpu_name
    if not ok:
        raise ArtifactError(f"the engine was built for {gpu.get('name', '?')} (sm "
                            f"{gpu['compute_capability']}, hardware_compatibility={level}), this "
                            f"GPU is {runtime.gpu_name} (sm {runtime.compute_capability}); {how}")


def read_engine_record(root: Path) -> dict[str, Any]:
    path = Path(root) / RECORD_FILE
    if not path.is_file():
        raise ArtifactError(f"no {RECORD_FILE} beside the engine in {root}; "
                            + REBUILD.format(root=root))
    return read_json_object(path, ArtifactError, "engine record")


def record_profiles(record: Mapping[str, Any]) -> list[ProfileConfig]:
    try:
        return [ProfileConfig(**{k: tuple(v) for k, v in p.items()})
                for p in record.get("profiles", [])]
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"bad profiles in the engine record: {exc}") from None


def select_profile(profiles: Sequence[ProfileConfig], batch: int, src_len: int,
                   tgt_len: int) -> int:
    """Index of the tightest profile containing the shape; InputError when none does.

    Tightest = smallest max-volume: a profile made for short requests has kernels tuned for
    them, while the first ([profile]) one covers everything.
    """
    fits = [i for i, p in enumerate(profiles) if p.contains(batch, src_len, tgt_len)]
    if not fits:
        ranges = " | ".join(f"batch {p.batch[0]}..{p.batch[2]}, src_len {p.src_len[0]}.."
                            f"{p.src_len[2]}, tgt_len {p.tgt_len[0]}..{p.tgt_len[2]}"
                            for p in profiles)
        raise InputError(f"shape batch={batch}, src_len={src_len}, tgt_len={tgt_len} is outside "
                         f"every engine profile (allowed: {ranges})")
    return min(fits, key=lambda i: (profiles[i].batch[2] * profiles[i].src_len[2]
                                    * profiles[i].tgt_len[2], i))


class TrtRunner(Runner):
    """Runs ``model.fp16.plan`` of a build folder after checking its record."""

    backend = "tensorrt"

    def __init__(self, root: Path, contract: GraphContract, *, vocab_size: int | None = None,
                 label: str | None = None, runtime: RuntimeInfo | None = None) -> None:
        root = Path(root)
        layout = BuildLayout(root)
        engine, onnx_path = layout.engine, layout.onnx
        if not engine.is_file():
            raise ArtifactError(f"no TensorRT engine {engine}; " + REBUILD.format(root=root))
        record = read_engine_record(root)
        profiles = record_profiles(record)
        if not profiles:
            raise ArtifactError(f"the engine record in {root} lists no optimization profile")
        fp16 = bool((record.get("flags") or {}).get("fp16", True))
        super().__init__(contract, profiles, precision="fp16" if fp16 else "fp32",
                         vocab_size=vocab_size, label=label or "tensorrt")
        if not onnx_path.is_file():
            raise ArtifactError(f"model.onnx not found in {root}: cannot check the engine")
        runtime = runtime or probe_runtime()
        check_engine_record(record, sha256_file(onnx_path), runtime, root)
        if record.get("engine_sha256") and record["engine_sha256"] != sha256_file(engine):
            raise ArtifactError(f"{engine} differs from the engine its record describes; "
                                + REBUILD.format(root=root))
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes
        from polygraphy.backend.trt import TrtRunner as PolygraphyTrtRunner

        self.record = record
        self._runner = PolygraphyTrtRunner(EngineFromBytes(BytesFromPath(str(engine))))
        self._runner.activate()
        self._profile = 0

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        index = select_profile(self.profiles, *feed_shape(feeds))
        if index != self._profile:
            self._runner.set_profile(index)
            self._profile = index
        feed = dict(feeds)
        with self.timed():  # Polygraphy's infer: copies in, execution, copies out
            out = self._runner.infer(feed)
        return {name: np.asarray(out[name], dtype=np.float32)
                for name in self.contract.output_names}

    def close(self) -> None:
        runner = getattr(self, "_runner", None)
        if runner is not None and runner.is_active:
            runner.deactivate()
