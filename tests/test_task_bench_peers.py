"""`bench --task` with the peers on the trained T5 twin (issue 17's third benchmark table):
Transformers with the build's HMU applied must solve exactly what our FP32 graphs solve (the
same function, computed by an independent implementation); the HMU-off and int8 peer rows are
the base model's. Optimum and CTranslate2 rows run where they are installed (the peers venv)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from hmu_export.commands.cli import main  # noqa: E402

TWIN = Path(__file__).resolve().parents[1] / "examples" / "t5-numbers-es" / "build.toml"
LIMIT = 40


@pytest.fixture(scope="module")
def twin_build(tmp_path_factory):
    from dataclasses import replace

    from hmu_export.build.pipeline import run_build
    from hmu_export.core.config import load_config

    if not (TWIN.parent / "model.safetensors").is_file():
        pytest.skip("the T5 twin is not in this checkout")
    cfg = load_config(TWIN)
    cfg = replace(cfg, task=replace(cfg.task, limit=LIMIT, noise_limit=0)).validate()
    out = tmp_path_factory.mktemp("twin") / "t5-numbers-es"
    outcome = run_build(cfg, out, only=["checkpoint", "export"])
    assert outcome.ok, outcome.failure
    return outcome.out_dir


def test_transformers_with_the_hmu_solves_what_our_fp32_graphs_solve(twin_build, tmp_path):
    dest = tmp_path / "bench"
    assert main(["bench", "--artifacts", str(twin_build), "--task", "--task-limit",
                 str(LIMIT), "--backends", "onnxruntime", "--peers", "transformers",
                 "--batches", "8", "--out", str(dest)]) == 0
    data = json.loads((dest / "task_bench.json").read_text())
    rows = {r["backend"]: r for r in data["rows"]}
    assert set(rows) == {"onnxruntime", "transformers", "transformers-hmu-off"}
    assert rows["transformers"]["hmu"] == "applied" and rows["transformers"]["peer"]
    assert rows["transformers-hmu-off"]["hmu"] == "off"
    assert rows["transformers"]["correct"] == rows["onnxruntime"]["correct"]
    assert rows["onnxruntime"]["correct"] >= 0.9 * LIMIT  # a trained model, not noise
    for r in rows.values():
        assert LIMIT <= r["tokens"] <= LIMIT * data["settings"]["max_new_tokens"]


@pytest.mark.parametrize("peer,module,names", [
    ("optimum", "optimum.onnxruntime", {"optimum", "optimum-int8"}),
    ("ctranslate2", "ctranslate2", {"ctranslate2-fp32", "ctranslate2-int8"})])
def test_installed_peers_answer_the_task(twin_build, tmp_path, peer, module, names):
    """The base model's answers through each installed peer: close to Transformers' own
    (the base model without the HMU), FP32 exactly equal."""
    pytest.importorskip(module)
    dest = tmp_path / "bench"
    assert main(["bench", "--artifacts", str(twin_build), "--task", "--task-limit",
                 str(LIMIT), "--backends", "onnxruntime", "--peers", f"transformers,{peer}",
                 "--batches", "8", "--out", str(dest)]) == 0
    rows = {r["backend"]: r for r in json.loads((dest / "task_bench.json").read_text())["rows"]}
    assert names <= set(rows), rows.keys()
    base = rows["transformers-hmu-off"]["correct"]
    fp32 = next(n for n in names if not n.endswith("int8"))
    assert rows[fp32]["correct"] == base
    int8 = next(n for n in names if n.endswith("int8"))
    assert abs(rows[int8]["correct"] - base) <= 2
