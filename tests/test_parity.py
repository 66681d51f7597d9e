import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from hmu_export.core.layout import BuildLayout
from hmu_export.core.config import ProfileConfig
from hmu_export.core.errors import InputError
from hmu_export.core.io_contract import full_contract
from hmu_export.core.grid import axis_values, derive_grid
from hmu_export.verify.parity import compare_arrays, hmu_checks, layout_backends, run_parity, write_reports
from hmu_export.backends.registry import Backend
from hmu_export.runners import TorchRunner
from hmu_export.core.tolerance import FP32, Tolerance


def test_axis_values_cover_min_opt_max_one_and_an_odd_size():
    for lo, opt, hi in [(1, 4, 8), (1, 64, 128), (2, 6, 9), (3, 5, 9)]:
        vals = axis_values(lo, opt, hi)
        assert {lo, opt, hi} <= set(vals)
        assert all(lo <= v <= hi for v in vals)
        assert any(v % 2 and lo < v < hi and v != opt for v in vals), (lo, opt, hi)
        assert (1 in vals) == (lo == 1)
    assert axis_values(2, 2, 2) == [2]


def test_grid_is_inside_the_profile_with_corners():
    p = ProfileConfig((1, 4, 8), (1, 48, 96), (1, 16, 40))
    grid = derive_grid(p, extra=[(2, 3, 4)])
    assert (1, 1, 1) in grid and (8, 96, 40) in grid and (4, 48, 16) in grid
    assert (2, 3, 4) in grid
    assert all(p.contains(*s) for s in grid)
    assert len(grid) == len(set(grid))


def test_compare_arrays_metrics_on_known_cases():
    ref = np.array([[[0.0, 1.0, 5.0, 2.0]], [[3.0, 0.0, 0.0, 1.0]]], dtype=np.float32)
    m, reasons = compare_arrays(ref, ref.copy(), FP32, top1=True)
    assert m == {"max_abs": 0.0, "max_rel_range": 0.0, "cosine": pytest.approx(1.0),
                 "top1_agreement": 1.0} and not reasons
    got = ref.copy()
    got[0, 0, 1] += 0.5  # range of ref is 5 -> rel 0.1; argmax unchanged
    m, reasons = compare_arrays(ref, got, FP32, top1=True)
    assert m["max_abs"] == pytest.approx(0.5) and m["max_rel_range"] == pytest.approx(0.1)
    assert m["top1_agreement"] == 1.0
    assert any("max_abs" in r for r in reasons)
    flipped = ref.copy()
    flipped[1, 0, 3] = 9.0  # argmax of the second row moves
    m, _ = compare_arrays(ref, flipped, FP32, top1=True)
    assert m["top1_agreement"] == 0.5
    m, reasons = compare_arrays(ref, -ref, FP32, top1=False)
    assert m["cosine"] == pytest.approx(-1.0) and any("cosine" in r for r in reasons)


def test_near_ties_are_not_counted_for_top1():
    tol = Tolerance(max_abs=0.1, max_rel_range=1.0, min_cosine=0.0, min_top1=1.0)
    ref = np.array([[1.0, 1.05, 0.0], [0.0, 3.0, 0.0]])  # row 0 is a near-tie (< 2*0.1)
    got = np.array([[1.05, 1.0, 0.0], [0.0, 3.0, 0.0]])
    m, reasons = compare_arrays(ref, got, tol, top1=True)
    assert m["top1_agreement"] == 1.0 and not reasons


def test_nan_output_fails():
    ref = np.ones((2, 3), np.float32)
    got = ref.copy()
    got[0, 0] = np.nan
    _, reasons = compare_arrays(ref, got, FP32, top1=False)
    assert reasons


def _ort_backend(layout, cfg, model, contract):
    return layout_backends(layout.root, cfg, model, contract, ["onnxruntime"])


def test_parity_passes_on_a_good_export(small_export, small_cfg, small_model, tmp_path):
    contract = full_contract(small_cfg.model)
    report = run_parity(small_model, small_cfg, _ort_backend(small_export, small_cfg,
                                                             small_model, contract), contract)
    assert report.passed, report.failures()
    assert len(report.results) == len(derive_grid(small_cfg.profile))
    assert max(r.max_abs for r in report.results) < 1e-4
    assert {c.name for c in report.checks} == {"noise_live", "zero_noise_is_mean_path",
                                               "padding_invariance"}
    json_path, md, png = write_reports(report, tmp_path)
    data = json.loads(json_path.read_text())
    assert data["passed"] is True
    row = data["results"][0]
    assert {"backend", "precision", "shape", "output", "max_abs", "max_rel_range", "cosine",
            "top1_agreement", "passed"} <= set(row)
    assert "| onnxruntime | fp32 | logits |" in md.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parity_catches_a_broken_graph(small_export, small_cfg, small_model, tmp_path):
    broken = BuildLayout(tmp_path)
    shutil.copytree(small_export.checkpoint_dir, broken.checkpoint_dir)
    proto = onnx.load(str(small_export.onnx))
    node = next(n for n in proto.graph.node if n.name == "hmu/norm_input/LayerNormalization")
    weight = next(i for i in proto.graph.initializer if i.name == node.input[1])
    arr = numpy_helper.to_array(weight).copy()
    arr[0] += 0.05  # one LayerNorm weight off by 5%
    weight.CopyFrom(numpy_helper.from_array(arr, weight.name))
    onnx.save(proto, str(broken.onnx))
    contract = full_contract(small_cfg.model)
    report = run_parity(small_model, small_cfg, _ort_backend(broken, small_cfg, small_model,
                                                             contract), contract)
    assert not report.passed
    assert any(not r.passed for r in report.results)
    assert report.failures()


class _NoiseIgnoringRunner(TorchRunner):
    def _infer(self, feeds):
        return super()._infer(dict(feeds, noise=np.zeros_like(feeds["noise"])))


class _PadLeakingRunner(TorchRunner):
    def _infer(self, feeds):
        out = super()._infer(feeds)
        leak = feeds["src_ids"].mean(axis=1).astype(np.float32)[:, None, None] * 1e-3
        return dict(out, logits=out["logits"] + leak)


def test_hmu_checks_catch_dead_noise_and_padding_leaks(small_cfg, small_model):
    contract = full_contract(small_cfg.model)
    good = {c.name: c.passed for c in hmu_checks(
        TorchRunner(small_model, contract, [small_cfg.profile]), small_model, small_cfg, FP32,
        (2, 8, 4))}
    assert good == {"noise_live": True, "zero_noise_is_mean_path": True,
                    "padding_invariance": True}
    dead = {c.name: c.passed for c in hmu_checks(
        _NoiseIgnoringRunner(small_model, contract, [small_cfg.profile]), small_model,
        small_cfg, FP32, (2, 8, 4))}
    assert dead["noise_live"] is False
    leaky = {c.name: c.passed for c in hmu_checks(
        _PadLeakingRunner(small_model, contract, [small_cfg.profile]), small_model, small_cfg,
        FP32, (2, 8, 4))}
    assert leaky["padding_invariance"] is False


def test_shapes_outside_the_profile_are_refused(small_cfg, small_model):
    contract = full_contract(small_cfg.model)
    with pytest.raises(InputError, match="outside the profile"):
        run_parity(small_model, small_cfg, [], contract, shapes=[(9, 1, 1)])


def test_unavailable_backends_are_reported_as_skipped(small_cfg, small_model, small_export):
    contract = full_contract(small_cfg.model)
    backends = _ort_backend(small_export, small_cfg, small_model, contract)
    backends.append(Backend("imaginary", "fp16", None, "no such device here"))
    report = run_parity(small_model, small_cfg, backends, contract, shapes=[(1, 8, 4)])
    assert report.skipped == {"imaginary": "no such device here"}
    assert report.passed


def test_unknown_backend_label_is_an_error(small_export, small_cfg, small_model):
    with pytest.raises(InputError, match="unknown backend"):
        layout_backends(small_export.root, small_cfg, small_model,
                        full_contract(small_cfg.model), ["nope"])


def test_a_backend_emitting_inf_is_a_failed_row_not_an_aborted_run(small_cfg, small_model):
    """A runner whose output overflows shows up in the report (other shapes still run)."""
    import numpy as np

    from hmu_export.core.io_contract import full_contract
    from hmu_export.verify.parity import run_parity
    from hmu_export.backends.registry import Backend
    from hmu_export.runners import TorchRunner

    contract = full_contract(small_cfg.model)

    class Overflowing(TorchRunner):
        def _infer(self, feeds):  # type: ignore[no-untyped-def]
            out = super()._infer(feeds)
            if feeds["src_ids"].shape[0] == small_cfg.profile.batch[2]:
                out["logits"] = np.full_like(out["logits"], np.inf)
            return out

    backend = Backend("overflowing", "fp32", lambda: Overflowing(
        small_model, contract, [small_cfg.profile], label="overflowing"))
    shapes = [(1, 8, 4), (small_cfg.profile.batch[2], 8, 4)]
    report = run_parity(small_model, small_cfg, [backend], contract, shapes=shapes)
    by_batch = {r.shape[0]: r for r in report.results if r.output == "logits"}
    assert by_batch[1].passed
    bad = by_batch[small_cfg.profile.batch[2]]
    assert not bad.passed and any("non-finite" in why for why in bad.reasons)
    assert not report.passed
