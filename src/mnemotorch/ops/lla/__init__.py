"""Local Linear Attention: ``local_linear_attention(q, k, v, ridge=1.0)``.

Each query's output is the intercept of a kernel-weighted ridge regression of the past values on
the past keys centred at the query (Zuo et al., 2025, arXiv:2510.01450). Two solvers of the
per-query ``D × D`` systems:

* ``solver="solve"`` -- :func:`lla_reference`: the closed form with ``torch.linalg.solve``
  (exact; Θ(Tq·D²) memory for the ``Σ_i``). The specification.
* ``solver="cg"`` -- :func:`lla_cg`: the blockwise, matrix-free conjugate-gradient algorithm of
  FlashLLA in plain PyTorch (O(T·D) memory besides one ``[Tq, block_size]`` tile; a fixed
  number of iterations, differentiable by unrolling).

Only ``backend="reference"`` (= ``"auto"``) exists: the Triton kernel of the CG path is a later step,
and ``backend="triton"`` raises ``NotImplementedError`` until then.
"""

from __future__ import annotations

from torch import Tensor

from ..checks import check_backend
from .cg import DEFAULT_BLOCK_SIZE, DEFAULT_CG_ITERS, conjugate_gradient, lla_cg_heads
from .reference import (
    DEFAULT_RIDGE,
    SOLVERS,
    check_lla_qkv,
    check_ridge,
    check_scale,
    compute_dtype,
    lla_closed_form,
    lla_reference,
    lla_weights,
    to_heads_first,
)


def check_positive_int(fn: str, name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{fn}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def lla_cg(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ridge: float = DEFAULT_RIDGE,
    scale: float | None = None,
    cg_iters: int = DEFAULT_CG_ITERS,
    block_size: int = DEFAULT_BLOCK_SIZE,
    precondition: bool = False,
) -> Tensor:
    """Causal LLA by blockwise matrix-free conjugate gradient (see ``cg.py``).

    Args:
        q: ``[B, Tq, H, D]``; k: ``[B, Tk, Hkv, D]``; v: ``[B, Tk, Hkv, Dv]`` (as :func:`lla_reference`).
        ridge: λ > 0. scale: τ (default ``D ** -0.5``).
        cg_iters: fixed number of CG iterations (>= 1).
        block_size: key-tile length of the streamed passes.
        precondition: Jacobi-precondition the CG.

    Returns:
        ``[B, Tq, H, Dv]`` in the dtype of ``q`` (computed in float32 for half inputs).
    """
    fn = "lla_cg"
    check_lla_qkv(fn, q, k, v)
    ridge = check_ridge(fn, ridge)
    tau = check_scale(fn, scale, q.shape[-1])
    check_positive_int(fn, "cg_iters", cg_iters)
    check_positive_int(fn, "block_size", block_size)
    if not isinstance(precondition, bool):
        raise TypeError(f"{fn}: precondition must be a bool, got {precondition!r}")
    qh, kh, vh = to_heads_first(q, k, v)
    out = lla_cg_heads(qh, kh, vh, ridge, tau, cg_iters, block_size, precondition)
    return out.transpose(1, 2).to(q.dtype)


def local_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ridge: float = DEFAULT_RIDGE,
    scale: float | None = None,
    solver: str = "solve",
    cg_iters: int = DEFAULT_CG_ITERS,
    block_size: int = DEFAULT_BLOCK_SIZE,
    precondition: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Causal Local Linear Attention of the last ``Tq`` positions over ``Tk`` keys.

    ``o_i = b̂_i`` where ``(b̂_i, Ŵ_i) = argmin Σ_{j≤i} w_ij ‖v_j − b − W(k_j − q_i)‖² + λ ω_i ‖W‖²``,
    ``w_ij = exp(τ q_iᵀk_j)``, ``ω_i = Σ_j w_ij``. λ → ∞ is softmax attention with temperature τ.

    Args:
        q: ``[B, Tq, H, D]`` queries; query ``i`` sits at absolute key position ``Tk − Tq + i``.
        k: ``[B, Tk, Hkv, D]`` keys (``H % Hkv == 0``: grouped-query).
        v: ``[B, Tk, Hkv, Dv]`` values.
        ridge: λ > 0, the ridge penalty relative to the total weight (dimensionless).
        scale: τ > 0, the kernel temperature; default ``D ** -0.5``.
        solver: ``"solve"`` (closed form, ``torch.linalg.solve``) or ``"cg"`` (blockwise conjugate gradient).
        cg_iters, block_size, precondition: knobs of ``solver="cg"`` (ignored by ``"solve"``).
        backend: ``"auto"`` or ``"reference"`` (both plain PyTorch for now).

    Returns:
        ``[B, Tq, H, Dv]`` in the dtype of ``q``.
    """
    fn = "local_linear_attention"
    check_backend(fn, backend)
    if backend in ("triton", "torch"):
        raise NotImplementedError(f"{fn}: backend {backend!r} is not implemented yet; use 'auto' or 'reference'")
    if solver not in SOLVERS:
        raise ValueError(f"{fn}: solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "solve":
        return lla_reference(q, k, v, ridge, scale)
    return lla_cg(q, k, v, ridge, scale, cg_iters, block_size, precondition)


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_CG_ITERS",
    "DEFAULT_RIDGE",
    "SOLVERS",
    "compute_dtype",
    "conjugate_gradient",
    "lla_cg",
    "lla_cg_heads",
    "lla_closed_form",
    "lla_reference",
    "lla_weights",
    "local_linear_attention",
]
