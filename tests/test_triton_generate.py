"""Generation models of the Triton repository, served for real by the bundled tritonserver.

One server for the module (the tiny SMALL config): the python-backend generation model and its
decoupled streaming variant run the encoder / decoder graphs in-process with ONNX Runtime. Every
answer is compared with Python's Generator over the same build (onnxruntime backend): greedy,
beam and seeded sampling on ragged rows, batched by Triton's dynamic batcher, from 8 concurrent
clients, streamed token by token, and next to bad requests that must fail alone.
"""
from __future__ import annotations

import queue
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from hmu_export.generate.generator import Generator
from hmu_export.deploy.triton.config import TritonConfigError, TritonOptions, parse_config
from hmu_export.deploy.triton.repository import repository_from_artifacts
from hmu_export.deploy.triton.generation import check_generate_config, generation_names
from hmu_export.deploy.triton.server import serve

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

GEN, STREAM = "hmu-tiny_generate", "hmu-tiny_generate_stream"
ROWS = [[5, 17, 9], [4, 4], [7, 8, 9, 10, 11, 12, 13, 3], [60], list(range(3, 19))]
QUEUE_DELAY_US = 20_000  # long enough that concurrent requests meet in one execute


@pytest.fixture(scope="module")
def repo(gen_build, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("genrepo") / "repo"
    return repository_from_artifacts(gen_build, out,
                                     TritonOptions(max_queue_delay_us=QUEUE_DELAY_US)).root


@pytest.fixture(scope="module")
def ref(gen_build) -> Generator:
    return Generator.from_build(gen_build, backend="onnxruntime")


@pytest.fixture(scope="module")
def server(repo):
    with serve(repo, [GEN, STREAM]) as srv:
        yield srv
    assert not srv.alive()


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def _inputs(row, max_new: int | None = None) -> list:
    arr = np.asarray([row], dtype=np.int64).reshape(1, -1)
    inp = grpcclient.InferInput("src_ids", list(arr.shape), "INT64")
    inp.set_data_from_numpy(arr)
    out = [inp]
    if max_new is not None:
        m = grpcclient.InferInput("max_new_tokens", [1, 1], "INT64")
        m.set_data_from_numpy(np.asarray([[max_new]], dtype=np.int64))
        out.append(m)
    return out


def _params(kw: dict) -> dict:
    """Request parameters: floats as strings (the python backend takes bool / int / str)."""
    return {k: (str(v) if isinstance(v, float) else v) for k, v in kw.items()
            if k != "max_new_tokens"}


def generate(client, row, **kw) -> list[int]:
    res = client.infer(GEN, _inputs(row, kw.get("max_new_tokens")), parameters=_params(kw))
    tokens = res.as_numpy("tokens")
    assert tokens.dtype == np.int64 and tokens.shape[0] == 1
    return tokens[0].tolist()


def together(client, calls: list[tuple[list[int], dict]]) -> list[object]:
    """All calls in flight at once (async gRPC): token lists, or the exception."""
    results: list[queue.Queue] = [queue.Queue() for _ in calls]
    for q, (row, kw) in zip(results, calls):
        client.async_infer(GEN, _inputs(row, kw.get("max_new_tokens")),
                           callback=lambda result, error, q=q: q.put(error or result),
                           parameters=_params(kw))
    out = []
    for q in results:
        r = q.get(timeout=60)
        out.append(r if isinstance(r, Exception) else r.as_numpy("tokens")[0].tolist())
    return out


def _executions(client, model: str = GEN) -> int:
    (stats,) = client.get_inference_statistics(model, as_json=True)["model_stats"]
    return int(stats.get("execution_count", 0))


# --------------------------------------------------------------------------- not served
def test_repository_has_the_generation_models(repo, small_cfg):
    names = generation_names(small_cfg)
    for kind, name in names.items():
        files = sorted(p.relative_to(repo / name).as_posix()
                       for p in (repo / name).rglob("*") if p.is_file())
        want = (["1/decoder.onnx", "1/encoder.onnx", "1/model.py", "1/request_options.py",
                 "1/token_rules.py"]
                if kind.startswith("generate") else ["1/model.onnx"])
        assert files == sorted(want + ["config.pbtxt"]), (name, files)
    gen = parse_config((repo / GEN / "config.pbtxt").read_text())
    stream = parse_config((repo / STREAM / "config.pbtxt").read_text())
    assert not gen.model_transaction_policy.decoupled and stream.model_transaction_policy.decoupled
    ins = {t.name: t for t in gen.input}
    assert ins["src_ids"].allow_ragged_batch and list(ins["src_ids"].dims) == [-1]
    assert ins["max_new_tokens"].optional and list(ins["max_new_tokens"].dims) == [1]
    assert [(t.name, list(t.dims)) for t in gen.output] == [("tokens", [-1])]
    assert gen.parameters["step_backend"].string_value == "onnxruntime"
    assert gen.parameters["decoder_model"].string_value == "hmu-tiny_decoder"
    dec = parse_config((repo / "hmu-tiny_decoder" / "config.pbtxt").read_text())
    assert dec.platform == "onnxruntime_onnx" and not dec.HasField("dynamic_batching")
    assert {t.name for t in dec.input} >= {"tgt_ids", "src_mask", "past_key.0", "cross_value.0"}
    assert "hmu-tiny_generate" in (repo / "README.md").read_text()
    # the checks refuse what this model cannot be
    bad = type(stream)()
    bad.CopyFrom(stream)
    bad.model_transaction_policy.decoupled = False
    with pytest.raises(TritonConfigError, match="decoupled"):
        check_generate_config(bad, small_cfg, streaming=True)
    bad.CopyFrom(gen)
    bad.parameters["step_backend"].string_value = "grpc"
    with pytest.raises(TritonConfigError, match="step_backend"):
        check_generate_config(bad, small_cfg, streaming=False)
    bad.CopyFrom(gen)
    bad.input[0].dims[:] = [-1, -1]
    with pytest.raises(TritonConfigError, match="src_ids"):
        check_generate_config(bad, small_cfg, streaming=False)


# --------------------------------------------------------------------------- served
CASES = [
    {},  # greedy, the build's default max_new_tokens
    {"max_new_tokens": 5},
    {"strategy": "beam", "num_beams": 2, "max_new_tokens": 6},
    {"strategy": "beam", "num_beams": 4, "length_penalty": 0.5, "max_new_tokens": 4},
    {"strategy": "sample", "seed": 7, "temperature": 1.3, "top_k": 10, "max_new_tokens": 8},
    {"strategy": "sample", "seed": 3, "top_p": 0.9},
    {"noise_scale": 1.0, "noise_seed": 4, "max_new_tokens": 6},
]


def test_tokens_equal_the_generator(client, ref):
    """Every strategy, every ragged row, all requests of a case in flight together (batched)."""
    for kw in CASES:
        want = [ref.generate([row], **kw).sequences[0] for row in ROWS]
        before = _executions(client)
        got = together(client, [(row, kw) for row in ROWS])
        assert got == want, kw
        assert _executions(client) - before < len(ROWS), "requests were not batched"
    # greedy on the mean path: one request alone equals the Generator's ragged batch too
    batch = ref.generate(ROWS[:4], max_new_tokens=8).sequences
    assert [generate(client, row, max_new_tokens=8) for row in ROWS[:4]] == batch


def test_mixed_batch_with_bad_requests(client, ref):
    """Greedy, beam, sample and bad requests in one execute: the bad ones fail alone."""
    calls = [(ROWS[0], {}), ([3, 61], {}), (ROWS[2], {"strategy": "beam", "num_beams": 2}),
             (ROWS[1], {"strategy": "sample", "seed": 1, "temperature": 0.8}),
             (ROWS[3], {"temperature": "hot"}), (ROWS[4], {"max_new_tokens": 99})]
    got = together(client, calls)
    for (row, kw), result in zip(calls, got):
        if row == [3, 61] or kw.get("temperature") == "hot" or kw.get("max_new_tokens") == 99:
            assert isinstance(result, InferenceServerException), (row, kw, result)
        else:
            assert result == ref.generate([row], **kw).sequences[0], (row, kw)
    msgs = [str(r) for r in got if isinstance(r, Exception)]
    assert any("token id 61 outside [0, 61)" in m for m in msgs), msgs
    assert any("temperature must be a number, got 'hot'" in m for m in msgs), msgs
    assert any("max_new_tokens must be in [1, 8]" in m for m in msgs), msgs


BAD = [
    ([], {}, "empty"),
    (list(range(17)), {}, "outside the profile"),
    ([5, -1], {}, "outside [0, 61)"),
    ([5], {"strategy": "nucleus"}, "strategy must be one of"),
    ([5], {"temperature": "0"}, "temperature must be in"),
    ([5], {"temperature": "1e-320", "strategy": "sample"}, "temperature must be in"),
    ([5], {"length_penalty": "400", "strategy": "beam", "num_beams": 2},
     "length_penalty must be in"),
    ([5], {"noise_scale": "1e39"}, "noise_scale must be in"),
    ([5], {"seed": str(2**64)}, "seed must be in"),
    ([5], {"top_p": "1.5"}, "top_p"),
    ([5], {"num_beams": 8, "strategy": "beam"}, "batch max"),
    ([5], {"seed": -3}, "seed must be in"),
    ([5], {"temprature": "1.0"}, "unknown request parameter"),
    ([5], {"max_new_tokens": 0}, "max_new_tokens must be in"),
]


def test_bad_requests_get_errors_and_the_server_keeps_serving(client, server, ref):
    good = ref.generate([ROWS[0]]).sequences[0]
    for row, kw, words in BAD:
        with pytest.raises(InferenceServerException) as info:
            generate(client, row, **kw)
        msg = str(info.value)
        assert words in msg and "internal error" not in msg, (row, kw, msg)
        assert generate(client, ROWS[0]) == good
    two_rows = np.asarray([ROWS[1], ROWS[1]], dtype=np.int64)
    inp = grpcclient.InferInput("src_ids", list(two_rows.shape), "INT64")
    inp.set_data_from_numpy(two_rows)
    with pytest.raises(InferenceServerException, match="one source sequence"):
        client.infer(GEN, [inp])
    assert server.alive()


def test_client_mistakes_are_invalid_argument_not_internal(server, client):
    """A bad shape or parameter is the client's mistake: gRPC INVALID_ARGUMENT and HTTP 400,
    so retry policies and alerts do not count it as a server fault (it was INTERNAL / 500)."""
    import tritonclient.http as httpclient

    two_rows = np.asarray([ROWS[1], ROWS[1]], dtype=np.int64)
    for proto, mod, url, want in (("grpc", grpcclient, server.grpc_url, "INVALID_ARGUMENT"),
                                  ("http", httpclient, server.http_url, "400")):
        c = client if proto == "grpc" else httpclient.InferenceServerClient(url)
        shaped = mod.InferInput("src_ids", list(two_rows.shape), "INT64")
        shaped.set_data_from_numpy(two_rows)
        one = mod.InferInput("src_ids", [1, 2], "INT64")
        one.set_data_from_numpy(two_rows[:1])
        for inputs, params in (([shaped], {}), ([one], {"temperature": "hot"}),
                               ([one], {"seed": -1}), ([one], {"noise_scale": "1e39"})):
            with pytest.raises(InferenceServerException) as info:
                c.infer(GEN, inputs, parameters=params)
            assert want in str(info.value.status()), (proto, params, info.value.status())
        if proto == "http":
            c.close()


def test_eight_concurrent_clients(server, ref):
    """8 threads, each its own gRPC client, 6 requests each over ragged rows and strategies."""
    kinds = [{}, {"strategy": "sample", "seed": 11, "temperature": 0.9},
             {"strategy": "beam", "num_beams": 2, "max_new_tokens": 6}]
    want = {(r, k): ref.generate([ROWS[r]], **kinds[k]).sequences[0]
            for r in range(len(ROWS)) for k in range(len(kinds))}
    errors: list[str] = []
    lat: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker(t: int) -> None:
        try:
            c = grpcclient.InferenceServerClient(server.grpc_url)
            barrier.wait()
            for i in range(6):
                r, k = (t + i) % len(ROWS), (t * 5 + i) % len(kinds)
                t0 = time.perf_counter()
                got = generate(c, ROWS[r], **kinds[k])
                with lock:
                    lat.append(time.perf_counter() - t0)
                    tokens[0] += len(got)
                if got != want[(r, k)]:
                    raise AssertionError(f"row {r} kind {k}: {got} != {want[(r, k)]}")
            c.close()
        except Exception as exc:  # collected: an assert in a thread would be lost
            with lock:
                errors.append(f"thread {t}: {type(exc).__name__}: {exc}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    wall = time.perf_counter() - t0
    assert not any(t.is_alive() for t in threads) and errors == []
    assert len(lat) == 48
    ms = np.array(lat) * 1e3
    print(f"\n8 clients x 6 requests: wall {wall:.2f} s, {tokens[0] / wall:.0f} tokens/s, "
          f"request p50 {np.percentile(ms, 50):.1f} ms p99 {np.percentile(ms, 99):.1f} ms")


def _stream(server, row, **kw) -> tuple[list[int], list[float], list[bool]]:
    """Tokens, arrival times and final flags of one streamed request (or raises its error)."""
    got: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(server.grpc_url)
    c.start_stream(callback=lambda result, error: got.put((time.perf_counter(), result, error)))
    try:
        t0 = time.perf_counter()
        c.async_stream_infer(STREAM, _inputs(row, kw.get("max_new_tokens")),
                             parameters=_params(kw), enable_empty_final_response=True)
        tokens, times, finals = [], [], []
        while True:
            when, result, error = got.get(timeout=30)
            if error is not None:
                raise error
            final = result.get_response().parameters["triton_final_response"].bool_param
            out = result.as_numpy("tokens")
            if out is not None:
                assert out.shape == (1, 1)
                tokens.append(int(out[0, 0]))
                times.append(when - t0)
            finals.append(final)
            if final:
                return tokens, times, finals
    finally:
        c.stop_stream()
        c.close()


def test_streaming_sends_each_token(server, ref, client):
    for row in (ROWS[2], ROWS[4]):
        want = ref.generate([row], max_new_tokens=8).sequences[0]
        tokens, times, finals = _stream(server, row, max_new_tokens=8)
        assert tokens == want
        # one response per token, then the empty FINAL one
        assert finals == [False] * len(want) + [True]
        assert times == sorted(times)
    kw = {"strategy": "sample", "seed": 5, "temperature": 1.2, "top_k": 20}
    assert _stream(server, ROWS[0], **kw)[0] == ref.generate([ROWS[0]], **kw).sequences[0]
    with pytest.raises(InferenceServerException, match="beam.*cannot stream"):
        _stream(server, ROWS[0], strategy="beam", num_beams=2)
    with pytest.raises(InferenceServerException, match="outside"):
        _stream(server, [99])
    assert _stream(server, ROWS[1])[0] == ref.generate([ROWS[1]]).sequences[0]
    # per-token latency, served (tiny model, 2 shared cores)
    _, times, _ = _stream(server, ROWS[4], max_new_tokens=8)
    gaps = np.diff(times) * 1e3
    print(f"\nstreaming: first token {times[0] * 1e3:.1f} ms, then p50 "
          f"{np.percentile(gaps, 50):.2f} ms per token")


def test_model_loop_with_eos_equals_the_generator(repo, ref):
    """The model file's loop outside Triton, with an EOS the tiny model does produce (23): rows
    finish at different steps and leave the batch, beams finish early."""
    import hmu_export.shipped.generate_model as tgm

    conf = parse_config((repo / GEN / "config.pbtxt").read_text())
    params = {k: v.string_value for k, v in conf.parameters.items()}
    spec = {k: int(params[k]) for k in tgm.SPEC_KEYS}
    spec["eos_id"] = 23
    steps = tgm.ort_steps(str(repo / GEN / "1"), params, spec)
    for kw in ({"max_new_tokens": 8}, {"strategy": "sample", "seed": 2, "temperature": 0.7},
               {"strategy": "beam", "num_beams": 2, "max_new_tokens": 6}):
        opts = tgm.parse_options(_params(kw), kw.get("max_new_tokens"), spec)
        jobs = [tgm.Job(row, opts) for row in ROWS]
        for group in tgm.plan_groups(jobs, spec["batch_max"]):
            batch = [jobs[i] for i in group]
            (tgm.generate_beam if opts.beam else tgm.generate_sequential)(steps, batch, spec)
        want = [ref.generate([row], eos_id=23, **kw).sequences[0] for row in ROWS]
        assert [j.tokens for j in jobs] == want, kw
        assert any(t[-1] == 23 and len(t) < opts.max_new_tokens for t in want), want


def test_model_honours_the_builds_token_rules(repo, ref, small_cfg):
    """The build's decoding defaults and token rules reach the model through its ``decoding``
    parameter (read by initialize, as Triton calls it) and its loops apply them as the
    Generator does: per-row max_new_tokens (ForcedEOS), sampling, beams."""
    import dataclasses
    import json

    import hmu_export.shipped.generate_model as tgm
    from hmu_export.shipped.token_rules import TokenRules
    from hmu_export.deploy.triton.generation import decoding_parameter

    rules = TokenRules(repetition_penalty=1.6, no_repeat_ngram_size=2, bad_words_ids=((5,), (7, 8)),
                       min_new_tokens=2, forced_eos_id=23, suppress_tokens=(9,))
    gen = dataclasses.replace(small_cfg.generation, strategy="beam", num_beams=2,
                              **{k: v for k, v in rules.to_dict().items()
                                 if k not in ("bad_words_ids", "suppress_tokens")},
                              bad_words_ids=rules.bad_words_ids,
                              suppress_tokens=rules.suppress_tokens)
    conf = parse_config((repo / GEN / "config.pbtxt").read_text())
    conf.parameters["decoding"].string_value = decoding_parameter(
        dataclasses.replace(small_cfg, generation=gen))
    from google.protobuf import json_format
    model = tgm.TritonPythonModel()
    model.initialize({"model_config": json.dumps(json_format.MessageToDict(
        conf, preserving_proto_field_name=True)), "model_repository": str(repo / GEN),
        "model_version": "1"})
    assert model.rules == rules and model.defaults["strategy"] == "beam"
    changed = False
    for kw in ({}, {"strategy": "greedy"}, {"strategy": "sample", "seed": 2, "top_k": 5}):
        jobs = []
        for i, row in enumerate(ROWS):
            mnt = 4 + i  # rows end at different steps: ForcedEOS per row
            jobs.append(tgm.Job(row, tgm.parse_options(_params(kw), mnt, model.spec,
                                                       defaults=model.defaults)))
        for group in tgm.plan_groups(jobs, model.spec["batch_max"]):
            batch = [jobs[i] for i in group]
            if batch[0].opts.beam:
                tgm.generate_beam(model.steps, batch, model.spec, model.rules)
            else:
                tgm.generate_sequential(model.steps, batch, model.spec, rules=model.rules)
        opts = {"strategy": "beam", "num_beams": 2, **kw}
        want = [ref.generate([row], rules=rules, max_new_tokens=4 + i, **opts).sequences[0]
                for i, row in enumerate(ROWS)]
        assert [j.tokens for j in jobs] == want, kw
        plain = [ref.generate([row], max_new_tokens=4 + i, **opts).sequences[0]
                 for i, row in enumerate(ROWS)]
        changed |= plain != want
    assert changed, "the rules never changed a token: this test would pass without them"


def test_cancelled_stream_leaves_the_others_running(server, ref):
    """A client that closes its stream, cancelling, after its first response (the tiny model may
    have finished by then): the request beside it still gets every token, the server serves."""
    got: queue.Queue = queue.Queue()
    quitter = grpcclient.InferenceServerClient(server.grpc_url)
    quitter.start_stream(callback=lambda result, error: got.put((result, error)))
    quitter.async_stream_infer(STREAM, _inputs(ROWS[4], 8), enable_empty_final_response=True)
    want = ref.generate([ROWS[2]], max_new_tokens=8).sequences[0]
    other: list = []
    t = threading.Thread(target=lambda: other.append(_stream(server, ROWS[2], max_new_tokens=8)))
    t.start()
    got.get(timeout=30)  # the first token (or error) of the quitter
    quitter.stop_stream(cancel_requests=True)
    quitter.close()
    t.join(timeout=60)
    assert other and other[0][0] == want
    assert _stream(server, ROWS[0])[0] == ref.generate([ROWS[0]]).sequences[0]
    assert server.alive()


def test_graphs_it_cannot_drive_give_no_generation_models(gen_build, small_cfg, tmp_path):
    """A build whose split graphs are not the encoder / decoder-step pair (here the full graph
    in decoder.onnx's place) keeps its other Triton models and gets no generation models."""
    from hmu_export.core.layout import BuildLayout
    from hmu_export.deploy.triton.generation import NotServable, cache_geometry, generation_models

    root = tmp_path / "b"
    root.mkdir()
    for name in ("model.onnx", "encoder.onnx"):
        shutil.copy(gen_build / name, root / name)
    shutil.copy(gen_build / "model.onnx", root / "decoder.onnx")
    with pytest.raises(NotServable, match="past_key.0"):
        cache_geometry(root / "encoder.onnx", root / "decoder.onnx")
    assert generation_models(BuildLayout(root), small_cfg, TritonOptions()) == []
    assert cache_geometry(gen_build / "encoder.onnx", gen_build / "decoder.onnx") == {
        "layers": 1, "heads": 4, "head_dim": 8, "latent_dim": 16}


def test_a_killed_stub_is_not_left_ready(server, client, ref):
    """Issue 21: `kill -9` of the generation model's stub. Triton 2.51 alone keeps answering
    ready (200) while every request fails ("Stub process ... is not healthy"); the stub
    watchdog that serve() runs (shipped/stub_watchdog.py) unloads the model at once (ready
    400) and loads it with a fresh stub: ready 200 again, and the same tokens."""
    import os
    import signal

    from hmu_export.deploy.triton.server import _get
    from hmu_export.shipped.stub_watchdog import stub_processes

    assert server.watchdog is not None and server.watchdog.is_alive()
    want = ref.generate([ROWS[0]]).sequences[0]
    assert generate(client, ROWS[0]) == want
    stubs = {pid: model for pid, (state, model) in stub_processes(server.process.pid).items()
             if state != "Z"}
    (pid,) = [p for p, m in stubs.items() if m == GEN]
    restarts = len(server.watchdog.restarts)
    os.kill(pid, signal.SIGKILL)
    seen: list[tuple[int, bool]] = []  # (readiness code, request served) over time
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready = _get(f"http://{server.http_url}/v2/models/{GEN}/ready")
        try:
            ok = generate(client, ROWS[0]) == want
        except InferenceServerException as exc:
            ok = False
            assert "not healthy" in str(exc) or "unknown model" in str(exc) or \
                "unavailable" in str(exc).lower(), exc
        seen.append((ready, ok))
        if ok and len(server.watchdog.restarts) > restarts:
            break
        time.sleep(0.05)
    log = server.workdir / "watchdog.log"
    assert seen[-1] == (200, True), (seen[-3:], log.read_text() if log.is_file() else "no log",
                                     server.watchdog.models, server.watchdog.zombie_since,
                                     stub_processes(server.process.pid))
    model, seconds, reloaded = server.watchdog.restarts[-1]
    assert model == GEN and reloaded, server.watchdog.restarts
    # Triton's own answer right after the kill: ready, yet failing (what the watchdog fixes)
    assert seen[0] == (200, False), seen[:5]
    # then not ready while the model reloads: readiness told the truth
    assert any(code != 200 for code, _ in seen), seen
    fresh = {p for p, (state, m) in stub_processes(server.process.pid).items()
             if m == GEN and state != "Z"}
    assert fresh and pid not in fresh
    assert generate(client, ROWS[1]) == ref.generate([ROWS[1]]).sequences[0]
    print(f"\nstub killed: ready 200 while failing for {sum(1 for c, o in seen if c == 200 and not o)}"
          f" polls, reloaded in {seconds:.1f} s")


# --------------------------------------------------------------------------- in-flight batching
def test_inflight_32_concurrent_clients_staggered(server, repo, ref):
    """Issue 18: 32 clients, each its own gRPC connection, arriving staggered over ~0.6 s and
    sending 3 requests each over mixed rows, lengths and strategies (greedy, seeded sampling,
    beam; plain and streaming models): every answer equals its single-request Generator run,
    whatever joined or left the running batch meanwhile."""
    for name in (GEN, STREAM):
        params = parse_config((repo / name / "config.pbtxt").read_text()).parameters
        assert params["batching"].string_value == "inflight"
    kinds = [{}, {"strategy": "sample", "seed": 11, "temperature": 0.9},
             {"strategy": "beam", "num_beams": 2, "max_new_tokens": 6},
             {"max_new_tokens": 3}, {"strategy": "sample", "seed": 4, "top_k": 8,
                                     "max_new_tokens": 5},
             {"strategy": "beam", "num_beams": 3, "length_penalty": 0.7, "max_new_tokens": 7},
             {"noise_scale": 1.0, "noise_seed": 2, "max_new_tokens": 4}]
    rng = np.random.default_rng(18)
    plan = [[(int(rng.integers(len(ROWS))), int(rng.integers(len(kinds))),
              bool(rng.integers(2))) for _ in range(3)] for _ in range(32)]
    delays = rng.uniform(0, 0.6, 32)
    want = {(r, k): ref.generate([ROWS[r]], **kinds[k]).sequences[0]
            for r in range(len(ROWS)) for k in range(len(kinds))}
    errors: list[str] = []
    done = [0, 0]  # requests, streamed requests
    lock = threading.Lock()

    def worker(t: int) -> None:
        try:
            time.sleep(delays[t])
            c = grpcclient.InferenceServerClient(server.grpc_url)
            for r, k, stream in plan[t]:
                kw = kinds[k]
                stream = stream and kw.get("strategy") != "beam"
                got = _stream(server, ROWS[r], **kw)[0] if stream else generate(c, ROWS[r], **kw)
                if got != want[(r, k)]:
                    raise AssertionError(f"row {r} kind {k} stream {stream}: {got} != "
                                         f"{want[(r, k)]}")
                with lock:
                    done[0] += 1
                    done[1] += stream
            c.close()
        except Exception as exc:  # collected: an assert in a thread would be lost
            with lock:
                errors.append(f"client {t}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads) and errors == [], errors[:3]
    assert done[0] == 96 and 10 < done[1] < 90, done  # both models took part
    assert server.alive()


@pytest.fixture(scope="module")
def tight_server(repo, tmp_path_factory):
    """The same models in a second server: the plain one with a waiting queue of one request,
    the streaming one in static batching (today's, kept selectable)."""
    from hmu_export.deploy.triton.generation import with_parameters

    root = tmp_path_factory.mktemp("tight") / "repo"
    for name, values in ((GEN, {"max_queue_size": 1}), (STREAM, {"batching": "static"})):
        shutil.copytree(repo / name, root / name)
        conf = root / name / "config.pbtxt"
        conf.write_text(with_parameters(conf.read_text(), **values))
    with serve(root, [GEN, STREAM]) as srv:
        yield srv


def test_a_full_queue_answers_at_once_never_hangs(tight_server, ref):
    """64 requests at once against 4 batch rows and a queue of 1: the overflow is answered
    UNAVAILABLE with a clear message, every accepted request gets its Generator tokens."""
    c = grpcclient.InferenceServerClient(tight_server.grpc_url)
    calls = [(ROWS[i % len(ROWS)], {"max_new_tokens": 8} if i % 3 else
              {"strategy": "sample", "seed": i, "max_new_tokens": 8}) for i in range(64)]
    t0 = time.perf_counter()
    got = together(c, calls)
    wall = time.perf_counter() - t0
    full = [r for r in got if isinstance(r, InferenceServerException)]
    assert full, "nothing overflowed: the test did not fill the queue"
    for r in full:
        assert "generation queue is full (1 requests wait" in str(r), r
        assert r.status() == "StatusCode.UNAVAILABLE", r.status()
    served = [(call, r) for call, r in zip(calls, got) if not isinstance(r, Exception)]
    assert len(served) >= 5  # the batch and the queue were used
    for (row, kw), tokens in served:
        assert tokens == ref.generate([row], **kw).sequences[0], (row, kw)
    assert wall < 60
    assert generate(c, ROWS[0]) == ref.generate([ROWS[0]]).sequences[0]
    c.close()


def test_static_batching_stays_selectable(tight_server, ref):
    """batching: static (per execute, today's path) still streams the Generator's tokens."""
    class Srv:  # _stream reads only grpc_url
        grpc_url = tight_server.grpc_url
    for row, kw in ((ROWS[2], {"max_new_tokens": 8}),
                    (ROWS[0], {"strategy": "sample", "seed": 5, "temperature": 1.2})):
        assert _stream(Srv, row, **kw)[0] == ref.generate([row], **kw).sequences[0]


def test_cancelled_streams_free_their_rows(server, ref):
    """Four streams (the batch's four rows) cancelled after their first token: the next four
    requests, all at once, still run and answer correctly (no row stays taken)."""
    quitters = []
    for i in range(4):
        got: queue.Queue = queue.Queue()
        q = grpcclient.InferenceServerClient(server.grpc_url)
        q.start_stream(callback=lambda result, error, got=got: got.put((result, error)))
        q.async_stream_infer(STREAM, _inputs(ROWS[4 - i % 2], 8),
                             enable_empty_final_response=True)
        quitters.append((q, got))
    for q, got in quitters:
        got.get(timeout=30)
        q.stop_stream(cancel_requests=True)
        q.close()
    c = grpcclient.InferenceServerClient(server.grpc_url)
    calls = [(ROWS[i], {"max_new_tokens": 8}) for i in range(4)]
    assert together(c, calls) == [ref.generate([r], **kw).sequences[0] for r, kw in calls]
    c.close()
