#!/usr/bin/env bash
# Issue 10's peer benchmark: a random T5 with t5-small's shapes, built through the pipeline,
# then `bench --generate` with Transformers, Optimum and CTranslate2 (fp32, int8) in the same
# run (batch 1, 32 source / 32 new tokens, greedy):
#   benchmarks/peers_t5small.sh [OUT_ROOT]          (default: engines/t5-small-peers)
# PEERS_PY: a venv with optimum-onnx and ctranslate2 (Optimum pins transformers < 4.58, so
# not the project's venv; docs/huggingface.md shows how to make one). The build is made with
# the project's venv (the slow test tests/test_hf_realistic.py, which also checks parity).
# Waits (up to ~10 min) for the 1-minute load average to drop below MAX_LOAD.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PEERS_PY=${PEERS_PY:-/tmp/peers-venv/bin/python}
OUT=${1:-engines/t5-small-peers}
export HOME=${BENCH_HOME:-$(mktemp -d)}  # onnxruntime writes a cache under $HOME

if [ ! -f "$OUT/build/manifest.json" ]; then
  HMU_REALISTIC=1 HMU_REALISTIC_OUT="$OUT" $PY -m pytest -q -s tests/test_hf_realistic.py
fi
. benchmarks/wait_quiet.sh
wait_quiet
$PEERS_PY -m hmu_export bench --generate --artifacts "$OUT/build" \
    --backends torch,onnxruntime,onnxruntime-opt --batches 1 --src-len 32 --new-tokens 32 \
    --runs "${RUNS:-10}" --json benchmarks/peers-t5small.json --out "$OUT/bench"
echo "load at end: $(cat /proc/loadavg)"
cp "$OUT/bench/generate.md" benchmarks/peers-t5small.md
cp "$OUT/bench/generate.png" benchmarks/peers-t5small.png
