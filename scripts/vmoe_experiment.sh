#!/usr/bin/env bash
# The Mobile V-MoE comparison in docs/vmoe.md: a dense baseline, super-classes clustered from
# its confusion matrix on held-out clips (dataset seed 2), a V-MoE trained with super-class
# routing, one end to end and one end to end with a load-balancing loss (same preset, schedule
# and seed as the dense run), then one evaluation of all of them on the same held-out clips
# (seed 1) in one process. About 1.5 hours on 2 CPU cores; the runs resume if stopped (run the
# script again).
set -euo pipefail
cd "$(dirname "$0")/.."
MONE=${MONE:-target/release/mone}
OUT=${1:-runs/vmoe}
EXPERTS=${EXPERTS:-10}
[ -x "$MONE" ] || cargo build --release --locked
"$MONE" train --dense --out "$OUT/dense"
"$MONE" train --kind vmoe --experts "$EXPERTS" --superclasses auto --baseline "$OUT/dense" --out "$OUT/vmoe-sc"
"$MONE" train --kind vmoe --experts "$EXPERTS" --out "$OUT/vmoe-e2e"
"$MONE" train --kind vmoe --experts "$EXPERTS" --balance-weight 0.05 --out "$OUT/vmoe-e2e-balanced"
"$MONE" eval --model "$OUT/vmoe-sc" --synthetic --seed 1 --count 2004 \
  --compare "$OUT/dense" --compare "$OUT/vmoe-e2e" --compare "$OUT/vmoe-e2e-balanced" \
  --superclasses "$OUT/vmoe-sc/superclasses.json" | tee "$OUT/eval.md"
