"""Titans neural memory (``mnemotorch.ops.memory``): the spec's CPU tests.

1. chunked dual form = float64 token reference (≤ 1e-10), every architecture; C = 1 = online GD;
2. streaming: any split (inside chunks, one token at a time) with the state carried = one call;
3. float64 ``gradcheck`` for q, k, v, θ, η, α, the initial weights and momentum;
plus saturated gates, debug-mode diagnostics and argument errors.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from mnemotorch.layers import get_mixer
from mnemotorch.ops.memory import (
    MemoryState,
    memory_forward,
    memory_hidden_shapes,
    neural_memory,
    neural_memory_chunked,
    neural_memory_reference,
    segment_sum,
)

F64 = torch.float64
FORMS = [(False, False), (True, False), (True, True), (False, True)]  # (residual, layer_norm)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def make_inputs(b=2, t=19, h=2, dk=4, dv=4, dtype=F64, seed=0, theta_max=0.1):
    """Unit q/k (as the mixer feeds them), gates well inside their ranges."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    uni = lambda lo, hi: lo + (hi - lo) * torch.rand(b, t, h, generator=g, dtype=dtype)  # noqa: E731
    q, k = F.normalize(rnd(b, t, h, dk), dim=-1), F.normalize(rnd(b, t, h, dk), dim=-1)
    v = rnd(b, t, h, dv)
    return q, k, v, uni(0.0, theta_max), uni(0.5, 1.0), uni(0.0, 0.1)


def make_state(b, h, dk, dv, depth, hidden=6, dtype=F64, seed=1, momentum=True, position=0):
    g = torch.Generator().manual_seed(seed)
    shapes = memory_hidden_shapes(dk, dv, depth, hidden)
    w = tuple(torch.randn(b, h, i, o, generator=g, dtype=dtype) / i**0.5 for i, o in shapes)
    s = tuple((0.1 if momentum else 0.0) * torch.randn(b, h, i, o, generator=g, dtype=dtype) for i, o in shapes)
    start = w if position == 0 else tuple(x + 0.1 * torch.randn(x.shape, generator=g, dtype=dtype) for x in w)
    return MemoryState(w, s, start, position)


def assert_states_close(a: MemoryState, b: MemoryState, tol: float) -> None:
    assert a.position == b.position
    for name in ("weights", "momentum", "chunk_start"):
        for i, (x, y) in enumerate(zip(getattr(a, name), getattr(b, name))):
            assert rel(x, y) <= tol, f"{name}[{i}]: {rel(x, y):.3e}"


# -- 1. chunked = token reference ---------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("residual,layer_norm", FORMS)
@pytest.mark.parametrize("chunk", [1, 4, 32])
def test_chunked_equals_token_reference(depth, residual, layer_norm, chunk) -> None:
    q, k, v, th, et, al = make_inputs()
    state = make_state(2, 2, 4, 4, depth)
    act = "gelu" if depth == 3 else "silu"
    y_ref, s_ref = neural_memory_reference(q, k, v, th, et, al, state, chunk, act, residual, layer_norm)
    y, s = neural_memory_chunked(q, k, v, th, et, al, state, chunk, act, residual, layer_norm)
    assert rel(y, y_ref) <= 1e-10
    assert_states_close(s, s_ref, 1e-10)


@pytest.mark.parametrize("depth,activation", [(1, "silu"), (2, "relu"), (2, "gelu")])
def test_rectangular_memory_and_mid_chunk_start(depth, activation) -> None:
    """Dk != Dv; the call starts inside a chunk whose start weights differ from the current weights."""
    q, k, v, th, et, al = make_inputs(dk=3, dv=5, t=17, seed=3)
    state = make_state(2, 2, 3, 5, depth, position=3)
    y_ref, s_ref = neural_memory_reference(q, k, v, th, et, al, state, 5, activation)
    y, s = neural_memory(q, k, v, th, et, al, state, chunk_size=5, activation=activation)
    assert rel(y, y_ref) <= 1e-10
    assert_states_close(s, s_ref, 1e-10)
    assert s.position == (3 + 17) % 5


@pytest.mark.parametrize("depth", [1, 2])
def test_chunk_size_one_is_online_gradient_descent(depth) -> None:
    """C = 1: every gradient at the current weights -- an autograd loop written independently here."""
    q, k, v, th, et, al = make_inputs(b=1, t=13, seed=5)
    state = make_state(1, 2, 4, 4, depth, momentum=False)
    y, _ = neural_memory(q, k, v, th, et, al, list(state.weights), chunk_size=1, residual=True)

    w = [x.clone() for x in state.weights]
    s = [torch.zeros_like(x) for x in w]
    outs = []
    for t in range(q.shape[1]):
        wr = [x.detach().requires_grad_() for x in w]
        h = k[:, t].unsqueeze(-2)  # [B, H, 1, D]
        for i, x in enumerate(wr):
            h = h @ x
            if i < len(wr) - 1:
                h = F.silu(h)
        loss = (h + k[:, t].unsqueeze(-2) - v[:, t].unsqueeze(-2)).pow(2).sum()
        grads = torch.autograd.grad(loss, wr)
        gate = lambda g: g[:, t, :, None, None]  # noqa: E731
        s = [gate(et) * si - gate(th) * gi for si, gi in zip(s, grads)]
        w = [(1 - gate(al)) * wi + si for wi, si in zip(w, s)]
        outs.append(memory_forward(w, q[:, t].unsqueeze(-2), residual=True).squeeze(-2))
    assert rel(y, torch.stack(outs, 1)) <= 1e-10


def test_linear_memory_closed_form() -> None:
    """Depth 1: ∇ = 2 kᵀ(k W − v), and without momentum/decay and C = 1 the update is the delta rule."""
    q, k, v, th, _, _ = make_inputs(b=1, t=9, seed=7)
    w0 = torch.zeros(1, 2, 4, 4, dtype=F64)
    eta = torch.zeros_like(th)  # η = 0: no momentum carried (exact in log space: exp(-inf) = 0)
    y, s = neural_memory(q, k, v, th, eta, torch.zeros_like(th), [w0], chunk_size=1)
    w, outs = w0.clone(), []
    for t in range(9):
        kt, vt = k[:, t].unsqueeze(-2), v[:, t].unsqueeze(-2)
        w = w - th[:, t, :, None, None] * 2 * kt.transpose(-1, -2) @ (kt @ w - vt)
        outs.append((q[:, t].unsqueeze(-2) @ w).squeeze(-2))
    assert rel(y, torch.stack(outs, 1)) <= 1e-12
    assert rel(s.weights[0], w) <= 1e-12


def test_chunking_changes_the_function() -> None:
    """Chunk size is a model hyperparameter: frozen gradients differ from online GD."""
    q, k, v, th, et, al = make_inputs(seed=11)
    state = make_state(2, 2, 4, 4, 2)
    y1, _ = neural_memory(q, k, v, th, et, al, state, chunk_size=1)
    y4, _ = neural_memory(q, k, v, th, et, al, state, chunk_size=4)
    assert torch.isfinite(y4).all() and rel(y4, y1) > 1e-2


def test_segment_sum_and_saturated_gates() -> None:
    x = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    expect = torch.tensor([[0.0, -torch.inf, -torch.inf], [-1.0, 0.0, -torch.inf], [1.0, 2.0, 0.0]], dtype=F64)
    assert torch.equal(segment_sum(x), expect)
    # η = 0 (momentum reset) and α = 1 (full forgetting) are exact in the forward pass.
    q, k, v, th, et, al = make_inputs(t=11, seed=13)
    et[:, 3], al[:, 6] = 0.0, 1.0
    state = make_state(2, 2, 4, 4, 2)
    y_ref, s_ref = neural_memory_reference(q, k, v, th, et, al, state, 4)
    y, s = neural_memory(q, k, v, th, et, al, state, chunk_size=4)
    assert torch.isfinite(y).all()
    assert rel(y, y_ref) <= 1e-10
    assert_states_close(s, s_ref, 1e-10)


# -- 2. streaming -----------------------------------------------------------------------------


def random_splits(total: int, rng: random.Random) -> list[int]:
    cuts = sorted(rng.sample(range(1, total), rng.randint(1, min(8, total - 1))))
    return [b - a for a, b in zip([0] + cuts, cuts + [total])]


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("depth,residual,layer_norm", [(1, False, False), (3, True, False), (2, True, True)])
def test_streaming_across_splits_inside_chunks(dtype, tol, depth, residual, layer_norm) -> None:
    # Head dim 8: the affine-free LayerNorm over very few channels amplifies float32 rounding (its
    # rstd grows when the memory's raw output has little spread); the float64 check is unaffected.
    t, chunk = 23, 5
    q, k, v, th, et, al = make_inputs(t=t, dk=8, dv=8, dtype=dtype, seed=17)
    state0 = make_state(2, 2, 8, 8, depth, dtype=dtype)
    kw = dict(chunk_size=chunk, residual=residual, layer_norm=layer_norm)
    full, final = neural_memory(q, k, v, th, et, al, state0, **kw)
    rng = random.Random(0)
    for sizes in [[1] * t, [2, 3, 18], [7, 16]] + [random_splits(t, rng) for _ in range(4)]:
        state, outs, start = state0, [], 0
        for n in sizes:
            sl = slice(start, start + n)
            y, state = neural_memory(q[:, sl], k[:, sl], v[:, sl], th[:, sl], et[:, sl], al[:, sl], state, **kw)
            outs.append(y)
            start += n
            assert state.position == start % chunk
        assert rel(torch.cat(outs, 1), full) <= tol, sizes
        assert_states_close(state, final, tol)


# -- 3. gradcheck -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "depth,residual,layer_norm,position",
    [(1, False, False, 0), (2, True, False, 0), (2, False, True, 1), (3, True, False, 2)],
)
def test_gradcheck(depth, residual, layer_norm, position) -> None:
    b, t, h, d, chunk = 1, 7, 2, 3, 3
    q, k, v, th, et, al = make_inputs(b=b, t=t, h=h, dk=d, dv=d, seed=19, theta_max=0.3)
    th, et, al = th + 0.05, et.clamp(0.55, 0.95), al + 0.05  # keep finite differences inside the ranges
    st = make_state(b, h, d, d, depth, hidden=4, position=position)
    n = depth

    def fn(q, k, v, th, et, al, *ws):
        w, s, start = ws[:n], ws[n : 2 * n], ws[2 * n :] if position else ws[:n]
        y, out = neural_memory(q, k, v, th, et, al, MemoryState(w, s, start, position), chunk_size=chunk, residual=residual, layer_norm=layer_norm)
        return (y, *out.weights, *out.momentum)

    leaves = [x.clone().requires_grad_() for x in (q, k, v, th, et, al, *st.weights, *st.momentum)]
    if position:
        leaves += [x.clone().requires_grad_() for x in st.chunk_start]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_reference_and_chunked_gradients_agree() -> None:
    q, k, v, th, et, al = make_inputs(b=1, t=10, seed=23)
    st = make_state(1, 2, 4, 4, 2)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, th, et, al, *st.weights)]
    cot = torch.randn(1, 10, 2, 4, dtype=F64)
    grads = []
    for impl in (neural_memory_reference, neural_memory_chunked):
        y, out = impl(*leaves[:6], list(leaves[6:]), 4, "silu", True, True)
        grads.append(torch.autograd.grad((y * cot).sum() + sum(w.sum() for w in out.weights), leaves))
    for i, (a, b) in enumerate(zip(*grads)):
        assert rel(b, a) <= 1e-10, i


# -- layer-level checks beyond the shared streaming test ----------------------------------------


@pytest.mark.parametrize("kw", [dict(depth=1), dict(depth=3, layer_norm=True, conv_size=0), dict(depth=4, chunk_size=1, output_gate=False)])
def test_titans_lmm_variants_stream(kw) -> None:
    torch.manual_seed(0)
    mixer = get_mixer("titans_lmm", dim=16, num_heads=2, expansion=2, **{"chunk_size": 3, **kw}).double()
    x = torch.randn(2, 11, 16, dtype=F64)
    with torch.no_grad():
        full, state = mixer(x)
        y1, st = mixer(x[:, :4])
        y2, st = mixer(x[:, 4:5], st)
        y3, st = mixer(x[:, 5:], st)
    assert rel(torch.cat([y1, y2, y3], 1), full) <= 1e-10
    held = sum(t.numel() for t in state.tensors().values())
    assert mixer.state_size(11) == mixer.state_size(10_000) == held // 2  # per sequence, batch of 2


def test_autocast_does_not_reach_the_memory() -> None:
    q, k, v, th, et, al = make_inputs(dtype=torch.float32, seed=29)
    st = make_state(2, 2, 4, 4, 2, dtype=torch.float32)
    y, _ = neural_memory(q, k, v, th, et, al, st, chunk_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ac, s_ac = neural_memory(q, k, v, th, et, al, st, chunk_size=4)
    assert y_ac.dtype == torch.float32 and s_ac.weights[0].dtype == torch.float32
    assert rel(y_ac, y) <= 1e-6


# -- bad input ----------------------------------------------------------------------------------


def test_debug_mode_names_the_gate() -> None:
    q, k, v, th, et, al = make_inputs(t=8, seed=31)
    st = make_state(2, 2, 4, 4, 1)
    bad = al.clone()
    bad[0, 2, 1] = 1.5
    with pytest.raises(ValueError, match="alpha"):
        neural_memory(q, k, v, th, et, bad, st, chunk_size=4, debug=True)
    q, k, v, th, et, al = make_inputs(t=60, dtype=torch.float32, seed=31)
    st = make_state(2, 2, 4, 4, 1, dtype=torch.float32)
    with pytest.raises(FloatingPointError, match="theta max"):
        neural_memory(q, k, v, th + 40.0, et, al, st, chunk_size=1, debug=True)


def test_bad_arguments_are_rejected() -> None:
    q, k, v, th, et, al = make_inputs(t=6)
    st = make_state(2, 2, 4, 4, 2)
    with pytest.raises(ValueError, match="theta must have shape"):
        neural_memory(q, k, v, th[:, :, :1], et, al, st)
    with pytest.raises(ValueError, match="chunk_size"):
        neural_memory(q, k, v, th, et, al, st, chunk_size=0)
    with pytest.raises(ValueError, match="activation"):
        neural_memory(q, k, v, th, et, al, st, activation="tanh")
    with pytest.raises(ValueError, match="depth"):
        neural_memory(q, k, v, th, et, al, list(make_state(2, 2, 4, 4, 4).weights) + [torch.zeros(2, 2, 4, 4, dtype=F64)])
    with pytest.raises(ValueError, match="residual=True needs Dk == Dv"):
        q3, k3, v5, *gates = make_inputs(t=6, dk=3, dv=5)
        neural_memory(q3, k3, v5, *gates, make_state(2, 2, 3, 5, 1), residual=True)
    with pytest.raises(ValueError, match="position"):
        neural_memory(q, k, v, th, et, al, MemoryState(st.weights, st.momentum, st.chunk_start, 4), chunk_size=4)
    with pytest.raises(ValueError, match="d_in"):
        neural_memory(q, k, v, th, et, al, make_state(2, 2, 3, 4, 2))
    with pytest.raises(TypeError, match="initial_state"):
        neural_memory(q, k, v, th, et, al, None)
    with pytest.raises(NotImplementedError, match="triton"):
        neural_memory(q, k, v, th, et, al, st, backend="triton")
    with pytest.raises(ValueError, match="mode"):
        neural_memory(q, k, v, th, et, al, st, mode="parallel")
    with pytest.raises(ValueError, match="depth"):
        get_mixer("titans_lmm", dim=16, num_heads=2, depth=5)
    with pytest.raises(ValueError, match="init_theta"):
        get_mixer("titans_lmm", dim=16, num_heads=2, max_lr=0.1, init_theta=0.2)


# -- stability bound: per-token clipping of the surprise gradient (max_grad_norm) ---------------


@pytest.mark.parametrize("depth,residual,layer_norm", [(1, False, False), (2, True, False), (3, False, True)])
@pytest.mark.parametrize("tau", [0.3, 2.0])
def test_clipped_chunked_equals_reference_and_streams(depth, residual, layer_norm, tau) -> None:
    """Clipping is part of the specification: token loop = dual form, whole = split inside a chunk."""
    q, k, v, th, et, al = make_inputs(t=13, seed=31, theta_max=0.3)
    v = 3 * v  # larger errors, so that some tokens are clipped and some are not
    st = make_state(2, 2, 4, 4, depth, momentum=True)
    kw = dict(chunk_size=4, residual=residual, layer_norm=layer_norm, max_grad_norm=tau)
    y_ref, s_ref = neural_memory_reference(q, k, v, th, et, al, st, **kw)
    y, s = neural_memory_chunked(q, k, v, th, et, al, st, **kw)
    assert rel(y, y_ref) <= 1e-10
    assert_states_close(s, s_ref, 1e-10)
    y_off, _ = neural_memory_chunked(q, k, v, th, et, al, st, **{**kw, "max_grad_norm": None})
    assert rel(y_off, y) > 1e-3  # the clip bites at these sizes
    y1, s1 = neural_memory(q[:, :6], k[:, :6], v[:, :6], th[:, :6], et[:, :6], al[:, :6], st, **kw)
    y2, s2 = neural_memory(q[:, 6:], k[:, 6:], v[:, 6:], th[:, 6:], et[:, 6:], al[:, 6:], s1, **kw)
    assert rel(torch.cat([y1, y2], 1), y) <= 1e-10
    assert_states_close(s2, s, 1e-10)


def test_clipping_with_a_large_bound_is_the_paper_update() -> None:
    q, k, v, th, et, al = make_inputs(t=9, seed=33)
    st = make_state(2, 2, 4, 4, 2)
    y0, _ = neural_memory(q, k, v, th, et, al, st, chunk_size=4)
    y1, _ = neural_memory(q, k, v, th, et, al, st, chunk_size=4, max_grad_norm=1e6)
    assert torch.equal(y0, y1)


def test_clipping_bounds_the_momentum_where_the_paper_update_diverges() -> None:
    """θ = 0.5, η = 0.99, chunks of 16: the unclipped depth-2 memory blows up within the sequence;
    clipped, every token's step is at most θτ, so ‖S_t‖ ≤ θτ / (1 − η) per head (a hard bound)."""
    b, t, h, d = 1, 128, 2, 8
    q, k, v, _, _, _ = make_inputs(b=b, t=t, h=h, dk=d, dv=d, seed=35)
    v = 4 * v
    th, et, al = (torch.full((b, t, h), x, dtype=F64) for x in (0.5, 0.99, 0.001))
    st = make_state(b, h, d, d, 2, hidden=16, momentum=False)
    _, s_off = neural_memory(q, k, v, th, et, al, st, chunk_size=16, residual=True)
    norm = lambda ws: torch.stack([w.pow(2).sum((-2, -1)) for w in ws]).sum(0).sqrt()  # noqa: E731  [B, H]
    assert not (norm(s_off.weights) < 1e6).all()  # diverged (or non-finite)
    tau = 1.0
    y, s_on = neural_memory(q, k, v, th, et, al, st, chunk_size=16, residual=True, max_grad_norm=tau)
    assert torch.isfinite(y).all()
    assert (norm(s_on.momentum) <= 0.5 * tau / (1 - 0.99) + 1e-9).all()
    assert (norm(s_on.weights) <= norm(st.weights) + t * 0.5 * tau / (1 - 0.99)).all()


def test_clipping_gradients_agree_and_bad_bound_is_rejected() -> None:
    q, k, v, th, et, al = make_inputs(b=1, t=10, seed=37, theta_max=0.3)
    v = 3 * v
    st = make_state(1, 2, 4, 4, 2)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, th, et, al, *st.weights)]
    cot = torch.randn(1, 10, 2, 4, dtype=F64)
    grads = []
    for impl in (neural_memory_reference, neural_memory_chunked):
        y, out = impl(*leaves[:6], list(leaves[6:]), 4, "silu", True, False, max_grad_norm=0.5)
        grads.append(torch.autograd.grad((y * cot).sum() + sum(w.sum() for w in out.weights), leaves))
    for i, (a, b) in enumerate(zip(*grads)):
        assert torch.isfinite(a).all() and rel(b, a) <= 1e-10, i
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="max_grad_norm"):
            neural_memory(q, k, v, th, et, al, list(st.weights), max_grad_norm=bad)
    for kw in (dict(max_momentum=0.0), dict(max_momentum=1.5), dict(max_grad_norm=-1.0), dict(max_momentum=0.5, init_eta=0.6)):
        with pytest.raises(ValueError, match=next(iter(kw)) if "init_eta" not in kw else "init_eta"):
            get_mixer("titans_lmm", dim=16, num_heads=2, **kw)


def test_mixer_bounds_momentum_gate() -> None:
    """η_t = max_momentum · σ(·): even with the η logits pushed to +∞, η stays at the bound."""
    m = get_mixer("titans_lmm", dim=16, num_heads=2, max_momentum=0.8, chunk_size=4).double()
    assert abs(m.gate_proj.bias[2:4].sigmoid().mean().item() * 0.8 - 0.72) < 1e-6  # starts at 0.9 · bound (set in float32)
    seen = {}

    import mnemotorch.layers.titans as titans_mod

    orig = titans_mod.neural_memory

    def spy(q, k, v, theta, eta, alpha, *a, **kw):
        seen["eta"], seen["clip"] = eta, kw.get("max_grad_norm")
        return orig(q, k, v, theta, eta, alpha, *a, **kw)

    with torch.no_grad():
        m.gate_proj.bias[2:4].fill_(50.0)
    try:
        titans_mod.neural_memory = spy
        m(torch.randn(1, 5, 16, dtype=F64))
    finally:
        titans_mod.neural_memory = orig
    assert seen["eta"].max().item() <= 0.8 and seen["eta"].max().item() > 0.8 - 1e-12
    assert seen["clip"] == 1.0  # the default bound is on
