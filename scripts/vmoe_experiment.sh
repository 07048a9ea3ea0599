#!/usr/bin/env bash
# The Mobile V-MoE comparison in docs/vmoe.md: a dense baseline; super-classes clustered from
# its confusion matrix on held-out clips (dataset seed 2); V-MoEs with super-class routing, end
# to end, and end to end with a load-balancing loss, with experts in both temporal layers
# (L = 2) and in the last one (L = 1); then one evaluation of all of them on the same held-out
# clips (seed 1) in one process. Same preset, schedule and seed as the dense run. About 1.5-2
# hours on 2 CPU cores; the runs resume if stopped (run the script again).
set -euo pipefail
cd "$(dirname "$0")/.."
MONE=$(realpath "${MONE:-target/release/mone}")
OUT=${1:-runs}
[ -x "$MONE" ] || cargo build --release --locked
"$MONE" train --dense --out "$OUT/dense"
"$MONE" train --kind vmoe --superclasses auto --baseline "$OUT/dense" --out "$OUT/sc"
"$MONE" train --kind vmoe --out "$OUT/e2e"
"$MONE" train --kind vmoe --balance-weight 0.05 --out "$OUT/e2eb"
"$MONE" train --kind vmoe --moe-layers 1 --superclasses auto --baseline "$OUT/dense" --out "$OUT/sc1"
"$MONE" train --kind vmoe --moe-layers 1 --out "$OUT/e2e1"
cd "$OUT"
"$MONE" eval --model sc1 --synthetic --seed 1 --count 2004 --compare dense --compare e2e1 \
  --compare sc --compare e2e --compare e2eb --superclasses sc/superclasses.json | tee eval.md
