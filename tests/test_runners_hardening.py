"""Runners refuse what they cannot compute honestly (issue 11, items 7 and 8).

- Non-finite outputs (noise that is finite in float32 but overflows the model's arithmetic, or
  noise that overflows float16 once a half-precision runner casts it) are an error, never a
  success with NaN logits.
- ONNX Runtime knows its vocabulary from the graph, so token ids outside it are a one-line
  InputError even when the caller passes no ``vocab_size``.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from hmu_export.core.errors import ArtifactError, HMUExportError, InputError
from hmu_export.core.io_contract import full_contract, make_feeds
from hmu_export.runners import OnnxRuntimeRunner, TorchRunner
from hmu_export.runners.base import NonFiniteOutput


@pytest.fixture(scope="module")
def ort_runner(small_export, small_cfg):
    """No vocab_size given: the runner must find it in the graph."""
    with OnnxRuntimeRunner(small_export.onnx, full_contract(small_cfg.model),
                           [small_cfg.profile]) as runner:
        yield runner


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg
    return msg


def test_overflowing_noise_is_refused_not_returned_as_nan(ort_runner, small_cfg, small_model):
    """3e38 is finite in float32 (validate_feeds lets it through) but the HMU's arithmetic
    overflows: every logit would be NaN."""
    feeds = make_feeds(small_cfg.model, 2, 4, 3, seed=1)
    feeds["noise"] = np.full_like(feeds["noise"], 3e38)
    torch_runner = TorchRunner(small_model, full_contract(small_cfg.model), [small_cfg.profile])
    for runner in (ort_runner, torch_runner):
        with pytest.raises(NonFiniteOutput) as info:
            runner.infer(feeds)
        msg = _one_line(info.value)
        assert "'logits'" in msg and "non-finite" in msg and runner.label in msg
        assert isinstance(info.value, HMUExportError)
    # check=False (benchmark loops) skips the scan and returns what the backend computed
    assert np.isnan(ort_runner.infer(feeds, check=False)["logits"]).all()


def test_noise_that_overflows_float16_is_refused_after_the_cast(small_cfg, small_model):
    """70000 is an ordinary float32 but inf once a half-precision runner casts it."""
    feeds = make_feeds(small_cfg.model, 1, 4, 3, seed=2)
    feeds["noise"][0, 0, 0] = 7e4
    half = TorchRunner(small_model, full_contract(small_cfg.model), [small_cfg.profile],
                       precision="fp16")
    with pytest.raises(InputError, match="overflows float16"):
        half.infer(feeds)
    feeds["noise"][0, 0, 0] = 6e4  # still representable in float16: no input error
    try:
        half.infer(feeds)
    except NonFiniteOutput:  # the model may still overflow inside: then it says so
        pass


@pytest.mark.parametrize("name,value,where", [("src_ids", -1, (0, 0)), ("tgt_ids", -7, (1, 2)),
                                               ("tgt_ids", 61, (0, 1)), ("src_ids", 10**6, (1, 0))])
def test_token_ids_outside_the_graph_vocabulary(ort_runner, small_cfg, name, value, where):
    """Negative ids used to pass (Gather wraps them: finite, wrong logits); ids >= vocab raised
    a raw ONNX Runtime error."""
    assert ort_runner.vocab_size == small_cfg.model.vocab_size == 61
    feeds = make_feeds(small_cfg.model, 2, 4, 3, seed=3)
    feeds[name][where] = value
    with pytest.raises(InputError) as info:
        ort_runner.infer(feeds)
    assert _one_line(info.value).startswith(f"input '{name}' has token ids outside [0, 61)")


def test_unchecked_runtime_failure_is_one_line(ort_runner, small_cfg):
    feeds = make_feeds(small_cfg.model, 2, 4, 3, seed=3)
    feeds["tgt_ids"][0, 0] = 10**6
    with pytest.raises(InputError) as info:
        ort_runner.infer(feeds, check=False)
    assert _one_line(info.value).startswith("ONNX Runtime failed on model.onnx")


def _rewrite(src, dst, metadata: str | None):
    proto = onnx.load(str(src))
    for prop in proto.metadata_props:
        if prop.key == "hmu_export.config":
            if metadata is None:
                proto.metadata_props.remove(prop)
            else:
                prop.value = metadata
            break
    onnx.save(proto, str(dst))
    return dst


@pytest.mark.parametrize("metadata", [None, "{", "[]", '{"model": {"vocab_size": "lots"}}'])
def test_vocabulary_from_the_logits_dim_without_usable_metadata(small_export, small_cfg,
                                                                tmp_path, metadata):
    path = _rewrite(small_export.onnx, tmp_path / "model.onnx", metadata)
    runner = OnnxRuntimeRunner(path, full_contract(small_cfg.model), [small_cfg.profile])
    assert runner.vocab_size == 61
    feeds = make_feeds(small_cfg.model, 1, 4, 3, seed=4)
    feeds["src_ids"][0, 1] = -2
    with pytest.raises(InputError, match="token ids outside"):
        runner.infer(feeds)


def test_caller_vocabulary_must_match_the_graph(small_export, small_cfg):
    with pytest.raises(ArtifactError, match="vocabulary of 61 tokens, the caller says 60"):
        OnnxRuntimeRunner(small_export.onnx, full_contract(small_cfg.model), [small_cfg.profile],
                          vocab_size=60)


# ---- the Triton python model's request checks (items 7 and 10; served in test_triton_server) --

from hmu_export.shipped.python_model import (  # noqa: E402
    MAX_TEMPERATURE, RequestError, check_finite_outputs, complete_feeds, parse_noise_parameters)

SPEC = {"vocab_size": 61, "input.src_ids": "int64[batch,src_len]",
        "input.src_mask": "int64[batch,src_len]", "input.tgt_ids": "int64[batch,tgt_len]",
        "input.noise": "float32[batch,src_len,16]", "src_len_min": 1, "src_len_max": 16,
        "tgt_len_min": 1, "tgt_len_max": 8}


def _ids(b: int = 2, ls: int = 5, lt: int = 3) -> dict[str, np.ndarray]:
    return {"src_ids": np.full((b, ls), 3, np.int64), "src_mask": np.ones((b, ls), np.int64),
            "tgt_ids": np.full((b, lt), 4, np.int64)}


@pytest.mark.parametrize("params,words", [
    ({"seed": -1, "temperature": 0.5}, "'seed' must be in [0, 9223372036854775807], got -1"),
    ({"seed": "-1", "temperature": 0.5}, "'seed' must be in"),
    ({"seed": 2**63}, "'seed' must be in"),
    ({"seed": 1.5}, "'seed' must be an integer"),
    ({"seed": True}, "'seed' must be an integer"),
    ({"seed": "seven"}, "'seed' must be an integer"),
    ({"temperature": "1e39"}, "'temperature' must be a finite number"),  # inf in float32
    ({"temperature": 3e38}, "'temperature' must be a finite number"),
    ({"temperature": MAX_TEMPERATURE * 2}, "'temperature' must be a finite number"),
    ({"temperature": "nan"}, "'temperature' must be a finite number"),
    ({"temperature": -0.5}, "'temperature' must be a finite number"),
    ({"temperature": "warm"}, "'temperature' must be a number"),
    ({"temperature": [1]}, "'temperature' must be a number"),
])
def test_request_parameters_are_validated(params, words):
    """seed -1 raised an uncaught ValueError from numpy; temperature 1e39 made inf noise."""
    with pytest.raises(RequestError) as info:
        complete_feeds(_ids(), params, SPEC)
    assert words in _one_line(info.value)


def test_valid_parameters_still_work():
    assert parse_noise_parameters({"seed": "12", "temperature": "0.25"}) == (12, 0.25)
    assert parse_noise_parameters({"seed": 2**63 - 1, "temperature": MAX_TEMPERATURE}) == (
        2**63 - 1, MAX_TEMPERATURE)
    noise = complete_feeds(_ids(), {"seed": 3, "temperature": MAX_TEMPERATURE}, SPEC)["noise"]
    assert noise.dtype == np.float32 and np.isfinite(noise).all()


@pytest.mark.parametrize("drop", ["tgt_ids", "src_ids", "src_mask"])
def test_missing_input_is_named_not_a_key_error(drop):
    feeds = _ids()
    feeds["noise"] = np.zeros((2, 5, 16), np.float32)
    del feeds[drop]
    with pytest.raises(RequestError, match=f"^missing input\\(s\\): {drop}$"):
        complete_feeds(feeds, {}, SPEC)


def test_non_finite_outputs_are_an_error():
    check_finite_outputs({"logits": np.zeros((1, 2, 3), np.float32)})
    bad = np.zeros((1, 2, 3), np.float32)
    bad[0, 1, 2] = np.nan
    with pytest.raises(RequestError, match="output 'logits' has 1 non-finite value"):
        check_finite_outputs({"logits": bad})


def test_client_refuses_bad_parameters_before_sending():
    from hmu_export.deploy.triton.client import HMUTritonClient, TritonRequestError

    client = HMUTritonClient("127.0.0.1:9", "m", "http", latent_dim=16)  # nothing listens there
    ids = _ids()
    for kwargs in ({"seed": -1, "temperature": 0.5, "send_noise": False},
                   {"seed": 1, "temperature": 1e39},
                   {"seed": -1, "temperature": 0.5}):
        with pytest.raises(TritonRequestError, match="must be"):
            client.infer(ids["src_ids"], ids["src_mask"], ids["tgt_ids"], **kwargs)
    client.close()
