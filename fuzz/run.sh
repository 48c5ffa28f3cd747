#!/usr/bin/env bash
# Run a fuzz target for a bounded time: coverage-guided (libFuzzer) on a nightly toolchain,
# starting from the committed seeds. No cargo-fuzz needed: the flags it would pass are here.
#
#   fuzz/run.sh jsonrpc_filter 60      # seconds
#
# New inputs libFuzzer finds go to target/fuzz-corpus/TARGET (not committed); a crash is saved
# as target/fuzz-artifacts/TARGET/crash-* and the script exits non-zero.
set -euo pipefail
target="${1:?usage: fuzz/run.sh TARGET SECONDS}"
seconds="${2:-60}"
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
corpus="$root/target/fuzz-corpus/$target"
artifacts="$root/target/fuzz-artifacts/$target"
mkdir -p "$corpus" "$artifacts"

export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
  -Cllvm-args=-sanitizer-coverage-level=4 \
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
  -Cllvm-args=-sanitizer-coverage-pc-table \
  -Cllvm-args=-sanitizer-coverage-trace-compares \
  -Cdebug-assertions -Coverflow-checks"
export CARGO_TARGET_DIR="$root/target/fuzz"
# An explicit --target keeps the coverage flags off build scripts (as cargo-fuzz does).
host="$(rustc +nightly -vV | sed -n 's/^host: //p')"
(cd "$here" && cargo +nightly build --locked --release --target "$host" --bin "$target")
"$CARGO_TARGET_DIR/$host/release/$target" \
  -max_total_time="$seconds" -max_len=8192 -timeout=5 -rss_limit_mb=2048 \
  -artifact_prefix="$artifacts/" -print_final_stats=1 \
  "$corpus" "$here/seeds/$target"
