"""Issues 19 / 21, hf side: a folder whose files do not describe one model is refused when the
build starts, with one line naming what is wrong (never a model that is not the user's).

Oracle: the folder as `save_pretrained` wrote it builds; each test changes one thing in a copy
(a tensor dropped, added or reshaped, config.json's model_type, the weights index, the
tokenizer) and expects the refusal to name it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import test_hf_source as HF  # noqa: E402  (its tiny-model builders)

from hmu_export.commands.cli import main  # noqa: E402
from hmu_export.core.config import ModelConfig  # noqa: E402
from hmu_export.core.errors import CheckpointError, ConfigError  # noqa: E402
from hmu_export.model import hf as H  # noqa: E402

BIAS = "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name in ("t5", "marian"):
        folder = tmp_path_factory.mktemp(f"strict_{name}")
        HF.BUILDERS[name]().save_pretrained(folder)
        out[name] = folder
    return out


@pytest.fixture
def t5(saved, tmp_path) -> Path:
    dst = tmp_path / "t5"
    shutil.copytree(saved["t5"], dst)
    return dst


def _load(folder: Path, **kw):
    return H.load_source(H.resolve_config(ModelConfig(source="hf", path=str(folder), **kw)))


def _refused(exc_type, folder: Path, **kw) -> str:
    with pytest.raises(exc_type) as info:
        _load(folder, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def _edit_weights(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file
    path = folder / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- weights
def test_a_missing_tensor_stops_the_build_naming_it(t5):
    _edit_weights(t5, lambda s: s.pop(BIAS))
    msg = _refused(CheckpointError, t5)
    assert BIAS in msg and "missing 1" in msg and "derived_keys" in msg


def test_a_missing_tensor_fails_the_cli_build_with_one_line(t5, tmp_path, capsys):
    _edit_weights(t5, lambda s: s.pop(BIAS))
    conf = tmp_path / "c.toml"
    conf.write_text(f'[model]\nsource = "hf"\npath = "{t5}"\n')
    rc = main(["build", "--config", str(conf), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and err[0].startswith("error: ") and BIAS in err[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.failed").exists()


def test_derived_keys_opt_in_accepts_exactly_the_named_keys(t5):
    _edit_weights(t5, lambda s: s.pop(BIAS))
    assert _load(t5, derived_keys=(BIAS,)).hf_model is not None
    assert _load(t5, derived_keys=("decoder.block.0.*.relative_attention_bias.weight",))
    # a pattern for other keys does not cover it
    assert BIAS in _refused(CheckpointError, t5, derived_keys=("encoder.*",))


def test_unexpected_and_reshaped_tensors_are_named(t5):
    _edit_weights(t5, lambda s: s.update({"decoder.extra.weight": torch.zeros(2)}))
    assert "unexpected: 'decoder.extra.weight'" in _refused(CheckpointError, t5)
    _edit_weights(t5, lambda s: s.pop("decoder.extra.weight"))
    norm = "decoder.final_layer_norm.weight"
    _edit_weights(t5, lambda s: s.update({norm: torch.ones(33)}))
    msg = _refused(CheckpointError, t5)
    assert norm in msg and "[33]" in msg and "[32]" in msg


def test_derived_keys_never_excuse_an_unexpected_tensor(t5):
    _edit_weights(t5, lambda s: s.update({"decoder.extra.weight": torch.zeros(2)}))
    assert "decoder.extra.weight" in _refused(CheckpointError, t5,
                                              derived_keys=("decoder.extra.weight",))


def test_tied_and_recomputed_keys_need_no_opt_in(saved):
    """T5's LM head and embeddings are the shared table (one storage, saved once); Marian's
    sinusoidal positions are recomputed on load (Transformers never saves them)."""
    _load(saved["t5"])
    _load(saved["marian"])
    from safetensors import safe_open
    with safe_open(str(saved["marian"] / "model.safetensors"), "pt") as f:
        assert not any("embed_positions" in k for k in f.keys())


# ----------------------------------------------------------------------------- config.json
@pytest.mark.parametrize("model_type", ["gpt2", "bart", None])
def test_model_type_contradicting_the_architecture_is_refused(t5, model_type):
    conf = json.loads((t5 / "config.json").read_text())
    if model_type is None:
        conf.pop("model_type")
    else:
        conf["model_type"] = model_type
    (t5 / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError) as info:
        H.resolve_config(ModelConfig(source="hf", path=str(t5)))
    msg = str(info.value)
    assert H.T5 in msg and repr(model_type) in msg and "'t5'" in msg


@pytest.mark.parametrize("text, needle", [("[" * 100_000 + "]" * 100_000, "nested too deeply"),
                                          ('{"vocab_size": ' + "9" * 5000 + "}", "cannot read")])
def test_a_config_json_python_cannot_parse_is_one_config_error(t5, text, needle):
    """Found by scripts/hostile.py: a 100,000-deep config.json was a RecursionError traceback."""
    (t5 / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=needle) as info:
        H.resolve_config(ModelConfig(source="hf", path=str(t5)))
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- sharded index
def _sharded(folder: Path, shard_name: str, outside: Path | None = None) -> None:
    from safetensors.torch import load_file, save_file
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    target = outside if outside is not None else folder / shard_name
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard_name for k in state}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_a_shard_inside_the_folder_is_read(t5):
    _sharded(t5, "model-00001-of-00001.safetensors")
    _load(t5)


@pytest.mark.parametrize("name", ["../../x.safetensors", "../x.safetensors", "/tmp/x.safetensors",
                                  "sub/../../x.safetensors"])
def test_an_index_pointing_outside_the_folder_is_refused(t5, tmp_path, name):
    outside = (t5 / name).resolve() if not name.startswith("/") else tmp_path / "abs.safetensors"
    _sharded(t5, name if not name.startswith("/") else str(outside), outside=outside)
    with pytest.raises(CheckpointError) as info:
        H.resolve_config(ModelConfig(source="hf", path=str(t5)))
    assert "leaves the model folder" in str(info.value)


# ----------------------------------------------------------------------------- tokenizer
def _tokenizer(folder: Path, size: int, eos_id: int = 1) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<unk>"] + [f"w{i}" for i in range(size - 2)]
    words.insert(eos_id, "</s>")
    words = words[:size]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                         eos_token="</s>", unk_token="<unk>"
                                         ).save_pretrained(folder)


def test_a_fitting_tokenizer_is_accepted(t5):
    pytest.importorskip("tokenizers")
    _tokenizer(t5, 96)
    _load(t5)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(t5):
    pytest.importorskip("tokenizers")
    _tokenizer(t5, 300)
    msg = _refused(CheckpointError, t5)
    assert "reaches id 299" in msg and "vocab_size is 96" in msg


def test_a_tokenizer_with_another_end_token_is_refused(t5):
    pytest.importorskip("tokenizers")
    _tokenizer(t5, 96, eos_id=5)
    msg = _refused(CheckpointError, t5)
    assert "'</s>' is id 5" in msg and "eos_token_id 1" in msg


def test_a_garbage_tokenizer_json_is_refused_when_the_build_starts(t5, tmp_path, capsys):
    (t5 / "tokenizer.json").write_text("{this is not a tokenizer")
    assert "cannot load the tokenizer" in _refused(CheckpointError, t5)
    conf = tmp_path / "c.toml"
    conf.write_text(f'[model]\nsource = "hf"\npath = "{t5}"\n')
    assert main(["build", "--config", str(conf), "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot load the tokenizer" in err[0]
