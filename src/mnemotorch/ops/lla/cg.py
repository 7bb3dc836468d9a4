"""Local Linear Attention by matrix-free conjugate gradient, blockwise over key tiles.

This is the FlashLLA algorithm (Zuo et al., 2025, §4) written in plain PyTorch: the specification
that a fused kernel follows, and a path whose memory is O(T·D + T·B) instead of the reference's
O(T·D²) for the ``Σ_i``. For queries ``[.., Tq, D]`` and keys cut into tiles of ``B`` = ``block_size``:

1. **statistics** (one online-softmax sweep over the key tiles): the running row maximum ``m_i`` of
   the logits ``τ q_iᵀk_j``, and, rescaled whenever ``m_i`` grows, ``ω_i = Σ_j w_ij`` and
   ``μ̃_i = Σ_j w_ij k_j`` (so ``μ_i = μ̃_i − ω_i q_i``), with ``w_ij = exp(τ q_iᵀk_j − m_i)``.
2. **solve** ``Σ_i ρ_i = μ_i`` for every query at once by ``cg_iters`` conjugate-gradient steps.
   ``Σ_i`` is never formed: each product ``Σ_i p_i`` streams the key tiles again, recomputing the
   weights from the final ``m_i``::

       Σ_i p = Σ_j w_ij (k_jᵀp) k_j − (q_iᵀp) μ̃_i − (μ̃_iᵀp) q_i + ω_i (q_iᵀp) q_i + λ ω_i p

   (the expansion of ``Σ_j w_ij (k_j − q_i)(k_j − q_i)ᵀ p + λ ω_i p``; one ``[Tq, B]`` tile of weights
   at a time, two matrix products per tile, like an attention pass).
3. **output** (a last sweep): ``δ_i = ω_i − μ_iᵀρ_i`` and
   ``o_i = Σ_j w_ij (1 + ρ_iᵀq_i − ρ_iᵀk_j) v_j / δ_i``.

Cost ≈ (2 + I) attention passes for I iterations. The iteration count is fixed (no data-dependent
early exit), so the function is differentiable by unrolling: autograd records every step. CG on a
``D × D`` symmetric positive-definite system is exact after ``D`` steps in exact arithmetic; in
practice the ridge bounds the condition number of ``Σ_i / ω_i`` by ``1 + λ_max(Cov_i)/λ`` and far fewer
steps are needed (see docs/mixers/lla.md for error against iterations). A step whose residual has
already vanished is frozen (step length 0) rather than dividing 0 by 0.

``precondition=True`` uses the Jacobi (diagonal) preconditioner ``diag(Σ_i)``, accumulated in the
statistics sweep (``Σ_j w_ij k_j⊙k_j``) at no extra pass.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_CG_ITERS = 32
DEFAULT_BLOCK_SIZE = 64


def _safe_div(num: Tensor, den: Tensor, floor: Tensor | float = 0.0) -> Tensor:
    """``num / den`` where ``den > floor``, else 0 -- without NaN in either branch (gradients included).

    A converged system has ``den`` near the underflow range; dividing by it there overflows the
    backward (d/dden = -num/den^2), so steps below ``floor`` are frozen instead."""
    ok = den > floor
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    iters: int,
    precond: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Batched (preconditioned) conjugate gradient with a fixed number of steps, from ``x0 = 0``.

    Args:
        matvec: ``p [.., D] -> A p [.., D]`` for a batch of symmetric positive-definite ``A``.
        b: right-hand sides ``[.., D]``.
        iters: number of steps (>= 0); every step is recorded by autograd.
        precond: ``r -> M⁻¹ r`` for a symmetric positive-definite preconditioner ``M``, or ``None``.

    Returns:
        ``x [.., D]`` ≈ ``A⁻¹ b``.
    """
    x = torch.zeros_like(b)
    r = b
    z = precond(r) if precond is not None else r
    p = z
    rz = (r * z).sum(-1, keepdim=True)
    # Freeze a system once its residual is at rounding level relative to where it started.
    floor = rz.detach() * torch.finfo(b.dtype).eps ** 2
    for _ in range(iters):
        ap = matvec(p)
        alpha = _safe_div(rz, (p * ap).sum(-1, keepdim=True), floor)
        x = x + alpha * p
        r = r - alpha * ap
        z = precond(r) if precond is not None else r
        rz_new = (r * z).sum(-1, keepdim=True)
        p = z + _safe_div(rz_new, rz, floor) * p
        rz = rz_new
    return x


def _tiles(tq: int, tk: int, block_size: int) -> list[tuple[int, int, int]]:
    """``(first key, end key, first query row that sees the tile)`` for each key tile."""
    offset = tk - tq  # query row i sits at absolute position offset + i
    return [(c0, min(c0 + block_size, tk), max(c0 - offset, 0)) for c0 in range(0, tk, block_size)]


def _tile_logits(q: Tensor, kt: Tensor, c0: int, lo: int, offset: int, scale: float) -> Tensor:
    """Logits ``[.., Tq - lo, Bk]`` of query rows ``lo:`` against one key tile, future keys at -inf."""
    s = scale * (q[..., lo:, :] @ kt.transpose(-1, -2))
    qpos = torch.arange(lo, q.shape[-2], device=q.device)[:, None] + offset
    kpos = torch.arange(c0, c0 + kt.shape[-2], device=q.device)[None, :]
    return s.masked_fill(kpos > qpos, float("-inf"))


def _rows(x: Tensor, lo: int) -> Tensor:
    """Put a contribution for rows ``lo:`` back on all ``Tq`` rows (zeros above)."""
    return F.pad(x, (0, 0, lo, 0)) if lo else x


def lla_cg_heads(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ridge: float,
    scale: float,
    cg_iters: int = DEFAULT_CG_ITERS,
    block_size: int = DEFAULT_BLOCK_SIZE,
    precondition: bool = False,
) -> Tensor:
    """The blockwise CG algorithm on heads-first tensors ``q [.., Tq, D]``, ``k [.., Tk, D]``, ``v [.., Tk, Dv]``.

    Arguments are assumed checked (see :func:`mnemotorch.ops.lla.local_linear_attention`).
    Returns ``o [.., Tq, Dv]``.
    """
    tq, tk = q.shape[-2], k.shape[-2]
    offset = tk - tq
    tiles = _tiles(tq, tk, block_size)
    keys = [(c0, lo, k[..., c0:c1, :], v[..., c0:c1, :]) for c0, c1, lo in tiles]

    # 1. statistics: online softmax over the key tiles. m is detached (the output is invariant to it).
    lead = q.shape[:-1]
    m = q.new_full((*lead, 1), float("-inf"))
    omega = q.new_zeros((*lead, 1))
    mu_tilde = torch.zeros_like(q)
    k2 = torch.zeros_like(q) if precondition else None  # Σ_j w_ij k_j ⊙ k_j, for diag(Σ_i)
    for c0, lo, kt, _ in keys:
        s = _tile_logits(q, kt, c0, lo, offset, scale)
        with torch.no_grad():
            m_old = m[..., lo:, :]
            m_new = torch.maximum(m_old, s.amax(-1, keepdim=True))
            # rows above lo do not see this tile: factor 1; rows never seen before: exp(-inf) = 0 (their sums are 0).
            rescale = torch.cat([torch.ones_like(m[..., :lo, :]), torch.exp(m_old - m_new)], dim=-2)
            m = torch.cat([m[..., :lo, :], m_new], dim=-2)
        e = torch.exp(s - m_new)
        omega = omega * rescale + _rows(e.sum(-1, keepdim=True), lo)
        mu_tilde = mu_tilde * rescale + _rows(e @ kt, lo)
        if k2 is not None:
            k2 = k2 * rescale + _rows(e @ (kt * kt), lo)
    mu = mu_tilde - omega * q

    def weights(c0: int, lo: int, kt: Tensor) -> Tensor:
        return torch.exp(_tile_logits(q, kt, c0, lo, offset, scale) - m[..., lo:, :])

    def sigma_times(p: Tensor) -> Tensor:
        acc = torch.zeros_like(p)
        for c0, lo, kt, _ in keys:
            w = weights(c0, lo, kt)
            acc = acc + _rows((w * (p[..., lo:, :] @ kt.transpose(-1, -2))) @ kt, lo)
        qp = (q * p).sum(-1, keepdim=True)
        return acc - qp * mu_tilde - (mu_tilde * p).sum(-1, keepdim=True) * q + omega * (qp * q + ridge * p)

    precond = None
    if k2 is not None:
        diag = k2 - 2.0 * q * mu_tilde + omega * (q * q + ridge)
        precond = lambda r: r / diag  # noqa: E731

    # 2. solve Σ_i ρ_i = μ_i.
    rho = conjugate_gradient(sigma_times, mu, cg_iters, precond)

    # 3. output.
    delta = omega - (mu * rho).sum(-1, keepdim=True)
    bias = 1.0 + (rho * q).sum(-1, keepdim=True)
    num = torch.zeros(*lead, v.shape[-1], dtype=q.dtype, device=q.device)
    for c0, lo, kt, vt in keys:
        w = weights(c0, lo, kt)
        num = num + _rows((w * (bias[..., lo:, :] - rho[..., lo:, :] @ kt.transpose(-1, -2))) @ vt, lo)
    return num / delta
