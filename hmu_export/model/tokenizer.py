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


def has_tokenizer(build_root: str | Path) -> bool:
    from .hf import tokenizer_files

    return bool(tokenizer_files(Path(build_root) / TOKENIZER_DIR))


def load_tokenizer(build_root: str | Path) -> Tokenizer:
    """The build's tokenizer, or one-line InputError when it has none."""
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
