"""Dense causal softmax attention: ``causal_attention(q, k, v)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import check_backend, check_qkv
from .reference import causal_attention_reference


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, backend: str = "auto") -> Tensor:
    """Causal attention of the last ``Tq`` positions over ``Tk`` keys.

    Args:
        q: ``[B, Tq, H, D]`` queries; query ``i`` sits at absolute key position ``Tk - Tq + i``.
        k: ``[B, Tk, Hkv, D]`` keys (``H % Hkv == 0``: grouped-query attention).
        v: ``[B, Tk, Hkv, Dv]`` values.
        scale: logit scale, default ``D ** -0.5``.
        backend: ``"reference"`` (plain PyTorch), ``"torch"``/``"auto"`` (``scaled_dot_product_attention``).

    Returns:
        ``[B, Tq, H, Dv]``.
    """
    check_qkv("causal_attention", q, k, v)
    check_backend("causal_attention", backend)
    if backend == "reference":
        return causal_attention_reference(q, k, v, scale)
    if backend == "triton":
        raise NotImplementedError("causal_attention has no Triton backend; use backend='auto' (SDPA)")
    tq, tk = q.shape[1], k.shape[1]
    h, hkv = q.shape[2], k.shape[2]
    if h != hkv:
        # SDPA's enable_gqa is not available on every backend/version; repeating is cheap here.
        k = k.repeat_interleave(h // hkv, dim=2)
        v = v.repeat_interleave(h // hkv, dim=2)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if tq == tk:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
    elif tq == 1:
        out = F.scaled_dot_product_attention(qt, kt, vt, scale=scale)
    else:
        qpos = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
        mask = torch.arange(tk, device=q.device)[None, :] <= qpos
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


__all__ = ["causal_attention", "causal_attention_reference"]
