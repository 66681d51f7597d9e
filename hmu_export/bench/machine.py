"""The machine a bench ran on: CPU model, threads, load, and its own measured matmul peak."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any, Callable
import numpy as np


# --------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict[str, Any]:
    """What a reader needs to compare figures: CPU, cores, GPU, library versions, load."""
    import onnx
    import onnxruntime as ort
    import torch

    from .. import __version__
    info: dict[str, Any] = {
        "cpu": cpu_model(), "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads, "torch_threads": torch.get_num_threads(), "ort_intra_op_threads": threads,
        "platform": platform.platform(), "python": platform.python_version(),
        "versions": {"hmu_export": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": ort.__version__, "numpy": np.__version__},
        "ort_providers": ort.get_available_providers(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["loadavg_start"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    try:
        import tensorrt  # type: ignore[import-not-found]
        info["versions"]["tensorrt"] = tensorrt.__version__
    except Exception:  # noqa: BLE001 - absent or broken TensorRT is the normal case here
        info["versions"]["tensorrt"] = None
    return info


def sgemm_peak(threads: int, seconds: float = 1.5) -> dict[str, Any]:
    """Best FP32 matmul GFLOP/s of torch, numpy (BLAS) and ONNX Runtime (MLAS) on square matrices,
    with the same thread count as the benchmark: the machine's practical compute ceiling."""
    import torch

    torch.set_num_threads(threads)
    best: dict[str, Any] = {"gflops": 0.0, "library": "", "n": 0}
    rng = np.random.default_rng(0)
    per = max(seconds / 6, 0.01)
    for n in (256, 512, 1024):
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        libs: list[tuple[str, Callable[[], Any]]] = [("torch", lambda: torch.mm(ta, tb)),
                                                    ("numpy", lambda: a @ b)]
        ort_mm = _ort_matmul(b, threads)  # MLAS, the kernels ONNX Runtime itself uses
        if ort_mm is not None:
            libs.append(("onnxruntime", lambda: ort_mm(a)))
        for lib, fn in libs:
            fn()
            reps, t0 = 0, time.perf_counter()
            best_t = float("inf")
            while reps < 3 or time.perf_counter() - t0 < per:
                s = time.perf_counter()
                fn()
                best_t = min(best_t, time.perf_counter() - s)
                reps += 1
            g = 2 * n ** 3 / best_t / 1e9
            if g > best["gflops"]:
                best = {"gflops": round(g, 2), "library": lib, "n": n}
    return best


def _ort_matmul(b: np.ndarray, threads: int) -> Callable[[np.ndarray], Any] | None:
    """x -> x @ b as a one-node ONNX Runtime graph (b a constant), or None if it fails."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        n = b.shape[0]
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "b"], ["y"])], "sgemm",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
            [numpy_helper.from_array(b, "b")])
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        from ..runners.onnxruntime_runner import tuned_session_options
        sess = ort.InferenceSession(proto.SerializeToString(), tuned_session_options(threads),
                                    providers=["CPUExecutionProvider"])
        return lambda x: sess.run(None, {"x": x})
    except Exception:  # noqa: BLE001 - the peak then comes from torch / numpy alone
        return None
