"""Triton kernels of causal linear attention: chunked forward/backward and the one-token decode step.

What is computed (per batch b and head h; ``φ`` the feature map, ``C`` the chunk length)::

    S_t = S_0 + Σ_{s≤t} φ(k_s) v_sᵀ,   z_t = z_0 + Σ_{s≤t} φ(k_s)
    y_t = φ(q_t)ᵀ S_t / (φ(q_t)ᵀ z_t + ε)        (normalize=True; else y_t = φ(q_t)ᵀ S_t)

exactly :func:`mnemotorch.ops.linear.reference.linear_attention_chunked` (the float64 oracle).

**Chunked algorithm.** Tokens are cut into chunks of ``C`` (64 by default). For chunk ``n`` with
featured rows ``Q_n, K_n`` and the state ``(S_n, z_n)`` left by the chunks before it,

    Y_n = [tril(Q_n K_nᵀ) V_n + Q_n S_n] / [tril(Q_n K_nᵀ) 1 + Q_n z_n + ε],
    S_{n+1} = S_n + K_nᵀ V_n,   z_{n+1} = z_n + K_nᵀ 1.

Every launch is free of dependencies between its programs (a GPU runs them in no particular
order; Triton's CPU interpreter runs them one after the other, so a dependency would pass the CPU
tests and fail on the GPU):

* forward, two launches: (1) ``*_fwd_states``: one program per (b·h, state tile) walks the
  chunks in order, keeps the running state in registers and writes the state *entering* every
  chunk to an fp32 buffer ``HS [B·H, NT, Dφ, Dv]`` (and the final state); (2) ``*_fwd_out``: one
  program per (b·h, chunk, value tile), no loop: the intra-chunk masked product plus the
  inter-chunk term ``Q_n S_n`` read from ``HS``.
* backward, with ``r_t = 1/(den_t + ε)``, ``gn_t = r_t dy_t`` and ``gd_t = -r_t (dy_t · y_t)``
  (``gn = dy``, ``gd = 0`` when not normalised) -- normalised linear attention is unnormalised
  linear attention of the value ``[v, 1]`` --::

      dφ(q_t) = S_t gn_t + z_t gd_t,
      dφ(k_s) = R_s v_s + ρ_s,       dv_s = R_sᵀ φ(k_s),
      R_s = dS_T + Σ_{t≥s} φ(q_t) gn_tᵀ,   ρ_s = dz_T + Σ_{t≥s} φ(q_t) gd_t,
      dS_0 = R_1,   dz_0 = ρ_1.

  Five launches: the forward states again (recomputed, not saved: only q, k, v, y and the fp32
  denominators are kept), ``*_bwd_states`` (one program per (b·h, state tile) walking the chunks
  in reverse and writing ``R, ρ`` entering every chunk from the right), then three per-chunk
  launches: ``*_bwd_dq`` and ``*_bwd_dk`` (one program per (b·h, chunk), looping over the value
  tiles because ``dφ(q)``/``dφ(k)`` sum over them) and ``*_bwd_dv`` (one program per (b·h, chunk,
  value tile)). Intra-chunk parts: ``dP = tril(gn Vᵀ + gd 1ᵀ)``, ``dφQ = dP φK + gn Sᵀ + gd zᵀ``,
  ``dφK = dPᵀ φQ + V Rᵀ + ρ``, ``dV = tril(φQ φKᵀ)ᵀ gn + φK R``, then the chain rule through φ.

Operand tiles are loaded from memory in the orientation each product needs (``k`` as
``[Dk, C]`` for ``φ(K)ᵀ V`` and so on): no ``tl.trans`` and no ``tl.reshape`` of register tensors.
Grids are one-dimensional (no 65535 limit on B·H), global offsets are computed in int64 (B·T·H·D
may exceed 2³¹), and every tile load and store that can reach past its tensor is masked.

**Feature maps in the kernel.** q and k are read raw; ``identity``, ``elu_plus_one`` (``elu(x)+1``,
derivative 1 for ``x > 0`` else ``exp(x)``) and ``relu`` are applied on the fly after each load
(padded rows/columns are zeroed after φ, since ``elu(0)+1 = 1``).

**BASED's Taylor map on the fly** (``feature="taylor"``, q/k width ``d ≤ 16``). The features
``φ(x) = [1, x c₁, vec(x⊗x) c₂]``, ``c₁ = d^{-1/4}``, ``c₂ = 1/√(2d)`` (``1 + d + d²`` = 273
numbers for d = 16) are never written to memory:

* intra-chunk, the kernel needs only ``φ(q)·φ(k) = κ(s) = 1 + c₁² s + c₂² s²`` with ``s = q·k``,
  i.e. one ``[C, d] × [d, C]`` product and an elementwise polynomial;
  its gradient is ``∂κ/∂s = c₁² + 2c₂² s``, so ``dq = (dP ⊙ κ'(s)) k`` and ``dk = (dP ⊙ κ'(s))ᵀ q``;
* inter-chunk, the state is kept in three parts, ``S⁽⁰⁾ [Dv]``, ``S⁽¹⁾ [d, Dv]`` and
  ``S⁽²⁾ [d², Dv]``, and ``φ(q)ᵀ S = S⁽⁰⁾ + c₁ qᵀS⁽¹⁾ + c₂ vec(q⊗q)ᵀ S⁽²⁾``; the ``[C, d²]`` tile
  ``vec(q⊗q)`` is the product of two gathers of the q rows (columns ``i`` and ``j`` of entry
  ``i·d + j``), fed straight to a ``[C, d²] × [d², Dv]`` product; the state update
  ``S⁽²⁾ += vec(k⊗k)ᵀ V`` likewise;
* backward through the second-order part: for ``M = ∂L/∂vec(x⊗x)`` (``[C, d²]``),
  ``∂L/∂x_i = c₂ Σ_j (M_ij + M_ji) x_j``, computed as two products with 0/1 selection matrices.

In memory the state rows keep the reference's order ``[1, x (d rows), vec(x⊗x) (d² rows)]``;
inside the kernels ``d`` is padded to 16 with zeros (zero inputs give zero features).

**Precision.** Sums, states and denominators are fp32. float32 inputs use IEEE fp32 products
everywhere (``input_precision="ieee"``). For half-precision inputs the intra-chunk scores
``φ(Q) φ(K)ᵀ`` and the product of the scores with ``V`` run on the tensor cores in the input dtype;
every product that involves a state, a gradient or ``φ(K)`` entering the state runs with fp32
operands (TF32): rounding those to bf16 about doubles the error of ``dq`` (bf16, T = 4096: 8e-3
against 4.5e-3 of the 1e-2 budget; the large common parts of ``S gn`` and ``z gd`` cancel), and a
long-context state can exceed fp16's range.
The normaliser is ``den + ε`` with ``den`` accumulated in fp32 (``ε`` = 1e-6 by default: it only
matters when ``den`` underflows, e.g. ``relu`` features that are all zero, where the output
becomes ``0/ε = 0``).

Registered as ``torch.library.custom_op``s (``mnemotorch::linear_attn_fwd`` / ``_bwd`` / ``_step``
/ ``_step_``) so ``torch.compile`` traces through them. On CUDA the launch parameters are
autotuned (``MNEMO_AUTOTUNE=0`` gives fixed ones); under ``TRITON_INTERPRET=1`` (CPU tests) fixed
small tiles are used. Buffers are NaN-filled instead of left uninitialised when ``MNEMO_POISON=1``
(the tests set it), so an element no program writes shows up as NaN on the CPU too.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..block_sparse.triton import _mm  # a @ b, fp32 accumulation, IEEE products when asked

#: feature name -> id used by the kernels
FEATURE_IDS = {"identity": 0, "elu_plus_one": 1, "relu": 2, "taylor": 3}
TAYLOR = 3
#: kernel limits (checked at the public boundary)
MAX_DK = 128  # elementwise feature maps: Dφ = Dk ≤ 128
MAX_TAYLOR_D = 16  # Taylor: q/k width d ≤ 16 (Dφ = 1 + d + d² ≤ 273)
MAX_DV = 256
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_CHUNKS = (16, 32, 64, 128)
DEFAULT_CHUNK = 64
TBD = 16  # the Taylor kernels pad d to 16
TFP = 1 + TBD + TBD * TBD  # rows of a padded internal Taylor state


# ---------------------------------------------------------------------------------------------
# Small jitted helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _mm32(a, b, IEEE: tl.constexpr):
    """A product that needs fp32 operands (states, gradients, φ(K) entering the state): IEEE for
    float32 inputs, TF32 on the tensor cores for half inputs."""
    return _mm(a.to(tl.float32), b.to(tl.float32), IEEE)


@triton.jit
def _phi(x, FEATURE: tl.constexpr):
    if FEATURE == 1:
        return tl.where(x > 0, x + 1.0, tl.exp(x))
    elif FEATURE == 2:
        return tl.maximum(x, 0.0)
    else:
        return x


@triton.jit
def _dphi(x, FEATURE: tl.constexpr):
    if FEATURE == 1:
        return tl.where(x > 0, 1.0, tl.exp(x))
    elif FEATURE == 2:
        return tl.where(x > 0, 1.0, 0.0)
    else:
        return x * 0.0 + 1.0


@triton.jit
def _ld(base, rows, cols, n_rows, n_cols, stride):
    """``[len(rows), len(cols)]`` tile, element ``(r, c)`` at ``base + r*stride + c``; zeros outside
    ``rows < n_rows``, ``cols < n_cols``; in the stored dtype."""
    m = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(base + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=m, other=0.0)


@triton.jit
def _ldt(base, rows, cols, n_rows, n_cols, stride):
    """The transposed tile, ``[len(cols), len(rows)]``: element ``(c, r)`` at ``base + r*stride + c``."""
    m = (cols[:, None] < n_cols) & (rows[None, :] < n_rows)
    return tl.load(base + rows[None, :].to(tl.int64) * stride + cols[:, None], mask=m, other=0.0)


@triton.jit
def _feat(base, rows, cols, n_rows, n_cols, stride, FEATURE: tl.constexpr):
    """φ of a ``[rows, cols]`` tile in fp32, padding zeroed (φ(0) need not be 0)."""
    m = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(base + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=m, other=0.0).to(tl.float32)
    return tl.where(m, _phi(x, FEATURE), 0.0)


@triton.jit
def _feat_t(base, rows, cols, n_rows, n_cols, stride, FEATURE: tl.constexpr):
    """φ of the transposed tile ``[cols, rows]`` in fp32, padding zeroed."""
    m = (cols[:, None] < n_cols) & (rows[None, :] < n_rows)
    x = tl.load(base + rows[None, :].to(tl.int64) * stride + cols[:, None], mask=m, other=0.0).to(tl.float32)
    return tl.where(m, _phi(x, FEATURE), 0.0)


# ---------------------------------------------------------------------------------------------
# Elementwise feature maps (identity, elu+1, relu): Dφ = Dk
# Layouts: q, k [B, T, H, Dk], v, y [B, T, H, Dv] contiguous (row stride H·D); per-token fp32
# statistics (den, 1/(den+ε), gd) [B, T, H]; chunk states HS/HR [B·H, NT, Dk, Dv], HZ/HRZ [B·H, NT, Dk].
# ---------------------------------------------------------------------------------------------


@triton.jit
def _la_fwd_states(
    K, V, S0, Z0, HS, HZ, ST, ZT,
    T, NT, H, Dk, Dv,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, FEATURE: tl.constexpr,
    HAS_S0: tl.constexpr, STORE_FINAL: tl.constexpr, IEEE: tl.constexpr,
):
    # One program: state tile [BK, BV] of one (b, h); walks all chunks in order.
    pid = tl.program_id(0)
    nk = tl.cdiv(Dk, BK)
    nv = tl.cdiv(Dv, BV)
    bh = pid // (nk * nv)
    ik = (pid // nv) % nk
    iv = pid % nv
    b = bh // H
    h = bh % H
    offs_k = ik * BK + tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    k_ok = offs_k < Dk
    kv_ok = k_ok[:, None] & (offs_v[None, :] < Dv)
    kv = offs_k[:, None] * Dv + offs_v[None, :]
    bh64 = bh.to(tl.int64)
    if HAS_S0:
        s = tl.load(S0 + bh64 * Dk * Dv + kv, mask=kv_ok, other=0.0).to(tl.float32)
        z = tl.load(Z0 + bh64 * Dk + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BK, BV], tl.float32)
        z = tl.zeros([BK], tl.float32)
    k_base = K + (b.to(tl.int64) * T * H + h) * Dk
    v_base = V + (b.to(tl.int64) * T * H + h) * Dv
    rows0 = tl.arange(0, C)
    for n in range(0, NT):
        slot = bh64 * NT + n
        tl.store(HS + slot * Dk * Dv + kv, s, mask=kv_ok)
        if iv == 0:  # one value tile writes z
            tl.store(HZ + slot * Dk + offs_k, z, mask=k_ok)
        rows = n * C + rows0
        fkt = _feat_t(k_base, rows, offs_k, T, Dk, H * Dk, FEATURE)  # φ(K)ᵀ [BK, C]
        vv = _ld(v_base, rows, offs_v, T, Dv, H * Dv)  # [C, BV]
        s += _mm32(fkt, vv, IEEE)
        z += tl.sum(fkt, 1)
    if STORE_FINAL:
        tl.store(ST + bh64 * Dk * Dv + kv, s, mask=kv_ok)
        if iv == 0:
            tl.store(ZT + bh64 * Dk + offs_k, z, mask=k_ok)


@triton.jit
def _la_fwd_out(
    Q, K, V, HS, HZ, Y, DEN,
    T, NT, H, Dk, Dv, eps,
    C: tl.constexpr, BDK: tl.constexpr, BV: tl.constexpr, FEATURE: tl.constexpr,
    NORMALIZE: tl.constexpr, IEEE: tl.constexpr,
):
    # One program: one chunk and one value tile of one (b, h).
    pid = tl.program_id(0)
    nv = tl.cdiv(Dv, BV)
    iv = pid % nv
    n = (pid // nv) % NT
    bh = pid // (nv * NT)
    b = bh // H
    h = bh % H
    offs_k = tl.arange(0, BDK)
    offs_v = iv * BV + tl.arange(0, BV)
    rows0 = tl.arange(0, C)
    rows = n * C + rows0
    t_ok = rows < T
    slot = bh.to(tl.int64) * NT + n
    qk_base = (b.to(tl.int64) * T * H + h) * Dk
    v_base = (b.to(tl.int64) * T * H + h) * Dv
    fq = _feat(Q + qk_base, rows, offs_k, T, Dk, H * Dk, FEATURE)  # [C, BDK]
    fkt = _feat_t(K + qk_base, rows, offs_k, T, Dk, H * Dk, FEATURE)  # [BDK, C]
    vv = _ld(V + v_base, rows, offs_v, T, Dv, H * Dv)  # [C, BV]
    s = _ld(HS + slot * Dk * Dv, offs_k, offs_v, Dk, Dv, Dv)  # S_n [BDK, BV]
    dt = vv.dtype
    a = _mm(fq.to(dt), fkt.to(dt), IEEE)
    a = tl.where(rows0[:, None] >= rows0[None, :], a, 0.0)
    num = _mm32(fq, s, IEEE) + _mm(a.to(dt), vv, IEEE)
    if NORMALIZE:
        z = tl.load(HZ + slot * Dk + offs_k, mask=offs_k < Dk, other=0.0)
        den = tl.sum(a, 1) + tl.sum(fq * z[None, :], 1)
        num = num / (den + eps)[:, None]
        if iv == 0:
            tl.store(DEN + (b.to(tl.int64) * T + rows) * H + h, den, mask=t_ok)
    tl.store(Y + v_base + rows[:, None].to(tl.int64) * (H * Dv) + offs_v[None, :], num.to(Y.dtype.element_ty),
             mask=t_ok[:, None] & (offs_v[None, :] < Dv))


@triton.jit
def _la_bwd_states(
    Q, DO, RDEN, GD, DST, DZT, HR, HRZ, DS0, DZ0,
    T, NT, H, Dk, Dv,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, FEATURE: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_DST: tl.constexpr, HAS_DZT: tl.constexpr, STORE_D0: tl.constexpr, IEEE: tl.constexpr,
):
    # One program: tile [BK, BV] of R (and ρ) of one (b, h); walks the chunks in reverse and writes
    # the gradient reaching the state after chunk n from the later tokens (and dS_T).
    pid = tl.program_id(0)
    nk = tl.cdiv(Dk, BK)
    nv = tl.cdiv(Dv, BV)
    bh = pid // (nk * nv)
    ik = (pid // nv) % nk
    iv = pid % nv
    b = bh // H
    h = bh % H
    offs_k = ik * BK + tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    k_ok = offs_k < Dk
    kv_ok = k_ok[:, None] & (offs_v[None, :] < Dv)
    kv = offs_k[:, None] * Dv + offs_v[None, :]
    bh64 = bh.to(tl.int64)
    if HAS_DST:
        r = tl.load(DST + bh64 * Dk * Dv + kv, mask=kv_ok, other=0.0).to(tl.float32)
    else:
        r = tl.zeros([BK, BV], tl.float32)
    if HAS_DZT:
        rz = tl.load(DZT + bh64 * Dk + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    else:
        rz = tl.zeros([BK], tl.float32)
    q_base = Q + (b.to(tl.int64) * T * H + h) * Dk
    do_base = DO + (b.to(tl.int64) * T * H + h) * Dv
    rows0 = tl.arange(0, C)
    for i in range(0, NT):
        n = NT - 1 - i
        slot = bh64 * NT + n
        tl.store(HR + slot * Dk * Dv + kv, r, mask=kv_ok)
        if iv == 0:
            tl.store(HRZ + slot * Dk + offs_k, rz, mask=k_ok)
        rows = n * C + rows0
        fqt = _feat_t(q_base, rows, offs_k, T, Dk, H * Dk, FEATURE)  # φ(Q)ᵀ [BK, C]
        gn = _ld(do_base, rows, offs_v, T, Dv, H * Dv).to(tl.float32)  # [C, BV]
        if NORMALIZE:
            t_ok = rows < T
            st = (b.to(tl.int64) * T + rows) * H + h
            gn = gn * tl.load(RDEN + st, mask=t_ok, other=0.0)[:, None]
            rz += tl.sum(fqt * tl.load(GD + st, mask=t_ok, other=0.0)[None, :], 1)
        r += _mm32(fqt, gn, IEEE)
    if STORE_D0:
        tl.store(DS0 + bh64 * Dk * Dv + kv, r, mask=kv_ok)
        if iv == 0:
            tl.store(DZ0 + bh64 * Dk + offs_k, rz, mask=k_ok)


@triton.jit
def _la_bwd_dq(
    Q, K, V, DO, RDEN, GD, HS, HZ, DQ,
    T, NT, H, Dk, Dv,
    C: tl.constexpr, BDK: tl.constexpr, BV: tl.constexpr, FEATURE: tl.constexpr,
    NORMALIZE: tl.constexpr, IEEE: tl.constexpr,
):
    # One program: dq of one chunk of one (b, h): dφQ = tril(gn Vᵀ + gd) φK + gn Sᵀ + gd zᵀ.
    pid = tl.program_id(0)
    n = pid % NT
    bh = pid // NT
    b = bh // H
    h = bh % H
    offs_k = tl.arange(0, BDK)
    k_ok = offs_k < Dk
    rows0 = tl.arange(0, C)
    rows = n * C + rows0
    t_ok = rows < T
    slot = bh.to(tl.int64) * NT + n
    qk_base = (b.to(tl.int64) * T * H + h) * Dk
    v_base = (b.to(tl.int64) * T * H + h) * Dv
    st = (b.to(tl.int64) * T + rows) * H + h
    if NORMALIZE:
        rd = tl.load(RDEN + st, mask=t_ok, other=0.0)
    dp = tl.zeros([C, C], tl.float32)
    dfq = tl.zeros([C, BDK], tl.float32)
    for iv in range(0, tl.cdiv(Dv, BV)):
        offs_v = iv * BV + tl.arange(0, BV)
        gn = _ld(DO + v_base, rows, offs_v, T, Dv, H * Dv).to(tl.float32)  # [C, BV]
        if NORMALIZE:
            gn = gn * rd[:, None]
        vt = _ldt(V + v_base, rows, offs_v, T, Dv, H * Dv)  # Vᵀ [BV, C]
        stt = _ldt(HS + slot * Dk * Dv, offs_k, offs_v, Dk, Dv, Dv)  # S_nᵀ [BV, BDK]
        dp += _mm32(gn, vt, IEEE)
        dfq += _mm32(gn, stt, IEEE)
    if NORMALIZE:
        gdv = tl.load(GD + st, mask=t_ok, other=0.0)
        z = tl.load(HZ + slot * Dk + offs_k, mask=k_ok, other=0.0)
        dp += gdv[:, None]
        dfq += gdv[:, None] * z[None, :]
    dp = tl.where(rows0[:, None] >= rows0[None, :], dp, 0.0)
    fk = _feat(K + qk_base, rows, offs_k, T, Dk, H * Dk, FEATURE)  # [C, BDK]
    dfq += _mm32(dp, fk, IEEE)
    if FEATURE != 0:
        dfq = dfq * _dphi(_ld(Q + qk_base, rows, offs_k, T, Dk, H * Dk).to(tl.float32), FEATURE)
    tl.store(DQ + qk_base + rows[:, None].to(tl.int64) * (H * Dk) + offs_k[None, :], dfq.to(DQ.dtype.element_ty),
             mask=t_ok[:, None] & k_ok[None, :])


@triton.jit
def _la_bwd_dk(
    Q, K, V, DO, RDEN, GD, HR, HRZ, DK,
    T, NT, H, Dk, Dv,
    C: tl.constexpr, BDK: tl.constexpr, BV: tl.constexpr, FEATURE: tl.constexpr,
    NORMALIZE: tl.constexpr, IEEE: tl.constexpr,
):
    # One program: dk of one chunk of one (b, h): dφK = tril(gn Vᵀ + gd)ᵀ φQ + V Rᵀ + ρ.
    # dPᵀ is built directly ([key s, query t]) instead of transposing dP.
    pid = tl.program_id(0)
    n = pid % NT
    bh = pid // NT
    b = bh // H
    h = bh % H
    offs_k = tl.arange(0, BDK)
    k_ok = offs_k < Dk
    rows0 = tl.arange(0, C)
    rows = n * C + rows0
    t_ok = rows < T
    slot = bh.to(tl.int64) * NT + n
    qk_base = (b.to(tl.int64) * T * H + h) * Dk
    v_base = (b.to(tl.int64) * T * H + h) * Dv
    st = (b.to(tl.int64) * T + rows) * H + h
    if NORMALIZE:
        rd = tl.load(RDEN + st, mask=t_ok, other=0.0)
    dpt = tl.zeros([C, C], tl.float32)
    dfk = tl.zeros([C, BDK], tl.float32)
    for iv in range(0, tl.cdiv(Dv, BV)):
        offs_v = iv * BV + tl.arange(0, BV)
        vv = _ld(V + v_base, rows, offs_v, T, Dv, H * Dv)  # [C, BV]
        gnt = _ldt(DO + v_base, rows, offs_v, T, Dv, H * Dv).to(tl.float32)  # gnᵀ [BV, C]
        if NORMALIZE:
            gnt = gnt * rd[None, :]
        rt = _ldt(HR + slot * Dk * Dv, offs_k, offs_v, Dk, Dv, Dv)  # R_nᵀ [BV, BDK]
        dpt += _mm32(vv, gnt, IEEE)
        dfk += _mm32(vv, rt, IEEE)
    if NORMALIZE:
        dpt += tl.load(GD + st, mask=t_ok, other=0.0)[None, :]
    dpt = tl.where(rows0[None, :] >= rows0[:, None], dpt, 0.0)
    dfk += tl.load(HRZ + slot * Dk + offs_k, mask=k_ok, other=0.0)[None, :]
    fq = _feat(Q + qk_base, rows, offs_k, T, Dk, H * Dk, FEATURE)  # [C, BDK]
    dfk += _mm32(dpt, fq, IEEE)
    if FEATURE != 0:
        dfk = dfk * _dphi(_ld(K + qk_base, rows, offs_k, T, Dk, H * Dk).to(tl.float32), FEATURE)
    tl.store(DK + qk_base + rows[:, None].to(tl.int64) * (H * Dk) + offs_k[None, :], dfk.to(DK.dtype.element_ty),
             mask=t_ok[:, None] & k_ok[None, :])


@triton.jit
def _la_bwd_dv(
    Q, K, DO, RDEN, HR, DV,
    T, NT, H, Dk, Dv,
    C: tl.constexpr, BDK: tl.constexpr, BV: tl.constexpr, FEATURE: tl.constexpr,
    NORMALIZE: tl.constexpr, IEEE: tl.constexpr,
):
    # One program: one chunk and one value tile of dv: dV = tril(φQ φKᵀ)ᵀ gn + φK R.
    pid = tl.program_id(0)
    nv = tl.cdiv(Dv, BV)
    iv = pid % nv
    n = (pid // nv) % NT
    bh = pid // (nv * NT)
    b = bh // H
    h = bh % H
    offs_k = tl.arange(0, BDK)
    offs_v = iv * BV + tl.arange(0, BV)
    rows0 = tl.arange(0, C)
    rows = n * C + rows0
    t_ok = rows < T
    slot = bh.to(tl.int64) * NT + n
    qk_base = (b.to(tl.int64) * T * H + h) * Dk
    v_base = (b.to(tl.int64) * T * H + h) * Dv
    fk = _feat(K + qk_base, rows, offs_k, T, Dk, H * Dk, FEATURE)  # [C, BDK]
    fqt = _feat_t(Q + qk_base, rows, offs_k, T, Dk, H * Dk, FEATURE)  # [BDK, C]
    dt = Q.dtype.element_ty
    at = _mm(fk.to(dt), fqt.to(dt), IEEE)  # the forward's scores, transposed: [key s, query t]
    at = tl.where(rows0[None, :] >= rows0[:, None], at, 0.0)
    gn = _ld(DO + v_base, rows, offs_v, T, Dv, H * Dv).to(tl.float32)  # [C, BV]
    if NORMALIZE:
        gn = gn * tl.load(RDEN + (b.to(tl.int64) * T + rows) * H + h, mask=t_ok, other=0.0)[:, None]
    r = _ld(HR + slot * Dk * Dv, offs_k, offs_v, Dk, Dv, Dv)  # R_n [BDK, BV]
    dv = _mm32(at, gn, IEEE) + _mm32(fk, r, IEEE)
    tl.store(DV + v_base + rows[:, None].to(tl.int64) * (H * Dv) + offs_v[None, :], dv.to(DV.dtype.element_ty),
             mask=t_ok[:, None] & (offs_v[None, :] < Dv))


# ---------------------------------------------------------------------------------------------
# BASED's 2nd-order Taylor map, features on the fly. Internal state rows (padded, TFP = 1+BD+BD²):
# [0] the constant feature, [1, 1+BD) the linear ones, [1+BD, TFP) the quadratic ones (i*BD + j).
# External states ([B, H, 1+d+d², Dv]) use the reference's rows 0, 1+i, 1+d+i*d+j.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _x2(base, rows, T, d, stride, BD: tl.constexpr):
    """vec(x⊗x) of the rows, ``[C, BD*BD]`` fp32 (entry ``i*BD + j`` = x_i x_j), zeros outside:
    the product of two gathers of the row (columns ``i`` and ``j``), no reshape."""
    p = tl.arange(0, BD * BD)
    i = p // BD
    j = p % BD
    m = (rows[:, None] < T) & (i[None, :] < d) & (j[None, :] < d)
    ptr = base + rows[:, None].to(tl.int64) * stride
    xa = tl.load(ptr + i[None, :], mask=m, other=0.0).to(tl.float32)
    xb = tl.load(ptr + j[None, :], mask=m, other=0.0).to(tl.float32)
    return xa * xb


@triton.jit
def _x2t(base, rows, T, d, stride, BD: tl.constexpr):
    """The transposed ``[BD*BD, C]`` tile of :func:`_x2`."""
    p = tl.arange(0, BD * BD)
    i = p // BD
    j = p % BD
    m = (i[:, None] < d) & (j[:, None] < d) & (rows[None, :] < T)
    ptr = base + rows[None, :].to(tl.int64) * stride
    xa = tl.load(ptr + i[:, None], mask=m, other=0.0).to(tl.float32)
    xb = tl.load(ptr + j[:, None], mask=m, other=0.0).to(tl.float32)
    return xa * xb


@triton.jit
def _x2_bwd(g2, base, rows, T, d, stride, BD: tl.constexpr, IEEE: tl.constexpr):
    """``g2 = ∂L/∂vec(x⊗x)`` ``[C, BD*BD]`` -> ``∂L/∂x`` ``[C, BD]``: ``out_i = Σ_j (g2_ij + g2_ji) x_j``.

    With ``xa[p] = x_{p//BD}``, ``xb[p] = x_{p%BD}``: ``out = (g2 ⊙ xb) Eaᵀ + (g2 ⊙ xa) Ebᵀ`` for the
    0/1 selection matrices ``Ea[i, p] = [p//BD = i]``, ``Eb[i, p] = [p%BD = i]`` (products of the
    precision of the other gradient products: IEEE for float32 inputs, TF32 otherwise)."""
    p = tl.arange(0, BD * BD)
    i = p // BD
    j = p % BD
    m = (rows[:, None] < T) & (i[None, :] < d) & (j[None, :] < d)
    ptr = base + rows[:, None].to(tl.int64) * stride
    xa = tl.load(ptr + i[None, :], mask=m, other=0.0).to(tl.float32)
    xb = tl.load(ptr + j[None, :], mask=m, other=0.0).to(tl.float32)
    c = tl.arange(0, BD)
    ea = tl.where(i[:, None] == c[None, :], 1.0, 0.0)  # Eaᵀ [BD*BD, BD]
    eb = tl.where(j[:, None] == c[None, :], 1.0, 0.0)  # Ebᵀ
    return _mm(g2 * xb, ea, IEEE) + _mm(g2 * xa, eb, IEEE)


@triton.jit
def _taylor_ext_rows(d, BD: tl.constexpr):
    """Row offsets and masks of the linear and quadratic parts in an external state (width d)."""
    i1 = tl.arange(0, BD)
    i2 = tl.arange(0, BD * BD)
    a = i2 // BD
    c = i2 % BD
    return 1 + i1, i1 < d, 1 + d + a * d + c, (a < d) & (c < d)


@triton.jit
def _taylor_load_ext(S, Z, bh, d, Dv, offs_v, BD: tl.constexpr):
    r1, m1, r2, m2 = _taylor_ext_rows(d, BD)
    F = 1 + d + d * d
    v_ok = offs_v < Dv
    sb = S + bh.to(tl.int64) * F * Dv
    zb = Z + bh.to(tl.int64) * F
    s0 = tl.load(sb + offs_v, mask=v_ok, other=0.0).to(tl.float32)
    s1 = tl.load(sb + r1[:, None] * Dv + offs_v[None, :], mask=m1[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
    s2 = tl.load(sb + r2[:, None] * Dv + offs_v[None, :], mask=m2[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
    z0 = tl.load(zb).to(tl.float32)
    z1 = tl.load(zb + r1, mask=m1, other=0.0).to(tl.float32)
    z2 = tl.load(zb + r2, mask=m2, other=0.0).to(tl.float32)
    return s0, s1, s2, z0, z1, z2


@triton.jit
def _taylor_store_ext(S, Z, bh, d, Dv, offs_v, s0, s1, s2, z0, z1, z2, STORE_Z, BD: tl.constexpr):
    """Store a state in the reference's row order (``z`` too when ``STORE_Z``)."""
    r1, m1, r2, m2 = _taylor_ext_rows(d, BD)
    F = 1 + d + d * d
    v_ok = offs_v < Dv
    sb = S + bh.to(tl.int64) * F * Dv
    zb = Z + bh.to(tl.int64) * F
    tl.store(sb + offs_v, s0, mask=v_ok)
    tl.store(sb + r1[:, None] * Dv + offs_v[None, :], s1, mask=m1[:, None] & v_ok[None, :])
    tl.store(sb + r2[:, None] * Dv + offs_v[None, :], s2, mask=m2[:, None] & v_ok[None, :])
    if STORE_Z:
        tl.store(zb, z0)
        tl.store(zb + r1, z1, mask=m1)
        tl.store(zb + r2, z2, mask=m2)


@triton.jit
def _taylor_store_int(HS, HZ, slot, Dv, offs_v, s0, s1, s2, z0, z1, z2, STORE_Z, BD: tl.constexpr):
    """Store a state into the padded internal slot ``slot`` (int64) of ``HS [.., TFP, Dv]`` / ``HZ [.., TFP]``."""
    FP: tl.constexpr = 1 + BD + BD * BD
    i1 = tl.arange(0, BD)
    i2 = tl.arange(0, BD * BD)
    v_ok = offs_v < Dv
    hb = HS + slot * FP * Dv
    zb = HZ + slot * FP
    tl.store(hb + offs_v, s0, mask=v_ok)
    tl.store(hb + (1 + i1[:, None]) * Dv + offs_v[None, :], s1, mask=v_ok[None, :])
    tl.store(hb + (1 + BD + i2[:, None]) * Dv + offs_v[None, :], s2, mask=v_ok[None, :])
    if STORE_Z:
        tl.store(zb, z0)
        tl.store(zb + 1 + i1, z1)
        tl.store(zb + 1 + BD + i2, z2)


@triton.jit
def _tl_fwd_states(
    K, V, S0, Z0, HS, HZ, ST, ZT,
    T, NT, H, d, Dv, c1, c2,
    C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    HAS_S0: tl.constexpr, STORE_FINAL: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    nv = tl.cdiv(Dv, BV)
    bh = pid // nv
    iv = pid % nv
    b = bh // H
    h = bh % H
    offs_v = iv * BV + tl.arange(0, BV)
    offs_d = tl.arange(0, BD)
    if HAS_S0:
        s0, s1, s2, z0, z1, z2 = _taylor_load_ext(S0, Z0, bh, d, Dv, offs_v, BD)
    else:
        s0 = tl.zeros([BV], tl.float32)
        s1 = tl.zeros([BD, BV], tl.float32)
        s2 = tl.zeros([BD * BD, BV], tl.float32)
        z0 = tl.sum(tl.zeros([BD], tl.float32), 0)
        z1 = tl.zeros([BD], tl.float32)
        z2 = tl.zeros([BD * BD], tl.float32)
    k_base = K + (b.to(tl.int64) * T * H + h) * d
    v_base = V + (b.to(tl.int64) * T * H + h) * Dv
    rows0 = tl.arange(0, C)
    bh64 = bh.to(tl.int64)
    for n in range(0, NT):
        _taylor_store_int(HS, HZ, bh64 * NT + n, Dv, offs_v, s0, s1, s2, z0, z1, z2, iv == 0, BD)
        rows = n * C + rows0
        k1t = _ldt(k_base, rows, offs_d, T, d, H * d).to(tl.float32) * c1  # [BD, C]
        k2t = _x2t(k_base, rows, T, d, H * d, BD) * c2  # [BD*BD, C]
        vv = _ld(v_base, rows, offs_v, T, Dv, H * Dv)  # [C, BV]
        s0 += tl.sum(vv.to(tl.float32), 0)
        s1 += _mm32(k1t, vv, IEEE)
        s2 += _mm32(k2t, vv, IEEE)
        z0 += tl.sum(tl.where(rows < T, 1.0, 0.0), 0)
        z1 += tl.sum(k1t, 1)
        z2 += tl.sum(k2t, 1)
    if STORE_FINAL:
        _taylor_store_ext(ST, ZT, bh, d, Dv, offs_v, s0, s1, s2, z0, z1, z2, iv == 0, BD)


@triton.jit
def _tl_fwd_out(
    Q, K, V, HS, HZ, Y, DEN,
    T, NT, H, d, Dv, c1, c2, eps,
    C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    NORMALIZE: tl.constexpr, IEEE: tl.constexpr,
):
    FP: tl.constexpr = 1 + BD + BD * BD
    pid = tl.program_id(0)
    nv = tl.cdiv(Dv, BV)
    iv = pid % nv
    n = (pid // nv) % NT
    bh = pid // (nv * NT)
    b = bh // H
    h = bh % H
    offs_v = iv * BV + tl.arange(0, BV)
    offs_d = tl.arange(0, BD)
    i2 = tl.arange(0, BD * BD)
    rows0 = tl.arange(0, C)
    rows = n * C + rows0
    t_ok = rows < T
    slot = bh.to(tl.int64) * NT + n
    qk_base = (b.to(tl.int64) * T * H + h) * d
    v_base = (b.to(tl.int64) * T * H + h) * Dv
    xq = _ld(Q + qk_base, rows, offs_d, T, d, H * d)  # [C, BD] raw
    xkt = _ldt(K + qk_base, rows, offs_d, T, d, H * d)  # [BD, C] raw
    vv = _ld(V + v_base, rows, offs_v, T, Dv, H * Dv)
    dt = vv.dtype
    hb = HS + slot * FP * Dv
    s0 = tl.load(hb + offs_v, mask=offs_v < Dv, other=0.0)
    s1 = _ld(hb + Dv, offs_d, offs_v, BD, Dv, Dv)  # [BD, BV]
    s2 = _ld(hb + (1 + BD) * Dv, i2, offs_v, BD * BD, Dv, Dv)  # [BD*BD, BV]
    sc = _mm(xq.to(dt), xkt.to(dt), IEEE)
    a = tl.where(rows0[:, None] >= rows0[None, :], 1.0 + sc * (c1 * c1) + sc * sc * (c2 * c2), 0.0)
    q1 = xq.to(tl.float32) * c1
    q2 = _x2(Q + qk_base, rows, T, d, H * d, BD) * c2  # [C, BD*BD]
    num = s0[None, :] + _mm32(q1, s1, IEEE) + _mm32(q2, s2, IEEE) + _mm(a.to(dt), vv, IEEE)
    if NORMALIZE:
        zb = HZ + slot * FP
        z0 = tl.load(zb)
        z1 = tl.load(zb + 1 + offs_d)
        z2 = tl.load(zb + 1 + BD + i2)
        den = tl.sum(a, 1) + z0 + tl.sum(q1 * z1[None, :], 1) + tl.sum(q2 * z2[None, :], 1)
        num = num / (den + eps)[:, None]
        if iv == 0:
            tl.store(DEN + (b.to(tl.int64) * T + rows) * H + h, den, mask=t_ok)
    tl.store(Y + v_base + rows[:, None].to(tl.int64) * (H * Dv) + offs_v[None, :], num.to(Y.dtype.element_ty),
             mask=t_ok[:, None] & (offs_v[None, :] < Dv))


@triton.jit
def _tl_bwd_states(
    Q, DO, RDEN, GD, DST, DZT, HR, HRZ, DS0, DZ0,
    T, NT, H, d, Dv, c1, c2,
    C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_D: tl.constexpr, STORE_D0: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    nv = tl.cdiv(Dv, BV)
    bh = pid // nv
    iv = pid % nv
    b = bh // H
    h = bh % H
    offs_v = iv * BV + tl.arange(0, BV)
    offs_d = tl.arange(0, BD)
    if HAS_D:
        r0, r1, r2, u0, u1, u2 = _taylor_load_ext(DST, DZT, bh, d, Dv, offs_v, BD)
    else:
        r0 = tl.zeros([BV], tl.float32)
        r1 = tl.zeros([BD, BV], tl.float32)
        r2 = tl.zeros([BD * BD, BV], tl.float32)
        u0 = tl.sum(tl.zeros([BD], tl.float32), 0)
        u1 = tl.zeros([BD], tl.float32)
        u2 = tl.zeros([BD * BD], tl.float32)
    q_base = Q + (b.to(tl.int64) * T * H + h) * d
    do_base = DO + (b.to(tl.int64) * T * H + h) * Dv
    rows0 = tl.arange(0, C)
    bh64 = bh.to(tl.int64)
    for i in range(0, NT):
        n = NT - 1 - i
        _taylor_store_int(HR, HRZ, bh64 * NT + n, Dv, offs_v, r0, r1, r2, u0, u1, u2, iv == 0, BD)
        rows = n * C + rows0
        q1t = _ldt(q_base, rows, offs_d, T, d, H * d).to(tl.float32) * c1  # [BD, C]
        q2t = _x2t(q_base, rows, T, d, H * d, BD) * c2  # [BD*BD, C]
        gn = _ld(do_base, rows, offs_v, T, Dv, H * Dv).to(tl.float32)
        if NORMALIZE:
            t_ok = rows < T
            st = (b.to(tl.int64) * T + rows) * H + h
            gn = gn * tl.load(RDEN + st, mask=t_ok, other=0.0)[:, None]
            gdv = tl.load(GD + st, mask=t_ok, other=0.0)
            u0 += tl.sum(gdv, 0)
            u1 += tl.sum(q1t * gdv[None, :], 1)
            u2 += tl.sum(q2t * gdv[None, :], 1)
        r0 += tl.sum(gn, 0)
        r1 += _mm32(q1t, gn, IEEE)
        r2 += _mm32(q2t, gn, IEEE)
    if STORE_D0:
        _taylor_store_ext(DS0, DZ0, bh, d, Dv, offs_v, r0, r1, r2, u0, u1, u2, iv == 0, BD)


@triton.jit
def _tl_bwd_dq(
    Q, K, V, DO, RDEN, GD, HS, HZ, DQ,
    T, NT, H, d, Dv, c1, c2,
    C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    NORMALIZE: tl.constexpr, IEEE: tl.constexpr,
):
    FP: tl.constexpr = 1 + BD + BD * BD
    pid = tl.program_id(0)
    n = pid % NT
    bh = pid // NT
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BD)
    i2 = tl.arange(0, BD * BD)
    rows0 = tl.arange(0, C)
    rows = n * C + rows0
    t_ok = rows < T
    slot = bh.to(tl.int64) * NT + n
    qk_base = (b.to(tl.int64) * T * H + h) * d
    v_base = (b.to(tl.int64) * T * H + h) * Dv
    st = (b.to(tl.int64) * T + rows) * H + h
    hb = HS + slot * FP * Dv
    if NORMALIZE:
        rd = tl.load(RDEN + st, mask=t_ok, other=0.0)
    dp = tl.zeros([C, C], tl.float32)
    g1 = tl.zeros([C, BD], tl.float32)  # ∂L/∂(c₁ q) through the state
    g2 = tl.zeros([C, BD * BD], tl.float32)  # ∂L/∂(c₂ vec(q⊗q)) through the state
    for iv in range(0, tl.cdiv(Dv, BV)):
        offs_v = iv * BV + tl.arange(0, BV)
        gn = _ld(DO + v_base, rows, offs_v, T, Dv, H * Dv).to(tl.float32)
        if NORMALIZE:
            gn = gn * rd[:, None]
        vt = _ldt(V + v_base, rows, offs_v, T, Dv, H * Dv)  # [BV, C]
        s1t = _ldt(hb + Dv, offs_d, offs_v, BD, Dv, Dv)  # [BV, BD]
        s2t = _ldt(hb + (1 + BD) * Dv, i2, offs_v, BD * BD, Dv, Dv)  # [BV, BD*BD]
        dp += _mm32(gn, vt, IEEE)
        g1 += _mm32(gn, s1t, IEEE)
        g2 += _mm32(gn, s2t, IEEE)
    if NORMALIZE:
        gdv = tl.load(GD + st, mask=t_ok, other=0.0)
        dp += gdv[:, None]
        g1 += gdv[:, None] * tl.load(HZ + slot * FP + 1 + offs_d)[None, :]
        g2 += gdv[:, None] * tl.load(HZ + slot * FP + 1 + BD + i2)[None, :]
    xq = _ld(Q + qk_base, rows, offs_d, T, d, H * d)
    xkt = _ldt(K + qk_base, rows, offs_d, T, d, H * d)
    sc = _mm(xq, xkt, IEEE)
    ds = tl.where(rows0[:, None] >= rows0[None, :], dp * (c1 * c1 + 2.0 * (c2 * c2) * sc), 0.0)
    xk = _ld(K + qk_base, rows, offs_d, T, d, H * d)
    dq = c1 * g1 + c2 * _x2_bwd(g2, Q + qk_base, rows, T, d, H * d, BD, IEEE) + _mm32(ds, xk, IEEE)
    tl.store(DQ + qk_base + rows[:, None].to(tl.int64) * (H * d) + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=t_ok[:, None] & (offs_d[None, :] < d))


@triton.jit
def _tl_bwd_dk(
    Q, K, V, DO, RDEN, GD, HR, HRZ, DK,
    T, NT, H, d, Dv, c1, c2,
    C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    NORMALIZE: tl.constexpr, IEEE: tl.constexpr,
):
    FP: tl.constexpr = 1 + BD + BD * BD
    pid = tl.program_id(0)
    n = pid % NT
    bh = pid // NT
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BD)
    i2 = tl.arange(0, BD * BD)
    rows0 = tl.arange(0, C)
    rows = n * C + rows0
    t_ok = rows < T
    slot = bh.to(tl.int64) * NT + n
    qk_base = (b.to(tl.int64) * T * H + h) * d
    v_base = (b.to(tl.int64) * T * H + h) * Dv
    st = (b.to(tl.int64) * T + rows) * H + h
    rb = HR + slot * FP * Dv
    if NORMALIZE:
        rd = tl.load(RDEN + st, mask=t_ok, other=0.0)
    dpt = tl.zeros([C, C], tl.float32)  # dPᵀ [key s, query t]
    h1 = tl.zeros([C, BD], tl.float32)
    h2 = tl.zeros([C, BD * BD], tl.float32)
    for iv in range(0, tl.cdiv(Dv, BV)):
        offs_v = iv * BV + tl.arange(0, BV)
        vv = _ld(V + v_base, rows, offs_v, T, Dv, H * Dv)  # [C, BV]
        gnt = _ldt(DO + v_base, rows, offs_v, T, Dv, H * Dv).to(tl.float32)  # [BV, C]
        if NORMALIZE:
            gnt = gnt * rd[None, :]
        r1t = _ldt(rb + Dv, offs_d, offs_v, BD, Dv, Dv)  # [BV, BD]
        r2t = _ldt(rb + (1 + BD) * Dv, i2, offs_v, BD * BD, Dv, Dv)  # [BV, BD*BD]
        dpt += _mm32(vv, gnt, IEEE)
        h1 += _mm32(vv, r1t, IEEE)
        h2 += _mm32(vv, r2t, IEEE)
    if NORMALIZE:
        dpt += tl.load(GD + st, mask=t_ok, other=0.0)[None, :]
    h1 += tl.load(HRZ + slot * FP + 1 + offs_d)[None, :]
    h2 += tl.load(HRZ + slot * FP + 1 + BD + i2)[None, :]
    xk = _ld(K + qk_base, rows, offs_d, T, d, H * d)
    xqt = _ldt(Q + qk_base, rows, offs_d, T, d, H * d)
    sct = _mm(xk, xqt, IEEE)  # [s, t]
    dst = tl.where(rows0[None, :] >= rows0[:, None], dpt * (c1 * c1 + 2.0 * (c2 * c2) * sct), 0.0)
    xq = _ld(Q + qk_base, rows, offs_d, T, d, H * d)
    dk = c1 * h1 + c2 * _x2_bwd(h2, K + qk_base, rows, T, d, H * d, BD, IEEE) + _mm32(dst, xq, IEEE)
    tl.store(DK + qk_base + rows[:, None].to(tl.int64) * (H * d) + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=t_ok[:, None] & (offs_d[None, :] < d))


@triton.jit
def _tl_bwd_dv(
    Q, K, DO, RDEN, HR, DV,
    T, NT, H, d, Dv, c1, c2,
    C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    NORMALIZE: tl.constexpr, IEEE: tl.constexpr,
):
    FP: tl.constexpr = 1 + BD + BD * BD
    pid = tl.program_id(0)
    nv = tl.cdiv(Dv, BV)
    iv = pid % nv
    n = (pid // nv) % NT
    bh = pid // (nv * NT)
    b = bh // H
    h = bh % H
    offs_v = iv * BV + tl.arange(0, BV)
    offs_d = tl.arange(0, BD)
    i2 = tl.arange(0, BD * BD)
    rows0 = tl.arange(0, C)
    rows = n * C + rows0
    t_ok = rows < T
    slot = bh.to(tl.int64) * NT + n
    qk_base = (b.to(tl.int64) * T * H + h) * d
    v_base = (b.to(tl.int64) * T * H + h) * Dv
    xk = _ld(K + qk_base, rows, offs_d, T, d, H * d)  # [C, BD] raw
    xqt = _ldt(Q + qk_base, rows, offs_d, T, d, H * d)  # [BD, C] raw
    sct = _mm(xk, xqt, IEEE)
    at = tl.where(rows0[None, :] >= rows0[:, None], 1.0 + sct * (c1 * c1) + sct * sct * (c2 * c2), 0.0)
    gn = _ld(DO + v_base, rows, offs_v, T, Dv, H * Dv).to(tl.float32)
    if NORMALIZE:
        gn = gn * tl.load(RDEN + (b.to(tl.int64) * T + rows) * H + h, mask=t_ok, other=0.0)[:, None]
    rb = HR + slot * FP * Dv
    r0 = tl.load(rb + offs_v, mask=offs_v < Dv, other=0.0)
    r1 = _ld(rb + Dv, offs_d, offs_v, BD, Dv, Dv)  # [BD, BV]
    r2 = _ld(rb + (1 + BD) * Dv, i2, offs_v, BD * BD, Dv, Dv)  # [BD*BD, BV]
    k1 = xk.to(tl.float32) * c1
    k2 = _x2(K + qk_base, rows, T, d, H * d, BD) * c2
    dv = r0[None, :] + _mm32(at, gn, IEEE) + _mm32(k1, r1, IEEE) + _mm32(k2, r2, IEEE)
    tl.store(DV + v_base + rows[:, None].to(tl.int64) * (H * Dv) + offs_v[None, :], dv.to(DV.dtype.element_ty),
             mask=t_ok[:, None] & (offs_v[None, :] < Dv))


# ---------------------------------------------------------------------------------------------
# One-token decode step: S' = S + φ(k) vᵀ, z' = z + φ(k), y = φ(q)ᵀ S' / (φ(q)ᵀ z' + ε).
# One program per (b, h) walks the value tiles: z is read before it is written, by the same
# program, so the step can update the state in place (SO = S, ZO = Z).
# ---------------------------------------------------------------------------------------------


@triton.jit
def _la_step(
    Q, K, V, S, Z, Y, SO, ZO, Dk, Dv, eps,
    BDK: tl.constexpr, BV: tl.constexpr, FEATURE: tl.constexpr, NORMALIZE: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BDK)
    k_ok = offs_k < Dk
    xq = tl.load(Q + bh * Dk + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    xk = tl.load(K + bh * Dk + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    fq = tl.where(k_ok, _phi(xq, FEATURE), 0.0)
    fk = tl.where(k_ok, _phi(xk, FEATURE), 0.0)
    z = tl.load(Z + bh * Dk + offs_k, mask=k_ok, other=0.0) + fk
    rden = 1.0 / (tl.sum(fq * z, 0) + eps)
    for iv in range(0, tl.cdiv(Dv, BV)):
        offs_v = iv * BV + tl.arange(0, BV)
        v_ok = offs_v < Dv
        vv = tl.load(V + bh * Dv + offs_v, mask=v_ok, other=0.0).to(tl.float32)
        off = bh * Dk * Dv + offs_k[:, None] * Dv + offs_v[None, :]
        kv_ok = k_ok[:, None] & v_ok[None, :]
        s = tl.load(S + off, mask=kv_ok, other=0.0) + fk[:, None] * vv[None, :]
        y = tl.sum(fq[:, None] * s, 0)
        if NORMALIZE:
            y = y * rden
        tl.store(Y + bh * Dv + offs_v, y.to(Y.dtype.element_ty), mask=v_ok)
        tl.store(SO + off, s, mask=kv_ok)
    tl.store(ZO + bh * Dk + offs_k, z, mask=k_ok)


@triton.jit
def _tl_step(
    Q, K, V, S, Z, Y, SO, ZO, d, Dv, c1, c2, eps,
    BD: tl.constexpr, BV: tl.constexpr, NORMALIZE: tl.constexpr,
):
    bh = tl.program_id(0)
    bh64 = bh.to(tl.int64)
    offs_d = tl.arange(0, BD)
    r1, m1, r2, m2 = _taylor_ext_rows(d, BD)
    F = 1 + d + d * d
    xq = tl.load(Q + bh64 * d + offs_d, mask=offs_d < d, other=0.0).to(tl.float32)
    xk = tl.load(K + bh64 * d + offs_d, mask=offs_d < d, other=0.0).to(tl.float32)
    i2 = tl.arange(0, BD * BD)
    qa = tl.load(Q + bh64 * d + i2 // BD, mask=m2, other=0.0).to(tl.float32)
    qb = tl.load(Q + bh64 * d + i2 % BD, mask=m2, other=0.0).to(tl.float32)
    ka = tl.load(K + bh64 * d + i2 // BD, mask=m2, other=0.0).to(tl.float32)
    kb = tl.load(K + bh64 * d + i2 % BD, mask=m2, other=0.0).to(tl.float32)
    q1 = xq * c1
    q2 = qa * qb * c2
    k1 = xk * c1
    k2 = ka * kb * c2
    zb = Z + bh64 * F
    z0 = tl.load(zb).to(tl.float32) + 1.0
    z1 = tl.load(zb + r1, mask=m1, other=0.0).to(tl.float32) + k1
    z2 = tl.load(zb + r2, mask=m2, other=0.0).to(tl.float32) + k2
    rden = 1.0 / (z0 + tl.sum(q1 * z1, 0) + tl.sum(q2 * z2, 0) + eps)
    sb = S + bh64 * F * Dv
    sob = SO + bh64 * F * Dv
    for iv in range(0, tl.cdiv(Dv, BV)):
        offs_v = iv * BV + tl.arange(0, BV)
        v_ok = offs_v < Dv
        vv = tl.load(V + bh64 * Dv + offs_v, mask=v_ok, other=0.0).to(tl.float32)
        s0 = tl.load(sb + offs_v, mask=v_ok, other=0.0) + vv
        s1 = tl.load(sb + r1[:, None] * Dv + offs_v[None, :], mask=m1[:, None] & v_ok[None, :], other=0.0) + k1[:, None] * vv[None, :]
        s2 = tl.load(sb + r2[:, None] * Dv + offs_v[None, :], mask=m2[:, None] & v_ok[None, :], other=0.0) + k2[:, None] * vv[None, :]
        y = s0 + tl.sum(q1[:, None] * s1, 0) + tl.sum(q2[:, None] * s2, 0)
        if NORMALIZE:
            y = y * rden
        tl.store(Y + bh64 * Dv + offs_v, y.to(Y.dtype.element_ty), mask=v_ok)
        tl.store(sob + offs_v, s0, mask=v_ok)
        tl.store(sob + r1[:, None] * Dv + offs_v[None, :], s1, mask=m1[:, None] & v_ok[None, :])
        tl.store(sob + r2[:, None] * Dv + offs_v[None, :], s2, mask=m2[:, None] & v_ok[None, :])
    zob = ZO + bh64 * F
    tl.store(zob, z0)
    tl.store(zob + r1, z1, mask=m1)
    tl.store(zob + r2, z2, mask=m2)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------

# MNEMO_AUTOTUNE=0 skips tuning on CUDA (fixed launch parameters, see _fixed).
_AUTOTUNE = os.environ.get("MNEMO_AUTOTUNE", "1") != "0"


def _cfgs(*bv_warps_stages):
    return [triton.Config({"BV": bv}, num_warps=w, num_stages=st) for bv, w, st in bv_warps_stages]


# Four candidates per kernel (tuning compiles each once per key). Every constexpr that changes the
# generated code is part of the key (the autotuner adds the tensor dtypes itself), so a config
# tuned for one variant is never reused for another.
_LOOP = _cfgs((32, 4, 2), (64, 4, 2), (64, 8, 2), (64, 8, 1))  # kernels with a loop over chunks / value tiles
_FLAT = _cfgs((32, 4, 1), (64, 4, 1), (64, 8, 1), (128, 8, 1))  # one tile, no loop
_TLOOP = _cfgs((16, 4, 2), (32, 8, 2), (32, 8, 1), (64, 8, 2))
_TFLAT = _cfgs((16, 4, 1), (32, 4, 1), (32, 8, 1), (64, 8, 1))
_LA_KEY = ["Dk", "Dv", "C", "FEATURE", "IEEE"]
_TL_KEY = ["d", "Dv", "C", "IEEE"]
_TUNED = {
    "_la_fwd_states": triton.autotune(_LOOP, key=_LA_KEY + ["BK", "HAS_S0", "STORE_FINAL"])(_la_fwd_states),
    "_la_fwd_out": triton.autotune(_FLAT, key=_LA_KEY + ["BDK", "NORMALIZE"])(_la_fwd_out),
    "_la_bwd_states": triton.autotune(_LOOP, key=_LA_KEY + ["BK", "NORMALIZE", "HAS_DST", "HAS_DZT", "STORE_D0"])(_la_bwd_states),
    "_la_bwd_dq": triton.autotune(_LOOP, key=_LA_KEY + ["BDK", "NORMALIZE"])(_la_bwd_dq),
    "_la_bwd_dk": triton.autotune(_LOOP, key=_LA_KEY + ["BDK", "NORMALIZE"])(_la_bwd_dk),
    "_la_bwd_dv": triton.autotune(_FLAT, key=_LA_KEY + ["BDK", "NORMALIZE"])(_la_bwd_dv),
    "_tl_fwd_states": triton.autotune(_TLOOP, key=_TL_KEY + ["HAS_S0", "STORE_FINAL"])(_tl_fwd_states),
    "_tl_fwd_out": triton.autotune(_TFLAT, key=_TL_KEY + ["NORMALIZE"])(_tl_fwd_out),
    "_tl_bwd_states": triton.autotune(_TLOOP, key=_TL_KEY + ["NORMALIZE", "HAS_D", "STORE_D0"])(_tl_bwd_states),
    "_tl_bwd_dq": triton.autotune(_TLOOP, key=_TL_KEY + ["NORMALIZE"])(_tl_bwd_dq),
    "_tl_bwd_dk": triton.autotune(_TLOOP, key=_TL_KEY + ["NORMALIZE"])(_tl_bwd_dk),
    "_tl_bwd_dv": triton.autotune(_TFLAT, key=_TL_KEY + ["NORMALIZE"])(_tl_bwd_dv),
}


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _fixed(kernel, dv: int, width: int, ieee: bool) -> dict:
    """Launch parameters without tuning: small tiles under the interpreter (so the CPU tests cover
    several value tiles), sizes that suit the GPU otherwise (``width``: Dk, or 273 for Taylor;
    float32's IEEE products run on the CUDA cores and need the registers of 8 warps)."""
    if _interpreted():
        return dict(BV=16, num_warps=4, num_stages=1)
    bv = min(64 if width <= 128 else 32, max(16, triton.next_power_of_2(dv)))
    heavy = ieee or width > 64 or kernel in (_la_bwd_dq, _la_bwd_dk, _tl_bwd_dq, _tl_bwd_dk)
    return dict(BV=bv, num_warps=8 if heavy else 4, num_stages=1)


def _launch(kernel, grid, args, meta, device, dv: int, width: int) -> None:
    """Autotuned on CUDA (unless MNEMO_AUTOTUNE=0); fixed parameters otherwise. ``grid`` maps the
    launch parameters to the 1-D grid."""
    if device.type == "cuda" and _AUTOTUNE:
        _TUNED[kernel.__name__][lambda m: (grid(m["BV"]),)](*args, **meta)
    else:
        fixed = _fixed(kernel, dv, width, meta["IEEE"])
        kernel[(grid(fixed["BV"]),)](*args, **meta, **fixed)


def _poison() -> bool:
    return os.environ.get("MNEMO_POISON") == "1"


def _alloc(shape, like: Tensor, dtype: torch.dtype) -> Tensor:
    """Buffers the kernels fill; NaN-filled when MNEMO_POISON=1 (tests, diagnostics) so an element
    no program writes shows up as NaN (a GPU's torch.empty hands out stale memory, the CPU's is
    often zero)."""
    if _poison():
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def _dummy(like: Tensor) -> Tensor:
    """A valid pointer for an argument the kernel variant never touches."""
    return torch.empty(1, device=like.device, dtype=torch.float32)


def _bdk(dk: int) -> int:
    return max(16, triton.next_power_of_2(dk))


def _taylor_consts(d: int) -> tuple[float, float]:
    return d**-0.25, 1.0 / math.sqrt(2.0 * d)


def _fdim(feature: int, dk: int) -> int:
    return 1 + dk + dk * dk if feature == TAYLOR else dk


# ---------------------------------------------------------------------------------------------
# Forward / backward implementations
# ---------------------------------------------------------------------------------------------


def _states_fwd(k, v, s0, z0, feature, chunk, store_final):
    """The forward state pass: ``(HS, HZ, S_T, z_T)``; HS/HZ hold the state entering every chunk
    (``[B·H, NT, Dφ or 273, Dv]``, ``[B·H, NT, ·]``); S_T, z_T are None unless ``store_final``."""
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    nt = triton.cdiv(t, chunk)
    ieee = k.dtype == torch.float32
    has_s0 = s0 is not None
    fd = _fdim(feature, dk)
    rows = TFP if feature == TAYLOR else dk
    hs = _alloc((b * h, nt, rows, dv), k, torch.float32)
    hz = _alloc((b * h, nt, rows), k, torch.float32)
    st = _alloc((b, h, fd, dv), k, torch.float32) if store_final else None
    zt = _alloc((b, h, fd), k, torch.float32) if store_final else None
    dummy = _dummy(k)
    s0a, z0a = (s0, z0) if has_s0 else (dummy, dummy)
    sta, zta = (st, zt) if store_final else (dummy, dummy)
    if feature == TAYLOR:
        c1, c2 = _taylor_consts(dk)
        args = (k, v, s0a, z0a, hs, hz, sta, zta, t, nt, h, dk, dv, c1, c2)
        meta = dict(C=chunk, BD=TBD, HAS_S0=has_s0, STORE_FINAL=store_final, IEEE=ieee)
        _launch(_tl_fwd_states, lambda bv: b * h * triton.cdiv(dv, bv), args, meta, k.device, dv, TFP)
    else:
        bk = min(64, _bdk(dk))
        args = (k, v, s0a, z0a, hs, hz, sta, zta, t, nt, h, dk, dv)
        meta = dict(C=chunk, BK=bk, FEATURE=feature, HAS_S0=has_s0, STORE_FINAL=store_final, IEEE=ieee)
        _launch(_la_fwd_states, lambda bv: b * h * triton.cdiv(dk, bk) * triton.cdiv(dv, bv), args, meta, k.device, dv, dk)
    return hs, hz, st, zt


def _out_fwd(q, k, v, hs, hz, feature, normalize, eps, chunk):
    """The forward output pass from the stored chunk states: ``(y, den)`` (den empty unless normalised)."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    nt = triton.cdiv(t, chunk)
    y = _alloc((b, t, h, dv), q, q.dtype)
    den = _alloc((b, t, h), q, torch.float32) if normalize else q.new_empty(0, dtype=torch.float32)
    den_arg = den if normalize else _dummy(q)
    ieee = q.dtype == torch.float32
    grid = lambda bv: b * h * nt * triton.cdiv(dv, bv)  # noqa: E731
    if feature == TAYLOR:
        c1, c2 = _taylor_consts(dk)
        args = (q, k, v, hs, hz, y, den_arg, t, nt, h, dk, dv, c1, c2, eps)
        _launch(_tl_fwd_out, grid, args, dict(C=chunk, BD=TBD, NORMALIZE=normalize, IEEE=ieee), q.device, dv, TFP)
    else:
        args = (q, k, v, hs, hz, y, den_arg, t, nt, h, dk, dv, eps)
        meta = dict(C=chunk, BDK=_bdk(dk), FEATURE=feature, NORMALIZE=normalize, IEEE=ieee)
        _launch(_la_fwd_out, grid, args, meta, q.device, dv, dk)
    return y, den


def _fwd_impl(q, k, v, s0, z0, feature, normalize, eps, chunk):
    hs, hz, st, zt = _states_fwd(k, v, s0, z0, feature, chunk, True)
    y, den = _out_fwd(q, k, v, hs, hz, feature, normalize, eps, chunk)
    return y, st, zt, den


def _states_bwd(q, dy, rden, gd, dst, dzt, feature, normalize, chunk, need_d0):
    """The reverse state pass: ``(HR, HRZ, dS0, dz0)`` (dS0, dz0 None unless ``need_d0``)."""
    b, t, h, dk = q.shape
    dv = dy.shape[-1]
    nt = triton.cdiv(t, chunk)
    ieee = q.dtype == torch.float32
    fd = _fdim(feature, dk)
    rows = TFP if feature == TAYLOR else dk
    hr = _alloc((b * h, nt, rows, dv), q, torch.float32)
    hrz = _alloc((b * h, nt, rows), q, torch.float32)
    ds0 = _alloc((b, h, fd, dv), q, torch.float32) if need_d0 else None
    dz0 = _alloc((b, h, fd), q, torch.float32) if need_d0 else None
    dummy = _dummy(q)
    ds0a, dz0a = (ds0, dz0) if need_d0 else (dummy, dummy)
    if feature == TAYLOR:
        c1, c2 = _taylor_consts(dk)
        has_d = dst is not None or dzt is not None
        if has_d:  # the Taylor kernel loads both parts of the final-state gradient together
            dst = dst if dst is not None else torch.zeros(b, h, fd, dv, device=q.device)
            dzt = dzt if dzt is not None else torch.zeros(b, h, fd, device=q.device)
        args = (q, dy, rden, gd, dst if has_d else dummy, dzt if has_d else dummy, hr, hrz, ds0a, dz0a, t, nt, h, dk, dv, c1, c2)
        meta = dict(C=chunk, BD=TBD, NORMALIZE=normalize, HAS_D=has_d, STORE_D0=need_d0, IEEE=ieee)
        _launch(_tl_bwd_states, lambda bv: b * h * triton.cdiv(dv, bv), args, meta, q.device, dv, TFP)
    else:
        bk = min(64, _bdk(dk))
        has_dst, has_dzt = dst is not None, dzt is not None
        args = (q, dy, rden, gd, dst if has_dst else dummy, dzt if has_dzt else dummy, hr, hrz, ds0a, dz0a, t, nt, h, dk, dv)
        meta = dict(C=chunk, BK=bk, FEATURE=feature, NORMALIZE=normalize, HAS_DST=has_dst, HAS_DZT=has_dzt, STORE_D0=need_d0, IEEE=ieee)
        _launch(_la_bwd_states, lambda bv: b * h * triton.cdiv(dk, bk) * triton.cdiv(dv, bv), args, meta, q.device, dv, dk)
    return hr, hrz, ds0, dz0


def _grads_chunks(q, k, v, dy, rden, gd, hs, hz, hr, hrz, feature, normalize, chunk):
    """The per-chunk gradient launches: ``(dq, dk, dv)``."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    nt = triton.cdiv(t, chunk)
    ieee = q.dtype == torch.float32
    dq = _alloc(q.shape, q, q.dtype)
    dk_ = _alloc(k.shape, q, k.dtype)
    dv_ = _alloc(v.shape, q, v.dtype)
    per_chunk = lambda bv: b * h * nt  # noqa: E731
    per_tile = lambda bv: b * h * nt * triton.cdiv(dv, bv)  # noqa: E731
    if feature == TAYLOR:
        c1, c2 = _taylor_consts(dk)
        meta = dict(C=chunk, BD=TBD, NORMALIZE=normalize, IEEE=ieee)
        tail = (t, nt, h, dk, dv, c1, c2)
        _launch(_tl_bwd_dq, per_chunk, (q, k, v, dy, rden, gd, hs, hz, dq) + tail, meta, q.device, dv, TFP)
        _launch(_tl_bwd_dk, per_chunk, (q, k, v, dy, rden, gd, hr, hrz, dk_) + tail, meta, q.device, dv, TFP)
        _launch(_tl_bwd_dv, per_tile, (q, k, dy, rden, hr, dv_) + tail, meta, q.device, dv, TFP)
    else:
        meta = dict(C=chunk, BDK=_bdk(dk), FEATURE=feature, NORMALIZE=normalize, IEEE=ieee)
        tail = (t, nt, h, dk, dv)
        _launch(_la_bwd_dq, per_chunk, (q, k, v, dy, rden, gd, hs, hz, dq) + tail, meta, q.device, dv, dk)
        _launch(_la_bwd_dk, per_chunk, (q, k, v, dy, rden, gd, hr, hrz, dk_) + tail, meta, q.device, dv, dk)
        _launch(_la_bwd_dv, per_tile, (q, k, dy, rden, hr, dv_) + tail, meta, q.device, dv, dk)
    return dq, dk_, dv_


def _row_stats(dy, y, den, eps, normalize):
    """``(1/(den+ε), gd = -(dy·y)/(den+ε))`` per token, fp32 ``[B, T, H]`` (dummies if not normalised)."""
    if not normalize:
        d = _dummy(dy)
        return d, d
    rden = 1.0 / (den + eps)
    return rden, -(dy.float() * y.float()).sum(-1) * rden


def _bwd_impl(dy, q, k, v, y, den, s0, z0, dst, dzt, feature, normalize, eps, chunk, need_d0):
    dy = dy.contiguous()
    rden, gd = _row_stats(dy, y, den, eps, normalize)
    hs, hz, _, _ = _states_fwd(k, v, s0, z0, feature, chunk, False)
    dst = dst.contiguous() if dst is not None else None
    dzt = dzt.contiguous() if dzt is not None else None
    hr, hrz, ds0, dz0 = _states_bwd(q, dy, rden, gd, dst, dzt, feature, normalize, chunk, need_d0)
    dq, dk, dv = _grads_chunks(q, k, v, dy, rden, gd, hs, hz, hr, hrz, feature, normalize, chunk)
    if not need_d0:
        ds0, dz0 = q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, ds0, dz0


# ---------------------------------------------------------------------------------------------
# custom ops + autograd
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("mnemotorch::linear_attn_fwd", mutates_args=())
def linear_attn_fwd(
    q: Tensor, k: Tensor, v: Tensor, s0: Optional[Tensor], z0: Optional[Tensor],
    feature: int, normalize: bool, eps: float, chunk: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y [B, T, H, Dv], S_T [B, H, Dφ, Dv] fp32, z_T [B, H, Dφ] fp32, den [B, T, H] fp32 or empty)``."""
    return _fwd_impl(q, k, v, s0, z0, feature, normalize, eps, chunk)


@linear_attn_fwd.register_fake
def _(q, k, v, s0, z0, feature, normalize, eps, chunk):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    fd = _fdim(feature, dk)
    den = q.new_empty((b, t, h) if normalize else (0,), dtype=torch.float32)
    return q.new_empty(b, t, h, dv), q.new_empty(b, h, fd, dv, dtype=torch.float32), q.new_empty(b, h, fd, dtype=torch.float32), den


@torch.library.custom_op("mnemotorch::linear_attn_bwd", mutates_args=())
def linear_attn_bwd(
    dy: Tensor, q: Tensor, k: Tensor, v: Tensor, y: Tensor, den: Tensor,
    s0: Optional[Tensor], z0: Optional[Tensor], dst: Optional[Tensor], dzt: Optional[Tensor],
    feature: int, normalize: bool, eps: float, chunk: int, need_d0: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dS0 or empty, dz0 or empty)``."""
    return _bwd_impl(dy, q, k, v, y, den, s0, z0, dst, dzt, feature, normalize, eps, chunk, need_d0)


@linear_attn_bwd.register_fake
def _(dy, q, k, v, y, den, s0, z0, dst, dzt, feature, normalize, eps, chunk, need_d0):
    b, t, h, dk = q.shape
    fd = _fdim(feature, dk)
    ds0 = q.new_empty((b, h, fd, v.shape[-1]) if need_d0 else (0,), dtype=torch.float32)
    dz0 = q.new_empty((b, h, fd) if need_d0 else (0,), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), ds0, dz0


def _setup_context(ctx, inputs, output):
    q, k, v, s0, z0, feature, normalize, eps, chunk = inputs
    y, _, _, den = output
    ctx.save_for_backward(q, k, v, y, den, s0, z0)
    ctx.args = (feature, normalize, eps, chunk)
    ctx.has_s0 = s0 is not None


def _backward(ctx, dy, dst, dzt, dden):
    q, k, v, y, den, s0, z0 = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(y)
    need_d0 = ctx.has_s0 and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
    dq, dk, dv, ds0, dz0 = linear_attn_bwd(dy, q, k, v, y, den, s0, z0, dst, dzt, *ctx.args, need_d0)
    return dq, dk, dv, (ds0 if need_d0 else None), (dz0 if need_d0 else None), None, None, None, None


linear_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def _step_impl(q, k, v, s, z, y, so, zo, feature, normalize, eps):
    b, h, dk = q.shape
    dv = v.shape[-1]
    bv = min(64, max(16, triton.next_power_of_2(dv)))
    grid = (b * h,)
    if feature == TAYLOR:
        c1, c2 = _taylor_consts(dk)
        _tl_step[grid](q, k, v, s, z, y, so, zo, dk, dv, c1, c2, eps, BD=TBD, BV=min(bv, 32), NORMALIZE=normalize, num_warps=4)
    else:
        _la_step[grid](q, k, v, s, z, y, so, zo, dk, dv, eps, BDK=_bdk(dk), BV=bv, FEATURE=feature, NORMALIZE=normalize, num_warps=4)


@torch.library.custom_op("mnemotorch::linear_attn_step", mutates_args=())
def linear_attn_step(
    q: Tensor, k: Tensor, v: Tensor, s: Tensor, z: Tensor, feature: int, normalize: bool, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """One decode step, out of place: ``(y [B, H, Dv], S' [B, H, Dφ, Dv], z' [B, H, Dφ])``."""
    y = _alloc(v.shape, q, q.dtype)
    so = _alloc(s.shape, q, torch.float32)
    zo = _alloc(z.shape, q, torch.float32)
    _step_impl(q, k, v, s, z, y, so, zo, feature, normalize, eps)
    return y, so, zo


@linear_attn_step.register_fake
def _(q, k, v, s, z, feature, normalize, eps):
    return torch.empty_like(v), torch.empty_like(s), torch.empty_like(z)


@torch.library.custom_op("mnemotorch::linear_attn_step_", mutates_args=("s", "z"))
def linear_attn_step_(q: Tensor, k: Tensor, v: Tensor, s: Tensor, z: Tensor, feature: int, normalize: bool, eps: float) -> Tensor:
    """One decode step updating ``s``, ``z`` in place; returns ``y [B, H, Dv]``."""
    y = _alloc(v.shape, q, q.dtype)
    _step_impl(q, k, v, s, z, y, s, z, feature, normalize, eps)
    return y


@linear_attn_step_.register_fake
def _(q, k, v, s, z, feature, normalize, eps):
    return torch.empty_like(v)


# ---------------------------------------------------------------------------------------------
# Public entry points (argument checks name the argument and the allowed values)
# ---------------------------------------------------------------------------------------------


def kernel_chunk(chunk_size: int) -> int:
    """The kernel's chunk length for a requested ``chunk_size``: itself if 16/32/64/128, else 64.

    The chunk length changes only the order of floating-point sums, never the function.
    """
    return chunk_size if chunk_size in KERNEL_CHUNKS else DEFAULT_CHUNK


def kernel_support(fn: str, q: Tensor, k: Tensor, v: Tensor, feature: object) -> str | None:
    """``None`` when the kernels support these inputs, else the reason (used for clear errors and by ``auto``)."""
    if not isinstance(feature, str) or feature not in FEATURE_IDS:
        return f"{fn}: backend 'triton' supports the feature maps {sorted(FEATURE_IDS)} given by name, got {feature!r}"
    if q.dtype not in KERNEL_DTYPES:
        return f"{fn}: backend 'triton' supports float16, bfloat16 and float32 inputs, got {q.dtype} (use backend='reference')"
    dk, dv = q.shape[-1], v.shape[-1]
    if feature == "taylor" and not 1 <= dk <= MAX_TAYLOR_D:
        return (f"{fn}: backend 'triton' supports Taylor q/k feature dims d in 1..{MAX_TAYLOR_D} "
                f"(1 + d + d² ≤ 273 features computed on the fly), got d = {dk}")
    if feature != "taylor" and not 1 <= dk <= MAX_DK:
        return f"{fn}: backend 'triton' supports q/k head dims 1..{MAX_DK} for feature {feature!r}, got {dk}"
    if not 1 <= dv <= MAX_DV:
        return f"{fn}: backend 'triton' supports value head dims 1..{MAX_DV}, got {dv}"
    return None


def _check_state(fn: str, state, b: int, h: int, fd: int, dv: int, device) -> tuple[Tensor, Tensor]:
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError(f"{fn}: initial_state must be a tuple (S0 [B, H, Dφ, Dv], z0 [B, H, Dφ]) or None")
    s0, z0 = state
    for name, t, shape in (("S0", s0, (b, h, fd, dv)), ("z0", z0, (b, h, fd))):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{fn}: initial_state {name} must be a floating-point tensor of shape {list(shape)}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{fn}: initial_state {name} must have shape {list(shape)}, got {list(t.shape)}")
    return s0.to(device=device, dtype=torch.float32).contiguous(), z0.to(device=device, dtype=torch.float32).contiguous()


def _common_dtype(*xs: Tensor) -> torch.dtype:
    dt = xs[0].dtype
    for x in xs[1:]:
        dt = torch.promote_types(dt, x.dtype)
    return dt


def linear_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    feature: str = "elu_plus_one",
    normalize: bool = True,
    initial_state: tuple[Tensor, Tensor] | None = None,
    eps: float = 1e-6,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Chunked causal linear attention through the Triton kernels (forward and backward).

    Args:
        q: ``[B, T, H, Dk]`` raw queries (φ is applied inside the kernel).
        k: ``[B, T, H, Dk]`` raw keys.
        v: ``[B, T, H, Dv]`` values. q, k and v of different dtypes are promoted to a common one.
        feature: ``"identity"``, ``"elu_plus_one"``, ``"relu"`` (``Dk ≤ 128``) or ``"taylor"``
            (BASED, ``Dk = d ≤ 16``; the ``1 + d + d²`` features are never materialised).
        normalize: divide by ``φ(q_t)ᵀ z_t + ε``.
        initial_state: ``(S0 [B, H, Dφ, Dv], z0 [B, H, Dφ])`` (any float dtype; used in fp32).
        eps: ε of the denominator (added to the fp32 denominator).
        chunk_size: 16, 32, 64 or 128 (other values run with 64, see :func:`kernel_chunk`; Taylor
            runs with at most 64).

    Returns:
        ``(y [B, T, H, Dv] in the inputs' dtype, (S_T [B, H, Dφ, Dv], z_T [B, H, Dφ]) in float32)``.
    """
    fn = "linear_attention_triton"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.ndim != 4:
            raise ValueError(f"{fn}: {name} must be a tensor of shape [B, T, H, D], got {getattr(x, 'shape', type(x).__name__)}")
    reason = kernel_support(fn, q, k, v, feature)
    if reason is not None:
        raise (NotImplementedError if q.dtype not in KERNEL_DTYPES else ValueError)(reason)
    if not (q.shape == k.shape and q.shape[:3] == v.shape[:3]):
        raise ValueError(f"{fn}: q {list(q.shape)}, k {list(k.shape)} must match and share [B, T, H] with v {list(v.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{fn}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    dt = _common_dtype(q, k, v)
    if dt not in KERNEL_DTYPES:
        raise NotImplementedError(f"{fn}: backend 'triton' supports float16, bfloat16 and float32 inputs, got {dt} (use backend='reference')")
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    fid = FEATURE_IDS[feature]
    fd = _fdim(fid, dk)
    s0 = z0 = None
    if initial_state is not None:
        s0, z0 = _check_state(fn, initial_state, b, h, fd, dv, q.device)
    if t == 0:
        if s0 is None:
            s0, z0 = q.new_zeros(b, h, fd, dv, dtype=torch.float32), q.new_zeros(b, h, fd, dtype=torch.float32)
        return v.new_zeros(v.shape, dtype=dt), (s0, z0)
    # The kernels index q, k, v as contiguous [B, T, H, D] tensors of one dtype.
    q, k, v = (x.to(dt).contiguous() for x in (q, k, v))
    chunk = kernel_chunk(chunk_size)
    if fid == TAYLOR:  # [128, 256] fp32 feature tiles would need more shared memory than an H100 has
        chunk = min(chunk, 64)
    y, st, zt, _ = linear_attn_fwd(q, k, v, s0, z0, fid, bool(normalize), float(eps), chunk)
    return y, (st, zt)


def linear_attention_step_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: tuple[Tensor, Tensor],
    feature: str = "elu_plus_one",
    normalize: bool = True,
    eps: float = 1e-6,
    inplace: bool = False,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One decoding step for a batch of states: constant memory and work in the context length.

    Args:
        q, k: ``[B, H, Dk]`` raw query / key of the new token; v: ``[B, H, Dv]``.
        state: ``(S [B, H, Dφ, Dv], z [B, H, Dφ])`` fp32 (as returned by the chunked form).
        feature, normalize, eps: as :func:`linear_attention_triton`.
        inplace: update ``S`` and ``z`` in place (no new state allocation) instead of returning new ones.

    Returns:
        ``(y [B, H, Dv], (S', z'))``; with ``inplace=True`` the returned state is ``state`` itself.
    """
    fn = "linear_attention_step_triton"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.ndim != 3:
            raise ValueError(f"{fn}: {name} must be a tensor of shape [B, H, D], got {getattr(x, 'shape', type(x).__name__)}")
    if q.shape != k.shape or q.shape[:2] != v.shape[:2] or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{fn}: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} must share [B, H] and dtype (q, k also D)")
    reason = kernel_support(fn, q, k, v, feature)
    if reason is not None:
        raise (NotImplementedError if q.dtype not in KERNEL_DTYPES else ValueError)(reason)
    b, h, dk = q.shape
    fid = FEATURE_IDS[feature]
    fd = _fdim(fid, dk)
    s, z = state if isinstance(state, (tuple, list)) else (None, None)
    if inplace:
        if not (isinstance(s, Tensor) and isinstance(z, Tensor) and s.dtype == z.dtype == torch.float32 and s.is_contiguous() and z.is_contiguous()):
            raise TypeError(f"{fn}: inplace=True needs a contiguous float32 state (S, z)")
        if tuple(s.shape) != (b, h, fd, v.shape[-1]) or tuple(z.shape) != (b, h, fd):
            raise ValueError(f"{fn}: state must be S [B, H, Dφ, Dv] = {[b, h, fd, v.shape[-1]]}, z [B, H, Dφ] = {[b, h, fd]}")
        if s.device != q.device or z.device != q.device:
            raise ValueError(f"{fn}: inplace=True needs the state on q's device {q.device}")
    else:
        s, z = _check_state(fn, state, b, h, fd, v.shape[-1], q.device)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if inplace:
        return linear_attn_step_(q, k, v, s, z, fid, bool(normalize), float(eps)), (s, z)
    y, s2, z2 = linear_attn_step(q, k, v, s, z, fid, bool(normalize), float(eps))
    return y, (s2, z2)
