#!/usr/bin/env bash
# Fetch the C++ program's third-party headers and libraries into cpp/third_party/ (git-ignored).
#
#   cpp/fetch_deps.sh          ONNX Runtime headers (C/C++ API 29) + Linux x86_64 library, from
#                              the npm package com.github.asus4.onnxruntime (MIT)
#   cpp/fetch_deps.sh trt      TensorRT 10.14 headers (PyPI kernel-lens) + CUDA 12 runtime headers
#                              and libcudart (PyPI nvidia-cuda-runtime-cu12, nvidia-cuda-nvcc-cu12)
#   cpp/fetch_deps.sh ort trt  both
#
# Idempotent: a stamp file per dependency records what was fetched; a second run does nothing.
# Every download is pinned by version and checked against a sha256 before it is unpacked.
# Needs: bash, npm (ort), a Python with pip (trt; $PYTHON, default python3), tar, sha256sum.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TP="${HMU_THIRD_PARTY:-$HERE/third_party}"
PYTHON="${PYTHON:-python3}"

ORT_NPM_PACKAGE="com.github.asus4.onnxruntime"
ORT_NPM_VERSION="0.4.9"  # ONNX Runtime 1.29.0 library, C API 29 headers
ORT_NPM_SHA256="e59788788818fdde1b2e522e766a21ba0f7d8391de55737abf81e32cc801785d"
TRT_REQUIREMENTS="kernel-lens==2.0.1 --hash=sha256:07cc714e8b5e7f34b672f7c7fad93febe7c747be5837ba276b1527370134ffe0
nvidia-cuda-runtime-cu12==12.9.79 --hash=sha256:25bba2dfb01d48a9b59ca474a1ac43c6ebf7011f1b0b8cc44f54eb6ac48a96c3
nvidia-cuda-nvcc-cu12==12.9.86 --hash=sha256:5d6a0d32fdc7ea39917c20065614ae93add6f577d840233237ff08e9a38f58f0"

log() { echo "fetch_deps: $*" >&2; }
die() { echo "fetch_deps: error: $*" >&2; exit 1; }

fetch_ort() {
  local dest="$TP/onnxruntime" stamp="npm:$ORT_NPM_PACKAGE@$ORT_NPM_VERSION"
  if [[ -f "$dest/.stamp" && "$(cat "$dest/.stamp")" == "$stamp" ]]; then
    log "onnxruntime: up to date ($stamp)"; return
  fi
  [[ "$(uname -m)" == "x86_64" ]] || die "the npm package ships a Linux x86_64 library only; \
on $(uname -m) configure with -DORT_ROOT=<an onnxruntime release folder>"
  command -v npm >/dev/null || die "npm not found (needed to fetch ONNX Runtime)"
  local work; work="$(mktemp -d "$TP/.ort.XXXXXX")"
  trap 'rm -rf "$work"; trap - RETURN' RETURN
  log "onnxruntime: npm pack $ORT_NPM_PACKAGE@$ORT_NPM_VERSION (~150 MB)"
  (cd "$work" && npm pack --silent "$ORT_NPM_PACKAGE@$ORT_NPM_VERSION" >/dev/null) \
    || die "npm pack $ORT_NPM_PACKAGE@$ORT_NPM_VERSION failed"
  local tgz="$work/$ORT_NPM_PACKAGE-$ORT_NPM_VERSION.tgz"
  echo "$ORT_NPM_SHA256  $tgz" | sha256sum -c --quiet - || die "sha256 mismatch for $tgz"
  local headers="package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers"
  # The headers are platform-neutral; the package only keeps them inside its iOS framework.
  tar xzf "$tgz" -C "$work" "$headers" package/Plugins/Linux/x64/libonnxruntime.so \
    package/LICENSE package/ThirdPartyNotices.txt
  mkdir -p "$work/out/include" "$work/out/lib"
  cp "$work/$headers"/*.h "$work/out/include/"
  cp "$work/package/Plugins/Linux/x64/libonnxruntime.so" "$work/out/lib/"
  ln -s libonnxruntime.so "$work/out/lib/libonnxruntime.so.1"  # the library's SONAME
  cp "$work/package/LICENSE" "$work/package/ThirdPartyNotices.txt" "$work/out/"
  echo "$stamp" > "$work/out/.stamp"
  rm -rf "$dest" && mv "$work/out" "$dest"
  log "onnxruntime: ready in $dest"
}

fetch_trt() {
  local dest_trt="$TP/tensorrt" dest_cuda="$TP/cuda"
  local stamp; stamp="pypi:$(echo "$TRT_REQUIREMENTS" | cut -d' ' -f1 | tr '\n' ' ')"
  if [[ -f "$dest_trt/.stamp" && "$(cat "$dest_trt/.stamp")" == "$stamp" && -f "$dest_cuda/.stamp" ]]; then
    log "tensorrt + cuda headers: up to date"; return
  fi
  local py
  for py in "$PYTHON" python3; do  # a venv made without pip falls back to the system's pip
    if "$py" -m pip --version >/dev/null 2>&1; then PYTHON="$py"; break; fi
  done
  "$PYTHON" -m pip --version >/dev/null 2>&1 || die "no Python with pip found (set PYTHON=...)"
  local work; work="$(mktemp -d "$TP/.trt.XXXXXX")"
  trap 'rm -rf "$work"; trap - RETURN' RETURN
  echo "$TRT_REQUIREMENTS" > "$work/requirements.txt"
  log "tensorrt: pip download kernel-lens, nvidia-cuda-runtime-cu12, nvidia-cuda-nvcc-cu12 (~45 MB)"
  "$PYTHON" -m pip download --quiet --no-deps --require-hashes --only-binary=:all: \
    -r "$work/requirements.txt" -d "$work/wheels" || die "pip download failed"
  "$PYTHON" - "$work" <<'PY'
import pathlib, shutil, sys, zipfile
work = pathlib.Path(sys.argv[1])
out_trt, out_cuda = work / "tensorrt" / "include", work / "cuda"
# (wheel prefix inside the archive, destination); later entries overwrite earlier ones.
plan = [("kernel_lens/include/tensorrt/", out_trt), ("nvidia/cuda_nvcc/include/", out_cuda / "include"),
        ("nvidia/cuda_runtime/include/", out_cuda / "include"), ("nvidia/cuda_runtime/lib/", out_cuda / "lib")]
for wheel in sorted((work / "wheels").glob("*.whl")):
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            for prefix, dest in plan:
                if name.startswith(prefix) and not name.endswith("/"):
                    target = dest / name[len(prefix):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(name) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
            if "/licenses/" in name or name.endswith("/LICENSE") or name.endswith("License.txt"):
                dest = (out_trt.parent if "kernel_lens" in name else out_cuda) / "licenses"
                dest.mkdir(parents=True, exist_ok=True)
                (dest / f"{wheel.name.split('-')[0]}-{pathlib.Path(name).name}").write_bytes(zf.read(name))
missing = [p for p in (out_trt / "NvInferRuntime.h", out_cuda / "include" / "cuda_runtime_api.h",
                       out_cuda / "include" / "crt" / "host_defines.h", out_cuda / "lib" / "libcudart.so.12")
           if not p.is_file()]
if missing:
    sys.exit(f"fetch_deps: error: the wheels lack {', '.join(map(str, missing))}")
PY
  echo "$stamp" > "$work/tensorrt/.stamp"
  echo "$stamp" > "$work/cuda/.stamp"
  rm -rf "$dest_trt" "$dest_cuda"
  mv "$work/tensorrt" "$dest_trt" && mv "$work/cuda" "$dest_cuda"
  log "tensorrt: headers in $dest_trt/include, CUDA runtime in $dest_cuda"
}

mkdir -p "$TP"
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(ort)
for t in "${targets[@]}"; do
  case "$t" in
    ort) fetch_ort ;;
    trt) fetch_trt ;;
    *) die "unknown dependency '$t' (expected: ort, trt)" ;;
  esac
done
