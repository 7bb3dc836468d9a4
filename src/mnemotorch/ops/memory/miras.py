"""Miras: memory as online optimisation, one configurable framework (Behrouz et al., 2025).

Behrouz, Razaviyayn, Zhong & Mirrokni, "It's All Connected: A Journey Through Test-Time Memorization,
Attentional Bias, Retention, and Online Optimization" (arXiv 2504.13173). A per-head memory ``M_W``
(a matrix, or an MLP of depth 1-4 as in :mod:`mnemotorch.ops.memory`) is fitted to the pairs
``(k_t, v_t)`` while the sequence is read, by four independent choices:

1. **memory architecture**: the weights ``W`` (one ``[d_in, d_out]`` matrix per layer, row-vector
   convention ``M(x) = x W`` for a matrix memory), activation, residual, LayerNorm;
2. **attentional bias** ``ℓ(W; k, v)``, the inner objective. Every bias here enters only through
   its *error signal* ``g = ∂ℓ/∂M(k)``, back-propagated through ``M`` to get ``∇_W ℓ``:

   ============  ==============================  =========================================
   ``bias``      ``ℓ``                           ``g`` (``e = M(k) − v``)
   ============  ==============================  =========================================
   ``"l2"``      ``½‖e‖²``                       ``e``
   ``"dot"``     ``−⟨M(k), v⟩``                  ``−v``
   ``"lp"``      ``‖e‖_p^p``                     ``p · Sign(e) ⊙ |e|^{p−1}``
   ``"huber"``   Yaad's switch (δ_t per token)   ``e`` if ``‖e‖₂ ≤ δ_t`` else ``δ_t · Sign(e)``
   ============  ==============================  =========================================

   (``Sign``/``|·|`` exact, or the paper's smooth ``tanh(a x)`` / ``sqrt(x² + ε)`` when
   ``sign_sharpness`` / ``abs_eps`` are set.)
3. **retention gate**: the memory keeps an accumulator ``P`` that evolves linearly and is read
   through a map ``W = φ(P)`` that the retention regulariser dictates:

   * ``"l2"``: ``φ(P) = P`` (ℓ2 retention = multiplicative decay α_t; α ≡ 1 is "no retention");
   * ``"lq"``: ``φ(P) = P / ‖P‖_q^{q−2}`` per layer matrix (Moneta, eq. 24; the norm is entrywise,
     ``‖P‖_q^q + ε`` under the root so an all-zero memory stays finite);
   * ``"kl"``: ``φ(P) = c · softmax(P)`` over ``d_in`` (each output unit's fan-in is a scaled
     distribution; Memora, eq. 27). ``W_t = c·Softmax(α_t log W_{t−1} − η_t ∇)`` is exactly
     ``P_t = α_t P_{t−1} − η_t ∇`` on the logits, since ``log W_{t−1} = P_{t−1} + const`` per slice
     and the softmax ignores constants.
4. **learning algorithm**: ``"gd"``: ``P_t = α_t P_{t−1} − η_t ∇_t``; ``"momentum"``:
   ``S_t = μ_t S_{t−1} − η_t ∇_t``, ``P_t = α_t P_{t−1} + S_t`` (Titans' surprise with momentum).

``∇_t = ∇_W ℓ(W̄_t; k_t, v_t)`` is taken at a *gradient point* ``W̄_t`` with Titans' chunk semantics
(the spec; the paper's §5.4 "gradients with respect to the last state of the previous chunk"): the
sequence is cut into chunks of ``C`` tokens at absolute positions 0, C, 2C, ... and every token of a
chunk uses ``W̄ = φ(P_c)``, the weights the memory had when the chunk began. ``C = 1`` is exact online
(mirror) descent, eq. 24/26/27 as written. ``retain_first=True`` (linear memory only) evaluates the
gradient at the *retained* weights instead, ``W̄_t = α_t W̄_{t−1}`` inside the chunk: Gated DeltaNet's
order (decay, then the delta step). The read is ``y_t = M_{φ(P_t)}(q_t)``: token ``t``'s own write
included, with the retention map applied at every token (the paper's parallel form renormalises
Moneta only at chunk ends; ``docs/mixers/miras.md`` explains why we keep the exact per-token read).

Closed forms recovered with a linear memory (``W [Dk, Dv]``, ``S = Wᵀ`` in the column convention)::

    linear attention   bias dot, retention l2, α ≡ 1, η ≡ 1:  S_t = S_{t−1} + v_t k_tᵀ
    DeltaNet           bias l2,  α ≡ 1, C = 1:                 S_t = S_{t−1}(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ
    Gated DeltaNet     bias l2,  retain_first, C = 1:          S_t = α_t S_{t−1}(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ
    Titans (LMM)       bias l2,  momentum:                     η = 2θ, α = 1 − α_Titans, μ = η_Titans

Three implementations with one semantics (tests check them against each other in float64):

* ``mode="recurrent"``: :func:`miras_reference`, the token loop with ``torch.func.vjp`` (the spec);
* ``mode="chunked"``: :func:`miras_chunked`: per chunk, the gradients of all its tokens at once
  (hand-written backward), the accumulators of every token from the gates' coefficient matrices
  (log space, :func:`chunk_coefficients`), the retention map and the reads batched over tokens;
* ``mode="wy"``: :func:`miras_wy`, linear memory with the ℓ2 (delta) or dot bias, ℓ2 retention,
  plain GD and ``C = 1``: the exact delta rule in blocks, with the UT/WY transform of DeltaNet
  (Yang et al., 2024): a unit-triangular solve per block, no per-token state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .chunked import _act, _act_grad, _layer_norm, chunk_coefficients, segment_sum
from .reference import ACTIVATIONS, DEFAULT_LN_EPS, MemoryState, accumulation_dtype, check_memory_args, memory_forward

BIASES = ("l2", "dot", "lp", "huber")
RETENTIONS = ("l2", "lq", "kl")
ALGORITHMS = ("gd", "momentum")
MIRAS_MODES = ("auto", "recurrent", "chunked", "wy")
DEFAULT_LQ_EPS = 1e-6


@dataclass(frozen=True)
class MirasConfig:
    """The four Miras choices (the depth of the memory comes from its weights).

    Attributes:
        bias: attentional bias ``"l2"`` (½‖e‖²), ``"dot"`` (−⟨M(k), v⟩), ``"lp"`` (‖e‖_p^p) or
            ``"huber"`` (Yaad's ℓ2/ℓ1 switch at ``‖e‖₂ = δ_t``; needs ``delta``).
        retention: ``"l2"`` (decay α_t), ``"lq"`` (ℓq normalisation, Moneta) or ``"kl"`` (softmax
            onto the scaled simplex, Memora); see the module docstring.
        algorithm: ``"gd"`` or ``"momentum"`` (needs the ``momentum`` gate μ_t).
        p: exponent of the ℓp bias (> 0; Moneta: 3). q: exponent of ℓq retention (> 1; Moneta: 4).
        sign_sharpness: ``a`` in ``Sign(x) ≈ tanh(a x)`` (ℓp, Huber); ``None`` = exact sign.
        abs_eps: ``ε`` in ``|x| ≈ sqrt(x² + ε)`` (ℓp); ``0`` = exact.
        lq_eps: ``ε`` in ``(‖P‖_q^q + ε)^{(q−2)/q}``.
        kl_scale: ``c`` of KL retention; ``None`` = ``sqrt(d_in)`` per layer (entries ~ 1/sqrt(d_in)
            as a standard initialisation; the paper leaves c free).
        retain_first: take the gradient at the retained weights (Gated DeltaNet's order); linear
            memory only.
        activation, residual, layer_norm, ln_eps: the memory architecture, as
            :func:`mnemotorch.ops.memory.memory_forward`.
    """

    bias: str = "l2"
    retention: str = "l2"
    algorithm: str = "gd"
    p: float = 3.0
    q: float = 4.0
    sign_sharpness: float | None = None
    abs_eps: float = 0.0
    lq_eps: float = DEFAULT_LQ_EPS
    kl_scale: float | None = None
    retain_first: bool = False
    activation: str = "silu"
    residual: bool = False
    layer_norm: bool = False
    ln_eps: float = DEFAULT_LN_EPS

    def __post_init__(self) -> None:
        check_config("MirasConfig", self)


def _is_real(x: object) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def check_config(fn: str, c: object) -> MirasConfig:
    if not isinstance(c, MirasConfig):
        raise TypeError(f"{fn}: config must be a MirasConfig, got {type(c).__name__}")
    for name, value, allowed in (("bias", c.bias, BIASES), ("retention", c.retention, RETENTIONS), ("algorithm", c.algorithm, ALGORITHMS)):
        if value not in allowed:
            raise ValueError(f"{fn}: {name} must be one of {list(allowed)}, got {value!r}")
    if not _is_real(c.p) or c.p <= 0:
        raise ValueError(f"{fn}: p (the ℓp exponent) must be a finite float > 0, got {c.p!r}")
    if not _is_real(c.q) or c.q <= 1:
        raise ValueError(f"{fn}: q (the ℓq retention exponent) must be a finite float > 1, got {c.q!r}")
    if c.sign_sharpness is not None and (not _is_real(c.sign_sharpness) or c.sign_sharpness <= 0):
        raise ValueError(f"{fn}: sign_sharpness must be None (exact sign) or a finite float > 0, got {c.sign_sharpness!r}")
    if not _is_real(c.abs_eps) or c.abs_eps < 0:
        raise ValueError(f"{fn}: abs_eps must be a finite float >= 0, got {c.abs_eps!r}")
    if not _is_real(c.lq_eps) or c.lq_eps < 0:
        raise ValueError(f"{fn}: lq_eps must be a finite float >= 0, got {c.lq_eps!r}")
    if c.kl_scale is not None and (not _is_real(c.kl_scale) or c.kl_scale <= 0):
        raise ValueError(f"{fn}: kl_scale must be None (sqrt(d_in)) or a finite float > 0, got {c.kl_scale!r}")
    if c.activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: activation must be one of {sorted(ACTIVATIONS)}, got {c.activation!r}")
    for name in ("retain_first", "residual", "layer_norm"):
        if not isinstance(getattr(c, name), bool):
            raise TypeError(f"{fn}: {name} must be a bool, got {getattr(c, name)!r}")
    if not _is_real(c.ln_eps) or c.ln_eps <= 0:
        raise ValueError(f"{fn}: ln_eps must be a finite float > 0, got {c.ln_eps!r}")
    return c


# Named instances (memory / bias / retention / algorithm), Miras Table 1 and §5.3.
# Moneta, Yaad, Memora: 2-layer MLP M(x) = x + LN(W_1 σ(W_2 x)), GELU (§5.3) -> residual + layer_norm.
_MLP = dict(activation="gelu", residual=True, layer_norm=True)
INSTANCES: dict[str, MirasConfig] = {
    "linear_attention": MirasConfig(bias="dot"),
    "delta_net": MirasConfig(bias="l2"),
    "gated_delta_net": MirasConfig(bias="l2", retain_first=True),
    "titans": MirasConfig(bias="l2", algorithm="momentum"),
    "moneta": MirasConfig(bias="lp", p=3.0, retention="lq", q=4.0, **_MLP),
    "yaad": MirasConfig(bias="huber", **_MLP),
    "memora": MirasConfig(bias="l2", retention="kl", **_MLP),
}


def miras_instance(name: str, **overrides) -> MirasConfig:
    """The :class:`MirasConfig` of a named model (``INSTANCES``), with fields overridden."""
    if name not in INSTANCES:
        raise ValueError(f"miras_instance: name must be one of {sorted(INSTANCES)}, got {name!r}")
    return replace(INSTANCES[name], **overrides)


# -- the pieces of the update -------------------------------------------------------------------
def retention_map(p: Tensor, config: MirasConfig) -> Tensor:
    """``W = φ(P)`` for one layer, ``P [..., d_in, d_out]`` (see the module docstring)."""
    if config.retention == "l2":
        return p
    if config.retention == "lq":
        q = config.q
        # ‖P‖_q^{q−2} = (Σ|P|^q + ε)^{(q−2)/q}; q = 2 gives the identity.
        norm = (p.abs().pow(q).sum((-2, -1), keepdim=True) + config.lq_eps).pow((q - 2) / q)
        return p / norm
    scale = math.sqrt(p.shape[-2]) if config.kl_scale is None else config.kl_scale
    return scale * torch.softmax(p, dim=-2)


def _sign(x: Tensor, config: MirasConfig) -> Tensor:
    return torch.sign(x) if config.sign_sharpness is None else torch.tanh(config.sign_sharpness * x)


def error_signal(pred: Tensor, v: Tensor, config: MirasConfig, delta: Tensor | None) -> Tensor:
    """``g = ∂ℓ/∂M(k)`` of the attentional bias at the prediction ``pred [..., Dv]``.

    ``delta``: Huber thresholds broadcastable to ``pred[..., :1]``.
    """
    if config.bias == "dot":
        return -v.expand_as(pred)
    e = pred - v
    if config.bias == "l2":
        return e
    if config.bias == "lp":
        mag = e.abs() if config.abs_eps == 0 else torch.sqrt(e * e + config.abs_eps)
        return config.p * _sign(e, config) * mag.pow(config.p - 1)
    # Yaad: the ℓ2 gradient while the error is within δ, else δ times the ℓ1 gradient.
    small = torch.linalg.vector_norm(e, dim=-1, keepdim=True) <= delta
    return torch.where(small, e, delta * _sign(e, config))


# -- argument checks ----------------------------------------------------------------------------
def _check_gate(fn: str, name: str, g: object, shape: tuple[int, int, int]) -> Tensor:
    if not isinstance(g, Tensor) or not g.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor of shape [B, T, H] = {list(shape)}, got {type(g).__name__ if not isinstance(g, Tensor) else g.dtype}")
    if tuple(g.shape) != shape:
        raise ValueError(f"{fn}: {name} must have shape [B, T, H] = {list(shape)} (one gate per token and head), got {list(g.shape)}")
    return g


def check_miras_args(
    fn: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    retain: Tensor,
    initial_state: object,
    config: MirasConfig,
    momentum: Tensor | None,
    delta: Tensor | None,
    chunk_size: object,
) -> MemoryState:
    """Validate everything; return the initial state (a :class:`MemoryState`)."""
    check_config(fn, config)
    if not isinstance(k, Tensor) or k.ndim != 4:
        # check_memory_args gives the full message; the gates' shapes need k's first.
        return check_memory_args(fn, q, k, v, lr, lr, lr, initial_state, chunk_size, config.activation, config.residual, config.layer_norm)
    shape = tuple(k.shape[:3])
    _check_gate(fn, "lr", lr, shape)
    _check_gate(fn, "retain", retain, shape)
    if config.algorithm == "momentum":
        if momentum is None:
            raise ValueError(f"{fn}: algorithm='momentum' needs the momentum gate μ [B, T, H]")
        _check_gate(fn, "momentum", momentum, shape)
    elif momentum is not None:
        raise ValueError(f"{fn}: a momentum gate was given but algorithm is 'gd'; use MirasConfig(algorithm='momentum')")
    if config.bias == "huber":
        if delta is None:
            raise ValueError(f"{fn}: bias='huber' needs the thresholds delta [B, T, H]")
        _check_gate(fn, "delta", delta, shape)
    elif delta is not None:
        raise ValueError(f"{fn}: delta (Huber thresholds) was given but bias is {config.bias!r}")
    state = check_memory_args(fn, q, k, v, lr, lr, lr, _as_state(initial_state, config), chunk_size, config.activation, config.residual, config.layer_norm)
    if config.retain_first and len(state.weights) != 1:
        raise ValueError(f"{fn}: retain_first=True (Gated DeltaNet's order) is defined for a linear memory (depth 1), got depth {len(state.weights)}")
    return state


def _as_state(initial_state: object, config: MirasConfig) -> object:
    """A list of accumulators ``P_0`` becomes a state at a chunk start with zero momentum."""
    if isinstance(initial_state, (list, tuple)) and all(isinstance(w, Tensor) for w in initial_state):
        p = tuple(initial_state)
        return MemoryState(p, tuple(torch.zeros_like(w) for w in p), tuple(retention_map(w, config) for w in p), 0)
    return initial_state


# -- the reference: one token at a time -----------------------------------------------------------
def miras_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    retain: Tensor,
    initial_state: MemoryState | Sequence[Tensor],
    config: MirasConfig = MirasConfig(),
    momentum: Tensor | None = None,
    delta: Tensor | None = None,
    chunk_size: int = 1,
) -> tuple[Tensor, MemoryState]:
    """The Miras update and read, token by token (the specification); arguments as :func:`miras_memory`.

    Per token ``t`` (``c(t)`` = start of ``t``'s chunk)::

        W̄_t = φ(P_{c(t)})                       (retain_first: W̄_t = α_t W̄_{t−1}, W̄ = φ(P_{c(t)}) before the chunk)
        ∇_t = ∇_W ℓ(W̄_t; k_t, v_t)              via torch.func.vjp of M with the bias's error signal
        S_t = μ_t S_{t−1} − η_t ∇_t,  P_t = α_t P_{t−1} + S_t      ("momentum")
        P_t = α_t P_{t−1} − η_t ∇_t                               ("gd")
        y_t = M_{φ(P_t)}(q_t)
    """
    fn = "miras_reference"
    state = check_miras_args(fn, q, k, v, lr, retain, initial_state, config, momentum, delta, chunk_size)
    acc = accumulation_dtype(q.dtype)
    arch = (config.activation, config.residual, config.layer_norm, config.ln_eps)
    p = tuple(t.to(acc) for t in state.weights)
    s = tuple(t.to(acc) for t in state.momentum)
    point = tuple(t.to(acc) for t in state.chunk_start)
    pos = state.position
    qf, kf, vf = (x.to(acc).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]

    def gate(g: Tensor | None) -> Tensor | None:
        return None if g is None else g.to(acc).transpose(1, 2)[..., None, None]  # [B, H, T, 1, 1]

    eta, alpha, mu, dl = gate(lr), gate(retain), gate(momentum), gate(delta)
    outs = []
    for i in range(q.shape[1]):
        if pos == 0:
            point = tuple(retention_map(x, config) for x in p)  # a chunk begins: its gradient point
        if config.retain_first:
            point = tuple(alpha[:, :, i] * x for x in point)
        ki, vi = kf[:, :, i : i + 1], vf[:, :, i : i + 1]
        pred, vjp = torch.func.vjp(lambda ws: memory_forward(ws, ki, *arch), point)
        grads = vjp(error_signal(pred, vi, config, None if dl is None else dl[:, :, i]))[0]
        if config.algorithm == "momentum":
            s = tuple(mu[:, :, i] * s_l - eta[:, :, i] * g_l for s_l, g_l in zip(s, grads))
            p = tuple(alpha[:, :, i] * p_l + s_l for p_l, s_l in zip(p, s))
        else:
            p = tuple(alpha[:, :, i] * p_l - eta[:, :, i] * g_l for p_l, g_l in zip(p, grads))
        w = tuple(retention_map(x, config) for x in p)
        outs.append(memory_forward(w, qf[:, :, i : i + 1], *arch))
        pos = (pos + 1) % chunk_size
    y = torch.cat(outs, 2) if outs else vf
    if pos == 0:
        point = tuple(retention_map(x, config) for x in p)
    return y.transpose(1, 2).to(q.dtype), MemoryState(p, s, point, pos)


# -- chunked: every token of a chunk at once ------------------------------------------------------
def _chunk_gradients(
    k: Tensor, v: Tensor, point: Sequence[Tensor], scale: Tensor | None, config: MirasConfig, delta: Tensor | None
) -> tuple[list[Tensor], list[Tensor]]:
    """Layer inputs ``X_{l−1} [B, H, c, d_in]`` and pre-activation gradients ``Δ_l [B, H, c, d_out]``.

    Token ``s``'s gradient of layer ``l`` is ``X_{l−1}[s]ᵀ Δ_l[s]`` (never materialised here).
    ``scale [B, H, c]`` multiplies the gradient point per token (retain_first, depth 1).
    """
    depth = len(point)
    xs, zs = [k], []
    h = k
    for i, w in enumerate(point):
        z = h @ w
        if scale is not None:
            z = scale.unsqueeze(-1) * z  # depth 1: M_{γW}(k) = γ (k W)
        zs.append(z)
        if i < depth - 1:
            h = _act(config.activation, z)
            xs.append(h)
    out, rstd = _layer_norm(z, config.ln_eps) if config.layer_norm else (z, None)
    pred = out + k if config.residual else out
    d = error_signal(pred, v, config, None if delta is None else delta.unsqueeze(-1))
    if config.layer_norm:  # backward of the affine-free LayerNorm
        d = rstd * (d - d.mean(-1, keepdim=True) - out * (d * out).mean(-1, keepdim=True))
    deltas = [d]
    for i in range(depth - 1, 0, -1):
        d = (d @ point[i].transpose(-1, -2)) * _act_grad(config.activation, zs[i - 1])
        deltas.append(d)
    deltas.reverse()
    return xs, deltas


def _chunk_segment(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    log_alpha: Tensor,
    log_mu: Tensor | None,
    delta: Tensor | None,
    point: Sequence[Tensor],
    p: Sequence[Tensor],
    s: Sequence[Tensor],
    config: MirasConfig,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """One segment (``c`` tokens inside one chunk, all ``[B, H, c, ·]``).

    Returns ``(y, P after the segment, S after it, the gradient point after it)``.
    """
    scale = log_alpha.cumsum(-1).exp() if config.retain_first else None  # W̄_t = (Π α) W̄
    xs, deltas = _chunk_gradients(k, v, point, scale, config, delta)
    if log_mu is not None:
        g_mat, n_mat, beta, m, f = chunk_coefficients(eta, log_alpha, log_mu)
    else:  # plain GD: P_t = β_t P_0 − Σ_s A_ts η_s ∇_s
        g_mat = segment_sum(log_alpha).exp() * eta.unsqueeze(-2)
        beta = log_alpha.cumsum(-1).exp()
    bt = beta[..., None, None]  # [B, H, c, 1, 1]
    p_all, p_new, s_new = [], [], []
    for i in range(len(p)):
        # Accumulators of every token: P_t = β_t P_0 (+ f_t S_0) − Σ_s G_ts X_{l−1}[s]ᵀ Δ_l[s].
        upd = torch.einsum("bhts,bhsi,bhsj->bhtij", g_mat, xs[i], deltas[i])
        pt = bt * p[i].unsqueeze(2) - upd
        if log_mu is not None:
            pt = pt + f[..., None, None] * s[i].unsqueeze(2)
            n_last = n_mat[..., -1, :].unsqueeze(-1)
            s_new.append(m[..., -1, None, None] * s[i] - (n_last * xs[i]).transpose(-1, -2) @ deltas[i])
        else:
            s_new.append(s[i])
        p_all.append(pt)
        p_new.append(pt[:, :, -1])
    # Read every token with its own weights φ(P_t): [B, H, c, 1, d] @ [B, H, c, d, d'].
    h = q.unsqueeze(-2)
    for i, pt in enumerate(p_all):
        h = h @ retention_map(pt, config)
        if i < len(p_all) - 1:
            h = _act(config.activation, h)
    y = h.squeeze(-2)
    if config.layer_norm:
        y = _layer_norm(y, config.ln_eps)[0]
    if config.residual:
        y = y + q
    if scale is not None:
        point = [scale[..., -1, None, None] * w for w in point]
    return y, p_new, s_new, list(point)


def miras_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    retain: Tensor,
    initial_state: MemoryState | Sequence[Tensor],
    config: MirasConfig = MirasConfig(),
    momentum: Tensor | None = None,
    delta: Tensor | None = None,
    chunk_size: int = 1,
) -> tuple[Tensor, MemoryState]:
    """Miras with all tokens of a chunk processed at once; arguments and semantics as :func:`miras_reference`.

    Materialises the accumulators of every token of a chunk (``[B, H, c, d_in, d_out]`` per layer),
    because the retention map is applied at every token; the loop runs over chunks only.
    """
    fn = "miras_chunked"
    state = check_miras_args(fn, q, k, v, lr, retain, initial_state, config, momentum, delta, chunk_size)
    acc = accumulation_dtype(q.dtype)
    p = [t.to(acc) for t in state.weights]
    s = [t.to(acc) for t in state.momentum]
    point = [t.to(acc) for t in state.chunk_start]
    pos = state.position
    qh, kh, vh = (x.to(acc).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    eta = lr.to(acc).transpose(1, 2)  # [B, H, T]
    la = torch.log(retain.to(acc)).transpose(1, 2)
    lm = None if momentum is None else torch.log(momentum.to(acc)).transpose(1, 2)
    dl = None if delta is None else delta.to(acc).transpose(1, 2)
    total = q.shape[1]
    outs, start = [], 0
    while start < total:
        if pos == 0:
            point = [retention_map(x, config) for x in p]
        c = min(chunk_size - pos, total - start)
        sl = slice(start, start + c)
        y, p, s, point = _chunk_segment(
            qh[:, :, sl], kh[:, :, sl], vh[:, :, sl], eta[..., sl], la[..., sl],
            None if lm is None else lm[..., sl], None if dl is None else dl[..., sl], point, p, s, config,
        )  # fmt: skip
        outs.append(y)
        start, pos = start + c, (pos + c) % chunk_size
    if pos == 0:
        point = [retention_map(x, config) for x in p]
    y = torch.cat(outs, 2) if outs else vh
    return y.transpose(1, 2).to(q.dtype), MemoryState(tuple(p), tuple(s), tuple(point), pos)


# -- WY: the exact delta rule in blocks ----------------------------------------------------------
def wy_supported(config: MirasConfig, depth: int, chunk_size: int) -> bool:
    """Whether :func:`miras_wy` computes this configuration (else use ``"chunked"``)."""
    return (
        depth == 1
        and chunk_size == 1
        and config.bias in ("l2", "dot")
        and config.retention == "l2"
        and config.algorithm == "gd"
        and not config.residual
        and not config.layer_norm
    )


def wy_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    w0: Tensor,
    block_size: int,
    log_retain: Tensor | None = None,
    retain_first: bool = False,
    dot_bias: bool = False,
) -> tuple[Tensor, Tensor]:
    """The exact (gated) delta rule in blocks: DeltaNet's chunkwise algorithm (Yang et al., 2024).

    The one implementation of the WY / UT-transform form, shared by :func:`miras_wy` and
    :func:`mnemotorch.ops.linear.hebbian_memory` (``rule="delta"``). Row-vector convention, the
    memory is ``W [Dk, Dv]`` and reads ``y_t = q_t W_t`` (token ``t``'s own write included)::

        W_t = α_t W_{t−1} + k_tᵀ η_t (v_t − k_t W̄_t)        (dot_bias: W_t = α_t W_{t−1} + η_t k_tᵀ v_t)

    with ``W̄_t = W_{t−1}``, or ``α_t W_{t−1}`` if ``retain_first`` (Gated DeltaNet's order);
    ``log_retain=None`` means α ≡ 1 (DeltaNet: no decay terms are formed). See :func:`miras_wy`
    for the block equations. All blocks' triangular solves and intra-block products run at once
    (the last block is zero-padded: a zero key, η and log α write nothing); the loop over blocks
    only carries ``W``: ``U_c = Ũ_c − K̃_c W_c`` and ``W_{c+1} = γ_L W_c + (D_L ⊙ K_c)ᵀ U_c``, with
    ``Ũ = (I + A)⁻¹ (η ⊙ V)`` and ``K̃ = (I + A)⁻¹ (η λ ⊙ K)`` from one solve.

    Args:
        q, k: ``[B, H, T, Dk]``; v: ``[B, H, T, Dv]``; eta: ``[B, H, T]`` (η_t); w0: ``[B, H, Dk, Dv]``;
        block_size: ``L``, tokens per block (any ``T``; exact for every ``L``, only rounding differs);
        log_retain: ``[B, H, T]`` log α_t, or ``None``. All tensors in one (accumulation) dtype.

    Returns:
        ``(y [B, H, T, Dv], W_T [B, H, Dk, Dv])``.
    """
    b, h, t, dk = k.shape
    if t == 0:
        return v, w0
    n_len = min(block_size, t)  # a block longer than the sequence would only add padding
    n_blk = -(-t // n_len)
    pad = n_blk * n_len - t
    blocks = lambda x: F.pad(x, (0, 0, 0, pad)).view(b, h, n_blk, n_len, x.shape[-1])  # noqa: E731
    qb, kb, vb = blocks(q), blocks(k), blocks(v)  # [B, H, N, L, D]
    eb = F.pad(eta, (0, pad)).view(b, h, n_blk, n_len)
    causal = torch.ones(n_len, n_len, dtype=torch.bool, device=k.device).tril()
    scores = qb @ kb.transpose(-1, -2)  # [B, H, N, L, L]
    if log_retain is None:
        gamma = decay_last = None
        reads = scores.masked_fill(~causal, 0.0)
        dbar, lam = None, None
    else:
        lb = F.pad(log_retain, (0, pad)).view(b, h, n_blk, n_len)
        seg = segment_sum(lb)  # Σ_{s<r≤t} log α_r, −inf above the diagonal
        decay, cum = seg.exp(), lb.cumsum(-1)
        gamma, decay_last = cum.exp(), decay[..., -1, :]
        reads = decay * scores
        if retain_first:
            lam, dbar = gamma, decay
        else:  # gradient at W_{t−1}: one α fewer on both terms
            lam, dbar = (cum - lb).exp(), (seg - lb.unsqueeze(-1)).exp()
    ev = eb.unsqueeze(-1) * vb
    if dot_bias:
        u_v, u_k = ev, None
    else:
        kk = kb @ kb.transpose(-1, -2)
        a = eb.unsqueeze(-1) * (kk if dbar is None else dbar * kk)
        a = a.masked_fill(~causal.tril(-1), 0.0) + torch.eye(n_len, dtype=a.dtype, device=a.device)
        ek = eb.unsqueeze(-1) * (kb if lam is None else lam.unsqueeze(-1) * kb)
        solved = torch.linalg.solve_triangular(a, torch.cat([ev, ek], -1), upper=False, unitriangular=True)
        u_v, u_k = solved[..., : vb.shape[-1]], solved[..., vb.shape[-1] :]
    k_out = kb if decay_last is None else decay_last.unsqueeze(-1) * kb  # [B, H, N, L, Dk]
    w, states, us = w0, [], []
    for c in range(n_blk):
        u = u_v[:, :, c] if u_k is None else u_v[:, :, c] - u_k[:, :, c] @ w
        states.append(w)
        us.append(u)
        w_kept = w if gamma is None else gamma[:, :, c, -1, None, None] * w
        w = w_kept + k_out[:, :, c].transpose(-1, -2) @ u
    w_in, u_all = torch.stack(states, 2), torch.stack(us, 2)  # [B, H, N, Dk, Dv], [B, H, N, L, Dv]
    carried = qb @ w_in
    if gamma is not None:
        carried = gamma.unsqueeze(-1) * carried
    y = (carried + reads @ u_all).reshape(b, h, n_blk * n_len, -1)[:, :, :t]
    return y, w


def miras_wy(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    retain: Tensor,
    initial_state: MemoryState | Sequence[Tensor],
    config: MirasConfig = MirasConfig(),
    block_size: int = 64,
    chunk_size: int = 1,
) -> tuple[Tensor, MemoryState]:
    """Linear memory, ℓ2 (delta rule) or dot (linear attention) bias, decay retention, ``C = 1``.

    Inside a block of ``L`` tokens entering with ``W_0 [Dk, Dv]``, with ``γ_t = Π_{r≤t} α_r`` and
    ``D_ts = γ_t / γ_s`` (``s ≤ t``), every state is ``W_t = γ_t W_0 + Σ_{s≤t} D_ts k_sᵀ u_s``: the
    delta rule ``W_t = α_t W_{t−1} + k_tᵀ η_t (v_t − k_t W̄_t)`` makes the pseudo-values ``u`` the
    solution of a unit lower-triangular system (the UT transform of DeltaNet / Gated DeltaNet)::

        (I + A) U = η ⊙ (V − λ ⊙ K W_0),   A_ts = η_t D̄_ts (k_t · k_s)  (s < t)

    with the gradient point ``W̄_t = α_t W_{t−1}`` (retain_first: ``λ_t = γ_t``, ``D̄ = D``) or
    ``W_{t−1}`` (``λ_t = γ_{t−1}``, ``D̄_ts = γ_{t−1}/γ_s``). The dot bias has ``U = η ⊙ V``. Reads:
    ``Y = γ ⊙ (Q W_0) + (D ∘ Q Kᵀ) U``; the block leaves ``W_L = γ_L W_0 + (D_L ⊙ K)ᵀ U``.
    Exact for any block size (only rounding differs). The blocks run in :func:`wy_delta_rule`,
    which ``hebbian_memory(rule="delta")`` shares.
    """
    fn = "miras_wy"
    state = check_miras_args(fn, q, k, v, lr, retain, initial_state, config, None, None, chunk_size)
    if not wy_supported(config, len(state.weights), chunk_size):
        raise ValueError(
            f"{fn}: the WY form needs a linear memory (depth 1, no residual/layer_norm), bias 'l2' or 'dot', retention 'l2', "
            f"algorithm 'gd' and chunk_size=1; got {config} with depth {len(state.weights)}, chunk_size={chunk_size}"
        )
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"{fn}: block_size must be an int >= 1, got {block_size!r}")
    acc = accumulation_dtype(q.dtype)
    qh, kh, vh = (x.to(acc).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    y, w = wy_delta_rule(
        qh, kh, vh, lr.to(acc).transpose(1, 2), state.weights[0].to(acc), block_size,
        log_retain=torch.log(retain.to(acc)).transpose(1, 2), retain_first=config.retain_first, dot_bias=config.bias == "dot",
    )  # fmt: skip
    # Plain GD never touches the momentum slot: hand it back as it came (zeros from a list of weights).
    return y.transpose(1, 2).to(q.dtype), MemoryState((w,), (state.momentum[0].to(acc),), (w,), 0)


# -- the public function -------------------------------------------------------------------------
def miras_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    retain: Tensor,
    initial_state: MemoryState | Sequence[Tensor],
    config: MirasConfig = MirasConfig(),
    momentum: Tensor | None = None,
    delta: Tensor | None = None,
    chunk_size: int = 1,
    mode: str = "auto",
    block_size: int = 64,
    backend: str = "auto",
) -> tuple[Tensor, MemoryState]:
    """Miras memory: write ``(k_t, v_t)`` by online optimisation of the chosen bias, read ``M_t(q_t)``.

    Args:
        q: ``[B, T, H, Dk]`` queries; k: ``[B, T, H, Dk]`` keys; v: ``[B, T, H, Dv]`` values.
        lr: ``[B, T, H]`` learning rates η_t (≥ 0).
        retain: ``[B, T, H]`` retention gates α_t ∈ (0, 1] (1 = keep everything).
        initial_state: a :class:`MemoryState` from a previous call, or the initial accumulators
            ``P_0``: one ``[B, H, d_in, d_out]`` tensor per layer (``Dk -> ... -> Dv``; the weights
            are ``φ(P_0)``).
        config: the four choices, a :class:`MirasConfig` (``INSTANCES`` holds the named models).
        momentum: ``[B, T, H]`` momentum decay μ_t ∈ (0, 1], iff ``config.algorithm == "momentum"``.
        delta: ``[B, T, H]`` Huber thresholds δ_t > 0, iff ``config.bias == "huber"``.
        chunk_size: ``C``: gradients of a chunk's tokens at its start weights (1 = exact online descent).
            Any ``T`` works; a partial chunk is carried in the state.
        mode: ``"recurrent"`` (token loop), ``"chunked"``, ``"wy"`` (linear delta rule / linear
            attention with decay, ``C = 1``) or ``"auto"`` (``"wy"`` where it applies, else ``"chunked"``).
        block_size: tokens per block of the WY form.
        backend: ``"auto"`` or ``"reference"`` (PyTorch only so far).

    Returns:
        ``(y [B, T, H, Dv], MemoryState)``: ``weights`` are the accumulators ``P_t``, ``momentum`` the
        ``S_t``, ``chunk_start`` the gradient point ``W̄`` (weights space), ``position`` the offset in the
        current chunk. ``y`` in the dtype of ``q``, the state in float32 for half inputs.
    """
    fn = "miras_memory"
    if backend not in ("auto", "reference"):
        raise ValueError(f"{fn}: backend must be 'auto' or 'reference' (no kernel yet), got {backend!r}")
    if mode not in MIRAS_MODES:
        raise ValueError(f"{fn}: mode must be one of {MIRAS_MODES}, got {mode!r}")
    device_type = q.device.type if isinstance(q, Tensor) else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        if mode == "recurrent":
            return miras_reference(q, k, v, lr, retain, initial_state, config, momentum, delta, chunk_size)
        if mode == "auto":
            state = check_miras_args(fn, q, k, v, lr, retain, initial_state, config, momentum, delta, chunk_size)
            mode = "wy" if wy_supported(config, len(state.weights), chunk_size) else "chunked"
        if mode == "wy":
            if momentum is not None or delta is not None:
                raise ValueError(f"{fn}: mode='wy' takes no momentum or delta gates")
            return miras_wy(q, k, v, lr, retain, initial_state, config, block_size, chunk_size)
        return miras_chunked(q, k, v, lr, retain, initial_state, config, momentum, delta, chunk_size)
