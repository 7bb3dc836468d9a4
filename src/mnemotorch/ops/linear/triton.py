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

* forward, two launches: (1) ``*_fwd_states``: one program per (b·h, slice of the state) walks the
  chunks in order, keeps its slice of the running state in registers and writes the state
  *entering* every chunk to ``HS [B·H, NT, Dφ, Dv]`` (and the final state); (2) ``*_fwd_out``: one
  program per (b·h, chunk, value tile), no loop: the intra-chunk masked product plus the
  inter-chunk term ``Q_n S_n`` read from ``HS``.
  The scan is sequential in the chunks, so its parallelism is in the state slices: state tiles
  ``[BK, BV]`` for the elementwise maps (grid B·H × Dk/BK × Dv/BV, as fla's ``chunk_fwd_h``), and for
  Taylor one group of feature rows per program (the constant + linear rows, then one group per first
  index ``i`` of the ``x_i x_j`` rows: grid B·H × (1 + d) × Dv/BV), each computing only its features.
* forward, one launch (elementwise maps, ``MNEMO_LINEAR_FWD=fused``, see :func:`forward_path`):
  ``_la_fwd_fused``, one program per (b·h, value tile) keeps the whole-Dk state tile ``[Dk, BV]``
  (and ``z``) in registers and walks the chunks in order, computing each chunk's outputs from the
  state entering it (the same products as ``_la_fwd_out``) before adding the chunk to the state: no
  chunk state is written (at L = 64K, D = 128, bf16 the two-pass form writes and reads back 537 MB
  of them), at the price of B·H·Dv/BV programs only and q, k read (and ``φ(Q)φ(K)ᵀ`` computed) once
  per value tile. The backward then recomputes the chunk states with ``*_fwd_states``.
* backward, with ``r_t = 1/(den_t + ε)``, ``gn_t = r_t dy_t`` and ``gd_t = -r_t (dy_t · y_t)``
  (``gn = dy``, ``gd = 0`` when not normalised) -- normalised linear attention is unnormalised
  linear attention of the value ``[v, 1]`` --::

      dφ(q_t) = S_t gn_t + z_t gd_t,
      dφ(k_s) = R_s v_s + ρ_s,       dv_s = R_sᵀ φ(k_s),
      R_s = dS_T + Σ_{t≥s} φ(q_t) gn_tᵀ,   ρ_s = dz_T + Σ_{t≥s} φ(q_t) gd_t,
      dS_0 = R_1,   dz_0 = ρ_1.

  The two-pass forward's chunk states ``HS``/``HZ`` are kept for the backward (outputs of the forward op,
  saved by autograd; not recomputed; after the one-pass forward, which keeps none, the backward
  runs ``*_fwd_states`` once to recompute them). Then ``_row_stats_kernel`` (normalised only: ``r`` and
  ``gd`` per token), ``*_bwd_states`` (the reverse scan, split like the forward's, writing
  ``R, ρ`` entering every chunk from the right to ``HR``/``HRZ``) and the per-chunk gradients,
  looping over the value tiles: Taylor, one program per (b·h, chunk) computes dq, dk and dv
  together (they share the tiles of gn, V and the states); elementwise maps, by default two
  launches, dq + dk per (b·h, chunk, block of 64 columns of Dk) and dv per (b·h, chunk) (one
  launch for all three with ``MNEMO_LINEAR_SPLIT_GRADS=0``: at Dk = 128 it holds two ``[C, 128]``
  fp32 accumulators and was no faster on an H100 than the three kernels it replaced).
  Intra-chunk parts: ``dP = tril(gn Vᵀ + gd 1ᵀ)``, ``dφQ = dP φK + gn Sᵀ + gd zᵀ``,
  ``dφK = dPᵀ φQ + V Rᵀ + ρ``, ``dV = tril(φQ φKᵀ)ᵀ gn + φK R``, then the chain rule through φ.

Tiles are mostly loaded in the orientation each product needs (``k`` as ``[Dk, C]`` for
``φ(K)ᵀ V`` and so on); ``tl.trans`` is used for loaded state tiles and for ``dPᵀ``. Grids are
one-dimensional (no 65535 limit on B·H), global offsets are computed in int64 (B·T·H·D may exceed
2³¹), and every tile load and store that can reach past its tensor is masked.

**Feature maps in the kernel.** q and k are read raw; ``identity``, ``elu_plus_one`` (``elu(x)+1``,
derivative 1 for ``x > 0`` else ``exp(x)``) and ``relu`` are applied on the fly after each load
(padded rows/columns are zeroed after φ, since ``elu(0)+1 = 1``).

**BASED's Taylor map on the fly** (``feature="taylor"``, q/k width ``d ≤ 16``). The features
``φ(x) = [1, x c₁, vec(x⊗x) c₂]``, ``c₁ = d^{-1/4}``, ``c₂ = 1/√(2d)`` (``1 + d + d²`` = 273
numbers for d = 16) are never written to memory:

* intra-chunk, the kernel needs only ``φ(q)·φ(k) = κ(s) = 1 + c₁² s + c₂² s²`` with ``s = q·k``,
  i.e. one ``[C, d] × [d, C]`` product and an elementwise polynomial;
  its gradient is ``∂κ/∂s = c₁² + 2c₂² s``, so ``dq = (dP ⊙ κ'(s)) k`` and ``dk = (dP ⊙ κ'(s))ᵀ q``;
* inter-chunk, the state rows are taken in groups of ``d``: the linear rows (features ``c₁ x_j``)
  and, for each ``i``, the quadratic rows ``c₂ x_i x_j``: group ``g``'s features are the ``[C, d]``
  tile of x scaled per token by ``w_g`` (``c₁``, or ``c₂ x_i``), so every product with a state is a
  ``[C, d] × [d, Dv]`` (or ``[C, Dv] × [Dv, d]``) product and no ``[C, d²]`` tile exists;
* backward through the quadratic group ``i``: for ``G = ∂L/∂(c₂ x_i x_j)`` (``[C, d]``),
  ``∂L/∂x_j += G_j c₂ x_i`` and ``∂L/∂x_i += c₂ Σ_j G_j x_j``.

In memory the state rows keep the reference's order ``[1, x (d rows), vec(x⊗x) (d² rows)]``;
inside the kernels ``d`` is padded to 16 with zeros (zero inputs give zero features).

**Precision.** Sums and denominators are fp32. float32 inputs use IEEE fp32 products everywhere
(``input_precision="ieee"``). The per-chunk states ``HS``/``HR`` are stored in bf16 for bf16 inputs
with an elementwise map (as fla stores them; ~2e-3 relative error, inside ARCHITECTURE.md's bf16
tolerances) and in fp32 otherwise (Taylor: its normalised ``dq`` cancels large terms of ``S gn``
and ``z gd``; fp16: a long-context state can exceed its range); the running state of a scan and
the returned final states are fp32. For half-precision inputs the intra-chunk scores
``φ(Q) φ(K)ᵀ`` and the product of the scores with ``V`` run on the tensor cores in the input
dtype; products whose operands are exact in the input dtype (identity features, ``gn = dy``, a bf16
state) run there too (exact products, fp32 sums); every other product that involves a state, a
gradient or ``φ(K)`` entering the state runs with fp32 operands (TF32).
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



@triton.jit
def _mmh(a, b, HALF: tl.constexpr, IEEE: tl.constexpr):
    """``a @ b`` in the operands' own half dtype when ``HALF`` (operands that are exact there: the
    products are exact, fp32 accumulation), else with fp32 operands (:func:`_mm32`)."""
    if HALF:
        return _mm(a, b, IEEE)
    else:
        return _mm32(a, b, IEEE)


# ---------------------------------------------------------------------------------------------
# Elementwise feature maps (identity, elu+1, relu): Dφ = Dk
# Layouts: q, k [B, T, H, Dk], v, y [B, T, H, Dv] contiguous (row stride H·D); per-token fp32
# statistics (den, 1/(den+ε), gd) [B, T, H]; chunk states HS/HR [B·H, NT, Dk, Dv] (bf16 for bf16
# inputs, else fp32), HZ/HRZ [B·H, NT, Dk] fp32.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _la_fwd_states(
    K, V, S0, Z0, HS, HZ, ST, ZT,
    T, NT, H, Dk, Dv,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, FEATURE: tl.constexpr,
    HAS_S0: tl.constexpr, STORE_FINAL: tl.constexpr, STORE_Z: tl.constexpr, IEEE: tl.constexpr,
):
    # One program: state tile [BK, BV] of one (b, h); walks all chunks in order (grid B·H × NK × NV:
    # the scan is sequential in the chunks, so the parallelism is in the tiles of the state).
    # STORE_Z (normalised only): also z per chunk and z_T. Without it the loop body is loads feeding
    # one product, which the compiler pipelines (a reduction of the loaded tile in the loop stops
    # that); z_T is then summed outside (_feature_sum).
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
    else:
        s = tl.zeros([BK, BV], tl.float32)
    if STORE_Z:
        if HAS_S0:
            z = tl.load(Z0 + bh64 * Dk + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        else:
            z = tl.zeros([BK], tl.float32)
    k_base = K + (b.to(tl.int64) * T * H + h) * Dk
    v_base = V + (b.to(tl.int64) * T * H + h) * Dv
    rows0 = tl.arange(0, C)
    for n in range(0, NT):
        slot = bh64 * NT + n
        tl.store(HS + slot * Dk * Dv + kv, s.to(HS.dtype.element_ty), mask=kv_ok)
        rows = n * C + rows0
        vv = _ld(v_base, rows, offs_v, T, Dv, H * Dv)  # [C, BV]
        if STORE_Z:
            if iv == 0:  # one value tile writes z
                tl.store(HZ + slot * Dk + offs_k, z, mask=k_ok)
            fkt = _feat_t(k_base, rows, offs_k, T, Dk, H * Dk, FEATURE)  # φ(K)ᵀ [BK, C] fp32
            s += _mm32(fkt, vv, IEEE)
            z += tl.sum(fkt, 1)
        elif FEATURE == 0 and not IEEE:  # identity, half inputs: exact products in the input dtype
            s += _mm(_ldt(k_base, rows, offs_k, T, Dk, H * Dk), vv, IEEE)
        else:
            s += _mm32(_feat_t(k_base, rows, offs_k, T, Dk, H * Dk, FEATURE), vv, IEEE)
    if STORE_FINAL:
        tl.store(ST + bh64 * Dk * Dv + kv, s, mask=kv_ok)
        if STORE_Z:
            if iv == 0:
                tl.store(ZT + bh64 * Dk + offs_k, z, mask=k_ok)


@triton.jit
def _la_fwd_out(
    Q, K, V, HS, HZ, Y, DEN,
    T, NT, H, Dk, Dv, eps,
    C: tl.constexpr, BDK: tl.constexpr, BV: tl.constexpr, FEATURE: tl.constexpr,
    NORMALIZE: tl.constexpr, STATE_HALF: tl.constexpr, IEEE: tl.constexpr,
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
    fq = _feat(Q + qk_base, rows, offs_k, T, Dk, H * Dk, FEATURE)  # [C, BDK] fp32
    fkt = _feat_t(K + qk_base, rows, offs_k, T, Dk, H * Dk, FEATURE)  # [BDK, C]
    vv = _ld(V + v_base, rows, offs_v, T, Dv, H * Dv)  # [C, BV]
    s = _ld(HS + slot * Dk * Dv, offs_k, offs_v, Dk, Dv, Dv)  # S_n [BDK, BV] in the state dtype
    dt = vv.dtype
    a = _mm(fq.to(dt), fkt.to(dt), IEEE)
    a = tl.where(rows0[:, None] >= rows0[None, :], a, 0.0)
    if STATE_HALF and FEATURE == 0:  # identity features of half inputs and a bf16 state: exact products
        num = _mm(fq.to(s.dtype), s, IEEE)
    else:
        num = _mm32(fq, s, IEEE)
    num += _mm(a.to(dt), vv, IEEE)
    if NORMALIZE:
        z = tl.load(HZ + slot * Dk + offs_k, mask=offs_k < Dk, other=0.0)
        den = tl.sum(a, 1) + tl.sum(fq * z[None, :], 1)
        num = num / (den + eps)[:, None]
        if iv == 0:
            tl.store(DEN + (b.to(tl.int64) * T + rows) * H + h, den, mask=t_ok)
    tl.store(Y + v_base + rows[:, None].to(tl.int64) * (H * Dv) + offs_v[None, :], num.to(Y.dtype.element_ty),
             mask=t_ok[:, None] & (offs_v[None, :] < Dv))


@triton.jit
def _la_fwd_fused(
    Q, K, V, S0, Z0, Y, DEN, ST, ZT,
    T, NT, H, Dk, Dv, eps,
    C: tl.constexpr, BDK: tl.constexpr, BV: tl.constexpr, FEATURE: tl.constexpr,
    NORMALIZE: tl.constexpr, STATE_HALF: tl.constexpr, HAS_S0: tl.constexpr, STORE_FINAL: tl.constexpr,
    IEEE: tl.constexpr,
):
    # The one-pass forward: one program per (b, h, value tile) holds the full-Dk state S [BDK, BV]
    # (and z [BDK] when normalised) in fp32 registers and walks the chunks in order; per chunk it
    # computes exactly what _la_fwd_out computes from S_n (same products, same rounding of S for the
    # inter-chunk product: bf16 when the two-pass form would store S in bf16), stores y, then adds
    # φ(K_n)ᵀ V_n as _la_fwd_states does. No chunk state ever reaches memory. Grid B·H × Dv/BV: q and
    # k are read once per value tile (and the [C, C] scores recomputed per value tile).
    pid = tl.program_id(0)
    nv = tl.cdiv(Dv, BV)
    bh = pid // nv
    iv = pid % nv
    b = bh // H
    h = bh % H
    offs_k = tl.arange(0, BDK)
    offs_v = iv * BV + tl.arange(0, BV)
    k_ok = offs_k < Dk
    v_ok = offs_v < Dv
    kv_ok = k_ok[:, None] & v_ok[None, :]
    kv = offs_k[:, None] * Dv + offs_v[None, :]
    bh64 = bh.to(tl.int64)
    if HAS_S0:
        s = tl.load(S0 + bh64 * Dk * Dv + kv, mask=kv_ok, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BDK, BV], tl.float32)
    if NORMALIZE:
        if HAS_S0:
            z = tl.load(Z0 + bh64 * Dk + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        else:
            z = tl.zeros([BDK], tl.float32)
    qk_base = (b.to(tl.int64) * T * H + h) * Dk
    v_base = (b.to(tl.int64) * T * H + h) * Dv
    dt = Y.dtype.element_ty
    rows0 = tl.arange(0, C)
    causal = rows0[:, None] >= rows0[None, :]
    for n in range(0, NT):
        rows = n * C + rows0
        vv = _ld(V + v_base, rows, offs_v, T, Dv, H * Dv)  # [C, BV] input dtype
        if FEATURE == 0 and not IEEE:
            # identity features of half inputs: raw tiles straight into the products (exact in the
            # input dtype; loads that feed only products, which the compiler pipelines)
            fq = _ld(Q + qk_base, rows, offs_k, T, Dk, H * Dk)  # [C, BDK]
            fkt = _ldt(K + qk_base, rows, offs_k, T, Dk, H * Dk)  # [BDK, C]
            a = _mm(fq, fkt, IEEE)
        else:
            fq = _feat(Q + qk_base, rows, offs_k, T, Dk, H * Dk, FEATURE)  # [C, BDK] fp32
            fkt = _feat_t(K + qk_base, rows, offs_k, T, Dk, H * Dk, FEATURE)  # [BDK, C] fp32
            a = _mm(fq.to(dt), fkt.to(dt), IEEE)
        a = tl.where(causal, a, 0.0)
        # inter-chunk term Q_n S_n, with S_n rounded as the two-pass form stores it
        if STATE_HALF:
            sh = s.to(tl.bfloat16)
            if FEATURE == 0:
                num = _mm(fq.to(tl.bfloat16), sh, IEEE)
            else:
                num = _mm32(fq, sh, IEEE)
        else:
            num = _mm32(fq, s, IEEE)
        num += _mm(a.to(dt), vv, IEEE)
        if NORMALIZE:
            fq32 = fq.to(tl.float32)
            den = tl.sum(a, 1) + tl.sum(fq32 * z[None, :], 1)
            num = num / (den + eps)[:, None]
            t_ok = rows < T
            if iv == 0:
                tl.store(DEN + (b.to(tl.int64) * T + rows) * H + h, den, mask=t_ok)
            z += tl.sum(fkt.to(tl.float32), 1)
        tl.store(Y + v_base + rows[:, None].to(tl.int64) * (H * Dv) + offs_v[None, :], num.to(Y.dtype.element_ty),
                 mask=(rows[:, None] < T) & v_ok[None, :])
        # S_{n+1} = S_n + φ(K_n)ᵀ V_n, as _la_fwd_states
        if FEATURE == 0 and not IEEE:
            s += _mm(fkt, vv, IEEE)
        else:
            s += _mm32(fkt, vv, IEEE)
    if STORE_FINAL:
        tl.store(ST + bh64 * Dk * Dv + kv, s, mask=kv_ok)
        if NORMALIZE:
            if iv == 0:
                tl.store(ZT + bh64 * Dk + offs_k, z, mask=k_ok)


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
        tl.store(HR + slot * Dk * Dv + kv, r.to(HR.dtype.element_ty), mask=kv_ok)
        if iv == 0:
            tl.store(HRZ + slot * Dk + offs_k, rz, mask=k_ok)
        rows = n * C + rows0
        if NORMALIZE:
            t_ok = rows < T
            st = (b.to(tl.int64) * T + rows) * H + h
            fqt = _feat_t(q_base, rows, offs_k, T, Dk, H * Dk, FEATURE)  # φ(Q)ᵀ [BK, C]
            gn = _ld(do_base, rows, offs_v, T, Dv, H * Dv).to(tl.float32) * tl.load(RDEN + st, mask=t_ok, other=0.0)[:, None]
            rz += tl.sum(fqt * tl.load(GD + st, mask=t_ok, other=0.0)[None, :], 1)
            r += _mm32(fqt, gn, IEEE)
        elif FEATURE == 0 and not IEEE:  # gn = dy and identity features: exact in the input dtype
            r += _mm(_ldt(q_base, rows, offs_k, T, Dk, H * Dk), _ld(do_base, rows, offs_v, T, Dv, H * Dv), IEEE)
        else:
            fqt = _feat_t(q_base, rows, offs_k, T, Dk, H * Dk, FEATURE)
            r += _mm32(fqt, _ld(do_base, rows, offs_v, T, Dv, H * Dv), IEEE)
    if STORE_D0:
        tl.store(DS0 + bh64 * Dk * Dv + kv, r, mask=kv_ok)
        if iv == 0:
            tl.store(DZ0 + bh64 * Dk + offs_k, rz, mask=k_ok)


@triton.jit
def _la_bwd_grads(
    Q, K, V, DO, RDEN, GD, HS, HZ, HR, HRZ, DQ, DK, DV,
    T, NT, H, Dk, Dv,
    C: tl.constexpr, BDK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, FEATURE: tl.constexpr,
    NORMALIZE: tl.constexpr, STATE_HALF: tl.constexpr, DO_DQK: tl.constexpr, DO_DV: tl.constexpr, IEEE: tl.constexpr,
):
    # One program: one chunk of one (b, h) (and one block of BK columns of dq / dk), every value
    # tile in a loop (dφQ and dφK sum over them):
    #   dP = tril(gn Vᵀ + gd), dφQ = dP φK + gn Sᵀ + gd zᵀ, dφK = dPᵀ φQ + V Rᵀ + ρ,
    #   dV = tril(φQ φKᵀ)ᵀ gn + φK R (stored per value tile).
    # DO_DQK / DO_DV select the parts: both in one launch (BK = BDK, grid B·H·NT), or dq/dk in
    # column blocks (grid B·H·NT·Dk/BK, dP recomputed per block) and dv in a second launch.
    pid = tl.program_id(0)
    nkb = tl.cdiv(Dk, BK)
    ik = pid % nkb
    n = (pid // nkb) % NT
    bh = pid // (nkb * NT)
    b = bh // H
    h = bh % H
    offs_k = tl.arange(0, BDK)
    offs_kb = ik * BK + tl.arange(0, BK)
    kb_ok = offs_kb < Dk
    rows0 = tl.arange(0, C)
    rows = n * C + rows0
    t_ok = rows < T
    slot = bh.to(tl.int64) * NT + n
    qk_base = (b.to(tl.int64) * T * H + h) * Dk
    v_base = (b.to(tl.int64) * T * H + h) * Dv
    st = (b.to(tl.int64) * T + rows) * H + h
    # products with gn are exact in the input dtype when gn = dy (not normalised), φ = identity and
    # the states are stored in that dtype
    HALF: tl.constexpr = STATE_HALF and FEATURE == 0 and not NORMALIZE
    dt = Q.dtype.element_ty
    if NORMALIZE:
        rd = tl.load(RDEN + st, mask=t_ok, other=0.0)
    if DO_DV:
        if HALF:
            fk = _ld(K + qk_base, rows, offs_k, T, Dk, H * Dk)  # [C, BDK], input dtype
        else:
            fk = _feat(K + qk_base, rows, offs_k, T, Dk, H * Dk, FEATURE)  # [C, BDK] fp32
        fqt = _feat_t(Q + qk_base, rows, offs_k, T, Dk, H * Dk, FEATURE)  # [BDK, C]
        at = _mm(fk.to(dt), fqt.to(dt), IEEE)  # the forward's scores, transposed: [key s, query t]
        at = tl.where(rows0[None, :] >= rows0[:, None], at, 0.0)
    if DO_DQK:
        dp = tl.zeros([C, C], tl.float32)
        dfq = tl.zeros([C, BK], tl.float32)
        dfk = tl.zeros([C, BK], tl.float32)
    for iv in range(0, tl.cdiv(Dv, BV)):
        offs_v = iv * BV + tl.arange(0, BV)
        gn = _ld(DO + v_base, rows, offs_v, T, Dv, H * Dv)  # [C, BV]
        if NORMALIZE:
            gn = gn.to(tl.float32) * rd[:, None]
        if DO_DV:
            if DO_DQK:  # Rᵀ is shared with dφK = V Rᵀ
                rt = _ldt(HR + slot * Dk * Dv, offs_k, offs_v, Dk, Dv, Dv)  # R_nᵀ [BV, BDK]
                dv = _mm32(at, gn, IEEE) + _mmh(fk, tl.trans(rt), HALF, IEEE)
            else:
                dv = _mm32(at, gn, IEEE) + _mmh(fk, _ld(HR + slot * Dk * Dv, offs_k, offs_v, Dk, Dv, Dv), HALF, IEEE)
            tl.store(DV + v_base + rows[:, None].to(tl.int64) * (H * Dv) + offs_v[None, :], dv.to(DV.dtype.element_ty),
                     mask=t_ok[:, None] & (offs_v[None, :] < Dv))
        if DO_DQK:
            if DO_DV:
                rtb = rt  # BK = BDK
            else:
                rtb = _ldt(HR + slot * Dk * Dv, offs_kb, offs_v, Dk, Dv, Dv)  # [BV, BK]
            vv = _ld(V + v_base, rows, offs_v, T, Dv, H * Dv)  # [C, BV]
            vt = _ldt(V + v_base, rows, offs_v, T, Dv, H * Dv)  # Vᵀ [BV, C]
            stt = _ldt(HS + slot * Dk * Dv, offs_kb, offs_v, Dk, Dv, Dv)  # S_nᵀ [BV, BK]
            dp += _mmh(gn, vt, HALF, IEEE)
            dfq += _mmh(gn, stt, HALF, IEEE)
            dfk += _mmh(vv, rtb, HALF, IEEE)
    if DO_DQK:
        if NORMALIZE:
            gdv = tl.load(GD + st, mask=t_ok, other=0.0)
            z = tl.load(HZ + slot * Dk + offs_kb, mask=kb_ok, other=0.0)
            dp += gdv[:, None]
            dfq += gdv[:, None] * z[None, :]
        dfk += tl.load(HRZ + slot * Dk + offs_kb, mask=kb_ok, other=0.0)[None, :]
        dp = tl.where(rows0[:, None] >= rows0[None, :], dp, 0.0)
        dfq += _mm32(dp, _feat(K + qk_base, rows, offs_kb, T, Dk, H * Dk, FEATURE), IEEE)
        dfk += _mm32(tl.trans(dp), _feat(Q + qk_base, rows, offs_kb, T, Dk, H * Dk, FEATURE), IEEE)
        if FEATURE != 0:
            dfq = dfq * _dphi(_ld(Q + qk_base, rows, offs_kb, T, Dk, H * Dk).to(tl.float32), FEATURE)
            dfk = dfk * _dphi(_ld(K + qk_base, rows, offs_kb, T, Dk, H * Dk).to(tl.float32), FEATURE)
        out = rows[:, None].to(tl.int64) * (H * Dk) + offs_kb[None, :]
        tl.store(DQ + qk_base + out, dfq.to(DQ.dtype.element_ty), mask=t_ok[:, None] & kb_ok[None, :])
        tl.store(DK + qk_base + out, dfk.to(DK.dtype.element_ty), mask=t_ok[:, None] & kb_ok[None, :])


@triton.jit
def _row_stats_kernel(DY, Y, DEN, RDEN, GD, N, Dv, eps, BR: tl.constexpr, BDV: tl.constexpr):
    """Per token (row of ``[B·T·H, Dv]``): ``rden = 1/(den+ε)``, ``gd = -(dy·y) rden`` (fp32)."""
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BDV)
    r_ok = rows < N
    m = r_ok[:, None] & (cols[None, :] < Dv)
    off = rows[:, None] * Dv + cols[None, :]
    dy = tl.load(DY + off, mask=m, other=0.0).to(tl.float32)
    y = tl.load(Y + off, mask=m, other=0.0).to(tl.float32)
    rd = 1.0 / (tl.load(DEN + rows, mask=r_ok, other=0.0) + eps)
    tl.store(RDEN + rows, rd, mask=r_ok)
    tl.store(GD + rows, -tl.sum(dy * y, 1) * rd, mask=r_ok)


# ---------------------------------------------------------------------------------------------
# BASED's 2nd-order Taylor map, features on the fly. Internal state rows (padded, TFP = 1+BD+BD²):
# [0] the constant feature, [1, 1+BD) the linear ones, [1+BD, TFP) the quadratic ones (1+BD+i*BD+j).
# The state kernels split these rows in groups g = 0..d (grid B·H × (1+d) × NV): group 0 holds the
# constant and linear rows, group g ≥ 1 the quadratic rows i = g-1 (x_i x_j, j < BD); the
# features of group g are x_j·w_g with the per-token weight w_0 = c₁, w_g = c₂ x_{g-1}, so every
# group's rows start at 1 + g·BD (internal) and 1 + g·d (external, the reference's row order).
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
def _tl_w(base, rows, T, g, stride, c1, c2):
    """Per-token weight of group ``g``'s features ``[C]``: ``c₁`` for g = 0, ``c₂ x_{g-1}`` else."""
    xc = tl.load(base + rows.to(tl.int64) * stride + tl.maximum(g - 1, 0), mask=rows < T, other=0.0).to(tl.float32)
    return tl.where(g == 0, c1, c2 * xc)


@triton.jit
def _tl_group_load(S, Z, bh, g, d, Dv, offs_v, BD: tl.constexpr):
    """Group ``g``'s rows ``[BD, BV]`` / ``[BD]`` and the constant row of an external state (fp32)."""
    F = 1 + d + d * d
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < d
    v_ok = offs_v < Dv
    erow = 1 + g * d + offs_d
    sb = S + bh.to(tl.int64) * F * Dv
    zb = Z + bh.to(tl.int64) * F
    s = tl.load(sb + erow[:, None] * Dv + offs_v[None, :], mask=d_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
    z = tl.load(zb + erow, mask=d_ok, other=0.0).to(tl.float32)
    s0 = tl.load(sb + offs_v, mask=v_ok, other=0.0).to(tl.float32)
    z0 = tl.load(zb).to(tl.float32)
    return s, z, s0, z0


@triton.jit
def _tl_group_store(S, Z, bh, g, d, Dv, offs_v, s, z, s0, z0, STORE_Z, BD: tl.constexpr):
    """Store group ``g``'s rows (and, for g = 0, the constant row) in the external row order; ``z`` too when ``STORE_Z``."""
    F = 1 + d + d * d
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < d
    v_ok = offs_v < Dv
    erow = 1 + g * d + offs_d
    sb = S + bh.to(tl.int64) * F * Dv
    zb = Z + bh.to(tl.int64) * F
    tl.store(sb + erow[:, None] * Dv + offs_v[None, :], s, mask=d_ok[:, None] & v_ok[None, :])
    if STORE_Z:
        tl.store(zb + erow, z, mask=d_ok)
    if g == 0:
        tl.store(sb + offs_v, s0, mask=v_ok)
        if STORE_Z:
            tl.store(zb, z0)


@triton.jit
def _tl_fwd_states(
    K, V, S0, Z0, HS, HZ, ST, ZT,
    T, NT, H, d, Dv, c1, c2,
    C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    HAS_S0: tl.constexpr, STORE_FINAL: tl.constexpr, IEEE: tl.constexpr,
):
    # One program: the rows of group g (see above) x one value tile of one (b, h); walks the chunks.
    FP: tl.constexpr = 1 + BD + BD * BD
    pid = tl.program_id(0)
    nv = tl.cdiv(Dv, BV)
    G = 1 + d
    iv = pid % nv
    g = (pid // nv) % G
    bh = pid // (nv * G)
    b = bh // H
    h = bh % H
    offs_v = iv * BV + tl.arange(0, BV)
    v_ok = offs_v < Dv
    offs_d = tl.arange(0, BD)
    irow = 1 + g * BD + offs_d
    if HAS_S0:
        s, z, s0, z0 = _tl_group_load(S0, Z0, bh, g, d, Dv, offs_v, BD)
    else:
        s = tl.zeros([BD, BV], tl.float32)
        z = tl.zeros([BD], tl.float32)
        s0 = tl.zeros([BV], tl.float32)
        z0 = tl.sum(tl.zeros([BD], tl.float32), 0)
    k_base = K + (b.to(tl.int64) * T * H + h) * d
    v_base = V + (b.to(tl.int64) * T * H + h) * Dv
    rows0 = tl.arange(0, C)
    bh64 = bh.to(tl.int64)
    for n in range(0, NT):
        slot = bh64 * NT + n
        hb = HS + slot * FP * Dv
        tl.store(hb + irow[:, None] * Dv + offs_v[None, :], s, mask=v_ok[None, :])
        if iv == 0:
            tl.store(HZ + slot * FP + irow, z)
        if g == 0:
            tl.store(hb + offs_v, s0, mask=v_ok)
            if iv == 0:
                tl.store(HZ + slot * FP, z0)
        rows = n * C + rows0
        feat = _ldt(k_base, rows, offs_d, T, d, H * d).to(tl.float32) * _tl_w(k_base, rows, T, g, H * d, c1, c2)[None, :]  # [BD, C]
        vv = _ld(v_base, rows, offs_v, T, Dv, H * Dv)  # [C, BV]
        s += _mm32(feat, vv, IEEE)
        z += tl.sum(feat, 1)
        s0 += tl.sum(vv.to(tl.float32), 0)
        z0 += tl.sum(tl.where(rows < T, 1.0, 0.0), 0)
    if STORE_FINAL:
        _tl_group_store(ST, ZT, bh, g, d, Dv, offs_v, s, z, s0, z0, iv == 0, BD)


@triton.jit
def _tl_fwd_out(
    Q, K, V, HS, HZ, Y, DEN,
    T, NT, H, d, Dv, c1, c2, eps,
    C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    NORMALIZE: tl.constexpr, IEEE: tl.constexpr,
):
    # One program: one chunk and one value tile of one (b, h). Inter-chunk term
    # φ(Q) S = S⁽⁰⁾ + c₁ Q S⁽¹⁾ + Σ_i (c₂ q_i ⊙ Q) S⁽²⁾_i: one [C, BD] x [BD, BV] product per i.
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
    rows0 = tl.arange(0, C)
    rows = n * C + rows0
    t_ok = rows < T
    slot = bh.to(tl.int64) * NT + n
    qk_base = (b.to(tl.int64) * T * H + h) * d
    v_base = (b.to(tl.int64) * T * H + h) * Dv
    q_base = Q + qk_base
    xq = _ld(q_base, rows, offs_d, T, d, H * d)  # [C, BD] raw
    xkt = _ldt(K + qk_base, rows, offs_d, T, d, H * d)  # [BD, C] raw
    vv = _ld(V + v_base, rows, offs_v, T, Dv, H * Dv)
    dt = vv.dtype
    sc = _mm(xq.to(dt), xkt.to(dt), IEEE)
    a = tl.where(rows0[:, None] >= rows0[None, :], 1.0 + sc * (c1 * c1) + sc * sc * (c2 * c2), 0.0)
    num = _mm(a.to(dt), vv, IEEE)
    hb = HS + slot * FP * Dv
    zb = HZ + slot * FP
    xq32 = xq.to(tl.float32)
    s0 = tl.load(hb + offs_v, mask=offs_v < Dv, other=0.0)
    num += s0[None, :] + _mm32(xq32 * c1, _ld(hb + Dv, offs_d, offs_v, BD, Dv, Dv), IEEE)
    if NORMALIZE:
        den = tl.sum(a, 1) + tl.load(zb) + tl.sum(xq32 * c1 * tl.load(zb + 1 + offs_d)[None, :], 1)
    for i in range(0, d):
        q2 = xq32 * _tl_w(q_base, rows, T, i + 1, H * d, c1, c2)[:, None]  # features (i, ·) [C, BD]
        row2 = 1 + (i + 1) * BD
        num += _mm32(q2, _ld(hb + row2 * Dv, offs_d, offs_v, BD, Dv, Dv), IEEE)
        if NORMALIZE:
            den += tl.sum(q2 * tl.load(zb + row2 + offs_d)[None, :], 1)
    if NORMALIZE:
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
    # The reverse scan of R = Σ φ(q) gnᵀ (and ρ = Σ φ(q) gd), grouped like _tl_fwd_states.
    FP: tl.constexpr = 1 + BD + BD * BD
    pid = tl.program_id(0)
    nv = tl.cdiv(Dv, BV)
    G = 1 + d
    iv = pid % nv
    g = (pid // nv) % G
    bh = pid // (nv * G)
    b = bh // H
    h = bh % H
    offs_v = iv * BV + tl.arange(0, BV)
    v_ok = offs_v < Dv
    offs_d = tl.arange(0, BD)
    irow = 1 + g * BD + offs_d
    if HAS_D:
        r, u, r0, u0 = _tl_group_load(DST, DZT, bh, g, d, Dv, offs_v, BD)
    else:
        r = tl.zeros([BD, BV], tl.float32)
        u = tl.zeros([BD], tl.float32)
        r0 = tl.zeros([BV], tl.float32)
        u0 = tl.sum(tl.zeros([BD], tl.float32), 0)
    q_base = Q + (b.to(tl.int64) * T * H + h) * d
    do_base = DO + (b.to(tl.int64) * T * H + h) * Dv
    rows0 = tl.arange(0, C)
    bh64 = bh.to(tl.int64)
    for i in range(0, NT):
        n = NT - 1 - i
        slot = bh64 * NT + n
        rb = HR + slot * FP * Dv
        tl.store(rb + irow[:, None] * Dv + offs_v[None, :], r, mask=v_ok[None, :])
        if iv == 0:
            tl.store(HRZ + slot * FP + irow, u)
        if g == 0:
            tl.store(rb + offs_v, r0, mask=v_ok)
            if iv == 0:
                tl.store(HRZ + slot * FP, u0)
        rows = n * C + rows0
        feat = _ldt(q_base, rows, offs_d, T, d, H * d).to(tl.float32) * _tl_w(q_base, rows, T, g, H * d, c1, c2)[None, :]  # [BD, C]
        gn = _ld(do_base, rows, offs_v, T, Dv, H * Dv).to(tl.float32)
        if NORMALIZE:
            t_ok = rows < T
            st = (b.to(tl.int64) * T + rows) * H + h
            gn = gn * tl.load(RDEN + st, mask=t_ok, other=0.0)[:, None]
            gdv = tl.load(GD + st, mask=t_ok, other=0.0)
            u += tl.sum(feat * gdv[None, :], 1)
            u0 += tl.sum(gdv, 0)
        r += _mm32(feat, gn, IEEE)
        r0 += tl.sum(gn, 0)
    if STORE_D0:
        _tl_group_store(DS0, DZ0, bh, g, d, Dv, offs_v, r, u, r0, u0, iv == 0, BD)


@triton.jit
def _tl_chain(acc, g2, w, x32, i, c2, BD: tl.constexpr):
    """Add the gradient through the features ``c₂ x_i x_j`` (j < BD) to ``acc [C, BD]``, given
    ``g2 = ∂L/∂features [C, BD]`` and ``w = c₂ x_i``: ``∂/∂x_j += g2_j w``, ``∂/∂x_i += c₂ Σ_j g2_j x_j``."""
    col = tl.arange(0, BD)
    return acc + g2 * w[:, None] + tl.where(col[None, :] == i, (c2 * tl.sum(g2 * x32, 1))[:, None], 0.0)


@triton.jit
def _tl_bwd_grads(
    Q, K, V, DO, RDEN, GD, HS, HZ, HR, HRZ, DQ, DK, DV,
    T, NT, H, d, Dv, c1, c2,
    C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    NORMALIZE: tl.constexpr, IEEE: tl.constexpr,
):
    # One program: dq, dk, dv of one chunk of one (b, h), the value tiles in a loop. Through the
    # states: ∂L/∂φ(q) = gn Sᵀ + gd zᵀ, ∂L/∂φ(k) = V Rᵀ + ρ, dV += φ(K) R, taken group by group
    # (constant, linear, then one [C, BD] slice of quadratic features per i) and chained back to
    # q, k at once (_tl_chain); inside the chunk, dV += tril(κ(K Qᵀ)) gn and, after the loop,
    # dq += (dP ⊙ κ'(s)) K, dk += (dP ⊙ κ'(s))ᵀ Q with dP = tril(gn Vᵀ + gd).
    FP: tl.constexpr = 1 + BD + BD * BD
    pid = tl.program_id(0)
    n = pid % NT
    bh = pid // NT
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BD)
    rows0 = tl.arange(0, C)
    rows = n * C + rows0
    t_ok = rows < T
    slot = bh.to(tl.int64) * NT + n
    qk_base = (b.to(tl.int64) * T * H + h) * d
    v_base = (b.to(tl.int64) * T * H + h) * Dv
    st = (b.to(tl.int64) * T + rows) * H + h
    q_base = Q + qk_base
    k_base = K + qk_base
    hb = HS + slot * FP * Dv
    rb = HR + slot * FP * Dv
    xq = _ld(q_base, rows, offs_d, T, d, H * d)  # [C, BD] raw, input dtype
    xk = _ld(k_base, rows, offs_d, T, d, H * d)
    xq32 = xq.to(tl.float32)
    xk32 = xk.to(tl.float32)
    sct = _mm(xk, _ldt(q_base, rows, offs_d, T, d, H * d), IEEE)  # [key s, query t]
    at = tl.where(rows0[None, :] >= rows0[:, None], 1.0 + sct * (c1 * c1) + sct * sct * (c2 * c2), 0.0)
    if NORMALIZE:
        rd = tl.load(RDEN + st, mask=t_ok, other=0.0)
    dp = tl.zeros([C, C], tl.float32)
    dq = tl.zeros([C, BD], tl.float32)
    dk = tl.zeros([C, BD], tl.float32)
    for iv in range(0, tl.cdiv(Dv, BV)):
        offs_v = iv * BV + tl.arange(0, BV)
        v_ok = offs_v < Dv
        gn = _ld(DO + v_base, rows, offs_v, T, Dv, H * Dv).to(tl.float32)  # [C, BV]
        if NORMALIZE:
            gn = gn * rd[:, None]
        vv = _ld(V + v_base, rows, offs_v, T, Dv, H * Dv)  # [C, BV]
        dp += _mm32(gn, _ldt(V + v_base, rows, offs_v, T, Dv, H * Dv), IEEE)
        r1t = _ldt(rb + Dv, offs_d, offs_v, BD, Dv, Dv)  # R⁽¹⁾ᵀ [BV, BD]
        dq += c1 * _mm32(gn, _ldt(hb + Dv, offs_d, offs_v, BD, Dv, Dv), IEEE)
        dk += c1 * _mm32(vv, r1t, IEEE)
        dv = tl.load(rb + offs_v, mask=v_ok, other=0.0)[None, :] + _mm32(at, gn, IEEE) + _mm32(xk32 * c1, tl.trans(r1t), IEEE)
        for i in range(0, d):
            row2 = (1 + (i + 1) * BD) * Dv
            wq = _tl_w(q_base, rows, T, i + 1, H * d, c1, c2)  # c₂ q_i [C]
            wk = _tl_w(k_base, rows, T, i + 1, H * d, c1, c2)
            r2t = _ldt(rb + row2, offs_d, offs_v, BD, Dv, Dv)  # R⁽²⁾_iᵀ [BV, BD]
            dq = _tl_chain(dq, _mm32(gn, _ldt(hb + row2, offs_d, offs_v, BD, Dv, Dv), IEEE), wq, xq32, i, c2, BD)
            dk = _tl_chain(dk, _mm32(vv, r2t, IEEE), wk, xk32, i, c2, BD)
            dv += _mm32(xk32 * wk[:, None], tl.trans(r2t), IEEE)
        tl.store(DV + v_base + rows[:, None].to(tl.int64) * (H * Dv) + offs_v[None, :], dv.to(DV.dtype.element_ty),
                 mask=t_ok[:, None] & v_ok[None, :])
    # the normaliser's and ρ's parts (no value dimension)
    hz = HZ + slot * FP
    hrz = HRZ + slot * FP
    if NORMALIZE:
        gdv = tl.load(GD + st, mask=t_ok, other=0.0)
        dp += gdv[:, None]
        dq += c1 * gdv[:, None] * tl.load(hz + 1 + offs_d)[None, :]
    dk += c1 * tl.load(hrz + 1 + offs_d)[None, :]
    zero = tl.zeros([C, BD], tl.float32)
    for i in range(0, d):
        row2 = 1 + (i + 1) * BD
        if NORMALIZE:
            dq = _tl_chain(dq, gdv[:, None] * tl.load(hz + row2 + offs_d)[None, :], _tl_w(q_base, rows, T, i + 1, H * d, c1, c2), xq32, i, c2, BD)
        dk = _tl_chain(dk, zero + tl.load(hrz + row2 + offs_d)[None, :], _tl_w(k_base, rows, T, i + 1, H * d, c1, c2), xk32, i, c2, BD)
    sc = _mm(xq, _ldt(k_base, rows, offs_d, T, d, H * d), IEEE)  # [query t, key s]
    ds = tl.where(rows0[:, None] >= rows0[None, :], dp * (c1 * c1 + 2.0 * (c2 * c2) * sc), 0.0)
    dq += _mm32(ds, xk32, IEEE)
    dk += _mm32(tl.trans(ds), xq32, IEEE)
    out = rows[:, None].to(tl.int64) * (H * d) + offs_d[None, :]
    o_ok = t_ok[:, None] & (offs_d[None, :] < d)
    tl.store(DQ + qk_base + out, dq.to(DQ.dtype.element_ty), mask=o_ok)
    tl.store(DK + qk_base + out, dk.to(DK.dtype.element_ty), mask=o_ok)


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
#: per-kernel launch parameters that replace the fixed ones (diagnostics and sweeps only:
#: ``scripts/diag_linear.py --sweep``); ``{kernel name: {"BV": .., "num_warps": .., ...}}``
_OVERRIDE: dict[str, dict] = {}


def _cfgs(*params):
    """``triton.Config``s from ``(BV, num_warps, num_stages[, BK])`` tuples."""
    out = []
    for p in params:
        kw = {"BV": p[0]} if len(p) == 3 else {"BV": p[0], "BK": p[3]}
        out.append(triton.Config(kw, num_warps=p[1], num_stages=p[2]))
    return out


# A handful of candidates per kernel (tuning compiles each once per key), the fixed choice among
# them. Every constexpr that changes the generated code is part of the key (the autotuner adds the
# tensor dtypes itself), so a config tuned for one variant is never reused for another.
# (_la_bwd_grads with both parts and Dk = 128 faulted on an H100 with 4 warps: 8 only.)
_SCAN = _cfgs((32, 4, 3, 64), (32, 4, 4, 64), (64, 4, 3, 64), (32, 2, 4, 64), (32, 4, 4, 32))  # sequential chunk scans
_OUT = _cfgs((64, 4, 1), (64, 4, 2), (32, 4, 2), (64, 8, 2))  # one tile, no loop
_GRADS = _cfgs((32, 8, 1), (64, 8, 1), (16, 8, 1))
# one-pass forward: B·H·Dv/BV programs only, each walking every chunk, so the loads must pipeline
_FUSED = _cfgs((32, 4, 3), (32, 4, 2), (16, 4, 3), (16, 4, 4), (32, 8, 3), (64, 8, 2), (64, 4, 2), (32, 8, 1))  # (32, 8, 1) fits every variant
_DQK = _cfgs((32, 4, 1, 64), (64, 4, 1, 64), (32, 8, 1, 64), (32, 4, 2, 32))
_DV = _cfgs((64, 4, 1), (32, 4, 1), (64, 8, 1))
_TSCAN = _cfgs((64, 4, 3), (64, 4, 4), (32, 4, 3), (64, 2, 3))
_TOUT = _cfgs((64, 4, 2), (32, 4, 2), (64, 8, 1))
_TGRADS = _cfgs((64, 8, 1), (64, 4, 2), (32, 4, 2))
_LA_KEY = ["Dk", "Dv", "C", "FEATURE", "IEEE"]
_TL_KEY = ["d", "Dv", "C", "IEEE"]
_GKEY = _LA_KEY + ["BDK", "NORMALIZE", "STATE_HALF", "DO_DQK", "DO_DV"]
_TUNED = {
    "_la_fwd_states": triton.autotune(_SCAN, key=_LA_KEY + ["HAS_S0", "STORE_FINAL", "STORE_Z"])(_la_fwd_states),
    "_la_fwd_out": triton.autotune(_OUT, key=_LA_KEY + ["BDK", "NORMALIZE", "STATE_HALF"])(_la_fwd_out),
    "_la_fwd_fused": triton.autotune(_FUSED, key=_LA_KEY + ["BDK", "NORMALIZE", "STATE_HALF", "HAS_S0", "STORE_FINAL"])(_la_fwd_fused),
    "_la_bwd_states": triton.autotune(_SCAN, key=_LA_KEY + ["NORMALIZE", "HAS_DST", "HAS_DZT", "STORE_D0"])(_la_bwd_states),
    "_la_bwd_grads": triton.autotune(_GRADS, key=_GKEY)(_la_bwd_grads),  # dq, dk, dv in one launch (BK = BDK given)
    "_la_bwd_dqk": triton.autotune(_DQK, key=_GKEY)(_la_bwd_grads),  # dq, dk in column blocks
    "_la_bwd_dv": triton.autotune(_DV, key=_GKEY)(_la_bwd_grads),  # dv alone (BK = BDK given)
    "_tl_fwd_states": triton.autotune(_TSCAN, key=_TL_KEY + ["HAS_S0", "STORE_FINAL"])(_tl_fwd_states),
    "_tl_fwd_out": triton.autotune(_TOUT, key=_TL_KEY + ["NORMALIZE"])(_tl_fwd_out),
    "_tl_bwd_states": triton.autotune(_TSCAN, key=_TL_KEY + ["NORMALIZE", "HAS_D", "STORE_D0"])(_tl_bwd_states),
    "_tl_bwd_grads": triton.autotune(_TGRADS, key=_TL_KEY + ["NORMALIZE"])(_tl_bwd_grads),
}
#: elementwise maps: dq / dk / dv in one launch (False) or dq+dk in column blocks, then dv (True).
#: MNEMO_LINEAR_SPLIT_GRADS=0/1 overrides (the results are the same).
_SPLIT_GRADS = os.environ.get("MNEMO_LINEAR_SPLIT_GRADS", "1") == "1"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _fixed(name: str, dk: int, dv: int, ieee: bool, chunk: int = DEFAULT_CHUNK, meta: dict | None = None) -> dict:
    """Launch parameters without tuning: small tiles under the interpreter (so the CPU tests cover
    several state and value tiles), sizes that suit an H100 otherwise (``dk``: the q/k width;
    ``meta``: the launch's constexprs, where a kernel's parameters depend on its variant)."""
    if name in _OVERRIDE:
        return dict(_OVERRIDE[name])
    blocked = name in ("_la_fwd_states", "_la_bwd_states", "_la_bwd_dqk")
    if _interpreted():  # (Taylor: 32, which still gives two value tiles at the tests' Dv = 40)
        return dict(BV=32 if name.startswith("_tl") else 16, num_warps=4, num_stages=1, **({"BK": 16} if blocked else {}))
    p2v = max(16, triton.next_power_of_2(dv))
    big = chunk > 64
    # 16-bit inputs: the best of scripts/diag_linear.py --sweep-case linear|based on an H100 (Triton 3.6,
    # B = 1, H = 16, L = 16K; docs/results/sweep_{linear,based}_h100.json). fp32 (ieee) and chunks > 64 keep the
    # earlier, register-lighter launches (more stages or fewer warps there spill or exceed shared memory).
    lean = not ieee and not big
    if name in ("_la_fwd_states", "_la_bwd_states"):  # B·H·(Dk/BK)·(Dv/BV) programs, each walking every chunk
        return dict(BK=min(64, _bdk(dk)), BV=min(32, p2v), num_warps=4, num_stages=5 if lean else 3)
    if name == "_la_fwd_out":
        return dict(BV=min(64, p2v), num_warps=8 if ieee or big else 4, num_stages=2 if lean else 1)
    if name == "_la_fwd_fused":  # B·H·(Dv/BV) programs, each walking every chunk (not yet swept on a GPU)
        # Compiled offline for sm_90a (Triton 3.6 and 3.9; Dk = 128, BV = 32): identity features of half
        # inputs without the normaliser (the benchmark row) take 4 warps, 3 stages: ~155 registers, no
        # spills, 116 KB of shared memory. φ in fp32 (other maps, or the normaliser's φ(q)·z) needs
        # more registers: 8 warps. Shared memory grows with the stages and C: at C = 128 a normalised
        # or non-identity variant fits one stage only (2 stages: 264 KB on Triton 3.6, over the
        # H100's 227 KB); fp32 (IEEE products, not the speed target) keeps one stage.
        plain = meta is None or (meta.get("FEATURE") == 0 and not meta.get("NORMALIZE"))
        if ieee:
            return dict(BV=min(32, p2v), num_warps=8, num_stages=1)
        if big:
            return dict(BV=min(32, p2v), num_warps=8, num_stages=2 if plain else 1)
        if plain:  # the best of an H100 sweep at L = 64K (sweep_linear_fused_64k_h100.json): 1.12 ms, (32, 4, 3) 1.91 ms
            return dict(BV=min(16, p2v), num_warps=4, num_stages=4)
        return dict(BV=min(32, p2v), num_warps=8, num_stages=3)
    if name == "_la_bwd_grads":
        return dict(BV=min(32, p2v), num_warps=8, num_stages=1)
    if name == "_la_bwd_dqk":
        if lean:
            return dict(BK=min(64, _bdk(dk)), BV=min(32, p2v), num_warps=4, num_stages=2)
        return dict(BK=min(64, _bdk(dk)), BV=min(32, p2v), num_warps=8 if ieee or big or dk > 64 else 4, num_stages=1)
    if name == "_la_bwd_dv":
        return dict(BV=min(64, p2v), num_warps=4 if lean else 8, num_stages=1)
    if name in ("_tl_fwd_states", "_tl_bwd_states"):  # B·H·(1+d)·(Dv/BV) programs
        return dict(BV=min(64, p2v), num_warps=2 if lean else 4, num_stages=4 if lean else 3)
    if name == "_tl_fwd_out":
        return dict(BV=min(64, p2v), num_warps=8 if ieee else (2 if lean else 4), num_stages=2)
    if name == "_tl_bwd_grads":
        return dict(BV=min(64, p2v), num_warps=4 if lean else 8, num_stages=2 if lean else 1)
    raise KeyError(name)


def _launch(kernel, grid, args, meta, device, dk: int, dv: int, name: str | None = None) -> None:
    """Autotuned on CUDA (unless MNEMO_AUTOTUNE=0 or an override is set); fixed parameters
    otherwise. ``grid`` maps the launch parameters (a dict with ``BV`` and, for the column-blocked
    kernels, ``BK``) to the size of the 1-D grid; ``name`` selects the parameter set (default: the
    kernel's name)."""
    name = name or kernel.__name__
    if device.type == "cuda" and _AUTOTUNE and name not in _OVERRIDE:
        _TUNED[name][lambda m: (grid(m),)](*args, **meta)
    else:
        fixed = _fixed(name, dk, dv, meta["IEEE"], meta["C"], meta)
        kernel[(grid(fixed),)](*args, **meta, **fixed)


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


def _state_rows(feature: int, dk: int) -> int:
    """Rows of the per-chunk state buffers (Taylor: the padded internal layout)."""
    return TFP if feature == TAYLOR else dk


def _state_dtype(feature: int, dtype: torch.dtype) -> torch.dtype:
    """dtype of the per-chunk states HS / HR: bf16 for bf16 inputs with an elementwise feature map
    (as fla keeps them; the rounding adds ~2e-3 relative error, inside ARCHITECTURE.md's bf16
    tolerances), fp32 otherwise (Taylor: its normalised dq cancels large terms; fp16: range)."""
    return torch.bfloat16 if dtype == torch.bfloat16 and feature != TAYLOR else torch.float32


# ---------------------------------------------------------------------------------------------
# Forward / backward implementations
# ---------------------------------------------------------------------------------------------


def _feature_sum(k, feature):
    """``Σ_t φ(k_t)`` in fp32, ``[B, H, Dk]`` (elementwise maps)."""
    if feature == 0:
        return k.sum(1, dtype=torch.float32)
    kf = k.float()
    return (torch.nn.functional.elu(kf) + 1.0 if feature == 1 else torch.relu(kf)).sum(1)


def _states_fwd(k, v, s0, z0, feature, chunk, store_final, normalize=True):
    """The forward state pass: ``(HS, HZ, S_T, z_T)``; HS/HZ hold the state entering every chunk
    (``[B·H, NT, Dφ or 273, Dv]`` in :func:`_state_dtype`, ``[B·H, NT, ·]`` fp32; HZ empty for an
    elementwise map without ``normalize``); S_T, z_T are None unless ``store_final``."""
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    nt = triton.cdiv(t, chunk)
    ieee = k.dtype == torch.float32
    has_s0 = s0 is not None
    fd = _fdim(feature, dk)
    rows = _state_rows(feature, dk)
    store_z = feature == TAYLOR or normalize  # z per chunk is needed by a normalised output only
    hs = _alloc((b * h, nt, rows, dv), k, _state_dtype(feature, k.dtype))
    hz = _alloc((b * h, nt, rows), k, torch.float32) if store_z else k.new_empty(0, dtype=torch.float32)
    st = _alloc((b, h, fd, dv), k, torch.float32) if store_final else None
    zt = _alloc((b, h, fd), k, torch.float32) if store_final else None
    dummy = _dummy(k)
    s0a, z0a = (s0, z0) if has_s0 else (dummy, dummy)
    sta, zta = (st, zt) if store_final else (dummy, dummy)
    if feature == TAYLOR:
        c1, c2 = _taylor_consts(dk)
        args = (k, v, s0a, z0a, hs, hz, sta, zta, t, nt, h, dk, dv, c1, c2)
        meta = dict(C=chunk, BD=TBD, HAS_S0=has_s0, STORE_FINAL=store_final, IEEE=ieee)
        _launch(_tl_fwd_states, lambda m: b * h * (1 + dk) * triton.cdiv(dv, m["BV"]), args, meta, k.device, dk, dv)
    else:
        args = (k, v, s0a, z0a, hs, hz if store_z else dummy, sta, zta, t, nt, h, dk, dv)
        meta = dict(C=chunk, FEATURE=feature, HAS_S0=has_s0, STORE_FINAL=store_final, STORE_Z=store_z, IEEE=ieee)
        _launch(_la_fwd_states, lambda m: b * h * triton.cdiv(dk, m["BK"]) * triton.cdiv(dv, m["BV"]), args, meta, k.device, dk, dv)
        if store_final and not store_z:
            zt.copy_(_feature_sum(k, feature) + (z0 if has_s0 else 0.0))
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
    grid = lambda m: b * h * nt * triton.cdiv(dv, m["BV"])  # noqa: E731
    if feature == TAYLOR:
        c1, c2 = _taylor_consts(dk)
        args = (q, k, v, hs, hz, y, den_arg, t, nt, h, dk, dv, c1, c2, eps)
        _launch(_tl_fwd_out, grid, args, dict(C=chunk, BD=TBD, NORMALIZE=normalize, IEEE=ieee), q.device, dk, dv)
    else:
        args = (q, k, v, hs, hz if hz.numel() else _dummy(q), y, den_arg, t, nt, h, dk, dv, eps)
        meta = dict(C=chunk, BDK=_bdk(dk), FEATURE=feature, NORMALIZE=normalize, STATE_HALF=hs.dtype != torch.float32, IEEE=ieee)
        _launch(_la_fwd_out, grid, args, meta, q.device, dk, dv)
    return y, den


def _fused_fwd(q, k, v, s0, z0, feature, normalize, eps, chunk, store_final=True):
    """The one-pass forward (``_la_fwd_fused``, elementwise maps): ``(y, den, S_T, z_T)``, no chunk
    states (den empty unless normalised; S_T, z_T None unless ``store_final``)."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    nt = triton.cdiv(t, chunk)
    ieee = q.dtype == torch.float32
    has_s0 = s0 is not None
    y = _alloc((b, t, h, dv), q, q.dtype)
    den = _alloc((b, t, h), q, torch.float32) if normalize else q.new_empty(0, dtype=torch.float32)
    st = _alloc((b, h, dk, dv), q, torch.float32) if store_final else None
    zt = _alloc((b, h, dk), q, torch.float32) if store_final else None
    dummy = _dummy(q)
    args = (q, k, v, s0 if has_s0 else dummy, z0 if has_s0 else dummy, y, den if normalize else dummy,
            st if store_final else dummy, zt if store_final else dummy, t, nt, h, dk, dv, eps)
    meta = dict(C=chunk, BDK=_bdk(dk), FEATURE=feature, NORMALIZE=normalize, STATE_HALF=_state_dtype(feature, q.dtype) != torch.float32,
                HAS_S0=has_s0, STORE_FINAL=store_final, IEEE=ieee)
    _launch(_la_fwd_fused, lambda m: b * h * triton.cdiv(dv, m["BV"]), args, meta, q.device, dk, dv)
    if store_final and not normalize:  # z is not carried by the kernel without the normaliser
        zt.copy_(_feature_sum(k, feature) + (z0 if has_s0 else 0.0))
    return y, den, st, zt


def _fwd_impl(q, k, v, s0, z0, feature, normalize, eps, chunk, fused=False, final=True):
    def empty():  # a fresh one each time: a custom op's outputs must not alias each other
        return q.new_empty(0, dtype=torch.float32)

    if fused:  # no chunk states: the backward recomputes them (_bwd_impl)
        y, den, st, zt = _fused_fwd(q, k, v, s0, z0, feature, normalize, eps, chunk, final)
        st, zt = (st, zt) if final else (empty(), empty())
        return y, st, zt, den, q.new_empty(0, dtype=_state_dtype(feature, q.dtype)), empty()
    hs, hz, st, zt = _states_fwd(k, v, s0, z0, feature, chunk, final, normalize)
    y, den = _out_fwd(q, k, v, hs, hz, feature, normalize, eps, chunk)
    st, zt = (st, zt) if final else (empty(), empty())
    return y, st, zt, den, hs, hz


def _states_bwd(q, dy, rden, gd, dst, dzt, feature, normalize, chunk, need_d0, state_dtype=None):
    """The reverse state pass: ``(HR, HRZ, dS0, dz0)`` (dS0, dz0 None unless ``need_d0``); HR in
    ``state_dtype`` (default :func:`_state_dtype`)."""
    b, t, h, dk = q.shape
    dv = dy.shape[-1]
    nt = triton.cdiv(t, chunk)
    ieee = q.dtype == torch.float32
    fd = _fdim(feature, dk)
    rows = _state_rows(feature, dk)
    hr = _alloc((b * h, nt, rows, dv), q, state_dtype or _state_dtype(feature, q.dtype))
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
        _launch(_tl_bwd_states, lambda m: b * h * (1 + dk) * triton.cdiv(dv, m["BV"]), args, meta, q.device, dk, dv)
    else:
        has_dst, has_dzt = dst is not None, dzt is not None
        args = (q, dy, rden, gd, dst if has_dst else dummy, dzt if has_dzt else dummy, hr, hrz, ds0a, dz0a, t, nt, h, dk, dv)
        meta = dict(C=chunk, FEATURE=feature, NORMALIZE=normalize, HAS_DST=has_dst, HAS_DZT=has_dzt, STORE_D0=need_d0, IEEE=ieee)
        _launch(_la_bwd_states, lambda m: b * h * triton.cdiv(dk, m["BK"]) * triton.cdiv(dv, m["BV"]), args, meta, q.device, dk, dv)
    return hr, hrz, ds0, dz0


def _grads_chunks(q, k, v, dy, rden, gd, hs, hz, hr, hrz, feature, normalize, chunk):
    """The per-chunk gradient launch: ``(dq, dk, dv)``, one program per (b·h, chunk)."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    nt = triton.cdiv(t, chunk)
    ieee = q.dtype == torch.float32
    dq = _alloc(q.shape, q, q.dtype)
    dk_ = _alloc(k.shape, q, k.dtype)
    dv_ = _alloc(v.shape, q, v.dtype)
    grid = lambda m: b * h * nt  # noqa: E731
    if feature == TAYLOR:
        c1, c2 = _taylor_consts(dk)
        meta = dict(C=chunk, BD=TBD, NORMALIZE=normalize, IEEE=ieee)
        args = (q, k, v, dy, rden, gd, hs, hz, hr, hrz, dq, dk_, dv_, t, nt, h, dk, dv, c1, c2)
        _launch(_tl_bwd_grads, grid, args, meta, q.device, dk, dv)
    else:
        if hr.dtype != hs.dtype:
            hr = hr.to(hs.dtype)
        hz_arg = hz if hz.numel() else _dummy(q)
        args = (q, k, v, dy, rden, gd, hs, hz_arg, hr, hrz, dq, dk_, dv_, t, nt, h, dk, dv)
        bdk = _bdk(dk)
        meta = dict(C=chunk, BDK=bdk, FEATURE=feature, NORMALIZE=normalize, STATE_HALF=hs.dtype != torch.float32, IEEE=ieee)
        if _SPLIT_GRADS:
            _launch(_la_bwd_grads, lambda m: b * h * nt * triton.cdiv(dk, m["BK"]), args, dict(meta, DO_DQK=True, DO_DV=False),
                    q.device, dk, dv, "_la_bwd_dqk")
            _launch(_la_bwd_grads, grid, args, dict(meta, BK=bdk, DO_DQK=False, DO_DV=True), q.device, dk, dv, "_la_bwd_dv")
        else:
            _launch(_la_bwd_grads, grid, args, dict(meta, BK=bdk, DO_DQK=True, DO_DV=True), q.device, dk, dv)
    return dq, dk_, dv_


def _row_stats(dy, y, den, eps, normalize):
    """``(1/(den+ε), gd = -(dy·y)/(den+ε))`` per token, fp32 ``[B, T, H]`` (dummies if not normalised), one launch."""
    if not normalize:
        d = _dummy(dy)
        return d, d
    b, t, h, dv = dy.shape
    rden = _alloc((b, t, h), dy, torch.float32)
    gd = _alloc((b, t, h), dy, torch.float32)
    n = b * t * h
    br = 16 if _interpreted() else 32
    _row_stats_kernel[(triton.cdiv(n, br),)](dy, y.contiguous(), den, rden, gd, n, dv, eps, BR=br, BDV=max(16, triton.next_power_of_2(dv)), num_warps=4)
    return rden, gd


def _bwd_impl(dy, q, k, v, y, den, hs, hz, s0, z0, dst, dzt, feature, normalize, eps, chunk, need_d0):
    dy = dy.contiguous()
    if hs.numel() == 0:  # the one-pass forward kept no chunk states: one forward state pass here
        hs, hz, _, _ = _states_fwd(k, v, s0, z0, feature, chunk, False, normalize)
    rden, gd = _row_stats(dy, y, den, eps, normalize)
    dst = dst.contiguous() if dst is not None else None
    dzt = dzt.contiguous() if dzt is not None else None
    hr, hrz, ds0, dz0 = _states_bwd(q, dy, rden, gd, dst, dzt, feature, normalize, chunk, need_d0, hs.dtype)
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
    feature: int, normalize: bool, eps: float, chunk: int, fused: bool = False, final: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y [B, T, H, Dv], S_T [B, H, Dφ, Dv] fp32, z_T [B, H, Dφ] fp32, den [B, T, H] fp32 or empty,
    HS, HZ)``: HS / HZ are the states entering every chunk, kept for the backward (not recomputed);
    with ``fused`` (the one-pass forward, elementwise maps) both are empty and the backward
    recomputes them. ``final=False``: S_T and z_T are empty (not computed)."""
    return _fwd_impl(q, k, v, s0, z0, feature, normalize, eps, chunk, fused, final)


@linear_attn_fwd.register_fake
def _(q, k, v, s0, z0, feature, normalize, eps, chunk, fused=False, final=True):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    fd = _fdim(feature, dk)
    nt = -(-t // chunk)
    rows = _state_rows(feature, dk)
    den = q.new_empty((b, t, h) if normalize else (0,), dtype=torch.float32)
    if fused:
        hs, hz = q.new_empty(0, dtype=_state_dtype(feature, q.dtype)), q.new_empty(0, dtype=torch.float32)
    else:
        hs = q.new_empty(b * h, nt, rows, dv, dtype=_state_dtype(feature, q.dtype))
        hz = q.new_empty((b * h, nt, rows) if feature == TAYLOR or normalize else (0,), dtype=torch.float32)
    st = q.new_empty((b, h, fd, dv) if final else (0,), dtype=torch.float32)
    zt = q.new_empty((b, h, fd) if final else (0,), dtype=torch.float32)
    return q.new_empty(b, t, h, dv), st, zt, den, hs, hz


@torch.library.custom_op("mnemotorch::linear_attn_bwd", mutates_args=())
def linear_attn_bwd(
    dy: Tensor, q: Tensor, k: Tensor, v: Tensor, y: Tensor, den: Tensor, hs: Tensor, hz: Tensor,
    s0: Optional[Tensor], z0: Optional[Tensor], dst: Optional[Tensor], dzt: Optional[Tensor],
    feature: int, normalize: bool, eps: float, chunk: int, need_d0: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dS0 or empty, dz0 or empty)``; an empty ``hs`` (the one-pass forward) makes it
    recompute the chunk states from ``k``, ``v`` and the initial state ``s0``, ``z0``."""
    return _bwd_impl(dy, q, k, v, y, den, hs, hz, s0, z0, dst, dzt, feature, normalize, eps, chunk, need_d0)


@linear_attn_bwd.register_fake
def _(dy, q, k, v, y, den, hs, hz, s0, z0, dst, dzt, feature, normalize, eps, chunk, need_d0):
    b, t, h, dk = q.shape
    fd = _fdim(feature, dk)
    ds0 = q.new_empty((b, h, fd, v.shape[-1]) if need_d0 else (0,), dtype=torch.float32)
    dz0 = q.new_empty((b, h, fd) if need_d0 else (0,), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), ds0, dz0


def _setup_context(ctx, inputs, output):
    q, k, v, s0, z0, feature, normalize, eps, chunk = inputs[:9]
    fused = inputs[9] if len(inputs) > 9 else False  # (inputs[10]: final, not needed by the backward)
    y, _, _, den, hs, hz = output
    # the one-pass forward keeps no chunk states: the backward recomputes them from k, v and S0, z0
    ctx.save_for_backward(q, k, v, y, den, hs, hz, s0 if fused else None, z0 if fused else None)
    ctx.mark_non_differentiable(den, hs, hz)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for unused outputs (HS is large)
    ctx.args = (feature, normalize, eps, chunk)
    ctx.has_s0 = s0 is not None


def _backward(ctx, dy, dst, dzt, dden, dhs, dhz):
    q, k, v, y, den, hs, hz, s0, z0 = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(y)
    need_d0 = ctx.has_s0 and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
    dq, dk, dv, ds0, dz0 = linear_attn_bwd(dy, q, k, v, y, den, hs, hz, s0, z0, dst, dzt, *ctx.args, need_d0)
    return dq, dk, dv, (ds0 if need_d0 else None), (dz0 if need_d0 else None), None, None, None, None, None, None


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


#: the forward forms of the elementwise maps (``MNEMO_LINEAR_FWD``, read at every call)
FWD_PATHS = ("two_pass", "fused", "auto")
FUSED_MAX_DK = 128  # the one-pass forward holds the whole Dk of the state in one tile


def forward_path(feature: int, dk: int, needs_grad: bool = True, normalize: bool = False, half: bool = True) -> str:
    """``"two_pass"`` (``_la_fwd_states`` writes every chunk's state, ``_la_fwd_out`` reads them) or
    ``"fused"`` (``_la_fwd_fused``: one pass, no chunk states; the backward then recomputes them)
    for an elementwise map (Taylor always runs two-pass). ``MNEMO_LINEAR_FWD`` = ``two_pass`` |
    ``fused`` | ``auto`` (default), read at call time. ``auto`` is ``fused`` where it was measured
    faster: no gradient needed (inference, prefill), no normaliser and 16-bit inputs (``half``) --
    one pass, no chunk states written (H100, D = 128, bf16: 1.07 vs fla's 1.18 ms at 64K). Training
    stays ``two_pass`` (the backward reuses the written chunk states: 4.04 ms forward+backward at 64K
    against 4.49 ms for one pass + recompute), and so does the normalised form (its one-pass launch is
    not tuned: 1.09 ms at 16K against 0.69 ms two-pass). docs/results/linear_attention.md, issue #6."""
    want = os.environ.get("MNEMO_LINEAR_FWD", "auto")
    if want not in FWD_PATHS:
        raise ValueError(f"MNEMO_LINEAR_FWD must be one of {FWD_PATHS}, got {want!r}")
    if feature == TAYLOR or dk > FUSED_MAX_DK:
        return "two_pass"
    if want == "auto":
        return "fused" if not needs_grad and not normalize and half else "two_pass"
    return want


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
    output_final_state: bool = True,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
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
        output_final_state: compute and return ``(S_T, z_T)`` (default). ``False`` skips them (as fla's
            ``output_final_state=False``): no final-state store and, without the normaliser, no
            ``Σ φ(k_t)`` pass over the keys; the second return value is then ``None``.

    The forward form of the elementwise maps (two launches, or one that writes no chunk states and
    leaves their recomputation to the backward) follows ``MNEMO_LINEAR_FWD``, see :func:`forward_path`.

    Returns:
        ``(y [B, T, H, Dv] in the inputs' dtype, (S_T [B, H, Dφ, Dv], z_T [B, H, Dφ]) in float32)``, or
        ``(y, None)`` with ``output_final_state=False``.
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
        return v.new_zeros(v.shape, dtype=dt), ((s0, z0) if output_final_state else None)
    # The kernels index q, k, v as contiguous [B, T, H, D] tensors of one dtype.
    q, k, v = (x.to(dt).contiguous() for x in (q, k, v))
    chunk = kernel_chunk(chunk_size)
    if fid == TAYLOR:  # the Taylor kernels' launch parameters are sized for C ≤ 64
        chunk = min(chunk, 64)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v) + ((s0, z0) if s0 is not None else ()))
    fused = forward_path(fid, dk, needs_grad, bool(normalize), dt in (torch.float16, torch.bfloat16)) == "fused"
    final = bool(output_final_state)
    y, st, zt = linear_attn_fwd(q, k, v, s0, z0, fid, bool(normalize), float(eps), chunk, fused, final)[:3]
    return y, ((st, zt) if final else None)


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
