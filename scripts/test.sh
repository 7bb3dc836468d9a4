#!/usr/bin/env bash
# README command 2: set up (if needed) and run the default CPU test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
# One pytest worker per core (at most MNEMO_TEST_WORKERS, default 2: CI's machines have 2 cores), a test
# file's tests on one worker (module fixtures are built once); MNEMO_TEST_WORKERS=0 runs in this process.
WORKERS="${MNEMO_TEST_WORKERS:-2}"
CORES="$(nproc 2>/dev/null || echo 1)"
[ "$WORKERS" -gt "$CORES" ] && WORKERS="$CORES"
if [ "$WORKERS" -gt 1 ]; then
    exec .venv/bin/python -m pytest -q -n "$WORKERS" --dist loadfile "$@"
fi
exec .venv/bin/python -m pytest -q "$@"
