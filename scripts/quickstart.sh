#!/usr/bin/env bash
# Set up, build and run mone's main job on the bundled default.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked
# Until the streaming pipeline lands, the main job is the model benchmark: MoNE at every
# capacity against the dense ViViT on this machine (random weights; it classifies nothing).
./target/release/mone bench model --preset vivit-fe-s16 --batch 4 "$@"
