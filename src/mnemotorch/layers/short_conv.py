"""Gated causal short convolution: the ``short_conv`` mixer (BASED's "gated convolution" layers).

The form implemented (per token ``t``; ``⊙`` is the elementwise product)::

    [u_t, g_t] = W_in x_t + b_in                      u_t, g_t ∈ R^{E·dim}   (E = ``expand``)
    c_t        = Σ_{j=0}^{K-1} w_j ⊙ u_{t-K+1+j}       depthwise causal conv, kernel K; u_s = 0 for s < 0
    y_t        = W_out (act(c_t) ⊙ gate(g_t)) + b_out

with ``act = SiLU`` and ``gate = identity`` by default. That is the gated-convolution block of the
BASED reference models (Arora et al., 2024, "Simple linear attention language models balance the
recall-throughput tradeoff": the ``BaseConv`` layers that fill 3 of every 5 layers of the 360M / 1.3B
models, kernel 3, inner width ``2·dim``), which in turn is the short-convolution-times-gate pattern
of H3 (Fu et al., 2023, "Hungry Hungry Hippos": a shift SSM, i.e. a short causal convolution,
multiplied elementwise by a projection of the input). ``gate="sigmoid"`` gives the GLU-style
variant (Dauphin et al., 2017).

The conv weight ``w [E·dim, K]`` is laid out like ``nn.Conv1d``'s depthwise weight with ``K - 1``
zeros of left padding: ``w[:, K-1]`` multiplies the current token. The state is the last ``K - 1``
conv inputs ``u`` per channel -- all a causal kernel of width ``K`` needs -- so streaming equals one
call exactly, and ``state_size = (K - 1) · E · dim`` whatever the length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.compiled import compiled_over_length
from .base import Mixer, MixerState
from .registry import register_mixer

_ACTIVATIONS = {"identity": lambda t: t, "silu": F.silu, "sigmoid": torch.sigmoid}


@dataclass
class ShortConvState(MixerState):
    """The last ``K - 1`` conv inputs ``u [B, K-1, E·dim]`` (zeros before the sequence starts)."""

    u: Tensor


def causal_depthwise_conv(u: Tensor, weight: Tensor, past: Tensor | None = None, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Causal depthwise 1-D convolution with a carried input window.

    Args:
        u: ``[B, T, C]`` inputs.
        weight: ``[C, K]``; ``weight[:, K-1]`` multiplies the current token, ``weight[:, 0]`` the
            token ``K - 1`` steps back.
        past: ``[B, K-1, C]``, the ``K - 1`` inputs before ``u`` (``None``: zeros, the sequence start).
        bias: ``[C]`` or ``None``.

    Returns:
        ``(c [B, T, C], new_past [B, K-1, C])`` with ``c_t = Σ_j weight[:, j] ⊙ u_{t-K+1+j} (+ bias)``.
    """
    b, t, ch = u.shape
    k = weight.shape[-1]
    if past is None:
        past = u.new_zeros(b, k - 1, ch)
    ext = torch.cat([past.to(u.dtype), u], dim=1)  # [B, K-1+T, C]
    # K is tiny (3-4): K shifted multiply-adds are exact, dtype-agnostic and need no conv kernel.
    c = ext[:, 0:t] * weight[:, 0]
    for j in range(1, k):
        c = c + ext[:, j : j + t] * weight[:, j]
    if bias is not None:
        c = c + bias
    # clone: a slice would keep the whole [B, K-1+T, C] buffer alive inside a cache.
    return c, ext[:, ext.shape[1] - (k - 1) :].clone()


def conv_silu_qkv(
    qkv: Tensor, weight: Tensor | None, past: Tensor | None, num_heads: int, head_dim: int
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The Titans / DeltaNet input path shared by the memory mixers: depthwise causal conv over the
    fused projections (skipped when ``weight`` is None), SiLU, split into heads, ℓ2-normalised q, k.

    Args:
        qkv: ``[B, T, 3·H·D]`` fused q/k/v projections.
        weight, past: conv taps ``[3·H·D, K]`` and the carried window ``[B, K−1, 3·H·D]``.

    Returns:
        ``q, k, v [B, T, H, D]`` and the new conv window (``past`` when there is no conv).
    """
    b, t, _ = qkv.shape
    conv = past
    if weight is not None:
        qkv, conv = causal_depthwise_conv(qkv, weight, past)
    q, k, v = F.silu(qkv).view(b, t, 3, num_heads, head_dim).unbind(2)
    return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, conv


def norm_silu_gate(o: Tensor, g: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The memory mixers' output gate: ``RMSNorm(o) ⊙ SiLU(g)``, the norm per head over ``o [B, T, H, D]`` (``weight
    [D]``), the gate ``g [B, T, H·D]``."""
    return F.rms_norm(o, (o.shape[-1],), weight, eps) * F.silu(g).view(o.shape)


def compiled_conv_silu_qkv(backend="inductor"):
    """:func:`conv_silu_qkv` through ``torch.compile`` with only the length symbolic
    (:func:`~mnemotorch.ops.compiled.compiled_over_length`): inductor fuses the conv's shifted multiply-adds, the SiLU
    and the ℓ2 norms into a few kernels, forward and backward (eager, each is a pass over ``[B, T, 3·H·D]``, several of
    them strided). The same equations; in 16-bit dtypes the fused kernels keep the intermediates in fp32 where eager
    rounds after each op, so the two differ by that rounding. One graph serves every length > 1; a length of 1 (a
    decode step) compiles once more. (With ``dynamic=True``, every size symbolic, the backward's one kernel over the
    stacked ``dq, dk, dv`` took 1.1 ms at 16K × 3072 on an H100 and the compiled backward 2.1 ms; 0.18 / ~0.8 ms with
    only the length symbolic.)
    """
    return compiled_over_length(conv_silu_qkv, (0,), backend)


@register_mixer("short_conv")
class ShortConv(Mixer):
    """Gated causal depthwise short convolution (BASED / H3 gated convolution).

    ``y_t = W_out( act(conv_K(u)_t) ⊙ gate(g_t) )`` with ``[u_t, g_t] = W_in x_t``.

    Args:
        dim: model width.
        num_heads: unused by the computation (the conv is per channel); kept for the Mixer protocol.
        kernel_size: ``K``, taps of the causal conv, the current token included (default 3, as BASED).
        expand: ``E``, the inner width is ``E · dim`` (default 2: BASED's 360M ``expand_proj=4``
            projection splits into a ``2·dim`` conv branch and a ``2·dim`` gate branch).
        activation: applied to the conv output: ``"silu"`` (default, BASED) or ``"identity"``.
        gate: applied to the gate branch: ``"identity"`` (default, BASED / H3), ``"sigmoid"`` (GLU) or ``"silu"``.
        bias: biases on the input and output projections (default True, as the BASED reference).
        conv_bias: a per-channel bias on the conv (default False, as the BASED reference).

    State: the last ``K - 1`` conv inputs, ``(K - 1) · E · dim`` elements per sequence.
    """

    description = "gated causal depthwise short convolution (kernel 3); last K-1 inputs as state (BASED, Arora et al. 2024; H3, Fu et al. 2023)"
    example_kwargs = {"kernel_size": 4, "gate": "sigmoid"}

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 3,
        expand: int = 2,
        activation: str = "silu",
        gate: str = "identity",
        bias: bool = True,
        conv_bias: bool = False,
    ):
        super().__init__(dim, num_heads)
        for name, value in (("kernel_size", kernel_size), ("expand", expand)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if activation not in ("silu", "identity"):
            raise ValueError(f"activation must be one of ['identity', 'silu'], got {activation!r}")
        if gate not in ("identity", "sigmoid", "silu"):
            raise ValueError(f"gate must be one of ['identity', 'sigmoid', 'silu'], got {gate!r}")
        for name, value in (("bias", bias), ("conv_bias", conv_bias)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        self.kernel_size = kernel_size
        self.expand = expand
        self.activation = activation
        self.gate = gate
        self.inner = expand * dim
        self.in_proj = nn.Linear(dim, 2 * self.inner, bias=bias)
        self.out_proj = nn.Linear(self.inner, dim, bias=bias)
        # nn.Conv1d's default init for a depthwise kernel: fan_in = K.
        bound = 1.0 / math.sqrt(kernel_size)
        self.conv_weight = nn.Parameter(torch.empty(self.inner, kernel_size).uniform_(-bound, bound))
        self.conv_bias = nn.Parameter(torch.empty(self.inner).uniform_(-bound, bound)) if conv_bias else None

    def init_state(self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ShortConvState:
        dtype = dtype or self.in_proj.weight.dtype
        device = device or self.in_proj.weight.device
        return ShortConvState(seen_tokens=0, u=torch.zeros(batch_size, self.kernel_size - 1, self.inner, device=device, dtype=dtype))

    def state_size(self, seq_len: int) -> int:
        return (self.kernel_size - 1) * self.inner

    def forward(self, x: Tensor, state: ShortConvState | None = None) -> tuple[Tensor, ShortConvState]:
        """``x [B, T, dim]`` -> ``(y [B, T, dim], state)``."""
        self.check_input(x, state)
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        u, g = self.in_proj(x).chunk(2, dim=-1)
        c, past = causal_depthwise_conv(u, self.conv_weight, state.u, self.conv_bias)
        y = self.out_proj(_ACTIVATIONS[self.activation](c) * _ACTIVATIONS[self.gate](g))
        return y, ShortConvState(seen_tokens=state.seen_tokens + x.shape[1], u=past)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, expand={self.expand}, activation={self.activation!r}, gate={self.gate!r}"
