#!/usr/bin/env bash
# GPU checks on a lent CUDA machine (PyTorch + CUDA, onnx, ONNX Runtime CPU; no TensorRT, no
# internet; only the repository checkout travels, not .venv). Writes ONE JSON of figures.
#
#   bash scripts/device_check.sh [OUT_JSON_OR_DIR] [extra hmu_export.devtools.gpu_check options]
#
# OUT_JSON_OR_DIR defaults to $OUT (the device tool's folder), else ./device-check/.
# Small wheels the machine lacks (polygraphy, onnxconverter-common, tritonclient,
# python-rapidjson, all for CPython 3.12) travel in the git-ignored .whl/ folder and are
# installed to /tmp/site (HMU_SKIP_WHEELS=1 skips that, e.g. for a dry run on another Python).
# Sections: GPU-marked tests, a build of the default model, the parity grid (trained default
# and seeded init_scale 1 / 2 models) with torch-cuda FP32, FP16 and FP16 with the pin policy's
# modules in FP32 (--fp32-pins, default encoder/: docs/fp16.md, issue 17 item 6), a GPU latency
# bench (hmu_export/devtools/gpu_check.py). Hard limit: 470 s.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
DEST=${1:-${OUT:-device-check}}
[ $# -gt 0 ] && shift

if [ -z "${HMU_SKIP_WHEELS:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "error: installing .whl/*.whl failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
# onnxruntime >= 1.29 writes a cache under $HOME/.cache: keep it out of the real home.
HOME=$(mktemp -d -t hmu-device-home-XXXXXX)
export HOME XDG_CACHE_HOME=$HOME/.cache

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
timeout -k 10 470 "$PY" -m hmu_export.devtools.gpu_check --out "$DEST" --pytest --build --budget-s 420 "$@"
rc=$?
[ $rc -eq 124 ] && echo "error: device_check timed out after 470 s" >&2
exit $rc
