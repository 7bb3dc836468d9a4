"""Causal linear attention and Hebbian / delta-rule associative memory, written plainly.

This file is the specification of the linear-attention family (it runs in float64; the tests
compare every other implementation against it).

**Normalised causal linear attention** (Katharopoulos et al., 2020, "Transformers are RNNs"), for
queries and keys that have *already* been passed through a feature map φ::

    S_t = S_0 + Σ_{s≤t} φ(k_s) v_sᵀ            [Dk, Dv]   (the "fast weights")
    z_t = z_0 + Σ_{s≤t} φ(k_s)                 [Dk]       (the normaliser)
    y_t = φ(q_t)ᵀ S_t / (φ(q_t)ᵀ z_t + ε)      (normalize=True)
    y_t = φ(q_t)ᵀ S_t                          (normalize=False)

Three algebraically equal ways to compute it (cross-tested to 1e-10 in float64):

* :func:`linear_attention_parallel` -- the quadratic masked form ``(φ(Q) φ(K)ᵀ ⊙ M) V``;
* :func:`linear_attention_chunked` -- quadratic inside chunks of ``C`` tokens, the state carried
  between chunks: O(T·C) work, the training path;
* :func:`linear_attention_recurrent` -- one token at a time, O(1) per token: the decoding path.

**Hebbian / delta memory** (Schlag et al., 2021; Qiao, 2025): a matrix memory ``M [Dv, Dk]`` written
with (key, value) pairs and read with queries, ``y_t = M_t q_t``:

* Hebb:  ``M_t = M_{t-1} + η v_t k_tᵀ``  (η = 1: unnormalised linear attention with φ = identity);
* delta: ``M_t = M_{t-1} - η (M_{t-1} k_t - v_t) k_tᵀ``  (move the memory's answer for ``k_t``
  towards ``v_t``; with ``‖k_t‖ = 1`` and η = 1 the old association for ``k_t`` is overwritten).

:func:`hebbian_memory_reference` is their token loop. ``hebbian_memory`` runs Hebb in the chunked
linear-attention form and the delta rule in DeltaNet's chunkwise WY form
(:func:`mnemotorch.ops.memory.miras.wy_delta_rule`); both are tested against this loop.

Precision: sums are accumulated in float32 for half-precision inputs and in the input dtype
otherwise (float32 / float64); returned states stay in that accumulation dtype, outputs are cast
back to the input dtype. ε defaults to 1e-6, which only matters when a denominator is tiny.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import check_qkv

DEFAULT_EPS = 1e-6

State = tuple[Tensor, Tensor]


# ---------------------------------------------------------------------------------------------
# Feature maps φ: [..., d] -> [..., dφ]
# ---------------------------------------------------------------------------------------------


def identity(x: Tensor) -> Tensor:
    """φ(x) = x. Not positive: use with ``normalize=False`` (the denominator can vanish)."""
    return x


def elu_plus_one(x: Tensor) -> Tensor:
    """φ(x) = elu(x) + 1 > 0 (Katharopoulos et al., 2020)."""
    return F.elu(x) + 1.0


def relu(x: Tensor) -> Tensor:
    """φ(x) = max(x, 0). Non-negative but can be all zero: the denominator then falls back to ε."""
    return F.relu(x)


def taylor(x: Tensor) -> Tensor:
    """Second-order Taylor feature map of BASED (Arora et al., 2024): ``[..., d] -> [..., 1 + d + d²]``.

    φ(x) = [1, x / d^{1/4}, vec(x ⊗ x) / (√2 · √d)], so that
    φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d), the 2nd-order Taylor expansion of exp(q·k/√d).
    That polynomial is ≥ 1/2 for every q, k, so the normalised form never divides by ~0.
    The full outer product is kept (d = 16 -> 273 features) rather than its symmetric half
    (153 features with √2 on off-diagonal terms): equal dot products, simpler indexing.
    """
    d = x.shape[-1]
    ones = torch.ones_like(x[..., :1])
    second = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / (math.sqrt(2.0) * math.sqrt(d))
    return torch.cat([ones, x / d**0.25, second], dim=-1)


#: name -> (φ, dφ as a function of the input dimension d)
FEATURE_MAPS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[int], int]]] = {
    "identity": (identity, lambda d: d),
    "elu_plus_one": (elu_plus_one, lambda d: d),
    "relu": (relu, lambda d: d),
    "taylor": (taylor, lambda d: 1 + d + d * d),
}


def _check_feature_name(name: object) -> str:
    if not isinstance(name, str) or name not in FEATURE_MAPS:
        raise ValueError(f"feature must be one of {sorted(FEATURE_MAPS)}, got {name!r}")
    return name


def feature_map(name: str) -> Callable[[Tensor], Tensor]:
    """The feature map called ``name`` (one of ``identity``, ``elu_plus_one``, ``relu``, ``taylor``)."""
    return FEATURE_MAPS[_check_feature_name(name)][0]


def feature_dim(name: str, dim: int) -> int:
    """dφ: the output width of feature map ``name`` applied to vectors of width ``dim``."""
    return FEATURE_MAPS[_check_feature_name(name)][1](dim)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are accumulated (and states kept) in: float32 for half inputs, else ``dtype``."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# ---------------------------------------------------------------------------------------------
# Shared argument handling
# ---------------------------------------------------------------------------------------------


def check_linear_qkv(fn: str, q: Tensor, k: Tensor, v: Tensor) -> None:
    """``q [B, T, H, Dk]``, ``k [B, T, H, Dk]``, ``v [B, T, H, Dv]``: same B, T and H."""
    check_qkv(fn, q, k, v)
    if q.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"{fn}: q {list(q.shape)} and k {list(k.shape)} must share batch, time and heads "
            "(linear attention is self-attention over one sequence; grouped heads are not supported)"
        )


def check_eps(fn: str, eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{fn}: eps must be a finite float >= 0, got {eps!r}")
    return float(eps)


def _initial_state(fn: str, initial_state: State | None, k: Tensor, v: Tensor, acc: torch.dtype) -> State:
    """``(S0 [B, H, Dk, Dv], z0 [B, H, Dk])`` in the accumulation dtype (zeros when ``None``)."""
    b, _, h, dk = k.shape
    dv = v.shape[-1]
    if initial_state is None:
        return k.new_zeros(b, h, dk, dv, dtype=acc), k.new_zeros(b, h, dk, dtype=acc)
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
        raise TypeError(f"{fn}: initial_state must be a tuple (S0 [B, H, Dk, Dv], z0 [B, H, Dk]) or None")
    s0, z0 = initial_state
    for name, t, shape in (("S0", s0, (b, h, dk, dv)), ("z0", z0, (b, h, dk))):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{fn}: initial_state {name} must be a floating-point tensor of shape {list(shape)}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{fn}: initial_state {name} must have shape {list(shape)} ([B, H, Dk{', Dv' if name == 'S0' else ''}]), got {list(t.shape)}")
    return s0.to(device=k.device, dtype=acc), z0.to(device=k.device, dtype=acc)


# ---------------------------------------------------------------------------------------------
# The three forms of causal linear attention (features already applied)
# ---------------------------------------------------------------------------------------------


def linear_attention_parallel(
    q: Tensor, k: Tensor, v: Tensor, initial_state: State | None = None, normalize: bool = True, eps: float = DEFAULT_EPS
) -> tuple[Tensor, State]:
    """Quadratic masked form: ``A = φ(Q) φ(K)ᵀ ⊙ tril``, ``y = (A V + φ(Q) S0) / (A 1 + φ(Q) z0 + ε)``.

    Args:
        q: ``[B, T, H, Dk]`` featured queries φ(q).
        k: ``[B, T, H, Dk]`` featured keys φ(k).
        v: ``[B, T, H, Dv]`` values.
        initial_state: ``(S0 [B, H, Dk, Dv], z0 [B, H, Dk])`` or ``None`` (zeros).
        normalize: divide by ``φ(q_t)ᵀ z_t + ε`` (True) or not (False).
        eps: ε of the denominator.

    Returns:
        ``(y [B, T, H, Dv], (S_T [B, H, Dk, Dv], z_T [B, H, Dk]))``.
    """
    check_linear_qkv("linear_attention_parallel", q, k, v)
    eps = check_eps("linear_attention_parallel", eps)
    acc = accumulation_dtype(q.dtype)
    s0, z0 = _initial_state("linear_attention_parallel", initial_state, k, v, acc)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    t = q.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores = torch.einsum("bihd,bjhd->bhij", qf, kf).masked_fill(~causal, 0.0)
    num = torch.einsum("bhij,bjhe->bihe", scores, vf) + torch.einsum("bihd,bhde->bihe", qf, s0)
    if normalize:
        den = scores.sum(-1).transpose(1, 2) + torch.einsum("bihd,bhd->bih", qf, z0)
        num = num / (den + eps).unsqueeze(-1)
    s_t = s0 + torch.einsum("bjhd,bjhe->bhde", kf, vf)
    z_t = z0 + kf.sum(1)
    return num.to(q.dtype), (s_t, z_t)


def linear_attention_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: State | None = None,
    normalize: bool = True,
    eps: float = DEFAULT_EPS,
    chunk_size: int = 64,
) -> tuple[Tensor, State]:
    """Chunked form: quadratic inside chunks of ``C = chunk_size`` tokens, state between chunks.

    For chunk ``c`` with rows ``Q_c, K_c, V_c`` and the state ``(S_c, z_c)`` left by the chunks before it:
    ``y_c = (tril(Q_c K_cᵀ) V_c + Q_c S_c) / (tril(Q_c K_cᵀ) 1 + Q_c z_c + ε)``,
    ``S_{c+1} = S_c + K_cᵀ V_c``, ``z_{c+1} = z_c + K_cᵀ 1``.
    All chunk states come from one exclusive prefix sum over the per-chunk increments ``K_cᵀ V_c``,
    so there is no Python loop over chunks. Any ``T`` works: the last chunk is zero-padded, and zero
    featured keys/values add nothing to the state (padded outputs are dropped).

    Args: as :func:`linear_attention_parallel`, plus ``chunk_size`` (an int ≥ 1).

    Returns:
        ``(y [B, T, H, Dv], (S_T [B, H, Dk, Dv], z_T [B, H, Dk]))``.
    """
    check_linear_qkv("linear_attention_chunked", q, k, v)
    eps = check_eps("linear_attention_chunked", eps)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"linear_attention_chunked: chunk_size must be an int >= 1, got {chunk_size!r}")
    acc = accumulation_dtype(q.dtype)
    s0, z0 = _initial_state("linear_attention_chunked", initial_state, k, v, acc)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    if t == 0:
        return v.new_zeros(v.shape), (s0, z0)
    c = min(chunk_size, t)  # a chunk longer than the sequence would only add padding
    n = -(-t // c)
    pad = n * c - t
    qf, kf, vf = (F.pad(x.to(acc), (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    qc, kc, vc = qf.view(b, n, c, h, dk), kf.view(b, n, c, h, dk), vf.view(b, n, c, h, dv)

    # State entering each chunk = initial state + sum of the increments of all earlier chunks.
    ds = torch.einsum("bnjhd,bnjhe->bnhde", kc, vc)  # [B, N, H, Dk, Dv]
    dz = kc.sum(2)  # [B, N, H, Dk]
    s_in = s0.unsqueeze(1) + torch.cat([torch.zeros_like(ds[:, :1]), ds[:, :-1]], 1).cumsum(1)
    z_in = z0.unsqueeze(1) + torch.cat([torch.zeros_like(dz[:, :1]), dz[:, :-1]], 1).cumsum(1)

    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    scores = torch.einsum("bnihd,bnjhd->bnhij", qc, kc).masked_fill(~causal, 0.0)
    num = torch.einsum("bnhij,bnjhe->bnihe", scores, vc) + torch.einsum("bnihd,bnhde->bnihe", qc, s_in)
    if normalize:
        den = scores.sum(-1).transpose(2, 3) + torch.einsum("bnihd,bnhd->bnih", qc, z_in)
        num = num / (den + eps).unsqueeze(-1)
    y = num.reshape(b, n * c, h, dv)[:, :t]
    return y.to(q.dtype), (s_in[:, -1] + ds[:, -1], z_in[:, -1] + dz[:, -1])


def linear_attention_recurrent(
    q: Tensor, k: Tensor, v: Tensor, initial_state: State | None = None, normalize: bool = True, eps: float = DEFAULT_EPS
) -> tuple[Tensor, State]:
    """Token-by-token form: ``S_t = S_{t-1} + φ(k_t) v_tᵀ``, ``z_t = z_{t-1} + φ(k_t)``, then read.

    Args, returns: as :func:`linear_attention_parallel`.
    """
    check_linear_qkv("linear_attention_recurrent", q, k, v)
    eps = check_eps("linear_attention_recurrent", eps)
    acc = accumulation_dtype(q.dtype)
    s, z = _initial_state("linear_attention_recurrent", initial_state, k, v, acc)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    outs = []
    for i in range(q.shape[1]):
        s = s + kf[:, i].unsqueeze(-1) * vf[:, i].unsqueeze(-2)
        z = z + kf[:, i]
        y = torch.einsum("bhd,bhde->bhe", qf[:, i], s)
        if normalize:
            y = y / (torch.einsum("bhd,bhd->bh", qf[:, i], z) + eps).unsqueeze(-1)
        outs.append(y)
    y = torch.stack(outs, 1) if outs else vf.new_zeros(v.shape)
    return y.to(q.dtype), (s, z)


# ---------------------------------------------------------------------------------------------
# Hebbian / delta-rule associative memory (token loop: the specification)
# ---------------------------------------------------------------------------------------------

RULES = ("hebb", "delta")


def check_hebbian_args(fn: str, k: Tensor, v: Tensor, q: Tensor, rule: object, lr: object, initial_state: object) -> None:
    """Validate ``k [B, T, H, Dk]``, ``v [B, T, H, Dv]``, ``q [B, T, H, Dk]``, rule, lr, ``M0 [B, H, Dv, Dk]``."""
    check_linear_qkv(fn, q, k, v)
    if rule not in RULES:
        raise ValueError(f"{fn}: rule must be one of {RULES}, got {rule!r}")
    if isinstance(lr, Tensor):
        if tuple(lr.shape) != tuple(k.shape[:3]):
            raise ValueError(f"{fn}: a tensor lr must have shape [B, T, H] = {list(k.shape[:3])}, got {list(lr.shape)}")
    elif isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"{fn}: lr must be a finite float > 0 or a tensor [B, T, H], got {lr!r}")
    if initial_state is not None:
        b, _, h, dk = k.shape
        shape = (b, h, v.shape[-1], dk)
        if not isinstance(initial_state, Tensor) or not initial_state.is_floating_point():
            raise TypeError(f"{fn}: initial_state must be a floating-point tensor M0 of shape [B, H, Dv, Dk] = {list(shape)} or None")
        if tuple(initial_state.shape) != shape:
            raise ValueError(f"{fn}: initial_state M0 must have shape [B, H, Dv, Dk] = {list(shape)}, got {list(initial_state.shape)}")


def hebbian_memory_reference(
    k: Tensor, v: Tensor, q: Tensor, rule: str = "hebb", lr: float | Tensor = 1.0, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Associative memory written with ``(k_t, v_t)`` and read with ``q_t``, one token at a time.

    Args:
        k: ``[B, T, H, Dk]`` keys (the cues written).
        v: ``[B, T, H, Dv]`` values (what is associated with each key).
        q: ``[B, T, H, Dk]`` queries (read after the write of the same step).
        rule: ``"hebb"`` (``M += η v kᵀ``) or ``"delta"`` (``M -= η (M k - v) kᵀ``).
        lr: η, a float > 0 or a per-token tensor ``[B, T, H]``. The delta rule is stable for
            ``0 < η ‖k‖² ≤ 2`` (``I - η k kᵀ`` is then non-expansive); unit keys and η ≤ 1 never overshoot.
        initial_state: ``M0 [B, H, Dv, Dk]`` or ``None`` (zeros).

    Returns:
        ``(y [B, T, H, Dv], M_T [B, H, Dv, Dk])``; ``y_t = M_t q_t``.
    """
    check_hebbian_args("hebbian_memory_reference", k, v, q, rule, lr, initial_state)
    acc = accumulation_dtype(q.dtype)
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    m = k.new_zeros(b, h, dv, dk, dtype=acc) if initial_state is None else initial_state.to(device=k.device, dtype=acc)
    kf, vf, qf = k.to(acc), v.to(acc), q.to(acc)
    eta = lr.to(device=k.device, dtype=acc) if isinstance(lr, Tensor) else torch.full((b, t, h), float(lr), dtype=acc, device=k.device)
    outs = []
    for i in range(t):
        ki, vi = kf[:, i], vf[:, i]
        target = vi if rule == "hebb" else vi - torch.einsum("bhed,bhd->bhe", m, ki)  # delta: the prediction error
        m = m + eta[:, i, :, None, None] * target.unsqueeze(-1) * ki.unsqueeze(-2)
        outs.append(torch.einsum("bhed,bhd->bhe", m, qf[:, i]))
    y = torch.stack(outs, 1) if outs else vf.new_zeros(v.shape)
    return y.to(q.dtype), m
