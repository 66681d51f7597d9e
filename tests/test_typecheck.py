"""The TensorRT-facing code is checked statically against tensorrt-stubs (TensorRT itself
cannot be installed on CPU machines)."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tensorrt_modules_typecheck_against_stubs():
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "typecheck-tensorrt.sh"), sys.executable],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success" in proc.stdout


def test_typecheck_catches_a_wrong_tensorrt_call(tmp_path):
    """Guard against a vacuous check: a misspelled TensorRT attribute must be reported."""
    bad = tmp_path / "bad_trt.py"
    bad.write_text("import tensorrt as trt\n\n\ndef f(layer: trt.ILayer) -> None:\n"
                   "    layer.precison = trt.float32\n")
    ini = tmp_path / "mypy.ini"
    ini.write_text(re.sub(r"(?m)^files = .*$", f"files = {bad}",
                          (ROOT / ".ci" / "mypy-tensorrt.ini").read_text()))
    script = (ROOT / ".ci" / "typecheck-tensorrt.sh").read_text().replace(
        "--config-file .ci/mypy-tensorrt.ini", f"--config-file {ini}")
    (tmp_path / "check.sh").write_text(script.replace('cd "$(dirname "$0")/.."', f'cd "{ROOT}"'))
    proc = subprocess.run(["bash", str(tmp_path / "check.sh"), sys.executable],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "precison" in proc.stdout
