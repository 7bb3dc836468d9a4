"""Backward of the fused Titans memory: chunks batched, only the state's adjoint sequential.

Chunk ``i`` maps its inputs and the state entering it, ``(W_i, S_i)``, to its outputs ``y_i`` and the
state leaving it: ``F_i(x_i, W_i, S_i) = (y_i, W_{i+1}, S_{i+1})``. Given every ``W_i, S_i`` (the fused
forward kernel writes them: one checkpoint per chunk), the backward splits into

1. **the read, batched over all chunks**: the vector-Jacobian product of ``y_i`` with ``dy_i`` through the
   dual-form read and the key pass of :mod:`.chunked`, written out (:func:`read_vjp`: the read's transpose,
   then :func:`key_pass_vjp` of its cotangents; at depth 2 the transpose runs in Triton,
   :mod:`.fused_read_vjp`; autograd of the whole read is kept as an option). It gives the read's share of
   every input gradient and ``b_i``, its share of the state's adjoint;
2. **the state's adjoint, chunk by chunk in reverse** (the only sequential part):
   ``ā_i = b_i + J_iᵀ ā_{i+1}`` with ``J_i = ∂(W_{i+1}, S_{i+1}) / ∂(W_i, S_i)``, starting from the
   gradient of the returned final state. :func:`state_adjoint` writes ``J_iᵀ`` out by hand — the
   update's transpose and a Hessian-vector product through the key pass (activation second
   derivatives, the LayerNorm backward's own backward, the clip) — from the key pass's values,
   which are computed for all chunks at once beforehand (:func:`key_pass_saved`);
3. **the update, batched over all chunks**: the vector-Jacobian product of ``(W_{i+1}, S_{i+1})`` with
   ``ā_{i+1}`` for the keys, values and coefficients (:func:`state_adjoint` with ``inputs``; or autograd).

Step 2 is what the chunked path's autograd does inside its whole per-chunk backward; here it is a
dozen batched products per chunk, with no recomputation of the read. ``ā_0`` is the gradient of the
initial state. Tested against autograd of :func:`.chunked._key_pass` / :func:`.chunked._update` in
float64 (``tests/ops/test_memory_fused_backward.py``).

Since :func:`key_pass_vjp` is linear in its cotangents, step 1 may also stop short of it and hand the read's
cotangents of the key pass on (:class:`ReadCotangents`; ``fold`` / ``add_cot``): steps 2 and 3 add them to the
update's before their own key-pass VJPs, which saves the read's batched pass through the key pass.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .chunked import _act, _act_grad, _key_forward, _layer_norm
from .reference import clip_scale


def _act_grad2(name: str, z: Tensor) -> Tensor:
    """σ''(z)."""
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1 - s) * (2 + z * (1 - 2 * s))
    if name == "gelu":
        return torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) * (2 - z * z)
    return torch.zeros_like(z)


def _index(t: tuple, i) -> tuple:
    """``t`` (a NamedTuple of tensors, lists of tensors and Nones, batched alike) at index ``i`` of the leading
    dimension (an int or a slice; views)."""
    return type(t)(*[[x[i] for x in f] if isinstance(f, list) else (None if f is None else f[i]) for f in t])


class KeyPass(NamedTuple):
    """The key pass at the chunk-start weights, with what its second derivative needs (leading dims batched).

    ``xs[l]``: layer ``l``'s input (``xs[0] = k``); ``deltas[l] = ∂ℓ/∂Z_l`` (``Z_l``: its pre-activation);
    for the hidden layers ``l < depth − 1``, ``d1[l] = σ'(Z_l)`` and ``d2[l] = P_l ∘ σ''(Z_l)`` with
    ``P_l = deltas[l + 1] W_{l+1}ᵀ`` (so ``deltas[l] = P_l ∘ σ'(Z_l)``), computed here for all chunks at once
    rather than in the sequential loop; ``out, rstd, dmean``: the last layer's LayerNorm output, ``1/σ``
    and ``mean(D ∘ out)`` of the loss gradient ``D`` (None without LayerNorm)."""

    xs: list
    deltas: list
    d1: list
    d2: list
    out: Tensor | None
    rstd: Tensor | None
    dmean: Tensor | None

    def at(self, i) -> "KeyPass":
        """Chunk ``i`` (or the chunks of a slice) of a batch over chunks (views)."""
        return _index(self, i)


class ReadCotangents(NamedTuple):
    """The read's cotangents of the key pass, for the sweep and the update's VJP to fold into their own
    (:func:`read_vjp` with ``fold``; :func:`state_adjoint`'s ``add_cot``), every tensor batched as the key pass:
    ``d_delta[l] [..., C, d_out]`` of ``Δ_l``, ``d_x[l] [..., C, d_in]`` of ``X_l`` (``d_x[0]``: of ``k``) and
    ``dsc [..., C]``, of the clip's scale per token (None without the clip), the clip's own backward not yet
    applied: the consumer applies it once, to the read's and the update's cotangents of the scale summed."""

    d_delta: list
    d_x: list
    dsc: Tensor | None

    def at(self, i) -> "ReadCotangents":
        """Chunk ``i`` (or the chunks of a slice) of a batch over chunks (views)."""
        return _index(self, i)


def key_pass_saved(k: Tensor, v: Tensor, w: Sequence[Tensor], activation: str, residual: bool, layer_norm: bool, ln_eps: float) -> KeyPass:
    """:func:`.chunked._key_pass` (same arithmetic), keeping the intermediate values."""
    depth = len(w)
    xs, zs, d, out, rstd, dmean = _key_forward(k, v, w, activation, residual, layer_norm, ln_eps)
    deltas: list = [None] * depth
    d1: list = [None] * (depth - 1)
    d2: list = [None] * (depth - 1)
    deltas[-1] = d
    for i in range(depth - 2, -1, -1):
        p = deltas[i + 1] @ w[i + 1].transpose(-1, -2)
        d1[i] = _act_grad(activation, zs[i])
        deltas[i] = p * d1[i]
        d2[i] = p * _act_grad2(activation, zs[i])
    return KeyPass(xs, deltas, d1, d2, out, rstd, dmean)


def key_pass_from_forward(
    k: Tensor, v: Tensor, z1: Tensor, p: Tensor, d2: Tensor, z2: Tensor, activation: str, residual: bool, layer_norm: bool, ln_eps: float
) -> KeyPass:
    """:func:`key_pass_saved` at depth 2, elementwise from what the forward kernel computed for the same
    chunks at the same weights: ``Z_1``, ``P = Δ_2 W_2ᵀ``, ``Δ_2`` and ``Z_2`` (the last layer's pre-output).
    No product is recomputed, and the backward sees the very values the forward's update used."""
    s1 = _act_grad(activation, z1)
    xs = [k, _act(activation, z1)]
    deltas = [p * s1, d2]
    curv = [p * _act_grad2(activation, z1)]
    if not layer_norm:
        return KeyPass(xs, deltas, [s1], curv, None, None, None)
    out, rstd = _layer_norm(z2, ln_eps)
    pred = out + k if residual else out
    dmean = (2 * (pred - v) * out).mean(-1, keepdim=True)
    return KeyPass(xs, deltas, [s1], curv, out, rstd, dmean)


def _ln_jvp(u: Tensor, out: Tensor, rstd: Tensor) -> Tensor:
    """``J u`` for the affine-free LayerNorm's (symmetric) Jacobian ``J = r (I − 11ᵀ/n − o oᵀ/n)``."""
    return rstd * (u - u.mean(-1, keepdim=True) - out * (u * out).mean(-1, keepdim=True))


def key_pass_vjp(
    kp: KeyPass, d_delta: Sequence[Tensor], d_x: Sequence[Tensor | None], w: Sequence[Tensor], layer_norm: bool, residual: bool,
    inputs: bool = True,
) -> tuple:
    """The vector-Jacobian product of the key pass ``(X_l, Δ_l)(k, v, W)`` (:func:`key_pass_saved`) with cotangents
    ``d_delta[l]`` of ``Δ_l`` and ``d_x[l]`` of ``X_l`` (``d_x[0]``, of ``k``, may be None): a Hessian-vector
    product through the memory's loss (the activation's second derivative, the LayerNorm backward's own
    backward). Returns ``(dw, dk, dv)``; ``dk, dv`` are None without ``inputs``. Linear in the cotangents, so the
    read's and the update's shares may go through it separately or summed."""
    depth = len(w)
    d_delta = list(d_delta)
    # The key pass's second derivative: Δ_l = P_l ∘ σ'(Z_l) with P_l = Δ_{l+1} W_{l+1}ᵀ, then the loss at the last layer.
    xs, deltas = kp.xs, kp.deltas
    dz: list = [None] * depth
    dw: list = [None] * depth
    for l in range(depth - 1):
        dp = d_delta[l] * kp.d1[l]
        dz[l] = d_delta[l] * kp.d2[l]
        d_delta[l + 1] = d_delta[l + 1] + dp @ w[l + 1]
        dw[l + 1] = dp.transpose(-1, -2) @ deltas[l + 1]
    u = d_delta[-1]
    if layer_norm:
        # Δ = J(Z)ᵀ D(Z), D = 2(LN(Z) [+ k] − v): the product of its Jacobian with u is
        # J (2 J u) (through D) plus the derivative of J itself with D held: −r mean(u∘Δ) o − r mean(D∘o) J u − r mean(u∘o) Δ.
        out, rstd = kp.out, kp.rstd
        ju = _ln_jvp(u, out, rstd)
        dzl = 2 * _ln_jvp(ju, out, rstd) - rstd * ((u * deltas[-1]).mean(-1, keepdim=True) * out + kp.dmean * ju + (u * out).mean(-1, keepdim=True) * deltas[-1])
    else:
        ju = u
        dzl = 2 * u
    # (ju is the cotangent of the loss gradient D = 2(pred − v) at the prediction: v's and the residual k's share)
    dz[-1] = dzl if dz[-1] is None else dz[-1] + dzl
    for l in range(depth - 1, -1, -1):
        g_w = xs[l].transpose(-1, -2) @ dz[l]
        dw[l] = g_w if dw[l] is None else dw[l] + g_w
        if l >= 1:
            dx = d_x[l] + dz[l] @ w[l].transpose(-1, -2)
            dz[l - 1] = dz[l - 1] + dx * kp.d1[l - 1]
    if not inputs:
        return dw, None, None
    dk = dz[0] @ w[0].transpose(-1, -2)
    if d_x[0] is not None:
        dk = dk + d_x[0]
    if residual:
        dk = dk + 2 * ju
    return dw, dk, -2 * ju


def _clip_stats(kp: KeyPass, max_grad_norm: float) -> tuple:
    """``(‖X_l‖², ‖Δ_l‖², sq, scale)`` per token: the clip's inputs (:func:`.chunked._clipped`)."""
    xn = [x.pow(2).sum(-1) for x in kp.xs]
    dn = [d.pow(2).sum(-1) for d in kp.deltas]
    sq = sum(a * b for a, b in zip(xn, dn))
    return xn, dn, sq, clip_scale(sq, max_grad_norm)


def _clip_back(kp: KeyPass, xn: list, dn: list, sq: Tensor, sc: Tensor, dsc: Tensor, max_grad_norm: float, d_delta: list, d_x: list) -> None:
    """Adds the clip scale's cotangent ``dsc`` (per token) to the key pass's cotangents, in place.
    ``sc = τ / sqrt(max(sq, τ²))``: ``d sc / d sq = −sc / (2 sq)`` where the clip acts (as autograd's clamp)."""
    dsq = torch.where(sq >= max_grad_norm * max_grad_norm, -0.5 * sc / sq * dsc, torch.zeros_like(sq))
    for l in range(len(d_delta)):
        d_delta[l] = d_delta[l] + (2 * dsq * xn[l]).unsqueeze(-1) * kp.deltas[l]
        if d_x[l] is not None:
            d_x[l] = d_x[l] + (2 * dsq * dn[l]).unsqueeze(-1) * kp.xs[l]


def read_vjp(
    q: Tensor,
    kp: KeyPass,
    g_mat: Tensor,
    beta: Tensor,
    f: Tensor,
    w: Sequence[Tensor],
    s: Sequence[Tensor],
    dy: Tensor,
    activation: str,
    residual: bool,
    layer_norm: bool,
    ln_eps: float,
    max_grad_norm: float | None,
    fold: bool = False,
    stats: tuple | None = None,
) -> tuple:
    """The vector-Jacobian product of a chunk's read (:func:`.chunked._read` after the key pass and the clip) with
    ``dy``, written out: what the backward otherwise gets from autograd of the whole read, key pass included.

    The read of layer ``l`` is ``Z_l = β ∘ (H_l W_l) + f ∘ (H_l S_l) − (G̃ ∘ H_l X_lᵀ) Δ_l`` (``H_0 = q``,
    ``H_{l+1} = σ(Z_l)``). Its transpose gives the gradients of ``q, G, β, f`` and the direct share of
    ``W_l, S_l``, and cotangents of the key pass's ``X_l, Δ_l`` (and of the clip's scale), which
    :func:`key_pass_vjp` takes to ``k, v`` and the rest of ``W_l``'s share. Args as :func:`.chunked._read`
    (``g_mat`` unclipped), every tensor batched alike; ``kp`` at ``w``. Returns
    ``(dq, dk, dv, dg_mat, dbeta, df, b_w, b_s)``, ``b_w, b_s``: the read's share of the state's adjoint.
    ``fold``: the key pass's VJP left to the caller (:func:`read_vjp_tail`): ``(dq, cot, dg_mat, dbeta, df, b_w, b_s)``
    with ``cot`` the :class:`ReadCotangents` and ``b_w`` the read's direct share only. ``stats``: :func:`_clip_stats`
    of ``kp`` where the caller has them already.
    """
    depth = len(w)
    xs, deltas = kp.xs, kp.deltas
    if stats is None and max_grad_norm is not None:
        stats = _clip_stats(kp, max_grad_norm)
    gm = g_mat * stats[3].unsqueeze(-2) if stats is not None else g_mat
    # The read again, keeping what its transpose needs.
    hs, zs, hws, ars = [q], [], [], []
    for l in range(depth):
        hw = hs[l] @ torch.cat([w[l], s[l]], -1)  # [..., C, 2·d_out]: H W | H S
        ar = hs[l] @ xs[l].transpose(-1, -2)  # H Xᵀ  [..., C, C]
        dout = w[l].shape[-1]
        z = beta.unsqueeze(-1) * hw[..., :dout] + f.unsqueeze(-1) * hw[..., dout:] - (gm * ar) @ deltas[l]
        hws.append(hw), ars.append(ar), zs.append(z)
        if l < depth - 1:
            hs.append(_act(activation, z))
    if layer_norm:
        out, rstd = _layer_norm(zs[-1], ln_eps)
        dz = _ln_jvp(dy, out, rstd)  # (the affine-free LayerNorm's Jacobian is symmetric)
    else:
        dz = dy
    dq = dy if residual else torch.zeros_like(q)
    d_delta: list = [None] * depth
    d_x: list = [None] * depth
    b_w: list = [None] * depth
    b_s: list = [None] * depth
    dbeta = df = dgm = None
    for l in range(depth - 1, -1, -1):
        dout = w[l].shape[-1]
        hw = hws[l]
        db_l, df_l = (dz * hw[..., :dout]).sum(-1), (dz * hw[..., dout:]).sum(-1)
        dbeta, df = (db_l, df_l) if dbeta is None else (dbeta + db_l, df + df_l)
        u = torch.cat([beta.unsqueeze(-1) * dz, f.unsqueeze(-1) * dz], -1)  # the cotangent of H W | H S
        bws = hs[l].transpose(-1, -2) @ u
        b_w[l], b_s[l] = bws[..., :dout], bws[..., dout:]
        da = -(dz @ deltas[l].transpose(-1, -2))  # of G̃ ∘ H Xᵀ
        d_delta[l] = -((gm * ars[l]).transpose(-1, -2) @ dz)
        dgm = da * ars[l] if dgm is None else dgm + da * ars[l]
        dag = da * gm  # of H Xᵀ
        d_x[l] = dag.transpose(-1, -2) @ hs[l]
        dh = u @ torch.cat([w[l], s[l]], -1).transpose(-1, -2) + dag @ xs[l]
        if l >= 1:
            dz = dh * _act_grad(activation, zs[l - 1])
        else:
            dq = dq + dh
    *kv, dg, b_w = read_vjp_tail(kp, g_mat, dgm, b_w, d_delta, d_x, w, layer_norm, residual, max_grad_norm, stats, fold)
    return dq, *kv, dg, dbeta, df, b_w, b_s


def read_vjp_tail(kp: KeyPass, g_mat: Tensor, dgm: Tensor, b_w: Sequence[Tensor], d_delta: Sequence[Tensor], d_x: Sequence[Tensor],
                  w: Sequence[Tensor], layer_norm: bool, residual: bool, max_grad_norm: float | None, stats: tuple | None = None,
                  fold: bool = False) -> tuple:  # fmt: skip
    """What :func:`read_vjp` does after the read's transpose (also after the Triton form of that transpose,
    :mod:`.fused_read_vjp`): the clip (``dgm`` is the cotangent of the clipped ``G̃``) and the key pass's VJP of
    the read's cotangents ``d_delta, d_x`` of ``Δ_l, X_l``. ``stats``: :func:`_clip_stats` of ``kp`` where the caller
    has them already. Returns ``(dk, dv, dg_mat, b_w + the key pass's share)``; with ``fold`` neither the clip's
    backward nor the key pass's VJP runs: ``(ReadCotangents(d_delta, d_x, dsc), dg_mat, b_w)``, for
    :func:`state_adjoint`'s ``add_cot``."""
    d_delta, d_x = list(d_delta), list(d_x)
    if max_grad_norm is not None:
        xn, dn, sq, sc = stats if stats is not None else _clip_stats(kp, max_grad_norm)
        dg = dgm * sc.unsqueeze(-2)
        dsc = (dgm * g_mat).sum(-2)  # of the scale: G̃ = G ∘ sc along the keys
    else:
        dg, dsc = dgm, None
    if fold:
        return ReadCotangents(d_delta, d_x, dsc), dg, list(b_w)
    if dsc is not None:
        _clip_back(kp, xn, dn, sq, sc, dsc, max_grad_norm, d_delta, d_x)
    dw, dk, dv = key_pass_vjp(kp, d_delta, d_x, w, layer_norm, residual)
    return dk, dv, dg, [a + b for a, b in zip(b_w, dw)]


def state_adjoint(
    kp: KeyPass,
    g_last: Tensor,
    n_last: Tensor,
    beta_c: Tensor,
    m_c: Tensor,
    f_c: Tensor,
    w: Sequence[Tensor],
    adj_w: Sequence[Tensor],
    adj_s: Sequence[Tensor],
    layer_norm: bool,
    max_grad_norm: float | None,
    add_w: Sequence[Tensor] | None = None,
    add_s: Sequence[Tensor] | None = None,
    inputs: bool = False,
    s: Sequence[Tensor] | None = None,
    residual: bool = False,
    add_cot: ReadCotangents | None = None,
    stats: tuple | None = None,
) -> tuple:
    """``J_iᵀ ā``: the adjoint of one chunk's entering state from the adjoint ``ā = (adj_w, adj_s)`` of the
    state leaving it, through the update ``W_l' = β_c W_l + f_c S_l − X_{l−1}ᵀ diag(g̃) Δ_l``,
    ``S_l' = m_c S_l − X_{l−1}ᵀ diag(ñ) Δ_l`` (``g̃, ñ``: the last rows of ``G, N``, clipped).

    Args: ``kp`` (:func:`key_pass_saved` at ``w``); ``g_last, n_last [..., C]`` (unclipped);
    ``beta_c, m_c, f_c [...]``; ``w[l], adj_w[l], adj_s[l] [..., d_in, d_out]``; ``add_w, add_s``: the
    read's share ``b_i``, added to the result (optional). Returns ``(adj_w_in, adj_s_in)``.

    ``inputs``: also the update's share of the other inputs' gradients, from the same cotangents (what the
    backward otherwise gets from a second, batched autograd pass over the update): returns
    ``(adj_w_in, adj_s_in, (dk, dv, dg_last, dn_last, dbeta_c, dm_c, df_c))``; needs ``s`` (the entering
    momentum) and ``residual``. ``dk, dv`` through the key pass (k also as the first layer's input and, with
    ``residual``, in the loss); ``dg_last, dn_last`` of the unclipped last rows.

    ``add_cot``: the read's cotangents of the same key pass (:class:`ReadCotangents`, batched as ``kp``), added to the
    update's before the clip's backward and the key pass's VJP: the result then also holds the read's key-pass share
    (of ``adj_w_in``, and of ``dk, dv`` with ``inputs``), by linearity the same as running that VJP on them apart.
    ``stats``: :func:`_clip_stats` of ``kp`` where the caller has them already.
    """
    depth = len(w)
    xs, deltas = kp.xs, kp.deltas
    if max_grad_norm is not None:
        xn, dn, sq, sc = stats if stats is not None else _clip_stats(kp, max_grad_norm)
        gt, nt = g_last * sc, n_last * sc
    else:
        gt, nt = g_last, n_last
    # The update's transpose: cotangents of Δ_l, of the hidden inputs X_l (l ≥ 1) and of g̃, ñ.
    d_delta: list = [None] * depth
    d_x: list = [None] * depth
    dgt = dnt = None
    for l in range(depth):
        xa = xs[l] @ adj_w[l]
        xb = xs[l] @ adj_s[l]
        d_delta[l] = -(gt.unsqueeze(-1) * xa + nt.unsqueeze(-1) * xb)
        if add_cot is not None:
            d_delta[l] = d_delta[l] + add_cot.d_delta[l]
        if l >= 1 or inputs:  # (X_0 = k: its cotangent only for the inputs' gradients)
            d_x[l] = -(gt.unsqueeze(-1) * (deltas[l] @ adj_w[l].transpose(-1, -2)) + nt.unsqueeze(-1) * (deltas[l] @ adj_s[l].transpose(-1, -2)))
            if add_cot is not None:
                d_x[l] = d_x[l] + add_cot.d_x[l]
        if max_grad_norm is not None or inputs:
            a, b = (xa * deltas[l]).sum(-1), (xb * deltas[l]).sum(-1)
            dgt, dnt = (-a, -b) if dgt is None else (dgt - a, dnt - b)
    if max_grad_norm is not None:
        dsc = g_last * dgt + n_last * dnt  # of the scale, through g̃ = g ∘ sc and ñ = n ∘ sc
        if add_cot is not None and add_cot.dsc is not None:
            dsc = dsc + add_cot.dsc  # (the read's, through G̃: one clip backward for both)
        _clip_back(kp, xn, dn, sq, sc, dsc, max_grad_norm, d_delta, d_x)
    dw, dk, dv = key_pass_vjp(kp, d_delta, d_x, w, layer_norm, residual, inputs)
    bc, mc, fc = (x[..., None, None] for x in (beta_c, m_c, f_c))
    new_w = [bc * a + d for a, d in zip(adj_w, dw)]
    new_s = [fc * a + mc * b for a, b in zip(adj_w, adj_s)]
    if add_w is not None:
        new_w = [a + b for a, b in zip(new_w, add_w)]
    if add_s is not None:
        new_s = [a + b for a, b in zip(new_s, add_s)]
    if not inputs:
        return new_w, new_s
    if s is None:
        raise ValueError("state_adjoint(inputs=True) needs s, the momentum entering the chunk")
    dg_last, dn_last = (dgt * sc, dnt * sc) if max_grad_norm is not None else (dgt, dnt)
    dot = lambda xs_, ys_: sum((x * y).sum((-1, -2)) for x, y in zip(xs_, ys_))  # noqa: E731
    return new_w, new_s, (dk, dv, dg_last, dn_last, dot(adj_w, w), dot(adj_s, s), dot(adj_w, s))


def sweep_block(
    kp: KeyPass,
    g_last: Tensor,
    n_last: Tensor,
    beta_c: Tensor,
    m_c: Tensor,
    f_c: Tensor,
    w: Sequence[Tensor],
    adj_w: Sequence[Tensor],
    adj_s: Sequence[Tensor],
    add_w: Sequence[Tensor],
    add_s: Sequence[Tensor],
    layer_norm: bool,
    max_grad_norm: float | None,
    add_cot: ReadCotangents | None = None,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """:func:`state_adjoint` over ``U`` consecutive chunks in reverse (every argument batched ``[U, …]``
    but the incoming adjoint; ``add_cot`` too): one call, so that a compiled block pays the call's host cost once per
    ``U`` chunks. Returns ``(adj_w, adj_s, leaving)``: the adjoint entering the first chunk, and per state
    tensor ``[U, …]`` the adjoint of the state *leaving* each chunk (what the update's products need)."""
    leaving: list[list[Tensor]] = [[] for _ in range(len(adj_w) + len(adj_s))]
    for j in range(g_last.shape[0] - 1, -1, -1):
        for out, a in zip(leaving, (*adj_w, *adj_s)):
            out.append(a)
        adj_w, adj_s = state_adjoint(kp.at(j), g_last[j], n_last[j], beta_c[j], m_c[j], f_c[j], [x[j] for x in w], adj_w, adj_s,
                                     layer_norm, max_grad_norm, [x[j] for x in add_w], [x[j] for x in add_s],
                                     add_cot=None if add_cot is None else add_cot.at(j))  # fmt: skip
    return list(adj_w), list(adj_s), [torch.stack(x[::-1]) for x in leaving]


__all__ = ["KeyPass", "ReadCotangents", "key_pass_from_forward", "key_pass_saved", "key_pass_vjp", "read_vjp", "read_vjp_tail", "state_adjoint", "sweep_block"]
