"""Helpers shared by the list-free sliding-window / NA-1D kernel tests (tests/ops/test_swa_kernel.py,
tests/ops/test_na1d_kernel.py)."""

from __future__ import annotations


def rel(a, b) -> float:
    """Relative RMS error; absolute where the reference is (numerically) zero (dq, dk for window 1)."""
    den = b.double().norm().item()
    return ((a.double() - b.double()).norm() / (den if den > 1e-6 else 1.0)).item()


def tiles(bm: int, bn: int, fused, tma, one_loop: bool = False, delta: bool = False) -> dict:
    """Launch overrides for all three kernels: forward / dQ tiles BM x BN, dK/dV tiles BN keys x BM queries."""
    return dict(fwd=dict(BM=bm, BN=bn, warps=4, stages=1, tma=tma, one_loop=one_loop),
                dkdv=dict(BM=bn, BN=bm, warps=4, stages=1, fused_dq=fused, tma=tma, one_loop=one_loop),
                dq=dict(BM=bm, BN=bn, warps=4, stages=1, tma=tma, one_loop=one_loop, delta=delta))
