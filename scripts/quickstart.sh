#!/usr/bin/env bash
# Set up what is missing, build, and run the main job on a bundled default: classify a
# generated sample video and print its events (JSON Lines) on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked
MONE=./target/release/mone
MODEL="${MONE_MODEL:-models/default}"
if [ ! -d "$MODEL" ]; then
  # No trained model is shipped yet: use a random-weight one. It exercises the whole pipeline
  # and its speed, and its labels mean nothing.
  MODEL=target/demo/model
  [ -d "$MODEL" ] || "$MONE" model init --preset vivit-fe-s16 --out "$MODEL"
fi
[ -f target/demo/sample.mp4 ] || "$MONE" sample-video --out target/demo/sample.mp4 --frames 150
exec "$MONE" classify target/demo/sample.mp4 --model "$MODEL" --topk 3 "$@"
