"""`generate`: encoder once, then the decoder step with its KV cache, on any backend."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from . import ui
from ..core.errors import InputError
from .argtypes import positive_int as _positive_int

#: the request options the flags set (their names in the request schema)
FLAG_OPTIONS = ("max_new_tokens", "strategy", "num_beams", "length_penalty", "early_stopping",
                "temperature", "top_k", "top_p", "noise_scale", "seed")
#: an input file larger than this is refused before it is read (/dev/zero must not hang)
MAX_INPUT_BYTES = 64 * 2**20


def register(sub: argparse._SubParsersAction) -> None:
    from ..backends.registry import step_names
    from ..generate.generator import STRATEGIES

    p = sub.add_parser("generate", help="generate tokens with a build's encoder + decoder-step "
                                        "graphs (or PyTorch)")
    p.add_argument("--artifacts", type=Path, required=True, help="build folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", type=Path,
                     help='JSON file: {"src_ids": [[5, 17, 9], [4, 4]]} (ragged rows)')
    src.add_argument("--text", action="append",
                     help="source text (repeat for a batch): tokenized with the build's "
                          "tokenizer, output decoded (builds from a Hugging Face folder with "
                          "a tokenizer)")
    p.add_argument("--backend", default="onnxruntime-opt", choices=step_names(),
                   help="default: onnxruntime-opt")
    # Request options are parsed by the request schema every entry point shares
    # (hmu_export/shipped/request_options.py): a bad value is one `error:` line.
    p.add_argument("--max-new-tokens", metavar="N",
                   help="default: [generation].max_new_tokens of the build")
    build_default = "default: the build's [generation] (an hf build: its generation_config.json)"
    p.add_argument("--strategy", metavar="|".join(STRATEGIES), help=build_default)
    p.add_argument("--num-beams", metavar="N", help=build_default)
    p.add_argument("--length-penalty", metavar="X", help=build_default)
    p.add_argument("--early-stopping", action=argparse.BooleanOptionalAction,
                   help=build_default)
    p.add_argument("--temperature", metavar="X",
                   help="sampling temperature in [1e-3, 1e3] (the argmax: --strategy greedy); "
                        + build_default)
    p.add_argument("--top-k", metavar="N", help="0 = off; " + build_default)
    p.add_argument("--top-p", metavar="X", help="1 = off; " + build_default)
    p.add_argument("--noise-scale", metavar="X",
                   help="HMU noise temperature in [0, 100] (0 = the VAE's mean path; default: "
                        "the build's)")
    p.add_argument("--seed", metavar="N", default="0",
                   help="sampling and HMU-noise seed in [0, 2**64 - 1]")
    p.add_argument("--threads", type=_positive_int, help="ONNX Runtime intra-op threads")
    p.add_argument("--json", type=Path, help="write the result here")
    p.set_defaults(func=run)


def read_input(path: Path) -> list[list[int]]:
    """``src_ids`` rows from the input JSON (validated further by the generator): a JSON object
    whose only key is ``src_ids``, at most MAX_INPUT_BYTES, nested no deeper than Python's
    parser allows; every failure is one InputError."""
    from ..core.fileio import open_input

    try:
        with open_input(path, "input file") as f:
            raw = f.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read input {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_INPUT_BYTES:
        raise InputError(f"input {path} is larger than {MAX_INPUT_BYTES // 2**20} MiB: not a "
                         "request this tool reads")
    try:
        data: Any = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"input {path} is not UTF-8: byte {raw[exc.start]:#04x} at offset "
                         f"{exc.start}") from None
    except RecursionError:
        raise InputError(f"input {path} nests JSON too deeply to be a request") from None
    except ValueError as exc:  # JSONDecodeError, or an integer literal too long to convert
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise InputError(f"input {path} is not valid JSON: {first[:200]}") from None
    if not isinstance(data, dict) or "src_ids" not in data:
        raise InputError(f'input {path} must be a JSON object with "src_ids": [[ids...], ...]')
    unknown = sorted(k for k in data if k != "src_ids")
    if unknown:
        from ..shipped.request_options import show
        raise InputError(f"input {path} has unknown key(s) "
                         f"{', '.join(show(k) for k in unknown[:5])}: it holds only "
                         '"src_ids" (request options are flags, e.g. --max-new-tokens)')
    rows = data["src_ids"]
    if not isinstance(rows, list) or not rows:
        raise InputError(f'input {path}: "src_ids" must be a non-empty list of id lists')
    return rows


def request_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The request options the flags set, parsed and checked by the request schema (one
    InputError naming the flag); flags left out are not in the result."""
    from ..shipped.request_options import OptionError, check, parse

    out: dict[str, Any] = {}
    for name in FLAG_OPTIONS:
        value = getattr(args, name)
        if value is None:
            continue
        try:
            out[name] = parse(name, value, text=True)
            check(name, out[name])
        except OptionError as exc:
            raise InputError(f"--{name.replace('_', '-')}: {exc}") from None
    return out


def run(args: argparse.Namespace) -> int:
    from ..core.fileio import write_json
    from ..generate.generator import Generator

    if args.threads is not None:
        from ..runners.onnxruntime_runner import cpu_threads
        if args.threads > cpu_threads():
            raise InputError(f"--threads {args.threads} exceeds this machine's "
                             f"{cpu_threads()} cores")
    flags = request_flags(args)
    tok = None
    if args.text is not None:
        from ..model.tokenizer import check_texts, load_tokenizer
        check_texts(args.text, "--text")
        tok = load_tokenizer(args.artifacts)
        rows = tok.encode(args.text)
    else:
        rows = read_input(args.input)
    gen = Generator.from_build(args.artifacts, args.backend, threads=args.threads)
    seed = flags.pop("seed", 0)
    opts = gen.options(seed=seed, noise_seed=seed, **flags)
    result = gen.generate(rows, opts)
    out = result.to_dict()
    texts = tok.decode(result.sequences) if tok is not None else None
    if texts is not None:
        out["texts"] = texts
    if args.json:
        write_json(args.json, out)
    if texts is not None:
        from rich.markup import escape
        ui.out.print(ui.table(
            f"generate: {args.backend}, {opts.strategy}, {result.steps} steps, "
            f"{result.seconds * 1e3:.1f} ms, {result.tokens_per_s:.1f} tokens/s",
            ("row", "tokens", "text"),
            [(str(i), " ".join(map(str, s)), escape(t))
             for i, (s, t) in enumerate(zip(result.sequences, texts))]))
        return 0
    ui.out.print(ui.table(
        f"generate: {args.backend}, {opts.strategy}, {result.steps} steps, "
        f"{result.seconds * 1e3:.1f} ms, {result.tokens_per_s:.1f} tokens/s",
        ("row", "tokens"), [(str(i), " ".join(map(str, s))) for i, s in
                            enumerate(result.sequences)]))
    return 0
