#!/usr/bin/env bash
# Set up and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --release --locked --all-targets -- --test-threads=2
# The model again with the fused kernels capped at AVX2 (the default run uses the best level
# the CPU has), so both kernel levels are tested on an AVX-512 machine.
MONE_SIMD=avx2 cargo test --release --locked --lib --test model -- --test-threads=2
