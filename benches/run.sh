#!/usr/bin/env bash
# The benchmark suite: every scenario (bulk 1 and 8 streams each way, request/response over
# keep-alive connections, connection churn, idle connections held open) against every path
# (direct, a plain relay, sentry over QUIC, WireGuard and TLS, rathole's noise and TLS
# transports when available, and wireguard-go + a relay), repetitions interleaved, on loopback
# and in the namespace topology (root only); checks the suite's goals; writes benches/RESULTS.md.
#
#   benches/run.sh                      # sentry paths only
#   BENCH_RATHOLE=1 benches/run.sh      # also installs rathole from crates.io at bench time
#                                       # (into target/bench-tools; never vendored)
#
# Settings: BENCH_REPS (3), BENCH_BYTES (268435456), BENCH_SECONDS (5), BENCH_CONNS (64),
# BENCH_WORKERS (16), BENCH_IDLE (10000), BENCH_SITES (loopback,netns), BENCH_OUT
# (benches/RESULTS.md), RATHOLE_BIN (an existing rathole).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p sentry -p benches --bin suite --bin loadgen

if [[ "${BENCH_RATHOLE:-0}" == 1 && -z "${RATHOLE_BIN:-}" ]]; then
    # Its noise and TLS transports. TLS is native-tls, so OpenSSL's headers are needed:
    # installed from Debian when missing and we may; without them, noise only. Not --locked:
    # the lockfile of rathole 0.5.0 pins time 0.3.29, which current compilers reject.
    features=server,client,noise
    if ! dpkg -s libssl-dev pkg-config >/dev/null 2>&1 && [[ $EUID == 0 ]]; then
        apt-get install -y libssl-dev pkg-config openssl >/dev/null || true
    fi
    if dpkg -s libssl-dev pkg-config >/dev/null 2>&1; then
        features=$features,tls
    fi
    cargo install rathole --version 0.5.0 --no-default-features --features "$features" \
        --root target/bench-tools
    export RATHOLE_BIN="$PWD/target/bench-tools/bin/rathole"
fi

export SENTRY_BIN="$PWD/target/release/sentry"
# The suite runs in a process group of its own. Interrupted (Ctrl-C, SIGTERM), it cannot
# clean up after itself, so this script stops the whole group by its ID (the suite and every
# daemon, rathole and wireguard-go it started) and deletes the namespaces it created.
setsid target/release/suite &
suite=$!
cleanup() {
    trap - INT TERM
    kill -TERM -- "-$suite" 2>/dev/null || true
    wait "$suite" 2>/dev/null || true
    ip netns list 2>/dev/null | awk -v p="sentry-t$suite-" 'index($1, p) == 1 { print $1 }' |
        while read -r ns; do ip netns del "$ns"; done
    exit 130
}
trap cleanup INT TERM
wait "$suite"
