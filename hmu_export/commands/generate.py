"""`generate`: encoder once, then the decoder step with its KV cache, on any backend."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from . import ui
from ..core.errors import InputError
from .argtypes import finite as _finite
from .argtypes import integer as _int
from .argtypes import positive_int as _positive_int


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
    p.add_argument("--max-new-tokens", type=_positive_int,
                   help="default: [generation].max_new_tokens of the build")
    build_default = "default: the build's [generation] (an hf build: its generation_config.json)"
    p.add_argument("--strategy", choices=STRATEGIES, help=build_default)
    p.add_argument("--num-beams", type=_positive_int, help=build_default)
    p.add_argument("--length-penalty", type=_finite, help=build_default)
    p.add_argument("--early-stopping", action=argparse.BooleanOptionalAction,
                   help=build_default)
    p.add_argument("--temperature", type=_finite, help="sampling temperature; " + build_default)
    p.add_argument("--top-k", type=_int, help="0 = off; " + build_default)
    p.add_argument("--top-p", type=_finite, help="1 = off; " + build_default)
    p.add_argument("--noise-scale", type=_finite,
                   help="HMU noise temperature (0 = the VAE's mean path; default: the build's)")
    p.add_argument("--seed", type=_int, default=0, help="sampling and HMU-noise seed")
    p.add_argument("--threads", type=_positive_int, help="ONNX Runtime intra-op threads")
    p.add_argument("--json", type=Path, help="write the result here")
    p.set_defaults(func=run)


def read_input(path: Path) -> list[list[int]]:
    """``src_ids`` rows from the input JSON (validated further by the generator)."""
    try:
        data: Any = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"input file not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot read input {path}: {exc}") from None
    if not isinstance(data, dict) or "src_ids" not in data:
        raise InputError(f'input {path} must be a JSON object with "src_ids": [[ids...], ...]')
    rows = data["src_ids"]
    if not isinstance(rows, list) or not rows:
        raise InputError(f'input {path}: "src_ids" must be a non-empty list of id lists')
    return rows


def run(args: argparse.Namespace) -> int:
    from ..core.fileio import write_json
    from ..generate.generator import Generator

    if args.threads is not None:
        from ..runners.onnxruntime_runner import cpu_threads
        if args.threads > cpu_threads():
            raise InputError(f"--threads {args.threads} exceeds this machine's "
                             f"{cpu_threads()} cores")
    tok = None
    if args.text is not None:
        from ..model.tokenizer import load_tokenizer
        tok = load_tokenizer(args.artifacts)
        rows = tok.encode(args.text)
    else:
        rows = read_input(args.input)
    gen = Generator.from_build(args.artifacts, args.backend, threads=args.threads)
    opts = gen.options(
        strategy=args.strategy, max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams, length_penalty=args.length_penalty,
        early_stopping=args.early_stopping, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, noise_seed=args.seed, noise_scale=args.noise_scale)
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
