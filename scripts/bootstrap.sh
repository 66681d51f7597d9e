#!/usr/bin/env bash
# Creates .venv with everything the project and its tests need, on a fresh CPU machine.
# The pinned CPU torch wheel goes first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,triton,hf,deploy,train]"
# tensorrt-stubs declares a dependency on tensorrt, whose PyPI wheel is a downloader stub that
# cannot install here; the stubs alone are all the type check needs.
.venv/bin/python -m pip install -q --no-deps "tensorrt-stubs>=10.0"
