"""The demo's tokenizer: one WordLevel vocabulary for digits (source) and words (target).

Digits are split one per token and words at whitespace. A source that is a number is first
left-padded with zeros to 9 digits (spaces between digits dropped), so every digit sits at the
position of its place value whatever the number's length: ``"2026"`` ->
``0 0 0 0 0 2 0 2 6 </s>``. Without it a number's units digit moves with its length, and a
held-out short number (say ``"1"``, never seen alone) is spelled like the short numbers seen
in training instead of by its place values. ``"dos mil veintiséis"`` -> ``dos mil veintiséis
</s>``: EOS ends every encoded text (the decoder learns to stop on it, and the source carries
it as T5's does). The special tokens take
the ids the native model's config expects: pad 0 (``[model] pad_id``), bos 1 and eos 2
(``[generation]``), unk 3. ``tokenizer_config.json`` makes Transformers' ``AutoTokenizer`` load
it as a ``PreTrainedTokenizerFast`` (what ``generate --text`` and the Triton text models use).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from ..core.errors import HMUExportError
from ..core.fileio import atomic_path, write_json

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
DIGITS = tuple("0123456789")
WIDTH = 9  # numbers below 10^9
MAX_LENGTH = 128  # the model's max_len


def vocabulary(words: Iterable[str]) -> dict[str, int]:
    """Specials, then digits, then the words sorted (a fixed order for a fixed word set)."""
    tokens = list(SPECIALS) + list(DIGITS) + sorted(set(words) - set(DIGITS) - set(SPECIALS))
    return {t: i for i, t in enumerate(tokens)}


def task_words() -> set[str]:
    """Every word num2words uses for 0 <= n < 10^9: 0..999 give the units, tens and hundreds;
    1000, 10^6 and 2*10^6 add mil, un, millón, millones."""
    from .demo_data import spell

    words: set[str] = set()
    for n in list(range(1000)) + [1000, 10 ** 6, 2 * 10 ** 6]:
        words.update(spell(n).split())
    return words


def build(vocab: dict[str, int]) -> Any:
    """A ``tokenizers.Tokenizer`` over ``vocab``."""
    try:
        from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    except ImportError:
        raise HMUExportError("the demo tokenizer needs tokenizers: pip install "
                             "'hmu-export[train]'") from None
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # ^(?=\d{k}$) matches (empty) before a k-digit number: it becomes WIDTH - k zeros
    pad = [normalizers.Replace(Regex(rf"^(?=\d{{{k}}}$)"), "0" * (WIDTH - k))
           for k in range(1, WIDTH)]
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Strip(),
         normalizers.Replace(Regex(r"(?<=\d)\s+(?=\d)"), ""), *pad])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, vocab[EOS])])
    tok.add_special_tokens(list(SPECIALS))
    return tok


def tokenizer_config() -> dict[str, Any]:
    """What Transformers needs to wrap tokenizer.json as a PreTrainedTokenizerFast."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": PAD, "bos_token": BOS,
            "eos_token": EOS, "unk_token": UNK, "model_max_length": MAX_LENGTH,
            "clean_up_tokenization_spaces": False}


def save(tok: Any, folder: Path) -> list[Path]:
    """tokenizer.json + tokenizer_config.json into ``folder``, each written atomically."""
    folder = Path(folder)
    target = folder / "tokenizer.json"
    with atomic_path(target) as tmp:
        tok.save(str(tmp))
    return [target, write_json(folder / "tokenizer_config.json", tokenizer_config())]


def load(folder: Path) -> Any:
    """The ``tokenizers.Tokenizer`` saved in ``folder``."""
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))


def encode(tok: Any, texts: list[str]) -> list[list[int]]:
    """Ids of each text, EOS appended; a text with a token outside the vocabulary is an
    HMUExportError naming it (training data must be fully covered)."""
    unk = tok.token_to_id(UNK)
    out = []
    for text, enc in zip(texts, tok.encode_batch(texts)):
        if unk in enc.ids:
            word = enc.tokens[enc.ids.index(unk)]
            raise HMUExportError(f"{text!r}: {word!r} is not in the demo vocabulary")
        out.append(list(enc.ids))
    return out
