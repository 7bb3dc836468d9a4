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

# Under pytest-xdist (scripts/test.sh) the workers share the cores: one intra-op thread pool each of
# cores / workers threads instead of one per core each.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _shard(config, items) -> None:
    """``MNEMO_TEST_SHARD=i/n`` keeps every n-th collected test starting at i (0-based), so one test
    file can be spread over n processes (the GPU machine compiles Triton kernels on 16 cores; one
    pytest process uses one). The union of the n shards is the whole selection."""
    spec = os.environ.get("MNEMO_TEST_SHARD")
    if not spec:
        return
    try:
        i, n = (int(x) for x in spec.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise pytest.UsageError(f"MNEMO_TEST_SHARD must be 'i/n' with 0 <= i < n, got {spec!r}") from None
    keep = [it for j, it in enumerate(items) if j % n == i]
    config.hook.pytest_deselected(items=[it for j, it in enumerate(items) if j % n != i])
    items[:] = keep


def pytest_collection_modifyitems(config, items):
    _shard(config, items)
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
