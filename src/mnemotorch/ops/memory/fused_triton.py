"""Titans neural memory: a fused forward (inference / prefill) Triton kernel over all full chunks of a call.

The chunked dual form (:mod:`.chunked`) launches ~100 small kernels per chunk; here one program per
(batch row, head) walks every full chunk of the call with the memory state carried *inside* the
kernel: no launch per chunk. The arithmetic is :func:`~.chunked._chunk_step` at a chunk boundary
(``w0 = w``), depth 1 or 2, written out:

* the gate coefficients ``G, N [n, B, H, C, C]`` and ``β, m, f [n, B, H, C]`` of all full chunks
  are built beforehand in PyTorch (:func:`~.chunked.chunk_coefficients`, fp32) and read per chunk;
* the state ``W_1 [Dk, hid], S_1, W_2 [hid, Dv], S_2`` (256 KiB per head at Dk = Dv = 64,
  hid = 256, fp32) does not fit one SM's registers, so it lives in the returned fp32 state tensors
  themselves (a per-head global scratch, L2-resident at the benchmark's size), which the program
  reads and rewrites every chunk, ``BH`` columns of ``W_1``/``S_1`` (rows of ``W_2``/``S_2``) at a
  time; the key pass's ``Z_1`` and ``Δ_1`` (``[C, hid]``) go to a per-head scratch likewise;
* per chunk, three passes over the hidden slices: (A) ``Z_1 = K W_1``, ``Z_2 = Σ σ(Z_1) W_2``;
  then the LayerNorm / residual / loss backward gives ``Δ_2`` in registers; (B) ``Δ_1 =
  (Δ_2 W_2ᵀ) ∘ σ'(Z_1)`` and the per-token gradient norms the clip needs (the clip scale must be
  known for *all* tokens before any read uses ``G``); (C) the dual-form read of layer 1 slice by
  slice, its contributions to layer 2's read summed over slices (``Ĥ W_2``, ``Ĥ S_2``, ``Ĥ Hᵀ``),
  and the state update of the slice, written over the slice it was read from.

A program reads back what it wrote to global memory (the state between chunks, the scratch between
passes) with other threads of its own block: ``tl.debug_barrier()`` (``__syncthreads``, which also
orders global memory within the block) separates each writing pass from the next reading one, and
those loads use ``cache_modifier=".cg"`` (served by L2, not a possibly stale L1 line).

Matmuls accumulate in fp32 (the accumulation dtype of :func:`neural_memory_chunked` for half and
float32 inputs); with float32 inputs the products are exact fp32 (``input_precision="ieee"``),
with bf16 / fp16 inputs ``LAUNCH["half_precision"]`` ("bf16x3" by default, three bf16 products of the operands'
hi / lo parts, ~16 significant bits: the operands include the fp32 state, whose rounding would otherwise
accumulate over the chunks).

Scope: depth 1 or 2; power-of-two ``chunk_size``, ``Dk``, ``Dv`` and hidden width, each ≥ 16
(``tl.dot`` tiles). Training: the kernel writes the state entering every chunk (``store_states``) and
:class:`_FusedMemory`'s backward runs from those checkpoints (:mod:`.fused_backward`: the read and the
update as batched vector-Jacobian products written out, the state's adjoint chunk by chunk in reverse, at depth 2 in
one more Triton launch, :func:`_lmm_sweep_kernel`; the read's transpose in two more, :mod:`.fused_read_vjp`). The partial segments of a call (the rest of a chunk
begun by an earlier call, a partial last chunk) run through the eager :func:`neural_memory_chunked`
with the state carried, so any call is accepted.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..block_sparse.swa_triton import _mma
from ..block_sparse.triton import _alloc, _mm
from ..compiled import compile_allowed, compiled_over_length
from ..eager import direct
from ..triton_dots import dot_split, dot_split_right
from ..triton_launch import built_with_ptxas, capability, launcher, ptxas_for_build, sm_count
from .chunked import _chunk_major, _clipped, _key_pass, _read, _update, gate_coefficients, neural_memory_chunked
from .fused_backward import KeyPass, _clip_stats, key_pass_from_forward, key_pass_saved, read_vjp, state_adjoint, sweep_block
from .reference import (
    DEFAULT_LN_EPS,
    MemoryState,
    accumulation_dtype,
    check_ln_eps,
    check_max_grad_norm,
    check_memory_args,
    needs_grad,
)

_ACT_CODES = {"silu": 0, "gelu": 1, "relu": 2}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Launch settings: ``hidden_slice`` = columns of W_1 (rows of W_2) one pass step holds in registers
#: (capped at the hidden width); ``num_warps`` (None = 8 for tiles of ≥ 4096 elements, else 4);
#: ``num_stages`` for the software pipelining of the slice loops. Swept on an H100 at 16K tokens, 16
#: heads, d 64, hidden 256 (scripts/diag_memory_fused.py --sweep, 2026-11-26): slice 64 with 4 warps was
#: fastest (33.0 / 28.7 ms matched / default; 8 warps 34.4 / 29.8; slices 32 and 128 slower).
#: ``half_precision``: the ``tl.dot`` input precision, for bf16 / fp16 inputs, of the products that feed
#: the state (the key pass's gradients and the updates); ``half_read_precision``: of those that only
#: feed the output (the dual-form read). The state is carried across every chunk of the call, so its
#: products' rounding accumulates: with "tf32" everywhere (10-bit mantissas) the weights after 16K
#: tokens were 1.7e-2 from the fp32 chunked path's on the H100 (the default config; 5e-3 is the bf16
#: bound), "tf32x3" (three TF32 products, ~fp32) everywhere passed at twice the time. The default for the state is
#: "bf16x3" (three bf16 products of the operands' hi / lo parts, :func:`_mmap`; ``MNEMO_MEMORY_PRECISION`` sets it):
#: on the H100 at 16K the walk 36 → 20 µs a chunk and the sweep ~62–76 → 40–60, the op's forward + backward 39.7 →
#: 33.7 ms (matched); the state 2.7e-4 from the fp32 path after 16K tokens (tf32x3: 1.4e-5; bound 5e-3), gradients
#: unchanged (scripts/diag_memory_precision.py). The read keeps "tf32" (``MNEMO_MEMORY_READ_PRECISION`` sets it):
#: "bf16x3" there was slower (34.4 → 38.2 ms); one bf16 product of the rounded operands, tried, was 1.3–2.3 ms faster
#: but used half the output bound and broke the silu + LayerNorm config on the GPU (removed).
#: ``split_slice``: depth 2 splits the hidden dimension into slices of this width, one program each
#: (:func:`_lmm_split_fwd_kernel`), when, on a GPU, the ``B · H · slices`` programs fit on the SMs at once
#: (and, with the inline read, the chunk has ≥ 16 rows per slice), else twice the width, and so on; 0 = one
#: program per head (the kernel above). "auto": 32 without the clip where the walk can be built with a ptxas of CUDA
#: 12.9 or newer (Triton's own, or on Hopper the newer one Triton bundles: :func:`_walk_ptxas`), else 64
#: (:func:`_split_slice`: older ones build the 32-column walk wrong; with the clip it is slower).
#: ``MNEMO_MEMORY_SPLIT_SLICE`` sets it (e.g. 32, for a GPU test run at 32 columns everywhere).
#: ``split_read``: "batched" (the walk carries the recurrence alone; :func:`_lmm_chunk_read_kernel` then reads
#: every chunk in parallel, ``read_slice`` hidden columns per step, ``read_warps`` / ``read_stages``, chunks in
#: groups whose buffers stay under ``read_group_bytes``) or "inline" (the read inside the walk). On the H100 at
#: 16K the batched read took the forward from 19.6 / 17.5 ms to 15.6 / 12.6 (matched / default), the read
#: kernel itself ~1.1 ms. ``split_phase3``: where the walk's update phase gets σ(Z_1), Δ_1, Δ_2 ("recompute",
#: "scratch", "registers"; "auto" = registers on a GPU: 34 µs a chunk against 42 / 48, matched config).
#: ``split_carry``: the state slices carried in registers between chunks (not faster: off). ``split_host_phases``
#: (diagnostic): on a GPU too, the split walk as one launch per phase and chunk, the host ordering them as the
#: interpreter does, with no grid barrier (``scripts/diag_walk_split.py`` compares it with the one-launch walk). ``sweep_keep``:
#: the split sweep's phase 3 takes phase 2's values from registers (the default config's sweep 23 → 16 ms).
#: ``sweep_form``: the split sweep's phases (:func:`_lmm_split_sweep_kernel`): "three_phase" (two grid barriers a chunk),
#: "joined" (phase 2's product joined to phase 1, one barrier: ``JOIN``), "auto" = joined without the clip, three phases
#: with it. H100, 16K, the sweep's phase of the backward (nineteenth session): matched 10.17 → 7.49 ms joined; the
#: clipped default config 10.52 → 31.6 ms joined, 25.3 ms with its clip product computed beforehand (its tiles spill),
#: so it keeps three phases. Prefetching the chunks' inputs into L2
#: (``prefetch.global.L2`` ahead of the loads) was measured slower in the sweep and no faster in the walk (H100,
#: nineteenth session, docs/results/neural_memory.md) and removed.
#: ``exact_keys``: with bf16 inputs and "bf16x3", the walk's and the sweep's products with the keys (exact in bf16: no low
#: part) take two bf16 products instead of three, with the same sums in the same order (bit-identical results). The
#: walk's layer-1 update scales Δ_1 by the token weights, not the keys, so that it is one of them (H100, 16K: the walk
#: 5.13 -> 4.82 ms, eighteenth session).
#: ``profile``: a dict to receive the walk's / sweep's per-phase timer stamps (diagnostics; None = off).
#: ``sweep_pre_adjoint``: the split sweep writes the new adjoint's parts that need only the leaving one in phase 1 and
#: phase 3 adds ``dW`` alone (bit-identical; H200, 16K, matched: 31.45 -> 30.44 µs a chunk, twenty-sixth session;
#: ``MNEMO_MEMORY_SWEEP_PRE=0`` off).
#: ``sweep_precision`` (a diagnostic; env ``MNEMO_MEMORY_SWEEP_PRECISION``): the adjoint sweep's products alone, None = the
#: walk's ``half_precision``. "tf32" (one TF32 product instead of three bf16 ones) cut the sweep's chunk by a quarter on an
#: H200 (matched 30.4 -> 22.4 µs, op forward + backward 21.1 -> 19.8 ms; clipped default 35.1 -> 30.3 µs), but the adjoint
#: carries its rounding across chunks: the clipped config's bf16 gradients of k, v, θ went 2.7e-3 -> 1.3e-2 from the fp32
#: path at 4K and 5.8e-2 at 16K, over the 1e-2 bound (twenty-ninth session, docs/results/neural_memory.md).
LAUNCH: dict = {"hidden_slice": 64, "num_warps": 4, "num_stages": 1, "half_precision": os.environ.get("MNEMO_MEMORY_PRECISION", "bf16x3"),
                "half_read_precision": os.environ.get("MNEMO_MEMORY_READ_PRECISION", "tf32"),
                "split_slice": os.environ.get("MNEMO_MEMORY_SPLIT_SLICE", "auto"), "split_warps": 4, "sweep_slice": 64, "sweep_warps": 8,
                "sweep_split": "auto", "sweep_split_warps": 4,
                "split_read": "batched", "read_slice": 32, "read_warps": 4, "read_stages": 1, "read_group_bytes": 1 << 30,
                "split_carry": False, "split_host_phases": False, "split_phase3": "auto", "sweep_keep": True, "sweep_form": "auto", "exact_keys": True, "walk_exact_keys_min_cols": 64, "profile": None,
                "sweep_pre_adjoint": os.environ.get("MNEMO_MEMORY_SWEEP_PRE", "1") != "0",
                "sweep_precision": os.environ.get("MNEMO_MEMORY_SWEEP_PRECISION") or None, "sweep_u_store": "masked"}
#: ``sweep_u_store``: how the sweep's programs store Δ_2's cotangent for the update's VJP (``BACKWARD["update_u_from_sweep"]``;
#: :func:`_save_u`): "masked" (each program its rows ``≡ j (mod NS)`` by a masked store of the whole tile), "rows" (those
#: rows picked out of the tile first, then stored), "first" (program 0 stores the whole tile). H200, 16K, the sweep's phase
#: matched / clipped default: 6.72 / 9.31 ms masked, 7.35 / 10.07 rows, 8.23 / 13.38 first, 6.90 / 9.52 ms storing nothing
#: (thirty-first session). The offline Triton 3.9 build had predicted the opposite order (spills 1744 / 1012 / 1084 bytes
#: a thread against 972).
_U_STORES = ("rows", "first", "masked")


@triton.jit
def _mmap(a, b, acc, PREC: tl.constexpr):
    """``acc + a @ b`` accumulated in fp32 by the matrix unit, the products' precision ``PREC``: a Triton
    ``input_precision`` ("ieee", "tf32", "tf32x3") or "bf16x3", three bf16 products of the operands' hi / lo parts
    (:func:`~mnemotorch.ops.triton_dots.dot_split`: the cost of 1.5 TF32 products, a relative error of ~2⁻¹⁷ per term
    instead of TF32's 2⁻¹¹)."""
    if PREC == "bf16x3":
        return dot_split(a, b, acc)
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _mmp(a, b, PREC: tl.constexpr):
    """``a @ b`` in fp32 with the products' precision ``PREC`` (as :func:`_mmap`'s)."""
    if PREC == "bf16x3":
        return dot_split(a, b)
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _mmk(k, b, PREC: tl.constexpr, KB: tl.constexpr):
    """``k @ b`` where ``k`` (or its transpose) holds values of bf16 inputs (``KB``): under "bf16x3" its low part is
    zero, so two bf16 products give the same sums in the same order (:func:`~mnemotorch.ops.triton_dots.dot_split_right`)."""
    if KB and PREC == "bf16x3":
        return dot_split_right(k.to(tl.bfloat16), b)
    else:
        return _mmp(k.to(tl.float32), b, PREC)


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:
        out = z * tl.sigmoid(z)
    elif ACT == 1:
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    else:
        out = tl.maximum(z, 0.0)
    return out


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        s = tl.sigmoid(z)
        out = s * (1.0 + z * (1.0 - s))
    elif ACT == 1:
        out = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    else:
        out = tl.where(z > 0.0, 1.0, 0.0)
    return out


@triton.jit
def _ln_rows(z, D: tl.constexpr, eps):
    """Affine-free LayerNorm of each row of ``z [rows, D]``: ``(normalised, rstd [rows])``."""
    mu = tl.sum(z, 1) / D
    zc = z - mu[:, None]
    rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, 1) / D + eps)
    return zc * rstd[:, None], rstd


@triton.jit
def _loss_grad(z, k, v, D: tl.constexpr, eps, RESIDUAL: tl.constexpr, LN: tl.constexpr):
    """``∂‖M(k) − v‖² / ∂z`` of the last layer's pre-output ``z`` (LayerNorm backward included)."""
    if LN:
        out, rstd = _ln_rows(z, D, eps)
    else:
        out = z
    if RESIDUAL:
        pred = out + k
    else:
        pred = out
    d = 2.0 * (pred - v)
    if LN:
        d = rstd[:, None] * (d - (tl.sum(d, 1) / D)[:, None] - out * (tl.sum(d * out, 1) / D)[:, None])
    return d


@triton.jit
def _read_out(zh, q, D: tl.constexpr, eps, RESIDUAL: tl.constexpr, LN: tl.constexpr):
    """The memory's output ``M(q) = [q +] [LN](ẑ)`` from the last layer's pre-output ``ẑ [rows, D]``."""
    if LN:
        y, _r = _ln_rows(zh, D, eps)
    else:
        y = zh
    if RESIDUAL:
        y = y + q
    return y


@triton.jit
def _read_z1(q, ga, beta, f, w1, s1, d1, PREC_R: tl.constexpr):
    """The dual-form read's ``Ẑ_1 = β ∘ (Q W_1) + f ∘ (Q S_1) − (G̃ ∘ Q Kᵀ) Δ_1`` on a hidden slice's columns
    (``ga = G̃ ∘ Q Kᵀ``)."""
    return beta[:, None] * _mmp(q, w1, PREC_R) + f[:, None] * _mmp(q, s1, PREC_R) - _mmp(ga, d1, PREC_R)


@triton.jit
def _read_slice(q, ga, beta, f, w1, s1, d1, h1, w2, s2, acc2, p, ACT: tl.constexpr, PREC_R: tl.constexpr):
    """One hidden slice of the dual-form read: ``Ĥ = σ(Ẑ_1)`` on the slice's columns (:func:`_read_z1`), added into
    layer 2's ``β ∘ (Ĥ W_2) + f ∘ (Ĥ S_2)`` (``acc2``) and ``Ĥ Hᵀ`` (``p``)."""
    hh = _act(_read_z1(q, ga, beta, f, w1, s1, d1, PREC_R), ACT)
    acc2 = _mmap(beta[:, None] * hh, w2, acc2, PREC_R)
    acc2 = _mmap(f[:, None] * hh, s2, acc2, PREC_R)
    p = _mmap(hh, tl.trans(h1), p, PREC_R)
    return acc2, p


@triton.jit
def _rows_f32(base, t, stride_t):
    """Rows ``t`` of a token-major tile (``base`` already offset by batch, head and column), in fp32."""
    return tl.load(base + t[:, None] * stride_t).to(tl.float32)


@triton.jit
def _last(x, rows, C: tl.constexpr):
    """Row ``C − 1`` of ``x [C, C]`` as a vector (indexed by column)."""
    return tl.sum(tl.where(rows[:, None] == C - 1, x, 0.0), 0)


@triton.jit
def _last1(x, rows, C: tl.constexpr):
    """Element ``C − 1`` of ``x [C]``."""
    return tl.sum(tl.where(rows == C - 1, x, 0.0), 0)


@triton.jit
def _lmm_fused_fwd_kernel(
    Q, K, V, Y,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, syb, syt, syh,
    G, NM, BETA, MV, FV,
    W1, S1, W2, S2, Z1, D1, SLOT1, SLOT2,
    n_chunks, H, ln_eps, max_norm,
    C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, HID: tl.constexpr, BH: tl.constexpr,
    DEPTH: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr, LN: tl.constexpr, CLIP: tl.constexpr,
    PREC: tl.constexpr, PREC_R: tl.constexpr,
):
    pid = tl.program_id(0)
    nbh = tl.num_programs(0)
    b = pid // H
    h = pid % H
    rows = tl.arange(0, C)
    ck = tl.arange(0, DK)
    cv = tl.arange(0, DV)
    ch = tl.arange(0, BH)
    w1_base = W1 + pid * DK * HID
    s1_base = S1 + pid * DK * HID
    w2_base = W2 + pid * HID * DV
    s2_base = S2 + pid * HID * DV
    z1_base = Z1 + pid * C * HID
    d1_base = D1 + pid * C * HID
    for i in range(n_chunks):
        # chunk i reads the state from slot i and writes it to slot i + 1 (SLOT = 0: in place)
        r1 = i * SLOT1
        r2 = i * SLOT2
        t = i * C + rows
        q = tl.load(Q + b * sqb + h * sqh + t[:, None] * sqt + ck[None, :]).to(tl.float32)
        k = tl.load(K + b * skb + h * skh + t[:, None] * skt + ck[None, :]).to(tl.float32)
        v = tl.load(V + b * svb + h * svh + t[:, None] * svt + cv[None, :]).to(tl.float32)
        cc = (i * nbh + pid) * C * C
        gm = tl.load(G + cc + rows[:, None] * C + rows[None, :])
        nm = tl.load(NM + cc + rows[:, None] * C + rows[None, :])
        c1 = (i * nbh + pid) * C
        beta = tl.load(BETA + c1 + rows)
        m = tl.load(MV + c1 + rows)
        f = tl.load(FV + c1 + rows)
        b_c = _last1(beta, rows, C)
        m_c = _last1(m, rows, C)
        f_c = _last1(f, rows, C)
        qk = _mmp(q, tl.trans(k), PREC_R)  # [C, C]
        if DEPTH == 1:
            w1 = tl.load(w1_base + r1 + ck[:, None] * DV + cv[None, :], cache_modifier=".cg")
            s1 = tl.load(s1_base + r1 + ck[:, None] * DV + cv[None, :], cache_modifier=".cg")
            d2 = _loss_grad(_mmp(k, w1, PREC), k, v, DV, ln_eps, RESIDUAL, LN)
            if CLIP:
                sq = tl.sum(k * k, 1) * tl.sum(d2 * d2, 1)
                scale = max_norm / tl.sqrt(tl.maximum(sq, max_norm * max_norm))
                gm = gm * scale[None, :]
                nm = nm * scale[None, :]
            zh = beta[:, None] * _mmp(q, w1, PREC_R) + f[:, None] * _mmp(q, s1, PREC_R) - _mmp(gm * qk, d2, PREC_R)
            g_l = _last(gm, rows, C)
            n_l = _last(nm, rows, C)
            w1n = b_c * w1 + f_c * s1 - _mmp(tl.trans(g_l[:, None] * k), d2, PREC)
            s1n = m_c * s1 - _mmp(tl.trans(n_l[:, None] * k), d2, PREC)
            tl.debug_barrier()
            tl.store(w1_base + r1 + SLOT1 + ck[:, None] * DV + cv[None, :], w1n)
            tl.store(s1_base + r1 + SLOT1 + ck[:, None] * DV + cv[None, :], s1n)
        else:
            # (A) key forward at the chunk-start weights: Z_1 to the scratch, Z_2 summed over slices.
            z2 = tl.zeros([C, DV], dtype=tl.float32)
            hn = tl.zeros([C], dtype=tl.float32)
            for j in range(0, HID, BH):
                cols = j + ch
                w1 = tl.load(w1_base + r1 + ck[:, None] * HID + cols[None, :], cache_modifier=".cg")
                z1 = _mmp(k, w1, PREC)
                tl.store(z1_base + rows[:, None] * HID + cols[None, :], z1)
                h1 = _act(z1, ACT)
                hn += tl.sum(h1 * h1, 1)
                w2 = tl.load(w2_base + r2 + cols[:, None] * DV + cv[None, :], cache_modifier=".cg")
                z2 = _mmap(h1, w2, z2, PREC)
            d2 = _loss_grad(z2, k, v, DV, ln_eps, RESIDUAL, LN)
            tl.debug_barrier()
            # (B) Δ_1 = (Δ_2 W_2ᵀ) ∘ σ'(Z_1) to the scratch, and its per-token squared norms.
            dn1 = tl.zeros([C], dtype=tl.float32)
            for j in range(0, HID, BH):
                cols = j + ch
                w2 = tl.load(w2_base + r2 + cols[:, None] * DV + cv[None, :], cache_modifier=".cg")
                z1 = tl.load(z1_base + rows[:, None] * HID + cols[None, :], cache_modifier=".cg")
                d1 = _mmp(d2, tl.trans(w2), PREC) * _act_grad(z1, ACT)
                tl.store(d1_base + rows[:, None] * HID + cols[None, :], d1)
                dn1 += tl.sum(d1 * d1, 1)
            tl.debug_barrier()
            if CLIP:
                # ‖∇_s‖² = ‖k_s‖²‖Δ_1[s]‖² + ‖h_s‖²‖Δ_2[s]‖²; the clip scales θ_s, i.e. column s of G and N.
                sq = tl.sum(k * k, 1) * dn1 + hn * tl.sum(d2 * d2, 1)
                scale = max_norm / tl.sqrt(tl.maximum(sq, max_norm * max_norm))
                gm = gm * scale[None, :]
                nm = nm * scale[None, :]
            ga = gm * qk
            g_l = _last(gm, rows, C)
            n_l = _last(nm, rows, C)
            gk = tl.trans(g_l[:, None] * k)  # [DK, C]
            nk = tl.trans(n_l[:, None] * k)
            # (C) dual-form read and state update, slice by slice.
            acc2 = tl.zeros([C, DV], dtype=tl.float32)
            p = tl.zeros([C, C], dtype=tl.float32)
            for j in range(0, HID, BH):
                cols = j + ch
                w1 = tl.load(w1_base + r1 + ck[:, None] * HID + cols[None, :], cache_modifier=".cg")
                s1 = tl.load(s1_base + r1 + ck[:, None] * HID + cols[None, :], cache_modifier=".cg")
                z1 = tl.load(z1_base + rows[:, None] * HID + cols[None, :], cache_modifier=".cg")
                d1 = tl.load(d1_base + rows[:, None] * HID + cols[None, :], cache_modifier=".cg")
                h1 = _act(z1, ACT)
                w2 = tl.load(w2_base + r2 + cols[:, None] * DV + cv[None, :], cache_modifier=".cg")
                s2 = tl.load(s2_base + r2 + cols[:, None] * DV + cv[None, :], cache_modifier=".cg")
                acc2, p = _read_slice(q, ga, beta, f, w1, s1, d1, h1, w2, s2, acc2, p, ACT, PREC_R)
                w1n = b_c * w1 + f_c * s1 - _mmp(gk, d1, PREC)
                s1n = m_c * s1 - _mmp(nk, d1, PREC)
                w2n = b_c * w2 + f_c * s2 - _mmp(tl.trans(g_l[:, None] * h1), d2, PREC)
                s2n = m_c * s2 - _mmp(tl.trans(n_l[:, None] * h1), d2, PREC)
                tl.store(w1_base + r1 + SLOT1 + ck[:, None] * HID + cols[None, :], w1n)
                tl.store(s1_base + r1 + SLOT1 + ck[:, None] * HID + cols[None, :], s1n)
                tl.store(w2_base + r2 + SLOT2 + cols[:, None] * DV + cv[None, :], w2n)
                tl.store(s2_base + r2 + SLOT2 + cols[:, None] * DV + cv[None, :], s2n)
            zh = acc2 - _mmp(gm * p, d2, PREC_R)
        y = _read_out(zh, q, DV, ln_eps, RESIDUAL, LN)
        tl.store(Y + b * syb + h * syh + t[:, None] * syt + cv[None, :], y.to(Y.dtype.element_ty))
        # the next chunk reads the state (and rewrites the scratch) this chunk wrote
        tl.debug_barrier()


# ---------------------------------------------------------------------------------------------
# depth 2, the hidden dimension split over NS programs per (batch row, head)


@triton.jit
def _update_pair(wp, sp, SLOT, w_kept, s_kept, x, delta, g_l, n_l, b_c, m_c, f_c, CARRY: tl.constexpr, PREC: tl.constexpr,
                 XK: tl.constexpr = False, KB: tl.constexpr = False):
    """One layer's slice of the update at a chunk's end, ``W' = β_c W + f_c S − (g̃ ∘ X)ᵀ Δ``,
    ``S' = m_c S − (ñ ∘ X)ᵀ Δ`` (``g̃, ñ``: the last rows of G, N; X the layer's input, Δ its pre-activation
    gradient), from the state at ``wp / sp`` (or ``w_kept / s_kept`` with ``CARRY``), written ``SLOT`` further.
    ``XK``: X is layer 1's keys; the token weights then scale Δ instead, ``Xᵀ (g̃ ∘ Δ)``, so that with ``KB`` (keys
    of bf16 inputs) X stays exact in bf16 and each product takes two bf16 products, not three (:func:`_mmk`).
    Returns ``(W', S')``."""
    if CARRY:
        w = w_kept
        s = s_kept
    else:
        w = tl.load(wp, cache_modifier=".cg")
        s = tl.load(sp, cache_modifier=".cg")
    if XK:
        xt = tl.trans(x)
        wn = b_c * w + f_c * s - _mmk(xt, g_l[:, None] * delta, PREC, KB)
        sn = m_c * s - _mmk(xt, n_l[:, None] * delta, PREC, KB)
    else:
        wn = b_c * w + f_c * s - _mmp(tl.trans(g_l[:, None] * x), delta, PREC)
        sn = m_c * s - _mmp(tl.trans(n_l[:, None] * x), delta, PREC)
    tl.store(wp + SLOT, wn)
    tl.store(sp + SLOT, sn)
    return wn, sn


@triton.jit
def _now(x):
    """The GPU's global timer in ns (``%globaltimer``; ``x``, any scalar, only gives the value a shape)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [x], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _grid_barrier(cnt_ptr, target):
    """Wait until ``target`` arrivals are counted at ``cnt_ptr`` (this program's included). Every program
    of the group must be resident at once (the host checks the grid against the SM count)."""
    tl.debug_barrier()  # this program's global writes are done before it says so
    tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _sum_parts(base, stride_part, offs, NS: tl.constexpr):
    """``Σ_j base[j · stride_part + offs]`` over the NS programs' partial results (read through L2)."""
    acc = tl.load(base + offs, cache_modifier=".cg")
    for jj in tl.static_range(1, NS):
        acc += tl.load(base + jj * stride_part + offs, cache_modifier=".cg")
    return acc


@triton.jit
def _split_z2(XZ2, xo, rows, cv, C: tl.constexpr, DV: tl.constexpr, NS: tl.constexpr):
    """``Z_2`` of the chunk: the sum of the head's NS partial products."""
    return _sum_parts(XZ2 + xo * C * DV, C * DV, rows[:, None] * DV + cv[None, :], NS)


@triton.jit
def _split_d2(XZ2, xo, rows, cv, k, v, ln_eps, C: tl.constexpr, DV: tl.constexpr, NS: tl.constexpr,
              RESIDUAL: tl.constexpr, LN: tl.constexpr):
    """``Δ_2`` of the chunk from the NS partial sums of ``Z_2``."""
    return _loss_grad(_split_z2(XZ2, xo, rows, cv, C, DV, NS), k, v, DV, ln_eps, RESIDUAL, LN)


@triton.jit
def _split_scale(XHN, XDN, xo, rows, k, d2, max_norm, C: tl.constexpr, NS: tl.constexpr):
    """The clip's per-token factor from the NS partial squared norms."""
    hn = _sum_parts(XHN + xo * C, C, rows, NS)
    dn1 = _sum_parts(XDN + xo * C, C, rows, NS)
    sq = tl.sum(k * k, 1) * dn1 + hn * tl.sum(d2 * d2, 1)
    return max_norm / tl.sqrt(tl.maximum(sq, max_norm * max_norm))


@triton.jit
def _lmm_split_fwd_kernel(
    Q, K, V, Y,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, syb, syt, syh,
    G, NM, BETA, MV, FV,
    W1, S1, W2, S2, Z1, D1, SLOT1, SLOT2,
    XZ2, XHN, XDN, XACC, XP, CNT,
    D2O, Z2O, SCO, HS, DS, D2S, slot0, zrow0, ZS, PROF,
    chunk0, n_chunks, H, ln_eps, max_norm,
    C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, HID: tl.constexpr, BH: tl.constexpr, NS: tl.constexpr,
    ACT: tl.constexpr, RESIDUAL: tl.constexpr, LN: tl.constexpr, CLIP: tl.constexpr,
    PREC: tl.constexpr, PREC_R: tl.constexpr, PHASE: tl.constexpr, READ: tl.constexpr, PROFILE: tl.constexpr = False,
    CARRY: tl.constexpr = False, P3: tl.constexpr = 1, KB: tl.constexpr = False, PTXAS: tl.constexpr = "",
):
    # Where phase 3 (READ == False) gets σ(Z_1), Δ_1 and Δ_2, which phases 1 and 2 computed: P3 = 0 recomputes
    # them (activations, LayerNorm backward: latency-bound elementwise passes at one 4-warp program per SM),
    # 1 reads them from the program's scratch (HS, DS, D2S; three more stores in phases 1 and 2), 2 keeps
    # them in registers across the barrier (pressure on registers instead).
    """Depth 2 with hidden slice ``j`` of head ``bh`` in program ``bh · NS + j``: its columns of W_1/S_1,
    rows of W_2/S_2, and ``Z_1``/``Δ_1`` columns are its own; the sums over the hidden dimension
    (``Z_2``, the clip's norms, the read's layer-2 terms) are exchanged through per-head buffers
    (double-buffered by chunk parity) between the phases of a chunk:

    1. ``Z_1 = K W_1[:, j]`` (kept), partial ``Z_2 = σ(Z_1) W_2[j]`` and ``‖h‖²``;
    2. ``Δ_2`` from the summed ``Z_2``; ``Δ_1[:, j]`` (kept) and its partial squared norms;
    3. the clip; the dual-form read of slice ``j`` and its partial layer-2 read; the update of slice ``j``;
    4. rows ``j·C/NS …`` of the output from the summed partial reads.

    ``PHASE == 0``: one launch walks every chunk, the phases separated by a grid barrier among the
    head's NS programs (they must all be resident). ``PHASE`` 1–4: one phase of chunk ``chunk0`` per
    launch (the host serialises them; Triton's interpreter, which runs programs one after another).

    ``READ == False`` (the recurrence alone): phase 3 only updates the state and phase 4 is skipped, so a
    chunk needs one grid barrier (two with the clip) instead of two (three). The read is left to
    :func:`_lmm_chunk_read_kernel`, parallel over chunks, which takes what this kernel leaves per chunk:
    ``Z_1``, ``P = Δ_2 W_2ᵀ`` (in ``D1``; ``Δ_1 = P ∘ σ'(Z_1)``), ``Δ_2`` (``D2O``), ``Z_2`` (``Z2O``, for the
    backward) and the clip's factor (``SCO``); and the state entering the
    chunk, which it writes to slot ``i − slot0 + 1`` of ``W1 … S2`` (``SLOT1 / SLOT2`` > 0). Those buffers hold a
    group of chunks: row ``i − zrow0``, ``ZS`` the row stride of ``Z1`` / ``D1``.

    ``CARRY`` (with ``READ == False`` and ``PHASE == 0``): the program's state slices stay in registers from
    chunk to chunk (each chunk still writes them to its slot) instead of being read back through L2.

    ``PROFILE`` (diagnostics, GPU only): each program writes the global timer (ns) at 8 points of every chunk
    to ``PROF [programs, n_chunks, 8]``: chunk start, end of phase 1, after its barrier, end of phase 2,
    after its barrier, end of phase 3, after its barrier, end of phase 4 (points a configuration skips repeat
    the previous time).

    ``PTXAS`` is not read: it names the release of the ptxas the kernel is built with where that is not the one
    Triton would take (:func:`_launch_split`), so that Triton's caches keep the two builds apart."""
    pid = tl.program_id(0)
    bh = pid // NS
    j = pid % NS
    b = bh // H
    h = bh % H
    rows = tl.arange(0, C)
    ck = tl.arange(0, DK)
    cv = tl.arange(0, DV)
    cols = j * BH + tl.arange(0, BH)
    RB: tl.constexpr = C // NS
    sub = j * RB + tl.arange(0, RB)
    nbh = tl.num_programs(0) // NS
    w1p = W1 + bh * DK * HID + ck[:, None] * HID + cols[None, :]
    s1p = S1 + bh * DK * HID + ck[:, None] * HID + cols[None, :]
    w2p = W2 + bh * HID * DV + cols[:, None] * DV + cv[None, :]
    s2p = S2 + bh * HID * DV + cols[:, None] * DV + cv[None, :]
    z1q = Z1 + bh * C * HID + rows[:, None] * HID + cols[None, :]
    d1q = D1 + bh * C * HID + rows[:, None] * HID + cols[None, :]
    NB: tl.constexpr = (3 if CLIP else 2) if READ else (2 if CLIP else 1)  # grid barriers per chunk
    hsp = HS + bh * C * HID + rows[:, None] * HID + cols[None, :]
    dsp = DS + bh * C * HID + rows[:, None] * HID + cols[None, :]
    d2sp = D2S + pid * C * DV + rows[:, None] * DV + cv[None, :]
    kb = K + b * skb + h * skh + ck[None, :]  # k and v are reloaded where used (L2-resident) rather than kept
    vb = V + b * svb + h * svh + cv[None, :]  # live across the phases: each [C, D] fp32 tile is 32 registers a thread
    if CARRY:
        cw1 = tl.load(w1p + (chunk0 - slot0) * SLOT1, cache_modifier=".cg")
        cs1 = tl.load(s1p + (chunk0 - slot0) * SLOT1, cache_modifier=".cg")
        cw2 = tl.load(w2p + (chunk0 - slot0) * SLOT2, cache_modifier=".cg")
        cs2 = tl.load(s2p + (chunk0 - slot0) * SLOT2, cache_modifier=".cg")
    else:  # placeholders: _update_pair reads the state from its slot
        cw1 = 0.0
        cs1 = 0.0
        cw2 = 0.0
        cs2 = 0.0
    for i in range(chunk0, chunk0 + n_chunks):
        par = i % 2
        r1 = (i - slot0) * SLOT1  # chunk i reads the state from slot i - slot0, writes the next (SLOT = 0: in place)
        r2 = (i - slot0) * SLOT2
        z1p = z1q + (i - zrow0) * ZS
        d1p = d1q + (i - zrow0) * ZS
        pr = PROF + (pid * n_chunks + (i - chunk0)) * 8
        if PROFILE:
            tl.store(pr, _now(pid))
        xo = (bh * 2 + par) * NS  # first of this head's NS partial slots for this chunk parity
        t = i * C + rows
        if PHASE == 0 or PHASE == 1:
            k = _rows_f32(kb, t, skt)
            if CARRY:
                w1 = cw1
            else:
                w1 = tl.load(w1p + r1, cache_modifier=".cg")
            z1 = _mmk(k, w1, PREC, KB)
            tl.store(z1p, z1)
            h1 = _act(z1, ACT)
            if not READ and P3 == 1:
                tl.store(hsp, h1)
            if CLIP:  # (the norms feed the clip's scale only: without it, no row sums on the chain)
                tl.store(XHN + (xo + j) * C + rows, tl.sum(h1 * h1, 1))
            if CARRY:
                w2 = cw2
            else:
                w2 = tl.load(w2p + r2, cache_modifier=".cg")
            tl.store(XZ2 + (xo + j) * C * DV + rows[:, None] * DV + cv[None, :], _mmp(h1, w2, PREC))
        if PROFILE:
            tl.store(pr + 1, _now(pid))
        if PHASE == 0:
            _grid_barrier(CNT + bh, NS * (i * NB + 1))
        if PROFILE:
            tl.store(pr + 2, _now(pid))
        if PHASE == 0 or PHASE == 2:
            k = _rows_f32(kb, t, skt)
            v = _rows_f32(vb, t, svt)
            z2 = _split_z2(XZ2, xo, rows, cv, C, DV, NS)
            d2 = _loss_grad(z2, k, v, DV, ln_eps, RESIDUAL, LN)
            if CARRY:
                w2 = cw2
            else:
                w2 = tl.load(w2p + r2, cache_modifier=".cg")
            z1 = tl.load(z1p, cache_modifier=".cg")
            pd = _mmp(d2, tl.trans(w2), PREC)
            d1 = pd * _act_grad(z1, ACT)
            if READ:
                tl.store(d1p, d1)
            else:
                tl.store(d1p, pd)
                if P3 == 1:
                    tl.store(dsp, d1)
                    tl.store(d2sp, d2)
                if j == 0:
                    tl.store(D2O + ((i - zrow0) * nbh + bh) * C * DV + rows[:, None] * DV + cv[None, :], d2)
                    tl.store(Z2O + ((i - zrow0) * nbh + bh) * C * DV + rows[:, None] * DV + cv[None, :], z2)
            if CLIP:
                tl.store(XDN + (xo + j) * C + rows, tl.sum(d1 * d1, 1))
        if PROFILE:
            tl.store(pr + 3, _now(pid))
        if PHASE == 0 and CLIP:
            _grid_barrier(CNT + bh, NS * (i * NB + 2))
        elif PHASE == 0:
            tl.debug_barrier()  # Δ_1 / Z_1 written above are read back below by other threads of this program
        if PROFILE:
            tl.store(pr + 4, _now(pid))
        cc = (i * nbh + bh) * C * C
        c1 = (i * nbh + bh) * C
        if (PHASE == 0 or PHASE == 3) and not READ:
            # the recurrence alone: the update of slice j (the read is another kernel's)
            k = _rows_f32(kb, t, skt)
            if P3 == 0:
                d2 = _split_d2(XZ2, xo, rows, cv, k, _rows_f32(vb, t, svt), ln_eps, C, DV, NS, RESIDUAL, LN)
            elif P3 == 1:
                d2 = tl.load(d2sp, cache_modifier=".cg")
            g_l = tl.load(G + cc + (C - 1) * C + rows)
            n_l = tl.load(NM + cc + (C - 1) * C + rows)
            if CLIP:
                scale = _split_scale(XHN, XDN, xo, rows, k, d2, max_norm, C, NS)
                if j == 0:
                    tl.store(SCO + ((i - zrow0) * nbh + bh) * C + rows, scale)
                g_l = g_l * scale
                n_l = n_l * scale
            b_c = tl.load(BETA + c1 + C - 1)
            m_c = tl.load(MV + c1 + C - 1)
            f_c = tl.load(FV + c1 + C - 1)
            if P3 == 0:
                z1 = tl.load(z1p, cache_modifier=".cg")
                d1 = tl.load(d1p, cache_modifier=".cg") * _act_grad(z1, ACT)
            elif P3 == 1:
                d1 = tl.load(dsp, cache_modifier=".cg")
            w1n, s1n = _update_pair(w1p + r1, s1p + r1, SLOT1, cw1, cs1, k, d1, g_l, n_l, b_c, m_c, f_c, CARRY, PREC, True, KB)
            if P3 == 0:
                h1 = _act(z1, ACT)
            elif P3 == 1:
                h1 = tl.load(hsp, cache_modifier=".cg")
            w2n, s2n = _update_pair(w2p + r2, s2p + r2, SLOT2, cw2, cs2, h1, d2, g_l, n_l, b_c, m_c, f_c, CARRY, PREC)
            if CARRY:
                cw1 = w1n
                cs1 = s1n
                cw2 = w2n
                cs2 = s2n
            if PHASE == 0:
                # the next chunk's phase 1 reads the state slot written above and rewrites HS read above, in other
                # threads of this program (the inline read's grid barrier below orders them otherwise)
                tl.debug_barrier()
        if (PHASE == 0 or PHASE == 3) and READ:
            # The order keeps few [C, ·] tiles live at once (with all of them loaded up front the 4-warp
            # program spilled ~900 bytes a thread): layer 1's state is read, used by the read and updated
            # before layer 2's is loaded; only the last rows of the coefficient matrices feed the update.
            k = _rows_f32(kb, t, skt)
            d2 = _split_d2(XZ2, xo, rows, cv, k, _rows_f32(vb, t, svt), ln_eps, C, DV, NS, RESIDUAL, LN)
            g_l = tl.load(G + cc + (C - 1) * C + rows)
            n_l = tl.load(NM + cc + (C - 1) * C + rows)
            if CLIP:
                scale = _split_scale(XHN, XDN, xo, rows, k, d2, max_norm, C, NS)
                g_l = g_l * scale
                n_l = n_l * scale
            beta = tl.load(BETA + c1 + rows)
            f = tl.load(FV + c1 + rows)
            b_c = tl.load(BETA + c1 + C - 1)
            m_c = tl.load(MV + c1 + C - 1)
            f_c = tl.load(FV + c1 + C - 1)
            q = tl.load(Q + b * sqb + h * sqh + t[:, None] * sqt + ck[None, :]).to(tl.float32)
            w1 = tl.load(w1p + r1, cache_modifier=".cg")
            s1 = tl.load(s1p + r1, cache_modifier=".cg")
            zh = beta[:, None] * _mmp(q, w1, PREC_R) + f[:, None] * _mmp(q, s1, PREC_R)
            d1 = tl.load(d1p, cache_modifier=".cg")
            tl.store(w1p + r1 + SLOT1, b_c * w1 + f_c * s1 - _mmp(tl.trans(g_l[:, None] * k), d1, PREC))
            tl.store(s1p + r1 + SLOT1, m_c * s1 - _mmp(tl.trans(n_l[:, None] * k), d1, PREC))
            gm = tl.load(G + cc + rows[:, None] * C + rows[None, :])
            if CLIP:
                gm = gm * scale[None, :]
            zh = zh - _mmp(gm * _mmp(q, tl.trans(k), PREC_R), d1, PREC_R)
            hh = _act(zh, ACT)
            h1 = _act(tl.load(z1p, cache_modifier=".cg"), ACT)
            tl.store(XP + (xo + j) * C * C + rows[:, None] * C + rows[None, :], _mmp(hh, tl.trans(h1), PREC_R))
            w2 = tl.load(w2p + r2, cache_modifier=".cg")
            s2 = tl.load(s2p + r2, cache_modifier=".cg")
            acc2 = _mmp(beta[:, None] * hh, w2, PREC_R)
            acc2 = _mmap(f[:, None] * hh, s2, acc2, PREC_R)
            tl.store(XACC + (xo + j) * C * DV + rows[:, None] * DV + cv[None, :], acc2)
            tl.store(w2p + r2 + SLOT2, b_c * w2 + f_c * s2 - _mmp(tl.trans(g_l[:, None] * h1), d2, PREC))
            tl.store(s2p + r2 + SLOT2, m_c * s2 - _mmp(tl.trans(n_l[:, None] * h1), d2, PREC))
        if PROFILE:
            tl.store(pr + 5, _now(pid))
        if PHASE == 0 and READ:
            _grid_barrier(CNT + bh, NS * (i * NB + NB))
        if PROFILE:
            tl.store(pr + 6, _now(pid))
        if (PHASE == 0 or PHASE == 4) and READ:
            k = _rows_f32(kb, t, skt)
            d2 = _split_d2(XZ2, xo, rows, cv, k, _rows_f32(vb, t, svt), ln_eps, C, DV, NS, RESIDUAL, LN)
            gs = tl.load(G + cc + sub[:, None] * C + rows[None, :])
            if CLIP:
                gs = gs * _split_scale(XHN, XDN, xo, rows, k, d2, max_norm, C, NS)[None, :]
            acc2 = _sum_parts(XACC + xo * C * DV, C * DV, sub[:, None] * DV + cv[None, :], NS)
            pp = _sum_parts(XP + xo * C * C, C * C, sub[:, None] * C + rows[None, :], NS)
            zh = acc2 - _mmp(gs * pp, d2, PREC_R)
            ts = i * C + sub
            if RESIDUAL:
                qs = tl.load(Q + b * sqb + h * sqh + ts[:, None] * sqt + ck[None, :]).to(tl.float32)
            else:
                qs = zh  # not read
            y = _read_out(zh, qs, DV, ln_eps, RESIDUAL, LN)
            tl.store(Y + b * syb + h * syh + ts[:, None] * syt + cv[None, :], y.to(Y.dtype.element_ty))
        if PROFILE:
            tl.store(pr + 7, _now(pid))


@triton.jit
def _lmm_chunk_read_kernel(
    Q, K, Y,
    sqb, sqt, sqh, skb, skt, skh, syb, syt, syh,
    G, BETA, FV,
    W1, S1, W2, S2, SLOT1, SLOT2, Z1, PD, D2O, SCO, RAW, RAS, RAP, RZ1,
    chunk0, slot0, H, ln_eps,
    C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, HID: tl.constexpr, BH: tl.constexpr,
    ACT: tl.constexpr, RESIDUAL: tl.constexpr, LN: tl.constexpr, CLIP: tl.constexpr, PREC_R: tl.constexpr,
    SAVE: tl.constexpr = False, SAVE_Z: tl.constexpr = False,
):
    """The dual-form read of depth 2, one program per (head ``bh``, chunk ``chunk0 + program_id(1)``), after
    :func:`_lmm_split_fwd_kernel` (``READ=False``) walked the chunks: it reads the state entering the chunk
    from slot ``i − slot0`` of ``W1 … S2`` and the key pass's ``Z_1``, ``P`` (``Δ_1 = P ∘ σ'(Z_1)``), ``Δ_2``
    and clip factor from row ``i − chunk0`` of ``Z1 / PD / D2O / SCO``. No chunk depends on another here::

        Ẑ_1 = β ∘ (Q W_1) + f ∘ (Q S_1) − (G̃ ∘ Q Kᵀ) Δ_1,   Ĥ = σ(Ẑ_1)
        Ẑ_2 = β ∘ (Ĥ W_2) + f ∘ (Ĥ S_2) − (G̃ ∘ Ĥ Hᵀ) Δ_2,   y = [q +] [LN](Ẑ_2)

    (``G̃``: ``G`` with column s scaled by the clip's factor of token s), summed over hidden slices of ``BH``.
    ``SAVE``: layer 2's three sums over the hidden dimension, ``Ĥ W_2``, ``Ĥ S_2`` and ``Ĥ Hᵀ``, are also written
    (``RAW, RAS [G, B·H, C, DV]``, ``RAP [G, B·H, C, C]``, row ``program_id(1)`` as ``Z1 … SCO``) for the read's VJP, whose
    pass A then takes them instead of recomputing the read over every hidden slice (``β ∘ (Ĥ W_2)`` and
    ``f ∘ (Ĥ S_2)`` are then summed apart and scaled after the loop, not added into one accumulator). ``SAVE_Z``
    (with ``SAVE``): the read's pre-activation ``Ẑ_1`` too (``RZ1 [G, B·H, C, HID]``), for pass B."""
    bh = tl.program_id(0)
    li = tl.program_id(1)
    nbh = tl.num_programs(0)
    i = chunk0 + li
    b = bh // H
    h = bh % H
    rows = tl.arange(0, C)
    ck = tl.arange(0, DK)
    cv = tl.arange(0, DV)
    ch = tl.arange(0, BH)
    t = i * C + rows
    q = tl.load(Q + b * sqb + h * sqh + t[:, None] * sqt + ck[None, :]).to(tl.float32)
    k = tl.load(K + b * skb + h * skh + t[:, None] * skt + ck[None, :]).to(tl.float32)
    cc = (i * nbh + bh) * C * C
    c1 = (i * nbh + bh) * C
    row = li * nbh + bh
    gm = tl.load(G + cc + rows[:, None] * C + rows[None, :])
    if CLIP:
        gm = gm * tl.load(SCO + row * C + rows)[None, :]
    ga = gm * _mmp(q, tl.trans(k), PREC_R)
    beta = tl.load(BETA + c1 + rows)
    f = tl.load(FV + c1 + rows)
    r1 = (i - slot0) * SLOT1 + bh * DK * HID
    r2 = (i - slot0) * SLOT2 + bh * HID * DV
    zrow = Z1 + row * C * HID + rows[:, None] * HID
    prow = PD + row * C * HID + rows[:, None] * HID
    acc2 = tl.zeros([C, DV], dtype=tl.float32)
    p = tl.zeros([C, C], dtype=tl.float32)
    if SAVE:
        acc_s = tl.zeros([C, DV], dtype=tl.float32)
    for j in range(0, HID, BH):
        cols = j + ch
        w1 = tl.load(W1 + r1 + ck[:, None] * HID + cols[None, :])
        s1 = tl.load(S1 + r1 + ck[:, None] * HID + cols[None, :])
        z1 = tl.load(zrow + cols[None, :])
        d1 = tl.load(prow + cols[None, :]) * _act_grad(z1, ACT)
        w2 = tl.load(W2 + r2 + cols[:, None] * DV + cv[None, :])
        s2 = tl.load(S2 + r2 + cols[:, None] * DV + cv[None, :])
        if SAVE:  # Ĥ W_2 and Ĥ S_2 apart (acc2, acc_s)
            zh1 = _read_z1(q, ga, beta, f, w1, s1, d1, PREC_R)
            if SAVE_Z:
                tl.store(RZ1 + row * C * HID + rows[:, None] * HID + cols[None, :], zh1)
            hh = _act(zh1, ACT)
            acc2 = _mmap(hh, w2, acc2, PREC_R)
            acc_s = _mmap(hh, s2, acc_s, PREC_R)
            p = _mmap(hh, tl.trans(_act(z1, ACT)), p, PREC_R)
        else:
            acc2, p = _read_slice(q, ga, beta, f, w1, s1, d1, _act(z1, ACT), w2, s2, acc2, p, ACT, PREC_R)
    if SAVE:
        parts = row * C
        tl.store(RAW + parts * DV + rows[:, None] * DV + cv[None, :], acc2)
        tl.store(RAS + parts * DV + rows[:, None] * DV + cv[None, :], acc_s)
        tl.store(RAP + parts * C + rows[:, None] * C + rows[None, :], p)
        acc2 = beta[:, None] * acc2 + f[:, None] * acc_s
    d2 = tl.load(D2O + row * C * DV + rows[:, None] * DV + cv[None, :])
    zh = acc2 - _mmp(gm * p, d2, PREC_R)
    y = _read_out(zh, q, DV, ln_eps, RESIDUAL, LN)
    tl.store(Y + b * syb + h * syh + t[:, None] * syt + cv[None, :], y.to(Y.dtype.element_ty))


def _state_buffers(x: Tensor, n: int, store_states: bool) -> tuple[Tensor, int]:
    """The kernel's fp32 state buffer for one state tensor ``x [B, H, d_in, d_out]`` and its slot stride.

    ``store_states``: ``[n + 1, B, H, d_in, d_out]``, slot 0 = ``x``; chunk ``i`` reads slot ``i`` and
    writes slot ``i + 1`` (the checkpoints the backward reads). Else one copy, rewritten in place."""
    if not store_states:
        return x.to(torch.float32).contiguous().clone(), 0
    buf = x.new_empty((n + 1, *x.shape), dtype=torch.float32)
    buf[0].copy_(x)
    return buf, x.numel()


@triton.jit
def _sweep_chunk_inputs(K, D2, GL, NL, SC, ci, rows, ck, cv, C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, CLIP: tl.constexpr):
    """Chunk ``ci``'s keys, Δ_2, the coefficients' last rows and (clipped) ``g̃, ñ`` of the sweep kernels."""
    k = tl.load(K + ci * C * DK + rows[:, None] * DK + ck[None, :])
    d2 = tl.load(D2 + ci * C * DV + rows[:, None] * DV + cv[None, :])
    gl = tl.load(GL + ci * C + rows)
    nl = tl.load(NL + ci * C + rows)
    if CLIP:
        sc = tl.load(SC + ci * C + rows)
        gt = gl * sc
        nt = nl * sc
    else:
        gt = gl
        nt = nl
    return k, d2, gl, nl, gt, nt


@triton.jit
def _loss_second(dd2, d2, O, R, DM, ci, rows, cv, C: tl.constexpr, DV: tl.constexpr, LN: tl.constexpr):
    """``∂Δ_2/∂Z_2`` applied to Δ_2's cotangent ``dd2``: through the LayerNorm (``J (2 J u)`` plus the
    derivative of ``J`` with ``D`` held; :func:`~.fused_backward.state_adjoint`), else ``2 u``. Returns it with ``J u``
    (``u`` without the LayerNorm): the cotangent of the loss gradient at the prediction (``v``'s, the residual ``k``'s)."""
    if LN:
        o = tl.load(O + ci * C * DV + rows[:, None] * DV + cv[None, :])
        r = tl.load(R + ci * C + rows)
        dm = tl.load(DM + ci * C + rows)
        ju = r[:, None] * (dd2 - (tl.sum(dd2, 1) / DV)[:, None] - o * (tl.sum(dd2 * o, 1) / DV)[:, None])
        jju = r[:, None] * (ju - (tl.sum(ju, 1) / DV)[:, None] - o * (tl.sum(ju * o, 1) / DV)[:, None])
        dz2 = 2.0 * jju - r[:, None] * ((tl.sum(dd2 * d2, 1) / DV)[:, None] * o + dm[:, None] * ju + (tl.sum(dd2 * o, 1) / DV)[:, None] * d2)
    else:
        ju = dd2
        dz2 = 2.0 * dd2
    return dz2, ju


@triton.jit
def _sweep_slice_out(
    p_dd1, p_dx2, hs, o1, o2, r1, r2, s1w, s2w, ci, k, d2, dz2, kn2, d2n2,
    HH, D1, S1, S2, W2, BW1, BS1, BW2, BS2, BC, MC, FC, AW1, AS1, AW2, AS2,
    C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, HID: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr,
    dd1_kept=None, sg1_kept=None, w2_kept=None, KEPT: tl.constexpr = False, RD1=None, RX1=None, FOLD: tl.constexpr = False,
    KB: tl.constexpr = False, PRE: tl.constexpr = False,
):
    """One hidden slice's last step of the sweep: the weights' cotangents and the new adjoint. The adjoint
    leaving the chunk is read at offsets ``r1`` (layer 1, ``[DK, BH]``) / ``r2`` (layer 2, ``[BH, DV]``) of
    its slot, the new one written one slot lower; ``p_dd1``/``p_dx2`` point at the slice's scratch.
    ``KEPT``: Δ_1's cotangent (clip term and folded read included), σ'(Z_1) and the slice of W_2 come in
    registers from phase 2. ``FOLD``: the read's cotangents of σ(Z_1) (``RX1``) and, unless kept, of Δ_1 (``RD1``)
    are added to the scratch's as they are loaded (both loads in flight together: no latency of their own).
    ``PRE``: the new adjoint's parts without ``dW`` are in its slots already (:func:`_lmm_split_sweep_kernel`'s phase 1):
    only ``dW`` is added to the new ``A^W``."""
    h = tl.load(HH + ci * C * HID + hs)
    dx2 = tl.load(p_dx2, cache_modifier=".cg")
    if FOLD:
        dx2 += tl.load(RX1 + ci * C * HID + hs)
    if CLIP:
        dx2 += d2n2[:, None] * h
    if KEPT:
        dd1 = dd1_kept
        sg1 = sg1_kept
        w2 = w2_kept
    else:
        dd1 = tl.load(p_dd1, cache_modifier=".cg")
        if FOLD:
            dd1 += tl.load(RD1 + ci * C * HID + hs)
        if CLIP:
            dd1 += kn2[:, None] * tl.load(D1 + ci * C * HID + hs)
        sg1 = tl.load(S1 + ci * C * HID + hs)
        w2 = tl.load(W2 + ci * HID * DV + o2)
    dp = dd1 * sg1
    dx2 = dx2 + _mmp(dz2, tl.trans(w2), PREC)
    dz1 = dd1 * tl.load(S2 + ci * C * HID + hs) + dx2 * sg1
    dw2 = _mmap(tl.trans(h), dz2, _mmp(tl.trans(dp), d2, PREC), PREC)  # [BH, DV]
    dw1 = _mmk(tl.trans(k), dz1, PREC, KB)  # [DK, BH]
    if PRE:
        tl.store(AW1 + r1 - s1w, tl.load(AW1 + r1 - s1w, cache_modifier=".cg") + dw1)
        tl.store(AW2 + r2 - s2w, tl.load(AW2 + r2 - s2w, cache_modifier=".cg") + dw2)
    else:
        bc = tl.load(BC + ci)
        mc = tl.load(MC + ci)
        fc = tl.load(FC + ci)
        aw1 = tl.load(AW1 + r1, cache_modifier=".cg")
        as1 = tl.load(AS1 + r1, cache_modifier=".cg")
        aw2 = tl.load(AW2 + r2, cache_modifier=".cg")
        as2 = tl.load(AS2 + r2, cache_modifier=".cg")
        b1 = ci * DK * HID + o1
        b2 = ci * HID * DV + o2
        tl.store(AW1 + r1 - s1w, tl.load(BW1 + b1) + bc * aw1 + dw1)
        tl.store(AS1 + r1 - s1w, tl.load(BS1 + b1) + fc * aw1 + mc * as1)
        tl.store(AW2 + r2 - s2w, tl.load(BW2 + b2) + bc * aw2 + dw2)
        tl.store(AS2 + r2 - s2w, tl.load(BS2 + b2) + fc * aw2 + mc * as2)


@triton.jit
def _save_u(UO, GSO, ci, rows, cv, j, dd2, g1, n1, C: tl.constexpr, DV: tl.constexpr, NS: tl.constexpr, CLIP: tl.constexpr,
            USTORE: tl.constexpr = 0):
    """The sweep's share for the update's VJP (``SAVE_U``): chunk ``ci``'s complete cotangent of Δ_2 ``dd2 [C, DV]``
    (which the VJP's first pass would otherwise recompute over every hidden slice) to ``UO``, and with the clip the
    summed cotangents of ``g̃, ñ`` ``g1, n1 [C]`` to ``GSO [.., 2, C]``. Every program of the head's ``NS`` holds the
    same summed values; ``USTORE`` (``LAUNCH["sweep_u_store"]``, the index in ``_U_STORES``) picks who stores what:
    0 program ``j`` the rows ``≡ j (mod NS)``, picked out of the tile first; 1 program 0 the whole tile; 2 program ``j``
    its rows by a masked store of the whole tile (every row once in 0 and 2)."""
    if USTORE == 1:
        if j == 0:
            tl.store(UO + ci * C * DV + rows[:, None] * DV + cv[None, :], dd2)
    elif NS <= C and USTORE == 0:
        RB: tl.constexpr = C // NS
        part = tl.arange(0, NS)
        mine = tl.sum(tl.where((part == j)[None, :, None], tl.reshape(dd2, [RB, NS, DV]), 0.0), 1)  # rows r ≡ j (mod NS)
        rb = tl.arange(0, RB)
        tl.store(UO + ci * C * DV + (rb * NS + j)[:, None] * DV + cv[None, :], mine)
    else:
        tl.store(UO + ci * C * DV + rows[:, None] * DV + cv[None, :], dd2, mask=((rows % NS) == j)[:, None])
    if CLIP:
        sel = (rows % NS) == j
        tl.store(GSO + ci * 2 * C + rows, g1, mask=sel)
        tl.store(GSO + ci * 2 * C + C + rows, n1, mask=sel)


@triton.jit
def _lmm_sweep_kernel(
    K, HH, D1, D2, S1, S2, O, R, DM, W2,
    BW1, BS1, BW2, BS2, GL, NL, BC, MC, FC,
    SC, CS, KN, HN, D2N,
    AW1, AS1, AW2, AS2, SD1, SX,
    RD1, RD2, RX1, RSC, UO, GSO,
    n_chunks,
    C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, HID: tl.constexpr, BH: tl.constexpr,
    LN: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr, FOLD: tl.constexpr = False, KB: tl.constexpr = False,
    SAVE_U: tl.constexpr = False, USTORE: tl.constexpr = 0,
):
    """The state's adjoint of a depth-2 memory over ``n_chunks`` chunks in reverse, one program per
    (batch row, head): :func:`~.fused_backward.state_adjoint` (plus the read's share ``B*``) written out.

    Inputs are the key pass of every chunk at its entering state (``K [n, BH, C, DK]``, ``HH = σ(Z_1)``,
    ``D1 = Δ_1``, ``D2 = Δ_2``, ``S1 = σ'(Z_1)``, ``S2 = P ∘ σ''(Z_1)``, the LayerNorm's ``O``, ``R = 1/σ``,
    ``DM = mean(D ∘ O)``), ``W2`` entering each chunk, the read's share ``BW1 … BS2``, the coefficients'
    last rows ``GL, NL [n, BH, C]`` and ends ``BC, MC, FC [n, BH]``; with the clip, per token its factor
    ``SC``, ``CS = ∂SC/∂‖∇‖² / SC``-style coefficient (0 where it does not act), ``‖k‖², ‖h‖², ‖Δ_2‖²``.
    The adjoint lives in slots ``A* [n + 1, BH, …]``: chunk ``i`` reads slot ``i + 1`` (the adjoint of the
    state leaving it) and writes slot ``i``; ``SD1``/``SX [BH, C, HID]`` are per-head scratch.
    ``FOLD``: the read's cotangents of the key pass (:class:`~.fused_backward.ReadCotangents`) are added to the
    update's before the key pass's VJP: ``RD1 [n, BH, C, HID]`` (of Δ_1), ``RD2 [n, BH, C, DV]`` (of Δ_2),
    ``RX1 [n, BH, C, HID]`` (of σ(Z_1)) and, with the clip, ``RSC [n, BH, C]`` (of its scale, before its backward,
    which then acts on both through ``dsq``). ``SAVE_U``: the complete cotangent of Δ_2 (before the loss's second
    derivative) goes to ``UO [n, BH, C, DV]`` and, with the clip, ``g̃, ñ``'s cotangents to ``GSO [n, BH, 2, C]``, for the
    update's VJP (:func:`_save_u`)."""
    pid = tl.program_id(0)
    nbh = tl.num_programs(0)
    rows = tl.arange(0, C)
    ck = tl.arange(0, DK)
    cv = tl.arange(0, DV)
    ch = tl.arange(0, BH)
    s1w = nbh * DK * HID  # adjoint slot strides
    s2w = nbh * HID * DV
    sd1 = SD1 + pid * C * HID
    sx = SX + pid * C * HID
    for ii in range(n_chunks):
        i = n_chunks - 1 - ii
        ci = i * nbh + pid  # (chunk, head) index of the per-chunk inputs
        a1 = (i + 1) * s1w + pid * DK * HID  # this head's adjoint leaving chunk i (slot i + 1)
        a2 = (i + 1) * s2w + pid * HID * DV
        rd1 = AW1 + a1
        rs1 = AS1 + a1
        rd2 = AW2 + a2
        rs2 = AS2 + a2
        k, d2, gl, nl, gt, nt = _sweep_chunk_inputs(K, D2, GL, NL, SC, ci, rows, ck, cv, C, DK, DV, CLIP)
        # (1) the update's transpose: Δ_1's cotangent (scratch), the hidden inputs' (scratch), layer 2's products
        xa2 = tl.zeros([C, DV], dtype=tl.float32)
        xb2 = tl.zeros([C, DV], dtype=tl.float32)
        dgt = tl.zeros([C], dtype=tl.float32)
        dnt = tl.zeros([C], dtype=tl.float32)
        for j in range(0, HID, BH):
            cols = j + ch
            aw1 = tl.load(rd1 + ck[:, None] * HID + cols[None, :], cache_modifier=".cg")
            as1 = tl.load(rs1 + ck[:, None] * HID + cols[None, :], cache_modifier=".cg")
            xa1 = _mmk(k, aw1, PREC, KB)
            xb1 = _mmk(k, as1, PREC, KB)
            tl.store(sd1 + rows[:, None] * HID + cols[None, :], -(gt[:, None] * xa1 + nt[:, None] * xb1))
            if CLIP:
                d1 = tl.load(D1 + ci * C * HID + rows[:, None] * HID + cols[None, :])
                dgt -= tl.sum(xa1 * d1, 1)
                dnt -= tl.sum(xb1 * d1, 1)
            aw2 = tl.load(rd2 + cols[:, None] * DV + cv[None, :], cache_modifier=".cg")
            as2 = tl.load(rs2 + cols[:, None] * DV + cv[None, :], cache_modifier=".cg")
            h = tl.load(HH + ci * C * HID + rows[:, None] * HID + cols[None, :])
            xa2 = _mmap(h, aw2, xa2, PREC)
            xb2 = _mmap(h, as2, xb2, PREC)
            dx2 = -(gt[:, None] * _mmp(d2, tl.trans(aw2), PREC) + nt[:, None] * _mmp(d2, tl.trans(as2), PREC))
            tl.store(sx + rows[:, None] * HID + cols[None, :], dx2)
        dd2, kn2, d2n2, g1, n1 = _dd2_terms(xa2, xb2, dgt, dnt, d2, gt, nt, gl, nl, CS, KN, HN, D2N, RSC, ci, rows, cv, C, DV, CLIP, FOLD)
        tl.debug_barrier()
        # (2) Δ_2's cotangent gains Δ_1's (through P = Δ_2 W_2ᵀ); then the loss's second derivative at layer 2
        for j in range(0, HID, BH):
            cols = j + ch
            dd1 = tl.load(sd1 + rows[:, None] * HID + cols[None, :], cache_modifier=".cg")
            if FOLD:
                dd1 += tl.load(RD1 + ci * C * HID + rows[:, None] * HID + cols[None, :])
            if CLIP:
                dd1 += kn2[:, None] * tl.load(D1 + ci * C * HID + rows[:, None] * HID + cols[None, :])
            dp = dd1 * tl.load(S1 + ci * C * HID + rows[:, None] * HID + cols[None, :])
            w2 = tl.load(W2 + ci * HID * DV + cols[:, None] * DV + cv[None, :])
            dd2 = _mmap(dp, w2, dd2, PREC)
        if FOLD:
            dd2 += tl.load(RD2 + ci * C * DV + rows[:, None] * DV + cv[None, :])
        if SAVE_U:
            _save_u(UO, GSO, ci, rows, cv, 0, dd2, g1, n1, C, DV, 1, CLIP, USTORE)
        dz2, _ = _loss_second(dd2, d2, O, R, DM, ci, rows, cv, C, DV, LN)
        # (3) per hidden slice: the weights' cotangents and the new adjoint (slot i)
        for j in range(0, HID, BH):
            cols = j + ch
            hs = rows[:, None] * HID + cols[None, :]
            o1 = ck[:, None] * HID + cols[None, :]
            o2 = cols[:, None] * DV + cv[None, :]
            _sweep_slice_out(sd1 + hs, sx + hs, hs, o1, o2, a1 + o1, a2 + o2, s1w, s2w, ci, k, d2, dz2, kn2, d2n2,
                             HH, D1, S1, S2, W2, BW1, BS1, BW2, BS2, BC, MC, FC, AW1, AS1, AW2, AS2, C, DK, DV, HID, CLIP, PREC,
                             RD1=RD1, RX1=RX1, FOLD=FOLD, KB=KB)
        tl.debug_barrier()  # the next (earlier) chunk reads the slot just written, and rewrites the scratch


@triton.jit
def _dd2_terms(xa2, xb2, dgt1, dnt1, d2, gt, nt, gl, nl, CS, KN, HN, D2N, RSC, ci, rows, cv,
               C: tl.constexpr, DV: tl.constexpr, CLIP: tl.constexpr, FOLD: tl.constexpr):
    """Δ_2's cotangent from layer 2's products with the leaving adjoint (``xa2, xb2 [C, DV]``: ``σ(Z_1) A_W2``,
    ``σ(Z_1) A_S2``) and, with the clip, its per-token terms from ``g̃, ñ``'s cotangents (layer 1's shares
    ``dgt1, dnt1 [C]`` given): ``(dd2, 2·dsq·‖k‖², 2·dsq·‖Δ_2‖², g1, n1)`` (the last four unused without the clip;
    ``g1, n1``: the cotangents of ``g̃, ñ`` summed over both layers, before the coefficients' last rows).
    ``FOLD``: the read's cotangent of the clip's scale (``RSC``) is added before ``dsq``, so that the clip's backward
    acts on the read's share as on the update's (the read's cotangent of Δ_2 is added later, by the caller, beside
    loads it waits on anyway)."""
    dd2 = -(gt[:, None] * xa2 + nt[:, None] * xb2)
    if CLIP:
        g1 = dgt1 - tl.sum(xa2 * d2, 1)
        n1 = dnt1 - tl.sum(xb2 * d2, 1)
        dd2, kn2, d2n2 = _clip_terms(dd2, g1, n1, d2, gl, nl, CS, KN, HN, D2N, RSC, ci, rows, C, FOLD)
        return dd2, kn2, d2n2, g1, n1
    else:
        return dd2, gl, gl, gl, gl  # (the last four not read)


@triton.jit
def _clip_terms(dd2, g1, n1, d2, gl, nl, CS, KN, HN, D2N, RSC, ci, rows, C: tl.constexpr, FOLD: tl.constexpr):
    """The clip's part of :func:`_dd2_terms` from ``g̃, ñ``'s cotangents over the hidden units (``g1, n1 [C]``, before the
    coefficients' last rows): ``(dd2 + its clip term, 2·dsq·‖k‖², 2·dsq·‖Δ_2‖²)``."""
    if FOLD:
        fsc = tl.load(RSC + ci * C + rows)
    dsc = gl * g1 + nl * n1
    if FOLD:
        dsc += fsc
    dsq = tl.load(CS + ci * C + rows) * dsc
    dd2 += (2.0 * dsq * tl.load(HN + ci * C + rows))[:, None] * d2
    kn2 = 2.0 * dsq * tl.load(KN + ci * C + rows)
    d2n2 = 2.0 * dsq * tl.load(D2N + ci * C + rows)
    return dd2, kn2, d2n2


@triton.jit
def _sweep_dd2(XA2, XB2, XG, XN, xo, rows, cv, d2, gt, nt, gl, nl, CS, KN, HN, D2N, RSC, ci,
               C: tl.constexpr, DV: tl.constexpr, NS: tl.constexpr, CLIP: tl.constexpr, FOLD: tl.constexpr):
    """:func:`_dd2_terms` of the split kernel, the products and layer 1's clip shares summed over the head's NS programs."""
    offs = rows[:, None] * DV + cv[None, :]
    xa2 = _sum_parts(XA2 + xo * C * DV, C * DV, offs, NS)
    xb2 = _sum_parts(XB2 + xo * C * DV, C * DV, offs, NS)
    if CLIP:
        dgt1 = _sum_parts(XG + xo * C, C, rows, NS)
        dnt1 = _sum_parts(XN + xo * C, C, rows, NS)
    else:
        dgt1 = gl  # not read
        dnt1 = nl
    return _dd2_terms(xa2, xb2, dgt1, dnt1, d2, gt, nt, gl, nl, CS, KN, HN, D2N, RSC, ci, rows, cv, C, DV, CLIP, FOLD)


@triton.jit
def _lmm_split_sweep_kernel(
    K, HH, D1, D2, S1, S2, O, R, DM, W2,
    BW1, BS1, BW2, BS2, GL, NL, BC, MC, FC,
    SC, CS, KN, HN, D2N,
    AW1, AS1, AW2, AS2, SD1, SX,
    RD1, RD2, RX1, RSC, UO, GSO,
    XA2, XB2, XG, XN, XD2, XD2C, CNT, PROF,
    chunk0, n_chunks, n_total,
    C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, HID: tl.constexpr, BH: tl.constexpr, NS: tl.constexpr,
    LN: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr, PHASE: tl.constexpr, PROFILE: tl.constexpr = False,
    KEEP: tl.constexpr = False, FOLD: tl.constexpr = False, KB: tl.constexpr = False, JOIN: tl.constexpr = False,
    PRE: tl.constexpr = False, SAVE_U: tl.constexpr = False, USTORE: tl.constexpr = 0,
):
    """:func:`_lmm_sweep_kernel` with hidden slice ``j`` of head ``bh`` in program ``bh · NS + j`` (its columns of
    the layer-1 adjoints, rows of the layer-2 ones, its scratch columns); the sums over the hidden dimension
    (layer 2's products with the adjoint, the clip's partial sums, Δ_1's contribution to Δ_2's cotangent) are
    exchanged through per-head buffers, double-buffered by chunk parity, between three phases per chunk:
    (1) the update's transpose of slice ``j``; (2) Δ_2's cotangent, its slice's share through ``P``; (3) the
    loss's second derivative (every program), the slice's weight cotangents and new adjoint.
    ``PHASE == 0``: one launch walks chunks ``chunk0 + n_chunks − 1 … chunk0`` with grid barriers (all programs
    resident); ``PHASE`` 1–3: one phase of chunk ``chunk0`` (the interpreter). ``PROFILE``: timer stamps as
    :func:`_lmm_split_fwd_kernel`'s (``PROF [programs, n_chunks, 8]``: start, phase 1, barrier, phase 2, barrier,
    phase 3, the rest repeated). ``KEEP`` (``PHASE == 0``): phase 3 takes Δ_2's cotangent, the clip's terms,
    Δ_1's cotangent, σ'(Z_1) and W_2's slice from phase 2's registers instead of recomputing / reloading them.
    ``FOLD``: the read's key-pass cotangents ``RD1 … RSC`` as :func:`_lmm_sweep_kernel`'s, each added where the
    kernel loads what it is added to (phase 2 reloads Δ_1's scratch with ``RD1``; :func:`_sweep_dd2` adds ``RSC``
    to the clip's; phase 3 adds ``RD2`` with the summed partials and ``RX1`` with σ(Z_1)'s scratch): the fold adds
    no load of its own to the chain, and holds no tile across a phase. On an H100 (matched config) the sweep still
    runs 45 → 61.5 µs a chunk with ``FOLD``, every phase slower, as it did with the cotangents added in phase 1
    (61.6 µs): the kernel's code generation as a whole, not these loads (docs/results/neural_memory.md).
    ``JOIN``: one grid barrier a chunk instead of two. Phase 2's product ``(dd1 ∘ σ'(Z_1)) W_2`` needs the summed
    products of phase 1 only through the clip's per-token factor ``kn2`` in ``dd1 = base + kn2 ∘ Δ_1``, and a row
    factor commutes with the product: ``((base + kn2 ∘ Δ_1) ∘ σ') W_2 = (base ∘ σ') W_2 + kn2 ∘ ((Δ_1 ∘ σ') W_2)``.
    The second product does not depend on the adjoint: with the clip the host computes it for every chunk beforehand
    (``XD2C [n, BH, C, DV]``, one batched product), phase 1 writes the first, and phase 3 sums it after the one
    barrier (``PHASE`` 2 then does nothing). Δ_2's cotangent is linear in the slices' products, so each slice also folds its
    ``σ(Z_1) A_W2``, ``σ(Z_1) A_S2`` shares and the first product into one tile (``XA2``; the clip's row sums into
    ``XG``, ``XN``): phase 3 sums ``NS`` tiles instead of ``3 NS`` (H100, 16K, matched: the sweep 8.8 → 7.4 ms; three phases took 9.9).
    ``PRE``: the parts of the new adjoint that need only the leaving one, ``b_S + f_c A^W + m_c A^S`` (all of the new
    ``A^S``) and ``b_W + β_c A^W``, are written in phase 1, where ``A^W, A^S`` are loaded anyway and the read's shares
    ``b_W, b_S`` can load under the phase's products; phase 3 then only adds ``dW`` to the new ``A^W`` (two tiles
    loaded after the chain instead of eight).
    ``SAVE_U``: as :func:`_lmm_sweep_kernel`'s; every program holds the whole summed tile, and stores the rows
    ``r ≡ j (mod NS)`` of it."""
    pid = tl.program_id(0)
    bh = pid // NS
    j = pid % NS
    nbh = tl.num_programs(0) // NS
    rows = tl.arange(0, C)
    ck = tl.arange(0, DK)
    cv = tl.arange(0, DV)
    cols = j * BH + tl.arange(0, BH)
    s1w = nbh * DK * HID
    s2w = nbh * HID * DV
    hs = rows[:, None] * HID + cols[None, :]
    o1 = ck[:, None] * HID + cols[None, :]
    o2 = cols[:, None] * DV + cv[None, :]
    sd1 = SD1 + bh * C * HID + hs
    sx = SX + bh * C * HID + hs
    for ii in range(n_chunks):
        i = chunk0 + n_chunks - 1 - ii
        step = n_total - 1 - i  # barrier generations count from the group's last chunk
        xo = (bh * 2 + i % 2) * NS
        ci = i * nbh + bh
        rd1 = (i + 1) * s1w + bh * DK * HID + o1
        rd2 = (i + 1) * s2w + bh * HID * DV + o2
        pr = PROF + (pid * n_chunks + ii) * 8
        if PROFILE:
            tl.store(pr, _now(pid))
        k, d2, gl, nl, gt, nt = _sweep_chunk_inputs(K, D2, GL, NL, SC, ci, rows, ck, cv, C, DK, DV, CLIP)
        xoff = (xo + j) * C * DV + rows[:, None] * DV + cv[None, :]
        if PHASE == 0 or PHASE == 1:
            if JOIN:  # phase 2's operands, issued with the phase's first loads (none waits on the chain)
                sg1 = tl.load(S1 + ci * C * HID + hs)
                w2 = tl.load(W2 + ci * HID * DV + o2)
                if FOLD:
                    rdd1 = tl.load(RD1 + ci * C * HID + hs)
            aw1 = tl.load(AW1 + rd1, cache_modifier=".cg")
            as1 = tl.load(AS1 + rd1, cache_modifier=".cg")
            if PRE:  # (issued with the adjoint's loads: they wait under the products below)
                b1 = ci * DK * HID + o1
                bw1 = tl.load(BW1 + b1)
                bs1 = tl.load(BS1 + b1)
                bc = tl.load(BC + ci)
                mc = tl.load(MC + ci)
                fc = tl.load(FC + ci)
            xa1 = _mmk(k, aw1, PREC, KB)
            xb1 = _mmk(k, as1, PREC, KB)
            if PRE:
                tl.store(AS1 + rd1 - s1w, bs1 + fc * aw1 + mc * as1)
                tl.store(AW1 + rd1 - s1w, bw1 + bc * aw1)
            base = -(gt[:, None] * xa1 + nt[:, None] * xb1)
            tl.store(sd1, base)
            if CLIP:
                d1 = tl.load(D1 + ci * C * HID + hs)
                g1p = -tl.sum(xa1 * d1, 1)
                n1p = -tl.sum(xb1 * d1, 1)
            if JOIN:
                dd1 = base
                if FOLD:
                    dd1 += rdd1
                pacc = _mmp(dd1 * sg1, w2, PREC)
            aw2 = tl.load(AW2 + rd2, cache_modifier=".cg")
            as2 = tl.load(AS2 + rd2, cache_modifier=".cg")
            if PRE:
                b2 = ci * HID * DV + o2
                bw2 = tl.load(BW2 + b2)
                bs2 = tl.load(BS2 + b2)
            h = tl.load(HH + ci * C * HID + hs)
            xa2 = _mmp(h, aw2, PREC)
            xb2 = _mmp(h, as2, PREC)
            if PRE:
                tl.store(AS2 + rd2 - s2w, bs2 + fc * aw2 + mc * as2)
                tl.store(AW2 + rd2 - s2w, bw2 + bc * aw2)
            if JOIN:  # the slice's share of Δ_2's cotangent as one tile (phase 3 sums NS tiles, not 3 NS)
                if CLIP:
                    g1p -= tl.sum(xa2 * d2, 1)
                    n1p -= tl.sum(xb2 * d2, 1)
                tl.store(XA2 + xoff, pacc - (gt[:, None] * xa2 + nt[:, None] * xb2))
            else:
                tl.store(XA2 + xoff, xa2)
                tl.store(XB2 + xoff, xb2)
            if CLIP:
                tl.store(XG + (xo + j) * C + rows, g1p)
                tl.store(XN + (xo + j) * C + rows, n1p)
            tl.store(sx, -(gt[:, None] * _mmp(d2, tl.trans(aw2), PREC) + nt[:, None] * _mmp(d2, tl.trans(as2), PREC)))
        if PROFILE:
            tl.store(pr + 1, _now(pid))
        if PHASE == 0:
            _grid_barrier(CNT + bh, NS * (step + 1) if JOIN else NS * (step * 2 + 1))
        if PROFILE:
            tl.store(pr + 2, _now(pid))
        if (PHASE == 0 or PHASE == 2) and not JOIN:
            dd2, kn2, d2n2, g1, n1 = _sweep_dd2(XA2, XB2, XG, XN, xo, rows, cv, d2, gt, nt, gl, nl, CS, KN, HN, D2N, RSC, ci, C, DV, NS, CLIP, FOLD)
            dd1 = tl.load(sd1, cache_modifier=".cg")
            if FOLD:
                dd1 += tl.load(RD1 + ci * C * HID + hs)
            if CLIP:
                dd1 += kn2[:, None] * tl.load(D1 + ci * C * HID + hs)
            sg1 = tl.load(S1 + ci * C * HID + hs)
            dp = dd1 * sg1
            w2 = tl.load(W2 + ci * HID * DV + o2)
            tl.store(XD2 + (xo + j) * C * DV + rows[:, None] * DV + cv[None, :], _mmp(dp, w2, PREC))
        if PROFILE and not JOIN:
            tl.store(pr + 3, _now(pid))
        if PHASE == 0 and not JOIN:
            _grid_barrier(CNT + bh, NS * (step * 2 + 2))
        if PROFILE and not JOIN:
            tl.store(pr + 4, _now(pid))
        if (PHASE == 0 or PHASE == 3) and JOIN:
            offs = rows[:, None] * DV + cv[None, :]
            dd2 = _sum_parts(XA2 + xo * C * DV, C * DV, offs, NS)
            if CLIP:
                g1 = _sum_parts(XG + xo * C, C, rows, NS)
                n1 = _sum_parts(XN + xo * C, C, rows, NS)
                dd2, kn2, d2n2 = _clip_terms(dd2, g1, n1, d2, gl, nl, CS, KN, HN, D2N, RSC, ci, rows, C, FOLD)
                dd2 += kn2[:, None] * tl.load(XD2C + ci * C * DV + offs)
            else:
                kn2 = gl  # not read
                d2n2 = gl
                g1 = gl
                n1 = gl
            if FOLD:
                dd2 += tl.load(RD2 + ci * C * DV + offs)
            if SAVE_U:
                _save_u(UO, GSO, ci, rows, cv, j, dd2, g1, n1, C, DV, NS, CLIP, USTORE)
            if PROFILE:  # (JOIN leaves stamps 3 and 4 free: the partial sums, then the loss's second derivative)
                tl.store(pr + 3, _now((tl.sum(dd2) != 0.0).to(tl.int32)))
            dz2, _ = _loss_second(dd2, d2, O, R, DM, ci, rows, cv, C, DV, LN)
            if PROFILE:
                tl.store(pr + 4, _now((tl.sum(dz2) != 0.0).to(tl.int32)))
            if KEEP:
                if CLIP:  # (Δ_1 reloaded: kept across the barrier, it spilled)
                    dd1 += kn2[:, None] * tl.load(D1 + ci * C * HID + hs)
                _sweep_slice_out(sd1, sx, hs, o1, o2, rd1, rd2, s1w, s2w, ci, k, d2, dz2, kn2, d2n2,
                                 HH, D1, S1, S2, W2, BW1, BS1, BW2, BS2, BC, MC, FC, AW1, AS1, AW2, AS2, C, DK, DV, HID, CLIP, PREC,
                                 dd1, sg1, w2, True, RD1, RX1, FOLD, KB, PRE)  # fmt: skip
            else:
                _sweep_slice_out(sd1, sx, hs, o1, o2, rd1, rd2, s1w, s2w, ci, k, d2, dz2, kn2, d2n2,
                                 HH, D1, S1, S2, W2, BW1, BS1, BW2, BS2, BC, MC, FC, AW1, AS1, AW2, AS2, C, DK, DV, HID, CLIP, PREC,
                                 RD1=RD1, RX1=RX1, FOLD=FOLD, KB=KB, PRE=PRE)
        if (PHASE == 0 or PHASE == 3) and not JOIN:
            if KEEP:
                dd2 = dd2 + _sum_parts(XD2 + xo * C * DV, C * DV, rows[:, None] * DV + cv[None, :], NS)
                if FOLD:
                    dd2 += tl.load(RD2 + ci * C * DV + rows[:, None] * DV + cv[None, :])
                if SAVE_U:
                    _save_u(UO, GSO, ci, rows, cv, j, dd2, g1, n1, C, DV, NS, CLIP, USTORE)
                dz2, _ = _loss_second(dd2, d2, O, R, DM, ci, rows, cv, C, DV, LN)
                _sweep_slice_out(sd1, sx, hs, o1, o2, rd1, rd2, s1w, s2w, ci, k, d2, dz2, kn2, d2n2,
                                 HH, D1, S1, S2, W2, BW1, BS1, BW2, BS2, BC, MC, FC, AW1, AS1, AW2, AS2, C, DK, DV, HID, CLIP, PREC,
                                 dd1, sg1, w2, True, RD1, RX1, FOLD, KB, PRE)  # fmt: skip
            else:
                dd2, kn2, d2n2, g1, n1 = _sweep_dd2(XA2, XB2, XG, XN, xo, rows, cv, d2, gt, nt, gl, nl, CS, KN, HN, D2N, RSC, ci, C, DV, NS, CLIP, FOLD)
                dd2 += _sum_parts(XD2 + xo * C * DV, C * DV, rows[:, None] * DV + cv[None, :], NS)
                if FOLD:
                    dd2 += tl.load(RD2 + ci * C * DV + rows[:, None] * DV + cv[None, :])
                if SAVE_U:
                    _save_u(UO, GSO, ci, rows, cv, j, dd2, g1, n1, C, DV, NS, CLIP, USTORE)
                dz2, _ = _loss_second(dd2, d2, O, R, DM, ci, rows, cv, C, DV, LN)
                _sweep_slice_out(sd1, sx, hs, o1, o2, rd1, rd2, s1w, s2w, ci, k, d2, dz2, kn2, d2n2,
                                 HH, D1, S1, S2, W2, BW1, BS1, BW2, BS2, BC, MC, FC, AW1, AS1, AW2, AS2, C, DK, DV, HID, CLIP, PREC,
                                 RD1=RD1, RX1=RX1, FOLD=FOLD, KB=KB, PRE=PRE)
        if PHASE == 0:
            tl.debug_barrier()  # own slots and scratch, read back by other threads of this program next chunk
        if PROFILE:
            tl.store(pr + 5, _now(pid))
            tl.store(pr + 6, _now(pid))
            tl.store(pr + 7, _now(pid))


def _launch(q, k, v, coefs, weights, momentum, activation, residual, layer_norm, ln_eps, max_grad_norm, store_states=False,
            keep_key_pass=False):  # fmt: skip
    """Run the kernel on full chunks: ``q, k [B, n·C, H, Dk]``, ``v [B, n·C, H, Dv]``, coefficients
    chunk-major fp32. Returns ``[y, *weights', *momentum']`` (state fp32, new tensors); with
    ``store_states`` the state tensors are ``[n + 1, B, H, d_in, d_out]``: the state entering every chunk
    and, last, the state after the call. ``keep_key_pass``: see :func:`_launch_split` (the caller checked
    :func:`keeps_key_pass`)."""
    g, nmat, beta, m, f = (x.contiguous() for x in coefs)
    n, bsz, heads, c = beta.shape
    dk, dv = k.shape[-1], v.shape[-1]
    depth = len(weights)
    hid = weights[0].shape[-1] if depth == 2 else dv
    bufs = [_state_buffers(x, n, store_states) for x in (*weights, *momentum)]
    w = [b for b, _ in bufs[:depth]]
    s = [b for b, _ in bufs[depth:]]
    slots = (bufs[0][1], bufs[depth - 1][1] if depth == 2 else 0)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    y = _alloc(q, (bsz, n * c, heads, dv), q.dtype)
    bh = min(hid, LAUNCH["hidden_slice"])
    ns = _split_programs(depth, hid, c, bsz * heads, q, max_grad_norm is not None)
    if keep_key_pass and not (ns and _split_read_batched()):
        raise ValueError("keep_key_pass needs the split kernel with the batched read (see keeps_key_pass)")
    if ns:
        return _launch_split(q, k, v, y, (g, nmat, beta, m, f), w, s, slots, ns, activation, residual, layer_norm, ln_eps, max_grad_norm,
                             keep_key_pass)  # fmt: skip
    if depth == 2:
        z1 = torch.empty((bsz * heads, c, hid), device=q.device, dtype=torch.float32)
        d1 = torch.empty_like(z1)
        w2, s2 = w[1], s[1]
    else:
        z1 = d1 = w2 = s2 = w[0]  # never read at depth 1
    _lmm_fused_fwd_kernel[(bsz * heads,)](
        q, k, v, y,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), y.stride(0), y.stride(1), y.stride(2),
        g, nmat, beta, m, f,
        w[0], s[0], w2, s2, z1, d1, *slots,
        n, heads, float(ln_eps), float(max_grad_norm or 1.0),
        C=c, DK=dk, DV=dv, HID=hid, BH=bh, DEPTH=depth, ACT=_ACT_CODES[activation],
        RESIDUAL=residual, LN=layer_norm, CLIP=max_grad_norm is not None, PREC="ieee" if q.dtype == torch.float32 else LAUNCH["half_precision"],
        PREC_R="ieee" if q.dtype == torch.float32 else LAUNCH["half_read_precision"],
        num_warps=LAUNCH["num_warps"] or (8 if c * max(dk, dv, bh) >= 4096 else 4), num_stages=LAUNCH["num_stages"],
    )  # fmt: skip
    return [y, *w, *s]


def _split_programs(depth: int, hid: int, c: int, nbh: int, q: Tensor, clip: bool = False) -> int:
    """Programs per head of the split forward kernel, or 0 for the one-program kernel (see :func:`_split_count`;
    ``clip``: with the gradient clip, which may set another width, :func:`_split_slice`)."""
    if depth != 2:
        return 0
    width = _split_slice(q, clip)
    return _split_count(hid, c, nbh, width, sm_count(q.device) if q.is_cuda else None) if width else 0


#: The oldest ptxas release seen to build the 32-column split walk correctly (CUDA 13.0: 37 of 37 GPU tests, twentieth
#: session; Triton 3.6's bundled 12.9: 39 of 39, twenty-eighth session).
_NARROW_WALK_PTXAS = (12, 9)


def _split_slice(q: Tensor, clip: bool = False) -> int:
    """``LAUNCH["split_slice"]``; "auto" = 32 columns without the clip where the ptxas the walk is built with
    (:func:`_walk_ptxas`) is at least ``_NARROW_WALK_PTXAS``, else 64 (and 64 under the interpreter, whose tests
    pick narrower slices themselves).

    On an H100 at 16K with CUDA 13.0's ptxas the 32-column walk took 5.0–5.2 → 3.6 ms without the clip, but
    6.0 → 10.9 ms with it (two grid barriers a chunk among eight programs instead of four). The ptxas Triton 3.6
    (torch 2.11) builds Hopper kernels with (release 12.8) builds the 32-column walk wrong: 27 of the 37 GPU tests
    failed (wrong bf16 outputs, illegal memory accesses), and compute-sanitizer showed a ``wgmma`` of the layer-1
    update reading shared memory out of bounds. CUDA 13.0's ptxas builds the same Triton output right: all 37
    passed (docs/results/neural_memory.md, twentieth session); so does the 12.9 that Triton 3.6 bundles for
    Blackwell, which the walk is then built with (twenty-eighth session)."""
    width = LAUNCH["split_slice"]
    if width != "auto":
        return int(width)
    if clip or _interpreted(q):
        return 64
    release = _walk_ptxas(q)[1]
    return 32 if release is not None and release >= _NARROW_WALK_PTXAS else 64


def _walk_ptxas(q: Tensor) -> tuple[str | None, tuple[int, int] | None]:
    """``(path, release)`` of the ptxas the split walk is built with at fewer than 64 columns
    (:func:`~mnemotorch.ops.triton_launch.ptxas_for_build`; path None: the one Triton takes anyway)."""
    return ptxas_for_build(capability(q.device), _NARROW_WALK_PTXAS)


#: The widest slice the split walk widens to (the widest run on a GPU; wider tiles would spill heavily).
_SPLIT_WIDEST = 64


def _split_count(hid: int, c: int, nbh: int, slice_: int, sms: int | None) -> int:
    """Programs per head of the split walk: ``hid / w`` for the narrowest slice width ``w`` (``slice_``, doubled up to
    ``_SPLIT_WIDEST`` as needed) whose grid fits the SMs (``sms``; None under the interpreter), since the grid barrier
    needs every program resident; more than one program a head; with the inline read ≥ 16 chunk rows per program (it
    splits them). 0 when none fits. (At hidden 256 on 132 SMs, 32 columns give 128 programs at B · H = 16; at
    B · H = 32 the walk takes 64 columns, 128 programs, rather than one program a head.)"""
    rows = 1 if _split_read_batched() else 16
    width, widest = slice_, max(slice_, _SPLIT_WIDEST)
    while width < hid and width <= widest:
        ns = hid // width
        if c // ns >= rows and (sms is None or nbh * ns <= sms):
            return ns
        width *= 2
    return 0


def keeps_key_pass(q: Tensor, weights: Sequence[Tensor], c: int, clip: bool = False) -> bool:
    """Whether the forward on these arguments (``clip``: with the gradient clip) can keep the key pass for the
    backward: the split kernel with the batched read (``LAUNCH["split_read"] == "batched"``) walks the chunks, and
    ``BACKWARD["key_pass_from_forward"]``."""
    if not BACKWARD["key_pass_from_forward"] or len(weights) != 2 or not _split_read_batched():
        return False
    return _split_programs(2, weights[0].shape[-1], c, q.shape[0] * q.shape[2], q, clip) > 0


def _launch_split(q, k, v, y, coefs, w, s, slots, ns, activation, residual, layer_norm, ln_eps, max_grad_norm, keep_key_pass=False):
    """Depth 2 on ``B · H · ns`` programs (:func:`_lmm_split_fwd_kernel`): on a GPU one launch with grid
    barriers (all programs resident: the caller checked the SM count), under the interpreter one launch
    per phase and chunk.

    ``LAUNCH["split_read"] == "batched"``: that kernel walks the chunks without the read (the recurrence
    alone), and :func:`_lmm_chunk_read_kernel` then reads every chunk of a group in parallel from the
    state entering it. The entering states are the training checkpoints where they are stored
    (``slots``), else a group's own slots; groups bound those buffers to ``LAUNCH["read_group_bytes"]``.
    ``"inline"``: the read inside the walk (two more phases and one more grid barrier per chunk).

    ``keep_key_pass`` (batched read only): also return every chunk's ``Z_1, P, Δ_2, Z_2`` (``[n, B, H, C, ·]``
    fp32), from which the backward takes the key pass instead of recomputing it, and the read's sums over the
    hidden dimension ``Ĥ W_2, Ĥ S_2, Ĥ Hᵀ`` (:func:`_lmm_chunk_read_kernel`'s ``SAVE``; with
    ``BACKWARD["read_sums_from_forward"]``), which the read's VJP takes."""
    g, nmat, beta, m, f = coefs
    n, bsz, heads, c = beta.shape
    dk, dv = k.shape[-1], v.shape[-1]
    hid = w[0].shape[-1]
    nbh = bsz * heads
    dev = q.device
    f32 = dict(device=dev, dtype=torch.float32)
    batched = _split_read_batched()
    xz2 = torch.empty((nbh, 2, ns, c, dv), **f32)
    xhn = torch.empty((nbh, 2, ns, c), **f32)
    xdn = torch.empty_like(xhn)
    if batched:  # the read's exchange buffers are not used
        xacc = xp = xz2
    else:
        xacc = torch.empty_like(xz2)
        xp = torch.empty((nbh, 2, ns, c, c), **f32)
    cnt = torch.zeros((nbh,), device=dev, dtype=torch.int32)
    half = q.dtype != torch.float32
    clip = max_grad_norm is not None
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), y.stride(0), y.stride(1), y.stride(2))  # fmt: skip
    meta = dict(C=c, DK=dk, DV=dv, HID=hid, BH=hid // ns, NS=ns, ACT=_ACT_CODES[activation], RESIDUAL=residual, LN=layer_norm,
                CLIP=clip, PREC=LAUNCH["half_precision"] if half else "ieee", PREC_R=LAUNCH["half_read_precision"] if half else "ieee",
                num_warps=LAUNCH["split_warps"], num_stages=1, READ=not batched, KB=_walk_exact_keys(k, hid // ns))  # fmt: skip
    # the state carried in registers needs the walk in one launch (PHASE 0): on a GPU, or one program per head;
    # LAUNCH["split_host_phases"] (a diagnostic) has the GPU launch phase by phase too, as the interpreter does
    by_phase = ns > 1 and (_interpreted(q) or bool(LAUNCH["split_host_phases"]))
    meta["CARRY"] = bool(LAUNCH["split_carry"]) and batched and not by_phase
    # below 64 columns on a GPU, the walk is built with Triton's newer bundled ptxas where it has one (the one Triton 3.6
    # builds Hopper kernels with builds it wrong: _split_slice); the release is part of the specialisation
    ptxas, release = _walk_ptxas(q) if hid // ns < 64 and not _interpreted(q) else (None, None)
    # (passed even when empty, its default: a launch through the cache needs every constexpr by keyword)
    meta["PTXAS"] = "%d.%d" % release if ptxas is not None else ""
    meta["P3"] = _phase3_mode(activation, layer_norm, phase0=not by_phase)
    if batched and meta["P3"] == _P3_MODES["scratch"]:  # σ(Z_1), Δ_1 (slices private to a program), each program's Δ_2
        hs = torch.empty((nbh, c, hid), **f32)
        ds = torch.empty_like(hs)
        d2s = torch.empty((nbh * ns, c, dv), **f32)
    else:
        hs = ds = d2s = xz2
    scalars = (heads, float(ln_eps), float(max_grad_norm or 1.0))
    phases = (1, 2, 3) if batched else (1, 2, 3, 4)

    prof = LAUNCH.get("profile")  # diagnostics: a dict to receive the walk's and the read's times (GPU only)
    prof = prof if isinstance(prof, dict) and not _interpreted(q) else None

    def walk(wb, sb, slot_strides, slot0, z1, d1, zs, d2o, z2o, sco, lo, hi):
        stamps = torch.zeros((nbh * ns, hi - lo, 8), device=dev, dtype=torch.int64) if prof is not None else cnt
        args = (q, k, v, y, *strides, g, nmat, beta, m, f, wb[0], sb[0], wb[1], sb[1], z1, d1, *slot_strides,
                xz2, xhn, xdn, xacc, xp, cnt, d2o, z2o, sco, hs, ds, d2s, slot0, lo, zs, stamps)  # fmt: skip
        with built_with_ptxas(ptxas):
            if by_phase:  # (the interpreter runs programs one after another: one launch per phase and chunk)
                for i in range(lo, hi):
                    for phase in phases:
                        _lmm_split_fwd_kernel[(nbh * ns,)](*args, i, 1, *scalars, PHASE=phase, **meta)
                return
            ev = _profile_events(prof, "walk_ms")
            launcher(_lmm_split_fwd_kernel)[(nbh * ns,)](*args, lo, hi - lo, *scalars, PHASE=0, PROFILE=prof is not None, **meta)
        if prof is not None:
            ev()
            _profile_stamps(prof, stamps)

    if not batched:
        z1 = torch.empty((nbh, c, hid), **f32)
        walk(w, s, slots, 0, z1, torch.empty_like(z1), 0, z1, z1, z1, 0, n)
        return [y, *w, *s]
    stored = slots[0] != 0
    per_chunk = nbh * 4 * (2 * c * hid + c * dv + c) + (0 if stored else 4 * sum(x.numel() for x in (*w, *s)))
    group = max(1, min(n, int(LAUNCH["read_group_bytes"]) // per_chunk))
    bh_read = min(hid, LAUNCH["read_slice"])
    if keep_key_pass:  # every chunk's buffers, kept for the backward (it reads the key pass from them, and the read's sums)
        kept = [torch.empty((n, nbh, c, x), **f32) for x in (hid, hid, dv, dv)]
        read_parts = [torch.empty((n, nbh, c, x), **f32) for x in _kept_read_widths(hid, dv, c)]
    else:
        read_parts = []
    for lo in range(0, n, group):
        hi = min(n, lo + group)
        gn = hi - lo
        if keep_key_pass:
            z1, pd, d2o, z2o = (x[lo:hi] for x in kept)
        else:
            z1 = torch.empty((gn, nbh, c, hid), **f32)
            pd = torch.empty_like(z1)
            d2o = torch.empty((gn, nbh, c, dv), **f32)
            z2o = torch.empty_like(d2o)
        sco = torch.empty((gn, nbh, c), **f32) if clip else d2o
        parts = [x[lo:hi] for x in read_parts]
        parts += [d2o] * (4 - len(parts))  # (pointers the kernel does not use)
        if stored:
            wb, sb, sl, slot0 = w, s, slots, 0
        else:  # this group's own slots: slot 0 = the state entering chunk lo
            wb = [torch.empty((gn + 1, *x.shape), **f32) for x in w]
            sb = [torch.empty((gn + 1, *x.shape), **f32) for x in s]
            for buf, x in zip((*wb, *sb), (*w, *s)):
                buf[0].copy_(x)
            sl, slot0 = (w[0].numel(), w[1].numel()), lo
        walk(wb, sb, sl, slot0, z1, pd, nbh * c * hid, d2o, z2o, sco, lo, hi)
        ev = _profile_events(prof, "read_ms")
        launcher(_lmm_chunk_read_kernel)[(nbh, gn)](
            q, k, y, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), y.stride(0), y.stride(1), y.stride(2),
            g, beta, f, wb[0], sb[0], wb[1], sb[1], *sl, z1, pd, d2o, sco, *parts, lo, slot0, heads, float(ln_eps),
            C=c, DK=dk, DV=dv, HID=hid, BH=bh_read, ACT=_ACT_CODES[activation], RESIDUAL=residual, LN=layer_norm, CLIP=clip,
            PREC_R=meta["PREC_R"], SAVE=bool(read_parts), SAVE_Z=len(read_parts) == 4, num_warps=LAUNCH["read_warps"], num_stages=LAUNCH["read_stages"],
        )  # fmt: skip
        ev()
        if not stored:
            for x, buf in zip((*w, *s), (*wb, *sb)):
                x.copy_(buf[gn])
    if keep_key_pass:
        return [y, *w, *s, *(x.view(n, bsz, heads, c, x.shape[-1]) for x in (*kept, *read_parts))]
    return [y, *w, *s]


def _kept_read_widths(hid: int, dv: int, c: int) -> tuple[int, ...]:
    """The last dimensions of what the forward keeps of its read beside the key pass, per ``BACKWARD``: ``Ĥ W_2, Ĥ S_2``
    (``dv``), ``Ĥ Hᵀ`` (``c``) with ``read_sums_from_forward``, then ``Ẑ_1`` (``hid``) with ``read_z_from_forward``."""
    if not BACKWARD["read_sums_from_forward"]:
        return ()
    return (dv, dv, c, hid) if BACKWARD["read_z_from_forward"] else (dv, dv, c)


def _profile_events(prof: dict | None, key: str):
    """CUDA events around a launch: returns the function that ends the interval and adds its ms to ``prof[key]``."""
    if prof is None:
        return lambda: None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()

    def stop():
        end.record()
        end.synchronize()
        prof[key] = prof.get(key, 0.0) + start.elapsed_time(end)

    return stop


_STAMP_NAMES = ("phase1", "barrier1", "phase2", "barrier2", "phase3", "barrier3", "phase4")


def _profile_stamps(prof: dict, stamps: Tensor) -> None:
    """Mean µs per chunk of each interval between the walk kernel's timer stamps (over programs and chunks)."""
    d = (stamps[..., 1:] - stamps[..., :-1]).double() / 1e3
    mean = d.mean((0, 1)).tolist()
    prof.setdefault("walk_us_per_chunk", []).append(dict(zip(_STAMP_NAMES, mean)))
    per_chunk = (stamps[:, 1:, 0] - stamps[:, :-1, 0]).double() / 1e3
    prof.setdefault("chunk_us", []).append(per_chunk.mean().item() if per_chunk.numel() else None)


_P3_MODES = {"recompute": 0, "scratch": 1, "registers": 2}


def _phase3_mode(activation: str, layer_norm: bool, phase0: bool) -> int:
    """``LAUNCH["split_phase3"]`` as the kernel's ``P3``. "auto": registers where the walk is one launch (on a
    GPU: the matched config's walk took 34 µs a chunk against 42 with the scratch and 48 recomputing, H100),
    else the scratch. Registers need the walk in one launch (``phase0``), else the scratch."""
    mode = LAUNCH["split_phase3"]
    if mode == "auto":
        mode = "registers" if phase0 else "scratch"
    if mode not in _P3_MODES:
        raise ValueError(f"LAUNCH['split_phase3'] must be one of {sorted(_P3_MODES)} or 'auto', got {mode!r}")
    if mode == "registers" and not phase0:
        mode = "scratch"
    return _P3_MODES[mode]


def _split_read_batched() -> bool:
    """``LAUNCH["split_read"]``: "batched" (the read in its own kernel after the walk) or "inline"."""
    mode = LAUNCH["split_read"]
    if mode not in ("batched", "inline"):
        raise ValueError(f"LAUNCH['split_read'] must be 'batched' or 'inline', got {mode!r}")
    return mode == "batched"


def _sweep_triton(kp, ws, b_w, b_s, g_last, n_last, ends, adj_w, adj_s, layer_norm, max_grad_norm, half, add_cot=None, stats=None,
                  keys_bf16=False, u_out=None, g_out=None):
    """The depth-2 adjoint sweep over one group of chunks in one launch (:func:`_lmm_sweep_kernel`).

    Arguments batched ``[G, B, H, …]`` as :func:`~.fused_backward.sweep_block`'s (``add_cot`` too: the read's
    key-pass cotangents, the kernels' ``FOLD``), ``adj_w / adj_s`` the adjoint leaving the group; ``stats``: the clip's
    :func:`~.fused_backward._clip_stats` of ``kp`` where the caller has them; ``keys_bf16``: the keys' products in two
    bf16 products (:func:`_keys_bf16`). ``u_out [G, B, H, C, d_v]`` (and with the clip ``g_out [G, B, H, 2, C]``), fp32
    contiguous: filled with every chunk's cotangent of Δ_2 (and of ``g̃, ñ``) for the update's VJP (the kernels'
    ``SAVE_U``). Returns ``(adj_w, adj_s, leaving)`` as it does."""
    g_n = g_last.shape[0]
    k, hh = (x.contiguous() for x in kp.xs)
    d1, d2 = (x.contiguous() for x in kp.deltas)
    s1, s2 = kp.d1[0].contiguous(), kp.d2[0].contiguous()
    nbh = k.shape[1] * k.shape[2]
    c, dk, hid, dv = k.shape[-2], k.shape[-1], hh.shape[-1], d2.shape[-1]
    slots = []
    for a in (*adj_w, *adj_s):
        buf = a.new_empty((g_n + 1, *a.shape), dtype=torch.float32)
        buf[g_n].copy_(a)
        slots.append(buf)
    dummy = g_last  # pointers of inputs the configuration does not read
    if layer_norm:
        o, r, dm = kp.out.contiguous(), kp.rstd.contiguous(), kp.dmean.contiguous()
    else:
        o = r = dm = dummy
    if max_grad_norm is not None:
        (kn, hn), (_, d2n), sq, sc = stats if stats is not None else _clip_stats(kp, max_grad_norm)
        cs = torch.where(sq >= max_grad_norm * max_grad_norm, -0.5 * sc / sq, torch.zeros_like(sq))
    else:
        sc = cs = kn = hn = d2n = dummy
    if add_cot is not None:  # the read's cotangents of Δ_1, Δ_2, σ(Z_1) and the clip's scale
        fold = [x.float().contiguous() for x in (*add_cot.d_delta, add_cot.d_x[1])]
        fold.append(dummy if max_grad_norm is None else add_cot.dsc.float().contiguous())
    else:
        fold = [dummy] * 4
    if u_out is not None and max_grad_norm is not None and g_out is None:
        raise ValueError("_sweep_triton: with the clip, u_out comes with g_out")
    if LAUNCH["sweep_u_store"] not in _U_STORES:
        raise ValueError(f"LAUNCH['sweep_u_store'] must be one of {_U_STORES}, got {LAUNCH['sweep_u_store']!r}")
    fold += [dummy if u_out is None else u_out, dummy if g_out is None else g_out]
    scratch = torch.empty((2, nbh, c, hid), device=k.device, dtype=torch.float32)
    args = (k, hh, d1, d2, s1, s2, o, r, dm, ws[1].contiguous(),
            *(x.contiguous() for x in (b_w[0], b_s[0], b_w[1], b_s[1])), g_last.contiguous(), n_last.contiguous(), *(e.contiguous() for e in ends),
            sc, cs, kn, hn, d2n, slots[0], slots[2], slots[1], slots[3], scratch[0], scratch[1], *fold)  # fmt: skip
    sweep_prec = LAUNCH["sweep_precision"]
    if sweep_prec not in _SWEEP_PRECISIONS:
        raise ValueError(f"LAUNCH['sweep_precision'] (env MNEMO_MEMORY_SWEEP_PRECISION) must be one of {_SWEEP_PRECISIONS}, got {sweep_prec!r}")
    meta = dict(C=c, DK=dk, DV=dv, HID=hid, LN=layer_norm, CLIP=max_grad_norm is not None, PREC=(sweep_prec or LAUNCH["half_precision"]) if half else "ieee",
                FOLD=add_cot is not None, KB=bool(keys_bf16), SAVE_U=u_out is not None, USTORE=_U_STORES.index(LAUNCH["sweep_u_store"]),
                num_stages=1)  # fmt: skip
    ns = _sweep_programs(hid, nbh, k)
    if _sweep_split_on(ns):
        f32 = dict(device=k.device, dtype=torch.float32)
        xa2 = torch.empty((nbh, 2, ns, c, dv), **f32)
        form = LAUNCH["sweep_form"]
        if form not in _SWEEP_FORMS:
            raise ValueError(f"LAUNCH['sweep_form'] must be one of {_SWEEP_FORMS}, got {form!r}")
        join = form == "joined" or (form == "auto" and max_grad_norm is None)
        # (the joined form reads neither XB2 nor XD2: its one tile a program goes to XA2)
        xb2, xd2 = (xa2, xa2) if join else (torch.empty_like(xa2), torch.empty_like(xa2))
        # with the clip, Δ_2's cotangent takes kn2 ∘ ((Δ_1 ∘ σ'(Z_1)) W_2) per chunk: no adjoint in it, one product here
        xd2c = _matmul_fp32(d1 * s1, ws[1]) if join and max_grad_norm is not None else xd2
        xg = torch.zeros((nbh, 2, ns, c), **f32)
        xn = torch.zeros_like(xg)
        cnt = torch.zeros((nbh,), device=k.device, dtype=torch.int32)
        prof = LAUNCH.get("profile")
        prof = prof if isinstance(prof, dict) and not _interpreted(k) else None
        stamps = torch.zeros((nbh * ns, g_n, 8), device=k.device, dtype=torch.int64) if prof is not None else cnt
        xargs = (*args, xa2, xb2, xg, xn, xd2, xd2c, cnt, stamps)
        smeta = dict(meta, BH=hid // ns, NS=ns, num_warps=LAUNCH["sweep_split_warps"], JOIN=join, PRE=bool(LAUNCH["sweep_pre_adjoint"]))
        one_launch = ns == 1 or not _interpreted(k)  # (the interpreter runs programs one after another)
        smeta["KEEP"] = bool(LAUNCH["sweep_keep"]) and one_launch
        if not one_launch:
            for i in range(g_n - 1, -1, -1):
                for phase in (1, 3) if join else (1, 2, 3):
                    _lmm_split_sweep_kernel[(nbh * ns,)](*xargs, i, 1, g_n, PHASE=phase, **smeta)
        else:
            launcher(_lmm_split_sweep_kernel)[(nbh * ns,)](*xargs, 0, g_n, g_n, PHASE=0, PROFILE=prof is not None, **smeta)
            if prof is not None:
                sub: dict = {}
                _profile_stamps(sub, stamps)
                prof.setdefault("sweep_us_per_chunk", []).extend(sub["walk_us_per_chunk"])
                prof.setdefault("sweep_chunk_us", []).extend(sub["chunk_us"])
    else:
        _lmm_sweep_kernel[(nbh,)](*args, g_n, BH=min(hid, LAUNCH["sweep_slice"]), num_warps=LAUNCH["sweep_warps"], **meta)
    return [slots[0][0], slots[1][0]], [slots[2][0], slots[3][0]], [x[1:] for x in slots]


def launch_from_env(name: str, value: str, keys: Sequence[str]) -> dict:
    """A launch setting from the environment variable ``name``: ``value`` is ``len(keys)`` positive ints joined by
    ":" (e.g. "slice:warps:stages"); a clear error naming the variable otherwise."""
    parts = value.split(":")
    if len(parts) != len(keys) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"{name} must be '{':'.join(keys)}' ({len(keys)} positive ints), got {value!r}")
    return dict(zip(keys, (int(p) for p in parts)))


_SWEEP_FORMS = ("auto", "three_phase", "joined")
_SWEEP_PRECISIONS = (None, "bf16x3", "tf32x3", "tf32", "ieee")


def _keys_bf16(k: Tensor) -> bool:
    """``LAUNCH["exact_keys"]`` and bf16 keys: the products with ``k`` take two bf16 products instead of three."""
    return bool(LAUNCH["exact_keys"]) and k.dtype == torch.bfloat16


def _walk_exact_keys(k: Tensor, cols: int) -> bool:
    """:func:`_keys_bf16` for the split walk with ``cols`` hidden columns a program: on a GPU only from
    ``LAUNCH["walk_exact_keys_min_cols"]`` columns. The 32-column walk passed the GPU test file with three bf16
    products for the key products (and CUDA 13.0's ptxas, :func:`_split_slice`); the two-product form there was
    checked on one case only, so narrower slices keep three (docs/results/neural_memory.md, twentieth session)."""
    return _keys_bf16(k) and (_interpreted(k) or cols >= LAUNCH["walk_exact_keys_min_cols"])


def _sweep_split_on(ns: int) -> bool:
    """Whether the sweep runs the split kernel (``ns`` programs per head) rather than the one-program kernel."""
    return ns > 1


def _sweep_programs(hid: int, nbh: int, x: Tensor) -> int:
    """Programs per head of the depth-2 sweep: ``LAUNCH["sweep_split"]`` hidden columns each (0: one
    program per head). ``"auto"``: on a GPU the most programs (slices of 32, else 64 columns) whose grid
    fits the SMs, since every program of a head must be resident for the grid barrier (at B·H = 16 and
    hidden 256 that is 8 per head: 128 programs on the H100's 132 SMs); elsewhere slices of 64."""
    split = LAUNCH["sweep_split"]

    def fits(ns: int) -> bool:
        return ns > 1 and hid % ns == 0 and (not x.is_cuda or nbh * ns <= sm_count(x.device))

    if split == "auto":
        for cols in ((64,) if _interpreted(x) else (32, 64)):
            if fits(hid // cols):
                return hid // cols
        return 1
    ns = hid // split if split else 1
    return ns if fits(ns) else 1


def _triton_sweep_on(q: Tensor, depth: int, hid: int, dk: int, dv: int, c: int) -> bool:
    """``BACKWARD["triton_sweep"]`` (None: depth 2 with power-of-two sizes ≥ 16, on CUDA or the interpreter)."""
    flag = BACKWARD["triton_sweep"]
    ok = depth == 2 and all(_pow2_at_least_16(x) for x in (hid, dk, dv, c))
    if flag is None:
        return ok
    return bool(flag) and ok


def _interpreted(x: Tensor) -> bool:
    """Triton's CPU interpreter runs programs one after another: no grid barrier can work there."""
    return not x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


@torch.library.custom_op("mnemotorch::lmm_fused_fwd", mutates_args=())
def lmm_fused_fwd(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, n: Tensor, beta: Tensor, m: Tensor, f: Tensor,
    weights: list[Tensor], momentum: list[Tensor], activation: str, residual: bool, layer_norm: bool,
    ln_eps: float, max_grad_norm: Optional[float], store_states: bool, keep_key_pass: bool = False,
) -> list[Tensor]:  # fmt: skip
    """The fused forward over full chunks (no autograd): ``[y, *weights', *momentum']``; with
    ``store_states`` each state tensor is ``[n + 1, B, H, d_in, d_out]`` (entering every chunk, then final);
    with ``keep_key_pass`` (only where :func:`keeps_key_pass`) four more, ``Z_1, P, Δ_2, Z_2``, and with
    ``BACKWARD["read_sums_from_forward"]`` three after them, the read's ``Ĥ W_2, Ĥ S_2, Ĥ Hᵀ``; each ``[n, B, H, C, ·]``."""
    return _launch(q, k, v, (g, n, beta, m, f), weights, momentum, activation, residual, layer_norm, ln_eps, max_grad_norm, store_states,
                   keep_key_pass)  # fmt: skip


@lmm_fused_fwd.register_fake
def _(q, k, v, g, n, beta, m, f, weights, momentum, activation, residual, layer_norm, ln_eps, max_grad_norm, store_states, keep_key_pass=False):
    y = q.new_empty((*q.shape[:3], v.shape[-1]))
    lead = (beta.shape[0] + 1,) if store_states else ()
    out = [y, *(x.new_empty((*lead, *x.shape), dtype=torch.float32) for x in (*weights, *momentum))]
    if keep_key_pass:
        nb = (beta.shape[0], *q.shape[:1], q.shape[2], beta.shape[-1])
        hid, dv = weights[0].shape[-1], v.shape[-1]
        out += [q.new_empty((*nb, d), dtype=torch.float32) for d in (hid, hid, dv, dv, *_kept_read_widths(hid, dv, beta.shape[-1]))]
    return out


_lmm_fused_fwd = direct(lmm_fused_fwd)  # eager calls without the dispatcher's round trip (ops/eager.py)


def _pow2_at_least_16(x: int) -> bool:
    return x >= 16 and (x & (x - 1)) == 0


def check_fused_args(fn: str, q: Tensor, k: Tensor, v: Tensor, state: MemoryState, chunk_size: int) -> None:
    """The fused kernel's own limits (on top of :func:`check_memory_args`)."""
    if q.dtype not in _DTYPES:
        raise ValueError(f"{fn}: q dtype must be float32, bfloat16 or float16 (the kernel accumulates in float32), got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{fn}: q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"{fn}: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    depth = len(state.weights)
    if depth not in (1, 2):
        raise ValueError(f"{fn}: initial_state must hold a memory of depth 1 or 2 (the fused kernel's scope), got depth {depth}")
    if not _pow2_at_least_16(chunk_size):
        raise ValueError(f"{fn}: chunk_size must be a power of two >= 16 (a tl.dot tile), got {chunk_size}")
    dims = {"Dk (q.shape[-1])": k.shape[-1], "Dv (v.shape[-1])": v.shape[-1]}
    if depth == 2:
        dims["hidden (initial_state.weights[0].shape[-1])"] = state.weights[0].shape[-1]
    for name, d in dims.items():
        if not _pow2_at_least_16(d):
            raise ValueError(f"{fn}: {name} must be a power of two >= 16 (a tl.dot tile), got {d}")


#: The backward: ``group_elements``: chunks are processed in groups whose ``[G, B, H, C, hidden]``
#: intermediates hold at most this many elements each (the read's autograd keeps about ten such
#: tensors); ``compile_sweep``: run the sequential adjoint sweep through ``torch.compile(fullgraph=True)``
#: in blocks of ``sweep_block`` chunks (:func:`~.fused_backward.sweep_block`; the rest of a group chunk by
#: chunk, :func:`~.fused_backward.state_adjoint`): None = on CUDA, not under Triton's interpreter; a dict:
#: torch.compile's ``backend`` / ``mode`` / ``options``. Eager, the sweep is host-bound (~60 small ops
#: per chunk); compiled per chunk, the call's host cost still dominated (82 ms for 256 chunks on an H100).
#: ``half_tf32``: with bf16 / fp16 inputs the batched read and update products (not the sweep, which
#: carries the adjoint across chunks) run in TF32. ``timing``: a dict to receive the phases' CUDA-event
#: milliseconds (``read_vjp``, ``key_pass``, ``sweep``, ``update_vjp``; summed over groups and calls), or None.
#: ``compile_batched``: the batched read and update functions too (inductor fuses their elementwise
#: work, forward and backward); same values as ``compile_sweep``.
#: ``MNEMO_MEMORY_SWEEP``: ``eager`` turns ``compile_sweep`` off, ``compile`` (default) leaves it None.
#: Inductor's CUDA graphs (``mode="reduce-overhead"``) are not supported here: an experiment (commit 4d59d1b,
#: which marked a step per block and cloned the carried adjoint) cut the op's forward + backward at 16K from 114
#: to 86 ms on an H100, but the process segfaulted when the layer's backward ran it (docs/results/neural_memory.md).
_SWEEP_MODES = {"compile": None, "eager": False}
#: ``triton_sweep``: depth 2 runs the sweep as one Triton launch per group (:func:`_lmm_sweep_kernel`; None =
#: wherever the sizes allow it, False = the PyTorch sweep above). ``key_pass_from_forward``: the backward takes
#: the key pass from the forward walk's kept values (:func:`keeps_key_pass`). ``update_vjp``: the update's share
#: of the input gradients by "triton" (the default; env ``MNEMO_MEMORY_UPDATE_VJP`` sets it: one program per chunk and
#: head, :mod:`.fused_update_vjp`, at depth 2 with power-of-two sizes and ``d_k = d_v``, else as "adjoint"; H100 at 16K,
#: matched / default: the phase 5.43 / 5.88 -> 3.42 / 4.11 ms, peak 0.1 GiB lower, sixteenth session), "adjoint"
#: (:func:`_update_vjp_adjoint`, batched PyTorch, compiled, from the key pass and the sweep's adjoints: 6.1 / 6.7 ms against
#: 9.6 / 10.0 at 16K on an H100, matched / default, and 0.6 GiB less peak, than "autograd"; ~5.5 ms with TF32 products)
#: or "autograd" (a batched autograd pass recomputing the key pass). ``read_vjp``: the read's share likewise, by
#: "triton" (the default: the read's transpose per chunk and head in two Triton launches, :mod:`.fused_read_vjp`,
#: at depth 2 with power-of-two sizes, else as "adjoint"), "adjoint" (:func:`~.fused_backward.read_vjp`, the
#: transpose written out in batched PyTorch, from the key pass) or "autograd" (autograd of the key pass + clip +
#: read of the chunks). H100 at 16K, matched / default, the read's phase: 8.1 / 9.3 ms (Triton, kernels + their
#: PyTorch rest), 10.4 / 10.3 (adjoint), 12.0 / 11.8 (autograd). Env ``MNEMO_MEMORY_READ_VJP`` sets it.
#: ``fold_read`` (a bool, default True; env ``MNEMO_MEMORY_FOLD_READ=0`` sets it False): with the "triton" / "adjoint"
#: read and the "adjoint" update, the read's cotangents of the key pass (:class:`~.fused_backward.ReadCotangents`) go
#: to the sweep and the update's VJP, which add them to their own before their key-pass VJPs (it is linear in them),
#: instead of through a batched key-pass VJP of their own in the read's phase (``[G, B, H, C, hidden]`` fp32 passes);
#: the update's VJP then gives the read's share of dk, dv too. With an "autograd" form it does not apply. H100 at
#: 16K, matched / default, two calls: the read's tail 3.55 / 3.87 -> 0.61 / 0.64 ms, the sweep 11.8 / 14.8 ->
#: 15.0-15.9 / 16.0-17.1 ms (the Triton sweep's own code gets slower), forward + backward 41.6-42.2 / 45.3-45.7 ->
#: 41.2-42.2 / 42.9-43.8 ms, peak 0.47 / 0.53 GiB lower (docs/results/neural_memory.md, thirteenth session).
#: ``update_tf32`` (default True; env ``MNEMO_MEMORY_UPDATE_TF32=0`` sets it False): the "adjoint" update VJP's products
#: on TF32 under ``half_tf32`` (bf16 / fp16 inputs), as the read's and the autograd update's; False keeps them fp32.
#: ``overlap`` (default False since the bf16x3 products; env ``MNEMO_MEMORY_OVERLAP=1`` sets it True): on CUDA the batched passes (key pass, read
#: VJP, update VJP, the gradients' accumulation) run on a second stream beside the sweep, which leaves most of each SM
#: idle (one 4-warp program per SM, latency-bound): the next group's key pass and read during this group's sweep, this
#: group's update during the next one's. The phase timer (``timing``) is off then. H100, 16K, matched / default, one call:
#: forward + backward 42.1 / 42.5 ms on one stream, 41.5 / 41.2 with the overlap, 41.2 / 39.6 with it and groups of
#: ``group_elements = 2^24`` (64 chunks at 16 heads, hidden 256; 2^25 before), peak 6.35 -> 4.48 GiB (2^23: 3.5 GiB, but
#: 52.7 / 40.9 ms) (docs/results/neural_memory.md, fourteenth session). With the faster bf16x3 walks the overlap stopped
#: paying: in two calls the one-stream order was 0.3–0.8 ms faster (31.7 / 33.4 ms against 32.3 / 34.2; the kernels of
#: both streams slow down side by side), so it is off by default (fifteenth session). Results are bit-identical either way.
#: ``read_sums_from_forward`` (default True; env ``MNEMO_MEMORY_READ_SUMS=0`` sets it False): where the forward keeps the
#: key pass, its batched read also keeps layer 2's sums over the hidden dimension, ``Ĥ W_2, Ĥ S_2, Ĥ Hᵀ`` (``[n, B, H, C, ·]``
#: fp32, three more tensors of a chunk's width: 0.2 GiB at 16K tokens, 16 heads, d 64), and the Triton read VJP's pass A
#: takes them instead of recomputing the read over every hidden slice (:func:`~.fused_read_vjp.lmm_read_vjp`).
#: ``read_z_from_forward`` (with it; env ``MNEMO_MEMORY_READ_Z=0`` off): the read's pre-activation ``Ẑ_1``
#: (``[n, B, H, C, hidden]`` fp32, 0.27 GiB more at 16K) is kept too, and pass B takes it instead of four products.
#: ``update_u_from_sweep`` (default True; env ``MNEMO_MEMORY_SWEEP_U=0`` off): where the Triton sweep and the Triton update
#: VJP both run, the sweep stores each chunk's complete cotangent of Δ_2 (``[G, B, H, C, d_v]`` fp32 a group; with the
#: clip also ``g̃, ñ``'s, ``[G, B, H, 2, C]``), which it sums after its barrier anyway, and the update's VJP loads them
#: instead of recomputing them over every hidden slice (:func:`~.fused_update_vjp.lmm_update_vjp`'s ``u``, ``gsum``).
BACKWARD: dict = {"group_elements": int(os.environ.get("MNEMO_MEMORY_GROUP_ELEMENTS", 1 << 24)), "compile_sweep": _SWEEP_MODES.get(os.environ.get("MNEMO_MEMORY_SWEEP", "compile")),
                  "compile_batched": None, "sweep_block": 8, "half_tf32": True, "triton_sweep": None, "timing": None,
                  "key_pass_from_forward": True, "update_vjp": os.environ.get("MNEMO_MEMORY_UPDATE_VJP", "triton"),
                  "read_vjp": os.environ.get("MNEMO_MEMORY_READ_VJP", "triton"),
                  "fold_read": os.environ.get("MNEMO_MEMORY_FOLD_READ", "1") != "0",
                  "update_tf32": os.environ.get("MNEMO_MEMORY_UPDATE_TF32", "1") != "0",
                  "overlap": os.environ.get("MNEMO_MEMORY_OVERLAP", "0") == "1",
                  "read_sums_from_forward": os.environ.get("MNEMO_MEMORY_READ_SUMS", "1") != "0",
                  "read_z_from_forward": os.environ.get("MNEMO_MEMORY_READ_Z", "1") != "0",
                  "update_u_from_sweep": os.environ.get("MNEMO_MEMORY_SWEEP_U", "1") != "0"}
_COMPILED_SWEEP: list = []


def _compile_opts(flag, device: torch.device) -> dict | None:
    """torch.compile kwargs for a ``BACKWARD`` compile setting (None: do not compile)."""
    if flag is None:
        flag = device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
    if not flag:
        return None
    return flag if isinstance(flag, dict) else {}  # a dict: torch.compile's backend / mode / options


def _compiled(fn, opts: dict):
    """``torch.compile(fn, fullgraph=True, dynamic=False, **opts)``, cached. ``fn`` itself, not a
    ``functools.partial``: dynamo keys its cache by code object, and every partial compiles through one
    shared wrapper, whose guard chain then grows with every function and shape."""
    key = (fn.__name__, repr(sorted(opts.items())))
    for k, cfn in _COMPILED_SWEEP:
        if k == key:
            return cfn
    cfn = torch.compile(fn, fullgraph=True, dynamic=False, **opts)
    _COMPILED_SWEEP.append((key, cfn))
    return cfn


def _sweep_fns(device: torch.device):
    """``(per-chunk step, block step or None)`` per ``BACKWARD["compile_sweep"]``."""
    opts = _compile_opts(BACKWARD["compile_sweep"], device)
    if opts is None:
        return state_adjoint, None
    return _compiled(state_adjoint, opts), _compiled(sweep_block, opts)


def _batched_read(q, k, v, g, nmat, beta, f, w, s, activation, residual, layer_norm, ln_eps, max_grad_norm):
    """The read of a batch of chunks at their entering states (key pass, clip, dual-form read): ``y``."""
    xs, deltas = _key_pass(k, v, w, activation, residual, layer_norm, ln_eps)
    gm, _ = _clipped(xs, deltas, g, nmat, max_grad_norm)
    return _read(q, xs, deltas, gm, beta, f, w, s, activation, residual, layer_norm, ln_eps)


def _batched_update(k, v, g, nmat, beta, m, f, w, s, activation, residual, layer_norm, ln_eps, max_grad_norm):
    """The states leaving a batch of chunks: ``[*w', *s']``."""
    xs, deltas = _key_pass(k, v, w, activation, residual, layer_norm, ln_eps)
    gm, nm = _clipped(xs, deltas, g, nmat, max_grad_norm)
    w_new, s_new = _update(xs, deltas, gm, nm, beta, m, f, w, s)
    return [*w_new, *s_new]


def _key_pass_flat(k, v, z1, p, d2, z2, activation, residual, layer_norm, ln_eps):
    """:func:`~.fused_backward.key_pass_from_forward`'s new tensors as a flat tuple (what ``torch.compile``
    returns most simply): ``σ(Z_1), Δ_1, σ'(Z_1), P ∘ σ''(Z_1)`` [, ``out, rstd, dmean``]."""
    kp = key_pass_from_forward(k, v, z1, p, d2, z2, activation, residual, layer_norm, ln_eps)
    return (kp.xs[1], kp.deltas[0], kp.d1[0], kp.d2[0]) + ((kp.out, kp.rstd, kp.dmean) if layer_norm else ())


def _kept_key_pass(device: torch.device, k, v, kept, activation, residual, layer_norm, ln_eps) -> KeyPass:
    """The key pass from the forward's kept ``Z_1, P, Δ_2, Z_2``, its elementwise work compiled per
    ``BACKWARD["compile_batched"]`` (one fused pass instead of ~15 eager ones over ``[G, B, H, C, hidden]``)."""
    h1, d1, s1, curv, *ln = _batched_compiled(_key_pass_flat, device)(k, v, *kept, activation, residual, layer_norm, ln_eps)
    out, rstd, dmean = ln if ln else (None, None, None)
    return KeyPass([k, h1], [d1, kept[2]], [s1], [curv], out, rstd, dmean)


def _update_vjp_adjoint(kp, g_last, n_last, beta_c, m_c, f_c, w, s, adj_w, adj_s, residual, layer_norm, max_grad_norm, add_cot=None,
                        stats=None):  # fmt: skip
    """The update's share of the gradients of ``(k, v, G, N, β, m, f)`` for a batch of chunks, from their key
    pass and the adjoint of the state leaving each (:func:`~.fused_backward.state_adjoint` with ``inputs``;
    compiled, the state adjoint it also forms is dead code): ``(dk, dv, dg_last, dn_last, dβ_c, dm_c, df_c)``. The update
    reads only the last row of ``G, N`` and the last element of ``β, m, f``: the rest of their gradients is zero, and
    the caller adds these where they belong (:meth:`_GroupGrads.add_last`). ``add_cot``: the read's key-pass
    cotangents of the same chunks (``BACKWARD["fold_read"]``): ``dk, dv`` then hold the read's share too. ``stats``: the
    clip's, as :func:`~.fused_backward.state_adjoint` takes them."""
    *_, grads = state_adjoint(kp, g_last, n_last, beta_c, m_c, f_c, w, adj_w, adj_s, layer_norm, max_grad_norm,
                              inputs=True, s=s, residual=residual, add_cot=add_cot, stats=stats)  # fmt: skip
    return grads


def _update_kernel_on(k: Tensor, ws: Sequence[Tensor]) -> bool:
    """Whether the backward's update VJP runs the Triton kernel (``BACKWARD["update_vjp"] == "triton"`` where it applies:
    :func:`~.fused_update_vjp.supported` looks only at the trailing sizes of ``k [..., C, d_k]`` and ``ws``)."""
    from . import fused_update_vjp

    return BACKWARD["update_vjp"] == "triton" and fused_update_vjp.supported(k, ws)


def _update_vjp_triton(k, kp, g_last, n_last, w, s, adj_w, adj_s, residual, layer_norm, max_grad_norm, add_cot, stats, prec, u=None, gsum=None):
    """:func:`_update_vjp_adjoint`'s gradients (the same seven, last rows / elements) by the Triton kernel
    (:mod:`.fused_update_vjp`; depth 2), from the keys ``k`` of the same chunks, the products' precision ``prec`` (a
    ``tl.dot`` input precision); ``u``, ``gsum``: the sweep's cotangents of Δ_2 and ``g̃, ñ`` (``BACKWARD["update_u_from_sweep"]``)."""
    from . import fused_update_vjp

    return fused_update_vjp.launch(k, kp, g_last, n_last, w, s, adj_w, adj_s, residual, layer_norm, max_grad_norm, stats, add_cot, prec, u, gsum)


def _batched_compiled(fn, device: torch.device):
    """``fn`` (one of the backward's batched passes) compiled per ``BACKWARD["compile_batched"]``, or ``fn``
    itself where that setting says not to compile (the configuration arguments are constants to dynamo)."""
    opts = _compile_opts(BACKWARD["compile_batched"], device)
    return fn if opts is None else _compiled(fn, opts)


def _matmul_fp32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` with fp32 products whatever ``allow_tf32`` says (the backward runs its batched products under
    :class:`_HalfTF32`; this one stands in for the sweep kernel's own, which are never coarser than bf16x3)."""
    with _HalfTF32(False, force=True):
        return torch.matmul(a, b)


class _HalfTF32:
    """TF32 matmuls inside (for the backward's batched products with half inputs), the setting restored after;
    ``force``: ``allow_tf32`` set to ``on`` either way (off: fp32 products whatever the caller allowed)."""

    def __init__(self, on: bool, force: bool = False):
        self.on, self.force = on, force

    def __enter__(self):
        self.prev = torch.backends.cuda.matmul.allow_tf32
        if self.on or self.force:
            torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.prev


#: The backward's second CUDA stream per device, made once (:class:`_Streams`).
_STREAMS: dict = {}


class _Streams:
    """The backward's two streams (``BACKWARD["overlap"]`` on CUDA): the current one, which runs the sweeps, and a
    second one for the batched passes beside them. Off (the CPU, the interpreter, or overlap off) every method is a
    no-op and the passes run on the current stream in the same order. (Running the sweeps on a stream of the highest
    priority instead, so that their programs are placed before more blocks of the batched passes, measured the same
    on an H100: docs/results/neural_memory.md, fourteenth session.)"""

    def __init__(self, device: torch.device, overlap: bool):
        self.on = overlap and device.type == "cuda"
        if self.on:
            key = device.index if device.index is not None else torch.cuda.current_device()
            if key not in _STREAMS:
                _STREAMS[key] = torch.cuda.Stream(device)
            self.main = torch.cuda.current_stream(device)
            self.aux = _STREAMS[key]

    def start(self) -> None:
        """The second stream waits for everything queued so far on the current one (the chunk-major copies, the
        zeroed accumulators), before its first pass."""
        if self.on:
            self.aux.wait_stream(self.main)

    def side(self):
        return torch.cuda.stream(self.aux) if self.on else contextlib.nullcontext()

    def record_side(self):
        return self.aux.record_event() if self.on else None

    def record_main(self):
        return self.main.record_event() if self.on else None

    def main_waits(self, event) -> None:
        if self.on:
            self.main.wait_event(event)

    def side_waits(self, event) -> None:
        if self.on:
            self.aux.wait_event(event)

    def used_on_side(self, tensors) -> None:
        """Tensors made on the current stream that the second one reads: the allocator must not hand their memory
        to the current stream again before the second one's work queued so far has run."""
        if self.on:
            for t in tensors:
                t.record_stream(self.aux)

    def join(self) -> None:
        """The current stream waits for everything queued on the second."""
        if self.on:
            self.main.wait_stream(self.aux)


class _PhaseTimer:
    """CUDA-event timing of the backward's phases into ``BACKWARD["timing"]`` (a no-op when it is None)."""

    def __init__(self, device: torch.device, off: bool = False):
        self.out = BACKWARD["timing"] if device.type == "cuda" and not off else None
        self.marks: list = []

    def mark(self, name: str | None) -> None:
        if self.out is None:
            return
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self.marks.append((name, e))

    def close(self) -> None:
        if self.out is None or not self.marks:
            return
        torch.cuda.synchronize()
        for (name, a), (_, b) in zip(self.marks, self.marks[1:]):
            if name is not None:
                self.out[name] = self.out.get(name, 0.0) + a.elapsed_time(b)


def _bthd(x: Tensor, n: int, c: int, dtype: torch.dtype | None = None) -> Tensor:
    """``[n, B, H, C, D] -> [B, n·C, H, D]`` in ``dtype`` (the inverse of :func:`~.chunked._chunk_major`): one copy for
    the layout and the cast."""
    out = torch.empty(x.shape[1], n * c, x.shape[2], x.shape[4], dtype=dtype or x.dtype, device=x.device)
    out.view(x.shape[1], n, c, x.shape[2], x.shape[4]).copy_(x.permute(1, 0, 3, 2, 4))
    return out


class _GroupGrads:
    """Gradients ``[n, ...]`` filled one group of chunks (a slice of the first axis) at a time: a slice's first
    contribution is copied in and later ones added, and rows no slice wrote are zeroed at the end. This replaces
    zero-filled accumulators and ``+=`` of every part (at 16K, 16 heads: ~0.5 ms of fills and adds)."""

    def __init__(self, like: Sequence[Tensor]):
        self.bufs = [torch.empty_like(x) for x in like]
        self.written: list[set] = [set() for _ in like]

    def _first(self, i: int, sl: slice) -> bool:
        """Whether this is the slice's first contribution to gradient ``i`` (and marks it written)."""
        key = (sl.start, sl.stop)
        if key in self.written[i]:
            return False
        self.written[i].add(key)
        return True

    def add(self, i: int, sl: slice, x: Tensor | None) -> None:
        if x is None:
            return
        if self._first(i, sl):
            self.bufs[i][sl].copy_(x)
        else:
            self.bufs[i][sl] += x

    def add_last(self, i: int, sl: slice, x: Tensor | None, axis: int) -> None:
        """Adds ``x`` to the last index of ``axis`` of the slice (the update's gradients of ``G, N`` are their last rows,
        of ``β, m, f`` their last elements: added there rather than padded with zeros to the full shape and added whole)."""
        if x is None:
            return
        if self._first(i, sl):
            self.bufs[i][sl].zero_()
        self.bufs[i][sl].select(axis, -1).add_(x)

    def finish(self) -> list[Tensor]:
        for buf, written in zip(self.bufs, self.written):
            row = 0
            for lo, hi in sorted(written) + [(buf.shape[0], buf.shape[0])]:  # (the groups' slices do not overlap)
                if lo > row:
                    buf[row:lo].zero_()
                row = max(row, hi)
        return self.bufs


class _FusedMemory(torch.autograd.Function):
    """The full chunks of a call, trained: the fused forward kernel writes the state entering every chunk
    (one checkpoint per chunk, fp32); the backward is :mod:`.fused_backward`'s (the read and the update
    as batched vector-Jacobian products over groups of chunks, the state's adjoint chunk by chunk)."""

    @staticmethod
    def forward(ctx, cfg, q, k, v, g, nmat, beta, m, f, *state):
        depth = len(state) // 2
        keep = keeps_key_pass(q, state[:depth], beta.shape[-1], cfg[4] is not None)
        res = _lmm_fused_fwd(q, k, v, g, nmat, beta, m, f, list(state[:depth]), list(state[depth:]), *cfg, True, keep)
        slots = res[1 : 1 + 2 * depth]
        ctx.save_for_backward(q, k, v, g, nmat, beta, m, f, *slots, *res[1 + 2 * depth :])  # + Z_1, P, Δ_2, Z_2 [+ the read's sums, Ẑ_1] when kept
        ctx.cfg, ctx.depth = cfg, depth
        ctx.state_dtypes = [x.dtype for x in state]
        return (res[0], *(x[-1].clone() for x in slots))

    @staticmethod
    def backward(ctx, dy, *d_final):
        from . import fused_read_vjp, fused_update_vjp  # (they take their jit helpers from this module)

        for key, modes in (("read_vjp", ("triton", "adjoint", "autograd")), ("update_vjp", ("triton", "adjoint", "autograd"))):
            if BACKWARD[key] not in modes:
                raise ValueError(f"BACKWARD[{key!r}] must be one of {modes}, got {BACKWARD[key]!r}")
        if not isinstance(BACKWARD["fold_read"], bool):
            raise ValueError(f"BACKWARD['fold_read'] must be a bool, got {BACKWARD['fold_read']!r}")
        # the read's key-pass cotangents to the sweep and the update's VJP (the autograd read has none to give; the
        # autograd update cannot take them, and the read's share of dk, dv must then come from the read itself)
        fold = BACKWARD["fold_read"] and BACKWARD["read_vjp"] != "autograd" and BACKWARD["update_vjp"] != "autograd"

        q, k, v, g, nmat, beta, m, f, *rest = ctx.saved_tensors
        activation, residual, layer_norm, ln_eps, max_grad_norm = ctx.cfg
        depth = ctx.depth
        slots, kept = rest[: 2 * depth], rest[2 * depth :]
        kept, read_parts = kept[:4], kept[4:]  # (Z_1, P, Δ_2, Z_2; the read's Ĥ W_2, Ĥ S_2, Ĥ Hᵀ: empty unless kept)
        n, bsz, heads, c = beta.shape
        f32 = torch.float32
        cm = lambda x: _chunk_major(x, n, c, f32)  # noqa: E731  [B, n·C, H, D] -> [n, B, H, C, D]
        qc, kc, vc = cm(q), cm(k), cm(v)
        dyc = cm(dy) if dy is not None else torch.zeros_like(vc)
        w_slots, s_slots = slots[:depth], slots[depth:]
        adj = [torch.zeros_like(x[-1]) if d is None else d.to(f32) for x, d in zip(slots, d_final)]
        adj_w, adj_s = adj[:depth], adj[depth:]
        # dq, dk, dv, then the coefficients' gradients (G, N, β, m, f), filled group by group
        sums = _GroupGrads((qc, kc, vc, g, nmat, beta, m, f))
        widest = max(x.shape[-1] for x in (*w_slots, qc))
        group = max(1, min(n, BACKWARD["group_elements"] // (bsz * heads * c * widest)))
        kw = dict(activation=activation, residual=residual, layer_norm=layer_norm, ln_eps=ln_eps)
        step, block = _sweep_fns(q.device)
        ublock = max(1, int(BACKWARD["sweep_block"]))
        tf32 = _HalfTF32(bool(BACKWARD["half_tf32"]) and q.dtype in (torch.bfloat16, torch.float16) and q.is_cuda)
        streams = _Streams(q.device, bool(BACKWARD["overlap"]))
        update_kernel = _update_kernel_on(kc, w_slots)  # (on the trailing sizes only: the same for every group)
        timer = _PhaseTimer(q.device, off=streams.on)  # (phases overlap on two streams: not timed apart)

        def prep(lo: int) -> dict:
            """A group's batched passes that need no adjoint: its key pass, the clip's stats and the read's VJP
            (its input gradients accumulated here)."""
            hi = min(n, lo + group)
            sl = slice(lo, hi)
            ws = [x[sl] for x in w_slots]
            ss = [x[sl] for x in s_slots]
            coefs = [x[sl] for x in (g, nmat, beta, m, f)]
            with torch.no_grad():
                timer.mark("key_pass")
                if kept:  # the forward kernel's own Z_1, P, Δ_2, Z_2 of these chunks
                    kp = _kept_key_pass(q.device, kc[sl], vc[sl], [x[sl] for x in kept], **kw)
                else:
                    kp = key_pass_saved(kc[sl], vc[sl], ws, **kw)
                # the clip's per-token norms and scale, once per group for the read, the sweep and the update's VJP
                stats = _clip_stats(kp, max_grad_norm) if max_grad_norm is not None else None
            # 1) the read, batched: its share of the input gradients and b_i of the state's adjoint
            timer.mark("read_vjp")
            cot = None  # (folded: the read's key-pass cotangents, for the sweep and the update's VJP)
            if BACKWARD["read_vjp"] == "autograd":
                with torch.enable_grad(), tf32:
                    leaves = [x.detach().requires_grad_() for x in (qc[sl], kc[sl], vc[sl], *coefs, *ws, *ss)]
                    ql, kl, vl, gl, nl, bl, ml, fl = leaves[:8]
                    y = _batched_compiled(_batched_read, q.device)(ql, kl, vl, gl, nl, bl, fl, leaves[8 : 8 + depth], leaves[8 + depth :], *ctx.cfg)
                    grads = torch.autograd.grad(y, leaves, dyc[sl], allow_unused=True)
                del y
                b_w, b_s = grads[8 : 8 + depth], grads[8 + depth :]
                read_grads = grads[:8]
            else:
                if BACKWARD["read_vjp"] == "triton" and fused_read_vjp.supported(qc, ws):  # the transpose in two launches
                    with torch.no_grad():
                        gt = coefs[0] if stats is None else coefs[0] * stats[3].unsqueeze(-2)
                        sums_r = [x[sl] for x in read_parts] if read_parts else None
                        parts = fused_read_vjp.launch(qc[sl], kc[sl], gt, coefs[2], coefs[4], ws, ss, kp.xs[1], kp.deltas[0], kp.deltas[1], dyc[sl],
                                                      activation, layer_norm, ln_eps, LAUNCH["half_read_precision"] if tf32.on else "ieee",
                                                      sums_r)  # fmt: skip
                        timer.mark("read_vjp_tail")
                        with tf32:
                            out = _batched_compiled(fused_read_vjp.after_kernels, q.device)(
                                qc[sl], kc[sl], gt, dyc[sl], kp, coefs[0], parts, ws, residual, layer_norm, max_grad_norm, stats, fold)  # fmt: skip
                        del parts
                else:  # written out, from the key pass: no autograd pass
                    with torch.no_grad(), tf32:
                        out = _batched_compiled(read_vjp, q.device)(qc[sl], kp, coefs[0], coefs[2], coefs[4], ws, ss, dyc[sl], *ctx.cfg, fold,
                                                                    stats=stats)  # fmt: skip
                if fold:  # the cotangents in place of dk, dv: the update's VJP gives the read's share of those with its own
                    dq_r, cot, dg_r, db_r, df_r, b_w, b_s = out
                    dk_r = dv_r = None
                else:
                    dq_r, dk_r, dv_r, dg_r, db_r, df_r, b_w, b_s = out
                del out
                read_grads = (dq_r, dk_r, dv_r, dg_r, None, db_r, None, df_r)  # (the read does not use N or m)
            with torch.no_grad():
                for i, a in enumerate(read_grads):
                    sums.add(i, sl, a)
                b_w = [torch.zeros_like(x) if b is None else b for x, b in zip(ws, b_w)]
                b_s = [torch.zeros_like(x) if b is None else b for x, b in zip(ss, b_s)]
            # the coefficients' last rows / elements: what the update (sweep and update VJP) reads of them
            g_last, n_last = g[sl][..., -1, :], nmat[sl][..., -1, :]
            ends = [x[sl][..., -1] for x in (beta, m, f)]
            return dict(sl=sl, ws=ws, ss=ss, kp=kp, stats=stats, cot=cot, b_w=b_w, b_s=b_s, g_last=g_last, n_last=n_last, ends=ends)

        def sweep(p: dict, adj_w, adj_s):
            """2) the state's adjoint over a group, chunk by chunk in reverse: ``(adj_w, adj_s, nxt)``, ``nxt`` the
            adjoint leaving each chunk (what the update's products need)."""
            sl, ws, kp, cot = p["sl"], p["ws"], p["kp"], p["cot"]
            g_last, n_last, ends, b_w, b_s = p["g_last"], p["n_last"], p["ends"], p["b_w"], p["b_s"]
            with torch.no_grad():
                timer.mark("sweep")
                if _triton_sweep_on(q, depth, w_slots[0].shape[-1], k.shape[-1], v.shape[-1], c):
                    if BACKWARD["update_u_from_sweep"] and update_kernel:  # (for the update's VJP: p["u"], p["gsum"])
                        p["u"] = kp.deltas[1].new_empty(kp.deltas[1].shape, dtype=f32)
                        p["gsum"] = None if max_grad_norm is None else g_last.new_empty((*g_last.shape[:-1], 2, c), dtype=f32)
                    return _sweep_triton(kp, ws, b_w, b_s, g_last, n_last, ends, adj_w, adj_s, layer_norm, max_grad_norm,
                                         q.dtype != torch.float32, cot, stats=p["stats"], keys_bf16=_keys_bf16(k), u_out=p.get("u"),
                                         g_out=p.get("gsum"))  # fmt: skip
                nxt = [torch.empty_like(x) for x in (*ws, *p["ss"])]
                j = sl.stop - sl.start
                while j > 0:
                    if block is not None and j >= ublock:  # chunks j - U .. j - 1 in one compiled call
                        b = slice(j - ublock, j)
                        adj_w, adj_s, leaving = block(kp.at(b), g_last[b], n_last[b], *(e[b] for e in ends), [x[b] for x in ws], adj_w, adj_s,
                                                      [x[b] for x in b_w], [x[b] for x in b_s], layer_norm, max_grad_norm,
                                                      None if cot is None else cot.at(b))  # fmt: skip
                        for buf, x in zip(nxt, leaving):
                            buf[b].copy_(x)
                        j -= ublock
                        continue
                    j -= 1
                    for buf, a in zip(nxt, (*adj_w, *adj_s)):
                        buf[j].copy_(a)
                    adj_w, adj_s = step(kp.at(j), g_last[j], n_last[j], *(e[j] for e in ends), [x[j] for x in ws], adj_w, adj_s,
                                        layer_norm, max_grad_norm, [x[j] for x in b_w], [x[j] for x in b_s],
                                        add_cot=None if cot is None else cot.at(j))  # fmt: skip
                return adj_w, adj_s, nxt

        def update(p: dict, nxt) -> None:
            """3) the update, batched: its share of the gradients of k, v and the coefficients (accumulated here)."""
            sl, ws, ss, kp, cot = p["sl"], p["ws"], p["ss"], p["kp"], p["cot"]
            timer.mark("update_vjp")
            if update_kernel:  # per chunk and head, one launch
                with torch.no_grad():
                    prec = ("tf32" if tf32.on else "ieee") if BACKWARD["update_tf32"] else "ieee"
                    grads2 = _update_vjp_triton(kc[sl], kp, p["g_last"], p["n_last"], ws, ss, nxt[:depth], nxt[depth:], residual, layer_norm,
                                                max_grad_norm, cot, p["stats"], prec, p.get("u"), p.get("gsum"))  # fmt: skip
            elif BACKWARD["update_vjp"] != "autograd":  # "adjoint": from the key pass and ā_{i+1}, no autograd pass
                # half_tf32: TF32 products like the read's and the autograd update's (without it, the thirteenth
                # session's profile found this pass's 24 fp32 GEMMs on the FP32 cores: 3.4 ms at 16K)
                with torch.no_grad(), (tf32 if BACKWARD["update_tf32"] else contextlib.nullcontext()):
                    grads2 = _batched_compiled(_update_vjp_adjoint, q.device)(kp, p["g_last"], p["n_last"], *p["ends"], ws, ss, nxt[:depth], nxt[depth:], residual, layer_norm,
                                                      max_grad_norm, cot, stats=p["stats"])  # fmt: skip
            else:
                with torch.enable_grad(), tf32:
                    leaves2 = [x.detach().requires_grad_() for x in (kc[sl], vc[sl], *(x[sl] for x in (g, nmat, beta, m, f)))]
                    new_state = _batched_compiled(_batched_update, q.device)(*leaves2, ws, ss, *ctx.cfg)
                    grads2 = torch.autograd.grad(new_state, leaves2, nxt, allow_unused=True)
                with torch.no_grad():
                    for i, x in enumerate(grads2, start=1):  # (dk, dv, then the coefficients', whole)
                        sums.add(i, sl, x)
                return
            with torch.no_grad():  # the written-out forms: dk, dv, then the last rows of G, N and last elements of β, m, f
                sums.add(1, sl, grads2[0])
                sums.add(2, sl, grads2[1])
                for i, x, axis in zip(range(3, 8), grads2[2:], (-2, -2, -1, -1, -1)):
                    sums.add_last(i, sl, x, axis)

        # Groups in reverse. The sweep (sequential, latency-bound: one 4-warp program per SM) runs on the current
        # stream; with ``BACKWARD["overlap"]`` on CUDA the batched passes run on a second stream beside it: the next
        # group's key pass and read while this group's sweep runs, this group's update while the next one's sweep runs.
        # Every accumulation into dq, dk, dv and the coefficients' gradients happens on that second stream, in order.
        starts = list(range(((n - 1) // group) * group, -1, -group))
        streams.start()
        with streams.side():
            nxt_prep = prep(starts[0])
            ready = streams.record_side()
        for idx in range(len(starts)):
            p = nxt_prep
            streams.main_waits(ready)
            adj_w, adj_s, nxt = sweep(p, adj_w, adj_s)
            swept = streams.record_main()
            # (allocated on this stream, read on the other: not reused before it has; the sweep's Δ_2 cotangent too)
            streams.used_on_side([*nxt, *(x for x in (p.get("u"), p.get("gsum")) if x is not None)])
            with streams.side():
                if idx + 1 < len(starts):
                    nxt_prep = prep(starts[idx + 1])  # overlaps this group's sweep
                    ready = streams.record_side()
                streams.side_waits(swept)
                update(p, nxt)
            del p, nxt  # ([G, B, H, C, hidden] fp32 each: not kept into the next group)
        streams.join()
        timer.mark(None)
        timer.close()
        dq, dk, dv, *dcoef = sums.finish()
        out_q, out_k, out_v = (_bthd(x, n, c, t.dtype) for x, t in zip((dq, dk, dv), (q, k, v)))
        d_state = [a.to(dt) for a, dt in zip((*adj_w, *adj_s), ctx.state_dtypes)]
        return (None, out_q, out_k, out_v, *dcoef, *d_state)


#: Whether :func:`fused_coefficients` compiles :func:`gate_coefficients`: None = where
#: :func:`~mnemotorch.ops.compiled.compile_allowed` (on CUDA, outside Triton's interpreter, ``torch.compile``'s tracing
#: and CUDA-graph capture); False = never (env ``MNEMO_MEMORY_COMPILE_COEFFICIENTS=0``); a backend (a name or a
#: callable) = always, with it. Eager, the coefficient matrices are ~10 passes over ``[n, B, H, C, C]`` fp32 forward and
#: as many backward (masks, cumulative sums and their flips, casts); compiled, a 16K-token Titans layer's forward +
#: backward took 0.3-1.7 ms less on an H100 (seventeenth session, docs/results/neural_memory.md).
COMPILE_COEFFICIENTS = False if os.environ.get("MNEMO_MEMORY_COMPILE_COEFFICIENTS") == "0" else None
#: Whether :func:`fused_coefficients` takes the Triton kernels of :mod:`.fused_coefficients` (one program per chunk and
#: head, forward and backward) where they apply: fp32 coefficients, on CUDA or in Triton's interpreter. Off (env
#: ``MNEMO_MEMORY_COEFFICIENT_KERNEL=0``): the PyTorch form, compiled per ``COMPILE_COEFFICIENTS``.
COEFFICIENT_KERNEL = os.environ.get("MNEMO_MEMORY_COEFFICIENT_KERNEL", "1") != "0"


def fused_coefficients(theta: Tensor, eta: Tensor, alpha: Tensor, chunk_size: int, acc: torch.dtype) -> tuple[Tensor, ...]:
    """:func:`gate_coefficients` of gates ``[B, n·C, H]``: by the Triton kernels (``COEFFICIENT_KERNEL``), else compiled
    per ``COMPILE_COEFFICIENTS`` with only the length symbolic (one graph for every number of chunks > 1; inductor fuses
    the masks, sums and exponentials). The values differ from eager PyTorch by fp32 rounding (the order of the sums)."""
    if COEFFICIENT_KERNEL and acc == torch.float32 and (theta.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        from .fused_coefficients import gate_coefficients_triton

        return gate_coefficients_triton(theta, eta, alpha, chunk_size)
    backend = COMPILE_COEFFICIENTS
    if backend is None:
        backend = "inductor" if compile_allowed(theta) else False
    if not backend:
        return gate_coefficients(theta, eta, alpha, chunk_size, acc)
    fn = compiled_over_length(gate_coefficients, (0, 1, 2), backend, min_length=chunk_size + 1)
    return fn(theta, eta, alpha, chunk_size, acc)


def neural_memory_fused_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    initial_state: MemoryState | Sequence[Tensor],
    chunk_size: int = 64,
    activation: str = "silu",
    residual: bool = False,
    layer_norm: bool = False,
    ln_eps: float = DEFAULT_LN_EPS,
    max_grad_norm: float | None = None,
) -> tuple[Tensor, MemoryState]:
    """:func:`~.chunked.neural_memory_chunked`'s semantics, the full chunks in one fused Triton launch.

    Arguments and returns as :func:`~.reference.neural_memory_reference`. When autograd needs a graph,
    the kernel also writes the state entering every chunk (fp32, ``4 · d · hidden`` per chunk and head
    at depth 2: 256 KiB at d 64, hidden 256) and the backward runs from those checkpoints
    (:mod:`.fused_backward`). The partial segments of a call (a chunk begun by an earlier call, a
    partial last chunk) run through the eager chunked path, so the state carries across calls
    exactly as there. The state is returned in float32.
    """
    fn = "neural_memory_fused"
    state = check_memory_args(fn, q, k, v, theta, eta, alpha, initial_state, chunk_size, activation, residual, layer_norm)
    max_grad_norm = check_max_grad_norm(fn, max_grad_norm)
    ln_eps = check_ln_eps(fn, ln_eps)
    check_fused_args(fn, q, k, v, state, chunk_size)
    train = needs_grad(q, k, v, theta, eta, alpha, state)
    cfg = dict(activation=activation, residual=residual, layer_norm=layer_norm, ln_eps=ln_eps, max_grad_norm=max_grad_norm)
    total = q.shape[1]
    outs, start = [], 0
    if state.position and total:  # the rest of a chunk an earlier call began
        c = min(chunk_size - state.position, total)
        y, state = neural_memory_chunked(q[:, :c], k[:, :c], v[:, :c], theta[:, :c], eta[:, :c], alpha[:, :c], state, chunk_size, **cfg)
        outs.append(y)
        start = c
    n_full = (total - start) // chunk_size
    if n_full:
        end = start + n_full * chunk_size
        gates = (theta[:, start:end], eta[:, start:end], alpha[:, start:end])
        coefs = fused_coefficients(*gates, chunk_size, accumulation_dtype(q.dtype))
        qkv = (q[:, start:end], k[:, start:end], v[:, start:end])
        if train:
            res = _FusedMemory.apply((activation, residual, layer_norm, ln_eps, max_grad_norm), *qkv, *coefs, *state.weights, *state.momentum)
        else:
            res = _lmm_fused_fwd(*qkv, *coefs, list(state.weights), list(state.momentum), activation, residual, layer_norm, ln_eps,
                                 max_grad_norm, False)  # fmt: skip
        depth = len(state.weights)
        w, s = tuple(res[1 : 1 + depth]), tuple(res[1 + depth :])
        outs.append(res[0])
        state = MemoryState(w, s, w, 0)
        start = end
    if start < total:  # a partial last chunk: eager, its start weights kept in the state
        y, state = neural_memory_chunked(q[:, start:], k[:, start:], v[:, start:], theta[:, start:], eta[:, start:], alpha[:, start:],
                                         state, chunk_size, **cfg)  # fmt: skip
        outs.append(y)
    if not outs:
        return v.to(q.dtype), state
    y = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
    return y.to(q.dtype), state


def fused_supported(q: Tensor, k: Tensor, v: Tensor, state: MemoryState, chunk_size: int) -> bool:
    """Whether :func:`neural_memory_fused_forward` takes these arguments (no exception)."""
    try:
        check_fused_args("fused_supported", q, k, v, state, chunk_size)
    except ValueError:
        return False
    return True


#: The same function: it trains too (the name ``..._forward`` is from when it did not).
neural_memory_fused = neural_memory_fused_forward

__all__ = ["neural_memory_fused", "neural_memory_fused_forward", "BACKWARD", "lmm_fused_fwd", "fused_supported", "check_fused_args", "LAUNCH"]
