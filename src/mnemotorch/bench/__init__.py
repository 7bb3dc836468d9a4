"""Benchmarks: the memory-quality experiment runner (``mnemo experiment``) and result reports.

    from mnemotorch.bench import run_experiment
    results = run_experiment("configs/mqar.yaml", quick=True, out_dir="runs/results")

Submodules are imported on first use, so ``import mnemotorch.bench`` stays cheap and
``python -m mnemotorch.bench.experiment`` does not import the module twice.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DEFAULT_OUT_DIR", "load_experiment_config", "main_experiment", "plan_cells", "run_experiment"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".experiment", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
