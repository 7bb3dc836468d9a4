"""The memory mixers' input path in two Triton kernels a direction: causal depthwise conv, SiLU, per-head ℓ2 norm.

Per token ``t`` and channel ``c`` of the fused projections ``u [B, T, 3·H·D]`` (q, k, v heads side by side), with
the carried window ``past [B, K−1, 3·H·D]`` in front of them (``e = [past; u]``, :func:`~mnemotorch.layers.short_conv.
causal_depthwise_conv`)::

    z_{t,c} = Σ_{j<K} w_{c,j} e_{t+j,c}        a = SiLU(z) = z σ(z)
    y_t[head] = a_t[head] / max(‖a_t[head]‖, ε)   for the q and k heads (the first ``normed`` channels), y = a for v

(``ε = 1e-12``, ``F.normalize``'s). :func:`~mnemotorch.layers.short_conv.conv_silu_qkv` computes the same in PyTorch.
The backward, for ``ȳ``:

* ``ā = (ȳ − y (y·ȳ)) / ‖a‖`` per normed head (``ȳ / ε`` where ``‖a‖ ≤ ε``), ``ā = ȳ`` for v;
* ``z̄ = ā σ(z) (1 + z (1 − σ(z)))``;
* ``ē_p = Σ_j w_{c,j} z̄_{p−j}`` (``0 ≤ p − j < T``): ``ū_t = ē_{t+K−1}``, ``p̄ast_i = ē_i``;
* ``w̄_{c,j} = Σ_{b,t} z̄_{t,c} e_{t+j,c}``.

Forward: one program per block of ``BT`` tokens, batch row and head (``D`` channels, so the norm is the program's own
row sum); it loads the ``K`` shifted input tiles and writes ``y`` in the input's dtype, in the input's layout (q, k, v
are views of it, as ``unbind`` gives them). Backward: the first kernel recomputes ``z`` and writes ``z̄`` (fp32) and each
program's share of ``w̄``; the second sums ``ē`` from ``z̄`` (its ``K − 1`` rows past a block are another block's).
Everything in fp32 in registers, as inductor's fused kernels do (eager PyTorch rounds after each op in 16-bit dtypes).

Why: under ``torch.compile`` the input path is a few fused kernels, but calling the compiled function cost the host ~0.5
ms of the ~2 ms it spends before the fused memory's walk can start, time the GPU sits idle in a step (H200, thirty-second
session, ``scripts/profile_titans_layer.py --timeline``); these kernels launch through the launch cache. Opt-in
(``MNEMO_MEMORY_INPUT_KERNEL=1``; :meth:`~mnemotorch.layers.titans.TitansLMM.forward`) until measured on a GPU.
Tests: ``tests/ops/test_conv_triton.py`` (against the PyTorch form, through Triton's interpreter on the CPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .eager import direct
from .triton_launch import launcher

#: ``F.normalize``'s default ε.
EPS = 1e-12
#: tokens a program (a power of two)
BLOCK_T = 32


@triton.jit
def _shifted(X, PAST, b, rows, cols, j, T, sxb, sxt, spb, spt, K: tl.constexpr):
    """``e_{t+j}`` for the tile's rows ``t`` (fp32): input row ``t + j − (K − 1)``, from ``PAST`` where that is < 0."""
    src = rows + j - (K - 1)
    inside = rows < T
    xv = tl.load(X + b * sxb + src[:, None] * sxt + cols[None, :], mask=((src >= 0) & inside)[:, None], other=0.0)
    pv = tl.load(PAST + b * spb + (src + (K - 1))[:, None] * spt + cols[None, :], mask=((src < 0) & inside)[:, None], other=0.0)
    return xv.to(tl.float32) + pv.to(tl.float32)


@triton.jit
def _conv_tile(X, PAST, W, b, rows, cols, T, sxb, sxt, spb, spt, K: tl.constexpr, BT: tl.constexpr, D: tl.constexpr):
    """``z_t = Σ_j w_j e_{t+j}`` for the tile's rows and channels (fp32)."""
    z = tl.zeros((BT, D), tl.float32)
    for j in tl.static_range(K):
        z += _shifted(X, PAST, b, rows, cols, j, T, sxb, sxt, spb, spt, K) * tl.load(W + cols * K + j).to(tl.float32)[None, :]
    return z


@triton.jit
def _conv_silu_norm_fwd_kernel(X, PAST, W, Y, T, normed, sxb, sxt, spb, spt, syb, syt, eps,
                               K: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):  # fmt: skip
    pt, b, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pt * BT + tl.arange(0, BT)
    cols = g * D + tl.arange(0, D)
    z = _conv_tile(X, PAST, W, b, rows, cols, T, sxb, sxt, spb, spt, K, BT, D)
    a = z * tl.sigmoid(z)
    if g * D < normed:
        a = a / tl.maximum(tl.sqrt(tl.sum(a * a, 1)), eps)[:, None]
    tl.store(Y + b * syb + rows[:, None] * syt + cols[None, :], a.to(Y.dtype.element_ty), mask=(rows < T)[:, None])


@triton.jit
def _conv_silu_norm_dz_kernel(X, PAST, W, DY, DZ, DWP, T, normed, sxb, sxt, spb, spt, syb, syt, C, eps,
                              K: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):  # fmt: skip
    """``z̄`` (fp32, ``[B, T, C]`` contiguous) and this program's share of ``w̄`` (``DWP [B, n_blocks, K, C]``)."""
    pt, b, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pt * BT + tl.arange(0, BT)
    cols = g * D + tl.arange(0, D)
    inside = (rows < T)[:, None]
    z = _conv_tile(X, PAST, W, b, rows, cols, T, sxb, sxt, spb, spt, K, BT, D)
    s = tl.sigmoid(z)
    a = z * s
    da = tl.load(DY + b * syb + rows[:, None] * syt + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    if g * D < normed:
        n = tl.sqrt(tl.sum(a * a, 1))
        nc = tl.maximum(n, eps)
        y = a / nc[:, None]
        dot = tl.sum(y * da, 1)
        da = tl.where((n > eps)[:, None], (da - y * dot[:, None]) / nc[:, None], da / eps)
    dz = tl.where(inside, da * s * (1.0 + z * (1.0 - s)), 0.0)
    tl.store(DZ + (b * T + rows[:, None]) * C + cols[None, :], dz, mask=inside)
    nb = tl.num_programs(0)
    for j in tl.static_range(K):
        e = _shifted(X, PAST, b, rows, cols, j, T, sxb, sxt, spb, spt, K)
        tl.store(DWP + ((b * nb + pt) * K + j) * C + cols, tl.sum(dz * e, 0))


@triton.jit
def _conv_silu_norm_de_kernel(DZ, W, DX, DPAST, T, C, sdb, sdt, spb, spt,
                              K: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):  # fmt: skip
    """``ē_p = Σ_j w_j z̄_{p−j}`` for ``p < T + K − 1``: rows ``p ≥ K − 1`` to ``DX``, the first ``K − 1`` to ``DPAST``."""
    pt, b, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    p = pt * BT + tl.arange(0, BT)
    cols = g * D + tl.arange(0, D)
    de = tl.zeros((BT, D), tl.float32)
    for j in tl.static_range(K):
        t = p - j
        m = ((t >= 0) & (t < T))[:, None]
        de += tl.load(DZ + (b * T + t[:, None]) * C + cols[None, :], mask=m, other=0.0) * tl.load(W + cols * K + j).to(tl.float32)[None, :]
    tx = p - (K - 1)
    tl.store(DX + b * sdb + tx[:, None] * sdt + cols[None, :], de.to(DX.dtype.element_ty), mask=((tx >= 0) & (tx < T))[:, None])
    tl.store(DPAST + b * spb + p[:, None] * spt + cols[None, :], de.to(DPAST.dtype.element_ty), mask=(p < K - 1)[:, None])


def _check(u: Tensor, weight: Tensor, past: Tensor, head_dim: int, normed: int) -> tuple[int, int, int, int]:
    if u.ndim != 3 or past.ndim != 3 or weight.ndim != 2:
        raise ValueError(f"conv_silu_norm: u [B, T, C], weight [C, K], past [B, K-1, C] expected, got {list(u.shape)}, "
                         f"{list(weight.shape)}, {list(past.shape)}")  # fmt: skip
    b, t, c = u.shape
    k = weight.shape[1]
    if weight.shape[0] != c or tuple(past.shape) != (b, k - 1, c):
        raise ValueError(f"conv_silu_norm: weight must be [{c}, K] and past [{b}, K-1, {c}], got {list(weight.shape)}, {list(past.shape)}")
    if k < 1 or head_dim < 1 or head_dim & (head_dim - 1) or c % head_dim or normed % head_dim or not 0 <= normed <= c:
        raise ValueError(f"conv_silu_norm: needs K >= 1 taps, a power-of-two head_dim dividing C = {c} and normed ({normed}); got K = {k}, "
                         f"head_dim = {head_dim}")  # fmt: skip
    return b, t, c, k


def _contiguous_rows(x: Tensor) -> Tensor:
    """The kernels take any batch and time strides but contiguous channels."""
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("mnemotorch::conv_silu_norm_fwd", mutates_args=())
def conv_silu_norm_fwd(u: Tensor, weight: Tensor, past: Tensor, head_dim: int, normed: int) -> Tensor:
    """``y [B, T, C]`` in ``u``'s dtype (see the module) of ``u [B, T, C]``, ``weight [C, K]``, ``past [B, K−1, C]``; the
    first ``normed`` channels ℓ2-normalised per group of ``head_dim``."""
    b, t, c, k = _check(u, weight, past, head_dim, normed)
    u, past, weight = _contiguous_rows(u), _contiguous_rows(past), weight.contiguous()
    y = torch.empty((b, t, c), device=u.device, dtype=u.dtype)
    if b * t * c:
        launcher(_conv_silu_norm_fwd_kernel)[(triton.cdiv(t, BLOCK_T), b, c // head_dim)](
            u, past, weight, y, t, normed, u.stride(0), u.stride(1), past.stride(0), past.stride(1), y.stride(0), y.stride(1), EPS,
            K=k, D=head_dim, BT=BLOCK_T, num_warps=4,
        )  # fmt: skip
    return y


@conv_silu_norm_fwd.register_fake
def _(u, weight, past, head_dim, normed):
    _check(u, weight, past, head_dim, normed)
    return u.new_empty(u.shape)


@torch.library.custom_op("mnemotorch::conv_silu_norm_bwd", mutates_args=())
def conv_silu_norm_bwd(u: Tensor, weight: Tensor, past: Tensor, dy: Tensor, head_dim: int, normed: int) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients ``(ū [B, T, C], w̄ [C, K], p̄ast [B, K−1, C])`` of :func:`conv_silu_norm_fwd` for ``dy [B, T, C]``, each in
    its input's dtype."""
    b, t, c, k = _check(u, weight, past, head_dim, normed)
    u, past, weight, dy = _contiguous_rows(u), _contiguous_rows(past), weight.contiguous(), _contiguous_rows(dy)
    du, dpast = torch.empty_like(u), torch.empty_like(past)
    nb = triton.cdiv(t, BLOCK_T)
    if not b * t * c:
        return du, torch.zeros_like(weight), torch.zeros_like(past)
    dz = torch.empty((b, t, c), device=u.device, dtype=torch.float32)
    dwp = torch.empty((b, nb, k, c), device=u.device, dtype=torch.float32)
    launcher(_conv_silu_norm_dz_kernel)[(nb, b, c // head_dim)](
        u, past, weight, dy, dz, dwp, t, normed, u.stride(0), u.stride(1), past.stride(0), past.stride(1), dy.stride(0), dy.stride(1), c, EPS,
        K=k, D=head_dim, BT=BLOCK_T, num_warps=4,
    )  # fmt: skip
    launcher(_conv_silu_norm_de_kernel)[(triton.cdiv(t + k - 1, BLOCK_T), b, c // head_dim)](
        dz, weight, du, dpast, t, c, du.stride(0), du.stride(1), dpast.stride(0), dpast.stride(1), K=k, D=head_dim, BT=BLOCK_T, num_warps=4,
    )  # fmt: skip
    dw = dwp.sum((0, 1)).transpose(0, 1).to(weight.dtype).contiguous()  # [K, C] -> [C, K]
    return du, dw, dpast


@conv_silu_norm_bwd.register_fake
def _(u, weight, past, dy, head_dim, normed):
    _check(u, weight, past, head_dim, normed)
    return u.new_empty(u.shape), weight.new_empty(weight.shape), past.new_empty(past.shape)


def _setup_context(ctx, inputs, output) -> None:
    u, weight, past, head_dim, normed = inputs
    ctx.save_for_backward(u, weight, past)
    ctx.head_dim, ctx.normed = head_dim, normed


def _backward(ctx, dy):
    u, weight, past = ctx.saved_tensors
    du, dw, dpast = _bwd(u, weight, past, dy, ctx.head_dim, ctx.normed)
    return du, dw, dpast, None, None


conv_silu_norm_fwd.register_autograd(_backward, setup_context=_setup_context)
# eager calls without the dispatcher's round trip (ops/eager.py); with autograd, through the same three functions
_fwd = direct(conv_silu_norm_fwd, _setup_context, _backward)
_bwd = direct(conv_silu_norm_bwd)


def conv_silu_qkv_triton(qkv: Tensor, weight: Tensor, past: Tensor | None, num_heads: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`~mnemotorch.layers.short_conv.conv_silu_qkv` (with a conv) by the kernels: ``qkv [B, T, 3·H·D]``, taps
    ``weight [3·H·D, K]``, window ``past [B, K−1, 3·H·D]`` (None: zeros) -> ``q, k, v [B, T, H, D]`` (views of one
    buffer), the new window."""
    b, t, ch = qkv.shape
    k = weight.shape[-1]
    if past is None:
        past = qkv.new_zeros(b, k - 1, ch)
    past = past.to(qkv.dtype)
    y = _fwd(qkv, weight, past, head_dim, 2 * num_heads * head_dim)
    q, kk, v = y.view(b, t, 3, num_heads, head_dim).unbind(2)
    window = qkv[:, t - (k - 1) :] if t >= k - 1 else torch.cat([past, qkv], 1)[:, t:]
    return q, kk, v, window.clone()


__all__ = ["BLOCK_T", "EPS", "conv_silu_norm_bwd", "conv_silu_norm_fwd", "conv_silu_qkv_triton"]
