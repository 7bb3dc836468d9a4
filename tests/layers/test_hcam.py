"""HCAM's level-1 selection override (``keep``)."""

from __future__ import annotations

import pytest
import torch


def test_hcam_keep_reproduces_the_top_k_and_overrides_it():
    from mnemotorch.layers.hcam import chunk_summaries, hcam_attention, hcam_gate_logits

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 70, 2, 8, dtype=torch.float64) for _ in range(3))
    s = chunk_summaries(k, 8)
    gate = hcam_gate_logits(q, k, s, 8, 2)
    keep = torch.isfinite(gate[..., : 70 // 8])
    base = hcam_attention(q, k, v, s, 8, 2)
    assert torch.equal(hcam_attention(q, k, v, s, 8, 2, keep=keep), base)
    other = keep.clone()
    other[..., 0] = ~other[..., 0]  # a different choice changes the read-out
    assert not torch.allclose(hcam_attention(q, k, v, s, 8, 2, keep=other), base)
    with pytest.raises(ValueError, match="keep must be a bool tensor"):
        hcam_attention(q, k, v, s, 8, 2, keep=keep[..., :3])
