#!/usr/bin/env bash
# mone against PyTorch eager on the same architecture and the same work, alternated in one run:
# each round runs `mone bench model --json` and then scripts/torch_vivit.py (dense, and MoNE as a
# plain nested implementation with mone's own integer token counts), and the table gives the
# median of the per-round ratios. Installs torch from PyPI into target/torch-venv when python3
# has none. Not part of the tests or CI.
#
#   scripts/compare_torch.sh [--preset vivit-fe-b16] [--batch 1] [--rounds 3] [--iters 3]
#                            [--capacities 0.5,0.3] [--threads 2]
#
# MONE=path/to/mone picks another binary (an AVX2-only build, say); MONE_SIMD caps mone's own
# kernels (scalar, avx2, avx512).
set -euo pipefail
cd "$(dirname "$0")/.."

preset=vivit-fe-b16 batch=1 rounds=3 iters=3 caps=0.5,0.3 threads=2
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) preset=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --iters) iters=$2; shift 2 ;;
    --capacities) caps=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    *) echo "compare_torch.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

py=python3
if ! python3 -c 'import torch, numpy' 2>/dev/null; then
  venv=target/torch-venv
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  if ! "$venv/bin/python" -c 'import torch, numpy' 2>/dev/null; then
    echo "compare_torch.sh: installing torch from PyPI into $venv" >&2
    "$venv/bin/pip" install -q torch numpy
  fi
  py=$venv/bin/python
fi
mone=${MONE:-target/release/mone}
if [ -z "${MONE:-}" ]; then
  cargo build --release --locked --bin mone >&2
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
grep -o 'avx512[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ' >"$out/flags" || true
for r in $(seq 1 "$rounds"); do
  echo "round $r/$rounds: mone" >&2
  RAYON_NUM_THREADS=$threads "$mone" bench model --preset "$preset" --batch "$batch" \
    --iters "$iters" --capacities "1.0,$caps" --json >"$out/mone-$r.json"
  counts=$("$py" -c 'import json,sys
r = json.load(open(sys.argv[1]))
print(" ".join("--counts " + ",".join(map(str, x["token_counts"])) for x in r["rows"] if x["capacity"] < 1))' "$out/mone-$r.json")
  gemm=""
  [ "$r" = 1 ] && gemm=--gemm
  echo "round $r/$rounds: torch" >&2
  # shellcheck disable=SC2086
  "$py" scripts/torch_vivit.py --preset "$preset" --batch "$batch" --iters "$iters" \
    --threads "$threads" $counts $gemm --json 2>/dev/null >"$out/torch-$r.json"
done

"$py" - "$out" "$rounds" <<'EOF'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
m = [json.load(open(f"{out}/mone-{r}.json")) for r in range(1, rounds + 1)]
t = [json.load(open(f"{out}/torch-{r}.json")) for r in range(1, rounds + 1)]
flags = open(f"{out}/flags").read().strip() or "none"
print(f"mone vs PyTorch {t[0]['torch']} eager: {m[0]['model']}, batch {m[0]['batch']}, "
      f"{m[0]['threads']} threads (torch {t[0]['threads']}), mone kernels {m[0].get('simd', '?')}, "
      f"median of {m[0]['iters']} per round, {rounds} rounds alternated")
print(f"CPU avx512 flags: {flags}")
print(f"{'config':<14} {'mone ms':>9} {'torch ms':>9} {'mone speed / torch':>19}  per round")
def row(name, mone_ms, torch_ms):
    ratios = [b / a for a, b in zip(mone_ms, torch_ms)]
    print(f"{name:<14} {statistics.median(mone_ms):>9.1f} {statistics.median(torch_ms):>9.1f} "
          f"{statistics.median(ratios):>18.2f}x  " + " ".join(f"{x:.2f}" for x in ratios))
row("dense", [r["dense"]["latency_ms"] for r in m], [r["results"]["eager"]["latency_ms"] for r in t])
for i, x in enumerate(m[0]["rows"]):
    if x["capacity"] >= 1:
        continue
    key = "nested " + ",".join(map(str, x["token_counts"]))
    row(f"e_c {x['capacity']:.2f}", [r["rows"][i]["latency_ms"] for r in m],
        [r["results"][key]["latency_ms"] for r in t])
print("\nspeed-up over the same library's dense forward (median of rounds):")
for i, x in enumerate(m[0]["rows"]):
    if x["capacity"] >= 1:
        continue
    key = "nested " + ",".join(map(str, x["token_counts"]))
    ms = statistics.median(r["dense"]["latency_ms"] / r["rows"][i]["latency_ms"] for r in m)
    ts = statistics.median(r["results"]["eager"]["latency_ms"] / r["results"][key]["latency_ms"] for r in t)
    print(f"  e_c {x['capacity']:.2f}: mone {ms:.2f}x, torch {ts:.2f}x (FLOP ratio {x['flop_ratio']:.2f})")
g = t[0].get("gemm_gflops") or {}
if g:
    best = max(g.values())
    print("\nlinear layers: mone inside the dense forward vs torch F.linear alone on the same shapes")
    for k, v in g.items():
        print(f"  torch {k}: {v:.1f} GFLOP/s")
    rates = [r["dense"].get("linear_gflops") for r in m if r["dense"].get("linear_gflops")]
    if rates:
        mr = statistics.median(rates)
        print(f"  mone dense forward, linear layers: {mr:.1f} GFLOP/s = {100 * mr / best:.0f}% of torch's best shape")
EOF
