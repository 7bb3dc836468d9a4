"""Triton kernels of routing attention: assignment, the layer's fused glue, packing, the packed layout.

``nearest_centroid_triton(x, centroids)`` -- ``argmax_c x . mu_c`` per token and head in one launch.
The reference (``reference.nearest_centroid``) forms the ``[n, H, C, D]`` elementwise product in
token chunks and sums it over ``D``: at the benchmark's 64K tokens, 16 heads, 128 centroids and
``D = 64`` that is 8.6e9 products written to and read back from memory (hundreds of launches and
tens of milliseconds on an H200). The kernel reads every routing vector once and keeps the scores
in registers.

Scores are fp32 products summed in fp32 (no TF32), one centroid at a time, and every token is computed
by the same instruction sequence whatever the number of tokens in the call (fixed launch parameters, no
autotuning), so a token's cluster does not depend on the chunk it arrives in -- the property the
streaming invariant needs. Exact ties go to the lower centroid index, as ``torch.argmax`` does. The
reduction order over ``D`` differs from the reference's, so the two may disagree on scores within a few
fp32 ulps of a tie. (Until 2026-11-27 the scores were an IEEE fp32 ``tl.dot``; its FMA lowering used 255
registers and spilled on sm_90 -- ``ptxas -v`` -- which is where the 0.10 ms of ``_route_assign_kernel``
in the 8K profile went, for 17 MB of input.)

The routing layer's fused glue (``FUSED_GLUE``): ``route_assign_triton`` (layer norm, nearest centroid,
commitment distances and the k-means statistics in one launch), ``route_commit_grad_triton`` (the
commitment loss's backward in one launch) and ``rotary_triton`` (RoPE, one launch each way). Then the
block-sparse path's row packing (``PackRows`` / ``UnpackRows``) and packed layout (``routed_layout_triton``).
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
def _argmax_centroid(x, MU, h, smh, smc, offs_d, d_ok, C, BT: tl.constexpr, BC: tl.constexpr):
    """Index of the highest-scoring centroid ``x · μ_c`` per row of ``x [BT, BLOCK_D]`` (fp32 products and
    sums), one centroid at a time in index order; ties go to the lowest index.

    Not ``tl.dot``: an IEEE fp32 dot has no tensor-core form, and its FMA lowering holds replicated operand
    tiles (255 registers and spills for ``BT = 64``, ``D = 64`` on sm_90); a multiply and a row sum per
    centroid keep ``x`` in its load layout. (``BC`` is unused, kept for the launch signature.)"""
    best = tl.full([BT], float("-inf"), tl.float32)
    best_idx = tl.zeros([BT], tl.int64)
    for c in range(0, C):
        mu = tl.load(MU + h * smh + c * smc + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        s = tl.sum(x * mu[None, :], 1)
        better = s > best  # strict: an equal score later keeps the earlier (lower) index
        best_idx = tl.where(better, c, best_idx)
        best = tl.where(better, s, best)
    return best_idx


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
    best_idx = _argmax_centroid(x, MU, h, smh, smc, offs_d, d_ok, C, BT, BC)
    tl.store(OUT + offs_t.to(tl.int64) * son + h * soh, best_idx, mask=t_ok)


def _kernel_centroids(centroids: Tensor) -> Tensor:
    """Centroids ``[H, C, D]`` as the kernels read them: detached, contiguous, in a float dtype the kernel
    converts to fp32 in registers (a bf16 module keeps bf16 centroids)."""
    mu = centroids.detach()
    if mu.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        mu = mu.to(torch.float32)
    return mu if mu.is_contiguous() else mu.contiguous()


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
    mu = _kernel_centroids(centroids)
    grid = (triton.cdiv(n, BLOCK_T), h)
    block_d = max(16, triton.next_power_of_2(d))
    _nearest_centroid_kernel[grid](
        xf, mu, out.view(n, h),
        xf.stride(0), xf.stride(1), mu.stride(0), mu.stride(1), h, 1,
        n, mu.shape[1], D=d, BLOCK_D=block_d, BT=BLOCK_T, BC=BLOCK_C,
        num_warps=4, num_stages=2,
    )
    return out




@triton.jit
def _argmax_centroid_mma(r, MU, h, smh, smc, offs_d, d_ok, C, BT: tl.constexpr, BC: tl.constexpr):
    """Index of the highest-scoring centroid ``r · μ_c`` per row of ``r [BT, BLOCK_D]`` (fp32), ties to the
    lowest index, with the scores on the tensor cores: ``r`` and ``μ`` split into fp16 pieces
    (``x = hi + lo`` to ~2^-22 relative; |r_d| <= sqrt(D), |μ_d| <= sqrt(D) are far inside fp16's range) and
    ``hi·hi + lo·hi + hi·lo`` accumulated in fp32, so a score carries the same ~1e-7 relative error as an
    fp32 dot product in another summation order. (fp16, not bf16: see the k-means statistics below.)"""
    r_hi = r.to(tl.float16)
    r_lo = (r - r_hi.to(tl.float32)).to(tl.float16)
    best = tl.full([BT], float("-inf"), tl.float32)
    best_idx = tl.zeros([BT], tl.int64)
    for c0 in range(0, C, BC):
        offs_c = c0 + tl.arange(0, BC)
        c_ok = offs_c < C
        mu = tl.load(MU + h * smh + offs_c[None, :] * smc + offs_d[:, None], mask=d_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        mu_hi = mu.to(tl.float16)
        mu_lo = (mu - mu_hi.to(tl.float32)).to(tl.float16)
        sc = tl.dot(r_hi, mu_hi, out_dtype=tl.float32)
        sc = tl.dot(r_lo, mu_hi, sc, out_dtype=tl.float32)
        sc = tl.dot(r_hi, mu_lo, sc, out_dtype=tl.float32)
        sc = tl.where(c_ok[None, :], sc, float("-inf"))
        m = tl.max(sc, 1)
        idx = tl.min(tl.where(sc == m[:, None], offs_c[None, :], C + BC), 1).to(tl.int64)
        better = m > best  # strict: a later chunk's equal score keeps the earlier (lower) index
        best_idx = tl.where(better, idx, best_idx)
        best = tl.where(better, m, best)
    return best_idx


@triton.jit
def _route_assign_kernel(
    X, MU, OUT, SQ, SUMS, CNTS,
    sxb, sxt, sxh, smh, smc, son, soh, ssn, ssh, s_sh, s_sc, s_ch, s_cc,
    N, T, C, eps, loss_coef, D: tl.constexpr, BLOCK_D: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    LOSS: tl.constexpr, STATS: tl.constexpr, TILES: tl.constexpr, ONE_CHUNK: tl.constexpr, MMA: tl.constexpr,
):
    """Scale-free layer norm of each raw vector (fp32, rounded to the input dtype as the unfused path's
    ``F.layer_norm`` output is), nearest centroid, (``LOSS``) ``loss_coef`` times the squared distance to
    it, and (``STATS``) the k-means sums and counts of the program's tokens added into ``SUMS [H, C, D]``
    and ``CNTS [H, C]`` (fp32 atomics).

    A program walks ``TILES`` tiles of ``BT`` tokens of one head. With ``ONE_CHUNK`` (``C <= BC``) the
    statistics of its tiles are summed in registers and added with one atomic per centroid and dim at the
    end (``TILES`` times fewer atomics on the few ``H·C·D`` addresses, whose contention dominated the
    kernel); otherwise each tile adds its own. ``MMA``: centroid scores on the tensor cores
    (``_argmax_centroid_mma``), else fp32 multiply-and-sum (``_argmax_centroid``)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    acc = tl.zeros([BC, BLOCK_D], tl.float32)
    cnt_acc = tl.zeros([BC], tl.float32)
    for j in range(TILES):
        offs_t = (pid * TILES + j) * BT + tl.arange(0, BT)
        t_ok = offs_t < N
        tb = offs_t.to(tl.int64) // T
        tt = offs_t.to(tl.int64) % T
        ptr = X + tb[:, None] * sxb + tt[:, None] * sxt + h * sxh + offs_d[None, :]
        x = tl.load(ptr, mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        mean = tl.sum(x, 1) / D
        xc = tl.where(d_ok[None, :], x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, 1) / D
        r = xc * (1.0 / tl.sqrt_rn(var + eps))[:, None]
        r = r.to(X.dtype.element_ty).to(tl.float32)
        if MMA:
            best_idx = _argmax_centroid_mma(r, MU, h, smh, smc, offs_d, d_ok, C, BT, BC)
        else:
            best_idx = _argmax_centroid(r, MU, h, smh, smc, offs_d, d_ok, C, BT, BC)
        tl.store(OUT + offs_t.to(tl.int64) * son + h * soh, best_idx, mask=t_ok)
        if LOSS:
            mu_b = tl.load(MU + h * smh + best_idx[:, None] * smc + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
            diff = tl.where(d_ok[None, :], r - mu_b.to(tl.float32), 0.0)
            tl.store(SQ + offs_t.to(tl.int64) * ssn + h * ssh, tl.sum(diff * diff, 1) * loss_coef, mask=t_ok)
        if STATS:
            # per centroid, the sum of its tokens' vectors: a one-hot [BC, BT] times r [BT, D] on the tensor cores
            # (fp16 operands, fp32 accumulation; the products 0 or 1 times a piece of r are exact). r is split
            # into two fp16 pieces, r = hi + lo up to 2^-22 |r| (|r| <= sqrt(D) is far inside fp16's range).
            # (fp16, not bf16: the interpreter's bf16 dot of values converted in registers is wrong.)
            tok_c = tl.where(t_ok, best_idx, -1).to(tl.int32)
            r_hi = r.to(tl.float16)
            r_lo = (r - r_hi.to(tl.float32)).to(tl.float16)
            if ONE_CHUNK:
                offs_c = tl.arange(0, BC)
                onehot = tl.where(offs_c[:, None] == tok_c[None, :], 1.0, 0.0)
                oh16 = onehot.to(tl.float16)
                acc = tl.dot(oh16, r_hi, acc, out_dtype=tl.float32)
                acc = tl.dot(oh16, r_lo, acc, out_dtype=tl.float32)
                cnt_acc += tl.sum(onehot, 1)
            else:
                for c0 in range(0, C, BC):
                    offs_c = c0 + tl.arange(0, BC)
                    onehot = tl.where(offs_c[:, None] == tok_c[None, :], 1.0, 0.0)
                    oh16 = onehot.to(tl.float16)
                    part = tl.dot(oh16, r_hi, out_dtype=tl.float32)
                    part = tl.dot(oh16, r_lo, part, out_dtype=tl.float32)
                    cnt = tl.sum(onehot, 1)
                    c_ok = (offs_c < C) & (cnt > 0)
                    tl.atomic_add(SUMS + h * s_sh + offs_c[:, None] * s_sc + offs_d[None, :], part, mask=c_ok[:, None] & d_ok[None, :], sem="relaxed")
                    tl.atomic_add(CNTS + h * s_ch + offs_c * s_cc, cnt, mask=c_ok, sem="relaxed")
    if STATS and ONE_CHUNK:
        offs_c = tl.arange(0, BC)
        c_ok = (offs_c < C) & (cnt_acc > 0)
        tl.atomic_add(SUMS + h * s_sh + offs_c[:, None] * s_sc + offs_d[None, :], acc, mask=c_ok[:, None] & d_ok[None, :], sem="relaxed")
        tl.atomic_add(CNTS + h * s_ch + offs_c * s_cc, cnt_acc, mask=c_ok, sem="relaxed")


#: Token tiles per program of ``_route_assign_kernel`` (statistics summed in registers across them) and whether
#: its centroid scores use the tensor cores; ``MNEMO_ROUTE_ASSIGN=simple`` restores one tile per program and the
#: fp32 multiply-and-sum scores (the launch measured before, for comparison on the GPU).
ASSIGN_TILES = 8


def _assign_launch() -> tuple[int, bool]:
    import os

    if os.environ.get("MNEMO_ROUTE_ASSIGN", "").lower() == "simple":
        return 1, False
    return ASSIGN_TILES, True


def route_assign_triton(
    x: Tensor, centroids: Tensor, eps: float = 1e-5, loss: bool = False, loss_coef: float = 1.0, stats: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor | None]:
    """Fused ``nearest_centroid(scale_free_layer_norm(x), centroids)`` on the raw vectors ``x [B, T, H, D]``
    (any strides with a unit last stride; e.g. a head slice of a projection), one launch.

    Returns ``ids int64 [B, T, H]`` and, with ``loss``, ``sq fp32 [B * T, H]``: ``loss_coef * ||r - mu_c(r)||^2``
    of every token and head (the commitment loss is ``sq.sum()`` with ``loss_coef = beta / (B T H)``), else
    ``None``. With ``stats = (sums fp32 [H, C, D], counts fp32 [H, C])`` (unit last stride for ``sums``) the
    call's k-means statistics (``kmeans_batch_stats`` of the normalised vectors) are added into them in place.
    No gradient.
    """
    b, t, h, d = x.shape
    if centroids.shape[0] != h or centroids.shape[2] != d:
        raise ValueError(f"route_assign_triton: centroids must be [H={h}, C, D={d}], got {list(centroids.shape)}")
    c = centroids.shape[1]
    if stats is not None:
        sums, counts = stats
        if sums.shape != (h, c, d) or counts.shape != (h, c) or sums.dtype != torch.float32 or counts.dtype != torch.float32 or sums.stride(-1) != 1:
            raise ValueError(f"route_assign_triton: stats must be fp32 sums [H, C, D] (unit last stride) and counts [H, C], got "
                             f"{list(sums.shape)} {sums.dtype} and {list(counts.shape)} {counts.dtype}")
    out = torch.empty(b, t, h, dtype=torch.int64, device=x.device)
    n = b * t
    sq = torch.empty(n, h, dtype=torch.float32, device=x.device) if loss else None
    if n == 0:
        return out, sq
    x = x.detach()
    if x.stride(-1) != 1:
        x = x.contiguous()
    mu = _kernel_centroids(centroids)
    sq_arg = sq if sq is not None else out
    sums, counts = stats if stats is not None else (out, out)
    tiles, mma = _assign_launch()
    tiles = max(1, min(tiles, triton.cdiv(n, BLOCK_T)))
    bc = max(16, min(BLOCK_C, triton.next_power_of_2(c)))
    grid = (triton.cdiv(n, BLOCK_T * tiles), h)
    _route_assign_kernel[grid](
        x, mu, out.view(n, h), sq_arg, sums, counts,
        x.stride(0), x.stride(1), x.stride(2), mu.stride(0), mu.stride(1), h, 1, h, 1,
        sums.stride(0), sums.stride(1) if sums.ndim > 1 else 0, counts.stride(0), counts.stride(1) if counts.ndim > 1 else 0,
        n, t, c, float(eps), float(loss_coef), D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BT=BLOCK_T, BC=bc,
        LOSS=loss, STATS=stats is not None, TILES=tiles, ONE_CHUNK=c <= bc, MMA=mma, num_warps=4, num_stages=2,
    )
    return out, sq


@triton.jit
def _route_commit_bwd_kernel(
    X, MU, IDS, G, GX,
    sxb, sxt, sxh, smh, smc, sin_, sih,
    N, T, H, eps, coef, D: tl.constexpr, BLOCK_D: tl.constexpr, BT: tl.constexpr,
):
    """Gradient of ``coef * sum ||LN(x) - sg(mu_c)||^2`` (``coef = beta / (B T H)``) times the scalar ``G``
    with respect to the raw vectors: ``dL/dr = 2 coef G (r - mu_c)`` through the scale-free layer norm's
    backward ``rstd * (g - mean(g) - xhat * mean(g * xhat))``, all in fp32 (``r`` rounded as the forward's)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs_t = pid * BT + tl.arange(0, BT)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = offs_t < N
    d_ok = offs_d < D
    m = t_ok[:, None] & d_ok[None, :]
    tb = offs_t.to(tl.int64) // T
    tt = offs_t.to(tl.int64) % T
    x = tl.load(X + tb[:, None] * sxb + tt[:, None] * sxt + h * sxh + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(x, 1) / D
    xc = tl.where(d_ok[None, :], x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, 1) / D
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    xhat = xc * rstd[:, None]
    r = xhat.to(X.dtype.element_ty).to(tl.float32)
    ids = tl.load(IDS + offs_t.to(tl.int64) * sin_ + h * sih, mask=t_ok, other=0)
    mu_b = tl.load(MU + h * smh + ids[:, None] * smc + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
    g = tl.load(G).to(tl.float32) * (2.0 * coef)
    gr = tl.where(d_ok[None, :], g * (r - mu_b), 0.0)
    m1 = tl.sum(gr, 1) / D
    m2 = tl.sum(gr * xhat, 1) / D
    gx = rstd[:, None] * (gr - m1[:, None] - xhat * m2[:, None])
    rows = offs_t.to(tl.int64) * H + h
    tl.store(GX + rows[:, None] * D + offs_d[None, :], gx.to(GX.dtype.element_ty), mask=m)


def route_commit_grad_triton(x: Tensor, centroids: Tensor, ids: Tensor, g: Tensor, coef: float, eps: float = 1e-5) -> Tensor:
    """``d/dx [g * coef * sum ||scale_free_layer_norm(x) - sg(centroids[ids])||^2]`` for ``x [B, T, H, D]`` (unit
    last stride), ``ids [B, T, H]`` and the device scalar ``g`` (read on the device: no host sync), one launch.
    Returns a contiguous ``[B, T, H, D]`` tensor in ``x``'s dtype."""
    b, t, h, d = x.shape
    gx = torch.empty(b, t, h, d, dtype=x.dtype, device=x.device)
    n = b * t
    if n == 0:
        return gx
    if x.stride(-1) != 1:
        x = x.contiguous()
    mu = _kernel_centroids(centroids)
    ids2 = ids.reshape(n, h)
    _route_commit_bwd_kernel[(triton.cdiv(n, BLOCK_T), h)](
        x, mu, ids2, g.reshape(()), gx,
        x.stride(0), x.stride(1), x.stride(2), mu.stride(0), mu.stride(1), ids2.stride(0), ids2.stride(1),
        n, t, h, float(eps), float(coef), D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BT=BLOCK_T,
        num_warps=4, num_stages=2,
    )
    return gx


# ---------------------------------------------------------------------------------------------
# rotary position embedding of the routing layer's fused glue: one launch forward, one backward
#
# ``mnemotorch.ops.rotary.apply_rotary`` is five elementwise launches over [B, T, H, D] (neg, cat, two
# broadcast multiplies, add) and about seven in its backward. These kernels read the vectors once and
# write them once. Both directions compute in fp32 and round once to the input dtype. (An earlier version
# repeated apply_rotary's intermediate roundings to be bit-identical to it in bf16; on an H100 it still
# differed in the last bit for ~23% of the elements, so it was dropped: the kernel is checked against
# float64 instead, tests/gpu/test_routing_gpu.py.)


@triton.jit
def _rotate_halves(xp, COS, SIN, tt, sct, offs, m, HALF: tl.constexpr, INVERSE: tl.constexpr):
    """RoPE of a ``[BT, HALF]`` pair of half-rows at ``xp`` / ``xp + HALF`` (fp32), or (``INVERSE``) its
    transpose, the backward's; tables ``COS, SIN [T, 2 * HALF]``, rows ``tt``."""
    x1 = tl.load(xp, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF, mask=m, other=0.0).to(tl.float32)
    cp = tt[:, None].to(tl.int64) * sct + offs[None, :]
    c1 = tl.load(COS + cp, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(COS + cp + HALF, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + cp, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + cp + HALF, mask=m, other=0.0).to(tl.float32)
    if INVERSE:
        # the transpose of the rotation: dx1 = g1 cos1 + g2 sin2, dx2 = g2 cos2 - g1 sin1
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        # x cos + rotate_half(x) sin, rotate_half(x) = [-x2, x1]
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    return y1, y2


@triton.jit
def _rotary_kernel(
    X, COS, SIN, Y, sxb, sxt, sxh, sct, T, H,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BT: tl.constexpr, INVERSE: tl.constexpr,
):
    # one program: BT positions of one (batch row, head); the tables' rows are shared by the heads (L2)
    tt = tl.program_id(0) * BT + tl.arange(0, BT)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs = tl.arange(0, BLOCK_HALF)
    m = (tt < T)[:, None] & (offs < HALF)[None, :]
    xp = X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + tt[:, None].to(tl.int64) * sxt + offs[None, :]
    y1, y2 = _rotate_halves(xp, COS, SIN, tt, sct, offs, m, HALF, INVERSE)
    dt = Y.dtype.element_ty
    # Y: contiguous [B, T, H, 2 * HALF]
    yp = Y + ((b.to(tl.int64) * T + tt[:, None].to(tl.int64)) * H + h) * (2 * HALF) + offs[None, :]
    tl.store(yp, y1.to(dt), mask=m)
    tl.store(yp + HALF, y2.to(dt), mask=m)


_ROTARY_TOKENS = 64


def _rotary_launch(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    b, t, h, d = x.shape
    y = torch.empty(b, t, h, d, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    if x.stride(-1) != 1:
        x = x.contiguous()
    half = d // 2
    _rotary_kernel[(triton.cdiv(t, _ROTARY_TOKENS), b * h)](
        x, cos, sin, y, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), t, h,
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BT=_ROTARY_TOKENS, INVERSE=inverse, num_warps=4,
    )
    return y


class Rotary(torch.autograd.Function):
    """``Rotary.apply(x, cos, sin)``: ``apply_rotary(x, cos, sin)`` in one launch (backward: one launch).
    ``x [B, T, H, D]`` (unit last stride), tables ``cos, sin [T, D]`` in ``x``'s dtype, unit last stride, no gradient."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotary_launch(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return _rotary_launch(g, cos, sin, inverse=True), None, None


@triton.jit
def _rotary_commit_bwd_kernel(
    G, Q, COS, SIN, MU, IDS, GL, Y,
    sgb, sgt, sgh, sqb, sqt, sqh, sct, smh, smc, sib, sit, sih,
    T, H, HL, eps, coef,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BT: tl.constexpr, COMMIT: tl.constexpr,
):
    """The backward of ``(rotary(q), commitment loss of q's routing heads)`` in one pass: the transposed
    rotation of the incoming gradient ``G`` plus, for heads ``h >= HL``, ``GL`` times the commitment loss's
    gradient with respect to the raw ``q`` (``_route_commit_bwd_kernel``'s arithmetic on the two halves of
    ``D``), summed in fp32 and rounded once. One program: ``BT`` positions of one (batch row, head)."""
    tt = tl.program_id(0) * BT + tl.arange(0, BT)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs = tl.arange(0, BLOCK_HALF)
    h_ok = offs < HALF
    m = (tt < T)[:, None] & h_ok[None, :]
    gp = G + b.to(tl.int64) * sgb + h.to(tl.int64) * sgh + tt[:, None].to(tl.int64) * sgt + offs[None, :]
    y1, y2 = _rotate_halves(gp, COS, SIN, tt, sct, offs, m, HALF, True)
    if COMMIT and h >= HL:  # (not COMMIT: the loss got no gradient)
        D = 2 * HALF
        qp = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + tt[:, None].to(tl.int64) * sqt + offs[None, :]
        x1 = tl.load(qp, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(qp + HALF, mask=m, other=0.0).to(tl.float32)
        mean = (tl.sum(x1, 1) + tl.sum(x2, 1)) / D
        xc1 = tl.where(h_ok[None, :], x1 - mean[:, None], 0.0)
        xc2 = tl.where(h_ok[None, :], x2 - mean[:, None], 0.0)
        var = (tl.sum(xc1 * xc1, 1) + tl.sum(xc2 * xc2, 1)) / D
        rstd = 1.0 / tl.sqrt_rn(var + eps)
        xh1 = xc1 * rstd[:, None]
        xh2 = xc2 * rstd[:, None]
        r1 = xh1.to(Q.dtype.element_ty).to(tl.float32)
        r2 = xh2.to(Q.dtype.element_ty).to(tl.float32)
        hr = h - HL
        ids = tl.load(IDS + b.to(tl.int64) * sib + tt.to(tl.int64) * sit + hr * sih, mask=tt < T, other=0)
        mp = MU + hr * smh + ids[:, None] * smc + offs[None, :]
        mu1 = tl.load(mp, mask=m, other=0.0).to(tl.float32)
        mu2 = tl.load(mp + HALF, mask=m, other=0.0).to(tl.float32)
        gs = tl.load(GL).to(tl.float32) * (2.0 * coef)
        gr1 = tl.where(h_ok[None, :], gs * (r1 - mu1), 0.0)
        gr2 = tl.where(h_ok[None, :], gs * (r2 - mu2), 0.0)
        m1 = (tl.sum(gr1, 1) + tl.sum(gr2, 1)) / D
        m2 = (tl.sum(gr1 * xh1, 1) + tl.sum(gr2 * xh2, 1)) / D
        y1 += rstd[:, None] * (gr1 - m1[:, None] - xh1 * m2[:, None])
        y2 += rstd[:, None] * (gr2 - m1[:, None] - xh2 * m2[:, None])
    dt = Y.dtype.element_ty
    yp = Y + ((b.to(tl.int64) * T + tt[:, None].to(tl.int64)) * H + h) * (2 * HALF) + offs[None, :]
    tl.store(yp, y1.to(dt), mask=m)
    tl.store(yp + HALF, y2.to(dt), mask=m)


class RotaryCommit(torch.autograd.Function):
    """``RotaryCommit.apply(q, cos, sin, centroids, ids, sq, coef, eps, hl)`` -> ``(rotary(q), loss)`` with
    ``loss = sq.sum()`` the commitment loss of ``q[:, :, hl:]`` (``sq``: ``route_assign_triton``'s scaled
    squared distances): forward one rotary launch; backward ONE launch for both gradients into ``q``
    (the separate path runs the rotary backward, the commitment backward and an add)."""

    @staticmethod
    def forward(ctx, q, cos, sin, centroids, ids, sq, coef, eps, hl):
        ctx.set_materialize_grads(False)  # an unused loss: no zeros made, the kernel skips its gradient
        mu = _kernel_centroids(centroids)
        ctx.save_for_backward(q, cos, sin, mu, ids)
        ctx.coef, ctx.eps, ctx.hl = coef, eps, hl
        return _rotary_launch(q, cos, sin, inverse=False), sq.sum().to(q.dtype)

    @staticmethod
    def backward(ctx, g, gl):
        q, cos, sin, mu, ids = ctx.saved_tensors
        b, t, h, d = q.shape
        if g is None:
            g = torch.zeros_like(q)
        # the kernel takes any strides but the last, which must be 1: an incoming gradient may have another
        # (the masked-SDPA path under SDPA's math kernel hands the keys' gradient over as the transpose of a
        # [B, H, D, T] product, last stride T; read as 1 it gave a wrong input gradient, 0.126 on an H100)
        g = _unit(g)
        dq = torch.empty(b, t, h, d, dtype=q.dtype, device=q.device)
        if dq.numel():
            half = d // 2
            _rotary_commit_bwd_kernel[(triton.cdiv(t, _ROTARY_TOKENS), b * h)](
                g, q, cos, sin, mu, ids, g if gl is None else gl.reshape(()), dq,
                g.stride(0), g.stride(1), g.stride(2), q.stride(0), q.stride(1), q.stride(2), cos.stride(0),
                mu.stride(0), mu.stride(1), ids.stride(0), ids.stride(1), ids.stride(2),
                t, h, ctx.hl, float(ctx.eps), float(ctx.coef),
                HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BT=_ROTARY_TOKENS, COMMIT=gl is not None, num_warps=4,
            )
        return dq, None, None, None, None, None, None, None, None


def rotary_commit_triton(q: Tensor, cos: Tensor, sin: Tensor, centroids: Tensor, ids: Tensor, sq: Tensor, coef: float,
                         eps: float, hl: int) -> tuple[Tensor, Tensor]:
    """``(rotary_triton(q, cos, sin), commitment loss of q[:, :, hl:])`` with one backward launch for both (see
    :class:`RotaryCommit`). ``q [B, T, H, D]`` (unit last stride), ``ids [B, T, H - hl]``, ``sq`` from
    ``route_assign_triton(q[:, :, hl:], centroids, eps, loss=True, loss_coef=coef)``."""
    if q.ndim != 4 or q.shape[-1] % 2 or cos.shape != (q.shape[1], q.shape[-1]) or sin.shape != cos.shape:
        raise ValueError(f"rotary_commit_triton: needs q [B, T, H, D even] and cos, sin [T, D], got {list(q.shape)}, {list(cos.shape)}")
    cos = cos.to(q.dtype)
    sin = sin.to(q.dtype)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    if q.stride(-1) != 1:
        q = q.contiguous()
    return RotaryCommit.apply(q, cos, sin, centroids, ids, sq, coef, eps, hl)


def rotary_triton(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``mnemotorch.ops.rotary.apply_rotary(x, cos, sin)`` as one Triton launch (and one in the backward):
    ``x [B, T, H, D]`` (float16 / bfloat16 / float32, ``D`` even, unit last stride), ``cos, sin [T, D]``.
    Computes in fp32 and rounds once to ``x``'s dtype (``apply_rotary`` rounds each product and the sum, so in
    16-bit the two differ in the last bit for some elements)."""
    if x.ndim != 4 or x.shape[-1] % 2 or cos.shape != (x.shape[1], x.shape[-1]) or sin.shape != cos.shape:
        raise ValueError(f"rotary_triton: needs x [B, T, H, D even] and cos, sin [T, D], got {list(x.shape)}, {list(cos.shape)}, {list(sin.shape)}")
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return Rotary.apply(x, cos, sin)


# ---------------------------------------------------------------------------------------------
# packing tokens into the packed order and back (the block-sparse path's gathers), row kernels
#
# ``src [n_rows]``: the token (``(b * T + t) * H + h``) of every packed row, -1 for padding rows;
# ``rows [B * T * H]``: the packed row of every token. Packing is a gather over packed rows (padding
# rows get zeros), unpacking a gather over tokens; each is the other's backward.


@triton.jit
def _pack_kernel(
    SRC, X, Y, OX, OY, n_rows, T, H, sxb, sxt, sxh, syb, syt, syh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BR: tl.constexpr, TWO: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    ok = rows < n_rows
    s = tl.load(SRC + rows, mask=ok, other=-1)
    valid = s >= 0
    tok = tl.where(valid, s, 0)
    hh = tok % H
    bt = tok // H
    tt = bt % T
    bb = bt // T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    lm = valid[:, None] & d_ok[None, :]
    sm = ok[:, None] & d_ok[None, :]
    x = tl.load(X + bb[:, None] * sxb + tt[:, None] * sxt + hh[:, None] * sxh + offs_d[None, :], mask=lm, other=0.0)
    tl.store(OX + rows[:, None] * D + offs_d[None, :], x, mask=sm)
    if TWO:
        y = tl.load(Y + bb[:, None] * syb + tt[:, None] * syt + hh[:, None] * syh + offs_d[None, :], mask=lm, other=0.0)
        tl.store(OY + rows[:, None] * D + offs_d[None, :], y, mask=sm)


@triton.jit
def _unpack_kernel(
    ROWS, P, PA, Q, OX, OY, n_tok,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BR: tl.constexpr, TWO: tl.constexpr, ADD: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    ok = tok < n_tok
    r = tl.load(ROWS + tok, mask=ok, other=0)
    offs_d = tl.arange(0, BLOCK_D)
    m = ok[:, None] & (offs_d < D)[None, :]
    x = tl.load(P + r[:, None] * D + offs_d[None, :], mask=m, other=0.0)
    if ADD:  # a second packed tensor summed into the first (shared Q/K: the query and key gradients)
        x = (x.to(tl.float32) + tl.load(PA + r[:, None] * D + offs_d[None, :], mask=m, other=0.0).to(tl.float32)).to(OX.dtype.element_ty)
    tl.store(OX + tok[:, None] * D + offs_d[None, :], x, mask=m)
    if TWO:
        y = tl.load(Q + r[:, None] * D + offs_d[None, :], mask=m, other=0.0)
        tl.store(OY + tok[:, None] * D + offs_d[None, :], y, mask=m)


_PACK_ROWS = 64


def _pack_launch(src: Tensor, xs: list[Tensor], n_rows: int) -> list[Tensor]:
    """Packed copies ``[n_rows, D]`` of one or two ``[B, T, H, D]`` tensors (unit last stride)."""
    outs = [x.new_empty(n_rows, x.shape[-1]) for x in xs]
    x0 = xs[0]
    y, oy = (xs[1], outs[1]) if len(xs) > 1 else (x0, outs[0])
    _, t, h, d = x0.shape
    _pack_kernel[(triton.cdiv(n_rows, _PACK_ROWS),)](
        src, x0, y, outs[0], oy, n_rows, t, h, *x0.stride()[:3], *y.stride()[:3],
        D=d, BLOCK_D=triton.next_power_of_2(d), BR=_PACK_ROWS, TWO=len(xs) > 1, num_warps=4,
    )
    return outs


def _unpack_launch(rows: Tensor, ps: list[Tensor], shape: tuple[int, ...], add: Tensor | None = None) -> list[Tensor]:
    """Per token, its packed row of one or two ``[n_rows, D]`` tensors, as contiguous ``shape`` tensors;
    ``add`` (``[n_rows, D]``): summed into the first one's rows."""
    outs = [p.new_empty(shape) for p in ps]
    n_tok = rows.numel()
    d = shape[-1]
    q, oy = (ps[1], outs[1]) if len(ps) > 1 else (ps[0], outs[0])
    _unpack_kernel[(triton.cdiv(n_tok, _PACK_ROWS),)](
        rows, ps[0], ps[0] if add is None else add, q, outs[0], oy, n_tok,
        D=d, BLOCK_D=triton.next_power_of_2(d), BR=_PACK_ROWS, TWO=len(ps) > 1, ADD=add is not None, num_warps=4,
    )
    return outs


def _unit(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class PackRows(torch.autograd.Function):
    """``pack(src, rows, n_rows, alias, *xs)``: one or two ``[B, T, H, D]`` tensors -> ``[n_rows, D]`` packed copies.

    ``alias=True`` (shared Q/K: the packed queries are the keys too) also returns, second, a view of the first
    copy to pass as the keys: its gradient then reaches the backward separately and the unpacking gather
    sums the two (one pass) instead of autograd adding two packed gradients first."""

    @staticmethod
    def forward(ctx, src, rows, n_rows, alias, *xs):
        ctx.save_for_backward(rows)
        ctx.shapes = [tuple(x.shape) for x in xs]
        ctx.alias = alias
        outs = _pack_launch(src, [_unit(x) for x in xs], n_rows)
        if alias:
            outs.insert(1, outs[0].view(outs[0].shape))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        (rows,) = ctx.saved_tensors
        add = None
        if ctx.alias:
            add = _unit(grads[1]).contiguous()
            grads = (grads[0], *grads[2:])
        gs = [g.contiguous() for g in grads]
        if len(set(ctx.shapes)) == 1:
            outs = _unpack_launch(rows, gs, ctx.shapes[0], add)
        else:
            outs = [_unpack_launch(rows, [g], s, add if i == 0 else None)[0] for i, (g, s) in enumerate(zip(gs, ctx.shapes))]
        return (None, None, None, None, *outs)


class UnpackRows(torch.autograd.Function):
    """``unpack(src, rows, p, shape)``: the packed ``[n_rows, D]`` output -> ``[B, T, H, D]`` token order."""

    @staticmethod
    def forward(ctx, src, rows, p, shape):
        ctx.save_for_backward(src)
        ctx.n_rows = p.shape[0]
        return _unpack_launch(rows, [p.contiguous()], tuple(shape))[0]

    @staticmethod
    def backward(ctx, g):
        (src,) = ctx.saved_tensors
        return None, None, _pack_launch(src, [_unit(g)], ctx.n_rows)[0], None


# ---------------------------------------------------------------------------------------------
# the packed layout of the block-sparse path (ops/routing/block_sparse.py), in a few launches
#
# The torch builder there (``_routed_layout_torch``) is the specification: these kernels compute the
# same tensors. Per side (queries, keys): ``torch.sort(..., stable=True)`` of the cluster ids of every
# (batch row, head) group, then
#   _segments_kernel  one program per group: scan the sorted ids for segment starts and padding;
#                     local packed row of every token, padded group length, longest segment;
#   (host sync: packed lengths, longest segment)
#   _rows_kernel      per token: its packed row (global), the token-order row map, the query rows'
#                     key intervals [lo, hi) (shared: the segment start and row + 1; separate: binary
#                     searches in the keys' sorted ids) and those of the padding rows after it;
# then _qblock_kernel (per query tile: tile ranges, counts, lists, generic mask tiles) and
# _kblock_kernel (per key tile: the transposed lists by binary search over the per-tile arrays).


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _segments_kernel(SC, s_b, s_h, s_t, DEST, LOSTART, STATS, n, G, H, ALIGN, BLOCK: tl.constexpr):
    g = tl.program_id(0)
    b = g // H
    h = g % H
    base = SC + b.to(tl.int64) * s_b + h.to(tl.int64) * s_h
    out = g.to(tl.int64) * n
    carry_first = tl.full([BLOCK], -1, tl.int64)
    carry_extra = tl.zeros([BLOCK], tl.int64)
    maxseg = tl.zeros([BLOCK], tl.int64)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK).to(tl.int64)
        ok = i < n
        c = tl.load(base + i * s_t, mask=ok, other=0)
        cp = tl.load(base + (i - 1) * s_t, mask=ok & (i > 0), other=0)
        cn = tl.load(base + (i + 1) * s_t, mask=(i + 1) < n, other=0)
        new = (i == 0) | (c != cp)
        last = ok & (((i + 1) == n) | (c != cn))
        first = tl.associative_scan(tl.where(new & ok, i, -1), 0, _max_combine)
        first = tl.maximum(first, carry_first)
        rank = i - first
        pad = tl.where(last, (ALIGN - (rank + 1) % ALIGN) % ALIGN, 0)
        incl = tl.cumsum(pad, 0)
        dest = i + carry_extra + incl - pad
        tl.store(DEST + out + i, dest, mask=ok)
        tl.store(LOSTART + out + i, dest - rank, mask=ok)
        maxseg = tl.maximum(maxseg, tl.where(last, rank + 1 + pad, 0))
        carry_first = tl.zeros([BLOCK], tl.int64) + tl.max(tl.where(ok, first, -1), 0)
        carry_extra = carry_extra + tl.sum(pad, 0)
    tl.store(STATS + g, n + tl.max(carry_extra, 0))
    tl.store(STATS + G + g, tl.max(maxseg, 0))


@triton.jit
def _group_offset(TOTALS, g, GB: tl.constexpr):
    """Packed start of group ``g``: the sum of the padded lengths of the groups before it."""
    acc = tl.zeros([GB], tl.int64)
    for s in range(0, g, GB):
        j = s + tl.arange(0, GB)
        acc += tl.load(TOTALS + j, mask=j < g, other=0)
    return tl.sum(acc, 0)


@triton.jit
def _lower_bound(KSC, KPERM, kbase_c, kbase_p, s_t, p_t, n_k, target, lo0, NSTEPS, BLOCK: tl.constexpr):
    """First sorted key index j in [0, n_k) with ``ksc[j] * n_k + kperm[j] >= target`` (per lane)."""
    lo = lo0
    hi = tl.zeros([BLOCK], tl.int64) + n_k
    for _ in range(NSTEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        safe = tl.minimum(mid, n_k - 1)
        km = tl.load(KSC + kbase_c + safe * s_t, mask=active, other=0).to(tl.int64) * n_k
        km += tl.load(KPERM + kbase_p + safe * p_t, mask=active, other=0)
        right = active & (km < target)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & (km >= target), mid, hi)
    return lo


@triton.jit
def _rows_kernel(
    SC, PERM, s_b, s_h, s_t, p_b, p_h, p_t, DEST, LOSTART, STATS, ROWMAP, SRC, ROW_LO, ROW_HI,
    KSC, KPERM, ks_b, ks_h, ks_t, kp_b, kp_h, kp_t, KLOSTART, KSTATS,
    n, n_k, first_pos, G, H, ALIGN, NSTEPS, N_ROWS,
    ROWS: tl.constexpr, CANONICAL: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, GB: tl.constexpr, PB: tl.constexpr,
):
    g = tl.program_id(0)
    b = g // H
    h = g % H
    i = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = i < n
    cbase = b.to(tl.int64) * s_b + h.to(tl.int64) * s_h
    pbase = b.to(tl.int64) * p_b + h.to(tl.int64) * p_h
    off = _group_offset(STATS, g, GB)
    dest = tl.load(DEST + g.to(tl.int64) * n + i, mask=ok, other=0)
    d = off + dest
    ok = ok & (d < N_ROWS)  # static sizes: only ids outside [0, C) could exceed them (a broken contract)
    perm = tl.load(PERM + pbase + i * p_t, mask=ok, other=0)
    tok = (b.to(tl.int64) * n + perm) * H + h
    tl.store(ROWMAP + tok, d, mask=ok)
    tl.store(SRC + d, tok, mask=ok)
    if ROWS:
        lostart = tl.load(LOSTART + g.to(tl.int64) * n + i, mask=ok, other=0)
        c = tl.load(SC + cbase + i * s_t, mask=ok, other=0).to(tl.int64)
        cn = tl.load(SC + cbase + (i + 1) * s_t, mask=(i + 1) < n, other=0).to(tl.int64)
        last = ok & (((i + 1) == n) | (c != cn))
        rank = dest - lostart
        pad = tl.where(last, (ALIGN - (rank + 1) % ALIGN) % ALIGN, 0)
        if CANONICAL:
            lo = off + lostart
            hi = d + 1
        else:
            kcb = b.to(tl.int64) * ks_b + h.to(tl.int64) * ks_h
            kpb = b.to(tl.int64) * kp_b + h.to(tl.int64) * kp_h
            zero = tl.zeros([BLOCK], tl.int64)
            lo_rel = _lower_bound(KSC, KPERM, kcb, kpb, ks_t, kp_t, n_k, c * n_k, zero, NSTEPS, BLOCK)
            if CAUSAL:  # keys at positions <= the query's: first key > (c, pos)
                hi_rel = _lower_bound(KSC, KPERM, kcb, kpb, ks_t, kp_t, n_k, c * n_k + first_pos + perm + 1, lo_rel, NSTEPS, BLOCK)
            else:
                hi_rel = _lower_bound(KSC, KPERM, kcb, kpb, ks_t, kp_t, n_k, (c + 1) * n_k, lo_rel, NSTEPS, BLOCK)
            koff = _group_offset(KSTATS, g, GB)
            kend = koff + tl.load(KSTATS + g)
            kstart = tl.load(KLOSTART + g.to(tl.int64) * n_k + tl.minimum(lo_rel, n_k - 1), mask=ok, other=0)
            lo = tl.where(lo_rel < n_k, koff + kstart, kend)
            hi = lo + (hi_rel - lo_rel)
        tl.store(ROW_LO + d, lo, mask=ok)
        tl.store(ROW_HI + d, hi, mask=ok)
        # padding rows after a segment's last token: same interval (shared + causal: their own prefix). Most
        # blocks of rows hold no segment end (segments are ~T / C rows long): they skip the loop, whose
        # masked stores were most of this kernel's time.
        pp = tl.arange(0, PB)
        n_last = tl.sum(last.to(tl.int32), 0)
        for p0 in range(1, tl.where(n_last > 0, ALIGN, 1), PB):
            p = p0 + pp
            m = last[:, None] & (p[None, :] <= pad[:, None]) & ((d[:, None] + p[None, :]) < N_ROWS)
            rows = d[:, None] + p[None, :]
            tl.store(ROW_LO + rows, lo[:, None] + 0 * p[None, :], mask=m)
            tl.store(SRC + rows, -1 + 0 * rows, mask=m)
            if CANONICAL:
                tl.store(ROW_HI + rows, rows + 1, mask=m)
            else:
                tl.store(ROW_HI + rows, hi[:, None] + 0 * p[None, :], mask=m)


@triton.jit
def _qblock_kernel(
    ROW_LO, ROW_HI, KB_START, F_END, P_END, FULL_CNT, PART_CNT, STATS,
    FULL_IDX, PART_IDX, PART_TILE, TILE_BASE, TILES,
    W_F, W_P,
    BM: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr,
    LISTS: tl.constexpr, CANONICAL: tl.constexpr, COUNTS: tl.constexpr, WIDTHS: tl.constexpr,
):
    qb = tl.program_id(0)
    q0 = qb.to(tl.int64) * BM
    lo = tl.load(ROW_LO + q0)
    kb_start = lo // BN
    f_end = tl.load(ROW_HI + q0) // BN
    p_end = (tl.load(ROW_HI + q0 + BM - 1) + BN - 1) // BN
    n_full = f_end - kb_start
    n_part = p_end - f_end
    if COUNTS:
        tl.store(KB_START + qb, kb_start)
        tl.store(F_END + qb, f_end)
        tl.store(P_END + qb, p_end)
        tl.store(FULL_CNT + qb, n_full.to(tl.int32))
        tl.store(PART_CNT + qb, n_part.to(tl.int32))
        if WIDTHS:
            tl.atomic_max(STATS + 0, n_full)
            tl.atomic_max(STATS + 1, n_part)
    if LISTS:
        w = tl.arange(0, BW)
        for w0 in range(0, W_F, BW):
            j = w0 + w
            tl.store(FULL_IDX + qb.to(tl.int64) * W_F + j, tl.where(j < n_full, kb_start + j, -1).to(tl.int32), mask=j < W_F)
        if CANONICAL:
            tile0 = n_part * 0
        else:
            tile0 = tl.load(TILE_BASE + qb)
        for w0 in range(0, W_P, BW):
            j = w0 + w
            valid = j < n_part
            tl.store(PART_IDX + qb.to(tl.int64) * W_P + j, tl.where(valid, f_end + j, -1).to(tl.int32), mask=j < W_P)
            tl.store(PART_TILE + qb.to(tl.int64) * W_P + j, tl.where(valid, tile0 + j, -1).to(tl.int32), mask=j < W_P)
        if not CANONICAL:
            # the mask tile of each partial key tile: column < hi of the row (lo <= every column here)
            r = tl.arange(0, BM)
            cols = tl.arange(0, BN)
            hi_rows = tl.load(ROW_HI + q0 + r)
            for j in range(0, n_part.to(tl.int32)):
                kb = f_end + j
                tile = ((kb * BN + cols[None, :]) < hi_rows[:, None]).to(tl.int8)
                tl.store(TILES + (tile0 + j) * (BM * BN) + r[:, None] * BN + cols[None, :], tile)


@triton.jit
def _upper_bound_blocks(ARR, n, target, NSTEPS, BLOCK: tl.constexpr):
    """First index j in [0, n) with ``arr[j] > target`` (``arr`` non-decreasing), per lane."""
    lo = tl.zeros([BLOCK], tl.int64)
    hi = tl.zeros([BLOCK], tl.int64) + n
    for _ in range(NSTEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(ARR + tl.minimum(mid, n - 1), mask=active, other=0)
        right = active & (v <= target)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & (v > target), mid, hi)
    return lo


@triton.jit
def _kblock_kernel(
    KB_START, F_END, P_END, STATS, T_FULL_CNT, T_PART_CNT, T_FULL_IDX, T_PART_IDX, T_PART_TILE, TILE_BASE,
    n_qb, n_kb, NSTEPS, W_TF, W_TP,
    RATIO: tl.constexpr, BK: tl.constexpr, BW: tl.constexpr, LISTS: tl.constexpr, CANONICAL: tl.constexpr,
    COUNTS: tl.constexpr, WIDTHS: tl.constexpr,
):
    kb = tl.program_id(0).to(tl.int64) * BK + tl.arange(0, BK).to(tl.int64)
    ok = kb < n_kb
    tf_lo = _upper_bound_blocks(F_END, n_qb, kb, NSTEPS, BK)
    tf_hi = _upper_bound_blocks(KB_START, n_qb, kb, NSTEPS, BK)
    tp_lo = _upper_bound_blocks(P_END, n_qb, kb, NSTEPS, BK)
    t_full = tl.maximum(tf_hi - tf_lo, 0)
    t_part = tl.maximum(tf_lo - tp_lo, 0)
    if COUNTS:
        tl.store(T_FULL_CNT + kb, t_full.to(tl.int32), mask=ok)
        tl.store(T_PART_CNT + kb, t_part.to(tl.int32), mask=ok)
        if WIDTHS:
            tl.atomic_max(STATS + 2, tl.max(tl.where(ok, t_full, 0), 0))
            tl.atomic_max(STATS + 3, tl.max(tl.where(ok, t_part, 0), 0))
    if LISTS:
        w = tl.arange(0, BW)
        for w0 in range(0, W_TF, BW):
            j = w0 + w
            val = tl.where(j[None, :] < t_full[:, None], tf_lo[:, None] + j[None, :], -1).to(tl.int32)
            tl.store(T_FULL_IDX + kb[:, None] * W_TF + j[None, :], val, mask=ok[:, None] & (j[None, :] < W_TF))
        for w0 in range(0, W_TP, BW):
            j = w0 + w
            valid = j[None, :] < t_part[:, None]
            qb = tp_lo[:, None] + j[None, :]
            if CANONICAL:
                tile = kb[:, None] - qb * RATIO
            else:
                qs = tl.minimum(qb, n_qb - 1)
                tile = tl.load(TILE_BASE + qs, mask=valid & ok[:, None], other=0) + kb[:, None] - tl.load(F_END + qs, mask=valid & ok[:, None], other=0)
            m = ok[:, None] & (j[None, :] < W_TP)
            tl.store(T_PART_IDX + kb[:, None] * W_TP + j[None, :], tl.where(valid, qb, -1).to(tl.int32), mask=m)
            tl.store(T_PART_TILE + kb[:, None] * W_TP + j[None, :], tl.where(valid, tile, -1).to(tl.int32), mask=m)


#: Tokens per program of the scan and row kernels; key tiles per program of the transposed lists;
#: list entries written per step.
_SCAN_BLOCK = 1024
_ROW_BLOCK = 256
_KB_BLOCK = 64
_LIST_BLOCK = 32
_PAD_BLOCK = 16
_TILE_CACHE: dict = {}


def _block(n: int, most: int) -> int:
    """A power-of-two block of at most ``most`` lanes, no larger than ``n`` needs (at least 16)."""
    return max(16, min(most, triton.next_power_of_2(n)))


def _diagonal_tiles(bm: int, bn: int, device: torch.device) -> Tensor:
    """The ``bm / bn`` causal diagonal mask tiles (``column + d * bn <= row``), cached per device."""
    key = (bm, bn, str(device))
    if key not in _TILE_CACHE:
        r = torch.arange(bm, device=device)[:, None]
        c = torch.arange(bn, device=device)[None, :]
        _TILE_CACHE[key] = torch.stack([(d * bn + c <= r) for d in range(bm // bn)]).view(torch.int8)
    return _TILE_CACHE[key]


def _sorted_ids(cluster: Tensor) -> tuple[Tensor, Tensor]:
    """``[B, T, H]`` ids -> (sorted ids, positions) ``[B, H, T]``, by (cluster, position) (stable sort)."""
    return torch.sort(cluster.permute(0, 2, 1), dim=-1, stable=True)


# Counting sort of the ids of every group (ids in [0, C), C <= _COUNT_SORT_MAX_C), fused with the
# segment scan (it replaces torch.sort -- several cub launches -- and _segments_kernel):
#   _count_kernel    per (group, chunk of CH tokens): the chunk's histogram over the C ids;
#   _offsets_kernel  per group: cluster sizes, their padded packed starts, the group's padded length
#                    and longest padded segment (STATS, as _segments_kernel writes it), and per
#                    (chunk, cluster) where the chunk's first token of the cluster goes: its sorted
#                    index (OFFS) and its local packed row (POFFS);
#   _place_kernel    per (group, chunk): the rank of every token among the chunk's tokens of its
#                    cluster (a cumulative sum over a [CH, C] one-hot), hence its sorted index; writes
#                    the sorted ids and positions and, at the sorted index, DEST and LOSTART.
# Chunks are visited in position order and ranks inside a chunk follow positions: a stable sort.
_COUNT_SORT_MAX_C = 256


@triton.jit
def _count_kernel(IDS, s_b, s_t, s_h, HIST, n, H, NCH, CB: tl.constexpr, CH: tl.constexpr):
    g = tl.program_id(0)
    j = tl.program_id(1)
    b = g // H
    h = g % H
    t = j.to(tl.int64) * CH + tl.arange(0, CH).to(tl.int64)
    c = tl.load(IDS + b.to(tl.int64) * s_b + h.to(tl.int64) * s_h + t * s_t, mask=t < n, other=-1)
    onehot = (c[:, None] == tl.arange(0, CB)[None, :]).to(tl.int32)
    tl.store(HIST + (g.to(tl.int64) * NCH + j) * CB + tl.arange(0, CB), tl.sum(onehot, 0))


@triton.jit
def _offsets_kernel(HIST, OFFS, POFFS, STATS, G, NCH, ALIGN, CB: tl.constexpr, JB: tl.constexpr):
    g = tl.program_id(0)
    cb = tl.arange(0, CB)
    base = g.to(tl.int64) * NCH
    tot = tl.zeros([CB], tl.int64)
    for j0 in range(0, NCH, JB):
        jj = j0 + tl.arange(0, JB)
        hist = tl.load(HIST + (base + jj[:, None]) * CB + cb[None, :], mask=jj[:, None] < NCH, other=0)
        tot += tl.sum(hist.to(tl.int64), 0)
    padded = (tot + ALIGN - 1) // ALIGN * ALIGN
    ustart = tl.cumsum(tot, 0) - tot
    pstart = tl.cumsum(padded, 0) - padded
    tl.store(STATS + g, tl.sum(padded, 0))
    tl.store(STATS + G + g, tl.max(padded, 0))
    carry = tl.zeros([CB], tl.int64)
    for j0 in range(0, NCH, JB):
        jj = j0 + tl.arange(0, JB)
        m = jj[:, None] < NCH
        hist = tl.load(HIST + (base + jj[:, None]) * CB + cb[None, :], mask=m, other=0).to(tl.int64)
        excl = tl.cumsum(hist, 0) - hist + carry[None, :]
        tl.store(OFFS + (base + jj[:, None]) * CB + cb[None, :], ustart[None, :] + excl, mask=m)
        tl.store(POFFS + (base + jj[:, None]) * CB + cb[None, :], pstart[None, :] + excl, mask=m)
        carry += tl.sum(hist, 0)


@triton.jit
def _place_kernel(IDS, s_b, s_t, s_h, OFFS, POFFS, SC, PERM, DEST, LOSTART, n, H, NCH, CB: tl.constexpr, CH: tl.constexpr):
    g = tl.program_id(0)
    j = tl.program_id(1)
    b = g // H
    h = g % H
    t = j.to(tl.int64) * CH + tl.arange(0, CH).to(tl.int64)
    ok = t < n
    c = tl.load(IDS + b.to(tl.int64) * s_b + h.to(tl.int64) * s_h + t * s_t, mask=ok, other=-1)
    onehot = (c[:, None] == tl.arange(0, CB)[None, :]).to(tl.int32)
    rank = tl.sum(tl.cumsum(onehot, 0) * onehot, 1) - 1
    cs = tl.where(ok, c, 0)
    row = (g.to(tl.int64) * NCH + j) * CB
    sidx = tl.load(OFFS + row + cs, mask=ok, other=0) + rank
    dest = tl.load(POFFS + row + cs, mask=ok, other=0) + rank
    lostart = tl.load(POFFS + g.to(tl.int64) * NCH * CB + cs, mask=ok, other=0)
    out = g.to(tl.int64) * n + sidx
    tl.store(SC + out, c, mask=ok)
    tl.store(PERM + out, t, mask=ok)
    tl.store(DEST + out, dest, mask=ok)
    tl.store(LOSTART + out, lostart, mask=ok)


def _sort_and_scan(cluster: Tensor, num_clusters: int | None, align: int, stats: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sorted ids and positions (``[B, H, T]``), ``DEST`` and ``LOSTART`` (``[G, T]``, in sorted order) of one
    side, and its per-group stats written into ``stats`` ([G] padded lengths, [G] longest padded segment).

    Counting sort (three small launches) when ``num_clusters <= _COUNT_SORT_MAX_C``, else ``torch.sort``
    and the scan kernel."""
    b, t, h = cluster.shape
    g = b * h
    dev = cluster.device
    i64 = torch.int64
    dest = torch.empty(g, t, dtype=i64, device=dev)
    lostart = torch.empty(g, t, dtype=i64, device=dev)
    if num_clusters is None or num_clusters > _COUNT_SORT_MAX_C:
        sc, perm = _sorted_ids(cluster)
        _segments_kernel[(g,)](sc, *sc.stride(), dest, lostart, stats, t, g, h, align, BLOCK=_block(t, _SCAN_BLOCK))
        return sc, perm, dest, lostart
    cb = max(16, triton.next_power_of_2(num_clusters))
    ch = max(16, min(1024, 16384 // cb, triton.next_power_of_2(t)))
    nch = triton.cdiv(t, ch)
    hist = torch.empty(g, nch, cb, dtype=torch.int32, device=dev)
    offs = torch.empty(g, nch, cb, dtype=i64, device=dev)
    poffs = torch.empty(g, nch, cb, dtype=i64, device=dev)
    sc = torch.empty(b, h, t, dtype=cluster.dtype if cluster.dtype == i64 else i64, device=dev)
    perm = torch.empty(b, h, t, dtype=i64, device=dev)
    sb, st, sh = cluster.stride()
    _count_kernel[(g, nch)](cluster, sb, st, sh, hist, t, h, nch, CB=cb, CH=ch, num_warps=4)
    _offsets_kernel[(g,)](hist, offs, poffs, stats, g, nch, align, CB=cb, JB=16, num_warps=4)
    _place_kernel[(g, nch)](cluster, sb, st, sh, offs, poffs, sc, perm, dest, lostart, t, h, nch, CB=cb, CH=ch, num_warps=4)
    return sc, perm, dest, lostart


def _list_buffers(n_qb: int, n_kb: int, w_f: int, w_p: int, w_tf: int, w_tp: int, dev: torch.device) -> tuple[Tensor, ...]:
    """int32 ``(full_idx, part_idx, part_tile)`` ``[n_qb, w]`` and their transposes ``[n_kb, w]`` for the layout kernels to fill."""
    q = (torch.empty(n_qb, w, dtype=torch.int32, device=dev) for w in (w_f, w_p, w_p))
    k = (torch.empty(n_kb, w, dtype=torch.int32, device=dev) for w in (w_tf, w_tp, w_tp))
    return (*q, *k)


def routed_layout_triton(q_cluster: Tensor, k_cluster: Tensor, causal: bool, q_block: int, k_block: int, num_clusters: int | None = None):
    """The kernels' version of :func:`~mnemotorch.ops.routing.block_sparse.routed_layout` (same tensors).

    With ``num_clusters`` (static sizes, no host synchronisation): per side a counting sort fused with the
    segment scan (3 launches; ``torch.sort`` and the scan kernel above ``_COUNT_SORT_MAX_C`` clusters),
    two fills (the padding tail's rows), one row kernel per side, then one launch per list direction
    (shared and causal), or three and a cumulative sum (generic: counts, tile numbering, lists).

    Without it: one sort and one scan per side, a host sync (packed lengths), one row kernel per side,
    two per-tile kernels for the lists (twice, with a second sync for the list widths and a cumulative
    sum for the tile numbering, unless clusters are shared and causal).
    """
    from ..block_sparse import BlockSparsePattern
    from .block_sparse import RoutedLayout, interval_predicate, static_layout_sizes

    b, tq, h = q_cluster.shape
    tk = k_cluster.shape[1]
    dev = q_cluster.device
    bm, bn = q_block, k_block
    g = b * h
    shared = q_cluster is k_cluster and tq == tk
    canonical = shared and causal
    i64 = torch.int64
    static = None if num_clusters is None else static_layout_sizes(b, tq, tk, h, num_clusters, shared, causal, bm, bn)

    stats = torch.empty(4 * g, dtype=i64, device=dev)  # q totals, q longest, k totals, k longest
    q_stats, k_stats = stats[: 2 * g], stats[2 * g :]
    ksc, kperm, kdest, klo = _sort_and_scan(k_cluster, num_clusters, bm if shared else bn, k_stats)
    if shared:
        qsc, qperm, qdest, qlo, q_stats = ksc, kperm, kdest, klo, k_stats
    else:
        qsc, qperm, qdest, qlo = _sort_and_scan(q_cluster, num_clusters, bm, q_stats)
    if static is None:
        host = stats.tolist()  # host sync 1
        q_host = host[2 * g :] if shared else host[: 2 * g]
        nq, nk = sum(q_host[:g]), sum(host[2 * g : 3 * g])
        max_seg = max(host[3 * g :])
        if not shared:
            nk = max(nk, nq)  # block_sparse_attention wants k_len >= q_len: trailing key tiles nobody visits
        row_lo = torch.empty(nq, dtype=i64, device=dev)
        row_hi = torch.empty(nq, dtype=i64, device=dev)
        q_src = torch.empty(nq, dtype=i64, device=dev)  # every row written: tokens and the padding after them
    else:
        nq, nk = static.q_len, static.k_len
        # rows past the packed length (unknown on the host): source -1, the empty interval [nk, nk)
        lohi = torch.full((2, nq), nk, dtype=i64, device=dev)
        row_lo, row_hi = lohi[0], lohi[1]
        q_src = torch.full((nq,), -1, dtype=i64, device=dev)

    q_rows = torch.empty(b * tq * h, dtype=i64, device=dev)
    gb = max(16, min(1024, triton.next_power_of_2(g)))
    rb = _block(tq, _ROW_BLOCK)
    _rows_kernel[(g, triton.cdiv(tq, rb))](
        qsc, qperm, *qsc.stride(), *qperm.stride(), qdest, qlo, q_stats, q_rows, q_src, row_lo, row_hi,
        ksc, kperm, *ksc.stride(), *kperm.stride(), klo, k_stats,
        tq, tk, tk - tq, g, h, bm, tk.bit_length(), nq,
        ROWS=True, CANONICAL=canonical, CAUSAL=causal, BLOCK=rb, GB=gb, PB=_PAD_BLOCK,
    )
    if shared:
        k_rows, k_src = q_rows, q_src
    else:
        k_rows = torch.empty(b * tk * h, dtype=i64, device=dev)
        k_src = torch.full((nk,), -1, dtype=i64, device=dev)  # the keys' padding rows are not visited below
        rb = _block(tk, _ROW_BLOCK)
        _rows_kernel[(g, triton.cdiv(tk, rb))](
            ksc, kperm, *ksc.stride(), *kperm.stride(), kdest, klo, k_stats, k_rows, k_src, row_lo, row_hi,
            ksc, kperm, *ksc.stride(), *kperm.stride(), klo, k_stats,
            tk, tk, 0, g, h, bn, 1, nk,
            ROWS=False, CANONICAL=False, CAUSAL=causal, BLOCK=rb, GB=gb, PB=_PAD_BLOCK,
        )

    n_qb, n_kb = nq // bm, nk // bn
    kb_start, f_end, p_end = (torch.empty(n_qb, dtype=i64, device=dev) for _ in range(3))
    full_cnt, part_cnt = (torch.empty(n_qb, dtype=torch.int32, device=dev) for _ in range(2))
    t_full_cnt, t_part_cnt = (torch.empty(n_kb, dtype=torch.int32, device=dev) for _ in range(2))
    steps_q = n_qb.bit_length()
    kgrid = (triton.cdiv(n_kb, _KB_BLOCK),)
    qkw = dict(BM=bm, BN=bn, BW=_LIST_BLOCK, CANONICAL=canonical)
    kkw = dict(RATIO=bm // bn, BK=_KB_BLOCK, BW=_LIST_BLOCK, CANONICAL=canonical)
    qargs = (row_lo, row_hi, kb_start, f_end, p_end, full_cnt, part_cnt)

    if static is not None:
        w_f, w_p, w_tf, w_tp, n_tiles = static.w_full, static.w_part, static.w_t_full, static.w_t_part, static.n_tiles
        full_idx, part_idx, part_tile, t_full_idx, t_part_idx, t_part_tile = _list_buffers(n_qb, n_kb, w_f, w_p, w_tf, w_tp, dev)
        if canonical:
            tiles = _diagonal_tiles(bm, bn, dev)
            tile_base = kb_start  # unused
            # one launch per direction: counts and lists together (widths are known)
            _qblock_kernel[(n_qb,)](*qargs, stats, full_idx, part_idx, part_tile, tile_base, tiles, w_f, w_p,
                                    LISTS=True, COUNTS=True, WIDTHS=False, **qkw)
        else:
            # counts, the tile numbering (a cumulative sum), then the lists and mask tiles
            tiles = torch.empty(max(n_tiles, 1), bm, bn, dtype=torch.int8, device=dev)
            _qblock_kernel[(n_qb,)](*qargs, stats, full_idx, part_idx, part_tile, kb_start, tiles, 1, 1,
                                    LISTS=False, COUNTS=True, WIDTHS=False, **qkw)
            tile_base = torch.cumsum(part_cnt, 0, dtype=i64) - part_cnt
            _qblock_kernel[(n_qb,)](*qargs, stats, full_idx, part_idx, part_tile, tile_base, tiles, w_f, w_p,
                                    LISTS=True, COUNTS=False, WIDTHS=False, **qkw)
        _kblock_kernel[kgrid](kb_start, f_end, p_end, stats, t_full_cnt, t_part_cnt, t_full_idx, t_part_idx, t_part_tile, tile_base,
                              n_qb, n_kb, steps_q, w_tf, w_tp, LISTS=True, COUNTS=True, WIDTHS=False, **kkw)
    else:
        widths = torch.zeros(4, dtype=i64, device=dev) if not canonical else stats  # atomics (generic only)
        dummy32 = t_full_cnt
        _qblock_kernel[(n_qb,)](*qargs, widths, dummy32, dummy32, dummy32, kb_start, dummy32, 1, 1,
                                LISTS=False, COUNTS=True, WIDTHS=not canonical, **qkw)
        _kblock_kernel[kgrid](kb_start, f_end, p_end, widths, t_full_cnt, t_part_cnt, dummy32, dummy32, dummy32, kb_start,
                              n_qb, n_kb, steps_q, 1, 1, LISTS=False, COUNTS=True, WIDTHS=not canonical, **kkw)
        if canonical:
            w_f, w_p, w_tf, w_tp, n_tiles = (max_seg - bm) // bn, bm // bn, max_seg // bm - 1, 1, 0
            tile_base = kb_start  # unused
            tiles = _diagonal_tiles(bm, bn, dev)
        else:
            cs = torch.cumsum(part_cnt, 0, dtype=i64)
            tile_base = cs - part_cnt
            w_f, w_p, w_tf, w_tp, n_tiles = torch.cat([widths, cs[-1:]]).tolist()  # host sync 2
            tiles = torch.empty(max(n_tiles, 1), bm, bn, dtype=torch.int8, device=dev)
            if not n_tiles:
                tiles.zero_()
        w_f, w_p, w_tf, w_tp = (max(1, int(w)) for w in (w_f, w_p, w_tf, w_tp))
        full_idx, part_idx, part_tile, t_full_idx, t_part_idx, t_part_tile = _list_buffers(n_qb, n_kb, w_f, w_p, w_tf, w_tp, dev)
        _qblock_kernel[(n_qb,)](*qargs, widths, full_idx, part_idx, part_tile, tile_base, tiles, w_f, w_p,
                                LISTS=True, COUNTS=False, WIDTHS=False, **qkw)
        _kblock_kernel[kgrid](kb_start, f_end, p_end, widths, t_full_cnt, t_part_cnt, t_full_idx, t_part_idx, t_part_tile, tile_base,
                              n_qb, n_kb, steps_q, w_tf, w_tp, LISTS=True, COUNTS=False, WIDTHS=False, **kkw)
    pattern = BlockSparsePattern(
        nq, nk, bm, bn, full_idx, full_cnt, part_idx, part_tile, part_cnt, tiles,
        t_full_idx, t_full_cnt, t_part_idx, t_part_tile, t_part_cnt, interval_predicate(row_lo, row_hi),
    )
    return RoutedLayout(pattern, q_rows, k_rows, row_lo, row_hi, shared, q_src, k_src)


__all__ = [
    "PackRows",
    "Rotary",
    "UnpackRows",
    "nearest_centroid_triton",
    "rotary_triton",
    "route_assign_triton",
    "route_commit_grad_triton",
    "routed_layout_triton",
]
