#!/bin/bash
# Soak: add and remove live test streams through the HTTP API many times and print the
# process's resident memory and thread count along the way (they should level off).
# Usage: scripts/soak_add_remove.sh [CYCLES] [STREAMS_PER_CYCLE]   (needs a release build)
set -euo pipefail
cd "$(dirname "$0")/.."
CYCLES=${1:-60}
N=${2:-4}
PORT=9470
DIR=$(mktemp -d)
cat > "$DIR/soak.toml" <<TOML
[model]
dir = "models/mone-vivit-tiny-motion"
[batch]
size = 8
max_wait_ms = 50
[output]
path = "$DIR/events.jsonl"
stats_interval_s = 0
[http]
listen = "127.0.0.1:$PORT"
TOML
./target/release/mone run "$DIR/soak.toml" 2>"$DIR/stderr" &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
sleep 2
sample() { echo "$1: rss_kib=$(awk '/VmRSS/{print $2}' /proc/$PID/status) threads=$(ls /proc/$PID/task | wc -l)"; }
sample "start"
for cycle in $(seq 1 "$CYCLES"); do
  for i in $(seq 1 "$N"); do
    curl -sf -o /dev/null -XPOST "localhost:$PORT/streams" -H 'content-type: application/json' \
      -d "{\"uri\": \"test:pattern=ball,fps=25,live=true\", \"id\": \"s$i\"}"
  done
  sleep 1
  for i in $(seq 1 "$N"); do curl -sf -o /dev/null -XDELETE "localhost:$PORT/streams/s$i"; done
  # DELETE answers 202 (stopping): the ids are free once the streams are gone.
  for _ in $(seq 1 100); do [[ "$(curl -s "localhost:$PORT/streams")" == "[]" ]] && break; sleep 0.1; done
  if (( cycle == 1 || cycle % 10 == 0 )); then sample "cycle $cycle"; fi
done
echo "streams left: $(curl -s localhost:$PORT/streams)"
kill -INT $PID; wait $PID || true
trap - EXIT
echo "stream_started: $(grep -c '"stream_started"' "$DIR/events.jsonl"), stream_ended: $(grep -c '"stream_ended"' "$DIR/events.jsonl")"
rm -rf "$DIR"
