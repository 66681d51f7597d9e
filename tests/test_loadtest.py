"""`loadtest` on the tiny build: a few requests at one rate per mode, against the real
tritonserver. Checks the report's fields and their consistency, not speed (speed is in
benchmarks/): every request is accounted for, the quantiles are ordered, TTFT never exceeds the
end-to-end latency, throughput is what the counts and the wall time say, and the tokens
generated are exactly those the single-request Generator makes for the same requests."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hmu_export.commands.cli import main
from hmu_export.bench import loadtest as L

pytest.importorskip("tritonclient.grpc")


@pytest.fixture(scope="module")
def repo(gen_build, tmp_path_factory) -> Path:
    from hmu_export.deploy.triton.config import TritonOptions
    from hmu_export.deploy.triton.repository import repository_from_artifacts

    out = tmp_path_factory.mktemp("loadrepo") / "repo"
    return repository_from_artifacts(gen_build, out, TritonOptions()).root


def test_loadtest_report_is_complete_and_consistent(repo, gen_build, tmp_path):
    from hmu_export.generate.generator import Generator

    settings = L.LoadSettings(rates=(40.0,), max_requests=10, warmup=2, seed=3,
                              new_tokens=(2, 8), sample_share=0.5)
    report = L.run_loadtest(repo, settings, log=lambda line: None)
    assert report["model"] == "hmu-tiny_generate_stream"
    assert set(report["modes"]) == {"static", "inflight"}
    ref = Generator.from_build(gen_build, backend="onnxruntime")
    spec = report["spec"]
    low = report["low_rate"]
    assert 0 < low == pytest.approx(0.7 * report["saturation"]["static"]["requests_per_s"],
                                    abs=1e-3)
    expected = {}
    for index, rate in enumerate((40.0, low)):  # the Generator's tokens for the same requests
        reqs = L.rate_requests(spec, settings, rate, index)
        assert len({r.max_new_tokens for r in reqs}) > 1 and len({len(r.src_ids) for r in reqs}) > 1
        assert any(r.params.get("strategy") == "sample" for r in reqs)
        expected[index] = sum(len(ref.generate([list(r.src_ids)], max_new_tokens=r.max_new_tokens,
                                               **r.params).sequences[0]) for r in reqs)
    for mode, data in report["modes"].items():
        rows = data["rates"]
        assert [r["offered_rate"] for r in rows] == [40.0, low] and rows[1]["low_rate"]
        for index, r in enumerate(rows):
            assert r["sent"] == 10 and r["completed"] == 10 and r["errors"] == 0, (mode, r)
            assert r["completed"] + r["errors"] + r["unanswered"] == r["sent"] and r["drained"]
            assert r["tokens"] == expected[index], (mode, index)
            assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["wall_s"], rel=0.01)
            assert r["requests_per_s"] == pytest.approx(r["completed"] / r["wall_s"], rel=0.01)
            assert r["arrival_s"] <= r["wall_s"]
            for key in ("ttft_ms", "e2e_ms"):
                q = r[key]
                assert 0 < q["p50"] <= q["p95"] <= q["p99"], (key, q)
            assert r["ttft_ms"]["p99"] <= r["e2e_ms"]["p99"]
            assert r["rss_mb"] > 50  # the server and its stub: more than an empty process
        assert data["requests_total"] == 20 and data["rss_start_mb"] > 50
    verdicts = {t["target"].split(":")[0]: t for t in report["targets"]}
    assert len(report["targets"]) == 4
    for name in ("static", "inflight"):  # 20 requests: the RSS target is not judged
        assert verdicts[name]["met"] is None and "not judged" in verdicts[name]["detail"]
    for t in report["targets"]:
        assert t["met"] in (True, False, None) and t["value"] is not None
    paths = L.write_report(report, tmp_path / "lt")
    assert [p.suffix for p in paths] == [".json", ".md", ".png"]
    assert json.loads(paths[0].read_text()) == json.loads(json.dumps(report))
    md = paths[1].read_text()
    assert "## static" in md and "## inflight" in md and "70% of static sat." in md
    assert paths[2].read_bytes()[:4] == b"\x89PNG"


def test_loadtest_command_mistakes_are_one_error_line(tmp_path, capsys, repo):
    for argv, words in (
            (["--repository", str(tmp_path / "none")], "is not a folder"),
            (["--repository", str(tmp_path)], "no streaming generation model"),
            (["--repository", str(repo), "--rates", "fast"], "--rates must be"),
            (["--repository", str(repo), "--rates", "0"], "rates must be positive"),
            (["--repository", str(repo), "--modes", "dynamic"], "modes must be among"),
            (["--repository", str(repo), "--model", "other"], "no streaming generation model"),
            (["--repository", str(repo), "--new-tokens", "4"], "--new-tokens must be")):
        assert main(["loadtest", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], (argv, err)


def test_task_sources_are_the_task_inputs_through_the_model_tokenizer(tmp_path):
    """--task: requests carry the task set's sources, tokenized as `generate --text` does."""
    import shutil

    import numpy as np

    from hmu_export import demo
    from hmu_export.core.errors import InputError
    from hmu_export.model.tokenizer import Tokenizer, load_hf_tokenizer

    if not demo.CHECKPOINT.is_file():
        pytest.skip("the trained demo model is not in this checkout")
    folder = tmp_path / "m_generate_stream"
    (folder / "1").mkdir(parents=True)
    params = {"vocab_size": "512", "src_len_min": "1", "src_len_max": "9",
              "max_new_tokens_max": "24", "batch_max": "8"}
    model = L.StreamModel(folder.name, folder, params)
    task = tmp_path / "t.jsonl"
    task.write_text('{"source": "7", "target": "siete"}\n'
                    '{"source": "123456789", "target": "x"}\n', encoding="utf-8")
    with pytest.raises(InputError, match="carries a tokenizer"):
        L.task_sources(model, str(task))
    shutil.copytree(demo.MODEL_DIR, folder / "1" / "tokenizer",
                    ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    # every source encodes to 10 ids (9 digits + EOS): none fits src_len 1..9
    with pytest.raises(InputError, match="no source"):
        L.task_sources(model, str(task))
    model.params["src_len_max"] = "16"
    sources = L.task_sources(model, str(task))
    tok = Tokenizer(load_hf_tokenizer(demo.MODEL_DIR))
    assert sources == [tuple(r) for r in tok.encode(["7", "123456789"])]
    reqs = L.plan_requests(model.spec, 50, np.random.default_rng(0), L.LoadSettings(), sources)
    assert {r.src_ids for r in reqs} == set(sources)
    assert {r.max_new_tokens for r in reqs} == {24}  # the model's EOS ends each answer
