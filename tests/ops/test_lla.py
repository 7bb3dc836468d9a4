"""Local Linear Attention: closed form = per-query least squares, λ → ∞ = softmax, CG = solve, gradients.

float64 comparisons are at 1e-10 relative unless a limit or a finite iteration count is being measured.
"""

from __future__ import annotations

import math

import pytest
import torch

from mnemotorch.layers import get_mixer
from mnemotorch.ops.attention import causal_attention
from mnemotorch.ops.lla import (
    conjugate_gradient,
    lla_cg,
    lla_closed_form,
    lla_reference,
    lla_weights,
    local_linear_attention,
)

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def qkv(b=2, tq=11, tk=None, h=2, hkv=None, d=4, dv=3, seed=0, dtype=F64, qscale=1.0, requires_grad=False):
    """Random (never zero) inputs; keys have ``tk >= tq`` positions, queries are the last ``tq``."""
    tk = tq if tk is None else tk
    hkv = h if hkv is None else hkv
    g = torch.Generator().manual_seed(seed)
    q = qscale * torch.randn(b, tq, h, d, generator=g, dtype=F64)
    k = torch.randn(b, tk, hkv, d, generator=g, dtype=F64)
    v = torch.randn(b, tk, hkv, dv, generator=g, dtype=F64)
    return [x.to(dtype).requires_grad_(requires_grad) for x in (q, k, v)]


def least_squares_oracle(q, k, v, ridge, scale=None):
    """Per query, solve the weighted ridge regression directly with ``torch.linalg.lstsq``.

    Written independently of the closed form: normalised weights ``s_ij = softmax_j(τ q_iᵀk_j)`` over
    ``j ≤ i`` (the ridge is relative to the total weight, so this is the same problem as raw weights
    with penalty ``λ ω_i``), design rows ``√s_ij · [1, (k_j − q_i)ᵀ]`` stacked on ``√λ · [0 | I]``.
    """
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    tau = d**-0.5 if scale is None else scale
    out = torch.empty(b, tq, h, v.shape[-1], dtype=F64)
    for bi in range(b):
        for hi in range(h):
            kh, vh = k[bi, :, hi // (h // hkv)], v[bi, :, hi // (h // hkv)]
            for i in range(tq):
                n = tk - tq + i + 1  # keys 0 .. absolute position of query i
                qi = q[bi, i, hi]
                s = torch.softmax(tau * (kh[:n] @ qi), dim=0)
                design = torch.cat([torch.ones(n, 1, dtype=F64), kh[:n] - qi], dim=1) * s.sqrt()[:, None]
                ridge_rows = torch.cat([torch.zeros(d, 1, dtype=F64), math.sqrt(ridge) * torch.eye(d, dtype=F64)], dim=1)
                a = torch.cat([design, ridge_rows])
                rhs = torch.cat([vh[:n] * s.sqrt()[:, None], torch.zeros(d, vh.shape[-1], dtype=F64)])
                theta = torch.linalg.lstsq(a, rhs, driver="gelsd").solution
                out[bi, i, hi] = theta[0]
    return out


# ---------------------------------------------------------------------------------------------
# The closed form
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [
        dict(tq=9, d=4, dv=3, h=2),
        dict(tq=6, tk=10, d=3, dv=5, h=4, hkv=2),  # queries after a cache, grouped-query heads
        dict(tq=12, d=5, dv=2, h=1, qscale=6.0),  # peaked weights (logits in the tens)
    ],
)
@pytest.mark.parametrize("ridge", [0.05, 1.0, 20.0])
def test_reference_equals_per_query_least_squares(shape, ridge):
    q, k, v = qkv(**shape)
    assert rel(lla_reference(q, k, v, ridge), least_squares_oracle(q, k, v, ridge)) <= 1e-10


def test_custom_scale_matches_oracle():
    q, k, v = qkv(tq=8, d=3, dv=2)
    assert rel(lla_reference(q, k, v, 0.3, scale=1.7), least_squares_oracle(q, k, v, 0.3, scale=1.7)) <= 1e-10


def test_intercept_is_invariant_to_a_common_weight_scale():
    """Why row-max stabilisation is exact: ω, μ, Σ (ridge λω included) scale together, ρ does not change."""
    q, k, v = qkv(b=1, tq=10, d=4, dv=3)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    w = lla_weights(qh, kh, 0.5)
    base = lla_closed_form(w, qh, kh, vh, 0.7)
    for c in (1e-8, 3.0, 1e8):
        assert rel(lla_closed_form(c * w, qh, kh, vh, 0.7), base) <= 1e-12
    # row-wise scales too (each query is its own regression)
    c = torch.logspace(-6, 6, 10, dtype=F64)[:, None]
    assert rel(lla_closed_form(c * w, qh, kh, vh, 0.7), base) <= 1e-12
    # unstabilised weights exp(τ qᵀk) give the same answer while they do not overflow
    raw = torch.exp(0.5 * qh @ kh.transpose(-1, -2)).masked_fill(w == 0, 0.0)
    assert rel(lla_closed_form(raw, qh, kh, vh, 0.7), base) <= 1e-12


def test_large_logits_stay_finite():
    q, k, v = qkv(b=1, tq=10, d=4, dv=3, qscale=400.0)  # logits ~ ±800: exp overflows without the row max
    out = lla_reference(q, k, v, 1.0)
    assert torch.isfinite(out).all()
    assert rel(out, least_squares_oracle(q, k, v, 1.0)) <= 1e-10


def test_first_query_returns_its_value_and_affine_data_is_fit_exactly():
    q, k, v = qkv(b=1, tq=40, d=3, dv=2, h=1)
    out = lla_reference(q, k, v, 1.0)
    # one key: the intercept is v_0 whatever λ
    assert rel(out[:, 0], v[:, 0]) <= 1e-12
    # v = A k + c exactly: a local linear fit recovers A q + c (up to the O(λ) ridge bias)
    a, c = torch.randn(2, 3, dtype=F64), torch.randn(2, dtype=F64)
    v_affine = k @ a.T + c
    out = lla_reference(q, k, v_affine, 1e-9)
    target = q @ a.T + c
    assert rel(out[:, 8:], target[:, 8:]) <= 1e-6


@pytest.mark.parametrize("scale", [None, 0.3])
def test_large_ridge_converges_to_softmax_attention(scale):
    """λ → ∞: ρ = O(1/λ), so o − softmax = O(1/λ); the error must fall ~100x per 100x in λ."""
    q, k, v = qkv(b=2, tq=9, tk=13, h=4, hkv=2, d=4, dv=3)
    target = causal_attention(q, k, v, scale=scale, backend="reference")
    errs = [rel(lla_reference(q, k, v, lam, scale=scale), target) for lam in (1e2, 1e4, 1e6, 1e8)]
    assert errs[0] > 1e-4  # the limit is not trivially reached: LLA differs from softmax at moderate λ
    for e0, e1 in zip(errs, errs[1:]):
        assert 30 < e0 / e1 < 300, errs
    assert rel(lla_reference(q, k, v, 1e12, scale=scale), target) <= 1e-10


def test_small_ridge_differs_from_softmax_attention():
    q, k, v = qkv(tq=16, d=4, dv=3)
    assert rel(lla_reference(q, k, v, 0.1), causal_attention(q, k, v, backend="reference")) > 0.05


# ---------------------------------------------------------------------------------------------
# Conjugate gradient
# ---------------------------------------------------------------------------------------------


def test_conjugate_gradient_solves_spd_systems():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(5, 7, 6, 6, generator=g, dtype=F64)
    a = m @ m.transpose(-1, -2) + 0.5 * torch.eye(6, dtype=F64)
    b = torch.randn(5, 7, 6, generator=g, dtype=F64)
    exact = torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1)
    matvec = lambda p: (a @ p.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    assert rel(conjugate_gradient(matvec, b, 6), exact) <= 1e-10  # exact after D steps
    assert rel(conjugate_gradient(matvec, b, 3), exact) > 1e-4
    diag = torch.diagonal(a, dim1=-2, dim2=-1)
    assert rel(conjugate_gradient(matvec, b, 6, precond=lambda r: r / diag), exact) <= 1e-10
    # A zero right-hand side (or an already converged system) gives zeros, not 0/0.
    b0 = b.clone().requires_grad_(True)
    mask = torch.ones_like(b)
    mask[0] = 0.0
    x = conjugate_gradient(matvec, b0 * mask, 10)
    assert torch.isfinite(x).all() and (x[0] == 0).all()
    x.sum().backward()
    assert torch.isfinite(b0.grad).all()


@pytest.mark.parametrize("t", [64, 256, 512])
def test_cg_equals_solve(t):
    """Enough iterations (1.5 x head_dim: exact after head_dim steps up to rounding) make CG agree with linalg.solve."""
    q, k, v = qkv(b=1, tq=t, h=2, d=16, dv=16, seed=t)
    ref = lla_reference(q, k, v, 1.0)
    assert rel(lla_cg(q, k, v, 1.0, cg_iters=24), ref) <= 1e-10
    errs = [rel(lla_cg(q, k, v, 1.0, cg_iters=i), ref) for i in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2] > 1e-10
    assert errs[2] < 1e-3
    q32, k32, v32 = (x.float() for x in (q, k, v))
    assert rel(lla_cg(q32, k32, v32, 1.0, cg_iters=24), lla_reference(q32, k32, v32, 1.0)) <= 1e-5


@pytest.mark.parametrize("block_size", [1, 5, 16, 200])
def test_cg_blocking_and_cache_offsets(block_size):
    """Tiles that do not divide T, queries after a cache, GQA, Jacobi preconditioning."""
    q, k, v = qkv(b=2, tq=23, tk=37, h=4, hkv=2, d=5, dv=3)
    ref = lla_reference(q, k, v, 0.5, scale=0.8)
    for pre in (False, True):
        out = local_linear_attention(q, k, v, 0.5, scale=0.8, solver="cg", cg_iters=12, block_size=block_size, precondition=pre)
        assert rel(out, ref) <= 1e-10


def test_cg_stable_for_large_logits():
    q, k, v = qkv(b=1, tq=30, d=4, dv=3, qscale=400.0)
    out = lla_cg(q, k, v, 1.0, cg_iters=8, block_size=7)
    assert torch.isfinite(out).all()
    assert rel(out, lla_reference(q, k, v, 1.0)) <= 1e-8


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


def test_gradcheck_reference():
    q, k, v = qkv(b=1, tq=4, tk=6, h=2, hkv=1, d=3, dv=2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: lla_reference(q, k, v, 0.7), (q, k, v))


def test_gradcheck_cg():
    q, k, v = qkv(b=1, tq=5, h=1, d=3, dv=2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: lla_cg(q, k, v, 0.7, cg_iters=3, block_size=2), (q, k, v))


def test_converged_cg_gradients_equal_solve_gradients():
    q, k, v = qkv(b=1, tq=17, h=2, d=4, dv=3, requires_grad=True)
    w = torch.randn(1, 17, 2, 3, dtype=F64)
    grads = []
    for fn in (lambda: lla_reference(q, k, v, 0.5), lambda: lla_cg(q, k, v, 0.5, cg_iters=8, block_size=5)):
        g = torch.autograd.grad((fn() * w).sum(), (q, k, v))
        grads.append(g)
    for a, b in zip(*grads):
        assert rel(a, b) <= 1e-9


# ---------------------------------------------------------------------------------------------
# dtypes and bad arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["solve", "cg"])
def test_half_inputs_compute_in_float32(solver):
    q, k, v = qkv(b=1, tq=20, h=2, d=8, dv=8, dtype=torch.bfloat16)
    out = local_linear_attention(q, k, v, 1.0, solver=solver, cg_iters=8)
    assert out.dtype == torch.bfloat16
    ref = lla_reference(q.double(), k.double(), v.double(), 1.0)
    assert rel(out.double(), ref) <= 1e-2


@pytest.mark.parametrize("fn", [lla_reference, lla_cg, local_linear_attention])
@pytest.mark.parametrize("ridge", [0.0, -1.0, float("nan"), float("inf"), True, "1"])
def test_bad_ridge(fn, ridge):
    q, k, v = qkv(tq=4)
    with pytest.raises(ValueError, match="ridge"):
        fn(q, k, v, ridge)


def test_bad_arguments():
    q, k, v = qkv(tq=4)
    with pytest.raises(ValueError, match="scale"):
        lla_reference(q, k, v, 1.0, scale=0.0)
    with pytest.raises(ValueError, match="solver"):
        local_linear_attention(q, k, v, solver="inverse")
    with pytest.raises(ValueError, match="backend"):
        local_linear_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="solver='cg'"):
        local_linear_attention(q, k, v, backend="triton")  # the kernels are the CG path
    with pytest.raises(NotImplementedError, match="float16, bfloat16 and float32"):
        local_linear_attention(q, k, v, solver="cg", backend="triton")  # float64 is reference-only
    with pytest.raises(ValueError, match="cg_iters"):
        lla_cg(q, k, v, cg_iters=0)
    with pytest.raises(ValueError, match="block_size"):
        local_linear_attention(q, k, v, solver="cg", block_size=0)
    with pytest.raises(ValueError, match="shape"):
        lla_reference(q[0], k, v)
    with pytest.raises(TypeError, match="dtype"):
        lla_reference(q.float(), k, v)
    with pytest.raises(ValueError, match="fewer positions"):
        lla_reference(q, k[:, :2], v[:, :2])


# ---------------------------------------------------------------------------------------------
# The mixer
# ---------------------------------------------------------------------------------------------


def _randomise(module: torch.nn.Module) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


def test_mixer_with_huge_ridge_is_the_attention_mixer():
    lla = get_mixer("lla", dim=16, num_heads=4, num_kv_heads=2, ridge=1e12, rope=True).to(F64)
    att = get_mixer("attention", dim=16, num_heads=4, num_kv_heads=2).to(F64)
    _randomise(lla)
    att.load_state_dict(lla.state_dict())
    x = torch.randn(2, 13, 16, dtype=F64)
    assert rel(lla(x)[0], att(x)[0]) <= 1e-9
    lla.ridge = 0.3
    assert rel(lla(x)[0], att(x)[0]) > 1e-3


def test_mixer_cg_solver_streams_and_matches_solve():
    solve = get_mixer("lla", dim=12, num_heads=2, ridge=0.5, rope=True).to(F64)
    _randomise(solve)
    cg = get_mixer("lla", dim=12, num_heads=2, ridge=0.5, rope=True, solver="cg", cg_iters=6, block_size=4).to(F64)
    cg.load_state_dict(solve.state_dict())
    x = torch.randn(2, 19, 12, dtype=F64)
    full, state = cg(x)
    assert rel(full, solve(x)[0]) <= 1e-10
    outs, st = [], None
    for piece in torch.split(x, [1, 7, 3, 8], dim=1):
        y, st = cg(piece, st)
        outs.append(y)
    assert rel(torch.cat(outs, 1), full) <= 1e-10
    assert st.seen_tokens == 19 and st.k.shape == (2, 19, 2, 6)
    assert 2 * cg.state_size(19) == sum(t.numel() for t in state.tensors().values())  # batch 2


def test_mixer_odd_head_dim_without_rope():
    mixer = get_mixer("lla", dim=9, num_heads=3).to(F64)
    y, _ = mixer(torch.randn(1, 5, 9, dtype=F64))
    assert y.shape == (1, 5, 9)
    with pytest.raises(ValueError, match="even"):
        get_mixer("lla", dim=9, num_heads=3, rope=True)


def test_mixer_bad_arguments():
    with pytest.raises(ValueError, match="ridge"):
        get_mixer("lla", dim=8, num_heads=2, ridge=0.0)
    with pytest.raises(ValueError, match="solver"):
        get_mixer("lla", dim=8, num_heads=2, solver="lu")
    with pytest.raises(ValueError, match="cg_iters"):
        get_mixer("lla", dim=8, num_heads=2, cg_iters=0)
    with pytest.raises(ValueError, match="num_kv_heads"):
        get_mixer("lla", dim=8, num_heads=2, num_kv_heads=3)
    with pytest.raises(ValueError, match="scale"):
        get_mixer("lla", dim=8, num_heads=2, scale=-1.0)


def test_cg_gradients_stay_finite_after_convergence_float32() -> None:
    """Regression: once a system converges, rz underflows; the backward of rz/rz_old used to overflow to NaN."""
    from mnemotorch.ops.lla import local_linear_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 64, 2, 8, generator=g).requires_grad_() for _ in range(3))
    out = local_linear_attention(q, k, v, ridge=10.0, solver="cg", cg_iters=40, block_size=32)
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
