"""Shared test configuration: GPU tests skip cleanly on CPU-only machines (CI)."""

from __future__ import annotations

import os
from pathlib import Path

# CPU machines (CI) run the Triton kernels through Triton's interpreter. This must be set before
# anything imports triton; scripts/gpu_check.sh sets MNEMO_GPU_TESTS=1 to compile for the GPU.
if os.environ.get("MNEMO_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel outputs are NaN-poisoned before each run so unwritten elements fail the comparisons.
os.environ.setdefault("MNEMO_POISON", "1")

import sys

import pytest
import torch
from hypothesis import settings

# Shared test helpers (tests/capture_guards.py) importable from every test folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Property tests draw the same examples on every run (a failure found once is kept as a regression
# test instead of making CI flaky); set HYPOTHESIS_PROFILE=explore to search randomly.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic_math():
    # fp32 tolerances in ARCHITECTURE.md assume TF32 off.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
