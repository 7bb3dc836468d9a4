"""Argument checks shared by the public ops (loud, early, naming the argument)."""

from __future__ import annotations

from torch import Tensor

BACKENDS = ("auto", "reference", "triton", "torch")


def check_qkv(fn: str, q: Tensor, k: Tensor, v: Tensor) -> None:
    """Check ``q [B, Tq, H, D]``, ``k [B, Tk, Hkv, D]``, ``v [B, Tk, Hkv, Dv]`` with H % Hkv == 0."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{fn}: {name} must have shape [batch, time, heads, head_dim], got {list(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{fn}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{fn}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"{fn}: batch/time/heads of q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} disagree")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{fn}: q and k head_dim differ ({q.shape[-1]} vs {k.shape[-1]})")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"{fn}: query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    if k.shape[1] < q.shape[1]:
        raise ValueError(
            f"{fn}: k has fewer positions ({k.shape[1]}) than q ({q.shape[1]}); queries are the last Tq of the Tk key positions"
        )


def check_backend(fn: str, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {BACKENDS}, got {backend!r}")
