"""2-D neighborhood attention without block lists and without a token permutation.

NATTEN semantics, dilation 1, stride 1, non-causal, no bias. Tokens of an ``R x C`` grid are
row-major (token ``r * C + c``), ``q/k/v [B, L = R * C, H(kv), D]``. Query ``(r, c)`` sees key
``(y, x)`` iff ``sr(r) <= y < sr(r) + KR`` and ``sc(c) <= x < sc(c) + KC`` with
``sr(r) = clamp(r - KR // 2, 0, R - KR)`` (and ``sc`` likewise): ``swa_triton._na_start`` per axis.
The inverse, the queries that see key row ``y``, is ``[_na_first_query(y), _na_last_query(y)]`` per
axis; both are nondecreasing, so a rectangle of queries sees a rectangle of keys and back.

Geometry (every tile shape below is a launch parameter, ``LAUNCH`` / ``override_launch``):

* forward and dQ, one program per (query tile, batch * head). The query tile is ``QR x QC`` grid
  cells (``BM = QR * QC`` rows of the matmuls), gathered from the row-major tensors by pointer
  arithmetic. Its keys are the union of its queries' windows, rows ``[sr(r0), sr(r_last) + KR)`` and
  columns ``[sc(c0), sc(c_last) + KC)``, visited in key tiles of ``KTR x KTC`` cells (``BN``): the
  column start is the union's first column pulled left so that the tile stays inside the grid
  (``max(min(c_lo, C - KTC), 0)``), row groups step by ``KTR`` from the union's first row. All the
  (row group, column group) pairs run in ONE loop (one software pipeline on the GPU). Every tile
  applies the 2-D window mask from per-query ``sr, sc [BM]`` and per-key ``y, x [BN]`` (cells
  outside the grid never pass it: every window lies inside the grid).
* dK/dV, one program per (key tile ``KTR x KTC``, batch * KV head), looping over the GQA group's
  query heads and over gathered query tiles (``QR x QC``) of the inverted windows: rows
  ``[first(y0), last(y_last)]``, columns likewise, column start pulled inside the grid. Near the
  borders those ranges are up to ``K + K // 2`` long, so loop counts are runtime values.
* Delta = rowsum(dO * O), computed by the dQ kernel (or ``triton._bwd_preprocess``) from the output,
  plus the forward's rounding residual of a 16-bit output where one is kept (shared Q/K only, as in
  ``swa_triton.keep_residual``; FlashAttention-2 and FlexAttention keep none); P is recomputed from the
  saved ``lse2 = m + log2(l)`` ``[B, H, L]`` fp32 (scores in base 2, ``s * scale * log2(e)``), as in
  ``swa_triton``.

Counts at the issue's case (128 x 128 grid, 13 x 13 kernel, D = 64, H = 16, B = 1): an interior
4 x 16 query tile has a union of 16 rows x 28 columns, covered by 8 key tiles of 2 x 32 = 512 keys
per query (169 allowed: 33% of the computed pairs are used). Tokens permuted into 8 x 8 tiles and
walked by block lists compute 9 key tiles of 64 = 576 keys per query; row-major 1-D blocks of 64
tokens (what FlexAttention does on row-major tokens) touch 13 rows of 2-3 blocks each. Forward
FLOPs (4 D per computed pair): 16384 * 512 * 16 * 4 * 64 = 34.4 GFLOP computed at 512 keys per query
(33.8 with the smaller unions at the borders: 504 keys per query on average), 11.3 GFLOP allowed;
forward + backward ~3.5x that. Gathering tiles from row-major tokens, instead of permuting the
tokens into tiles (NATTEN's Hopper trick), saves the permutation and its inverse (4 extra passes
over q, k, v, o and their gradients) and lets the query tile's shape differ from the key tile's,
so the 28-column union fits one 32-column key tile with no wasted tile column.

Registered as ``torch.library.custom_op``s ``mnemotorch::na2d_attn_fwd`` / ``_bwd`` with an autograd
formula; eager calls go through a plain ``autograd.Function`` (as ``swa_triton`` does for NA-1D).
Entry point: :func:`na2d_attention_triton`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_launch import CachedLaunch
from .launch import launch_overrides
from .swa_triton import _delta_launch, _mma, _na_first_query, _na_last_query, _na_start, keep_residual
from .triton import LOG2E, _alloc, _cdiv, _dq_delta, _eager_ok, _ld_rows, _mm, _pow2, _st_rows

# ---------------------------------------------------------------------------------------------
# geometry helpers


@triton.jit
def _cells(r0, c0, R, C, TR: tl.constexpr, TC: tl.constexpr):
    """The ``TR x TC`` grid cells from ``(r0, c0)``, flattened row-major: ``(rows, cols, in_grid,
    token)`` each ``[TR * TC]``; ``token = row * C + col`` is only meaningful where ``in_grid``."""
    i = tl.arange(0, TR * TC)
    r = r0 + i // TC
    c = c0 + i % TC
    ok = (r < R) & (c < C)
    return r, c, ok, r * C + c


@triton.jit
def _in_window(sr, sc, y, x, KR, KC):
    """Whether key ``(y, x)`` lies in the window starting at ``(sr, sc)`` (broadcast by the caller)."""
    return (y >= sr) & (y < sr + KR) & (x >= sc) & (x < sc + KC)


@triton.jit
def _key_span(a0, T: tl.constexpr, K, L):
    """Keys ``[lo, hi)`` on one axis seen by the queries ``[a0, a0 + T)`` (clipped to the axis)."""
    last = tl.minimum(a0 + T, L) - 1
    return _na_start(a0, K, L), _na_start(last, K, L) + K


@triton.jit
def _query_span(b0, T: tl.constexpr, K, L):
    """Queries ``[lo, hi)`` on one axis that see a key of ``[b0, b0 + T)`` (clipped to the axis)."""
    last = tl.minimum(b0 + T, L) - 1
    return _na_first_query(b0, K, L), _na_last_query(last, K, L) + 1


@triton.jit
def _tile_walk(row_lo, row_hi, col_lo, col_hi, C, TR: tl.constexpr, TC: tl.constexpr):
    """How to cover rows ``[row_lo, row_hi)`` x columns ``[col_lo, col_hi)`` with ``TR x TC`` tiles:
    ``(col_start, n_row_groups, n_tiles)``. The column start is pulled left so that the tiles stay
    inside the grid where it is wide enough (full loads; one tile instead of two when the span
    fits), never right of ``col_lo``, so the span stays covered."""
    col_s = tl.maximum(tl.minimum(col_lo, C - TC), 0)
    n_rg = (row_hi - row_lo + TR - 1) // TR
    n_cg = (col_hi - col_s + TC - 1) // TC
    return col_s, n_rg, n_rg * n_cg


# ---------------------------------------------------------------------------------------------
# forward


@triton.jit
def _na2d_fwd_kernel(
    Q, K, V, O, LSE, OLO,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
    qk_scale, R, C, KR, KC,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    QR: tl.constexpr, QC: tl.constexpr, KTR: tl.constexpr, KTC: tl.constexpr,
    IEEE: tl.constexpr, EVEN_D: tl.constexpr, STORE_LO: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    n_tc = (C + QC - 1) // QC
    r0 = (tile // n_tc) * QR
    c0 = (tile % n_tc) * QC
    qr, qc, q_ok, q_tok = _cells(r0, c0, R, C, QR, QC)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = _ld_rows(Q + b.to(tl.int64) * sqb + h * sqh + q_tok[:, None].to(tl.int64) * sqt + offs_d[None, :], q_ok, d_ok, EVEN_D)
    # cells past the grid's edge get clamped (valid) windows: no NaN, never stored
    sr = _na_start(qr, KR, R)
    sc = _na_start(qc, KC, C)
    k_base = K + b.to(tl.int64) * skb + hk * skh
    v_base = V + b.to(tl.int64) * svb + hk * svh

    row_lo, row_hi = _key_span(r0, QR, KR, R)
    col_lo, col_hi = _key_span(c0, QC, KC, C)
    col_s, n_rg, n_t = _tile_walk(row_lo, row_hi, col_lo, col_hi, C, KTR, KTC)

    m_i = tl.full([QR * QC], float("-inf"), tl.float32)
    l_i = tl.zeros([QR * QC], tl.float32)
    acc = tl.zeros([QR * QC, BLOCK_D], tl.float32)
    for t in tl.range(0, n_t):  # (row group, column group) pairs in one pipelined loop
        ky, kx, k_ok, k_tok = _cells(row_lo + (t % n_rg) * KTR, col_s + (t // n_rg) * KTC, R, C, KTR, KTC)
        k = _ld_rows(k_base + k_tok[:, None].to(tl.int64) * skt + offs_d[None, :], k_ok, d_ok, EVEN_D)
        v = _ld_rows(v_base + k_tok[:, None].to(tl.int64) * svt + offs_d[None, :], k_ok, d_ok, EVEN_D)
        qk = _mm(q, tl.trans(k), IEEE)
        ok = _in_window(sr[:, None], sc[:, None], ky[None, :], kx[None, :], KR, KC)
        s = tl.where(ok, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row whose window has not started yet (first tiles) keeps m = -inf: subtract 0 (no NaN)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
        m_i = m_new

    # every query sees >= 1 key (its own cell), so l > 0 on the rows that are stored
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc * (1.0 / l_safe)[:, None]
    o_off = b.to(tl.int64) * sob + h * soh + q_tok[:, None].to(tl.int64) * sot + offs_d[None, :]
    o_lp = out.to(O.dtype.element_ty)
    _st_rows(O + o_off, o_lp, q_ok, d_ok, EVEN_D)
    if STORE_LO:  # the output's rounding residual, for Delta from the fp32 output (see triton._bwd_preprocess)
        _st_rows(OLO + o_off, (out - o_lp.to(tl.float32)).to(OLO.dtype.element_ty), q_ok, d_ok, EVEN_D)
    tl.store(LSE + bh.to(tl.int64) * R * C + q_tok, m_i + tl.math.log2(l_safe), mask=q_ok)


# ---------------------------------------------------------------------------------------------
# backward


@triton.jit
def _na2d_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh, sdkb, sdkt, sdkh, sdvb, sdvt, sdvh,
    qk_scale, sm_scale, R, C, KR, KC,
    H: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    QR: tl.constexpr, QC: tl.constexpr, KTR: tl.constexpr, KTC: tl.constexpr,
    IEEE: tl.constexpr, EVEN_D: tl.constexpr,
):
    tile = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    n_tc = (C + KTC - 1) // KTC
    y0 = (tile // n_tc) * KTR
    x0 = (tile % n_tc) * KTC
    ky, kx, k_ok, k_tok = _cells(y0, x0, R, C, KTR, KTC)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k = _ld_rows(K + b.to(tl.int64) * skb + hk * skh + k_tok[:, None].to(tl.int64) * skt + offs_d[None, :], k_ok, d_ok, EVEN_D)
    v = _ld_rows(V + b.to(tl.int64) * svb + hk * svh + k_tok[:, None].to(tl.int64) * svt + offs_d[None, :], k_ok, d_ok, EVEN_D)

    row_lo, row_hi = _query_span(y0, KTR, KR, R)
    col_lo, col_hi = _query_span(x0, KTC, KC, C)
    col_s, n_rg, n_t = _tile_walk(row_lo, row_hi, col_lo, col_hi, C, QR, QC)

    dk = tl.zeros([KTR * KTC, BLOCK_D], tl.float32)
    dv = tl.zeros([KTR * KTC, BLOCK_D], tl.float32)
    L = R * C
    for g in range(GROUP):  # the GQA group's query heads: dK/dV per KV head, no fp32 per-query-head buffers
        h = hk * GROUP + g
        q_base = Q + b.to(tl.int64) * sqb + h * sqh
        do_base = DO + b.to(tl.int64) * sdob + h * sdoh
        stat = (b * H + h).to(tl.int64) * L
        for t in tl.range(0, n_t):
            qr, qc, q_ok, q_tok = _cells(row_lo + (t % n_rg) * QR, col_s + (t // n_rg) * QC, R, C, QR, QC)
            q = _ld_rows(q_base + q_tok[:, None].to(tl.int64) * sqt + offs_d[None, :], q_ok, d_ok, EVEN_D)
            do = _ld_rows(do_base + q_tok[:, None].to(tl.int64) * sdot + offs_d[None, :], q_ok, d_ok, EVEN_D)
            lse = tl.load(LSE + stat + q_tok, mask=q_ok, other=0.0)
            delta = tl.load(DELTA + stat + q_tok, mask=q_ok, other=0.0)
            sr = _na_start(qr, KR, R)
            sc = _na_start(qc, KC, C)
            qkt = _mm(k, tl.trans(q), IEEE)  # [BN, BM]
            # cells past the grid have valid (clamped) windows: q_ok keeps them out
            ok = _in_window(sr[None, :], sc[None, :], ky[:, None], kx[:, None], KR, KC) & q_ok[None, :]
            pt = tl.where(ok, tl.math.exp2(qkt * qk_scale - lse[None, :]), 0.0)
            dv = _mma(pt.to(do.dtype), do, dv, IEEE)
            dpt = _mm(v, tl.trans(do), IEEE)
            dst = (pt * (dpt - delta[None, :])).to(q.dtype)
            dk = _mma(dst, q, dk, IEEE)
    _st_rows(DK + b.to(tl.int64) * sdkb + hk * sdkh + k_tok[:, None].to(tl.int64) * sdkt + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), k_ok, d_ok, EVEN_D)
    _st_rows(DV + b.to(tl.int64) * sdvb + hk * sdvh + k_tok[:, None].to(tl.int64) * sdvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), k_ok, d_ok, EVEN_D)


@triton.jit
def _na2d_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, O, OLO,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh, sdqb, sdqt, sdqh, sob, sot, soh,
    qk_scale, sm_scale, R, C, KR, KC,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    QR: tl.constexpr, QC: tl.constexpr, KTR: tl.constexpr, KTC: tl.constexpr,
    IEEE: tl.constexpr, EVEN_D: tl.constexpr, DELTA_IN: tl.constexpr, HAS_LO: tl.constexpr,
):
    # DELTA_IN: this kernel runs before dK/dV and computes Delta = rowsum(dO * O) of its rows itself
    # (it holds dO already), storing it for dK/dV: no preprocess pass over O, its residual and dO.
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    n_tc = (C + QC - 1) // QC
    r0 = (tile // n_tc) * QR
    c0 = (tile % n_tc) * QC
    qr, qc, q_ok, q_tok = _cells(r0, c0, R, C, QR, QC)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = _ld_rows(Q + b.to(tl.int64) * sqb + h * sqh + q_tok[:, None].to(tl.int64) * sqt + offs_d[None, :], q_ok, d_ok, EVEN_D)
    do = _ld_rows(DO + b.to(tl.int64) * sdob + h * sdoh + q_tok[:, None].to(tl.int64) * sdot + offs_d[None, :], q_ok, d_ok, EVEN_D)
    stat = bh.to(tl.int64) * R * C
    lse = tl.load(LSE + stat + q_tok, mask=q_ok, other=0.0)
    if DELTA_IN:
        delta = _dq_delta(O, OLO, DELTA, do, b, h, bh, sob, sot, soh, q_tok, offs_d, q_ok, d_ok, R * C, EVEN_D, HAS_LO)
    else:
        delta = tl.load(DELTA + stat + q_tok, mask=q_ok, other=0.0)
    sr = _na_start(qr, KR, R)
    sc = _na_start(qc, KC, C)
    k_base = K + b.to(tl.int64) * skb + hk * skh
    v_base = V + b.to(tl.int64) * svb + hk * svh

    row_lo, row_hi = _key_span(r0, QR, KR, R)
    col_lo, col_hi = _key_span(c0, QC, KC, C)
    col_s, n_rg, n_t = _tile_walk(row_lo, row_hi, col_lo, col_hi, C, KTR, KTC)

    dq = tl.zeros([QR * QC, BLOCK_D], tl.float32)
    for t in tl.range(0, n_t):
        ky, kx, k_ok, k_tok = _cells(row_lo + (t % n_rg) * KTR, col_s + (t // n_rg) * KTC, R, C, KTR, KTC)
        k = _ld_rows(k_base + k_tok[:, None].to(tl.int64) * skt + offs_d[None, :], k_ok, d_ok, EVEN_D)
        v = _ld_rows(v_base + k_tok[:, None].to(tl.int64) * svt + offs_d[None, :], k_ok, d_ok, EVEN_D)
        qk = _mm(q, tl.trans(k), IEEE)
        ok = _in_window(sr[:, None], sc[:, None], ky[None, :], kx[None, :], KR, KC)
        p = tl.where(ok, tl.math.exp2(qk * qk_scale - lse[:, None]), 0.0)
        dp = _mm(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(k.dtype), k, dq, IEEE)
    _st_rows(DQ + b.to(tl.int64) * sdqb + h * sdqh + q_tok[:, None].to(tl.int64) * sdqt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), q_ok, d_ok, EVEN_D)


# ---------------------------------------------------------------------------------------------
# launch parameters

#: Launch parameters per (kernel, padded head dim class, operand class "16" = fp16/bf16 or "32" =
#: fp32). "fwd" / "dq": query tile ``QR x QC`` per program, key tiles ``KTR x KTC`` per loop step;
#: "dkdv": key tile ``KTR x KTC`` per program, query tiles ``QR x QC`` per loop step. Each of
#: ``QR, QC, KTR, KTC`` a power of two, ``QR * QC`` and ``KTR * KTC`` >= 16.
#:
#: The 16-bit D <= 64 rows are the best measured on an H100 at 128 x 128 / 13 x 13 / H 16
#: (``scripts/diag_swa.py --na2d``, docs/results/block_sparse.md): 4 x 16 query tiles with 2 x 32 key
#: tiles (28-column unions in one 32-column key tile), dK/dV transposed (4 x 16 key tiles, 2 x 32
#: query tiles, 2 stages), dQ computing Delta; 4 warps everywhere. The other rows are scaled down for
#: registers / shared memory and not timed.
LAUNCH: dict[tuple[str, int, str], dict] = {
    ("fwd", 64, "16"): dict(QR=4, QC=16, KTR=2, KTC=32, warps=4, stages=3),
    ("fwd", 128, "16"): dict(QR=4, QC=16, KTR=2, KTC=32, warps=4, stages=2),
    ("fwd", 256, "16"): dict(QR=4, QC=16, KTR=1, KTC=32, warps=4, stages=1),
    ("dkdv", 64, "16"): dict(QR=2, QC=32, KTR=4, KTC=16, warps=4, stages=2),
    ("dkdv", 128, "16"): dict(QR=2, QC=16, KTR=4, KTC=16, warps=4, stages=2),
    ("dkdv", 256, "16"): dict(QR=1, QC=32, KTR=2, KTC=16, warps=4, stages=1),
    ("dq", 64, "16"): dict(QR=4, QC=16, KTR=2, KTC=32, warps=4, stages=3, delta=True),
    ("dq", 128, "16"): dict(QR=4, QC=16, KTR=1, KTC=32, warps=4, stages=2, delta=True),
    ("dq", 256, "16"): dict(QR=2, QC=16, KTR=1, KTC=32, warps=4, stages=1, delta=True),
    ("fwd", 64, "32"): dict(QR=4, QC=16, KTR=1, KTC=32, warps=4, stages=2),
    ("fwd", 128, "32"): dict(QR=4, QC=16, KTR=1, KTC=32, warps=4, stages=1),
    ("fwd", 256, "32"): dict(QR=2, QC=16, KTR=1, KTC=16, warps=4, stages=1),
    ("dkdv", 64, "32"): dict(QR=1, QC=32, KTR=4, KTC=16, warps=4, stages=2),
    ("dkdv", 128, "32"): dict(QR=1, QC=32, KTR=4, KTC=16, warps=8, stages=1),
    ("dkdv", 256, "32"): dict(QR=1, QC=16, KTR=2, KTC=16, warps=4, stages=1),
    ("dq", 64, "32"): dict(QR=4, QC=16, KTR=1, KTC=32, warps=4, stages=2, delta=True),
    ("dq", 128, "32"): dict(QR=4, QC=16, KTR=1, KTC=32, warps=4, stages=1, delta=True),
    ("dq", 256, "32"): dict(QR=2, QC=16, KTR=1, KTC=16, warps=4, stages=1, delta=True),
}
_KEYS = ("QR", "QC", "KTR", "KTC", "warps", "stages", "delta")
_KINDS = ("fwd", "dkdv", "dq")
#: per-kernel overrides (``override_launch``), applied over the table for every head dim / dtype
_OVERRIDES: dict[str, dict] = {}


def _dclass(d: int) -> int:
    return 64 if d <= 64 else (128 if d <= 128 else 256)


# eager launches skip Triton's per-call argument binding (ops/triton_launch.py)
_FWD, _DQ, _DKDV = (CachedLaunch(k) for k in (_na2d_fwd_kernel, _na2d_bwd_dq_kernel, _na2d_bwd_dkdv_kernel))


def launch_config(kind: str, d: int, dtype: torch.dtype) -> dict:
    """The launch parameters of kernel ``kind`` ("fwd", "dkdv", "dq") for head dim ``d`` and ``dtype``."""
    cfg = dict(LAUNCH[(kind, _dclass(d), "32" if dtype == torch.float32 else "16")])
    cfg.update(_OVERRIDES.get(kind, {}))
    _check_launch(kind, cfg)
    return cfg


def _check_launch(kind: str, cfg: dict) -> None:
    for name in ("QR", "QC", "KTR", "KTC"):
        x = cfg[name]
        if not (isinstance(x, int) and x >= 1 and x & (x - 1) == 0):
            raise ValueError(f"na2d launch {kind}: {name} must be a power of two, got {x!r}")
    for a, b in (("QR", "QC"), ("KTR", "KTC")):
        if cfg[a] * cfg[b] < 16:
            raise ValueError(f"na2d launch {kind}: {a} * {b} must be >= 16 (a matmul operand's rows), got {cfg[a] * cfg[b]}")


def override_launch(**kinds: dict | None):
    """``with override_launch(fwd=dict(QR=8, QC=8), dkdv=dict(warps=8)):`` -- launch parameters for the
    calls inside (tests, the launch sweep); the keys of each dict replace the table's."""
    return launch_overrides(_OVERRIDES, {kind: _KEYS for kind in _KINDS}, kinds)


def computed_pairs(shape: tuple[int, int], kernel_size: tuple[int, int], cfg: dict) -> int:
    """(query, key) pairs the forward (or dQ) kernel computes with launch ``cfg`` on one (batch, head):
    per program, its key tiles times ``BM`` (rows past the grid included, as the matmuls do them)."""
    rows, cols = shape
    kr, kc = kernel_size
    qr, qc, ktr, ktc = cfg["QR"], cfg["QC"], cfg["KTR"], cfg["KTC"]

    def start(p, k, n):
        return min(max(p - k // 2, 0), n - k)

    total = 0
    for r0 in range(0, rows, qr):
        row_lo, row_hi = start(r0, kr, rows), start(min(r0 + qr, rows) - 1, kr, rows) + kr
        n_rg = _cdiv(row_hi - row_lo, ktr)
        for c0 in range(0, cols, qc):
            col_lo, col_hi = start(c0, kc, cols), start(min(c0 + qc, cols) - 1, kc, cols) + kc
            col_s = max(min(col_lo, cols - ktc), 0)
            total += n_rg * _cdiv(col_hi - col_s, ktc) * ktr * ktc * qr * qc
    return total


# ---------------------------------------------------------------------------------------------
# host side


def _fwd_impl(q: Tensor, k: Tensor, v: Tensor, rows: int, cols: int, kr: int, kc: int, scale: float, need_lo: bool = False):
    """``(o, lse, o_lo)``: ``o [B, L, H, D]``; ``lse [B, H, L]`` fp32, base 2; ``o_lo`` (16-bit inputs
    with ``need_lo``) the output's rounding residual, else ``None``."""
    b, n, h, d = q.shape
    hkv = k.shape[2]
    cfg = launch_config("fwd", d, q.dtype)
    o = _alloc(q)
    lse = _alloc(q, (b, h, n), torch.float32)
    store_lo = need_lo and q.dtype != torch.float32
    o_lo = _alloc(q) if store_lo else None
    bd = _pow2(d)
    grid = (_cdiv(rows, cfg["QR"]) * _cdiv(cols, cfg["QC"]), b * h)
    _FWD[grid](
        q, k, v, o, lse, o_lo if store_lo else lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        scale * LOG2E, rows, cols, kr, kc,
        H=h, GROUP=h // hkv, D=d, BLOCK_D=bd, QR=cfg["QR"], QC=cfg["QC"], KTR=cfg["KTR"], KTC=cfg["KTC"],
        IEEE=q.dtype == torch.float32, EVEN_D=bd == d, STORE_LO=store_lo, num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
    return o, lse, o_lo


def _bwd_impl(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, o_lo: Tensor | None, rows: int, cols: int,
              kr: int, kc: int, scale: float):
    """``(dq, dk, dv)``: with the dQ row's ``delta`` (default) dQ first, computing Delta from the fp32
    output itself, then dK/dV; else Delta (``_bwd_preprocess``), dK/dV, dQ;
    ``o_lo`` is the forward's residual of a 16-bit ``o`` (``None`` / empty: none)."""
    do = do.contiguous() if do.stride(-1) != 1 else do
    has_lo = o_lo is not None and o_lo.numel() > 0
    if has_lo and o_lo.stride() != o.stride():
        raise ValueError(f"na2d backward: o_lo must have o's strides, got {o_lo.stride()} and {o.stride()}")
    b, n, h, d = q.shape
    hkv = k.shape[2]
    bd = _pow2(d)
    ieee = q.dtype == torch.float32
    delta = _alloc(q, (b, h, n), torch.float32)
    cq = launch_config("dq", d, q.dtype)
    delta_in = bool(cq.get("delta", False))
    dq = _alloc(q)

    def dq_launch():
        lo = o_lo if has_lo else o
        _DQ[(_cdiv(rows, cq["QR"]) * _cdiv(cols, cq["QC"]), b * h)](
            q, k, v, do, lse, delta, dq, o, lo,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2), dq.stride(0), dq.stride(1), dq.stride(2), o.stride(0), o.stride(1), o.stride(2),
            scale * LOG2E, scale, rows, cols, kr, kc,
            H=h, GROUP=h // hkv, D=d, BLOCK_D=bd, QR=cq["QR"], QC=cq["QC"], KTR=cq["KTR"], KTC=cq["KTC"],
            IEEE=ieee, EVEN_D=bd == d, DELTA_IN=delta_in, HAS_LO=has_lo, num_warps=cq["warps"], num_stages=cq["stages"],
        )

    if delta_in:  # dQ first: it writes Delta for dK/dV
        dq_launch()
    else:
        _delta_launch(do, o, o_lo if has_lo else o, has_lo, delta)

    ck = launch_config("dkdv", d, q.dtype)
    dk = _alloc(k, k.shape)
    dv = _alloc(v, v.shape)
    _DKDV[(_cdiv(rows, ck["KTR"]) * _cdiv(cols, ck["KTC"]), b * hkv)](
        q, k, v, do, lse, delta, dk, dv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2), dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        scale * LOG2E, scale, rows, cols, kr, kc,
        H=h, HKV=hkv, GROUP=h // hkv, D=d, BLOCK_D=bd, QR=ck["QR"], QC=ck["QC"], KTR=ck["KTR"], KTC=ck["KTC"],
        IEEE=ieee, EVEN_D=bd == d, num_warps=ck["warps"], num_stages=ck["stages"],
    )
    if not delta_in:
        dq_launch()
    return dq, dk, dv


@torch.library.custom_op("mnemotorch::na2d_attn_fwd", mutates_args=())
def na2d_attn_fwd(q: Tensor, k: Tensor, v: Tensor, rows: int, cols: int, kernel_rows: int, kernel_cols: int,
                  scale: float, keep_lo: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``keep_lo``: store the output's rounding residual for the backward (``swa_triton.keep_residual``)."""
    o, lse, o_lo = _fwd_impl(q, k, v, rows, cols, kernel_rows, kernel_cols, scale, need_lo=keep_lo)
    return o, lse, q.new_empty(0) if o_lo is None else o_lo


@na2d_attn_fwd.register_fake
def _(q, k, v, rows, cols, kernel_rows, kernel_cols, scale, keep_lo=False):
    lo = torch.empty_like(q) if keep_lo and q.dtype != torch.float32 else q.new_empty(0)
    return torch.empty_like(q), q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32), lo


@torch.library.custom_op("mnemotorch::na2d_attn_bwd", mutates_args=())
def na2d_attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, o_lo: Tensor, rows: int, cols: int,
                  kernel_rows: int, kernel_cols: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return _bwd_impl(do, q, k, v, o, lse, o_lo, rows, cols, kernel_rows, kernel_cols, scale)


@na2d_attn_bwd.register_fake
def _(do, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, rows, cols, kr, kc, scale = inputs[:8]
    o, lse, o_lo = output
    ctx.save_for_backward(q, k, v, o, lse, o_lo)
    ctx.geometry, ctx.scale = (rows, cols, kr, kc), scale


def _backward(ctx, do, dlse, dlo):
    q, k, v, o, lse, o_lo = ctx.saved_tensors
    dq, dk, dv = na2d_attn_bwd(do, q, k, v, o, lse, o_lo, *ctx.geometry, ctx.scale)
    return dq, dk, dv, None, None, None, None, None, None


na2d_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerNA2D(torch.autograd.Function):
    """The same kernels for eager calls, without the custom ops' dispatch cost (see ``triton.py``)."""

    @staticmethod
    def forward(ctx, q, k, v, rows, cols, kr, kc, scale, keep_lo):
        o, lse, o_lo = _fwd_impl(q, k, v, rows, cols, kr, kc, scale, need_lo=keep_lo)
        ctx.save_for_backward(q, k, v, o, lse, o_lo)
        ctx.geometry, ctx.scale = (rows, cols, kr, kc), scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, o_lo = ctx.saved_tensors
        dq, dk, dv = _bwd_impl(do, q, k, v, o, lse, o_lo, *ctx.geometry, ctx.scale)
        return dq, dk, dv, None, None, None, None, None, None


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _pair(name: str, value) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"na2d_attention_triton: {name} must be an int or a pair of ints, got {value!r}")


def na2d_attention_triton(q: Tensor, k: Tensor, v: Tensor, shape, kernel_size, scale: float | None = None) -> Tensor:
    """2-D neighborhood attention (NATTEN semantics, dilation 1, stride 1, non-causal, no bias) on
    row-major tokens of an ``R x C`` grid, through the list-free kernels.

    Args:
        q: ``[B, L, H, D]`` with ``L = R * C`` (token ``r * C + c``).
        k, v: ``[B, L, Hkv, D]``, ``H % Hkv == 0`` (GQA).
        shape: ``(R, C)``.
        kernel_size: an int or ``(KR, KC)``, ``1 <= KR <= R``, ``1 <= KC <= C``.
        scale: logit scale, default ``D ** -0.5``.

    Returns:
        ``[B, L, H, D]``: query ``(r, c)`` attends keys ``[sr, sr + KR) x [sc, sc + KC)``,
        ``sr = clamp(r - KR // 2, 0, R - KR)`` (``sc`` likewise).
    """
    fn = "na2d_attention_triton"
    rows, cols = _pair("shape", shape)
    kr, kc = _pair("kernel_size", kernel_size)
    if rows < 1 or cols < 1:
        raise ValueError(f"{fn}: shape must be positive, got {(rows, cols)}")
    if not (1 <= kr <= rows and 1 <= kc <= cols):
        raise ValueError(f"{fn}: kernel_size must be in [1, R] x [1, C] = [1, {rows}] x [1, {cols}], got {(kr, kc)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be a 4-D tensor [B, L, heads, D], got "
                             f"{list(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    b, n, h, d = q.shape
    if n != rows * cols:
        raise ValueError(f"{fn}: q has L = {n} tokens but shape {(rows, cols)} holds {rows * cols}")
    if k.shape != v.shape or k.shape[0] != b or k.shape[1] != n or k.shape[3] != d:
        raise ValueError(f"{fn}: k and v must be [B, L, Hkv, D] = [{b}, {n}, Hkv, {d}], got k {list(k.shape)}, v {list(v.shape)}")
    if h % k.shape[2]:
        raise ValueError(f"{fn}: q's heads ({h}) must be a multiple of k/v's heads ({k.shape[2]})")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{fn}: q, k, v must share one dtype of {SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not 16 <= d <= 256:
        raise ValueError(f"{fn}: head dim D must be in [16, 256], got {d}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{fn}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = d**-0.5 if scale is None else float(scale)
    if _eager_ok(q, k, v):
        if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
            return _fwd_impl(q, k, v, rows, cols, kr, kc, scale)[0]
        return _EagerNA2D.apply(q, k, v, rows, cols, kr, kc, scale, keep_residual(q, k))
    return na2d_attn_fwd(q, k, v, rows, cols, kr, kc, scale, keep_residual(q, k))[0]


__all__ = ["LAUNCH", "computed_pairs", "launch_config", "na2d_attention_triton", "na2d_attn_bwd", "na2d_attn_fwd",
           "override_launch"]
