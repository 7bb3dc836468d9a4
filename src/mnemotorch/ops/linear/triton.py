"""Triton kernels of causal linear attention: chunked forward/backward and the one-token decode step.

What is computed (per batch b and head h; ``φ`` the feature map, ``C`` the chunk length)::

    S_t = S_0 + Σ_{s≤t} φ(k_s) v_sᵀ,   z_t = z_0 + Σ_{s≤t} φ(k_s)
    y_t = φ(q_t)ᵀ S_t / (φ(q_t)ᵀ z_t + ε)        (normalize=True; else y_t = φ(q_t)ᵀ S_t)

exactly :func:`mnemotorch.ops.linear.reference.linear_attention_chunked` (the float64 oracle).

**Two-level chunked algorithm.** Tokens are cut into chunks of ``C`` (64 by default). For chunk
``n`` with featured rows ``Q_n, K_n`` and the state ``(S_n, z_n)`` left by the chunks before it,

    Y_n = [tril(Q_n K_nᵀ) V_n + Q_n S_n] / [tril(Q_n K_nᵀ) 1 + Q_n z_n + ε],
    S_{n+1} = S_n + K_nᵀ V_n,   z_{n+1} = z_n + K_nᵀ 1.

Forward = two launches: (1) ``_*_states_fwd`` walks the chunks of one (b, h, state tile) in order,
keeping the running state in registers, and writes the state entering every ``G``-th chunk to an
fp32 buffer (``G`` = ``group``); (2) ``_*_out_fwd``, parallel over (group of ``G`` chunks, value
tile, b·h), loads the group's entering state and walks its ``G`` chunks (intra-chunk masked
product + inter-chunk ``Q S``, then ``S += KᵀV``). ``G > 1`` divides the state traffic through
memory by ``G`` (the state, not q/k/v, dominates the bytes at D = 128).

**Backward.** With ``r_t = 1/(den_t + ε)``, ``gn_t = r_t dy_t`` and ``gd_t = -r_t (dy_t · y_t)``
(``gn = dy``, ``gd = 0`` when not normalised), normalised linear attention is unnormalised linear
attention of the value ``[v, 1]``, so

    dφ(q_t) = S_t gn_t + z_t gd_t,
    dφ(k_s) = R_s v_s + ρ_s,       dv_s = R_sᵀ φ(k_s),
    R_s = dS_T + Σ_{t≥s} φ(q_t) gn_tᵀ,   ρ_s = dz_T + Σ_{t≥s} φ(q_t) gd_t,
    dS_0 = R_1,   dz_0 = ρ_1.

Three launches: the forward states again with ``G = 1`` (recomputed, not saved: only q, k, v, y and
the fp32 denominators are kept for backward), the reverse states ``R, ρ`` per chunk
(``_*_states_bwd``, the chunks in reverse order), and ``_*_dqkv`` per chunk: the intra-chunk part
``dP = tril(gn Vᵀ + gd 1ᵀ)``, ``dφQ = dP φK + gn Sᵀ + gd zᵀ``, ``dφK = dPᵀ φQ + V Rᵀ + ρ``,
``dV = tril(φQ φKᵀ)ᵀ gn + φK R``, then the chain rule through φ.

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
  ``S⁽²⁾ [d², Dv]``, and ``φ(q)ᵀ S = S⁽⁰⁾ + c₁ qᵀS⁽¹⁾ + c₂ vec(q⊗q)ᵀ S⁽²⁾``: the outer product
  ``vec(q⊗q)`` of a ``[C, d]`` tile is built in registers (``[C, d, d]`` broadcast, reshaped to
  ``[C, d²]``) and fed straight to a ``[C, d²] × [d², Dv]`` matrix product; the state update
  ``S⁽²⁾ += vec(k⊗k)ᵀ V`` likewise;
* backward through the second-order part: for ``M = ∂L/∂vec(x⊗x)`` (``[C, d, d]``),
  ``∂L/∂x_i = c₂ Σ_j (M_ij + M_ji) x_j``.

In memory the state rows keep the reference's order ``[1, x (d rows), vec(x⊗x) (d² rows)]``;
inside the kernels ``d`` is padded to 16 with zeros (zero inputs give zero features).

**Precision.** Products of half-precision inputs run on the tensor cores in that dtype with fp32
accumulation; products with a state (``φ(Q) S``, ``gn Sᵀ``, ``V Rᵀ``) take fp32 operands (TF32 on
the GPU); float32 inputs use IEEE fp32 products everywhere (``input_precision="ieee"``).
Sums, states and denominators are fp32; the normaliser is ``den + ε`` with ``den`` accumulated in
fp32 (``ε`` = 1e-6 by default: it only matters when ``den`` underflows, e.g. ``relu`` features
that are all zero, where the output becomes ``0/ε = 0``).

Registered as ``torch.library.custom_op``s (``mnemotorch::linear_attn_fwd`` / ``_bwd`` / ``_step``
/ ``_step_``) so ``torch.compile`` traces through them. On CUDA the launch parameters are
autotuned (``MNEMO_AUTOTUNE=0`` disables); under ``TRITON_INTERPRET=1`` (CPU tests) fixed small
tiles are used.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

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


# ---------------------------------------------------------------------------------------------
# Small jitted helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _sdot(a, b, IEEE: tl.constexpr, SBF16: tl.constexpr):
    # A product with an fp32 state operand: for bf16 inputs both operands are rounded to bf16 for
    # the tensor cores (the state itself stays fp32 in memory and in the running sums); for fp16
    # inputs fp32 operands (TF32), since a long-context state can exceed fp16's range; IEEE fp32
    # for fp32 inputs.
    if SBF16:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return _dot(a.to(tl.float32), b.to(tl.float32), IEEE)


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
def _load_rows(base, rows, cols, T, D, stride_t):
    """``[len(rows), len(cols)]`` tile of a ``[T, ·, D]`` slice (row stride ``stride_t``), zeros outside, fp32."""
    m = (rows[:, None] < T) & (cols[None, :] < D)
    return tl.load(base + rows[:, None].to(tl.int64) * stride_t + cols[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _load_feat(base, rows, cols, T, D, stride_t, FEATURE: tl.constexpr):
    """(φ(x) with padding zeroed, x), both fp32."""
    m = (rows[:, None] < T) & (cols[None, :] < D)
    x = tl.load(base + rows[:, None].to(tl.int64) * stride_t + cols[None, :], mask=m, other=0.0).to(tl.float32)
    return tl.where(m, _phi(x, FEATURE), 0.0), x


@triton.jit
def _outer(x, C: tl.constexpr, BD: tl.constexpr):
    """``[C, BD] -> [C, BD*BD]``: row-wise vec(x ⊗ x), index ``i*BD + j``."""
    return tl.reshape(x[:, :, None] * x[:, None, :], (C, BD * BD))


@triton.jit
def _outer_bwd(m, x, C: tl.constexpr, BD: tl.constexpr):
    """Gradient through vec(x⊗x): ``m [C, BD*BD]`` -> ``[C, BD]``, ``out_i = Σ_j (m_ij + m_ji) x_j``."""
    m3 = tl.reshape(m, (C, BD, BD))
    return tl.sum(m3 * x[:, None, :], 2) + tl.sum(m3 * x[:, :, None], 1)


# ---------------------------------------------------------------------------------------------
# Elementwise feature maps (identity, elu+1, relu): Dφ = Dk
# ---------------------------------------------------------------------------------------------


@triton.jit
def _la_states_fwd(
    K, V, S0, Z0, HS, HZ, ST, ZT,
    T, NT, NS, H, Dk, Dv,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, G: tl.constexpr, FEATURE: tl.constexpr,
    HAS_S0: tl.constexpr, STORE_FINAL: tl.constexpr, IEEE: tl.constexpr,
):
    # One program: state tile [BK, BV] of one (b, h); walks all chunks in order.
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    nv = tl.cdiv(Dv, BV)
    ik = pid // nv
    iv = pid % nv
    b = bh // H
    h = bh % H
    offs_k = ik * BK + tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    kv_ok = (offs_k[:, None] < Dk) & (offs_v[None, :] < Dv)
    st_off = bh.to(tl.int64) * Dk * Dv + offs_k[:, None] * Dv + offs_v[None, :]
    z_off = bh.to(tl.int64) * Dk + offs_k
    if HAS_S0:
        s = tl.load(S0 + st_off, mask=kv_ok, other=0.0).to(tl.float32)
        z = tl.load(Z0 + z_off, mask=offs_k < Dk, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BK, BV], tl.float32)
        z = tl.zeros([BK], tl.float32)
    k_base = K + b.to(tl.int64) * T * H * Dk + h * Dk
    v_base = V + b.to(tl.int64) * T * H * Dv + h * Dv
    hs_base = HS + bh.to(tl.int64) * NS * Dk * Dv + offs_k[:, None] * Dv + offs_v[None, :]
    hz_base = HZ + bh.to(tl.int64) * NS * Dk + offs_k
    rows0 = tl.arange(0, C)
    for n in range(0, NT):
        if n % G == 0:
            tl.store(hs_base + (n // G) * Dk * Dv, s, mask=kv_ok)
            if iv == 0:
                tl.store(hz_base + (n // G) * Dk, z, mask=offs_k < Dk)
        rows = n * C + rows0
        fk, _ = _load_feat(k_base, rows, offs_k, T, Dk, H * Dk, FEATURE)
        vv = tl.load(v_base + rows[:, None].to(tl.int64) * H * Dv + offs_v[None, :], mask=(rows[:, None] < T) & (offs_v[None, :] < Dv), other=0.0)
        s += _dot(tl.trans(fk.to(vv.dtype)), vv, IEEE)
        z += tl.sum(fk, 0)
    if STORE_FINAL:
        tl.store(ST + st_off, s, mask=kv_ok)
        if iv == 0:
            tl.store(ZT + z_off, z, mask=offs_k < Dk)


@triton.jit
def _la_out_fwd(
    Q, K, V, HS, HZ, Y, DEN,
    T, NS, H, Dk, Dv, eps,
    C: tl.constexpr, BDK: tl.constexpr, BV: tl.constexpr, G: tl.constexpr, FEATURE: tl.constexpr,
    NORMALIZE: tl.constexpr, IEEE: tl.constexpr, SBF16: tl.constexpr,
):
    grp = tl.program_id(0)
    iv = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    offs_k = tl.arange(0, BDK)
    offs_v = iv * BV + tl.arange(0, BV)
    kv_ok = (offs_k[:, None] < Dk) & (offs_v[None, :] < Dv)
    s = tl.load(HS + (bh.to(tl.int64) * NS + grp) * Dk * Dv + offs_k[:, None] * Dv + offs_v[None, :], mask=kv_ok, other=0.0)
    z = tl.load(HZ + (bh.to(tl.int64) * NS + grp) * Dk + offs_k, mask=offs_k < Dk, other=0.0)
    q_base = Q + b.to(tl.int64) * T * H * Dk + h * Dk
    k_base = K + b.to(tl.int64) * T * H * Dk + h * Dk
    v_base = V + b.to(tl.int64) * T * H * Dv + h * Dv
    y_base = Y + b.to(tl.int64) * T * H * Dv + h * Dv
    rows0 = tl.arange(0, C)
    causal = rows0[:, None] >= rows0[None, :]
    for j in range(0, G):
        rows = (grp * G + j) * C + rows0
        r_ok = rows < T
        fq, _ = _load_feat(q_base, rows, offs_k, T, Dk, H * Dk, FEATURE)
        fk, _ = _load_feat(k_base, rows, offs_k, T, Dk, H * Dk, FEATURE)
        vv = tl.load(v_base + rows[:, None].to(tl.int64) * H * Dv + offs_v[None, :], mask=r_ok[:, None] & (offs_v[None, :] < Dv), other=0.0)
        dt = vv.dtype
        a = _dot(fq.to(dt), tl.trans(fk.to(dt)), IEEE)
        a = tl.where(causal, a, 0.0)
        num = _dot(a.to(dt), vv, IEEE) + _sdot(fq, s, IEEE, SBF16)
        if NORMALIZE:
            den = tl.sum(a, 1) + tl.sum(fq * z[None, :], 1)
            num = num / (den + eps)[:, None]
            if iv == 0:
                tl.store(DEN + b.to(tl.int64) * T * H + rows.to(tl.int64) * H + h, den, mask=r_ok)
        tl.store(y_base + rows[:, None].to(tl.int64) * H * Dv + offs_v[None, :], num.to(Y.dtype.element_ty), mask=r_ok[:, None] & (offs_v[None, :] < Dv))
        if j + 1 < G:
            s += _dot(tl.trans(fk.to(dt)), vv, IEEE)
            z += tl.sum(fk, 0)


@triton.jit
def _la_states_bwd(
    Q, DO, RDEN, GD, DST, DZT, HR, HRZ, DS0, DZ0,
    T, NT, H, Dk, Dv,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, FEATURE: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_DST: tl.constexpr, HAS_DZT: tl.constexpr, STORE_D0: tl.constexpr, IEEE: tl.constexpr,
):
    # Reverse walk: R (gradient reaching the state after chunk n from later tokens) per chunk.
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    nv = tl.cdiv(Dv, BV)
    ik = pid // nv
    iv = pid % nv
    b = bh // H
    h = bh % H
    offs_k = ik * BK + tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    kv_ok = (offs_k[:, None] < Dk) & (offs_v[None, :] < Dv)
    st_off = bh.to(tl.int64) * Dk * Dv + offs_k[:, None] * Dv + offs_v[None, :]
    z_off = bh.to(tl.int64) * Dk + offs_k
    if HAS_DST:
        r = tl.load(DST + st_off, mask=kv_ok, other=0.0).to(tl.float32)
    else:
        r = tl.zeros([BK, BV], tl.float32)
    if HAS_DZT:
        rz = tl.load(DZT + z_off, mask=offs_k < Dk, other=0.0).to(tl.float32)
    else:
        rz = tl.zeros([BK], tl.float32)
    q_base = Q + b.to(tl.int64) * T * H * Dk + h * Dk
    do_base = DO + b.to(tl.int64) * T * H * Dv + h * Dv
    hr_base = HR + bh.to(tl.int64) * NT * Dk * Dv + offs_k[:, None] * Dv + offs_v[None, :]
    hrz_base = HRZ + bh.to(tl.int64) * NT * Dk + offs_k
    rows0 = tl.arange(0, C)
    for i in range(0, NT):
        n = NT - 1 - i
        tl.store(hr_base + n * Dk * Dv, r, mask=kv_ok)
        if iv == 0:
            tl.store(hrz_base + n * Dk, rz, mask=offs_k < Dk)
        rows = n * C + rows0
        fq, _ = _load_feat(q_base, rows, offs_k, T, Dk, H * Dk, FEATURE)
        gg = tl.load(do_base + rows[:, None].to(tl.int64) * H * Dv + offs_v[None, :], mask=(rows[:, None] < T) & (offs_v[None, :] < Dv), other=0.0)
        dt = gg.dtype
        if NORMALIZE:
            rd = tl.load(RDEN + b.to(tl.int64) * T * H + rows.to(tl.int64) * H + h, mask=rows < T, other=0.0)
            gdv = tl.load(GD + b.to(tl.int64) * T * H + rows.to(tl.int64) * H + h, mask=rows < T, other=0.0)
            gn = (gg.to(tl.float32) * rd[:, None]).to(dt)
            rz += tl.sum(fq * gdv[:, None], 0)
        else:
            gn = gg
        r += _dot(tl.trans(fq.to(dt)), gn, IEEE)
    if STORE_D0:
        tl.store(DS0 + st_off, r, mask=kv_ok)
        if iv == 0:
            tl.store(DZ0 + z_off, rz, mask=offs_k < Dk)


@triton.jit
def _la_dqkv(
    Q, K, V, DO, RDEN, GD, HS, HZ, HR, HRZ, DQ, DK, DV,
    T, NT, H, Dk, Dv,
    C: tl.constexpr, BDK: tl.constexpr, BV: tl.constexpr, FEATURE: tl.constexpr,
    NORMALIZE: tl.constexpr, IEEE: tl.constexpr, SBF16: tl.constexpr,
):
    n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_k = tl.arange(0, BDK)
    k_ok = offs_k < Dk
    rows = n * C + tl.arange(0, C)
    r_ok = rows < T
    causal = rows[:, None] >= rows[None, :]
    qk_off = b.to(tl.int64) * T * H * Dk + h * Dk
    v_off = b.to(tl.int64) * T * H * Dv + h * Dv
    dt = V.dtype.element_ty
    # φ(q), φ(k) kept in the input dtype (registers are the limit here); the raw values are
    # reloaded for φ' at the end.
    fq = _load_feat(Q + qk_off, rows, offs_k, T, Dk, H * Dk, FEATURE)[0].to(dt)
    fk = _load_feat(K + qk_off, rows, offs_k, T, Dk, H * Dk, FEATURE)[0].to(dt)
    a = tl.where(causal, _dot(fq, tl.trans(fk), IEEE), 0.0)
    dp = tl.zeros([C, C], tl.float32)
    dfq = tl.zeros([C, BDK], tl.float32)
    dfk = tl.zeros([C, BDK], tl.float32)
    if NORMALIZE:
        rd = tl.load(RDEN + b.to(tl.int64) * T * H + rows.to(tl.int64) * H + h, mask=r_ok, other=0.0)
        gdv = tl.load(GD + b.to(tl.int64) * T * H + rows.to(tl.int64) * H + h, mask=r_ok, other=0.0)
    st_base = (bh.to(tl.int64) * NT + n) * Dk * Dv
    for iv in range(0, tl.cdiv(Dv, BV)):
        offs_v = iv * BV + tl.arange(0, BV)
        tv_ok = r_ok[:, None] & (offs_v[None, :] < Dv)
        kv_ok = k_ok[:, None] & (offs_v[None, :] < Dv)
        vv = tl.load(V + v_off + rows[:, None].to(tl.int64) * H * Dv + offs_v[None, :], mask=tv_ok, other=0.0)
        gg = tl.load(DO + v_off + rows[:, None].to(tl.int64) * H * Dv + offs_v[None, :], mask=tv_ok, other=0.0).to(tl.float32)
        if NORMALIZE:
            gg = gg * rd[:, None]
        s = tl.load(HS + st_base + offs_k[:, None] * Dv + offs_v[None, :], mask=kv_ok, other=0.0)
        r = tl.load(HR + st_base + offs_k[:, None] * Dv + offs_v[None, :], mask=kv_ok, other=0.0)
        dp += _dot(gg.to(dt), tl.trans(vv), IEEE)
        dfq += _sdot(gg, tl.trans(s), IEEE, SBF16)
        dfk += _sdot(vv, tl.trans(r), IEEE, SBF16)
        dv = _dot(tl.trans(a).to(dt), gg.to(dt), IEEE) + _sdot(fk, r, IEEE, SBF16)
        tl.store(DV + v_off + rows[:, None].to(tl.int64) * H * Dv + offs_v[None, :], dv.to(DV.dtype.element_ty), mask=tv_ok)
    if NORMALIZE:
        dp += gdv[:, None]
        z = tl.load(HZ + (bh.to(tl.int64) * NT + n) * Dk + offs_k, mask=k_ok, other=0.0)
        dfq += gdv[:, None] * z[None, :]
    rz = tl.load(HRZ + (bh.to(tl.int64) * NT + n) * Dk + offs_k, mask=k_ok, other=0.0)
    dfk += rz[None, :]
    dp = tl.where(causal, dp, 0.0)
    dfq += _dot(dp.to(dt), fk, IEEE)
    dfk += _dot(tl.trans(dp).to(dt), fq, IEEE)
    m = r_ok[:, None] & k_ok[None, :]
    if FEATURE != 0:
        dfq = dfq * _dphi(_load_rows(Q + qk_off, rows, offs_k, T, Dk, H * Dk), FEATURE)
        dfk = dfk * _dphi(_load_rows(K + qk_off, rows, offs_k, T, Dk, H * Dk), FEATURE)
    tl.store(DQ + qk_off + rows[:, None].to(tl.int64) * H * Dk + offs_k[None, :], dfq.to(DQ.dtype.element_ty), mask=m)
    tl.store(DK + qk_off + rows[:, None].to(tl.int64) * H * Dk + offs_k[None, :], dfk.to(DK.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------
# BASED's 2nd-order Taylor map, features on the fly. Internal state rows (padded, F = 1+BD+BD²):
# [0] the constant feature, [1, 1+BD) the linear ones, [1+BD, F) the quadratic ones (i*BD + j).
# External states ([B, H, 1+d+d², Dv]) use the reference's rows 0, 1+i, 1+d+i*d+j.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _taylor_ext_rows(d, BD: tl.constexpr):
    """Row offsets and masks of the linear and quadratic parts in an external state (width d)."""
    i1 = tl.arange(0, BD)
    i2 = tl.arange(0, BD * BD)
    a = i2 // BD
    c = i2 % BD
    return 1 + i1, i1 < d, 1 + d + a * d + c, (a < d) & (c < d)


@triton.jit
def _taylor_load_ext(S, Z, bh, d, F, Dv, offs_v, BD: tl.constexpr):
    r1, m1, r2, m2 = _taylor_ext_rows(d, BD)
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
def _taylor_store_ext(S, Z, bh, d, F, Dv, offs_v, s0, s1, s2, z0, z1, z2, STORE_Z, BD: tl.constexpr):
    r1, m1, r2, m2 = _taylor_ext_rows(d, BD)
    v_ok = offs_v < Dv
    sb = S + bh.to(tl.int64) * F * Dv
    tl.store(sb + offs_v, s0, mask=v_ok)
    tl.store(sb + r1[:, None] * Dv + offs_v[None, :], s1, mask=m1[:, None] & v_ok[None, :])
    tl.store(sb + r2[:, None] * Dv + offs_v[None, :], s2, mask=m2[:, None] & v_ok[None, :])
    if STORE_Z:
        zb = Z + bh.to(tl.int64) * F
        tl.store(zb, z0)
        tl.store(zb + r1, z1, mask=m1)
        tl.store(zb + r2, z2, mask=m2)


@triton.jit
def _taylor_store_int(HS, HZ, idx, FP, Dv, offs_v, s0, s1, s2, z0, z1, z2, STORE_Z, BD: tl.constexpr):
    """Store a state into the padded internal buffer slot ``idx`` ([.., FP, Dv] and [.., FP])."""
    i1 = tl.arange(0, BD)
    i2 = tl.arange(0, BD * BD)
    v_ok = offs_v < Dv
    hb = HS + idx * FP * Dv
    tl.store(hb + offs_v, s0, mask=v_ok)
    tl.store(hb + (1 + i1[:, None]) * Dv + offs_v[None, :], s1, mask=v_ok[None, :])
    tl.store(hb + (1 + BD + i2[:, None]) * Dv + offs_v[None, :], s2, mask=v_ok[None, :])
    if STORE_Z:
        zb = HZ + idx * FP
        tl.store(zb, z0)
        tl.store(zb + 1 + i1, z1)
        tl.store(zb + 1 + BD + i2, z2)


@triton.jit
def _taylor_load_int(HS, HZ, idx, FP, Dv, offs_v, BD: tl.constexpr):
    i1 = tl.arange(0, BD)
    i2 = tl.arange(0, BD * BD)
    v_ok = offs_v < Dv
    hb = HS + idx * FP * Dv
    s0 = tl.load(hb + offs_v, mask=v_ok, other=0.0)
    s1 = tl.load(hb + (1 + i1[:, None]) * Dv + offs_v[None, :], mask=v_ok[None, :], other=0.0)
    s2 = tl.load(hb + (1 + BD + i2[:, None]) * Dv + offs_v[None, :], mask=v_ok[None, :], other=0.0)
    zb = HZ + idx * FP
    z0 = tl.load(zb)
    z1 = tl.load(zb + 1 + i1)
    z2 = tl.load(zb + 1 + BD + i2)
    return s0, s1, s2, z0, z1, z2


@triton.jit
def _tl_states_fwd(
    K, V, S0, Z0, HS, HZ, ST, ZT,
    T, NT, NS, H, d, Dv, c1, c2,
    C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, G: tl.constexpr,
    HAS_S0: tl.constexpr, STORE_FINAL: tl.constexpr, IEEE: tl.constexpr,
):
    iv = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    F = 1 + d + d * d
    FP = 1 + BD + BD * BD
    offs_v = iv * BV + tl.arange(0, BV)
    offs_d = tl.arange(0, BD)
    if HAS_S0:
        s0, s1, s2, z0, z1, z2 = _taylor_load_ext(S0, Z0, bh, d, F, Dv, offs_v, BD)
    else:
        s0 = tl.zeros([BV], tl.float32)
        s1 = tl.zeros([BD, BV], tl.float32)
        s2 = tl.zeros([BD * BD, BV], tl.float32)
        z0 = tl.sum(tl.zeros([BV], tl.float32), 0)
        z1 = tl.zeros([BD], tl.float32)
        z2 = tl.zeros([BD * BD], tl.float32)
    k_base = K + b.to(tl.int64) * T * H * d + h * d
    v_base = V + b.to(tl.int64) * T * H * Dv + h * Dv
    rows0 = tl.arange(0, C)
    for n in range(0, NT):
        if n % G == 0:
            _taylor_store_int(HS, HZ, bh.to(tl.int64) * NS + n // G, FP, Dv, offs_v, s0, s1, s2, z0, z1, z2, iv == 0, BD)
        rows = n * C + rows0
        xk = _load_rows(k_base, rows, offs_d, T, d, H * d)
        vv = tl.load(v_base + rows[:, None].to(tl.int64) * H * Dv + offs_v[None, :], mask=(rows[:, None] < T) & (offs_v[None, :] < Dv), other=0.0)
        dt = vv.dtype
        k1 = xk * c1
        k2 = _outer(xk, C, BD) * c2
        s0 += tl.sum(vv.to(tl.float32), 0)
        s1 += _dot(tl.trans(k1.to(dt)), vv, IEEE)
        s2 += _dot(tl.trans(k2.to(dt)), vv, IEEE)
        z0 += tl.sum(tl.where(rows < T, 1.0, 0.0), 0)
        z1 += tl.sum(k1, 0)
        z2 += tl.sum(k2, 0)
    if STORE_FINAL:
        _taylor_store_ext(ST, ZT, bh, d, F, Dv, offs_v, s0, s1, s2, z0, z1, z2, iv == 0, BD)


@triton.jit
def _tl_out_fwd(
    Q, K, V, HS, HZ, Y, DEN,
    T, NS, H, d, Dv, c1, c2, eps,
    C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, G: tl.constexpr,
    NORMALIZE: tl.constexpr, IEEE: tl.constexpr, SBF16: tl.constexpr,
):
    grp = tl.program_id(0)
    iv = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    FP = 1 + BD + BD * BD
    offs_v = iv * BV + tl.arange(0, BV)
    offs_d = tl.arange(0, BD)
    s0, s1, s2, z0, z1, z2 = _taylor_load_int(HS, HZ, bh.to(tl.int64) * NS + grp, FP, Dv, offs_v, BD)
    qk_off = b.to(tl.int64) * T * H * d + h * d
    v_base = V + b.to(tl.int64) * T * H * Dv + h * Dv
    y_base = Y + b.to(tl.int64) * T * H * Dv + h * Dv
    rows0 = tl.arange(0, C)
    causal = rows0[:, None] >= rows0[None, :]
    for j in range(0, G):
        rows = (grp * G + j) * C + rows0
        r_ok = rows < T
        xq = _load_rows(Q + qk_off, rows, offs_d, T, d, H * d)
        xk = _load_rows(K + qk_off, rows, offs_d, T, d, H * d)
        vv = tl.load(v_base + rows[:, None].to(tl.int64) * H * Dv + offs_v[None, :], mask=r_ok[:, None] & (offs_v[None, :] < Dv), other=0.0)
        dt = vv.dtype
        sc = _dot(xq.to(dt), tl.trans(xk.to(dt)), IEEE)
        a = tl.where(causal, 1.0 + sc * (c1 * c1) + sc * sc * (c2 * c2), 0.0)
        q1 = xq * c1
        q2 = _outer(xq, C, BD) * c2
        num = _dot(a.to(dt), vv, IEEE) + s0[None, :] + _sdot(q1, s1, IEEE, SBF16) + _sdot(q2, s2, IEEE, SBF16)
        if NORMALIZE:
            den = tl.sum(a, 1) + z0 + tl.sum(q1 * z1[None, :], 1) + tl.sum(q2 * z2[None, :], 1)
            num = num / (den + eps)[:, None]
            if iv == 0:
                tl.store(DEN + b.to(tl.int64) * T * H + rows.to(tl.int64) * H + h, den, mask=r_ok)
        tl.store(y_base + rows[:, None].to(tl.int64) * H * Dv + offs_v[None, :], num.to(Y.dtype.element_ty), mask=r_ok[:, None] & (offs_v[None, :] < Dv))
        if j + 1 < G:
            k1 = xk * c1
            k2 = _outer(xk, C, BD) * c2
            s0 += tl.sum(vv.to(tl.float32), 0)
            s1 += _dot(tl.trans(k1.to(dt)), vv, IEEE)
            s2 += _dot(tl.trans(k2.to(dt)), vv, IEEE)
            z0 += tl.sum(tl.where(r_ok, 1.0, 0.0), 0)
            z1 += tl.sum(k1, 0)
            z2 += tl.sum(k2, 0)


@triton.jit
def _tl_states_bwd(
    Q, DO, RDEN, GD, DST, DZT, HR, HRZ, DS0, DZ0,
    T, NT, H, d, Dv, c1, c2,
    C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_DST: tl.constexpr, HAS_DZT: tl.constexpr, STORE_D0: tl.constexpr, IEEE: tl.constexpr,
):
    iv = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    F = 1 + d + d * d
    FP = 1 + BD + BD * BD
    offs_v = iv * BV + tl.arange(0, BV)
    offs_d = tl.arange(0, BD)
    if HAS_DST:
        r0, r1, r2, u0, u1, u2 = _taylor_load_ext(DST, DZT, bh, d, F, Dv, offs_v, BD)
    else:
        r0 = tl.zeros([BV], tl.float32)
        r1 = tl.zeros([BD, BV], tl.float32)
        r2 = tl.zeros([BD * BD, BV], tl.float32)
    if not HAS_DZT:
        u0 = tl.sum(tl.zeros([BV], tl.float32), 0)
        u1 = tl.zeros([BD], tl.float32)
        u2 = tl.zeros([BD * BD], tl.float32)
    q_base = Q + b.to(tl.int64) * T * H * d + h * d
    do_base = DO + b.to(tl.int64) * T * H * Dv + h * Dv
    rows0 = tl.arange(0, C)
    for i in range(0, NT):
        n = NT - 1 - i
        _taylor_store_int(HR, HRZ, bh.to(tl.int64) * NT + n, FP, Dv, offs_v, r0, r1, r2, u0, u1, u2, iv == 0, BD)
        rows = n * C + rows0
        xq = _load_rows(q_base, rows, offs_d, T, d, H * d)
        gg = tl.load(do_base + rows[:, None].to(tl.int64) * H * Dv + offs_v[None, :], mask=(rows[:, None] < T) & (offs_v[None, :] < Dv), other=0.0)
        dt = gg.dtype
        q1 = xq * c1
        q2 = _outer(xq, C, BD) * c2
        if NORMALIZE:
            rd = tl.load(RDEN + b.to(tl.int64) * T * H + rows.to(tl.int64) * H + h, mask=rows < T, other=0.0)
            gdv = tl.load(GD + b.to(tl.int64) * T * H + rows.to(tl.int64) * H + h, mask=rows < T, other=0.0)
            gn = gg.to(tl.float32) * rd[:, None]
            u0 += tl.sum(gdv, 0)
            u1 += tl.sum(q1 * gdv[:, None], 0)
            u2 += tl.sum(q2 * gdv[:, None], 0)
        else:
            gn = gg.to(tl.float32)
        r0 += tl.sum(gn, 0)
        r1 += _dot(tl.trans(q1.to(dt)), gn.to(dt), IEEE)
        r2 += _dot(tl.trans(q2.to(dt)), gn.to(dt), IEEE)
    if STORE_D0:
        _taylor_store_ext(DS0, DZ0, bh, d, F, Dv, offs_v, r0, r1, r2, u0, u1, u2, iv == 0, BD)


@triton.jit
def _tl_dqkv(
    Q, K, V, DO, RDEN, GD, HS, HZ, HR, HRZ, DQ, DK, DV,
    T, NT, H, d, Dv, c1, c2,
    C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    NORMALIZE: tl.constexpr, IEEE: tl.constexpr, SBF16: tl.constexpr,
):
    n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    FP = 1 + BD + BD * BD
    offs_d = tl.arange(0, BD)
    i1 = tl.arange(0, BD)
    i2 = tl.arange(0, BD * BD)
    rows = n * C + tl.arange(0, C)
    r_ok = rows < T
    causal = rows[:, None] >= rows[None, :]
    qk_off = b.to(tl.int64) * T * H * d + h * d
    v_off = b.to(tl.int64) * T * H * Dv + h * Dv
    xq = _load_rows(Q + qk_off, rows, offs_d, T, d, H * d)
    xk = _load_rows(K + qk_off, rows, offs_d, T, d, H * d)
    dt = V.dtype.element_ty
    sc = _dot(xq.to(dt), tl.trans(xk.to(dt)), IEEE)
    a = tl.where(causal, 1.0 + sc * (c1 * c1) + sc * sc * (c2 * c2), 0.0)
    k1 = (xk * c1).to(dt)
    k2 = (_outer(xk, C, BD) * c2).to(dt)
    dp = tl.zeros([C, C], tl.float32)
    dq = tl.zeros([C, BD], tl.float32)
    dk = tl.zeros([C, BD], tl.float32)
    if NORMALIZE:
        rd = tl.load(RDEN + b.to(tl.int64) * T * H + rows.to(tl.int64) * H + h, mask=r_ok, other=0.0)
        gdv = tl.load(GD + b.to(tl.int64) * T * H + rows.to(tl.int64) * H + h, mask=r_ok, other=0.0)
    idx = bh.to(tl.int64) * NT + n
    for iv in range(0, tl.cdiv(Dv, BV)):
        offs_v = iv * BV + tl.arange(0, BV)
        v_ok = offs_v < Dv
        tv_ok = r_ok[:, None] & v_ok[None, :]
        vv = tl.load(V + v_off + rows[:, None].to(tl.int64) * H * Dv + offs_v[None, :], mask=tv_ok, other=0.0)
        gg = tl.load(DO + v_off + rows[:, None].to(tl.int64) * H * Dv + offs_v[None, :], mask=tv_ok, other=0.0).to(tl.float32)
        if NORMALIZE:
            gg = gg * rd[:, None]
        hb = HS + idx * FP * Dv
        s1 = tl.load(hb + (1 + i1[:, None]) * Dv + offs_v[None, :], mask=v_ok[None, :], other=0.0)
        s2 = tl.load(hb + (1 + BD + i2[:, None]) * Dv + offs_v[None, :], mask=v_ok[None, :], other=0.0)
        rb = HR + idx * FP * Dv
        r0 = tl.load(rb + offs_v, mask=v_ok, other=0.0)
        r1 = tl.load(rb + (1 + i1[:, None]) * Dv + offs_v[None, :], mask=v_ok[None, :], other=0.0)
        r2 = tl.load(rb + (1 + BD + i2[:, None]) * Dv + offs_v[None, :], mask=v_ok[None, :], other=0.0)
        vf = vv.to(tl.float32)
        dp += _dot(gg.to(dt), tl.trans(vv), IEEE)
        dq += c1 * _sdot(gg, tl.trans(s1), IEEE, SBF16) + c2 * _outer_bwd(_sdot(gg, tl.trans(s2), IEEE, SBF16), xq, C, BD)
        dk += c1 * _sdot(vf, tl.trans(r1), IEEE, SBF16) + c2 * _outer_bwd(_sdot(vf, tl.trans(r2), IEEE, SBF16), xk, C, BD)
        dv = _dot(tl.trans(a).to(dt), gg.to(dt), IEEE) + r0[None, :] + _sdot(k1, r1, IEEE, SBF16) + _sdot(k2, r2, IEEE, SBF16)
        tl.store(DV + v_off + rows[:, None].to(tl.int64) * H * Dv + offs_v[None, :], dv.to(DV.dtype.element_ty), mask=tv_ok)
    if NORMALIZE:
        dp += gdv[:, None]
        z1 = tl.load(HZ + idx * FP + 1 + i1)
        z2 = tl.load(HZ + idx * FP + 1 + BD + i2)
        dq += c1 * gdv[:, None] * z1[None, :] + c2 * _outer_bwd(gdv[:, None] * z2[None, :], xq, C, BD)
    u1 = tl.load(HRZ + idx * FP + 1 + i1)
    u2 = tl.load(HRZ + idx * FP + 1 + BD + i2)
    dk += c1 * u1[None, :] + c2 * _outer_bwd(u2[None, :] + tl.zeros([C, BD * BD], tl.float32), xk, C, BD)
    dp = tl.where(causal, dp, 0.0)
    ds = dp * (c1 * c1 + 2.0 * (c2 * c2) * sc)
    dq += _dot(ds.to(dt), xk.to(dt), IEEE)
    dk += _dot(tl.trans(ds).to(dt), xq.to(dt), IEEE)
    m = r_ok[:, None] & (offs_d[None, :] < d)
    tl.store(DQ + qk_off + rows[:, None].to(tl.int64) * H * d + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=m)
    tl.store(DK + qk_off + rows[:, None].to(tl.int64) * H * d + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------
# One-token decode step: S' = S + φ(k) vᵀ, z' = z + φ(k), y = φ(q)ᵀ S' / (φ(q)ᵀ z' + ε)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _la_step(
    Q, K, V, S, Z, Y, SO, ZO, H, Dk, Dv, eps,
    BDK: tl.constexpr, BV: tl.constexpr, FEATURE: tl.constexpr, NORMALIZE: tl.constexpr,
):
    # q/k/v: [B, H, D] contiguous; S/SO: [B, H, Dk, Dv]; SO may be S (in place: each element is
    # read and written by the same program).
    iv = tl.program_id(0)
    bh = tl.program_id(1)
    offs_k = tl.arange(0, BDK)
    offs_v = iv * BV + tl.arange(0, BV)
    k_ok = offs_k < Dk
    v_ok = offs_v < Dv
    xq = tl.load(Q + bh.to(tl.int64) * Dk + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    xk = tl.load(K + bh.to(tl.int64) * Dk + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    fq = tl.where(k_ok, _phi(xq, FEATURE), 0.0)
    fk = tl.where(k_ok, _phi(xk, FEATURE), 0.0)
    vv = tl.load(V + bh.to(tl.int64) * Dv + offs_v, mask=v_ok, other=0.0).to(tl.float32)
    off = bh.to(tl.int64) * Dk * Dv + offs_k[:, None] * Dv + offs_v[None, :]
    kv_ok = k_ok[:, None] & v_ok[None, :]
    s = tl.load(S + off, mask=kv_ok, other=0.0) + fk[:, None] * vv[None, :]
    z = tl.load(Z + bh.to(tl.int64) * Dk + offs_k, mask=k_ok, other=0.0) + fk
    y = tl.sum(fq[:, None] * s, 0)
    if NORMALIZE:
        y = y / (tl.sum(fq * z, 0) + eps)
    tl.store(Y + bh.to(tl.int64) * Dv + offs_v, y.to(Y.dtype.element_ty), mask=v_ok)
    tl.store(SO + off, s, mask=kv_ok)
    if iv == 0:
        tl.store(ZO + bh.to(tl.int64) * Dk + offs_k, z, mask=k_ok)


@triton.jit
def _tl_step(
    Q, K, V, S, Z, Y, SO, ZO, H, d, Dv, c1, c2, eps,
    BD: tl.constexpr, BV: tl.constexpr, NORMALIZE: tl.constexpr,
):
    iv = tl.program_id(0)
    bh = tl.program_id(1)
    F = 1 + d + d * d
    offs_d = tl.arange(0, BD)
    offs_v = iv * BV + tl.arange(0, BV)
    xq = tl.load(Q + bh.to(tl.int64) * d + offs_d, mask=offs_d < d, other=0.0).to(tl.float32)
    xk = tl.load(K + bh.to(tl.int64) * d + offs_d, mask=offs_d < d, other=0.0).to(tl.float32)
    vv = tl.load(V + bh.to(tl.int64) * Dv + offs_v, mask=offs_v < Dv, other=0.0).to(tl.float32)
    s0, s1, s2, z0, z1, z2 = _taylor_load_ext(S, Z, bh, d, F, Dv, offs_v, BD)
    k1 = xk * c1
    k2 = tl.reshape(xk[:, None] * xk[None, :], (BD * BD,)) * c2
    q1 = xq * c1
    q2 = tl.reshape(xq[:, None] * xq[None, :], (BD * BD,)) * c2
    s0 += vv
    s1 += k1[:, None] * vv[None, :]
    s2 += k2[:, None] * vv[None, :]
    z0 += 1.0
    z1 += k1
    z2 += k2
    y = s0 + tl.sum(q1[:, None] * s1, 0) + tl.sum(q2[:, None] * s2, 0)
    if NORMALIZE:
        y = y / (z0 + tl.sum(q1 * z1, 0) + tl.sum(q2 * z2, 0) + eps)
    tl.store(Y + bh.to(tl.int64) * Dv + offs_v, y.to(Y.dtype.element_ty), mask=offs_v < Dv)
    _taylor_store_ext(SO, ZO, bh, d, F, Dv, offs_v, s0, s1, s2, z0, z1, z2, iv == 0, BD)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------

# MNEMO_AUTOTUNE=0 skips tuning on CUDA (fixed launch parameters).
_AUTOTUNE = os.environ.get("MNEMO_AUTOTUNE", "1") != "0"
_KEYS = ["Dk", "Dv", "C"]


def _cfgs(bvs, warps=(4, 8), stages=(2, 3)):
    return [triton.Config({"BV": bv}, num_warps=w, num_stages=s) for bv in bvs for w in warps for s in stages]


_la_states_fwd_t = triton.autotune(_cfgs((32, 64)), key=_KEYS + ["BK", "G", "FEATURE", "IEEE"])(_la_states_fwd)
_la_out_fwd_t = triton.autotune(_cfgs((32, 64)), key=_KEYS + ["BDK", "G", "FEATURE", "NORMALIZE", "IEEE"])(_la_out_fwd)
_la_states_bwd_t = triton.autotune(_cfgs((32, 64)), key=_KEYS + ["BK", "FEATURE", "NORMALIZE", "IEEE"])(_la_states_bwd)
_la_dqkv_t = triton.autotune(_cfgs((32, 64), stages=(1, 2)), key=_KEYS + ["BDK", "FEATURE", "NORMALIZE", "IEEE"])(_la_dqkv)
_TKEYS = ["d", "Dv", "C"]
_tl_states_fwd_t = triton.autotune(_cfgs((16, 32, 64)), key=_TKEYS + ["G", "IEEE"])(_tl_states_fwd)
_tl_out_fwd_t = triton.autotune(_cfgs((16, 32, 64)), key=_TKEYS + ["G", "NORMALIZE", "IEEE"])(_tl_out_fwd)
_tl_states_bwd_t = triton.autotune(_cfgs((16, 32, 64)), key=_TKEYS + ["NORMALIZE", "IEEE"])(_tl_states_bwd)
_tl_dqkv_t = triton.autotune(_cfgs((16, 32, 64), stages=(1, 2)), key=_TKEYS + ["NORMALIZE", "IEEE"])(_tl_dqkv)


def _launch(plain, tuned, grid, args, meta, device, bv_cpu: int):
    """Autotuned on CUDA; fixed small tiles elsewhere (the CPU interpreter)."""
    if device.type == "cuda" and _AUTOTUNE:
        tuned[grid](*args, **meta)
    else:
        meta = dict(meta, BV=bv_cpu)
        plain[grid](*args, **meta, num_warps=4, num_stages=2)


def _alloc(shape, like: Tensor, dtype: torch.dtype) -> Tensor:
    """Output buffers; NaN-filled when MNEMO_POISON=1 (tests) so unwritten elements fail."""
    if os.environ.get("MNEMO_POISON") == "1":
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def _bdk(dk: int) -> int:
    return max(16, triton.next_power_of_2(dk))


def _taylor_consts(d: int) -> tuple[float, float]:
    return d**-0.25, 1.0 / math.sqrt(2.0 * d)


def _fdim(feature: int, dk: int) -> int:
    return 1 + dk + dk * dk if feature == TAYLOR else dk


# ---------------------------------------------------------------------------------------------
# Forward / backward implementations
# ---------------------------------------------------------------------------------------------


def _states_fwd(k, v, s0, z0, feature, chunk, group, store_final):
    """Run the forward state pass; returns (HS, HZ, S_T, z_T) (S_T, z_T empty unless store_final)."""
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    nt = triton.cdiv(t, chunk)
    ns = triton.cdiv(nt, group)
    ieee = k.dtype == torch.float32
    has_s0 = s0 is not None
    if feature == TAYLOR:
        fp = 1 + TBD + TBD * TBD
        hs = _alloc((b * h, ns, fp, dv), k, torch.float32)
        hz = _alloc((b * h, ns, fp), k, torch.float32)
    else:
        hs = _alloc((b * h, ns, dk, dv), k, torch.float32)
        hz = _alloc((b * h, ns, dk), k, torch.float32)
    fd = _fdim(feature, dk)
    st = _alloc((b, h, fd, dv), k, torch.float32) if store_final else hs  # hs: a never-written placeholder
    zt = _alloc((b, h, fd), k, torch.float32) if store_final else hz
    s0a = s0 if has_s0 else hs
    z0a = z0 if has_s0 else hz
    if feature == TAYLOR:
        c1, c2 = _taylor_consts(dk)
        args = (k, v, s0a, z0a, hs, hz, st, zt, t, nt, ns, h, dk, dv, c1, c2)
        meta = dict(C=chunk, BD=TBD, G=group, HAS_S0=has_s0, STORE_FINAL=store_final, IEEE=ieee)
        _launch(_tl_states_fwd, _tl_states_fwd_t, lambda m: (triton.cdiv(dv, m["BV"]), b * h), args, meta, k.device, 16)
    else:
        bk = min(64, _bdk(dk))
        args = (k, v, s0a, z0a, hs, hz, st, zt, t, nt, ns, h, dk, dv)
        meta = dict(C=chunk, BK=bk, G=group, FEATURE=feature, HAS_S0=has_s0, STORE_FINAL=store_final, IEEE=ieee)
        _launch(_la_states_fwd, _la_states_fwd_t, lambda m: (triton.cdiv(dk, bk) * triton.cdiv(dv, m["BV"]), b * h), args, meta, k.device, 16)
    return hs, hz, st, zt


def _fwd_impl(q, k, v, s0, z0, feature, normalize, eps, chunk, group):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    nt = triton.cdiv(t, chunk)
    group = max(1, min(group, nt))
    ns = triton.cdiv(nt, group)
    hs, hz, st, zt = _states_fwd(k, v, s0, z0, feature, chunk, group, True)
    y = _alloc((b, t, h, dv), q, q.dtype)
    den = _alloc((b, t, h), q, torch.float32) if normalize else q.new_empty(0, dtype=torch.float32)
    den_arg = den if normalize else hz  # never written without normalisation
    ieee = q.dtype == torch.float32
    if feature == TAYLOR:
        c1, c2 = _taylor_consts(dk)
        args = (q, k, v, hs, hz, y, den_arg, t, ns, h, dk, dv, c1, c2, eps)
        meta = dict(C=chunk, BD=TBD, G=group, NORMALIZE=normalize, IEEE=ieee, SBF16=q.dtype == torch.bfloat16)
        _launch(_tl_out_fwd, _tl_out_fwd_t, lambda m: (ns, triton.cdiv(dv, m["BV"]), b * h), args, meta, q.device, 16)
    else:
        args = (q, k, v, hs, hz, y, den_arg, t, ns, h, dk, dv, eps)
        meta = dict(C=chunk, BDK=_bdk(dk), G=group, FEATURE=feature, NORMALIZE=normalize, IEEE=ieee, SBF16=q.dtype == torch.bfloat16)
        _launch(_la_out_fwd, _la_out_fwd_t, lambda m: (ns, triton.cdiv(dv, m["BV"]), b * h), args, meta, q.device, 16)
    return y, st, zt, den


def _bwd_impl(dy, q, k, v, y, den, s0, z0, dst, dzt, feature, normalize, eps, chunk, need_d0):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    nt = triton.cdiv(t, chunk)
    dy = dy.contiguous()
    ieee = q.dtype == torch.float32
    if normalize:
        rden = 1.0 / (den + eps)
        gd = -(dy.float() * y.float()).sum(-1) * rden
    hs, hz, _, _ = _states_fwd(k, v, s0, z0, feature, chunk, 1, False)
    if not normalize:
        rden = gd = hz  # never read (a real buffer, so every pointer argument is valid)
    fd = _fdim(feature, dk)
    if feature == TAYLOR:
        fp = 1 + TBD + TBD * TBD
        hr = _alloc((b * h, nt, fp, dv), q, torch.float32)
        hrz = _alloc((b * h, nt, fp), q, torch.float32)
    else:
        hr = _alloc((b * h, nt, dk, dv), q, torch.float32)
        hrz = _alloc((b * h, nt, dk), q, torch.float32)
    ds0 = _alloc((b, h, fd, dv), q, torch.float32) if need_d0 else hr.new_empty(0)
    dz0 = _alloc((b, h, fd), q, torch.float32) if need_d0 else hr.new_empty(0)
    ds0_arg, dz0_arg = (ds0, dz0) if need_d0 else (hr, hrz)  # placeholders are never written
    has_dst, has_dzt = dst is not None, dzt is not None
    dsta = dst.contiguous() if has_dst else hr
    dzta = dzt.contiguous() if has_dzt else hrz
    dq = _alloc(q.shape, q, q.dtype)
    dk_ = _alloc(k.shape, q, k.dtype)
    dv_ = _alloc(v.shape, q, v.dtype)
    if feature == TAYLOR:
        c1, c2 = _taylor_consts(dk)
        if has_dst != has_dzt:  # the Taylor kernels load (or skip) both parts together
            dsta = dst.contiguous() if has_dst else torch.zeros(b, h, fd, dv, device=q.device)
            dzta = dzt.contiguous() if has_dzt else torch.zeros(b, h, fd, device=q.device)
            has_dst = has_dzt = True
        args = (q, dy, rden, gd, dsta, dzta, hr, hrz, ds0_arg, dz0_arg, t, nt, h, dk, dv, c1, c2)
        meta = dict(C=chunk, BD=TBD, NORMALIZE=normalize, HAS_DST=has_dst, HAS_DZT=has_dzt, STORE_D0=need_d0, IEEE=ieee)
        _launch(_tl_states_bwd, _tl_states_bwd_t, lambda m: (triton.cdiv(dv, m["BV"]), b * h), args, meta, q.device, 16)
        args = (q, k, v, dy, rden, gd, hs, hz, hr, hrz, dq, dk_, dv_, t, nt, h, dk, dv, c1, c2)
        meta = dict(C=chunk, BD=TBD, NORMALIZE=normalize, IEEE=ieee, SBF16=q.dtype == torch.bfloat16)
        _launch(_tl_dqkv, _tl_dqkv_t, (nt, b * h), args, meta, q.device, 16)
    else:
        bk = min(64, _bdk(dk))
        args = (q, dy, rden, gd, dsta, dzta, hr, hrz, ds0_arg, dz0_arg, t, nt, h, dk, dv)
        meta = dict(C=chunk, BK=bk, FEATURE=feature, NORMALIZE=normalize, HAS_DST=has_dst, HAS_DZT=has_dzt, STORE_D0=need_d0, IEEE=ieee)
        _launch(_la_states_bwd, _la_states_bwd_t, lambda m: (triton.cdiv(dk, bk) * triton.cdiv(dv, m["BV"]), b * h), args, meta, q.device, 16)
        args = (q, k, v, dy, rden, gd, hs, hz, hr, hrz, dq, dk_, dv_, t, nt, h, dk, dv)
        meta = dict(C=chunk, BDK=_bdk(dk), FEATURE=feature, NORMALIZE=normalize, IEEE=ieee, SBF16=q.dtype == torch.bfloat16)
        _launch(_la_dqkv, _la_dqkv_t, (nt, b * h), args, meta, q.device, 16)
    return dq, dk_, dv_, ds0, dz0


# ---------------------------------------------------------------------------------------------
# custom ops + autograd
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("mnemotorch::linear_attn_fwd", mutates_args=())
def linear_attn_fwd(
    q: Tensor, k: Tensor, v: Tensor, s0: Optional[Tensor], z0: Optional[Tensor],
    feature: int, normalize: bool, eps: float, chunk: int, group: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y [B, T, H, Dv], S_T [B, H, Dφ, Dv] fp32, z_T [B, H, Dφ] fp32, den [B, T, H] fp32 or empty)``."""
    return _fwd_impl(q, k, v, s0, z0, feature, normalize, eps, chunk, group)


@linear_attn_fwd.register_fake
def _(q, k, v, s0, z0, feature, normalize, eps, chunk, group):
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
    q, k, v, s0, z0, feature, normalize, eps, chunk, group = inputs
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
    return dq, dk, dv, (ds0 if need_d0 else None), (dz0 if need_d0 else None), None, None, None, None, None


linear_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def _step_impl(q, k, v, s, z, y, so, zo, feature, normalize, eps):
    b, h, dk = q.shape
    dv = v.shape[-1]
    bv = min(64, max(16, triton.next_power_of_2(dv)))
    grid = (triton.cdiv(dv, bv), b * h)
    if feature == TAYLOR:
        c1, c2 = _taylor_consts(dk)
        _tl_step[grid](q, k, v, s, z, y, so, zo, h, dk, dv, c1, c2, eps, BD=TBD, BV=bv, NORMALIZE=normalize, num_warps=4)
    else:
        _la_step[grid](q, k, v, s, z, y, so, zo, h, dk, dv, eps, BDK=_bdk(dk), BV=bv, FEATURE=feature, NORMALIZE=normalize, num_warps=4)


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


def linear_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    feature: str = "elu_plus_one",
    normalize: bool = True,
    initial_state: tuple[Tensor, Tensor] | None = None,
    eps: float = 1e-6,
    chunk_size: int = DEFAULT_CHUNK,
    group: int | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Chunked causal linear attention through the Triton kernels (forward and backward).

    Args:
        q: ``[B, T, H, Dk]`` raw queries (φ is applied inside the kernel).
        k: ``[B, T, H, Dk]`` raw keys.
        v: ``[B, T, H, Dv]`` values.
        feature: ``"identity"``, ``"elu_plus_one"``, ``"relu"`` (``Dk ≤ 128``) or ``"taylor"``
            (BASED, ``Dk = d ≤ 16``; the ``1 + d + d²`` features are never materialised).
        normalize: divide by ``φ(q_t)ᵀ z_t + ε``.
        initial_state: ``(S0 [B, H, Dφ, Dv], z0 [B, H, Dφ])`` (any float dtype; used in fp32).
        eps: ε of the denominator (added to the fp32 denominator).
        chunk_size: 16, 32, 64 or 128 (other values run with 64; see :func:`kernel_chunk`).
        group: chunks per stored forward state (default 1; see the module docstring).

    Returns:
        ``(y [B, T, H, Dv] in q's dtype, (S_T [B, H, Dφ, Dv], z_T [B, H, Dφ]) in float32)``.
    """
    fn = "linear_attention_triton"
    reason = kernel_support(fn, q, k, v, feature)
    if reason is not None:
        raise (NotImplementedError if q.dtype not in KERNEL_DTYPES else ValueError)(reason)
    if not (q.shape == k.shape and q.shape[:3] == v.shape[:3]):
        raise ValueError(f"{fn}: q {list(q.shape)}, k {list(k.shape)} must match and share [B, T, H] with v {list(v.shape)}")
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
        return v.new_zeros(v.shape), (s0, z0)
    if group is None:
        # G > 1 carries the state through the output kernel's chunk loop, which spills registers
        # at D = 128 (ptxas, sm_90); the tests run G = 1 and G = 2.
        group = 1
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    y, st, zt, _ = linear_attn_fwd(q, k, v, s0, z0, fid, bool(normalize), float(eps), kernel_chunk(chunk_size), int(group))
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
    else:
        s, z = _check_state(fn, state, b, h, fd, v.shape[-1], q.device)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if inplace:
        return linear_attn_step_(q, k, v, s, z, fid, bool(normalize), float(eps)), (s, z)
    y, s2, z2 = linear_attn_step(q, k, v, s, z, fid, bool(normalize), float(eps))
    return y, (s2, z2)
