"""Causal sliding-window attention, written plainly (the specification; runs in float64).

Query at absolute position i sees keys j with i - W < j <= i: exactly W keys once i >= W - 1
(the current token included), as in Longformer/Mistral-style local attention.
Memory is O(Tq * W), never O(T^2): each query gathers its own window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sliding_window_attention_reference(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float | None = None) -> Tensor:
    """``q [B, Tq, H, D]``, ``k [B, Tk, Hkv, D]``, ``v [B, Tk, Hkv, Dv]`` -> ``[B, Tq, H, Dv]``.

    Query ``i`` sits at absolute key position ``p = Tk - Tq + i`` and attends to keys
    ``max(0, p - W + 1) .. p``.
    """
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    k = k.repeat_interleave(h // hkv, dim=2)
    v = v.repeat_interleave(h // hkv, dim=2)
    # Left-pad W-1 slots so every query has a full window; padded slots are masked below.
    pad = window - 1
    start = tk - tq  # padded index of the first slot of query 0's window
    kp = F.pad(k, (0, 0, 0, 0, pad, 0))[:, start : start + tq + pad]
    vp = F.pad(v, (0, 0, 0, 0, pad, 0))[:, start : start + tq + pad]
    kw = kp.unfold(1, window, 1)  # [B, Tq, H, D, W]
    vw = vp.unfold(1, window, 1)  # [B, Tq, H, Dv, W]
    scores = torch.einsum("bihd,bihdw->bihw", q, kw) * scale
    # slot w of query i holds original key position p - W + 1 + w
    orig = (torch.arange(tq, device=q.device)[:, None] + start) - pad + torch.arange(window, device=q.device)[None, :]
    scores = scores.masked_fill((orig < 0)[None, :, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bihw,bihdw->bihd", probs, vw)
