#!/bin/bash
# Build mone with CUDA (candle's `cuda` feature) on a machine with no GPU and no system CUDA:
# the CUDA 13.0 toolkit comes from PyPI wheels in .cuda/ (ignored by git), libcuda.so (which
# only the NVIDIA driver ships) is replaced at link time by a stub, and the binary finds the
# real driver where it runs. Idempotent: a second run only rebuilds what changed.
#
#   scripts/build_cuda.sh          full binary (GStreamer pipeline + CUDA): target/cuda/release/mone
#   scripts/build_cuda.sh model    model-only binary (no GStreamer; for a GPU machine without it)
#   scripts/build_cuda.sh tests    the GPU test binary (tests/cuda_kernels.rs, model-only build):
#                                  target/cudamodel/release/cuda_kernels
#
# Run the binary on a machine with the NVIDIA driver (>= 580, CUDA 13.0) and the CUDA 13 runtime
# libraries (libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libcurand.so.10,
# libnvrtc.so.13), e.g. from PyTorch's cu130 wheels or from .cuda/ here:
#   LD_LIBRARY_PATH=/path/to/nvidia/cu13/lib ./mone bench model --preset vivit-fe-b16 --device cuda
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-full}
ROOT=$PWD/.cuda
VENV=$ROOT/venv
WHEELS=(
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88 nvidia-cublas==13.0.2.14
  nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35
)
mkdir -p "$ROOT"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
STAMP="$ROOT/wheels-$(echo "${WHEELS[*]}" | md5sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  echo "build_cuda: installing the CUDA 13.0 toolkit wheels (about 1.2 GB) into $VENV ..." >&2
  "$VENV/bin/pip" install --quiet "${WHEELS[@]}"
  touch "$STAMP"
fi
CUDA_HOME=$(ls -d "$VENV"/lib/python3*/site-packages/nvidia/cu13 | head -1)
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "build_cuda: no nvcc in $CUDA_HOME/bin" >&2; exit 1; }
# The wheels ship versioned sonames only; the linker wants the plain names.
for l in cudart nvrtc cublas cublasLt curand; do
  if [ ! -e "$CUDA_HOME/lib/lib$l.so" ]; then
    f=$(ls "$CUDA_HOME"/lib/lib$l.so.* | sort | head -1)
    ln -sf "$(basename "$f")" "$CUDA_HOME/lib/lib$l.so"
  fi
done
# A libcuda.so.1 stub defining every driver function cudarc declares: enough to link; the real
# driver library is loaded at run time.
STUB="$CUDA_HOME/lib/stubs/libcuda.so"
if [ ! -f "$STUB" ]; then
  cargo fetch --locked >/dev/null
  VER=$(grep -A1 '^name = "cudarc"' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')
  CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$VER" | head -1)
  mkdir -p "$(dirname "$STUB")"
  grep -o 'pub unsafe fn cu[A-Za-z0-9_]*(' "$CUDARC/src/driver/sys/mod.rs" | sed 's/pub unsafe fn //; s/($//' | sort -u \
    | awk '{ print "int " $1 "(void) { return 999; }" }' > "$ROOT/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB" "$ROOT/libcuda_stub.c"
  echo "build_cuda: libcuda stub with $(wc -l < "$ROOT/libcuda_stub.c") symbols" >&2
fi
case "$MODE" in
  full) FEATURES=(--features cuda); TARGET_DIR=target/cuda ;;
  model|tests) FEATURES=(--no-default-features --features cuda); TARGET_DIR=target/cudamodel ;;
  *) echo "usage: scripts/build_cuda.sh [full|model|tests]" >&2; exit 2 ;;
esac
export PATH="$CUDA_HOME/bin:$PATH" CUDA_HOME="$CUDA_HOME" CUDA_PATH="$CUDA_HOME" \
  CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2}
if [ "$MODE" = tests ]; then
  # The same release profile as the model-only binary, so only mone itself recompiles.
  BIN=$(cargo test --release --locked "${FEATURES[@]}" --target-dir "$TARGET_DIR" \
    --test cuda_kernels --no-run --message-format=json \
    | python3 -c 'import json, sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda_kernels":
        print(m["executable"])')
  cp "$BIN" "$TARGET_DIR/release/cuda_kernels"
  echo "$PWD/$TARGET_DIR/release/cuda_kernels"
  exit 0
fi
cargo build --release --locked "${FEATURES[@]}" --target-dir "$TARGET_DIR" --bin mone
echo "$PWD/$TARGET_DIR/release/mone"
