"""Miras mixers: ``moneta``, ``yaad``, ``memora`` (Behrouz et al., 2025), ``delta_net``, ``gated_delta_net``.

All five are instances of one framework, :func:`mnemotorch.ops.memory.miras_memory`: a per-head
memory fitted to ``(k_t, v_t)`` while the sequence is read (memory architecture × attentional bias ×
retention × learning algorithm). They share one layer (per token, per head ``h``)::

    q, k, v = SiLU(conv_K(x W_Q)), SiLU(conv_K(x W_K)), SiLU(conv_K(x W_V))   depthwise causal convs
    q, k    = q / ‖q‖, k / ‖k‖                                                ℓ2-normalised
    o_t     = miras_memory(q, k, v, gates)_t                                   the memory read M_t(q_t)
    y_t     = W_O (RMSNorm(o_t) ⊙ SiLU(x_t W_G))                              output norm + gate

and differ in the memory and the gates:

============== ================== =========== ============== ========= ======================================
mixer          memory             bias        retention      algorithm gates (per token and head)
============== ================== =========== ============== ========= ======================================
delta_net      matrix ``d × d``   ℓ2 (delta)  none           GD, C = 1 β = σ(x w_β)
gated_delta_net matrix ``d × d``  ℓ2 (delta)  ℓ2, decay first GD, C = 1 β = σ(x w_β), α = exp(−e^{A} softplus(x w_α + b))
moneta         2-layer MLP        ℓp (p = 3)  ℓq (q = 4)     GD        η = η_max σ(·), α = σ(·)
yaad           2-layer MLP        Huber       ℓ2 (decay)     GD        η, α, δ = softplus(·)
memora         2-layer MLP        ℓ2          KL (softmax)   GD        η, α
============== ================== =========== ============== ========= ======================================

The MLP memories are ``M(x) = x + LN(W_2 GELU(W_1 x))`` with hidden width ``expansion · d`` (Miras
§5.3), their initial accumulators ``P_0`` learned parameters; chunks of ``chunk_size`` tokens freeze
the gradients at the chunk-start weights (a model hyperparameter; the paper trains with 16 or 64).
The matrix memories start empty and run the exact delta rule (C = 1) in its WY block form.

State (:class:`MirasLayerState`): the accumulators ``P_t`` flattened to ``[B, H, P]``, the gradient
point (chunk-start weights, only for ``chunk_size > 1``), the momentum (only with ``momentum=True``)
and the last ``K − 1`` conv inputs ``[B, K−1, 3·dim]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.memory import MAX_DEPTH, MemoryState, accumulation_dtype, memory_hidden_shapes, miras_instance, miras_memory, retention_map
from .base import Mixer, MixerState
from .registry import register_mixer
from .short_conv import conv_silu_qkv, norm_silu_gate


@dataclass
class MirasLayerState(MixerState):
    """Accumulators ``[B, H, P]``; gradient point and momentum ``[B, H, P]`` or ``None``; conv inputs ``[B, K−1, 3·dim]``."""

    weights: Tensor
    chunk_start: Tensor | None
    momentum: Tensor | None
    conv: Tensor


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _check_int(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_open(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
        raise ValueError(f"{name} must be a float in ({low}, {high}), got {value!r}")
    return float(value)


class _MirasMixer(Mixer):
    """Shared projections, convs, normalisation, output gate and state handling of the Miras mixers.

    Subclasses set ``self.config`` (a :class:`MirasConfig`), ``self.memory_shapes``, the gate
    projection and implement ``_gates(x) -> dict`` (``lr``, ``retain`` and optionally ``momentum``,
    ``delta``, each ``[B, T, H]``) and ``_initial_accumulators() -> [H, P]``.
    """

    chunk_size: int = 1
    mode: str = "auto"
    block_size: int = 64

    def _init_common(self, conv_size: int, output_gate: bool) -> None:
        _check_int("conv_size", conv_size, 0)
        if not isinstance(output_gate, bool):
            raise TypeError(f"output_gate must be a bool, got {output_gate!r}")
        self.conv_size, self.output_gate = conv_size, output_gate
        dim, d = self.dim, self.head_dim
        self.params_per_head = sum(a * b for a, b in self.memory_shapes)
        self.qkv_proj = nn.Linear(dim, 3 * dim, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(3 * dim, conv_size)) if conv_size > 0 else None
        if output_gate:
            self.out_norm = nn.RMSNorm(d, eps=1e-6)
            self.g_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def _reset_conv(self) -> None:
        if self.conv_weight is not None:
            bound = 1.0 / math.sqrt(self.conv_size)  # nn.Conv1d's default for a depthwise kernel
            self.conv_weight.uniform_(-bound, bound)

    # -- state ---------------------------------------------------------------------------------
    @property
    def _keeps_point(self) -> bool:
        return self.chunk_size > 1

    @property
    def _keeps_momentum(self) -> bool:
        return self.config.algorithm == "momentum"

    def _initial_accumulators(self) -> Tensor:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def init_state(self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MirasLayerState:
        device = device or self.o_proj.weight.device
        acc = accumulation_dtype(dtype or self.o_proj.weight.dtype)
        p = self._initial_accumulators().to(device=device, dtype=acc).unsqueeze(0).expand(batch_size, -1, -1)
        point = self._flatten(tuple(retention_map(w, self.config) for w in self._unflatten(p))) if self._keeps_point else None
        return MirasLayerState(
            seen_tokens=0,
            weights=p,
            chunk_start=point,
            momentum=torch.zeros_like(p) if self._keeps_momentum else None,
            conv=torch.zeros(batch_size, max(self.conv_size - 1, 0), 3 * self.dim, device=device, dtype=dtype or self.o_proj.weight.dtype),
        )

    def state_size(self, seq_len: int) -> int:
        copies = 1 + int(self._keeps_point) + int(self._keeps_momentum)
        return copies * self.num_heads * self.params_per_head + max(self.conv_size - 1, 0) * 3 * self.dim

    def _unflatten(self, flat: Tensor) -> tuple[Tensor, ...]:
        sizes = [a * b for a, b in self.memory_shapes]
        return tuple(p.unflatten(-1, shape) for p, shape in zip(flat.split(sizes, dim=-1), self.memory_shapes))

    @staticmethod
    def _flatten(ws: tuple[Tensor, ...]) -> Tensor:
        return torch.cat([w.flatten(2) for w in ws], dim=-1)

    # -- forward -------------------------------------------------------------------------------
    def _gates(self, x: Tensor) -> dict[str, Tensor]:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def forward(self, x: Tensor, state: MirasLayerState | None = None) -> tuple[Tensor, MirasLayerState]:
        """``x [B, T, dim]`` -> ``(y [B, T, dim], state)``."""
        self.check_input(x, state)
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        b, t, _ = x.shape
        h, d = self.num_heads, self.head_dim
        q, k, v, conv = conv_silu_qkv(self.qkv_proj(x), self.conv_weight, state.conv, h, d)
        gates = self._gates(x)

        p = self._unflatten(state.weights)
        point = self._unflatten(state.chunk_start) if state.chunk_start is not None else tuple(retention_map(w, self.config) for w in p)
        s = self._unflatten(state.momentum) if state.momentum is not None else tuple(torch.zeros_like(w) for w in p)
        memory = MemoryState(p, s, point, state.seen_tokens % self.chunk_size)
        o, memory = miras_memory(
            q, k, v, gates["lr"], gates["retain"], memory, self.config,
            momentum=gates.get("momentum"), delta=gates.get("delta"),
            chunk_size=self.chunk_size, mode=self.mode, block_size=self.block_size,
        )  # fmt: skip
        if self.output_gate:
            o = norm_silu_gate(o, self.g_proj(x), self.out_norm.weight, self.out_norm.eps)
        y = self.o_proj(o.reshape(b, t, h * d))
        new_state = MirasLayerState(
            seen_tokens=state.seen_tokens + t,
            weights=self._flatten(memory.weights),
            chunk_start=self._flatten(memory.chunk_start) if self._keeps_point else None,
            momentum=self._flatten(memory.momentum) if self._keeps_momentum else None,
            conv=conv,
        )
        return y, new_state


# -- the linear (matrix) memories: DeltaNet and Gated DeltaNet -----------------------------------
@register_mixer("delta_net")
class DeltaNet(_MirasMixer):
    """DeltaNet (Schlag et al., 2021; Yang et al., 2024): the delta rule with a learned per-token β.

    ``S_t = S_{t−1}(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ``, ``o_t = S_t q_t``, ``S_0 = 0``: Miras with a
    matrix memory, the ℓ2 attentional bias, no retention and GD at ``C = 1`` (exact online descent).

    Args:
        dim, num_heads: model width and heads (``Dk = Dv = head_dim``).
        conv_size: taps of the depthwise causal convs on q/k/v (default 4; 0 disables them).
        output_gate: RMSNorm the read and gate it with ``SiLU(x W_G)`` before ``W_O`` (default True).
        block_size: tokens per block of the WY (UT-transform) form; changes rounding only.
        init_beta: the value σ(b_β) the step sizes start at (default 0.5).

    ``state_size``: ``H · d² + (K − 1) · 3 · dim``, whatever the length.
    """

    description = "DeltaNet: delta-rule matrix memory, S_t = S_{t-1}(I - b_t k_t k_t^T) + b_t v_t k_t^T, WY block form (Yang et al. 2024; Miras instance)"
    example_kwargs = {"conv_size": 3, "block_size": 8}
    demo_kwargs = {"block_size": 32}
    gated = False
    instance = "delta_net"

    def __init__(self, dim: int, num_heads: int, conv_size: int = 4, output_gate: bool = True, block_size: int = 64, init_beta: float = 0.5):
        super().__init__(dim, num_heads)
        _check_int("block_size", block_size, 1)
        self.init_beta = _check_open("init_beta", init_beta, 0.0, 1.0)
        self.block_size = block_size
        self.config = miras_instance(self.instance)
        d, h = self.head_dim, num_heads
        self.memory_shapes = memory_hidden_shapes(d, d, 1, d)
        self._init_common(conv_size, output_gate)
        self.b_proj = nn.Linear(dim, h, bias=True)  # β logits per head
        if self.gated:
            self.a_proj = nn.Linear(dim, h, bias=False)
            self.dt_bias = nn.Parameter(torch.empty(h))
            self.A_log = nn.Parameter(torch.empty(h))
        self.reset_mixer_parameters()

    def reset_mixer_parameters(self) -> None:
        """Initialise what generic ``nn.Linear`` initialisation gets wrong (called by the HF model too)."""
        with torch.no_grad():
            self._reset_conv()
            self.b_proj.bias.fill_(_logit(self.init_beta))
            if self.gated:
                # Mamba-2's decay parametrisation: A ∈ [1, 16], softplus(dt_bias) = dt ∈ [1e-3, 1e-1] log-uniform.
                self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
                dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)))
                self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def _initial_accumulators(self) -> Tensor:
        return self.o_proj.weight.new_zeros(self.num_heads, self.params_per_head)  # S_0 = 0

    def _gates(self, x: Tensor) -> dict[str, Tensor]:
        # Gates in the accumulation dtype: bf16 rounds a retain gate near 1 onto 1.
        xa = x.to(accumulation_dtype(x.dtype))
        beta = torch.sigmoid(F.linear(xa, self.b_proj.weight.to(xa.dtype), self.b_proj.bias.to(xa.dtype)))
        if not self.gated:
            return {"lr": beta, "retain": torch.ones_like(beta)}
        a = F.linear(xa, self.a_proj.weight.to(xa.dtype)) + self.dt_bias.to(xa.dtype)
        log_alpha = -self.A_log.to(xa.dtype).exp() * F.softplus(a)
        return {"lr": beta, "retain": log_alpha.exp()}

    def extra_repr(self) -> str:
        return f"conv_size={self.conv_size}, output_gate={self.output_gate}, block_size={self.block_size}"


@register_mixer("gated_delta_net")
class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet (Yang, Kautz & Hatamizadeh, 2025): the delta rule after a data-dependent decay.

    ``S_t = α_t S_{t−1}(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ`` with ``α_t = exp(−e^{A} softplus(x_t w_α + b))``
    (Mamba-2's gate) and ``β_t = σ(x_t w_β + b_β)``: Miras with the ℓ2 bias, ℓ2 retention and the
    gradient taken at the retained state ``α_t S_{t−1}`` (``retain_first``), ``C = 1``.
    Arguments as :class:`DeltaNet`.
    """

    description = "Gated DeltaNet: S_t = a_t S_{t-1}(I - b_t k_t k_t^T) + b_t v_t k_t^T, Mamba-2 decay gate, WY block form (Yang et al. 2025; Miras instance)"
    gated = True
    instance = "gated_delta_net"


# -- the MLP memories: Moneta, Yaad, Memora -------------------------------------------------------
class _MirasMLP(_MirasMixer):
    """Moneta / Yaad / Memora: a deep memory ``M(x) = x + LN(W_2 σ(W_1 x))`` (Miras §5.3).

    Args:
        dim, num_heads: model width and heads (``Dk = Dv = head_dim``).
        depth: memory layers in 1..4 (default 2, the paper's).
        expansion: hidden width of the memory in units of ``head_dim`` (default 4, the paper's).
        activation: σ inside the memory: ``"gelu"`` (default, the paper's), ``"silu"`` or ``"relu"``.
        chunk_size: tokens per chunk of frozen gradients (default 16; 1 = exact online descent).
        conv_size: taps of the depthwise causal convs on q/k/v (default 4).
        output_gate: RMSNorm the read and gate it with ``SiLU(x W_G)`` before ``W_O`` (default True).
        momentum: use GD with momentum (Miras' fourth choice) instead of the paper's plain GD (default False).
        max_lr: η_t = max_lr · σ(·) (default 0.1). init_lr, init_retain, init_momentum: start values of
            η, α, μ (0.01, 0.99, 0.9).
    """

    instance = ""
    example_kwargs = {"chunk_size": 4, "expansion": 2, "conv_size": 3}
    demo_kwargs = {"chunk_size": 16, "expansion": 1}
    # The MLP-memory instances keep a per-token copy of the memory in the chunked path: a demo step
    # takes 3-10x titans_lmm's on a CPU, so they are opt-in there (mnemo demo --mixers moneta).
    demo_default = False
    extra_gates: tuple[str, ...] = ()

    def __init__(
        self,
        dim: int,
        num_heads: int,
        depth: int = 2,
        expansion: int = 4,
        activation: str = "gelu",
        chunk_size: int = 16,
        conv_size: int = 4,
        output_gate: bool = True,
        momentum: bool = False,
        max_lr: float = 0.1,
        init_lr: float = 0.01,
        init_retain: float = 0.99,
        init_momentum: float = 0.9,
        config_kwargs: dict | None = None,
    ):
        super().__init__(dim, num_heads)
        config_kwargs = config_kwargs or {}
        if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= MAX_DEPTH:
            raise ValueError(f"depth must be an int in [1, {MAX_DEPTH}], got {depth!r}")
        _check_int("expansion", expansion, 1)
        _check_int("chunk_size", chunk_size, 1)
        if not isinstance(momentum, bool):
            raise TypeError(f"momentum must be a bool, got {momentum!r}")
        if isinstance(max_lr, bool) or not isinstance(max_lr, (int, float)) or not 0 < max_lr < math.inf:
            raise ValueError(f"max_lr must be a finite float > 0, got {max_lr!r}")
        self.max_lr = float(max_lr)
        self.init_lr = _check_open("init_lr", init_lr, 0.0, self.max_lr)
        self.init_retain = _check_open("init_retain", init_retain, 0.0, 1.0)
        self.init_momentum = _check_open("init_momentum", init_momentum, 0.0, 1.0)
        try:
            self.config = miras_instance(self.instance, activation=activation, algorithm="momentum" if momentum else "gd", **config_kwargs)
        except ValueError as err:
            raise ValueError(str(err).replace("MirasConfig: ", "")) from None
        self.depth, self.expansion, self.chunk_size, self.mode = depth, expansion, chunk_size, "chunked"
        d, h = self.head_dim, num_heads
        self.memory_shapes = memory_hidden_shapes(d, d, depth, expansion * d)
        self._init_common(conv_size, output_gate)
        self.gate_names = ("lr", "retain") + (("momentum",) if momentum else ()) + self.extra_gates
        self.gate_proj = nn.Linear(dim, len(self.gate_names) * h, bias=True)  # per-head logits
        self.memory_init = nn.ParameterList(nn.Parameter(torch.empty(h, a, b)) for a, b in self.memory_shapes)
        self.reset_mixer_parameters()

    def _gate_init(self) -> dict[str, float]:
        return {"lr": _logit(self.init_lr / self.max_lr), "retain": _logit(self.init_retain), "momentum": _logit(self.init_momentum)}

    def reset_mixer_parameters(self) -> None:
        """Initialise what generic ``nn.Linear`` initialisation gets wrong (called by the HF model too)."""
        with torch.no_grad():
            self._reset_conv()
            h, init = self.num_heads, self._gate_init()
            for i, name in enumerate(self.gate_names):
                self.gate_proj.bias[i * h : (i + 1) * h].fill_(init[name])
            for w, (fan_in, _) in zip(self.memory_init, self.memory_shapes):
                w.normal_(0.0, self._init_std(fan_in))

    def _init_std(self, fan_in: int) -> float:
        return 1.0 / math.sqrt(fan_in)

    def _initial_accumulators(self) -> Tensor:
        return torch.cat([w.flatten(1) for w in self.memory_init], dim=-1)  # [H, P]

    def _gates(self, x: Tensor) -> dict[str, Tensor]:
        b, t, _ = x.shape
        # Gates in the accumulation dtype: bf16 rounds α near 1 onto 1 and loses the decay.
        logits = self.gate_proj(x).to(accumulation_dtype(x.dtype)).view(b, t, len(self.gate_names), self.num_heads).unbind(2)
        out = {}
        for name, z in zip(self.gate_names, logits):
            if name == "lr":
                out[name] = self.max_lr * torch.sigmoid(z)
            elif name == "delta":
                out[name] = F.softplus(z)
            else:
                out[name] = torch.sigmoid(z)
        return out

    def extra_repr(self) -> str:
        return (
            f"depth={self.depth}, expansion={self.expansion}, chunk_size={self.chunk_size}, conv_size={self.conv_size}, "
            f"config={self.config}"
        )


@register_mixer("moneta")
class Moneta(_MirasMLP):
    """Moneta (Miras §5.3): ℓp attentional bias, ℓq retention, GD.

    ``A_t = α_t A_{t−1} − η_t ∇ℓ_p(W̄; k_t, v_t)``, ``W_t = A_t / ‖A_t‖_q^{q−2}``, ``ℓ_p = ‖M(k) − v‖_p^p``.
    Extra args: ``p`` (default 3), ``q`` (default 4), ``sign_sharpness`` / ``abs_eps`` (the paper's
    smooth ``tanh(a x)`` / ``sqrt(x² + ε)``; default exact, which is already smooth for p ≥ 2).
    Other arguments as :class:`_MirasMLP`.
    """

    description = "Moneta (Miras): MLP memory, l_p attentional bias (p=3), l_q retention W = A/||A||_q^(q-2) (q=4), GD (Behrouz et al. 2025)"
    instance = "moneta"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        depth: int = 2,
        expansion: int = 4,
        activation: str = "gelu",
        chunk_size: int = 16,
        conv_size: int = 4,
        output_gate: bool = True,
        momentum: bool = False,
        max_lr: float = 0.1,
        init_lr: float = 0.01,
        init_retain: float = 0.99,
        init_momentum: float = 0.9,
        p: float = 3.0,
        q: float = 4.0,
        sign_sharpness: float | None = None,
        abs_eps: float = 0.0,
    ):
        config = dict(p=p, q=q, sign_sharpness=sign_sharpness, abs_eps=abs_eps)
        super().__init__(dim, num_heads, depth, expansion, activation, chunk_size, conv_size, output_gate, momentum, max_lr, init_lr, init_retain, init_momentum, config)


@register_mixer("yaad")
class Yaad(_MirasMLP):
    """Yaad (Miras §5.3): Huber attentional bias, ℓ2 retention (decay), GD.

    ``W_t = α_t W_{t−1} − η_t ∇ℓ_2`` while ``‖M(k_t) − v_t‖ ≤ δ_t``, else ``− η_t δ_t ∇ℓ_1``, with a
    data-dependent threshold ``δ_t = softplus(x_t w_δ + b_δ)`` per head. Extra args: ``init_delta``
    (default 1.0), ``sign_sharpness`` (smooth ℓ1 sign; default exact). Others as :class:`_MirasMLP`.
    """

    description = "Yaad (Miras): MLP memory, Huber attentional bias (l2 step within delta_t, l1 beyond), l2 retention, GD (Behrouz et al. 2025)"
    instance = "yaad"
    extra_gates = ("delta",)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        depth: int = 2,
        expansion: int = 4,
        activation: str = "gelu",
        chunk_size: int = 16,
        conv_size: int = 4,
        output_gate: bool = True,
        momentum: bool = False,
        max_lr: float = 0.1,
        init_lr: float = 0.01,
        init_retain: float = 0.99,
        init_momentum: float = 0.9,
        init_delta: float = 1.0,
        sign_sharpness: float | None = None,
    ):
        self.init_delta = _check_open("init_delta", init_delta, 0.0, math.inf)
        super().__init__(dim, num_heads, depth, expansion, activation, chunk_size, conv_size, output_gate, momentum, max_lr, init_lr, init_retain, init_momentum, dict(sign_sharpness=sign_sharpness))

    def _gate_init(self) -> dict[str, float]:
        return {**super()._gate_init(), "delta": math.log(math.expm1(self.init_delta))}  # inverse softplus


@register_mixer("memora")
class Memora(_MirasMLP):
    """Memora (Miras §5.3): ℓ2 attentional bias, KL retention, GD.

    ``W_t = c · Softmax(α_t log W_{t−1} − η_t ∇ℓ_2(W̄; k_t, v_t))`` per output unit (softmax over the
    fan-in), computed exactly as the linear recurrence of the logits ``P_t = α_t P_{t−1} − η_t ∇``.
    Extra arg: ``kl_scale`` (``c``; default ``sqrt(fan_in)``). Others as :class:`_MirasMLP`.
    """

    description = "Memora (Miras): MLP memory, l2 attentional bias, KL retention W = c softmax(a log W - eta grad), GD (Behrouz et al. 2025)"
    instance = "memora"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        depth: int = 2,
        expansion: int = 4,
        activation: str = "gelu",
        chunk_size: int = 16,
        conv_size: int = 4,
        output_gate: bool = True,
        momentum: bool = False,
        max_lr: float = 0.1,
        init_lr: float = 0.01,
        init_retain: float = 0.99,
        init_momentum: float = 0.9,
        kl_scale: float | None = None,
    ):
        super().__init__(dim, num_heads, depth, expansion, activation, chunk_size, conv_size, output_gate, momentum, max_lr, init_lr, init_retain, init_momentum, dict(kl_scale=kl_scale))

    def _init_std(self, fan_in: int) -> float:
        # Logits spread N(0, 2²): near-uniform fan-in distributions make all output units of the
        # positive-weight MLP almost equal, and the memory's LayerNorm then cancels catastrophically
        # (float32 rounding amplified ~100x at N(0, 1/fan_in)).
        return 2.0
