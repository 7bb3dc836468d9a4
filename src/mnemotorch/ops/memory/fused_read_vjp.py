"""The read's vector-Jacobian product of the fused Titans memory (depth 2) as two Triton launches.

:func:`~.fused_backward.read_vjp` written per chunk and head: the chunk's dual-form read recomputed from the
state entering it and the key pass (``σ(Z_1)``, ``Δ_1``, ``Δ_2``), then its transpose, with the ``[C, hidden]``
intermediates on chip instead of the batched PyTorch form's ``[G, B, H, C, 256]`` fp32 tensors in memory.
What is left to :func:`after_kernels` (PyTorch, compiled) is summing the per-slice partials, a few ``[C, C]``
products, the clip and the key pass's own VJP (:func:`~.fused_backward.read_vjp_tail`; with ``BACKWARD["fold_read"]``
the last two are left to the sweep and the update's VJP, which take the cotangents with their own).

Per chunk, with ``G̃`` the clipped coefficients and the read ``Ẑ_1 = β ∘ (Q W_1) + f ∘ (Q S_1) − (G̃ ∘ Q Kᵀ) Δ_1``,
``Ĥ = σ(Ẑ_1)``, ``Ẑ_2 = β ∘ (Ĥ W_2) + f ∘ (Ĥ S_2) − (G̃ ∘ Ĥ X_1ᵀ) Δ_2``, ``y = [q +] [LN](Ẑ_2)``:

* :func:`_lmm_read_vjp_a_kernel`, one program per (chunk, head): ``Ĥ W_2``, ``Ĥ S_2``, ``Ĥ X_1ᵀ`` summed over
  the hidden slices, hence ``Ẑ_2`` and ``dẐ_2`` (through the LayerNorm), then layer 2's transpose: the
  cotangents of ``Δ_2``, of ``Ĥ X_1ᵀ`` and layer 2's shares of those of ``G̃, β, f``;
* :func:`_lmm_read_vjp_b_kernel`, one program per (chunk, head, hidden slice): ``Ĥ`` on the slice again, then
  everything that is per slice (layer 2's direct state shares, ``X_1``'s and ``Δ_1``'s cotangents, layer 1's
  direct shares) and per-slice partials of what sums over slices (``dq``, ``G̃ ∘ Q Kᵀ``'s cotangent, ``β, f``'s).

A first form ran both passes in one program per (chunk, head): it held seven ``[C, C]`` / ``[C, d]`` fp32 tiles
through pass B and spilled 360–610 bytes a thread at every launch tried (H100, 2026-11-27: 6.8–11.7 ms for the
kernel at 16K, 16 heads, against ~10.3 ms for the whole PyTorch form).
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..eager import direct
from ..triton_launch import launcher
from .fused_backward import KeyPass, read_vjp_tail
from .fused_triton import _act, _act_grad, _ln_rows, _mmp, launch_from_env

#: ``slice``: hidden columns per program of the slice kernel (pass B) and per step of pass A; ``warps``: per
#: program of each kernel.
LAUNCH_READ_VJP: dict = {"slice": 64, "warps": 4, "stages": 1, "a_slice": 32, "a_warps": 4}
#: ``MNEMO_MEMORY_READ_VJP_LAUNCH="slice:warps:stages:a_slice:a_warps"`` sets all five.
_ENV_KEYS = ("slice", "warps", "stages", "a_slice", "a_warps")

if os.environ.get("MNEMO_MEMORY_READ_VJP_LAUNCH"):
    LAUNCH_READ_VJP.update(launch_from_env("MNEMO_MEMORY_READ_VJP_LAUNCH", os.environ["MNEMO_MEMORY_READ_VJP_LAUNCH"], _ENV_KEYS))


@triton.jit
def _lmm_read_vjp_a_kernel(
    Q, K, GT, BETA, FV, W1, S1, W2, S2, X1, D1, D2, DY,
    DZ2, DAG2, DD2, DGT, DBETA, DF, RAW, RAS, RAP,
    ln_eps,
    C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, HID: tl.constexpr, BH: tl.constexpr,
    ACT: tl.constexpr, LN: tl.constexpr, PREC: tl.constexpr, SUMS: tl.constexpr = False,
):  # fmt: skip
    """Pass A and layer 2's transpose, one program per (chunk ``program_id(0)``, head ``program_id(1)``); every
    tensor ``[G, B·H, …]`` contiguous, fp32: ``Q, K [C, DK]``, ``GT [C, C]`` (clipped), ``BETA, FV [C]``, the
    entering state ``W1, S1 [DK, HID]``, ``W2, S2 [HID, DV]``, the key pass ``X1, D1 [C, HID]`` (``σ(Z_1)``,
    ``Δ_1``), ``D2 [C, DV]`` (``Δ_2``), ``DY [C, DV]``. Writes ``dẐ_2`` (``DZ2``), the cotangent of ``Ĥ X_1ᵀ``
    (``DAG2 [C, C]``), of ``Δ_2`` (``DD2``), layer 2's shares of ``G̃``'s (``DGT``) and of ``β, f``'s. ``SUMS``: the
    three sums over the hidden slices, ``Ĥ W_2, Ĥ S_2 [C, DV]`` and ``Ĥ X_1ᵀ [C, C]``, are loaded from ``RAW, RAS, RAP``
    (the forward's batched read kept them) instead of recomputed: no loop, and ``Q, K, W_1 … X_1`` unread."""
    row = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    rows = tl.arange(0, C)
    ck = tl.arange(0, DK)
    cv = tl.arange(0, DV)
    ch = tl.arange(0, BH)
    go = GT + row * C * C + rows[:, None] * C + rows[None, :]
    beta = tl.load(BETA + row * C + rows)
    f = tl.load(FV + row * C + rows)
    if SUMS:
        aw = tl.load(RAW + row * C * DV + rows[:, None] * DV + cv[None, :])
        asm = tl.load(RAS + row * C * DV + rows[:, None] * DV + cv[None, :])
        ar2 = tl.load(RAP + row * C * C + rows[:, None] * C + rows[None, :])
    else:
        q = tl.load(Q + row * C * DK + rows[:, None] * DK + ck[None, :])
        # G̃ ∘ Q Kᵀ; G̃ itself is loaded again after the loop rather than kept through it (registers: see pass B)
        ga1 = tl.load(go) * _mmp(q, tl.trans(tl.load(K + row * C * DK + rows[:, None] * DK + ck[None, :])), PREC)
        aw = tl.zeros([C, DV], dtype=tl.float32)
        asm = tl.zeros([C, DV], dtype=tl.float32)
        ar2 = tl.zeros([C, C], dtype=tl.float32)
        for j in range(0, HID, BH):
            cols = j + ch
            zh = beta[:, None] * _mmp(q, tl.load(W1 + row * DK * HID + ck[:, None] * HID + cols[None, :]), PREC)
            zh += f[:, None] * _mmp(q, tl.load(S1 + row * DK * HID + ck[:, None] * HID + cols[None, :]), PREC)
            hh = _act(zh - _mmp(ga1, tl.load(D1 + row * C * HID + rows[:, None] * HID + cols[None, :]), PREC), ACT)
            aw += _mmp(hh, tl.load(W2 + row * HID * DV + cols[:, None] * DV + cv[None, :]), PREC)
            asm += _mmp(hh, tl.load(S2 + row * HID * DV + cols[:, None] * DV + cv[None, :]), PREC)
            ar2 += _mmp(hh, tl.trans(tl.load(X1 + row * C * HID + rows[:, None] * HID + cols[None, :])), PREC)
    d2 = tl.load(D2 + row * C * DV + rows[:, None] * DV + cv[None, :])
    ga2 = tl.load(go) * ar2
    dy = tl.load(DY + row * C * DV + rows[:, None] * DV + cv[None, :])
    if LN:  # the affine-free LayerNorm's (symmetric) Jacobian applied to dy
        out, rstd = _ln_rows(beta[:, None] * aw + f[:, None] * asm - _mmp(ga2, d2, PREC), DV, ln_eps)
        dz2 = rstd[:, None] * (dy - (tl.sum(dy, 1) / DV)[:, None] - out * (tl.sum(dy * out, 1) / DV)[:, None])
    else:
        dz2 = dy
    # each tile's last use as early as it can come (fewer live at once)
    tl.store(DBETA + row * C + rows, tl.sum(dz2 * aw, 1))
    tl.store(DF + row * C + rows, tl.sum(dz2 * asm, 1))
    tl.store(DZ2 + row * C * DV + rows[:, None] * DV + cv[None, :], dz2)
    tl.store(DD2 + row * C * DV + rows[:, None] * DV + cv[None, :], -_mmp(tl.trans(ga2), dz2, PREC))
    da2 = -_mmp(dz2, tl.trans(d2), PREC)  # of G̃ ∘ Ĥ X_1ᵀ
    tl.store(DGT + row * C * C + rows[:, None] * C + rows[None, :], da2 * ar2)
    tl.store(DAG2 + row * C * C + rows[:, None] * C + rows[None, :], da2 * tl.load(go))


@triton.jit
def _lmm_read_vjp_b_kernel(
    Q, K, GT, BETA, FV, W1, S1, W2, S2, X1, D1, DZ2, DAG2,
    BW1, BS1, BW2, BS2, DD1, DX1, PDQ, PDA1, PDB, PDF, RZ1,
    C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, HID: tl.constexpr, BH: tl.constexpr,
    ACT: tl.constexpr, PREC: tl.constexpr, ZH: tl.constexpr = False,
):  # fmt: skip
    """Pass B, one program per (hidden slice ``j`` of ``BH`` columns, chunk ``ci``, head ``program_id(1)``), with
    ``program_id(0) = ci · NS + j``: ``Ĥ`` on the slice again, then layer 2's direct shares ``Ĥᵀ (β ∘ dẐ_2)``,
    ``Ĥᵀ (f ∘ dẐ_2)`` (rows of ``BW2, BS2``), ``X_1``'s cotangent (columns of ``DX1``), ``dẐ_1 = dĤ ∘ σ'(Ẑ_1)``, layer
    1's direct shares (columns of ``BW1, BS1``) and ``Δ_1``'s cotangent (``DD1``). The sums over slices, of ``dq``,
    of ``G̃ ∘ Q Kᵀ``'s cotangent and of ``β, f``'s, go to per-slice partials ``PDQ [NS, G, B·H, C, DK]``,
    ``PDA1 [NS, …, C, C]``, ``PDB, PDF [NS, …, C]``: no slice waits for another. The slice is the grid's fastest
    index so that the NS programs of one (chunk, head), which load the same ``Q, K, G̃, dẐ_2`` and ``Ĥ X_1ᵀ``'s
    cotangent, run side by side and find them in L2. ``ZH``: ``Ẑ_1`` on the slice is loaded from ``RZ1 [G, B·H, C, HID]``
    (the forward's batched read kept it) instead of recomputed by step 1's four products."""
    NS: tl.constexpr = HID // BH
    j = tl.program_id(0) % NS
    row = (tl.program_id(0) // NS) * tl.num_programs(1) + tl.program_id(1)
    part = j * (tl.num_programs(0) // NS) * tl.num_programs(1) + row
    rows = tl.arange(0, C)
    ck = tl.arange(0, DK)
    cv = tl.arange(0, DV)
    cols = j * BH + tl.arange(0, BH)
    # Three steps, each starting from loads rather than from tiles kept across the others: a [C, 64] fp32 tile is 32
    # registers a thread at 4 warps, and holding Q, G̃ ∘ Q Kᵀ, W_1, S_1, Δ_1, Q W_1, Q S_1 from the first step to the
    # last spilled ~960 bytes a thread (ptxas, sm_90a). Step 3 reloads those inputs (L2-resident: the slices of one
    # chunk and head run side by side) and recomputes Q W_1, Q S_1, G̃ ∘ Q Kᵀ: the same products of the same values.
    qo = Q + row * C * DK + rows[:, None] * DK + ck[None, :]
    ko = K + row * C * DK + rows[:, None] * DK + ck[None, :]
    go = GT + row * C * C + rows[:, None] * C + rows[None, :]
    w1o = W1 + row * DK * HID + ck[:, None] * HID + cols[None, :]
    s1o = S1 + row * DK * HID + ck[:, None] * HID + cols[None, :]
    d1o = D1 + row * C * HID + rows[:, None] * HID + cols[None, :]
    beta = tl.load(BETA + row * C + rows)
    f = tl.load(FV + row * C + rows)
    # 1) the slice's read: Ĥ and σ'(Ẑ_1) are all that step 2 needs of it
    if ZH:
        zh = tl.load(RZ1 + row * C * HID + rows[:, None] * HID + cols[None, :])
    else:
        q = tl.load(qo)
        ga1 = tl.load(go) * _mmp(q, tl.trans(tl.load(ko)), PREC)  # G̃ ∘ Q Kᵀ
        zh = beta[:, None] * _mmp(q, tl.load(w1o), PREC) + f[:, None] * _mmp(q, tl.load(s1o), PREC) - _mmp(ga1, tl.load(d1o), PREC)
    hh = _act(zh, ACT)
    sg = _act_grad(zh, ACT)
    # 2) layer 2's direct shares, X_1's cotangent, then dẐ_1
    # (β ∘ dẐ_2 and f ∘ dẐ_2 are formed at each use, not kept: one tile live instead of three)
    dz2 = tl.load(DZ2 + row * C * DV + rows[:, None] * DV + cv[None, :])
    ht = tl.trans(hh)
    tl.store(BW2 + row * HID * DV + cols[:, None] * DV + cv[None, :], _mmp(ht, beta[:, None] * dz2, PREC))
    tl.store(BS2 + row * HID * DV + cols[:, None] * DV + cv[None, :], _mmp(ht, f[:, None] * dz2, PREC))
    dag2 = tl.load(DAG2 + row * C * C + rows[:, None] * C + rows[None, :])
    tl.store(DX1 + row * C * HID + rows[:, None] * HID + cols[None, :], _mmp(tl.trans(dag2), hh, PREC))
    dh = _mmp(dag2, tl.load(X1 + row * C * HID + rows[:, None] * HID + cols[None, :]), PREC)
    dh += _mmp(beta[:, None] * dz2, tl.trans(tl.load(W2 + row * HID * DV + cols[:, None] * DV + cv[None, :])), PREC)
    dh += _mmp(f[:, None] * dz2, tl.trans(tl.load(S2 + row * HID * DV + cols[:, None] * DV + cv[None, :])), PREC)
    dz1 = dh * sg
    # 3) layer 1's direct shares and the per-slice partials, one state tile at a time
    q = tl.load(qo)
    qt = tl.trans(q)
    w1 = tl.load(w1o)
    tl.store(PDB + part * C + rows, tl.sum(dz1 * _mmp(q, w1, PREC), 1))
    tl.store(BW1 + row * DK * HID + ck[:, None] * HID + cols[None, :], _mmp(qt, beta[:, None] * dz1, PREC))
    pdq = _mmp(beta[:, None] * dz1, tl.trans(w1), PREC)
    s1 = tl.load(s1o)
    tl.store(PDF + part * C + rows, tl.sum(dz1 * _mmp(q, s1, PREC), 1))
    tl.store(BS1 + row * DK * HID + ck[:, None] * HID + cols[None, :], _mmp(qt, f[:, None] * dz1, PREC))
    tl.store(PDQ + part * C * DK + rows[:, None] * DK + ck[None, :], pdq + _mmp(f[:, None] * dz1, tl.trans(s1), PREC))
    ga1 = tl.load(go) * _mmp(q, tl.trans(tl.load(ko)), PREC)
    tl.store(DD1 + row * C * HID + rows[:, None] * HID + cols[None, :], -_mmp(tl.trans(ga1), dz1, PREC))
    tl.store(PDA1 + part * C * C + rows[:, None] * C + rows[None, :], -_mmp(dz1, tl.trans(tl.load(d1o)), PREC))  # of G̃ ∘ Q Kᵀ


def supported(q: Tensor, w: Sequence[Tensor]) -> bool:
    """Depth 2, power-of-two sizes ≥ 16 (``tl.dot`` tiles)."""
    if len(w) != 2:
        return False
    c, dk, hid, dv = q.shape[-2], q.shape[-1], w[0].shape[-1], w[1].shape[-1]
    return all(x >= 16 and x & (x - 1) == 0 for x in (c, dk, hid, dv))


def _slices(hid: int) -> tuple[int, int]:
    """``(BH, NS)``: the slice kernel's hidden columns per program and the number of slices."""
    bh = min(int(LAUNCH_READ_VJP["slice"]), hid)
    return bh, hid // bh


def _outputs(q: Tensor, gt: Tensor, beta: Tensor, f: Tensor, w1: Tensor, s1: Tensor, w2: Tensor, s2: Tensor, x1: Tensor, d2: Tensor) -> list:
    """The op's outputs, allocated (its kernels fill them; the fake returns them as they are), in its order."""
    c, dk = q.shape[-2:]
    ns = _slices(w1.shape[-1])[1]
    lead = q.shape[:-2]
    parts = [q.new_empty((ns, *lead, c, dk)), q.new_empty((ns, *lead, c, c)), q.new_empty((ns, *lead, c)), q.new_empty((ns, *lead, c))]
    return [torch.empty_like(gt), torch.empty_like(beta), torch.empty_like(f), *parts, *(torch.empty_like(x) for x in (w1, w2, s1, s2)),
            torch.empty_like(x1), torch.empty_like(d2), torch.empty_like(x1)]  # fmt: skip


@torch.library.custom_op("mnemotorch::lmm_read_vjp", mutates_args=())
def lmm_read_vjp(
    q: Tensor, k: Tensor, gt: Tensor, beta: Tensor, f: Tensor, w1: Tensor, s1: Tensor, w2: Tensor, s2: Tensor,
    x1: Tensor, d1: Tensor, d2: Tensor, dy: Tensor, activation: str, layer_norm: bool, ln_eps: float, prec: str,
    sum_w: Optional[Tensor] = None, sum_s: Optional[Tensor] = None, sum_x: Optional[Tensor] = None, z_read: Optional[Tensor] = None,
) -> list[Tensor]:  # fmt: skip
    """Both kernels on ``[G, B, H, …]`` fp32 contiguous tensors (chunk-major, as the backward holds them):
    ``[dgt2, db2, df2, pdq, pda1, pdb, pdf, bw1, bw2, bs1, bs2, dd1, dd2, dx1]`` (layer 2's shares of the
    cotangents of ``G̃, β, f``; the per-slice partials ``[NS, G, B, H, …]``; the direct state shares; the key
    pass's cotangents of ``Δ_1, Δ_2, X_1``), what :func:`after_kernels` takes. ``sum_w, sum_s, sum_x``: the read's
    ``Ĥ W_2, Ĥ S_2 [G, B, H, C, Dv]`` and ``Ĥ X_1ᵀ [G, B, H, C, C]`` as the forward kept them (all three or none),
    which pass A then loads instead of recomputing the read; ``z_read``: the read's ``Ẑ_1 [G, B, H, C, hidden]`` as the
    forward kept it, which pass B then loads instead of recomputing."""
    from .fused_triton import _ACT_CODES  # (the activation codes the forward kernels use)

    c, dk = q.shape[-2:]
    hid, dv = w1.shape[-1], w2.shape[-1]
    nbh = q.shape[1] * q.shape[2]
    act = _ACT_CODES[activation]
    out = _outputs(q, gt, beta, f, w1, s1, w2, s2, x1, d2)
    dgt2, db2, df2, pdq, pda1, pdb, pdf, bw1, bw2, bs1, bs2, dd1, dd2, dx1 = out
    dz2, dag2 = torch.empty_like(dy), torch.empty_like(gt)  # (pass A's, for pass B)
    sums = (sum_w, sum_s, sum_x)
    have = sum(x is not None for x in sums)
    if have not in (0, 3):
        raise ValueError(f"lmm_read_vjp: sum_w, sum_s and sum_x come together, got {have} of the 3")
    launcher(_lmm_read_vjp_a_kernel)[(q.shape[0], nbh)](
        q, k, gt, beta, f, w1, s1, w2, s2, x1, d1, d2, dy, dz2, dag2, dd2, dgt2, db2, df2, *(sums if have else (dy, dy, gt)), ln_eps,
        C=c, DK=dk, DV=dv, HID=hid, BH=min(int(LAUNCH_READ_VJP["a_slice"]), hid), ACT=act, LN=layer_norm, PREC=prec, SUMS=bool(have),
        num_warps=int(LAUNCH_READ_VJP["a_warps"]), num_stages=1,
    )  # fmt: skip
    bh, ns = _slices(hid)
    launcher(_lmm_read_vjp_b_kernel)[(ns * q.shape[0], nbh)](
        q, k, gt, beta, f, w1, s1, w2, s2, x1, d1, dz2, dag2, bw1, bs1, bw2, bs2, dd1, dx1, pdq, pda1, pdb, pdf,
        x1 if z_read is None else z_read, C=c, DK=dk, DV=dv, HID=hid, BH=bh, ACT=act, PREC=prec, ZH=z_read is not None,
        num_warps=int(LAUNCH_READ_VJP["warps"]), num_stages=int(LAUNCH_READ_VJP["stages"]),
    )  # fmt: skip
    return out


@lmm_read_vjp.register_fake
def _(q, k, gt, beta, f, w1, s1, w2, s2, x1, d1, d2, dy, activation, layer_norm, ln_eps, prec, sum_w=None, sum_s=None, sum_x=None,
      z_read=None):  # fmt: skip
    return _outputs(q, gt, beta, f, w1, s1, w2, s2, x1, d2)


_lmm_read_vjp = direct(lmm_read_vjp)  # eager calls without the dispatcher's round trip (ops/eager.py)


class KernelParts(NamedTuple):
    """What the two kernels leave: layer 2's shares of the cotangents of ``G̃, β, f`` (``dgt2, db2, df2``), the
    per-slice partials ``[NS, …]`` (``pdq, pda1, pdb, pdf``), the direct state shares ``b_w, b_s`` (lists by
    layer), the key pass's cotangents of ``Δ_1, Δ_2`` (``d_delta``) and of ``X_1`` (``dx1``)."""

    dgt2: Tensor
    db2: Tensor
    df2: Tensor
    pdq: Tensor
    pda1: Tensor
    pdb: Tensor
    pdf: Tensor
    b_w: list
    b_s: list
    d_delta: list
    dx1: Tensor


def launch(q, k, gt, beta, f, w, s, x1, d1, d2, dy, activation: str, layer_norm: bool, ln_eps: float, prec: str,
           sums: Sequence[Tensor] | None = None) -> KernelParts:  # fmt: skip
    """:func:`lmm_read_vjp` on the backward's tensors (cast to fp32 and made contiguous where they are not);
    ``sums``: the forward's ``Ĥ W_2, Ĥ S_2, Ĥ X_1ᵀ`` [and ``Ẑ_1``] of the same chunks, or None."""
    cont = lambda x: x if x.is_contiguous() else x.contiguous()  # noqa: E731
    ins = [cont(x.float()) for x in (q, k, gt, beta, f, w[0], s[0], w[1], s[1], x1, d1, d2, dy)]
    extra = [cont(x.float()) for x in sums] if sums else []
    out = _lmm_read_vjp(*ins, activation, layer_norm, ln_eps, prec, *extra)
    return KernelParts(*out[:7], out[7:9], out[9:11], out[11:13], out[13])


def after_kernels(q: Tensor, k: Tensor, gt: Tensor, dy: Tensor, kp: KeyPass, g_mat: Tensor, parts: KernelParts, w: Sequence[Tensor],
                  residual: bool, layer_norm: bool, max_grad_norm: float | None, stats: tuple | None = None, fold: bool = False) -> tuple:  # fmt: skip
    """The kernels' per-slice partials summed, layer 1's last small products (``[C, C]``), then
    :func:`~.fused_backward.read_vjp_tail` (``stats``: the clip's, as the caller formed ``gt`` from them). Returns ``(dq, dk, dv, dg_mat, dbeta, df, b_w, b_s)``;
    with ``fold`` ``(dq, cot, dg_mat, dbeta, df, b_w, b_s)``, ``cot`` the read's key-pass cotangents
    (:class:`~.fused_backward.ReadCotangents`) in place of ``dk, dv`` and ``b_w`` the direct share only."""
    da1 = parts.pda1.sum(0)  # of G̃ ∘ Q Kᵀ
    dag1 = da1 * gt
    dq = parts.pdq.sum(0) + dag1 @ k
    if residual:
        dq = dq + dy
    dx0 = dag1.transpose(-1, -2) @ q
    dgt = parts.dgt2 + da1 * (q @ k.transpose(-1, -2))
    *kv, dg, b_w = read_vjp_tail(kp, g_mat, dgt, parts.b_w, parts.d_delta, [dx0, parts.dx1], w, layer_norm, residual, max_grad_norm, stats, fold)
    return dq, *kv, dg, parts.db2 + parts.pdb.sum(0), parts.df2 + parts.pdf.sum(0), b_w, parts.b_s


__all__ = ["LAUNCH_READ_VJP", "KernelParts", "after_kernels", "launch", "lmm_read_vjp", "supported"]
