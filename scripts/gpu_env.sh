# Source on the GPU machine, from the repository root, after scripts/gpu_bundle.sh packed .gpu/:
# unpacks the bundle into $MONE_GPU_DIR (default /tmp/mone-gpu) and sets MONE (the full
# binary), MONE_MODEL (the model-only one) and MONE_TESTS (the GPU tests, where bundled):
# wrappers that put the bundled GLib and GStreamer and the CUDA 13 runtime (from wherever
# PyTorch's cu13 wheels put it) on their library path, so that nothing else (PyTorch) sees them.
MONE_GPU_DIR=${MONE_GPU_DIR:-/tmp/mone-gpu}
mkdir -p "$MONE_GPU_DIR"
xz -dc .gpu/bundle.tar.xz | tar -C "$MONE_GPU_DIR" -xf -
# Each CUDA runtime library where it is found first (wheels may spread them over folders).
CU13=
for l in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10; do
  d=$(dirname "$(find / -name "$l" -not -path '/proc/*' 2>/dev/null | head -1)")
  case ":$CU13:" in *":$d:"*) ;; *) CU13=${CU13:+$CU13:}$d ;; esac
done
MONE_LIBS="$MONE_GPU_DIR/lib:$CU13"
for b in cuda cudamodel cudatests; do
  printf '#!/bin/sh\nexport LD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"\nexport GST_PLUGIN_SYSTEM_PATH_1_0="%s" GST_PLUGIN_PATH_1_0= GST_PLUGIN_SCANNER_1_0="%s" GST_REGISTRY_1_0="%s"\nexec "%s" "$@"\n' \
    "$MONE_LIBS" "$MONE_GPU_DIR/lib/gstreamer-1.0" "$MONE_GPU_DIR/lib/gst-plugin-scanner" \
    "$MONE_GPU_DIR/registry.bin" "$MONE_GPU_DIR/mone-$b" > "$MONE_GPU_DIR/$b"
  chmod +x "$MONE_GPU_DIR/$b"
done
export MONE="$MONE_GPU_DIR/cuda" MONE_MODEL="$MONE_GPU_DIR/cudamodel" MONE_TESTS="$MONE_GPU_DIR/cudatests" MONE_LIBS
echo "gpu_env: CUDA libraries from $CU13; mone at $MONE" >&2
