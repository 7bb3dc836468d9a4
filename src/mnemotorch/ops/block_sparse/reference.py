"""Dense-masked block-sparse attention, written plainly (the specification; float64-ready).

O(Lq * Lk) memory: for tests and small inputs only. The kernel must equal this.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .bias import RelativeBias
from .pattern import BlockSparsePattern


def block_sparse_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, pattern: BlockSparsePattern, scale: float | None = None, bias: RelativeBias | None = None
) -> Tensor:
    """``q [B, Lq, H, D]``, ``k [B, Lk, Hkv, D]``, ``v [B, Lk, Hkv, Dv]`` -> ``[B, Lq, H, Dv]``.

    ``bias``: optional additive logit bias (:class:`~mnemotorch.ops.block_sparse.RelativeBias`),
    added to the scaled logits before the mask. Rows with no allowed key return zeros (the
    kernel's convention for empty rows).
    """
    h, hkv, d = q.shape[2], k.shape[2], q.shape[3]
    scale = d**-0.5 if scale is None else scale
    k = k.repeat_interleave(h // hkv, dim=2)
    v = v.repeat_interleave(h // hkv, dim=2)
    mask = pattern.dense_mask().to(q.device)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if bias is not None:
        s = s + bias.to(q.device).dense().to(s.dtype)
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully masked rows -> 0
    return torch.einsum("bhij,bjhd->bihd", p, v)
