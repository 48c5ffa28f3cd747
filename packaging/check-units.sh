#!/usr/bin/env bash
# The first deploy under a real systemd: install the package into a clean Debian root, boot
# that root with systemd as PID 1 (systemd-nspawn, a private network: loopback only), and at
# boot follow the README's deploy steps on one host running both units:
#
#   - the configs from `sentry pair` installed and the units enabled before any key is there:
#     both fail, say why (config key, file, the fix), and do not restart in a loop;
#   - the keys installed afterwards as the README prints it: `systemctl restart` and the tunnel
#     comes up (`sentry status` on both hosts' metrics);
#   - a bad config: `systemctl reload` fails, the journal names file, line and column, and the
#     running daemon stays; a bad config at start stops the unit without a restart loop;
#   - `systemctl stop` ends cleanly.
#
# Needs root, debootstrap and systemd-nspawn (Debian: debootstrap, systemd-container).
#
#   packaging/check-units.sh target/debian/sentry_0.1.0_amd64.deb
set -euo pipefail
deb=$(realpath "${1:?usage: packaging/check-units.sh PACKAGE.deb}")
suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
root=$(mktemp -d /tmp/sentry-units-root.XXXXXX)
chmod 0755 "$root" # the booted system's /: its services run as other users
cleanup() {
    umount "$root/proc" 2>/dev/null || true
    rm -rf "$root"
}
trap cleanup EXIT

debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus "$suite" "$root" \
    http://deb.debian.org/debian >/dev/null
mount -t proc proc "$root/proc"
cp "$deb" "$root/tmp/"
chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    apt-get install -y -qq "/tmp/$(basename "$deb")" >/dev/null
umount "$root/proc"

# What runs at boot: the deploy, step by step. Each step prints "ok: ..." or "FAIL: ..." and
# the last line says whether all passed. It runs as a oneshot unit after multi-user.target and
# powers the container off when done, whatever happened.
cat >"$root/root/first-deploy.sh" <<'SCRIPT'
#!/bin/bash
set -u
failed=0
ok() { echo "ok: $*"; }
fail() { echo "FAIL: $*"; failed=1; }
# Wait up to $1 seconds for a command to succeed.
wait_for() {
    local limit=$1; shift
    for _ in $(seq 1 "$((limit * 5))"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    return 1
}
show() { systemctl show -p "$2" --value "$1"; }

cd /root
sentry pair --sentry 127.0.0.1:4433 --out-dir pair --preset icon >/dev/null || fail "sentry pair"
cd pair
# One host runs both here: the agent's services point at ports nothing listens on, so the
# sentry's own listeners are never its upstream.
sed -i -e 's/127\.0\.0\.1:7100/127.0.0.1:17100/' -e 's/127\.0\.0\.1:9000/127.0.0.1:19000/' agent.toml

# 1. The configs first, as printed, and the units enabled: no key yet.
install -D -m 0644 sentry.toml /etc/sentry/sentry.toml
install -D -m 0644 agent.toml /etc/sentry/agent.toml
systemctl enable --now sentry >/dev/null 2>&1 && fail "sentry started without its key"
systemctl enable --now sentry-agent >/dev/null 2>&1 && fail "sentry-agent started without its key"
sleep 6 # longer than RestartSec: a restart loop would have restarted by now
for unit in sentry sentry-agent; do
    state=$(show $unit ActiveState)
    restarts=$(show $unit NRestarts)
    [ "$state" = failed ] && ok "$unit without a key: failed" || fail "$unit without a key: $state"
    [ "$restarts" = 0 ] && ok "$unit without a key: not restarted" ||
        fail "$unit without a key: restarted $restarts times"
done
journalctl -b -u sentry --no-pager >/root/journal-nokey.txt
if grep -q 'sentry keygen' /root/journal-nokey.txt && grep -q '/etc/sentry/sentry.key' /root/journal-nokey.txt; then
    ok "the journal names the key file and the fix"
else
    fail "the journal does not say which key and how to fix it:"; tail -n 20 /root/journal-nokey.txt
fi

# 2. The keys installed after the first start, as the README prints it; a restart reads them.
install -D -m 0600 sentry.key /etc/sentry/sentry.key
install -D -m 0600 agent.key /etc/sentry/agent.key
systemctl restart sentry && ok "sentry starts once its key is installed" || fail "sentry restart with its key"
systemctl restart sentry-agent && ok "sentry-agent starts once its key is installed" ||
    fail "sentry-agent restart with its key"
if wait_for 30 sentry status && wait_for 30 sentry status --metrics 127.0.0.1:9901; then
    ok "the tunnel is up: sentry status exits 0 on both"
else
    fail "the tunnel did not come up:"; sentry status; sentry status --metrics 127.0.0.1:9901
    journalctl -b -u sentry -u sentry-agent --no-pager | tail -n 30
fi
for unit in sentry sentry-agent; do
    uid=$(awk '/^Uid:/ { print $2 }' "/proc/$(show $unit MainPID)/status")
    [ -n "$uid" ] && [ "$uid" != 0 ] && ok "$unit runs as uid $uid, not root" || fail "$unit runs as uid '$uid'"
done

# 3. A bad reload fails visibly; the running daemon stays and keeps its tunnel.
cp /etc/sentry/sentry.toml /root/sentry.toml.good
pid=$(show sentry MainPID)
printf '\n[[route]]\nname = "broken"\nlisten = "0.0.0.0:notaport"\n' >>/etc/sentry/sentry.toml
if systemctl reload sentry 2>/dev/null; then fail "reload of a bad config reported success"; else ok "reload of a bad config fails"; fi
[ "$(show sentry ActiveState)" = active ] && [ "$(show sentry MainPID)" = "$pid" ] &&
    ok "the running sentry stays after a bad reload" || fail "the sentry did not survive a bad reload"
if journalctl -b -u sentry --no-pager | grep -q 'sentry.toml:[0-9]*:[0-9]*'; then
    ok "the journal names the bad line"
else
    fail "the journal does not name the bad line:"; journalctl -b -u sentry --no-pager | tail -n 10
fi
wait_for 10 sentry status && ok "the tunnel is still up after the bad reload" || fail "tunnel lost after a bad reload"

# 4. A bad config at start: the unit stops, without a restart loop.
systemctl restart sentry 2>/dev/null && fail "sentry started with a bad config"
sleep 6
[ "$(show sentry ActiveState)" = failed ] && [ "$(show sentry NRestarts)" = 0 ] &&
    ok "a bad config at start: failed, not restarted" ||
    fail "a bad config at start: $(show sentry ActiveState), $(show sentry NRestarts) restarts"

# 5. A good reload applies, and a stop ends cleanly.
cp /root/sentry.toml.good /etc/sentry/sentry.toml
systemctl restart sentry && wait_for 30 sentry status && ok "sentry back with the good config" ||
    fail "sentry did not come back with the good config"
for unit in sentry sentry-agent; do
    if systemctl reload $unit; then
        ok "$unit: reload of a good config succeeds"
    else
        fail "$unit: reload of a good config:"; journalctl -b -u $unit --no-pager | tail -n 15
    fi
done
systemctl stop sentry sentry-agent
for unit in sentry sentry-agent; do
    [ "$(show $unit Result)" = success ] && ok "$unit stops cleanly" || fail "$unit stop: $(show $unit Result)"
done

[ "$failed" = 0 ] && echo "first-deploy: all steps passed" || echo "first-deploy: FAILED"
SCRIPT
chmod 0755 "$root/root/first-deploy.sh"
cat >"$root/etc/systemd/system/first-deploy.service" <<'UNIT'
[Unit]
Description=the README's first deploy, checked
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/bin/sh -c '/root/first-deploy.sh >/root/first-deploy.log 2>&1'
ExecStopPost=/usr/bin/systemctl poweroff --no-block
TimeoutStartSec=240
[Install]
WantedBy=multi-user.target
UNIT
ln -s /etc/systemd/system/first-deploy.service \
    "$root/etc/systemd/system/multi-user.target.wants/first-deploy.service"

# Boot it. The container has its own network namespace (loopback only) and registers with no
# machine manager; its console goes to a log printed only on failure.
console=$(mktemp)
if ! timeout 300 systemd-nspawn --quiet --boot --directory "$root" --private-network \
    --register=no --keep-unit >"$console" 2>&1; then
    echo "the container did not boot and power off in time:" >&2
    tail -n 40 "$console" >&2
fi
rm -f "$console"
if [ ! -f "$root/root/first-deploy.log" ]; then
    echo "the first-deploy check did not run" >&2
    exit 1
fi
cat "$root/root/first-deploy.log"
grep -q '^first-deploy: all steps passed$' "$root/root/first-deploy.log"
