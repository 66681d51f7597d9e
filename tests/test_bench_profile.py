"""`bench --profile`: ONNX Runtime's profiler aggregated per op type and per model part."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from hmu_export.bench.profile import node_parts, summarize
from hmu_export.commands.cli import main
from test_bench import small_build  # noqa: F401  (the module-scoped small build fixture)


@pytest.fixture(scope="module")
def profile_report(small_build, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("profile_out")
    rc = main(["bench", "--artifacts", str(small_build.root), "--profile", "--shapes",
               "1x8x4,2x16x8", "--profile-runs", "3", "--out", str(out)])
    assert rc == 0
    return out, json.loads((out / "profile.json").read_text())


def test_profile_fields_and_shares(profile_report):
    out, data = profile_report
    profiles = data["profiles"]
    assert [(p["graph"], p["shape"]) for p in profiles] == [
        ("model.onnx", [1, 8, 4]), ("model.opt.onnx", [1, 8, 4]),
        ("model.onnx", [2, 16, 8]), ("model.opt.onnx", [2, 16, 8])]
    for p in profiles:
        assert p["runs"] == 3 and p["threads"] >= 1
        assert p["kernel_ms"] > 0 and p["run_ms"] > 0 and p["overhead_ms"] >= 0
        for table in ("by_op", "by_part"):
            assert sum(r["share_pct"] for r in p[table]) == pytest.approx(100.0, abs=1e-6)
            assert sum(r["ms"] for r in p[table]) == pytest.approx(p["kernel_ms"], rel=1e-9)
            assert all({"key", "calls", "ms", "share_pct"} <= set(r) for r in p[table])
        # every node of the graph ORT ran is one kernel call per run
        nodes = sum(sum(ops.values()) for ops in p["ops_by_part"].values())
        assert sum(r["calls"] for r in p["by_op"]) == nodes
        assert {"hmu", "encoder", "decoder", "lm_head"} <= {r["key"] for r in p["by_part"]}
        assert all({"op", "part"} <= set(r) for r in p["by_node"])
    assert "## model.opt.onnx at 2x16x8" in (out / "profile.md").read_text()


def test_profile_shows_the_fusions(profile_report):
    """The optimized graph runs fused attention, BiasGelu inside the HMU and no
    SkipLayerNormalization (the forward sessions leave it out); model.onnx runs neither."""
    _, data = profile_report
    plain, opt = data["profiles"][2], data["profiles"][3]
    opt_ops = {r["key"] for r in opt["by_op"]}
    assert {"Attention", "MultiHeadAttention"} <= opt_ops
    assert "SkipLayerNormalization" not in opt_ops
    assert opt["ops_by_part"]["hmu"].get("BiasGelu") == 1 and "Erf" not in opt["ops_by_part"]["hmu"]
    assert "Attention" not in {r["key"] for r in plain["by_op"]}
    assert "Erf" in plain["ops_by_part"]["hmu"]


def test_profile_needs_shapes(small_build, capsys):  # noqa: F811
    assert main(["bench", "--artifacts", str(small_build.root), "--profile"]) != 0
    assert "--shapes" in capsys.readouterr().err


def test_node_parts_by_path_weights_and_producer():
    """Parts from the node's module path, else the weights it reads, else its first input's
    producer; fused-attention nodes count for the module they replaced."""
    w = numpy_helper.from_array(np.ones(4, np.float32), "decoder.layers.0.norm1.weight")
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="hmu/vae/Relu"),
        helper.make_node("Relu", ["a"], ["b"], name="hmu_opt/encoder/layers/0/self_attn/X"),
        helper.make_node("Relu", ["b"], ["c"], name="Fused_token_3"),
        helper.make_node("Add", ["c", "decoder.layers.0.norm1.weight"], ["d"], name="Add_9"),
        helper.make_node("Relu", ["x"], ["e"], name="_empty_hook/Relu"),
        helper.make_node("Relu", ["x"], ["f"], name="Relu_root"),
        helper.make_node("Relu", ["x"], ["g"], name="enc/hmu/Relu"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [4])],
                              [helper.make_tensor_value_info(n, 1, [4]) for n in "defg"], [w])
    parts = node_parts(helper.make_model(graph))
    assert parts == {"hmu/vae/Relu": "hmu", "hmu_opt/encoder/layers/0/self_attn/X": "encoder",
                     "Fused_token_3": "encoder", "Add_9": "decoder", "_empty_hook/Relu": "other",
                     "Relu_root": "other", "enc/hmu/Relu": "enc"}
    assert node_parts(helper.make_model(graph), hmu_scope="enc.hmu")["enc/hmu/Relu"] == "hmu"


def test_summarize_skips_warmup_runs():
    """Kernel events before the first timed run are warm-up; per-run figures divide by runs."""
    def run(ts, dur):
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}

    def kernel(name, op, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur,
                "args": {"op_name": op}}

    events = [run(0, 100), kernel("a", "MatMul", 1, 90),  # warm-up: ignored
              run(200, 50), kernel("a", "MatMul", 201, 30), kernel("b", "Add", 240, 10),
              run(300, 70), kernel("a", "MatMul", 301, 50), kernel("b", "Add", 360, 10),
              {"cat": "Node", "name": "a_fence_before", "ts": 302, "dur": 5}]
    totals, calls, run_us, n = summarize(events, {"a": "hmu", "b": "decoder"}, {}, warmup=1)
    assert n == 2 and run_us == [50.0, 70.0]
    assert totals["op"] == {"MatMul": 80.0, "Add": 20.0}
    assert totals["part"] == {"hmu": 80.0, "decoder": 20.0}
    assert calls["node"] == {"a": 2, "b": 2}
    with pytest.raises(ValueError, match="none after"):
        summarize(events, {}, {}, warmup=3)


def test_profile_graph_on_a_tiny_graph(tmp_path):
    """profile_graph on a two-node graph: both nodes, shares adding up to 100%."""
    from hmu_export.bench.profile import profile_graph

    w = numpy_helper.from_array(np.eye(8, dtype=np.float32), "hmu.lin.weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "hmu.lin.weight"], ["y"], name="hmu/lin/MatMul"),
         helper.make_node("Relu", ["y"], ["z"], name="decoder/Relu")], "g",
        [helper.make_tensor_value_info("x", 1, [4, 8])],
        [helper.make_tensor_value_info("z", 1, [4, 8])], [w])
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    p = profile_graph(path, {"x": np.ones((4, 8), np.float32)}, runs=4, warmup=1)
    assert p.runs == 4
    assert {r["key"]: r["calls"] for r in p.by_part} == {"hmu": 1, "decoder": 1}
    assert sum(r["share_pct"] for r in p.by_op) == pytest.approx(100.0)
    assert p.share("part", "hmu") + p.share("part", "decoder") == pytest.approx(100.0)
