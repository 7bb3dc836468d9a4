"""Triton kernels of Local Linear Attention by blockwise conjugate gradient (forward and backward).

What is computed: exactly :func:`mnemotorch.ops.lla.cg.lla_cg_heads` (the FlashLLA algorithm,
Zuo et al. 2025, §4), per batch ``b`` and query head ``h``, query ``i`` at absolute key position
``Tk − Tq + i``, with ``w_ij = exp(τ q_iᵀk_j − m_i)`` over the causal keys ``j ≤ i``::

    ω_i = Σ_j w_ij,   μ_i = Σ_j w_ij (k_j − q_i),   Σ_i = Σ_j w_ij (k_j − q_i)(k_j − q_i)ᵀ + λ ω_i I
    ρ_i ≈ Σ_i⁻¹ μ_i  (``cg_iters`` CG steps from 0),   δ_i = ω_i − μ_iᵀρ_i
    o_i = Σ_j w_ij (1 + ρ_iᵀq_i − ρ_iᵀk_j) v_j / δ_i

**Forward: three launches**, each a grid over (query block, batch·head) whose programs loop over
the causal key tiles (no program reads what another program of its launch writes):

1. ``_lla_stats``: the online-softmax sweep: the row maximum ``m_i`` (base 2), ``ω_i`` and
   ``μ_i`` (and, with ``precondition``, ``diag Σ_i``), rescaled whenever ``m_i`` grows.
2. ``_lla_cg``: the whole conjugate-gradient solve for the program's query rows. CG on
   ``Σ_i ρ_i = μ_i`` is independent per query, so the iteration state (``x, r, p`` and ``rᵀz``:
   ``[BM, D]`` fp32 tiles and row scalars) stays in registers and the per-query step lengths
   ``α, β`` and the residual updates are fused into the program: one launch for all iterations,
   no ``[T, D]`` vectors written between steps. Each iteration streams the key tiles once for
   the matrix-free product, written around the query::

       Σ_i p = Σ_j c_ij (k_j − q_i) + λ ω_i p,    c_ij = w_ij (k_jᵀp − q_iᵀp)

   computed as ``C K − (μ_iᵀp) q_i + λ ω_i p`` (the row sums of ``C`` are ``μ_iᵀp``): three products
   per tile -- ``q kᵀ`` for the weights, ``p kᵀ``, ``C K`` -- and no reduction in the key loop.
   Centring inside ``c_ij`` avoids the cancellation of the ``μ̃ qᵀ`` expansion of ``cg.py``.
   Steps whose denominators fell below ``rᵀz(0) · ε_fp32²`` are frozen, as in ``cg.py``.
3. ``_lla_out``: ``δ_i``, ``β_i = 1 + ρ_iᵀq_i`` and ``o_i = Σ_j w_ij (β_i − ρ_iᵀk_j) v_j / δ_i``.

``≈ (2 + I)`` attention-sized sweeps for ``I`` iterations (the CG sweeps have one product more
than an attention forward). Memory: O(T·D) fp32 (``m, ω, δ [B·H, T]``; ``μ, ρ [B·H, T, D]``, kept
for the backward).

**Backward: implicit differentiation**, not the unrolled CG. With ``g = ∂L/∂o_i`` and the forward's
``ρ``, ``a_ij = g_iᵀv_j / δ_i``, ``c_i = −g_iᵀo_i / δ_i``, the adjoint of the solve is one more CG
solve with the same matrices, ``Σ_i u_i = g_ρ,i`` with
``g_ρ,i = −Σ_j w_ij a_ij (k_j − q_i) − c_i μ_i``; then, with ``β_i = 1 + ρ_iᵀq_i`` and
``γ_i = c_i − u_iᵀq_i``::

    G_ij = (β_i − ρ_iᵀk_j)(a_ij + γ_i + u_iᵀk_j) − λ u_iᵀρ_i           (∂L/∂w_ij)
    ∂L/∂q_i = τ Σ_j G_ij w_ij k_j − [δ_i u_i − (Σ_j w_ij a_ij + c_i ω_i + u_iᵀμ_i) ρ_i]
    ∂L/∂k_j = Σ_i [τ G_ij w_ij q_i + E1_ij u_i − E2_ij ρ_i]
    ∂L/∂v_j = Σ_i E1_ij g_i / δ_i,     E1_ij = w_ij (β_i − ρ_iᵀk_j),  E2_ij = w_ij (a_ij + γ_i + u_iᵀk_j)

(derivation in docs/mixers/lla.md; ``m_i`` carries no gradient since the output is invariant to a
common scale of a query's weights). Launches: ``_lla_bwd_stats`` (``Σ_j w_ij g_iᵀv_j`` and
``Σ_j w_ij (g_iᵀv_j) k_j`` per query), ``_lla_cg`` again for ``u``, ``_lla_bwd_dq`` (per query
block) and ``_lla_bwd_dkdv`` (per key block, looping over the query blocks that see it); the
per-query algebra between them (``[B·H, T]`` scalars and ``[B·H, T, D]`` vectors) runs in torch.
This is the gradient of the exact LLA function at the computed ``ρ``; it equals the gradient of
the unrolled CG (``cg.py``) once CG has converged, and differs from it by the CG error otherwise.
Extra memory: O(T·D) fp32 -- nothing quadratic in T is stored.

**Precision.** Sums, statistics and every CG quantity are fp32. ``q kᵀ`` (the weights) and
``g vᵀ`` use the input dtype on the tensor cores (exact products, fp32 accumulation). Every
product with an fp32 operand (a CG vector ``p, ρ, u``, a weight tile, a gradient coefficient) is
computed to about fp32 accuracy: for bfloat16 inputs the fp32 operand is split into bf16 high and
low halves (two bf16 products), for float16 inputs ``tf32x3``, for float32 inputs IEEE. Plain TF32
was not enough (see the note above ``_dot32``).

Registered as ``torch.library.custom_op``s ``mnemotorch::lla_cg_fwd`` / ``mnemotorch::lla_cg_bwd``
with an autograd formula. On CUDA the launch parameters are autotuned (``MNEMO_AUTOTUNE=0`` gives
fixed ones); under ``TRITON_INTERPRET=1`` (the CPU tests) fixed tiles are used. Buffers are
NaN-filled when ``MNEMO_POISON=1`` (the tests set it) so an element no program writes shows up.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_dots import dot_split, dot_split_left, dot_split_right
from .reference import check_lla_qkv, check_ridge, check_scale

LOG2E = 1.4426950408889634
#: kernel limits (checked at the public boundary)
MAX_D = 128
MAX_DV = 128
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: CG freezes a step whose denominator is below rᵀz(0) · EPS2 (fp32 machine epsilon squared, as cg.py)
EPS2 = torch.finfo(torch.float32).eps ** 2


# ---------------------------------------------------------------------------------------------
# Small jitted helpers (used outside the key/query loops only: under TRITON_INTERPRET=1 every call
# of a jitted helper costs milliseconds, so the loop bodies are written out in full)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _ld2(base, rows, cols, n_rows, n_cols, stride):
    """``[len(rows), len(cols)]`` tile at ``base + row*stride + col``, zeros outside; stored dtype."""
    m = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(base + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=m, other=0.0)


@triton.jit
def _st2(base, x, rows, cols, n_rows, n_cols, stride):
    m = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(base + rows[:, None].to(tl.int64) * stride + cols[None, :], x, mask=m)


@triton.jit
def _ld1(base, rows, n_rows, other):
    return tl.load(base + rows, mask=rows < n_rows, other=other)


# Products with an fp32 operand (weights, CG vectors, gradient coefficients) need about fp32
# accuracy: LLA's intercept extrapolates from the local fit, and the interpreter's emulation of
# the GPU's TF32 (10-bit mantissa, possibly truncated) gave bf16 output errors of 5e-3..9e-3 at
# T = 256, D = 64 (against ~1.6e-3 from rounding the output to bf16 alone). So:
#   SPLIT (bfloat16 inputs): the fp32 operand is split into bf16 hi + lo parts and multiplied as two
#     bf16 products with the (exactly bf16) other operand -- ~16-bit operands at the cost of one
#     TF32 product; both-fp32 products take three;
#   PREC32 otherwise: "ieee" for float32 inputs, "tf32x3" for float16 inputs (fp16 hi/lo parts
#     would underflow: the CG vectors shrink with the residual).
# PREC is the precision of the products of two input-dtype operands (q kᵀ, g vᵀ: exact products
# with fp32 accumulation for half inputs): "ieee" for float32, the default "tf32" otherwise.


@triton.jit
def _dot32(a, b, PREC32: tl.constexpr, SPLIT: tl.constexpr):
    """``a @ b`` for fp32 ``a`` and ``b`` in the input dtype."""
    if SPLIT:
        c = dot_split_left(a, b)
    else:
        c = tl.dot(a, b.to(tl.float32), input_precision=PREC32)
    return c


@triton.jit
def _dot23(a, b, PREC32: tl.constexpr, SPLIT: tl.constexpr):
    """``a @ b`` for ``a`` in the input dtype and fp32 ``b``."""
    if SPLIT:
        c = dot_split_right(a, b)
    else:
        c = tl.dot(a.to(tl.float32), b, input_precision=PREC32)
    return c


@triton.jit
def _dot33(a, b, PREC32: tl.constexpr, SPLIT: tl.constexpr):
    """``a @ b`` for fp32 ``a`` and ``b``."""
    if SPLIT:
        c = dot_split(a, b)
    else:
        c = tl.dot(a, b, input_precision=PREC32)
    return c


# ---------------------------------------------------------------------------------------------
# Forward kernels. Layouts: q [B, Tq, H, D], k/v [B, Tk, Hkv, D/Dv] (strided, last dim contiguous);
# row scalars [B·H, Tq] fp32; row vectors [B·H, Tq, D] fp32 contiguous.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _lla_stats(
    Q, K, M2, OMEGA, MU, DIAG,
    sqb, sqt, sqh, skb, skt, skh,
    Tq, Tk, offset, qk_scale2, ridge,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, PRECOND: tl.constexpr,
    PREC: tl.constexpr, PREC32: tl.constexpr, SPLIT: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = qb * BM + tl.arange(0, BM)
    dcol = tl.arange(0, BD)
    qpos = rows + offset
    q = _ld2(Q + b.to(tl.int64) * sqb + h * sqh, rows, dcol, Tq, D, sqt)
    k_base = K + b.to(tl.int64) * skb + (h // GROUP) * skh
    m2 = tl.full([BM], float("-inf"), tl.float32)
    om = tl.full([BM], 0.0, tl.float32)
    mut = tl.full([BM, BD], 0.0, tl.float32)  # Σ_j w_ij k_j
    k2 = tl.full([BM, BD], 0.0, tl.float32)  # Σ_j w_ij k_j ⊙ k_j (precondition)
    hi = tl.minimum(Tk, offset + (qb + 1) * BM)
    for start in range(0, hi, BN):
        kpos = start + tl.arange(0, BN)
        k = tl.load(k_base + kpos[:, None].to(tl.int64) * skt + dcol[None, :], mask=(kpos[:, None] < Tk) & (dcol[None, :] < D), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale2
        s = tl.where((kpos[None, :] <= qpos[:, None]) & (kpos[None, :] < Tk), s, float("-inf"))
        # key 0 is in every row's first tile, so m2 is finite from the first tile on
        m_new = tl.maximum(m2, tl.max(s, 1))
        alpha = tl.math.exp2(m2 - m_new)
        w = tl.math.exp2(s - m_new[:, None])
        om = om * alpha + tl.sum(w, 1)
        mut = mut * alpha[:, None] + _dot32(w, k, PREC32, SPLIT)
        if PRECOND:
            k2 = k2 * alpha[:, None] + _dot32(w, k * k, PREC32, SPLIT)
        m2 = m_new
    qf = q.to(tl.float32)
    row_base = bh.to(tl.int64) * Tq
    tl.store(M2 + row_base + rows, m2, mask=rows < Tq)
    tl.store(OMEGA + row_base + rows, om, mask=rows < Tq)
    _st2(MU + row_base * D, mut - om[:, None] * qf, rows, dcol, Tq, D, D)
    if PRECOND:
        diag = k2 - 2.0 * qf * mut + om[:, None] * (qf * qf + ridge)
        _st2(DIAG + row_base * D, diag, rows, dcol, Tq, D, D)


@triton.jit
def _lla_cg(
    Q, K, M2, OMEGA, MU, RHS, DIAG, X,
    sqb, sqt, sqh, skb, skt, skh,
    Tq, Tk, offset, qk_scale2, ridge, iters, eps2,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, PRECOND: tl.constexpr,
    PREC: tl.constexpr, PREC32: tl.constexpr, SPLIT: tl.constexpr,
):
    """``iters`` CG steps on ``Σ_i x_i = RHS_i`` from ``x = 0`` for one block of query rows.

    ``Σ_i p = C K − (μ_iᵀp) q_i + λ ω_i p`` with ``C_ij = w_ij (k_j − q_i)ᵀp`` (the row sums of C
    are ``μ_iᵀp``, so the key loop has no reduction). Registers hold q, x, r, p (and 1/diag); μ is
    re-read each iteration. The products of the key loop are written out (not through _dot32) to
    keep the interpreter fast.
    """
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = qb * BM + tl.arange(0, BM)
    dcol = tl.arange(0, BD)
    qpos = rows + offset
    q = _ld2(Q + b.to(tl.int64) * sqb + h * sqh, rows, dcol, Tq, D, sqt)
    k_base = K + b.to(tl.int64) * skb + (h // GROUP) * skh
    row_base = bh.to(tl.int64) * Tq
    m2 = _ld1(M2 + row_base, rows, Tq, 0.0)
    ridge_om = ridge * _ld1(OMEGA + row_base, rows, Tq, 1.0)
    vmask = (rows[:, None] < Tq) & (dcol[None, :] < D)
    voff = row_base * D + rows[:, None].to(tl.int64) * D + dcol[None, :]
    r = tl.load(RHS + voff, mask=vmask, other=0.0)
    if PRECOND:
        dinv = 1.0 / tl.load(DIAG + voff, mask=vmask, other=1.0)
        z = r * dinv
    else:
        z = r
    x = tl.full([BM, BD], 0.0, tl.float32)
    p = z
    rz = tl.sum(r * z, 1)
    floor = rz * eps2
    hi = tl.minimum(Tk, offset + (qb + 1) * BM)
    for _ in range(iters):
        qp = tl.sum(q.to(tl.float32) * p, 1)
        if SPLIT:
            p_hi = p.to(tl.bfloat16)
            p_lo = (p - p_hi.to(tl.float32)).to(tl.bfloat16)
        acc = tl.full([BM, BD], 0.0, tl.float32)
        for start in range(0, hi, BN):
            kpos = start + tl.arange(0, BN)
            k = tl.load(k_base + kpos[:, None].to(tl.int64) * skt + dcol[None, :], mask=(kpos[:, None] < Tk) & (dcol[None, :] < D), other=0.0)
            kt = tl.trans(k)
            s = tl.dot(q, kt, input_precision=PREC) * qk_scale2
            ok = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] < Tk)
            w = tl.math.exp2(tl.where(ok, s - m2[:, None], float("-inf")))
            # c_ij = w_ij (k_j − q_i)ᵀp_i
            if SPLIT:
                c = w * (tl.dot(p_lo, kt, acc=tl.dot(p_hi, kt)) - qp[:, None])
                c_hi = c.to(tl.bfloat16)
                c_lo = (c - c_hi.to(tl.float32)).to(tl.bfloat16)
                acc = tl.dot(c_lo, k, acc=tl.dot(c_hi, k, acc=acc))
            else:
                kf = k.to(tl.float32)
                c = w * (tl.dot(p, tl.trans(kf), input_precision=PREC32) - qp[:, None])
                acc = tl.dot(c, kf, acc=acc, input_precision=PREC32)
        mup = tl.sum(tl.load(MU + voff, mask=vmask, other=0.0) * p, 1)
        ap = acc - mup[:, None] * q.to(tl.float32) + ridge_om[:, None] * p
        pap = tl.sum(p * ap, 1)
        ok_a = pap > floor
        alpha = tl.where(ok_a, rz / tl.where(ok_a, pap, 1.0), 0.0)
        x += alpha[:, None] * p
        r -= alpha[:, None] * ap
        if PRECOND:
            z = r * dinv
        else:
            z = r
        rz_new = tl.sum(r * z, 1)
        ok_b = rz > floor
        beta = tl.where(ok_b, rz_new / tl.where(ok_b, rz, 1.0), 0.0)
        p = z + beta[:, None] * p
        rz = rz_new
    tl.store(X + voff, x, mask=vmask)


@triton.jit
def _lla_out(
    Q, K, V, M2, OMEGA, MU, RHO, O, DELTA,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
    Tq, Tk, offset, qk_scale2,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, PREC32: tl.constexpr, SPLIT: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = qb * BM + tl.arange(0, BM)
    dcol = tl.arange(0, BD)
    vcol = tl.arange(0, BDV)
    qpos = rows + offset
    q = _ld2(Q + b.to(tl.int64) * sqb + h * sqh, rows, dcol, Tq, D, sqt)
    qf = q.to(tl.float32)
    k_base = K + b.to(tl.int64) * skb + (h // GROUP) * skh
    v_base = V + b.to(tl.int64) * svb + (h // GROUP) * svh
    row_base = bh.to(tl.int64) * Tq
    m2 = _ld1(M2 + row_base, rows, Tq, 0.0)
    om = _ld1(OMEGA + row_base, rows, Tq, 1.0)
    mu = _ld2(MU + row_base * D, rows, dcol, Tq, D, D)
    rho = _ld2(RHO + row_base * D, rows, dcol, Tq, D, D)
    delta = om - tl.sum(mu * rho, 1)
    beta = 1.0 + tl.sum(rho * qf, 1)
    acc = tl.full([BM, BDV], 0.0, tl.float32)
    hi = tl.minimum(Tk, offset + (qb + 1) * BM)
    for start in range(0, hi, BN):
        kpos = start + tl.arange(0, BN)
        k = tl.load(k_base + kpos[:, None].to(tl.int64) * skt + dcol[None, :], mask=(kpos[:, None] < Tk) & (dcol[None, :] < D), other=0.0)
        v = tl.load(v_base + kpos[:, None].to(tl.int64) * svt + vcol[None, :], mask=(kpos[:, None] < Tk) & (vcol[None, :] < DV), other=0.0)
        kt = tl.trans(k)
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale2
        ok = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] < Tk)
        w = tl.math.exp2(tl.where(ok, s - m2[:, None], float("-inf")))
        c = w * (beta[:, None] - _dot32(rho, kt, PREC32, SPLIT))
        acc += _dot32(c, v, PREC32, SPLIT)
    pad = tl.where(rows < Tq, delta, 1.0)
    o = acc / pad[:, None]
    _st2(O + b.to(tl.int64) * sob + h * soh, o.to(O.dtype.element_ty), rows, vcol, Tq, DV, sot)
    tl.store(DELTA + row_base + rows, delta, mask=rows < Tq)


# ---------------------------------------------------------------------------------------------
# Backward kernels (see the module docstring for the formulas). dO has o's layout and dtype.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _lla_bwd_stats(
    Q, K, V, DO, M2, GS, GH,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sgb, sgt, sgh,
    Tq, Tk, offset, qk_scale2,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, PREC32: tl.constexpr, SPLIT: tl.constexpr,
):
    """``GS_i = Σ_j w_ij g_iᵀv_j`` and ``GH_i = Σ_j w_ij (g_iᵀv_j) k_j``."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = qb * BM + tl.arange(0, BM)
    dcol = tl.arange(0, BD)
    vcol = tl.arange(0, BDV)
    qpos = rows + offset
    q = _ld2(Q + b.to(tl.int64) * sqb + h * sqh, rows, dcol, Tq, D, sqt)
    g = _ld2(DO + b.to(tl.int64) * sgb + h * sgh, rows, vcol, Tq, DV, sgt)
    k_base = K + b.to(tl.int64) * skb + (h // GROUP) * skh
    v_base = V + b.to(tl.int64) * svb + (h // GROUP) * svh
    row_base = bh.to(tl.int64) * Tq
    m2 = _ld1(M2 + row_base, rows, Tq, 0.0)
    gs = tl.full([BM], 0.0, tl.float32)
    gh = tl.full([BM, BD], 0.0, tl.float32)
    hi = tl.minimum(Tk, offset + (qb + 1) * BM)
    for start in range(0, hi, BN):
        kpos = start + tl.arange(0, BN)
        k = tl.load(k_base + kpos[:, None].to(tl.int64) * skt + dcol[None, :], mask=(kpos[:, None] < Tk) & (dcol[None, :] < D), other=0.0)
        v = tl.load(v_base + kpos[:, None].to(tl.int64) * svt + vcol[None, :], mask=(kpos[:, None] < Tk) & (vcol[None, :] < DV), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale2
        ok = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] < Tk)
        w = tl.math.exp2(tl.where(ok, s - m2[:, None], float("-inf")))
        e = w * tl.dot(g, tl.trans(v), input_precision=PREC)
        gs += tl.sum(e, 1)
        gh += _dot32(e, k, PREC32, SPLIT)
    tl.store(GS + row_base + rows, gs, mask=rows < Tq)
    _st2(GH + row_base * D, gh, rows, dcol, Tq, D, D)


@triton.jit
def _lla_bwd_dq(
    Q, K, V, DO, M2, RHO, U, DINV, BETA, GAMMA, LUR, DQR, DQ,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sgb, sgt, sgh, sdb, sdt, sdh,
    Tq, Tk, offset, qk_scale2, tau,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, PREC32: tl.constexpr, SPLIT: tl.constexpr,
):
    """``dq_i = τ Σ_j G_ij w_ij k_j + DQR_i`` (DQR: the per-query part, computed in torch)."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = qb * BM + tl.arange(0, BM)
    dcol = tl.arange(0, BD)
    vcol = tl.arange(0, BDV)
    qpos = rows + offset
    q = _ld2(Q + b.to(tl.int64) * sqb + h * sqh, rows, dcol, Tq, D, sqt)
    g = _ld2(DO + b.to(tl.int64) * sgb + h * sgh, rows, vcol, Tq, DV, sgt)
    k_base = K + b.to(tl.int64) * skb + (h // GROUP) * skh
    v_base = V + b.to(tl.int64) * svb + (h // GROUP) * svh
    row_base = bh.to(tl.int64) * Tq
    m2 = _ld1(M2 + row_base, rows, Tq, 0.0)
    dinv = _ld1(DINV + row_base, rows, Tq, 0.0)
    beta = _ld1(BETA + row_base, rows, Tq, 0.0)
    gamma = _ld1(GAMMA + row_base, rows, Tq, 0.0)
    lur = _ld1(LUR + row_base, rows, Tq, 0.0)
    rho = _ld2(RHO + row_base * D, rows, dcol, Tq, D, D)
    u = _ld2(U + row_base * D, rows, dcol, Tq, D, D)
    acc = tl.full([BM, BD], 0.0, tl.float32)
    hi = tl.minimum(Tk, offset + (qb + 1) * BM)
    for start in range(0, hi, BN):
        kpos = start + tl.arange(0, BN)
        k = tl.load(k_base + kpos[:, None].to(tl.int64) * skt + dcol[None, :], mask=(kpos[:, None] < Tk) & (dcol[None, :] < D), other=0.0)
        v = tl.load(v_base + kpos[:, None].to(tl.int64) * svt + vcol[None, :], mask=(kpos[:, None] < Tk) & (vcol[None, :] < DV), other=0.0)
        kt = tl.trans(k)
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale2
        ok = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] < Tk)
        w = tl.math.exp2(tl.where(ok, s - m2[:, None], float("-inf")))
        z = tl.dot(g, tl.trans(v), input_precision=PREC) * dinv[:, None] + gamma[:, None] + _dot32(u, kt, PREC32, SPLIT)
        gw = w * ((beta[:, None] - _dot32(rho, kt, PREC32, SPLIT)) * z - lur[:, None])
        acc += _dot32(gw, k, PREC32, SPLIT)
    dq = tau * acc + _ld2(DQR + row_base * D, rows, dcol, Tq, D, D)
    _st2(DQ + b.to(tl.int64) * sdb + h * sdh, dq.to(DQ.dtype.element_ty), rows, dcol, Tq, D, sdt)


@triton.jit
def _lla_bwd_dkdv(
    Q, K, V, DO, M2, RHO, U, DINV, BETA, GAMMA, LUR, DK, DV_,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sgb, sgt, sgh, sdkb, sdkt, sdkh, sdvb, sdvt, sdvh,
    Tq, Tk, offset, qk_scale2, tau,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr, PREC32: tl.constexpr, SPLIT: tl.constexpr,
):
    """One block of ``BN`` keys of one query head; loops over the query blocks that see them.
    Tiles are ``[keys, queries]`` (the transposes of the query-side kernels')."""
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kpos = kb * BN + tl.arange(0, BN)
    dcol = tl.arange(0, BD)
    vcol = tl.arange(0, BDV)
    k = _ld2(K + b.to(tl.int64) * skb + (h // GROUP) * skh, kpos, dcol, Tk, D, skt)
    v = _ld2(V + b.to(tl.int64) * svb + (h // GROUP) * svh, kpos, vcol, Tk, DV, svt)
    q_base = Q + b.to(tl.int64) * sqb + h * sqh
    g_base = DO + b.to(tl.int64) * sgb + h * sgh
    row_base = bh.to(tl.int64) * Tq
    dk = tl.full([BN, BD], 0.0, tl.float32)
    dv = tl.full([BN, BDV], 0.0, tl.float32)
    # query row i sees key j iff offset + i >= j: start at the block of the first row that sees this block
    first = tl.maximum(kb * BN - offset, 0)
    for start in range((first // BM) * BM, Tq, BM):
        rows = start + tl.arange(0, BM)
        r_ok = rows < Tq
        qpos = rows + offset
        dmask = r_ok[:, None] & (dcol[None, :] < D)
        vmask = r_ok[:, None] & (vcol[None, :] < DV)
        q = tl.load(q_base + rows[:, None].to(tl.int64) * sqt + dcol[None, :], mask=dmask, other=0.0)
        g = tl.load(g_base + rows[:, None].to(tl.int64) * sgt + vcol[None, :], mask=vmask, other=0.0)
        rho = tl.load(RHO + row_base * D + rows[:, None].to(tl.int64) * D + dcol[None, :], mask=dmask, other=0.0)
        u = tl.load(U + row_base * D + rows[:, None].to(tl.int64) * D + dcol[None, :], mask=dmask, other=0.0)
        m2 = tl.load(M2 + row_base + rows, mask=r_ok, other=0.0)
        dinv = tl.load(DINV + row_base + rows, mask=r_ok, other=0.0)
        beta = tl.load(BETA + row_base + rows, mask=r_ok, other=0.0)
        gamma = tl.load(GAMMA + row_base + rows, mask=r_ok, other=0.0)
        lur = tl.load(LUR + row_base + rows, mask=r_ok, other=0.0)
        s = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale2
        ok = (kpos[:, None] <= qpos[None, :]) & r_ok[None, :]
        w = tl.math.exp2(tl.where(ok, s - m2[None, :], float("-inf")))
        e1 = w * (beta[None, :] - _dot23(k, tl.trans(rho), PREC32, SPLIT))
        z = tl.dot(v, tl.trans(g), input_precision=PREC) * dinv[None, :] + gamma[None, :] + _dot23(k, tl.trans(u), PREC32, SPLIT)
        gw = e1 * z - lur[None, :] * w
        dk += tau * _dot32(gw, q, PREC32, SPLIT) + _dot33(e1, u, PREC32, SPLIT) - _dot33(w * z, rho, PREC32, SPLIT)
        dv += _dot32(e1 * dinv[None, :], g, PREC32, SPLIT)
    _st2(DK + b.to(tl.int64) * sdkb + h * sdkh, dk.to(DK.dtype.element_ty), kpos, dcol, Tk, D, sdkt)
    _st2(DV_ + b.to(tl.int64) * sdvb + h * sdvh, dv.to(DV_.dtype.element_ty), kpos, vcol, Tk, DV, sdvt)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------

# MNEMO_AUTOTUNE=0 skips tuning on CUDA (fixed launch parameters, see _fixed).
_AUTOTUNE = os.environ.get("MNEMO_AUTOTUNE", "1") != "0"
#: tiles (program rows, streamed tile) under TRITON_INTERPRET=1: every operation costs the
#: interpreter about a millisecond whatever the tile size, so few large tiles keep the CPU tests
#: fast; tests/ops/test_lla_triton.py also runs (32, 16) (unequal tiles straddling the diagonal)
INTERPRET_TILES = (64, 64)


def _cfgs(*rows_cols_warps_stages):
    return [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in rows_cols_warps_stages]


# Four candidates per kernel (each is a compilation per key). The CG kernel keeps x, r, p and the
# query tile in registers across its loops, so its row block stays at 64 or below.
_Q_CFGS = _cfgs((64, 64, 4, 2), (64, 32, 8, 3), (64, 64, 8, 2), (32, 64, 4, 2))
_KV_CFGS = _cfgs((32, 64, 4, 2), (64, 32, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2))
_KEY = ["D", "BD", "GROUP", "PREC", "PREC32", "SPLIT"]
_TUNED = {
    "_lla_stats": triton.autotune(_Q_CFGS, key=_KEY + ["PRECOND"])(_lla_stats),
    "_lla_cg": triton.autotune(_Q_CFGS, key=_KEY + ["PRECOND"])(_lla_cg),
    "_lla_out": triton.autotune(_Q_CFGS, key=_KEY + ["DV"])(_lla_out),
    "_lla_bwd_stats": triton.autotune(_Q_CFGS, key=_KEY + ["DV"])(_lla_bwd_stats),
    "_lla_bwd_dq": triton.autotune(_Q_CFGS, key=_KEY + ["DV"])(_lla_bwd_dq),
    # the dkdv program owns BN keys and streams BM queries (the config names stay BM/BN)
    "_lla_bwd_dkdv": triton.autotune(_KV_CFGS, key=_KEY + ["DV"])(_lla_bwd_dkdv),
}


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _fixed(kernel, width: int, prec: str) -> dict:
    """Launch parameters without tuning (``width``: the larger head dim)."""
    if _interpreted():
        own, stream = INTERPRET_TILES
        if kernel is _lla_bwd_dkdv:
            return dict(BN=own, BM=stream, num_warps=4, num_stages=1)
        return dict(BM=own, BN=stream, num_warps=4, num_stages=1)
    # The CG kernel keeps q, r, p (and p's bf16 halves) in registers besides the tile temporaries:
    # 8 warps from D = 64 on; IEEE products run on the CUDA cores and need the registers too.
    heavy = prec == "ieee" or width >= 64
    if kernel is _lla_bwd_dkdv:
        return dict(BN=64, BM=32, num_warps=8 if heavy else 4, num_stages=2)
    return dict(BM=64, BN=32 if width > 64 else 64, num_warps=8 if heavy else 4, num_stages=2)


def _launch(kernel, rows: int, bh: int, args, meta, device, width: int) -> None:
    """Grid (row blocks, B·H); the program's row block is ``BN`` for the dkdv kernel, else ``BM``."""
    own = "BN" if kernel is _lla_bwd_dkdv else "BM"
    if device.type == "cuda" and _AUTOTUNE:
        _TUNED[kernel.__name__][lambda m: (triton.cdiv(rows, m[own]), bh)](*args, **meta)
    else:
        fixed = _fixed(kernel, width, meta["PREC32"])
        kernel[(triton.cdiv(rows, fixed[own]), bh)](*args, **meta, **fixed)


def _alloc(shape, like: Tensor, dtype: torch.dtype) -> Tensor:
    """Buffers the kernels fill; NaN-filled when MNEMO_POISON=1 (tests) so unwritten elements fail."""
    if os.environ.get("MNEMO_POISON") == "1":
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def _dummy(like: Tensor) -> Tensor:
    """A valid pointer for an argument the kernel variant never touches."""
    return torch.empty(1, device=like.device, dtype=torch.float32)


def _bd(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _strides(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


# ---------------------------------------------------------------------------------------------
# Forward / backward implementations
# ---------------------------------------------------------------------------------------------


def _precision(dtype: torch.dtype) -> dict:
    """The products' precision constexprs for an input dtype (see the note above ``_dot32``)."""
    if dtype == torch.float32:
        return dict(PREC="ieee", PREC32="ieee", SPLIT=False)
    if dtype == torch.bfloat16:
        return dict(PREC="tf32", PREC32="tf32", SPLIT=True)
    return dict(PREC="tf32", PREC32="tf32x3", SPLIT=False)


def _common(q: Tensor, k: Tensor) -> tuple[int, int, int, int, int, int, dict]:
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    return b, tq, tk, h, d, h // hkv, _precision(q.dtype)


def _solve(q, k, m2, omega, mu, rhs, diag, ridge, scale, iters, precondition):
    """``iters`` CG steps on ``Σ_i x_i = rhs_i`` (``rhs [B·H, Tq, D]`` fp32) -> ``x`` like ``rhs``."""
    b, tq, tk, h, d, group, prec = _common(q, k)
    x = _alloc(rhs.shape, q, torch.float32)
    args = (q, k, m2, omega, mu, rhs, diag if precondition else _dummy(q), x, *_strides(q), *_strides(k),
            tq, tk, tk - tq, scale * LOG2E, ridge, iters, EPS2)
    meta = dict(H=h, GROUP=group, D=d, BD=_bd(d), PRECOND=precondition, **prec)
    _launch(_lla_cg, tq, b * h, args, meta, q.device, d)
    return x


def _fwd_impl(q, k, v, ridge, scale, iters, precondition):
    b, tq, tk, h, d, group, prec = _common(q, k)
    dv = v.shape[-1]
    rows = (b * h, tq)
    m2, omega, delta = (_alloc(rows, q, torch.float32) for _ in range(3))
    mu = _alloc((*rows, d), q, torch.float32)
    diag = _alloc((*rows, d), q, torch.float32) if precondition else q.new_empty(0, dtype=torch.float32)
    width = max(d, dv)
    meta = dict(H=h, GROUP=group, D=d, BD=_bd(d), PRECOND=precondition, **prec)
    args = (q, k, m2, omega, mu, diag if precondition else _dummy(q), *_strides(q), *_strides(k),
            tq, tk, tk - tq, scale * LOG2E, ridge)
    _launch(_lla_stats, tq, b * h, args, meta, q.device, d)
    rho = _solve(q, k, m2, omega, mu, mu, diag, ridge, scale, iters, precondition)
    o = _alloc((b, tq, h, dv), q, q.dtype)
    args = (q, k, v, m2, omega, mu, rho, o, delta, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            tq, tk, tk - tq, scale * LOG2E)
    meta = dict(H=h, GROUP=group, D=d, DV=dv, BD=_bd(d), BDV=_bd(dv), **prec)
    _launch(_lla_out, tq, b * h, args, meta, q.device, width)
    return o, m2, omega, delta, mu, rho, diag


def _bwd_impl(do, q, k, v, m2, omega, delta, mu, rho, diag, ridge, scale, iters, precondition):
    b, tq, tk, h, d, group, prec = _common(q, k)
    dv = v.shape[-1]
    width = max(d, dv)
    do = do.to(q.dtype)
    do = do if do.stride(-1) == 1 else do.contiguous()
    rows = (b * h, tq)
    gs = _alloc(rows, q, torch.float32)
    gh = _alloc((*rows, d), q, torch.float32)
    meta = dict(H=h, GROUP=group, D=d, DV=dv, BD=_bd(d), BDV=_bd(dv), **prec)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    _launch(_lla_bwd_stats, tq, b * h, (q, k, v, do, m2, gs, gh, *common, tq, tk, tk - tq, scale * LOG2E), meta, q.device, width)

    # Per-query algebra (fp32, [B·H, Tq] and [B·H, Tq, D]).
    qf = q.float().transpose(1, 2).reshape(b * h, tq, d)
    dinv = 1.0 / delta
    beta = 1.0 + (rho * qf).sum(-1)
    c = -(beta * gs - (rho * gh).sum(-1)) * dinv * dinv  # −gᵀo / δ, with gᵀo = (β GS − ρᵀGH) / δ
    g_rho = -(gh - gs[..., None] * qf) * dinv[..., None] - c[..., None] * mu
    u = _solve(q, k, m2, omega, mu, g_rho.contiguous(), diag, ridge, scale, iters, precondition)
    gamma = c - (u * qf).sum(-1)
    lur = ridge * (u * rho).sum(-1)
    dq_rows = rho * (gs * dinv + c * omega + (u * mu).sum(-1))[..., None] - delta[..., None] * u
    dq_rows = dq_rows.contiguous()

    dq = _alloc(q.shape, q, q.dtype)
    args = (q, k, v, do, m2, rho, u, dinv, beta, gamma, lur, dq_rows, dq, *common, *_strides(dq), tq, tk, tk - tq, scale * LOG2E, scale)
    _launch(_lla_bwd_dq, tq, b * h, args, meta, q.device, width)
    # With GQA, dK/dV are produced per query head (fp32) and summed over each group.
    kv_dtype = k.dtype if group == 1 else torch.float32
    dk = _alloc((b, tk, h, d), q, kv_dtype)
    dv_ = _alloc((b, tk, h, dv), q, kv_dtype)
    args = (q, k, v, do, m2, rho, u, dinv, beta, gamma, lur, dk, dv_, *common, *_strides(dk), *_strides(dv_),
            tq, tk, tk - tq, scale * LOG2E, scale)
    _launch(_lla_bwd_dkdv, tk, b * h, args, meta, q.device, width)
    if group > 1:
        dk = dk.view(b, tk, h // group, group, d).sum(3).to(k.dtype)
        dv_ = dv_.view(b, tk, h // group, group, dv).sum(3).to(v.dtype)
    return dq, dk, dv_


# ---------------------------------------------------------------------------------------------
# custom ops + autograd
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("mnemotorch::lla_cg_fwd", mutates_args=())
def lla_cg_fwd(
    q: Tensor, k: Tensor, v: Tensor, ridge: float, scale: float, iters: int, precondition: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(o [B, Tq, H, Dv], m2, ω, δ [B·H, Tq], μ, ρ [B·H, Tq, D], diag Σ [B·H, Tq, D] or empty)``, fp32 but o."""
    return _fwd_impl(q, k, v, ridge, scale, iters, precondition)


@lla_cg_fwd.register_fake
def _(q, k, v, ridge, scale, iters, precondition):
    b, tq, h, d = q.shape
    rows = (b * h, tq)
    f32 = torch.float32
    diag = q.new_empty((*rows, d) if precondition else (0,), dtype=f32)
    return (q.new_empty(b, tq, h, v.shape[-1]), q.new_empty(rows, dtype=f32), q.new_empty(rows, dtype=f32),
            q.new_empty(rows, dtype=f32), q.new_empty((*rows, d), dtype=f32), q.new_empty((*rows, d), dtype=f32), diag)


@torch.library.custom_op("mnemotorch::lla_cg_bwd", mutates_args=())
def lla_cg_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, m2: Tensor, omega: Tensor, delta: Tensor, mu: Tensor, rho: Tensor,
    diag: Tensor, ridge: float, scale: float, iters: int, precondition: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` by implicit differentiation (one adjoint CG solve)."""
    return _bwd_impl(do, q, k, v, m2, omega, delta, mu, rho, diag, ridge, scale, iters, precondition)


@lla_cg_bwd.register_fake
def _(do, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, ridge, scale, iters, precondition = inputs
    _, m2, omega, delta, mu, rho, diag = output
    ctx.save_for_backward(q, k, v, m2, omega, delta, mu, rho, diag)
    ctx.args = (ridge, scale, iters, precondition)


def _backward(ctx, do, *unused):
    q, k, v, m2, omega, delta, mu, rho, diag = ctx.saved_tensors
    if do is None:
        return None, None, None, None, None, None, None
    dq, dk, dv = lla_cg_bwd(do, q, k, v, m2, omega, delta, mu, rho, diag, *ctx.args)
    return dq, dk, dv, None, None, None, None


lla_cg_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public entry point (argument checks name the argument and the allowed values)
# ---------------------------------------------------------------------------------------------


def kernel_support(fn: str, q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """``None`` when the kernels support these (already shape-checked) inputs, else the reason."""
    if q.dtype not in KERNEL_DTYPES:
        return f"{fn}: backend 'triton' supports float16, bfloat16 and float32 inputs, got {q.dtype} (use backend='reference')"
    d, dv = q.shape[-1], v.shape[-1]
    if not 1 <= d <= MAX_D:
        return f"{fn}: backend 'triton' supports q/k head dims 1..{MAX_D}, got {d} (use backend='reference')"
    if not 1 <= dv <= MAX_DV:
        return f"{fn}: backend 'triton' supports value head dims 1..{MAX_DV}, got {dv} (use backend='reference')"
    return None


def lla_cg_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ridge: float = 1.0,
    scale: float | None = None,
    cg_iters: int = 32,
    precondition: bool = False,
) -> Tensor:
    """Causal LLA by blockwise conjugate gradient through the Triton kernels (forward and backward).

    Args:
        q: ``[B, Tq, H, D]`` queries; query ``i`` sits at absolute key position ``Tk − Tq + i``.
        k: ``[B, Tk, Hkv, D]`` keys (``H % Hkv == 0``); v: ``[B, Tk, Hkv, Dv]`` values.
            float16 / bfloat16 / float32, ``D, Dv ≤ 128``.
        ridge: λ > 0. scale: τ > 0 (default ``D ** -0.5``).
        cg_iters: fixed number of CG iterations (>= 1), in the forward and in the backward's adjoint solve.
        precondition: Jacobi-precondition both CG solves.

    Returns:
        ``[B, Tq, H, Dv]`` in the dtype of ``q`` (computed in float32).
    """
    fn = "lla_cg_triton"
    check_lla_qkv(fn, q, k, v)
    ridge = check_ridge(fn, ridge)
    tau = check_scale(fn, scale, q.shape[-1])
    if isinstance(cg_iters, bool) or not isinstance(cg_iters, int) or cg_iters < 1:
        raise ValueError(f"{fn}: cg_iters must be an int >= 1, got {cg_iters!r}")
    if not isinstance(precondition, bool):
        raise TypeError(f"{fn}: precondition must be a bool, got {precondition!r}")
    reason = kernel_support(fn, q, k, v)
    if reason is not None:
        raise (NotImplementedError if q.dtype not in KERNEL_DTYPES else ValueError)(reason)
    if q.numel() == 0:
        return v.new_zeros(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
    # The kernels need a contiguous last dim; other strides are passed through.
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return lla_cg_fwd(q, k, v, ridge, tau, cg_iters, precondition)[0]


__all__ = ["KERNEL_DTYPES", "MAX_D", "MAX_DV", "kernel_support", "lla_cg_fwd", "lla_cg_bwd", "lla_cg_triton"]
