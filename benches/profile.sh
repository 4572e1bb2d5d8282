#!/usr/bin/env bash
# Instruction counts (valgrind callgrind), which unlike wall-clock times do not move
# with the load on the machine: the noise-free side of BENCHMARKS.md.
#
#   benches/profile.sh            # prints a markdown table; needs valgrind
#
# per_chunk: instructions inside the drain of one 1 000-chunk stream (callgrind
# --toggle-collect on the bench's `Drain::poll`), divided by 1 000.
# per_request: whole-run instructions of one `--test` iteration (4 096 requests) minus
# the same for `raw`, divided by 4 096: what each layer adds per request. The
# baseline's monitor tasks run outside any one future, hence the difference method.
# Raw callgrind files are left in target/tether-bench/callgrind/ for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind not found" >&2; exit 1; }

TARGET="${CARGO_TARGET_DIR:-target}"
OUT="$TARGET/tether-bench/callgrind"
mkdir -p "$OUT"
bin() {
    cargo bench -p tether-benches --bench "$1" --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$1"
}
total() { callgrind_annotate "$1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'; }
run() { # name binary filter [extra valgrind args...]
    local name=$1 exe=$2 filter=$3; shift 3
    valgrind --tool=callgrind "$@" --callgrind-out-file="$OUT/$name.out" "$exe" --bench --test "$filter" >/dev/null 2>&1
    total "$OUT/$name.out"
}

PC=$(bin per_chunk)
PR=$(bin per_request)
RT="${RUNTIME:-tokio_ct}"

echo "### Instructions (callgrind, $RT)"
echo
echo "| per_chunk | instructions per chunk |"
echo "|---|---:|"
declare -A chunk
for v in raw minimal tether; do
    chunk[$v]=$(run "per_chunk_${v}_$RT" "$PC" "per_chunk/$v/$RT\$" --toggle-collect='*Drain*poll*')
    echo "| $v | $((chunk[$v] / 1000)) |"
done
python3 -c "import sys; t, m = map(int, sys.argv[1:]); print(f'| tether / minimal | {t / m:.2f}× |')" "${chunk[tether]}" "${chunk[minimal]}"
echo
echo "| per_request | in flight | instructions added over raw, per request |"
echo "|---|---:|---:|"
for n in 1 4096; do
    raw=$(run "per_request_raw_${RT}_$n" "$PR" "per_request/raw/$RT/$n\$")
    for v in minimal tether baseline; do
        t=$(run "per_request_${v}_${RT}_$n" "$PR" "per_request/$v/$RT/$n\$")
        echo "| $v | $n | $(((t - raw) / 4096)) |"
    done
done
