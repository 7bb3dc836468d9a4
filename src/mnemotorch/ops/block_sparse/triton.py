"""Triton kernels of block-sparse attention (FlashAttention-2 style; forward and backward).

One program handles one (query block, batch * head) pair in the forward and dQ kernels, and one
(key block, batch * head) pair in the dK/dV kernel. They walk the pattern's block lists: *full*
blocks without any mask work, then *partial* blocks with their element-mask tile.

Scores live in the base-2 domain (``s * scale * log2(e)``) so the softmax uses ``exp2``; the
forward saves ``lse2 = m + log2(l)`` per row (``+inf`` for rows with no allowed key, whose output
is 0), from which the backward recomputes probabilities.
With 16-bit inputs the forward also writes the output's rounding residual (``o_lo``, when a
backward will run), so that the backward's ``Delta = rowsum(dO * O)`` uses the fp32 output: from
the rounded output, Delta's error is amplified when a row's softmax is peaked (shared Q/K), see
``_bwd_preprocess``.
By default (``DELTA_IN_DQ``, env ``MNEMO_BS_DELTA=preprocess`` restores the old order) the backward
runs no preprocess pass: the dQ kernel (``DELTA_IN``) computes Delta of its query block itself from
dO (which it loads anyway), O and ``o_lo``, stores it and runs first; the dK/dV kernel runs after
and reads the stored Delta (the order of the sliding-window kernels' ``delta`` option).

Registered as ``torch.library.custom_op``s (``mnemotorch::block_sparse_attn_fwd`` / ``_bwd``) with
an autograd formula, so ``torch.compile`` traces through them.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    """``a @ b`` with fp32 accumulation; exact fp32 products (no TF32) when ``IEEE``."""
    if IEEE:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _ld_full(ptrs, d_ok, EVEN_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile whose rows all exist. With ``EVEN_D`` (BLOCK_D == D) no mask at
    all: a mask along the contiguous head dim would stop the compiler from vectorising the load."""
    if EVEN_D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return x


@triton.jit
def _ld_rows(ptrs, row_ok, d_ok, EVEN_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile, rows masked by ``row_ok`` (zeros there)."""
    if EVEN_D:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    return x


@triton.jit
def _st_rows(ptrs, x, row_ok, d_ok, EVEN_D: tl.constexpr):
    if EVEN_D:
        tl.store(ptrs, x, mask=row_ok[:, None])
    else:
        tl.store(ptrs, x, mask=row_ok[:, None] & d_ok[None, :])


# Relative-position bias (ops/block_sparse/bias.py): up to two table terms, each read at
# clamp(k_coord - q_coord, 0, R - 1) from a table [B|1, Lq|1, H|1, R] (strides 0 on broadcast axes).
# NB (constexpr) = number of terms; NB = 0 compiles every bias line away.


@triton.jit
def _bias2(T, sb, si, sh, R, b, h, trow, qc, kc):
    """Bias of a tile in the base-2 domain; ``trow`` (table row = query), ``qc``, ``kc`` broadcast to the tile."""
    idx = tl.minimum(tl.maximum(kc - qc, 0), R - 1)
    val = tl.load(T + b.to(tl.int64) * sb + h * sh + trow.to(tl.int64) * si + idx)
    return val.to(tl.float32) * 1.4426950408889634


@triton.jit
def _bias_grad(DT, sb, si, sh, R, b, h, trow, qc, kc, ds, ok):
    """Accumulate dLoss/dlogit of a tile into the (fp32) table gradient; colliding indices add up."""
    idx = tl.minimum(tl.maximum(kc - qc, 0), R - 1)
    tl.atomic_add(DT + b.to(tl.int64) * sb + h * sh + trow.to(tl.int64) * si + idx, ds, mask=ok, sem="relaxed")


# Tiling. A program owns one pattern block (queries in the forward and dQ kernels, keys in the
# dK/dV kernel) and walks its block list. Each listed block is consumed in sub-slices of SUB rows
# (SUB divides the block), so the loop body works on [block, SUB] tiles: smaller operand tiles and
# score tiles keep registers free and let the pipeliner keep more loads in flight (num_stages),
# and the loop runs flat over (list entry, slice) so the pipeliner sees one loop.


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, OLO,
    FULL_IDX, FULL_CNT, PART_IDX, PART_TILE, PART_CNT, TILES,
    QC, KC, T0, T1, sb0, si0, sh0, R0, sb1, si1, sh1, R1,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
    list_stride_f, list_stride_p,
    qk_scale, Lq, Lk,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, SUB: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr,
    NB: tl.constexpr = 0, STORE_LO: tl.constexpr = False,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    NS = BN // SUB
    offs_m = qb * BM + tl.arange(0, BM)
    offs_s = tl.arange(0, SUB)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < Lq
    q_ptr = Q + b.to(tl.int64) * sqb + h * sqh
    k_ptr = K + b.to(tl.int64) * skb + hk * skh
    v_ptr = V + b.to(tl.int64) * svb + hk * svh
    q = _ld_rows(q_ptr + offs_m[:, None].to(tl.int64) * sqt + offs_d[None, :], m_ok, d_ok, EVEN_D)
    qrow = tl.minimum(offs_m, Lq - 1)  # table row / coordinate index (rows past the end: masked later)
    qc0 = qrow
    qc1 = qrow
    if NB >= 1:
        qc0 = tl.load(QC + qrow)
    if NB >= 2:
        qc1 = tl.load(QC + Lq + qrow)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BLOCK_D], tl.float32)

    n_full = tl.load(FULL_CNT + qb)
    for it in range(0, n_full * NS):
        kb = tl.load(FULL_IDX + qb * list_stride_f + it // NS)
        rows = kb * BN + (it % NS) * SUB + offs_s
        k = _ld_full(k_ptr + rows[:, None].to(tl.int64) * skt + offs_d[None, :], d_ok, EVEN_D)
        v = _ld_full(v_ptr + rows[:, None].to(tl.int64) * svt + offs_d[None, :], d_ok, EVEN_D)
        s = _mm(q, tl.trans(k), IEEE) * qk_scale
        if NB >= 1:
            s += _bias2(T0, sb0, si0, sh0, R0, b, h, qrow[:, None], qc0[:, None], tl.load(KC + rows)[None, :])
        if NB >= 2:
            s += _bias2(T1, sb1, si1, sh1, R1, b, h, qrow[:, None], qc1[:, None], tl.load(KC + Lk + rows)[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, IEEE)
        m_i = m_new

    n_part = tl.load(PART_CNT + qb)
    for it in range(0, n_part * NS):
        kb = tl.load(PART_IDX + qb * list_stride_p + it // NS)
        t = tl.load(PART_TILE + qb * list_stride_p + it // NS)
        cols = (it % NS) * SUB + offs_s
        rows = kb * BN + cols
        n_ok = rows < Lk
        k = _ld_rows(k_ptr + rows[:, None].to(tl.int64) * skt + offs_d[None, :], n_ok, d_ok, EVEN_D)
        v = _ld_rows(v_ptr + rows[:, None].to(tl.int64) * svt + offs_d[None, :], n_ok, d_ok, EVEN_D)
        allowed = tl.load(TILES + t.to(tl.int64) * (BM * BN) + tl.arange(0, BM)[:, None] * BN + cols[None, :]) != 0
        s = _mm(q, tl.trans(k), IEEE) * qk_scale
        if NB >= 1:
            krow = tl.minimum(rows, Lk - 1)
            s += _bias2(T0, sb0, si0, sh0, R0, b, h, qrow[:, None], qc0[:, None], tl.load(KC + krow)[None, :])
            if NB >= 2:
                s += _bias2(T1, sb1, si1, sh1, R1, b, h, qrow[:, None], qc1[:, None], tl.load(KC + Lk + krow)[None, :])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows that have seen no allowed key yet keep m = -inf; subtract 0 instead to avoid NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, IEEE)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    o_off = b.to(tl.int64) * sob + h * soh + offs_m[:, None].to(tl.int64) * sot + offs_d[None, :]
    o_lp = out.to(O.dtype.element_ty)
    _st_rows(O + o_off, o_lp, m_ok, d_ok, EVEN_D)
    if STORE_LO:  # the rounding residual of a 16-bit output (same layout as O), for the backward's Delta
        _st_rows(OLO + o_off, (out - o_lp.to(tl.float32)).to(OLO.dtype.element_ty), m_ok, d_ok, EVEN_D)
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, lse, mask=m_ok)


@triton.jit
def _dq_delta(O, OLO, DELTA, do, b, h, bh, sob, sot, soh, offs_m, offs_d, m_ok, d_ok, Lq, EVEN_D: tl.constexpr, HAS_LO: tl.constexpr):
    """Delta = rowsum(dO * O) of a dQ program's query rows, from the fp32 output (O + its rounding residual
    OLO, as ``_bwd_preprocess`` computes it), stored for the dK/dV kernel that runs after and returned: the
    dQ kernel holds ``do`` already, so the preprocess pass (a read of O, OLO and dO) is saved."""
    o_off = b.to(tl.int64) * sob + h * soh + offs_m[:, None].to(tl.int64) * sot + offs_d[None, :]
    o = _ld_rows(O + o_off, m_ok, d_ok, EVEN_D).to(tl.float32)
    if HAS_LO:
        o += _ld_rows(OLO + o_off, m_ok, d_ok, EVEN_D).to(tl.float32)
    delta = tl.sum(o * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * Lq + offs_m, delta, mask=m_ok)
    return delta


@triton.jit
def _bwd_preprocess(O, OLO, DO, DELTA, sob, sot, soh, sdob, sdot, sdoh, Lq, H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr,
                    HAS_LO: tl.constexpr = False):
    # Delta = rowsum(dO * O) with O the forward's fp32 output: a 16-bit output is completed by its
    # rounding residual (OLO, same strides as O). Delta must equal rowsum(P * dP) of the P the
    # backward recomputes; from the rounded O its error |dO| |O| 2^-9 is not small next to
    # dP - Delta when the softmax is peaked (q == k: the diagonal logit |q|^2 / sqrt(D) dominates
    # and dP_ii - Delta_i -> 0), which made bf16 dQ (+ dK) 7x worse than an fp32-internal peer.
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = qb * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
    rows = offs_m[:, None].to(tl.int64)
    o_off = b.to(tl.int64) * sob + h * soh + rows * sot + offs_d[None, :]
    o = tl.load(O + o_off, mask=msk, other=0.0).to(tl.float32)
    if HAS_LO:
        o += tl.load(OLO + o_off, mask=msk, other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * sdob + h * sdoh + rows * sdot + offs_d[None, :], mask=msk, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    T_FULL_IDX, T_FULL_CNT, T_PART_IDX, T_PART_TILE, T_PART_CNT, TILES,
    QC, KC, T0, T1, sb0, si0, sh0, R0, sb1, si1, sh1, R1,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh, sdkb, sdkt, sdkh,
    list_stride_f, list_stride_p,
    qk_scale, sm_scale, Lq, Lk,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, SUB: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr,
    NB: tl.constexpr = 0,
):
    # One program: key block kb of query head h, walking the query blocks that see it in slices
    # of SUB queries; dK/dV are written per query head (summed over the GQA group outside).
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    NS = BM // SUB
    offs_n = kb * BN + tl.arange(0, BN)
    offs_s = tl.arange(0, SUB)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_ok = offs_n < Lk
    k = _ld_rows(K + b.to(tl.int64) * skb + hk * skh + offs_n[:, None].to(tl.int64) * skt + offs_d[None, :], n_ok, d_ok, EVEN_D)
    v = _ld_rows(V + b.to(tl.int64) * svb + hk * svh + offs_n[:, None].to(tl.int64) * svt + offs_d[None, :], n_ok, d_ok, EVEN_D)
    krow = tl.minimum(offs_n, Lk - 1)
    kc0 = krow
    kc1 = krow
    if NB >= 1:
        kc0 = tl.load(KC + krow)
    if NB >= 2:
        kc1 = tl.load(KC + Lk + krow)
    dk = tl.zeros([BN, BLOCK_D], tl.float32)
    dv = tl.zeros([BN, BLOCK_D], tl.float32)
    q_base = Q + b.to(tl.int64) * sqb + h * sqh
    do_base = DO + b.to(tl.int64) * sdob + h * sdoh
    stat_base = bh.to(tl.int64) * Lq

    n_full = tl.load(T_FULL_CNT + kb)
    for it in range(0, n_full * NS):
        qb = tl.load(T_FULL_IDX + kb * list_stride_f + it // NS)
        offs_m = qb * BM + (it % NS) * SUB + offs_s
        q = _ld_full(q_base + offs_m[:, None].to(tl.int64) * sqt + offs_d[None, :], d_ok, EVEN_D)
        do = _ld_full(do_base + offs_m[:, None].to(tl.int64) * sdot + offs_d[None, :], d_ok, EVEN_D)
        lse = tl.load(LSE + stat_base + offs_m)
        delta = tl.load(DELTA + stat_base + offs_m)
        st = _mm(k, tl.trans(q), IEEE) * qk_scale
        if NB >= 1:
            st += _bias2(T0, sb0, si0, sh0, R0, b, h, offs_m[None, :], tl.load(QC + offs_m)[None, :], kc0[:, None])
        if NB >= 2:
            st += _bias2(T1, sb1, si1, sh1, R1, b, h, offs_m[None, :], tl.load(QC + Lq + offs_m)[None, :], kc1[:, None])
        pt = tl.math.exp2(st - lse[None, :])
        dv += _mm(pt.to(do.dtype), do, IEEE)
        dst = pt * (_mm(v, tl.trans(do), IEEE) - delta[None, :])
        dk += _mm(dst.to(q.dtype), q, IEEE)

    n_part = tl.load(T_PART_CNT + kb)
    for it in range(0, n_part * NS):
        qb = tl.load(T_PART_IDX + kb * list_stride_p + it // NS)
        t = tl.load(T_PART_TILE + kb * list_stride_p + it // NS)
        rows_in_tile = (it % NS) * SUB + offs_s
        offs_m = qb * BM + rows_in_tile
        m_ok = offs_m < Lq
        q = _ld_rows(q_base + offs_m[:, None].to(tl.int64) * sqt + offs_d[None, :], m_ok, d_ok, EVEN_D)
        do = _ld_rows(do_base + offs_m[:, None].to(tl.int64) * sdot + offs_d[None, :], m_ok, d_ok, EVEN_D)
        lse = tl.load(LSE + stat_base + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + stat_base + offs_m, mask=m_ok, other=0.0)
        allowed_t = tl.load(TILES + t.to(tl.int64) * (BM * BN) + rows_in_tile[None, :] * BN + tl.arange(0, BN)[:, None]) != 0
        st = _mm(k, tl.trans(q), IEEE) * qk_scale
        if NB >= 1:
            qrow = tl.minimum(offs_m, Lq - 1)
            st += _bias2(T0, sb0, si0, sh0, R0, b, h, qrow[None, :], tl.load(QC + qrow)[None, :], kc0[:, None])
            if NB >= 2:
                st += _bias2(T1, sb1, si1, sh1, R1, b, h, qrow[None, :], tl.load(QC + Lq + qrow)[None, :], kc1[:, None])
        pt = tl.where(allowed_t, tl.math.exp2(st - lse[None, :]), 0.0)
        dv += _mm(pt.to(do.dtype), do, IEEE)
        dst = pt * (_mm(v, tl.trans(do), IEEE) - delta[None, :])
        dk += _mm(dst.to(q.dtype), q, IEEE)

    out_off = b.to(tl.int64) * sdkb + h * sdkh + offs_n[:, None].to(tl.int64) * sdkt + offs_d[None, :]
    _st_rows(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), n_ok, d_ok, EVEN_D)
    _st_rows(DV + out_off, dv.to(DV.dtype.element_ty), n_ok, d_ok, EVEN_D)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    FULL_IDX, FULL_CNT, PART_IDX, PART_TILE, PART_CNT, TILES,
    QC, KC, T0, T1, sb0, si0, sh0, R0, sb1, si1, sh1, R1, DT0, DT1,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh, sdqb, sdqt, sdqh,
    list_stride_f, list_stride_p,
    qk_scale, sm_scale, Lq, Lk,
    O, OLO, sob, sot, soh,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, SUB: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr,
    NB: tl.constexpr = 0, DELTA_IN: tl.constexpr = False, HAS_LO: tl.constexpr = False,
):
    # DELTA_IN: this kernel computes Delta = rowsum(dO * O) of its query block itself (from the fp32
    # output O + OLO, as _bwd_preprocess does), stores it to DELTA and runs before the dK/dV kernel,
    # which reads it; else it reads the DELTA of _bwd_preprocess (O, OLO, so* unused).
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    NS = BN // SUB
    offs_m = qb * BM + tl.arange(0, BM)
    offs_s = tl.arange(0, SUB)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < Lq
    q = _ld_rows(Q + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqt + offs_d[None, :], m_ok, d_ok, EVEN_D)
    do = _ld_rows(DO + b.to(tl.int64) * sdob + h * sdoh + offs_m[:, None].to(tl.int64) * sdot + offs_d[None, :], m_ok, d_ok, EVEN_D)
    lse = tl.load(LSE + bh.to(tl.int64) * Lq + offs_m, mask=m_ok, other=float("inf"))
    if DELTA_IN:
        delta = _dq_delta(O, OLO, DELTA, do, b, h, bh, sob, sot, soh, offs_m, offs_d, m_ok, d_ok, Lq, EVEN_D, HAS_LO)
    else:
        delta = tl.load(DELTA + bh.to(tl.int64) * Lq + offs_m, mask=m_ok, other=0.0)
    qrow = tl.minimum(offs_m, Lq - 1)
    qc0 = qrow
    qc1 = qrow
    if NB >= 1:
        qc0 = tl.load(QC + qrow)
    if NB >= 2:
        qc1 = tl.load(QC + Lq + qrow)
    dq = tl.zeros([BM, BLOCK_D], tl.float32)
    k_base = K + b.to(tl.int64) * skb + hk * skh
    v_base = V + b.to(tl.int64) * svb + hk * svh

    n_full = tl.load(FULL_CNT + qb)
    for it in range(0, n_full * NS):
        kb = tl.load(FULL_IDX + qb * list_stride_f + it // NS)
        rows = kb * BN + (it % NS) * SUB + offs_s
        k = _ld_full(k_base + rows[:, None].to(tl.int64) * skt + offs_d[None, :], d_ok, EVEN_D)
        v = _ld_full(v_base + rows[:, None].to(tl.int64) * svt + offs_d[None, :], d_ok, EVEN_D)
        s = _mm(q, tl.trans(k), IEEE) * qk_scale
        if NB >= 1:
            kc0 = tl.load(KC + rows)
            s += _bias2(T0, sb0, si0, sh0, R0, b, h, qrow[:, None], qc0[:, None], kc0[None, :])
        if NB >= 2:
            kc1 = tl.load(KC + Lk + rows)
            s += _bias2(T1, sb1, si1, sh1, R1, b, h, qrow[:, None], qc1[:, None], kc1[None, :])
        p = tl.math.exp2(s - lse[:, None])
        ds = p * (_mm(do, tl.trans(v), IEEE) - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, IEEE)
        if NB >= 1:  # every (query, key) pair is visited once here: the table gradient is dS
            _bias_grad(DT0, sb0, si0, sh0, R0, b, h, qrow[:, None], qc0[:, None], kc0[None, :], ds, m_ok[:, None])
        if NB >= 2:
            _bias_grad(DT1, sb1, si1, sh1, R1, b, h, qrow[:, None], qc1[:, None], kc1[None, :], ds, m_ok[:, None])

    n_part = tl.load(PART_CNT + qb)
    for it in range(0, n_part * NS):
        kb = tl.load(PART_IDX + qb * list_stride_p + it // NS)
        t = tl.load(PART_TILE + qb * list_stride_p + it // NS)
        cols = (it % NS) * SUB + offs_s
        rows = kb * BN + cols
        n_ok = rows < Lk
        k = _ld_rows(k_base + rows[:, None].to(tl.int64) * skt + offs_d[None, :], n_ok, d_ok, EVEN_D)
        v = _ld_rows(v_base + rows[:, None].to(tl.int64) * svt + offs_d[None, :], n_ok, d_ok, EVEN_D)
        allowed = tl.load(TILES + t.to(tl.int64) * (BM * BN) + tl.arange(0, BM)[:, None] * BN + cols[None, :]) != 0
        s = _mm(q, tl.trans(k), IEEE) * qk_scale
        if NB >= 1:
            krow = tl.minimum(rows, Lk - 1)
            kc0 = tl.load(KC + krow)
            s += _bias2(T0, sb0, si0, sh0, R0, b, h, qrow[:, None], qc0[:, None], kc0[None, :])
            if NB >= 2:
                kc1 = tl.load(KC + Lk + krow)
                s += _bias2(T1, sb1, si1, sh1, R1, b, h, qrow[:, None], qc1[:, None], kc1[None, :])
        p = tl.where(allowed, tl.math.exp2(s - lse[:, None]), 0.0)
        ds = p * (_mm(do, tl.trans(v), IEEE) - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, IEEE)
        if NB >= 1:
            _bias_grad(DT0, sb0, si0, sh0, R0, b, h, qrow[:, None], qc0[:, None], kc0[None, :], ds, allowed)
            if NB >= 2:
                _bias_grad(DT1, sb1, si1, sh1, R1, b, h, qrow[:, None], qc1[:, None], kc1[None, :], ds, allowed)

    _st_rows(DQ + b.to(tl.int64) * sdqb + h * sdqh + offs_m[:, None].to(tl.int64) * sdqt + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), m_ok, d_ok, EVEN_D)


def _num_warps(rows: int, d: int) -> int:
    return 8 if rows * d >= 128 * 128 else 4


#: Slice size of the fixed (non-autotuned) launch; tests lower it to exercise slicing.
FIXED_SUB = 64
# On a GPU the launch parameters (slice size, warps, stages) are autotuned once per (head dim,
# pattern blocks, precision, GQA group, bias terms); under the CPU interpreter (tests) the plain
# kernels run with fixed parameters. MNEMO_AUTOTUNE picks the search space on the GPU:
#   "1" / "full" (default) -- 6 configs per kernel and sliced block size;
#   "small"                -- 2 configs (for benchmarks whose budget compile time would eat);
#   "0" / "off"            -- no tuning: the fixed launch (fastest first calls, e.g. in tests).
AUTOTUNE_MODES = ("full", "small", "off")
_AUTOTUNE_ALIASES = {"1": "full", "0": "off"}
_AUTOTUNE_MODE = _AUTOTUNE_ALIASES.get(os.environ.get("MNEMO_AUTOTUNE", "1"), os.environ.get("MNEMO_AUTOTUNE", "1"))
if _AUTOTUNE_MODE not in AUTOTUNE_MODES:
    raise ValueError(f"MNEMO_AUTOTUNE must be one of 1, 0, {', '.join(AUTOTUNE_MODES)}; got {os.environ.get('MNEMO_AUTOTUNE')!r}")
_AUTOTUNE = _AUTOTUNE_MODE != "off"
#: Backward order: ``True`` (default) -- the dQ kernel computes Delta = rowsum(dO * O) of its query
#: block itself (it loads dO anyway), stores it and runs first, dK/dV after it reads the stored Delta:
#: no ``_bwd_preprocess`` pass. ``False`` -- preprocess, dK/dV, dQ (the earlier order). Env override:
#: MNEMO_BS_DELTA=preprocess (or =dq). Read at each backward call, so it can be flipped in a process.
_DELTA_ENV = os.environ.get("MNEMO_BS_DELTA", "dq")
if _DELTA_ENV not in ("dq", "preprocess"):
    raise ValueError(f"MNEMO_BS_DELTA must be 'dq' or 'preprocess', got {_DELTA_ENV!r}")
DELTA_IN_DQ = _DELTA_ENV == "dq"
_TUNE_KEY = ["D", "BM", "BN", "IEEE", "GROUP", "NB"]
_TUNED: dict = {}


def set_autotune(mode: str) -> None:
    """Choose the GPU launch-parameter search: ``"full"`` (6 configs per kernel), ``"small"``
    (2 configs) or ``"off"`` (fixed launch). Forgets the choices made so far in this process."""
    global _AUTOTUNE_MODE, _AUTOTUNE
    mode = _AUTOTUNE_ALIASES.get(str(mode), str(mode))
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"set_autotune: mode must be one of {AUTOTUNE_MODES}, got {mode!r}")
    _AUTOTUNE_MODE, _AUTOTUNE = mode, mode != "off"
    _TUNED.clear()
    _CHOSEN.clear()


def _sub_choices(block: int) -> list[int]:
    return [s for s in (32, 64) if s <= block and block % s == 0] or [block]


def _tuned(kernel, block: int):
    """The autotuned ``kernel`` for one size of the sliced block (one tuner per size).

    Six configs per kernel ("full"): every tuned config is a separate compilation, and an H100 run
    with twelve took minutes before the first result, so the space is kept to the choices that
    matter (slice 32 or 64; 4 warps with 3 stages, 8 warps with 2 or 3 -- a plain Triton
    FlashAttention forward on the H100 was fastest with 8 warps and 3-4 stages, ../shared/peers).
    "small" keeps two of them: the largest slice with 8 warps / 3 stages and the smallest with
    4 warps / 3 stages. The dQ kernel accumulates the bias-table gradient with atomics, so its
    tuner zeroes those buffers between trial runs.
    """
    key = (id(kernel), block, _AUTOTUNE_MODE)
    if key not in _TUNED:
        subs = _sub_choices(block)
        if _AUTOTUNE_MODE == "small":
            space = [(subs[-1], 8, 3), (subs[0], 4, 3)] if len(subs) > 1 else [(subs[0], 8, 3), (subs[0], 4, 3)]
        else:
            space = [(sub, w, st) for sub in subs for (w, st) in ((4, 3), (8, 2), (8, 3))]
        configs = [triton.Config({"SUB": sub}, num_warps=w, num_stages=st) for sub, w, st in space]
        reset = ["DT0", "DT1"] if kernel is _bwd_dq_kernel else None
        tune_key = _TUNE_KEY + ["DELTA_IN", "HAS_LO"] if kernel is _bwd_dq_kernel else _TUNE_KEY
        _TUNED[key] = triton.autotune(configs, key=tune_key, reset_to_zero=reset)(kernel)
    return _TUNED[key]


def tuned_configs() -> dict[str, str]:
    """The launch configs the autotuner chose so far in this process (for benchmark records)."""
    names = {id(_fwd_kernel): "fwd", id(_bwd_dkdv_kernel): "bwd_dkdv", id(_bwd_dq_kernel): "bwd_dq"}
    out = {}
    for (kid, block, mode), tuner in _TUNED.items():
        for key, cfg in getattr(tuner, "cache", {}).items():
            out[f"{names.get(kid, kid)}[slice of {block}, {mode}] {key}"] = str(cfg)
    return out


#: Launch parameters the autotuner chose, per (kernel, sliced block, mode, tuning key, argument
#: dtypes): after the first (tuning) call every launch goes straight to the JIT function, skipping
#: the autotuner's per-call work (argument dicts, key building) on the host.
_CHOSEN: dict = {}


def _cdiv(a: int, b: int) -> int:
    # plain Python: triton.cdiv / next_power_of_2 are constexpr_function wrappers (several us a call)
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _launch(kernel, sliced: int, rows: int, grid, args, meta, device):
    """Launch ``kernel``; ``sliced`` is the block size cut into SUB slices, ``rows`` the program's own block."""
    if device.type == "cuda" and _AUTOTUNE:
        key = (id(kernel), sliced, _AUTOTUNE_MODE, *(meta[k] for k in _TUNE_KEY), meta.get("DELTA_IN"), meta.get("HAS_LO"),
               *(a.dtype for a in args if isinstance(a, Tensor)))
        cfg = _CHOSEN.get(key)
        if cfg is None:
            tuner = _tuned(kernel, sliced)
            tuner[grid](*args, **meta)
            best = tuner.best_config
            _CHOSEN[key] = (best.kwargs["SUB"], best.num_warps, best.num_stages)
            return
        sub, warps, stages = cfg
    else:
        sub, warps, stages = fixed_launch(sliced, rows, meta["D"], meta["IEEE"], meta["BLOCK_D"])
    kernel[grid](*args, **meta, SUB=sub, num_warps=warps, num_stages=stages)


def fixed_launch(sliced: int, rows: int, d: int, ieee: bool, block_d: int | None = None) -> tuple[int, int, int]:
    """(SUB, num_warps, num_stages) of the fixed (non-autotuned) launch.

    fp32 operands (``ieee``) at a padded head dim (``block_d``) >= 128 take slices of at most 32 rows: with 64-row slices
    the dK/dV kernel's tiles plus two pipeline stages need 237,568 bytes of shared memory, over
    the H100's 232,448 (an OutOfResources seen on the H100 with MNEMO_AUTOTUNE=0, fp32, D = 128).
    """
    sub = min(FIXED_SUB, sliced)
    if ieee and (block_d or d) >= 128:
        sub = min(sub, 32)
    while sliced % sub:
        sub //= 2
    return sub, _num_warps(rows, d), 2


def _alloc(like: Tensor, shape=None, dtype=None) -> Tensor:
    """Output buffers; NaN-filled when MNEMO_POISON=1 (tests) so unwritten elements fail."""
    shape = like.shape if shape is None else shape
    dtype = like.dtype if dtype is None else dtype
    if _POISON_ENV in os.environ and os.environ[_POISON_ENV] == "1":
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


_POISON_ENV = "MNEMO_POISON"
_DUMMIES: dict = {}


def _dummy(device: torch.device, dtype: torch.dtype) -> Tensor:
    """A one-element buffer standing in for absent bias operands (never read; cached per device)."""
    key = (device, dtype)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(1, device=device, dtype=dtype)
    return _DUMMIES[key]


def _bias_operands(q: Tensor, bias) -> tuple[tuple, int]:
    """Kernel arguments ``(QC, KC, T0, T1, sb0, si0, sh0, R0, sb1, si1, sh1, R1)`` and the term count.

    ``bias``: ``None`` or ``(q_coords, k_coords, tables)`` with tables contiguous ``[B|1, Lq|1, H|1, R]``.
    Without a bias the pointers are a dummy buffer no kernel reads (NB = 0 compiles the reads away).
    """
    if bias is None:
        dummy = _dummy(q.device, torch.int32)
        return (dummy, dummy, dummy, dummy, 0, 0, 0, 1, 0, 0, 0, 1), 0
    qc, kc, tables = bias
    per_term = []
    for t in tables:
        per_term.append((t, *(t.stride(a) if t.shape[a] > 1 else 0 for a in range(3)), t.shape[3]))
    if len(per_term) == 1:
        per_term.append((per_term[0][0], 0, 0, 0, 1))
    (t0, *s0), (t1, *s1) = per_term
    return (qc, kc, t0, t1, *s0, *s1), len(tables)


def _fwd_impl(q, k, v, full_idx, full_cnt, part_idx, part_tile, part_cnt, tiles, scale, q_block, k_block, bias=None, need_lo=False):
    """``(o, lse, o_lo)``: with ``need_lo`` (for a backward) and a 16-bit ``q``, ``o_lo`` is the rounding
    residual of ``o`` (``o + o_lo`` = the kernel's fp32 output to ~2^-17), else ``None``."""
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    o = _alloc(q)
    lse = _alloc(q, (b, h, lq), torch.float32)
    store_lo = need_lo and q.dtype != torch.float32
    o_lo = _alloc(q) if store_lo else None  # same shape and strides as o
    grid = (_cdiv(lq, q_block), b * h)
    bias_args, nb = _bias_operands(q, bias)
    args = (
        q, k, v, o, lse, o_lo if store_lo else lse, full_idx, full_cnt, part_idx, part_tile, part_cnt, tiles, *bias_args,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        full_idx.stride(0), part_idx.stride(0),
        scale * LOG2E, lq, lk,
    )
    bd = _pow2(d)
    meta = dict(H=h, GROUP=h // hkv, D=d, BLOCK_D=bd, BM=q_block, BN=k_block, IEEE=q.dtype == torch.float32, EVEN_D=bd == d, NB=nb,
                STORE_LO=store_lo)
    _launch(_fwd_kernel, k_block, q_block, grid, args, meta, q.device)
    return o, lse, o_lo


def _bwd_impl(do, q, k, v, o, lse, lists, scale, q_block, k_block, bias=None, o_lo=None):
    """dQ, dK, dV (and, with ``bias``, the fp32 gradients of the bias tables, same shapes).

    ``o_lo``: the forward's rounding residual of a 16-bit ``o`` (``None`` or empty: none)."""
    (full_idx, full_cnt, part_idx, part_tile, part_cnt, tiles, t_full_idx, t_full_cnt, t_part_idx, t_part_tile, t_part_cnt) = lists
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    group = h // hkv
    do = do.contiguous() if do.stride(-1) != 1 else do
    delta = _alloc(q, (b, h, lq), torch.float32)
    bd = _pow2(d)
    has_lo = o_lo is not None and o_lo.numel() > 0
    if has_lo and o_lo.stride() != o.stride():
        raise ValueError(f"block_sparse backward: o_lo must have o's strides, got {o_lo.stride()} and {o.stride()}")
    delta_in = DELTA_IN_DQ
    if not delta_in:
        _bwd_preprocess[(_cdiv(lq, q_block), b * h)](o, o_lo if has_lo else o, do, delta, o.stride(0), o.stride(1), o.stride(2),
                                                     do.stride(0), do.stride(1), do.stride(2), lq, H=h, D=d, BLOCK_D=bd, BM=q_block,
                                                     HAS_LO=has_lo)
    # With GQA, dK/dV are produced per query head (in fp32) and summed over each group.
    kv_dtype = k.dtype if group == 1 else torch.float32
    dk = _alloc(q, (b, lk, h, d), kv_dtype)
    dv = _alloc(q, (b, lk, h, d), kv_dtype)
    bias_args, nb = _bias_operands(q, bias)
    meta = dict(H=h, GROUP=group, D=d, BLOCK_D=bd, BM=q_block, BN=k_block, IEEE=q.dtype == torch.float32, EVEN_D=bd == d, NB=nb)
    dkdv_args = (
        q, k, v, do, lse, delta, dk, dv, t_full_idx, t_full_cnt, t_part_idx, t_part_tile, t_part_cnt, tiles, *bias_args,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
        t_full_idx.stride(0), t_part_idx.stride(0),
        scale * LOG2E, scale, lq, lk,
    )
    dq = _alloc(q)
    # Table gradients are accumulated (atomics): zero-initialised fp32, never poisoned. Without a
    # bias, a dummy that nothing reads (the dQ tuner zeroes DT0/DT1 between trials).
    if bias is None:
        dts = [_dummy(q.device, torch.float32)] * 2
    else:
        dts = [torch.zeros(t.shape, device=q.device, dtype=torch.float32) for t in bias[2]]
        dts = dts + [dts[0]] * (2 - len(dts))
    dq_args = (
        q, k, v, do, lse, delta, dq, full_idx, full_cnt, part_idx, part_tile, part_cnt, tiles, *bias_args, dts[0], dts[1],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
        full_idx.stride(0), part_idx.stride(0),
        scale * LOG2E, scale, lq, lk,
        o, o_lo if has_lo else o, o.stride(0), o.stride(1), o.stride(2),
    )
    dq_meta = dict(meta, DELTA_IN=delta_in, HAS_LO=has_lo and delta_in)
    # Both grids span every (query row, batch * head): the dQ launch (grid over query blocks) stores
    # Delta for all rows the dK/dV launch reads, so with DELTA_IN it simply runs first.
    if delta_in:
        _launch(_bwd_dq_kernel, k_block, q_block, (_cdiv(lq, q_block), b * h), dq_args, dq_meta, q.device)
    _launch(_bwd_dkdv_kernel, q_block, k_block, (_cdiv(lk, k_block), b * h), dkdv_args, meta, q.device)
    if not delta_in:
        _launch(_bwd_dq_kernel, k_block, q_block, (_cdiv(lq, q_block), b * h), dq_args, dq_meta, q.device)
    if group > 1:
        dk = dk.view(b, lk, hkv, group, d).sum(3).to(k.dtype)
        dv = dv.view(b, lk, hkv, group, d).sum(3).to(v.dtype)
    if bias is None:
        return dq, dk, dv
    return dq, dk, dv, dts[: len(bias[2])]


# The forward op also takes the transposed lists (unused there) so that autograd can save them
# for the backward without any side channel.
@torch.library.custom_op("mnemotorch::block_sparse_attn_fwd", mutates_args=())
def block_sparse_attn_fwd(
    q: Tensor, k: Tensor, v: Tensor,
    full_idx: Tensor, full_cnt: Tensor, part_idx: Tensor, part_tile: Tensor, part_cnt: Tensor, tiles: Tensor,
    t_full_idx: Tensor, t_full_cnt: Tensor, t_part_idx: Tensor, t_part_tile: Tensor, t_part_cnt: Tensor,
    scale: float, q_block: int, k_block: int,
) -> tuple[Tensor, Tensor, Tensor]:
    o, lse, o_lo = _fwd_impl(q, k, v, full_idx, full_cnt, part_idx, part_tile, part_cnt, tiles, scale, q_block, k_block, need_lo=True)
    return o, lse, _lo_or_empty(q, o_lo)


def _lo_or_empty(q, o_lo):
    return q.new_empty(0) if o_lo is None else o_lo


def _fwd_fake(q, k, v, *rest):
    """Output ``[B, Lq, H, Dv]``, log-sum-exp ``[B, H, Lq]`` (fp32) and the output's rounding residual
    (like the output for 16-bit inputs, empty for fp32), with or without a bias."""
    lo = torch.empty_like(q) if q.dtype != torch.float32 else q.new_empty(0)
    return torch.empty_like(q), q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32), lo


block_sparse_attn_fwd.register_fake(_fwd_fake)


@torch.library.custom_op("mnemotorch::block_sparse_attn_bwd", mutates_args=())
def block_sparse_attn_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, o_lo: Tensor,
    full_idx: Tensor, full_cnt: Tensor, part_idx: Tensor, part_tile: Tensor, part_cnt: Tensor, tiles: Tensor,
    t_full_idx: Tensor, t_full_cnt: Tensor, t_part_idx: Tensor, t_part_tile: Tensor, t_part_cnt: Tensor,
    scale: float, q_block: int, k_block: int,
) -> tuple[Tensor, Tensor, Tensor]:
    lists = (full_idx, full_cnt, part_idx, part_tile, part_cnt, tiles, t_full_idx, t_full_cnt, t_part_idx, t_part_tile, t_part_cnt)
    return _bwd_impl(do, q, k, v, o, lse, lists, scale, q_block, k_block, o_lo=o_lo)


@block_sparse_attn_bwd.register_fake
def _(do, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, *lists, scale, q_block, k_block = inputs
    o, lse, o_lo = output
    ctx.save_for_backward(q, k, v, o, lse, o_lo, *lists)
    ctx.scale, ctx.q_block, ctx.k_block = scale, q_block, k_block


def _backward(ctx, do, dlse, dlo):
    q, k, v, o, lse, o_lo, *lists = ctx.saved_tensors
    dq, dk, dv = block_sparse_attn_bwd(do, q, k, v, o, lse, o_lo, *lists, ctx.scale, ctx.q_block, ctx.k_block)
    return (dq, dk, dv) + (None,) * (len(lists) + 3)


block_sparse_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# The same kernels with an additive relative-position bias (NB = 1 or 2 table terms): separate
# ops so that the bias-free ops keep their schema.
@torch.library.custom_op("mnemotorch::block_sparse_attn_bias_fwd", mutates_args=())
def block_sparse_attn_bias_fwd(
    q: Tensor, k: Tensor, v: Tensor,
    full_idx: Tensor, full_cnt: Tensor, part_idx: Tensor, part_tile: Tensor, part_cnt: Tensor, tiles: Tensor,
    t_full_idx: Tensor, t_full_cnt: Tensor, t_part_idx: Tensor, t_part_tile: Tensor, t_part_cnt: Tensor,
    q_coords: Tensor, k_coords: Tensor, table0: Tensor, table1: Optional[Tensor],
    scale: float, q_block: int, k_block: int,
) -> tuple[Tensor, Tensor, Tensor]:
    tables = [table0] if table1 is None else [table0, table1]
    o, lse, o_lo = _fwd_impl(q, k, v, full_idx, full_cnt, part_idx, part_tile, part_cnt, tiles, scale, q_block, k_block,
                             (q_coords, k_coords, tables), need_lo=True)
    return o, lse, _lo_or_empty(q, o_lo)


block_sparse_attn_bias_fwd.register_fake(_fwd_fake)


@torch.library.custom_op("mnemotorch::block_sparse_attn_bias_bwd", mutates_args=())
def block_sparse_attn_bias_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, o_lo: Tensor,
    full_idx: Tensor, full_cnt: Tensor, part_idx: Tensor, part_tile: Tensor, part_cnt: Tensor, tiles: Tensor,
    t_full_idx: Tensor, t_full_cnt: Tensor, t_part_idx: Tensor, t_part_tile: Tensor, t_part_cnt: Tensor,
    q_coords: Tensor, k_coords: Tensor, table0: Tensor, table1: Optional[Tensor],
    scale: float, q_block: int, k_block: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dQ, dK, dV and the fp32 gradients of ``table0`` / ``table1`` (an empty tensor without ``table1``)."""
    lists = (full_idx, full_cnt, part_idx, part_tile, part_cnt, tiles, t_full_idx, t_full_cnt, t_part_idx, t_part_tile, t_part_cnt)
    tables = [table0] if table1 is None else [table0, table1]
    dq, dk, dv, dts = _bwd_impl(do, q, k, v, o, lse, lists, scale, q_block, k_block, (q_coords, k_coords, tables), o_lo=o_lo)
    dt1 = dts[1] if table1 is not None else table0.new_zeros(0, dtype=torch.float32)
    return dq, dk, dv, dts[0], dt1


@block_sparse_attn_bias_bwd.register_fake
def _(do, q, k, v, o, lse, o_lo, *rest):
    table0, table1 = rest[13], rest[14]
    dt1 = table0.new_empty(0, dtype=torch.float32) if table1 is None else table1.new_empty(table1.shape, dtype=torch.float32)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), table0.new_empty(table0.shape, dtype=torch.float32), dt1)


def _bias_setup_context(ctx, inputs, output):
    q, k, v, *rest = inputs
    lists, (qc, kc, t0, t1), (scale, q_block, k_block) = rest[:11], rest[11:15], rest[15:]
    o, lse, o_lo = output
    ctx.has_t1 = t1 is not None
    ctx.save_for_backward(q, k, v, o, lse, o_lo, *lists, qc, kc, t0, t1 if t1 is not None else t0)
    ctx.scale, ctx.q_block, ctx.k_block = scale, q_block, k_block


def _bias_backward(ctx, do, dlse, dlo):
    q, k, v, o, lse, o_lo, *rest = ctx.saved_tensors
    lists, (qc, kc, t0, t1) = rest[:11], rest[11:]
    t1 = t1 if ctx.has_t1 else None
    dq, dk, dv, dt0, dt1 = block_sparse_attn_bias_bwd(do, q, k, v, o, lse, o_lo, *lists, qc, kc, t0, t1, ctx.scale, ctx.q_block, ctx.k_block)
    return (dq, dk, dv) + (None,) * 13 + (dt0.to(t0.dtype), dt1.to(t1.dtype) if t1 is not None else None, None, None, None)


block_sparse_attn_bias_fwd.register_autograd(_bias_backward, setup_context=_bias_setup_context)


# Eager calls skip the custom ops: the same kernels through a plain autograd.Function. A call
# through ``torch.library.custom_op`` with autograd costs on the order of 0.1 ms of Python per
# forward+backward on the host (schema default filling, dispatcher round trips, the generic
# autograd wrapper), more than the kernels take at small and medium sizes. Whenever something
# traces or transforms the call (torch.compile / export, a dispatch mode such as FakeTensorMode or
# make_fx, functorch transforms, tensor subclasses) the custom ops run instead, so those still see
# one opaque op with its fake kernel and autograd formula.


def _eager_ok(q: Tensor, k: Tensor, v: Tensor) -> bool:
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return False
    return all(type(t) is Tensor or type(t) is torch.nn.Parameter for t in (q, k, v))


class _EagerAttention(torch.autograd.Function):
    """Forward and backward kernels for eager mode (returns the output only; lse stays internal,
    so autograd never materialises a zero gradient for it)."""

    @staticmethod
    def forward(ctx, q, k, v, t0, t1, lists, coords, scale, q_block, k_block):
        bias = None if t0 is None else (coords[0], coords[1], [t0] if t1 is None else [t0, t1])
        o, lse, o_lo = _fwd_impl(q, k, v, *lists[:6], scale, q_block, k_block, bias, need_lo=True)
        ctx.save_for_backward(q, k, v, o, lse, t0, t1, o_lo)
        ctx.lists, ctx.coords, ctx.scale, ctx.q_block, ctx.k_block = lists, coords, scale, q_block, k_block
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, t0, t1, o_lo = ctx.saved_tensors
        none = (None,) * 7
        if t0 is None:
            dq, dk, dv = _bwd_impl(do, q, k, v, o, lse, ctx.lists, ctx.scale, ctx.q_block, ctx.k_block, o_lo=o_lo)
            return (dq, dk, dv) + none
        tables = [t0] if t1 is None else [t0, t1]
        dq, dk, dv, dts = _bwd_impl(do, q, k, v, o, lse, ctx.lists, ctx.scale, ctx.q_block, ctx.k_block, (*ctx.coords, tables), o_lo=o_lo)
        dt1 = dts[1].to(t1.dtype) if t1 is not None else None
        return (dq, dk, dv, dts[0].to(t0.dtype), dt1) + none[2:]


def kernel_lists(pattern) -> tuple:
    """The pattern's 11 list tensors as the kernels take them, without any copy: the bool tiles
    are reinterpreted as int8 (same bytes), and only a non-contiguous tile tensor is made contiguous
    (the kernels index tiles as ``[n, q_block, k_block]`` row-major)."""
    p = pattern
    tiles = p.tiles
    if tiles.dtype == torch.bool:
        tiles = tiles.view(torch.int8)
    elif tiles.dtype != torch.int8:
        tiles = tiles.to(torch.int8)
    if not tiles.is_contiguous():
        tiles = tiles.contiguous()
    return (p.full_idx, p.full_cnt, p.part_idx, p.part_tile, p.part_cnt, tiles,
            p.t_full_idx, p.t_full_cnt, p.t_part_idx, p.t_part_tile, p.t_part_cnt)


def block_sparse_attention_triton(q: Tensor, k: Tensor, v: Tensor, pattern, scale: float, bias=None) -> Tensor:
    """Run the kernels on ``q [B, Lq, H, D]``, ``k/v [B, Lk, Hkv, D]`` (last dim contiguous; other
    strides are passed to the kernels as they are).

    ``bias``: an optional :class:`~mnemotorch.ops.block_sparse.RelativeBias` (coordinates on
    ``q``'s device; checked by the caller).
    """
    p = pattern
    lists = kernel_lists(p)
    scale = float(scale)
    eager = _eager_ok(q, k, v)
    if bias is None:
        if eager:
            if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
                return _fwd_impl(q, k, v, *lists[:6], scale, p.q_block, p.k_block)[0]
            return _EagerAttention.apply(q, k, v, None, None, lists, None, scale, p.q_block, p.k_block)
        return block_sparse_attn_fwd(q, k, v, *lists, scale, p.q_block, p.k_block)[0]
    tables = []
    for t in bias.canonical_tables():
        if t.dtype == torch.float64:  # the kernels read fp32/bf16/fp16 tables (accumulating in fp32)
            t = t.float()
        tables.append(t.contiguous())
    qc = bias.q_coords.to(q.device, torch.int32).contiguous()
    kc = bias.k_coords.to(q.device, torch.int32).contiguous()
    t1 = tables[1] if len(tables) > 1 else None
    if eager:
        return _EagerAttention.apply(q, k, v, tables[0], t1, lists, (qc, kc), scale, p.q_block, p.k_block)
    return block_sparse_attn_bias_fwd(q, k, v, *lists, qc, kc, tables[0], t1, scale, p.q_block, p.k_block)[0]
