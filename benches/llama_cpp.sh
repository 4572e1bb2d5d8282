#!/usr/bin/env bash
# The llama.cpp engine through tether against a plain llama-cpp-2 loop (no tether):
# tokens/s at batch 1 and 8, and abort -> cells freed latency (benches/benches/llama_cpp.rs).
#
#   benches/llama_cpp.sh            # the full run: a ~450 MB model written to a temp dir
#                                   # (deleted at the end), about 4-5 minutes on 2 cores
#   benches/llama_cpp.sh --test     # the smoke run: the tiny model, a handful of tokens
#
# Needs cmake and libclang (the `llama-cpp` feature builds llama.cpp). Run it on an
# otherwise idle machine: llama.cpp's threads spin on each other, and the figures are
# wall-clock times. The table is also written to target/tether-bench/llama_cpp.txt
# (the figures to target/tether-bench/llama_cpp.json, full run only).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET="${CARGO_TARGET_DIR:-target}"
mkdir -p "$TARGET/tether-bench"
cargo bench -p tether-benches --features llama-cpp --bench llama_cpp --no-run
{
    echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(lscpu | sed -n 's/^Model name:[[:space:]]*//p')"
    echo "# load average before: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
    cargo bench -p tether-benches --features llama-cpp --bench llama_cpp -- "$@"
    echo "# load average after: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
} 2>&1 | tee "$TARGET/tether-bench/llama_cpp.txt"
