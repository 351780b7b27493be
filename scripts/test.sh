#!/usr/bin/env bash
# Run the test suite in the project's venv (create it first with scripts/setup.sh).
#   scripts/test.sh                       # everything
#   scripts/test.sh tests/test_broker.py  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -f .venv/bin/activate ]]; then
    echo "error: no .venv here; run scripts/setup.sh first" >&2
    exit 1
fi
# shellcheck disable=SC1091
. .venv/bin/activate
exec python -m pytest -q "$@"
