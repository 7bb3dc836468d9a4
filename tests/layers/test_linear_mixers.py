"""Mixer-specific checks of `linear_attention` and `hebbian` beyond the shared streaming test.

The shared test covers each mixer with its ``example_kwargs`` only; here every feature map and
both memory rules are streamed, and the state accounting and argument checks are pinned down.
"""

from __future__ import annotations

import pytest
import torch

from mnemotorch.layers import get_mixer
from mnemotorch.layers.linear_attention import HebbianState, LinearAttentionState

F64 = torch.float64


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def build(name, **kwargs):
    torch.manual_seed(0)
    return get_mixer(name, dim=16, num_heads=2, **kwargs).to(F64)


def streamed(mixer, x, sizes):
    state, outs = None, []
    for piece in torch.split(x, sizes, dim=1):
        y, state = mixer(piece, state)
        outs.append(y)
    return torch.cat(outs, 1), state


CONFIGS = [
    ("linear_attention", {"chunk_size": 4}),
    ("linear_attention", {"feature": "taylor", "feature_dim": 3, "chunk_size": 5}),
    ("linear_attention", {"feature": "relu", "chunk_size": 3}),
    ("linear_attention", {"feature": "identity", "normalize": False, "chunk_size": 4}),
    ("hebbian", {"rule": "hebb", "chunk_size": 4}),
    ("hebbian", {"rule": "hebb", "normalize_keys": False, "lr": 0.3}),
    ("hebbian", {"rule": "delta", "lr": 1.0}),
    ("hebbian", {"rule": "delta", "lr": 1.5}),
]


@pytest.mark.parametrize("name,kwargs", CONFIGS)
def test_streaming_every_variant(name, kwargs) -> None:
    mixer = build(name, **kwargs)
    x = torch.randn(2, 23, 16, dtype=F64)
    with torch.no_grad():
        full, state_full = mixer(x)
        for sizes in ([1] * 23, [5, 1, 10, 7], [22, 1]):
            y, state = streamed(mixer, x, sizes)
            assert rel(y, full) <= 1e-10, f"{name} {kwargs} {sizes}"
            for key, t in state.tensors().items():
                assert rel(t, state_full.tensors()[key]) <= 1e-10
            assert state.seen_tokens == 23


def test_linear_attention_state_shapes_and_size() -> None:
    m = get_mixer("linear_attention", dim=32, num_heads=4, feature="taylor", feature_dim=4)
    assert m.expanded_dim == 1 + 4 + 16
    _, st = m(torch.randn(3, 10, 32))
    assert isinstance(st, LinearAttentionState)
    assert st.S.shape == (3, 4, 21, 8) and st.z.shape == (3, 4, 21)
    assert m.state_size(10) == m.state_size(10**6) == 4 * (21 * 8 + 21)


def test_hebbian_state_shapes_and_size() -> None:
    m = get_mixer("hebbian", dim=32, num_heads=4, rule="delta")
    _, st = m(torch.randn(3, 10, 32))
    assert isinstance(st, HebbianState) and st.M.shape == (3, 4, 8, 8)
    assert m.state_size(10) == m.state_size(10**6) == 4 * 8 * 8


def test_half_precision_state_is_float32() -> None:
    m = get_mixer("linear_attention", dim=16, num_heads=2).to(torch.bfloat16)
    y, st = m(torch.randn(1, 6, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and st.S.dtype == torch.float32
    y1, st = m(torch.randn(1, 1, 16, dtype=torch.bfloat16), st)  # the recurrent (decoding) step
    assert y1.dtype == torch.bfloat16 and st.S.dtype == torch.float32


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("linear_attention", {"feature": "softmax"}, "feature must be one of"),
        ("linear_attention", {"feature_dim": 0}, "feature_dim"),
        ("linear_attention", {"chunk_size": 0}, "chunk_size"),
        ("linear_attention", {"eps": -1.0}, "eps"),
        ("hebbian", {"rule": "oja"}, "rule must be one of"),
        ("hebbian", {"lr": 0.0}, "lr"),
        ("hebbian", {"rule": "delta", "lr": 2.5}, "lr must be in"),
    ],
)
def test_bad_constructor_arguments(name, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        get_mixer(name, dim=16, num_heads=2, **kwargs)
