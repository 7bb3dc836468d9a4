"""Rotary position embedding (RoPE; Su et al., 2021, "RoFormer", arXiv:2104.09864).

The pair (x_i, x_{i+D/2}) of each head vector at position p is rotated by angle p * theta_i with
theta_i = base^(-2i/D) (the "rotate half" layout used by GPT-NeoX and Llama).
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotary_cos_sin(positions: Tensor, head_dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """cos and sin tables ``[T, head_dim]`` for integer ``positions [T]``.

    Angles are computed in float64 so that a position gets bit-identical tables whichever chunk it
    arrives in (needed by the streaming invariant), then cast to ``dtype``.
    """
    if head_dim % 2 != 0:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, T, H, D]`` with tables ``cos, sin [T, D]``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]
