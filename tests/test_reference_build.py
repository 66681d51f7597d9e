"""A model trained with the paper's reference implementation, end to end through the CLI.

A ``.pt`` saved exactly as the reference's run_experiments.py saves it (seq2seq with the default
``HMU`` after the encoder, seq2seq with the gated ``HMU_mod`` after the decoder, a GLUE-style
classifier) builds from a three-line ``[model]`` section; its parity report names the reference
and passes; the exported graphs match the ORACLE (tests/reference_oracle.py, a transcription of
the author's code that shares nothing with hmu_export.model.reference) given the same noise;
``generate`` is refused; bad inputs are one ``error:`` line with nothing left behind.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from reference_oracle import make_reference_model, oracle_forward, save_reference_pt  # noqa: E402

from hmu_export.commands.cli import main  # noqa: E402

# d_model 32: heads = d_model // 32 = 1, the reference runs' rule, so no n_heads line is needed
SIZES = dict(vocab_size=40, d_model=32, layers=(1, 1), d_ff=64, latent_dim=8, max_len=16,
             num_classes=3, nhead=1)
PROFILE = "[profile]\nbatch = [1, 2, 2]\nsrc_len = [1, 3, 5]\ntgt_len = [1, 2, 3]\n"
CASES = {  # name -> (make_reference_model flags, extra [model] line)
    "seq2seq-HMU": (dict(), ""),
    "seq2seq-HMU_mod-after_decoder": (dict(gated=True, after_decoder=True),
                                      'hmu_position = "after_decoder"\n'),
    "glue-HMU": (dict(classifier=True), ""),
}
ORACLE_SHAPES = [(1, 1, 1), (2, 5, 3), (1, 3, 2), (2, 4, 1)]
FP32_MAX_ABS = 1e-4
MEASURED: dict[str, float] = {}


def _toml(folder: Path, pt: str, extra: str = "", more: str = "") -> Path:
    path = folder / "cfg.toml"
    path.write_text(f'[model]\nsource = "reference"\ncheckpoint = "{pt}"\n{extra}{PROFILE}{more}')
    return path


def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (oracle model, build folder, pt path), built once through the CLI."""
    out = {}
    for i, (name, (flags, extra)) in enumerate(CASES.items()):
        folder = tmp_path_factory.mktemp(name)
        model = make_reference_model(seed=10 + i, **flags, **SIZES)
        pt = save_reference_pt(model, folder / ("glue.pt" if flags.get("classifier")
                                                else "htransformer.pt"))
        # The fp16 stage and FP16 parity run on one seq2seq and the classifier (time budget).
        more = "[parity]\nfp16 = false\n" if flags.get("after_decoder") else ""
        cfg = _toml(folder, pt.name, extra, more)
        rc = main(["build", "--config", str(cfg), "--out", str(folder / "build")])
        assert rc == 0, name
        out[name] = (model, folder / "build", pt)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_build_parity_names_the_reference_and_passes(built, name):
    _, out, _ = built[name]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ok"] and manifest["stages"]["parity"]["status"] == "ok"
    report = json.loads((out / "parity" / "report.json").read_text())
    assert report["passed"] is True
    flags = CASES[name][0]
    variant = "HMU_mod" if flags.get("gated") else "HMU"
    assert report["reference"].startswith(f"torch-cpu fp32 (reference implementation: {variant}")
    checks = {(c["backend"], c["name"]): c for c in report["checks"]}
    assert all(c["passed"] for c in checks.values())
    backends = {r["backend"] for r in report["results"]}
    assert {"onnxruntime", "onnxruntime-opt"} <= backends
    if flags.get("classifier"):
        assert report["axes"] == ["batch", "src_len"] and report["output"] == "class_logits"
        assert all(len(s) == 2 for s in report["grid"])
        assert {"onnxruntime-fp16emu", "torch-fp16"} <= backends
        pad = checks[("onnxruntime", "padding_invariance")]["detail"]
        assert pad.startswith("not applicable") and 'pool = "mean"' in pad
    else:
        assert report["axes"] == ["batch", "src_len", "tgt_len"]
        assert checks[("onnxruntime", "padding_invariance")]["detail"].startswith("row with")
    assert checks[("onnxruntime", "zero_noise_is_mean_path")]["detail"].startswith(
        "not applicable")
    assert checks[("onnxruntime", "noise_live")]["value"] <= 2 * FP32_MAX_ABS
    assert "Reference: torch-cpu fp32 (reference implementation" in \
        (out / "parity" / "report.md").read_text()


@pytest.mark.parametrize("graph", ["model.onnx", "model.opt.onnx"])
@pytest.mark.parametrize("name", list(CASES))
def test_exported_graph_matches_the_oracle(built, name, graph):
    """ONNX Runtime on the build's graph vs the oracle forward, same noise, all-ones mask (the
    reference never masks)."""
    import onnxruntime as ort

    model, out, _ = built[name]
    flags = CASES[name][0]
    sess = ort.InferenceSession(str(out / graph), providers=["CPUExecutionProvider"])
    worst = 0.0
    for b, ls, lt in ORACLE_SHAPES:
        rng = np.random.default_rng([b, ls, lt])
        src = rng.integers(1, SIZES["vocab_size"], (b, ls)).astype(np.int64)
        tgt = rng.integers(1, SIZES["vocab_size"], (b, lt)).astype(np.int64)
        noise = rng.standard_normal((b, lt if flags.get("after_decoder") else ls,
                                     SIZES["latent_dim"])).astype(np.float32)
        feeds = {"src_ids": src, "src_mask": np.ones_like(src), "noise": noise}
        if not flags.get("classifier"):
            feeds["tgt_ids"] = tgt
        got = sess.run(None, feeds)[0]
        want = oracle_forward(model, src, noise, None if flags.get("classifier") else tgt)
        want = want.numpy()
        assert got.shape == want.shape
        worst = max(worst, float(np.max(np.abs(got - want))))
        assert np.array_equal(got.argmax(-1), want.argmax(-1))  # 100% top-1
    MEASURED[f"{name} {graph}"] = worst
    print(f"\n{name} {graph}: max abs vs oracle {worst:.2e}")
    assert worst <= FP32_MAX_ABS


def test_parity_command_runs_the_source_on_a_classifier_build(built, capsys):
    _, out, _ = built["glue-HMU"]
    assert main(["parity", "--artifacts", str(out), "--shapes", "2x3x1,2x3x2",
                 "--backends", "onnxruntime"]) == 0
    report = json.loads((out / "parity" / "report.json").read_text())
    assert report["grid"] == [[2, 3]] and report["passed"]  # tgt_len dropped, deduplicated
    assert "reference implementation" in capsys.readouterr().out


def test_triton_configs_follow_the_contract(built):
    for name, (flags, _) in CASES.items():
        repo = built[name][1] / "triton"
        onnx_conf = (repo / "hmu-default_onnx" / "config.pbtxt").read_text()
        trt_conf = (repo / "hmu-default_tensorrt" / "config.pbtxt").read_text()
        python = repo / "hmu-default_python"
        if flags.get("classifier"):
            for conf in (onnx_conf, trt_conf):
                assert 'name: "class_logits"' in conf and "tgt_ids" not in conf
        else:
            assert 'name: "logits"' in onnx_conf and 'name: "tgt_ids"' in onnx_conf
        # every graph, classifier and noise over tgt_len included, gets the python model
        assert (python / "1" / "model.py").is_file()
        assert "No python-backend model" not in (repo / "README.md").read_text()


def test_generate_is_refused_with_one_line(built, tmp_path, capsys):
    _, out, _ = built["seq2seq-HMU"]
    inp = tmp_path / "in.json"
    inp.write_text(json.dumps({"src_ids": [[1, 2, 3]]}))
    assert main(["generate", "--artifacts", str(out), "--input", str(inp)]) != 0
    assert "causal" in _error_line(capsys)


def _bench(out: Path, folder: Path, shapes: str, *more: str) -> dict:
    assert main(["bench", "--artifacts", str(out), "--quick", "--shapes", shapes,
                 "--backends", "torch,onnxruntime,onnxruntime-opt,tensorrt", "--out",
                 str(folder), *more]) == 0
    return json.loads((folder / "bench.json").read_text())


def test_bench_runs_a_classifier_build_over_its_own_axes(built, tmp_path):
    """No tgt axis: shapes are B x Ls, every row has that shape, the native-only HMU overhead
    is listed as not measured (with its reason), FLOPs are counted on the graph."""
    _, out, _ = built["glue-HMU"]
    data = _bench(out, tmp_path, "1x5,2x5")
    rows = {(r["backend"], tuple(r["shape"])): r for r in data["results"]}
    assert set(rows) == {(b, s) for b in ("torch", "onnxruntime", "onnxruntime-opt")
                         for s in ((1, 5), (2, 5))}
    for (_, (b, ls)), r in rows.items():
        assert r["tokens_per_s"] == pytest.approx(r["seq_per_s"] * ls)
    # every matmul of the graph scales with the batch: the count follows the feeds
    assert rows["torch", (2, 5)]["gflop"] == pytest.approx(2 * rows["torch", (1, 5)]["gflop"])
    assert rows["torch", (1, 5)]["gflop"] > 0
    assert {s["backend"] for s in data["skipped"]} == {"tensorrt"}
    (part,) = data["skipped_parts"]
    assert part["part"] == "hmu_overhead" and "reference" in part["reason"]
    assert data["hmu_overhead"] == []
    assert data["model"]["axes"] == ["batch", "src_len"]
    md = (tmp_path / "bench.md").read_text()
    assert "| backend | prec | B×Ls | copies |" in md and "- hmu_overhead: " in md


def test_bench_backends_of_a_classifier_are_the_registry_entries_parity_runs(built):
    """The torch and onnxruntime entries run the classifier graph: class_logits [B, classes],
    the two agreeing, each with its own inference time."""
    from hmu_export.backends.registry import discover_backends
    from hmu_export.bench.timing import load_build
    from hmu_export.core.grid import contract_feeds

    _, out, _ = built["glue-HMU"]
    loaded = load_build(out)
    entries = {b.label: b for b in discover_backends(loaded.layout, loaded.cfg, loaded.model,
                                                     loaded.contract, use="bench")}
    feeds = contract_feeds(loaded.contract, loaded.cfg, {"batch": 2, "src_len": 4}, seed=1)
    got = {}
    for label in ("torch", "onnxruntime"):
        with entries[label].make() as runner:
            got[label] = runner.infer(feeds)["class_logits"]
            assert runner.last_inference_time() > 0
    assert got["torch"].shape == (2, SIZES["num_classes"])
    assert np.abs(got["torch"] - got["onnxruntime"]).max() <= FP32_MAX_ABS


def test_bench_runs_a_seq2seq_build_with_noise_over_the_target(built, tmp_path):
    _, out, _ = built["seq2seq-HMU_mod-after_decoder"]
    data = _bench(out, tmp_path, "2x5x3", "--no-hmu-overhead")
    assert {(r["backend"], tuple(r["shape"])) for r in data["results"]} == {
        ("torch", (2, 5, 3)), ("onnxruntime", (2, 5, 3)), ("onnxruntime-opt", (2, 5, 3))}
    assert "skipped_parts" not in data  # the overhead was not asked for


@pytest.mark.parametrize("shapes, needle", [("2x3x2", "give BxLS"), ("2x9", "outside"),
                                            ("2xx3", "bad shape")])
def test_bench_bad_shapes_for_a_classifier_are_one_error_line(built, capsys, shapes, needle):
    _, out, _ = built["glue-HMU"]
    assert main(["bench", "--artifacts", str(out), "--quick", "--shapes", shapes]) == 2
    assert needle in _error_line(capsys)


# --------------------------------------------------------------------------- bad inputs
class _Payload:
    """Unpickling this would create a file: weights-only loading must refuse it."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_pt(kind: str, folder: Path) -> tuple[str, str]:
    """(checkpoint file name, extra [model] lines) of one bad input."""
    model = make_reference_model(**SIZES)
    state = dict(model.state_dict())
    path = folder / "bad.pt"
    if kind == "unknown_layout":
        state = {"model." + k: v for k, v in state.items()}
        torch.save(state, path)
    elif kind.startswith("heads"):  # 3 divides neither 128 (the default) nor 32; 64 only 128
        torch.save(state, path)
        return path.name, f"n_heads = {kind.split('=')[1]}\n"
    elif kind == "pickle_code":
        payload = _Payload()
        payload.marker = str(folder / "pwned")
        state["extra"] = payload
        torch.save(state, path)
    elif kind == "truncated":
        torch.save(state, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path.name, ""


@pytest.mark.parametrize("kind,needle", [("unknown_layout", "matches no reference layout"),
                                         ("heads=3", "must divide d_model (32, read from"),
                                         ("heads=64", "must divide d_model (32, read from"),
                                         ("pickle_code", "bad.pt"),
                                         ("truncated", "bad.pt")])
def test_bad_inputs_are_one_error_line_and_leave_nothing(tmp_path, capsys, kind, needle):
    pt, extra = _bad_pt(kind, tmp_path)
    cfg = _toml(tmp_path, pt, extra)
    before = set(tmp_path.iterdir())
    assert main(["build", "--config", str(cfg), "--out", str(tmp_path / "o")]) != 0
    assert needle in _error_line(capsys)
    assert set(tmp_path.iterdir()) == before  # no output, staging, failed build or lock
    assert not (tmp_path / "pwned").exists()  # the pickled code never ran
