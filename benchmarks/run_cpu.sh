#!/usr/bin/env bash
# Reproduce benchmarks/RESULTS.md on a CPU machine:
#   benchmarks/run_cpu.sh [OUT_ROOT]      (default: engines/bench)
# Waits (up to ~10 min) for the 1-minute load average to drop below MAX_LOAD (default 0.6),
# because other processes on a 2-core machine distort every figure; the load at start and end
# is recorded in each bench.json / bench.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-/work/venv/bin/python}
OUT=${1:-engines/bench}
MAX_LOAD=${MAX_LOAD:-0.6}
SHAPES=${SHAPES:-1x64x64,1x128x64,8x64x64,8x128x64,4x64x32}
export HOME=${BENCH_HOME:-$(mktemp -d)}  # onnxruntime writes a cache under $HOME

wait_quiet() {
  for _ in $(seq 60); do
    load=$(cut -d' ' -f1 /proc/loadavg)
    if awk -v l="$load" -v m="$MAX_LOAD" 'BEGIN{exit !(l < m)}'; then return 0; fi
    echo "load $load >= $MAX_LOAD, waiting..." >&2; sleep 10
  done
  echo "warning: machine never got quiet (load $(cut -d' ' -f1 /proc/loadavg)); measuring anyway" >&2
}

$PY benchmarks/prepare.py benchmarks/hmu-bench-d256.toml "$OUT/hmu-bench-d256"
$PY benchmarks/prepare.py "$OUT/hmu-default"
for model in hmu-bench-d256 hmu-default; do
  wait_quiet
  $PY -m hmu_export bench --artifacts "$OUT/$model" --shapes "$SHAPES" \
      --json "benchmarks/results-$model.json" --out "$OUT/$model/bench"
  cp "$OUT/$model/bench/bench.md" "benchmarks/results-$model.md"
  cp "$OUT/$model/bench/bench.png" "benchmarks/results-$model.png"
done
