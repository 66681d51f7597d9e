"""A Hugging Face T5 with an HMU, built through the whole pipeline: every graph exported and
checked, generation from the build equal to Transformers' own `generate` with the HMU applied."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import test_hf_source as HF  # noqa: E402  (its tiny-model builders and Transformers oracle)

from hmu_export.commands.cli import main  # noqa: E402
from hmu_export.model.checkpoint import load_build_source


@pytest.fixture(scope="module")
def t5_build(hf_t5_build):
    return hf_t5_build  # conftest.py: shared with tests/test_bench_peers.py


def test_manifest_says_the_hmu_is_untrained_and_lists_every_graph(t5_build):
    _, out = t5_build
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["hmu_status"].startswith("untrained")
    paths = {a["path"] for a in manifest["artifacts"]}
    assert {"model.onnx", "encoder.onnx", "decoder.onnx", "checkpoint/hf/config.json",
            "parity/generation.json"} <= paths
    gen = json.loads((out / "parity" / "generation.json").read_text())
    assert gen["passed"] and all(r["exact"] for r in gen["tokens"] if r["precision"] == "fp32")
    assert manifest["config"]["generation"]["bos_id"] == 0  # T5's decoder_start_token_id


def test_fp16_graphs_of_a_t5_load_and_are_judged(t5_build):
    """Transformers' bool -> float mask casts once made the converted graph unloadable."""
    _, out = t5_build
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["fp16"]["status"] == "ok", manifest["stages"]["fp16"]
    report = json.loads((out / "parity" / "report.json").read_text())
    rows = [r for r in report["results"] if r["backend"] == "onnxruntime-fp16emu"]
    assert rows and all(r["passed"] for r in rows)
    gen = json.loads((out / "parity" / "generation.json").read_text())
    fp16 = [r for r in gen["tokens"] if r["backend"] == "onnxruntime-fp16emu"]
    assert fp16 and all(0 <= r["agreement"] <= 1 for r in fp16)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "onnxruntime-opt"])
def test_generate_from_the_build_equals_transformers_generate(t5_build, backend, tmp_path):
    from hmu_export.model import hf as H

    root, out = t5_build
    src = H.load_source(H.resolve_config(HF.ModelConfig(source="hf", path=str(root / "t5"))))
    x = HF._batch(src, b=3, ls=7, lt=2, noise_scale=0.0)  # zero noise = the generate default
    rows = [r[:int(m.sum())] for r, m in zip(x["src_ids"].tolist(), x["src_mask"])]
    want = HF._hf_greedy(src, x, max_new=8)
    inp = tmp_path / "in.json"
    inp.write_text(json.dumps({"src_ids": rows}))
    res = tmp_path / "out.json"
    assert main(["generate", "--artifacts", str(out), "--input", str(inp), "--backend", backend,
                 "--max-new-tokens", "8", "--json", str(res)]) == 0
    assert json.loads(res.read_text())["sequences"] == want
    assert len({t for s in want for t in s}) > 1  # not one repeated token


def test_a_rebuilt_source_equals_the_original(t5_build):
    from hmu_export.core.build_folder import open_build

    root, out = t5_build
    rebuilt = load_build_source(open_build(out))
    from hmu_export.model import hf as H
    orig = H.load_source(H.resolve_config(HF.ModelConfig(source="hf", path=str(root / "t5"))))
    x = HF._batch(orig, b=2)
    args = [x[k] for k in ("src_ids", "src_mask", "tgt_ids", "noise")]
    with torch.no_grad():
        a = orig.module("full")(*args)[0]
        b = rebuilt.module("full")(*args)[0]
    assert torch.equal(a, b)


def test_bench_runs_an_hf_build(t5_build, tmp_path):
    """The source's own module is the torch baseline; rows at the asked B x Ls x Lt; the
    native-only HMU overhead is listed as not measured."""
    _, out = t5_build
    assert main(["bench", "--artifacts", str(out), "--quick", "--shapes", "3x12x8",
                 "--backends", "torch,onnxruntime,onnxruntime-opt", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert {(r["backend"], tuple(r["shape"])) for r in data["results"]} == {
        ("torch", (3, 12, 8)), ("onnxruntime", (3, 12, 8)), ("onnxruntime-opt", (3, 12, 8))}
    assert all(r["tokens_per_s"] == pytest.approx(r["seq_per_s"] * 20) for r in data["results"])
    assert [p["part"] for p in data["skipped_parts"]] == ["hmu_overhead"]
    assert data["model"]["graph"] == "hmu_full" and data["model"]["hmu_parameters"] > 0
