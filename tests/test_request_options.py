"""One request schema for every entry point (issues 19 and 21), attacked as a careless or
hostile user would: the cases the issues name, then property-based tests (hypothesis) over the
schema, the Python API, the Triton model's request parsing, the CLI flags, the ``--input`` JSON
and the text path. Every attempt must end in a result or one error (an ``error:`` line on the
CLI), never a traceback, a hang or a silently wrong answer.

The oracle for the ranges (``documented``) is written here from docs/generation.md, not read
from hmu_export/shipped/request_options.py.
"""
from __future__ import annotations

import argparse
import json
import math
import warnings

import numpy as np
import pytest

from conftest import SMALL
from hmu_export.core.config import config_from_dict
from hmu_export.core.errors import GenerationError, HMUExportError, InputError
from hmu_export.generate.generator import GenerationOptions, Generator
from hmu_export.shipped import generate_model as tgm
from hmu_export.shipped import request_options as ro
from test_generate import TableBackend

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# Modest example counts: the CI machine has 2 cores.
FAST = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def documented(name: str, v) -> bool:
    """docs/generation.md's table of request options, as an independent oracle."""
    if name == "strategy":
        return v in ("greedy", "sample", "beam")
    if name in ("seed", "noise_seed"):
        return 0 <= v < 2**64
    if name == "temperature":
        return 0.001 <= v <= 1000
    if name == "length_penalty":
        return -10 <= v <= 10
    if name == "noise_scale":
        return 0 <= v <= 100
    if name == "top_k":
        return 0 <= v < 2**31
    if name == "top_p":
        return 0 < v <= 1
    if name in ("num_beams", "max_new_tokens"):
        return v >= 1
    return name == "early_stopping"


# --------------------------------------------------------------------------- the named cases
CASES = [  # (option, value, words of the error)
    ("seed", -1, "seed must be in [0, 18446744073709551615], got -1"),
    ("seed", 2**64, "seed must be in"),
    ("noise_seed", -1, "noise_seed must be in"),
    ("length_penalty", 400.0, "length_penalty must be in [-10, 10], got 400.0"),
    ("length_penalty", 1e308, "length_penalty must be in"),
    ("length_penalty", -400.0, "length_penalty must be in"),
    ("length_penalty", -1e308, "length_penalty must be in"),
    ("length_penalty", math.nan, "length_penalty must be a finite number"),
    ("temperature", 1e-310, "temperature must be in [0.001, 1000] (for the argmax, use "
                            "strategy greedy), got 1e-310"),
    ("temperature", 1e-320, "temperature must be in"),
    ("temperature", 0.0, "temperature must be in"),
    ("temperature", math.inf, "temperature must be a finite number"),
    ("noise_scale", 1e39, "noise_scale must be in [0, 100]"),
    ("noise_scale", -1.0, "noise_scale must be in"),
    ("top_k", -1, "top_k must be in"),
    ("top_k", 2**63, "top_k must be in"),
    ("top_p", 0.0, "top_p must be in (0, 1]"),
    ("top_p", 1.5, "top_p must be in"),
    ("num_beams", 0, "num_beams must be >= 1"),
    ("strategy", "nucleus", "strategy must be one of greedy, sample, beam"),
    ("seed", 1.5, "seed must be an integer"),
    ("seed", True, "seed must be an integer"),
    ("temperature", "hot", "temperature must be a number"),
    ("early_stopping", "yes", "early_stopping must be true or false"),
]


@pytest.mark.parametrize("name,value,words", CASES, ids=[f"{c[0]}={c[1]!r}" for c in CASES])
def test_the_issues_values_are_refused_by_the_schema(name, value, words):
    with pytest.raises(ro.OptionError) as info:
        ro.validate({name: value})
    assert words in str(info.value) and "\n" not in str(info.value)


def _table_gen(vocab: int = 7) -> Generator:
    cfg = config_from_dict({"model": {**SMALL["model"], "vocab_size": vocab},
                            "profile": {"batch": [1, 2, 4], "src_len": [1, 4, 8],
                                        "tgt_len": [1, 4, 8]}})
    return Generator(TableBackend(vocab, seed=1), cfg)


@pytest.mark.parametrize("name,value,words", CASES, ids=[f"{c[0]}={c[1]!r}" for c in CASES])
def test_the_python_api_refuses_them_with_one_input_error(name, value, words):
    """seed -1 was numpy's ValueError, length_penalty 400 an OverflowError in beam scoring,
    temperature 1e-310 a "sample" that was not the argmax, noise 1e39 all-0 sequences."""
    gen = _table_gen()
    strategy = {"length_penalty": "beam", "temperature": "sample", "top_k": "sample",
                "top_p": "sample", "num_beams": "beam"}.get(name, "sample")
    kw = {"strategy": strategy, "num_beams": 2, name: value}
    with pytest.raises(InputError) as info:
        gen.generate([[3, 1]], **kw)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_limits_are_inclusive_and_a_huge_seed_works():
    gen = _table_gen()
    for kw in ({"seed": 2**64 - 1, "noise_seed": 2**64 - 1, "noise_scale": 100.0},
               {"temperature": 1e-3}, {"temperature": 1e3}, {"top_k": 2**31 - 1}):
        res = gen.generate([[3, 1]], strategy="sample", max_new_tokens=3, **kw)
        assert len(res.sequences[0]) <= 3
    for lp in (-10.0, 10.0):
        gen.generate([[3, 1]], strategy="beam", num_beams=2, length_penalty=lp,
                     max_new_tokens=4)


def test_num_beams_above_the_batch_max_is_refused_for_one_row_too():
    with pytest.raises(InputError, match=r"num_beams 5 exceeds the profile's batch max \(4\)"):
        _table_gen().generate([[3]], strategy="beam", num_beams=5)


def test_unknown_python_api_option_is_an_input_error():
    with pytest.raises(InputError, match="temprature"):
        _table_gen().generate([[3]], temprature=1.0)
    with pytest.raises(InputError, match="GenerationOptions"):
        _table_gen().generate([[3]], options={"strategy": "beam"})


class NaNAt(TableBackend):
    """The table backend whose logits of batch row ``row`` turn NaN at step ``step``."""

    def __init__(self, vocab: int, step: int, row: int = 0, value: float = np.nan) -> None:
        super().__init__(vocab, seed=2)
        self.step, self.row, self.value, self.n = step, row, value, 0

    def encode(self, feeds):
        self.n = 0
        return super().encode(feeds)

    def decode(self, feeds):
        out = super().decode(feeds)
        if self.n == self.step and out["logits"].shape[0] > self.row:
            out["logits"][self.row, -1, 3] = self.value
        self.n += 1
        return out


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_fail_the_request(strategy, value):
    """`--noise-scale 1e39` gave NaN logits and all-0 sequences with exit 0: a NaN or infinite
    logit now fails the request, naming the row and the step."""
    cfg = _table_gen().cfg
    gen = Generator(NaNAt(7, step=1, row=1, value=value), cfg)
    with pytest.raises(GenerationError, match=r"row \d: the model's logits hold NaN or "
                                              r"infinity at step 2") as info:
        gen.generate([[3, 1], [2, 2]], strategy=strategy, num_beams=2, max_new_tokens=4,
                     eos_id=6, noise_scale=0.5)
    assert "noise_scale 0.5" in str(info.value)
    # the same request on finite logits is a result
    Generator(TableBackend(7, seed=2), cfg).generate([[3, 1], [2, 2]], strategy=strategy,
                                                     num_beams=2, max_new_tokens=4, eos_id=6)


# --------------------------------------------------------------------------- Triton's side
SPEC = {"vocab_size": 7, "latent_dim": 2, "pad_id": 0, "bos_id": 1, "eos_id": 6,
        "batch_max": 4, "src_len_min": 1, "src_len_max": 8, "max_new_tokens_max": 8,
        "max_new_tokens_default": 4, "layers": 1, "heads": 1, "head_dim": 1}


@pytest.mark.parametrize("name,value,words", CASES, ids=[f"{c[0]}={c[1]!r}" for c in CASES])
def test_the_triton_model_refuses_them_as_request_errors(name, value, words):
    """Triton parameters arrive as bool / int / str: both the value and its text."""
    for sent in ({name: value}, {name: value if isinstance(value, (bool, str)) else
                                 repr(value) if isinstance(value, float) else str(value)}):
        with pytest.raises(tgm.RequestError) as info:
            tgm.parse_options(sent, None, SPEC)
        assert words.split(",")[0].split(" got")[0] in str(info.value), (sent, info.value)
    with pytest.raises(tgm.RequestError, match="max_new_tokens must be in"):
        tgm.parse_options({}, 2**63, SPEC)


def test_triton_accepts_a_seed_up_to_2_64():
    opts = tgm.parse_options({"seed": str(2**64 - 1), "strategy": "sample"}, 3, SPEC)
    assert opts.seed == 2**64 - 1
    assert tgm.parse_options({"temperature": "0.001", "strategy": "sample"}, 3,
                             SPEC).temperature == 0.001


class TableSteps:
    """generate_model's Steps over the TableBackend (start / step / select)."""

    def __init__(self, backend: TableBackend) -> None:
        from hmu_export.generate.stepper import CachedStepper

        self.inner = CachedStepper(backend)

    def start(self, ids, mask, noise):
        self.inner.start(ids, mask, noise[..., :2])

    def step(self, cur):
        return self.inner.step(cur)

    def select(self, rows):
        self.inner.select(rows)


@pytest.mark.parametrize("params", [{}, {"strategy": "sample", "seed": 3},
                                    {"strategy": "beam", "num_beams": 2}])
def test_triton_non_finite_logits_fail_only_their_request(params):
    """Two requests batched together: the one whose logits turn NaN gets its own error (code
    INVALID_ARGUMENT: its noise_scale caused it), the other its Generator tokens."""
    rows = [[3, 1], [2, 2]]
    opts = [tgm.parse_options({**params, "noise_scale": "0.5"}, 4, SPEC),
            tgm.parse_options(params, 4, SPEC)]
    jobs = [tgm.Job(r, o) for r, o in zip(rows, opts)]
    steps = TableSteps(NaNAt(7, step=1, row=0))
    (tgm.generate_beam if opts[0].beam else tgm.generate_sequential)(steps, jobs, SPEC)
    assert isinstance(jobs[0].error, tgm.NonFiniteLogits) and jobs[0].error.client
    assert "NaN or infinity at step 2" in str(jobs[0].error)
    assert jobs[1].error is None
    gen = Generator(TableBackend(7, seed=2), _table_gen().cfg)
    want = gen.generate([rows[1]], eos_id=6, max_new_tokens=4,
                        **{k: v for k, v in params.items()}).sequences[0]
    assert jobs[1].tokens == want
    assert tgm.is_client_error(jobs[0].error)
    assert not tgm.is_client_error(tgm.NonFiniteLogits("x", client=False))
    assert not tgm.is_client_error(ValueError("a bug"))


# --------------------------------------------------------------------------- properties
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, -0.0, 5e-324, 1e-310, 1e-320, 1e-3, 1e3, 100.0,
                                    100.00000000000001, 10.0, -10.0, 1e308, -1e308, 1e39]))
INTS = st.one_of(st.integers(), st.sampled_from([-1, 0, 1, 2**31 - 1, 2**31, 2**63 - 1, 2**63,
                                                 2**64 - 1, 2**64, -(2**63)]))
TEXTS = st.one_of(st.text(max_size=30), st.sampled_from(["\ud800", "\udcff", "1e400", "nan",
                                                         " 12 ", "+3", "-0", "٣", "1_0",
                                                         "\x00", "true", "x" * 100_000]))
VALUES = st.one_of(FLOATS, INTS, TEXTS, st.booleans(), st.none(),
                   st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                        st.integers(),
                                                                        max_size=2))
OPTION = st.sampled_from(sorted(ro.KINDS))


@FAST
@given(name=OPTION, value=VALUES, text=st.booleans())
def test_schema_accepts_only_documented_values_and_raises_only_option_errors(name, value, text):
    try:
        out = ro.validate({name: value}, text=text)
    except ro.OptionError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 400
        return
    if value is None:
        assert out == {}
        return
    assert documented(name, out[name]), (name, value, out)
    if isinstance(out[name], float):
        assert math.isfinite(out[name])


@FAST
@given(name=st.sampled_from(["seed", "top_k", "num_beams", "temperature", "top_p",
                             "length_penalty", "noise_scale"]), value=st.one_of(FLOATS, INTS))
def test_a_number_and_its_text_are_judged_alike(name, value):
    """A Triton client sends floats as strings: the same value must meet the same verdict."""
    def verdict(v, text):
        try:
            return ro.validate({name: v}, text=text)[name]
        except ro.OptionError:
            return "refused"

    as_text = repr(value) if isinstance(value, float) else str(value)
    direct, parsed = verdict(value, False), verdict(as_text, True)
    if ro.KINDS[name] == "int" and isinstance(value, float):
        assert direct == "refused"
    elif isinstance(value, int) and len(as_text) > 60:
        pass  # a number written with more digits than any limit has: text refuses it early
    else:
        assert direct == parsed or (isinstance(direct, float) and direct == parsed)


GEN_OPTIONS = st.fixed_dictionaries({}, optional={name: VALUES for name in ro.KINDS})


@SLOW
@given(options=GEN_OPTIONS, rows=st.lists(st.lists(st.integers(-2, 9), max_size=9),
                                          max_size=5))
def test_python_api_ends_in_a_result_or_one_input_error(options, rows):
    gen = _table_gen()
    try:
        res = gen.generate(rows, **options)
    except InputError as exc:
        assert "\n" not in str(exc)
        return
    opts = gen.options(**options)
    assert len(res.sequences) == len(rows)
    for seq in res.sequences:
        assert 1 <= len(seq) <= opts.max_new_tokens and all(0 <= t < 7 for t in seq)
    if opts.strategy == "greedy":  # the argmax, whatever else the request set
        assert res.sequences == gen.generate(rows, max_new_tokens=opts.max_new_tokens,
                                             noise_scale=opts.noise_scale,
                                             noise_seed=opts.noise_seed).sequences


@SLOW
@given(params=st.dictionaries(st.one_of(OPTION, st.text(max_size=8)), VALUES, max_size=5),
       max_new=st.one_of(st.none(), INTS))
def test_triton_parameters_end_in_options_or_one_request_error(params, max_new):
    try:
        opts = tgm.parse_options(params, max_new, SPEC)
    except tgm.RequestError as exc:
        assert "\n" not in str(exc)
        return
    for name in ro.KINDS:
        assert documented(name, getattr(opts, name)), (name, opts)
    assert opts.max_new_tokens <= SPEC["max_new_tokens_max"]
    job = tgm.Job([3, 1], opts)
    steps = TableSteps(TableBackend(7, seed=2))
    (tgm.generate_beam if opts.beam else tgm.generate_sequential)(steps, [job], SPEC)
    assert job.error is None and 1 <= len(job.tokens) <= opts.max_new_tokens


# --------------------------------------------------------------------------- the CLI's side
def _namespace(**flags) -> argparse.Namespace:
    from hmu_export.commands.generate import FLAG_OPTIONS

    return argparse.Namespace(**{name: flags.get(name) for name in FLAG_OPTIONS})


@FAST
@given(flags=st.fixed_dictionaries({}, optional={
    name: st.one_of(TEXTS, FLOATS.map(repr), INTS.map(str))
    for name in ("max_new_tokens", "strategy", "num_beams", "length_penalty", "temperature",
                 "top_k", "top_p", "noise_scale", "seed")}))
def test_cli_flags_end_in_options_or_one_input_error_naming_the_flag(flags):
    from hmu_export.commands.generate import request_flags

    try:
        out = request_flags(_namespace(**flags))
    except InputError as exc:
        msg = str(exc)
        assert "\n" not in msg and msg.startswith("--") and len(msg) < 400
        return
    for name, value in out.items():
        assert documented(name, value)


def _json_value():
    leaf = st.one_of(st.none(), st.booleans(), INTS, st.floats(allow_nan=False),
                     st.text(max_size=5))
    return st.recursive(leaf, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
        max_leaves=20)


@FAST
@given(payload=st.one_of(
    _json_value(),
    st.fixed_dictionaries({"src_ids": _json_value()}),
    st.builds(lambda rows, extra: {"src_ids": rows, **extra},
              st.lists(st.lists(INTS, max_size=4), max_size=3),
              st.dictionaries(st.sampled_from(["max_new_tokens", "seed", "", "src_ids "]), INTS,
                              max_size=2))))
def test_input_json_ends_in_rows_or_one_input_error(tmp_path_factory, payload):
    from hmu_export.commands.generate import read_input

    path = tmp_path_factory.getbasetemp() / "prop_input.json"
    path.write_text(json.dumps(payload))
    try:
        rows = read_input(path)
    except InputError as exc:
        assert "\n" not in str(exc)
        if isinstance(payload, dict) and "src_ids" in payload and len(payload) > 1:
            assert "unknown key" in str(exc)
        return
    assert isinstance(payload, dict) and list(payload) == ["src_ids"] and rows


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deeply_nested_input_is_one_input_error(tmp_path, depth):
    from hmu_export.commands.generate import read_input

    path = tmp_path / "deep.json"
    path.write_text('{"src_ids": ' + "[" * depth + "]" * depth + "}")
    try:
        rows = read_input(path)
    except InputError as exc:
        assert "nests JSON too deeply" in str(exc)
    else:
        assert depth < 10_000 and rows


def test_input_file_with_unknown_key_names_it(tmp_path):
    from hmu_export.commands.generate import read_input

    path = tmp_path / "in.json"
    path.write_text(json.dumps({"src_ids": [[3]], "max_new_tokens": 1}))
    with pytest.raises(InputError, match="unknown key.*'max_new_tokens'"):
        read_input(path)


def test_input_from_an_endless_file_is_refused_not_read_forever():
    from hmu_export.commands.generate import read_input

    with pytest.raises(InputError, match="larger than 64 MiB"):
        read_input("/dev/zero")


# --------------------------------------------------------------------------- texts
@pytest.fixture(scope="module")
def word_tokenizer():
    pytest.importorskip("tokenizers")
    from test_text import _tokenizer

    from hmu_export.model.tokenizer import Tokenizer

    return Tokenizer(_tokenizer(40))


SURROGATES = st.lists(st.integers(0xD800, 0xDFFF).map(chr), min_size=1, max_size=3).map("".join)
TEXT_INPUTS = st.one_of(st.text(), st.tuples(st.text(max_size=5), SURROGATES).map("".join),
                        st.text(alphabet=st.characters(categories=["Cc", "Cf", "Zs"])),
                        st.just("a " * 500_000), st.just("\udcffabc"), st.just("ab\ud800"))


@SLOW
@given(texts=st.lists(TEXT_INPUTS, min_size=1, max_size=3))
def test_texts_end_in_ids_or_one_input_error(word_tokenizer, texts):
    try:
        rows = word_tokenizer.encode(texts)
    except InputError as exc:
        assert "\n" not in str(exc)
        bad = [t for t in texts if not t.strip() or any(0xD800 <= ord(c) <= 0xDFFF for c in t)]
        assert bad, exc
        return
    assert len(rows) == len(texts) and all(isinstance(i, int) for r in rows for i in r)


@SLOW
@given(value=st.one_of(st.binary(max_size=64), st.text().map(lambda t: t.encode("utf-8",
                                                                              "surrogatepass")),
                       st.just(b"\xff\xfe"), st.just(b"a " * 500_000)))
def test_triton_text_ends_in_ids_or_one_request_error(word_tokenizer, value):
    arr = np.asarray([[value]], dtype=np.object_)
    try:
        ids = tgm.encode_text(word_tokenizer.tok, arr)
    except tgm.RequestError as exc:
        assert "\n" not in str(exc)
        return
    assert ids.dtype == np.int64 and ids.shape[0] == 1


def test_a_lone_surrogate_is_one_input_error_naming_the_byte(word_tokenizer):
    from hmu_export.model.tokenizer import check_texts

    with pytest.raises(InputError, match=r"--text 0 is not valid Unicode text: character 2 is "
                                         r"the byte 0xff, which is not UTF-8"):
        check_texts(["ab\udcff"], "--text")
    with pytest.raises(InputError, match=r"text 1 .* lone surrogate U\+D800"):
        word_tokenizer.encode(["a", "b\ud800"])


# --------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """A build (checkpoint and graphs, with its manifest) of the tiny SMALL config."""
    from hmu_export.build.pipeline import run_build

    out = tmp_path_factory.mktemp("req") / "hmu-tiny"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = run_build(config_from_dict(SMALL), out, only=["checkpoint", "export"])
    assert outcome.ok, outcome.failure
    root = outcome.out_dir
    inp = root.parent / "in.json"
    inp.write_text(json.dumps({"src_ids": [[5, 17, 9], [4, 4]]}))
    return root, inp


CLI_CASES = [  # the issues' command lines
    (["--strategy", "sample", "--seed", "-1"], "--seed: seed must be in"),
    (["--noise-scale", "1", "--seed", "-1"], "--seed: seed must be in"),
    (["--strategy", "beam", "--num-beams", "2", "--length-penalty", "400"],
     "--length-penalty: length_penalty must be in [-10, 10]"),
    (["--strategy", "beam", "--num-beams", "2", "--length-penalty", "1e308"], "length_penalty"),
    (["--strategy", "beam", "--num-beams", "2", "--length-penalty=-1e308"], "length_penalty"),
    (["--strategy", "sample", "--temperature", "1e-310"], "--temperature: temperature must be "
                                                           "in [0.001, 1000]"),
    (["--noise-scale", "1e39"], "--noise-scale: noise_scale must be in [0, 100]"),
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--top-k", "9" * 5000], "--top-k: top_k must be an integer"),
    (["--strategy", "nucleus"], "strategy must be one of greedy, sample, beam"),
    (["--strategy", "beam", "--num-beams", "5"], "num_beams 5 exceeds the profile's batch max"),
]


@pytest.mark.parametrize("args,words", CLI_CASES, ids=[" ".join(a)[:40] for a, _ in CLI_CASES])
def test_cli_cases_are_one_error_line(tiny_build, capsys, args, words):
    from hmu_export.commands.cli import main

    root, inp = tiny_build
    assert main(["generate", "--artifacts", str(root), "--input", str(inp), "--backend",
                 "onnxruntime", *args]) == 2
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


@SLOW
@given(flags=st.fixed_dictionaries({}, optional={
    "--temperature": FLOATS.map(repr), "--seed": INTS.map(str), "--top-k": INTS.map(str),
    "--top-p": FLOATS.map(repr), "--length-penalty": FLOATS.map(repr),
    "--noise-scale": FLOATS.map(repr), "--max-new-tokens": INTS.map(str),
    "--num-beams": st.integers(-1, 6).map(str),
    "--strategy": st.sampled_from(["greedy", "sample", "beam", "x"])}))
def test_the_command_ends_in_a_result_or_one_error_line(tiny_build, capsys, flags):
    from hmu_export.commands.cli import main

    root, inp = tiny_build
    argv = ["generate", "--artifacts", str(root), "--input", str(inp), "--threads", "1",
            "--backend", "onnxruntime"]
    for flag, value in flags.items():
        argv.append(f"{flag}={value}")  # '=' keeps a negative value a value
    code = main(argv)
    out = capsys.readouterr()
    if code == 0:
        assert out.err == "" and "generate:" in out.out
    else:
        err = out.err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), out.err


def test_a_lone_surrogate_in_argv_bytes_is_one_error_line(tiny_build):
    """`--text` from bytes that are not UTF-8 (Python makes a lone surrogate of them): one
    error line, not the tokenizer's TypeError."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root, _ = tiny_build
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    res = subprocess.run([sys.executable.encode(), b"-m", b"hmu_export", b"generate",
                          b"--artifacts", str(root).encode(), b"--text", b"ab\xffcd"],
                         capture_output=True, env=env, timeout=120)
    err = res.stderr.decode("utf-8", "replace").strip().splitlines()
    assert res.returncode == 2 and len(err) == 1, res.stderr
    assert err[0] == ("error: --text 0 is not valid Unicode text: character 2 is the byte "
                      "0xff, which is not UTF-8")


def test_every_refusal_is_a_package_error():
    """The schema's OptionError never escapes an entry point as itself."""
    assert not issubclass(ro.OptionError, HMUExportError)
    with pytest.raises(InputError):
        GenerationOptions(strategy="greedy", max_new_tokens=1, num_beams=1, length_penalty=1.0,
                          early_stopping=False, temperature=1.0, top_k=0, top_p=1.0,
                          noise_scale=-1.0, bos_id=1, eos_id=2).validate()


def test_input_from_a_fifo_without_writer_is_one_error_not_a_hang(tmp_path):
    """Found by scripts/hostile.py: open() of a FIFO nobody writes to waited forever."""
    import os
    import threading

    from hmu_export.commands.generate import read_input

    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    outcome: list[BaseException | list[list[int]]] = []

    def read() -> None:
        try:
            outcome.append(read_input(fifo))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(20)
    if reader.is_alive():  # unblock the stuck open() so the thread can end, then fail
        os.close(os.open(fifo, os.O_WRONLY))
        pytest.fail("read_input blocked on a FIFO without a writer")
    assert isinstance(outcome[0], InputError) and "not valid JSON" in str(outcome[0])


def test_input_that_is_a_folder_is_one_error(tmp_path):
    from hmu_export.commands.generate import read_input

    with pytest.raises(InputError, match="is a folder"):
        read_input(tmp_path)
