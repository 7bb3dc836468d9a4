"""Softmax-attention mixers: full causal attention and causal sliding-window attention.

Both project ``x`` to queries, keys and values, rotate queries and keys with RoPE at their
absolute positions, and keep (rotated) keys and values as their state: all of them for
``attention``, the last ``window - 1`` for ``sliding_window`` (the current token completes the window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..ops.attention import causal_attention
from ..ops.rotary import apply_rotary, rotary_cos_sin
from ..ops.sliding_window import sliding_window_attention
from .base import Mixer, MixerState
from .registry import register_mixer


@dataclass
class KVState(MixerState):
    """Cached rotated keys and values ``[B, Tc, Hkv, D]`` and the count of tokens seen."""

    k: Tensor
    v: Tensor


class _QKVAttention(Mixer):
    """Shared projections, RoPE and KV bookkeeping of the attention-like mixers.

    ``rope=False`` leaves queries and keys unrotated (mixers with their own position handling,
    e.g. relative attention, or LLA by default).
    """

    def __init__(
        self, dim: int, num_heads: int, num_kv_heads: int | None = None, rope_theta: float = 10000.0, backend: str = "auto",
        rope: bool = True,
    ):
        super().__init__(dim, num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if not isinstance(num_kv_heads, int) or isinstance(num_kv_heads, bool) or num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(f"num_kv_heads must be a positive divisor of num_heads ({num_heads}), got {num_kv_heads!r}")
        if not isinstance(rope, bool):
            raise TypeError(f"rope must be a bool, got {rope!r}")
        if rope and self.head_dim % 2:
            raise ValueError(f"head_dim = dim / num_heads must be even for RoPE, got {self.head_dim}")
        self.num_kv_heads = num_kv_heads
        self.rope = rope
        self.rope_theta = float(rope_theta)
        self.backend = backend
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)

    def init_state(self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KVState:
        dtype = dtype or self.q_proj.weight.dtype
        device = device or self.q_proj.weight.device
        empty = torch.zeros(batch_size, 0, self.num_kv_heads, self.head_dim, device=device, dtype=dtype)
        return KVState(seen_tokens=0, k=empty, v=empty.clone())

    def _project(self, x: Tensor, offset: int) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if not self.rope:
            return q, k, v
        positions = torch.arange(offset, offset + t, device=x.device)
        # q.dtype, not x.dtype: under autocast the projections are bf16 while x stays fp32.
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta, dtype=q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _attend_at(self, q: Tensor, k: Tensor, v: Tensor, q_start: int, k_start: int) -> Tensor:
        """Attention with the absolute positions of the first query / key (for position-dependent patterns)."""
        return self._attend(q, k, v)

    def _keep(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """What of the concatenated keys/values to carry to the next call."""
        return k, v

    def forward(self, x: Tensor, state: KVState | None = None) -> tuple[Tensor, KVState]:
        """``x [B, T, dim]`` -> ``(y [B, T, dim], state)``."""
        self.check_input(x, state)
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        q, k, v = self._project(x, state.seen_tokens)
        k_all = torch.cat([state.k.to(k.dtype), k], dim=1)
        v_all = torch.cat([state.v.to(v.dtype), v], dim=1)
        y = self._attend_at(q, k_all, v_all, state.seen_tokens, state.seen_tokens - state.k.shape[1])
        y = self.o_proj(y.reshape(x.shape[0], x.shape[1], self.num_heads * self.head_dim))
        k_keep, v_keep = self._keep(k_all, v_all)
        return y, KVState(seen_tokens=state.seen_tokens + x.shape[1], k=k_keep, v=v_keep)


@register_mixer("attention")
class CausalSelfAttention(_QKVAttention):
    """Causal multi-head softmax attention with RoPE and optional grouped-query attention.

    Args:
        dim: model width.
        num_heads: query heads.
        num_kv_heads: key/value heads (GQA; default ``num_heads``).
        rope_theta: RoPE base.
        backend: ``"auto"`` (PyTorch SDPA) or ``"reference"`` (plain float64-capable PyTorch).
    """

    description = "causal multi-head softmax attention, RoPE, GQA; KV-cache state (Vaswani et al. 2017)"
    example_kwargs = {"num_kv_heads": 2}

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return causal_attention(q, k, v, backend=self.backend)

    def state_size(self, seq_len: int) -> int:
        return 2 * seq_len * self.num_kv_heads * self.head_dim


@register_mixer("sliding_window")
class SlidingWindowAttention(_QKVAttention):
    """Causal sliding-window attention: token ``i`` attends to tokens ``i - W + 1 .. i``.

    Args:
        dim, num_heads, num_kv_heads, rope_theta: as for ``attention``.
        window: ``W``, the number of keys each query sees, itself included.
        backend: ``"auto"`` or ``"reference"``.

    The state holds the last ``W - 1`` rotated keys and values: a bounded memory.
    """

    description = "causal sliding-window softmax attention (window W), RoPE; bounded W-1 KV state"
    example_kwargs = {"window": 8}

    def __init__(
        self, dim: int, num_heads: int, window: int = 64, num_kv_heads: int | None = None, rope_theta: float = 10000.0, backend: str = "auto"
    ):
        super().__init__(dim, num_heads, num_kv_heads=num_kv_heads, rope_theta=rope_theta, backend=backend)
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        self.window = window

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return sliding_window_attention(q, k, v, self.window, backend=self.backend)

    def _keep(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        keep = self.window - 1
        if keep == 0:
            return k[:, :0], v[:, :0]
        return k[:, -keep:], v[:, -keep:]

    def state_size(self, seq_len: int) -> int:
        return 2 * min(seq_len, self.window - 1) * self.num_kv_heads * self.head_dim

    def extra_repr(self) -> str:
        return f"window={self.window}"
