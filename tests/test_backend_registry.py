"""One backend registry: a new backend is one module in hmu_export/backends/ and nothing else
(the registry imports every module of the package), and the CLI, parity and bench see it."""
from __future__ import annotations

import textwrap

import pytest

import hmu_export.backends as backends_pkg
from hmu_export.backends import registry

PLUGIN = textwrap.dedent('''
    """A planted backend: one module, registering a forward entry and a step backend."""
    from hmu_export.backends.registry import Backend, StepEntry, forward, step


    @forward(order=99)
    def forward_backends(layout, cfg, model, contract, *, threads=None):
        return [Backend("planted", "fp32", None, "planted for a test")]


    step(StepEntry("planted-step", 99, "fp32", "cpu", "nothing", lambda req: None))
''')


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """The registry as a fresh process would see it with one more module in the package."""
    (tmp_path / "planted_backend.py").write_text(PLUGIN)
    monkeypatch.setattr(backends_pkg, "__path__", [*backends_pkg.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "_FORWARD", list(registry._FORWARD))
    monkeypatch.setattr(registry, "_STEP", dict(registry._STEP))
    monkeypatch.setattr(registry, "_LOADED", False)
    import sys
    yield
    sys.modules.pop("hmu_export.backends.planted_backend", None)


def test_the_shipped_backends_and_their_order():
    assert registry.step_names() == ("torch", "torch-nocache", "onnxruntime", "onnxruntime-opt",
                                     "onnxruntime-fp16emu", "onnxruntime-int8",
                                     "onnxruntime-int4", "torch-cuda", "torch-cuda-fp16")
    entries = {e.name: e for e in registry.step_entries()}
    assert entries["onnxruntime-fp16emu"].precision == "fp16"
    assert entries["onnxruntime-int8"].precision == "int8"
    assert entries["torch-cuda"].device == "cuda" and entries["onnxruntime"].device == "cpu"


def test_a_new_module_is_a_new_backend_everywhere(planted, small_cfg, small_model, small_export):
    from hmu_export.commands.cli import make_parser
    from hmu_export.core.io_contract import full_contract

    assert "planted-step" in registry.step_names()
    found = registry.discover_backends(small_export, small_cfg, small_model,
                                       full_contract(small_cfg.model), use=None)
    assert found[-1].label == "planted" and found[-1].skip_reason == "planted for a test"
    gen = make_parser()._subparsers._group_actions[0].choices["generate"]
    choices = next(a.choices for a in gen._actions if a.dest == "backend")
    assert "planted-step" in choices


def test_an_unknown_step_backend_is_one_line(small_cfg, tmp_path):
    from hmu_export.core.errors import InputError

    with pytest.raises(InputError, match="unknown generation backend 'nope' \\(use torch, "):
        registry.make_stepper(tmp_path, small_cfg, "nope")
