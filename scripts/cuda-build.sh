#!/usr/bin/env bash
# Builds `xpm` with the `cuda` feature on a machine that has no GPU and no CUDA install, for a
# GPU machine that cannot build it itself (no Rust toolchain, no network). Used for the GPU check
# (scripts/cuda-check.sh, docs/training.md "Devices").
#
# - nvcc, the CUDA headers and libcudart come from NVIDIA's PyPI wheels (nvidia-cuda-nvcc,
#   -runtime, -crt, nvvm, -cccl), unpacked into $XPM_CUDA_ROOT (default ~/.cache/xpm-cuda13.0).
# - Candle links the driver, cuBLAS, cuBLASLt, cuRAND and NVRTC dynamically. For linking only, the
#   script writes stub libraries with the real sonames (libcuda.so.1, libcublas.so.13, …) that
#   define the symbols the link asks for; at run time the GPU machine's real libraries are used
#   (LD_LIBRARY_PATH must reach them; scripts/cuda-check.sh does not set it).
# - Kernels are compiled for one compute capability, CUDA_COMPUTE_CAP (default 90: H100/H200).
#
# The binary needs a glibc at least as new as this machine's, and CUDA 13 libraries at run time.
# Usage: scripts/cuda-build.sh [OUT]   (default target/release/xpm-cuda; stripped)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-target/release/xpm-cuda}"
VER="${CUDA_VERSION_PIP:-13.0}"
MAJOR="${VER%%.*}"
ROOT="${XPM_CUDA_ROOT:-$HOME/.cache/xpm-cuda$VER}"
C="$ROOT/nvidia/cu$MAJOR"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

if [ ! -x "$C/bin/nvcc" ]; then
  echo "fetching nvcc $VER and the CUDA headers from PyPI into $ROOT"
  mkdir -p "$ROOT/wheels"
  python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 -d "$ROOT/wheels" \
    "nvidia-cuda-nvcc==$VER.*" "nvidia-cuda-runtime==$VER.*" "nvidia-cuda-crt==$VER.*" \
    "nvidia-nvvm==$VER.*" "nvidia-cuda-cccl==$VER.*"
  for w in "$ROOT"/wheels/*.whl; do unzip -q -o "$w" -d "$ROOT"; done
fi
ln -sf "libcudart.so.$MAJOR" "$C/lib/libcudart.so"
export PATH="$C/bin:$PATH" CUDA_HOME="$C" CUDARC_CUDA_VERSION="${MAJOR}0${VER#*.}0"
STUBS="$C/lib/stubs"
mkdir -p "$STUBS"

# stub NAME SONAME SYMBOLS_FILE: a shared library that defines each symbol as an empty function.
stub() {
  local src="$STUBS/$1.c"
  : >"$src"
  if [ -f "$3" ]; then sed 's/.*/void &(void) {}/' "$3" >>"$src"; fi
  gcc -shared -fPIC -o "$STUBS/lib$1.so" "$src" "-Wl,-soname,$2"
}
stubs() {
  stub cuda libcuda.so.1 "$STUBS/cuda.syms"
  stub cublas "libcublas.so.$MAJOR" "$STUBS/cublas.syms"
  stub cublasLt "libcublasLt.so.$MAJOR" "$STUBS/cublasLt.syms"
  stub curand libcurand.so.10 "$STUBS/curand.syms"
  stub nvrtc "libnvrtc.so.$MAJOR" "$STUBS/nvrtc.syms"
}

build() { cargo build --release --features cuda --bin xpm 2>&1 | tee "$ROOT/build.log"; }
stubs
if ! build; then
  # The link lacks the CUDA libraries' symbols: list every one that Candle's and cudarc's
  # objects refer to, sort them by library into the stubs and link again.
  nm -u --format=just-symbols target/release/deps/lib{cudarc,candle_core,candle_nn,candle_transformers,xpm}-*.rlib 2>/dev/null |
    grep -E '^(cu[A-Z]|cublas|curand|nvrtc)' | sort -u >"$STUBS/all.syms"
  [ -s "$STUBS/all.syms" ] || { echo "build failed (not at the link; see above)" >&2; exit 1; }
  grep '^cublasLt' "$STUBS/all.syms" >"$STUBS/cublasLt.syms" || true
  grep '^cublas' "$STUBS/all.syms" | grep -v '^cublasLt' >"$STUBS/cublas.syms" || true
  grep '^curand' "$STUBS/all.syms" >"$STUBS/curand.syms" || true
  grep '^nvrtc' "$STUBS/all.syms" >"$STUBS/nvrtc.syms" || true
  grep '^cu[A-Z]' "$STUBS/all.syms" >"$STUBS/cuda.syms" || true
  stubs
  build
fi
strip -o "$OUT" target/release/xpm
echo "wrote $OUT ($(du -h "$OUT" | cut -f1)); built for compute capability $CUDA_COMPUTE_CAP, CUDA $VER"
