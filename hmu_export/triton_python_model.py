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

Requests of the same (src_len, tgt_len) that the dynamic batcher hands over together are
concatenated and run as one ONNX Runtime call, then split back per request. A request that
violates the contract gets its own error response; the others in the batch still run.
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


class RequestError(ValueError):
    """A request that breaks the I/O contract; becomes that request's error response."""


def noise_from_seed(batch: int, src_len: int, latent: int, seed: int = 0,
                    temperature: float = 0.0) -> np.ndarray:
    """Noise of shape (batch, src_len, latent): zeros at temperature 0, else seeded N(0, t^2)."""
    if temperature < 0 or not np.isfinite(temperature):
        raise RequestError(f"temperature must be a finite number >= 0, got {temperature}")
    if temperature == 0:
        return np.zeros((batch, src_len, latent), dtype=np.float32)
    rng = np.random.default_rng(int(seed))
    eps = rng.standard_normal((batch, src_len, latent), dtype=np.float32)
    return eps * np.float32(temperature)


def parse_noise_parameters(params: Mapping[str, Any]) -> tuple[int, float]:
    """(seed, temperature) from request parameters; numbers may arrive as strings."""
    try:
        seed = int(params.get("seed", 0))
        temperature = float(params.get("temperature", 0.0))
    except (TypeError, ValueError):
        raise RequestError("request parameters 'seed' (integer) and 'temperature' (number) "
                           f"are malformed: {dict(params)}") from None
    return seed, temperature


def check_feeds(feeds: Mapping[str, np.ndarray], spec: Mapping[str, int]) -> None:
    """The python-side half of the contract checks Triton cannot do from config.pbtxt alone."""
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
    if feeds.get(NOISE) is None:
        seed, temperature = parse_noise_parameters(params)
        b, ls = feeds[SRC_IDS].shape
        feeds[NOISE] = noise_from_seed(b, ls, spec["latent_dim"], seed, temperature)
    return feeds


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
            params = {}
        return complete_feeds(feeds, params, self.spec)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        groups: dict[tuple[int, int], list[tuple[int, dict[str, np.ndarray]]]] = {}
        for i, request in enumerate(requests):
            try:
                feeds = self._feeds(request)
            except RequestError as exc:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
                continue
            key = (feeds[SRC_IDS].shape[1], feeds[TGT_IDS].shape[1])
            groups.setdefault(key, []).append((i, feeds))
        for items in groups.values():
            batch = {n: np.concatenate([f[n] for _, f in items]) for n in INPUTS}
            try:
                outs = self.session.run(self.output_names, batch)
            except Exception as exc:  # ORT's own error types; report, keep serving
                msg = f"ONNX Runtime failed: {str(exc).splitlines()[0]}"
                for i, _ in items:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(msg))
                continue
            start = 0
            for i, feeds in items:
                stop = start + feeds[SRC_IDS].shape[0]
                tensors = [pb_utils.Tensor(n, np.ascontiguousarray(o[start:stop]))
                           for n, o in zip(self.output_names, outs)]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                start = stop
        return responses

    def finalize(self) -> None:
        self.session = None
