"""Quantized CPU graphs with ONNX Runtime's own tools: int8 weights and int4 weight-only.

- ``int8``, ``[int8] mode = "dynamic"``: ``quantize_dynamic`` with per-channel int8 weights
  (MatMul / Gemm); activations are quantized at run time (``DynamicQuantizeLinear`` +
  ``MatMulInteger``).
- ``int8``, ``mode = "static"``: ``quantize_static`` in QDQ format, the same per-channel weights
  and fixed activation scales calibrated on recorded feeds (export/calibration.py); ORT fuses
  the QuantizeLinear / DequantizeLinear pairs into int8 kernels when it loads the graph.
- ``int4``: ``MatMulNBitsQuantizer`` (weight-only, blockwise, ``accuracy_level`` 4 computes the
  activations in int8), the format ONNX Runtime's CPU kernels run fastest at batch 1.

Kept in FP32 by default: the HMU's nodes (its gate and VAE are where FP16 already needs pins, and
it is ~1% of the weights) and the LM head (every logit goes through it). Both, and any extra
node, are configurable in ``[int8]``. Weights are 7-bit (``reduce_range``) unless the CPU has
VNNI: without VNNI the u8 x s8 multiply-add of AVX2 saturates on full-range int8 weights.

Every graph is written atomically and only once ONNX Runtime loads it.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import onnx

from ..core.config import Int8Config
from ..core.errors import ArtifactError, ConfigError
from ..core.fileio import atomic_path

QUANTIZED_OPS = ("MatMul", "Gemm")
LM_HEAD_SCOPE = "lm_head/"  # the native model's output projection (node-name prefix)


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    quantized: int  # weight MatMul/Gemm nodes quantized
    kept_fp32: list[str]  # weight nodes excluded by the policy


def cpu_has_vnni(cpuinfo: str | None = None) -> bool:
    """Whether this x86 CPU has VNNI (AVX512-VNNI or AVX-VNNI): then int8 weights keep 8 bits."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_vnni", "avx_vnni", "avx512vnni"})


def reduce_range(cfg: Int8Config, cpuinfo: str | None = None) -> bool:
    if cfg.reduce_range == "on":
        return True
    if cfg.reduce_range == "off":
        return False
    return not cpu_has_vnni(cpuinfo)


def _weight_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul / Gemm nodes whose second input is a constant weight (what int8 / int4 change)."""
    inits = {i.name for i in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n for n in model.graph.node
            if n.op_type in QUANTIZED_OPS and len(n.input) > 1
            and (n.input[1] in inits or n.input[1] in consts)]


def _in_scope(name: str, scope: str) -> bool:
    """Whether a node name lies in a module scope (``lm_head/`` matches the native model's
    ``lm_head/MatMul`` and a Hugging Face wrapper's ``hf/lm_head/MatMul``)."""
    return name.startswith(scope) or f"/{scope}" in name


def excluded_nodes(model: onnx.ModelProto, cfg: Int8Config, hmu_scope: str = "hmu") -> list[str]:
    """Weight nodes the policy keeps FP32 (HMU, LM head, ``[int8] exclude``), in graph order.
    An ``exclude`` entry that matches no node is a config error (a typo must not pin nothing)."""
    nodes = _weight_nodes(model)
    prefixes = _policy_prefixes(cfg, hmu_scope)
    names = {n.name for n in model.graph.node}
    for extra in cfg.exclude:
        if extra not in names and not any(n.startswith(extra) for n in names):
            raise ConfigError(f"int8.exclude: '{extra}' names no node of the graph (node names "
                              "look like decoder/layers/0/linear1/MatMul)")
    return [n.name for n in nodes if _policy_keeps(n.name, cfg, prefixes)]


def _policy_prefixes(cfg: Int8Config, hmu_scope: str) -> list[str]:
    prefixes = []
    if cfg.keep_hmu:
        prefixes.append(hmu_scope.replace(".", "/") + "/")
    if cfg.keep_lm_head:
        prefixes.append(LM_HEAD_SCOPE)
    return prefixes


def _policy_keeps(name: str, cfg: Int8Config, prefixes: Sequence[str]) -> bool:
    return any(_in_scope(name, p) for p in prefixes) or any(
        name == e or (e.endswith("/") and name.startswith(e)) for e in cfg.exclude)


def load_for_quantization(src: Path, cfg: Int8Config, hmu_scope: str = "hmu"
                          ) -> onnx.ModelProto:
    """``src`` with the transposed constant weights of the MatMuls the policy quantizes stored
    transposed (export/weight_folding.py: a tied LM head), so the quantizers see them."""
    from .weight_folding import fold_weight_transposes

    model = onnx.load(str(src))
    prefixes = _policy_prefixes(cfg, hmu_scope)
    fold_weight_transposes(model, lambda name: not _policy_keeps(name, cfg, prefixes))
    return model


def _check_loads(path: Path, what: str) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises Fail / InvalidGraph / NotImplemented
        raise ArtifactError(f"the {what} graph does not load in ONNX Runtime: "
                            f"{str(exc).splitlines()[0]}") from None


def _plan(model: onnx.ModelProto, cfg: Int8Config, hmu_scope: str) -> tuple[list[str], list[str]]:
    """(weight nodes kept FP32, weight nodes to quantize) of ``model`` under the policy."""
    keep = excluded_nodes(model, cfg, hmu_scope)
    return keep, [n.name for n in _weight_nodes(model) if n.name not in keep]


def quantize_int8(src: Path, dst: Path, cfg: Int8Config, *, hmu_scope: str = "hmu",
                  cpuinfo: str | None = None) -> QuantizeResult:
    """``dst``: ``src`` with int8 per-channel weights (dynamic activations), policy nodes FP32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = load_for_quantization(src, cfg, hmu_scope)
    keep, todo = _plan(model, cfg, hmu_scope)
    with atomic_path(Path(dst)) as tmp, _quiet():
        quantize_dynamic(model, str(tmp), per_channel=True,
                         reduce_range=reduce_range(cfg, cpuinfo), weight_type=QuantType.QInt8,
                         op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_quantize=todo,
                         extra_options={"MatMulConstBOnly": True})
        _check_loads(tmp, "int8")
    return QuantizeResult(Path(dst), len(todo), keep)


#: ``[int8] calibration_method`` -> onnxruntime.quantization.CalibrationMethod member
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile",
                       "distribution": "Distribution"}
ACTIVATION_TYPES = {"quint8": "QUInt8", "qint8": "QInt8"}


class FeedReader:
    """onnxruntime's CalibrationDataReader protocol over recorded feeds, each cut to the
    graph's inputs (a recorded step may carry more). ``set_range`` serves one slice at a time:
    ORT's histogram calibrators stack every collected array of a tensor into one, which fails
    on feeds of different shapes, so they are given one feed per collection and merge."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]) -> None:
        self.feeds = list(feeds)
        self.names = list(names)
        self._it: Iterator[Mapping[str, np.ndarray]] = iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self.feeds[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = next(self._it, None)
        return None if feed is None else {n: feed[n] for n in self.names}


def quantize_int8_static(src: Path, dst: Path, cfg: Int8Config,
                         feeds: Sequence[Mapping[str, np.ndarray]], *, hmu_scope: str = "hmu",
                         cpuinfo: str | None = None) -> QuantizeResult:
    """``dst``: ``src`` in QDQ format with int8 per-channel weights and activation scales
    calibrated on ``feeds`` (``[int8] calibration_method``), policy nodes FP32. With
    ``pre_process`` the graph first goes through ORT's quant_pre_process (shape inference and
    optimization); the policy is then applied to the graph it returns."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    if not feeds:
        raise ArtifactError(f"static int8 of {Path(src).name}: no calibration feeds")
    with tempfile.TemporaryDirectory(prefix="hmu-int8-") as work, \
            atomic_path(Path(dst)) as tmp, _quiet():
        model_in = Path(src)
        if cfg.pre_process:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            model_in = Path(work) / "pre.onnx"
            try:
                quant_pre_process(str(src), str(model_in), skip_symbolic_shape=False)
            except Exception as exc:  # shape inference raises whatever it meets
                raise ArtifactError(f"int8.pre_process: quant_pre_process failed on "
                                    f"{Path(src).name}: {(str(exc).splitlines() or [''])[0]} "
                                    "(set pre_process = false)") from None
        model = load_for_quantization(model_in, cfg, hmu_scope)
        keep, todo = _plan(model, cfg, hmu_scope)
        names = [i.name for i in model.graph.input]
        quantize_static(model, str(tmp), FeedReader(feeds, names),
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS),
                        per_channel=True, reduce_range=reduce_range(cfg, cpuinfo),
                        activation_type=getattr(QuantType, ACTIVATION_TYPES[cfg.activation_type]),
                        weight_type=QuantType.QInt8, nodes_to_quantize=todo,
                        calibrate_method=getattr(CalibrationMethod,
                                                 CALIBRATION_METHODS[cfg.calibration_method]),
                        extra_options={"MatMulConstBOnly": True,
                                       "CalibPercentile": cfg.calibration_percentile,
                                       # one feed per collection (FeedReader); MinMax reduces
                                       # each feed on its own, so it takes them all at once
                                       "CalibStridedMinMax":
                                           None if cfg.calibration_method == "minmax" else 1,
                                       "OpTypesToExcludeOutputQuantization":
                                           [] if cfg.quantize_outputs else list(QUANTIZED_OPS)})
        _check_loads(tmp, "int8 (static)")
    return QuantizeResult(Path(dst), len(todo), keep)


def quantize_int4(src: Path, dst: Path, cfg: Int8Config, *, hmu_scope: str = "hmu"
                  ) -> QuantizeResult:
    """``dst``: ``src`` with int4 blockwise weight-only MatMuls (MatMulNBits), policy nodes FP32.
    Gemm nodes (attention in-projections with a bias) stay FP32: MatMulNBits replaces MatMul only."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = load_for_quantization(src, cfg, hmu_scope)
    keep, todo = _plan(model, cfg, hmu_scope)
    matmuls = {n.name for n in model.graph.node if n.op_type == "MatMul"}
    todo = [name for name in todo if name in matmuls]
    with _quiet():
        q = MatMulNBitsQuantizer(model, bits=4, block_size=cfg.int4_block_size,
                                 is_symmetric=True, accuracy_level=cfg.int4_accuracy_level,
                                 nodes_to_exclude=[n.name for n in model.graph.node
                                                   if n.name not in todo])
        q.process()
    out = q.model.model
    with atomic_path(Path(dst)) as tmp:
        onnx.save_model(out, str(tmp), save_as_external_data=False)
        _check_loads(tmp, "int4")
    done = sum(1 for n in out.graph.node if n.op_type == "MatMulNBits")
    return QuantizeResult(Path(dst), done, keep)


def weight_bytes(path: Path) -> int:
    """Bytes of the graph's initializers (what a quantization shrinks)."""
    model = onnx.load(str(path))
    return sum(len(i.raw_data) or onnx.numpy_helper.to_array(i).nbytes
               for i in model.graph.initializer)


class _quiet:
    """ORT's quantization tools log every node at INFO/WARNING; a build prints its own summary."""

    def __enter__(self) -> None:
        self._level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().setLevel(self._level)


def variants(cfg: Int8Config) -> Sequence[str]:
    """The quantized variants a build with this config writes."""
    return (("int8",) if cfg.enabled else ()) + (("int4",) if cfg.enabled and cfg.int4 else ())
