"""`generate` and the generation parity suite on a build of a config no other test uses.

The oracle is a greedy loop written here over the *full* graph (model.onnx) in ONNX Runtime:
re-run the whole prefix, take the argmax of the last position, stop at EOS. It shares no code
with the cached loop, the split graphs or hmu_export.generate.generator.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from hmu_export.commands.cli import main
from hmu_export.core.config import config_from_dict
from hmu_export.model.checkpoint import load_build_source

UNSEEN = {  # head_dim 16 (not 32), 2 decoder layers, odd vocabulary
    "model": {"name": "gen-unseen", "vocab_size": 37, "d_model": 48, "n_heads": 3,
              "n_encoder_layers": 1, "n_decoder_layers": 2, "d_ff": 80, "latent_dim": 8,
              "max_len": 24, "seed": 11, "init_scale": 2.0},
    "profile": {"batch": [1, 2, 3], "src_len": [1, 6, 12], "tgt_len": [1, 5, 10]},
    "generation": {"bos_id": 1, "eos_id": 2, "max_new_tokens": 9},
}
FP32_BACKENDS = ["torch-nocache", "torch", "onnxruntime", "onnxruntime-opt"]


@pytest.fixture(scope="module")
def unseen_build(tmp_path_factory):
    from hmu_export.build.pipeline import run_build

    out = tmp_path_factory.mktemp("unseen") / "gen-unseen"
    outcome = run_build(config_from_dict(UNSEEN), out,
                        only=["checkpoint", "export", "optimize", "fp16"])
    assert outcome.ok, outcome.failure
    return outcome.out_dir


def full_graph_greedy(model_path, rows, *, bos=1, eos=2, max_new=9):
    """Independent oracle: the teacher-forced graph re-run over the whole prefix per token."""
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    latent = sess.get_inputs()[3].shape[2]
    out = []
    for row in rows:  # one row at a time: no padding question at all for the oracle
        src = np.asarray([row], dtype=np.int64)
        feeds = {"src_ids": src, "src_mask": np.ones_like(src),
                 "noise": np.zeros((1, len(row), latent), dtype=np.float32)}
        prefix, gen = [bos], []
        for _ in range(max_new):
            logits = sess.run(["logits"], dict(feeds, tgt_ids=np.asarray([prefix])))[0]
            tok = int(logits[0, -1].argmax())
            gen.append(tok)
            if tok == eos:
                break
            prefix.append(tok)
        out.append(gen)
    return out


RAGGED = [[5, 17, 9, 30, 4, 8, 21, 6, 11, 3, 33, 12], [4, 4], [7, 36, 12, 25, 3]]


@pytest.mark.parametrize("backend", FP32_BACKENDS)
def test_generate_equals_a_greedy_loop_over_the_full_graph(unseen_build, backend, tmp_path):
    src = tmp_path / "in.json"
    src.write_text(json.dumps({"src_ids": RAGGED}))
    out = tmp_path / "out.json"
    assert main(["generate", "--artifacts", str(unseen_build), "--input", str(src),
                 "--backend", backend, "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    want = full_graph_greedy(unseen_build / "model.onnx", RAGGED)
    assert got["backend"] == backend
    assert got["sequences"] == want
    assert got["steps"] >= max(len(s) for s in want) and got["tokens_per_s"] > 0
    assert all(2 not in s[:-1] for s in got["sequences"])  # nothing after EOS


def test_eos_rows_stop_and_keep_their_eos(unseen_build):
    """With EOS set to a token the model does produce, that row ends there; others go on."""
    from hmu_export.generate.generator import Generator

    gen = Generator.from_build(unseen_build, "onnxruntime")
    free = gen.generate(RAGGED, eos_id=0)  # 0 = pad: a rare output
    first = free.sequences[0][2]
    stop = gen.generate(RAGGED, eos_id=first)
    for row, seq in zip(free.sequences, stop.sequences):
        if first in row:
            assert seq == row[:row.index(first) + 1]
        else:
            assert seq == row
    assert full_graph_greedy(unseen_build / "model.onnx", RAGGED, eos=first) == stop.sequences


@pytest.mark.parametrize("payload, args, message", [
    ({"src_ids": [[5, 99]]}, [], "outside [0, 37)"),
    ({"src_ids": [[5], []]}, [], "row 1 is empty"),
    ({"src_ids": [[-3]]}, [], "outside [0, 37)"),
    ({"src_ids": [list(range(3, 16))]}, [], "source length 13 is outside the profile"),
    ({"src_ids": [[3]] * 4}, [], "batch of 4 rows is outside the profile"),
    ({"src_ids": [[3]]}, ["--max-new-tokens", "11"], "max_new_tokens must be in [1, 10]"),
    ({"src_ids": [[3.5]]}, [], "non-integer"),
    ({"ids": [[3]]}, [], "src_ids"),
    ({"src_ids": [[3]]}, ["--strategy", "beam", "--num-beams", "4"], "exceeds the profile"),
    ({"src_ids": [[3]]}, ["--top-p", "0"], "top_p"),
])
def test_bad_input_is_one_error_line(unseen_build, tmp_path, capsys, payload, args, message):
    src = tmp_path / "in.json"
    src.write_text(json.dumps(payload))
    assert main(["generate", "--artifacts", str(unseen_build), "--input", str(src)] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_generation_parity_passes_and_names_its_reference(unseen_build):
    from hmu_export.core.build_folder import open_build
    from hmu_export.verify.generation_parity import run_generation_parity

    build = open_build(unseen_build)
    report = run_generation_parity(unseen_build, build.cfg, lambda: load_build_source(build))
    assert report.passed, report.failures()
    assert report.reference == "torch-nocache"
    cases = {(r.variant, tuple(r.chunks)) for r in report.steps}
    assert ("", (1,)) in cases and ("opt", (1,)) in cases  # past 0, new 1
    assert any(len(r.chunks) == 10 for r in report.steps)  # past up to the profile's max
    fp32 = {r.backend for r in report.tokens if r.precision == "fp32"}
    assert fp32 == {"torch", "onnxruntime", "onnxruntime-opt"}
    assert all(r.exact for r in report.tokens if r.precision == "fp32")
    assert {r.batch for r in report.tokens} == {1, 3}
    fp16 = [r for r in report.tokens if r.precision == "fp16"]
    assert fp16 and all(0.0 <= r.agreement <= 1.0 for r in fp16)


def test_step_parity_catches_a_decoder_from_another_model(unseen_build, tmp_path):
    """The check can fail: a decoder graph exported from other weights is caught."""
    import dataclasses

    from hmu_export.core.layout import BuildLayout
    from hmu_export.export.onnx_export import export_graph
    from hmu_export.model import sources
    from hmu_export.verify.generation_parity import run_step_parity

    cfg = config_from_dict(UNSEEN)
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, seed=12))
    folder = tmp_path / "mixed"
    shutil.copytree(unseen_build, folder)
    export_graph(sources.load(other.model), "decoder", other, folder / "decoder.onnx")
    rows = run_step_parity(BuildLayout(folder), cfg)
    assert not any(r.passed for r in rows)
    assert min(r.max_abs for r in rows) > 1e-2


def test_bench_generate_writes_the_issue_rows(unseen_build, tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--artifacts", str(unseen_build), "--generate", "--quick",
                 "--batches", "1,3", "--src-len", "6", "--new-tokens", "5", "--out",
                 str(out)]) == 0
    data = json.loads((out / "generate.json").read_text())
    rows = data["results"]
    assert {(r["backend"], r["batch"]) for r in rows} == {
        (b, n) for b in ("torch", "torch-nocache", "onnxruntime", "onnxruntime-opt")
        for n in (1, 3)}
    for r in rows:
        assert set(r) >= {"backend", "batch", "src_len", "new_tokens", "ttft_ms",
                          "per_token_p50_ms", "per_token_p99_ms", "tokens_per_s"}
        assert r["new_tokens"] == 5 and r["src_len"] == 6
        assert 0 < r["per_token_p50_ms"] <= r["per_token_p99_ms"] and r["tokens_per_s"] > 0
    assert (out / "generate.md").read_text().count("| torch ") == 2
    assert (out / "generate.png").stat().st_size > 1000
    # the build's files are untouched and bench's outputs are listed in its manifest
    assert main(["info", "--artifacts", str(unseen_build)]) == 0


def test_bench_generate_with_beams(unseen_build, tmp_path, capsys):
    """--beams: every backend runs beam search (the bench refuses a run whose rows do not all
    make exactly --new-tokens); a batch whose rows x beams exceed the profile is one line."""
    out = tmp_path / "bench"
    assert main(["bench", "--artifacts", str(unseen_build), "--generate", "--quick",
                 "--backends", "torch,onnxruntime", "--batches", "1", "--src-len", "6",
                 "--new-tokens", "4", "--beams", "3", "--out", str(out)]) == 0
    data = json.loads((out / "generate.json").read_text())
    assert data["settings"]["strategy"] == "beam" and data["settings"]["num_beams"] == 3
    assert {r["backend"] for r in data["results"]} == {"torch", "onnxruntime"}
    assert all(r["new_tokens"] == 4 and r["tokens_per_s"] > 0 for r in data["results"])
    assert "Beam search (3 beams)" in (out / "generate.md").read_text()
    # 2 rows x 3 beams = 6 > the profile's batch max 3: one line, exit 2
    assert main(["bench", "--artifacts", str(unseen_build), "--generate", "--batches", "2",
                 "--src-len", "6", "--new-tokens", "4", "--beams", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 rows x 3 beams" in err[0], err


@pytest.mark.parametrize("where", ["generator", "shipped"])
def test_top_candidates_equals_a_stable_full_sort(where):
    """Beam search's partial sort (the Generator's, with torch.topk on large rows, and the
    Triton model's numpy one): the same columns, in the same order, as the stable full sort it
    replaced, ties and -inf included."""
    if where == "generator":
        from hmu_export.generate.generator import top_candidates
    else:
        from hmu_export.shipped.generate_model import top_candidates

    rng = np.random.default_rng(3)
    for _ in range(200):
        rows, n, m = (int(x) for x in (rng.integers(1, 5), rng.integers(1, 50),
                                       rng.integers(1, 10)))
        cand = rng.integers(-4, 4, size=(rows, n)).astype(float)  # many ties
        cand[rng.random((rows, n)) < 0.25] = -np.inf
        want = np.argsort(-cand, axis=-1, kind="stable")[:, :m]
        np.testing.assert_array_equal(top_candidates(cand, m), want)
    for _ in range(5):  # rows large enough for the torch.topk path, ties at the cut
        cand = rng.integers(-40, 40, size=(3, 70_000)).astype(float)
        cand[rng.random(cand.shape) < 0.3] = -np.inf
        want = np.argsort(-cand, axis=-1, kind="stable")[:, :8]
        np.testing.assert_array_equal(top_candidates(cand, 8), want)


def test_bench_generate_refuses_shapes_outside_the_profile(unseen_build, capsys):
    assert main(["bench", "--artifacts", str(unseen_build), "--generate", "--batches", "9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "batch 9 is outside" in err[0]


def test_device_stepper_keeps_state_on_the_device_and_matches(unseen_build):
    """torch-cuda's stepper (state as device tensors, index_select for finished rows and beams),
    run on the CPU here: same greedy and beam tokens as the numpy-state torch backend."""
    import torch

    from hmu_export.backends.pytorch import TorchDeviceStepper
    from hmu_export.core.build_folder import open_build
    from hmu_export.generate.generator import Generator

    build = open_build(unseen_build)
    dev = Generator(TorchDeviceStepper(load_build_source(build), "cpu", torch.float32, "torch-dev"),
                    build.cfg)
    ref = Generator.from_build(unseen_build, "torch-nocache")
    assert dev.generate(RAGGED).sequences == ref.generate(RAGGED).sequences
    two = RAGGED[:1]
    assert (dev.generate(two, strategy="beam", num_beams=3).sequences
            == Generator.from_build(unseen_build, "torch").generate(
                two, strategy="beam", num_beams=3).sequences)


def test_cuda_backends_refuse_cleanly_without_cuda(unseen_build, tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the refusal is for CPU-only hosts")
    src = tmp_path / "in.json"
    src.write_text(json.dumps({"src_ids": [[3, 4]]}))
    assert main(["generate", "--artifacts", str(unseen_build), "--input", str(src),
                 "--backend", "torch-cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0]


def test_graphs_exported_in_worker_processes_equal_an_in_process_export(unseen_build, tmp_path):
    """The build exports the split graphs in spawned processes that reload the checkpoint; the
    bytes must be those of an export in this process from the original model."""
    import dataclasses

    from hmu_export.export.onnx_export import export_graph
    from hmu_export.model import sources
    from hmu_export.build.stages.export import export_workers

    cfg = config_from_dict(UNSEEN)
    assert export_workers(cfg, 3) >= 1 or __import__("os").cpu_count() == 1
    assert export_workers(dataclasses.replace(
        cfg, export=dataclasses.replace(cfg.export, workers=1)), 3) == 1
    manifest = json.loads((unseen_build / "manifest.json").read_text())
    res = export_graph(sources.load(cfg.model), "decoder", cfg, tmp_path / "decoder.onnx",
                       checkpoint_sha256=manifest["checkpoint_sha256"])
    assert res.sha256 == manifest["graphs"]["decoder"]["sha256"]


def test_a_select_inside_source_groups_copies_no_source_state(unseen_build):
    """Beams reordered inside their source's group keep the source-only state (mask, cross
    K/V) as it is, uncopied; the step then computes what a fresh start on those rows does."""
    from hmu_export.generate.generator import Generator
    from hmu_export.generate.stepper import CachedStepper

    gen = Generator.from_build(unseen_build, "onnxruntime")
    st = gen.stepper
    assert isinstance(st, CachedStepper)
    ids = np.array([[5, 6, 7, 8], [9, 10, 11, 0]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=np.int64)
    noise = np.zeros((2, 4, st.latent_dim), dtype=np.float32)
    st.start(ids, mask, noise)
    st.select(np.array([0, 0, 1, 1]))  # beams: rows change source -> copied
    cross = {k: v for k, v in st._state.items() if k.startswith("cross")}
    st.select(np.array([1, 0, 3, 2]))  # reordered inside the groups -> kept
    assert all(st._state[k] is v for k, v in cross.items())
    got = st.step(np.array([[1], [1], [1], [1]], dtype=np.int64))
    fresh = Generator.from_build(unseen_build, "onnxruntime").stepper
    rows = [0, 0, 1, 1]
    fresh.start(ids[rows], mask[rows], noise[rows])
    want = fresh.step(np.array([[1], [1], [1], [1]], dtype=np.int64))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    st.select(np.array([2, 3]))  # a group leaves -> taken again
    assert all(st._state[k].shape[0] == 2 for k in cross)
