#!/usr/bin/env bash
# README command 1: set up (if needed) and run the demo on the bundled Tiny Shakespeare corpus.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec .venv/bin/mnemo demo "$@"
