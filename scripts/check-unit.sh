#!/usr/bin/env bash
# Check the systemd unit: `systemd-analyze verify` must print NOTHING, and the
# `systemd-analyze security --offline=true` exposure score must not rise above
# THRESHOLD. Works without systemd as PID 1 (containers, CI); needs only the
# systemd package's systemd-analyze (>= 250 for --offline/--threshold).
#
#   scripts/check-unit.sh [UNIT_FILE]     (default: systemd/edge-upgrade-agent.service)
#
# Why "no output" and not the exit code: verify exits 0 while it prints
# "Unknown key 'Bogus' ..., ignoring" or "Invalid syntax, ignoring": systemd
# skips a bad line and starts the unit without it, i.e. without a sandbox
# option or a restart policy nobody notices is missing.
set -euo pipefail

# Overall exposure of systemd/edge-upgrade-agent.service as measured with
# systemd 252 (Debian 12): 4.5 ("OK"). Margin 0.0: any change that weakens
# the sandbox fails here; lower this figure when a change improves it.
THRESHOLD=4.5

# What scripts/install.sh installs with its default --prefix. verify checks
# that ExecStart= is executable, so the temporary root below gets a stub at
# exactly this path and nowhere else: a unit whose ExecStart points anywhere
# else still fails with "is not executable".
AGENT_BIN=/opt/edge-upgrade-agent/venv/bin/edge-upgrade-agent

repo=$(cd "$(dirname "$0")/.." && pwd)
unit=${1:-"$repo/systemd/edge-upgrade-agent.service"}

fail() {
    printf 'check-unit: FAIL: %s\n' "$*" >&2
    exit 1
}

command -v systemd-analyze >/dev/null \
    || fail "systemd-analyze not found (Debian: apt-get install systemd)"
[ -f "$unit" ] || fail "no such unit file: $unit"
name=$(basename "$unit")

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export SYSTEMD_PAGER=cat SYSTEMD_COLORS=0 LC_ALL=C

# A throw-away root for `verify --root=`: the host's own system units (the
# targets our unit is ordered against and the implicit default dependencies
# such as sysinit.target must resolve), the unit under test as installed, and
# the stub agent. The unit file itself is verified as is, never rewritten.
# $1: the unit file; prints the root.
make_root() {
    local root
    root=$(mktemp -d "$tmp/root.XXXXXX")
    local dir=/usr/lib/systemd/system
    [ -d "$dir" ] || dir=/lib/systemd/system  # before the /usr merge
    [ -d "$dir" ] || fail "no system unit directory (/usr/lib/systemd/system) on this host"
    mkdir -p "$root$(dirname "$dir")"
    cp -a "$dir" "$root$dir"
    mkdir -p "$root/etc/systemd/system" "$root$(dirname "$AGENT_BIN")"
    cp "$1" "$root/etc/systemd/system/$(basename "$1")"
    printf '#!/bin/sh\nexit 0\n' >"$root$AGENT_BIN"
    chmod 0755 "$root$AGENT_BIN"
    printf '%s\n' "$root"
}

# $1: root, $2: unit name; prints everything verify said, returns its status.
verify() {
    systemd-analyze verify --root="$1" "$2" 2>&1
}

# 1. Canary: the same unit plus an unknown key must make verify talk. If it
# stays silent, this systemd-analyze does not really check (and a silent
# verify of the real unit would prove nothing).
canary="$tmp/canary/$name"
mkdir -p "$(dirname "$canary")"
cp "$unit" "$canary"
printf '\n[Service]\nCheckUnitCanary=1\n' >>"$canary"
canary_root=$(make_root "$canary")
canary_out=$(verify "$canary_root" "$name") || true
case $canary_out in
    *CheckUnitCanary*) ;;
    *) fail "systemd-analyze verify did not report an unknown key in a canary copy; it checks nothing here (output: ${canary_out:-none})" ;;
esac

# 2. The unit itself: exit 0 and not a single line of output.
root=$(make_root "$unit")
status=0
out=$(verify "$root" "$name") || status=$?
if [ "$status" -ne 0 ] || [ -n "$out" ]; then
    # Name the file under test, not its copy in the temporary root.
    printf '%s\n' "${out//"$root/etc/systemd/system/$name"/$unit}" >&2
    fail "systemd-analyze verify $name: exit $status, $(printf '%s' "$out" | grep -c '') line(s) of output (must be 0 and none)"
fi
echo "check-unit: verify $name: clean"

# 3. Exposure score, read from the report and compared in tenths (the unit
# systemd computes it in; --threshold takes the same scale).
status=0
report=$(systemd-analyze security --offline=true --root="$root" "$name" 2>&1) || status=$?
[ "$status" -eq 0 ] || { printf '%s\n' "$report" >&2; fail "systemd-analyze security failed (exit $status)"; }
score=$(printf '%s\n' "$report" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9][0-9]*\.[0-9]\).*/\1/p' | tail -n 1)
[ -n "$score" ] || { printf '%s\n' "$report" >&2; fail "no overall exposure level in the security report"; }
tenths() { printf '%s' "$1" | awk -F. '{ printf "%d", $1 * 10 + $2 }'; }
if [ "$(tenths "$score")" -gt "$(tenths "$THRESHOLD")" ]; then
    printf '%s\n' "$report" >&2
    fail "exposure $score is above the documented $THRESHOLD (scripts/check-unit.sh THRESHOLD)"
fi
# The same bound enforced by systemd-analyze itself, so a parsing slip above
# cannot let a worse unit through.
systemd-analyze security --offline=true --root="$root" --threshold="$(tenths "$THRESHOLD")" \
    "$name" >/dev/null 2>&1 \
    || fail "systemd-analyze security --threshold=$(tenths "$THRESHOLD") rejected $name"
echo "check-unit: security $name: exposure $score (threshold $THRESHOLD)"
