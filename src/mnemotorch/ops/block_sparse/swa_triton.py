"""Causal sliding-window attention without block lists: the fast path of the block-sparse kernels.

Query ``i`` (at key position ``p = i + Lk - Lq``) sees keys ``p - W < j <= p`` -- exactly the
``sliding_window_pattern`` semantics (``W = Lk`` is plain causal). Every program computes its key
(or query) range arithmetically instead of walking per-block lists, and splits it in three loops:

* forward / dQ, query block ``[p0, p0 + BM)``: key tiles of BN are anchored at ``p0`` (the
  diagonal), so the tiles ``[p0, p0 + BM)`` are the masked *diagonal* phase, and the tiles below
  ``p0`` are masked only while they cross the window's lower edge (``j <= p - W`` for some row) or
  the sequence start; the tiles in between need no mask at all (no compare, no select, and the
  softmax max can be taken on the raw logits, then one FMA per score);
* dK/dV, key block ``[n0, n0 + BN)``: query tiles of BM are anchored at ``n0``; the first
  ``ceil((BN - 1) / BM)`` tiles are the masked diagonal, the tiles whose last row still sees ``n0``
  are unmasked, the rest (up to ``n0 + BN + W - 2``) is the masked window edge.

Masked tiles load with row masks; unmasked tiles (which never cross a sequence end) can load
through TMA descriptors, built on the host over a ``[B * T, H * D]`` view or in the kernel per
(batch, head) (``tma`` in the launch table), in a loop that can be warp-specialised (``ws``); the
forward's unmasked loop can rescale lazily (``lazy``). All of it is chosen per kernel by the table
``LAUNCH`` (and ``override_launch``), whose best values come from ``scripts/diag_swa.py``.

Scores are in the base-2 domain (``s * scale * log2(e)``) and the forward saves
``lse2 = m + log2(l)``; with 16-bit inputs it also writes the output's rounding residual so that
the backward's ``Delta = rowsum(dO * O)`` uses the fp32 output (see ``triton._bwd_preprocess``,
which this module reuses). The scale multiplies the fp32 logits (one FMA with the max subtraction
in unmasked tiles) rather than being folded into a 16-bit copy of q: folding would add a rounding of
q, which the peaked-softmax (shared Q/K) bf16 gradients are sensitive to (see ``triton.py``).

Backward: the dK/dV kernel runs one program per (key block, batch, KV head) and loops over the GQA
group's query heads, so dK/dV come out per KV head without fp32 per-query-head buffers. dQ either
comes from a separate kernel over query blocks (3 matmuls per pair, deterministic; it can compute
Delta itself and run first, ``delta``) or, with ``fused_dq``, from the dK/dV kernel itself (1 matmul
per pair, fp32 element atomics or TMA reductions into a zeroed buffer, then one scale-and-cast pass):
which is faster on a card is the launch sweep's question (``scripts/diag_swa.py``). Any kernel can run
a program's tiles in one pipelined loop instead of three (``one_loop``).

Registered as ``torch.library.custom_op``s (``mnemotorch::swa_attn_fwd`` / ``_bwd``) with an
autograd formula; eager calls go through a plain ``autograd.Function`` (as ``triton.py`` does).

1-D neighborhood attention (NATTEN, dilation 1, stride 1, non-causal; ``Lq = Lk = L``, kernel size
``K`` passed as ``W``): the same three kernels with the constexpr ``NA1D``. Query ``p`` sees keys
``[s(p), s(p) + K)``, ``s(p) = clamp(p - K // 2, 0, L - K)`` (nondecreasing in ``p``). Forward / dQ,
query block ``[p0, p_last]``: keys ``[s(p0), s(p_last) + K)`` in tiles anchored at ``s(p0)``; a tile is
unmasked iff it starts at or after ``s(p_last)`` and ends by ``s(p0) + K`` (the masked tiles are the
ones at both window edges). dK/dV, key block ``[n0, n0 + BN)``: queries ``[first(n0), last(n0 + BN -
1)]`` with ``first(j) = 0 if j < K else j - K + 1 + K // 2`` and ``last(j) = L - 1 if j >= L - K else
j + K // 2`` (the inverted clamped window), in query tiles anchored at ``first(n0)``; a tile is
unmasked iff its rows are queries, ``first(n0 + BN - 1) <= pm0`` and ``pm0 + BM - 1 <= last(n0)``.
Custom ops ``mnemotorch::na1d_attn_fwd`` / ``_bwd``; entry point :func:`na1d_attention_triton`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_launch import CachedLaunch, capability, tma_row_view
from . import swa_gluon, swa_gluon_bwd
from .launch import launch_overrides
from .triton import LOG2E, _alloc, _bwd_preprocess, _cdiv, _dq_delta, _eager_ok, _ld_full, _ld_rows, _mm, _pow2, _st_rows

try:  # host-side TMA descriptors (Triton >= 3.4); the interpreter runs them too
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b`` accumulated in place by the matrix unit (no second fp32 tile in registers)."""
    if IEEE:
        c = tl.dot(a, b, acc, input_precision="ieee")
    else:
        c = tl.dot(a, b, acc)
    return c


@triton.jit
def _na_start(p, K, L):
    """1-D neighborhood attention (NATTEN, dilation 1, stride 1, non-causal): the first key
    ``clamp(p - K // 2, 0, L - K)`` of query ``p``'s window ``[start, start + K)``."""
    return tl.minimum(tl.maximum(p - K // 2, 0), L - K)


@triton.jit
def _na_first_query(j, K, L):
    """The first query whose NA-1D window contains key ``j`` (windows' starts are nondecreasing):
    0 when ``j < K``, else ``j - K + 1 + K // 2``."""
    return tl.where(j - K + 1 <= 0, 0, j - K + 1 + K // 2)


@triton.jit
def _na_last_query(j, K, L):
    """The last query whose NA-1D window contains key ``j``: ``L - 1`` when ``j >= L - K`` (the
    windows clamped to the end all hold it), else ``j + K // 2``."""
    return tl.where(j >= L - K, L - 1, j + K // 2)


# ---------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_masked(acc, l_i, m_i, q, k_base, v_base, skt, svt, offs_p, offs_d, d_ok, lo, hi, W, Lk, qk_scale,
                BN: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr, NA1D: tl.constexpr = False):
    for s0 in range(lo, hi, BN):
        offs_n = s0 + tl.arange(0, BN)
        kv_ok = (offs_n >= 0) & (offs_n < Lk)
        k = _ld_rows(k_base + offs_n[:, None].to(tl.int64) * skt + offs_d[None, :], kv_ok, d_ok, EVEN_D)
        v = _ld_rows(v_base + offs_n[:, None].to(tl.int64) * svt + offs_d[None, :], kv_ok, d_ok, EVEN_D)
        qk = _mm(q, tl.trans(k), IEEE)
        if NA1D:  # W = kernel size; the window lies inside [0, Lk)
            st = _na_start(offs_p, W, Lk)
            ok = (offs_n[None, :] >= st[:, None]) & (offs_n[None, :] < st[:, None] + W)
        else:
            ok = (offs_n[None, :] <= offs_p[:, None]) & (offs_n[None, :] > offs_p[:, None] - W) & (offs_n >= 0)[None, :]
        s = tl.where(ok, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no allowed key yet keeps m = -inf: subtract 0 instead (no NaN)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_full(acc, l_i, m_i, q, k_base, v_base, skt, svt, KD, VD, kd_row, kd_col, offs_d, d_ok, lo, hi, qk_scale,
              BN: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr, POS_SCALE: tl.constexpr,
              TMA: tl.constexpr, WS: tl.constexpr, LAZY: tl.constexpr):
    for s0 in tl.range(lo, hi, BN, warp_specialize=WS):
        if TMA > 0:
            k = KD.load([kd_row + s0, kd_col])
            v = VD.load([kd_row + s0, kd_col])
        else:
            offs_n = s0 + tl.arange(0, BN)
            if EVEN_D:
                k = tl.load(k_base + offs_n[:, None].to(tl.int64) * skt + offs_d[None, :])
                v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svt + offs_d[None, :])
            else:
                k = tl.load(k_base + offs_n[:, None].to(tl.int64) * skt + offs_d[None, :], mask=d_ok[None, :], other=0.0)
                v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svt + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        qk = _mm(q, tl.trans(k), IEEE)
        if LAZY > 0:
            # Lazy rescaling: keep the running max (and skip rescaling acc, l) until some row's max
            # has grown by more than LAZY (log2 units: p stays <= 2^LAZY, harmless in fp32 and bf16).
            # The result is exact: every p, l and acc term uses the same stale max m_i.
            if POS_SCALE:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            else:
                m_new = tl.maximum(m_i, tl.max(qk * qk_scale, 1))
            if tl.max(m_new - m_i, 0) > LAZY:
                alpha = tl.math.exp2(m_i - m_new)
                acc = acc * alpha[:, None]
                l_i = l_i * alpha
                m_i = m_new
            p = tl.math.exp2(qk * qk_scale - m_i[:, None])
            l_i = l_i + tl.sum(p, 1)
            acc = _mma(p.to(v.dtype), v, acc, IEEE)
        else:
            if POS_SCALE:  # max of the raw logits, then one FMA per score
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            else:
                s = qk * qk_scale
                m_new = tl.maximum(m_i, tl.max(s, 1))
                p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
            m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_three(acc, l_i, m_i, q, k_base, v_base, skt, svt, KD, VD, kd_row, kd_col, offs_p, offs_d, d_ok,
               s_first, full_lo, p0, p_hi, W, Lk, qk_scale, BN: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr,
               POS_SCALE: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr, LAZY: tl.constexpr, NA1D: tl.constexpr = False):
    """The block's key tiles in three loops: masked window edge, unmasked interior, masked diagonal
    (NA-1D: masked lower edge ``[s_first, full_lo)``, unmasked ``[full_lo, p0)``, masked upper edge)."""
    acc, l_i, m_i = _fwd_masked(acc, l_i, m_i, q, k_base, v_base, skt, svt, offs_p, offs_d, d_ok, s_first, full_lo, W, Lk,
                                qk_scale, BN, IEEE, EVEN_D, NA1D)
    acc, l_i, m_i = _fwd_full(acc, l_i, m_i, q, k_base, v_base, skt, svt, KD, VD, kd_row, kd_col, offs_d, d_ok, full_lo, p0,
                              qk_scale, BN, IEEE, EVEN_D, POS_SCALE, TMA, WS, LAZY)
    acc, l_i, m_i = _fwd_masked(acc, l_i, m_i, q, k_base, v_base, skt, svt, offs_p, offs_d, d_ok, p0, p_hi, W, Lk,
                                qk_scale, BN, IEEE, EVEN_D, NA1D)
    return acc, l_i, m_i


@triton.jit
def _fwd_one(acc, l_i, m_i, q, k_base, v_base, skt, svt, KD, VD, kd_row, kd_col, offs_p, offs_d, d_ok,
             lo, mlo, mhi, hi, W, qk_scale, BN: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr,
             POS_SCALE: tl.constexpr, TMA: tl.constexpr, NA1D: tl.constexpr = False, Lk=0, WS: tl.constexpr = False):
    """All the block's key tiles ``[lo, hi)`` (inside ``[0, Lk)``) in ONE software-pipelined loop:
    the tiles outside ``[mlo, mhi)`` are masked under a per-tile branch. Three loops each start their
    own pipeline (the first loads of a loop wait in full, nothing overlaps them), which for W = 1024
    and 128-key tiles is 3 exposed load latencies per 9 tiles at one program per SM. ``WS``: Triton's
    automatic warp specialisation of the loop (on Hopper it wants in-kernel TMA descriptors, ``TMA == 2``)."""
    for s0 in tl.range(lo, hi, BN, warp_specialize=WS):
        if TMA > 0:
            k = KD.load([kd_row + s0, kd_col])
            v = VD.load([kd_row + s0, kd_col])
        else:
            offs_n = s0 + tl.arange(0, BN)
            k = _ld_full(k_base + offs_n[:, None].to(tl.int64) * skt + offs_d[None, :], d_ok, EVEN_D)
            v = _ld_full(v_base + offs_n[:, None].to(tl.int64) * svt + offs_d[None, :], d_ok, EVEN_D)
        s = _mm(q, tl.trans(k), IEEE)
        if not POS_SCALE:
            s = s * qk_scale
        if (s0 < mlo) | (s0 >= mhi):
            offs_n = s0 + tl.arange(0, BN)
            if NA1D:
                st = _na_start(offs_p, W, Lk)
                ok = (offs_n[None, :] >= st[:, None]) & (offs_n[None, :] < st[:, None] + W)
            else:
                ok = (offs_n[None, :] <= offs_p[:, None]) & (offs_n[None, :] > offs_p[:, None] - W)
            s = tl.where(ok, s, float("-inf"))
        if POS_SCALE:  # max of the raw logits (-inf stays -inf), then one FMA per score
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no allowed key yet (window-edge tile first) keeps m = -inf: subtract 0
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        if POS_SCALE:
            p = tl.math.exp2(s * qk_scale - m_safe[:, None])
        else:
            p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _key_tiles(p0, p_last, W, Lk, BM: tl.constexpr, BN: tl.constexpr, NA1D: tl.constexpr):
    """The key tiles of a query block whose first query sits at key position ``p0`` and last at ``p_last``
    (the forward's and the dQ kernel's tiling): ``(s_first, full_lo, p0, p_hi)`` = first tile, first
    unmasked tile, end of the unmasked tiles, end of the last tile. Sliding window: tiles anchored at p0,
    u tiles below it (down to the window's first key), the first of them masked where they cross the
    window edge ``p - W`` of the block's last row or the sequence start, then the diagonal tiles."""
    if NA1D:
        # NA-1D (Lq = Lk, offset 0, W = kernel size): keys [start(p0), start(p_last) + W), tiles
        # anchored at start(p0); a tile is unmasked iff it starts at or after the last row's window
        # start and ends by the first row's window end (start(p0) + W). s_first / full_lo / p0 / p_hi
        # are then: first tile, first unmasked tile, end of the unmasked tiles, end of the last tile.
        s_first = _na_start(p0, W, Lk)
        st_last = _na_start(p_last, W, Lk)
        full_lo = s_first + ((st_last - s_first + BN - 1) // BN) * BN
        p0 = tl.maximum(s_first + (W // BN) * BN, full_lo)
        p_hi = s_first + ((st_last + W - s_first + BN - 1) // BN) * BN
        full_lo = tl.minimum(full_lo, p_hi)
        p0 = tl.minimum(p0, p_hi)
    else:
        kmin = tl.maximum(p0 - W + 1, 0)
        u = (p0 - kmin + BN - 1) // BN
        n_diag = (p_last - p0 + BN) // BN
        s_first = p0 - u * BN
        g = p0 - tl.maximum(p0 + BM - W, 0)  # unmasked lower tiles need s0 >= p0 + BM - W and s0 >= 0
        n_full = tl.minimum(u, tl.maximum(g, 0) // BN)
        n_full = tl.where(g >= 0, n_full, 0)
        full_lo = p0 - n_full * BN
        p_hi = p0 + n_diag * BN
    return s_first, full_lo, p0, p_hi


@triton.jit
def _swa_fwd_kernel(
    Q, K, V, O, LSE, OLO, KD, VD,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
    qk_scale, W, Lq, Lk,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr, POS_SCALE: tl.constexpr,
    STORE_LO: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr, LAZY: tl.constexpr = 0.0, ONE_LOOP: tl.constexpr = False,
    NA1D: tl.constexpr = False,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offset = Lk - Lq
    i0 = qb * BM
    p0 = offset + i0
    offs_m = i0 + tl.arange(0, BM)
    offs_p = offs_m + offset
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < Lq
    q = _ld_rows(Q + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqt + offs_d[None, :], m_ok, d_ok, EVEN_D)
    k_base = K + b.to(tl.int64) * skb + hk * skh
    v_base = V + b.to(tl.int64) * svb + hk * svh
    if TMA == 2:  # descriptors made on the device, per (batch, KV head): rows past the ends read zeros
        kdesc = tl.make_tensor_descriptor(k_base, shape=[Lk, D], strides=[skt, 1], block_shape=[BN, BLOCK_D])
        vdesc = tl.make_tensor_descriptor(v_base, shape=[Lk, D], strides=[svt, 1], block_shape=[BN, BLOCK_D])
        r0 = 0
        c0 = 0
    else:  # host descriptors over [B * Lk, Hkv * D] (or none)
        kdesc = KD
        vdesc = VD
        r0 = b * Lk
        c0 = hk * D

    s_first, full_lo, p0, p_hi = _key_tiles(p0, offset + tl.minimum(i0 + BM, Lq) - 1, W, Lk, BM, BN, NA1D)

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BLOCK_D], tl.float32)
    if ONE_LOOP:  # one loop where every tile lies inside the keys (all programs but a few at the ends)
        if (s_first >= 0) & (p_hi <= Lk):
            acc, l_i, m_i = _fwd_one(acc, l_i, m_i, q, k_base, v_base, skt, svt, kdesc, vdesc, r0, c0, offs_p, offs_d, d_ok,
                                     s_first, full_lo, p0, p_hi, W, qk_scale, BN, IEEE, EVEN_D, POS_SCALE, TMA, NA1D, Lk, WS)
        else:
            acc, l_i, m_i = _fwd_three(acc, l_i, m_i, q, k_base, v_base, skt, svt, kdesc, vdesc, r0, c0, offs_p, offs_d, d_ok,
                                       s_first, full_lo, p0, p_hi, W, Lk, qk_scale, BN, IEEE, EVEN_D, POS_SCALE, TMA, WS, LAZY, NA1D)
    else:
        acc, l_i, m_i = _fwd_three(acc, l_i, m_i, q, k_base, v_base, skt, svt, kdesc, vdesc, r0, c0, offs_p, offs_d, d_ok,
                                   s_first, full_lo, p0, p_hi, W, Lk, qk_scale, BN, IEEE, EVEN_D, POS_SCALE, TMA, WS, LAZY, NA1D)

    # every valid row has seen its own key (l > 0); rows past Lq are not stored
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc * (1.0 / l_safe)[:, None]
    lse = m_i + tl.math.log2(l_safe)
    o_off = b.to(tl.int64) * sob + h * soh + offs_m[:, None].to(tl.int64) * sot + offs_d[None, :]
    o_lp = out.to(O.dtype.element_ty)
    _st_rows(O + o_off, o_lp, m_ok, d_ok, EVEN_D)
    if STORE_LO:
        _st_rows(OLO + o_off, (out - o_lp.to(tl.float32)).to(OLO.dtype.element_ty), m_ok, d_ok, EVEN_D)
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, lse, mask=m_ok)


# ---------------------------------------------------------------------------------------------
# backward: dK/dV (optionally dQ by atomics)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, sqt, sdot, QD, DOD, qd_row, qd_col, lse_base, delta_base,
                DQA, dqa_base, dqa_st, DQD, dqd_row, dqd_col, offs_n, offs_d, d_ok, n0, t_lo, t_hi, offset, W, Lq, qk_scale,
                BM: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
                FUSED_DQ: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr, NA1D: tl.constexpr = False):
    for t in tl.range(t_lo, t_hi, warp_specialize=WS):
        pm0 = n0 + t * BM
        offs_pq = pm0 + tl.arange(0, BM)  # query positions (key coordinates)
        offs_i = offs_pq - offset  # query indices
        if MASKED:
            row_ok = (offs_i >= 0) & (offs_i < Lq)
            q = _ld_rows(q_base + offs_i[:, None].to(tl.int64) * sqt + offs_d[None, :], row_ok, d_ok, EVEN_D)
            do = _ld_rows(do_base + offs_i[:, None].to(tl.int64) * sdot + offs_d[None, :], row_ok, d_ok, EVEN_D)
            lse = tl.load(lse_base + offs_i, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + offs_i, mask=row_ok, other=0.0)
        else:
            if TMA > 0:
                q = QD.load([qd_row + pm0 - offset, qd_col])
                do = DOD.load([qd_row + pm0 - offset, qd_col])
            elif EVEN_D:
                q = tl.load(q_base + offs_i[:, None].to(tl.int64) * sqt + offs_d[None, :])
                do = tl.load(do_base + offs_i[:, None].to(tl.int64) * sdot + offs_d[None, :])
            else:
                q = tl.load(q_base + offs_i[:, None].to(tl.int64) * sqt + offs_d[None, :], mask=d_ok[None, :], other=0.0)
                do = tl.load(do_base + offs_i[:, None].to(tl.int64) * sdot + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            lse = tl.load(lse_base + offs_i)
            delta = tl.load(delta_base + offs_i)
        qkt = _mm(k, tl.trans(q), IEEE)  # [BN, BM]
        if MASKED:
            if NA1D:  # self-attention: Lq = Lk
                st = _na_start(offs_pq, W, Lq)
                ok = row_ok[None, :] & (offs_n[:, None] >= st[None, :]) & (offs_n[:, None] < st[None, :] + W)
            else:
                ok = row_ok[None, :] & (offs_n[:, None] <= offs_pq[None, :]) & (offs_n[:, None] > offs_pq[None, :] - W)
            pt = tl.where(ok, tl.math.exp2(qkt * qk_scale - lse[None, :]), 0.0)
        else:
            pt = tl.math.exp2(qkt * qk_scale - lse[None, :])
        dv = _mma(pt.to(do.dtype), do, dv, IEEE)
        dpt = _mm(v, tl.trans(do), IEEE)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk = _mma(dst, q, dk, IEEE)
        if FUSED_DQ:
            dq = _mm(tl.trans(dst), k, IEEE)  # [BM, BLOCK_D], scaled once at the end
            ptrs = DQA + dqa_base + offs_i[:, None].to(tl.int64) * dqa_st + offs_d[None, :]
            if MASKED:
                tl.atomic_add(ptrs, dq, mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
            elif FUSED_DQ == 2:  # one TMA reduction of the tile (all rows are queries here)
                DQD.atomic_add([dqd_row + pm0 - offset, dqd_col], dq)
            elif EVEN_D:
                tl.atomic_add(ptrs, dq, sem="relaxed")
            else:
                tl.atomic_add(ptrs, dq, mask=d_ok[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_three(dk, dv, k, v, q_base, do_base, sqt, sdot, QD, DOD, qd_row, qd_col, lse_base, delta_base,
                DQA, dqa_base, dqa_st, DQD, dqd_row, dqd_col, offs_n, offs_d, d_ok, n0, t_lo, a2, z2, t_hi, offset, W, Lq,
                qk_scale, BM: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr, FUSED_DQ: tl.constexpr,
                TMA: tl.constexpr, WS: tl.constexpr, NA1D: tl.constexpr = False):
    """Query tiles in three loops: masked diagonal, unmasked interior, masked window edge (NA-1D:
    ``n0`` is the query anchor, masked lower edge, unmasked interior, masked upper edge)."""
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, sqt, sdot, QD, DOD, qd_row, qd_col, lse_base, delta_base,
                         DQA, dqa_base, dqa_st, DQD, dqd_row, dqd_col, offs_n, offs_d, d_ok, n0, t_lo, a2, offset, W, Lq, qk_scale,
                         BM, IEEE, EVEN_D, True, FUSED_DQ, False, False, NA1D)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, sqt, sdot, QD, DOD, qd_row, qd_col, lse_base, delta_base,
                         DQA, dqa_base, dqa_st, DQD, dqd_row, dqd_col, offs_n, offs_d, d_ok, n0, a2, z2, offset, W, Lq, qk_scale,
                         BM, IEEE, EVEN_D, False, FUSED_DQ, TMA, WS, NA1D)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, sqt, sdot, QD, DOD, qd_row, qd_col, lse_base, delta_base,
                         DQA, dqa_base, dqa_st, DQD, dqd_row, dqd_col, offs_n, offs_d, d_ok, n0, z2, t_hi, offset, W, Lq, qk_scale,
                         BM, IEEE, EVEN_D, True, FUSED_DQ, False, False, NA1D)
    return dk, dv


@triton.jit
def _dkdv_one(dk, dv, k, v, q_base, do_base, sqt, sdot, QD, DOD, qd_row, qd_col, lse_base, delta_base,
              DQA, dqa_base, dqa_st, DQD, dqd_row, dqd_col, offs_n, offs_d, d_ok, n0, t_lo, mlo, mhi, t_hi, offset, W,
              qk_scale, BM: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr, FUSED_DQ: tl.constexpr,
              TMA: tl.constexpr, NA1D: tl.constexpr = False, Lk=0, WS: tl.constexpr = False):
    """Query tiles ``[t_lo, t_hi)`` whose rows are all queries, in one pipelined loop; the tiles
    outside ``[mlo, mhi)`` are masked under a per-tile branch (see ``_fwd_one``)."""
    for t in tl.range(t_lo, t_hi, warp_specialize=WS):
        pm0 = n0 + t * BM
        offs_pq = pm0 + tl.arange(0, BM)
        offs_i = offs_pq - offset
        if TMA > 0:
            q = QD.load([qd_row + pm0 - offset, qd_col])
            do = DOD.load([qd_row + pm0 - offset, qd_col])
        else:
            q = _ld_full(q_base + offs_i[:, None].to(tl.int64) * sqt + offs_d[None, :], d_ok, EVEN_D)
            do = _ld_full(do_base + offs_i[:, None].to(tl.int64) * sdot + offs_d[None, :], d_ok, EVEN_D)
        lse = tl.load(lse_base + offs_i)
        delta = tl.load(delta_base + offs_i)
        qkt = _mm(k, tl.trans(q), IEEE)  # [BN, BM]
        pt = tl.math.exp2(qkt * qk_scale - lse[None, :])
        if (t < mlo) | (t >= mhi):
            if NA1D:
                st = _na_start(offs_pq, W, Lk)
                ok = (offs_n[:, None] >= st[None, :]) & (offs_n[:, None] < st[None, :] + W)
            else:
                ok = (offs_n[:, None] <= offs_pq[None, :]) & (offs_n[:, None] > offs_pq[None, :] - W)
            pt = tl.where(ok, pt, 0.0)
        dv = _mma(pt.to(do.dtype), do, dv, IEEE)
        dpt = _mm(v, tl.trans(do), IEEE)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk = _mma(dst, q, dk, IEEE)
        if FUSED_DQ:
            dq = _mm(tl.trans(dst), k, IEEE)
            if FUSED_DQ == 2:
                DQD.atomic_add([dqd_row + pm0 - offset, dqd_col], dq)
            else:
                ptrs = DQA + dqa_base + offs_i[:, None].to(tl.int64) * dqa_st + offs_d[None, :]
                if EVEN_D:
                    tl.atomic_add(ptrs, dq, sem="relaxed")
                else:
                    tl.atomic_add(ptrs, dq, mask=d_ok[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _swa_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQA, QD, DOD, DQD,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh, sdkb, sdkt, sdkh, sdvb, sdvt, sdvh,
    qk_scale, sm_scale, W, Lq, Lk,
    H: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr,
    FUSED_DQ: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr, ONE_LOOP: tl.constexpr = False,
    NA1D: tl.constexpr = False,
):
    kb = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    offset = Lk - Lq
    n0 = kb * BN
    offs_n = n0 + tl.arange(0, BN)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_ok = offs_n < Lk
    k = _ld_rows(K + b.to(tl.int64) * skb + hk * skh + offs_n[:, None].to(tl.int64) * skt + offs_d[None, :], n_ok, d_ok, EVEN_D)
    v = _ld_rows(V + b.to(tl.int64) * svb + hk * svh + offs_n[:, None].to(tl.int64) * svt + offs_d[None, :], n_ok, d_ok, EVEN_D)

    # Query tiles t = 0, 1, ... start at n0 + t * BM. Positions that see a key of the block:
    # [max(n0, offset), min(n0 + BN + W - 2, Lk - 1)]. Unmasked tiles: past the diagonal
    # (t * BM >= BN - 1), last row still sees n0 ((t + 1) * BM <= W), all rows are queries.
    if NA1D:
        # NA-1D (Lq = Lk, W = kernel size): the queries that see a key of the block are
        # [first_query(n0), last_query(min(n0 + BN, Lk) - 1)] (window starts are nondecreasing), in
        # tiles anchored at qa = first_query(n0). A tile is unmasked iff its rows are queries, its
        # last row's window starts at or before n0 and its first row's window ends at or after the
        # block's last key: first_query(n0 + BN - 1) <= pm0 and pm0 + BM - 1 <= last_query(n0).
        qa = _na_first_query(n0, W, Lk)
        p_max = _na_last_query(tl.minimum(n0 + BN, Lk) - 1, W, Lk)
        t_lo = qa * 0  # a tensor like the causal branch's (not a constexpr)
        t_hi = (p_max - qa) // BM + 1
        a = (tl.maximum(_na_first_query(n0 + BN - 1, W, Lk) - qa, 0) + BM - 1) // BM
        z = tl.minimum(tl.minimum(t_hi, (_na_last_query(n0, W, Lk) - qa + 1) // BM), (Lq - qa) // BM)
        z = tl.where(n0 + BN <= Lk, z, 0)
    else:
        qa = n0
        p_min = tl.maximum(n0, offset)
        p_max = tl.minimum(n0 + BN + W - 2, Lk - 1)
        t_lo = (p_min - n0) // BM
        t_hi = tl.where(p_max >= p_min, (p_max - n0) // BM + 1, t_lo)
        a = tl.maximum(tl.maximum(t_lo, (BN + BM - 2) // BM), (tl.maximum(offset - n0, 0) + BM - 1) // BM)
        z = tl.minimum(tl.minimum(t_hi, W // BM), (Lk - n0) // BM)
    a2 = tl.where(a < z, a, t_hi)
    z2 = tl.where(a < z, z, t_hi)

    dk = tl.zeros([BN, BLOCK_D], tl.float32)
    dv = tl.zeros([BN, BLOCK_D], tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b.to(tl.int64) * sqb + h * sqh
        do_base = DO + b.to(tl.int64) * sdob + h * sdoh
        if TMA == 2:
            qdesc = tl.make_tensor_descriptor(q_base, shape=[Lq, D], strides=[sqt, 1], block_shape=[BM, BLOCK_D])
            dodesc = tl.make_tensor_descriptor(do_base, shape=[Lq, D], strides=[sdot, 1], block_shape=[BM, BLOCK_D])
            r0 = 0
            c0 = 0
        else:
            qdesc = QD
            dodesc = DOD
            r0 = b * Lq
            c0 = h * D
        stat = (b * H + h).to(tl.int64) * Lq
        dqa_base = (b.to(tl.int64) * Lq * H + h) * D
        if ONE_LOOP:  # one loop where every tile's rows are queries (all programs but a few at the ends)
            if (qa + t_lo * BM - offset >= 0) & (qa + t_hi * BM - offset <= Lq):
                dk, dv = _dkdv_one(dk, dv, k, v, q_base, do_base, sqt, sdot, qdesc, dodesc, r0, c0, LSE + stat, DELTA + stat,
                                   DQA, dqa_base, H * D, DQD, b * Lq, h * D, offs_n, offs_d, d_ok, qa, t_lo, a2, z2, t_hi,
                                   offset, W, qk_scale, BM, IEEE, EVEN_D, FUSED_DQ, TMA, NA1D, Lk, WS)
            else:
                dk, dv = _dkdv_three(dk, dv, k, v, q_base, do_base, sqt, sdot, qdesc, dodesc, r0, c0, LSE + stat, DELTA + stat,
                                     DQA, dqa_base, H * D, DQD, b * Lq, h * D, offs_n, offs_d, d_ok, qa, t_lo, a2, z2, t_hi,
                                     offset, W, Lq, qk_scale, BM, IEEE, EVEN_D, FUSED_DQ, TMA, WS, NA1D)
        else:
            dk, dv = _dkdv_three(dk, dv, k, v, q_base, do_base, sqt, sdot, qdesc, dodesc, r0, c0, LSE + stat, DELTA + stat,
                                 DQA, dqa_base, H * D, DQD, b * Lq, h * D, offs_n, offs_d, d_ok, qa, t_lo, a2, z2, t_hi,
                                 offset, W, Lq, qk_scale, BM, IEEE, EVEN_D, FUSED_DQ, TMA, WS, NA1D)

    _st_rows(DK + b.to(tl.int64) * sdkb + hk * sdkh + offs_n[:, None].to(tl.int64) * sdkt + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), n_ok, d_ok, EVEN_D)
    _st_rows(DV + b.to(tl.int64) * sdvb + hk * sdvh + offs_n[:, None].to(tl.int64) * sdvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), n_ok, d_ok, EVEN_D)


# ---------------------------------------------------------------------------------------------
# backward: dQ (separate kernel)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skt, svt, KD, VD, kd_row, kd_col, offs_p, offs_d, d_ok, lo, hi, W, Lk,
              qk_scale, BN: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
              TMA: tl.constexpr, WS: tl.constexpr, NA1D: tl.constexpr = False):
    for s0 in tl.range(lo, hi, BN, warp_specialize=WS):
        offs_n = s0 + tl.arange(0, BN)
        if MASKED:
            kv_ok = (offs_n >= 0) & (offs_n < Lk)
            k = _ld_rows(k_base + offs_n[:, None].to(tl.int64) * skt + offs_d[None, :], kv_ok, d_ok, EVEN_D)
            v = _ld_rows(v_base + offs_n[:, None].to(tl.int64) * svt + offs_d[None, :], kv_ok, d_ok, EVEN_D)
        elif TMA > 0:
            k = KD.load([kd_row + s0, kd_col])
            v = VD.load([kd_row + s0, kd_col])
        elif EVEN_D:
            k = tl.load(k_base + offs_n[:, None].to(tl.int64) * skt + offs_d[None, :])
            v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svt + offs_d[None, :])
        else:
            k = tl.load(k_base + offs_n[:, None].to(tl.int64) * skt + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svt + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        qk = _mm(q, tl.trans(k), IEEE)
        if MASKED:
            if NA1D:
                st = _na_start(offs_p, W, Lk)
                ok = (offs_n[None, :] >= st[:, None]) & (offs_n[None, :] < st[:, None] + W)
            else:
                ok = (offs_n[None, :] <= offs_p[:, None]) & (offs_n[None, :] > offs_p[:, None] - W) & (offs_n >= 0)[None, :]
            p = tl.where(ok, tl.math.exp2(qk * qk_scale - lse[:, None]), 0.0)
        else:
            p = tl.math.exp2(qk * qk_scale - lse[:, None])
        dp = _mm(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(k.dtype), k, dq, IEEE)
    return dq


@triton.jit
def _dq_three(dq, q, do, lse, delta, k_base, v_base, skt, svt, KD, VD, kd_row, kd_col, offs_p, offs_d, d_ok,
              s_first, full_lo, p0, p_hi, W, Lk, qk_scale, BN: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr,
              TMA: tl.constexpr, WS: tl.constexpr, NA1D: tl.constexpr = False):
    """The block's key tiles in three loops: masked window edge, unmasked interior, masked diagonal."""
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skt, svt, KD, VD, kd_row, kd_col, offs_p, offs_d, d_ok, s_first, full_lo,
                   W, Lk, qk_scale, BN, IEEE, EVEN_D, True, False, False, NA1D)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skt, svt, KD, VD, kd_row, kd_col, offs_p, offs_d, d_ok, full_lo, p0,
                   W, Lk, qk_scale, BN, IEEE, EVEN_D, False, TMA, WS, NA1D)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skt, svt, KD, VD, kd_row, kd_col, offs_p, offs_d, d_ok, p0, p_hi,
                   W, Lk, qk_scale, BN, IEEE, EVEN_D, True, False, False, NA1D)
    return dq


@triton.jit
def _dq_one(dq, q, do, lse, delta, k_base, v_base, skt, svt, KD, VD, kd_row, kd_col, offs_p, offs_d, d_ok, lo, mlo, mhi, hi, W,
            qk_scale, BN: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr,
            NA1D: tl.constexpr = False, Lk=0, WS: tl.constexpr = False):
    """The block's key tiles ``[lo, hi)`` (inside ``[0, Lk)``) in one pipelined loop, the tiles outside
    ``[mlo, mhi)`` masked under a per-tile branch (see ``_fwd_one``)."""
    for s0 in tl.range(lo, hi, BN, warp_specialize=WS):
        if TMA > 0:
            k = KD.load([kd_row + s0, kd_col])
            v = VD.load([kd_row + s0, kd_col])
        else:
            offs_n = s0 + tl.arange(0, BN)
            k = _ld_full(k_base + offs_n[:, None].to(tl.int64) * skt + offs_d[None, :], d_ok, EVEN_D)
            v = _ld_full(v_base + offs_n[:, None].to(tl.int64) * svt + offs_d[None, :], d_ok, EVEN_D)
        qk = _mm(q, tl.trans(k), IEEE)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if (s0 < mlo) | (s0 >= mhi):
            offs_n = s0 + tl.arange(0, BN)
            if NA1D:
                st = _na_start(offs_p, W, Lk)
                ok = (offs_n[None, :] >= st[:, None]) & (offs_n[None, :] < st[:, None] + W)
            else:
                ok = (offs_n[None, :] <= offs_p[:, None]) & (offs_n[None, :] > offs_p[:, None] - W)
            p = tl.where(ok, p, 0.0)
        dp = _mm(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(k.dtype), k, dq, IEEE)
    return dq


@triton.jit
def _swa_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KD, VD, O, OLO,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh, sdqb, sdqt, sdqh, sob, sot, soh,
    qk_scale, sm_scale, W, Lq, Lk,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr,
    ONE_LOOP: tl.constexpr = False, DELTA_IN: tl.constexpr = False, HAS_LO: tl.constexpr = False,
    NA1D: tl.constexpr = False,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offset = Lk - Lq
    i0 = qb * BM
    p0 = offset + i0
    offs_m = i0 + tl.arange(0, BM)
    offs_p = offs_m + offset
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < Lq
    q = _ld_rows(Q + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqt + offs_d[None, :], m_ok, d_ok, EVEN_D)
    do = _ld_rows(DO + b.to(tl.int64) * sdob + h * sdoh + offs_m[:, None].to(tl.int64) * sdot + offs_d[None, :], m_ok, d_ok, EVEN_D)
    lse = tl.load(LSE + bh.to(tl.int64) * Lq + offs_m, mask=m_ok, other=0.0)
    if DELTA_IN:  # this kernel holds dO already and runs before dK/dV, which reads the Delta stored here
        delta = _dq_delta(O, OLO, DELTA, do, b, h, bh, sob, sot, soh, offs_m, offs_d, m_ok, d_ok, Lq, EVEN_D, HAS_LO)
    else:
        delta = tl.load(DELTA + bh.to(tl.int64) * Lq + offs_m, mask=m_ok, other=0.0)
    k_base = K + b.to(tl.int64) * skb + hk * skh
    v_base = V + b.to(tl.int64) * svb + hk * svh
    if TMA == 2:
        kdesc = tl.make_tensor_descriptor(k_base, shape=[Lk, D], strides=[skt, 1], block_shape=[BN, BLOCK_D])
        vdesc = tl.make_tensor_descriptor(v_base, shape=[Lk, D], strides=[svt, 1], block_shape=[BN, BLOCK_D])
        r0 = 0
        c0 = 0
    else:
        kdesc = KD
        vdesc = VD
        r0 = b * Lk
        c0 = hk * D

    s_first, full_lo, p0, p_hi = _key_tiles(p0, offset + tl.minimum(i0 + BM, Lq) - 1, W, Lk, BM, BN, NA1D)

    dq = tl.zeros([BM, BLOCK_D], tl.float32)
    if ONE_LOOP:
        if (s_first >= 0) & (p_hi <= Lk):
            dq = _dq_one(dq, q, do, lse, delta, k_base, v_base, skt, svt, kdesc, vdesc, r0, c0, offs_p, offs_d, d_ok,
                         s_first, full_lo, p0, p_hi, W, qk_scale, BN, IEEE, EVEN_D, TMA, NA1D, Lk, WS)
        else:
            dq = _dq_three(dq, q, do, lse, delta, k_base, v_base, skt, svt, kdesc, vdesc, r0, c0, offs_p, offs_d, d_ok,
                           s_first, full_lo, p0, p_hi, W, Lk, qk_scale, BN, IEEE, EVEN_D, TMA, WS, NA1D)
    else:
        dq = _dq_three(dq, q, do, lse, delta, k_base, v_base, skt, svt, kdesc, vdesc, r0, c0, offs_p, offs_d, d_ok,
                       s_first, full_lo, p0, p_hi, W, Lk, qk_scale, BN, IEEE, EVEN_D, TMA, WS, NA1D)
    _st_rows(DQ + b.to(tl.int64) * sdqb + h * sdqh + offs_m[:, None].to(tl.int64) * sdqt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), m_ok, d_ok, EVEN_D)


# ---------------------------------------------------------------------------------------------
# launch parameters

#: Default launch parameters per (kernel, padded head dim, operand class "16" = fp16/bf16 or
#: "32" = fp32). Kernels: "fwd" (BM queries x BN keys), "dkdv" (BN keys x BM queries per step;
#: ``fused_dq``: dQ by atomics in this kernel, else the "dq" kernel runs), "dq" (BM queries x BN
#: keys). ``tma``: unmasked tiles load through TMA descriptors (sm_90+, 16-byte aligned strides;
#: silently pointer loads otherwise): ``True`` -- host descriptors over ``[B * T, H * D]`` (padded head
#: dim == head dim), ``"device"`` -- in-kernel descriptors per (batch, head) (Triton's scratch
#: allocator is set if none is; what Hopper warp specialisation needs); ``ws``: ``tl.range(warp_specialize=...)`` on
#: the unmasked loop, or on the one loop with ``one_loop`` (every form measured slower on an H100 with Triton 3.6:
#: docs/results/block_sparse.md, eighteenth session); ``lazy`` (fwd, > 0): rescale the accumulator only when a row's max has grown
#: by more than that many powers of two (FlashAttention-4's lazy rescaling; 0: at every tile).
#: ``one_loop``: a program whose tiles all lie inside the sequence runs them in one software-pipelined
#: loop, masking the edge / diagonal tiles under a per-tile branch (the others keep three loops, each of
#: which refills the pipeline; not with ``lazy``). ``fused_dq="tma"``: dQ by one TMA reduction per
#: tile into the fp32 accumulator (``True``: element atomics; masked tiles of three-loop programs keep
#: element atomics). ``delta`` (dq): the dQ kernel computes Delta and runs before dK/dV (no
#: preprocess pass; ignored with ``fused_dq``).
#:
#: Where the rows come from (``J`` = docs/results/swa_sweep_2026-11-26_h100.json: H100 80GB HBM3,
#: torch 2.11, Triton 3.6, B = 1, H = 16, bf16, CUDA-graph replays, run beside GPU tests, so +-4%
#: noise; the same config measured 6.17 and 6.42 ms fwd+bwd in two steps of that run):
#:
#: * D = 128, 16-bit: the sweep's best rows at L = 65536, W = 1024. fwd: ``J fwd_sweep`` BM=BN=128,
#:   8 warps, 3 stages, host TMA: 1.560 ms (393 TFLOP/s on computed tiles) vs 1.763 for the old
#:   default (BM=128 BN=64 pointers); host descriptors are kernel parameters, captured in every graph
#:   of that sweep. dK/dV: ``J dkdv_sweep`` BM=32 BN=64 4 warps 3 stages: 6.464 ms fwd+bwd vs 6.726 for
#:   the old 128-key 8-warp row (fused dQ by atomics: 6.747 at best, 9.286 with 64-key blocks).
#:   dQ: ``J dq_sweep`` BM=BN=64 4 warps 2 stages: 6.172 vs 6.540 (old 128-row 8-warp row). Caveat:
#:   at W = 4096 the old forward row was 5% faster (4.991 vs 5.269 ms, one measurement each).
#: * D = 64, 16-bit: the sweep timed only the old defaults here (``J cases L*_D64``): forward faster
#:   than the generic list kernel (0.932 vs 1.093 ms at L = 65536, W = 1024) but fwd+bwd slower
#:   (4.413 vs 4.117; the same at all four D = 64 cases), i.e. the backward is ~0.46 ms (15%) slower.
#:   No D = 64 backward row of ours in J beats the generic kernel, so these rows are the generic
#:   kernel's own backward launch at D = 64 (``triton.fixed_launch``: dK/dV 64 keys x 64-query
#:   slices, dQ 128 queries x 64-key slices, both 4 warps, 2 stages), which is what measured faster:
#:   the per-tile work of the two kernels is the same (ours loads no lists and masks fewer tiles),
#:   and our 8-warp rows are the difference; at D = 128 the 4-warp tiles won too. Not a fallback to
#:   the generic backward itself: that needs block lists per (L, W) and its per-query-head fp32 dK/dV
#:   with GQA. ``scripts/diag_swa.py`` now sweeps D = 64 rows against the generic kernel.
#: * Second sweep (``J2`` = docs/results/swa_sweep_2026-11-26b_h100.json, same card and versions, run
#:   alone): rows marked "2nd sweep" replaced these. D = 128 fwd BM=BN=64, 4 warps, 3 stages, host TMA,
#:   ``one_loop``: 1.227 ms at L = 65536, W = 1024 (472 TFLOP/s on computed tiles; Flex 1.800); dQ
#:   with ``delta`` (no preprocess pass): fwd+bwd 6.134 ms (Flex 6.837). D = 64 dQ ``one_loop`` +
#:   ``delta``: 3.796 ms fwd+bwd (generic kernel 4.111, Flex 4.292).
#: * fp32 rows and D = 256: starting points (fp32 tiles halved for shared memory), not measured.
#: * ``gluon`` (dK/dV rows): the Gluon Hopper backward (``swa_gluon_bwd``: dK, dV and dQ in one kernel) to run
#:   instead of the dK/dV and dQ kernels where it applies, or False. D = 128, 16-bit, twenty-fourth session (H100,
#:   CUDA-graph replays of the backward alone): 2 ring slots, dQ by TMA bulk reductions from staged tiles
#:   (``dq="tma"``): 4.12 ms at L = 65536, W = 1024 against these kernels' 4.46 (1.10 vs 1.12 at 16K; NA-1D 0.268
#:   vs 0.308 at L = 32768, K = 2048, H = 1; docs/results/swa_gluon_bwd_sweep_2026-11-28-s24_h100.json). With
#:   element atomics (``dq="shared"``) it was slower, 5.44 ms. D = 64: 3 ring slots, ``dq="tma"``: 2.29 ms against
#:   2.88 at L = 65536, W = 1024 (0.627 vs 0.737 at 16K; swa_gluon_bwd_sweep_2026-11-28-s24_h100_d64.json).
#: * ``gluon`` (forward rows): the Gluon Hopper forward (``swa_gluon``) to run instead where it applies, or False.
#:   D = 128, 16-bit, twenty-second session (H100, CUDA-graph replays): 64-key tiles, 4 ring slots, persistent grid:
#:   sliding window 1.144 ms at L = 65536, W = 1024 (Triton row 1.253 in that run; 1.154 against Flex's 1.850 in
#:   ``mnemo bench``), NA-1D 0.0755 ms at L = 32768, K = 2048, H = 1 (0.0790 against SDPA's 0.805 in the bench).
#:   D = 64, 16-bit, twenty-third session: 128-key tiles, 3 ring slots: 0.774 ms at L = 65536, W = 1024 against the
#:   Triton row's 0.956 (0.213 vs 0.246 at 16K; docs/results/swa_gluon_fwd_d64_sweep_2026-11-28_h100.json).
LAUNCH: dict[tuple[str, int, str], dict] = {
    ("fwd", 64, "16"): dict(BM=128, BN=64, warps=4, stages=3, tma=False, ws=False, lazy=0.0, one_loop=False,
                            gluon=dict(BN=128, stages=3)),  # 23rd session: 0.774 vs the Triton row's 0.956 ms at 64K
    ("fwd", 128, "16"): dict(BM=64, BN=64, warps=4, stages=3, tma=True, ws=False, lazy=0.0, one_loop=True,  # 2nd sweep
                             gluon=dict(BN=64, stages=4)),  # 22nd session: swa_gluon, persistent (the Triton row: its fallback)
    ("fwd", 256, "16"): dict(BM=64, BN=64, warps=4, stages=2, tma=False, ws=False, lazy=0.0, one_loop=False, gluon=False),
    ("dkdv", 64, "16"): dict(BM=64, BN=64, warps=4, stages=2, fused_dq=False, tma=False, ws=False, one_loop=False,
                             gluon=dict(stages=3, dq="tma")),  # 24th session: 2.29 vs 2.88 ms at 64K
    ("dkdv", 128, "16"): dict(BM=32, BN=64, warps=4, stages=3, fused_dq=False, tma=False, ws=False, one_loop=False,
                              gluon=dict(stages=2, dq="tma")),  # 24th session: 4.12 vs 4.46 ms (the Triton pair: its fallback)
    ("dkdv", 256, "16"): dict(BM=32, BN=64, warps=8, stages=1, fused_dq=False, tma=False, ws=False, one_loop=False, gluon=False),
    ("dq", 64, "16"): dict(BM=128, BN=64, warps=4, stages=2, tma=False, ws=False, one_loop=True, delta=True),  # 2nd sweep
    ("dq", 128, "16"): dict(BM=64, BN=64, warps=4, stages=2, tma=False, ws=False, one_loop=False, delta=True),  # 2nd sweep
    ("dq", 256, "16"): dict(BM=64, BN=32, warps=4, stages=1, tma=False, ws=False, one_loop=False, delta=False),
    ("fwd", 64, "32"): dict(BM=64, BN=64, warps=4, stages=2, tma=False, ws=False, lazy=0.0, one_loop=False, gluon=False),
    ("fwd", 128, "32"): dict(BM=64, BN=32, warps=4, stages=2, tma=False, ws=False, lazy=0.0, one_loop=False, gluon=False),
    ("fwd", 256, "32"): dict(BM=32, BN=32, warps=4, stages=1, tma=False, ws=False, lazy=0.0, one_loop=False, gluon=False),
    ("dkdv", 64, "32"): dict(BM=32, BN=64, warps=4, stages=2, fused_dq=False, tma=False, ws=False, one_loop=False, gluon=False),
    ("dkdv", 128, "32"): dict(BM=32, BN=64, warps=8, stages=1, fused_dq=False, tma=False, ws=False, one_loop=False, gluon=False),
    ("dkdv", 256, "32"): dict(BM=16, BN=32, warps=4, stages=1, fused_dq=False, tma=False, ws=False, one_loop=False, gluon=False),
    ("dq", 64, "32"): dict(BM=64, BN=32, warps=4, stages=2, tma=False, ws=False, one_loop=False, delta=False),
    ("dq", 128, "32"): dict(BM=64, BN=32, warps=4, stages=1, tma=False, ws=False, one_loop=False, delta=False),
    ("dq", 256, "32"): dict(BM=32, BN=16, warps=4, stages=1, tma=False, ws=False, one_loop=False, delta=False),
}
_KERNEL_KEYS = {"fwd": ("BM", "BN", "warps", "stages", "tma", "ws", "lazy", "one_loop", "gluon"),
                "dkdv": ("BM", "BN", "warps", "stages", "fused_dq", "tma", "ws", "one_loop", "gluon"),
                "dq": ("BM", "BN", "warps", "stages", "tma", "ws", "one_loop", "delta")}
#: per-kernel overrides (``override_launch``), applied over the table for every head dim / dtype
_OVERRIDES: dict[str, dict] = {}


def _dclass(d: int) -> int:
    return 64 if d <= 64 else (128 if d <= 128 else 256)


#: NA-1D's changes to the table's rows (same keys; applied before ``override_launch``). dK/dV at
#: D = 128, 16-bit: TMA loads in one pipelined loop, 0.385 vs 0.408 ms forward + backward at L = 32K,
#: K = 2048, H = 1 on an H100 (scripts/diag_swa.py --na1d; the sliding window's row stays as swept).
#: (The forward's Gluon row, ``LAUNCH[("fwd", 128, "16")]["gluon"]``, serves NA-1D too.)
LAUNCH_NA1D: dict[tuple[str, int, str], dict] = {
    ("dkdv", 128, "16"): dict(tma=True, one_loop=True),
}


def launch_config(kind: str, d: int, dtype: torch.dtype, na1d: bool = False) -> dict:
    """The launch parameters of kernel ``kind`` ("fwd", "dkdv", "dq") for head dim ``d`` and ``dtype``
    (``na1d``: with ``LAUNCH_NA1D``'s changes)."""
    key = (kind, _dclass(d), "32" if dtype == torch.float32 else "16")
    cfg = dict(LAUNCH[key])
    if na1d:
        cfg.update(LAUNCH_NA1D.get(key, {}))
    over = _OVERRIDES.get(kind, {})
    cfg.update(over)
    if kind in ("fwd", "dkdv") and over and "gluon" not in over:
        cfg["gluon"] = False  # an override of a Triton kernel's parameters asks for that kernel
    return cfg


def override_launch(**kinds: dict | None):
    """``with override_launch(fwd=dict(BM=64), dkdv=dict(fused_dq=True)):`` -- launch parameters for
    the calls inside (tests, the launch sweep); the keys of each dict replace the table's. A forward
    override without ``gluon`` sets it False: it describes the Triton forward, and that kernel then runs."""
    return launch_overrides(_OVERRIDES, _KERNEL_KEYS, kinds)


def kernels_used(q: Tensor, k: Tensor, v: Tensor, scale: float, na1d: bool = False) -> dict:
    """What a call on these tensors would launch (benchmarks record it): ``{"forward": "gluon" | "triton",
    "backward": "gluon" | "triton", "launch": {kind: row}}`` with the launch rows of the forward, dK/dV and dQ
    kernels (a Gluon backward replaces the last two)."""
    d = q.shape[-1]
    rows = {kind: launch_config(kind, d, q.dtype, na1d) for kind in ("fwd", "dkdv", "dq")}
    bwd = bool(rows["dkdv"].get("gluon")) and swa_gluon_bwd.supported(q, k, v, q, scale, rows["dkdv"])
    return {"forward": "gluon" if swa_gluon.supported(q, k, v, scale, rows["fwd"]) else "triton",
            "backward": "gluon" if bwd else "triton", "launch": rows}


def _check_tile(kind: str, cfg: dict) -> None:
    for name in ("BM", "BN"):
        x = cfg[name]
        if not (isinstance(x, int) and x >= 16 and x & (x - 1) == 0):
            raise ValueError(f"swa launch {kind}: {name} must be a power of two >= 16, got {x!r}")
    if kind == "fwd" and cfg.get("one_loop") and cfg.get("lazy", 0.0) > 0:
        raise ValueError("swa launch fwd: lazy rescaling is not implemented in the one-loop forward (one_loop=True); "
                         "set lazy=0.0 or one_loop=False")
    if kind == "dkdv" and cfg.get("gluon"):
        g = cfg["gluon"]
        if not isinstance(g, dict) or set(g) - {"stages", "regs", "persistent", "dq"}:
            raise ValueError(f"swa launch dkdv: gluon must be False or a dict with keys stages, regs, persistent, dq; "
                             f"got {g!r}")
        if not 1 <= g.get("stages", 2) <= 3 or g.get("dq", "shared") not in ("own", "shared", "tma"):
            raise ValueError(f"swa launch dkdv: gluon stages must be 1..3 and dq 'own', 'shared' or 'tma', got {g!r}")
    if kind == "fwd" and cfg.get("gluon"):
        g = cfg["gluon"]
        if not isinstance(g, dict) or set(g) - {"BN", "stages", "regs", "persistent"}:
            raise ValueError(f"swa launch fwd: gluon must be False or a dict with keys BN, stages, regs, persistent; "
                             f"got {g!r}")
        if g.get("BN", 64) not in (64, 128) or not 2 <= g.get("stages", 4) <= 6:
            raise ValueError(f"swa launch fwd: gluon BN must be 64 or 128 and stages 2..6, got {g!r}")
    if kind == "dkdv" and cfg.get("fused_dq") not in (False, True, "tma"):
        raise ValueError(f"swa launch dkdv: fused_dq must be False, True (pointer atomics) or 'tma' (TMA reductions), "
                         f"got {cfg.get('fused_dq')!r}")


def _tma_capable(t: Tensor) -> bool:
    """TMA on ``t``'s device: sm_90+ on CUDA; the CPU interpreter runs descriptors too (tests)."""
    if TensorDescriptor is None:
        return False
    return t.device.type != "cuda" or capability(t.device)[0] >= 9


def _tma_desc(t: Tensor, block_rows: int, block_d: int):
    """A host TMA descriptor over ``t [B, T, H, D]`` seen as ``[B * T, H * D]`` (row ``b * T + t``,
    column ``h * D``), or ``None`` when the strides do not allow that view or TMA is unavailable."""
    d = t.shape[3]
    view = tma_row_view(t) if block_d == d and d * t.element_size() >= 16 else None
    if view is None or not _tma_capable(t):
        return None
    return TensorDescriptor(t, shape=view[0], strides=view[1], block_shape=[block_rows, block_d])


def _device_tma_ok(t: Tensor) -> bool:
    """In-kernel descriptors per (batch, head) ``[T, D]`` slice: 16-byte aligned bases and row stride."""
    es = t.element_size()
    return (t.stride(3) == 1 and t.data_ptr() % 16 == 0 and all((t.stride(i) * es) % 16 == 0 for i in range(3))
            and _tma_capable(t) and hasattr(tl, "make_tensor_descriptor"))


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device=_SCRATCH_DEVICE[0])


_SCRATCH_DEVICE = ["cpu"]


def _ensure_allocator(device: torch.device) -> None:
    """In-kernel descriptors need Triton's global-memory scratch allocator; set one (torch memory, so
    CUDA-graph captures take it from the graph's pool) unless the caller has set their own. Triton
    keeps it in a ContextVar, so this runs before every such launch (autograd may run the backward
    in another thread)."""
    _SCRATCH_DEVICE[0] = device
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
    except ImportError:  # pragma: no cover - other Triton layouts: set ours
        triton.set_allocator(_scratch)
        return
    if isinstance(_allocator.get(), NullAllocator):
        triton.set_allocator(_scratch)


def _tma_setup(mode, tensors: tuple[Tensor, ...], block_rows: int, block_d: int) -> tuple[int, tuple]:
    """The kernels' ``TMA`` constexpr and host descriptors for ``tensors`` (loaded in unmasked tiles):
    ``mode`` False -> (0, Nones); True -> host descriptors (1) where possible; "device" -> in-kernel
    descriptors (2) where possible; else pointer loads (0)."""
    none = (None,) * len(tensors)
    if mode == "device":
        if all(_device_tma_ok(t) for t in tensors):
            _ensure_allocator(tensors[0].device)
            return 2, none
        return 0, none
    if mode:
        descs = tuple(_tma_desc(t, block_rows, block_d) for t in tensors)
        if all(d is not None for d in descs):
            return 1, descs
    return 0, none


# eager launches skip Triton's per-call argument binding (ops/triton_launch.py)
_FWD, _DKDV, _DQ, _PREPROCESS = (CachedLaunch(k) for k in (_swa_fwd_kernel, _swa_bwd_dkdv_kernel, _swa_bwd_dq_kernel,
                                                            _bwd_preprocess))


# ---------------------------------------------------------------------------------------------
# host side


def _fwd_impl(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float, need_lo: bool = False, na1d: bool = False):
    """``(o, lse, o_lo)`` as ``triton._fwd_impl``: ``o_lo`` (16-bit inputs with ``need_lo``) is the
    output's rounding residual, else ``None``; ``lse`` ``[B, H, Lq]`` fp32, base 2. ``na1d``: 1-D
    neighborhood attention with kernel size ``window`` (``Lq == Lk``) instead of the causal window."""
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    cfg = launch_config("fwd", d, q.dtype, na1d)
    _check_tile("fwd", cfg)
    o = _alloc(q)
    lse = _alloc(q, (b, h, lq), torch.float32)
    store_lo = need_lo and q.dtype != torch.float32
    o_lo = _alloc(q) if store_lo else None
    if swa_gluon.supported(q, k, v, scale, cfg):  # the Hopper forward: two warp groups share K/V tiles
        swa_gluon.forward(q, k, v, o, lse, o_lo, window, scale * LOG2E, na1d, cfg["gluon"])
        return o, lse, o_lo
    bd = _pow2(d)
    tma, (kd, vd) = _tma_setup(cfg["tma"], (k, v), cfg["BN"], bd)
    _FWD[(_cdiv(lq, cfg["BM"]), b * h)](
        q, k, v, o, lse, o_lo if store_lo else lse, kd, vd,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        scale * LOG2E, window, lq, lk,
        H=h, GROUP=h // hkv, D=d, BLOCK_D=bd, BM=cfg["BM"], BN=cfg["BN"], IEEE=q.dtype == torch.float32, EVEN_D=bd == d,
        POS_SCALE=scale > 0, STORE_LO=store_lo, TMA=tma, WS=bool(cfg["ws"]), LAZY=float(cfg.get("lazy", 0.0)),
        ONE_LOOP=bool(cfg.get("one_loop", False)), NA1D=bool(na1d), num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
    return o, lse, o_lo


def _bwd_impl(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, o_lo: Tensor | None, window: int, scale: float,
              na1d: bool = False):
    """``(dq, dk, dv)``; ``o_lo`` is the forward's residual of a 16-bit ``o`` (``None`` / empty: none).

    Order: Delta (``_bwd_preprocess``), dK/dV (with dQ by atomics if ``fused_dq``), dQ; or, with the
    dQ kernel's ``delta`` switch (and no ``fused_dq``), dQ first (computing and storing Delta), then
    dK/dV, without the preprocess pass. (The steps are separate functions so that
    ``scripts/diag_swa.py`` can time each kernel.)"""
    do = do.contiguous() if do.stride(-1) != 1 else do
    has_lo = o_lo is not None and o_lo.numel() > 0
    if has_lo and o_lo.stride() != o.stride():
        raise ValueError(f"swa backward: o_lo must have o's strides, got {o_lo.stride()} and {o.stride()}")
    lo = o_lo if has_lo else o
    cfg = launch_config("dkdv", q.shape[-1], q.dtype, na1d)
    _check_tile("dkdv", cfg)
    cq = launch_config("dq", q.shape[-1], q.dtype, na1d)
    _check_tile("dq", cq)
    delta = _alloc(q, (q.shape[0], q.shape[2], q.shape[1]), torch.float32)
    if cfg.get("gluon") and swa_gluon_bwd.supported(q, k, v, do, scale, cfg):
        # the Hopper backward: dK, dV and dQ (by atomics) in one kernel, 5 products per pair instead of 7
        _delta_launch(do, o, lo, has_lo, delta)
        dqa, dk, dv = swa_gluon_bwd.backward(do, q, k, v, lse, delta, window, scale, scale * LOG2E, na1d, cfg["gluon"])
        return _dq_finish(dqa, q.dtype, scale), dk, dv
    if cq.get("delta") and not cfg["fused_dq"]:
        dq = _dq_launch(cq, do, q, k, v, o, lo, has_lo, lse, delta, scale, window, True, na1d)
        dk, dv, _ = _dkdv_launch(cfg, do, q, k, v, lse, delta, scale, window, na1d)
        return dq, dk, dv
    _delta_launch(do, o, lo, has_lo, delta)
    dk, dv, dqa = _dkdv_launch(cfg, do, q, k, v, lse, delta, scale, window, na1d)
    if dqa is not None:
        return _dq_finish(dqa, q.dtype, scale), dk, dv
    return _dq_launch(cq, do, q, k, v, o, o, False, lse, delta, scale, window, False, na1d), dk, dv


def _delta_launch(do: Tensor, o: Tensor, o_lo: Tensor, has_lo: bool, delta: Tensor) -> None:
    """Delta = rowsum(dO * O) (fp32 O: ``o`` + ``o_lo`` when ``has_lo``) into ``delta [B, H, Lq]``."""
    b, lq, h, d = o.shape
    _PREPROCESS[(_cdiv(lq, 64), b * h)](o, o_lo, do, delta, o.stride(0), o.stride(1), o.stride(2),
                                        do.stride(0), do.stride(1), do.stride(2), lq, H=h, D=d, BLOCK_D=_pow2(d), BM=64,
                                        HAS_LO=has_lo)


def _dkdv_launch(cfg: dict, do, q, k, v, lse, delta, scale: float, window: int, na1d: bool = False):
    """The dK/dV kernel: ``(dk, dv, dqa)``, ``dqa`` the fp32 dQ accumulator (unscaled) with ``fused_dq``, else None."""
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    bd = _pow2(d)
    fused = cfg["fused_dq"]
    dk = _alloc(k, k.shape)
    dv = _alloc(v, v.shape)
    # atomics need a zeroed fp32 accumulator [B, Lq, H, D] (never poisoned)
    dqa = torch.zeros((b, lq, h, d), device=q.device, dtype=torch.float32) if fused else None
    fused_mode = 0
    dqd = None
    if fused:
        fused_mode = 1
        if fused == "tma":  # TMA reductions of whole tiles into a host descriptor over [B * Lq, H * D]
            dqd = _tma_desc(dqa, cfg["BM"], bd)
            fused_mode = 2 if dqd is not None else 1
    tma, (qd, dod) = _tma_setup(cfg["tma"], (q, do), cfg["BM"], bd)
    _DKDV[(_cdiv(lk, cfg["BN"]), b * hkv)](
        q, k, v, do, lse, delta, dk, dv, lse if dqa is None else dqa, qd, dod, dqd,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2), dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        scale * LOG2E, scale, window, lq, lk,
        H=h, HKV=hkv, GROUP=h // hkv, D=d, BLOCK_D=bd, BM=cfg["BM"], BN=cfg["BN"], IEEE=q.dtype == torch.float32, EVEN_D=bd == d,
        FUSED_DQ=fused_mode, TMA=tma, WS=bool(cfg["ws"]), ONE_LOOP=bool(cfg.get("one_loop", False)), NA1D=bool(na1d),
        num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
    return dk, dv, dqa


def _dq_finish(dqa: Tensor, dtype: torch.dtype, scale: float) -> Tensor:
    """dQ from the fused kernel's fp32 accumulator: one pass, fp32 product, cast on store."""
    if dtype == torch.float32:
        return dqa.mul_(scale)
    dq = torch.empty(dqa.shape, device=dqa.device, dtype=dtype)
    torch.mul(dqa, scale, out=dq)
    return dq


def _dq_launch(cq: dict, do, q, k, v, o, o_lo, has_lo: bool, lse, delta, scale: float, window: int, delta_in: bool,
               na1d: bool = False) -> Tensor:
    """The dQ kernel; with ``delta_in`` it computes Delta from ``o`` (+ ``o_lo``) and ``do`` and stores it."""
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    bd = _pow2(d)
    dq = _alloc(q)
    tma, (kd, vd) = _tma_setup(cq["tma"], (k, v), cq["BN"], bd)
    _DQ[(_cdiv(lq, cq["BM"]), b * h)](
        q, k, v, do, lse, delta, dq, kd, vd, o, o_lo,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2), dq.stride(0), dq.stride(1), dq.stride(2), o.stride(0), o.stride(1), o.stride(2),
        scale * LOG2E, scale, window, lq, lk,
        H=h, GROUP=h // hkv, D=d, BLOCK_D=bd, BM=cq["BM"], BN=cq["BN"], IEEE=q.dtype == torch.float32, EVEN_D=bd == d,
        TMA=tma, WS=bool(cq["ws"]), ONE_LOOP=bool(cq.get("one_loop", False)), DELTA_IN=delta_in, HAS_LO=has_lo,
        NA1D=bool(na1d), num_warps=cq["warps"], num_stages=cq["stages"],
    )
    return dq


#: Keep the 16-bit output's rounding residual ``o_lo`` for every backward (``MNEMO_SWA_PRECISE_DELTA=1``),
#: not only for shared-QK calls (``k is q``). See :func:`keep_residual`.
PRECISE_DELTA = os.environ.get("MNEMO_SWA_PRECISE_DELTA", "0") == "1"


def keep_residual(q: Tensor, k: Tensor) -> bool:
    """Whether the forward stores the output's rounding residual for the backward's Δ = rowsum(dO ∘ O).

    With shared Q/K (``k is q``) the diagonal logit dominates each row and ``dP_ii − Δ_i`` is a small
    difference of two large terms: Δ from the bf16-rounded output gave dq errors of 1.8e-2 (vs 2.2e-3 for
    an fp32-inside peer; ``tests/ops/test_block_sparse_numerics.py``), so there the residual (one more
    ``[B, L, H, D]`` 16-bit tensor) is kept. Otherwise Δ comes from the rounded output, as in
    FlashAttention-2 and FlexAttention, and the forward saves no more than they do (issue #4's peak-memory
    target). ``PRECISE_DELTA`` keeps it always."""
    return PRECISE_DELTA or k is q


@torch.library.custom_op("mnemotorch::swa_attn_fwd", mutates_args=())
def swa_attn_fwd(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float, keep_lo: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    o, lse, o_lo = _fwd_impl(q, k, v, window, scale, need_lo=keep_lo)
    return o, lse, q.new_empty(0) if o_lo is None else o_lo


def _fwd_fake(q, k, v, window, scale, keep_lo=False):
    lo = torch.empty_like(q) if keep_lo and q.dtype != torch.float32 else q.new_empty(0)
    return torch.empty_like(q), q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32), lo


def _bwd_fake(do, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


swa_attn_fwd.register_fake(_fwd_fake)


@torch.library.custom_op("mnemotorch::swa_attn_bwd", mutates_args=())
def swa_attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, o_lo: Tensor, window: int,
                 scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return _bwd_impl(do, q, k, v, o, lse, o_lo, window, scale)


swa_attn_bwd.register_fake(_bwd_fake)


def _setup_context(ctx, inputs, output):
    q, k, v, window, scale = inputs[:5]
    o, lse, o_lo = output
    ctx.save_for_backward(q, k, v, o, lse, o_lo)
    ctx.window, ctx.scale = window, scale


def _autograd_of(bwd_op):
    """The custom forward op's autograd formula: its backward op on the saved tensors."""

    def backward(ctx, do, dlse, dlo):
        q, k, v, o, lse, o_lo = ctx.saved_tensors
        dq, dk, dv = bwd_op(do, q, k, v, o, lse, o_lo, ctx.window, ctx.scale)
        return dq, dk, dv, None, None, None

    return backward


swa_attn_fwd.register_autograd(_autograd_of(swa_attn_bwd), setup_context=_setup_context)


class _EagerSWA(torch.autograd.Function):
    """The same kernels for eager calls, without the custom ops' dispatch cost (see ``triton.py``);
    ``na1d``: the kernels' 1-D neighborhood mode (``window`` = kernel size)."""

    @staticmethod
    def forward(ctx, q, k, v, window, scale, na1d, keep_lo):
        o, lse, o_lo = _fwd_impl(q, k, v, window, scale, need_lo=keep_lo, na1d=na1d)
        ctx.save_for_backward(q, k, v, o, lse, o_lo)
        ctx.window, ctx.scale, ctx.na1d = window, scale, na1d
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, o_lo = ctx.saved_tensors
        dq, dk, dv = _bwd_impl(do, q, k, v, o, lse, o_lo, ctx.window, ctx.scale, ctx.na1d)
        return dq, dk, dv, None, None, None, None


def _call(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float, na1d: bool, fwd_op) -> Tensor:
    """Eager calls: the kernels directly (no autograd record when no input needs a gradient); traced
    or transformed calls: the custom op ``fwd_op``."""
    if _eager_ok(q, k, v):
        if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
            return _fwd_impl(q, k, v, window, scale, na1d=na1d)[0]
        return _EagerSWA.apply(q, k, v, window, scale, na1d, keep_residual(q, k))
    return fwd_op(q, k, v, window, scale, keep_residual(q, k))[0]


def swa_attention_triton(q: Tensor, k: Tensor, v: Tensor, window: int | None, scale: float) -> Tensor:
    """Causal sliding-window attention through the fast-path kernels.

    ``q [B, Lq, H, D]``, ``k/v [B, Lk, Hkv, D]`` (unit last stride; checked by the callers), query
    ``i`` at key position ``Lk - Lq + i`` sees keys ``p - window < j <= p``; ``window=None`` (or
    ``>= Lk``) is plain causal attention.
    """
    lk = k.shape[1]
    window = lk if window is None else min(int(window), lk)
    return _call(q, k, v, window, float(scale), False, swa_attn_fwd)


# ---------------------------------------------------------------------------------------------
# 1-D neighborhood attention (NATTEN, dilation 1, stride 1, non-causal): the same kernels, NA1D=True


@torch.library.custom_op("mnemotorch::na1d_attn_fwd", mutates_args=())
def na1d_attn_fwd(q: Tensor, k: Tensor, v: Tensor, kernel_size: int, scale: float, keep_lo: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    o, lse, o_lo = _fwd_impl(q, k, v, kernel_size, scale, need_lo=keep_lo, na1d=True)
    return o, lse, q.new_empty(0) if o_lo is None else o_lo


@torch.library.custom_op("mnemotorch::na1d_attn_bwd", mutates_args=())
def na1d_attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, o_lo: Tensor, kernel_size: int,
                  scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return _bwd_impl(do, q, k, v, o, lse, o_lo, kernel_size, scale, na1d=True)


na1d_attn_fwd.register_fake(_fwd_fake)
na1d_attn_bwd.register_fake(_bwd_fake)
na1d_attn_fwd.register_autograd(_autograd_of(na1d_attn_bwd), setup_context=_setup_context)


def na1d_attention_triton(q: Tensor, k: Tensor, v: Tensor, kernel_size: int, scale: float) -> Tensor:
    """1-D neighborhood attention (NATTEN semantics, dilation 1, stride 1, non-causal) through the
    list-free kernels: query ``t`` sees keys ``[s, s + kernel_size)``, ``s = clamp(t - kernel_size // 2,
    0, L - kernel_size)``. ``q/k/v [B, L, H(kv), D]`` (self-attention: same ``L``; unit last stride)."""
    lq, lk = q.shape[1], k.shape[1]
    kernel_size = int(kernel_size)
    if lq != lk:
        raise ValueError(f"na1d_attention_triton: needs Lq == Lk (self-attention), got {lq} and {lk}")
    if not 1 <= kernel_size <= lk:
        raise ValueError(f"na1d_attention_triton: kernel_size must be in [1, L = {lk}], got {kernel_size}")
    return _call(q, k, v, kernel_size, float(scale), True, na1d_attn_fwd)


__all__ = ["LAUNCH", "PRECISE_DELTA", "keep_residual", "kernels_used", "launch_config", "na1d_attention_triton", "na1d_attn_bwd", "na1d_attn_fwd", "override_launch",
           "swa_attention_triton", "swa_attn_fwd", "swa_attn_bwd"]
