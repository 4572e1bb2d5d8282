#!/usr/bin/env bash
# Run every tether bench with sane measurement times and print the tables of
# BENCHMARKS.md (also written to target/tether-bench/summary.md).
#
#   benches/run.sh                       # warm-up 1 s, measurement 4 s per criterion bench
#   WARM=1 MEAS=3 benches/run.sh         # the shorter run (about 7 minutes)
#   benches/run.sh per_chunk             # extra arguments go to criterion (here: a filter)
#
# About 8 minutes on a 2-core machine at the defaults (51 criterion benches, whose
# untimed set-up roughly doubles their wall time; 60 000 cancel samples; up to
# 1 000 000 in-flight requests per memory case, peak RSS about 3 GiB). Run it on an
# otherwise idle machine: the figures are wall-clock times. `benches/profile.sh` gives
# the load-independent instruction counts.
set -euo pipefail
cd "$(dirname "$0")/.."

WARM="${WARM:-1}"
MEAS="${MEAS:-4}"
TARGET="${CARGO_TARGET_DIR:-target}"

cargo bench -p tether-benches --no-run
for bench in per_chunk per_request span_cost; do
    cargo bench -p tether-benches --bench "$bench" -- \
        --warm-up-time "$WARM" --measurement-time "$MEAS" "$@"
done
cargo bench -p tether-benches --bench cancel_latency
cargo bench -p tether-benches --bench in_flight_memory

mkdir -p "$TARGET/tether-bench"
{
    echo "<!-- $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(lscpu | sed -n 's/^Model name:[[:space:]]*//p'), WARM=$WARM MEAS=$MEAS -->"
    python3 benches/summarize.py --target "$TARGET"
} | tee "$TARGET/tether-bench/summary.md"
