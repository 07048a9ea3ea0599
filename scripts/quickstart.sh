#!/usr/bin/env bash
# Set up what is missing, build, and run the main job on the bundled default: render a few
# labelled motion clips (H.264 MP4), classify them with the shipped model and print the events
# (JSON Lines) on stdout, then compare the predictions with the true labels.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked
MONE=./target/release/mone
MODEL="${MONE_MODEL:-models/mone-vivit-tiny-motion}"
CLIPS=target/demo/clips
# Seed 1 is held out: the model was trained on seed 0.
[ -f "$CLIPS/labels.csv" ] || "$MONE" dataset render --out "$CLIPS" --count 12 --seed 1 --size 32 --frames 16
rm -f target/demo/events.jsonl
"$MONE" classify "$CLIPS"/clip_*.mp4 --model "$MODEL" --topk 3 --out target/demo/events.jsonl "$@"
cat target/demo/events.jsonl
echo "--- true label vs. top-1 (the video events above) ---" >&2
python3 - "$CLIPS/labels.csv" target/demo/events.jsonl >&2 <<'PY' || true
import csv, json, os, sys
truth = {r["path"]: r["label"] for r in csv.DictReader(open(sys.argv[1]))}
hits = n = 0
for line in open(sys.argv[2]):
    e = json.loads(line)
    if e.get("type") != "video":
        continue
    name = os.path.basename(e["stream"])
    top = e["labels"][0]["label"] if e.get("labels") else "?"
    ok = truth.get(name) == top
    hits, n = hits + ok, n + 1
    print(f"{name}: {truth.get(name)} -> {top} {'ok' if ok else 'MISS'}")
print(f"{hits}/{n} correct")
PY
# The same weights at half the compute: one held-out clip at e_c 1.0 and 0.5.
echo "--- clip_000004.mp4 (approaching) at full capacity and at half ---" >&2
for C in 1.0 0.5; do
  rm -f "target/demo/capacity_$C.jsonl"   # classify appends
  "$MONE" classify "$CLIPS/clip_000004.mp4" --model "$MODEL" --capacity "$C" --topk 1 \
    --out "target/demo/capacity_$C.jsonl" 2>/dev/null
  python3 - "$C" "target/demo/capacity_$C.jsonl" >&2 <<'PY' || true
import json, sys
for line in open(sys.argv[2]):
    e = json.loads(line)
    if e.get("type") == "video" and e.get("labels"):
        top = e["labels"][0]
        print(f"e_c {sys.argv[1]}: {top['label']} ({top['score']:.2f})")
PY
done
