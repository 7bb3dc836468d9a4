"""Causal sliding-window attention: ``sliding_window_attention(q, k, v, window)``.

Backends:

* ``"reference"`` -- the specification (``reference.py``): per-query window gather, float64-ready.
* ``"torch"`` -- PyTorch SDPA over query chunks with a banded mask: O(T * (W + chunk)) memory,
  the fast CPU path.
* ``"triton"`` -- Triton kernels (CUDA, or the CPU interpreter in tests): the list-free
  sliding-window kernels (``ops/block_sparse/swa_triton.py``) where ``MNEMO_SWA_KERNEL`` allows
  (default: on CUDA), else the block-sparse kernel with a cached sliding-window pattern.
* ``"auto"`` -- Triton on CUDA when the kernel supports the inputs and there are at least 16
  queries (prefill/training), otherwise ``"torch"``.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import check_backend, check_qkv
from .reference import sliding_window_attention_reference

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _sliding_window_sdpa(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float | None, chunk: int = 1024) -> Tensor:
    """SDPA over chunks of queries, each against the keys its window can reach (banded mask)."""
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if h != hkv:
        k = k.repeat_interleave(h // hkv, dim=2)
        v = v.repeat_interleave(h // hkv, dim=2)
    offset = tk - tq
    outs = []
    for s in range(0, tq, chunk):
        e = min(tq, s + chunk)
        lo = max(0, s + offset - window + 1)
        hi = e + offset
        qpos = torch.arange(s, e, device=q.device)[:, None] + offset
        kpos = torch.arange(lo, hi, device=q.device)[None, :]
        mask = (kpos <= qpos) & (kpos > qpos - window)
        o = F.scaled_dot_product_attention(
            q[:, s:e].transpose(1, 2), k[:, lo:hi].transpose(1, 2), v[:, lo:hi].transpose(1, 2), attn_mask=mask, scale=scale
        )
        outs.append(o.transpose(1, 2))
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


@lru_cache(maxsize=64)
def _cached_pattern(q_len: int, k_len: int, window: int, device: str):
    from ..block_sparse import sliding_window_pattern

    return sliding_window_pattern(q_len, window, k_len=k_len, device=device)


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float | None = None, backend: str = "auto") -> Tensor:
    """Each query attends to the last ``window`` keys up to and including its own position.

    Args:
        q: ``[B, Tq, H, D]``; query ``i`` sits at absolute key position ``Tk - Tq + i``.
        k: ``[B, Tk, Hkv, D]``.
        v: ``[B, Tk, Hkv, Dv]``.
        window: ``W >= 1``; key ``j`` is visible to query ``i`` iff ``i - W < j <= i``.
        scale: logit scale, default ``D ** -0.5``.
        backend: ``"auto"``, ``"reference"``, ``"torch"`` or ``"triton"`` (module docstring).

    Returns:
        ``[B, Tq, H, Dv]``.
    """
    check_qkv("sliding_window_attention", q, k, v)
    check_backend("sliding_window_attention", backend)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"sliding_window_attention: window must be an int >= 1, got {window!r}")
    if backend == "reference":
        return sliding_window_attention_reference(q, k, v, window, scale)
    kernel_ok = q.dtype in _KERNEL_DTYPES and v.shape[-1] == q.shape[-1] and 16 <= q.shape[-1] <= 256
    if backend == "auto":
        backend = "triton" if (q.is_cuda and kernel_ok and q.shape[1] >= 16) else "torch"
    if backend == "torch":
        return _sliding_window_sdpa(q, k, v, window, scale)
    from ..block_sparse import block_sparse_attention, swa_fast_path

    if kernel_ok and swa_fast_path(q):  # no pattern to build: the kernels compute the window's range
        from ..block_sparse.swa_triton import swa_attention_triton

        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        return swa_attention_triton(q, k, v, window, q.shape[-1] ** -0.5 if scale is None else float(scale))
    pattern = _cached_pattern(q.shape[1], k.shape[1], window, str(q.device))
    return block_sparse_attention(q, k, v, pattern, scale=scale, backend="triton")


__all__ = ["sliding_window_attention", "sliding_window_attention_reference"]
