"""`bench --generate` peers on an hf build: Transformers' generate timed beside our backends on
the same sources, Optimum / CTranslate2 reported as skipped (with the reason) where they are
not importable, and our onnxruntime-opt over each peer. No timing assertions: the figures are
checked for shape and arithmetic, the tokens for count and content."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

pytest.importorskip("transformers")

from hmu_export.commands.cli import main  # noqa: E402
from hmu_export.model.checkpoint import load_build_source

ROW_KEYS = {"backend", "batch", "src_len", "new_tokens", "ttft_ms", "per_token_p50_ms",
            "per_token_p99_ms", "tokens_per_s", "runs"}


def _block(monkeypatch, *modules: str) -> None:
    """Make ``import m`` raise ImportError for each module (as when it is not installed)."""
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


@pytest.fixture(scope="module")
def peer_report(hf_t5_build, tmp_path_factory):
    """One CLI run: our onnxruntime-opt and every peer, optimum and ctranslate2 unimportable."""
    _, out = hf_t5_build
    dest = tmp_path_factory.mktemp("peer_bench")
    mp = pytest.MonkeyPatch()
    try:
        _block(mp, "optimum", "optimum.onnxruntime", "ctranslate2", "ctranslate2.converters")
        assert main(["bench", "--generate", "--artifacts", str(out), "--backends",
                     "onnxruntime,onnxruntime-opt", "--batches", "1,2", "--src-len", "7",
                     "--new-tokens", "6", "--quick", "--out", str(dest)]) == 0
    finally:
        mp.undo()
    return json.loads((dest / "generate.json").read_text()), (dest / "generate.md").read_text()


def test_transformers_rows_have_our_keys_and_the_hmu(peer_report):
    data, md = peer_report
    ours = [r for r in data["results"] if not r.get("peer")]
    peers = [r for r in data["results"] if r.get("peer")]
    assert {r["backend"] for r in ours} == {"onnxruntime", "onnxruntime-opt"}
    assert [(r["backend"], r["batch"]) for r in peers] == [("transformers", 1), ("transformers", 2)]
    for r in peers:
        assert set(r) == ROW_KEYS | {"peer", "hmu"} and set(ours[0]) == ROW_KEYS
        assert r["hmu"] == "applied"  # the build has a (seeded) HMU
        assert (r["src_len"], r["new_tokens"]) == (7, 6)
        assert r["tokens_per_s"] > 0 and r["ttft_ms"] > 0
        assert 0 < r["per_token_p50_ms"] <= r["per_token_p99_ms"]
    assert "transformers (peer, HMU applied)" in md
    assert data["settings"]["peers"] == ["transformers", "optimum", "ctranslate2"]
    import transformers
    assert data["settings"]["peer_versions"]["transformers"] == transformers.__version__


def test_absent_peers_are_skipped_with_a_reason(peer_report):
    data, md = peer_report
    skipped = {s["backend"]: s["reason"] for s in data["skipped"]}
    assert set(skipped) == {"optimum", "ctranslate2-fp32", "ctranslate2-int8"}
    assert "optimum.onnxruntime is not importable" in skipped["optimum"]
    assert "ctranslate2 is not importable" in skipped["ctranslate2-int8"]
    assert all("\n" not in r for r in skipped.values())
    assert "Skipped `optimum`" in md


def test_peer_ratios_in_the_report(peer_report):
    data, md = peer_report
    tps = {(r["backend"], r["batch"]): r["tokens_per_s"] for r in data["results"]}
    got = {(p["peer"], p["batch"]): p for p in data["peer_ratios"]}
    assert set(got) == {("transformers", 1), ("transformers", 2)}
    for b in (1, 2):
        p = got[("transformers", b)]
        want = tps[("onnxruntime-opt", b)] / tps[("transformers", b)]
        assert p["ours"] == "onnxruntime-opt" and p["ratio"] == pytest.approx(want)
        assert p["target"] == 3.0 and p["meets_target"] == (want >= 3.0)
        assert f"| transformers | {b} | {tps[('onnxruntime-opt', b)]:.1f} |" in md


def test_peer_ratio_arithmetic_and_targets():
    from hmu_export.bench.peers import peer_ratios

    def row(backend, batch, tps, peer=True):
        return {"backend": backend, "batch": batch, "tokens_per_s": tps,
                **({"peer": True} if peer else {})}

    rows = [row("onnxruntime-opt", 1, 300.0, peer=False), row("torch", 1, 50.0, peer=False),
            row("transformers", 1, 100.0), row("optimum", 1, 250.0),
            row("ctranslate2-int8", 1, 600.0), row("transformers", 8, 10.0)]  # no ours at 8
    got = {p["peer"]: p for p in peer_ratios(rows)}
    assert set(got) == {"transformers", "optimum", "ctranslate2-int8"}
    assert (got["transformers"]["ratio"], got["transformers"]["meets_target"]) == (3.0, True)
    assert got["optimum"]["ratio"] == pytest.approx(1.2) and got["optimum"]["target"] == 1.5
    assert got["optimum"]["meets_target"] is False
    assert got["ctranslate2-int8"]["ratio"] == 0.5
    assert got["ctranslate2-int8"]["target"] is None
    assert got["ctranslate2-int8"]["meets_target"] is None


def test_int8_and_beam_targets_are_per_pair():
    """issue 17: our int8 over CTranslate2 int8 (>= 1.3 greedy, >= 1.0 with beams) and over
    Transformers (>= 4); the FP32 row keeps issue 10's targets; ratios of each of our rows."""
    from hmu_export.bench.peers import peer_ratios

    def row(backend, tps, peer=True):
        return {"backend": backend, "batch": 1, "tokens_per_s": tps,
                **({"peer": True} if peer else {})}

    rows = [row("onnxruntime-opt", 100.0, peer=False), row("onnxruntime-int8", 130.0, peer=False),
            row("transformers", 40.0), row("ctranslate2-int8", 104.0),
            row("ctranslate2-fp32", 65.0)]
    got = {(p["ours"], p["peer"]): p for p in peer_ratios(rows)}
    assert len(got) == 6
    assert got[("onnxruntime-int8", "ctranslate2-int8")]["ratio"] == pytest.approx(1.25)
    assert got[("onnxruntime-int8", "ctranslate2-int8")]["target"] == 1.3
    assert got[("onnxruntime-int8", "ctranslate2-int8")]["meets_target"] is False
    assert got[("onnxruntime-int8", "transformers")]["ratio"] == pytest.approx(3.25)
    assert got[("onnxruntime-int8", "transformers")]["target"] == 4.0
    assert got[("onnxruntime-opt", "transformers")]["target"] == 3.0
    assert got[("onnxruntime-int8", "ctranslate2-fp32")]["target"] is None
    beam = {(p["ours"], p["peer"]): p for p in peer_ratios(rows, beams=4)}
    assert beam[("onnxruntime-int8", "ctranslate2-int8")]["target"] == 1.0
    assert beam[("onnxruntime-int8", "ctranslate2-int8")]["meets_target"] is True
    assert beam[("onnxruntime-opt", "transformers")]["target"] is None


def test_transformers_peer_beam_search_makes_n_tokens(hf_t5_build, tmp_path):
    """With beams the peer still makes exactly N tokens per row (what makes its figures
    compare with ours), and is timed whole: Transformers streams no beam search."""
    from hmu_export.bench.peers import load_peers, time_peer
    from hmu_export.core.build_folder import open_build

    _, out = hf_t5_build
    build = open_build(out)
    peers, _ = load_peers(load_build_source(build), build.cfg, ["transformers"], tmp_path, 1)
    ids = np.random.default_rng(7).integers(3, build.cfg.model.vocab_size, size=(2, 6))
    runs = time_peer(peers[0], ids, 5, runs=1, warmup=0, beams=2)
    assert not isinstance(runs, str), runs
    assert [len(s) for s in runs[0].sequences] == [5, 5]
    assert runs[0].ttft_s is None


def test_transformers_peer_makes_n_tokens_of_the_same_model(hf_t5_build, tmp_path):
    """Exactly N tokens per row, and they are the build's model's tokens (the HMU applied):
    equal to our loop's up to the first EOS (the peer holds EOS back, our bench ignores it)."""
    from hmu_export.bench.peers import load_peers
    from hmu_export.core.build_folder import open_build
    from hmu_export.generate.generator import Generator

    _, out = hf_t5_build
    build = open_build(out)
    peers, skipped = load_peers(load_build_source(build), build.cfg, ["transformers"], tmp_path, 1)
    assert skipped == [] and [p.name for p in peers] == ["transformers"]
    rng = np.random.default_rng(5)
    ids = rng.integers(3, build.cfg.model.vocab_size, size=(3, 9))
    n = 8
    run = peers[0].generate(ids, np.ones_like(ids), n)
    assert [len(s) for s in run.sequences] == [n] * 3
    assert run.ttft_s is not None and len(run.token_latencies_s) == n - 1
    ours = Generator.from_build(out, "onnxruntime").generate(ids.tolist(), max_new_tokens=n,
                                                             ignore_eos=True).sequences
    eos = build.cfg.generation.eos_id
    for mine, theirs in zip(ours, run.sequences):
        cut = mine.index(eos) if eos in mine else n
        assert theirs[:cut] == mine[:cut]
    assert len({t for s in run.sequences for t in s}) > 3  # not one repeated token


def test_peer_user_errors_are_one_line(hf_t5_build, small_export, capsys):
    _, out = hf_t5_build
    base = ["bench", "--generate", "--batches", "1", "--src-len", "4", "--new-tokens", "2",
            "--runs", "1"]
    cases = [([*base, "--artifacts", str(out), "--peers", "vllm"], "unknown peer(s) vllm"),
             ([*base, "--artifacts", str(out), "--peers", "transformers", "--no-peers"],
              "--peers and --no-peers"),
             ([*base, "--artifacts", str(small_export.root), "--peers", "transformers"],
              "need a build whose [model] source is hf")]
    for argv, text in cases:
        assert main(argv) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and text in err[0], err


@pytest.mark.parametrize("peer,module", [("optimum", "optimum.onnxruntime"),
                                         ("ctranslate2", "ctranslate2")])
def test_installed_peer_makes_n_tokens(hf_t5_build, tmp_path, peer, module):
    """Runs where the peer is installed (the peers venv of docs/huggingface.md)."""
    pytest.importorskip(module)
    from hmu_export.bench.peers import load_peers, time_peer
    from hmu_export.core.build_folder import open_build

    _, out = hf_t5_build
    build = open_build(out)
    peers, skipped = load_peers(load_build_source(build), build.cfg, [peer], tmp_path, 1)
    assert skipped == [], skipped
    ids = np.random.default_rng(6).integers(3, build.cfg.model.vocab_size, size=(2, 7))
    for p in peers:
        runs = time_peer(p, ids, 5, runs=1, warmup=0)
        assert not isinstance(runs, str), runs
        assert [len(s) for s in runs[0].sequences] == [5, 5] and p.hmu == "off"
