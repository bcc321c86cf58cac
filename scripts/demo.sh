#!/usr/bin/env bash
# Local rehearsal: one successful upgrade and one that rolls back, on a sandboxed node.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python scripts/rehearsal.py
