#!/bin/bash
# The GPU benchmarks of docs/benchmarks.md in one go, on a machine with an NVIDIA GPU, the
# driver, PyTorch (for the reference) and the bundle from scripts/gpu_bundle.sh in .gpu/.
# Writes logs and JSON to ${OUT:-target/gpu-bench}. TORCH_DTYPES (default "bfloat16 float32")
# and TORCH_COMPILE=0|1 choose the PyTorch references; PHASE_S and STREAMS tune the adaptive run.
#
# The GPU tests run first (tests/cuda_kernels.rs, where bundled); the model benchmarks then run
# on candle's generic ops and on mone's fused kernels (MONE_CUDA_KERNELS=fused), and the
# adaptive run uses the fused kernels only if their tests passed.
#
#   scripts/gpu_bench.sh [tests|model|adaptive|all]
set -uo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-all}
OUT=${OUT:-target/gpu-bench}
mkdir -p "$OUT"
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
date -u +%FT%TZ >> "$OUT/gpu.txt"
BIN=$MONE
if ! "$BIN" --version >/dev/null 2>"$OUT/start.err"; then
  echo "full binary does not start; using the model-only one:" >&2
  head -3 "$OUT/start.err" >&2
  LD_LIBRARY_PATH=$MONE_LIBS ldd "$MONE_GPU_DIR/mone-cuda" | grep "not found" >&2
  BIN=$MONE_MODEL
fi

KERNELS=generic
if [ -x "$MONE_GPU_DIR/mone-cudatests" ] && { [ "$WHAT" = tests ] || [ "$WHAT" = all ]; }; then
  echo "== GPU tests (tests/cuda_kernels.rs)"
  # A test with no CUDA device passes as skipped; only tests that ran count.
  if timeout 120 "$MONE_TESTS" --test-threads 1 --nocapture > "$OUT/tests.log" 2>&1 \
    && ! grep -q SKIPPED "$OUT/tests.log"; then
    KERNELS=fused
  fi
  echo "kernels for the adaptive run: $KERNELS"
  grep -E "^test |SKIPPED|panicked|test result" "$OUT/tests.log"
fi
[ "$WHAT" = tests ] && exit 0

if [ "$WHAT" != adaptive ]; then
  for b in 1 32; do
    it=$([ $b = 1 ] && echo 30 || echo 10)
    for run in generic-bf16 fused-bf16 fused-f32; do
      k=${run%-*} dt=${run#*-}
      echo "== MONE_CUDA_KERNELS=$k mone bench model --preset vivit-fe-b16 --device cuda --dtype $dt --batch $b --iters $it"
      MONE_CUDA_KERNELS=$k "$BIN" bench model --preset vivit-fe-b16 --device cuda --dtype $dt --batch $b --iters $it --json --gpu-profile \
        > "$OUT/model-$k-$dt-b$b.json" 2> "$OUT/model-$k-$dt-b$b.err" || tail -5 "$OUT/model-$k-$dt-b$b.err"
      python3 - "$OUT/model-$k-$dt-b$b.json" <<'EOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print("no result:", e); sys.exit()
print(f"{r['device']} {r['dtype']} batch {r['batch']} kernels {r['simd']}")
for row in [r["dense"]] + r["rows"]:
    name = "dense" if row["capacity"] is None else f"mone e_c {row['capacity']:.2f}"
    d = row.get("logit_rel_diff")
    print(f"  {name:<14} {row['latency_ms']:8.2f} ms {row['clips_per_s']:9.1f} clips/s  x{row['speedup']:.2f}"
          + (f"  diff {d:.2e} top1 {row['top1_agreement_f32']:.0f}%" if d is not None else ""))
    print("    " + " ".join(f"{k} {v:.1f}" for k, v in row["profile_ms"]))
EOF
    done
    for dt in ${TORCH_DTYPES-bfloat16 float32}; do
      echo "== torch vivit-fe-b16 cuda $dt batch $b"
      timeout 240 python3 scripts/torch_vivit.py --preset vivit-fe-b16 --device cuda --dtype $dt \
        --batch $b --iters $it $([ $dt = bfloat16 ] && [ "${TORCH_COMPILE:-1}" = 1 ] && echo --compile) --json > "$OUT/torch-$dt-b$b.json" 2> "$OUT/torch-$dt-b$b.err" \
        && cat "$OUT/torch-$dt-b$b.json" || tail -5 "$OUT/torch-$dt-b$b.err"
    done
  done
fi

if [ "$WHAT" != model ]; then
  # Live streams per GPU: test streams at 8 fps, a 32-frame clip every 8 frames (one clip per
  # second per stream), 1 s target.
  "$BIN" model init --preset vivit-fe-b16 --out /tmp/b16 > /dev/null
  # Before the step, 70% of what the model alone sustains at e_c 1.0 (batch 32, bf16);
  # twice that after it: more than full capacity can serve.
  STREAMS=${STREAMS:-$(python3 -c "import json; r=json.load(open('$OUT/model-$KERNELS-bf16-b32.json')); print(max(2, int(0.7*r['dense']['clips_per_s'])))" 2>/dev/null || echo 0)}
  echo "== MONE_CUDA_KERNELS=$KERNELS mone bench adaptive --device cuda --dtype bf16 --streams $STREAMS"
  MONE_CUDA_KERNELS=$KERNELS "$BIN" bench adaptive --model /tmp/b16 --device cuda --dtype bf16 --fps 8 --stride 8 \
    --target-ms 1000 --batch 32 --streams "$STREAMS" --phase-s ${PHASE_S:-15} --fixed 1.0,0.5,0.3,0.125 \
    --plot "$OUT/adaptive.png" --json > "$OUT/adaptive.json" 2> "$OUT/adaptive.err"
  echo "rc $?"; tail -25 "$OUT/adaptive.err"
fi
