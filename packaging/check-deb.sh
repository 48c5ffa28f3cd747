#!/usr/bin/env bash
# Install the package into a clean Debian root and check it from there, as an operator's
# fresh VM would have it: `sentry --version`, `sentry check --no-key` on every installed
# example config, the units in place and neither enabled nor started, the monitoring files
# and the sentry-tls group there. Needs root and debootstrap (Debian: debootstrap).
#
#   packaging/check-deb.sh target/debian/sentry_0.1.0_amd64.deb
set -euo pipefail
deb=$(realpath "${1:?usage: packaging/check-deb.sh PACKAGE.deb}")
suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
root=$(mktemp -d /tmp/sentry-deb-root.XXXXXX)
cleanup() {
    umount "$root/proc" 2>/dev/null || true
    rm -rf "$root"
}
trap cleanup EXIT

debootstrap --variant=minbase "$suite" "$root" http://deb.debian.org/debian >/dev/null
mount -t proc proc "$root/proc"
cp "$deb" "$root/tmp/"
in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }
# apt resolves the package's dependencies (libc6, adduser) from the suite's archive.
in_root apt-get install -y -qq "/tmp/$(basename "$deb")" >/dev/null

in_root sentry --version
for example in "$root"/usr/share/doc/sentry/examples/*.toml; do
    in_root sentry check --no-key --config "/usr/share/doc/sentry/examples/$(basename "$example")"
done
for unit in sentry.service sentry-agent.service; do
    test -f "$root/lib/systemd/system/$unit"
    grep -q '^ExecStart=/usr/bin/sentry ' "$root/lib/systemd/system/$unit"
    if find "$root/etc/systemd/system" -name "$unit" 2>/dev/null | grep -q .; then
        echo "$unit is enabled on install" >&2
        exit 1
    fi
done
test -f "$root/usr/share/sentry/monitoring/alerts.yml"
test -f "$root/usr/share/sentry/monitoring/dashboard.json"
in_root getent group sentry-tls >/dev/null
echo "package ok: $(basename "$deb") installs into a clean $suite root"
