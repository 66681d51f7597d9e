"""Text in, text out: a tiny T5 folder with a tokenizer built with `tokenizers`; the build
carries the tokenizer (listed in the manifest) and `generate --text` equals Transformers'
`generate` with the HMU applied on the tokenized input, decoded as Transformers decodes."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import test_hf_source as HF  # noqa: E402  (its tiny-model builders and Transformers oracle)

from hmu_export.commands.cli import main  # noqa: E402
from hmu_export.core.config import config_from_dict  # noqa: E402

TEXTS = ["a b c", "d e"]


def _tokenizer(vocab_size: int, specials=("<pad>", "</s>", "<unk>"), template="$A </s>",
               **named):
    """A WordLevel tokenizer over exactly ``vocab_size`` words: the special tokens first (T5's
    ids by default: <pad> 0, </s> 1, <unk> 2), then a..z, then w<i>; ``template`` is what the
    tokenizer adds around an encoder input (T5 appends </s>)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = list(specials) + [chr(ord("a") + i) for i in range(26)]
    words += [f"w{i}" for i in range(len(words), vocab_size)]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(w, vocab[w]) for w in specials
                                         if w in template.split()])
    named = named or {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **named)


@pytest.fixture(scope="module")
def t5_text_build(tmp_path_factory):
    from hmu_export.build.preflight import preflight
    from hmu_export.build.pipeline import run_build

    root = tmp_path_factory.mktemp("hf_text")
    model = HF._t5()
    model.save_pretrained(root / "t5")
    _tokenizer(model.config.vocab_size).save_pretrained(root / "t5")
    cfg = config_from_dict({
        "model": {"name": "t5-hmu", "source": "hf", "path": str(root / "t5")},
        "profile": {"batch": [1, 2, 3], "src_len": [1, 7, 12], "tgt_len": [1, 4, 8]}})
    out = root / "out"
    outcome = run_build(cfg, out, model=preflight(cfg, out),
                        only=["checkpoint", "export", "optimize"])
    assert outcome.ok, outcome.failure
    return root, outcome.out_dir


def test_the_tokenizer_is_copied_into_the_build_and_listed(t5_text_build):
    _, out = t5_text_build
    manifest = json.loads((out / "manifest.json").read_text())
    paths = {a["path"] for a in manifest["artifacts"]}
    assert {"checkpoint/hf/tokenizer.json", "checkpoint/hf/tokenizer_config.json"} <= paths


def test_load_tokenizer_encodes_as_transformers(t5_text_build):
    from hmu_export.model.tokenizer import load_tokenizer

    root, out = t5_text_build
    tok = load_tokenizer(out)
    assert tok.encode(TEXTS) == [[3, 4, 5, 1], [6, 7, 1]]
    assert tok.decode([[3, 4, 1, 0]]) == ["a b"]


@pytest.mark.parametrize("backend", ["onnxruntime-opt", "torch"])
def test_generate_text_equals_transformers_generate(t5_text_build, backend, tmp_path, capsys):
    import transformers

    from hmu_export.model import hf as H

    root, out = t5_text_build
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(root / "t5"), local_files_only=True)
    enc = ref_tok(TEXTS, padding=True, return_tensors="pt")
    src = H.load_source(H.resolve_config(HF.ModelConfig(source="hf", path=str(root / "t5"))))
    b, ls = enc["input_ids"].shape
    x = {"src_ids": enc["input_ids"], "src_mask": enc["attention_mask"],
         "noise": torch.zeros(b, ls, src.cfg.latent_dim)}  # zero noise = the generate default
    want = HF._hf_greedy(src, x, max_new=8)
    want_texts = ref_tok.batch_decode(want, skip_special_tokens=True)
    res = tmp_path / "out.json"
    args = ["generate", "--artifacts", str(out), "--backend", backend, "--max-new-tokens", "8",
            "--json", str(res)]
    for t in TEXTS:
        args += ["--text", t]
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    got = json.loads(res.read_text())
    assert got["sequences"] == want
    assert got["texts"] == want_texts
    assert len({t for s in want for t in s}) > 1  # not one repeated token
    for text in want_texts:
        for word in text.split():
            assert word in printed


def test_text_and_input_are_exclusive(t5_text_build, tmp_path):
    _, out = t5_text_build
    inp = tmp_path / "in.json"
    inp.write_text(json.dumps({"src_ids": [[3, 4]]}))
    with pytest.raises(SystemExit):
        main(["generate", "--artifacts", str(out), "--input", str(inp), "--text", "a"])
    with pytest.raises(SystemExit):
        main(["generate", "--artifacts", str(out)])


def test_empty_text_is_one_error_line(t5_text_build, capsys):
    _, out = t5_text_build
    capsys.readouterr()
    assert main(["generate", "--artifacts", str(out), "--text", "a b", "--text", "  "]) != 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines == ["error: --text 1 is empty"]


def test_text_that_is_not_utf8_is_one_error_line(t5_text_build, capsys):
    """Command-line bytes that are not UTF-8 reach Python as a lone surrogate: that was the
    tokenizer's TypeError (TextEncodeInput must be Union[...]); now one line naming the byte."""
    _, out = t5_text_build
    capsys.readouterr()
    assert main(["generate", "--artifacts", str(out), "--text", "a b",
                 "--text", "c \udcff d"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines == ["error: --text 1 is not valid Unicode text: character 2 is the byte 0xff, "
                     "which is not UTF-8"]


def test_text_on_a_build_without_tokenizer_is_one_error_line(small_export, capsys):
    capsys.readouterr()
    rc = main(["generate", "--artifacts", str(small_export.root), "--text", "a b c"])
    err = capsys.readouterr().err
    assert rc != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "no tokenizer" in lines[0]


def test_triton_generation_models_take_text(t5_text_build):
    """The build's tokenizer travels into the Triton repository (listed in the manifest); the
    served generation model takes text (BYTES) and answers tokens and text equal to Python's
    generate --text; the streaming model's text pieces add up to the same text."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    import numpy as np
    from tritonclient.utils import InferenceServerException

    from hmu_export.generate.generator import Generator
    from hmu_export.model.tokenizer import load_tokenizer
    from hmu_export.deploy.triton.server import serve

    _, out = t5_text_build
    assert main(["triton", "--artifacts", str(out)]) == 0
    listed = {a["path"] for a in json.loads((out / "manifest.json").read_text())["artifacts"]}
    assert "triton/t5-hmu_generate/1/tokenizer/tokenizer.json" in listed
    gen, tok = Generator.from_build(out, "onnxruntime"), load_tokenizer(out)
    texts = TEXTS + ["z y x w v"]
    want = [gen.generate(tok.encode([t]), max_new_tokens=8).sequences[0] for t in texts]
    want_texts = tok.decode(want)

    def text_input(value: str):
        inp = grpcclient.InferInput("text", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.asarray([[value.encode()]], dtype=np.object_))
        mnt = grpcclient.InferInput("max_new_tokens", [1, 1], "INT64")
        mnt.set_data_from_numpy(np.asarray([[8]], dtype=np.int64))
        return [inp, mnt]

    with serve(out / "triton", ["t5-hmu_generate", "t5-hmu_generate_stream"]) as srv:
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        for t, ids, txt in zip(texts, want, want_texts):
            res = client.infer("t5-hmu_generate", text_input(t))
            assert res.as_numpy("tokens")[0].tolist() == ids
            assert res.as_numpy("generated_text")[0, 0].decode() == txt
        ids_in = grpcclient.InferInput("src_ids", [1, 4], "INT64")
        ids_in.set_data_from_numpy(np.asarray([tok.encode([texts[0]])[0]], dtype=np.int64))
        res = client.infer("t5-hmu_generate", [ids_in] + text_input(texts[0])[1:])
        assert res.as_numpy("tokens")[0].tolist() == want[0]  # ids still work
        not_utf8 = grpcclient.InferInput("text", [1, 1], "BYTES")
        not_utf8.set_data_from_numpy(np.asarray([[b"a \xff b"]], dtype=np.object_))
        for bad, words in (([ids_in] + text_input("a b")[:1], "not both"),
                           (text_input("   ")[:1], "empty"), ([not_utf8], "not valid UTF-8")):
            with pytest.raises(InferenceServerException, match=words) as info:
                client.infer("t5-hmu_generate", bad)
            # the client's mistake: INVALID_ARGUMENT, not INTERNAL
            assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value
        pieces: list = []
        client.start_stream(callback=lambda result, error: pieces.append(error or result))
        client.async_stream_infer("t5-hmu_generate_stream", text_input(texts[2]))
        deadline = __import__("time").time() + 60
        while len(pieces) < len(want[2]) and __import__("time").time() < deadline:
            __import__("time").sleep(0.05)
        client.stop_stream()
        client.close()
    got = [p for p in pieces if not isinstance(p, Exception)]
    assert [int(p.as_numpy("tokens")[0, 0]) for p in got] == want[2]
    assert "".join(p.as_numpy("generated_text")[0, 0].decode() for p in got) == want_texts[2]


# BART: <s> 0, <pad> 1, </s> 2 around the input; Marian: </s> 0 appended, pad = id 99 (w99).
FAMILY_TOKENIZERS = {
    "bart": (("<s>", "<pad>", "</s>", "<unk>"), "<s> $A </s>",
             {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}),
    "marian": (("</s>", "<unk>"), "$A </s>",
               {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "w99"}),
}


@pytest.mark.parametrize("family", sorted(FAMILY_TOKENIZERS))
def test_bart_and_marian_folders_build_and_generate_text_as_transformers(family, tmp_path):
    """The CLI path for the other two families: a three-line [model] TOML builds (checkpoint and
    the graphs), and `generate --text` on ragged texts gives Transformers' greedy tokens with
    the HMU applied, decoded to the same texts."""
    import transformers

    from hmu_export.model import hf as H

    folder = tmp_path / family
    model = HF.BUILDERS[family]()
    model.save_pretrained(folder)
    specials, template, named = FAMILY_TOKENIZERS[family]
    _tokenizer(model.config.vocab_size, specials, template, **named).save_pretrained(folder)
    toml = tmp_path / "c.toml"
    toml.write_text(f'[model]\nsource = "hf"\npath = "{folder}"\n\n[profile]\n'
                    "batch = [1, 2, 4]\nsrc_len = [1, 8, 12]\ntgt_len = [1, 4, 10]\n")
    from hmu_export.core.config import load_config
    from hmu_export.build.preflight import preflight
    from hmu_export.build.pipeline import run_build
    cfg, out = load_config(toml), tmp_path / "out"
    outcome = run_build(cfg, out, model=preflight(cfg, out), only=["checkpoint", "export"])
    assert outcome.ok, outcome.failure
    texts = ["a b c d", "e f", "g h i j k"]
    res = tmp_path / "res.json"
    args = ["generate", "--artifacts", str(out), "--backend", "onnxruntime",
            "--max-new-tokens", "8", "--json", str(res)]
    for t in texts:
        args += ["--text", t]
    assert main(args) == 0
    got = json.loads(res.read_text())
    ref = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    enc = ref(texts, padding=True, return_tensors="pt")
    src = H.load_source(H.resolve_config(HF.ModelConfig(source="hf", path=str(folder))))
    b, ls = enc["input_ids"].shape
    x = {"src_ids": enc["input_ids"], "src_mask": enc["attention_mask"],
         "noise": torch.zeros(b, ls, src.cfg.latent_dim)}
    want = HF._hf_greedy(src, x, max_new=8)
    assert int(enc["attention_mask"].sum()) < b * ls  # the batch really is padded
    assert got["sequences"] == want
    assert got["texts"] == ref.batch_decode(want, skip_special_tokens=True)
