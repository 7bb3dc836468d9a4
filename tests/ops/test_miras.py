"""Miras framework (``mnemotorch.ops.memory.miras``): instances, implementations, gradients, errors.

1. linear-memory instances equal their closed forms in float64 (DeltaNet, Gated DeltaNet, linear
   attention, and the existing ``hebbian_memory`` / ``linear_attention`` / Titans ops);
2. the chunked and WY paths equal the token reference (≤ 1e-10), for every bias × retention ×
   algorithm, depth 1 and 2, chunk sizes 1 and 3, including calls that start inside a chunk;
3. float64 ``gradcheck`` at tiny sizes; bad arguments fail naming the argument.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from mnemotorch.ops.linear import hebbian_memory, linear_attention
from mnemotorch.ops.memory import (
    INSTANCES,
    MemoryState,
    MirasConfig,
    memory_hidden_shapes,
    miras_chunked,
    miras_instance,
    miras_memory,
    miras_reference,
    miras_wy,
    neural_memory_reference,
    retention_map,
)

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def inputs(b=2, t=11, h=2, d=4, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    uni = lambda lo, hi: lo + (hi - lo) * torch.rand(b, t, h, generator=g, dtype=dtype)  # noqa: E731
    q, k = F.normalize(rnd(b, t, h, d), dim=-1), F.normalize(rnd(b, t, h, d), dim=-1)
    return dict(q=q, k=k, v=rnd(b, t, h, d), lr=uni(0.05, 0.9), retain=uni(0.6, 1.0), momentum=uni(0.5, 1.0), delta=uni(0.3, 1.5))


def weights(b=2, h=2, d=4, depth=1, hidden=6, seed=1, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, i, o, generator=g, dtype=dtype) / i**0.5 for i, o in memory_hidden_shapes(d, d, depth, hidden)]


def call(fn, x, w, config, **kw):
    extra = {"momentum": x["momentum"] if config.algorithm == "momentum" else None, "delta": x["delta"] if config.bias == "huber" else None}
    return fn(x["q"], x["k"], x["v"], x["lr"], x["retain"], w, config, **extra, **kw)


def delta_rule_closed_form(q, k, v, alpha, beta, s0):
    """``S_t = α_t S_{t−1}(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ``, ``o_t = S_t q_t``; ``S [B, H, Dv, Dk]``."""
    eye = torch.eye(k.shape[-1], dtype=k.dtype)
    s, outs = s0, []
    for t in range(q.shape[1]):
        kt, vt, a, b = k[:, t], v[:, t], alpha[:, t, :, None, None], beta[:, t, :, None, None]
        s = a * s @ (eye - b * kt[..., :, None] * kt[..., None, :]) + b * vt[..., :, None] * kt[..., None, :]
        outs.append((s @ q[:, t, ..., None])[..., 0])
    return torch.stack(outs, 1), s


# -- 1. closed forms ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["recurrent", "chunked", "wy"])
def test_delta_net_and_gated_delta_net_closed_forms(mode: str) -> None:
    x = inputs()
    w0 = weights()[0]  # W [Dk, Dv] = Sᵀ
    one = torch.ones_like(x["lr"])
    kw = {"block_size": 4} if mode == "wy" else {}
    for name, alpha in (("delta_net", one), ("gated_delta_net", x["retain"])):
        y, st = miras_memory(x["q"], x["k"], x["v"], x["lr"], alpha, [w0], INSTANCES[name], mode=mode, **kw)
        y_ref, s_ref = delta_rule_closed_form(x["q"], x["k"], x["v"], alpha, x["lr"], w0.transpose(-1, -2))
        assert rel(y, y_ref) <= 1e-10 and rel(st.weights[0].transpose(-1, -2), s_ref) <= 1e-10, name
    # Without retain_first the decayed memory gets the gradient at W_{t−1}: a different model.
    y_miras, _ = miras_memory(x["q"], x["k"], x["v"], x["lr"], x["retain"], [w0], MirasConfig(bias="l2"), mode=mode, **kw)
    assert rel(y_miras, delta_rule_closed_form(x["q"], x["k"], x["v"], x["retain"], x["lr"], w0.transpose(-1, -2))[0]) > 1e-3


def test_delta_net_equals_hebbian_delta_rule_and_linear_attention() -> None:
    x = inputs()
    zero = torch.zeros(2, 2, 4, 4, dtype=F64)
    one = torch.ones_like(x["lr"])
    y, st = miras_memory(x["q"], x["k"], x["v"], x["lr"], one, [zero], INSTANCES["delta_net"])
    y_h, m_h = hebbian_memory(x["k"], x["v"], x["q"], rule="delta", lr=x["lr"], initial_state=zero)
    assert rel(y, y_h) <= 1e-10 and rel(st.weights[0].transpose(-1, -2), m_h) <= 1e-10
    # Linear attention: dot-product bias, no retention, η = 1: S_t = S_{t−1} + v_t k_tᵀ.
    for mode in ("recurrent", "chunked", "wy"):
        y, st = miras_memory(x["q"], x["k"], x["v"], one, one, [zero], INSTANCES["linear_attention"], mode=mode)
        y_la, (s_la, _) = linear_attention(x["q"], x["k"], x["v"], feature="identity", normalize=False)
        assert rel(y, y_la) <= 1e-10 and rel(st.weights[0], s_la) <= 1e-10, mode
    # Direct causal sum Σ_{s≤t} (q_t·k_s) v_s.
    scores = torch.einsum("bthd,bshd->bhts", x["q"], x["k"]).tril()
    direct = torch.einsum("bhts,bshe->bthe", scores, x["v"])
    assert rel(y, direct) <= 1e-10


@pytest.mark.parametrize("chunk", [1, 3])
def test_titans_is_a_miras_instance(chunk: int) -> None:
    """Titans' LMM = ℓ2 bias + decay + momentum, with η = 2θ (its loss has no ½), α = 1 − α_T, μ = η_T."""
    x = inputs(t=10)
    w = weights(depth=2)
    theta, forget = 0.1 * x["lr"], 1 - x["retain"]
    y_t, s_t = neural_memory_reference(x["q"], x["k"], x["v"], theta, x["momentum"], forget, w, chunk_size=chunk)
    for fn in (miras_reference, miras_chunked):
        y, st = fn(x["q"], x["k"], x["v"], 2 * theta, x["retain"], w, INSTANCES["titans"], momentum=x["momentum"], chunk_size=chunk)
        assert rel(y, y_t) <= 1e-10 and rel(st.momentum[1], s_t.momentum[1]) <= 1e-10


def test_retention_maps() -> None:
    p = torch.randn(2, 3, 5, 4, dtype=F64)
    lq = retention_map(p, MirasConfig(retention="lq", q=4.0, lq_eps=0.0))
    norm = p.abs().pow(4).sum((-2, -1), keepdim=True).pow(0.25)
    assert rel(lq, p / norm**2) <= 1e-14
    assert rel(retention_map(p, MirasConfig(retention="lq", q=2.0)), p) <= 1e-14  # q = 2: plain ℓ2
    kl = retention_map(p, MirasConfig(retention="kl", kl_scale=3.0))
    assert (kl > 0).all() and torch.allclose(kl.sum(-2), torch.full((2, 3, 4), 3.0, dtype=F64))


def test_memora_equals_softmax_of_log_update() -> None:
    """The paper's W_t = c·Softmax(α log W_{t−1} − η ∇) equals our logit recurrence (linear memory, C = 1)."""
    x = inputs(t=7)
    cfg = MirasConfig(bias="l2", retention="kl", kl_scale=2.0)
    p0 = weights()[0]
    y, st = miras_reference(x["q"], x["k"], x["v"], x["lr"], x["retain"], [p0], cfg)
    w = 2.0 * torch.softmax(p0, dim=-2)
    for t in range(7):
        kt, vt = x["k"][:, t, :, None, :], x["v"][:, t, :, None, :]  # [B, H, 1, D]
        grad = kt.transpose(-1, -2) @ (kt @ w - vt)
        w = 2.0 * torch.softmax(x["retain"][:, t, :, None, None] * w.log() - x["lr"][:, t, :, None, None] * grad, dim=-2)
    assert rel(retention_map(st.weights[0], cfg), w) <= 1e-12


def test_moneta_and_yaad_linear_updates() -> None:
    """ℓp: W −= η p (Sign(e) ⊙ |e|^{p−1}) kᵀ; Yaad: the ℓ2 step inside δ, δ·Sign(e) kᵀ outside (C = 1, q = 2)."""
    x = inputs(t=6)
    x["delta"] = 2.5 * x["delta"]  # thresholds around the error norms, so both branches occur
    w0 = weights()[0]
    for cfg in (MirasConfig(bias="lp", p=3.0), MirasConfig(bias="lp", p=1.5, sign_sharpness=20.0, abs_eps=1e-6), MirasConfig(bias="huber")):
        y, st = call(miras_reference, x, [w0], cfg)
        w, outs, branches = w0, [], set()
        for t in range(6):
            kt, vt = x["k"][:, t, :, None, :], x["v"][:, t, :, None, :]
            e = kt @ w - vt
            if cfg.bias == "lp":
                sign = torch.sign(e) if cfg.sign_sharpness is None else torch.tanh(cfg.sign_sharpness * e)
                sig = cfg.p * sign * (e * e + cfg.abs_eps).sqrt().pow(cfg.p - 1)
            else:
                d = x["delta"][:, t, :, None, None]
                small = e.norm(dim=-1, keepdim=True) <= d
                branches |= set(small.flatten().tolist())
                sig = torch.where(small, e, d * torch.sign(e))
            w = x["retain"][:, t, :, None, None] * w - x["lr"][:, t, :, None, None] * kt.transpose(-1, -2) @ sig
            outs.append(x["q"][:, t, :, None, :] @ w)
        assert rel(y, torch.cat(outs, 2).transpose(1, 2)) <= 1e-12, cfg
        if cfg.bias == "huber":
            assert branches == {True, False}  # both sides of the switch were exercised


def test_chunk_size_changes_the_function() -> None:
    x = inputs(t=12)
    w = weights(depth=2)
    cfg = INSTANCES["moneta"]
    y1, _ = call(miras_reference, x, w, cfg, chunk_size=1)
    y4, _ = call(miras_reference, x, w, cfg, chunk_size=4)
    assert rel(y4, y1) > 1e-4


# -- 2. fast paths = reference ---------------------------------------------------------------------
CONFIGS = [
    MirasConfig(bias=b, retention=r, algorithm=a, residual=res, layer_norm=ln, activation="gelu")
    for (b, r, a), (res, ln) in itertools.product(
        [("l2", "l2", "gd"), ("dot", "l2", "momentum"), ("lp", "lq", "gd"), ("huber", "l2", "momentum"), ("l2", "kl", "gd"), ("lp", "kl", "momentum"), ("huber", "lq", "gd")],
        [(False, False), (True, True)],
    )
] + [miras_instance(n) for n in ("moneta", "yaad", "memora")]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.bias}-{c.retention}-{c.algorithm}-{'res' if c.residual else 'plain'}")
def test_chunked_equals_reference(config: MirasConfig) -> None:
    x = inputs(t=9)
    for depth, chunk in ((1, 1), (2, 3)):
        w = weights(depth=depth)
        y0, s0 = call(miras_reference, x, w, config, chunk_size=chunk)
        y1, s1 = call(miras_chunked, x, w, config, chunk_size=chunk)
        assert rel(y1, y0) <= 1e-10, (depth, chunk)
        for name in ("weights", "momentum", "chunk_start"):
            for a, b in zip(getattr(s1, name), getattr(s0, name)):
                assert b.norm() == 0 and a.norm() == 0 or rel(a, b) <= 1e-10, name
        assert s1.position == s0.position == 9 % chunk


def test_streaming_inside_chunks_and_retain_first_chunks() -> None:
    """Pieces [2, 5, 1, 3] with C = 3 (splits inside chunks) = one call, for both paths."""
    x = inputs(t=11)
    for config, depth in ((INSTANCES["yaad"], 2), (INSTANCES["memora"], 2), (INSTANCES["gated_delta_net"], 1), (MirasConfig(bias="lp", retention="lq", algorithm="momentum"), 1)):
        w = weights(depth=depth)
        full, _ = call(miras_reference, x, w, config, chunk_size=3)
        for fn in (miras_reference, miras_chunked):
            state, outs, start = w, [], 0
            for n in (2, 5, 1, 3):
                piece = {k_: t[:, start : start + n] for k_, t in x.items()}
                y, state = call(fn, piece, state, config, chunk_size=3)
                outs.append(y)
                start += n
            assert rel(torch.cat(outs, 1), full) <= 1e-10, (config, fn.__name__)


def test_wy_blocks_and_streaming() -> None:
    x = inputs(t=13)
    w = weights()
    for config in (INSTANCES["delta_net"], INSTANCES["gated_delta_net"], MirasConfig(bias="l2"), MirasConfig(bias="dot")):
        y0, s0 = call(miras_reference, x, w, config)
        for block in (1, 4, 64):
            y, s = miras_wy(x["q"], x["k"], x["v"], x["lr"], x["retain"], w, config, block_size=block)
            assert rel(y, y0) <= 1e-10 and rel(s.weights[0], s0.weights[0]) <= 1e-10, (config, block)
        y1, s1 = miras_wy(x["q"][:, :6], x["k"][:, :6], x["v"][:, :6], x["lr"][:, :6], x["retain"][:, :6], w, config, block_size=4)
        y2, _ = miras_wy(x["q"][:, 6:], x["k"][:, 6:], x["v"][:, 6:], x["lr"][:, 6:], x["retain"][:, 6:], s1, config, block_size=4)
        assert rel(torch.cat([y1, y2], 1), y0) <= 1e-10


def test_float32_paths_agree() -> None:
    x = inputs(t=12, dtype=torch.float32)
    for config, depth in ((INSTANCES["moneta"], 2), (INSTANCES["gated_delta_net"], 1)):
        w = weights(depth=depth, dtype=torch.float32)
        y0, _ = call(miras_reference, x, w, config)
        y1, _ = call(miras_memory, x, w, config)
        assert y1.dtype == torch.float32 and rel(y1, y0) <= 1e-5


# -- 3. gradients ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config,depth,chunk,mode",
    [
        (INSTANCES["moneta"], 2, 2, "chunked"),
        (INSTANCES["yaad"], 2, 2, "chunked"),
        (INSTANCES["memora"], 2, 2, "chunked"),
        (MirasConfig(bias="lp", retention="kl", algorithm="momentum"), 1, 2, "recurrent"),
        (INSTANCES["gated_delta_net"], 1, 1, "wy"),
    ],
    ids=["moneta", "yaad", "memora", "lp-kl-momentum-ref", "gdn-wy"],
)
def test_gradcheck(config: MirasConfig, depth: int, chunk: int, mode: str) -> None:
    x = inputs(b=1, t=5, h=1, d=3, seed=3)
    w = weights(b=1, h=1, d=3, depth=depth, hidden=4)
    names = ["q", "k", "v", "lr", "retain"] + (["momentum"] if config.algorithm == "momentum" else []) + (["delta"] if config.bias == "huber" else [])
    leaves = [x[n].clone().requires_grad_() for n in names] + [t.clone().requires_grad_() for t in w]

    def fn(*args):
        d = dict(zip(names, args[: len(names)]))
        extra = {k_: d.get(k_) for k_ in ("momentum", "delta") if k_ in d}
        y, st = miras_memory(d["q"], d["k"], d["v"], d["lr"], d["retain"], list(args[len(names) :]), config, chunk_size=chunk, mode=mode, **extra)
        return y, *st.weights

    # fast_mode: the Jacobian checked along random directions (one backward per input), same tolerance.
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, fast_mode=True)


# -- errors ---------------------------------------------------------------------------------------
def test_bad_arguments_are_rejected() -> None:
    x = inputs(t=4)
    w = weights()
    q, k, v, lr, ret = x["q"], x["k"], x["v"], x["lr"], x["retain"]
    with pytest.raises(ValueError, match="bias"):
        MirasConfig(bias="l3")
    with pytest.raises(ValueError, match="retention"):
        MirasConfig(retention="l1")
    with pytest.raises(ValueError, match="algorithm"):
        MirasConfig(algorithm="adam")
    with pytest.raises(ValueError, match="q "):
        MirasConfig(q=1.0)
    with pytest.raises(ValueError, match="p "):
        MirasConfig(p=0)
    with pytest.raises(ValueError, match="name"):
        miras_instance("mamba")
    with pytest.raises(ValueError, match="lr must have shape"):
        miras_memory(q, k, v, lr[:, :3], ret, w)
    with pytest.raises(TypeError, match="retain"):
        miras_memory(q, k, v, lr, 0.9, w)
    with pytest.raises(ValueError, match="momentum"):
        miras_memory(q, k, v, lr, ret, w, INSTANCES["titans"])
    with pytest.raises(ValueError, match="delta"):
        miras_memory(q, k, v, lr, ret, w, INSTANCES["yaad"])
    with pytest.raises(ValueError, match="delta"):
        miras_memory(q, k, v, lr, ret, w, delta=x["delta"])
    with pytest.raises(ValueError, match="retain_first"):
        miras_memory(q, k, v, lr, ret, weights(depth=2), INSTANCES["gated_delta_net"])
    with pytest.raises(ValueError, match="WY form"):
        miras_memory(q, k, v, lr, ret, w, INSTANCES["moneta"].__class__(bias="lp"), mode="wy")
    with pytest.raises(ValueError, match="WY form"):
        miras_memory(q, k, v, lr, ret, w, chunk_size=2, mode="wy")
    with pytest.raises(ValueError, match="mode"):
        miras_memory(q, k, v, lr, ret, w, mode="parallel")
    with pytest.raises(ValueError, match="chunk_size"):
        miras_memory(q, k, v, lr, ret, w, chunk_size=0)
    with pytest.raises(ValueError, match="q must have shape"):
        miras_memory(q[0], k, v, lr, ret, w)
    with pytest.raises(ValueError, match="initial_state"):
        miras_memory(q, k, v, lr, ret, [torch.zeros(2, 2, 3, 4, dtype=F64)])
    with pytest.raises(ValueError, match="position"):
        miras_memory(q, k, v, lr, ret, MemoryState(tuple(w), tuple(w), tuple(w), 5), chunk_size=2)
    with pytest.raises(ValueError, match="residual"):
        miras_memory(q, k, v[..., :3], lr, ret, [torch.zeros(2, 2, 4, 3, dtype=F64)], MirasConfig(residual=True))
