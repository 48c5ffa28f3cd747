#!/bin/bash
# User-space instructions per request through one path of the jsonrpc bench, counted by
# valgrind (cachegrind, no cache simulation): the slope between a 2 s and an 8 s run, so the
# setup (keys, handshakes) drops out. Deterministic to about 1%, where requests per second on
# this 2-core machine vary by 20% from run to run. Kernel work (syscalls, loopback) is not
# counted; both routes make the same syscalls and send the same packets per request.
#
#   cargo bench -p benches --bench jsonrpc --no-run
#   benches/instructions.sh target/release/deps/jsonrpc-<hash> "tcp route"
#   benches/instructions.sh target/release/deps/jsonrpc-<hash> "jsonrpc"
#
# Needs valgrind (apt install valgrind). Everything stays on loopback, bounded by the bench's
# own durations.
set -euo pipefail
bin=$1
only=$2
declare -A ir requests
for seconds in 2 8; do
    out=$(BENCH_ONLY="$only" BENCH_REPS=1 BENCH_SECONDS=$seconds \
        valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \
        "$bin" --bench 2>&1)
    rps=$(grep -oP 'rep 1/1 [^:]*: \K[0-9]+' <<<"$out")
    ir[$seconds]=$(grep -oP 'I\s+refs:\s+\K[0-9,]+' <<<"$out" | tr -d ,)
    requests[$seconds]=$((rps * seconds))
done
echo "$only: $(((ir[8] - ir[2]) / (requests[8] - requests[2]))) instructions per request" \
    "(${requests[2]} and ${requests[8]} requests)"
