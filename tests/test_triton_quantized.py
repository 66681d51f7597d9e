"""Triton generation models of the quantize stage's int8 / int4 graphs (issue 17 item 5).

A real build of the tiny SMALL config (checkpoint, export, quantize, triton) writes
``<name>_generate_int8`` / ``_generate_stream_int8`` (and int4) beside the fp32 models; the
bundled tritonserver serves them, and every answer is compared with Python's Generator over the
same build with backend ``onnxruntime-int8`` / ``-int4`` (the oracle: it never reads the
repository). A variant the quantize stage removed (over its quality budget) gets no model.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import SMALL, seal
from hmu_export.core.config import config_from_dict
from hmu_export.core.errors import ConfigError
from hmu_export.core.fileio import sha256_file

grpcclient = pytest.importorskip("tritonclient.grpc")
from test_triton_generate import _inputs as _ids  # noqa: E402  (src_ids [1, L], max_new_tokens)

BASE = "hmu-tiny"
GEN8, STREAM8, GEN4, GEN32 = (f"{BASE}_generate_int8", f"{BASE}_generate_stream_int8",
                              f"{BASE}_generate_int4", f"{BASE}_generate")
ROWS = [[5, 17, 9], [4, 4], [7, 8, 9, 10, 11, 12, 13, 3], [60], list(range(3, 19))]
QUANTIZED = ("int8", "int4")


@pytest.fixture(scope="module")
def qbuild(tmp_path_factory) -> Path:
    from hmu_export.build import pipeline

    out = tmp_path_factory.mktemp("tq") / "b"
    outcome = pipeline.run_build(config_from_dict(SMALL), out,
                                 only=["checkpoint", "export", "quantize", "triton"])
    assert outcome.ok, outcome.failure
    assert outcome.stages["quantize"].status == "ok"
    return outcome.out_dir


@pytest.fixture(scope="module")
def text_build(qbuild, tmp_path_factory) -> Path:
    """The same build carrying a tokenizer (checkpoint/hf/, as a build copies it): its
    generation models, int8 ones included, take text too. Repository by the `triton` command."""
    pytest.importorskip("tokenizers")
    from test_text import _tokenizer

    from hmu_export.commands.cli import main

    out = tmp_path_factory.mktemp("tq_text") / "b"
    shutil.copytree(qbuild, out)
    shutil.rmtree(out / "triton")
    _tokenizer(SMALL["model"]["vocab_size"]).save_pretrained(out / "checkpoint" / "hf")
    seal(out)
    assert main(["triton", "--artifacts", str(out)]) == 0
    return out


def _gen(build: Path, precision: str):
    from hmu_export.generate.generator import Generator

    return Generator.from_build(build, backend="onnxruntime" if precision == "fp32"
                                else f"onnxruntime-{precision}", threads=1)


@pytest.fixture(scope="module")
def server(text_build, tmp_path_factory):
    """Serves a copy of the repository: the python backend writes __pycache__ beside model.py,
    which would make the build's manifest check refuse the build the oracle reads."""
    from hmu_export.deploy.triton.server import serve

    repo = tmp_path_factory.mktemp("tq_served") / "repo"
    shutil.copytree(text_build / "triton", repo)
    with serve(repo, [GEN8, STREAM8, GEN4]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


# --------------------------------------------------------------------------- the repository
def test_each_shipped_precision_gets_models_listed_in_the_manifest(qbuild):
    """auto: fp32 plus int8 and int4 (both shipped); their version folders hold the build's own
    quantized graphs (same sha256), named as the build names them; every file of triton/ is in
    the manifest with its sha256; the stage records the precisions served."""
    from hmu_export.deploy.triton.config import parse_config

    repo = qbuild / "triton"
    manifest = json.loads((qbuild / "manifest.json").read_text())
    stage = manifest["stages"]["triton"]["details"]
    assert stage["generation_precisions"] == ["fp32", "int8", "int4"]
    for precision in QUANTIZED:
        for kind in ("generate", "generate_stream"):
            name = f"{BASE}_{kind}_{precision}"
            assert stage["models"][f"{kind}_{precision}"] == name
            folder = repo / name
            files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                           if p.is_file())
            assert files == sorted(["config.pbtxt", "1/model.py", "1/token_rules.py",
                                    "1/request_options.py", f"1/encoder.{precision}.onnx",
                                    f"1/decoder.{precision}.onnx"]), files
            for graph in ("encoder", "decoder"):
                f = f"{graph}.{precision}.onnx"
                assert sha256_file(folder / "1" / f) == sha256_file(qbuild / f)
            conf = parse_config((folder / "config.pbtxt").read_text())
            params = {k: v.string_value for k, v in conf.parameters.items()}
            assert (params["precision"], params["encoder_file"], params["decoder_file"]) == (
                precision, f"encoder.{precision}.onnx", f"decoder.{precision}.onnx")
            assert params["step_backend"] == "onnxruntime"
            assert conf.model_transaction_policy.decoupled == (kind == "generate_stream")
    # no quantized BLS targets: the generation models run their graphs in-process
    assert not list(repo.glob("*_encoder_int*")) and not list(repo.glob("*_decoder_int*"))
    listed = {a["path"]: a for a in manifest["artifacts"]}
    on_disk = [p for p in repo.rglob("*") if p.is_file()]
    assert len(on_disk) > 0
    for path in on_disk:
        rel = path.relative_to(qbuild).as_posix()
        assert rel in listed, rel
        assert listed[rel]["sha256"] == sha256_file(path) and listed[rel]["bytes"] == \
            path.stat().st_size
    sizes = {p: sum(f.stat().st_size for f in (repo / f"{BASE}_generate{t}").rglob("*")
                    if f.is_file()) for p, t in (("fp32", ""), ("int8", "_int8"),
                                                 ("int4", "_int4"))}
    print(f"\ngeneration model folder bytes: {sizes}")
    assert sizes["int8"] < sizes["fp32"] and sizes["int4"] < sizes["fp32"]


def test_a_quantized_model_cannot_be_switched_to_the_fp32_bls_targets(qbuild, small_cfg):
    from hmu_export.deploy.triton.config import TritonConfigError, parse_config
    from hmu_export.deploy.triton.generation import check_generate_config

    conf = parse_config((qbuild / "triton" / GEN8 / "config.pbtxt").read_text())
    check_generate_config(conf, small_cfg, streaming=False)  # as written: valid
    for key, value, words in (("step_backend", "bls", "int8 model runs its graphs in-process"),
                              ("decoder_file", "decoder.onnx", "decoder_file 'decoder.onnx' is "
                                                               "not the int8 graph"),
                              ("precision", "int3", "precision must be one of")):
        bad = type(conf)()
        bad.CopyFrom(conf)
        bad.parameters[key].string_value = value
        with pytest.raises(TritonConfigError, match=words):
            check_generate_config(bad, small_cfg, streaming=False)


def test_a_variant_removed_by_the_quantize_stage_gets_no_model(qbuild, tmp_path, capsys):
    """The quantize stage deletes a variant over its quality budget: auto then serves the
    others; naming it explicitly (--generation-precisions, or the config key) is a skip recorded
    in the manifest's triton stage, not a model of missing graphs."""
    from hmu_export.commands.cli import main

    build = tmp_path / "b"
    shutil.copytree(qbuild, build)
    for path in build.glob("*.int8.onnx"):
        path.unlink()
    seal(build)
    assert main(["triton", "--artifacts", str(build)]) == 0
    names = sorted(p.name for p in (build / "triton").iterdir() if p.is_dir())
    assert GEN4 in names and not [n for n in names if n.endswith("_int8")], names
    assert main(["triton", "--artifacts", str(build), "--generation-precisions",
                 "fp32,int8"]) == 0
    names = sorted(p.name for p in (build / "triton").iterdir() if p.is_dir())
    assert GEN32 in names and not [n for n in names if "_int" in n], names
    stage = json.loads((build / "manifest.json").read_text())["stages"]["triton"]
    assert stage["details"]["generation_precisions"] == ["fp32"]
    skip = [n for n in stage["details"]["notes"] if "int8" in n]
    assert skip and skip[0].startswith("no int8 generation models: the build has no "
                                       "encoder.int8.onnx / decoder.int8.onnx"), stage
    assert skip[0] in capsys.readouterr().err.replace("\n", "")
    assert main(["triton", "--artifacts", str(build), "--generation-precisions", "int4"]) == 0
    names = sorted(p.name for p in (build / "triton").iterdir() if p.is_dir())
    assert [n for n in names if "_generate" in n] == [GEN4, f"{BASE}_generate_stream_int4"]
    assert f"{BASE}_encoder" not in names  # the fp32 BLS targets come with fp32 only


@pytest.mark.parametrize("value,words", [
    (["int9"], "triton.generation_precisions: unknown precision 'int9'; known: fp32, int8, int4"),
    (["auto", "int8"], "unknown precision 'auto' (\"auto\" stands alone)"),
    (["int8", "int8"], "triton.generation_precisions names 'int8' twice"),
    ([], "triton.generation_precisions is empty"),
    ("int8", "triton.generation_precisions must be a list"),
])
def test_bad_generation_precisions_are_config_errors(value, words):
    with pytest.raises(ConfigError) as info:
        config_from_dict({**SMALL, "triton": {"generation_precisions": value}})
    assert words in str(info.value), str(info.value)


def test_precisions_the_build_cannot_write_are_config_errors():
    with pytest.raises(ConfigError, match="names int8, but int8.enabled = false"):
        config_from_dict({**SMALL, "int8": {"enabled": False},
                          "triton": {"generation_precisions": ["fp32", "int8"]}})
    with pytest.raises(ConfigError, match="names int4, but int8.int4 = false"):
        config_from_dict({**SMALL, "int8": {"int4": False},
                          "triton": {"generation_precisions": ["int4"]}})
    cfg = config_from_dict({**SMALL, "triton": {"generation_precisions": ["int8", "fp32"]}})
    assert cfg.triton.generation_precisions == ("int8", "fp32")
    # a config without the key: auto (builds made before it read the same)
    assert config_from_dict(SMALL).triton.generation_precisions == ("auto",)
    assert dataclasses.asdict(cfg.triton)["generation_precisions"] == ("int8", "fp32")


def test_a_bad_flag_is_one_line(qbuild, capsys):
    from hmu_export.commands.cli import main

    assert main(["triton", "--artifacts", str(qbuild), "--out", str(qbuild.parent / "r"),
                 "--generation-precisions", "fp32,int9"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--generation-precisions: unknown precision 'int9'" in err[0], err


# --------------------------------------------------------------------------- served
@pytest.mark.parametrize("precision,model", [("int8", GEN8), ("int4", GEN4)])
def test_served_quantized_tokens_equal_the_generators(client, text_build, precision, model):
    """Greedy, one request at a time: the served int8 / int4 model's tokens equal Python's
    Generator with backend onnxruntime-int8 / -int4 on the same rows (and differ from FP32's
    somewhere: the model really runs the quantized graphs)."""
    ref, fp32 = _gen(text_build, precision), _gen(text_build, "fp32")
    differs = False
    for row in ROWS:
        want = ref.generate([row]).sequences[0]
        got = client.infer(model, _ids(row)).as_numpy("tokens")[0].tolist()
        assert got == want, (row, got, want)
        differs |= fp32.generate([row]).sequences[0] != want
        got5 = client.infer(model, _ids(row, 5)).as_numpy("tokens")[0].tolist()
        assert got5 == ref.generate([row], max_new_tokens=5).sequences[0]
    assert differs, f"{precision} served tokens equal FP32's everywhere"


def test_the_int8_streaming_model_sends_the_same_tokens(server, text_build):
    import queue

    ref = _gen(text_build, "int8")
    c = grpcclient.InferenceServerClient(server.grpc_url)
    got: queue.Queue = queue.Queue()
    c.start_stream(callback=lambda result, error: got.put(error or result))
    try:
        for row in (ROWS[2], ROWS[4]):
            c.async_stream_infer(STREAM8, _ids(row), enable_empty_final_response=True)
            tokens = []
            while True:
                r = got.get(timeout=30)
                assert not isinstance(r, Exception), r
                out = r.as_numpy("tokens")
                if out is not None:
                    tokens.append(int(out[0, 0]))
                if r.get_response().parameters["triton_final_response"].bool_param:
                    break
            assert tokens == ref.generate([row]).sequences[0]
    finally:
        c.stop_stream()
        c.close()


def test_the_int8_model_takes_text(client, text_build):
    """A build with a tokenizer: its int8 generation model takes text and answers the tokens
    and the decoded text of Python's int8 generation (the tokenizer travels with every
    precision's models: a copy of a few kB)."""
    from hmu_export.model.tokenizer import load_tokenizer

    assert (text_build / "triton" / GEN8 / "1" / "tokenizer" / "tokenizer.json").is_file()
    ref, tok = _gen(text_build, "int8"), load_tokenizer(text_build)
    for text in ("a b c", "q w e r t y", "z"):
        want = ref.generate(tok.encode([text])).sequences[0]
        inp = grpcclient.InferInput("text", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.asarray([[text.encode()]], dtype=np.object_))
        res = client.infer(GEN8, [inp])
        assert res.as_numpy("tokens")[0].tolist() == want
        assert res.as_numpy("generated_text")[0, 0].decode() == tok.decode([want])[0]
