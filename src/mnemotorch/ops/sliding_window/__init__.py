"""Causal sliding-window attention: ``sliding_window_attention(q, k, v, window)``.

Only the reference backend exists so far; the block-sparse Triton kernel arrives with the
block-sparse attention issue and will be selected by ``backend="auto"`` on CUDA.
"""

from __future__ import annotations

from torch import Tensor

from ..checks import check_backend, check_qkv
from .reference import sliding_window_attention_reference


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float | None = None, backend: str = "auto") -> Tensor:
    """Each query attends to the last ``window`` keys up to and including its own position.

    Args:
        q: ``[B, Tq, H, D]``; query ``i`` sits at absolute key position ``Tk - Tq + i``.
        k: ``[B, Tk, Hkv, D]``.
        v: ``[B, Tk, Hkv, Dv]``.
        window: ``W >= 1``; key ``j`` is visible to query ``i`` iff ``i - W < j <= i``.
        scale: logit scale, default ``D ** -0.5``.
        backend: ``"auto"`` or ``"reference"``.

    Returns:
        ``[B, Tq, H, Dv]``.
    """
    check_qkv("sliding_window_attention", q, k, v)
    check_backend("sliding_window_attention", backend)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"sliding_window_attention: window must be an int >= 1, got {window!r}")
    if backend in ("triton", "torch"):
        raise NotImplementedError(f"sliding_window_attention: backend {backend!r} is not implemented yet; use 'auto' or 'reference'")
    return sliding_window_attention_reference(q, k, v, window, scale)


__all__ = ["sliding_window_attention", "sliding_window_attention_reference"]
