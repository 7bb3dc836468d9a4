"""Titans neural long-term memory as a token mixer: ``titans_lmm``.

Behrouz, Zhong & Mirrokni, "Titans: Learning to Memorize at Test Time" (arXiv 2501.00663): the
long-term memory module (LMM) alone as a sequence layer. Per token (``h`` = head)::

    q, k, v = SiLU(conv_K(x W_Q)), SiLU(conv_K(x W_K)), SiLU(conv_K(x W_V))   depthwise causal convs
    q, k    = q / ‖q‖, k / ‖k‖                                                per head (§4.4)
    θ_t, η_t, α_t = σ(x_t w_θ + b_θ), σ(x_t w_η + b_η), σ(x_t w_α + b_α)      per head
    S_t = η_t S_{t−1} − θ_t ∇‖M_{c(t)}(k_t) − v_t‖²,   M_t = (1 − α_t) M_{t−1} + S_t
    o_t = M_t(q_t)
    y_t = W_O (RMSNorm(o_t) ⊙ SiLU(x_t W_G))                                 norm + gate (§4.4)

``M`` is a per-head memory (``depth = 1``: a ``head_dim × head_dim`` matrix; ``depth ≥ 2``: an MLP
with hidden width ``expansion · head_dim``), its initial weights learned parameters shared by all
sequences, with gradients frozen at the chunk-start weights inside chunks of ``chunk_size`` tokens
(absolute positions), exactly as :func:`mnemotorch.ops.memory.neural_memory`.

State (:class:`TitansState`): the memory weights ``M_t``, the momentum ``S_t`` and the chunk-start
weights, each flattened to ``[B, H, P]`` (P = weights per head), plus the last ``K − 1`` conv
inputs ``[B, K−1, 3·dim]``; the position inside the current chunk is ``seen_tokens mod chunk_size``.
Holding the chunk-start weights (instead of the chunk's tokens so far) is what makes a split
inside a chunk exact with O(1) work per decoded token.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.compiled import compile_allowed, compiled_over_length
from ..ops.memory import ACTIVATIONS, MAX_DEPTH, MemoryState, accumulation_dtype, compile_options, memory_forward, memory_hidden_shapes, neural_memory
from .base import Mixer, MixerState
from .registry import register_mixer
from .short_conv import causal_depthwise_conv, compiled_conv_silu_qkv, conv_silu_qkv, norm_silu_gate


@dataclass
class TitansState(MixerState):
    """Memory weights, momentum and chunk-start weights ``[B, H, P]``; conv inputs ``[B, K−1, 3·dim]``."""

    weights: Tensor
    momentum: Tensor
    chunk_start: Tensor
    conv: Tensor


# Stability bounds (defaults; docs/mixers/titans.md, "Stability of the test-time learner"). The
# paper's gates are unbounded in (0, 1) and its gradients unclipped: max_momentum=1.0 and
# max_grad_norm=None give exactly that.
MAX_MOMENTUM = 0.9
MAX_GRAD_NORM = 1.0


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


@register_mixer("titans_lmm")
class TitansLMM(Mixer):
    """Titans long-term memory module (LMM) as a token mixer (Behrouz et al., 2024).

    Args:
        dim, num_heads: model width and heads; keys, values and queries use ``head_dim = dim / H``.
        depth: memory layers ``L_M`` in 1..4 (1 = linear matrix memory; default 2).
        expansion: hidden width of an MLP memory in units of ``head_dim`` (default 4).
        activation: σ inside the memory MLP: ``"silu"`` (default), ``"gelu"`` or ``"relu"``.
        residual: memory ``M(x) = x + f(x)`` (default True).
        layer_norm: memory ``M(x) = [x +] LN(f(x))`` (affine-free LayerNorm; default False).
        chunk_size: tokens per chunk of frozen gradients (a model hyperparameter; default 64;
            1 = exact online gradient descent). Any sequence length works (no padding).
        conv_size: taps of the depthwise causal convs on q/k/v (default 4; 0 disables them).
        output_gate: RMSNorm the memory read and gate it with ``SiLU(x W_G)`` before ``W_O`` (default True).
        max_lr: θ's upper bound, ``θ_t = max_lr · σ(·)`` (default 0.1).
        max_momentum: η's upper bound, ``η_t = max_momentum · σ(·)`` (default 0.9; 1.0 = the paper's
            unbounded gate). Caps the momentum's amplification ``1 / (1 − η)`` of stale gradients.
        max_grad_norm: clip each token's surprise gradient to this norm (over all memory layers, per
            head) before it enters the momentum (default 1.0; ``None`` = the paper's unclipped
            update). What keeps an MLP memory from diverging in training (docs: "Stability").
        init_theta, init_eta, init_alpha: the gate values the biases start at (0.01,
            ``0.9 · max_momentum``, 0.01).
        compile_memory: run the memory's per-chunk step through ``torch.compile`` (fullgraph,
            static shapes; inductor fuses the elementwise work around the matmuls, forward and
            backward): ``False`` (default; eager, the reference), ``True`` (inductor, default mode), a
            ``torch.compile`` mode string or a dict of ``backend``/``mode``/``options``. Same
            semantics; the first call per shape pays the compilation. An attribute: may be set after
            construction (``layer.compile_memory = True``).
        fused_memory: calls on CUDA run the memory's full chunks in the fused Triton forward kernel
            (``ops/memory/fused_triton.py``) where it supports the configuration (depth 1–2,
            power-of-two sizes ≥ 16), else the chunked path (default False; ``MNEMO_MEMORY_FUSED=1``
            turns it on for every layer). Training calls too: the kernel then keeps the state entering
            every chunk (256 KiB per chunk and head at d 64, hidden 256) and the backward runs from those
            checkpoints (``ops/memory/fused_backward.py``). Same semantics, fp32 state. An attribute,
            like ``compile_memory`` (the MAC / MAG / MAL layers: ``layer.memory.fused_memory = True``).

    ``state_size``: ``3 · H · P + (K − 1) · 3 · dim`` (P = memory weights per head), whatever the length.
    """

    description = "Titans neural long-term memory (LMM): an MLP memory trained at test time by GD + momentum + decay; chunk-frozen gradients (Behrouz et al. 2024)"
    example_kwargs = {"chunk_size": 4, "depth": 2, "expansion": 2, "conv_size": 3}

    def __init__(
        self,
        dim: int,
        num_heads: int,
        depth: int = 2,
        expansion: int = 4,
        activation: str = "silu",
        residual: bool = True,
        layer_norm: bool = False,
        chunk_size: int = 64,
        conv_size: int = 4,
        output_gate: bool = True,
        max_lr: float = 0.1,
        max_momentum: float = MAX_MOMENTUM,
        max_grad_norm: float | None = MAX_GRAD_NORM,
        init_theta: float = 0.01,
        init_eta: float | None = None,
        init_alpha: float = 0.01,
        compile_memory: bool | str | dict = False,
        fused_memory: bool = False,
    ):
        super().__init__(dim, num_heads)
        if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= MAX_DEPTH:
            raise ValueError(f"depth must be an int in [1, {MAX_DEPTH}], got {depth!r}")
        for name, value, low in (("expansion", expansion, 1), ("chunk_size", chunk_size, 1), ("conv_size", conv_size, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        for name, value in (("residual", residual), ("layer_norm", layer_norm), ("output_gate", output_gate)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        if isinstance(max_lr, bool) or not isinstance(max_lr, (int, float)) or not 0 < max_lr < math.inf:
            raise ValueError(f"max_lr must be a finite float > 0, got {max_lr!r}")
        if isinstance(max_momentum, bool) or not isinstance(max_momentum, (int, float)) or not 0 < max_momentum <= 1:
            raise ValueError(f"max_momentum must be a float in (0, 1] (1 = the paper's unbounded η), got {max_momentum!r}")
        if max_grad_norm is not None and (
            isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)) or not 0 < max_grad_norm < math.inf
        ):
            raise ValueError(f"max_grad_norm must be None (no clipping) or a finite float > 0, got {max_grad_norm!r}")
        if init_eta is None:  # 0.9 of the bound: 0.9 with the paper's unbounded η
            init_eta = 0.9 * max_momentum
        for name, value, high in (("init_theta", init_theta, max_lr), ("init_eta", init_eta, max_momentum), ("init_alpha", init_alpha, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < high:
                bound = {"init_theta": "max_lr", "init_eta": "max_momentum"}.get(name)
                raise ValueError(f"{name} must be a float in (0, {high})" + (f" (below {bound})" if bound else "") + f", got {value!r}")
        compile_options(compile_memory)  # validates
        if not isinstance(fused_memory, bool):
            raise TypeError(f"fused_memory must be a bool, got {fused_memory!r}")
        self.compile_memory = compile_memory
        self.fused_memory = fused_memory
        self.depth, self.expansion, self.activation = depth, expansion, activation
        self.residual, self.layer_norm, self.output_gate = residual, layer_norm, output_gate
        self.chunk_size, self.conv_size = chunk_size, conv_size
        self.max_lr = float(max_lr)
        self.max_momentum = float(max_momentum)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        # The biases hold σ⁻¹ of the *unscaled* gate: θ = max_lr·σ(·), η = max_momentum·σ(·).
        self.init_gates = (float(init_theta) / self.max_lr, float(init_eta) / self.max_momentum, float(init_alpha))
        d, h = self.head_dim, num_heads
        self.memory_shapes = memory_hidden_shapes(d, d, depth, expansion * d)
        self.params_per_head = sum(a * b for a, b in self.memory_shapes)

        self.qkv_proj = nn.Linear(dim, 3 * dim, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(3 * dim, conv_size)) if conv_size > 0 else None
        self.gate_proj = nn.Linear(dim, 3 * h, bias=True)  # θ, η, α logits per head
        self.memory_init = nn.ParameterList(nn.Parameter(torch.empty(h, a, b)) for a, b in self.memory_shapes)
        if output_gate:
            self.out_norm = nn.RMSNorm(d, eps=1e-6)
            self.g_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.reset_mixer_parameters()

    def reset_mixer_parameters(self) -> None:
        """Initialise what generic ``nn.Linear`` initialisation gets wrong (called by the HF model too)."""
        with torch.no_grad():
            if self.conv_weight is not None:
                bound = 1.0 / math.sqrt(self.conv_size)  # nn.Conv1d's default for a depthwise kernel
                self.conv_weight.uniform_(-bound, bound)
            theta, eta, alpha = self.init_gates
            h = self.num_heads
            self.gate_proj.bias[:h].fill_(_logit(theta))
            self.gate_proj.bias[h : 2 * h].fill_(_logit(eta))
            self.gate_proj.bias[2 * h :].fill_(_logit(alpha))
            for w, (fan_in, _) in zip(self.memory_init, self.memory_shapes):
                if self.depth == 1:
                    w.zero_()  # a matrix memory starts empty (identity map if residual)
                else:
                    w.normal_(0.0, 1.0 / math.sqrt(fan_in))

    # -- state ---------------------------------------------------------------------------------
    def _initial_weights(self, batch_size: int, device, dtype) -> Tensor:
        flat = torch.cat([w.flatten(1) for w in self.memory_init], dim=-1)  # [H, P]
        return flat.to(device=device, dtype=dtype).unsqueeze(0).expand(batch_size, -1, -1)

    def init_state(self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TitansState:
        device = device or self.o_proj.weight.device
        acc = accumulation_dtype(dtype or self.o_proj.weight.dtype)
        w = self._initial_weights(batch_size, device, acc)
        return TitansState(
            seen_tokens=0,
            weights=w,
            momentum=torch.zeros(batch_size, self.num_heads, self.params_per_head, device=device, dtype=acc),
            chunk_start=w,
            conv=torch.zeros(batch_size, max(self.conv_size - 1, 0), 3 * self.dim, device=device, dtype=dtype or self.o_proj.weight.dtype),
        )

    def state_size(self, seq_len: int) -> int:
        return 3 * self.num_heads * self.params_per_head + max(self.conv_size - 1, 0) * 3 * self.dim

    def _unflatten(self, flat: Tensor) -> tuple[Tensor, ...]:
        sizes = [a * b for a, b in self.memory_shapes]
        return tuple(p.unflatten(-1, shape) for p, shape in zip(flat.split(sizes, dim=-1), self.memory_shapes))

    @staticmethod
    def _flatten(ws: tuple[Tensor, ...]) -> Tensor:
        return torch.cat([w.flatten(2) for w in ws], dim=-1)

    # -- pieces reused by the Titans variants (layers/titans_variants.py) ----------------------
    def project_queries(self, x: Tensor, conv: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Memory queries of another token stream: ``x [B, T, dim]`` -> ``(q [B, T, H, D], conv)``.

        The same ``W_Q``, conv taps, SiLU and ℓ2 norm as :meth:`forward`'s queries, with the conv
        window ``conv [B, K−1, dim]`` of *that* stream carried separately (MAC reads the memory with
        queries of the segment while the memory itself is written with the attention output).
        """
        b, t, _ = x.shape
        q = F.linear(x, self.qkv_proj.weight[: self.dim])
        if self.conv_weight is not None:
            q, conv = causal_depthwise_conv(q, self.conv_weight[: self.dim], conv)
        return F.normalize(F.silu(q).view(b, t, self.num_heads, self.head_dim), dim=-1), conv

    def read(self, flat_weights: Tensor, q: Tensor) -> Tensor:
        """``M*(q)``: the memory with weights ``[B, H, P]`` applied to ``q [B, T, H, D]``, no update."""
        weights = self._unflatten(flat_weights.to(accumulation_dtype(q.dtype)))
        out = memory_forward(weights, q.to(weights[0].dtype).transpose(1, 2), self.activation, self.residual, self.layer_norm)
        return out.transpose(1, 2).to(q.dtype)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: Tensor, state: TitansState | None = None) -> tuple[Tensor, TitansState]:
        """``x [B, T, dim]`` -> ``(y [B, T, dim], state)``."""
        self.check_input(x, state)
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        b, t, _ = x.shape
        h, d = self.num_heads, self.head_dim
        compiled = self._compile_inputs(x)
        if self._input_kernel(x):  # (opt-in: the input path's own Triton kernels)
            from ..ops.conv_triton import conv_silu_qkv_triton as inputs
        else:
            inputs = compiled_conv_silu_qkv() if compiled else conv_silu_qkv
        q, k, v, conv = inputs(self.qkv_proj(x), self.conv_weight, state.conv, h, d)
        # Gates in the accumulation dtype: a bf16 sigmoid rounds η or α onto 0 / 1 (log-space -inf).
        gates = self.gate_proj(x).to(accumulation_dtype(x.dtype))
        theta, eta, alpha = torch.sigmoid(gates).view(b, t, 3, h).unbind(2)
        theta, eta = self.max_lr * theta, self.max_momentum * eta

        memory = MemoryState(
            self._unflatten(state.weights),
            self._unflatten(state.momentum),
            self._unflatten(state.chunk_start),
            state.seen_tokens % self.chunk_size,
        )
        o, memory = neural_memory(
            q, k, v, theta, eta, alpha, memory,
            chunk_size=self.chunk_size, activation=self.activation, residual=self.residual, layer_norm=self.layer_norm,
            max_grad_norm=self.max_grad_norm, compile=self.compile_memory, fused=self._use_fused_memory(q, memory),
        )  # fmt: skip
        if self.output_gate:
            gate = compiled_over_length(norm_silu_gate, (0, 1)) if compiled else norm_silu_gate
            o = gate(o, self.g_proj(x), self.out_norm.weight, self.out_norm.eps)
        y = self.o_proj(o.reshape(b, t, h * d))
        weights = self._flatten(memory.weights)
        # The chunk-start weights are the current weights at a chunk boundary: share the tensor.
        start = weights if memory.position == 0 else self._flatten(memory.chunk_start)
        new_state = TitansState(
            seen_tokens=state.seen_tokens + t,
            weights=weights,
            momentum=self._flatten(memory.momentum),
            chunk_start=start,
            conv=conv,
        )
        return y, new_state

    def _compile_inputs(self, x: Tensor) -> bool:
        """With the fused memory on CUDA (its fast path), the input path (conv, SiLU, ℓ2 norms) and the output's norm
        and gate run through ``torch.compile`` with only the length symbolic (:func:`~.short_conv.compiled_conv_silu_qkv`,
        :func:`~.short_conv.norm_silu_gate`); ``MNEMO_MEMORY_COMPILE_INPUTS=0`` keeps them eager. Not while
        ``torch.compile`` already traces the caller, nor while a CUDA graph is being captured."""
        if os.environ.get("MNEMO_MEMORY_COMPILE_INPUTS", "1") == "0" or not self._fused_requested():
            return False
        return compile_allowed(x)

    def _input_kernel(self, x: Tensor) -> bool:
        """``MNEMO_MEMORY_INPUT_KERNEL=1`` (opt-in, not yet measured on a GPU): with the fused memory requested and a conv,
        the input path (conv, SiLU, ℓ2 norms) runs in :mod:`~mnemotorch.ops.conv_triton`'s kernels instead of through
        ``torch.compile``: the same equations in fp32 inside, without the compiled function's host cost per call. On
        CUDA, or on the CPU under Triton's interpreter (tests)."""
        if os.environ.get("MNEMO_MEMORY_INPUT_KERNEL") != "1" or self.conv_weight is None or not self._fused_requested():
            return False
        d = self.head_dim
        return (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and d >= 1 and d & (d - 1) == 0

    def _fused_requested(self) -> bool:
        """``fused_memory`` or ``MNEMO_MEMORY_FUSED=1``."""
        return self.fused_memory or os.environ.get("MNEMO_MEMORY_FUSED") == "1"

    def _use_fused_memory(self, q: Tensor, memory: MemoryState) -> bool:
        """``fused_memory`` or ``MNEMO_MEMORY_FUSED=1``: on CUDA the memory's full chunks run in the fused
        Triton kernel (training from its per-chunk checkpoints), where it supports the configuration; else
        the chunked path."""
        if not self._fused_requested():
            return False
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":  # CPU: only through Triton's interpreter (tests)
            return False
        from ..ops.memory.fused_triton import fused_supported

        return fused_supported(q, q, q, memory, self.chunk_size)  # v has the shape of q here (Dv = Dk = head_dim)

    def extra_repr(self) -> str:
        return (
            f"depth={self.depth}, expansion={self.expansion}, activation={self.activation!r}, residual={self.residual}, "
            f"layer_norm={self.layer_norm}, chunk_size={self.chunk_size}, conv_size={self.conv_size}, output_gate={self.output_gate}, "
            f"max_lr={self.max_lr}, max_momentum={self.max_momentum}, max_grad_norm={self.max_grad_norm}"
            + (f", compile_memory={self.compile_memory!r}" if self.compile_memory else "")
            + (", fused_memory=True" if self.fused_memory else "")
        )
