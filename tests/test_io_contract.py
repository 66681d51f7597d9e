import numpy as np
import pytest

from hmu_export.core.config import ProfileConfig
from hmu_export.core.errors import InputError
from hmu_export.core.io_contract import full_contract, make_feeds, validate_feeds
from hmu_export.runners import OnnxRuntimeRunner, TorchRunner


@pytest.fixture()
def feeds(small_cfg):
    return make_feeds(small_cfg.model, 2, 8, 4)


def _check(small_cfg, feeds):
    validate_feeds(full_contract(small_cfg.model), feeds, small_cfg.profile,
                   small_cfg.model.vocab_size)


def test_valid_feeds_pass(small_cfg, feeds):
    _check(small_cfg, feeds)


@pytest.mark.parametrize("mutate, needle", [
    (lambda f: f.pop("noise"), "missing input(s): noise"),
    (lambda f: f.update(extra=np.zeros(1)), "unknown input(s): extra"),
    (lambda f: f.update(src_ids=f["src_ids"].astype(np.int32)), "'src_ids' has dtype int32"),
    (lambda f: f.update(noise=f["noise"].astype(np.float64)), "'noise' has dtype float64"),
    (lambda f: f.update(src_ids=f["src_ids"][0]), "'src_ids' has rank 1"),
    (lambda f: f.update(src_mask=f["src_mask"][:, :5]), "src_len) is 5"),
    (lambda f: f.update(noise=f["noise"][..., :3]), "'noise' dim 2 is 3, expected 16"),
    (lambda f: f.update(src_mask=f["src_mask"] * 2), "only 0 (pad) and 1"),
    (lambda f: f.update(src_mask=np.zeros_like(f["src_mask"])), "row with no real token"),
    (lambda f: f.update(tgt_ids=f["tgt_ids"] + 100), "token ids outside [0, 61)"),
    (lambda f: f.update(noise=f["noise"] * np.nan), "non-finite"),
])
def test_contract_violations_are_named(small_cfg, feeds, mutate, needle):
    mutate(feeds)
    with pytest.raises(InputError) as exc:
        _check(small_cfg, feeds)
    assert needle in str(exc.value)


def test_shape_outside_profile(small_cfg):
    big = make_feeds(small_cfg.model, 2, 17, 4)  # profile src_len max is 16
    with pytest.raises(InputError, match="shape outside the profile: .*src_len=17"):
        _check(small_cfg, big)


def test_any_of_several_profiles_accepts(small_cfg):
    contract = full_contract(small_cfg.model)
    p1 = ProfileConfig((1, 1, 2), (1, 4, 8), (1, 4, 8))
    p2 = ProfileConfig((3, 4, 4), (12, 16, 16), (1, 4, 8))
    validate_feeds(contract, make_feeds(small_cfg.model, 4, 16, 4), [p1, p2])
    with pytest.raises(InputError, match="allowed: .* \\| "):
        validate_feeds(contract, make_feeds(small_cfg.model, 4, 8, 4), [p1, p2])


def test_runners_validate_before_running(small_cfg, small_model, small_export, feeds):
    contract = full_contract(small_cfg.model)
    ort_runner = OnnxRuntimeRunner(small_export.onnx, contract, [small_cfg.profile],
                                   vocab_size=small_cfg.model.vocab_size)
    torch_runner = TorchRunner(small_model, contract, [small_cfg.profile])
    bad = dict(feeds, tgt_ids=feeds["tgt_ids"].astype(np.float32))
    for runner in (ort_runner, torch_runner):
        with pytest.raises(InputError, match="'tgt_ids' has dtype float32"):
            runner.infer(bad)
    np.testing.assert_allclose(ort_runner.infer(feeds)["logits"],
                               torch_runner.infer(feeds)["logits"], atol=1e-4)


def test_make_feeds_pads_odd_rows(small_cfg):
    f = make_feeds(small_cfg.model, 4, 8, 4)
    assert f["src_mask"][0].all() and f["src_mask"][2].all()
    assert not f["src_mask"][1].all() and not f["src_mask"][3].all()
    assert (f["src_ids"][f["src_mask"] == 0] == small_cfg.model.pad_id).all()
