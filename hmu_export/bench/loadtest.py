"""Load test of the Triton streaming generation model: static vs in-flight batching.

Why: in-flight batching is a serving property (queueing, joins between steps, rows idling
behind long answers), so it is measured the way users meet it: a real ``tritonserver`` (the
nvidia-pytriton wheel's), open-loop Poisson arrivals at several offered rates (a request is sent
at its arrival time whether or not earlier ones were answered), mixed source and answer lengths,
greedy and seeded sampling mixed. Each request goes over one gRPC stream to
``<name>_generate_stream``, so the first token's arrival (TTFT) and the final response
(end-to-end latency) are both seen. Per rate: requests/s, tokens/s, TTFT and end-to-end p50 /
p95 / p99, errors, the server's RSS (tritonserver and its stub processes).

Both modes serve the same graphs; the mode is the model's ``batching`` parameter. Static runs
first: its saturation (the best requests/s it achieved) sets one more rate, 70% of it, run in
both modes, where the TTFT target is read. Targets are reported met or missed, never asserted.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..core.errors import InputError
from ..deploy.triton.generation import GEN_SUFFIX, GENERATE_STREAM, with_parameters

MODES = ("static", "inflight")
#: the targets of issue 18 (benchmarks/, not tests)
SATURATION_GAIN = 1.5  # in-flight tokens/s at saturation >= 1.5 x static's
TTFT_RATIO = 1 / 3  # p99 TTFT at 70% of static's saturation rate <= 1/3 of static's
LOW_RATE_SHARE = 0.7
RSS_GROWTH_MAX = 0.10  # server RSS growth over >= RSS_REQUESTS requests
RSS_REQUESTS = 2000


@dataclass(frozen=True)
class LoadSettings:
    """What one load test does."""

    rates: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0)  # offered requests/s, open loop
    duration_s: float = 20.0  # arrivals per rate span this long
    max_requests: int = 0  # per rate, 0 = rate x duration
    modes: tuple[str, ...] = MODES
    low_rate: bool = True  # also run 70% of static's saturation rate (TTFT target)
    sample_share: float = 0.3  # the rest is greedy
    new_tokens: tuple[int, int] = (0, 0)  # max_new_tokens range (0 = 1/8 .. all of the max)
    warmup: int = 32  # sent at once before the rates: the RSS baseline has seen full batches
    drain_s: float = 120.0  # wait this long after the last arrival for answers
    seed: int = 0
    #: a task set (JSONL of source / target texts) whose sources, tokenized with the model's
    #: tokenizer, are the requests' inputs (the trained default's test set); "" = random ids
    task: str = ""

    def check(self) -> None:
        if not self.rates or any(not (r > 0 and math.isfinite(r)) for r in self.rates):
            raise InputError("rates must be positive numbers")
        if self.duration_s <= 0 or self.max_requests < 0 or self.warmup < 0:
            raise InputError("duration must be > 0, requests and warmup >= 0")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise InputError(f"modes must be among {', '.join(MODES)}, got {', '.join(bad)}")
        if not 0 <= self.sample_share <= 1:
            raise InputError(f"sample share must be in [0, 1], got {self.sample_share}")


@dataclass
class StreamModel:
    """The streaming generation model of a repository, as its config states it."""

    name: str
    folder: Path
    params: dict[str, str]

    @property
    def spec(self) -> dict[str, int]:
        return {k: int(self.params[k]) for k in ("vocab_size", "src_len_min", "src_len_max",
                                                 "max_new_tokens_max", "batch_max")}


def find_stream_model(repository: Path, name: str | None = None) -> StreamModel:
    """The repository's ``*_generate_stream`` model (or ``name``); InputError otherwise."""
    from ..deploy.triton.config import parse_config

    if not repository.is_dir():
        raise InputError(f"{repository} is not a folder (a Triton repository written by "
                         "`python -m hmu_export triton`)")
    suffix = GEN_SUFFIX[GENERATE_STREAM]
    found = sorted(p.parent for p in repository.glob(f"*{suffix}/config.pbtxt"))
    if name is not None:
        found = [p for p in found if p.name == name]
    if not found:
        raise InputError(f"{repository} holds no streaming generation model "
                         f"({name or '*' + suffix}): write it with `python -m hmu_export "
                         "triton` from a build with encoder.onnx and decoder.onnx")
    if len(found) > 1:
        raise InputError(f"{repository} holds several streaming generation models "
                         f"({', '.join(p.name for p in found)}): choose one with --model")
    conf = parse_config((found[0] / "config.pbtxt").read_text())
    params = {k: v.string_value for k, v in conf.parameters.items()}
    return StreamModel(found[0].name, found[0], params)


# --------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Request:
    """One planned request: its source, answer length and parameters (the Generator's
    keyword arguments too)."""

    src_ids: tuple[int, ...]
    max_new_tokens: int
    params: dict[str, Any] = field(default_factory=dict)


Sources = Sequence[tuple[int, ...]]


def plan_requests(spec: dict[str, int], n: int, rng: np.random.Generator,
                  settings: LoadSettings, sources: Sources | None = None) -> list[Request]:
    """Mixed lengths: sources uniform over the profile's range, answers uniform over
    ``new_tokens`` (an untrained model seldom stops early, so this is the answer length), a
    ``sample_share`` of seeded sampling requests. With task ``sources`` (a trained model's
    real inputs) each request takes one drawn at random and may run to the profile's
    maximum: the model's own EOS decides the answer length."""
    lo_new, hi_new = settings.new_tokens
    hi_new = hi_new or spec["max_new_tokens_max"]
    lo_new = lo_new or max(1, hi_new // 8)
    out = []
    for _ in range(n):
        if sources:
            ids = sources[int(rng.integers(0, len(sources)))]
            new = hi_new
        else:
            length = int(rng.integers(spec["src_len_min"], spec["src_len_max"] + 1))
            ids = tuple(int(t) for t in rng.integers(3, spec["vocab_size"], length))
            new = int(rng.integers(lo_new, hi_new + 1))
        params: dict[str, Any] = {}
        if rng.random() < settings.sample_share:
            params = {"strategy": "sample", "seed": int(rng.integers(0, 2**31)),
                      "temperature": 0.8, "top_k": 40}
        out.append(Request(ids, new, params))
    return out


def rate_requests(spec: dict[str, int], settings: LoadSettings, rate: float, index: int,
                  sources: Sources | None = None) -> list[Request]:
    """The requests of the ``index``-th rate: the same in both modes (same seed)."""
    n = settings.max_requests or max(1, round(rate * settings.duration_s))
    return plan_requests(spec, n, np.random.default_rng(settings.seed + 1 + index), settings,
                         sources)


def task_sources(model: "StreamModel", path: str) -> list[tuple[int, ...]]:
    """The task set's sources as token ids, with the tokenizer the served model carries; only
    those inside the profile's source lengths (one line when none is, or there is no
    tokenizer)."""
    from ..core.task_set import read_pairs
    from ..model.tokenizer import Tokenizer, load_hf_tokenizer, tokenizer_files

    folder = model.folder / "1" / "tokenizer"
    if not tokenizer_files(folder):
        raise InputError(f"--task needs a model that carries a tokenizer; {model.name} has "
                         "none (its build had no tokenizer)")
    tok = Tokenizer(load_hf_tokenizer(folder))
    spec = model.spec
    ids = tok.encode([s for s, _ in read_pairs(path)])
    out = [tuple(row) for row in ids if spec["src_len_min"] <= len(row) <= spec["src_len_max"]]
    if not out:
        raise InputError(f"no source of {path} fits {model.name}'s source lengths "
                         f"{spec['src_len_min']}..{spec['src_len_max']}")
    return out


@dataclass
class Record:
    """What one request saw (seconds on the client's clock)."""

    sent: float
    first: float | None = None
    done: float | None = None
    tokens: int = 0


class StreamDriver:
    """One gRPC stream carrying every request (ids tell their responses apart). A response
    with an error carries no id on the stream, so errors are counted, not attributed."""

    def __init__(self, url: str, model: str) -> None:
        import tritonclient.grpc as grpcclient

        self.grpc, self.model = grpcclient, model
        self.client = grpcclient.InferenceServerClient(url)
        self.records: dict[str, Record] = {}
        self.errors: list[str] = []
        self.finished = 0
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.client.start_stream(callback=self._on_response)

    def _on_response(self, result: Any, error: Any) -> None:
        now = time.perf_counter()
        with self.lock:
            if error is not None:
                self.errors.append(str(error).splitlines()[0][:200] if str(error) else "error")
                self.finished += 1
            else:
                response = result.get_response()
                rec = self.records.get(response.id)
                if rec is not None:
                    out = result.as_numpy("tokens")
                    if out is not None and out.size:
                        rec.tokens += int(out.size)
                        rec.first = rec.first if rec.first is not None else now
                    if response.parameters["triton_final_response"].bool_param:
                        rec.done = now
                        self.finished += 1
            self.changed.notify_all()

    def send(self, rid: str, req: Request) -> None:
        arr = np.asarray([req.src_ids], dtype=np.int64)
        ids = self.grpc.InferInput("src_ids", list(arr.shape), "INT64")
        ids.set_data_from_numpy(arr)
        mnt = self.grpc.InferInput("max_new_tokens", [1, 1], "INT64")
        mnt.set_data_from_numpy(np.asarray([[req.max_new_tokens]], dtype=np.int64))
        with self.lock:
            self.records[rid] = Record(time.perf_counter())
        # floats as strings: the python backend's stub passes bool / int / str only
        params = {k: str(v) if isinstance(v, float) else v for k, v in req.params.items()}
        self.client.async_stream_infer(self.model, [ids, mnt], request_id=rid,
                                       parameters=params, enable_empty_final_response=True)

    def wait(self, count: int, timeout: float) -> bool:
        """Until ``count`` requests ended (final response or error), or the timeout."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.finished < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)
        return True

    def close(self) -> None:
        self.client.stop_stream(cancel_requests=True)
        self.client.close()


def run_rate(url: str, model: str, requests: Sequence[Request], rate: float, seed: int,
             drain_s: float) -> dict[str, Any]:
    """Send ``requests`` at Poisson arrival times of ``rate`` per second; their figures."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(requests))
    driver = StreamDriver(url, model)
    try:
        start = time.perf_counter()
        due = start
        for i, (req, gap) in enumerate(zip(requests, gaps)):
            due += float(gap)
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            driver.send(f"r{i}", req)
        last_sent = time.perf_counter()
        drained = driver.wait(len(requests), drain_s)
        with driver.lock:
            records = list(driver.records.values())
            errors = list(driver.errors)
    finally:
        driver.close()
    return summarize(records, errors, rate, start, last_sent, drained)


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    arr = np.asarray(values) * 1e3
    return {f"p{q}": round(float(np.percentile(arr, q)), 2) for q in (50, 95, 99)}


def summarize(records: Sequence[Record], errors: Sequence[str], rate: float, start: float,
              last_sent: float, drained: bool) -> dict[str, Any]:
    """One rate's row: throughput over the span from the first send to the last answer."""
    done = [r for r in records if r.done is not None]
    end = max([r.done for r in done if r.done is not None] + [last_sent])
    wall = max(end - start, 1e-9)
    tokens = sum(r.tokens for r in done)
    kinds: dict[str, int] = {}
    for e in errors:
        key = "queue full" if "queue is full" in e else e[:80]
        kinds[key] = kinds.get(key, 0) + 1
    return {
        "offered_rate": round(rate, 3), "sent": len(records), "completed": len(done),
        "errors": len(errors), "error_kinds": kinds,
        "unanswered": len(records) - len(done) - len(errors), "drained": drained,
        "wall_s": round(wall, 3), "arrival_s": round(last_sent - start, 3),
        "requests_per_s": round(len(done) / wall, 3), "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_ms": _percentiles([r.first - r.sent for r in done if r.first is not None]),
        "e2e_ms": _percentiles([r.done - r.sent for r in done if r.done is not None]),
    }


# --------------------------------------------------------------------------- the server
def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (the server and its stubs), MiB."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return round(total / 1024, 1)


Log = Callable[[str], None]
ExtraRate = Callable[[Sequence[dict[str, Any]]], "float | None"]


def mode_repository(model: StreamModel, mode: str, root: Path) -> Path:
    """A repository holding only the streaming model, with ``batching`` set to ``mode``."""
    repo = root / mode
    target = repo / model.name
    shutil.copytree(model.folder, target)
    conf = target / "config.pbtxt"
    conf.write_text(with_parameters(conf.read_text(), batching=mode))
    return repo


def run_mode(model: StreamModel, mode: str, settings: LoadSettings, rates: Sequence[float],
             workdir: Path, extra_rate: ExtraRate | None = None, log: Log = print,
             sources: Sources | None = None) -> dict[str, Any]:
    """Serve the model in ``mode`` and run every rate on that server (RSS across all of them).
    ``extra_rate(rows) -> rate | None`` adds one more rate once the others ran."""
    from ..deploy.triton.server import serve

    repo = mode_repository(model, mode, workdir)
    rng = np.random.default_rng(settings.seed)
    spec = model.spec
    rows: list[dict[str, Any]] = []
    with serve(repo, [model.name]) as server:
        url = server.grpc_url
        if settings.warmup:
            run_rate(url, model.name,
                     plan_requests(spec, settings.warmup, rng, settings, sources),
                     1000.0, settings.seed, settings.drain_s)
        rss_start = tree_rss_mb(server.process.pid)
        served = 0

        def one(rate: float, index: int) -> None:
            nonlocal served
            reqs = rate_requests(spec, settings, rate, index, sources)
            row = run_rate(url, model.name, reqs, rate, settings.seed + index, settings.drain_s)
            row["rss_mb"] = tree_rss_mb(server.process.pid)
            served += row["sent"]
            rows.append(row)
            log(f"{mode:8s} rate {rate:7.2f}/s: {row['requests_per_s']:7.2f} req/s "
                f"{row['tokens_per_s']:8.1f} tok/s  TTFT p99 {row['ttft_ms']['p99']} ms  "
                f"e2e p99 {row['e2e_ms']['p99']} ms  errors {row['errors']}  "
                f"RSS {row['rss_mb']} MiB")

        for i, rate in enumerate(rates):
            one(rate, i)
        more = extra_rate(rows) if extra_rate is not None else None
        if more is not None:
            one(more, len(rates))
            rows[-1]["low_rate"] = True
        rss_end = tree_rss_mb(server.process.pid)
    return {"rates": rows, "rss_start_mb": rss_start, "rss_end_mb": rss_end,
            "rss_growth": round((rss_end - rss_start) / rss_start, 4) if rss_start else None,
            "requests_total": served}


def saturation(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The best a mode did over all rates: its saturation throughput."""
    return {"requests_per_s": max((r["requests_per_s"] for r in rows), default=0.0),
            "tokens_per_s": max((r["tokens_per_s"] for r in rows), default=0.0)}


def run_loadtest(repository: Path, settings: LoadSettings, *, model_name: str | None = None,
                 log: Log = print) -> dict[str, Any]:
    """Both modes, one server each, one after the other; the report (see write_report)."""
    settings.check()
    model = find_stream_model(repository, model_name)
    sources = task_sources(model, settings.task) if settings.task else None
    report: dict[str, Any] = {
        "repository": str(repository), "model": model.name, "spec": model.spec,
        "settings": asdict(settings), "cpu_count": os.cpu_count(), "modes": {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    low: dict[str, float] = {}

    def low_rate(rows: Sequence[dict[str, Any]]) -> float | None:
        if not settings.low_rate:
            return None
        if "rate" not in low:  # the first mode run sets it (static, when it runs)
            low["rate"] = round(LOW_RATE_SHARE * saturation(rows)["requests_per_s"], 3)
        return low["rate"] or None

    order = [m for m in MODES if m in settings.modes]
    with tempfile.TemporaryDirectory(prefix="hmu-loadtest-") as tmp:
        for mode in order:
            report["modes"][mode] = run_mode(model, mode, settings, settings.rates, Path(tmp),
                                             low_rate, log, sources)
    report["low_rate"] = low.get("rate")
    report["saturation"] = {m: saturation(r["rates"]) for m, r in report["modes"].items()}
    report["targets"] = targets(report)
    return report


def _low_row(mode: dict[str, Any]) -> dict[str, Any] | None:
    return next((r for r in mode["rates"] if r.get("low_rate")), None)


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 18's three targets, each met / missed with the figures that decide it."""
    modes, out = report["modes"], []
    if "static" in modes and "inflight" in modes:
        s, f = report["saturation"]["static"], report["saturation"]["inflight"]
        gain = f["tokens_per_s"] / s["tokens_per_s"] if s["tokens_per_s"] else None
        out.append({"target": f"saturation tokens/s >= {SATURATION_GAIN}x static",
                    "value": None if gain is None else round(gain, 2),
                    "detail": f"in-flight {f['tokens_per_s']} vs static {s['tokens_per_s']} "
                              "tokens/s (best over all rates)",
                    "met": gain is not None and gain >= SATURATION_GAIN})
        ls, lf = _low_row(modes["static"]), _low_row(modes["inflight"])
        if ls and lf and ls["ttft_ms"]["p99"] and lf["ttft_ms"]["p99"] is not None:
            ratio = lf["ttft_ms"]["p99"] / ls["ttft_ms"]["p99"]
            out.append({"target": "p99 TTFT at 70% of static's saturation rate <= 1/3 static's",
                        "value": round(ratio, 3),
                        "detail": f"at {ls['offered_rate']} req/s: in-flight "
                                  f"{lf['ttft_ms']['p99']} ms vs static {ls['ttft_ms']['p99']} ms",
                        "met": ratio <= TTFT_RATIO})
    for name, mode in modes.items():
        enough = mode["requests_total"] >= RSS_REQUESTS
        growth = mode["rss_growth"]
        out.append({"target": f"{name}: server RSS growth <= {RSS_GROWTH_MAX:.0%} over "
                              f"{RSS_REQUESTS} requests",
                    "value": growth,
                    "detail": f"{mode['rss_start_mb']} -> {mode['rss_end_mb']} MiB over "
                              f"{mode['requests_total']} requests"
                              + ("" if enough else f" (fewer than {RSS_REQUESTS}: not judged)"),
                    "met": (growth is not None and growth <= RSS_GROWTH_MAX) if enough
                    else None})
    return out


# --------------------------------------------------------------------------- report
def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Load test: {report['model']} (static vs in-flight batching)", "",
             f"Repository `{report['repository']}`, {report['cpu_count']} CPUs, "
             f"{report['created']}. Open-loop Poisson arrivals over one gRPC stream; "
             "mixed source and answer lengths; greedy and seeded sampling mixed.", ""]
    for mode, data in report["modes"].items():
        lines += [f"## {mode}", "",
                  "| offered req/s | sent | done | errors | req/s | tokens/s | TTFT p50 / p95 / "
                  "p99 ms | e2e p50 / p95 / p99 ms | RSS MiB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in data["rates"]:
            t, e = r["ttft_ms"], r["e2e_ms"]
            mark = " (70% of static sat.)" if r.get("low_rate") else ""
            lines.append(f"| {r['offered_rate']}{mark} | {r['sent']} | {r['completed']} | "
                         f"{r['errors']} | {r['requests_per_s']} | {r['tokens_per_s']} | "
                         f"{t['p50']} / {t['p95']} / {t['p99']} | {e['p50']} / {e['p95']} / "
                         f"{e['p99']} | {r['rss_mb']} |")
        lines += ["", f"RSS {data['rss_start_mb']} -> {data['rss_end_mb']} MiB over "
                      f"{data['requests_total']} requests (growth {data['rss_growth']}).", ""]
    lines += ["## Targets", "", "| target | value | met | figures |", "|---|---|---|---|"]
    for t in report["targets"]:
        met = "not judged" if t["met"] is None else ("met" if t["met"] else "missed")
        lines.append(f"| {t['target']} | {t['value']} | {met} | {t['detail']} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Throughput against offered rate, and the throughput-latency curve, per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for color, (mode, data) in zip(("C0", "C1"), report["modes"].items()):
        rows = sorted(data["rates"], key=lambda r: r["offered_rate"])
        tps = [r["tokens_per_s"] for r in rows]
        a.plot([r["offered_rate"] for r in rows], tps, "o-", color=color, label=mode)
        b.plot(tps, [r["e2e_ms"]["p99"] or 0 for r in rows], "o-", color=color,
               label=f"{mode} e2e p99")
        b.plot(tps, [r["ttft_ms"]["p99"] or 0 for r in rows], "s--", color=color,
               label=f"{mode} TTFT p99")
    a.set(xlabel="offered requests/s", ylabel="generated tokens/s", title="throughput")
    b.set(xlabel="generated tokens/s", ylabel="latency ms", yscale="log",
          title="throughput vs latency")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{report['model']}: static vs in-flight batching")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write_report(report: dict[str, Any], base: Path) -> list[Path]:
    """``base``.json, .md and .png (written whole: a temporary file renamed)."""
    from ..core.fileio import atomic_path

    base.parent.mkdir(parents=True, exist_ok=True)
    paths = [base.with_suffix(s) for s in (".json", ".md", ".png")]
    with atomic_path(paths[0]) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=1) + "\n")
    with atomic_path(paths[1]) as tmp:
        Path(tmp).write_text(markdown(report))
    with atomic_path(paths[2]) as tmp:
        plot(report, Path(tmp))
    return paths


def parse_rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"--rates must be comma-separated numbers, got {text!r}") from None
    return rates
