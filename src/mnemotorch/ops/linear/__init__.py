"""Causal linear attention and Hebbian / delta-rule memory: ``linear_attention``, ``hebbian_memory``.

Only the reference backend exists so far (pure PyTorch, float64-ready); the Triton chunked kernels
arrive later and will be selected by ``backend="auto"`` on CUDA. See ``reference.py`` for the
equations and ``docs/mixers/linear_attention.md`` / ``docs/mixers/hebbian.md`` for the semantics.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from ..checks import check_backend
from .reference import (
    DEFAULT_EPS,
    FEATURE_MAPS,
    RULES,
    accumulation_dtype,
    check_eps,
    check_hebbian_args,
    check_linear_qkv,
    elu_plus_one,
    feature_dim,
    feature_map,
    hebbian_memory_reference,
    identity,
    linear_attention_chunked,
    linear_attention_parallel,
    linear_attention_recurrent,
    relu,
    taylor,
)

MODES = ("chunked", "parallel", "recurrent")


def _check_reference_only(fn: str, backend: str) -> None:
    check_backend(fn, backend)
    if backend in ("triton", "torch"):
        raise NotImplementedError(f"{fn}: backend {backend!r} is not implemented yet; use 'auto' or 'reference'")


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    feature: str | Callable[[Tensor], Tensor] = "elu_plus_one",
    normalize: bool = True,
    initial_state: tuple[Tensor, Tensor] | None = None,
    mode: str = "chunked",
    chunk_size: int = 64,
    eps: float = DEFAULT_EPS,
    backend: str = "auto",
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Causal linear attention ``y_t = φ(q_t)ᵀ S_t / (φ(q_t)ᵀ z_t + ε)`` with its carried state.

    Args:
        q: ``[B, T, H, Dk]`` queries (before the feature map).
        k: ``[B, T, H, Dk]`` keys (before the feature map).
        v: ``[B, T, H, Dv]`` values.
        feature: φ, a name in ``identity``, ``elu_plus_one``, ``relu``, ``taylor`` or a callable
            ``[..., Dk] -> [..., Dφ]``. Normalisation needs a positive φ (``elu_plus_one``, ``taylor``).
        normalize: divide by ``φ(q_t)ᵀ z_t + ε``; ``False`` gives ``y_t = φ(q_t)ᵀ S_t``.
        initial_state: ``(S0 [B, H, Dφ, Dv], z0 [B, H, Dφ])`` from a previous call, or ``None``.
        mode: ``"chunked"`` (training), ``"parallel"`` (quadratic) or ``"recurrent"`` (token loop).
        chunk_size: tokens per chunk in ``"chunked"`` mode (any ``T``; the last chunk may be partial).
        eps: ε of the denominator (default 1e-6; sums accumulate in float32 or higher).
        backend: ``"auto"`` or ``"reference"``.

    Returns:
        ``(y [B, T, H, Dv], (S_T [B, H, Dφ, Dv], z_T [B, H, Dφ]))``; ``y`` has the dtype of ``q``,
        the state the accumulation dtype (float32 for half inputs).
    """
    fn = "linear_attention"
    check_linear_qkv(fn, q, k, v)
    _check_reference_only(fn, backend)
    if mode not in MODES:
        raise ValueError(f"{fn}: mode must be one of {MODES}, got {mode!r}")
    if not isinstance(normalize, bool):
        raise TypeError(f"{fn}: normalize must be a bool, got {normalize!r}")
    check_eps(fn, eps)
    phi = feature if callable(feature) else feature_map(feature)
    fq, fk = phi(q), phi(k)
    if mode == "chunked":
        return linear_attention_chunked(fq, fk, v, initial_state, normalize, eps, chunk_size=chunk_size)
    if mode == "parallel":
        return linear_attention_parallel(fq, fk, v, initial_state, normalize, eps)
    return linear_attention_recurrent(fq, fk, v, initial_state, normalize, eps)


def hebbian_memory(
    k: Tensor,
    v: Tensor,
    q: Tensor,
    rule: str = "hebb",
    lr: float | Tensor = 1.0,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Matrix associative memory ``M [Dv, Dk]`` written with ``(k_t, v_t)`` and read ``y_t = M_t q_t``.

    Args:
        k: ``[B, T, H, Dk]`` keys; v: ``[B, T, H, Dv]`` values; q: ``[B, T, H, Dk]`` queries.
        rule: ``"hebb"``: ``M_t = M_{t-1} + η v_t k_tᵀ``;
              ``"delta"``: ``M_t = M_{t-1} - η (M_{t-1} k_t - v_t) k_tᵀ``.
        lr: η, a float > 0 or a per-token tensor ``[B, T, H]``. The delta rule is stable when
            ``η ‖k_t‖² ≤ 2``: ℓ2-normalise keys and keep η ≤ 1 to never overshoot.
        initial_state: ``M0 [B, H, Dv, Dk]`` or ``None``.
        chunk_size: chunk length of the Hebb path (Hebb is unnormalised linear attention with
            φ = identity and values scaled by η, so it runs in the chunked form).
        backend: ``"auto"`` or ``"reference"``.

    Returns:
        ``(y [B, T, H, Dv], M_T [B, H, Dv, Dk])``.

    The delta rule runs as the token loop of :func:`hebbian_memory_reference` for now (its chunked
    WY form is the fast path of a later issue).
    """
    fn = "hebbian_memory"
    check_hebbian_args(fn, k, v, q, rule, lr, initial_state)
    _check_reference_only(fn, backend)
    if rule == "delta":
        return hebbian_memory_reference(k, v, q, rule, lr, initial_state)
    scaled = v * (lr.to(device=v.device, dtype=v.dtype).unsqueeze(-1) if isinstance(lr, Tensor) else float(lr))
    state = None
    if initial_state is not None:
        # Linear attention keeps S = Mᵀ [Dk, Dv]; z (the unused normaliser) starts at zero.
        m0 = initial_state.to(accumulation_dtype(q.dtype))
        state = (m0.transpose(-1, -2), m0.new_zeros(m0.shape[:2] + m0.shape[-1:]))
    y, (s, _) = linear_attention_chunked(q, k, scaled, state, normalize=False, chunk_size=chunk_size)
    return y, s.transpose(-1, -2).contiguous()


__all__ = [
    "DEFAULT_EPS",
    "FEATURE_MAPS",
    "MODES",
    "RULES",
    "accumulation_dtype",
    "elu_plus_one",
    "feature_dim",
    "feature_map",
    "hebbian_memory",
    "hebbian_memory_reference",
    "identity",
    "linear_attention",
    "linear_attention_chunked",
    "linear_attention_parallel",
    "linear_attention_recurrent",
    "relu",
    "taylor",
]
