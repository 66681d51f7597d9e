#!/usr/bin/env bash
# Issue 17's three benchmark tables (benchmarks/RESULTS.md, "int8 against the peers"):
#  1. t5-small shapes, batch 1, greedy, 32 source / 32 new tokens, 1 thread: ours FP32 / int8 /
#     int4 against Transformers and CTranslate2 FP32 / int8, then peak RSS and weight bytes of
#     each generator alone in its own process (benchmarks/rss_probe.py);
#  2. OPUS-MT shapes (Marian d512, 6+6, vocab 58,101), batch 32, beam 4, 2 threads: ours
#     FP32 / int8 against CTranslate2 FP32 / int8;
#  3. the trained T5 twin on its 2,020-number test set (`bench --task`): exact match and
#     tokens/s of ours FP32 / int8 / int4, Transformers (HMU applied and off), Optimum FP32 and
#     dynamic int8, CTranslate2 FP32 / int8.
# Usage: benchmarks/int8_peers.sh [OUT_ROOT] [1 2 3]   (default: engines/peers, every table)
# PY builds (the project's venv); PEERS_PY runs (a venv with optimum-onnx and ctranslate2,
# docs/huggingface.md). Waits (up to ~10 min) for the 1-minute load average to drop below
# MAX_LOAD before each table.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PEERS_PY=${PEERS_PY:-/tmp/peers-venv/bin/python}
OUT=${1:-engines/peers}
shift || true
TABLES=${*:-1 2 3}
RUNS=${RUNS:-10}
export HOME=${BENCH_HOME:-$(mktemp -d)}  # onnxruntime and Transformers write caches under $HOME

. benchmarks/wait_quiet.sh

for t in $TABLES; do
  case $t in
  1)
    [ -f "$OUT/t5-small/build/manifest.json" ] || $PY benchmarks/prepare_peers.py "$OUT" t5-small
    wait_quiet
    $PEERS_PY -m hmu_export bench --generate --artifacts "$OUT/t5-small/build" \
        --backends onnxruntime-opt,onnxruntime-int8,onnxruntime-int4 \
        --peers transformers,ctranslate2 --batches 1 --src-len 32 --new-tokens 32 --threads 1 \
        --runs "$RUNS" --json benchmarks/int8-t5small.json --out "$OUT/t5-small/bench"
    cp "$OUT/t5-small/bench/generate.md" benchmarks/int8-t5small.md
    cp "$OUT/t5-small/bench/generate.png" benchmarks/int8-t5small.png
    : > benchmarks/int8-t5small-rss.jsonl
    for name in onnxruntime-opt onnxruntime-int8 onnxruntime-int4 transformers \
                ctranslate2-fp32 ctranslate2-int8; do
      $PEERS_PY benchmarks/rss_probe.py "$OUT/t5-small/build" "$name" 1 32 32 1 \
          | tail -1 >> benchmarks/int8-t5small-rss.jsonl
    done
    echo "load at end: $(cat /proc/loadavg)" ;;
  2)
    [ -f "$OUT/opus-mt/build/manifest.json" ] || $PY benchmarks/prepare_peers.py "$OUT" opus-mt
    wait_quiet
    $PEERS_PY -m hmu_export bench --generate --artifacts "$OUT/opus-mt/build" \
        --backends onnxruntime-opt,onnxruntime-int8 --peers ctranslate2 --batches 32 --beams 4 \
        --src-len 32 --new-tokens 32 --threads 2 --runs "${RUNS_BEAM:-3}" \
        --json benchmarks/int8-opusmt-beam4.json --out "$OUT/opus-mt/bench"
    cp "$OUT/opus-mt/bench/generate.md" benchmarks/int8-opusmt-beam4.md
    echo "load at end: $(cat /proc/loadavg)" ;;
  3)
    [ -f "$OUT/t5-numbers-es/manifest.json" ] || \
      $PY -m hmu_export build --config examples/t5-numbers-es/build.toml --out "$OUT/t5-numbers-es"
    wait_quiet
    $PEERS_PY -m hmu_export bench --task --artifacts "$OUT/t5-numbers-es" --batches 8 \
        --threads 1 --json benchmarks/task-t5-numbers-es.json --out "$OUT/t5-numbers-es/bench"
    cp "$OUT/t5-numbers-es/bench/task_bench.md" benchmarks/task-t5-numbers-es.md
    echo "load at end: $(cat /proc/loadavg)" ;;
  *) echo "unknown table $t (use 1, 2 or 3)" >&2; exit 2 ;;
  esac
done
