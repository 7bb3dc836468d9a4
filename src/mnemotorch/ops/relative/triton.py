"""Fused Triton kernels of Music Transformer relative attention (forward and backward).

Computes, for query ``i`` (absolute position ``Tk - Tq + i``) and key ``j <= i`` of one head,

    o_i = sum_j softmax_j((q_i . k_j + q_i . E[min(i - j, R)]) * scale) v_j

FlashAttention-2 style: one program per (query tile, batch * head) in the forward and dQ/dE
kernels, one per (key tile, batch * head) in the dK/dV kernel; the scores never leave registers, and
the only extra memory is the per-row log-sum-exp (and ``delta``) of ``O(Tq H)`` plus an fp32
``dE`` accumulator of the table's own size. Neither ``L x L`` nor ``L x L x D`` is ever formed.

**The E band (skewing in registers).** For the tile of queries ``q0 .. q0+BM-1`` and keys
``j0 .. j0+BN-1`` the distances ``i - j`` are ``q0 - j0 + (a - b)`` with ``a - b`` in
``-(BN-1) .. BM-1``. The kernel loads those ``BM + BN - 1`` rows of ``E`` (clipped to ``0 .. R``),
computes ``QE = Q_tile E_band^T`` (``[BM, W]``, one tensor-core product) and reads the diagonal band

    S_rel[a, b] = QE[a, a - b + BN - 1]

with ``tl.gather`` along the band axis -- the skew of the paper, done per tile.

**Far tiles.** When every distance of a tile is ``>= R`` they all use row ``R``: ``S_rel[a, b] =
q_a . E[R]`` is one number per query row, computed once per program. Those tiles cost exactly
what plain attention costs; only the ``~R / BN`` tiles next to the diagonal pay for the band.

**Backward.** With ``P`` the probabilities, ``dP = dO V^T``, ``delta_i = dO_i . O_i`` and
``dS = P * (dP - delta)`` (the gradient of the logits before ``scale``):

    dq_i = scale * sum_j dS_ij (k_j + E[d_ij]),   dk_j = scale * sum_i dS_ij q_i,
    dv_j = sum_i P_ij dO_i,                        dE[r] = scale * sum_{i, j: d_ij = r} dS_ij q_i

with ``d_ij = min(i - j, R)``. Per near tile the dQ/dE kernel *un-skews* ``dS`` into band layout,
``G[a, c] = dS[a, a - c + BN - 1]`` (zero where that column does not exist), so that the two
relative terms become products: ``dq += G E_band`` and ``dE_band = G^T Q_tile``, the latter added
to the ``dE`` rows with atomics (several band rows clip to row ``R``; the atomics sum them). Far
tiles only accumulate the row sums ``sum_j dS_ij``, which give ``dq_i += rowsum_i E[R]`` and one
atomic ``dE[R] += sum_i rowsum_i q_i`` per program.

Registered as ``torch.library.custom_op``s (``mnemotorch::relative_attn_fwd`` / ``_bwd``) with an
autograd formula, so ``torch.compile`` traces through them. Scores are in the base-2 domain
(``exp2``), as in the block-sparse kernel.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..block_sparse.triton import _mm  # a @ b, fp32 accumulation, IEEE products when asked

LOG2E = 1.4426950408889634

#: dtypes the kernels accept (fp32 accumulation; fp64 goes to the reference).
SUPPORTED_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _ld(ptrs, row_ok, d_ok):
    return tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _band(q, e_ptr, ser, dist0, R, offs_w, offs_d, d_ok, BN: tl.constexpr, IEEE: tl.constexpr):
    """The tile's ``E`` band and ``QE = Q E_band^T``.

    ``dist0 = q0 - j0``; band column ``c`` is distance ``dist0 - BN + 1 + c``, clipped to ``0 .. R``
    (negative distances are above the diagonal: masked later, any row will do).
    Returns ``e_band [W, BLOCK_D]``, ``qe [BM, W]`` (fp32) and the band's unclipped distances ``[W]``.
    """
    dist = dist0 - BN + 1 + offs_w
    rows = tl.minimum(tl.maximum(dist, 0), R)
    eb = tl.load(e_ptr + rows[:, None].to(tl.int64) * ser + offs_d[None, :], mask=d_ok[None, :], other=0.0)
    qe = _mm(q, tl.trans(eb), IEEE)
    return eb, qe, dist


@triton.jit
def _fwd_kernel(
    Q, K, V, E, O, LSE,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, seh, ser, sob, sot, soh,
    qk_scale, Lq, Lk, R,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, W: tl.constexpr, IEEE: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    off = Lk - Lq
    offs_m = qb * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_w = tl.arange(0, W)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < Lq
    qpos = off + offs_m
    q0 = off + qb * BM
    q = _ld(Q + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqt + offs_d[None, :], m_ok, d_ok)
    k_ptr = K + b.to(tl.int64) * skb + hk * skh
    v_ptr = V + b.to(tl.int64) * svb + hk * svh
    e_ptr = E + h * seh
    e_far = tl.load(e_ptr + R * ser + offs_d, mask=d_ok, other=0.0)
    qe_far = tl.sum(q.to(tl.float32) * e_far.to(tl.float32)[None, :], 1)  # S_rel of far tiles, per row
    band_idx = tl.arange(0, BM)[:, None] - offs_n[None, :] + (BN - 1)  # S_rel[a, b] = QE[a, band_idx]
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BLOCK_D], tl.float32)

    # far tiles: j0 + BN - 1 <= q0 - R, all distances clip to R, no mask (every key <= every query)
    n_far = tl.maximum(q0 - R + 1, 0) // BN
    for t in range(0, n_far):
        rows = t * BN + offs_n
        k = tl.load(k_ptr + rows[:, None].to(tl.int64) * skt + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        v = tl.load(v_ptr + rows[:, None].to(tl.int64) * svt + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        s = (_mm(q, tl.trans(k), IEEE) + qe_far[:, None]) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, IEEE)
        m_i = m_new

    # near tiles: the E band, and the causal mask
    n_tiles = tl.cdiv(tl.minimum(Lk, q0 + BM), BN)
    for t in range(n_far, n_tiles):
        j0 = t * BN
        kpos = j0 + offs_n
        n_ok = kpos < Lk
        k = _ld(k_ptr + kpos[:, None].to(tl.int64) * skt + offs_d[None, :], n_ok, d_ok)
        v = _ld(v_ptr + kpos[:, None].to(tl.int64) * svt + offs_d[None, :], n_ok, d_ok)
        eb, qe, dist = _band(q, e_ptr, ser, q0 - j0, R, offs_w, offs_d, d_ok, BN, IEEE)
        s_rel = tl.gather(qe, band_idx, 1)
        s = (_mm(q, tl.trans(k), IEEE) + s_rel) * qk_scale
        allowed = (kpos[None, :] <= qpos[:, None]) & n_ok[None, :]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, IEEE)
        m_i = m_new

    # every real row sees key 0, so l_i > 0; padded rows are not stored
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptr = O + b.to(tl.int64) * sob + h * soh + offs_m[:, None].to(tl.int64) * sot + offs_d[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, m_i + tl.math.log2(l_safe), mask=m_ok)


@triton.jit
def _bwd_dq_de_kernel(
    Q, K, V, E, DO, LSE, DELTA, DQ, DE,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, seh, ser, sdob, sdot, sdoh, sdqb, sdqt, sdqh, sdeh, sder,
    qk_scale, sm_scale, Lq, Lk, R,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, W: tl.constexpr, IEEE: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    off = Lk - Lq
    offs_m = qb * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_w = tl.arange(0, W)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < Lq
    qpos = off + offs_m
    q0 = off + qb * BM
    q = _ld(Q + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqt + offs_d[None, :], m_ok, d_ok)
    do = _ld(DO + b.to(tl.int64) * sdob + h * sdoh + offs_m[:, None].to(tl.int64) * sdot + offs_d[None, :], m_ok, d_ok)
    lse = tl.load(LSE + bh.to(tl.int64) * Lq + offs_m, mask=m_ok, other=float("inf"))  # padded rows: P = 0
    delta = tl.load(DELTA + bh.to(tl.int64) * Lq + offs_m, mask=m_ok, other=0.0)
    k_ptr = K + b.to(tl.int64) * skb + hk * skh
    v_ptr = V + b.to(tl.int64) * svb + hk * svh
    e_ptr = E + h * seh
    de_ptr = DE + h.to(tl.int64) * sdeh
    e_far = tl.load(e_ptr + R * ser + offs_d, mask=d_ok, other=0.0)
    qe_far = tl.sum(q.to(tl.float32) * e_far.to(tl.float32)[None, :], 1)
    band_idx = tl.arange(0, BM)[:, None] - offs_n[None, :] + (BN - 1)
    # un-skew: G[a, c] = dS[a, b] with b = a - c + BN - 1 when 0 <= b < BN, else 0. The gather reads
    # dS interleaved with zeros, X[a, 2b] = dS[a, b], X[a, 2b + 1] = 0: source and index then have
    # the same [BM, W] shape (an index longer than its source along the gather axis trips some
    # Triton versions' gather layout pass), and a missing column simply reads a zero slot.
    tl.static_assert(W == 2 * BN, "the dQ/dE kernel needs square tiles (W == 2 BN)")
    unskew = tl.arange(0, BM)[:, None] - offs_w[None, :] + (BN - 1)
    unskew = tl.where((unskew >= 0) & (unskew < BN), 2 * unskew, 1)
    zeros_mn = tl.zeros([BM, BN], tl.float32)
    dq = tl.zeros([BM, BLOCK_D], tl.float32)
    ds_far = tl.zeros([BM], tl.float32)  # row sums of dS over far tiles (their relative row is E[R])

    n_far = tl.maximum(q0 - R + 1, 0) // BN
    for t in range(0, n_far):
        rows = t * BN + offs_n
        k = tl.load(k_ptr + rows[:, None].to(tl.int64) * skt + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        v = tl.load(v_ptr + rows[:, None].to(tl.int64) * svt + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        p = tl.math.exp2((_mm(q, tl.trans(k), IEEE) + qe_far[:, None]) * qk_scale - lse[:, None])
        ds = p * (_mm(do, tl.trans(v), IEEE) - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, IEEE)
        ds_far += tl.sum(ds, 1)

    n_tiles = tl.cdiv(tl.minimum(Lk, q0 + BM), BN)
    for t in range(n_far, n_tiles):
        j0 = t * BN
        kpos = j0 + offs_n
        n_ok = kpos < Lk
        k = _ld(k_ptr + kpos[:, None].to(tl.int64) * skt + offs_d[None, :], n_ok, d_ok)
        v = _ld(v_ptr + kpos[:, None].to(tl.int64) * svt + offs_d[None, :], n_ok, d_ok)
        eb, qe, dist = _band(q, e_ptr, ser, q0 - j0, R, offs_w, offs_d, d_ok, BN, IEEE)
        s = (_mm(q, tl.trans(k), IEEE) + tl.gather(qe, band_idx, 1)) * qk_scale
        allowed = (kpos[None, :] <= qpos[:, None]) & n_ok[None, :]
        p = tl.where(allowed, tl.math.exp2(s - lse[:, None]), 0.0)
        ds = p * (_mm(do, tl.trans(v), IEEE) - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, IEEE)
        g = tl.gather(tl.reshape(tl.join(ds, zeros_mn), [BM, W]), unskew, 1)  # [BM, W]
        dq += _mm(g.to(eb.dtype), eb, IEEE)
        de_band = _mm(tl.trans(g).to(q.dtype), q, IEEE)  # [W, BLOCK_D]
        # band rows above the diagonal (dist < 0) carry zeros; clipped rows share row R (atomics add up)
        rows = tl.minimum(tl.maximum(dist, 0), R)
        tl.atomic_add(de_ptr + rows[:, None].to(tl.int64) * sder + offs_d[None, :], de_band * sm_scale,
                      mask=(dist >= 0)[:, None] & d_ok[None, :])

    dq += ds_far[:, None] * e_far.to(tl.float32)[None, :]
    if n_far > 0:
        de_far = tl.sum(ds_far[:, None] * q.to(tl.float32), 0)
        tl.atomic_add(de_ptr + R * sder + offs_d, de_far * sm_scale, mask=d_ok)
    dq_ptr = DQ + b.to(tl.int64) * sdqb + h * sdqh + offs_m[:, None].to(tl.int64) * sdqt + offs_d[None, :]
    tl.store(dq_ptr, (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, E, DO, LSE, DELTA, DK, DV,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, seh, ser, sdob, sdot, sdoh, sdkb, sdkt, sdkh,
    qk_scale, sm_scale, Lq, Lk, R,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, W: tl.constexpr, IEEE: tl.constexpr,
):
    # One program: key tile kb of query head h, walking the query tiles that see it; dK/dV are
    # written per query head (summed over the GQA group outside).
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    off = Lk - Lq
    j0 = kb * BN
    kpos = j0 + tl.arange(0, BN)
    offs_d = tl.arange(0, BLOCK_D)
    offs_w = tl.arange(0, W)
    d_ok = offs_d < D
    n_ok = kpos < Lk
    k = _ld(K + b.to(tl.int64) * skb + hk * skh + kpos[:, None].to(tl.int64) * skt + offs_d[None, :], n_ok, d_ok)
    v = _ld(V + b.to(tl.int64) * svb + hk * svh + kpos[:, None].to(tl.int64) * svt + offs_d[None, :], n_ok, d_ok)
    q_base = Q + b.to(tl.int64) * sqb + h * sqh
    do_base = DO + b.to(tl.int64) * sdob + h * sdoh
    stat = bh.to(tl.int64) * Lq
    e_ptr = E + h * seh
    e_far = tl.load(e_ptr + R * ser + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    band_idx = tl.arange(0, BM)[:, None] - tl.arange(0, BN)[None, :] + (BN - 1)
    dk = tl.zeros([BN, BLOCK_D], tl.float32)
    dv = tl.zeros([BN, BLOCK_D], tl.float32)

    n_qt = tl.cdiv(Lq, BM)
    first = tl.maximum(j0 - off, 0) // BM  # the query tile holding position j0 (earlier ones are all masked)
    # far query tiles: q0 >= j0 + BN - 1 + R
    far = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(j0 + BN - 1 + R - off, 0), BM), first), n_qt)
    for qb in range(first, far):
        offs_m = qb * BM + tl.arange(0, BM)
        m_ok = offs_m < Lq
        q0 = off + qb * BM
        q = _ld(q_base + offs_m[:, None].to(tl.int64) * sqt + offs_d[None, :], m_ok, d_ok)
        do = _ld(do_base + offs_m[:, None].to(tl.int64) * sdot + offs_d[None, :], m_ok, d_ok)
        lse = tl.load(LSE + stat + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + stat + offs_m, mask=m_ok, other=0.0)
        eb, qe, dist = _band(q, e_ptr, ser, q0 - j0, R, offs_w, offs_d, d_ok, BN, IEEE)
        s = (_mm(q, tl.trans(k), IEEE) + tl.gather(qe, band_idx, 1)) * qk_scale
        allowed = (kpos[None, :] <= (off + offs_m)[:, None]) & n_ok[None, :]
        p = tl.where(allowed, tl.math.exp2(s - lse[:, None]), 0.0)  # [BM, BN]
        dv += _mm(tl.trans(p).to(do.dtype), do, IEEE)
        ds = p * (_mm(do, tl.trans(v), IEEE) - delta[:, None])
        dk += _mm(tl.trans(ds).to(q.dtype), q, IEEE)
    for qb in range(far, n_qt):
        offs_m = qb * BM + tl.arange(0, BM)
        m_ok = offs_m < Lq
        q = _ld(q_base + offs_m[:, None].to(tl.int64) * sqt + offs_d[None, :], m_ok, d_ok)
        do = _ld(do_base + offs_m[:, None].to(tl.int64) * sdot + offs_d[None, :], m_ok, d_ok)
        lse = tl.load(LSE + stat + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + stat + offs_m, mask=m_ok, other=0.0)
        qe_far = tl.sum(q.to(tl.float32) * e_far[None, :], 1)
        p = tl.math.exp2((_mm(q, tl.trans(k), IEEE) + qe_far[:, None]) * qk_scale - lse[:, None])
        dv += _mm(tl.trans(p).to(do.dtype), do, IEEE)
        ds = p * (_mm(do, tl.trans(v), IEEE) - delta[:, None])
        dk += _mm(tl.trans(ds).to(q.dtype), q, IEEE)

    out = b.to(tl.int64) * sdkb + h * sdkh + kpos[:, None].to(tl.int64) * sdkt + offs_d[None, :]
    msk = n_ok[:, None] & d_ok[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=msk)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=msk)


# ---------------------------------------------------------------------------------------------
# launching

#: Tile size (BM = BN) of the fixed, non-autotuned launch (the CPU interpreter; tests lower it).
FIXED_BLOCK = 64
# On a GPU the tile size, warps and stages are autotuned once per (head dim, precision, GQA group);
# MNEMO_AUTOTUNE=0 uses the fixed launch there too.
_AUTOTUNE = os.environ.get("MNEMO_AUTOTUNE", "1") != "0"
_TUNE_KEY = ["D", "IEEE", "GROUP"]
# (tile, warps, stages). Kept small: each config is a separate compilation (the fp32 IEEE dQ/dE
# kernel alone took over a minute to compile for sm_90 on a CPU host). The band doubles the width
# of the extra product, so 128-wide tiles need ~224 KiB of shared memory in the dQ/dE kernel (the
# autotuner skips a config that does not fit).
_CONFIGS = ((32, 4, 2), (64, 4, 2), (64, 8, 2), (128, 8, 2))
_TUNED: dict = {}


def _band_width(block: int) -> int:
    return triton.next_power_of_2(2 * block - 1)


def _tuned(kernel, reset: list[str] | None = None):
    if id(kernel) not in _TUNED:
        configs = [
            triton.Config({"BM": blk, "BN": blk, "W": _band_width(blk)}, num_warps=w, num_stages=st) for blk, w, st in _CONFIGS
        ]
        # the dQ/dE kernel adds into dE with atomics: each trial run must start from zeros
        _TUNED[id(kernel)] = triton.autotune(configs, key=_TUNE_KEY, reset_to_zero=reset)(kernel)
    return _TUNED[id(kernel)]


def tuned_configs() -> dict[str, str]:
    """The launch configs the autotuner chose so far in this process (for benchmark records)."""
    names = {id(_fwd_kernel): "fwd", id(_bwd_dq_de_kernel): "bwd_dq_de", id(_bwd_dkdv_kernel): "bwd_dkdv"}
    out = {}
    for kid, tuner in _TUNED.items():
        for key, cfg in getattr(tuner, "cache", {}).items():
            out[f"{names.get(kid, kid)} {key}"] = str(cfg)
    return out


def _launch(kernel, rows: int, batch_heads: int, args, meta, device, reset=None):
    """Launch ``kernel`` over ``cdiv(rows, tile) x batch_heads`` programs."""
    if device.type == "cuda" and _AUTOTUNE:
        _tuned(kernel, reset)[lambda m: (triton.cdiv(rows, m["BM"]), batch_heads)](*args, **meta)
    else:
        blk = FIXED_BLOCK
        warps = 8 if blk * meta["BLOCK_D"] >= 128 * 128 else 4
        kernel[(triton.cdiv(rows, blk), batch_heads)](*args, **meta, BM=blk, BN=blk, W=_band_width(blk), num_warps=warps, num_stages=2)


def _alloc(like: Tensor, shape=None, dtype=None) -> Tensor:
    """Output buffers; NaN-filled when MNEMO_POISON=1 (tests) so unwritten elements fail."""
    shape = like.shape if shape is None else shape
    dtype = like.dtype if dtype is None else dtype
    if os.environ.get("MNEMO_POISON") == "1":
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def _meta(q: Tensor, k: Tensor) -> dict:
    h, d = q.shape[2], q.shape[3]
    # tl.dot needs every dimension >= 16
    return dict(H=h, GROUP=h // k.shape[2], D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), IEEE=q.dtype == torch.float32)


def _e_strides(e: Tensor) -> tuple[int, int]:
    # a table shared by the heads is read by every head: head stride 0
    return (0 if e.shape[0] == 1 else e.stride(0)), e.stride(1)


def _fwd_impl(q: Tensor, k: Tensor, v: Tensor, e: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    b, lq, h, _ = q.shape
    lk = k.shape[1]
    o = _alloc(q)
    lse = _alloc(q, (b, h, lq), torch.float32)
    args = (
        q, k, v, e, o, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *_e_strides(e), o.stride(0), o.stride(1), o.stride(2),
        scale * LOG2E, lq, lk, e.shape[1] - 1,
    )
    _launch(_fwd_kernel, lq, b * h, args, _meta(q, k), q.device)
    return o, lse


def _bwd_impl(do: Tensor, q: Tensor, k: Tensor, v: Tensor, e: Tensor, o: Tensor, lse: Tensor, scale: float):
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    group = h // hkv
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta = (o.float() * do.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, Lq]: dO_i . O_i
    meta = _meta(q, k)
    common = (scale * LOG2E, scale, lq, lk, e.shape[1] - 1)
    strides_in = (
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *_e_strides(e), do.stride(0), do.stride(1), do.stride(2),
    )
    # dE accumulates with atomics into one fp32 table per query head (less contention than one
    # shared table), summed over the heads below when the table is shared.
    de = torch.zeros(h, e.shape[1], d, device=q.device, dtype=torch.float32)
    dq = _alloc(q)
    args = (q, k, v, e, do, lse, delta, dq, de, *strides_in, dq.stride(0), dq.stride(1), dq.stride(2), de.stride(0), de.stride(1), *common)
    _launch(_bwd_dq_de_kernel, lq, b * h, args, meta, q.device, reset=["DE"])
    kv_dtype = k.dtype if group == 1 else torch.float32
    dk = _alloc(q, (b, lk, h, d), kv_dtype)
    dv = _alloc(q, (b, lk, h, d), kv_dtype)
    args = (q, k, v, e, do, lse, delta, dk, dv, *strides_in, dk.stride(0), dk.stride(1), dk.stride(2), *common)
    _launch(_bwd_dkdv_kernel, lk, b * h, args, meta, q.device)
    if group > 1:
        dk = dk.view(b, lk, hkv, group, d).sum(3).to(k.dtype)
        dv = dv.view(b, lk, hkv, group, d).sum(3).to(v.dtype)
    if e.shape[0] == 1:
        de = de.sum(0, keepdim=True)
    return dq, dk, dv, de.to(e.dtype)


@torch.library.custom_op("mnemotorch::relative_attn_fwd", mutates_args=())
def relative_attn_fwd(q: Tensor, k: Tensor, v: Tensor, e: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return _fwd_impl(q, k, v, e, scale)


@relative_attn_fwd.register_fake
def _(q, k, v, e, scale):
    return torch.empty_like(q), q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)


@torch.library.custom_op("mnemotorch::relative_attn_bwd", mutates_args=())
def relative_attn_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, e: Tensor, o: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _bwd_impl(do, q, k, v, e, o, lse, scale)


@relative_attn_bwd.register_fake
def _(do, q, k, v, e, o, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(e)


def _setup_context(ctx, inputs, output):
    q, k, v, e, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, e, o, lse)
    ctx.scale = scale


def _backward(ctx, do, dlse):
    q, k, v, e, o, lse = ctx.saved_tensors
    dq, dk, dv, de = relative_attn_bwd(do, q, k, v, e, o, lse, ctx.scale)
    return dq, dk, dv, de, None


relative_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def relative_attention_triton(q: Tensor, k: Tensor, v: Tensor, rel_emb: Tensor, scale: float) -> Tensor:
    """Run the kernels on ``q [B, Tq, H, D]``, ``k/v [B, Tk, Hkv, D]``, ``rel_emb [1 or H, R+1, D]``.

    Inputs are made contiguous along the head dim; ``rel_emb`` must already have ``q``'s dtype.
    """
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    rel_emb = rel_emb if rel_emb.stride(-1) == 1 else rel_emb.contiguous()
    out, _ = relative_attn_fwd(q, k, v, rel_emb, float(scale))
    return out
