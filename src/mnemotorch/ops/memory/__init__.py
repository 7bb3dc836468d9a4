"""Neural long-term memory (Titans, Behrouz et al. 2024): ``neural_memory``.

A per-head memory (a matrix or an MLP of depth 1-4) trained *while the sequence is read* by
gradient descent with momentum and weight decay on ``‖M(k_t) − v_t‖²``, with per-token, per-head
gates θ (step), η (momentum decay) and α (forgetting), gradients frozen at the chunk-start weights
inside each chunk, and read as ``y_t = M_t(q_t)``. ``reference.py`` is the specification (token
loop); ``chunked.py`` the dual-form chunked implementation (matmuls inside chunks);
``fused_triton.py`` a fused Triton forward over all full chunks of a call (opt-in,
``neural_memory(..., fused=True)``), trained through ``fused_backward.py`` (per-chunk state
checkpoints; the read and update batched over chunks, the state's adjoint sequential). Semantics and equations:
``docs/mixers/titans.md``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..checks import check_backend
from .chunked import chunk_coefficients, compile_options, neural_memory_chunked, segment_sum
from .miras import (
    ALGORITHMS,
    BIASES,
    INSTANCES,
    RETENTIONS,
    MirasConfig,
    error_signal,
    miras_chunked,
    miras_instance,
    miras_memory,
    miras_reference,
    miras_wy,
    retention_map,
    wy_supported,
)
from .reference import (
    ACTIVATIONS,
    DEFAULT_LN_EPS,
    clip_scale,
    MAX_DEPTH,
    MemoryState,
    accumulation_dtype,
    check_ln_eps,
    memory_forward,
    memory_hidden_shapes,
    needs_grad,
    neural_memory_reference,
)

MODES = ("chunked", "recurrent")

__all__ = [
    "ALGORITHMS",
    "BIASES",
    "INSTANCES",
    "RETENTIONS",
    "MirasConfig",
    "error_signal",
    "miras_chunked",
    "miras_instance",
    "miras_memory",
    "miras_reference",
    "miras_wy",
    "retention_map",
    "wy_supported",
    "ACTIVATIONS",
    "DEFAULT_LN_EPS",
    "MAX_DEPTH",
    "MODES",
    "MemoryState",
    "accumulation_dtype",
    "chunk_coefficients",
    "clip_scale",
    "compile_options",
    "memory_forward",
    "memory_hidden_shapes",
    "neural_memory",
    "neural_memory_chunked",
    "neural_memory_reference",
    "segment_sum",
]


def neural_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    initial_state: MemoryState | Sequence[Tensor],
    chunk_size: int = 64,
    activation: str = "silu",
    residual: bool = False,
    layer_norm: bool = False,
    ln_eps: float = DEFAULT_LN_EPS,
    mode: str = "chunked",
    debug: bool = False,
    backend: str = "auto",
    max_grad_norm: float | None = None,
    compile: bool | str | dict = False,
    fused: bool = False,
) -> tuple[Tensor, MemoryState]:
    """Titans neural memory: write ``(k_t, v_t)`` by test-time gradient descent, read ``M_t(q_t)``.

    Per token and head: ``S_t = η_t S_{t−1} − θ_t ∇ℓ(M_{c(t)}; k_t, v_t)``,
    ``M_t = (1 − α_t) M_{t−1} + S_t``, ``y_t = M_t(q_t)``, with ``ℓ = ‖M(k) − v‖²`` and ``M_{c(t)}``
    the weights at the start of ``t``'s chunk (chunks at absolute positions 0, C, 2C, ...).

    Args:
        q: ``[B, T, H, Dk]`` queries; k: ``[B, T, H, Dk]`` keys; v: ``[B, T, H, Dv]`` values.
        theta: ``[B, T, H]`` step sizes (θ ≥ 0). eta: ``[B, T, H]`` momentum decay (0 < η ≤ 1).
        alpha: ``[B, T, H]`` forgetting (0 ≤ α < 1). Ranges are checked only with ``debug=True``.
        initial_state: a :class:`MemoryState` returned by a previous call, or the initial weights:
            a list of ``[B, H, d_in, d_out]`` tensors (``Dk -> hidden -> ... -> Dv``, 1-4 layers).
        chunk_size: ``C`` (a model hyperparameter; ``1`` = exact online gradient descent). Any ``T``
            works: a partial last chunk is carried in the state (``position``), not padded.
        activation: σ between memory layers: ``"silu"``, ``"gelu"`` or ``"relu"``.
        residual: ``M(x) = x + f(x)`` (needs ``Dk == Dv``). layer_norm: ``M(x) = [x +] LN(f(x))``.
        ln_eps: ε of the (affine-free) LayerNorm.
        mode: ``"chunked"`` (dual form, the training path) or ``"recurrent"`` (the token loop).
        debug: check gate ranges and the state's finiteness chunk by chunk (chunked mode; syncs).
        backend: ``"auto"`` or ``"reference"`` (only PyTorch implementations exist so far).
        max_grad_norm: ``τ`` or ``None`` (default: the paper's update). Clips every token's surprise
            gradient to norm ``τ`` before it enters the momentum, ``∇_t ← ∇_t · min(1, τ / ‖∇_t‖)``,
            the norm taken over all memory layers per batch row and head (a stability bound;
            ``docs/mixers/titans.md``, "Stability").
        compile: chunked mode only: run each full chunk's step through ``torch.compile(fullgraph=True,
            dynamic=False)`` (inductor fuses the elementwise work around the matmuls, forward and
            backward). ``False`` (default) = eager, the reference; ``True`` = inductor's default mode;
            a mode string or a dict of ``backend``/``mode``/``options``. See
            :func:`~mnemotorch.ops.memory.chunked.neural_memory_chunked`.
        fused: chunked mode only, opt-in: run the full chunks in one fused Triton forward kernel
            (:func:`~mnemotorch.ops.memory.fused_triton.neural_memory_fused`: depth 1-2,
            power-of-two sizes >= 16, float32/bf16/fp16; its ``ValueError`` otherwise). When a
            gradient is needed, the kernel also writes the state entering every chunk and the
            backward runs from those checkpoints (:mod:`~mnemotorch.ops.memory.fused_backward`).
            ``compile`` does not apply. Not with ``debug=True``.

    Returns:
        ``(y [B, T, H, Dv], MemoryState)``; ``y`` in the dtype of ``q``, the state in float32 for
        half inputs (else the input dtype). Autocast is disabled inside: the memory recurrence
        always runs in the accumulation dtype.
    """
    fn = "neural_memory"
    check_backend(fn, backend)
    if backend in ("triton", "torch"):
        raise NotImplementedError(f"{fn}: backend {backend!r} is not implemented yet; use 'auto' or 'reference'")
    if mode not in MODES:
        raise ValueError(f"{fn}: mode must be one of {MODES}, got {mode!r}")
    if not isinstance(debug, bool):
        raise TypeError(f"{fn}: debug must be a bool, got {debug!r}")
    ln_eps = check_ln_eps(fn, ln_eps)
    if not isinstance(fused, bool):
        raise TypeError(f"{fn}: fused must be a bool, got {fused!r}")
    if fused and (mode != "chunked" or debug):
        raise ValueError(f"{fn}: fused=True needs mode='chunked' and debug=False, got mode={mode!r}, debug={debug!r}")
    device_type = q.device.type if isinstance(q, Tensor) else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        if fused:
            from .fused_triton import neural_memory_fused

            return neural_memory_fused(q, k, v, theta, eta, alpha, initial_state, chunk_size, activation, residual, layer_norm, ln_eps, max_grad_norm)
        if mode == "recurrent":
            return neural_memory_reference(q, k, v, theta, eta, alpha, initial_state, chunk_size, activation, residual, layer_norm, ln_eps, max_grad_norm)
        return neural_memory_chunked(q, k, v, theta, eta, alpha, initial_state, chunk_size, activation, residual, layer_norm, ln_eps, debug, max_grad_norm, compile)

