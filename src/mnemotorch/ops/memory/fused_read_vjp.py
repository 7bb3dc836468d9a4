"""The read's vector-Jacobian product of the fused Titans memory (depth 2) as one Triton launch.

:func:`~.fused_backward.read_vjp` written per (chunk, head): one program recomputes the chunk's dual-form
read from the state entering it and the key pass (``σ(Z_1)``, ``Δ_1``, ``Δ_2``), then runs its transpose, a hidden
slice at a time, with every ``[C, hidden]`` intermediate on chip. The batched PyTorch form moves those
intermediates (``[G, B, H, C, 256]`` fp32) through memory a dozen times; here each program reads its
state (4 × 64 KiB at d 64, hidden 256) and key pass once per pass and writes what the rest of the backward
needs. What it leaves to :func:`~.fused_backward.read_vjp_tail` (PyTorch, compiled) is the key pass's own VJP
(:func:`~.fused_backward.key_pass_vjp`) of the cotangents written here, and the clip.

Per chunk, with ``G̃`` the clipped coefficients, ``Δ_1 = P ∘ σ'(Z_1)``, ``X_1 = σ(Z_1)`` (the kept key
pass) and the read ``Ẑ_1 = β ∘ (Q W_1) + f ∘ (Q S_1) − (G̃ ∘ Q Kᵀ) Δ_1``, ``Ĥ = σ(Ẑ_1)``,
``Ẑ_2 = β ∘ (Ĥ W_2) + f ∘ (Ĥ S_2) − (G̃ ∘ Ĥ X_1ᵀ) Δ_2``, ``y = [q +] [LN](Ẑ_2)``:

* pass A over the hidden slices: ``Ĥ W_2``, ``Ĥ S_2`` and ``Ĥ X_1ᵀ`` summed, hence ``Ẑ_2`` and its
  cotangent ``dẐ_2`` (through the LayerNorm);
* layer 2's transpose (no slice): the cotangents of ``β, f`` (its share), of ``Δ_2``, of ``G̃`` (its
  share) and of ``Ĥ X_1ᵀ``;
* pass B over the slices: ``Ĥ`` again, then the direct shares ``Ĥᵀ (β ∘ dẐ_2)`` of ``W_2`` (and ``S_2``),
  the cotangent of ``X_1``, ``dẐ_1 = dĤ ∘ σ'(Ẑ_1)``, layer 1's direct shares ``Qᵀ (β ∘ dẐ_1)``, the
  cotangent of ``Δ_1``, and the sums over slices for ``dq`` and ``G̃ ∘ Q Kᵀ``'s cotangent;
* then the cotangent of ``G̃`` (layer 1's share) and of ``K`` as layer 1's ``X_0``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .fused_triton import _act, _act_grad, _ln_rows, _mmp

#: ``slice``: hidden columns a pass step holds; ``warps``: per program (one program per chunk and head).
LAUNCH_READ_VJP: dict = {"slice": 32, "warps": 8, "stages": 1}


@triton.jit
def _lmm_read_vjp_kernel(
    Q, K, GT, BETA, FV, W1, S1, W2, S2, X1, D1, D2, DY,
    DQ, DGT, DBETA, DF, BW1, BS1, BW2, BS2, DD1, DD2, DX0, DX1,
    ln_eps,
    C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, HID: tl.constexpr, BH: tl.constexpr,
    ACT: tl.constexpr, RESIDUAL: tl.constexpr, LN: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """One program per (chunk ``program_id(0)``, head ``program_id(1)``); every tensor ``[G, B·H, …]``
    contiguous, fp32: ``Q, K [C, DK]``, ``GT [C, C]`` (clipped), ``BETA, FV [C]``, the entering state
    ``W1, S1 [DK, HID]``, ``W2, S2 [HID, DV]``, the key pass ``X1, D1 [C, HID]`` (``σ(Z_1)``, ``Δ_1``), ``D2 [C, DV]``
    (``Δ_2``), ``DY [C, DV]``. Writes ``DQ``, ``DGT`` (of ``G̃``), ``DBETA, DF``, the direct state shares
    ``BW1 … BS2`` and the key pass's cotangents ``DD1 [C, HID]`` (of ``Δ_1``), ``DD2`` (of ``Δ_2``), ``DX0``
    (of ``K`` as layer 1's input), ``DX1 [C, HID]`` (of ``X_1``)."""
    row = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    rows = tl.arange(0, C)
    ck = tl.arange(0, DK)
    cv = tl.arange(0, DV)
    ch = tl.arange(0, BH)
    q = tl.load(Q + row * C * DK + rows[:, None] * DK + ck[None, :])
    gt = tl.load(GT + row * C * C + rows[:, None] * C + rows[None, :])
    beta = tl.load(BETA + row * C + rows)
    f = tl.load(FV + row * C + rows)
    ga1 = gt * _mmp(q, tl.trans(tl.load(K + row * C * DK + rows[:, None] * DK + ck[None, :])), PREC)  # G̃ ∘ Q Kᵀ
    w1b = W1 + row * DK * HID + ck[:, None] * HID
    s1b = S1 + row * DK * HID + ck[:, None] * HID
    w2b = W2 + row * HID * DV + cv[None, :]
    s2b = S2 + row * HID * DV + cv[None, :]
    xb = X1 + row * C * HID + rows[:, None] * HID
    db = D1 + row * C * HID + rows[:, None] * HID
    # Pass A: layer 2's read, summed over the hidden slices.
    aw = tl.zeros([C, DV], dtype=tl.float32)
    asm = tl.zeros([C, DV], dtype=tl.float32)
    ar2 = tl.zeros([C, C], dtype=tl.float32)
    for j in range(0, HID, BH):
        cols = j + ch
        d1 = tl.load(db + cols[None, :])
        zh = beta[:, None] * _mmp(q, tl.load(w1b + cols[None, :]), PREC) + f[:, None] * _mmp(q, tl.load(s1b + cols[None, :]), PREC)
        hh = _act(zh - _mmp(ga1, d1, PREC), ACT)
        aw += _mmp(hh, tl.load(w2b + cols[:, None] * DV), PREC)
        asm += _mmp(hh, tl.load(s2b + cols[:, None] * DV), PREC)
        ar2 += _mmp(hh, tl.trans(tl.load(xb + cols[None, :])), PREC)
    d2 = tl.load(D2 + row * C * DV + rows[:, None] * DV + cv[None, :])
    ga2 = gt * ar2
    dy = tl.load(DY + row * C * DV + rows[:, None] * DV + cv[None, :])
    if LN:  # the affine-free LayerNorm's (symmetric) Jacobian applied to dy
        out, rstd = _ln_rows(beta[:, None] * aw + f[:, None] * asm - _mmp(ga2, d2, PREC), DV, ln_eps)
        dz2 = rstd[:, None] * (dy - (tl.sum(dy, 1) / DV)[:, None] - out * (tl.sum(dy * out, 1) / DV)[:, None])
    else:
        dz2 = dy
    # Layer 2's transpose.
    dbeta = tl.sum(dz2 * aw, 1)
    df = tl.sum(dz2 * asm, 1)
    da2 = -_mmp(dz2, tl.trans(d2), PREC)  # of G̃ ∘ Ĥ X_1ᵀ
    tl.store(DD2 + row * C * DV + rows[:, None] * DV + cv[None, :], -_mmp(tl.trans(ga2), dz2, PREC))
    dgt = da2 * ar2
    dag2 = da2 * gt  # of Ĥ X_1ᵀ
    if RESIDUAL:
        dq = dy
    else:
        dq = tl.zeros([C, DK], dtype=tl.float32)
    da1 = tl.zeros([C, C], dtype=tl.float32)
    # Pass B: Ĥ again, layer 2's direct shares and X_1's cotangent, then layer 1's transpose.
    for j in range(0, HID, BH):
        cols = j + ch
        x1 = tl.load(xb + cols[None, :])
        d1 = tl.load(db + cols[None, :])
        w1 = tl.load(w1b + cols[None, :])
        s1 = tl.load(s1b + cols[None, :])
        qw = _mmp(q, w1, PREC)
        qs = _mmp(q, s1, PREC)
        zh = beta[:, None] * qw + f[:, None] * qs - _mmp(ga1, d1, PREC)
        hh = _act(zh, ACT)
        ht = tl.trans(hh)
        # (β ∘ dẐ_2 and f ∘ dẐ_2 formed per slice, not held: registers are what limits this kernel)
        tl.store(BW2 + row * HID * DV + cols[:, None] * DV + cv[None, :], _mmp(ht, beta[:, None] * dz2, PREC))
        tl.store(BS2 + row * HID * DV + cols[:, None] * DV + cv[None, :], _mmp(ht, f[:, None] * dz2, PREC))
        tl.store(DX1 + row * C * HID + rows[:, None] * HID + cols[None, :], _mmp(tl.trans(dag2), hh, PREC))
        dh = _mmp(beta[:, None] * dz2, tl.trans(tl.load(w2b + cols[:, None] * DV)), PREC)
        dh += _mmp(f[:, None] * dz2, tl.trans(tl.load(s2b + cols[:, None] * DV)), PREC)
        dz1 = (dh + _mmp(dag2, x1, PREC)) * _act_grad(zh, ACT)
        dbeta += tl.sum(dz1 * qw, 1)
        df += tl.sum(dz1 * qs, 1)
        ub1 = beta[:, None] * dz1
        uf1 = f[:, None] * dz1
        tl.store(BW1 + row * DK * HID + ck[:, None] * HID + cols[None, :], _mmp(tl.trans(q), ub1, PREC))
        tl.store(BS1 + row * DK * HID + ck[:, None] * HID + cols[None, :], _mmp(tl.trans(q), uf1, PREC))
        da1 -= _mmp(dz1, tl.trans(d1), PREC)  # of G̃ ∘ Q Kᵀ
        tl.store(DD1 + row * C * HID + rows[:, None] * HID + cols[None, :], -_mmp(tl.trans(ga1), dz1, PREC))
        dq += _mmp(ub1, tl.trans(w1), PREC) + _mmp(uf1, tl.trans(s1), PREC)
    # k and G̃ again from memory rather than held through pass B
    k = tl.load(K + row * C * DK + rows[:, None] * DK + ck[None, :])
    dgt += da1 * _mmp(q, tl.trans(k), PREC)
    dag1 = da1 * tl.load(GT + row * C * C + rows[:, None] * C + rows[None, :])
    tl.store(DX0 + row * C * DK + rows[:, None] * DK + ck[None, :], _mmp(tl.trans(dag1), q, PREC))
    dq += _mmp(dag1, k, PREC)
    tl.store(DQ + row * C * DK + rows[:, None] * DK + ck[None, :], dq)
    tl.store(DGT + row * C * C + rows[:, None] * C + rows[None, :], dgt)
    tl.store(DBETA + row * C + rows, dbeta)
    tl.store(DF + row * C + rows, df)


def supported(q: Tensor, w: Sequence[Tensor]) -> bool:
    """Depth 2, power-of-two sizes ≥ 16 (``tl.dot`` tiles)."""
    if len(w) != 2:
        return False
    c, dk, hid, dv = q.shape[-2], q.shape[-1], w[0].shape[-1], w[1].shape[-1]
    return all(x >= 16 and x & (x - 1) == 0 for x in (c, dk, hid, dv))


def launch(q, k, gt, beta, f, w, s, x1, d1, d2, dy, activation: str, residual: bool, layer_norm: bool, ln_eps: float, prec: str) -> tuple:
    """Runs :func:`_lmm_read_vjp_kernel` on ``[G, B, H, …]`` fp32 tensors (chunk-major, as the backward holds
    them). Returns ``(dq, dgt, dbeta, df, b_w, b_s, d_delta, d_x)``."""
    from .fused_triton import _ACT_CODES  # (the activation codes the forward kernels use)

    c, dk = q.shape[-2:]
    hid, dv = w[0].shape[-1], w[1].shape[-1]
    cont = lambda x: x if x.is_contiguous() else x.contiguous()  # noqa: E731
    ins = [cont(x.float()) for x in (q, k, gt, beta, f, w[0], s[0], w[1], s[1], x1, d1, d2, dy)]
    outs = [torch.empty_like(ins[i]) for i in (0, 2, 3, 4, 5, 6, 7, 8, 9, 12, 0, 9)]  # dq dgt dβ df bw1 bs1 bw2 bs2 dd1 dd2 dx0 dx1
    grid = (q.shape[0], q.shape[1] * q.shape[2])
    bh = min(int(LAUNCH_READ_VJP["slice"]), hid)
    _lmm_read_vjp_kernel[grid](
        *ins, *outs, ln_eps,
        C=c, DK=dk, DV=dv, HID=hid, BH=bh, ACT=_ACT_CODES[activation], RESIDUAL=residual, LN=layer_norm, PREC=prec,
        num_warps=int(LAUNCH_READ_VJP["warps"]), num_stages=int(LAUNCH_READ_VJP["stages"]),
    )  # fmt: skip
    dq, dgt, dbeta, df, bw1, bs1, bw2, bs2, dd1, dd2, dx0, dx1 = outs
    return dq, dgt, dbeta, df, [bw1, bw2], [bs1, bs2], [dd1, dd2], [dx0, dx1]


__all__ = ["LAUNCH_READ_VJP", "launch", "supported"]
