"""Relative attention (Music Transformer; Huang et al., 2019, arXiv:1809.04281), causal.

Multi-head causal softmax attention whose logits add a learned relative-position term, in place of
RoPE: ``logits[i, j] = (q_i . k_j + q_i . E[min(i - j, R)]) / sqrt(D)`` for ``j <= i``. ``E`` is a
learned table with one row per distance ``0 .. R`` (``R = max_distance``; farther keys share row
``R``, Shaw et al.'s clipping), one table per head by default (``share_heads=True``: one table for all
heads). The whole-sequence call computes the relative logits by the paper's skewing procedure; a call
after a cache gathers them by distance from absolute positions. The state is the KV cache.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.relative import relative_attention
from .attention import KVState
from .base import Mixer
from .registry import register_mixer


@register_mixer("relative")
class RelativeAttention(Mixer):
    """Causal multi-head attention with learned, clipped relative-position embeddings (no RoPE).

    Args:
        dim: model width; num_heads: query heads.
        max_distance: ``R``; distances ``0 .. R`` have their own embedding, longer ones use row ``R``.
        share_heads: one ``[R + 1, D]`` table for all heads instead of one per head.
        num_kv_heads: key/value heads (GQA; default ``num_heads``).
        backend: ``"auto"`` or ``"reference"`` (both plain PyTorch for now; see ``ops.relative``).

    State: ``KVState`` with all keys and values, ``state_size(T) = 2 * T * Hkv * D``.
    """

    description = "Music Transformer relative attention: learned clipped relative embeddings, skewing (Huang et al. 2019); KV state"
    example_kwargs = {"max_distance": 8}

    def __init__(
        self,
        dim: int,
        num_heads: int,
        max_distance: int = 512,
        share_heads: bool = False,
        num_kv_heads: int | None = None,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads)
        if not isinstance(max_distance, int) or isinstance(max_distance, bool) or max_distance < 0:
            raise ValueError(f"max_distance must be an int >= 0, got {max_distance!r}")
        if not isinstance(share_heads, bool):
            raise ValueError(f"share_heads must be a bool, got {share_heads!r}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if not isinstance(num_kv_heads, int) or num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(f"num_kv_heads must be a positive divisor of num_heads ({num_heads}), got {num_kv_heads!r}")
        if backend not in ("auto", "torch", "reference"):
            raise ValueError(f"backend must be one of ('auto', 'torch', 'reference'), got {backend!r}")
        self.max_distance = max_distance
        self.share_heads = share_heads
        self.num_kv_heads = num_kv_heads
        self.backend = backend
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)
        #: ``[1 or H, R + 1, D]``; row ``d`` is the embedding of distance ``i - j = d``.
        self.rel_emb = nn.Parameter(torch.empty(1 if share_heads else num_heads, max_distance + 1, self.head_dim))
        nn.init.normal_(self.rel_emb, std=0.02)

    def init_state(self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KVState:
        dtype = dtype or self.q_proj.weight.dtype
        device = device or self.q_proj.weight.device
        empty = torch.zeros(batch_size, 0, self.num_kv_heads, self.head_dim, device=device, dtype=dtype)
        return KVState(seen_tokens=0, k=empty, v=empty.clone())

    def forward(self, x: Tensor, state: KVState | None = None) -> tuple[Tensor, KVState]:
        """``x [B, T, dim]`` -> ``(y [B, T, dim], state)``."""
        self.check_input(x, state)
        if state is not None and not isinstance(state, KVState):
            raise TypeError(f"RelativeAttention: state must be a KVState, got {type(state).__name__}")
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        k_all = torch.cat([state.k.to(k.dtype), k], dim=1)
        v_all = torch.cat([state.v.to(v.dtype), v], dim=1)
        # Tq == Tk (no cache): skewing; Tq < Tk: gather by distance -- same logits, so streaming is exact.
        y = relative_attention(q, k_all, v_all, self.rel_emb, backend=self.backend)
        y = self.o_proj(y.reshape(b, t, self.num_heads * self.head_dim))
        return y, KVState(seen_tokens=state.seen_tokens + t, k=k_all, v=v_all)

    def state_size(self, seq_len: int) -> int:
        return 2 * seq_len * self.num_kv_heads * self.head_dim

    def extra_repr(self) -> str:
        return f"max_distance={self.max_distance}, share_heads={self.share_heads}"
