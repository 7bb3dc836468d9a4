"""Causal linear attention and Hebbian / delta-rule memory: ``linear_attention``, ``hebbian_memory``.

``linear_attention`` has two backends: the reference (pure PyTorch, float64-ready: ``reference.py``,
the specification) and the Triton kernels (``triton.py``: chunked forward/backward with the feature
map -- BASED's Taylor map included -- computed in the kernel, and a one-token decode step), which
``backend="triton"`` selects; ``backend="auto"`` picks them for chunked calls on CUDA tensors. The
first kernels failed on an H100 (2026-11-25: bf16 relative error 0.55, an illegal memory access
under autotuning); the rewritten ones pass ``scripts/diag_linear.py`` and ``tests/gpu/test_linear_gpu.py``
on an H200 (sm_90, Triton 3.6, 2026-11-26; ``docs/results/linear_attention.md``).
``MNEMO_LINEAR_KERNELS=0`` keeps ``"auto"`` and the mixers on the reference path.
``hebbian_memory`` runs in PyTorch: Hebb in the chunked linear-attention form, the delta rule in
DeltaNet's chunkwise WY form (shared with Miras), both tested against the token loop of ``reference.py``. See ``docs/mixers/linear_attention.md`` / ``docs/mixers/hebbian.md`` for the semantics.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
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



def kernels_enabled() -> bool:
    """Whether ``backend="auto"`` (and the mixers on CUDA) may use the Triton kernels: yes unless
    ``MNEMO_LINEAR_KERNELS=0`` (a switch for comparing against the reference path)."""
    return os.environ.get("MNEMO_LINEAR_KERNELS", "1") != "0"

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
        backend: ``"auto"`` (the Triton kernels for CUDA tensors they support, else the reference),
            ``"reference"`` or ``"triton"`` (kernels only: features by name -- ``taylor`` with
            ``Dk ≤ 16``, the others with ``Dk ≤ 128`` --, ``Dv ≤ 256``, float16/bfloat16/float32;
            modes ``"chunked"`` and ``"recurrent"`` (the decode-step kernel, forward only); the
            kernel's chunk length is ``chunk_size`` if 16/32/64/128, else 64).

    Returns:
        ``(y [B, T, H, Dv], (S_T [B, H, Dφ, Dv], z_T [B, H, Dφ]))``; ``y`` has the dtype of ``q``,
        the state the accumulation dtype (float32 for half inputs).
    """
    fn = "linear_attention"
    check_linear_qkv(fn, q, k, v)
    check_backend(fn, backend)
    if backend == "torch":
        raise NotImplementedError(f"{fn}: backend 'torch' is not implemented; use 'auto', 'reference' or 'triton'")
    if mode not in MODES:
        raise ValueError(f"{fn}: mode must be one of {MODES}, got {mode!r}")
    if not isinstance(normalize, bool):
        raise TypeError(f"{fn}: normalize must be a bool, got {normalize!r}")
    check_eps(fn, eps)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be an int >= 1, got {chunk_size!r}")
    if backend == "triton" or (backend == "auto" and kernels_enabled() and q.device.type == "cuda" and mode != "parallel"):
        from .triton import KERNEL_DTYPES, kernel_support

        reason = kernel_support(fn, q, k, v, feature)
        if reason is None and mode == "recurrent" and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            reason = f"{fn}: the decode-step kernel (mode 'recurrent', backend 'triton') is forward-only; use mode 'chunked' for gradients"
        if reason is None and mode == "parallel":
            reason = f"{fn}: backend 'triton' runs modes 'chunked' and 'recurrent'; mode 'parallel' is reference-only"
        if reason is None:
            return _linear_attention_kernel(q, k, v, feature, normalize, initial_state, mode, chunk_size, eps)
        if backend == "triton":
            raise (NotImplementedError if q.dtype not in KERNEL_DTYPES else ValueError)(reason)
    phi = feature if callable(feature) else feature_map(feature)
    fq, fk = phi(q), phi(k)
    if mode == "chunked":
        return linear_attention_chunked(fq, fk, v, initial_state, normalize, eps, chunk_size=chunk_size)
    if mode == "parallel":
        return linear_attention_parallel(fq, fk, v, initial_state, normalize, eps)
    return linear_attention_recurrent(fq, fk, v, initial_state, normalize, eps)


def _linear_attention_kernel(q, k, v, feature, normalize, initial_state, mode, chunk_size, eps):
    from .triton import linear_attention_step_triton, linear_attention_triton

    if mode == "chunked":
        return linear_attention_triton(q, k, v, feature, normalize, initial_state, eps, chunk_size)
    b, t, h, _ = q.shape
    if initial_state is None:
        fd = feature_dim(feature, q.shape[-1])
        initial_state = (q.new_zeros(b, h, fd, v.shape[-1], dtype=torch.float32), q.new_zeros(b, h, fd, dtype=torch.float32))
    state, ys = initial_state, []
    for i in range(t):  # one decode-step launch per token
        y, state = linear_attention_step_triton(q[:, i], k[:, i], v[:, i], state, feature, normalize, eps)
        ys.append(y)
    return (torch.stack(ys, 1) if ys else v.new_zeros(v.shape)), tuple(state)


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
        chunk_size: tokens per chunk, any ``T`` (the last chunk may be partial). Hebb is
            unnormalised linear attention with φ = identity and values scaled by η, so it runs in
            the chunked form of :func:`linear_attention_chunked`; the delta rule runs in DeltaNet's
            chunkwise WY form (below). ``chunk_size=1`` is the token recurrence.
        backend: ``"auto"`` or ``"reference"``.

    Returns:
        ``(y [B, T, H, Dv], M_T [B, H, Dv, Dk])``; ``y`` in the dtype of ``q``, ``M_T`` in the
        accumulation dtype (float32 for half inputs).

    The delta rule is computed exactly, chunk by chunk (Yang et al., 2024, "Parallelizing Linear
    Transformers with the Delta Rule over Sequence Length"): inside a chunk of ``C`` tokens entering
    with ``M_c``, every state is ``M_c`` plus a sum of rank-one writes ``u_s k_sᵀ`` whose pseudo-values
    solve the unit lower-triangular system ``(I + tril₋₁(diag(η) K Kᵀ)) U = diag(η) (V − K M_cᵀ)``
    (the UT transform), so the chunk's reads ``Y = Q M_cᵀ + tril(Q Kᵀ) U`` and the next state
    ``M_{c+1} = M_c + Uᵀ K`` are matmuls; only the loop over chunks is sequential. The code is
    :func:`mnemotorch.ops.memory.miras.wy_delta_rule`, shared with Miras' ``mode="wy"``; the token
    loop :func:`hebbian_memory_reference` is the specification it is tested against. Autocast is
    off inside (the solve and the state stay in the accumulation dtype).
    """
    fn = "hebbian_memory"
    check_hebbian_args(fn, k, v, q, rule, lr, initial_state)
    _check_reference_only(fn, backend)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be an int >= 1, got {chunk_size!r}")
    if rule == "delta":
        return _delta_rule_chunked(k, v, q, lr, initial_state, chunk_size)
    scaled = v * (lr.to(device=v.device, dtype=v.dtype).unsqueeze(-1) if isinstance(lr, Tensor) else float(lr))
    state = None
    if initial_state is not None:
        # Linear attention keeps S = Mᵀ [Dk, Dv]; z (the unused normaliser) starts at zero.
        m0 = initial_state.to(accumulation_dtype(q.dtype))
        state = (m0.transpose(-1, -2), m0.new_zeros(m0.shape[:2] + m0.shape[-1:]))
    y, (s, _) = linear_attention_chunked(q, k, scaled, state, normalize=False, chunk_size=chunk_size)
    return y, s.transpose(-1, -2).contiguous()


def _delta_rule_chunked(k: Tensor, v: Tensor, q: Tensor, lr: float | Tensor, initial_state: Tensor | None, chunk_size: int) -> tuple[Tensor, Tensor]:
    """The delta rule through the shared WY blocks, in the row convention ``W = Mᵀ [Dk, Dv]``."""
    from ..memory.miras import wy_delta_rule

    acc = accumulation_dtype(q.dtype)
    b, t, h, dk = k.shape
    with torch.autocast(device_type=q.device.type, enabled=False):
        qh, kh, vh = (x.to(acc).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
        if isinstance(lr, Tensor):
            eta = lr.to(device=k.device, dtype=acc).transpose(1, 2)
        else:
            eta = torch.full((b, h, t), float(lr), dtype=acc, device=k.device)
        if initial_state is None:
            w0 = k.new_zeros(b, h, dk, v.shape[-1], dtype=acc)
        else:
            w0 = initial_state.to(device=k.device, dtype=acc).transpose(-1, -2)
        y, w = wy_delta_rule(qh, kh, vh, eta, w0, chunk_size)
    return y.transpose(1, 2).to(q.dtype), w.transpose(-1, -2).contiguous()


_KERNEL_NAMES = ("linear_attention_triton", "linear_attention_step_triton", "kernel_support")


def __getattr__(name: str):
    # The Triton entry points load on first use, so importing the package does not import triton.
    if name in _KERNEL_NAMES:
        from . import triton as _kernels

        return getattr(_kernels, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_EPS",
    "kernels_enabled",
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
    "linear_attention_step_triton",
    "linear_attention_triton",
    "relu",
    "taylor",
]
