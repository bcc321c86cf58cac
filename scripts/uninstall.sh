#!/usr/bin/env bash
# Remove edge-upgrade-agent installed by scripts/install.sh.
#
#   scripts/uninstall.sh [--purge] [--prefix DIR] [--root DIR]
#
# Stops and disables the service, removes its unit file and <prefix>/venv.
# --purge also removes /etc/edge-upgrade-agent (configuration, TLS files,
# credentials) and /var/lib/edge-upgrade-agent (journal, logs, staging) except
# its backups/ of edgecore: a node's only copy of its previous edgecore,
# config, database and unit is not the agent's to throw away.
# Never touched: edgecore and /etc/kubeedge.
# --root DIR: every system path under DIR, systemd left alone (tests).
# Exit status: 0 removed (or nothing to remove); 1 failed; 2 bad usage.
set -euo pipefail

UNIT_NAME=edge-upgrade-agent.service
prefix=/opt/edge-upgrade-agent
purge='' root=''

bad_usage() {
    printf 'uninstall.sh: %s (see --help)\n' "$*" >&2
    exit 2
}
say() {
    printf 'uninstall.sh: %s\n' "$*"
}

while [ $# -gt 0 ]; do
    case $1 in
        --purge) purge=1; shift ;;
        --prefix) [ $# -ge 2 ] || bad_usage "--prefix needs a value"; prefix=$2; shift 2 ;;
        --root) [ $# -ge 2 ] || bad_usage "--root needs a value"; root=$2; shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
        *) bad_usage "unknown argument: $1" ;;
    esac
done
# Only <prefix>/venv is removed (and <prefix> if then empty), so a plain
# absolute path is all the guard needed.
if [[ ! $prefix =~ ^(/[A-Za-z0-9._+-]+)+/?$ ]] || [[ $prefix =~ (^|/)\.\.?(/|$) ]]; then
    bad_usage "--prefix must be a plain absolute path: $prefix"
fi
prefix=${prefix%/}
R=
if [ -n "$root" ]; then
    [ -d "$root" ] || bad_usage "--root: no such directory: $root"
    R=$(cd -- "$root" && pwd -P)
    [ "$R" != / ] || R=
elif [ "$(id -u)" -ne 0 ]; then
    printf 'uninstall.sh: error: run as root\n' >&2
    exit 1
fi

# systemd: only on a real install on a host booted with systemd.
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
    if systemctl cat "$UNIT_NAME" >/dev/null 2>&1; then
        # KillMode=mixed: a running keadm dies with the agent. Its job is
        # left "installing" in the journal, so a later reinstall (without
        # --purge) rolls it back on start.
        systemctl disable --now "$UNIT_NAME" || say "warning: could not stop/disable $UNIT_NAME"
        say "stopped and disabled $UNIT_NAME"
    fi
elif [ -z "$root" ]; then
    say "systemd is not running as PID 1: stop the agent yourself if it runs"
fi

removed() { # PATH WHAT
    if [ -e "$1" ] || [ -L "$1" ]; then
        rm -rf -- "$1"
        say "removed $2 $1"
    fi
}

removed "$R/etc/systemd/system/$UNIT_NAME" "unit"
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl reset-failed "$UNIT_NAME" >/dev/null 2>&1 || true
fi
removed "$R$prefix/venv" "venv"
# The prefix itself only if nothing else lives there.
rmdir -- "$R$prefix" 2>/dev/null || true

if [ -n "$purge" ]; then
    removed "$R/etc/edge-upgrade-agent" "configuration"
    state="$R/var/lib/edge-upgrade-agent"
    if [ -d "$state/backups" ]; then
        for entry in "$state"/* "$state"/.[!.]*; do
            [ "$entry" = "$state/backups" ] || removed "$entry" "state"
        done
        say "kept the edgecore backups in $state/backups"
    else
        removed "$state" "state"
    fi
else
    [ ! -d "$R/etc/edge-upgrade-agent" ] \
        || say "kept $R/etc/edge-upgrade-agent and $R/var/lib/edge-upgrade-agent (--purge removes them)"
fi
