"""Triton python-backend model: an exported HMU graph run by ONNX Runtime.

This file is copied verbatim to ``<repository>/<name>_python/1/model.py`` and must work from the
repository alone (the server has no ``hmu_export`` package): it imports only numpy, onnxruntime
and Triton's ``triton_python_backend_utils``. Importing it outside Triton works too (the pure
functions below are unit-tested and reused by the client helper), so the noise recipe lives in
exactly one place.

The graph is described by the config's ``parameters`` (written from the build's I/O contract by
``hmu_export.deploy.triton.config.python_config``), not by names known here: ``input.<name>`` = ``"int64[batch,
src_len]"`` (dtype and dims, a name is a dynamic axis), ``<axis>_min`` / ``<axis>_max`` = the
profile's range of each dynamic axis other than batch, ``vocab_size``. Int64 inputs named
``*_mask`` are padding masks (0/1, at least one 1 per row); other int64 inputs are token ids
(within the vocabulary). So the same file serves the full seq2seq graph (noise over src_len, or
over tgt_len when the HMU follows the decoder) and the classifier graph (no tgt_ids,
``class_logits``); the outputs are the config's.

Noise: ``noise`` is an optional input here. A request that sends it gets exactly that noise.
A request that omits it gets zeros (the VAE's mean path), or, when the request parameters carry
``temperature`` > 0, seeded noise ``default_rng(seed).standard_normal((B, L, latent)) *
temperature`` (float32), L being the length of the axis the noise spans (its dims say which,
and another input carries it), the same array ``hmu_export.deploy.triton.client.make_noise`` builds.

``seed`` must be an integer in [0, 2**63 - 1] and ``temperature`` a number in [0, 1e4] (judged
after the cast to float32, so 1e39, inf in float32, is refused).

Requests of the same shapes (every axis but batch) that the dynamic batcher hands over together
are concatenated and run as one ONNX Runtime call, then split back per request. A request that
violates the contract (a missing input, a bad parameter, an output that is not finite) gets its
own error response; the others in the batch still run.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

try:  # present only inside Triton's python backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - outside Triton (unit tests, client helper)
    pb_utils = None

NOISE, BATCH = "noise", "batch"
INPUT_PREFIX = "input."
TRITON_TO_NP = {"TYPE_INT64": "int64", "TYPE_INT32": "int32", "TYPE_FP32": "float32",
                "TYPE_FP16": "float16", "TYPE_BOOL": "bool"}


MAX_SEED = 2**63 - 1
# Far beyond any useful sampling temperature, and small enough that the noise (|eps| < 10 in
# float32) and the model's arithmetic on it stay finite; 1e39 would be inf once cast to float32.
MAX_TEMPERATURE = 1e4


class RequestError(ValueError):
    """A request that breaks the I/O contract; becomes that request's error response."""


def check_seed(seed: Any) -> int:
    """An integer in [0, 2**63 - 1] (or its decimal string): what numpy's default_rng takes."""
    if isinstance(seed, str):
        text = seed.strip()
        seed = int(text) if text.lstrip("+-").isdigit() else seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise RequestError(f"request parameter 'seed' must be an integer in [0, {MAX_SEED}], "
                           f"got {seed!r}")
    if not 0 <= int(seed) <= MAX_SEED:
        raise RequestError(f"request parameter 'seed' must be in [0, {MAX_SEED}], got {seed}")
    return int(seed)


def check_temperature(temperature: Any) -> float:
    """A number in [0, MAX_TEMPERATURE], judged after the cast to float32 the noise gets."""
    if isinstance(temperature, bool):
        raise RequestError(f"request parameter 'temperature' must be a number, got {temperature}")
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        raise RequestError(f"request parameter 'temperature' must be a number, got "
                           f"{temperature!r}") from None
    with np.errstate(over="ignore"):
        as_f32 = np.float32(value)
    if not np.isfinite(as_f32) or not 0.0 <= value <= MAX_TEMPERATURE:
        raise RequestError(f"request parameter 'temperature' must be a finite number in "
                           f"[0, {MAX_TEMPERATURE:g}], got {temperature}")
    return value


def noise_from_seed(batch: int, length: int, latent: int, seed: int = 0,
                    temperature: float = 0.0) -> np.ndarray:
    """Noise of shape (batch, length, latent): zeros at temperature 0, else seeded N(0, t^2).
    ``length`` is the size of the axis the graph's noise spans (src_len, or tgt_len when the HMU
    follows the decoder)."""
    temperature = check_temperature(temperature)
    seed = check_seed(seed)
    if temperature == 0:
        return np.zeros((batch, length, latent), dtype=np.float32)
    rng = np.random.default_rng(seed)
    eps = rng.standard_normal((batch, length, latent), dtype=np.float32)
    noise = eps * np.float32(temperature)
    if not np.isfinite(noise).all():  # unreachable below MAX_TEMPERATURE; kept as the guard
        raise RequestError(f"temperature {temperature:g} makes non-finite noise")
    return noise


def parse_noise_parameters(params: Mapping[str, Any]) -> tuple[int, float]:
    """(seed, temperature) from request parameters; numbers may arrive as strings."""
    if not isinstance(params, Mapping):
        raise RequestError(f"request parameters must be a JSON object, got {params!r}")
    return check_seed(params.get("seed", 0)), check_temperature(params.get("temperature", 0.0))


def format_tensor(dtype: str, dims: tuple) -> str:
    """``int64[batch,src_len]``: the value of an ``input.<name>`` parameter."""
    return f"{dtype}[{','.join(str(d) for d in dims)}]"


def parse_tensor(name: str, text: str) -> tuple[str, tuple]:
    dtype, sep, rest = str(text).strip().partition("[")
    if not sep or not rest.endswith("]") or dtype not in TRITON_TO_NP.values():
        raise ValueError(f"parameter '{INPUT_PREFIX}{name}' must read like int64[batch,src_len], "
                         f"got {text!r}")
    dims = tuple(int(d) if d.strip().isdigit() else d.strip() for d in rest[:-1].split(","))
    if not dims or dims[0] != BATCH or any(d == "" for d in dims):
        raise ValueError(f"parameter '{INPUT_PREFIX}{name}' must start with the batch axis, "
                         f"got {text!r}")
    return dtype, dims


class Spec:
    """What the python model knows of its graph, read from the config's parameters. (A plain
    class: a dataclass needs its module in sys.modules, which a loader need not do.)"""

    def __init__(self, inputs: dict, ranges: dict, vocab_size: int) -> None:
        self.inputs = inputs  # name -> (numpy dtype name, dims); a str dim is a dynamic axis
        self.ranges = ranges  # axis -> (min, max), every dynamic axis but batch
        self.vocab_size = vocab_size

    @classmethod
    def from_parameters(cls, params: Mapping[str, Any]) -> "Spec":
        """From the config's parameters (string values; ints accepted). ValueError, one line,
        when they cannot describe a servable graph."""
        inputs = {k[len(INPUT_PREFIX):]: parse_tensor(k[len(INPUT_PREFIX):], v)
                  for k, v in params.items() if k.startswith(INPUT_PREFIX)}
        if NOISE in inputs:  # the optional input last: the others bind the axes it is sized by
            inputs[NOISE] = inputs.pop(NOISE)
        if not inputs:
            raise ValueError(f"no '{INPUT_PREFIX}<name>' parameters: the config does not "
                             "describe the graph's inputs")
        axes = {d for _, dims in inputs.values() for d in dims[1:] if isinstance(d, str)}
        ranges = {}
        for axis in sorted(axes):
            try:
                ranges[axis] = (int(params[f"{axis}_min"]), int(params[f"{axis}_max"]))
            except (KeyError, ValueError):
                raise ValueError(f"parameters '{axis}_min' / '{axis}_max' (integers) are "
                                 "missing") from None
        if NOISE in inputs:
            if len(inputs[NOISE][1]) != 3:
                raise ValueError(f"cannot draw noise of dims {list(inputs[NOISE][1])} "
                                 "(expected [batch, length, latent])")
            carried = {d for name, (_, dims) in inputs.items() if name != NOISE for d in dims}
            free = [d for d in inputs[NOISE][1] if isinstance(d, str) and d not in carried]
            if free:
                raise ValueError(f"the noise spans {', '.join(free)}, which no other input "
                                 "carries: the server cannot size it")
        try:
            vocab = int(params["vocab_size"])
        except (KeyError, ValueError):
            raise ValueError("parameter 'vocab_size' (an integer) is missing") from None
        return cls(inputs, ranges, vocab)

    @property
    def input_names(self) -> list[str]:
        return list(self.inputs)


def _as_spec(spec: "Spec | Mapping[str, Any]") -> Spec:
    return spec if isinstance(spec, Spec) else Spec.from_parameters(spec)


def _describe(dtype: str, dims: tuple) -> str:
    return f"{dtype} [{', '.join(str(d) for d in dims)}]"


def check_feeds(feeds: Mapping[str, np.ndarray], spec: "Spec | Mapping[str, Any]"
                ) -> dict[str, int]:
    """The python-side half of the contract checks Triton cannot do from config.pbtxt alone
    (axes shared between inputs, profile ranges, masks, token ids, finite noise); returns the
    size of every axis the request binds."""
    spec = _as_spec(spec)
    missing = [n for n in spec.inputs if n != NOISE and feeds.get(n) is None]
    if missing:
        raise RequestError(f"missing input(s): {', '.join(missing)}")
    unknown = sorted(set(n for n, a in feeds.items() if a is not None) - set(spec.inputs))
    if unknown:
        raise RequestError(f"unknown input(s): {', '.join(unknown)} (expected "
                           f"{', '.join(spec.inputs)})")
    bound: dict[str, tuple[int, str]] = {}
    for name, (dtype, dims) in spec.inputs.items():
        arr = feeds.get(name)
        if arr is None:
            continue
        if arr.dtype != np.dtype(dtype) or arr.ndim != len(dims):
            raise RequestError(f"input '{name}' must be {_describe(dtype, dims)}, got "
                               f"{arr.dtype} {list(arr.shape)}")
        for axis, size in zip(dims, arr.shape):
            if isinstance(axis, int):
                if size != axis:
                    raise RequestError(f"input '{name}' must be {_describe(dtype, dims)}, got "
                                       f"{arr.dtype} {list(arr.shape)}")
                continue
            first, other = bound.setdefault(axis, (int(size), name))
            if first != size:
                raise RequestError(f"input '{name}' has {axis} {size}, '{other}' has {first}")
    for axis, (lo, hi) in spec.ranges.items():
        if axis in bound and not lo <= bound[axis][0] <= hi:
            raise RequestError(f"{axis} {bound[axis][0]} is outside the profile [{lo}, {hi}]")
    noise = feeds.get(NOISE)
    if noise is not None and not np.isfinite(noise).all():
        raise RequestError(f"input '{NOISE}' has non-finite values")
    for name, (dtype, dims) in spec.inputs.items():
        arr = feeds.get(name)
        if arr is None or dtype != "int64" or not arr.size:
            continue
        if name.endswith("_mask"):
            if not np.isin(arr, (0, 1)).all():
                raise RequestError(f"input '{name}' must hold only 0 (pad) and 1 (token)")
            if (arr.reshape(arr.shape[0], -1).sum(axis=1) == 0).any():
                raise RequestError(f"input '{name}' has a row with no real token")
        else:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= spec.vocab_size:
                raise RequestError(f"input '{name}' has token ids outside [0, "
                                   f"{spec.vocab_size}): min {lo}, max {hi}")
    return {axis: size for axis, (size, _) in bound.items()}


def complete_feeds(feeds: dict[str, np.ndarray], params: Mapping[str, Any],
                   spec: "Spec | Mapping[str, Any]") -> dict[str, np.ndarray]:
    """Validated feeds with the noise filled in when the request did not send it (its shape
    from the noise's dims, each axis sized by the input that carries it)."""
    spec = _as_spec(spec)
    sizes = check_feeds(feeds, spec)
    seed, temperature = parse_noise_parameters(params)  # checked even when noise is sent
    if NOISE in spec.inputs and feeds.get(NOISE) is None:
        dims = spec.inputs[NOISE][1]  # [batch, length, latent]: checked by Spec
        b, length, latent = (d if isinstance(d, int) else sizes[d] for d in dims)
        feeds[NOISE] = noise_from_seed(b, length, latent, seed, temperature)
    return feeds


def check_finite_outputs(outputs: Mapping[str, np.ndarray]) -> None:
    """A request whose outputs hold NaN / Inf gets an error, never a success with NaN logits."""
    for name, arr in outputs.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise RequestError(f"output '{name}' has {bad} non-finite value(s) of {arr.size}: "
                               "the noise (or temperature) overflows the model's float32 "
                               "arithmetic")


def _error_response(exc: BaseException) -> Any:
    """This request's error: INVALID_ARGUMENT (gRPC) / 400 (HTTP) for what the request asked
    (its inputs, parameters, the noise it sent or asked for), INTERNAL / 500 for a bug here."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    client = isinstance(exc, RequestError)
    if not client:  # a bug here: say so, keep serving the others
        line = f"internal error in the python model ({type(exc).__name__}): {line}"
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if client else "INTERNAL", None)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(line) if code is None
                                      else pb_utils.TritonError(line, code))


class TritonPythonModel:
    """Entry point Triton's python backend looks for."""

    def initialize(self, args: dict[str, str]) -> None:
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.spec = Spec.from_parameters(params)
        declared = {i["name"]: TRITON_TO_NP.get(i["data_type"], i["data_type"])
                    for i in config["input"]}
        described = {n: dtype for n, (dtype, _) in self.spec.inputs.items()}
        if declared != described:
            raise ValueError(f"the config's inputs {declared} differ from its "
                             f"'{INPUT_PREFIX}*' parameters {described}")
        self.output_names = [o["name"] for o in config["output"]]
        path = os.path.join(args["model_repository"], args["model_version"],
                            params.get("onnx_file", "model.onnx"))
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        threads = int(params.get("intra_op_threads", "0"))
        if threads > 0:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    def _feeds(self, request: Any) -> dict[str, np.ndarray]:
        feeds: dict[str, np.ndarray] = {}
        for name in self.spec.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                feeds[name] = tensor.as_numpy()
        try:
            params = json.loads(request.parameters() or "{}")
        except ValueError:
            raise RequestError("request parameters are not valid JSON") from None
        return complete_feeds(feeds, params, self.spec)

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request; a bad request of a batch fails alone."""
        responses: list[Any] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, dict[str, np.ndarray]]]] = {}
        for i, request in enumerate(requests):
            try:
                feeds = self._feeds(request)
            except Exception as exc:  # RequestError, or a bug: this request's error only
                responses[i] = _error_response(exc)
                continue
            key = tuple(feeds[n].shape[1:] for n in self.spec.input_names)  # all but batch
            groups.setdefault(key, []).append((i, feeds))
        for items in groups.values():
            try:
                outs = self._run([f for _, f in items])
            except Exception:  # ORT's own error types: find the request that caused it
                for i, feeds in items:
                    try:
                        responses[i] = self._response(self._run([feeds]), 0, feeds)
                    except Exception as exc:
                        responses[i] = _error_response(exc)
                continue
            start = 0
            for i, feeds in items:
                responses[i] = self._response(outs, start, feeds)
                start += self._batch(feeds)
        return responses

    def _batch(self, feeds: Mapping[str, np.ndarray]) -> int:
        return int(feeds[self.spec.input_names[0]].shape[0])

    def _run(self, feeds_list: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        batch = {n: np.concatenate([f[n] for f in feeds_list]) for n in self.spec.input_names}
        try:
            return list(self.session.run(self.output_names, batch))
        except Exception as exc:
            text = str(exc).strip()
            raise RequestError("ONNX Runtime failed: "
                               + (text.splitlines()[0] if text else type(exc).__name__)) from None

    def _response(self, outs: list[np.ndarray], start: int, feeds: Mapping[str, np.ndarray]
                  ) -> Any:
        """This request's rows of the batch's outputs, or its error when any is not finite."""
        stop = start + self._batch(feeds)
        rows = [np.ascontiguousarray(o[start:stop]) for o in outs]
        try:
            check_finite_outputs(dict(zip(self.output_names, rows)))
        except RequestError as exc:
            return _error_response(exc)
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(n, r) for n, r in zip(self.output_names, rows)])

    def finalize(self) -> None:
        self.session = None
