"""Relative attention (Music Transformer; Huang et al., 2019, arXiv:1809.04281), causal.

Multi-head causal softmax attention whose logits add a learned relative-position term, in place of
RoPE: ``logits[i, j] = (q_i . k_j + q_i . E[min(i - j, R)]) / sqrt(D)`` for ``j <= i``. ``E`` is a
learned table with one row per distance ``0 .. R`` (``R = max_distance``; farther keys share row
``R``, Shaw et al.'s clipping), one table per head by default (``share_heads=True``: one table for all
heads). On CUDA the fused Triton kernel computes the attention with the ``E`` band loaded per tile
(``O(L D)`` extra memory); on the CPU the whole-sequence call computes the relative logits by the
paper's skewing procedure and a call after a cache gathers them by distance from absolute positions.
The state is the KV cache.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.relative import relative_attention
from .attention import _QKVAttention
from .registry import register_mixer


@register_mixer("relative")
class RelativeAttention(_QKVAttention):
    """Causal multi-head attention with learned, clipped relative-position embeddings (no RoPE).

    Args:
        dim: model width; num_heads: query heads.
        max_distance: ``R``; distances ``0 .. R`` have their own embedding, longer ones use row ``R``.
        share_heads: one ``[R + 1, D]`` table for all heads instead of one per head.
        num_kv_heads: key/value heads (GQA; default ``num_heads``).
        backend: ``"auto"`` (the Triton kernel on CUDA, plain PyTorch on the CPU), ``"triton"`` or
            ``"reference"``; see ``ops.relative``.

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
        if backend not in ("auto", "torch", "reference", "triton"):
            raise ValueError(f"backend must be one of ('auto', 'torch', 'reference', 'triton'), got {backend!r}")
        # relative embeddings replace RoPE
        super().__init__(dim, num_heads, num_kv_heads=num_kv_heads, backend=backend, rope=False)
        if not isinstance(max_distance, int) or isinstance(max_distance, bool) or max_distance < 0:
            raise ValueError(f"max_distance must be an int >= 0, got {max_distance!r}")
        if not isinstance(share_heads, bool):
            raise ValueError(f"share_heads must be a bool, got {share_heads!r}")
        self.max_distance = max_distance
        self.share_heads = share_heads
        #: ``[1 or H, R + 1, D]``; row ``d`` is the embedding of distance ``i - j = d``.
        self.rel_emb = nn.Parameter(torch.empty(1 if share_heads else num_heads, max_distance + 1, self.head_dim))
        nn.init.normal_(self.rel_emb, std=0.02)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # CUDA: the fused kernel (any Tq <= Tk). Reference: Tq == Tk (no cache) skewing, Tq < Tk gather
        # by distance -- the same logits either way, so streaming is exact.
        return relative_attention(q, k, v, self.rel_emb, backend=self.backend)

    def state_size(self, seq_len: int) -> int:
        return 2 * seq_len * self.num_kv_heads * self.head_dim

    def extra_repr(self) -> str:
        return f"max_distance={self.max_distance}, share_heads={self.share_heads}"
