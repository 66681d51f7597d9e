"""Pod memory from the build's own memory estimate, so requests follow the model that is served.

``core.memory.estimate_memory(cfg)`` is the deliberate over-estimate ``build`` checks against the
machine: 8 fp32 copies of the parameters plus 8 of the activations at the profile's max. A Triton
pod holds one ONNX Runtime (or TensorRT) copy of a graph per model instance, which that covers for
a handful of instances; the terms below add what it does not know about:

    memory = 512 MiB                       tritonserver itself, its backends and HTTP/gRPC buffers
           + 192 MiB x python instances    each python-backend instance is a stub process
                                           (Python, numpy, ONNX Runtime)
           + max(build estimate,           from the config the manifest (or a graph) records
                 2 x served files x instances)   one session + its arena per instance
           + 256 MiB                       memory-backed /dev/shm (k8s, python models served)
           rounded up to 64 MiB; requests = limits (Guaranteed memory, no overcommit).

Without a recorded config only the file term is used (the README says so).
"""
from __future__ import annotations

from dataclasses import dataclass

from .served import RepoModel, Repository

MIB = 1 << 20
TRITON_BASE = 512 * MIB
PYTHON_STUB = 192 * MIB


@dataclass(frozen=True)
class MemoryEstimate:
    bytes: int
    detail: str  # one line: the terms, for the README

    @property
    def quantity(self) -> str:
        return f"{self.bytes // MIB}Mi"


def estimate_pod_memory(repo: Repository, served: list[RepoModel], shm_mib: int = 0
                        ) -> MemoryEstimate:
    from ...core.memory import estimate_memory

    python = sum(m.instances for m in served if m.backend == "python")
    files = 2 * sum(m.bytes * m.instances for m in served)
    if repo.cfg is not None:
        build, why = estimate_memory(repo.cfg)
        model = max(build, files)
        model_text = (f"max(build estimate {build / MIB:.0f} MiB [{why}; config from "
                      f"{repo.cfg_source}], 2 x served files {files / MIB:.0f} MiB)")
    else:
        model = files
        model_text = f"2 x served files {files / MIB:.0f} MiB ({repo.cfg_source})"
    total = TRITON_BASE + python * PYTHON_STUB + model + shm_mib * MIB
    total = -(-total // (64 * MIB)) * 64 * MIB
    shm = f" + {shm_mib} MiB /dev/shm" if shm_mib else ""
    return MemoryEstimate(total, f"{total // MIB} MiB = 512 MiB tritonserver + {python} python "
                                 f"instance(s) x 192 MiB + {model_text}{shm}, rounded up to "
                                 "64 MiB")
