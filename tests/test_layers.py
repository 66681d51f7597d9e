"""The package's floors hold: imports only flow downward, no cycles, no private imports, floor 0
free of torch / onnxruntime, shipped/ self-contained (hmu_export.devtools.layers)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import hmu_export
from hmu_export.devtools.layers import FLOORS, ROOT_MODULES, check

PKG = Path(hmu_export.__file__).resolve().parent


def test_the_package_keeps_its_floors():
    assert [str(v) for v in check(PKG)] == []


def test_every_package_and_root_module_has_a_floor():
    packages = {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(FLOORS)
    root_modules = {p.stem for p in PKG.glob("*.py")}
    assert root_modules <= set(ROOT_MODULES)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "hmu_export"
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(root).parents:
            init = root / parent / "__init__.py"
            if not init.exists():
                init.write_text("")
        path.write_text(textwrap.dedent(text))
    return root


def test_an_upward_import_is_caught_even_inside_a_function(tmp_path):
    root = _tree(tmp_path, {
        "core/config.py": "def load():\n    from ..build.pipeline import run_build\n",
        "build/pipeline.py": "def run_build():\n    pass\n",
    })
    bad = check(root)
    assert [(v.kind, v.module) for v in bad] == [("upward", "hmu_export.core.config")]
    assert "hmu_export.build.pipeline (floor 4 > 0)" in bad[0].detail


def test_an_upward_type_only_import_is_caught_too(tmp_path):
    root = _tree(tmp_path, {
        "model/source.py": "from typing import TYPE_CHECKING\n"
                           "if TYPE_CHECKING:\n    from ..verify.parity import Row\n",
        "verify/parity.py": "class Row: ...\n",
    })
    assert [v.kind for v in check(root)] == ["upward"]


def test_a_cycle_within_a_floor_is_caught_but_not_a_type_only_one(tmp_path):
    files = {
        "bench/a.py": "from .b import g\ndef f(): pass\n",
        "bench/b.py": "def g():\n    from .a import f\n",
    }
    bad = check(_tree(tmp_path / "x", files))
    assert [v.kind for v in bad] == ["cycle"]
    assert bad[0].detail == "hmu_export.bench.a -> hmu_export.bench.b -> hmu_export.bench.a"
    files["bench/b.py"] = ("from typing import TYPE_CHECKING\n"
                           "if TYPE_CHECKING:\n    from .a import f\ndef g(): pass\n")
    assert check(_tree(tmp_path / "y", files)) == []


def test_a_private_name_from_another_module_is_caught(tmp_path):
    root = _tree(tmp_path, {
        "core/grid.py": "def _in_profile(): pass\ndef in_profile(): return _in_profile()\n",
        "verify/parity.py": "from ..core.grid import _in_profile\n",
    })
    bad = check(root)
    assert [(v.kind, v.detail) for v in bad] == [
        ("private", "line 1 imports hmu_export.core.grid._in_profile")]


def test_floor_zero_must_not_import_torch_and_shipped_must_stand_alone(tmp_path):
    root = _tree(tmp_path, {
        "core/io.py": "def f():\n    import onnxruntime\n",
        "core/errors.py": "class E(Exception): ...\n",
        "shipped/model.py": "from . import rules\nfrom ..core.errors import E\n",
        "shipped/rules.py": "import numpy\n",
    })
    kinds = sorted((v.kind, v.module) for v in check(root))
    assert kinds == [("heavy", "hmu_export.core.io"), ("isolated", "hmu_export.shipped.model")]


def test_a_package_without_a_floor_is_reported(tmp_path):
    root = _tree(tmp_path, {"misc/util.py": "X = 1\n"})
    assert [(v.kind, v.module) for v in check(root)] == [("unplaced", "hmu_export.misc"),
                                                          ("unplaced", "hmu_export.misc.util")]


def test_reading_a_config_or_a_build_folder_loads_neither_torch_nor_onnxruntime():
    code = ("import sys, hmu_export.core.config, hmu_export.core.build_folder, "
            "hmu_export.core.manifest, hmu_export.core.grid\n"
            "print(sorted(m for m in ('torch', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
