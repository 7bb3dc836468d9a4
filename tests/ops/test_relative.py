"""Music Transformer relative attention: the skewing procedure against the explicit L x L x D form."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mnemotorch.ops.attention import causal_attention_reference
from mnemotorch.ops.relative import (
    relative_attention,
    relative_attention_reference,
    relative_distance_index,
    relative_logits_explicit,
    relative_logits_gather,
    relative_logits_skew,
)

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def inputs(b=2, t=13, h=4, hkv=2, d=8, heads_rel=4, max_distance=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, dtype=F64, generator=g)
    k = torch.randn(b, t, hkv, d, dtype=F64, generator=g)
    v = torch.randn(b, t, hkv, d, dtype=F64, generator=g)
    e = torch.randn(heads_rel, max_distance + 1, d, dtype=F64, generator=g)
    return q, k, v, e


def test_distance_index_clips_and_orders() -> None:
    idx = relative_distance_index(3, 6, max_distance=2)
    # queries at positions 3, 4, 5 over keys 0..5: distance i - j clipped to [0, 2]
    assert idx.tolist() == [[2, 2, 1, 0, 0, 0], [2, 2, 2, 1, 0, 0], [2, 2, 2, 2, 1, 0]]


@pytest.mark.parametrize("max_distance", [0, 3, 12, 40])
@pytest.mark.parametrize("heads_rel", [1, 4])
def test_skew_equals_explicit_on_the_causal_triangle(max_distance: int, heads_rel: int) -> None:
    q, _, _, e = inputs(heads_rel=heads_rel, max_distance=max_distance)
    t = q.shape[1]
    explicit = relative_logits_explicit(q, e, t)
    skew = relative_logits_skew(q, e)
    gather = relative_logits_gather(q, e, t)
    lower = torch.ones(t, t, dtype=torch.bool).tril()
    assert (skew - explicit)[..., lower].abs().max() <= 1e-12 * explicit.abs().max()
    assert (gather - explicit)[..., lower].abs().max() <= 1e-12 * explicit.abs().max()
    # definition check of one entry: S_rel[i, j] = q_i . E[min(i - j, R)]
    i, j, h = 9, 2, 1
    row = e[0 if heads_rel == 1 else h, min(i - j, max_distance)]
    assert torch.allclose(explicit[0, h, i, j], q[0, i, h] @ row, atol=1e-12)


def test_skew_upper_triangle_is_garbage_so_the_mask_is_needed() -> None:
    q, _, _, e = inputs(max_distance=20)
    t = q.shape[1]
    skew, explicit = relative_logits_skew(q, e), relative_logits_explicit(q, e, t)
    upper = torch.ones(t, t, dtype=torch.bool).triu(1)
    assert (skew - explicit)[..., upper].abs().max() > 1e-3


@pytest.mark.parametrize("heads_rel", [1, 4])
def test_forms_agree_outputs_and_gradients(heads_rel: int) -> None:
    q, k, v, e = inputs(heads_rel=heads_rel, max_distance=4)
    w = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[-1], dtype=F64)
    results = {}
    for form in ("explicit", "skew", "gather"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, e)]
        out = relative_attention_reference(*leaves, form=form)
        (out * w).sum().backward()
        results[form] = (out.detach(), [t.grad for t in leaves])
    ref_out, ref_grads = results["explicit"]
    for form in ("skew", "gather"):
        out, grads = results[form]
        assert rel(out, ref_out) <= 1e-12, form
        for name, g, g_ref in zip("qkve", grads, ref_grads):
            assert rel(g, g_ref) <= 1e-12, f"{form}: gradient of {name}"


def test_queries_after_a_cache_match_the_full_rows() -> None:
    q, k, v, e = inputs(max_distance=6)
    full = relative_attention(q, k, v, e)
    tail = relative_attention(q[:, -4:], k, v, e)  # Tq < Tk: the gather path
    assert rel(tail, full[:, -4:]) <= 1e-12


def test_zero_embeddings_give_plain_causal_attention() -> None:
    q, k, v, e = inputs()
    out = relative_attention(q, k, v, torch.zeros_like(e))
    assert rel(out, causal_attention_reference(q, k, v)) <= 1e-12


def test_gradcheck_skew() -> None:
    q, k, v, e = inputs(b=1, t=6, h=2, hkv=1, d=4, heads_rel=2, max_distance=3)
    leaves = tuple(t.requires_grad_(True) for t in (q, k, v, e))
    assert torch.autograd.gradcheck(lambda *a: relative_attention_reference(*a, form="skew"), leaves)


class _PeakNumel(TorchDispatchMode):
    """Largest tensor any aten op produces (a proxy for peak extra memory, independent of the allocator)."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.peak = max(self.peak, t.numel())
        return out


def test_skew_memory_is_l_d_plus_l_squared_not_l_squared_d() -> None:
    b, length, h, d = 1, 96, 1, 32
    q, k, v, e = inputs(b=b, t=length, h=h, hkv=h, d=d, heads_rel=h, max_distance=length)
    leaves = [t.requires_grad_(True) for t in (q, k, v, e)]
    bound = 2 * b * h * (length * (length + 1) + length * d)  # O(L^2 + L D), with slack 2
    with _PeakNumel() as probe:
        out = relative_attention_reference(*leaves, form="skew")
        out.sum().backward()
    assert probe.peak <= bound < b * h * length * length * d
    with _PeakNumel() as probe_explicit:
        relative_logits_explicit(q, e, length)
    assert probe_explicit.peak >= length * length * d  # the probe does see the L x L x D gather


def test_bad_inputs_are_rejected() -> None:
    q, k, v, e = inputs()
    with pytest.raises(ValueError, match="rel_emb must have shape"):
        relative_attention(q, k, v, e[:, :, :4])
    with pytest.raises(ValueError, match="rel_emb must have shape"):
        relative_attention(q, k, v, torch.randn(3, 5, 8, dtype=F64))
    with pytest.raises(ValueError, match="backend"):
        relative_attention(q, k, v, e, backend="cuda")
    with pytest.raises(TypeError, match="dtypes"):
        relative_attention(q, k, v, e, backend="triton")  # the kernel has no float64
    with pytest.raises(ValueError, match="Tq == Tk"):
        relative_attention_reference(q[:, -2:], k, v, e, form="skew")
    with pytest.raises(ValueError, match="form"):
        relative_attention_reference(q, k, v, e, form="diagonal")
