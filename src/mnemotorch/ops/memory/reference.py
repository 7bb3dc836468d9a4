"""Titans neural long-term memory: the token-by-token reference (the specification).

Behrouz, Zhong & Mirrokni, "Titans: Learning to Memorize at Test Time" (arXiv 2501.00663), §3.1-3.2.
Per head, a memory ``M`` (a matrix or a small MLP, weights ``W_1 .. W_L``) learns, while the sequence
is read, to map keys to values. For token ``t`` (gates ``θ_t, η_t, α_t`` per token and head)::

    ℓ(M; k_t, v_t) = ‖M(k_t) − v_t‖²                         associative-memory loss
    S_t = η_t S_{t−1} − θ_t ∇ℓ(M_{c(t)}; k_t, v_t)             surprise with momentum
    M_t = (1 − α_t) M_{t−1} + S_t                              forgetting (weight decay)
    y_t = M_t(q_t)                                             read with the updated weights

**Chunk semantics** (paper §3.2, "parallelize the long-term memory training"): the sequence is cut
into chunks of ``C`` tokens at absolute positions ``0, C, 2C, ...``; the gradient of every token of
a chunk is taken at the weights ``M_{c(t)}`` the memory had *when the chunk began* (``c(t)`` = the
last multiple of ``C`` at or before ``t``, so the chunk start is the state before its first token).
``C = 1`` is exact online gradient descent with momentum; larger ``C`` is what the paper trains with
(the chunk size is a model hyperparameter: it changes the function, by ~5-20 % relative at C = 4-16).
The momentum and decay recurrences run token by token; only the *point* where gradients are
evaluated is frozen inside a chunk. The read uses ``M_t``, i.e. token ``t``'s own write included.

**Memory architectures** (weights per batch row and head, row-vector convention ``z = x W``)::

    depth L = 1:   M(x) = x W_1                                    (linear / matrix memory)
    depth L ≥ 2:   M(x) = σ(... σ(σ(x W_1) W_2) ...) W_L           (MLP, σ between layers only)
    residual:      M(x) = x + f(x)          layer_norm:  M(x) = [x +] LN(f(x))

``LN`` has no affine parameters (eps ``ln_eps``). The residual form needs ``Dk = Dv``. The
gradient of ℓ here is taken with ``torch.func.grad``, independently of the hand-derived backward
of the chunked (dual-form) implementation in ``chunked.py``, which is checked against this loop.

State carried between calls (:class:`MemoryState`): the current weights ``M_t``, the momentum
``S_t``, the chunk-start weights ``M_{c(t)}`` and the position inside the current chunk. The
chunk-start weights are what make a split *inside* a chunk exact: the tokens of the rest of the
chunk still need their gradients at the chunk-start weights, which cannot be recovered from
``M_t`` (holding them is equivalent to holding the chunk's tokens so far, and makes a decoding
step O(1) instead of re-running the partial chunk).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,  # exact (erf) GELU
    "relu": F.relu,
}
MAX_DEPTH = 4
DEFAULT_LN_EPS = 1e-5


@dataclass
class MemoryState:
    """What a neural memory carries between calls, per batch row and head.

    Attributes:
        weights: ``M_t``: one tensor per memory layer, ``[B, H, d_in, d_out]`` (layer 1 reads
            ``Dk`` channels, the last writes ``Dv``).
        momentum: ``S_t``, the surprise (momentum) with the shapes of ``weights``.
        chunk_start: the weights at the start of the current chunk; gradients of the chunk's
            remaining tokens are taken here. Equal to ``weights`` when ``position == 0``.
        position: tokens of the current chunk already consumed, ``0 <= position < chunk_size``
            (the absolute position of the next token modulo the chunk size).
    """

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...]
    chunk_start: tuple[Tensor, ...]
    position: int = 0

    def tensors(self) -> list[Tensor]:
        return [*self.weights, *self.momentum, *self.chunk_start]



def needs_grad(*args: object) -> bool:
    """Whether autograd would record a graph through any tensor among ``args`` (states included)."""
    if not torch.is_grad_enabled():
        return False
    for a in args:
        items = a.tensors() if isinstance(a, MemoryState) else a if isinstance(a, (list, tuple)) else [a]
        if any(isinstance(t, Tensor) and t.requires_grad for t in items):
            return True
    return False


def memory_hidden_shapes(dk: int, dv: int, depth: int, hidden: int) -> list[tuple[int, int]]:
    """``(d_in, d_out)`` of each layer of a depth-``depth`` memory ``Dk -> hidden -> ... -> Dv``."""
    _check_depth("memory_hidden_shapes", depth)
    dims = [dk] + [hidden] * (depth - 1) + [dv]
    return [(dims[i], dims[i + 1]) for i in range(depth)]


def _check_depth(fn: str, depth: object) -> int:
    if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"{fn}: memory depth must be an int in [1, {MAX_DEPTH}], got {depth!r}")
    return depth


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and sums are kept in float32 for half inputs, else in the input dtype."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def check_memory_args(
    fn: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    initial_state: object,
    chunk_size: object,
    activation: object,
    residual: object,
    layer_norm: object,
) -> MemoryState:
    """Validate the public arguments; return the initial state as a :class:`MemoryState`."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{fn}: {name} must have shape [batch, time, heads, head_dim], got {list(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be floating point, got {t.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"{fn}: q {list(q.shape)} and k {list(k.shape)} must have the same shape [B, T, H, Dk]")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{fn}: v {list(v.shape)} must share batch, time and heads with k {list(k.shape)}")
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    for name, g in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        if not isinstance(g, Tensor) or not g.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor of shape [B, T, H] = {[b, t, h]}")
        if tuple(g.shape) != (b, t, h):
            raise ValueError(f"{fn}: {name} must have shape [B, T, H] = {[b, t, h]} (one gate per token and head), got {list(g.shape)}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be an int >= 1, got {chunk_size!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    for name, flag in (("residual", residual), ("layer_norm", layer_norm)):
        if not isinstance(flag, bool):
            raise TypeError(f"{fn}: {name} must be a bool, got {flag!r}")
    if residual and dk != dv:
        raise ValueError(f"{fn}: residual=True needs Dk == Dv (M(x) = x + f(x)), got Dk={dk}, Dv={dv}")

    if isinstance(initial_state, MemoryState):
        state = initial_state
    elif isinstance(initial_state, (list, tuple)) and all(isinstance(w, Tensor) for w in initial_state):
        weights = tuple(initial_state)
        state = MemoryState(weights, tuple(torch.zeros_like(w) for w in weights), weights, 0)
    else:
        raise TypeError(f"{fn}: initial_state must be a MemoryState or a list of memory weights [B, H, d_in, d_out], got {type(initial_state).__name__}")
    depth = _check_depth(fn, len(state.weights))
    if not isinstance(state.position, int) or isinstance(state.position, bool) or not 0 <= state.position < chunk_size:
        raise ValueError(f"{fn}: initial_state.position must be an int in [0, chunk_size={chunk_size}), got {state.position!r}")
    for name, group in (("weights", state.weights), ("momentum", state.momentum), ("chunk_start", state.chunk_start)):
        if len(group) != depth:
            raise ValueError(f"{fn}: initial_state.{name} has {len(group)} tensors but weights has {depth}")
        prev = dk
        for i, w in enumerate(group):
            if not isinstance(w, Tensor) or not w.is_floating_point():
                raise TypeError(f"{fn}: initial_state.{name}[{i}] must be a floating-point tensor [B, H, d_in, d_out]")
            if w.ndim != 4 or tuple(w.shape[:2]) != (b, h) or w.shape[2] != prev:
                raise ValueError(
                    f"{fn}: initial_state.{name}[{i}] must have shape [B={b}, H={h}, d_in={prev}, d_out], got {list(w.shape)} "
                    "(layer 1 reads Dk channels, each layer reads the previous layer's output)"
                )
            if tuple(w.shape) != tuple(state.weights[i].shape):
                raise ValueError(f"{fn}: initial_state.{name}[{i}] {list(w.shape)} differs from weights[{i}] {list(state.weights[i].shape)}")
            prev = w.shape[3]
        if prev != dv:
            raise ValueError(f"{fn}: the last memory layer of initial_state.{name} writes {prev} channels, but v has Dv={dv}")
    return state


def memory_forward(weights: Sequence[Tensor], x: Tensor, activation: str = "silu", residual: bool = False, layer_norm: bool = False, ln_eps: float = DEFAULT_LN_EPS) -> Tensor:
    """Apply the memory ``M`` to ``x [B, H, n, Dk]`` with weights ``[B, H, d_in, d_out]`` -> ``[B, H, n, Dv]``."""
    act = ACTIVATIONS[activation]
    h = x
    for i, w in enumerate(weights):
        h = h @ w
        if i < len(weights) - 1:
            h = act(h)
    if layer_norm:
        h = F.layer_norm(h, h.shape[-1:], eps=ln_eps)
    return h + x if residual else h


def neural_memory_reference(
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
    max_grad_norm: float | None = None,
) -> tuple[Tensor, MemoryState]:
    """The Titans memory update and read, one token at a time (see the module docstring).

    Args:
        q: ``[B, T, H, Dk]`` queries; k: ``[B, T, H, Dk]`` keys; v: ``[B, T, H, Dv]`` values.
        theta: ``[B, T, H]`` step sizes θ_t (≥ 0).
        eta: ``[B, T, H]`` momentum decays η_t ∈ (0, 1].
        alpha: ``[B, T, H]`` forgetting gates α_t ∈ [0, 1).
        initial_state: a :class:`MemoryState`, or the initial weights (one ``[B, H, d_in, d_out]``
            tensor per layer; zero momentum, at a chunk start).
        chunk_size: ``C``; gradients inside a chunk are taken at its start weights.
        activation, residual, layer_norm, ln_eps: the memory architecture (:func:`memory_forward`).
        max_grad_norm: ``τ``, optional per-token clipping of the surprise gradient (see
            :func:`clip_scale`): ``∇_t ← ∇_t · min(1, τ / ‖∇_t‖)`` with the norm over all memory
            layers, per batch row and head. ``None`` (default) = the paper's unclipped update.

    Returns:
        ``(y [B, T, H, Dv], final MemoryState)``; ``y_t = M_t(q_t)``.
    """
    fn = "neural_memory_reference"
    state = check_memory_args(fn, q, k, v, theta, eta, alpha, initial_state, chunk_size, activation, residual, layer_norm)
    max_grad_norm = check_max_grad_norm(fn, max_grad_norm)
    acc = accumulation_dtype(q.dtype)
    cast = lambda ts: tuple(t.to(acc) for t in ts)  # noqa: E731
    w, s, w0, pos = cast(state.weights), cast(state.momentum), cast(state.chunk_start), state.position
    qf, kf, vf = (x.to(acc).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    th, et, al = (g.to(acc).transpose(1, 2)[..., None, None] for g in (theta, eta, alpha))  # [B, H, T, 1, 1]

    def loss(weights: tuple[Tensor, ...], key: Tensor, value: Tensor) -> Tensor:
        # Summed over batch rows and heads: each (b, h) block of the gradient is that row's own.
        return (memory_forward(weights, key, activation, residual, layer_norm, ln_eps) - value).pow(2).sum()

    grad = torch.func.grad(loss)
    outs = []
    for i in range(q.shape[1]):
        if pos == 0:
            w0 = w  # a chunk begins: its gradients are all taken at these weights
        g = grad(w0, kf[:, :, i : i + 1], vf[:, :, i : i + 1])
        if max_grad_norm is not None:
            sq = sum(g_l.pow(2).sum((-2, -1)) for g_l in g)  # ‖∇_t‖² over all layers, [B, H]
            scale = clip_scale(sq, max_grad_norm)[..., None, None]
            g = tuple(scale * g_l for g_l in g)
        s = tuple(et[:, :, i] * s_l - th[:, :, i] * g_l for s_l, g_l in zip(s, g))
        w = tuple((1 - al[:, :, i]) * w_l + s_l for w_l, s_l in zip(w, s))
        outs.append(memory_forward(w, qf[:, :, i : i + 1], activation, residual, layer_norm, ln_eps))
        pos = (pos + 1) % chunk_size
    y = torch.cat(outs, 2) if outs else vf
    return y.transpose(1, 2).to(q.dtype), MemoryState(w, s, w if pos == 0 else w0, pos)


def clip_scale(sq_norm: Tensor, max_norm: float) -> Tensor:
    """``min(1, τ / ‖∇‖)`` from the squared norm ``‖∇‖²``: the factor that clips a gradient to norm ``τ``.

    Written as ``τ · rsqrt(max(‖∇‖², τ²))`` so that a zero gradient gives a finite derivative (the
    ``sqrt`` of a zero norm would give ``0 · ∞ = NaN`` in the backward).
    """
    return max_norm * torch.rsqrt(torch.clamp(sq_norm, min=max_norm * max_norm))


def check_max_grad_norm(fn: str, max_grad_norm: object) -> float | None:
    if max_grad_norm is None:
        return None
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)) or not math.isfinite(max_grad_norm) or max_grad_norm <= 0:
        raise ValueError(f"{fn}: max_grad_norm must be None (no clipping) or a finite float > 0, got {max_grad_norm!r}")
    return float(max_grad_norm)


def check_ln_eps(fn: str, ln_eps: object) -> float:
    if isinstance(ln_eps, bool) or not isinstance(ln_eps, (int, float)) or not math.isfinite(ln_eps) or ln_eps <= 0:
        raise ValueError(f"{fn}: ln_eps must be a finite float > 0, got {ln_eps!r}")
    return float(ln_eps)
