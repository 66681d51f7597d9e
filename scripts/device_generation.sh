#!/usr/bin/env bash
# Generation on a lent GPU machine: default build (graphs only), greedy token agreement of
# torch-cuda / torch-cuda-fp16 with torch-nocache, and `bench --generate` with the CUDA
# backends beside the CPU ones (CPU ones pinned to 2 cores, as on the project's machines).
# Usage: bash scripts/device_generation.sh [OUT_DIR]   (wheels: see scripts/device_check.sh)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${1:-${OUT:-device-generation}}
mkdir -p "$DEST"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
HOME=$(mktemp -d) && export HOME
B=$(mktemp -d)/hmu-default
timeout 200 "$PY" - "$B" "$DEST" <<'PYEOF' || exit 1
import json, sys
from hmu_export.config import BuildConfig
from hmu_export.build.pipeline import run_build
from hmu_export.generate.generator import Generator
from hmu_export.verify.generation_parity import compare_tokens, token_inputs
out = run_build(BuildConfig().validate(), sys.argv[1], only=["checkpoint", "export", "optimize"])
print("build", out.ok, out.failure, round(out.seconds, 1))
cfg = BuildConfig().validate()
ref = Generator.from_build(sys.argv[1], "torch-nocache")
rows = []
for name in ("torch-cuda", "torch-cuda-fp16"):
    gen = Generator.from_build(sys.argv[1], name)
    for src in token_inputs(cfg):
        agree, first = compare_tokens(ref.generate(src).sequences, gen.generate(src).sequences)
        rows.append({"backend": name, "batch": len(src), "agreement": agree,
                     "first_divergence": first})
        print(rows[-1])
json.dump(rows, open(f"{sys.argv[2]}/cuda_token_agreement.json", "w"), indent=1)
PYEOF
timeout 100 "$PY" -m hmu_export bench --artifacts "$B" --generate --backends torch-cuda,torch-cuda-fp16 \
  --out "$DEST/cuda" 2>&1 | tail -12
timeout 150 taskset -c 0,1 "$PY" -m hmu_export bench --artifacts "$B" --generate --out "$DEST/cpu2" 2>&1 | tail -14
