"""Linear attention and Hebbian / delta memory: the three forms agree, features are what they claim.

Everything is float64 and compared at 1e-10 relative: outputs, final states and every gradient.
"""

from __future__ import annotations

import math

import pytest
import torch

from mnemotorch.ops.linear import (
    FEATURE_MAPS,
    feature_dim,
    feature_map,
    hebbian_memory,
    hebbian_memory_reference,
    linear_attention,
    linear_attention_chunked,
    linear_attention_parallel,
    linear_attention_recurrent,
    taylor,
)

F64 = torch.float64
TOL = 1e-10


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def featured(b=2, t=13, h=3, dk=5, dv=4, seed=0, requires_grad=False):
    """Positive 'already featured' q, k (as φ would give) and random v; never zeros."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(b, t, h, dk, generator=g, dtype=F64) + 0.1
    k = torch.rand(b, t, h, dk, generator=g, dtype=F64) + 0.1
    v = torch.randn(b, t, h, dv, generator=g, dtype=F64)
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


def random_state(b=2, h=3, dk=5, dv=4, seed=1, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    s0 = torch.randn(b, h, dk, dv, generator=g, dtype=F64)
    z0 = torch.rand(b, h, dk, generator=g, dtype=F64) + 0.5  # a real normaliser is positive
    return s0.requires_grad_(requires_grad), z0.requires_grad_(requires_grad)


# eps = 1e-3 rather than the default 1e-6: with T = 1 and no initial state y = v·(q·k)/(q·k + ε) ≈ v,
# so dy/dq is O(ε) and a relative comparison at ε = 1e-6 would measure cancellation, not the forms.
EPS = 1e-3
FORMS = {
    "parallel": lambda q, k, v, st, norm, c: linear_attention_parallel(q, k, v, st, normalize=norm, eps=EPS),
    "recurrent": lambda q, k, v, st, norm, c: linear_attention_recurrent(q, k, v, st, normalize=norm, eps=EPS),
    "chunked": lambda q, k, v, st, norm, c: linear_attention_chunked(q, k, v, st, normalize=norm, eps=EPS, chunk_size=c),
}


def outputs_and_grads(form, t, chunk, normalize, with_state):
    q, k, v = featured(t=t, requires_grad=True)
    inputs = [q, k, v]
    state = None
    if with_state:
        state = random_state(requires_grad=True)
        inputs += list(state)
    y, (s, z) = FORMS[form](q, k, v, state, normalize, chunk)
    g = torch.Generator().manual_seed(7)
    # A loss touching every output and both final states, so every path is differentiated.
    loss = (y * torch.randn(y.shape, generator=g, dtype=F64)).sum()
    loss = loss + (s * torch.randn(s.shape, generator=g, dtype=F64)).sum() + (z * torch.randn(z.shape, generator=g, dtype=F64)).sum()
    grads = torch.autograd.grad(loss, inputs)
    return y.detach(), s.detach(), z.detach(), grads


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("t,chunk", [(1, 4), (7, 1), (7, 3), (16, 4), (16, 16), (33, 8), (33, 64)])
def test_three_forms_agree(t, chunk, normalize, with_state) -> None:
    ref = outputs_and_grads("parallel", t, chunk, normalize, with_state)
    for form in ("chunked", "recurrent"):
        got = outputs_and_grads(form, t, chunk, normalize, with_state)
        for name, a, b in zip(("y", "S_T", "z_T"), got[:3], ref[:3]):
            assert rel(a, b) <= TOL, f"{form} {name}: {rel(a, b):.2e}"
        for i, (ga, gb) in enumerate(zip(got[3], ref[3])):
            assert rel(ga, gb) <= TOL, f"{form} grad of input {i}: {rel(ga, gb):.2e}"


def test_matches_explicit_definition() -> None:
    """The parallel form equals the equations written out with explicit sums."""
    q, k, v = featured(t=6)
    s0, z0 = random_state()
    y, (s, z) = linear_attention_parallel(q, k, v, (s0, z0))
    for t in range(6):
        st = s0 + torch.einsum("bjhd,bjhe->bhde", k[:, : t + 1], v[:, : t + 1])
        zt = z0 + k[:, : t + 1].sum(1)
        expect = torch.einsum("bhd,bhde->bhe", q[:, t], st) / (torch.einsum("bhd,bhd->bh", q[:, t], zt) + 1e-6)[..., None]
        assert rel(y[:, t], expect) <= 1e-13
    assert rel(s, st) <= 1e-13 and rel(z, zt) <= 1e-13


def test_state_continues_sequence() -> None:
    """Two calls with the state carried equal one call (the ops-level streaming invariant)."""
    q, k, v = featured(t=20)
    full, (s, z) = linear_attention_chunked(q, k, v, chunk_size=4)
    y1, st = linear_attention_chunked(q[:, :9], k[:, :9], v[:, :9], chunk_size=4)
    y2, (s2, z2) = linear_attention_chunked(q[:, 9:], k[:, 9:], v[:, 9:], st, chunk_size=4)
    assert rel(torch.cat([y1, y2], 1), full) <= TOL and rel(s2, s) <= TOL and rel(z2, z) <= TOL


def test_gradcheck_chunked() -> None:
    q, k, v = featured(b=1, t=5, h=1, dk=3, dv=2, requires_grad=True)
    s0, z0 = random_state(b=1, h=1, dk=3, dv=2, requires_grad=True)

    def fn(q, k, v, s0, z0):
        y, (s, z) = linear_attention_chunked(q, k, v, (s0, z0), chunk_size=2)
        return y, s, z

    assert torch.autograd.gradcheck(fn, (q, k, v, s0, z0))
    assert torch.autograd.gradcheck(lambda q, k, v: linear_attention_chunked(q, k, v, normalize=False, chunk_size=3)[0], (q, k, v))


# -- feature maps ----------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 4, 16])
def test_taylor_kernel_identity(d) -> None:
    g = torch.Generator().manual_seed(d)
    q, k = torch.randn(2, 50, d, generator=g, dtype=F64), torch.randn(2, 50, d, generator=g, dtype=F64)
    dot = (q * k).sum(-1)
    expect = 1 + dot / math.sqrt(d) + dot**2 / (2 * d)
    assert rel((taylor(q) * taylor(k)).sum(-1), expect) <= 1e-13
    assert taylor(q).shape[-1] == feature_dim("taylor", d) == 1 + d + d * d


def test_taylor_16_has_273_features() -> None:
    assert feature_dim("taylor", 16) == 273


def test_feature_maps() -> None:
    x = torch.randn(3, 7, dtype=F64)
    assert torch.equal(feature_map("identity")(x), x)
    assert torch.allclose(feature_map("elu_plus_one")(x), torch.where(x > 0, x + 1, torch.exp(x)))
    assert (feature_map("elu_plus_one")(x) > 0).all()
    assert torch.equal(feature_map("relu")(x), x.clamp_min(0))
    assert set(FEATURE_MAPS) == {"identity", "elu_plus_one", "relu", "taylor"}


@pytest.mark.parametrize("feature", sorted(FEATURE_MAPS))
@pytest.mark.parametrize("mode", ["parallel", "recurrent"])
def test_public_modes_agree(feature, mode) -> None:
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 11, 2, 4, generator=g, dtype=F64), torch.randn(2, 11, 2, 4, generator=g, dtype=F64)
    v = torch.randn(2, 11, 2, 3, generator=g, dtype=F64)
    normalize = feature in ("elu_plus_one", "taylor")  # the positive maps
    y, (s, z) = linear_attention(q, k, v, feature=feature, normalize=normalize, mode="chunked", chunk_size=4)
    y2, (s2, z2) = linear_attention(q, k, v, feature=feature, normalize=normalize, mode=mode)
    assert s.shape == (2, 2, feature_dim(feature, 4), 3)
    assert rel(y2, y) <= TOL and rel(s2, s) <= TOL and rel(z2, z) <= TOL


def test_taylor_linear_attention_is_taylor_softmax() -> None:
    """With φ = taylor, normalised linear attention is attention with weights 1 + s + s²/2, s = q·k/√d."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 9, 2, 4, generator=g, dtype=F64) for _ in range(3))
    y, _ = linear_attention(q, k, v, feature="taylor", eps=0.0)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / 2.0
    w = (1 + s + s**2 / 2).tril()
    expect = torch.einsum("bhij,bjhd->bihd", w / w.sum(-1, keepdim=True), v)
    assert rel(y, expect) <= 1e-12


def test_half_precision_accumulates_in_float32() -> None:
    q, k, v = (x.to(torch.bfloat16) for x in featured(t=10))
    y, (s, z) = linear_attention(q, k, v, mode="chunked", chunk_size=4)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32 and z.dtype == torch.float32
    y64, _ = linear_attention(*(x.double() for x in (q, k, v)), mode="chunked")
    assert rel(y.double(), y64) <= 1e-2


# -- Hebbian / delta memory ------------------------------------------------------------------


def kvq(b=2, t=12, h=2, dk=6, dv=5, seed=0, unit=True):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, t, h, dk, generator=g, dtype=F64)
    q = torch.randn(b, t, h, dk, generator=g, dtype=F64)
    if unit:
        k, q = torch.nn.functional.normalize(k, dim=-1), torch.nn.functional.normalize(q, dim=-1)
    return k, torch.randn(b, t, h, dv, generator=g, dtype=F64), q


def test_hebb_is_unnormalised_linear_attention() -> None:
    k, v, q = kvq()
    y, m = hebbian_memory_reference(k, v, q, rule="hebb")
    y2, (s, _) = linear_attention_recurrent(q, k, v, normalize=False)
    assert rel(y, y2) <= TOL and rel(m, s.transpose(-1, -2)) <= TOL


@pytest.mark.parametrize("lr", [1.0, 0.3, "tensor"])
def test_hebb_chunked_path_matches_token_loop(lr) -> None:
    k, v, q = kvq(t=21)
    k, v, q = (x.requires_grad_(True) for x in (k, v, q))
    m0 = torch.randn(2, 2, 5, 6, dtype=F64, requires_grad=True)
    if lr == "tensor":
        lr = torch.rand(2, 21, 2, dtype=F64) + 0.1
    ref = hebbian_memory_reference(k, v, q, "hebb", lr, m0)
    got = hebbian_memory(k, v, q, "hebb", lr, m0, chunk_size=4)
    for a, b in zip(got, ref):
        assert rel(a, b) <= TOL
    w = torch.randn(2, 21, 2, 5, dtype=F64)
    g_ref = torch.autograd.grad((ref[0] * w).sum() + ref[1].sum(), (k, v, q, m0))
    g_got = torch.autograd.grad((got[0] * w).sum() + got[1].sum(), (k, v, q, m0))
    for a, b in zip(g_got, g_ref):
        assert rel(a, b) <= TOL


def test_delta_rule_definition() -> None:
    """Each step follows M_t = M_{t-1} - η (M_{t-1} k_t - v_t) k_tᵀ, read y_t = M_t q_t."""
    k, v, q = kvq(t=5, unit=False)
    lr = 0.4
    y, m_t = hebbian_memory(k, v, q, rule="delta", lr=lr)
    m = torch.zeros(2, 2, 5, 6, dtype=F64)
    for t in range(5):
        kt, vt = k[:, t], v[:, t]
        m = m - lr * torch.einsum("bhe,bhd->bhed", torch.einsum("bhed,bhd->bhe", m, kt) - vt, kt)
        assert rel(y[:, t], torch.einsum("bhed,bhd->bhe", m, q[:, t])) <= 1e-13
    assert rel(m_t, m) <= 1e-13


def test_delta_rule_overwrites_with_unit_keys() -> None:
    """η = 1, unit key: right after the write, the memory answers v_t for k_t exactly."""
    k, v, _ = kvq(t=9)
    y, _ = hebbian_memory(k, v, k, rule="delta", lr=1.0)
    assert rel(y, v) <= 1e-12


@pytest.mark.parametrize("rule", ["hebb", "delta"])
def test_orthonormal_keys_recall_exactly(rule) -> None:
    d, n = 8, 8
    keys = torch.linalg.qr(torch.randn(d, d, dtype=F64))[0][:n]  # orthonormal rows
    k = keys[None, :, None, :]
    v = torch.randn(1, n, 1, 3, dtype=F64)
    _, m = hebbian_memory(k, v, k, rule=rule)
    assert rel(torch.einsum("bhed,bnhd->bnhe", m, k), v) <= 1e-12


def test_delta_state_continues_sequence() -> None:
    k, v, q = kvq(t=10)
    full, m = hebbian_memory(k, v, q, rule="delta", lr=0.7)
    y1, m1 = hebbian_memory(k[:, :4], v[:, :4], q[:, :4], rule="delta", lr=0.7)
    y2, m2 = hebbian_memory(k[:, 4:], v[:, 4:], q[:, 4:], rule="delta", lr=0.7, initial_state=m1)
    assert rel(torch.cat([y1, y2], 1), full) <= TOL and rel(m2, m) <= TOL


# -- argument checks -------------------------------------------------------------------------


def test_bad_arguments_are_named() -> None:
    q, k, v = featured()
    with pytest.raises(ValueError, match="feature must be one of.*elu_plus_one.*taylor"):
        linear_attention(q, k, v, feature="softmax")
    with pytest.raises(ValueError, match="feature must be one of"):
        feature_map("exp")
    with pytest.raises(ValueError, match="mode must be one of"):
        linear_attention(q, k, v, mode="fused")
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention_chunked(q, k, v, chunk_size=2.5)
    with pytest.raises(ValueError, match="eps"):
        linear_attention(q, k, v, eps=-1.0)
    with pytest.raises(TypeError, match="normalize"):
        linear_attention(q, k, v, normalize="yes")
    with pytest.raises(ValueError, match="backend"):
        linear_attention(q, k, v, backend="cuda")
    with pytest.raises(NotImplementedError, match="triton"):
        linear_attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="q must have shape"):
        linear_attention(q[0], k, v)
    with pytest.raises(ValueError, match="share batch, time and heads"):
        linear_attention_parallel(q[:, :5], k, v)
    with pytest.raises(TypeError, match="dtype"):
        linear_attention_recurrent(q.float(), k, v)
    s0, z0 = random_state()
    with pytest.raises(ValueError, match="S0 must have shape"):
        linear_attention_parallel(q, k, v, (s0[:, :, :2], z0))
    with pytest.raises(ValueError, match="z0 must have shape"):
        linear_attention_chunked(q, k, v, (s0, z0[:1]))
    with pytest.raises(TypeError, match="initial_state"):
        linear_attention_recurrent(q, k, v, s0)


def test_bad_hebbian_arguments_are_named() -> None:
    k, v, q = kvq()
    with pytest.raises(ValueError, match="rule must be one of"):
        hebbian_memory(k, v, q, rule="oja")
    with pytest.raises(ValueError, match="lr"):
        hebbian_memory(k, v, q, lr=0.0)
    with pytest.raises(ValueError, match="lr must have shape"):
        hebbian_memory(k, v, q, lr=torch.ones(2, 12))
    with pytest.raises(ValueError, match="initial_state M0 must have shape"):
        hebbian_memory(k, v, q, initial_state=torch.zeros(2, 2, 6, 5, dtype=F64))
    with pytest.raises(ValueError, match="share batch, time and heads"):
        hebbian_memory(k, v, q[:, :3])
