#!/usr/bin/env bash
# tether serve's CPU per request, against a bare hyper server that writes the same SSE
# events with no engine and no tether (benches/src/bin/bare_sse.rs), under the same
# streaming keep-alive load (`tether load --url`: completions, streamed, no chaos): the
# `serve` table of BENCHMARKS.md.
#
#   benches/serve.sh                        # 3 rounds of 20 000 requests after 2 000 of warm-up, concurrency 64
#   REQUESTS=5000 WARMUP=500 benches/serve.sh
#   PERF=1 benches/serve.sh                 # also `perf record` (dwarf call graphs) tether serve's first round
#   TETHER=path/to/tether benches/serve.sh  # measure another build (an older commit's)
#   INSTR=1 benches/serve.sh                # also each server's user-space instructions
#                                           # per request (callgrind; needs valgrind)
#
# Server CPU is utime+stime from /proc/PID/stat before and after each measured round
# (the warm-up excluded), in clock ticks (`getconf CLK_TCK`), divided by the requests;
# each figure is the median of the rounds. The client's own CPU per request is shown
# too (it shares the machine). Rows:
# - bare: bare_sse, one write per event;
# - tether serve: `--engine sim --step-us $STEP_US`, the default log filter (the access
#   log, one line per request, on stderr, here to a file);
# - tether serve, log off: the same with RUST_LOG=off.
# tether's CPU includes SimEngine's: its scheduler task (one timer wake-up per step for
# the whole batch, amortized over the requests in it) and its per-request state and
# token draws, which are small beside the HTTP path.
set -euo pipefail
cd "$(dirname "$0")/.."

REQUESTS="${REQUESTS:-20000}"
WARMUP="${WARMUP:-2000}"
ROUNDS="${ROUNDS:-3}"
CONCURRENCY="${CONCURRENCY:-64}"
TOKENS="${TOKENS:-16}"
STEP_US="${STEP_US:-50}"
THREADS="${THREADS:-$(nproc)}"
CLIENT_THREADS="${CLIENT_THREADS:-1}"
TARGET="${CARGO_TARGET_DIR:-target}"
# Line tables, so perf can name the frames; the code is the same as without.
export CARGO_PROFILE_RELEASE_DEBUG="${CARGO_PROFILE_RELEASE_DEBUG:-line-tables-only}"

cargo build --release -p tether-cli
cargo build --release -p tether-benches --bin bare_sse
TETHER="${TETHER:-$TARGET/release/tether}"
BARE="$TARGET/release/bare_sse"
# The client is always this tree's `tether load --url` (TETHER may be an older server).
CLIENT="$TARGET/release/tether"
TICK=$(getconf CLK_TCK)
OUT="$TARGET/tether-bench/serve"
mkdir -p "$OUT"

PID=""
cleanup() { if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi; }
trap cleanup EXIT

# load N: `tether load --url $URL` with N streamed completions of $TOKENS tokens at
# $CONCURRENCY, no chaos; prints one line of key=value pairs: requests/s, client TTFT
# p50/p99 in µs, tokens per request, the client's CPU in ticks, errors.
load() {
    local json
    json=$("$CLIENT" load --url "$URL" --model sim --requests "$1" --concurrency "$CONCURRENCY" \
        --max-tokens "$TOKENS" --endpoint completions --stream true --chaos none \
        --threads "$CLIENT_THREADS" --no-progress --json) || true
    python3 - "$TICK" "$json" <<'PY'
import json, sys
tick, r = float(sys.argv[1]), json.loads(sys.argv[2])
print(f"rps={r['requests_per_s']:.1f} ttft_p50_us={r['ttft_ms']['p50'] * 1000:.0f} "
      f"ttft_p99_us={r['ttft_ms']['p99'] * 1000:.0f} tokens_per_request={r['tokens'] / r['requests']:.2f} "
      f"cpu_ticks={(r['cpu']['user_s'] + r['cpu']['system_s']) * tick:.0f} errors={sum(r['errors'].values())}")
PY
}

# The server's utime+stime in ticks (fields 14 and 15; the command name has no spaces).
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
field() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$2"; }

# start NAME ENV... -- COMMAND...: run a server in the background, wait for its
# "listening on http://ADDR" line, set PID and URL.
start() {
    local name=$1; shift
    local envs=()
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    env "${envs[@]}" "$@" >"$OUT/$name.stdout" 2>"$OUT/$name.stderr" &
    PID=$!
    for _ in $(seq 1200); do
        URL=$(grep -o 'http://[0-9.:]*' "$OUT/$name.stdout" 2>/dev/null | head -1 || true)
        [ -n "$URL" ] && return 0
        sleep 0.05
    done
    echo "$name did not start:" >&2
    cat "$OUT/$name.stderr" >&2
    exit 1
}

# measure NAME: warm-up, then ROUNDS measured runs against $URL; prints a table row
# (medians over the rounds; the server CPU's min–max beside it) and keeps bare's CPU
# per request in BARE_CPU for the ratio.
BARE_CPU=""
measure() {
    local name=$1 runs="$OUT/rounds.txt"
    load "$WARMUP" >/dev/null
    : >"$runs"
    local perf_pid="" round before after line
    for round in $(seq "$ROUNDS"); do
        if [ "${PERF:-0}" = 1 ] && [ "$name" != bare ] && [ "$round" = 1 ]; then
            perf record -F 4999 --call-graph dwarf,16384 -o "$OUT/perf-${name//[ ,]/_}.data" \
                -p "$PID" 2>/dev/null &
            perf_pid=$!
            sleep 0.5
        fi
        before=$(ticks "$PID")
        line=$(load "$REQUESTS")
        after=$(ticks "$PID")
        if [ -n "$perf_pid" ]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; perf_pid=""; fi
        echo "$line server_ticks=$((after - before))" >>"$runs"
        echo "$name: $line server_ticks=$((after - before))" >>"$OUT/runs.log"
    done
    local row
    row=$(python3 - "$name" "$runs" "$TICK" "$REQUESTS" "${BARE_CPU:-0}" <<'PY'
import statistics, sys
name, path, tick, n, bare = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
runs = [dict(kv.split("=") for kv in line.split()) for line in open(path) if line.strip()]
med = lambda k: statistics.median(float(r[k]) for r in runs)
per_req = lambda ticks: ticks * 1e6 / tick / n
cpu = [per_req(float(r["server_ticks"])) for r in runs]
errors = sum(int(r["errors"]) for r in runs)
if errors:
    print(f"{name}: {errors} errors", file=sys.stderr)
c = statistics.median(cpu)
ratio = c / bare if bare else 1.0
print(f"{c:.1f}\t| {name} | {med('rps'):.0f} | {med('ttft_p50_us'):.0f} | {med('ttft_p99_us'):.0f} "
      f"| {med('tokens_per_request'):.0f} | **{c:.1f}** ({min(cpu):.0f}–{max(cpu):.0f}) | {ratio:.2f}× "
      f"| {per_req(med('cpu_ticks')):.1f} |")
PY
)
    if [ -z "$BARE_CPU" ]; then BARE_CPU=${row%%$'\t'*}; fi
    echo "${row#*$'\t'}"
}

: >"$OUT/runs.log"
echo "<!-- $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(lscpu | sed -n 's/^Model name:[[:space:]]*//p'), load $(cut -d' ' -f1-3 /proc/loadavg); $ROUNDS rounds of $REQUESTS requests after $WARMUP, concurrency $CONCURRENCY, $TOKENS tokens, step ${STEP_US} µs, server threads $THREADS, client threads $CLIENT_THREADS -->"
echo
echo "| server | requests/s | TTFT p50 (µs) | TTFT p99 (µs) | tokens/request | server CPU µs/request (min–max) | ÷ bare | client CPU µs/request |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"

start bare -- "$BARE" --addr 127.0.0.1:0 --threads "$THREADS"
measure bare
cleanup; PID=""

start tether RUST_LOG= -- "$TETHER" serve --engine sim --step-us "$STEP_US" --addr 127.0.0.1:0 --threads "$THREADS"
measure "tether serve"
cleanup; PID=""

start tether-quiet RUST_LOG=off -- "$TETHER" serve --engine sim --step-us "$STEP_US" --addr 127.0.0.1:0 --threads "$THREADS"
measure "tether serve, log off"
cleanup; PID=""

# instr NAME COMMAND...: the server's user-space instructions per request, which unlike
# CPU time do not move with the load on the machine: the server runs under callgrind,
# whose counts are zeroed after a warm-up and dumped after $IREQUESTS requests (at
# concurrency $CONCURRENCY; the kernel's work, the socket writes among it, is not
# counted).
instr() {
    local name=$1; shift
    local file="$OUT/callgrind-$name"
    rm -f "$file".*
    start "callgrind-$name" RUST_LOG="${LOG_FILTER:-}" -- \
        valgrind --tool=callgrind --callgrind-out-file="$file.%p" "$@"
    load "$IWARMUP" >/dev/null
    callgrind_control --zero "$PID" >/dev/null 2>&1
    load "$IREQUESTS" >/dev/null
    callgrind_control --dump "$PID" >/dev/null 2>&1
    local total
    total=$(callgrind_annotate "$file.$PID.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    cleanup; PID=""
    echo "$total"
}

if [ "${INSTR:-0}" = 1 ]; then
    command -v valgrind >/dev/null || { echo "valgrind not found" >&2; exit 1; }
    IWARMUP="${IWARMUP:-300}"
    IREQUESTS="${IREQUESTS:-2000}"
    echo
    echo "| server | user-space instructions per request (callgrind, $IREQUESTS requests after $IWARMUP) | ÷ bare |"
    echo "|---|---:|---:|"
    bare_i=$(instr bare "$BARE" --addr 127.0.0.1:0 --threads "$THREADS")
    tether_i=$(LOG_FILTER="" instr tether "$TETHER" serve --engine sim --step-us "$STEP_US" \
        --addr 127.0.0.1:0 --threads "$THREADS")
    quiet_i=$(LOG_FILTER=off instr tether-quiet "$TETHER" serve --engine sim --step-us "$STEP_US" \
        --addr 127.0.0.1:0 --threads "$THREADS")
    python3 - "$IREQUESTS" "$bare_i" "$tether_i" "$quiet_i" <<'PY'
import sys
n = int(sys.argv[1])
bare, tether, quiet = (int(v) / n for v in sys.argv[2:])
for name, v in [("bare", bare), ("tether serve", tether), ("tether serve, log off", quiet)]:
    print(f"| {name} | {f'{v:,.0f}'.replace(',', ' ')} | {v / bare:.2f}× |")
PY
fi
