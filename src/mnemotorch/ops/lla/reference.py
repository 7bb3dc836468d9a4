"""Local Linear Attention (LLA), written plainly: the specification of ``mnemotorch.ops.lla``.

Zuo, Yin, Zeng, Li, Zhu, Wang, "Local Linear Attention: An Optimal Interpolation of Linear and
Softmax Attention for Test-Time Regression" (arXiv:2510.01450, ICLR 2026).

Softmax attention is the Nadaraya-Watson (local *constant*) estimate of a regression function
``f(q) ≈ v`` from the pairs ``(k_j, v_j)`` seen so far. LLA fits a local *linear* model around each
query instead. For query ``i`` with kernel weights ``w_ij = exp(τ q_iᵀk_j)`` over the causal keys
``j ≤ i`` it solves the weighted ridge regression::

    min_{b, W}  Σ_j w_ij ‖v_j − b − W (k_j − q_i)‖²  +  λ ω_i ‖W‖²_F,        ω_i = Σ_j w_ij

and outputs the intercept ``o_i = b̂_i`` (the fitted value at ``k = q_i``). Its closed form::

    μ_i = Σ_j w_ij (k_j − q_i)                                  [D]
    Σ_i = Σ_j w_ij (k_j − q_i)(k_j − q_i)ᵀ + λ ω_i I           [D, D]   (symmetric positive definite)
    ρ_i = Σ_i⁻¹ μ_i,     δ_i = ω_i − μ_iᵀ ρ_i  (> 0: a Schur complement of a positive-definite matrix)
    o_i = Σ_j  w_ij (1 − ρ_iᵀ (k_j − q_i)) / δ_i  · v_j

**The ridge is λ ω_i, not λ.** The spec's closed form (and the authors' code) add ``λ ω_i I`` to
``Σ_i``: the penalty is relative to the total weight, i.e. the regression uses the normalised
weights ``s_ij = w_ij / ω_i`` with ridge ``λ``. That makes λ dimensionless and makes the intercept
invariant to a common scale ``w_ij -> c · w_ij`` of a query's weights (``ω, μ, Σ`` all scale by
``c``, so ``ρ`` is unchanged, ``δ`` scales by ``c`` and cancels in ``o``). Two consequences:

* the weights can be stabilised exactly like softmax by subtracting the row maximum of the logits,
  ``w_ij = exp(τ q_iᵀk_j − m_i)`` — the output does not change, and the test suite checks that;
* the maximum ``m_i`` carries no gradient (``∂o/∂m = 0``), so it is computed without autograd.

With an unscaled penalty ``λ ‖W‖²`` neither holds: multiplying the weights by ``c`` would act as
``λ / c`` and row-max stabilisation would change the result.

**λ → ∞** forces ``W -> 0`` and leaves the local-constant fit: ``ρ -> 0``, ``δ -> ω`` and
``o_i -> Σ_j w_ij v_j / ω_i``, softmax attention with temperature τ. **λ -> 0** (with more keys than
dimensions) is the unregularised local linear fit.

This file computes ``Σ_i`` from matrix products (``Σ_j w_ij k_j k_jᵀ − μ̃_i q_iᵀ − q_i μ̃_iᵀ + ω_i q_i q_iᵀ``
with ``μ̃_i = Σ_j w_ij k_j``), which never builds the ``[Tq, Tk, D]`` tensor of differences, and
solves the ``D × D`` systems with ``torch.linalg.solve``. Cost: Θ(Tq·Tk·D²) time and Θ(Tq·D²)
memory for the ``Σ_i``. ``cg.py`` holds the matrix-free, blockwise form that never forms them.

Precision: half-precision inputs are computed in float32; float32 / float64 inputs in their own
dtype. The output has the dtype of ``q``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..checks import check_qkv

DEFAULT_RIDGE = 1.0
SOLVERS = ("solve", "cg")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs (``linalg.solve`` has no bf16/fp16), else the input dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_ridge(fn: str, ridge: object) -> float:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge <= 0:
        raise ValueError(
            f"{fn}: ridge (λ, the ridge penalty of the local linear fit) must be a finite float > 0, got {ridge!r}; "
            "λ → ∞ is softmax attention, use causal_attention for that limit"
        )
    return float(ridge)


def check_scale(fn: str, scale: object, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{fn}: scale (τ, the kernel temperature) must be a finite float > 0 or None (= head_dim ** -0.5), got {scale!r}")
    return float(scale)


def check_lla_qkv(fn: str, q: Tensor, k: Tensor, v: Tensor) -> None:
    check_qkv(fn, q, k, v)
    if v.shape[-1] < 1 or q.shape[-1] < 1:
        raise ValueError(f"{fn}: head dims must be >= 1, got q {list(q.shape)}, v {list(v.shape)}")


def to_heads_first(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``[B, T, H, D]`` -> ``[B, H, T, D]`` in the compute dtype, key/value heads repeated for GQA."""
    h, hkv = q.shape[2], k.shape[2]
    if h != hkv:
        k = k.repeat_interleave(h // hkv, dim=2)
        v = v.repeat_interleave(h // hkv, dim=2)
    dt = compute_dtype(q.dtype)
    return tuple(t.transpose(1, 2).to(dt) for t in (q, k, v))  # type: ignore[return-value]


def causal_mask(tq: int, tk: int, device: torch.device) -> Tensor:
    """``[Tq, Tk]`` bool, True where key ``j`` is visible to query ``i`` (at absolute position ``Tk − Tq + i``)."""
    qpos = torch.arange(tq, device=device)[:, None] + (tk - tq)
    return torch.arange(tk, device=device)[None, :] <= qpos


def lla_weights(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Row-max-stabilised causal kernel weights ``w_ij = exp(τ q_iᵀk_j − m_i)``, zero for future keys.

    ``q [B, H, Tq, D]``, ``k [B, H, Tk, D]`` -> ``[B, H, Tq, Tk]``. ``m_i`` is detached: the LLA
    output is invariant to it (see the module docstring).
    """
    logits = scale * (q @ k.transpose(-1, -2))
    mask = causal_mask(q.shape[-2], k.shape[-2], q.device)
    logits = logits.masked_fill(~mask, float("-inf"))
    m = logits.detach().amax(dim=-1, keepdim=True)
    return torch.exp(logits - m)


def lla_closed_form(w: Tensor, q: Tensor, k: Tensor, v: Tensor, ridge: float) -> Tensor:
    """The LLA intercept for explicit non-negative weights ``w [.., Tq, Tk]`` (any positive row scale).

    ``q [.., Tq, D]``, ``k [.., Tk, D]``, ``v [.., Tk, Dv]`` -> ``o [.., Tq, Dv]``, by the closed form of
    the module docstring with ``torch.linalg.solve``.
    """
    d = q.shape[-1]
    omega = w.sum(-1, keepdim=True)  # [.., Tq, 1]
    mu_tilde = w @ k  # Σ_j w_ij k_j
    mu = mu_tilde - omega * q  # Σ_j w_ij (k_j − q_i)
    kk = (k.unsqueeze(-1) * k.unsqueeze(-2)).flatten(-2)  # [.., Tk, D²]
    second = (w @ kk).unflatten(-1, (d, d))  # Σ_j w_ij k_j k_jᵀ
    outer = mu_tilde.unsqueeze(-1) * q.unsqueeze(-2)  # μ̃_i q_iᵀ
    qq = q.unsqueeze(-1) * q.unsqueeze(-2)
    eye = torch.eye(d, dtype=q.dtype, device=q.device)
    sigma = second - outer - outer.transpose(-1, -2) + omega.unsqueeze(-1) * (qq + ridge * eye)
    rho = torch.linalg.solve(sigma, mu.unsqueeze(-1)).squeeze(-1)  # [.., Tq, D]
    delta = omega - (mu * rho).sum(-1, keepdim=True)  # [.., Tq, 1]
    # 1 − ρ_iᵀ(k_j − q_i) = 1 + ρ_iᵀq_i − ρ_iᵀk_j
    coeff = w * (1.0 + (rho * q).sum(-1, keepdim=True) - rho @ k.transpose(-1, -2))
    return (coeff @ v) / delta


def lla_reference(q: Tensor, k: Tensor, v: Tensor, ridge: float = DEFAULT_RIDGE, scale: float | None = None) -> Tensor:
    """Causal Local Linear Attention through the closed form and ``torch.linalg.solve``.

    Args:
        q: ``[B, Tq, H, D]`` queries; query ``i`` sits at absolute key position ``Tk − Tq + i``.
        k: ``[B, Tk, Hkv, D]`` keys (``H % Hkv == 0``).
        v: ``[B, Tk, Hkv, Dv]`` values.
        ridge: λ > 0, the ridge penalty relative to the total weight ``ω_i``.
        scale: τ, the kernel temperature (default ``D ** -0.5``, as softmax attention).

    Returns:
        ``[B, Tq, H, Dv]`` in the dtype of ``q``.
    """
    fn = "lla_reference"
    check_lla_qkv(fn, q, k, v)
    ridge = check_ridge(fn, ridge)
    tau = check_scale(fn, scale, q.shape[-1])
    qh, kh, vh = to_heads_first(q, k, v)
    out = lla_closed_form(lla_weights(qh, kh, tau), qh, kh, vh, ridge)
    return out.transpose(1, 2).to(q.dtype)
