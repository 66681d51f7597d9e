"""Client helper for the generated Triton models (HTTP or gRPC, via ``tritonclient``).

Noise is the one input a user should not have to think about. ``HMUTritonClient.infer`` builds it
on the client from ``(seed, temperature)`` when none is given (zeros at temperature 0 = the mean
path), so the same call works for the TensorRT, ONNX and python models and is reproducible:
``make_noise`` is the very function the python model uses for server-side noise. The noise spans
``src_len`` (the noise's axis in every graph but the full graph with the HMU after the decoder,
where it spans ``tgt_len``): the client reads which from the model's config (every model of a
repository states its noise axes in the ``input.noise`` parameter), or is told (``noise_axis``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ...core.errors import BackendUnavailable, HMUExportError
from ...core.io_contract import NOISE, SRC_IDS, SRC_MASK, SRC_LEN, TGT_IDS, TGT_LEN
from ...shipped.python_model import (INPUT_PREFIX, RequestError, parse_tensor, check_seed,
                                  check_temperature, noise_from_seed)

PROTOCOLS = ("http", "grpc")
NP_TO_TRITON = {np.dtype("int64"): "INT64", np.dtype("float32"): "FP32",
                np.dtype("int32"): "INT32", np.dtype("float16"): "FP16"}


class TritonRequestError(HMUExportError):
    """The server rejected a request (bad shape/dtype/value) or could not be reached.
    ``status``: the server's status ("400" over HTTP, "StatusCode.INVALID_ARGUMENT" over gRPC
    for a client mistake; "500" / "StatusCode.INTERNAL" for a server fault), None when the
    request never got an answer."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def invalid_argument(self) -> bool:
        """Whether the server judged the request itself wrong (retrying it cannot help)."""
        return self.status in ("400", "StatusCode.INVALID_ARGUMENT")


def make_noise(batch: int, length: int, latent: int, seed: int = 0,
               temperature: float = 0.0) -> np.ndarray:
    """float32 [batch, length, latent]: zeros at temperature 0, else seeded N(0, t^2);
    ``length`` is src_len, or tgt_len for a full graph with the HMU after the decoder."""
    return noise_from_seed(batch, length, latent, seed, temperature)


def _module(protocol: str) -> Any:
    if protocol not in PROTOCOLS:
        raise HMUExportError(f"protocol must be http or grpc, got {protocol!r}")
    try:
        if protocol == "http":
            import tritonclient.http as mod
        else:
            import tritonclient.grpc as mod
    except ImportError as exc:
        raise BackendUnavailable(f"tritonclient[{protocol}] is not installed: {exc}") from None
    return mod


def make_inputs(protocol: str, feeds: Mapping[str, np.ndarray]) -> list[Any]:
    """tritonclient InferInput objects for ``feeds`` (dtype taken from each array)."""
    mod = _module(protocol)
    inputs = []
    for name, arr in feeds.items():
        arr = np.ascontiguousarray(arr)
        dtype = NP_TO_TRITON.get(arr.dtype)
        if dtype is None:
            raise TritonRequestError(f"input '{name}' has unsupported dtype {arr.dtype}")
        inp = mod.InferInput(name, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


@dataclass
class HMUTritonClient:
    """One model on one server: ``infer(src_ids, src_mask, tgt_ids, seed=, temperature=)``
    (``tgt_ids`` omitted for a classifier)."""

    url: str
    model: str
    protocol: str = "http"
    latent_dim: int | None = None  # read from the model's metadata when None
    timeout_s: float = 30.0
    # The axis the noise spans: src_len or tgt_len. None = the python model's config says
    # (its input.noise parameter), else src_len; name it for an onnx / tensorrt model whose
    # HMU follows the decoder.
    noise_axis: str | None = None

    def __post_init__(self) -> None:
        mod = _module(self.protocol)
        kwargs: dict[str, Any] = {}
        if self.protocol == "http":
            kwargs = {"connection_timeout": self.timeout_s, "network_timeout": self.timeout_s}
        self.client = mod.InferenceServerClient(self.url, **kwargs)
        self._mod = mod
        if self.noise_axis not in (None, SRC_LEN, TGT_LEN):
            raise HMUExportError(f"noise_axis must be {SRC_LEN} or {TGT_LEN}, got "
                                 f"{self.noise_axis!r}")
        if self.latent_dim is None:
            self.latent_dim = self._latent_from_metadata()

    def _latent_from_metadata(self) -> int:
        try:
            meta = self.client.get_model_metadata(self.model)
        except Exception as exc:  # InferenceServerException and transport errors
            raise TritonRequestError(f"cannot read metadata of model '{self.model}' at "
                                     f"{self.url}: {_message(exc)}") from None
        inputs = meta["inputs"] if isinstance(meta, dict) else [
            {"name": i.name, "shape": list(i.shape)} for i in meta.inputs]
        for inp in inputs:
            if inp["name"] == NOISE:
                return int(inp["shape"][-1])
        raise TritonRequestError(f"model '{self.model}' has no '{NOISE}' input")

    def _noise_axis(self) -> str:
        """src_len or tgt_len: as told, else from the model config's input.noise parameter
        (every model of a repository states it)."""
        if self.noise_axis is None:
            self.noise_axis = SRC_LEN
            try:
                conf = self.client.get_model_config(self.model)
            except Exception as exc:  # InferenceServerException and transport errors
                raise TritonRequestError(f"cannot read the config of model '{self.model}' at "
                                         f"{self.url}: {_message(exc)}") from None
            conf = conf if isinstance(conf, dict) else {"parameters": {
                k: {"string_value": v.string_value} for k, v in conf.config.parameters.items()}}
            text = conf.get("parameters", {}).get(INPUT_PREFIX + NOISE, {}).get("string_value")
            try:
                dims = parse_tensor(NOISE, text)[1] if text else ()
            except ValueError:  # not a parameter this tool wrote: keep the default
                dims = ()
            if dims[1:2] == (TGT_LEN,):
                self.noise_axis = TGT_LEN
        return self.noise_axis

    def infer(self, src_ids: np.ndarray, src_mask: np.ndarray, tgt_ids: np.ndarray | None = None,
              noise: np.ndarray | None = None, *, seed: int = 0, temperature: float = 0.0,
              send_noise: bool = True, outputs: Sequence[str] | None = None
              ) -> dict[str, np.ndarray]:
        """The model's outputs (all of them, or ``outputs``) for one request.

        ``tgt_ids=None`` for a graph without it (the classifier). ``noise=None`` builds it from
        ``seed``/``temperature`` here, over src_len (or tgt_len, see ``noise_axis``).
        ``send_noise=False`` leaves it to the server (python model only) by sending
        ``seed``/``temperature`` as request parameters instead.
        """
        feeds = {SRC_IDS: np.asarray(src_ids), SRC_MASK: np.asarray(src_mask)}
        if tgt_ids is not None:
            feeds[TGT_IDS] = np.asarray(tgt_ids)
        params: dict[str, Any] | None = None
        try:
            if noise is not None:
                feeds[NOISE] = np.asarray(noise)
            elif send_noise:
                seed, temperature = check_seed(seed), check_temperature(temperature)  # first
                name = TGT_IDS if self._noise_axis() == TGT_LEN else SRC_IDS
                over = feeds.get(name)
                if over is None or over.ndim != 2:
                    raise RequestError(f"the noise spans the length of '{name}', which must be "
                                       f"[batch, len], got "
                                       f"{'nothing' if over is None else list(over.shape)}")
                assert self.latent_dim is not None
                feeds[NOISE] = make_noise(over.shape[0], over.shape[1], self.latent_dim, seed,
                                          temperature)
            else:  # the server checks them too (check_seed / check_temperature)
                params = {"seed": check_seed(seed),
                          "temperature": str(check_temperature(temperature))}
        except RequestError as exc:
            raise TritonRequestError(str(exc)) from None
        return self.infer_feeds(feeds, outputs=outputs, parameters=params)

    def infer_feeds(self, feeds: Mapping[str, np.ndarray], *,
                    outputs: Sequence[str] | None = None,
                    parameters: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
        """``outputs`` None = every output the model returns (``logits``, or ``class_logits``
        of a classifier, plus any diagnostics)."""
        requested = None if outputs is None else [self._mod.InferRequestedOutput(n)
                                                  for n in outputs]
        try:
            result = self.client.infer(self.model, make_inputs(self.protocol, feeds),
                                       outputs=requested,
                                       parameters=dict(parameters) if parameters else None)
        except Exception as exc:  # tritonclient raises InferenceServerException
            status = getattr(exc, "status", None)
            raise TritonRequestError(f"{self.model}: {_message(exc)}",
                                     status() if callable(status) else None) from None
        if outputs is None:
            response = result.get_response()
            outputs = ([o["name"] for o in response["outputs"]] if isinstance(response, dict)
                       else [o.name for o in response.outputs])
        return {n: result.as_numpy(n) for n in outputs}

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "HMUTritonClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _message(exc: BaseException) -> str:
    msg = getattr(exc, "message", None)
    text = msg() if callable(msg) else str(exc)
    return (text or type(exc).__name__).splitlines()[0]
