"""Landmark attention's grouped softmax equals the flat softmax over shifted logits (float64)."""

from __future__ import annotations

import pytest
import torch

from mnemotorch.ops.landmark import (
    flat_softmax_weights,
    grouped_softmax_weights,
    landmark_grouped_attention_reference,
    landmark_mask,
    shifted_logits,
)

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_landmark_positions() -> None:
    assert landmark_mask(10, 3).nonzero().flatten().tolist() == [3, 7]


@pytest.mark.parametrize("block_len,length", [(1, 7), (3, 16), (3, 18), (4, 9), (50, 40)])
@pytest.mark.parametrize("tq_frac", [1.0, 0.5])
def test_grouped_equals_flat_weights(block_len: int, length: int, tq_frac: float) -> None:
    torch.manual_seed(0)
    tq = max(1, int(length * tq_frac))
    scores = 3 * torch.randn(2, 3, tq, length, dtype=F64)
    grouped = grouped_softmax_weights(scores, block_len)
    flat = flat_softmax_weights(scores, block_len)
    assert (grouped - flat).abs().max() <= 1e-14
    assert torch.allclose(grouped.sum(-1), torch.ones((), dtype=F64), atol=1e-14)
    # landmarks carry zero weight on V; future keys too
    assert (grouped[..., landmark_mask(length, block_len)] == 0).all()
    qpos = torch.arange(length - tq, length)[:, None]
    assert (grouped[..., torch.arange(length)[None, :] > qpos] == 0).all()


def test_queries_after_a_prefix_match_the_full_rows() -> None:
    torch.manual_seed(1)
    scores = torch.randn(1, 2, 17, 17, dtype=F64)
    full = grouped_softmax_weights(scores, 4)
    assert (grouped_softmax_weights(scores[..., -5:, :], 4) - full[..., -5:, :]).abs().max() <= 1e-15


def test_landmark_logit_equal_to_group_lse_gives_plain_causal_softmax() -> None:
    """If every landmark logit equals the LSE of its block, the gating is the identity."""
    torch.manual_seed(2)
    block_len, length = 3, 15
    scores = torch.randn(1, 1, length, length, dtype=F64)
    lm = landmark_mask(length, block_len)
    for p in lm.nonzero().flatten().tolist():
        scores[..., p] = scores[..., p - block_len : p].logsumexp(-1)
    # then every query's weights are the plain causal softmax over the ordinary tokens
    qpos = torch.arange(length)[:, None]
    kpos = torch.arange(length)[None, :]
    plain = scores.masked_fill((kpos > qpos) | lm[None, :], float("-inf")).softmax(-1)
    assert (grouped_softmax_weights(scores, block_len) - plain).abs().max() <= 1e-14


def test_outputs_and_gradients_agree() -> None:
    torch.manual_seed(3)
    b, t, h, hkv, d = 2, 23, 4, 2, 8
    q = torch.randn(b, t, h, d, dtype=F64)
    k = torch.randn(b, t, hkv, d, dtype=F64)
    v = torch.randn(b, t, hkv, d, dtype=F64)
    w = torch.randn(b, t, h, d, dtype=F64)
    results = {}
    for form in ("grouped", "flat"):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = landmark_grouped_attention_reference(*leaves, block_len=4, form=form)
        (out * w).sum().backward()
        results[form] = (out.detach(), [x.grad for x in leaves])
    (o1, g1), (o2, g2) = results["grouped"], results["flat"]
    assert rel(o2, o1) <= 1e-13
    for name, a, c in zip("qkv", g2, g1):
        assert rel(a, c) <= 1e-12, f"gradient of {name}"
    # landmark values never reach the output: their gradient is exactly zero
    lm = landmark_mask(t, 4)
    assert (g1[2][:, lm] == 0).all() and (g2[2][:, lm] == 0).all()


def test_gradcheck_flat() -> None:
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 8, 1, 3, dtype=F64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda *a: landmark_grouped_attention_reference(*a, block_len=2, form="flat"), (q, k, v))


def test_bad_arguments() -> None:
    s = torch.randn(1, 1, 4, 4, dtype=F64)
    with pytest.raises(ValueError, match="block_len"):
        grouped_softmax_weights(s, 0)
    with pytest.raises(ValueError, match="block_len"):
        shifted_logits(s, True)
    with pytest.raises(ValueError, match="more queries"):
        flat_softmax_weights(torch.randn(1, 1, 5, 4, dtype=F64), 2)
    q = torch.randn(1, 4, 1, 2, dtype=F64)
    with pytest.raises(ValueError, match="form"):
        landmark_grouped_attention_reference(q, q, q, 2, form="sparse")
