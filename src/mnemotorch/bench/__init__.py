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

#: ``mnemo bench SUITE -- [options]``: suite name -> (``module:function`` taking ``argv`` and
#: returning an exit code, one-line help). Each suite parses its own options.
BENCH_SUITES: dict[str, tuple[str, str]] = {
    "kernels": ("mnemotorch.bench.block_sparse:main", "GPU: block-sparse attention vs SDPA / FlexAttention"),
    "memory": ("mnemotorch.bench.neural_memory:main", "GPU: Titans neural memory (LMM) vs titans-pytorch; MAG model tokens/s; decode latency vs context"),
    "hebbian": ("mnemotorch.bench.hebbian_capacity:main", "Hebbian / delta-rule associative-memory capacity (CPU)"),
    "linear": ("mnemotorch.bench.linear_attention:main", "GPU: linear attention / BASED kernels vs fla and SDPA; batched decode"),
    "relative": ("mnemotorch.bench.relative:main", "GPU: fused relative-attention kernel vs the naive skew and dense SDPA (speed, peak memory)"),
    "routed": ("mnemotorch.bench.routed:main", "GPU: routing attention vs routing-transformer and SDPA; landmark long-context inference memory"),
}


def run_bench_suite(name: str, argv: list[str]) -> int:
    """Run the benchmark suite ``name`` with its own command-line options ``argv``."""
    if name not in BENCH_SUITES:
        raise ValueError(f"unknown bench suite {name!r}; choose one of {sorted(BENCH_SUITES)}")
    module, func = BENCH_SUITES[name][0].split(":")
    return int(getattr(importlib.import_module(module), func)(argv) or 0)


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".experiment", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
