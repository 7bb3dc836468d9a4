"""Miras mixers (``moneta``, ``yaad``, ``memora``, ``delta_net``, ``gated_delta_net``).

The shared streaming / gradient / state-size / model tests cover them through the registry; these
add: the fast path each mixer uses equals the token reference inside the layer, DeltaNet's layer
equals the closed-form delta rule on its own projections, the momentum variant streams, and bad
constructor arguments fail naming the argument.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mnemotorch.layers import get_mixer, mixer_class
from mnemotorch.layers.short_conv import causal_depthwise_conv

F64 = torch.float64
NAMES = ["moneta", "yaad", "memora", "delta_net", "gated_delta_net"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def build(name: str, **kw):
    torch.manual_seed(0)
    mixer = get_mixer(name, dim=16, num_heads=2, **{**mixer_class(name).example_kwargs, **kw}).double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mixer


@pytest.mark.parametrize("name", NAMES)
def test_fast_path_equals_token_reference(name: str) -> None:
    mixer = build(name)
    x = torch.randn(2, 11, 16, dtype=F64)
    y_fast, s_fast = mixer(x)
    mixer.mode = "recurrent"
    y_ref, s_ref = mixer(x)
    assert rel(y_fast, y_ref) <= 1e-10 and rel(s_fast.weights, s_ref.weights) <= 1e-10


@pytest.mark.parametrize("name", ["delta_net", "gated_delta_net"])
def test_delta_layers_follow_the_closed_form(name: str) -> None:
    """S_t = α_t S_{t−1}(I − β_t k kᵀ) + β_t v kᵀ on the layer's own q, k, v, β, α (α ≡ 1 for DeltaNet)."""
    m = build(name)
    x = torch.randn(1, 9, 16, dtype=F64)
    y, _ = m(x)
    h, d = m.num_heads, m.head_dim
    qkv, _ = causal_depthwise_conv(m.qkv_proj(x), m.conv_weight)
    q, k, v = F.silu(qkv).view(1, 9, 3, h, d).unbind(2)
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    beta = torch.sigmoid(m.b_proj(x))
    alpha = torch.exp(-m.A_log.exp() * F.softplus(m.a_proj(x) + m.dt_bias)) if name == "gated_delta_net" else torch.ones_like(beta)
    assert ((alpha > 0) & (alpha <= 1)).all()
    s, outs, eye = torch.zeros(1, h, d, d, dtype=F64), [], torch.eye(d, dtype=F64)
    for t in range(9):
        kt, vt, a, b = k[:, t], v[:, t], alpha[:, t, :, None, None], beta[:, t, :, None, None]
        s = a * s @ (eye - b * kt[..., :, None] * kt[..., None, :]) + b * vt[..., :, None] * kt[..., None, :]
        outs.append((s @ q[:, t, ..., None])[..., 0])
    o = torch.stack(outs, 1)
    o = m.out_norm(o) * F.silu(m.g_proj(x)).view(1, 9, h, d)
    assert rel(y, m.o_proj(o.reshape(1, 9, h * d))) <= 1e-10


def test_momentum_variant_streams_and_counts_its_state() -> None:
    m = build("yaad", momentum=True)
    x = torch.randn(2, 10, 16, dtype=F64)
    full, state = m(x)
    assert state.momentum is not None and state.chunk_start is not None
    streamed, st = [], None
    for piece in x.split([3, 1, 6], dim=1):
        y, st = m(piece, st)
        streamed.append(y)
    assert rel(torch.cat(streamed, 1), full) <= 1e-10
    assert m.state_size(10) == sum(t[0].numel() for t in state.tensors().values())
    assert m.state_size(10) == 3 * 2 * (8 * 16 + 16 * 8) + 2 * 3 * 16


def test_state_sizes() -> None:
    # DeltaNet: one d×d matrix per head (no chunk-start copy at C = 1) + conv tail.
    assert get_mixer("delta_net", dim=16, num_heads=2, conv_size=4).state_size(100) == 2 * 8 * 8 + 3 * 3 * 16
    # Moneta, C = 16: accumulators + chunk-start weights (expansion 4: 8 -> 32 -> 8).
    assert get_mixer("moneta", dim=16, num_heads=2, conv_size=0).state_size(7) == 2 * 2 * (8 * 32 + 32 * 8)
    assert get_mixer("memora", dim=16, num_heads=2, chunk_size=1, conv_size=0).state_size(7) == 2 * (8 * 32 + 32 * 8)


def test_bad_arguments_are_rejected() -> None:
    for name, kw, err, word in [
        ("moneta", {"depth": 5}, ValueError, "depth"),
        ("moneta", {"chunk_size": 0}, ValueError, "chunk_size"),
        ("moneta", {"p": 0.0}, ValueError, "p "),
        ("moneta", {"q": 1.0}, ValueError, "q "),
        ("memora", {"activation": "tanh"}, ValueError, "activation"),
        ("memora", {"kl_scale": -1.0}, ValueError, "kl_scale"),
        ("yaad", {"init_delta": 0.0}, ValueError, "init_delta"),
        ("yaad", {"init_lr": 0.5}, ValueError, "init_lr"),
        ("yaad", {"momentum": 1}, TypeError, "momentum"),
        ("delta_net", {"block_size": 0}, ValueError, "block_size"),
        ("gated_delta_net", {"init_beta": 1.0}, ValueError, "init_beta"),
        ("delta_net", {"conv_size": -1}, ValueError, "conv_size"),
    ]:
        with pytest.raises(err, match=word):
            get_mixer(name, dim=16, num_heads=2, **kw)
