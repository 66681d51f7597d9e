"""Generation models of the Triton repository (added by triton.plan_models when the build has
``encoder.onnx`` and ``decoder.onnx``)::

    <name>_generate/         config.pbtxt  1/model.py  1/token_rules.py  1/request_options.py
                             1/encoder.onnx  1/decoder.onnx
    <name>_generate_stream/  (the same files; decoupled)
                             + 1/tokenizer/ (both) when the build carries a tokenizer
    <name>_encoder/          config.pbtxt  1/model.onnx   (onnxruntime_onnx: BLS target, GPU hosts)
    <name>_decoder/          config.pbtxt  1/model.onnx   (onnxruntime_onnx: BLS target, GPU hosts)
    <name>_generate_int8/    the same as <name>_generate over 1/encoder.int8.onnx + decoder.int8.onnx
    <name>_generate_stream_int8/  (and _int4: one pair per precision of [triton]
                             generation_precisions that the build shipped; ONNX Runtime in-process)

``model.py`` is hmu_export/shipped/generate_model.py (and ``token_rules.py`` /
``request_options.py`` the package's own, loaded by it: the same token rules and request schema
as the CLI and the Python API). The build's decoding defaults and token rules travel in the ``decoding``
parameter (JSON). The two python models take ``src_ids``
INT64 [1, L] per request (``allow_ragged_batch``: requests of different lengths share an
execute), an optional ``max_new_tokens`` INT64 [1, 1] and request parameters for the strategy;
they return ``tokens`` INT64 [1, n]. Every config is parsed back with Triton's ModelConfig schema
and checked with triton.validate_config (against a contract of the generation model's own I/O, or
the encoder / decoder graph's contract and its ONNX inputs / outputs) before anything is written.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ...core.layout import BuildLayout
from ...core.config import AUTO, GENERATION_PRECISIONS, BuildConfig
from ...core.errors import ArtifactError
from ...core.graph_kinds import GRAPH_FILES
from ...core.io_contract import (BATCH, DECODER, ENCODER, NEW_LEN, NOISE, SRC_LEN,
                                 GraphContract, TensorSpec, past_key, row_state_refusal)

if TYPE_CHECKING:
    from tritonclient.grpc import model_config_pb2

    from .config import TritonModel, TritonOptions

GENERATE, GENERATE_STREAM, ENCODER_KIND, DECODER_KIND = ("generate", "generate_stream",
                                                          "encoder", "decoder")
GEN_SUFFIX = {GENERATE: "_generate", GENERATE_STREAM: "_generate_stream",
              ENCODER_KIND: "_encoder", DECODER_KIND: "_decoder"}
GENERATE_MODEL_SOURCE = Path(__file__).parents[2] / "shipped" / "generate_model.py"
TOKEN_RULES_SOURCE = Path(__file__).parents[2] / "shipped" / "token_rules.py"  # model.py loads it
REQUEST_OPTIONS_SOURCE = Path(__file__).parents[2] / "shipped" / "request_options.py"  # and this
STEP_BACKENDS = ("onnxruntime", "bls")
BATCHING_MODES = ("inflight", "static")  # generate_model.BATCHING: the running batch, or per execute
QUEUE_PER_ROW = 16  # max_queue_size default: waiting requests per row of the batch max
SRC_IDS, MAX_NEW_TOKENS, TOKENS = "src_ids", "max_new_tokens", "tokens"
TEXT, GENERATED_TEXT = "text", "generated_text"
TOKENIZER_DIR = "tokenizer"  # in the version folder, beside model.py

GENERATION_CONTRACT = GraphContract(
    "hmu_generate",
    (TensorSpec(SRC_IDS, "int64", (BATCH, SRC_LEN), "one source sequence per request"),
     TensorSpec(MAX_NEW_TOKENS, "int64", (BATCH, 1), "optional: tokens to generate at most")),
    (TensorSpec(TOKENS, "int64", (BATCH, NEW_LEN), "generated tokens: no BOS, EOS kept"),))
#: with a tokenizer in the build: text in (instead of src_ids), decoded text out (beside tokens)
TEXT_CONTRACT = GraphContract(
    "hmu_generate_text",
    GENERATION_CONTRACT.inputs + (
        TensorSpec(TEXT, "string", (BATCH, 1), "optional: one source text per request, "
                   "tokenized by the build's tokenizer (send it or src_ids)"),),
    GENERATION_CONTRACT.outputs + (
        TensorSpec(GENERATED_TEXT, "string", (BATCH, 1), "the generated tokens, decoded "
                   "(special tokens skipped); streaming: the text each token adds"),))
OPTIONAL = {GENERATION_CONTRACT.name: (MAX_NEW_TOKENS,),
            TEXT_CONTRACT.name: (MAX_NEW_TOKENS, SRC_IDS, TEXT)}

HEADERS = {
    GENERATE: ("Generation (greedy / sample / beam) in the python backend: encoder once, then the\n"
               "decoder step with a KV cache, in-process ONNX Runtime (step_backend onnxruntime)\n"
               "or BLS calls to the encoder / decoder models (step_backend bls, GPU hosts).\n"
               "One request = one source sequence src_ids [1, L]; request parameters: strategy,\n"
               "num_beams, temperature, top_k, top_p, seed, noise_scale, noise_seed,\n"
               "length_penalty, early_stopping. Builds with a tokenizer: input text (BYTES\n"
               "[1, 1]) instead of src_ids, and output generated_text (decoded) beside tokens.\n"
               "Parameter batching: inflight (one running batch; requests join between decoder\n"
               "steps, max_queue_size wait) or static (per execute)."),
    GENERATE_STREAM: ("Streaming generation (decoupled): one response per generated token,\n"
                      "then an empty response flagged TRITONSERVER_RESPONSE_COMPLETE_FINAL.\n"
                      "Greedy and sample only (beam search is refused: its tokens are final\n"
                      "only at the end)."),
    ENCODER_KIND: ("Encoder + HMU graph (encoder.onnx): the BLS target of the generation models\n"
                   "on hosts with the onnxruntime backend (swap in a tensorrt_plan model of the\n"
                   "same name and I/O for TensorRT)."),
    DECODER_KIND: ("Decoder step with KV cache (decoder.onnx; past_len 0 on the first call): the\n"
                   "BLS target of the generation models on hosts with the onnxruntime backend."),
}


FP32 = GENERATION_PRECISIONS[0]


def generation_names(cfg: BuildConfig, precision: str = FP32) -> dict[str, str]:
    """Model names by kind; a quantized precision's generation models end in ``_<precision>``
    (``hmu-default_generate_int8``; the BLS targets exist for fp32 only)."""
    base = "".join(c if c.isalnum() or c in "-_" else "_" for c in cfg.model.name)
    tail = "" if precision == FP32 else "_" + precision
    return {kind: base + suffix + tail for kind, suffix in GEN_SUFFIX.items()}


def _graph_files(layout: BuildLayout, precision: str = FP32) -> tuple[Path, Path] | None:
    variant = "" if precision == FP32 else precision
    enc, dec = layout.graph(ENCODER, variant), layout.graph(DECODER, variant)
    return (enc, dec) if enc.is_file() and dec.is_file() else None


def generation_precisions(layout: BuildLayout, cfg: BuildConfig
                          ) -> tuple[list[str], dict[str, str]]:
    """(precisions whose generation models the repository gets, {precision named in [triton]
    generation_precisions but not servable: why}). ``auto`` serves fp32 and every quantized
    variant whose graphs the build holds: one the quantize stage removed (over its quality
    budget) or never wrote gets no model, and no note (the quantize stage records why)."""
    asked = cfg.triton.generation_precisions
    auto = tuple(asked) == (AUTO,)
    served, skipped = [], {}
    for precision in GENERATION_PRECISIONS if auto else asked:
        if _graph_files(layout, precision) is not None:
            served.append(precision)
        elif not auto:
            variant = "" if precision == FP32 else "." + precision
            skipped[precision] = (
                f"no {precision} generation models: the build has no encoder{variant}.onnx / "
                f"decoder{variant}.onnx" + ("" if precision == FP32 else
                                            " (its quantize stage removed them over the quality "
                                            "budget, or did not write them: see "
                                            "stages.quantize)"))
    return served, skipped


class NotServable(ArtifactError):
    """The graphs are not the encoder / decoder-step pair the generation model drives."""


def cache_geometry(enc: Path, dec: Path) -> dict[str, int]:
    """layers / heads / head_dim / latent_dim as the graphs declare them; NotServable when the
    graphs' I/O is not exactly what triton_generate_model.py feeds and reads."""
    from .config import onnx_graph_io

    dio, eio = onnx_graph_io(dec), onnx_graph_io(enc)
    layers = 0
    while past_key(layers) in dio:
        layers += 1
    if not layers:
        raise NotServable(f"{dec.name} declares no {past_key(0)} input")
    kv = [f"{k}.{i}" for i in range(layers) for k in ("cross_key", "cross_value")]
    past = [f"{k}.{i}" for i in range(layers) for k in ("past_key", "past_value")]
    present = [f"{k}.{i}" for i in range(layers) for k in ("present_key", "present_value")]
    refusal = row_state_refusal(list(dio), str(dec))
    if refusal:  # an old build: refused (never served without its generation models)
        raise ArtifactError(refusal)
    want = {enc: ({SRC_IDS, "src_mask", NOISE}, set(kv)),
            dec: ({"tgt_ids", "src_mask", "positions", "past_mask", *kv, *past},
                  {"logits", *present})}
    import onnx

    for path, (inputs, outputs) in want.items():
        proto = onnx.load(str(path), load_external_data=False)
        have_in = {v.name for v in proto.graph.input}
        have_out = {v.name for v in proto.graph.output}
        if have_in != inputs or not outputs <= have_out:
            raise NotServable(f"{path.name} takes {sorted(have_in)} and gives {sorted(have_out)}; "
                              f"the generation model feeds {sorted(inputs)} and reads "
                              f"{sorted(outputs)}")
    if eio[NOISE][1][:2] != [BATCH, SRC_LEN]:
        raise NotServable(f"{enc.name} takes noise {eio[NOISE][1]}, not [batch, src_len, latent]")
    dims = dio[past_key(0)][1]
    geo = {"layers": layers, "heads": dims[1], "head_dim": dims[3],
           "latent_dim": eio[NOISE][1][2] if NOISE in eio else None}
    for key, value in geo.items():
        if not isinstance(value, int):
            raise NotServable(f"generation graphs must declare a fixed {key}, got {value!r}")
    return geo  # type: ignore[return-value]


def generate_config(name: str, cfg: BuildConfig, geo: dict[str, int], opts: "TritonOptions",
                    names: dict[str, str], *, streaming: bool, step_backend: str = "onnxruntime",
                    tokenizer: bool = False, batching: str = "inflight",
                    precision: str = FP32) -> "model_config_pb2.ModelConfig":
    from tritonclient.grpc import model_config_pb2 as mc

    from .config import base_config, preferred_batch_sizes

    max_batch = cfg.profile.batch[2]
    contract = TEXT_CONTRACT if tokenizer else GENERATION_CONTRACT
    conf = base_config(name, contract, max_batch,
                        preferred_batch_sizes(cfg.profile, max_batch), opts)
    for t in conf.input:
        t.allow_ragged_batch = t.name == SRC_IDS
        t.optional = t.name in OPTIONAL[contract.name]
    conf.backend = "python"
    conf.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=opts.instance_count)
    if streaming:
        conf.model_transaction_policy.decoupled = True
    p, gen = cfg.profile, cfg.generation
    params = {
        "step_backend": step_backend, "precision": precision,
        "encoder_file": _version_file(ENCODER, precision),
        "decoder_file": _version_file(DECODER, precision), "encoder_model": names[ENCODER_KIND],
        "decoder_model": names[DECODER_KIND], "intra_op_threads": opts.python_intra_op_threads,
        "vocab_size": cfg.model.vocab_size, "latent_dim": geo["latent_dim"],
        "pad_id": cfg.model.pad_id, "bos_id": gen.bos_id, "eos_id": gen.eos_id,
        "batch_max": max_batch, "src_len_min": p.src_len[0], "src_len_max": p.src_len[2],
        "max_new_tokens_max": p.tgt_len[2], "max_new_tokens_default": gen.new_tokens(p),
        "layers": geo["layers"], "heads": geo["heads"], "head_dim": geo["head_dim"],
        "decoding": decoding_parameter(cfg), "batching": batching,
        "max_queue_size": QUEUE_PER_ROW * max_batch}
    if tokenizer:
        params["tokenizer_dir"] = TOKENIZER_DIR
    for key, value in params.items():
        conf.parameters[key].string_value = str(value)
    return conf


def _version_file(graph: str, precision: str) -> str:
    """A generation graph's file name in the version folder: the build's own name
    (``encoder.int8.onnx``), so the served file is recognisably the build's."""
    stem = GRAPH_FILES[graph][:-len(".onnx")]
    return f"{stem}.onnx" if precision == FP32 else f"{stem}.{precision}.onnx"


def decoding_parameter(cfg: BuildConfig) -> str:
    """The build's decoding defaults and token rules as the generation model reads them (JSON):
    requests override the defaults; the token rules always apply."""
    from ...shipped.generate_model import DECODING_KEYS

    gen = cfg.generation
    return json.dumps({**{k: getattr(gen, k) for k in DECODING_KEYS},
                       "rules": gen.token_rules().to_dict()}, sort_keys=True)


def graph_config(name: str, cfg: BuildConfig, contract: GraphContract, opts: "TritonOptions"
                 ) -> "model_config_pb2.ModelConfig":
    """An onnxruntime_onnx model of one generation graph (no dynamic batching: the BLS caller
    sends whole batches, and decoder steps of different past lengths must not be merged)."""
    from tritonclient.grpc import model_config_pb2 as mc

    from .config import base_config

    conf = base_config(name, contract, cfg.profile.batch[2], [], opts)
    conf.ClearField("dynamic_batching")
    conf.platform = "onnxruntime_onnx"
    conf.default_model_filename = "model.onnx"
    conf.instance_group.add(kind=mc.ModelInstanceGroup.KIND_AUTO, count=opts.instance_count)
    return conf


def check_generate_config(conf: "model_config_pb2.ModelConfig", cfg: BuildConfig,
                          streaming: bool) -> None:
    """validate_config's checks on the generation I/O, plus what only this model has: the
    optional max_new_tokens, the ragged src_ids, the decoupled policy and its parameters."""
    from .config import TritonConfigError, engine_profiles, validate_config

    def fail(msg: str) -> None:
        raise TritonConfigError(f"model '{conf.name}': {msg}")

    params = {k: v.string_value for k, v in conf.parameters.items()}
    contract = TEXT_CONTRACT if params.get("tokenizer_dir") else GENERATION_CONTRACT
    plain = type(conf)()
    plain.CopyFrom(conf)
    for t in plain.input:
        t.optional = False  # validate_config allows only the full graph's noise optional
    validate_config(plain, contract, engine_profiles(cfg))
    optional = OPTIONAL[contract.name]
    for t in conf.input:
        if t.optional != (t.name in optional):
            fail(f"input '{t.name}' must {'' if t.name in optional else 'not '}be optional")
        if t.allow_ragged_batch and t.name != SRC_IDS:
            fail(f"input '{t.name}' cannot be ragged")
    if conf.model_transaction_policy.decoupled != streaming:
        fail("the streaming model must be decoupled, the plain one not")
    if params.get("batching") not in BATCHING_MODES:
        fail(f"parameter batching must be one of {BATCHING_MODES}, got "
             f"{params.get('batching')!r}")
    if not params.get("max_queue_size", "").isdigit() or int(params["max_queue_size"]) < 1:
        fail(f"parameter max_queue_size must be an integer >= 1, got "
             f"{params.get('max_queue_size')!r}")
    if params.get("step_backend") not in STEP_BACKENDS:
        fail(f"parameter step_backend must be one of {STEP_BACKENDS}, got "
             f"{params.get('step_backend')!r}")
    precision = params.get("precision", FP32)
    if precision not in GENERATION_PRECISIONS:
        fail(f"parameter precision must be one of {GENERATION_PRECISIONS}, got {precision!r}")
    if precision != FP32 and params["step_backend"] != "onnxruntime":
        fail(f"an {precision} model runs its graphs in-process (step_backend onnxruntime): the "
             "BLS targets are the fp32 graphs")
    for key, graph in (("encoder_file", ENCODER), ("decoder_file", DECODER)):
        if params.get(key, _version_file(graph, FP32)) != _version_file(graph, precision):
            fail(f"parameter {key} {params.get(key)!r} is not the {precision} graph "
                 f"{_version_file(graph, precision)!r}")
    from ...shipped.generate_model import SPEC_KEYS

    missing = [k for k in SPEC_KEYS if not params.get(k, "").lstrip("-").isdigit()]
    if missing:
        fail(f"integer parameter(s) {missing} missing")
    try:
        decoding = json.loads(params.get("decoding", "{}"))
        from ...shipped.token_rules import TokenRules
        problems = TokenRules.from_mapping(decoding.get("rules", {})).problems(
            int(params["vocab_size"]))
    except (ValueError, TypeError, AttributeError) as exc:
        fail(f"parameter decoding is not a valid decoding table: {exc}")
    if problems:
        fail(f"parameter decoding: {problems[0]}")
    if int(params["batch_max"]) != conf.max_batch_size:
        fail(f"parameter batch_max {params['batch_max']} != max_batch_size "
             f"{conf.max_batch_size}")
    if not 1 <= int(params["max_new_tokens_default"]) <= int(params["max_new_tokens_max"]) \
            <= cfg.profile.tgt_len[2]:
        fail("max_new_tokens_default / _max must satisfy 1 <= default <= max <= the profile's "
             f"tgt_len max {cfg.profile.tgt_len[2]}")


def tokenizer_files(layout: BuildLayout) -> list[Path]:
    """The build's tokenizer (checkpoint/hf/, copied from the Hugging Face folder), or []."""
    from ...model.tokenizer import tokenizer_files as folder_tokenizer
    from ...model.tokenizer import TOKENIZER_DIR as BUILD_TOKENIZER_DIR

    return folder_tokenizer(layout.root / BUILD_TOKENIZER_DIR)


def generation_models(layout: BuildLayout, cfg: BuildConfig, opts: "TritonOptions", *,
                      step_backend: str = "onnxruntime", batching: str = "inflight"
                      ) -> list["TritonModel"]:
    """The fp32 generation models and their two BLS targets, the generation models of each
    quantized precision served ([triton] generation_precisions), or none when the build has no
    generation graphs (or is a classifier)."""
    from .config import TritonConfigError

    if step_backend not in STEP_BACKENDS:
        raise TritonConfigError(f"step backend must be one of {STEP_BACKENDS}, got "
                                f"{step_backend!r}")
    if batching not in BATCHING_MODES:
        raise TritonConfigError(f"batching must be one of {BATCHING_MODES}, got {batching!r}")
    if cfg.model.is_classifier:
        return []
    precisions, _ = generation_precisions(layout, cfg)
    models: list["TritonModel"] = []
    for precision in precisions:
        graphs = _graph_files(layout, precision)
        assert graphs is not None
        try:
            geo = cache_geometry(*graphs)
        except NotServable:  # e.g. a source whose split graphs differ: the others still serve
            continue
        models += _generate_models(layout, cfg, opts, geo, graphs, precision,
                                   step_backend=step_backend if precision == FP32
                                   else "onnxruntime", batching=batching)
        if precision == FP32:
            models += _bls_targets(cfg, opts, graphs, step_backend)
    return models


def _with_external(files: dict[str, Path], graph: Path, rel: str) -> dict[str, Path]:
    """``files`` plus the graph's external weights (``<graph>.data``), which travel with it."""
    external = graph.with_name(graph.name + ".data")
    if external.is_file():
        files[rel + ".data"] = external
    return files


def _generate_models(layout: BuildLayout, cfg: BuildConfig, opts: "TritonOptions",
                     geo: dict[str, int], graphs: tuple[Path, Path], precision: str, *,
                     step_backend: str, batching: str) -> list["TritonModel"]:
    """The plain and the streaming generation model of one precision."""
    from .config import TritonModel

    enc, dec = graphs
    names, kind_tail = generation_names(cfg, precision), ("" if precision == FP32
                                                          else "_" + precision)
    files: dict[str, Path] = {"1/model.py": GENERATE_MODEL_SOURCE,
                              "1/token_rules.py": TOKEN_RULES_SOURCE,
                              "1/request_options.py": REQUEST_OPTIONS_SOURCE}
    for graph, path in ((ENCODER, enc), (DECODER, dec)):
        rel = "1/" + _version_file(graph, precision)
        files[rel] = path
        _with_external(files, path, rel)
    tokenizer = tokenizer_files(layout)
    files.update({f"1/{TOKENIZER_DIR}/{f.name}": f for f in tokenizer})
    models = []
    for kind, streaming in ((GENERATE, False), (GENERATE_STREAM, True)):
        conf = generate_config(names[kind], cfg, geo, opts, generation_names(cfg),
                               streaming=streaming, step_backend=step_backend,
                               tokenizer=bool(tokenizer), batching=batching, precision=precision)
        check: Callable = (lambda c, s=streaming: check_generate_config(c, cfg, s))
        header = HEADERS[kind] + ("" if precision == FP32 else
                                  f"\nPrecision {precision}: {PRECISION_NOTES[precision]}")
        models.append(TritonModel(kind + kind_tail, names[kind], conf, dict(files),
                                  header=header, check=check))
    return models


#: what a quantized generation model runs (its config.pbtxt header says it)
PRECISION_NOTES = {"int8": "the quantize stage's encoder.int8.onnx / decoder.int8.onnx (int8\n"
                           "weights, dynamic int8 activations; ONNX Runtime CPU).",
                   "int4": "the quantize stage's encoder.int4.onnx / decoder.int4.onnx (int4\n"
                           "weight-only MatMulNBits; ONNX Runtime CPU)."}


def _bls_targets(cfg: BuildConfig, opts: "TritonOptions", graphs: tuple[Path, Path],
                 step_backend: str) -> list["TritonModel"]:
    """The encoder / decoder onnxruntime_onnx models the fp32 generation models call via BLS."""
    from ...core.graph_meta import load_graph_contract
    from .config import TritonModel, engine_profiles, onnx_graph_io, validate_config

    names, models = generation_names(cfg), []
    for kind, path in zip((ENCODER_KIND, DECODER_KIND), graphs):
        _, _, contract = load_graph_contract(path)
        conf = graph_config(names[kind], cfg, contract, opts)
        graph_io = onnx_graph_io(path)
        check = (lambda c, ct=contract, gio=graph_io:
                 validate_config(c, ct, engine_profiles(cfg), graph_io=gio))
        models.append(TritonModel(kind, names[kind], conf,
                                  _with_external({"1/model.onnx": path}, path, "1/model.onnx"),
                                  header=HEADERS[kind], check=check,
                                  note="" if step_backend == "bls" else
                                  "BLS target: loads where the onnxruntime backend exists"))
    return models


def with_step_backend(text: str, step_backend: str) -> str:
    """A generation model's config.pbtxt text with ``step_backend`` switched (docs, tests)."""
    return with_parameters(text, step_backend=step_backend)


def with_parameters(text: str, *, name: str | None = None, **values: object) -> str:
    """A generation model's config.pbtxt text with parameters set (``batching="static"``,
    ``max_queue_size=4``) and, given ``name``, renamed (the load test serves both modes)."""
    from .config import parse_config, render_config

    conf = parse_config(text)
    for key, value in values.items():
        conf.parameters[key].string_value = str(value)
    if name is not None:
        conf.name = name
    return render_config(conf)

