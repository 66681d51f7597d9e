"""Static QDQ int8 (``[int8] mode = "static"``): calibrated graphs in QDQ format with the HMU and
the LM head FP32, calibration feeds recorded from real generation inside the profile, a bad
calibration file refused in one line, and the task budget judging the static graphs."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import SMALL
from hmu_export.build import pipeline
from hmu_export.core.config import BuildConfig, Int8Config, config_from_dict
from hmu_export.core.errors import ConfigError

STATIC = {**SMALL, "int8": {"mode": "static", "int4": False}}
FP32_NODES = ("hmu/gate_mlp/0/MatMul", "hmu/vae/mu/MatMul", "hmu/vae/logvar/MatMul",
              "lm_head/MatMul")


@pytest.fixture(scope="module")
def sbuild(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("static") / "b"
    outcome = pipeline.run_build(config_from_dict(STATIC).validate(), out,
                                 only=["checkpoint", "export", "quantize"])
    assert outcome.ok, outcome.failure
    return outcome.out_dir


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def test_static_mode_writes_qdq_graphs_with_the_hmu_and_lm_head_fp32(sbuild):
    manifest = json.loads((sbuild / "manifest.json").read_text())
    stage = manifest["stages"]["quantize"]
    assert stage["status"] == "ok" and stage["details"]["mode"] == "static"
    # the tiny model has no tokenizer and no task: the manifest says the feeds were random
    calib = stage["details"]["calibration"]
    assert calib["source"] == "random" and set(calib["random_feeds"]) == {"full", "encoder",
                                                                           "decoder"}
    assert "no calibration data" in calib["note"]
    for stem in ("model", "encoder", "decoder"):
        model = onnx.load(str(sbuild / f"{stem}.int8.onnx"))
        ops = Counter(n.op_type for n in model.graph.node)
        assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0, stem
        assert ops["DynamicQuantizeLinear"] == 0 and ops["MatMulInteger"] == 0, stem
        made = _producers(model)
        inits = {i.name: i for i in model.graph.initializer}
        by_name = {n.name: n for n in model.graph.node}
        for name in FP32_NODES:
            if name not in by_name:
                continue  # the encoder has no LM head, the decoder no HMU
            node = by_name[name]
            assert node.op_type == "MatMul", name
            for x in node.input:  # neither input comes out of a DequantizeLinear
                assert x not in made or made[x].op_type != "DequantizeLinear", (stem, name, x)
            assert inits[node.input[1]].data_type == onnx.TensorProto.FLOAT, name
        # the quantized weights are int8, one scale per output channel
        dq_weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                      and n.input[0] in inits
                      and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
        assert dq_weights, stem
        assert all(len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1
                   for n in dq_weights), stem
        for name in stage["details"]["graphs"][f"{stem}.int8.onnx"]["kept_fp32"]:
            assert by_name[name].op_type == "MatMul", name
        # quantize_outputs = false: a quantized MatMul's output goes on in FP32, unrounded
        quantized = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
                     and n.input[0] in made and made[n.input[0]].op_type == "DequantizeLinear"]
        assert quantized, stem
        readers = {x: n for n in model.graph.node for x in n.input}
        assert all(readers.get(n.output[0]) is None
                   or readers[n.output[0]].op_type != "QuantizeLinear" for n in quantized), stem


def test_static_graphs_load_and_stay_close_to_fp32(sbuild):
    from hmu_export.core.grid import contract_feeds
    from hmu_export.core.io_contract import full_contract
    from hmu_export.runners import OnnxRuntimeRunner

    cfg = config_from_dict(STATIC)
    contract = full_contract(cfg.model)
    feeds = contract_feeds(contract, cfg, {"batch": 4, "src_len": 16, "tgt_len": 8}, seed=1,
                           noise_scale=0.0)
    ref = OnnxRuntimeRunner(sbuild / "model.onnx", contract).infer(feeds)["logits"]
    got = OnnxRuntimeRunner(sbuild / "model.int8.onnx", contract).infer(feeds)["logits"]
    a, b = ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1])
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.995, cos.min()  # a wrong scale or axis gives cosines near 0
    assert not np.array_equal(ref, got)


def test_static_graphs_load_and_generate(sbuild, tmp_path):
    from hmu_export.commands.cli import main

    src = tmp_path / "in.json"
    src.write_text(json.dumps({"src_ids": [[5, 17, 9], [4, 4]]}))
    out = tmp_path / "gen.json"
    assert main(["generate", "--artifacts", str(sbuild), "--input", str(src), "--backend",
                 "onnxruntime-int8", "--max-new-tokens", "4", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["backend"] == "onnxruntime-int8" and len(data["sequences"]) == 2
    assert all(1 <= len(s) <= 4 for s in data["sequences"])


def _within(cfg: BuildConfig, feeds: dict[str, np.ndarray], contract) -> None:  # type: ignore[no-untyped-def]
    from hmu_export.core.io_contract import AXIS_TO_PROFILE

    for spec in contract.inputs:
        shape = feeds[spec.name].shape
        assert len(shape) == len(spec.dims), spec.name
        for d, n in zip(spec.dims, shape):
            if isinstance(d, str):
                assert cfg.profile.axis(AXIS_TO_PROFILE[d]).contains(n), (spec.name, d, n)
            else:
                assert n == d, (spec.name, d, n)


def test_recorded_calibration_feeds_are_real_steps_inside_the_profile(sbuild):
    from hmu_export.core.io_contract import (TGT_IDS, CacheLayout, decoder_contract,
                                             encoder_contract, full_contract, past_key)
    from hmu_export.export.calibration import record_feeds

    cfg = config_from_dict(STATIC).validate()
    rng = np.random.default_rng(0)
    sources = [list(rng.integers(3, 61, size=n)) for n in (1, 3, 5, 16, 7, 2, 9, 11, 4)]
    sources.append(list(range(3, 3 + 17)))  # one token over src_len max: skipped, counted
    cache = CacheLayout(1, 4, 8)  # SMALL: one decoder layer, 4 heads of 8
    enc_c, dec_c = encoder_contract(cfg.model, cache), decoder_contract(cfg.model, cache)
    full_c = full_contract(cfg.model)
    got = record_feeds(sbuild / "encoder.onnx", sbuild / "decoder.onnx", cfg, sources,
                       full=full_c, label="ids",
                       input_names={"encoder": enc_c.input_names, "decoder": dec_c.input_names})
    assert got.samples == 9 and got.skipped == 1
    assert len(got.graphs["encoder"]) == 5 == len(got.graphs["full"])  # batch opt 2, 9 rows
    for feeds in got.graphs["encoder"]:
        _within(cfg, feeds, enc_c)
    for feeds in got.graphs["full"]:
        _within(cfg, feeds, full_c)
        assert (feeds[TGT_IDS][:, 0] == cfg.generation.bos_id).all()
    for feeds in got.graphs["decoder"]:
        _within(cfg, feeds, dec_c)
        assert set(feeds) == set(dec_c.input_names)
    # real caches: each batch starts at past 0 and every later step carries the earlier keys
    pasts = [f[past_key(0)].shape[2] for f in got.graphs["decoder"]]
    assert pasts[0] == 0 and pasts.count(0) == 5 and max(pasts) >= 3
    real = [f[past_key(0)] for f in got.graphs["decoder"] if f[past_key(0)].shape[2]]
    assert all(np.isfinite(k).all() and np.abs(k).max() > 0 for k in real)
    # what was recorded is what was fed: a step's past is the previous step's present
    import onnxruntime as ort
    dec = ort.InferenceSession(str(sbuild / "decoder.onnx"), providers=["CPUExecutionProvider"])
    steps = got.graphs["decoder"]
    checked = 0
    for a, b in zip(steps, steps[1:]):
        if b[past_key(0)].shape[2] == a[past_key(0)].shape[2] + 1 and \
                b[past_key(0)].shape[0] == a[past_key(0)].shape[0]:
            present = dec.run(["present_key.0"], a)[0]
            np.testing.assert_allclose(b[past_key(0)], present, rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked >= 5


def test_random_fallback_feeds_lie_inside_the_profile():
    from hmu_export.core.io_contract import CacheLayout, decoder_contract, full_contract
    from hmu_export.export.calibration import random_feeds

    cfg = config_from_dict(STATIC).validate()
    for contract in (full_contract(cfg.model), decoder_contract(cfg.model, CacheLayout(1, 4, 8))):
        feeds = random_feeds(contract, cfg, 40, seed=3)
        assert len(feeds) == 40
        for f in feeds:
            _within(cfg, f, contract)
        assert len({f[contract.input_names[0]].shape for f in feeds}) > 5  # sizes vary


@pytest.mark.parametrize("key,value,match", [
    ("mode", "qdq", "int8.mode must be auto, dynamic or static, got 'qdq'"),
    ("calibration_method", "kl", "int8.calibration_method must be minmax, entropy, percentile "
                                 "or distribution, got 'kl'"),
    ("activation_type", "int8", "int8.activation_type must be quint8 or qint8"),
    ("calibration_samples", 0, r"int8.calibration_samples must be in \[1, 100000\], got 0"),
    ("calibration_percentile", 40.0, r"int8.calibration_percentile must be in \(50, 100\]"),
])
def test_bad_static_settings_are_one_line_config_errors(key, value, match):
    with pytest.raises(ConfigError, match=match) as info:
        config_from_dict({**SMALL, "int8": {key: value}})
    assert "\n" not in str(info.value)


def test_a_bad_calibration_file_is_one_line_naming_file_and_line(tmp_path, capsys):
    from hmu_export.commands.cli import main

    calib = tmp_path / "data" / "calib.jsonl"
    calib.parent.mkdir()
    calib.write_text('{"source": "1", "target": "uno"}\n{"source": "2", "target": "dos"}\n'
                     '{"source": "3", "target": \n', encoding="utf-8")
    toml = tmp_path / "build.toml"
    toml.write_text('[model]\nname = "t"\nvocab_size = 61\nd_model = 32\nn_heads = 4\n'
                    'n_encoder_layers = 1\nn_decoder_layers = 1\nd_ff = 64\nlatent_dim = 16\n'
                    'max_len = 32\n[profile]\nbatch = [1, 2, 4]\nsrc_len = [1, 8, 16]\n'
                    'tgt_len = [1, 4, 8]\n[int8]\nmode = "static"\n'
                    'calibration = "data/calib.jsonl"\n')
    out = tmp_path / "out"
    assert main(["build", "--config", str(toml), "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line, no traceback
    assert f"int8.calibration: {calib}:3: not valid JSON" in err  # relative to the TOML
    assert not out.exists()  # refused before anything was written


def test_a_missing_calibration_file_is_refused_and_dynamic_mode_never_reads_it(tmp_path):
    from hmu_export.build.preflight import check_calibration

    base = config_from_dict(SMALL)
    missing = str(tmp_path / "nope.jsonl")
    from dataclasses import replace
    with pytest.raises(Exception, match=f"int8.calibration: task set not found: {missing}"):
        check_calibration(replace(base, int8=Int8Config(mode="static", calibration=missing)))
    check_calibration(replace(base, int8=Int8Config(mode="dynamic", calibration=missing)))


def test_the_task_budget_judges_the_static_graphs(tmp_path, monkeypatch):
    """The stage's judge runs on the graphs static mode wrote (QDQ at judging time) and removes
    them when they miss the budget; the miss is injected in the report (the tiny model has no
    task set)."""
    from hmu_export.verify import task_accuracy as ta

    seen: dict[str, Counter] = {}

    def fake_run(root, cfg, tok, make, *, backends, reference, noise):  # type: ignore[no-untyped-def]
        for stem in ("encoder", "decoder"):
            seen[stem] = Counter(n.op_type for n in
                                 onnx.load(str(Path(root) / f"{stem}.int8.onnx")).graph.node)
        rep = ta.TaskReport("t.jsonl", 100, budget_points=cfg.int8.max_exact_match_drop,
                            reference=reference)
        rep.rows = [ta.TaskRow("onnxruntime", "fp32", 100, 100, 1.0, 1.0, 0.1),
                    ta.TaskRow("onnxruntime-int8", "int8", 98, 100, 0.98, 0.98, 0.1)]
        return rep

    monkeypatch.setattr(ta, "run_task_accuracy", fake_run)
    monkeypatch.setattr("hmu_export.build.task_inputs.task_tokenizer", lambda ctx: object())
    monkeypatch.setattr("hmu_export.build.task_inputs.task_generators", lambda ctx: None)
    outcome = pipeline.run_build(config_from_dict(STATIC).validate(), tmp_path / "b",
                                 only=["checkpoint", "export", "quantize"])
    q = outcome.stages["quantize"]
    assert q.status == "failed" and "onnxruntime-int8 exact match 98.00% is 2.00 points" in q.reason
    assert seen["decoder"]["QuantizeLinear"] > 0 and seen["encoder"]["QuantizeLinear"] > 0
    assert not list(outcome.out_dir.glob("*.int8.onnx"))


@pytest.mark.parametrize("method", ["entropy", "percentile", "distribution"])
def test_histogram_calibration_takes_feeds_of_different_shapes(sbuild, tmp_path, method):
    """ORT's histogram calibrators stack a tensor's collected arrays into one: the decoder's
    feeds (past length grows step by step) must reach them one at a time."""
    from hmu_export.core.io_contract import CacheLayout, decoder_contract
    from hmu_export.export.calibration import random_feeds
    from hmu_export.export.quantize import quantize_int8_static

    cfg = config_from_dict(STATIC)
    feeds = random_feeds(decoder_contract(cfg.model, CacheLayout(1, 4, 8)), cfg, 12, seed=5)
    assert len({f["past_key.0"].shape for f in feeds}) > 3
    dst = tmp_path / "decoder.int8.onnx"
    res = quantize_int8_static(sbuild / "decoder.onnx", dst,
                               Int8Config(mode="static", calibration_method=method), feeds)
    ops = Counter(n.op_type for n in onnx.load(str(dst)).graph.node)
    assert res.quantized > 0 and ops["QuantizeLinear"] > 0


def test_calibration_data_is_the_named_file_else_the_dev_split_never_the_test_set(tmp_path):
    from dataclasses import replace

    from hmu_export import demo
    from hmu_export.core.config import TaskConfig, demo_config, load_config
    from hmu_export.export.calibration import calibration_file

    assert calibration_file(demo_config()) == ("task.dev", str(demo.DEV_SET))
    assert str(demo.TEST_SET) not in calibration_file(demo_config())
    base = config_from_dict(SMALL)
    assert calibration_file(base) == ("", "")
    named = replace(base, int8=Int8Config(calibration="/c.jsonl"),
                    task=TaskConfig(path="/t.jsonl", dev="/d.jsonl"))
    assert calibration_file(named) == ("int8.calibration", "/c.jsonl")
    toml = tmp_path / "sub" / "b.toml"
    toml.parent.mkdir()
    toml.write_text('[task]\npath = "t.jsonl"\ndev = "../d.jsonl"\n')
    assert calibration_file(load_config(toml)) == ("task.dev", str(tmp_path / "d.jsonl"))


def test_static_int8_tokens_do_not_depend_on_the_batch(sbuild):
    """Fixed activation scales: a row's greedy tokens are the same alone and inside any batch
    (dynamic int8 quantizes each activation tensor over the whole batch, so its rows can
    change with their neighbours: docs/int8.md). The reason `auto` prefers static."""
    from hmu_export.generate.generator import Generator

    gen = Generator.from_build(sbuild, "onnxruntime-int8")
    vocab = config_from_dict(STATIC).model.vocab_size
    rng = np.random.default_rng(4)
    for _ in range(10):
        rows = [rng.integers(3, vocab, size=int(rng.integers(2, 9))).tolist() for _ in range(3)]
        together = gen.generate(rows, strategy="greedy", max_new_tokens=6,
                                ignore_eos=True).sequences
        for row, seq in zip(rows, together):
            alone = gen.generate([row], strategy="greedy", max_new_tokens=6,
                                 ignore_eos=True).sequences[0]
            assert alone == seq, (row, alone, seq)


def test_auto_mode_is_static_with_calibration_data_and_dynamic_without(tmp_path):
    """The default `auto`: a build without calibration data quantizes dynamically and says why
    in its manifest."""
    assert Int8Config().mode == "auto"
    out = tmp_path / "b"
    cfg = config_from_dict({**SMALL, "int8": {"int4": False}}).validate()
    outcome = pipeline.run_build(cfg, out, only=["checkpoint", "export", "quantize"])
    assert outcome.ok, outcome.failure
    q = json.loads((outcome.out_dir / "manifest.json").read_text())["stages"]["quantize"]
    assert q["details"]["mode"] == "dynamic" and "no calibration data" in \
        q["details"]["mode_reason"]
    ops = Counter(n.op_type
                  for n in onnx.load(str(outcome.out_dir / "decoder.int8.onnx")).graph.node)
    assert ops["DynamicQuantizeLinear"] > 0 and ops["QuantizeLinear"] == 0, ops
