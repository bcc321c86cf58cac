#!/usr/bin/env bash
# Run the fault matrix (tests/faults/) and write its table into docs/reliability.md.
# Extra arguments go to pytest (e.g. -k kill9). CI runs the same tests without
# writing the document; this is how the document is made from a run.
set -euo pipefail
cd "$(dirname "$0")/.."
results="$(mktemp)"
trap 'rm -f "$results"' EXIT
EDGE_FAULT_RESULTS="$results" .venv/bin/pytest -q -p no:cacheprovider tests/faults "$@"
.venv/bin/python -m testkit.reliability "$results" docs/reliability.md
echo "docs/reliability.md: $(wc -l < "$results") cells written"
