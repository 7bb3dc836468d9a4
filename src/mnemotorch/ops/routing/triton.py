"""Triton kernels of routing attention: nearest-centroid assignment.

``nearest_centroid_triton(x, centroids)`` -- ``argmax_c x . mu_c`` per token and head in one launch.
The reference (``reference.nearest_centroid``) forms the ``[n, H, C, D]`` elementwise product in
token chunks and sums it over ``D``: at the benchmark's 64K tokens, 16 heads, 128 centroids and
``D = 64`` that is 8.6e9 products written to and read back from memory (hundreds of launches and
tens of milliseconds on an H200). The kernel reads every routing vector once and keeps the scores
in registers.

Scores are fp32 dot products with exact fp32 products (``input_precision="ieee"``, no TF32), and
every token is computed by the same instruction sequence whatever the number of tokens in the call
(fixed launch parameters, no autotuning), so a token's cluster does not depend on the chunk it
arrives in -- the property the streaming invariant needs. Exact ties go to the lower centroid index,
as ``torch.argmax`` does. The reduction order over ``D`` differs from the reference's, so the two
may disagree on scores within a few fp32 ulps of a tie.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

#: Tokens per program and centroids per step (fixed: see the module docstring).
BLOCK_T = 64
BLOCK_C = 32


@triton.jit
def _nearest_centroid_kernel(
    X, MU, OUT,
    sxn, sxh, smh, smc, son, soh,
    N, C, D: tl.constexpr, BLOCK_D: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs_t = pid * BT + tl.arange(0, BT)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = offs_t < N
    d_ok = offs_d < D
    x = tl.load(X + offs_t[:, None].to(tl.int64) * sxn + h * sxh + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
    x = x.to(tl.float32)
    best = tl.full([BT], float("-inf"), tl.float32)
    best_idx = tl.zeros([BT], tl.int64)
    for c0 in range(0, C, BC):
        offs_c = c0 + tl.arange(0, BC)
        c_ok = offs_c < C
        mu = tl.load(MU + h * smh + offs_c[:, None] * smc + offs_d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(x, tl.trans(mu.to(tl.float32)), input_precision="ieee")
        s = tl.where(c_ok[None, :], s, float("-inf"))
        m, idx = tl.max(s, 1, return_indices=True, return_indices_tie_break_left=True)
        better = m > best  # strict: an equal score in a later step keeps the earlier (lower) index
        best_idx = tl.where(better, c0 + idx.to(tl.int64), best_idx)
        best = tl.where(better, m, best)
    tl.store(OUT + offs_t.to(tl.int64) * son + h * soh, best_idx, mask=t_ok)


def nearest_centroid_triton(x: Tensor, centroids: Tensor) -> Tensor:
    """``x [B, T, H, D]`` (float16 / bfloat16 / float32), ``centroids [H, C, D]`` -> ids ``int64 [B, T, H]``.

    CUDA, or the CPU under ``TRITON_INTERPRET=1`` (tests). No gradient (ids are integers).
    """
    b, t, h, d = x.shape
    if centroids.shape[0] != h or centroids.shape[2] != d:
        raise ValueError(f"nearest_centroid_triton: centroids must be [H={h}, C, D={d}], got {list(centroids.shape)}")
    out = torch.empty(b, t, h, dtype=torch.int64, device=x.device)
    n = b * t
    if n == 0:
        return out
    x = x.detach()
    # [B, T, H, D] -> [N, H, D] rows; a copy only when (B, T) cannot be merged or D is strided
    xf = x.reshape(n, h, d) if x.stride(-1) == 1 else x.contiguous().view(n, h, d)
    if xf.stride(-1) != 1:
        xf = xf.contiguous()
    mu = centroids.detach().to(torch.float32).contiguous()
    grid = (triton.cdiv(n, BLOCK_T), h)
    block_d = max(16, triton.next_power_of_2(d))
    _nearest_centroid_kernel[grid](
        xf, mu, out.view(n, h),
        xf.stride(0), xf.stride(1), mu.stride(0), mu.stride(1), h, 1,
        n, mu.shape[1], D=d, BLOCK_D=block_d, BT=BLOCK_T, BC=BLOCK_C,
        num_warps=4, num_stages=2,
    )
    return out


__all__ = ["nearest_centroid_triton"]
