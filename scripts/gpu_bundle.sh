#!/bin/bash
# Pack what a GPU machine without cargo, GStreamer or network needs to run mone: the CUDA
# binaries (from scripts/build_cuda.sh) and GStreamer's runtime libraries and the few plugins
# mone uses, taken from this machine's Debian packages (apt-get download + dpkg -x), into
# .gpu/ (ignored by git). On the GPU machine, from the repository root:
#
#   source scripts/gpu_env.sh        # unpacks .gpu/, sets LD_LIBRARY_PATH and GStreamer's paths
#   $MONE bench model --preset vivit-fe-b16 --device cuda --dtype bf16
#
#   scripts/gpu_bundle.sh            # needs target/cuda/release/mone (scripts/build_cuda.sh);
#                                    # packs the GPU tests too where scripts/build_cuda.sh tests ran
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.gpu
WORK=target/gpu-bundle
rm -rf "$WORK" && mkdir -p "$WORK/debs" "$WORK/root" "$WORK/lib/gstreamer-1.0" "$OUT"
PKGS=(libgstreamer1.0-0 libgstreamer-plugins-base1.0-0 gstreamer1.0-plugins-base
      gstreamer1.0-plugins-good liborc-0.4-0 libunwind8 libdw1 libelf1 libglib2.0-0
      libffi8 libpcre2-8-0 libmount1 libselinux1 libblkid1 zlib1g liblzma5 libbz2-1.0)
(cd "$WORK/debs" && apt-get download "${PKGS[@]}" >/dev/null 2>&1)
for f in "$WORK"/debs/*.deb; do dpkg -x "$f" "$WORK/root"; done
L=$WORK/root/usr/lib/x86_64-linux-gnu
# Some packages still install under /lib.
if [ -d "$WORK/root/lib/x86_64-linux-gnu" ]; then cp -a "$WORK/root/lib/x86_64-linux-gnu/." "$L/"; fi
# GLib's and libdw's own dependencies too: a minimal image may lack some of them.
cp -a "$L"/lib{gstreamer-1.0,gstbase-1.0,gstvideo-1.0,gstapp-1.0,gstpbutils-1.0,gstaudio-1.0,gsttag-1.0,orc-0.4,unwind,dw,elf,glib-2.0,gobject-2.0,gio-2.0,gmodule-2.0,ffi,pcre2-8,mount,selinux,blkid,z,lzma,bz2}.so* "$WORK/lib/" 2>/dev/null || true
cp -a "$L"/lib{dw,elf}-*.so "$WORK/lib/"
if [ -n "$(find -L "$WORK/lib" -maxdepth 1 -type l)" ]; then
  echo "gpu_bundle: dangling links: $(find -L "$WORK/lib" -maxdepth 1 -type l)" >&2; exit 1
fi
for l in libgstreamer-1.0.so.0 libglib-2.0.so.0 libffi.so.8 libpcre2-8.so.0 libmount.so.1 libz.so.1 libbz2.so.1.0 liblzma.so.5; do
  [ -e "$WORK/lib/$l" ] || { echo "gpu_bundle: $l missing from the packages" >&2; exit 1; }
done
# Only the plugins mone's pipelines use: a registry scan of every plugin would pull in the
# libraries of all of them.
for p in coreelements videotestsrc videoconvertscale videorate app videocrop playback typefindfunctions; do
  cp "$L/gstreamer-1.0/libgst$p.so" "$WORK/lib/gstreamer-1.0/"
done
cp "$L/gstreamer1.0/gstreamer-1.0/gst-plugin-scanner" "$WORK/lib/"
for b in cuda cudamodel; do
  if [ -x "target/$b/release/mone" ]; then
    objcopy --strip-debug "target/$b/release/mone" "$WORK/mone-$b"
  fi
done
if [ -x target/cudamodel/release/cuda_kernels ]; then
  objcopy --strip-debug target/cudamodel/release/cuda_kernels "$WORK/mone-cudatests"
fi
ls "$WORK"/mone-* >/dev/null 2>&1 || { echo "gpu_bundle: no CUDA binary; run scripts/build_cuda.sh first" >&2; exit 1; }
tar -C "$WORK" -cf - lib $(cd "$WORK" && ls mone-*) | xz -T2 -6 > "$OUT/bundle.tar.xz"
du -h "$OUT/bundle.tar.xz"
