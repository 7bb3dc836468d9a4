"""Local Linear Attention: ``local_linear_attention(q, k, v, ridge=1.0)``.

Each query's output is the intercept of a kernel-weighted ridge regression of the past values on
the past keys centred at the query (Zuo et al., 2025, arXiv:2510.01450). Two solvers of the
per-query ``D × D`` systems:

* ``solver="solve"`` -- :func:`lla_reference`: the closed form with ``torch.linalg.solve``
  (exact; Θ(Tq·D²) memory for the ``Σ_i``). The specification.
* ``solver="cg"`` -- :func:`lla_cg`: the blockwise, matrix-free conjugate-gradient algorithm of
  FlashLLA in plain PyTorch (O(T·D) memory besides one ``[Tq, block_size]`` tile; a fixed
  number of iterations, differentiable by unrolling), or its Triton kernels
  (``triton.py``: :func:`lla_cg_triton`, forward and an implicit-differentiation backward, O(T·D)
  memory in both).

Backends: ``"reference"`` runs the plain-PyTorch solvers; ``"triton"`` runs the kernels (``solver="cg"``
only; float16/bfloat16/float32, head dims ≤ 128); ``"auto"`` picks the kernels for ``solver="cg"``
on CUDA tensors they support (falling back to the plain path with a one-time warning otherwise).
``MNEMO_LLA_KERNELS=0`` keeps ``"auto"`` and the ``lla`` mixer on the plain-PyTorch path.
"""

from __future__ import annotations

import os
import warnings

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


def kernels_enabled() -> bool:
    """Whether ``backend="auto"`` (and the ``lla`` mixer on CUDA) may use the Triton kernels: yes
    unless ``MNEMO_LLA_KERNELS=0`` (a switch for comparing against the plain-PyTorch path)."""
    return os.environ.get("MNEMO_LLA_KERNELS", "1") != "0"


def _on_cuda(q: Tensor) -> bool:
    return q.device.type == "cuda"


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


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
        cg_iters, block_size, precondition: knobs of ``solver="cg"`` (ignored by ``"solve"``;
            ``block_size`` is the plain path's key tile -- the kernels choose their own tiles,
            which changes only the order of floating-point sums).
        backend: ``"auto"`` (the Triton kernels for ``solver="cg"`` on CUDA tensors they support,
            else plain PyTorch), ``"reference"`` (plain PyTorch) or ``"triton"`` (the kernels:
            ``solver="cg"``, float16/bfloat16/float32, ``D, Dv ≤ 128``; on the CPU only under
            ``TRITON_INTERPRET=1``).

    Returns:
        ``[B, Tq, H, Dv]`` in the dtype of ``q``.
    """
    fn = "local_linear_attention"
    check_backend(fn, backend)
    if backend == "torch":
        raise NotImplementedError(f"{fn}: backend 'torch' is not implemented; use 'auto', 'reference' or 'triton'")
    if solver not in SOLVERS:
        raise ValueError(f"{fn}: solver must be one of {SOLVERS}, got {solver!r}")
    if backend == "triton" and solver != "cg":
        raise ValueError(f"{fn}: backend 'triton' runs solver='cg' (the kernels are the blockwise conjugate gradient), got solver={solver!r}")
    if solver == "solve":
        return lla_reference(q, k, v, ridge, scale)
    check_lla_qkv(fn, q, k, v)
    if backend == "triton" or (backend == "auto" and kernels_enabled() and _on_cuda(q)):
        check_ridge(fn, ridge)
        check_scale(fn, scale, q.shape[-1])
        check_positive_int(fn, "cg_iters", cg_iters)
        check_positive_int(fn, "block_size", block_size)
        from .triton import KERNEL_DTYPES, kernel_support, lla_cg_triton

        reason = kernel_support(fn, q, k, v)
        if reason is None:
            return lla_cg_triton(q, k, v, ridge, scale, cg_iters, precondition)
        if backend == "triton":
            raise (NotImplementedError if q.dtype not in KERNEL_DTYPES else ValueError)(reason)
        _warn_once(f"{reason}; running the plain-PyTorch CG path instead (this warning is shown once)")
    return lla_cg(q, k, v, ridge, scale, cg_iters, block_size, precondition)


def __getattr__(name: str):
    # The Triton entry point loads on first use, so importing the package does not import triton.
    if name in ("lla_cg_triton", "kernel_support"):
        from . import triton as _kernels

        return getattr(_kernels, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_CG_ITERS",
    "DEFAULT_RIDGE",
    "SOLVERS",
    "compute_dtype",
    "conjugate_gradient",
    "lla_cg",
    "lla_cg_heads",
    "lla_cg_triton",
    "kernels_enabled",
    "lla_closed_form",
    "lla_reference",
    "lla_weights",
    "local_linear_attention",
]
