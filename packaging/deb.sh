#!/usr/bin/env bash
# Build the Debian package: target/debian/sentry_VERSION_ARCH.deb (no debhelper, no cargo-deb:
# dpkg-deb over a tree this script lays out).
#
#   packaging/deb.sh            # builds the release binary first (cargo build --release)
#
# What it holds: /usr/bin/sentry (stripped); sentry.service and sentry-agent.service in
# /lib/systemd/system, neither enabled nor started on install; the example configs, the
# README, the chain guides and the security notes in /usr/share/doc/sentry; the alert rules
# and the Grafana dashboard in /usr/share/sentry/monitoring; a `sentry-tls` system group the
# units read TLS certificates through (see /usr/share/doc/sentry/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture)
cargo build --locked --release -p sentry

out=target/debian
root=$out/root
rm -rf "$root"
mkdir -p "$root/DEBIAN"

install -D -m 0755 target/release/sentry "$root/usr/bin/sentry"
strip --strip-unneeded "$root/usr/bin/sentry"
# The newest glibc symbol version the binary needs is the package's libc6 dependency.
glibc=$(objdump -T "$root/usr/bin/sentry" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' |
    sort -V | tail -n 1)

for unit in sentry.service sentry-agent.service; do
    sed -e 's|/usr/local/bin/sentry|/usr/bin/sentry|g' \
        -e 's|file:/usr/local/share/doc/sentry/README.md|file:/usr/share/doc/sentry/README.md|' \
        "systemd/$unit" | install -D -m 0644 /dev/stdin "$root/lib/systemd/system/$unit"
done

doc=$root/usr/share/doc/sentry
install -d "$doc/examples" "$root/usr/share/sentry/monitoring"
install -m 0644 README.md SECURITY.md ARCHITECTURE.md docs/*.md "$doc/"
install -m 0644 configs/*.toml "$doc/examples/"
install -m 0644 monitoring/alerts.yml monitoring/alerts.test.yml monitoring/dashboard.json \
    "$root/usr/share/sentry/monitoring/"
install -m 0755 packaging/certbot-deploy-hook "$root/usr/share/sentry/"
gzip -9n < CHANGELOG.md > "$doc/changelog.gz"
chmod 0644 "$doc/changelog.gz"
cat > "$doc/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: sentry

Files: *
License: Apache-2.0
 On Debian systems, the full text of the Apache License version 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
chmod 0644 "$doc/copyright"
# procps: /bin/kill, which the units' ExecReload= sends the SIGHUP with (a minimal Debian has none).

installed=$(du -sk "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: sentry
Version: $version
Architecture: $arch
Maintainer: sentry developers <sentry@localhost>
Section: net
Priority: optional
Depends: libc6 (>= $glibc), adduser, procps
Installed-Size: $installed
Description: keep a blockchain validator private behind a hardened sentry
 sentry serve runs on a public host and relays P2P and JSON-RPC traffic, filtered
 and rate-limited, over QUIC, WireGuard or TLS to sentry agent, which runs beside
 the validator behind NAT and dials out: the validator opens no port, and its
 outbound connections can leave from the sentry too.
 .
 Both systemd units are installed but neither enabled nor started.
CONTROL

cat > "$root/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    # The group a route's TLS certificate and key are readable by (the units add it).
    if ! getent group sentry-tls >/dev/null; then
        addgroup --system --quiet sentry-tls
    fi
    install -d -m 0755 /etc/sentry
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null 2>&1 || true
    fi
fi
exit 0
POSTINST
cat > "$root/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
POSTRM
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/postrm"

deb=$out/sentry_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb ($(du -h "$deb" | cut -f1); the binary needs glibc >= $glibc)"
