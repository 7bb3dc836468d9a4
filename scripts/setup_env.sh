#!/usr/bin/env bash
# Create ./.venv if needed and install mnemotorch (editable) with its test extras.
# On a machine without torch, the CPU build torch==2.13.0 is installed first: a bare `torch`
# requirement would pull a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating virtual environment .venv"
    "$PYTHON" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing torch==2.13.0 (CPU build)"
    "$VPY" -m pip install -q --disable-pip-version-check torch==2.13.0
fi
# Re-install only when the project's requirements changed.
STAMP=.venv/.mnemotorch-installed
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ] || ! "$VPY" -c "import mnemotorch" >/dev/null 2>&1; then
    echo "[setup] installing mnemotorch and its dependencies"
    "$VPY" -m pip install -q --disable-pip-version-check -e ".[dev]"
    echo "$WANT" > "$STAMP"
fi
