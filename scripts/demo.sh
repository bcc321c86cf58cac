#!/usr/bin/env bash
# Local rehearsal: a throwaway broker and registry, a sandboxed edge node, the
# agent daemon over MQTT; one upgrade that succeeds, one that rolls back.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v mosquitto >/dev/null || need+=(mosquitto)
command -v dockerd >/dev/null || need+=(docker.io)
command -v docker-registry >/dev/null || need+=(docker-registry)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "demo: installing ${need[*]}"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "${need[@]}" >/dev/null
    else
        echo "demo: missing ${need[*]}; install them (Debian: apt-get install ${need[*]})" >&2
        command -v mosquitto >/dev/null || exit 1
    fi
fi
scripts/bootstrap.sh
exec .venv/bin/python scripts/rehearsal.py "$@"
