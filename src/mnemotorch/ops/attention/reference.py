"""Causal softmax attention, written plainly (the specification; runs in float64).

softmax(q k^T * scale + mask) v, where query i (the i-th of the last Tq positions of Tk)
sees keys j <= Tk - Tq + i (Vaswani et al., 2017).
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """``q [B, Tq, H, D]``, ``k [B, Tk, Hkv, D]``, ``v [B, Tk, Hkv, Dv]`` -> ``[B, Tq, H, Dv]``."""
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    k = k.repeat_interleave(h // hkv, dim=2)
    v = v.repeat_interleave(h // hkv, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    qpos = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
    kpos = torch.arange(tk, device=q.device)[None, :]
    scores = scores.masked_fill(kpos > qpos, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhij,bjhd->bihd", probs, v)
