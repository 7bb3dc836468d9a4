"""power and neighborhood mixers: masks equal the ops.block_sparse patterns; attention equals the dense definition."""

from __future__ import annotations

import pytest
import torch

from mnemotorch.layers import get_mixer
from mnemotorch.ops.block_sparse import neighborhood_pattern_1d, power_pattern


@pytest.mark.parametrize("L,B,w,sink", [(40, 4, 2, 1), (64, 3, 1, 0), (33, 5, 3, 2)])
def test_power_rule_equals_pattern(L, B, w, sink) -> None:
    m = get_mixer("power", dim=16, num_heads=2, block_size=B, window_blocks=w, sink_blocks=sink)
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    assert torch.equal(m.allowed(i, j), power_pattern(L, B, w, sink, q_block=16, k_block=16).dense_mask())


@pytest.mark.parametrize("L,k,d", [(40, 4, 1), (40, 4, 3), (23, 7, 2), (16, 1, 1)])
def test_neighborhood_rule_equals_natten_causal_pattern(L, k, d) -> None:
    if k * d > L:
        pytest.skip("k*d > L")
    m = get_mixer("neighborhood", dim=16, num_heads=2, kernel_size=k, dilation=d)
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    assert torch.equal(m.allowed(i, j), neighborhood_pattern_1d(L, k, dilation=d, causal=True, q_block=16, k_block=16).dense_mask())


@pytest.mark.parametrize("name,kw", [("power", {"block_size": 4, "window_blocks": 2}), ("neighborhood", {"kernel_size": 5, "dilation": 2})])
def test_mixer_equals_dense_masked_softmax(name, kw) -> None:
    torch.manual_seed(0)
    m = get_mixer(name, dim=16, num_heads=2, **kw).double()
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    y, _ = m(x)
    # dense definition: project, rotate, mask, softmax
    from mnemotorch.ops.rotary import apply_rotary, rotary_cos_sin

    b, t, _ = x.shape
    q = m.q_proj(x).view(b, t, 2, 8)
    k = m.k_proj(x).view(b, t, 2, 8)
    v = m.v_proj(x).view(b, t, 2, 8)
    cos, sin = rotary_cos_sin(torch.arange(t), 8, dtype=x.dtype)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / 8**0.5
    mask = m.allowed(torch.arange(t)[:, None], torch.arange(t)[None, :])
    p = s.masked_fill(~mask, float("-inf")).softmax(-1)
    ref = m.o_proj(torch.einsum("bhij,bjhd->bihd", p, v).reshape(b, t, 16))
    assert ((y - ref).norm() / ref.norm()).item() <= 1e-12


def test_neighborhood_state_is_bounded_power_state_is_not() -> None:
    na = get_mixer("neighborhood", dim=16, num_heads=2, kernel_size=4, dilation=3)
    _, st = na(torch.randn(1, 50, 16))
    assert st.k.shape[1] == 9 and na.state_size(10_000) == na.state_size(9)
    pw = get_mixer("power", dim=16, num_heads=2, block_size=4)
    _, st = pw(torch.randn(1, 50, 16))
    assert st.k.shape[1] == 50


@pytest.mark.parametrize("kwargs,match", [({"kernel_size": 0}, "kernel_size"), ({"dilation": 0}, "dilation")])
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        get_mixer("neighborhood", dim=16, num_heads=2, **kwargs)
    with pytest.raises(ValueError, match="block_size"):
        get_mixer("power", dim=16, num_heads=2, block_size=0)
