"""Triton python-backend model: the exported HMU graph run by ONNX Runtime.

This file is copied verbatim to ``<repository>/<name>_python/1/model.py`` and must work from the
repository alone (the server has no ``hmu_export`` package): it imports only numpy, onnxruntime
and Triton's ``triton_python_backend_utils``. Importing it outside Triton works too (the pure
functions below are unit-tested and reused by the client helper), so the noise recipe lives in
exactly one place.

Noise: ``noise`` is an optional input here. A request that sends it gets exactly that noise.
A request that omits it gets zeros (the VAE's mean path), or, when the request parameters carry
``temperature`` > 0, seeded noise ``default_rng(seed).standard_normal((B, Ls, latent)) *
temperature`` (float32), the same array ``hmu_export.triton_client.make_noise`` builds.

``seed`` must be an integer in [0, 2**63 - 1] and ``temperature`` a number in [0, 1e4] (judged
after the cast to float32, so 1e39, inf in float32, is refused).

Requests of the same (src_len, tgt_len) that the dynamic batcher hands over together are
concatenated and run as one ONNX Runtime call, then split back per request. A request that
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

SRC_IDS, SRC_MASK, TGT_IDS, NOISE = "src_ids", "src_mask", "tgt_ids", "noise"
INPUTS = (SRC_IDS, SRC_MASK, TGT_IDS, NOISE)
INT_INPUTS = (SRC_IDS, SRC_MASK, TGT_IDS)


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


def noise_from_seed(batch: int, src_len: int, latent: int, seed: int = 0,
                    temperature: float = 0.0) -> np.ndarray:
    """Noise of shape (batch, src_len, latent): zeros at temperature 0, else seeded N(0, t^2)."""
    temperature = check_temperature(temperature)
    seed = check_seed(seed)
    if temperature == 0:
        return np.zeros((batch, src_len, latent), dtype=np.float32)
    rng = np.random.default_rng(seed)
    eps = rng.standard_normal((batch, src_len, latent), dtype=np.float32)
    noise = eps * np.float32(temperature)
    if not np.isfinite(noise).all():  # unreachable below MAX_TEMPERATURE; kept as the guard
        raise RequestError(f"temperature {temperature:g} makes non-finite noise")
    return noise


def parse_noise_parameters(params: Mapping[str, Any]) -> tuple[int, float]:
    """(seed, temperature) from request parameters; numbers may arrive as strings."""
    if not isinstance(params, Mapping):
        raise RequestError(f"request parameters must be a JSON object, got {params!r}")
    return check_seed(params.get("seed", 0)), check_temperature(params.get("temperature", 0.0))


def check_feeds(feeds: Mapping[str, np.ndarray], spec: Mapping[str, int]) -> None:
    """The python-side half of the contract checks Triton cannot do from config.pbtxt alone."""
    missing = [name for name in INT_INPUTS if feeds.get(name) is None]
    if missing:
        raise RequestError(f"missing input(s): {', '.join(missing)}")
    for name in INT_INPUTS:
        if feeds[name].dtype != np.int64 or feeds[name].ndim != 2:
            raise RequestError(f"input '{name}' must be int64 [batch, len], got "
                               f"{feeds[name].dtype} {list(feeds[name].shape)}")
    src, mask, tgt = feeds[SRC_IDS], feeds[SRC_MASK], feeds[TGT_IDS]
    b, ls = src.shape
    lt = tgt.shape[1]
    if mask.shape != src.shape:
        raise RequestError(f"input '{SRC_MASK}' has shape {list(mask.shape)}, expected the shape "
                           f"of '{SRC_IDS}' {list(src.shape)}")
    if tgt.shape[0] != b:
        raise RequestError(f"input '{TGT_IDS}' has batch {tgt.shape[0]}, '{SRC_IDS}' has {b}")
    for axis, size in (("src_len", ls), ("tgt_len", lt)):
        lo, hi = spec[f"{axis}_min"], spec[f"{axis}_max"]
        if not lo <= size <= hi:
            raise RequestError(f"{axis} {size} is outside the profile [{lo}, {hi}]")
    noise = feeds.get(NOISE)
    if noise is not None:
        want = (b, ls, spec["latent_dim"])
        if noise.dtype != np.float32 or noise.shape != want:
            raise RequestError(f"input '{NOISE}' must be float32 {list(want)}, got "
                               f"{noise.dtype} {list(noise.shape)}")
        if not np.isfinite(noise).all():
            raise RequestError(f"input '{NOISE}' has non-finite values")
    if not np.isin(mask, (0, 1)).all():
        raise RequestError(f"input '{SRC_MASK}' must hold only 0 (pad) and 1 (token)")
    if (mask.sum(axis=1) == 0).any():
        raise RequestError(f"input '{SRC_MASK}' has a row with no real token")
    vocab = spec["vocab_size"]
    for name in (SRC_IDS, TGT_IDS):
        lo, hi = int(feeds[name].min()), int(feeds[name].max())
        if lo < 0 or hi >= vocab:
            raise RequestError(f"input '{name}' has token ids outside [0, {vocab}): "
                               f"min {lo}, max {hi}")


def complete_feeds(feeds: dict[str, np.ndarray], params: Mapping[str, Any],
                   spec: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Validated feeds with the noise filled in when the request did not send it."""
    check_feeds(feeds, spec)
    seed, temperature = parse_noise_parameters(params)  # checked even when noise is sent
    if feeds.get(NOISE) is None:
        b, ls = feeds[SRC_IDS].shape
        feeds[NOISE] = noise_from_seed(b, ls, spec["latent_dim"], seed, temperature)
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
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if not isinstance(exc, RequestError):  # a bug here: say so, keep serving the others
        line = f"internal error in the python model ({type(exc).__name__}): {line}"
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(line))


class TritonPythonModel:
    """Entry point Triton's python backend looks for."""

    def initialize(self, args: dict[str, str]) -> None:
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.spec = {k: int(params[k]) for k in ("vocab_size", "latent_dim", "src_len_min",
                                                 "src_len_max", "tgt_len_min", "tgt_len_max")}
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
        for name in INPUTS:
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
        groups: dict[tuple[int, int], list[tuple[int, dict[str, np.ndarray]]]] = {}
        for i, request in enumerate(requests):
            try:
                feeds = self._feeds(request)
            except Exception as exc:  # RequestError, or a bug: this request's error only
                responses[i] = _error_response(exc)
                continue
            key = (feeds[SRC_IDS].shape[1], feeds[TGT_IDS].shape[1])
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
                start += feeds[SRC_IDS].shape[0]
        return responses

    def _run(self, feeds_list: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        batch = {n: np.concatenate([f[n] for f in feeds_list]) for n in INPUTS}
        try:
            return list(self.session.run(self.output_names, batch))
        except Exception as exc:
            text = str(exc).strip()
            raise RequestError("ONNX Runtime failed: "
                               + (text.splitlines()[0] if text else type(exc).__name__)) from None

    def _response(self, outs: list[np.ndarray], start: int, feeds: Mapping[str, np.ndarray]
                  ) -> Any:
        """This request's rows of the batch's outputs, or its error when any is not finite."""
        stop = start + feeds[SRC_IDS].shape[0]
        rows = [np.ascontiguousarray(o[start:stop]) for o in outs]
        try:
            check_finite_outputs(dict(zip(self.output_names, rows)))
        except RequestError as exc:
            return _error_response(exc)
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(n, r) for n, r in zip(self.output_names, rows)])

    def finalize(self) -> None:
        self.session = None
