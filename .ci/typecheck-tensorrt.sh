#!/usr/bin/env bash
# Type-check the TensorRT-facing modules against the tensorrt-stubs package (TensorRT cannot be
# installed on CPU machines). tensorrt-stubs 10.13 installs `tensorrt/` and `tensorrt_bindings/`
# without a py.typed marker (mypy skips them) and has syntax errors (parameters named `in`, a
# non-default parameter after defaults) and imports the absent tensorrt_libs,
# so a patched copy goes on MYPYPATH. Usage: .ci/typecheck-tensorrt.sh [python]
set -euo pipefail
PY="${1:-python}"
cd "$(dirname "$0")/.."
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
[ -f "$site/tensorrt_bindings/tensorrt.pyi" ] || { echo "tensorrt-stubs is not installed in $site" >&2; exit 2; }
stubs=$(mktemp -d)
trap 'rm -rf "$stubs"' EXIT
cp -r "$site/tensorrt" "$site/tensorrt_bindings" "$stubs/"
find "$stubs" -name '*.py' -delete
sed -i -E 's/([(,] *)in(: )/\1in_\2/g; s/(channel_axis: int)\)/\1 = ...)/' \
  "$stubs"/tensorrt_bindings/*.pyi
sed -i "/^import tensorrt_libs/d" "$stubs"/tensorrt/__init__.pyi "$stubs"/tensorrt_bindings/__init__.pyi
MYPYPATH="$stubs" "$PY" -m mypy --config-file .ci/mypy-tensorrt.ini
