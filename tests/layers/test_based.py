"""BASED: the `based` linear-attention mixer, the `short_conv` gated convolution and the layer-plan preset.

The shared streaming test covers both mixers with their ``example_kwargs``; here each is checked
against a direct float64 evaluation of its defining formula, and the preset builds a model whose
``generate`` equals repeated full forwards.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mnemotorch.layers import get_mixer, mixer_info
from mnemotorch.layers.based import BasedLinearAttention, LinearAttentionState
from mnemotorch.layers.short_conv import ShortConv, ShortConvState
from mnemotorch.models import MnemoConfig, MnemoForCausalLM
from mnemotorch.models.presets import based_layer_plan

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def randomize(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn_like(p))


def streamed(mixer, x, sizes):
    state, outs = None, []
    for piece in torch.split(x, sizes, dim=1):
        y, state = mixer(piece, state)
        outs.append(y)
    return torch.cat(outs, 1), state


# ---------------------------------------------------------------------------------------------
# based
# ---------------------------------------------------------------------------------------------


def based_direct(m: BasedLinearAttention, x: torch.Tensor) -> torch.Tensor:
    """y_t = Σ_{s≤t} κ(q_t, k_s) v_s / (Σ_{s≤t} κ(q_t, k_s) + ε), κ = 1 + q·k/√d + (q·k)²/(2d): no feature expansion."""
    b, t, _ = x.shape
    h, d, dv = m.num_heads, m.feature_dim, m.head_dim
    q = m.q_proj(x).view(b, t, h, d)
    k = m.k_proj(x).view(b, t, h, d)
    v = m.v_proj(x).view(b, t, h, dv)
    dot = torch.einsum("bihd,bjhd->bhij", q, k)
    kern = 1 + dot / math.sqrt(d) + dot**2 / (2 * d)
    kern = kern * torch.ones(t, t, dtype=x.dtype).tril()
    y = torch.einsum("bhij,bjhe->bihe", kern, v) / (kern.sum(-1).transpose(1, 2) + m.eps).unsqueeze(-1)
    return m.o_proj(y.reshape(b, t, h * dv))


@pytest.mark.parametrize("feature_dim,chunk_size,t", [(16, 64, 40), (4, 5, 23), (3, 7, 7), (2, 1, 9)])
def test_based_equals_direct_kernel_formula(feature_dim: int, chunk_size: int, t: int) -> None:
    torch.manual_seed(0)
    m = get_mixer("based", dim=16, num_heads=2, feature_dim=feature_dim, chunk_size=chunk_size).to(F64)
    randomize(m)
    x = torch.randn(2, t, 16, dtype=F64)
    with torch.no_grad():
        ref = based_direct(m, x)
        y, state = m(x)  # chunked form
        assert rel(y, ref) <= 1e-10
        y1, state1 = streamed(m, x, [1] * t)  # recurrent step, token by token
        assert rel(y1, ref) <= 1e-10
        for key in ("S", "z"):
            assert rel(getattr(state1, key), getattr(state, key)) <= 1e-10


def test_based_state_is_sum_of_taylor_features() -> None:
    torch.manual_seed(1)
    m = get_mixer("based", dim=8, num_heads=2, feature_dim=3).to(F64)
    x = torch.randn(1, 11, 8, dtype=F64)
    with torch.no_grad():
        _, state = m(x)
        k = m.k_proj(x).view(1, 11, 2, 3)
        v = m.v_proj(x).view(1, 11, 2, 4)
        ones = torch.ones_like(k[..., :1])
        phi = torch.cat([ones, k / 3**0.25, (k.unsqueeze(-1) * k.unsqueeze(-2)).flatten(-2) / math.sqrt(2 * 3)], -1)
    assert isinstance(state, LinearAttentionState) and state.seen_tokens == 11
    assert rel(state.z, phi.sum(1)[0:1]) <= 1e-12
    assert rel(state.S, torch.einsum("bthf,bthe->bhfe", phi, v)) <= 1e-12


def test_based_defaults_and_state_size() -> None:
    m = get_mixer("based", dim=64, num_heads=4)
    assert isinstance(m, BasedLinearAttention)
    assert m.feature_dim == 16 and m.expanded_dim == 273 and m.feature == "taylor" and m.normalize
    # H · (Dφ · Dv + Dφ), independent of the length.
    assert m.state_size(1) == m.state_size(10**6) == 4 * (273 * 16 + 273)
    _, state = m(torch.randn(3, 5, 64))
    assert state.S.shape == (3, 4, 273, 16) and state.z.shape == (3, 4, 273)
    assert sum(t[0].numel() for t in state.tensors().values()) == m.state_size(5)
    info = mixer_info("based")
    assert info["arguments"]["feature_dim"] == 16 and "feature" not in info["arguments"]


@pytest.mark.parametrize("kwargs,match", [({"feature_dim": 0}, "feature_dim"), ({"chunk_size": 0}, "chunk_size"), ({"eps": -1.0}, "eps")])
def test_based_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        get_mixer("based", dim=16, num_heads=2, **kwargs)
    with pytest.raises(TypeError, match="feature"):
        get_mixer("based", dim=16, num_heads=2, feature="relu")


# ---------------------------------------------------------------------------------------------
# short_conv
# ---------------------------------------------------------------------------------------------

ACT = {"identity": lambda t: t, "silu": F.silu, "sigmoid": torch.sigmoid}


def short_conv_loop(m: ShortConv, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token, channel-vectorised definition: c_t = Σ_j w[:, j] u_{t-K+1+j} (u_s = 0 for s < 0)."""
    ug = m.in_proj(x)
    u, g = ug[..., : m.inner], ug[..., m.inner :]
    k = m.kernel_size
    outs = []
    for t in range(x.shape[1]):
        c = torch.zeros_like(u[:, 0])
        for j in range(k):
            s = t - (k - 1) + j
            if s >= 0:
                c = c + m.conv_weight[:, j] * u[:, s]
        if m.conv_bias is not None:
            c = c + m.conv_bias
        outs.append(m.out_proj(ACT[m.activation](c) * ACT[m.gate](g[:, t])))
    return torch.stack(outs, 1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"kernel_size": 1},
        {"kernel_size": 4, "expand": 1, "gate": "sigmoid", "conv_bias": True},
        {"kernel_size": 2, "activation": "identity", "gate": "silu", "bias": False},
    ],
)
def test_short_conv_equals_direct_loop(kwargs) -> None:
    torch.manual_seed(0)
    m = get_mixer("short_conv", dim=12, num_heads=3, **kwargs).to(F64)
    randomize(m)
    x = torch.randn(2, 13, 12, dtype=F64)
    with torch.no_grad():
        ref = short_conv_loop(m, x)
        y, state = m(x)
        assert rel(y, ref) <= 1e-12
        for sizes in ([1] * 13, [2, 1, 10], [12, 1]):
            ys, st = streamed(m, x, sizes)
            assert rel(ys, ref) <= 1e-12
            assert torch.allclose(st.u, state.u, rtol=1e-12, atol=0) and st.seen_tokens == 13


def test_short_conv_matches_torch_conv1d() -> None:
    """Independent check of the tap orientation: nn.Conv1d's depthwise weight with K-1 left zeros."""
    torch.manual_seed(2)
    m = get_mixer("short_conv", dim=8, num_heads=2, kernel_size=3, expand=1, activation="identity").to(F64)
    x = torch.randn(1, 9, 8, dtype=F64)
    with torch.no_grad():
        u, g = m.in_proj(x).chunk(2, -1)
        c = F.conv1d(F.pad(u.transpose(1, 2), (2, 0)), m.conv_weight.unsqueeze(1), groups=8).transpose(1, 2)
        assert rel(m(x)[0], m.out_proj(c * g)) <= 1e-12


def test_short_conv_state_holds_last_inputs() -> None:
    m = get_mixer("short_conv", dim=8, num_heads=2, kernel_size=3)
    assert m.state_size(1) == m.state_size(1000) == 2 * 16
    x = torch.randn(2, 7, 8)
    _, state = m(x)
    assert isinstance(state, ShortConvState) and state.u.shape == (2, 2, 16)
    assert torch.allclose(state.u, m.in_proj(x)[:, -2:, :16])
    _, short = m(x[:, :1])  # one token: the older slot is still the zero padding
    assert torch.all(short.u[:, 0] == 0)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"kernel_size": 0}, ValueError, "kernel_size"),
        ({"expand": 0}, ValueError, "expand"),
        ({"activation": "relu"}, ValueError, "activation"),
        ({"gate": "tanh"}, ValueError, "gate"),
        ({"bias": 1}, TypeError, "bias"),
    ],
)
def test_short_conv_bad_arguments(kwargs, err, match) -> None:
    with pytest.raises(err, match=match):
        get_mixer("short_conv", dim=8, num_heads=2, **kwargs)


# ---------------------------------------------------------------------------------------------
# the BASED layer plan
# ---------------------------------------------------------------------------------------------


def test_preset_reproduces_reference_360m_order() -> None:
    plan = based_layer_plan(27, window=256)
    kinds = [s["type"] for s in plan]
    assert [i for i, k in enumerate(kinds) if k == "based"] == [1, 6, 11, 16, 21]
    assert [i for i, k in enumerate(kinds) if k == "sliding_window"] == [2, 7, 12, 17, 22]
    assert kinds.count("short_conv") == 17
    assert plan[1] == {"type": "based", "feature_dim": 16}
    assert plan[2] == {"type": "sliding_window", "window": 256}
    assert plan[0] == {"type": "short_conv", "kernel_size": 3, "expand": 2}
    assert [s["type"] for s in based_layer_plan(3)] == ["short_conv", "based", "sliding_window"]
    assert [s["type"] for s in based_layer_plan(10)] == ["short_conv", "based", "sliding_window", "short_conv", "short_conv"] * 2


@pytest.mark.parametrize("args,match", [((2,), "num_layers"), ((5, 0), "window"), ((5, 8, 0), "feature_dim"), ((True,), "num_layers")])
def test_preset_bad_arguments(args, match) -> None:
    with pytest.raises(ValueError, match=match):
        based_layer_plan(*args)


def tiny_based_model(num_layers: int = 5) -> MnemoForCausalLM:
    torch.manual_seed(0)
    plan = based_layer_plan(num_layers, window=4, feature_dim=4)
    config = MnemoConfig(vocab_size=53, hidden_size=16, num_hidden_layers=num_layers, num_attention_heads=2, layer_plan=plan, intermediate_size=32)
    return MnemoForCausalLM(config).eval()


def test_preset_model_forward_generate_and_state_size() -> None:
    model = tiny_based_model(5)
    kinds = [type(layer.mixer).__name__ for layer in model.model.layers]
    assert kinds == ["ShortConv", "BasedLinearAttention", "SlidingWindowAttention", "ShortConv", "ShortConv"]
    prompt = torch.randint(0, 53, (2, 6))
    out = model(prompt, labels=prompt)
    assert out.logits.shape == (2, 6, 53) and torch.isfinite(out.loss)

    gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False, pad_token_id=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(10):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(gen, seq)

    # Constant except the window: 3 short convs (2·32) + based H(Dφ·Dv + Dφ) + window 2·(W-1)·dim.
    expected = 3 * 2 * 32 + 2 * (21 * 8 + 21) + 2 * 3 * 16
    assert model.state_size(100) == expected == model.state_size(10_000)


def test_preset_model_streams_in_float64() -> None:
    model = tiny_based_model(5).double()
    ids = torch.randint(0, 53, (1, 12))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :7], use_cache=True)
        cache = first.cache if hasattr(first, "cache") else first.past_key_values
        second = model(ids[:, 7:], cache=cache, use_cache=True)
    assert rel(torch.cat([first.logits, second.logits], 1), full) <= 1e-10
