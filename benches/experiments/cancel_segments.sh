#!/usr/bin/env bash
# Where tether's stop path spends its time, for BENCHMARKS.md's cancel-latency verdict:
# `cancel_latency` built with instants taken at five points of the stop's path
# (`cancel_segments.patch`: after the context's delivery reaches the request, before and
# after the abort task's wake, when the abort task is polled, when it calls the engine's
# `abort`), in a scratch worktree at COMMIT, so the measured build is never the shipped
# one. Prints the usual table and, for tether, the mean of each segment over the samples
# between two percentiles of the total.
#
#   benches/experiments/cancel_segments.sh            # at the commit the patch was made for
#   COMMIT=<rev> benches/experiments/cancel_segments.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
COMMIT="${COMMIT:-8e67d61}"
DIR="$(mktemp -d)/tether"
git worktree add --detach "$DIR" "$COMMIT" >/dev/null
trap 'git worktree remove --force "$DIR"' EXIT
git -C "$DIR" apply "$PWD/benches/experiments/cancel_segments.patch"
# The repo's own target directory, so the dependencies are built once.
(cd "$DIR" && CARGO_TARGET_DIR="$OLDPWD/target/segments" \
    cargo bench -q -p tether-benches --bench cancel_latency)
