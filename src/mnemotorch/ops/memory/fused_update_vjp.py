"""The update's vector-Jacobian product of the fused Titans memory (depth 2) as one Triton launch.

:func:`~.fused_backward.state_adjoint` with ``inputs`` — the update's share of the gradients of ``k, v`` and of the
coefficients' last rows, given the adjoint ``ā = (A^W_l, A^S_l)`` of the state leaving each chunk — written per
chunk and head, with the ``[C, hidden]`` intermediates on chip. The batched PyTorch form (compiled) held them as
``[G, B, H, C, 256]`` fp32 tensors and ran its products as batched 64 × 64 × 256 cuBLAS GEMMs at ~10 TFLOP/s
(docs/results/neural_memory.md, fifteenth session: ~5.5 ms of the op's backward at 16K on an H100).

Per chunk, with ``g̃, ñ`` the clipped last rows of ``G, N``, ``X_0 = K``, ``X_1 = σ(Z_1)`` and the key pass's
``Δ_1 [C, hidden]``, ``Δ_2 [C, d_v]`` (:class:`~.fused_backward.KeyPass`), the update's transpose gives

* the cotangents of ``Δ_l``: ``dΔ_l = −(g̃ ∘ X_l A^W_l + ñ ∘ X_l A^S_l)``, and of ``X_l``:
  ``dX_l = −(g̃ ∘ Δ_l A^Wᵀ_l + ñ ∘ Δ_l A^Sᵀ_l)`` (``∘``: scaling the rows, one factor per token);
* those of ``g̃, ñ``: ``−Σ_l rowsum(X_l A^W_l ∘ Δ_l)``, ``−Σ_l rowsum(X_l A^S_l ∘ Δ_l)``, then the clip's backward;

and the key pass's VJP of those cotangents (a Hessian-vector product through the memory's loss:
:func:`~.fused_backward.key_pass_vjp`) takes them to ``dk, dv``. The read's key-pass cotangents
(:class:`~.fused_backward.ReadCotangents`, ``BACKWARD["fold_read"]``) are added first, as ``state_adjoint``'s ``add_cot``.

One program per (chunk, batch row, head), two passes over slices of ``BH`` hidden columns (each pass two loops, the
first a third with the clip, to bound the tiles live at once):

1. the sums over the hidden dimension that everything after needs: ``dX_0``, ``X_1 A^W_2``, ``X_1 A^S_2`` and the
   rowsums of ``g̃, ñ``'s cotangents (hence the clip's backward), and ``dΔ_1 ∘ σ'(Z_1)`` times ``W_2``, which closes
   ``dΔ_2``; then, per token, the last layer's LayerNorm Hessian-vector product gives ``dZ_2``;
2. per slice again: ``dΔ_1`` (recomputed: two ``[C, d_k] × [d_k, BH]`` products rather than a ``[C, hidden]``
   scratch), ``dX_1 + dZ_2 W_2ᵀ``, hence ``dZ_1`` and its product with ``W_1ᵀ``, which is ``dk``'s main term; and
   the coefficients' scalar shares ``⟨A^W, W⟩, ⟨A^S, S⟩, ⟨A^W, S⟩`` (of ``β, m, f``'s last elements).

The adjoint sweep sums the complete cotangent of ``Δ_2`` (and with the clip those of ``g̃, ñ``) after its grid barrier
anyway; handed on (``u``, ``gsum``; ``fused_triton.BACKWARD["update_u_from_sweep"]``), pass 1 keeps only what else needs
the hidden sums (H200, 16K: this pass 2.71 → 2.28 ms matched, 3.23 → 2.59 ms with the clip; docs/results/neural_memory.md,
thirty-first session).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..eager import direct
from ..triton_launch import launcher
from .fused_backward import KeyPass, ReadCotangents
from .fused_triton import _loss_second, _mmap, _mmp, _sweep_chunk_inputs, launch_from_env

#: ``slice``: hidden columns per step of both passes; ``warps``: per program; ``stages``: software pipelining of the
#: loops. The update's phase at 16K, 16 heads, d 64, hidden 256 (matched / default; docs/results/neural_memory.md,
#: sixteenth session), slice / warps / stages: H100 32 / 4 / 2 3.42 / 4.12 ms, 32 / 4 / 3 4.02 / 4.72, 32 / 8 / 2
#: 4.86 / 5.27, 32 / 8 / 1 4.69 / 5.69, 64 / 8 / 2 4.78 / 5.31 (the batched PyTorch form 5.43 / 5.88); H200 32 / 4 / 2
#: 2.91 / 3.45, 32 / 4 / 1 2.99 / 3.63, 64 / 4 / 1 3.27 / 3.69, 16 / 4 / 2 3.48 / 4.18, 16 / 4 / 1 3.93 / 4.92 (the
#: PyTorch form 3.99 / 4.33). ``MNEMO_MEMORY_UPDATE_VJP_LAUNCH="slice:warps:stages"`` sets all three.
LAUNCH_UPDATE_VJP: dict = {"slice": 32, "warps": 4, "stages": 2}


def _launch_from_env(value: str) -> dict:
    """``"slice:warps:stages"`` (``MNEMO_MEMORY_UPDATE_VJP_LAUNCH``) as a launch dict."""
    return launch_from_env("MNEMO_MEMORY_UPDATE_VJP_LAUNCH", value, ("slice", "warps", "stages"))


if os.environ.get("MNEMO_MEMORY_UPDATE_VJP_LAUNCH"):
    LAUNCH_UPDATE_VJP.update(_launch_from_env(os.environ["MNEMO_MEMORY_UPDATE_VJP_LAUNCH"]))


@triton.jit
def _slab(P, row, r, c, NR: tl.constexpr, NC: tl.constexpr):
    """Rows ``r`` and columns ``c`` of program ``row``'s ``[NR, NC]`` matrix in ``P`` (``[programs, NR, NC]`` contiguous)."""
    return tl.load(P + row * NR * NC + r[:, None] * NC + c[None, :])


@triton.jit
def _lmm_update_vjp_kernel(
    K, X1, DL1, SP, CURV, DL2, OUT, RSTD, DMEAN,
    W1, W2, S1, S2, AW1, AS1, AW2, AS2,
    GL, NL, SC, XN0, XN1, DN0, DN1, SQ,
    CD1, CD2, CX0, CX1, CSC, U, GS,
    DKO, DVO, DGO, DNO, DOTS,
    tau2,
    C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, HID: tl.constexpr, BH: tl.constexpr,
    LN: tl.constexpr, RES: tl.constexpr, CLIP: tl.constexpr, COT: tl.constexpr, PREC: tl.constexpr,
    HAS_U: tl.constexpr = False, HAS_G: tl.constexpr = False,
):  # fmt: skip
    """One program per (chunk, batch row, head) ``program_id(0)``; every tensor ``[G·B·H, …]`` contiguous fp32:
    ``K [C, DK]``; the key pass ``X1, DL1, SP, CURV [C, HID]`` (``σ(Z_1)``, ``Δ_1``, ``σ'(Z_1)``,
    ``(Δ_2 W_2ᵀ) ∘ σ''(Z_1)``), ``DL2, OUT [C, DV]`` (``Δ_2``, the LayerNorm's output), ``RSTD, DMEAN [C]``; the
    entering state ``W1, S1 [DK, HID]``, ``W2, S2 [HID, DV]``; the adjoint of the leaving state ``AW1, AS1, AW2, AS2``
    (same shapes); ``GL, NL [C]``: the unclipped last rows of ``G, N``; with ``CLIP`` the clip's scale ``SC`` and
    norms ``XN0 = ‖k‖², XN1 = ‖X_1‖², DN0 = ‖Δ_1‖², DN1 = ‖Δ_2‖², SQ [C]``; with ``COT`` the read's cotangents of
    ``Δ_1, Δ_2, k, X_1`` and of the scale (``CD1, CD2, CX0, CX1, CSC``). ``HAS_U``: the complete cotangent of Δ_2
    comes from the adjoint sweep (``U [C, DV]``, which sums the same terms; the sweep's ``SAVE_U``), so pass 1 forms
    neither ``p9`` nor the clip's ``p9c``; ``HAS_G`` (with ``HAS_U`` and the clip): so do ``g̃, ñ``'s cotangents
    before the clip's backward (``GS [2, C]``), and pass 1 drops ``X_1 A^W_2, X_1 A^S_2`` and ``a0, b0`` too. Writes ``dk,
    dv`` (``DKO, DVO``), the cotangents of the unclipped ``GL, NL`` (``DGO, DNO``) and ``⟨A^W, W⟩, ⟨A^S, S⟩, ⟨A^W, S⟩``
    (``DOTS [3]``)."""
    row = tl.program_id(0)
    rows = tl.arange(0, C)
    ck = tl.arange(0, DK)
    cv = tl.arange(0, DV)
    ch = tl.arange(0, BH)
    k, dl2, gl, nl, gt, nt = _sweep_chunk_inputs(K, DL2, GL, NL, SC, row, rows, ck, cv, C, DK, DV, CLIP)
    if CLIP:
        sc = tl.load(SC + row * C + rows)  # (the clip's backward needs the scale itself)
    # pass 1: the sums over the hidden dimension, in two loops (one loop held too many tiles: spills)
    dx0 = tl.zeros([C, DK], dtype=tl.float32)  # g̃ ∘ Δ_1 A^Wᵀ_1 + ñ ∘ Δ_1 A^Sᵀ_1
    p9 = tl.zeros([C, DV], dtype=tl.float32)  # (dΔ_1 ∘ σ') W_2, dΔ_1 without the clip's term
    a0 = tl.zeros([C], dtype=tl.float32)
    b0 = tl.zeros([C], dtype=tl.float32)
    for j in range(0, HID, BH):
        cols = j + ch
        aw1 = _slab(AW1, row, ck, cols, DK, HID)
        as1 = _slab(AS1, row, ck, cols, DK, HID)
        dl1 = _slab(DL1, row, rows, cols, C, HID)
        if not HAS_G:
            xa = _mmp(k, aw1, PREC)
            xb = _mmp(k, as1, PREC)
            a0 += tl.sum(xa * dl1, 1)
            b0 += tl.sum(xb * dl1, 1)
        dx0 = _mmap(nt[:, None] * dl1, tl.trans(as1), _mmap(gt[:, None] * dl1, tl.trans(aw1), dx0, PREC), PREC)
        if not HAS_U:
            dd1 = -(gt[:, None] * xa + nt[:, None] * xb)
            if COT:
                dd1 += _slab(CD1, row, rows, cols, C, HID)
            sp = _slab(SP, row, rows, cols, C, HID)
            p9 = _mmap(dd1 * sp, _slab(W2, row, cols, cv, HID, DV), p9, PREC)
    # dk's first terms stored now (its other terms added at the end), so that dx0 is not live through what follows
    dx0 = -dx0
    if COT:
        dx0 += _slab(CX0, row, rows, ck, C, DK)
    tl.store(DKO + row * C * DK + rows[:, None] * DK + ck[None, :], dx0)
    p5 = tl.zeros([C, DV], dtype=tl.float32)  # X_1 A^W_2
    p6 = tl.zeros([C, DV], dtype=tl.float32)  # X_1 A^S_2
    p9c = tl.zeros([C, DV], dtype=tl.float32)  # (Δ_1 ∘ σ') W_2: the clip's term of p9, per token
    db = tl.zeros([BH], dtype=tl.float32)  # ⟨A^W, W⟩, ⟨A^S, S⟩, ⟨A^W, S⟩ by hidden unit (layer 2 here, layer 1 below)
    dm = tl.zeros([BH], dtype=tl.float32)
    df = tl.zeros([BH], dtype=tl.float32)
    for j in range(0, HID, BH):
        cols = j + ch
        aw2 = _slab(AW2, row, cols, cv, HID, DV)
        as2 = _slab(AS2, row, cols, cv, HID, DV)
        w2 = _slab(W2, row, cols, cv, HID, DV)
        s2 = _slab(S2, row, cols, cv, HID, DV)
        if not HAS_G:
            x1 = _slab(X1, row, rows, cols, C, HID)
            p5 = _mmap(x1, aw2, p5, PREC)
            p6 = _mmap(x1, as2, p6, PREC)
        db += tl.sum(aw2 * w2, 1)
        dm += tl.sum(as2 * s2, 1)
        df += tl.sum(aw2 * s2, 1)
    if CLIP and not HAS_U:  # (a loop of its own: in either loop above its tiles and accumulator spilled)
        for j in range(0, HID, BH):
            cols = j + ch
            dl1 = _slab(DL1, row, rows, cols, C, HID)
            sp = _slab(SP, row, rows, cols, C, HID)
            p9c = _mmap(dl1 * sp, _slab(W2, row, cols, cv, HID, DV), p9c, PREC)
    dl2 = _slab(DL2, row, rows, cv, C, DV)
    if HAS_G:
        dgt = tl.load(GS + row * 2 * C + rows)
        dnt = tl.load(GS + row * 2 * C + C + rows)
    else:
        dgt = -(a0 + tl.sum(p5 * dl2, 1))
        dnt = -(b0 + tl.sum(p6 * dl2, 1))
    if not HAS_U:
        dd2 = -(gt[:, None] * p5 + nt[:, None] * p6)
        if COT:
            dd2 += _slab(CD2, row, rows, cv, C, DV)
    if CLIP:
        # the clip's backward: sc = τ / sqrt(max(sq, τ²)), sq = Σ_l ‖X_l‖² ‖Δ_l‖²
        dsc = gl * dgt + nl * dnt
        if COT:
            dsc += tl.load(CSC + row * C + rows)
        sq = tl.load(SQ + row * C + rows)
        dsq = tl.where(sq >= tau2, -0.5 * sc / sq * dsc, 0.0)
        c1 = 2.0 * dsq * tl.load(XN0 + row * C + rows)  # of Δ_1: 2 dsq ‖k‖² Δ_1
        c2 = 2.0 * dsq * tl.load(XN1 + row * C + rows)  # of Δ_2
        c3 = 2.0 * dsq * tl.load(DN0 + row * C + rows)  # of k
        c4 = 2.0 * dsq * tl.load(DN1 + row * C + rows)  # of X_1
        if not HAS_U:
            dd2 += c2[:, None] * dl2
            p9 += c1[:, None] * p9c
        tl.store(DGO + row * C + rows, dgt * sc)
        tl.store(DNO + row * C + rows, dnt * sc)
    else:
        c1 = tl.zeros([C], dtype=tl.float32)
        c3 = tl.zeros([C], dtype=tl.float32)
        c4 = tl.zeros([C], dtype=tl.float32)
        tl.store(DGO + row * C + rows, dgt)
        tl.store(DNO + row * C + rows, dnt)
    if HAS_U:
        u = tl.load(U + row * C * DV + rows[:, None] * DV + cv[None, :])
    else:
        u = dd2 + p9  # the cotangent of Δ_2, complete
    dz2, ju = _loss_second(u, dl2, OUT, RSTD, DMEAN, row, rows, cv, C, DV, LN)  # the sweep's LayerNorm Hessian-vector product
    # dv stored now, so that ju is not live through pass 2 (dk takes −dv back at the end, with the residual)
    dvo = DVO + row * C * DV + rows[:, None] * DV + cv[None, :]
    tl.store(dvo, -2.0 * ju)
    # pass 2: dZ_1 = dΔ_1 ∘ (Δ_2 W_2ᵀ ∘ σ'') + d(σ(Z_1)) ∘ σ' per slice, and its product with W_1ᵀ, in two loops (one term each)
    pk = tl.zeros([C, DK], dtype=tl.float32)
    for j in range(0, HID, BH):
        cols = j + ch
        aw1 = _slab(AW1, row, ck, cols, DK, HID)
        as1 = _slab(AS1, row, ck, cols, DK, HID)
        w1 = _slab(W1, row, ck, cols, DK, HID)
        s1 = _slab(S1, row, ck, cols, DK, HID)
        db += tl.sum(aw1 * w1, 0)
        dm += tl.sum(as1 * s1, 0)
        df += tl.sum(aw1 * s1, 0)
        dd1 = -(gt[:, None] * _mmp(k, aw1, PREC) + nt[:, None] * _mmp(k, as1, PREC))
        if COT:
            dd1 += _slab(CD1, row, rows, cols, C, HID)
        if CLIP:
            dd1 += c1[:, None] * _slab(DL1, row, rows, cols, C, HID)
        curv = _slab(CURV, row, rows, cols, C, HID)
        pk = _mmap(dd1 * curv, tl.trans(w1), pk, PREC)
    for j in range(0, HID, BH):
        cols = j + ch
        aw2 = _slab(AW2, row, cols, cv, HID, DV)
        as2 = _slab(AS2, row, cols, cv, HID, DV)
        w2 = _slab(W2, row, cols, cv, HID, DV)
        # X_1's cotangent (the update's, the read's, the clip's) plus dZ_2 W_2ᵀ: the cotangent of σ(Z_1)
        dx = _mmp(dz2, tl.trans(w2), PREC) - gt[:, None] * _mmp(dl2, tl.trans(aw2), PREC) - nt[:, None] * _mmp(dl2, tl.trans(as2), PREC)
        if COT:
            dx += _slab(CX1, row, rows, cols, C, HID)
        if CLIP:
            dx += c4[:, None] * _slab(X1, row, rows, cols, C, HID)
        sp = _slab(SP, row, rows, cols, C, HID)
        w1 = _slab(W1, row, ck, cols, DK, HID)
        pk = _mmap(dx * sp, tl.trans(w1), pk, PREC)
    dko = DKO + row * C * DK + rows[:, None] * DK + ck[None, :]
    dk = tl.load(dko) + pk  # (the same program's stores above: no other program touches these rows)
    if CLIP:
        dk += c3[:, None] * _slab(K, row, rows, ck, C, DK)
    if RES:
        dk -= tl.load(dvo)  # + 2 ju
    tl.store(dko, dk)
    tl.store(DOTS + row * 3, tl.sum(db, 0))
    tl.store(DOTS + row * 3 + 1, tl.sum(dm, 0))
    tl.store(DOTS + row * 3 + 2, tl.sum(df, 0))


def supported(k: Tensor, w: Sequence[Tensor]) -> bool:
    """Depth 2, power-of-two sizes ≥ 16 (``tl.dot`` tiles), ``d_k = d_v`` (the residual adds ``v``-sized terms to ``dk``)."""
    if len(w) != 2:
        return False
    c, dk, hid, dv = k.shape[-2], k.shape[-1], w[0].shape[-1], w[1].shape[-1]
    return dk == dv and all(x >= 16 and x & (x - 1) == 0 for x in (c, dk, hid, dv))


def _outputs(k: Tensor, dl2: Tensor, gl: Tensor) -> list[Tensor]:
    """``[dk, dv, dg_last, dn_last, dots [..., 3]]``, allocated."""
    return [torch.empty_like(k), torch.empty_like(dl2), torch.empty_like(gl), torch.empty_like(gl), gl.new_empty((*gl.shape[:-1], 3))]


@torch.library.custom_op("mnemotorch::lmm_update_vjp", mutates_args=())
def lmm_update_vjp(
    k: Tensor, x1: Tensor, dl1: Tensor, sp: Tensor, curv: Tensor, dl2: Tensor,
    out: Tensor | None, rstd: Tensor | None, dmean: Tensor | None,
    w1: Tensor, w2: Tensor, s1: Tensor, s2: Tensor, aw1: Tensor, as1: Tensor, aw2: Tensor, as2: Tensor,
    gl: Tensor, nl: Tensor, sc: Tensor | None, xn0: Tensor | None, xn1: Tensor | None, dn0: Tensor | None,
    dn1: Tensor | None, sq: Tensor | None,
    cd1: Tensor | None, cd2: Tensor | None, cx0: Tensor | None, cx1: Tensor | None, csc: Tensor | None,
    residual: bool, max_grad_norm: float, prec: str, u: Tensor | None = None, gsum: Tensor | None = None,
) -> list[Tensor]:  # fmt: skip
    """The kernel on ``[G, B, H, …]`` fp32 contiguous tensors (chunk-major, as the backward holds them):
    ``[dk, dv, dg_last, dn_last, dots]`` with ``dots [..., 3] = (⟨A^W, W⟩, ⟨A^S, S⟩, ⟨A^W, S⟩)`` summed over both
    layers. ``out, rstd, dmean`` (all or none): the LayerNorm's; ``sc, xn0, xn1, dn0, dn1, sq`` (all or none): the
    clip's, at ``max_grad_norm``; ``cd1, cd2, cx0, cx1`` (all or none; ``csc`` with the clip): the read's
    cotangents; ``u [..., C, d_v]``: the cotangent of Δ_2 from the adjoint sweep (the read's share and the clip's
    included), ``gsum [..., 2, C]`` (only with ``u`` and the clip): those of ``g̃, ñ``, from it too."""
    c, dkk = k.shape[-2:]
    hid, dv = w1.shape[-1], w2.shape[-1]
    rows = k.numel() // (c * dkk)
    res = _outputs(k, dl2, gl)
    ln, clip, cot = out is not None, sc is not None, cd1 is not None
    if gsum is not None and (u is None or not clip):
        raise ValueError("lmm_update_vjp: gsum comes with u, and only with the clip")
    any_ = lambda x: k if x is None else x  # noqa: E731  (a pointer the kernel does not read: its constexpr is off)
    bh = min(int(LAUNCH_UPDATE_VJP["slice"]), hid)
    launcher(_lmm_update_vjp_kernel)[(rows,)](
        k, x1, dl1, sp, curv, dl2, any_(out), any_(rstd), any_(dmean),
        w1, w2, s1, s2, aw1, as1, aw2, as2,
        gl, nl, any_(sc), any_(xn0), any_(xn1), any_(dn0), any_(dn1), any_(sq),
        any_(cd1), any_(cd2), any_(cx0), any_(cx1), any_(csc), any_(u), any_(gsum),
        *res, float(max_grad_norm) ** 2,
        C=c, DK=dkk, DV=dv, HID=hid, BH=bh, LN=ln, RES=residual, CLIP=clip, COT=cot, PREC=prec, HAS_U=u is not None, HAS_G=gsum is not None,
        num_warps=int(LAUNCH_UPDATE_VJP["warps"]), num_stages=int(LAUNCH_UPDATE_VJP["stages"]),
    )  # fmt: skip
    return res


@lmm_update_vjp.register_fake
def _(k, x1, dl1, sp, curv, dl2, out, rstd, dmean, w1, w2, s1, s2, aw1, as1, aw2, as2, gl, nl, sc, xn0, xn1, dn0, dn1, sq,
      cd1, cd2, cx0, cx1, csc, residual, max_grad_norm, prec, u=None, gsum=None):  # fmt: skip
    return _outputs(k, dl2, gl)


_lmm_update_vjp = direct(lmm_update_vjp)  # eager calls without the dispatcher's round trip (ops/eager.py)


def launch(k: Tensor, kp: KeyPass, g_last: Tensor, n_last: Tensor, w: Sequence[Tensor], s: Sequence[Tensor], adj_w: Sequence[Tensor],
           adj_s: Sequence[Tensor], residual: bool, layer_norm: bool, max_grad_norm: float | None, stats: tuple | None,
           cot: ReadCotangents | None, prec: str, u: Tensor | None = None, gsum: Tensor | None = None) -> tuple:  # fmt: skip
    """:func:`~.fused_backward.state_adjoint`'s input gradients (``inputs=True``: ``(dk, dv, dg_last, dn_last, dβ_c,
    dm_c, df_c)``) by the kernel, on the backward's tensors (cast to fp32 and made contiguous where they are not).
    ``k [..., C, d]`` and every tensor batched alike; ``kp``: the key pass at ``w`` (depth 2); ``stats``: the clip's
    (:func:`~.fused_backward._clip_stats`, needed with ``max_grad_norm``); ``cot``: the read's folded cotangents; ``u``,
    ``gsum``: the adjoint sweep's (:func:`lmm_update_vjp`; they must include ``cot``'s shares where it is given)."""
    f32 = lambda x: None if x is None else (x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous())  # noqa: E731
    vec = lambda x: None if x is None else f32(x.squeeze(-1) if x.dim() == k.dim() else x)  # noqa: E731  ([.., C, 1] -> [.., C])
    ln = (f32(kp.out), vec(kp.rstd), vec(kp.dmean)) if layer_norm else (None, None, None)
    if max_grad_norm is not None:
        if stats is None:
            raise ValueError("fused_update_vjp.launch: the clip needs its stats (fused_backward._clip_stats)")
        xn, dn, sq, sc = stats
        clip = (f32(sc), f32(xn[0]), f32(xn[1]), f32(dn[0]), f32(dn[1]), f32(sq))
    else:
        clip = (None,) * 6
    if cot is not None:
        like = (kp.deltas[0], kp.deltas[1], k, kp.xs[1])
        parts = [f32(torch.zeros_like(y) if x is None else x) for x, y in zip((*cot.d_delta, *cot.d_x), like)]
        dsc = None if max_grad_norm is None else f32(torch.zeros_like(g_last) if cot.dsc is None else cot.dsc)
        cots = (*parts, dsc)
    else:
        cots = (None,) * 5
    dk, dv, dg, dn, dots = _lmm_update_vjp(
        f32(k), f32(kp.xs[1]), f32(kp.deltas[0]), f32(kp.d1[0]), f32(kp.d2[0]), f32(kp.deltas[1]), *ln,
        f32(w[0]), f32(w[1]), f32(s[0]), f32(s[1]), f32(adj_w[0]), f32(adj_s[0]), f32(adj_w[1]), f32(adj_s[1]),
        f32(g_last), f32(n_last), *clip, *cots, residual, 0.0 if max_grad_norm is None else float(max_grad_norm), prec, f32(u), f32(gsum),
    )  # fmt: skip
    return dk, dv, dg, dn, dots[..., 0], dots[..., 1], dots[..., 2]


__all__ = ["LAUNCH_UPDATE_VJP", "launch", "lmm_update_vjp", "supported"]
