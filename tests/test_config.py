from dataclasses import replace
from pathlib import Path

import pytest

from hmu_export.core.config import BuildConfig, load_config, parse_shapes
from hmu_export.core.errors import ConfigError

ISSUE_TOML = """
[model]
name = "hmu-small"
vocab_size = 517
d_model = 192
n_heads = 6
n_encoder_layers = 3
n_decoder_layers = 1
d_ff = 384
latent_dim = 48
max_len = 128
seed = 7
[profile]            # min, opt, max
batch = [1, 4, 16]
src_len = [1, 48, 96]
tgt_len = [1, 16, 40]
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_default_is_valid_and_latent_is_half_of_d_model():
    cfg = load_config(None)
    # no config: the trained demo, whose architecture is the dataclasses' defaults
    assert cfg.model == BuildConfig().model.__class__(checkpoint=cfg.model.checkpoint)
    assert cfg.model.checkpoint and cfg.task.path
    # ... the parity bounds scaled to its logits (docs/demo-model.md), nothing else
    assert cfg.parity.fp32_max_abs > BuildConfig().parity.fp32_max_abs
    assert replace(cfg, model=BuildConfig().model, task=BuildConfig().task,
                   parity=BuildConfig().parity) == BuildConfig()
    assert cfg.model.latent_dim == cfg.model.d_model // 2  # the paper's reference default


def test_issue_config_parses(tmp_path):
    cfg = load_config(write(tmp_path, ISSUE_TOML))
    assert cfg.model.d_model == 192 and cfg.model.n_heads == 6
    assert cfg.profile.batch == (1, 4, 16) and cfg.profile.tgt_len == (1, 16, 40)
    assert cfg.export.opset == 18  # untouched sections keep defaults


def test_empty_file_is_the_seeded_default(tmp_path):
    assert load_config(write(tmp_path, "")) == BuildConfig()


@pytest.mark.parametrize("text, needle", [
    ("[model]\nd_modle = 3\n", "unknown key 'model.d_modle'"),
    ("[triton]\ninstance_count = 1000000000\n", "triton.instance_count must be in [1, 256]"),
    ("[task]\nlimit = -1\n", "task.limit must be >= 0"),
    ("[task]\nnoise_scales = [0.0, 1e9]\n", "task.noise_scales[1] must be in [0, 100]"),
    ("[modell]\n", "unknown key 'modell'"),
    ("[model]\nd_model = 'big'\n", "model.d_model must be an integer"),
    ("[model]\nd_model = 1.5\n", "model.d_model must be an integer"),
    ("[model]\nuse_hmu = 1\n", "model.use_hmu must be true or false"),
    ("[profile]\nbatch = [4, 2, 8]\n", "profile.batch: min (4) > opt (2)"),
    ("[profile]\nsrc_len = [1, 64, 32]\n", "profile.src_len: opt (64) > max (32)"),
    ("[profile]\ntgt_len = [1, 2]\n", "profile.tgt_len must have 3 entries"),
    ("[profile]\nbatch = [0, 1, 2]\n", "profile.batch: min must be >= 1"),
    ("[model]\nd_model = 100\nn_heads = 3\n", "model.n_heads (3) must divide model.d_model (100)"),
    ("[model]\nmax_len = 16\n", "exceeds model.max_len"),
    ("[export]\nopset = 17\n", "export.opset must be 18, 19 or 20"),
    ("[model\n", "not valid TOML"),
    ("[engine]\nextra_profiles = [{batch=[1,1,64], src_len=[1,1,1], tgt_len=[1,1,1]}]\n",
     "lies outside profile.batch"),
])
def test_bad_config_names_the_field(tmp_path, text, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text))
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_relative_checkpoint_is_relative_to_the_config(tmp_path):
    cfg = load_config(write(tmp_path, '[model]\ncheckpoint = "w/model.safetensors"\n'))
    assert cfg.model.checkpoint == str(tmp_path / "w" / "model.safetensors")


def test_parse_shapes():
    assert parse_shapes("1x8x4, 2X16x8") == [(1, 8, 4), (2, 16, 8)]
    for bad in ("1x8", "0x1x1", "ax1x1", ""):
        with pytest.raises(ConfigError):
            parse_shapes(bad)


def test_readme_config_example_is_valid(tmp_path):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("```toml\n", text.index("## Configuration")) + len("```toml\n")
    cfg = load_config(write(tmp_path, text[start:text.index("```", start)]))
    assert cfg.model.name == "hmu-small" and cfg.engine.extra_profiles[0].batch == (1, 1, 1)
    assert cfg.parity.extra_shapes == ((2, 17, 9),)


def test_every_path_in_a_toml_is_relative_to_the_toml(tmp_path, monkeypatch):
    """Issue 21: model.path and hmu_checkpoint resolve as checkpoint does, wherever the
    command runs (the README's `path = "models/t5-small"` next to the TOML)."""
    import os

    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "c.toml").write_text(
        '[model]\nsource = "hf"\npath = "models/t5"\nhmu_checkpoint = "../hmu.safetensors"\n'
        'checkpoint = "w/model.safetensors"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd in (tmp_path, elsewhere, conf):
        monkeypatch.chdir(cwd)
        for name in (os.path.relpath(conf / "c.toml", cwd), str(conf / "c.toml")):
            cfg = load_config(Path(name))
            assert cfg.model.path == str(conf / "models" / "t5")
            assert cfg.model.hmu_checkpoint == str(tmp_path / "hmu.safetensors")
            assert cfg.model.checkpoint == str(conf / "w" / "model.safetensors")


def test_absolute_and_home_paths_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(write(tmp_path, '[model]\npath = "~/m"\nhmu_checkpoint = "/abs/h.st"\n'))
    assert cfg.model.path == str(tmp_path / "home" / "m")
    assert cfg.model.hmu_checkpoint == "/abs/h.st"


def test_derived_keys_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="model.derived_keys must be a list"):
        load_config(write(tmp_path, '[model]\nderived_keys = "x"\n'))
    with pytest.raises(ConfigError, match=r"model.derived_keys\[0\]"):
        load_config(write(tmp_path, '[model]\nderived_keys = [""]\n'))
    cfg = load_config(write(tmp_path, '[model]\nderived_keys = ["a.*", "b"]\n'))
    assert cfg.model.derived_keys == ("a.*", "b")


def test_an_integer_too_long_to_convert_is_one_config_error(tmp_path):
    """Found by scripts/hostile.py: tomllib raises a bare ValueError (not TOMLDecodeError) for
    an integer literal beyond Python's 4300-digit conversion limit."""
    p = tmp_path / "c.toml"
    p.write_text("[model]\nseed = " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match="cannot read") as exc:
        load_config(p)
    assert "\n" not in str(exc.value)
