#!/usr/bin/env bash
# Build the offline bundle for air-gapped sites: wheels of the agent and of
# every dependency, for `scripts/install.sh --wheelhouse OUT_DIR`.
#
#   scripts/build-wheelhouse.sh OUT_DIR
#
# Needs PyPI (or a mirror configured for pip). Runs pip from a temporary venv,
# so neither the caller's environment nor this source tree is changed (pip
# builds from a copy of the tree; its in-tree build would leave build/ and
# *.egg-info behind). Writes OUT_DIR/SHA256SUMS to check the copy on site:
#   (cd OUT_DIR && sha256sum -c SHA256SUMS)
#
# Wheels with compiled code (cryptography, cffi, PyYAML) are specific to the
# CPU architecture and Python version: build on a machine like the edge hosts
# (same arch, same python3 minor version), or with PYTHON=/path/to/that python.
set -euo pipefail

if [ $# -ne 1 ] || [ "${1#-}" != "$1" ]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/copy-source.sh
. "$repo/scripts/copy-source.sh"
PYTHON=${PYTHON:-python3}
mkdir -p -- "$1"
out=$(cd -- "$1" && pwd)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "build-wheelhouse.sh: $PYTHON is older than 3.10" >&2; exit 1; }
"$PYTHON" -m venv "$tmp/venv"
mkdir "$tmp/src"
copy_source "$repo" "$tmp/src"

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# An older agent wheel left in OUT_DIR would be harmless (install.sh takes
# the newest) but confusing; dependency wheels are kept (pip reuses them).
rm -f -- "$out"/edge_upgrade_agent-*.whl
"$tmp/venv/bin/python" -m pip --quiet wheel --wheel-dir "$out" "$tmp/src"

(cd "$out" && sha256sum -- *.whl >SHA256SUMS)
count=$(find "$out" -maxdepth 1 -name '*.whl' | wc -l)
echo "build-wheelhouse.sh: $count wheels in $out"
