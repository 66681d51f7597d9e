"""The generated repository served for real by the tritonserver binary of nvidia-pytriton.

Runs on a CPU machine (that binary carries the python backend): the python-backend model of the
tiny build is loaded from the repository alone and queried over HTTP and gRPC; its logits must
match PyTorch within the FP32 tolerance for the same noise. The server is started by a context
manager, so it is stopped also when a test fails.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hmu_export.core.io_contract import make_feeds
from hmu_export.deploy.triton.repository import repository_from_artifacts
from hmu_export.deploy.triton.client import HMUTritonClient, TritonRequestError, make_noise
from hmu_export.deploy.triton.server import TritonServerError, serve

FP32_ATOL = 1e-4
PY_MODEL = "hmu-tiny_python"
# The concurrency test records its latencies; into the repository only when asked
# (HMU_RECORD_BENCH=1), so a test run never rewrites a tracked file.
LATENCY_JSON = (Path(__file__).resolve().parents[1] / "benchmarks" / "triton_latency.json"
                if os.environ.get("HMU_RECORD_BENCH") == "1" else
                Path(tempfile.gettempdir()) / "hmu_triton_latency.json")


@pytest.fixture(scope="module")
def repo(small_export, tmp_path_factory) -> Path:
    return repository_from_artifacts(small_export.root, tmp_path_factory.mktemp("t") / "repo").root


@pytest.fixture(scope="module")
def server(repo):
    with serve(repo, [PY_MODEL]) as srv:
        yield srv
    assert not srv.alive()


@pytest.fixture(scope="module")
def clients(server, small_cfg):
    made = {"http": HMUTritonClient(server.http_url, PY_MODEL, "http"),
            "grpc": HMUTritonClient(server.grpc_url, PY_MODEL, "grpc")}
    yield made
    for c in made.values():
        c.close()


def torch_logits(model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        out = model(*(torch.from_numpy(feeds[n]) for n in ("src_ids", "src_mask", "tgt_ids",
                                                           "noise")))
    return out.numpy()


SHAPES = [(1, 1, 1), (1, 16, 8), (2, 8, 4), (3, 5, 7), (4, 16, 8), (4, 1, 8)]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_served_logits_match_torch(clients, small_cfg, small_model, protocol, shape):
    feeds = make_feeds(small_cfg.model, *shape, seed=11)
    got = clients[protocol].infer_feeds(feeds)["logits"]
    assert got.shape == (shape[0], shape[2], 61)
    np.testing.assert_allclose(got, torch_logits(small_model, feeds), rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_noise_handled_by_the_server(clients, small_cfg, small_model, protocol):
    """Omitted noise: zeros (mean path), or the seeded noise make_noise() builds."""
    feeds = make_feeds(small_cfg.model, 2, 6, 3, seed=2)
    c = clients[protocol]
    for seed, temp in ((0, 0.0), (5, 0.7)):
        got = c.infer(feeds["src_ids"], feeds["src_mask"], feeds["tgt_ids"], seed=seed,
                      temperature=temp, send_noise=False)["logits"]
        ref = dict(feeds, noise=make_noise(2, 6, 16, seed, temp))
        np.testing.assert_allclose(got, torch_logits(small_model, ref), rtol=0, atol=FP32_ATOL)
    # Client-built noise from the same (seed, temperature) gives the same answer.
    sent = c.infer(feeds["src_ids"], feeds["src_mask"], feeds["tgt_ids"], seed=5,
                   temperature=0.7)["logits"]
    np.testing.assert_allclose(sent, got, rtol=0, atol=1e-6)
    # and noise really matters: temperature 0.7 differs from the mean path
    mean = c.infer(feeds["src_ids"], feeds["src_mask"], feeds["tgt_ids"])["logits"]
    assert np.abs(mean - got).max() > 1e-3


def _bad_requests(cfg) -> dict[str, dict[str, np.ndarray]]:
    good = make_feeds(cfg.model, 2, 4, 3, seed=1)
    return {
        "src_ids int32": dict(good, src_ids=good["src_ids"].astype(np.int32)),
        "noise float64": dict(good, noise=good["noise"].astype(np.float64)),
        "rank": dict(good, tgt_ids=good["tgt_ids"][0]),
        "mask length": dict(good, src_mask=good["src_mask"][:, :3]),
        "latent": dict(good, noise=np.zeros((2, 4, 15), np.float32)),
        "batch > max": make_feeds(cfg.model, 5, 4, 3, seed=1),
        "src_len > profile": make_feeds(cfg.model, 1, 17, 3, seed=1),
        "token id": dict(good, tgt_ids=np.full((2, 3), 61, np.int64)),
        "unknown input": dict(good, extra=np.zeros((2, 1), np.float32)),
        "missing input": {k: v for k, v in good.items() if k != "tgt_ids"},
    }


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_get_clean_errors(clients, server, small_cfg, small_model, protocol):
    c = clients[protocol]
    good = make_feeds(small_cfg.model, 2, 4, 3, seed=1)
    answered = 0
    for what, feeds in _bad_requests(small_cfg).items():
        with pytest.raises(TritonRequestError) as info:
            c.infer_feeds(feeds)
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(PY_MODEL), (what, msg)
        # a client mistake the server answered: INVALID_ARGUMENT / 400, never INTERNAL / 500
        # (retry policies); status None: the client refused it before sending
        assert info.value.status is None or info.value.invalid_argument, \
            (what, info.value.status, msg)
        answered += info.value.status is not None
        # the server keeps serving, correctly, after every rejected request
        got = c.infer_feeds(good)["logits"]
        np.testing.assert_allclose(got, torch_logits(small_model, good), rtol=0, atol=FP32_ATOL)
    assert answered >= 5  # most of them reach the server
    assert server.alive()


def test_concurrent_requests_with_dynamic_batching(server, clients, small_cfg, small_model):
    """8 threads (HTTP and gRPC) x 40 requests: zero errors, every answer right, p50/p99 kept."""
    conf = clients["grpc"].client.get_model_config(PY_MODEL, as_json=True)["config"]
    assert conf["dynamic_batching"]["preferred_batch_size"] == [2, 4]
    stats0 = _stats(clients["http"])
    # Two shape families so batches form among same-shape requests; batch 1 and 2 requests.
    pool = [make_feeds(small_cfg.model, b, ls, lt, seed=s)
            for s, (b, ls, lt) in enumerate([(1, 8, 4)] * 6 + [(2, 12, 6)] * 4)]
    refs = [torch_logits(small_model, f) for f in pool]
    threads, per_thread = 8, 40
    lat: dict[str, list[float]] = {"http": [], "grpc": []}
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def worker(k: int) -> None:
        protocol = "http" if k % 2 == 0 else "grpc"
        url = server.http_url if protocol == "http" else server.grpc_url
        mine: list[float] = []
        try:
            with HMUTritonClient(url, PY_MODEL, protocol, latent_dim=16) as c:
                start.wait()
                for i in range(per_thread):
                    j = (k * 7 + i) % len(pool)
                    t0 = time.perf_counter()
                    got = c.infer_feeds(pool[j])["logits"]
                    mine.append(time.perf_counter() - t0)
                    err = float(np.abs(got - refs[j]).max())
                    if not err <= FP32_ATOL:
                        raise AssertionError(f"request {j}: max abs {err:.3g}")
        except Exception as exc:  # collected: an assert inside a thread would be lost
            with lock:
                errors.append(f"thread {k}: {type(exc).__name__}: {exc}")
        with lock:
            lat[protocol].extend(mine)

    t0 = time.perf_counter()
    pool_threads = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool_threads:
        t.start()
    for t in pool_threads:
        t.join(timeout=120)
    wall = time.perf_counter() - t0
    assert not any(t.is_alive() for t in pool_threads), "client threads hung"
    assert errors == []
    total = threads * per_thread
    assert len(lat["http"]) + len(lat["grpc"]) == total
    stats1 = _stats(clients["http"])
    requests = stats1["inference_count"] - stats0["inference_count"]  # counts batch rows
    executions = stats1["execution_count"] - stats0["execution_count"]
    assert 0 < executions <= requests
    record = {
        "what": "tritonserver (nvidia-pytriton, python backend + ONNX Runtime CPU), tiny model "
                "d=32 1+1 layers, 8 client threads (4 HTTP, 4 gRPC), batch 1-2 requests, "
                "dynamic batching on (preferred [2, 4], queue delay 100 us)",
        "requests": total, "threads": threads, "errors": len(errors),
        "wall_s": round(wall, 3), "throughput_rps": round(total / wall, 1),
        "batch_rows": requests, "executions": executions,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
    }
    for protocol, values in lat.items():
        ms = np.array(values) * 1e3
        record[protocol] = {"n": len(values), "p50_ms": round(float(np.percentile(ms, 50)), 3),
                            "p99_ms": round(float(np.percentile(ms, 99)), 3),
                            "max_ms": round(float(ms.max()), 3)}
    LATENCY_JSON.parent.mkdir(exist_ok=True)
    LATENCY_JSON.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _stats(client: HMUTritonClient) -> dict[str, int]:
    (model,) = client.client.get_inference_statistics(PY_MODEL)["model_stats"]
    return {"inference_count": int(model["inference_count"]),
            "execution_count": int(model["execution_count"])}


def test_server_is_stopped_when_the_body_fails(repo):
    with pytest.raises(RuntimeError, match="boom"):
        with serve(repo, [PY_MODEL]) as srv:
            proc = srv.process
            assert srv.alive()
            raise RuntimeError("boom")
    assert proc.poll() is not None
    with pytest.raises(OSError):  # nothing listens on its port any more
        import socket
        socket.create_connection(("127.0.0.1", srv.http_port), timeout=1).close()


def test_unloadable_model_is_a_clean_error(repo):
    """The pip-wheel server has no onnxruntime backend: loading that model fails cleanly."""
    with pytest.raises(TritonServerError, match="onnxruntime"):
        with serve(repo, ["hmu-tiny_onnx"], timeout=30):
            pass  # pragma: no cover - must not start


def test_command_smoke(small_export, tmp_path, capsys):
    from hmu_export.commands.cli import main

    assert main(["triton", "--artifacts", str(small_export.root), "--out", str(tmp_path / "r"),
                 "--smoke"]) == 0
    out = capsys.readouterr().out
    assert out.count("pass") == 6 and "FAIL" not in out


# ---- issue 11, items 7 and 10: bad parameters and non-finite outputs, inside dynamic batches ---

def _queued_model(repo: Path, server, delay_us: int = 1_000_000) -> str:
    """A copy of the python model whose batcher has no preferred size and waits up to
    ``delay_us`` for a full batch (4), so concurrent requests reach one execute() together."""
    import re
    import shutil

    name = PY_MODEL + "_queued"
    target = repo / name
    if not target.exists():
        shutil.copytree(repo / PY_MODEL, target)
        conf = (target / "config.pbtxt").read_text()
        conf = conf.replace(f'name: "{PY_MODEL}"', f'name: "{name}"')
        conf = re.sub(r"max_queue_delay_microseconds: \d+",
                      f"max_queue_delay_microseconds: {delay_us}", conf)
        conf = re.sub(r"\n *preferred_batch_size: \d+", "", conf)
        (target / "config.pbtxt").write_text(conf)
    import tritonclient.http as http

    with http.InferenceServerClient(server.http_url) as admin:
        admin.load_model(name)
    return name


def _together(server, model: str, calls: list[dict]) -> list[object]:
    """Send every call at once (one thread each); each result is logits or the exception."""
    results: list[object] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def one(k: int) -> None:
        with HMUTritonClient(server.http_url, model, "http", latent_dim=16) as c:
            start.wait()
            try:
                results[k] = c.infer_feeds(calls[k]["feeds"], parameters=calls[k].get("params"))[
                    "logits"]
            except Exception as exc:  # collected, checked by the test
                results[k] = exc

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def _executions(server, model: str) -> int:
    import tritonclient.http as http

    with http.InferenceServerClient(server.http_url) as c:
        (stats,) = c.get_inference_statistics(model)["model_stats"]
    return int(stats["execution_count"])


def test_bad_request_fails_alone_in_a_dynamic_batch(repo, server, small_cfg, small_model):
    """seed -1 used to raise an uncaught ValueError that failed every request of its batch;
    temperature 1e39 (inf in float32) and noise 3e38 used to answer all-NaN logits."""
    model = _queued_model(repo, server)
    feeds = make_feeds(small_cfg.model, 1, 6, 3, seed=8)
    ids = {k: v for k, v in feeds.items() if k != "noise"}
    server_noise = [  # noise built by the server from parameters: one batch of 4
        {"feeds": ids, "params": {"seed": 5, "temperature": "0.5"}},
        {"feeds": ids, "params": {"seed": -1, "temperature": "0.5"}},
        {"feeds": ids, "params": {"seed": 5, "temperature": "1e39"}},
        {"feeds": ids, "params": {"seed": 2**63, "temperature": "0.5"}},
    ]
    sent_noise = [  # noise sent by the client: one batch of 2
        {"feeds": feeds},
        {"feeds": dict(feeds, noise=np.full_like(feeds["noise"], 3e38))},
    ]
    for calls, expect_errors in ((server_noise, ["'seed' must be", "'temperature' must be",
                                                 "'seed' must be"]),
                                 (sent_noise, ["non-finite value"])):
        before = _executions(server, model)
        got = _together(server, model, calls)
        assert _executions(server, model) - before == 1, "the requests were not batched"
        ref_feeds = dict(feeds, noise=make_noise(1, 6, 16, 5, 0.5)) if calls is server_noise \
            else feeds
        assert isinstance(got[0], np.ndarray), got[0]
        np.testing.assert_allclose(got[0], torch_logits(small_model, ref_feeds), rtol=0,
                                   atol=FP32_ATOL)
        for result, words in zip(got[1:], expect_errors):
            assert isinstance(result, TritonRequestError), result
            assert result.status == "400", (result.status, str(result))
            msg = str(result)
            assert words in msg and "\n" not in msg and "internal error" not in msg, msg
    assert server.alive()


# ---- issue 9, item 3: the python model of every graph (reference classifier, HMU after decoder) ----

def _load_into(repo: Path, server, source_repo: Path, name: str) -> None:
    """Copy a model of another repository into the served one and load it (explicit mode)."""
    import shutil

    import tritonclient.http as http

    if not (repo / name).exists():
        shutil.copytree(source_repo / name, repo / name)
    with http.InferenceServerClient(server.http_url) as admin:
        admin.load_model(name)


def test_served_reference_graphs(repo, server, tmp_path_factory):
    """The classifier (class_logits, noise over src_len) and the full graph with the HMU after
    the decoder (noise over tgt_len), served: equal to ONNX Runtime on the graph with the same
    noise, server-drawn and client-built, over HTTP and gRPC; a bad request gets its own line."""
    import sys

    import onnxruntime as ort

    sys.path.insert(0, str(Path(__file__).parent))
    from triton_reference import reference_graph

    rng = np.random.default_rng(4)
    for kind, name in (("classifier", "ref-cls_python"), ("after_decoder", "ref-dec_python")):
        build = reference_graph(kind, tmp_path_factory)
        own = repository_from_artifacts(build, tmp_path_factory.mktemp("served") / "r").root
        _load_into(repo, server, own, name)
        sess = ort.InferenceSession(str(build / "model.onnx"),
                                    providers=["CPUExecutionProvider"])
        b, ls, lt = 3, 5, 4
        src = rng.integers(1, 40, (b, ls)).astype(np.int64)
        mask = np.ones((b, ls), np.int64)
        mask[1, 3:] = 0
        tgt = None if kind == "classifier" else rng.integers(1, 40, (b, lt)).astype(np.int64)
        out = "class_logits" if kind == "classifier" else "logits"
        span = ls if kind == "classifier" else lt
        noise = rng.standard_normal((b, span, 8), dtype=np.float32) * np.float32(0.6)
        base = {"src_ids": src, "src_mask": mask} | ({} if tgt is None else {"tgt_ids": tgt})
        # the documented recipe, written out: default_rng(seed).standard_normal(...) * t
        drawn = np.random.default_rng(9).standard_normal((b, span, 8), dtype=np.float32) * \
            np.float32(0.6)
        want = sess.run([out], dict(base, noise=drawn))[0]
        for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            with HMUTritonClient(url, name, protocol) as c:  # latent and noise axis: asked
                got = c.infer(src, mask, tgt, seed=9, temperature=0.6, send_noise=False)
                assert list(got) == [out]
                np.testing.assert_allclose(got[out], want, rtol=0, atol=1e-5)
                sent = c.infer(src, mask, tgt, seed=9, temperature=0.6)[out]  # client-built
                np.testing.assert_allclose(sent, want, rtol=0, atol=1e-5)
                mine = c.infer(src, mask, tgt, noise)[out]
                np.testing.assert_allclose(mine, sess.run([out], dict(base, noise=noise))[0],
                                           rtol=0, atol=1e-5)
                assert np.abs(mine - got[out]).max() > 1e-3  # the noise does matter
                with pytest.raises(TritonRequestError, match="token ids outside") as info:
                    c.infer(np.full_like(src, 40), mask, tgt)
                assert "\n" not in str(info.value)
    assert server.alive()
