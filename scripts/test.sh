#!/usr/bin/env bash
# The test command: lint, strict type-check, then the test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k crash).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
.venv/bin/ruff check agent testkit tests bench scripts
.venv/bin/mypy agent testkit tests bench scripts
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
