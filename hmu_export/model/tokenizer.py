"""Text in, text out: the tokenizer a build carries in ``checkpoint/hf/`` (copied from the
Hugging Face folder it was built from), loaded with Transformers' ``AutoTokenizer``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..core.errors import InputError

TOKENIZER_DIR = Path("checkpoint") / "hf"


def check_texts(texts: Sequence[str], what: str = "text") -> None:
    """Source texts a tokenizer can take: strings of valid Unicode (no lone surrogate: Python
    turns command-line bytes that are not UTF-8 into them), not blank; one InputError."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise InputError(f"{what} must be a list of strings, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"{what} {i} must be a string, got {type(t).__name__}")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = ord(t[exc.start])
            byte = (f"the byte {bad - 0xDC00:#04x}, which is not UTF-8" if 0xDC80 <= bad <= 0xDCFF
                    else f"a lone surrogate U+{bad:04X}")
            raise InputError(f"{what} {i} is not valid Unicode text: character {exc.start} is "
                             f"{byte}") from None
        if not t.strip():  # as the Triton model refuses it: special tokens alone are no source
            raise InputError(f"{what} {i} is empty")


class Tokenizer:
    """Texts to encoder ids (special tokens added as Transformers adds them for the encoder
    input) and generated ids back to texts (special tokens skipped)."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        check_texts(texts)
        return [list(map(int, ids)) for ids in self.tok(list(texts))["input_ids"]]

    def decode(self, seqs: Sequence[Sequence[int]]) -> list[str]:
        return list(self.tok.batch_decode([list(s) for s in seqs], skip_special_tokens=True))


def source_text_problem(text: str) -> str:
    """Why ``text`` cannot be a source text ("" when it can): the one rule of ``generate
    --text`` and ``finetune`` text lines. Empty or blank text is refused as the Triton model
    refuses it (special tokens alone are not a source); so is what ``text_problem`` refuses."""
    if not text.strip():
        return "is empty"
    return text_problem(text)


def text_problem(text: str) -> str:
    """Why ``text`` is not Unicode text that a tokenizer can encode ("" when it is): a lone
    surrogate, e.g. from undecodable argv bytes or a JSON ``"\\ud800"`` escape."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"holds {text[exc.start]!r} at character {exc.start}, a lone surrogate "
                "(not Unicode text; undecodable bytes?)")
    return ""


def tokenizer_problem(tok: Any, vocab_size: int, eos_ids: Sequence[int]) -> str:
    """Why Transformers' tokenizer ``tok`` does not fit a model ("" when it does): an id the
    model has no row for, or an end token that is not the model's end of sequence."""
    vocab = tok.get_vocab()
    top = max(vocab.values(), default=-1)
    if top >= vocab_size:
        token = next(t for t, i in vocab.items() if i == top)
        return (f"its vocabulary ({len(vocab)} tokens) reaches id {top} ({token!r}), and the "
                f"model's vocab_size is {vocab_size}")
    eos = getattr(tok, "eos_token_id", None)
    if eos is not None and eos_ids and int(eos) not in eos_ids:
        return (f"its end token {tok.eos_token!r} is id {eos}, and the model ends sequences "
                f"with eos_token_id {', '.join(map(str, eos_ids))}")
    return ""


def check_tokenizer(folder: Path, vocab_size: int, eos_ids: Sequence[int]) -> None:
    """A model folder's tokenizer loads and fits the model, or one CheckpointError (at build
    start: a mismatch would otherwise surface only at generate, or never)."""
    from ..core.errors import CheckpointError
    try:
        tok = load_hf_tokenizer(folder)
    except InputError as exc:
        raise CheckpointError(str(exc)) from None
    problem = tokenizer_problem(tok, vocab_size, eos_ids)
    if problem:
        raise CheckpointError(f"the tokenizer in {folder} does not fit its model: {problem}")


#: a tokenizer is any of these groups of files (fast, SentencePiece T5, Marian, BPE) ...
TOKENIZER_FILES = (("tokenizer.json",), ("spiece.model",), ("source.spm", "target.spm"),
                   ("vocab.json", "merges.txt"))
#: ... plus what configures it
TOKENIZER_EXTRAS = {"tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"}


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer in ``folder`` (a complete group plus what configures it), or []."""
    if not any(all((folder / f).is_file() for f in group) for group in TOKENIZER_FILES):
        return []
    names = {f for group in TOKENIZER_FILES for f in group} | TOKENIZER_EXTRAS
    return [folder / n for n in sorted(names) if (folder / n).is_file()]


def copy_tokenizer(src: Path, dst: Path) -> list[Path]:
    """The tokenizer files of folder ``src`` (none: nothing) copied into ``dst``."""
    import shutil

    files = tokenizer_files(Path(src))
    if files and Path(src).resolve() != Path(dst).resolve():
        Path(dst).mkdir(parents=True, exist_ok=True)
        for path in files:
            shutil.copyfile(path, Path(dst) / path.name)
    return [Path(dst) / p.name for p in files]


def has_tokenizer(build_root: str | Path) -> bool:
    return bool(tokenizer_files(Path(build_root) / TOKENIZER_DIR))


def load_tokenizer(build_root: str | Path) -> Tokenizer:
    """The build's tokenizer, or one-line InputError when it has none. The build is opened
    (verified against its manifest; a failed or unverifiable build refused) before any of
    its tokenizer files is read."""
    from ..core.build_folder import open_build

    open_build(build_root)
    folder = Path(build_root) / TOKENIZER_DIR
    if not has_tokenizer(build_root):
        raise InputError(f"this build has no tokenizer ({folder} has no tokenizer.json, "
                         "spiece.model, source.spm/target.spm or vocab.json/merges.txt; build "
                         "from a Hugging Face folder that has one, or pass ids with --input)")
    return Tokenizer(load_hf_tokenizer(folder))


def load_hf_tokenizer(folder: Path) -> Any:
    """Transformers' tokenizer of a folder that has one; a load failure is one InputError."""
    try:
        import transformers
    except ImportError:
        raise InputError("text needs the transformers package (pip install "
                         "'hmu-export[hf]')") from None
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # a corrupt or incomplete tokenizer (OSError, ValueError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot load the tokenizer in {folder}: {first}") from None
