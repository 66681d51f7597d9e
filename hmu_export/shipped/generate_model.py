"""Triton python-backend generation model: encoder once, then the decoder step with a KV cache.

Copied verbatim to ``<repository>/<name>_generate/1/model.py`` and to
``<name>_generate_stream/1/model.py`` (the decoupled variant: its config says
``model_transaction_policy { decoupled: true }``). Like triton_python_model.py it must work from
the repository alone: it imports only numpy, onnxruntime (in-process mode) and Triton's
``triton_python_backend_utils``; the pure functions are importable outside Triton and tested.

The loop is the one of ``hmu_export.generate.generator.Generator`` (greedy, sampling, beam search), ported
here because the server has no hmu_export package; tests/test_triton_generate.py serves it and
checks that every strategy gives exactly the Generator's tokens. One request is one source
sequence (``src_ids`` [1, L]); its result equals ``Generator.generate([row], ...)`` with the same
options: its own sampling RNG (``seed``) and its own HMU noise (``noise_scale``, ``noise_seed``),
so the tokens a request gets never depend on what else was in its batch.

Batching (parameter ``batching``). ``inflight`` (default): ``execute`` checks each request and
queues it (bounded: ``max_queue_size``); a worker thread per instance keeps one running batch
(RunningBatch) that requests join between decoder steps and leave as soon as they finish or
their client goes, answering through response senders. ``static``: the requests of one
``execute`` (dynamic batching, ``allow_ragged_batch``) are checked one by one (a bad one gets its
own error), then generated together: greedy and sampling requests in one padded batch (per-row
max_new_tokens, temperature, top-k/p and RNG), beam requests grouped by (num_beams,
length_penalty, early_stopping, max_new_tokens); a group never exceeds the profile's batch max
(rows x beams).

Steps run in-process with ONNX Runtime over encoder.onnx / decoder.onnx in the version folder
(``parameters { key: "step_backend" value { string_value: "onnxruntime" } }``), or, with
``step_backend: "bls"``, as BLS requests to the models named by ``encoder_model`` /
``decoder_model`` (onnxruntime_onnx / tensorrt_plan models on a GPU host).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

try:  # present only inside Triton's python backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - outside Triton (unit tests)
    pb_utils = None


def _sibling(module: str) -> Any:
    """hmu_export/shipped/<module>.py: the package's module in tests, else the copy beside this
    file (the server has no hmu_export package)."""
    if __package__:
        import importlib

        try:
            return importlib.import_module("." + module, __package__)
        except ImportError:
            pass
    return _from_file(module)


def _from_file(module: str) -> Any:
    import importlib.util
    import sys

    name = f"hmu_generate_{module}"
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{module}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}") from None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded  # dataclasses resolve their module while being created
    spec.loader.exec_module(loaded)
    return loaded


TokenRules = _sibling("token_rules").TokenRules
request_options = _sibling("request_options")

SRC_IDS, MAX_NEW_TOKENS, TOKENS = "src_ids", "max_new_tokens", "tokens"
TEXT, GENERATED_TEXT = "text", "generated_text"  # models of builds that carry a tokenizer
STRATEGIES = request_options.STRATEGIES
MAX_SEED = request_options.SEED_MAX
# Request parameters (the request schema's options but max_new_tokens, which is an input).
# Numbers may arrive as strings: the python backend's stub passes bool / int / str only, so
# clients send floats as strings.
PARAMETERS = tuple(k for k in request_options.KINDS if k != "max_new_tokens")
SPEC_KEYS = ("vocab_size", "latent_dim", "pad_id", "bos_id", "eos_id", "batch_max",
             "src_len_min", "src_len_max", "max_new_tokens_max", "max_new_tokens_default",
             "layers", "heads", "head_dim")


class RequestError(ValueError):
    """A request the model cannot serve because of what it asks (shape, parameter, text):
    becomes that request's own error response, INVALID_ARGUMENT (gRPC) / 400 (HTTP)."""


class NonFiniteLogits(RuntimeError):
    """The model's logits for one request hold NaN or infinity: that request fails alone
    (INVALID_ARGUMENT when its own noise_scale caused it, INTERNAL on the mean path)."""

    def __init__(self, message: str, client: bool) -> None:
        super().__init__(message)
        self.client = client


# --------------------------------------------------------------------------- request checks
@dataclass(frozen=True)
class Options:
    """One request's settings (GenerationOptions of hmu_export.generate.generator, resolved)."""

    strategy: str = "greedy"
    max_new_tokens: int = 1
    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    noise_scale: float = 0.0
    noise_seed: int = 0

    @property
    def beam(self) -> bool:
        return self.strategy == "beam" and self.num_beams > 1


#: Options fields whose defaults the build's [generation] sets (parameter "decoding")
DECODING_KEYS = ("strategy", "num_beams", "length_penalty", "early_stopping", "temperature",
                 "top_k", "top_p")


def parse_options(params: Mapping[str, Any], max_new_tokens: int | None,
                  spec: Mapping[str, int], *, streaming: bool = False,
                  defaults: Mapping[str, Any] | None = None) -> Options:
    """Validated Options from request parameters (and the optional max_new_tokens input);
    ``defaults``: the build's decoding defaults for what the request leaves out."""
    if not isinstance(params, Mapping):
        raise RequestError(f"request parameters must be a JSON object, got "
                           f"{request_options.show(params)}")
    unknown = sorted(str(k) for k in params if k not in PARAMETERS)
    if unknown:
        raise RequestError(f"unknown request parameter(s) "
                           f"{', '.join(request_options.show(k) for k in unknown[:5])} "
                           f"(known: {', '.join(PARAMETERS)})")
    n = spec["max_new_tokens_default"] if max_new_tokens is None else max_new_tokens
    base = {k: v for k, v in (defaults or {}).items() if k in DECODING_KEYS}
    try:  # the request schema every entry point shares (request_options.py)
        values = request_options.validate(dict(params), text=True)
        opts = Options(**{**base, **values, "max_new_tokens": n})
        request_options.validate({k: getattr(opts, k) for k in request_options.KINDS},
                                 max_new_tokens_max=spec["max_new_tokens_max"],
                                 batch_max=spec["batch_max"])
    except request_options.OptionError as exc:
        raise RequestError(str(exc)) from None
    if streaming and opts.beam:
        raise RequestError("strategy 'beam' cannot stream (a beam's tokens are only final when "
                           "the search ends): use the non-streaming generate model, or greedy "
                           "/ sample here")
    return opts


def check_source(src: np.ndarray | None, spec: Mapping[str, int]) -> list[int]:
    """One request's source row: int64 [1, L], L inside the profile, ids inside the vocabulary."""
    if src is None:
        raise RequestError(f"missing input '{SRC_IDS}'")
    if src.dtype != np.int64 or src.ndim != 2:
        raise RequestError(f"input '{SRC_IDS}' must be int64 [1, src_len], got {src.dtype} "
                           f"{list(src.shape)}")
    if src.shape[0] != 1:
        raise RequestError(f"one request is one source sequence: '{SRC_IDS}' must have shape "
                           f"[1, src_len], got {list(src.shape)} (send one request per row)")
    length = src.shape[1]
    lo, hi = spec["src_len_min"], spec["src_len_max"]
    if length == 0:
        raise RequestError(f"input '{SRC_IDS}' is empty")
    if not lo <= length <= hi:
        raise RequestError(f"source length {length} is outside the profile [{lo}, {hi}]")
    row = src[0]
    vocab = spec["vocab_size"]
    bad = row[(row < 0) | (row >= vocab)]
    if bad.size:
        raise RequestError(f"input '{SRC_IDS}' has token id {int(bad[0])} outside [0, {vocab})")
    return [int(t) for t in row]


def load_tokenizer(folder: str) -> Any:
    """The build's tokenizer (copied beside model.py), as hmu_export.model.tokenizer loads it."""
    try:
        import transformers
    except ImportError:
        raise RuntimeError("text requests need the transformers package (and sentencepiece for "
                           "SentencePiece tokenizers) in the server's Python; send src_ids "
                           "instead") from None
    return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


def encode_text(tokenizer: Any, arr: np.ndarray) -> np.ndarray:
    """One request's ``text`` BYTES [1, 1] -> src_ids int64 [1, L] (special tokens added as
    Transformers adds them for the encoder input)."""
    if arr.dtype != np.object_ or arr.shape != (1, 1):
        raise RequestError(f"input '{TEXT}' must be one string (BYTES [1, 1]), got {arr.dtype} "
                           f"{list(arr.shape)}")
    value = arr[0, 0]
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"input '{TEXT}' is not valid UTF-8") from None
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"input '{TEXT}' is empty")
    return np.asarray([tokenizer([value])["input_ids"][0]], dtype=np.int64)


def decode_tokens(tokenizer: Any, tokens: Sequence[int]) -> str:
    return str(tokenizer.batch_decode([list(tokens)], skip_special_tokens=True)[0])


def check_max_new_tokens(arr: np.ndarray | None) -> int | None:
    if arr is None:
        return None
    if arr.dtype != np.int64 or arr.size != 1:
        raise RequestError(f"input '{MAX_NEW_TOKENS}' must be one int64, got {arr.dtype} "
                           f"{list(arr.shape)}")
    return int(arr.reshape(-1)[0])


# --------------------------------------------------------------------------- token choice
# These three are hmu_export.generate.generator's own (log_softmax, sample_tokens, _Hypotheses); the
# served tests compare tokens with the Generator, so a change there shows up here.
def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)  # a copy: the in-place steps below leave logits alone
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def top_candidates(cand: np.ndarray, m: int,
                   largest: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
                   | None = None) -> np.ndarray:
    """The first ``m`` columns of a stable descending sort of each row of ``cand`` (beam
    search's k x vocab candidates), without sorting whole rows: a full sort of 4 x 58k
    candidates per row was most of a large-vocabulary step. ``largest(cand, n)`` gives each
    row's n largest (values, indices) in descending order (default numpy's partition; the
    Generator passes torch.topk). Ties break by index exactly as in the full sort: a row whose
    (m+1)-th largest equals its m-th (a tie across the cut) sorts every value tied with it."""
    n = cand.shape[1]
    m = min(m, n)
    if m == n:
        return np.argsort(-cand, axis=-1, kind="stable")
    vals, idx = (largest or _largest)(cand, min(m + 1, n))
    out = np.empty((cand.shape[0], m), dtype=np.int64)
    for j in range(cand.shape[0]):
        kth = vals[j, m - 1]
        sel = np.flatnonzero(cand[j] >= kth) if vals.shape[1] > m and vals[j, m] == kth \
            else idx[j, :m]
        out[j] = sel[np.lexsort((sel, -cand[j, sel]))][:m]
    return out


def _largest(cand: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argpartition(-cand, n - 1, axis=-1)[:, :n] if n < cand.shape[1] else \
        np.tile(np.arange(cand.shape[1]), (cand.shape[0], 1))
    vals = np.take_along_axis(cand, idx, axis=-1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return np.take_along_axis(vals, order, -1), np.take_along_axis(idx, order, -1)


def sample_tokens(logits: np.ndarray, rng: np.random.Generator, *, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    x = logits.astype(np.float64) / temperature
    order = np.argsort(-x, axis=-1, kind="stable")
    ranked = np.take_along_axis(x, order, axis=-1)
    if 0 < top_k < ranked.shape[-1]:
        ranked[:, top_k:] = -np.inf
    probs = np.exp(ranked - ranked[:, :1])
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p < 1.0:
        before = np.cumsum(probs, axis=-1) - probs
        probs = np.where(before < top_p, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    cum = np.cumsum(probs, axis=-1)
    u = rng.random((x.shape[0], 1)) * cum[:, -1:]
    pick = np.minimum((cum <= u).sum(axis=-1), np.count_nonzero(probs, axis=-1) - 1)
    return order[np.arange(x.shape[0]), pick]


class Hypotheses:
    """The best ``k`` finished hypotheses of one row, by sum log-prob / length ** penalty."""

    def __init__(self, k: int, length_penalty: float) -> None:
        self.k, self.lp = k, length_penalty
        self.items: list[tuple[float, list[int]]] = []

    def score(self, total: float, length: int) -> float:
        return total / (length ** self.lp)

    def add(self, tokens: list[int], total: float) -> None:
        s = self.score(total, len(tokens))
        if len(self.items) < self.k or s > self.items[-1][0]:
            self.items.append((s, tokens))
            self.items.sort(key=lambda it: -it[0])
            del self.items[self.k:]

    def done(self, best_running: float, cur_len: int, max_len: int, early: bool) -> bool:
        if best_running == -np.inf:
            return True
        if len(self.items) < self.k:
            return False
        if early or cur_len >= max_len:
            return True
        length = max_len if self.lp > 0 else cur_len + 1
        return self.items[-1][0] >= self.score(best_running, length)


def make_noise(length: int, latent: int, scale: float, seed: int) -> np.ndarray:
    """One request's HMU noise [length, latent], exactly Generator.noise for a batch of one."""
    if not scale:
        return np.zeros((length, latent), dtype=np.float32)
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((1, length, latent)) * scale).astype(np.float32)[0]


# --------------------------------------------------------------------------- the step state
Run = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class Steps:
    """Encoder once, then decoder steps with the KV cache (CachedStepper of hmu_export.generate.generator).

    ``encode`` / ``decode`` run the graphs (in-process ONNX Runtime, or BLS)."""

    def __init__(self, encode: Run, decode: Run, spec: Mapping[str, int]) -> None:
        self.encode, self.decode = encode, decode
        n = spec["layers"]
        self.heads, self.head_dim = spec["heads"], spec["head_dim"]
        self.cross = [f"{k}.{i}" for i in range(n) for k in ("cross_key", "cross_value")]
        self.past = [f"{k}.{i}" for i in range(n) for k in ("past_key", "past_value")]
        self.present = [f"{k}.{i}" for i in range(n) for k in ("present_key", "present_value")]
        self.state: dict[str, np.ndarray] = {}

    def start(self, ids: np.ndarray, mask: np.ndarray, noise: np.ndarray) -> None:
        out = self.encode({"src_ids": ids, "src_mask": mask, "noise": noise})
        self.start_from({"src_mask": mask, **{n: out[n] for n in self.cross}})

    def step(self, new_ids: np.ndarray) -> np.ndarray:
        feeds = dict(self.state)
        feeds["tgt_ids"] = new_ids
        past_mask = self.state["past_mask"]
        n = new_ids.shape[1]
        feeds["positions"] = (past_mask.sum(axis=1, dtype=np.int64)[:, None]
                              + np.arange(n, dtype=np.int64)[None, :])
        out = self.decode(feeds)
        for past, present in zip(self.past, self.present):
            self.state[past] = out[present]
        self.state["past_mask"] = np.concatenate(
            [past_mask, np.ones((past_mask.shape[0], n), dtype=np.int64)], axis=1)
        return out["logits"][:, -1, :]

    def select(self, rows: np.ndarray) -> None:
        self.state = {k: np.take(v, rows, axis=0) for k, v in self.state.items()}

    @property
    def rows(self) -> int:
        return int(self.state["src_mask"].shape[0]) if self.state else 0

    def join(self, ids: np.ndarray, mask: np.ndarray, noise: np.ndarray,
             repeats: np.ndarray) -> None:
        """Encode new sources and append their rows (row r ``repeats[r]`` times: beams) to the
        running state (in-flight batching): cross K/V padded to the longer source, an empty
        past masked out up to the batch's past length, so their positions start at 0."""
        out = self.encode({"src_ids": ids, "src_mask": mask, "noise": noise})
        new = {name: np.repeat(out[name], repeats, axis=0) for name in self.cross}
        new["src_mask"] = np.repeat(mask, repeats, axis=0)
        if not self.rows:
            self.start_from(new)
            return
        old_rows, rows = self.rows, new["src_mask"].shape[0]
        src_len = max(self.state["src_mask"].shape[1], new["src_mask"].shape[1])
        merged: dict[str, np.ndarray] = {}
        for name, arr in self.state.items():  # one copy each: old rows, then the new ones
            shape = [old_rows + rows, *arr.shape[1:]]
            if name == "src_mask" or name in self.cross:  # the source axis, padded
                shape[1 if name == "src_mask" else 2] = src_len
            both = np.zeros(shape, dtype=arr.dtype)  # new rows' past: zeros, masked out
            both[tuple(slice(0, n) for n in arr.shape)] = arr
            if name in new:
                part = new[name]
                both[(slice(old_rows, None), *(slice(0, n) for n in part.shape[1:]))] = part
            merged[name] = both
        self.state = merged

    def start_from(self, encoded: dict[str, np.ndarray]) -> None:
        """A fresh state from encoded rows (cross K/V and src_mask), past empty."""
        rows = encoded["src_mask"].shape[0]
        empty = np.zeros((rows, self.heads, 0, self.head_dim), dtype=np.float32)
        self.state = {**encoded, "past_mask": np.zeros((rows, 0), dtype=np.int64)}
        self.state.update({n: empty for n in self.past})

    def compact(self) -> None:
        """Drop the past and source columns no remaining row attends to (after rows left):
        the cache stays as long as the longest live request, not the longest ever seen."""
        if not self.rows:
            self.state = {}
            return
        for mask_name, names, axis in (("past_mask", self.past, 2),
                                       ("src_mask", self.cross, 2)):
            used = self.state[mask_name].any(axis=0)
            if used.all():
                continue
            keep = np.flatnonzero(used)
            self.state[mask_name] = self.state[mask_name][:, keep]
            for name in names:
                self.state[name] = np.take(self.state[name], keep, axis=axis)


@dataclass
class Job:
    """One request inside a batched generation."""

    row: list[int]
    opts: Options
    tokens: list[int] = field(default_factory=list)
    rng: np.random.Generator | None = None
    error: Exception | None = None  # this job failed alone (non-finite logits)


def bad_logits(logits: np.ndarray, jobs: Sequence[Job], rows: Sequence[int], step: int
               ) -> list[int]:
    """Batch rows whose logits hold NaN or infinity; their jobs get NonFiniteLogits (the
    Generator's check_logits, per request: the others of the batch go on)."""
    finite = np.isfinite(logits).all(axis=-1)
    bad = np.flatnonzero(~finite).tolist()
    for r in bad:
        fail_nonfinite(jobs[rows[r]], step)
    return bad


def fail_nonfinite(job: Job, step: int) -> None:
    """Mark ``job`` failed by non-finite logits at ``step`` (its first such step)."""
    if job.error is None:
        scale = job.opts.noise_scale
        why = (f"noise_scale {scale:g} drives the model's float32 arithmetic out of range: "
               "use a smaller one" if scale else "the model's weights or graphs are broken")
        job.error = NonFiniteLogits(f"the model's logits hold NaN or infinity at step "
                                    f"{step + 1} ({why})", client=bool(scale))


def pad_jobs(jobs: Sequence[Job], spec: Mapping[str, int]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src_ids, src_mask, noise) of ragged jobs, padded to the longest; noise per job."""
    longest = max(len(j.row) for j in jobs)
    ids = np.full((len(jobs), longest), spec["pad_id"], dtype=np.int64)
    mask = np.zeros((len(jobs), longest), dtype=np.int64)
    noise = np.zeros((len(jobs), longest, spec["latent_dim"]), dtype=np.float32)
    for r, job in enumerate(jobs):
        n = len(job.row)
        ids[r, :n], mask[r, :n] = job.row, 1
        noise[r, :n] = make_noise(n, spec["latent_dim"], job.opts.noise_scale,
                                  job.opts.noise_seed)
    return ids, mask, noise


# (job index, token, last of this job) -> True to drop that job now (its client went away)
OnToken = Callable[[int, int, bool], bool]


def generate_sequential(steps: Steps, jobs: Sequence[Job], spec: Mapping[str, int],
                        on_token: OnToken | None = None, rules: Any = None) -> None:
    """Greedy and sampling jobs in one batch; finished rows leave it. ``on_token`` sees every
    token as it is chosen (streaming). ``rules``: the build's TokenRules (raw logits)."""
    eos, bos = spec["eos_id"], spec["bos_id"]
    rules = rules if rules is not None and rules.active else None
    for job in jobs:
        job.rng = np.random.default_rng(job.opts.seed)
    ids, mask, noise = pad_jobs(jobs, spec)
    steps.start(ids, mask, noise)
    live = np.arange(len(jobs))
    cur = np.full((len(jobs), 1), bos, dtype=np.int64)
    t = 0
    while True:
        logits = steps.step(cur)
        failed = bad_logits(logits, jobs, live.tolist(), t)
        if failed:  # those rows leave the batch below; their numbers must not reach sampling
            logits = np.array(logits, dtype=np.float64)
            logits[failed] = 0.0
        if rules is not None:
            logits = rules.apply(logits.astype(np.float64),
                                 [[bos] + jobs[j].tokens for j in live.tolist()],
                                 max_new=[jobs[j].opts.max_new_tokens for j in live.tolist()],
                                 eos_ids=[eos])
        nxt = logits.argmax(axis=-1)
        for r, j in enumerate(live.tolist()):
            o = jobs[j].opts
            if o.strategy == "sample":
                nxt[r] = sample_tokens(logits[r:r + 1], jobs[j].rng, temperature=o.temperature,
                                       top_k=o.top_k, top_p=o.top_p)[0]
        going = np.ones(len(live), dtype=bool)
        for r, j in enumerate(live.tolist()):
            if jobs[j].error is not None:
                going[r] = False
                continue
            tok = int(nxt[r])
            jobs[j].tokens.append(tok)
            last = tok == eos or t == jobs[j].opts.max_new_tokens - 1
            if on_token is not None and on_token(j, tok, last):
                last = True
            going[r] = not last
        t += 1
        if not going.any():
            return
        if not going.all():
            keep = np.flatnonzero(going)
            steps.select(keep)
            live, nxt = live[keep], nxt[keep]
        cur = nxt.astype(np.int64).reshape(-1, 1)


def generate_beam(steps: Steps, jobs: Sequence[Job], spec: Mapping[str, int],
                  rules: Any = None) -> None:
    """Beam search over jobs that share (num_beams, length_penalty, early_stopping,
    max_new_tokens): Generator._beam, with the hypotheses of each job kept apart.
    ``rules``: the build's TokenRules (on log-probs)."""
    rules = rules if rules is not None and rules.active else None
    o = jobs[0].opts
    k, eos, max_new = o.num_beams, spec["eos_id"], o.max_new_tokens
    n_rows = len(jobs)
    hyps = [Hypotheses(k, o.length_penalty) for _ in range(n_rows)]
    ids, mask, noise = pad_jobs(jobs, spec)
    steps.start(ids, mask, noise)
    steps.select(np.repeat(np.arange(n_rows), k))
    live = list(range(n_rows))
    scores = np.full((n_rows, k), -np.inf)
    scores[:, 0] = 0.0
    history: list[list[int]] = [[] for _ in range(n_rows * k)]
    cur = np.full((n_rows * k, 1), spec["bos_id"], dtype=np.int64)
    for t in range(max_new):
        logits = steps.step(cur)
        failed = bad_logits(logits, jobs, [live[i // k] for i in range(len(live) * k)], t)
        if failed:  # those rows' jobs leave the search below
            logits = np.array(logits, dtype=np.float64)
            logits[failed] = 0.0
        logp = log_softmax(logits)
        if rules is not None:
            logp = rules.apply(logp, [[spec["bos_id"]] + h for h in history], max_new=max_new,
                               eos_ids=[eos])
        vocab = logp.shape[-1]
        cand = (scores.reshape(-1, 1) + logp).reshape(len(live), k * vocab)
        top = top_candidates(cand, 2 * k)
        last = t == max_new - 1
        rows_next, src_next, tok_next, score_next = [], [], [], []
        for j, row in enumerate(live):
            if jobs[row].error is not None:
                continue
            beams: list[tuple[int, int, float]] = []
            for c in top[j].tolist():
                total = float(cand[j, c])
                if total == -np.inf:
                    break
                beam, tok = divmod(c, vocab)
                seq = history[j * k + beam] + [tok]
                if tok == eos or last:
                    hyps[row].add(seq, total)
                else:
                    beams.append((j * k + beam, tok, total))
                if len(beams) == k:
                    break
            best = beams[0][2] if beams else -np.inf
            if last or hyps[row].done(best, t + 1, max_new, o.early_stopping):
                continue
            while len(beams) < k:
                beams.append((beams[0][0], eos, -np.inf))
            rows_next.append(row)
            for src, tok, total in beams:
                src_next.append(src)
                tok_next.append(tok)
                score_next.append(total)
        if not rows_next:
            break
        steps.select(np.asarray(src_next))
        history = [history[i] + [tok] for i, tok in zip(src_next, tok_next)]
        live = rows_next
        scores = np.asarray(score_next).reshape(len(live), k)
        cur = np.asarray(tok_next, dtype=np.int64).reshape(-1, 1)
    for job, h in zip(jobs, hyps):
        job.tokens = [] if job.error is not None else h.items[0][1] if h.items else []


def plan_groups(jobs: Sequence[Job], batch_max: int) -> list[list[int]]:
    """Indices of jobs generated together: sequential jobs in chunks of batch_max rows, beam
    jobs by their search settings in chunks of batch_max // num_beams."""
    seq = [i for i, j in enumerate(jobs) if not j.opts.beam]
    groups = [seq[s:s + batch_max] for s in range(0, len(seq), batch_max)]
    beams: dict[tuple, list[int]] = {}
    for i, j in enumerate(jobs):
        if j.opts.beam:
            o = j.opts
            beams.setdefault((o.num_beams, o.length_penalty, o.early_stopping,
                              o.max_new_tokens), []).append(i)
    for (k, *_), idx in beams.items():
        per = max(1, batch_max // k)
        groups += [idx[s:s + per] for s in range(0, len(idx), per)]
    return groups


# --------------------------------------------------------------------------- in-flight batching
BATCHING = ("inflight", "static")  # parameter "batching": the running batch, or per execute
CANCEL_POLL_S = 0.05  # how often the worker asks whether clients cancelled (~0.1 ms a slot)


class Unavailable(RuntimeError):
    """The model cannot take the request now (its waiting queue is full, or it is unloading):
    answered at once UNAVAILABLE (gRPC) / 503 (HTTP), never a hang; the client may retry."""


@dataclass(eq=False)
class Slot:
    """One request in the running batch: its job, its rows (1, or num_beams for beam search)
    and where its search stands. ``handle`` is the caller's (Triton's response sender)."""

    job: Job
    handle: Any = None
    width: int = 1
    t: int = 0  # decoder steps done
    scores: np.ndarray | None = None  # beam: the running score of each beam
    history: list[list[int]] = field(default_factory=list)  # beam: each beam's tokens
    hyps: Hypotheses | None = None  # beam: the finished hypotheses
    gone: bool = False  # its client went away: nothing more is sent


def new_slot(job: Job, handle: Any = None) -> Slot:
    """A slot with the job's own sampling RNG (seeded as the Generator seeds a request)."""
    o = job.opts
    job.rng = np.random.default_rng(o.seed)
    if not o.beam:
        return Slot(job, handle)
    scores = np.full(o.num_beams, -np.inf)
    scores[0] = 0.0  # identical beams at the start: only the first one is live
    return Slot(job, handle, o.num_beams, scores=scores,
                history=[[] for _ in range(o.num_beams)],
                hyps=Hypotheses(o.num_beams, o.length_penalty))


class Waiting:
    """The bounded FIFO of requests waiting for rows of the running batch. ``offer`` refuses
    past ``limit`` (the caller answers "queue full" at once); ``take`` hands out head requests
    while their rows fit: FIFO, so a beam group waiting for its rows is never overtaken."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {limit}")
        self.limit = limit
        self.items: list[Slot] = []

    def __len__(self) -> int:
        return len(self.items)

    def offer(self, slot: Slot) -> bool:
        if len(self.items) >= self.limit:
            return False
        self.items.append(slot)
        return True

    def take(self, free_rows: int) -> list[Slot]:
        n = 0
        while n < len(self.items) and self.items[n].width <= free_rows:
            free_rows -= self.items[n].width
            n += 1
        taken, self.items = self.items[:n], self.items[n:]
        return taken

    def remove(self, gone: Callable[[Slot], bool]) -> list[Slot]:
        """Take out the waiting slots ``gone`` says left (cancelled before they ran)."""
        out = [s for s in self.items if gone(s)]
        if out:
            leaving = set(map(id, out))
            self.items = [s for s in self.items if id(s) not in leaving]
        return out


# (slot, token, last of this slot) -> True to drop that slot now (its client went away)
OnSlotToken = Callable[[Slot, int, bool], bool]


class RunningBatch:
    """The running batch of one model instance: requests join between decoder steps (their
    encoder runs then, their cache rows are appended at their own positions), leave as soon
    as they finish or their client goes, and the cache is compacted behind them; never more
    rows than the profile's batch max. Each request keeps its own RNG, noise and rules, so its
    tokens are those of a single-request Generator run whatever joins or leaves."""

    def __init__(self, steps: Steps, spec: Mapping[str, int], rules: Any = None) -> None:
        self.steps, self.spec = steps, spec
        self.rules = rules if rules is not None and rules.active else None
        self.slots: list[Slot] = []
        self.cur = np.zeros((0, 1), dtype=np.int64)

    @property
    def rows(self) -> int:
        return sum(s.width for s in self.slots)

    @property
    def free_rows(self) -> int:
        return self.spec["batch_max"] - self.rows

    def join(self, slots: Sequence[Slot]) -> None:
        """Encode the new requests (one encoder call) and append their rows."""
        if not slots:
            return
        width = sum(s.width for s in slots)
        if width > self.free_rows:
            raise RuntimeError(f"{width} rows do not fit the {self.free_rows} free rows")
        ids, mask, noise = pad_jobs([s.job for s in slots], self.spec)
        if not self.slots:  # an empty batch starts afresh (whatever Steps held before)
            self.steps.state = {}
        self.steps.join(ids, mask, noise, np.asarray([s.width for s in slots]))
        self.slots += slots
        self.cur = np.concatenate(
            [self.cur, np.full((width, 1), self.spec["bos_id"], dtype=np.int64)])

    def drop(self, slots: Sequence[Slot]) -> None:
        """Remove slots (cancelled) between steps; their rows leave the cache."""
        leaving = set(map(id, slots))
        keep: list[int] = []
        o = 0
        for s in self.slots:
            if id(s) not in leaving:
                keep += range(o, o + s.width)
            o += s.width
        self.slots = [s for s in self.slots if id(s) not in leaving]
        self._keep(keep, self.cur[np.asarray(keep, dtype=np.int64), 0])

    def clear(self) -> list[Slot]:
        """Empty the batch (after a failure of the step itself); returns who was in it."""
        slots, self.slots = self.slots, []
        self.steps.state = {}
        self.cur = np.zeros((0, 1), dtype=np.int64)
        return slots

    def _keep(self, rows: Sequence[int], tokens: np.ndarray) -> None:
        if len(rows) != self.steps.rows or list(rows) != list(range(len(rows))):
            self.steps.select(np.asarray(rows, dtype=np.int64))
            self.steps.compact()
        self.cur = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)

    def step(self, on_token: OnSlotToken | None = None) -> list[Slot]:
        """One decoder step for every row; returns the slots that finished (tokens final, or
        ``job.error`` set), already out of the batch."""
        logits = self.steps.step(self.cur)
        keep: list[int] = []
        tokens: list[int] = []
        finished: list[Slot] = []
        o = 0
        for slot in self.slots:
            rows = logits[o:o + slot.width]
            if not np.isfinite(rows).all():
                fail_nonfinite(slot.job, slot.t)  # this request fails alone
                going = None
            elif slot.hyps is not None:
                going = self._beam(slot, rows)
            else:
                going = self._next(slot, rows, on_token)
            slot.t += 1
            if going is None:
                finished.append(slot)
            else:
                keep += [o + b for b, _ in going]
                tokens += [tok for _, tok in going]
            o += slot.width
        done = set(map(id, finished))
        self.slots = [s for s in self.slots if id(s) not in done]
        self._keep(keep, np.asarray(tokens, dtype=np.int64))
        return finished

    def _next(self, slot: Slot, logits: np.ndarray, on_token: OnSlotToken | None
              ) -> list[tuple[int, int]] | None:
        """Greedy / sampling: the slot's next token (generate_sequential for one row)."""
        job, o = slot.job, slot.job.opts
        eos, bos = self.spec["eos_id"], self.spec["bos_id"]
        if self.rules is not None:
            logits = self.rules.apply(logits.astype(np.float64), [[bos] + job.tokens],
                                      max_new=[o.max_new_tokens], eos_ids=[eos])
        if o.strategy == "sample":
            assert job.rng is not None
            tok = int(sample_tokens(logits, job.rng, temperature=o.temperature, top_k=o.top_k,
                                    top_p=o.top_p)[0])
        else:
            tok = int(logits.argmax(axis=-1)[0])
        job.tokens.append(tok)
        last = tok == eos or slot.t == o.max_new_tokens - 1
        if on_token is not None and on_token(slot, tok, last):
            slot.gone = last = True
        return None if last else [(0, tok)]

    def _beam(self, slot: Slot, logits: np.ndarray) -> list[tuple[int, int]] | None:
        """One beam-search step of one request (Generator._beam for a batch of one)."""
        job, o = slot.job, slot.job.opts
        k, eos, max_new, t = slot.width, self.spec["eos_id"], o.max_new_tokens, slot.t
        assert slot.hyps is not None and slot.scores is not None
        logp = log_softmax(logits)
        if self.rules is not None:
            logp = self.rules.apply(logp, [[self.spec["bos_id"]] + h for h in slot.history],
                                    max_new=max_new, eos_ids=[eos])
        vocab = logp.shape[-1]
        cand = (slot.scores.reshape(-1, 1) + logp).reshape(k * vocab)
        top = top_candidates(cand.reshape(1, -1), 2 * k)[0]
        last = t == max_new - 1
        beams: list[tuple[int, int, float]] = []
        for c in top.tolist():
            total = float(cand[c])
            if total == -np.inf:
                break
            beam, tok = divmod(c, vocab)
            if tok == eos or last:
                slot.hyps.add(slot.history[beam] + [tok], total)
            else:
                beams.append((beam, tok, total))
            if len(beams) == k:
                break
        best = beams[0][2] if beams else -np.inf
        if last or slot.hyps.done(best, t + 1, max_new, o.early_stopping):
            job.tokens = slot.hyps.items[0][1] if slot.hyps.items else []
            return None
        while len(beams) < k:  # fewer candidates than beams: dead fillers
            beams.append((beams[0][0], eos, -np.inf))
        slot.history = [slot.history[b] + [tok] for b, tok, _ in beams]
        slot.scores = np.asarray([total for _, _, total in beams])
        return [(b, tok) for b, tok, _ in beams]


# --------------------------------------------------------------------------- step backends
def ort_steps(version_dir: str, params: Mapping[str, str], spec: Mapping[str, int]) -> Steps:
    """encoder.onnx / decoder.onnx of the version folder in two ONNX Runtime sessions."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    threads = int(params.get("intra_op_threads", "0"))
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    sessions = [ort.InferenceSession(os.path.join(version_dir, params.get(key, default)), opts,
                                     providers=["CPUExecutionProvider"])
                for key, default in (("encoder_file", "encoder.onnx"),
                                     ("decoder_file", "decoder.onnx"))]
    # The cache geometry the config states must be the graph's own (declared input dims).
    dims = {i.name: i.shape for i in sessions[1].get_inputs()}
    missing = [n for n in ("positions", "past_mask") if n not in dims]
    if missing:
        raise RuntimeError(f"decoder graph has no {' / '.join(missing)} input (built before "
                           "per-row decoder state): rebuild it with this version")
    got = dims.get("past_key.0")
    if got is None or got[1] != spec["heads"] or got[3] != spec["head_dim"] or \
            f"past_key.{spec['layers'] - 1}" not in dims or f"past_key.{spec['layers']}" in dims:
        raise RuntimeError(f"decoder graph's cache {got} does not match the config's layers "
                           f"{spec['layers']} heads {spec['heads']} head_dim {spec['head_dim']}")

    def runner(sess: Any) -> Run:
        in_names = [i.name for i in sess.get_inputs()]
        out_names = [o.name for o in sess.get_outputs()]

        def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return dict(zip(out_names, sess.run(out_names, {n: feeds[n] for n in in_names})))
        return run

    return Steps(runner(sessions[0]), runner(sessions[1]), spec)


def bls_steps(params: Mapping[str, str], spec: Mapping[str, int]) -> Steps:
    """BLS requests to the encoder / decoder models (onnxruntime or tensorrt on a GPU host)."""
    n = spec["layers"]
    enc_in = ["src_ids", "src_mask", "noise"]
    enc_out = ["memory"] + [f"{k}.{i}" for i in range(n) for k in ("cross_key", "cross_value")]
    dec_in = (["tgt_ids", "src_mask", "positions", "past_mask"]
              + [f"{k}.{i}" for i in range(n) for k in ("cross_key", "cross_value")]
              + [f"{k}.{i}" for i in range(n) for k in ("past_key", "past_value")])
    dec_out = ["logits"] + [f"{k}.{i}" for i in range(n) for k in ("present_key",
                                                                    "present_value")]

    def bls(model: str, inputs: list[str], outputs: list[str]) -> Run:
        def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            request = pb_utils.InferenceRequest(
                model_name=model, requested_output_names=outputs,
                inputs=[pb_utils.Tensor(name, np.ascontiguousarray(feeds[name]))
                        for name in inputs])
            response = request.exec()
            if response.has_error():
                raise RuntimeError(f"BLS call to '{model}' failed: {response.error().message()}")
            return {name: _to_numpy(pb_utils.get_output_tensor_by_name(response, name))
                    for name in outputs}
        return run

    return Steps(bls(params["encoder_model"], enc_in, enc_out),
                 bls(params["decoder_model"], dec_in, dec_out), spec)


def _to_numpy(tensor: Any) -> np.ndarray:
    if tensor.is_cpu():
        return tensor.as_numpy()
    from torch.utils.dlpack import from_dlpack  # GPU outputs of a BLS call (GPU hosts)

    return from_dlpack(tensor.to_dlpack()).cpu().numpy()


# --------------------------------------------------------------------------- Triton entry point
def _error_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if not isinstance(exc, (RequestError, NonFiniteLogits, Unavailable)):
        line = f"internal error in the generation model ({type(exc).__name__}): {line}"
    return line


def is_client_error(exc: BaseException) -> bool:
    """Whether the request itself is at fault (its shape, parameters, text, or the noise it
    asked for): answered INVALID_ARGUMENT / 400 so retry policies and alerts do not count it as
    a server fault; anything else is INTERNAL / 500."""
    return isinstance(exc, RequestError) or (isinstance(exc, NonFiniteLogits) and exc.client)


def triton_error(exc: BaseException) -> Any:
    """The pb_utils.TritonError of one failed request, with its status code."""
    code_name = ("INVALID_ARG" if is_client_error(exc) else
                 "UNAVAILABLE" if isinstance(exc, Unavailable) else "INTERNAL")
    code = getattr(pb_utils.TritonError, code_name, None)
    line = _error_line(exc)
    return pb_utils.TritonError(line) if code is None else pb_utils.TritonError(line, code)


class TritonPythonModel:
    """Entry point Triton's python backend looks for (both the plain and the decoupled model)."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.spec = {k: int(params[k]) for k in SPEC_KEYS}
        decoding = json.loads(params.get("decoding", "{}"))
        self.defaults = {k: v for k, v in decoding.items() if k in DECODING_KEYS}
        self.rules = TokenRules.from_mapping(decoding.get("rules", {}))
        self.tokenizer: Any = None
        self.tokenizer_error = ""
        if params.get("tokenizer_dir"):  # a failure here fails text requests only
            folder = os.path.join(args["model_repository"], args["model_version"],
                                  params["tokenizer_dir"])
            try:
                self.tokenizer = load_tokenizer(folder)
            except Exception as exc:  # noqa: BLE001 - reported to each text request
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                self.tokenizer_error = f"the model's tokenizer did not load: {first}"
        self.streaming = bool(config.get("model_transaction_policy", {}).get("decoupled"))
        backend = params.get("step_backend", "onnxruntime")
        precision = params.get("precision", "fp32")
        if backend == "bls" and precision != "fp32":  # the BLS targets run the fp32 graphs
            raise ValueError(f"an {precision} generation model runs its own graphs "
                             "(step_backend onnxruntime); step_backend bls would run fp32")
        if backend == "bls":
            self.steps = bls_steps(params, self.spec)
        elif backend == "onnxruntime":
            self.steps = ort_steps(os.path.join(args["model_repository"], args["model_version"]),
                                   params, self.spec)
        else:
            raise ValueError(f"parameter step_backend must be onnxruntime or bls, got "
                             f"{backend!r}")
        self._sent: dict[Any, str] = {}  # streamed text so far, per request
        self.batching = params.get("batching", "inflight")
        if self.batching not in BATCHING:
            raise ValueError(f"parameter batching must be one of {BATCHING}, got "
                             f"{self.batching!r}")
        if self.batching == "inflight":
            import threading

            self.waiting = Waiting(int(params.get("max_queue_size",
                                                  str(16 * self.spec["batch_max"]))))
            self.batch = RunningBatch(self.steps, self.spec, self.rules)
            self.cond = threading.Condition()
            self.stopping = False
            self.worker = threading.Thread(target=self._serve_inflight, daemon=True,
                                           name="hmu-inflight")
            self.worker.start()

    def _job(self, request: Any) -> Job:
        src = pb_utils.get_input_tensor_by_name(request, SRC_IDS)
        text = pb_utils.get_input_tensor_by_name(request, TEXT)
        ids = None if src is None else src.as_numpy()
        if text is not None:
            if src is not None:
                raise RequestError(f"send '{TEXT}' or '{SRC_IDS}', not both")
            if self.tokenizer is None:
                raise RequestError(self.tokenizer_error or "this model has no tokenizer")
            ids = encode_text(self.tokenizer, text.as_numpy())
        row = check_source(ids, self.spec)
        mnt = pb_utils.get_input_tensor_by_name(request, MAX_NEW_TOKENS)
        try:
            params = json.loads(request.parameters() or "{}")
        except ValueError:
            raise RequestError("request parameters are not valid JSON") from None
        opts = parse_options(params, check_max_new_tokens(None if mnt is None else mnt.as_numpy()),
                             self.spec, streaming=self.streaming, defaults=self.defaults)
        return Job(row, opts)

    def execute(self, requests: list[Any]) -> list[Any] | None:
        if self.batching == "inflight":
            self._enqueue(requests)
            return None  # the running batch answers through each request's response sender
        jobs: dict[int, Job] = {}
        errors: dict[int, Exception] = {}
        for i, request in enumerate(requests):
            try:
                jobs[i] = self._job(request)
            except Exception as exc:  # RequestError, or a bug: this request's error only
                errors[i] = exc
        if self.streaming:
            self._stream(requests, jobs, errors)
            return None
        order = list(jobs)
        for group in plan_groups([jobs[i] for i in order], self.spec["batch_max"]):
            members = [order[g] for g in group]
            try:
                batch = [jobs[i] for i in members]
                if batch[0].opts.beam:
                    generate_beam(self.steps, batch, self.spec, self.rules)
                else:
                    generate_sequential(self.steps, batch, self.spec, rules=self.rules)
            except Exception as exc:  # the group's failure, not the other groups'
                for i in members:
                    errors[i] = exc
            for i in members:  # a request whose own logits went non-finite fails alone
                if jobs[i].error is not None:
                    errors.setdefault(i, jobs[i].error)
        responses = []
        for i in range(len(requests)):
            if i in errors:
                responses.append(pb_utils.InferenceResponse(error=triton_error(errors[i])))
            else:
                arr = np.asarray([jobs[i].tokens], dtype=np.int64)
                outputs = [pb_utils.Tensor(TOKENS, arr)]
                if self.tokenizer is not None:
                    outputs.append(self._text(decode_tokens(self.tokenizer, jobs[i].tokens)))
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses

    def _stream(self, requests: list[Any], jobs: dict[int, Job],
                errors: dict[int, Exception]) -> None:
        """Decoupled: one response per token per request, then an empty FINAL response."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        senders = [r.get_response_sender() for r in requests]
        self._sent.clear()  # streamed text so far, per request of this execute
        for i, exc in errors.items():
            senders[i].send(pb_utils.InferenceResponse(error=triton_error(exc)), flags=final)
        order = list(jobs)
        for group in plan_groups([jobs[i] for i in order], self.spec["batch_max"]):
            members = [order[g] for g in group]
            done: set[int] = set()

            def on_token(j: int, tok: int, last: bool) -> bool:
                """Send one token; True drops the request (cancelled, or its stream is gone),
                so one client going away never fails the others of the batch."""
                i = members[j]
                sender = senders[i]
                try:
                    if sender.is_cancelled():
                        last = True
                    else:
                        outputs = [pb_utils.Tensor(TOKENS, np.asarray([[tok]], dtype=np.int64))]
                        if self.tokenizer is not None:
                            outputs.append(self._text(self._delta(i, jobs[i].tokens)))
                        sender.send(pb_utils.InferenceResponse(output_tensors=outputs))
                    if last:
                        done.add(i)
                        sender.send(flags=final)
                except Exception:  # the stream is closed: nothing more to send it
                    done.add(i)
                    return True
                return last

            try:
                generate_sequential(self.steps, [jobs[i] for i in members], self.spec, on_token,
                                    rules=self.rules)
            except Exception as exc:
                for i in members:
                    if i not in done:
                        done.add(i)
                        senders[i].send(pb_utils.InferenceResponse(error=triton_error(exc)),
                                        flags=final)
            for i in members:  # a request whose own logits went non-finite fails alone
                if i not in done and jobs[i].error is not None:
                    try:
                        senders[i].send(pb_utils.InferenceResponse(
                            error=triton_error(jobs[i].error)), flags=final)
                    except Exception:  # noqa: BLE001 - its stream is gone: nothing to tell
                        pass

    # ------------------------------------------------------------------ in-flight batching
    def _enqueue(self, requests: list[Any]) -> None:
        """Check each request (a bad one is answered at once, alone) and queue it for the
        running batch; a full queue answers UNAVAILABLE at once."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for request in requests:
            sender = request.get_response_sender()
            try:
                slot = new_slot(self._job(request), sender)
                with self.cond:
                    if self.stopping:
                        raise Unavailable("the model is unloading: retry on another instance")
                    if not self.waiting.offer(slot):
                        raise Unavailable(f"the generation queue is full ({self.waiting.limit} "
                                          "requests wait for the running batch): retry later")
                    self.cond.notify()
            except Exception as exc:  # RequestError, Unavailable, or a bug: its own error
                _send_quietly(sender, pb_utils.InferenceResponse(error=triton_error(exc)), final)

    def _serve_inflight(self) -> None:
        """The instance's worker thread: admit waiting requests between steps, step, answer.
        Cancellation is asked every CANCEL_POLL_S (each ask is a round trip to the server)."""
        import time

        polled = 0.0
        while True:
            with self.cond:
                while not self.stopping and not self.batch.slots and not len(self.waiting):
                    self.cond.wait()
                if self.stopping:
                    return
                poll = time.monotonic() - polled >= CANCEL_POLL_S
                waiting = list(self.waiting.items) if poll else []
            # ask outside the lock (round trips), so arriving requests are never held up
            gone = {id(s) for s in waiting if _cancelled(s)}
            with self.cond:
                left = self.waiting.remove(lambda s: id(s) in gone) if gone else []
                joining = self.waiting.take(self.batch.free_rows)
            if poll:
                polled = time.monotonic()
            for slot in left:
                slot.gone = True
                self._finish(slot)
            try:
                self._cycle(joining, poll)
            except Exception as exc:  # the step itself failed: every running request fails
                for slot in self.batch.clear():
                    slot.job.error = slot.job.error or exc
                    self._finish(slot)

    def _cycle(self, joining: list[Slot], poll: bool) -> None:
        try:
            self.batch.join(joining)
        except Exception as exc:  # their encoder run failed: they fail, the batch goes on
            for slot in joining:
                slot.job.error = exc
                self._finish(slot)
        gone = [s for s in self.batch.slots if _cancelled(s)] if poll else []
        if gone:  # clients that cancelled or disconnected free their rows now
            self.batch.drop(gone)
            for slot in gone:
                slot.gone = True
                self._finish(slot)
        if self.batch.slots:
            for slot in self.batch.step(self._on_token if self.streaming else None):
                self._finish(slot)

    def _on_token(self, slot: Slot, tok: int, last: bool) -> bool:
        """Stream one token; True when the stream is gone (its slot leaves the batch)."""
        outputs = [pb_utils.Tensor(TOKENS, np.asarray([[tok]], dtype=np.int64))]
        if self.tokenizer is not None:
            outputs.append(self._text(self._delta(id(slot), slot.job.tokens)))
        return not _send_quietly(slot.handle, pb_utils.InferenceResponse(output_tensors=outputs))

    def _finish(self, slot: Slot) -> None:
        """The request's last answer: its error, its tokens (plain), or the empty FINAL."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        self._sent.pop(id(slot), None)
        job = slot.job
        if slot.gone:
            response = pb_utils.InferenceResponse(
                error=pb_utils.TritonError("request cancelled",
                                           getattr(pb_utils.TritonError, "CANCELLED", 0)))
        elif job.error is not None:
            response = pb_utils.InferenceResponse(error=triton_error(job.error))
        elif self.streaming:
            _send_quietly(slot.handle, None, final)
            return
        else:
            outputs = [pb_utils.Tensor(TOKENS, np.asarray([job.tokens], dtype=np.int64))]
            if self.tokenizer is not None:
                outputs.append(self._text(decode_tokens(self.tokenizer, job.tokens)))
            response = pb_utils.InferenceResponse(output_tensors=outputs)
        _send_quietly(slot.handle, response, final)

    @staticmethod
    def _text(value: str) -> Any:
        return pb_utils.Tensor(GENERATED_TEXT, np.asarray([[value.encode("utf-8")]],
                                                          dtype=np.object_))

    def _delta(self, i: Any, tokens: Sequence[int]) -> str:
        """The text the newest token adds to request i's stream (decoding the whole prefix
        keeps SentencePiece spacing right)."""
        now = decode_tokens(self.tokenizer, tokens)
        before = self._sent.get(i, "")
        self._sent[i] = now
        return now[len(before):] if now.startswith(before) else now

    def finalize(self) -> None:
        if self.batching == "inflight":  # stop the worker; who still waits hears why
            with self.cond:
                self.stopping = True
                self.cond.notify()
            self.worker.join(timeout=10)
            for slot in self.waiting.items + self.batch.clear():
                slot.job.error = Unavailable("the model was unloaded before the request "
                                             "finished: retry")
                self._finish(slot)
        self.steps = None  # type: ignore[assignment]


def _cancelled(slot: Slot) -> bool:
    """Whether the slot's client cancelled or disconnected (Triton's response sender says)."""
    try:
        return bool(slot.handle.is_cancelled())
    except Exception:  # noqa: BLE001 - a sender that cannot answer has lost its client
        return True


def _send_quietly(sender: Any, response: Any, flags: int = 0) -> bool:
    """Send on a response sender; False when the stream is gone (nothing more to tell it)."""
    try:
        if response is None:
            sender.send(flags=flags)
        else:
            sender.send(response, flags=flags)
        return True
    except Exception:  # noqa: BLE001 - the client went away
        return False
