#!/usr/bin/env bash
# A portable sentry binary for older distributions: linked against glibc 2.17 (RHEL 7, Debian
# 8, Ubuntu 14.04 and later) with zig as the linker (cargo-zigbuild from crates.io, zig from
# PyPI's `ziglang`), stripped: target/portable/sentry-VERSION-x86_64-linux-gnu.
#
#   packaging/portable.sh            # installs the two tools first if missing
#   packaging/portable.sh --check    # then runs it in a clean Debian 11 root (glibc 2.31,
#                                    # older than the regular build's 2.34; needs root and
#                                    # debootstrap)
#
# Not run by CI (it takes a release build of its own); run it before a release.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)

python3 -m ziglang version >/dev/null 2>&1 || python3 -m pip install --quiet 'ziglang==0.13.0'
command -v cargo-zigbuild >/dev/null || cargo install --locked cargo-zigbuild --version 0.24.1
CARGO_TARGET_DIR=target/portable \
    cargo zigbuild --locked --release -p sentry --target x86_64-unknown-linux-gnu.2.17
out=target/portable/sentry-$version-x86_64-linux-gnu
cp target/portable/x86_64-unknown-linux-gnu/release/sentry "$out"
strip --strip-unneeded "$out"
glibc=$(objdump -T "$out" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n 1)
echo "$out ($(du -h "$out" | cut -f1), needs glibc >= $glibc)"

if [[ "${1:-}" == --check ]]; then
    root=$(mktemp -d /tmp/sentry-portable-root.XXXXXX)
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase bullseye "$root" http://deb.debian.org/debian >/dev/null
    install -m 0755 "$out" "$root/usr/local/bin/sentry"
    chroot "$root" /usr/local/bin/sentry --version
    chroot "$root" sh -c 'cd /tmp && sentry keygen --out k.key >/dev/null && sentry pubkey --key k.key'
    echo "runs on Debian 11 ($(chroot "$root" ldd --version | head -n 1))"
fi
