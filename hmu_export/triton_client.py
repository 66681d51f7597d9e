"""Client helper for the generated Triton models (HTTP or gRPC, via ``tritonclient``).

Noise is the one input a user should not have to think about. ``HMUTritonClient.infer`` builds it
on the client from ``(seed, temperature)`` when none is given (zeros at temperature 0 = the mean
path), so the same call works for the TensorRT, ONNX and python models and is reproducible:
``make_noise`` is the very function the python model uses for server-side noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import BackendUnavailable, HMUExportError
from .io_contract import NOISE, SRC_IDS, SRC_MASK, TGT_IDS
from .triton_python_model import RequestError, check_seed, check_temperature, noise_from_seed

PROTOCOLS = ("http", "grpc")
NP_TO_TRITON = {np.dtype("int64"): "INT64", np.dtype("float32"): "FP32",
                np.dtype("int32"): "INT32", np.dtype("float16"): "FP16"}


class TritonRequestError(HMUExportError):
    """The server rejected a request (bad shape/dtype/value) or could not be reached."""


def make_noise(batch: int, src_len: int, latent: int, seed: int = 0,
               temperature: float = 0.0) -> np.ndarray:
    """float32 [batch, src_len, latent]: zeros at temperature 0, else seeded N(0, t^2)."""
    return noise_from_seed(batch, src_len, latent, seed, temperature)


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
    """One model on one server: ``infer(src_ids, src_mask, tgt_ids, seed=, temperature=)``."""

    url: str
    model: str
    protocol: str = "http"
    latent_dim: int | None = None  # read from the model's metadata when None
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        mod = _module(self.protocol)
        kwargs: dict[str, Any] = {}
        if self.protocol == "http":
            kwargs = {"connection_timeout": self.timeout_s, "network_timeout": self.timeout_s}
        self.client = mod.InferenceServerClient(self.url, **kwargs)
        self._mod = mod
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

    def infer(self, src_ids: np.ndarray, src_mask: np.ndarray, tgt_ids: np.ndarray,
              noise: np.ndarray | None = None, *, seed: int = 0, temperature: float = 0.0,
              send_noise: bool = True, outputs: Sequence[str] = ("logits",)
              ) -> dict[str, np.ndarray]:
        """Logits (and any other requested outputs) for one request.

        ``noise=None`` builds it from ``seed``/``temperature`` here. ``send_noise=False`` leaves
        it to the server (python model only) by sending ``seed``/``temperature`` as request
        parameters instead.
        """
        feeds = {SRC_IDS: np.asarray(src_ids), SRC_MASK: np.asarray(src_mask),
                 TGT_IDS: np.asarray(tgt_ids)}
        params: dict[str, Any] | None = None
        try:
            if noise is not None:
                feeds[NOISE] = np.asarray(noise)
            elif send_noise:
                b, ls = feeds[SRC_IDS].shape[:2]
                assert self.latent_dim is not None
                feeds[NOISE] = make_noise(b, ls, self.latent_dim, seed, temperature)
            else:  # the server checks them too (check_seed / check_temperature)
                params = {"seed": check_seed(seed),
                          "temperature": str(check_temperature(temperature))}
        except RequestError as exc:
            raise TritonRequestError(str(exc)) from None
        return self.infer_feeds(feeds, outputs=outputs, parameters=params)

    def infer_feeds(self, feeds: Mapping[str, np.ndarray], *, outputs: Sequence[str] = ("logits",),
                    parameters: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
        requested = [self._mod.InferRequestedOutput(n) for n in outputs]
        try:
            result = self.client.infer(self.model, make_inputs(self.protocol, feeds),
                                       outputs=requested,
                                       parameters=dict(parameters) if parameters else None)
        except Exception as exc:  # tritonclient raises InferenceServerException
            raise TritonRequestError(f"{self.model}: {_message(exc)}") from None
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
