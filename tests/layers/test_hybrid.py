"""The `hybrid` composite mixer: what it computes, its state, and its argument checks.

The shared tests (test_streaming.py, tests/models) cover `hybrid` through its ``example_kwargs``
(plain composition, three parts); these cover the default (inner residual) and the plumbing.
"""

from __future__ import annotations

import pytest
import torch

from mnemotorch.layers import get_mixer
from mnemotorch.layers.hybrid import Hybrid, HybridState
from mnemotorch.models import MnemoConfig, MnemoForCausalLM

DIM, HEADS = 16, 2
CONV_BASED = [{"type": "short_conv", "kernel_size": 3}, {"type": "based", "feature_dim": 4, "chunk_size": 4}]


def build(mixers=CONV_BASED, seed: int = 0, **kw) -> Hybrid:
    torch.manual_seed(seed)
    m = get_mixer("hybrid", dim=DIM, num_heads=HEADS, mixers=mixers, **kw).double()
    with torch.no_grad():  # non-trivial parameters (short_conv's output starts near zero otherwise)
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("residual", [True, False])
def test_computes_the_composition(residual: bool) -> None:
    mixers = CONV_BASED + [{"type": "sliding_window", "window": 4}]
    m = build(mixers, residual=residual)
    x = torch.randn(2, 13, DIM, dtype=torch.float64)
    y, _ = m(x)
    h = x
    for i, part in enumerate(m.parts):
        out, _ = part(h)
        h = h + out if residual and i < len(m.parts) - 1 else out
    assert torch.equal(y, h)
    assert isinstance(m.parts[0], type(get_mixer("short_conv", dim=DIM, num_heads=HEADS)))


def test_single_part_is_that_mixer() -> None:
    m = build([{"type": "sliding_window", "window": 4}])
    x = torch.randn(1, 9, DIM, dtype=torch.float64)
    assert torch.equal(m(x)[0], m.parts[0](x)[0])


@pytest.mark.parametrize("residual", [True, False])
def test_streaming_with_default_and_nested_parts(residual: bool) -> None:
    nested = [{"type": "short_conv", "kernel_size": 2},
              {"type": "hybrid", "mixers": CONV_BASED},
              {"type": "hebbian", "rule": "delta", "chunk_size": 4}]
    for mixers in (CONV_BASED, nested):
        m = build(mixers, residual=residual)
        x = torch.randn(2, 23, DIM, dtype=torch.float64)
        with torch.no_grad():
            full, state = m(x)
            for sizes in ([1] * 23, [5, 1, 9, 8], [22, 1]):
                s, outs = None, []
                for piece in torch.split(x, sizes, dim=1):
                    y, s = m(piece, s)
                    outs.append(y)
                assert rel(torch.cat(outs, 1), full) <= 1e-10, (mixers, sizes)
                assert s.seen_tokens == 23
        held = sum(t[0].numel() for t in state.tensors().values())  # per sequence
        assert m.state_size(23) == held == sum(p.state_size(23) for p in m.parts)


def test_state_holds_the_parts_states() -> None:
    m = build()
    x = torch.randn(3, 10, DIM, dtype=torch.float64)
    _, state = m(x)
    assert isinstance(state, HybridState) and len(state.parts) == 2
    _, conv_state = m.parts[0](x)
    assert torch.equal(state.parts[0].u, conv_state.u)
    assert all(name.startswith(("0.", "1.")) for name in state.tensors())
    init = m.init_state(3)
    assert init.seen_tokens == 0 and [type(p) for p in init.parts] == [type(p) for p in state.parts]
    assert rel(m(x, init)[0], m(x)[0]) == 0.0


def test_batch_reorder_and_repeat_reach_every_part() -> None:
    """What beam search does to a cached state: reorder / repeat rows, then continue streaming."""
    m = build()
    x = torch.randn(3, 12, DIM, dtype=torch.float64)
    full, _ = m(x[[2, 0, 0, 1]])
    _, s = m(x[:, :7])
    s.index_select_batch(torch.tensor([2, 0, 0, 1]))
    y, _ = m(x[[2, 0, 0, 1], 7:], s)
    assert rel(y, full[:, 7:]) <= 1e-12
    _, s = m(x[:, :7])
    s.repeat_interleave_batch(2)
    y, _ = m(x.repeat_interleave(2, 0)[:, 7:], s)
    assert rel(y, m(x.repeat_interleave(2, 0))[0][:, 7:]) <= 1e-12


def test_shared_settings_reach_the_parts_that_take_them() -> None:
    spec = {"type": "hybrid", "mixers": ["short_conv", {"type": "sliding_window", "window": 4},
                                         {"type": "attention", "rope_theta": 123.0}]}
    config = MnemoConfig(vocab_size=31, hidden_size=DIM, num_hidden_layers=1, num_attention_heads=HEADS,
                         num_key_value_heads=1, rope_theta=500.0, layer_plan=[spec])
    mixer = MnemoForCausalLM(config).model.layers[0].mixer
    _, swa, attn = mixer.parts
    assert swa.rope_theta == 500.0 and swa.num_kv_heads == 1
    assert attn.rope_theta == 123.0 and attn.num_kv_heads == 1  # a spec's own value wins


def test_in_a_model_state_size_and_round_trip(tmp_path) -> None:
    plan = [{"type": "hybrid", "mixers": CONV_BASED}] * 2
    config = MnemoConfig(vocab_size=31, hidden_size=DIM, num_hidden_layers=2, num_attention_heads=HEADS,
                         intermediate_size=0, layer_plan=plan)
    torch.manual_seed(0)
    model = MnemoForCausalLM(config).eval()
    conv = get_mixer("short_conv", dim=DIM, num_heads=HEADS, kernel_size=3).state_size(64)
    based = get_mixer("based", dim=DIM, num_heads=HEADS, feature_dim=4).state_size(64)
    assert model.state_size(64) == 2 * (conv + based)
    model.save_pretrained(tmp_path)
    again = MnemoForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 31, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"mixers": []}, ValueError, "non-empty"),
    ({"mixers": "based"}, ValueError, "non-empty list"),
    ({"mixers": [{"kernel_size": 3}]}, ValueError, r"mixers\[0\].*'type'"),
    ({"mixers": ["short_conv", "no_such_mixer"]}, ValueError, r"mixers\[1\]: unknown mixer 'no_such_mixer'"),
    ({"mixers": [{"type": "based", "dim": 8}]}, ValueError, r"mixers\[0\].*dim"),
    ({"mixers": ["short_conv", {"type": "based", "feature_dimm": 4}]}, TypeError, r"mixers\[1\] \('based'\).*feature_dimm"),
    ({"mixers": [{"type": "sliding_window", "window": 0}]}, ValueError, r"mixers\[0\] \('sliding_window'\).*window"),
    ({"mixers": ["short_conv"], "residual": 1}, TypeError, "residual"),
])
def test_bad_arguments_are_named(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        get_mixer("hybrid", dim=DIM, num_heads=HEADS, **kwargs)


def test_foreign_state_is_rejected() -> None:
    m = build()
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    _, conv_state = m.parts[0](x)
    with pytest.raises(TypeError, match="HybridState with 2 parts"):
        m(x, conv_state)
    _, other = build([{"type": "short_conv"}])(x)
    with pytest.raises(TypeError, match="HybridState with 2 parts"):
        m(x, other)
