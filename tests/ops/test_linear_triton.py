"""The linear-attention Triton kernels against the float64 reference (Triton interpreter on CPU).

Outputs, final states and the gradients of every input (q, k, v, S0, z0) are compared with
:func:`linear_attention_chunked` run in float64 on the same (rounded) inputs, at the tolerances
of ARCHITECTURE.md: 1e-5 relative for float32, 5e-3 (outputs) / 1e-2 (gradients) for half inputs.
Kernel buffers are NaN-poisoned (MNEMO_POISON=1, tests/conftest.py), so unwritten elements fail.

The interpreter hides what only a GPU does; two fixtures bring some of it back:

* ``gpu_numerics``: Triton's interpreter multiplies the raw bit patterns of bfloat16 ``tl.dot``
  operands, truncates fp32 -> bf16 casts and computes "tf32" products in full fp32; the fixture
  makes it compute like the GPU (bf16 values, round-to-nearest-even casts, TF32-rounded
  operands), so bfloat16 runs here too, with the GPU's rounding;
* ``reversed_programs``: the interpreter runs a launch's programs one after the other in grid
  order; the fixture runs them in reverse, so a program that reads what another program of the
  same launch writes (no ordering on a GPU) gives a different answer here.
"""

from __future__ import annotations

import os

import pytest
import torch

from mnemotorch.ops.linear import feature_dim, feature_map, linear_attention, linear_attention_chunked, linear_attention_recurrent
from mnemotorch.ops.linear.triton import linear_attention_step_triton, linear_attention_triton

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)

from interpreter_numerics import gpu_numerics, reversed_programs  # noqa: E402,F401 (pytest fixtures)

EPS = 1e-3  # as tests/ops/test_linear.py: keeps dy/dq away from pure cancellation at T = 1


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make(b, t, h, dk, dv, feature, with_state, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, dk, generator=g) * 0.7
    k = torch.randn(b, t, h, dk, generator=g) * 0.7
    v = torch.randn(b, t, h, dv, generator=g)
    state = None
    if with_state:
        fd = feature_dim(feature, dk)
        state = (torch.randn(b, h, fd, dv, generator=g), torch.rand(b, h, fd, generator=g) + 0.5)
    return q, k, v, state


def compare(feature, normalize, with_state, b=1, t=37, h=2, dk=8, dv=16, dtype=torch.float32, chunk=16, seed=0):
    """Kernel vs float64 reference: rel. errors of (y, S_T, z_T, dq, dk, dv[, dS0, dz0])."""
    q, k, v, state = make(b, t, h, dk, dv, feature, with_state, seed)
    ins = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    st = tuple(s.clone().requires_grad_() for s in state) if with_state else None
    y, (s_t, z_t) = linear_attention_triton(*ins, feature=feature, normalize=normalize, initial_state=st, eps=EPS, chunk_size=chunk)
    g = torch.Generator().manual_seed(seed + 100)
    gy, gs, gz = (torch.randn(x.shape, generator=g) for x in (y, s_t, z_t))
    # a loss touching every output and both final states, so every gradient path is exercised
    loss = (y.float() * gy).sum() + (s_t * gs).sum() + (z_t * gz).sum()
    leaves = ins + (list(st) if with_state else [])
    grads = torch.autograd.grad(loss, leaves)

    rq, rk, rv = (x.detach().double().requires_grad_() for x in ins)
    rst = tuple(s.detach().double().requires_grad_() for s in state) if with_state else None
    phi = feature_map(feature)
    ry, (rs, rz) = linear_attention_chunked(phi(rq), phi(rk), rv, rst, normalize, EPS, chunk_size=8)
    rloss = (ry * gy.double()).sum() + (rs * gs.double()).sum() + (rz * gz.double()).sum()
    rgrads = torch.autograd.grad(rloss, [rq, rk, rv] + (list(rst) if with_state else []))
    assert y.dtype == dtype and s_t.dtype == z_t.dtype == torch.float32
    for x in (y, s_t, z_t, *grads):
        assert torch.isfinite(x).all()
    return [rel(y, ry), rel(s_t, rs), rel(z_t, rz)] + [rel(a, r) for a, r in zip(grads, rgrads)]


NAMES = ["y", "S_T", "z_T", "dq", "dk", "dv", "dS0", "dz0"]

FP32_CASES = [
    # feature, normalize, initial state, B, T, Dk, Dv, chunk
    ("elu_plus_one", True, True, 1, 37, 8, 16, 16),
    ("elu_plus_one", True, False, 1, 128, 32, 32, 64),  # the default chunk of 64
    ("relu", False, False, 2, 50, 32, 8, 16),  # Dk != Dv, two sequences
    ("relu", True, True, 1, 33, 8, 16, 16),
    ("identity", False, True, 1, 40, 16, 24, 32),  # Dv not a power of two
    ("elu_plus_one", True, True, 1, 20, 96, 40, 16),  # Dk > 64: two state tiles along Dk, both partial
    ("taylor", True, True, 1, 37, 16, 16, 16),  # BASED: d = 16 -> 273 features
    ("taylor", False, False, 2, 20, 4, 24, 16),  # d padded to 16 inside the kernel
]


@pytest.mark.parametrize("feature,normalize,with_state,b,t,dk,dv,chunk", FP32_CASES)
def test_kernel_fp32_matches_reference(feature, normalize, with_state, b, t, dk, dv, chunk) -> None:
    errs = compare(feature, normalize, with_state, b=b, t=t, dk=dk, dv=dv, chunk=chunk)
    for name, e in zip(NAMES, errs):
        assert e <= 1e-5, f"{name}: {e:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("feature,dk,dv,t,chunk", [("elu_plus_one", 16, 16, 40, 16), ("taylor", 16, 16, 40, 16), ("identity", 64, 64, 150, 64)])
def test_kernel_half_matches_reference(gpu_numerics, dtype, feature, dk, dv, t, chunk) -> None:
    """Half-precision inputs with the GPU's rounding (the ``gpu_numerics`` fixture)."""
    errs = compare(feature, feature != "identity", True, t=t, dk=dk, dv=dv, dtype=dtype, chunk=chunk)
    assert errs[0] <= 5e-3, f"y: {errs[0]:.2e}"
    for name, e in zip(NAMES[1:], errs[1:]):
        assert e <= 1e-2, f"{name}: {e:.2e}"


def test_gpu_numerics_fixture_computes_bf16_products(gpu_numerics) -> None:
    """The fixture's bf16 ``tl.dot`` is the product of the values (the plain interpreter's is not)."""
    q, k, v, _ = make(1, 16, 1, 16, 16, "identity", False)
    y, _ = linear_attention_triton(q.bfloat16(), k.bfloat16(), v.bfloat16(), "identity", normalize=False, chunk_size=16)
    ref, _ = linear_attention_chunked(q.bfloat16().double(), k.bfloat16().double(), v.bfloat16().double(), normalize=False)
    assert rel(y, ref) <= 5e-3


@pytest.mark.parametrize("feature,dk", [("elu_plus_one", 96), ("taylor", 16)])
def test_kernels_independent_of_program_order(reversed_programs, feature, dk) -> None:
    """Every launch gives the same answer with its programs run in reverse order: no program reads
    what another program of the same launch writes (several state tiles, value tiles and chunks)."""
    errs = compare(feature, True, True, b=2, t=45, dk=dk, dv=40, chunk=16)
    for name, e in zip(NAMES, errs):
        assert e <= 1e-5, f"{name}: {e:.2e}"
    b, h, dv = 2, 2, 100  # two value tiles of the decode step
    q, k, v, state = make(b, 2, h, dk, dv, feature, True, seed=7)
    phi = feature_map(feature)
    ry, (rs, rz) = linear_attention_recurrent(phi(q.double()), phi(k.double()), v.double(), tuple(x.double() for x in state), eps=EPS)
    s, z = state[0].clone(), state[1].clone()
    for i in range(2):
        y, _ = linear_attention_step_triton(q[:, i], k[:, i], v[:, i], (s, z), feature, eps=EPS, inplace=True)
        assert rel(y, ry[:, i]) <= 1e-5
    assert rel(s, rs) <= 1e-5 and rel(z, rz) <= 1e-5


@pytest.mark.parametrize("feature,normalize,dk,dv", [("identity", False, 40, 24), ("elu_plus_one", True, 24, 40)])
def test_gradients_in_one_launch_match_two(monkeypatch, feature, normalize, dk, dv) -> None:
    """The elementwise maps' gradients in one launch (dq, dk, dv together) and in two (dq + dk in
    column blocks, then dv) both match the reference."""
    import mnemotorch.ops.linear.triton as K

    for split in (False, True):
        monkeypatch.setattr(K, "_SPLIT_GRADS", split)
        errs = compare(feature, normalize, True, b=2, t=45, dk=dk, dv=dv, chunk=16)
        for name, e in zip(NAMES, errs):
            assert e <= 1e-5, f"split={split} {name}: {e:.2e}"


@pytest.mark.parametrize("feature", ["identity", "taylor"])
def test_backward_reuses_forward_states(monkeypatch, feature) -> None:
    """The forward's chunk states are saved for the backward, not recomputed: one forward state pass
    per forward+backward."""
    import mnemotorch.ops.linear.triton as K

    calls = []
    orig = K._states_fwd
    monkeypatch.setattr(K, "_states_fwd", lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    q, k, v, _ = make(1, 33, 2, 8, 16, feature, False)
    ins = [x.requires_grad_() for x in (q, k, v)]
    y, _ = linear_attention_triton(*ins, feature=feature, normalize=feature == "taylor", chunk_size=16)
    torch.autograd.grad(y.sum(), ins)
    assert len(calls) == 1


def test_poisoned_buffers() -> None:
    """The tests run with NaN-filled kernel buffers (so an element no program writes is a NaN)."""
    from mnemotorch.ops.linear.triton import _alloc

    assert os.environ.get("MNEMO_POISON") == "1"
    assert torch.isnan(_alloc((3,), torch.zeros(1), torch.float32)).all()


def test_mixed_input_dtypes_are_promoted() -> None:
    q, k, v, _ = make(1, 20, 2, 8, 8, "elu_plus_one", False)
    y, (s, z) = linear_attention_triton(q.half(), k.half(), v, "elu_plus_one", eps=EPS, chunk_size=16)
    ref, (rs, rz) = linear_attention_chunked(feature_map("elu_plus_one")(q.half().double()), feature_map("elu_plus_one")(k.half().double()), v.double(), eps=EPS)
    assert y.dtype == torch.float32 and rel(y, ref) <= 1e-5 and rel(s, rs) <= 1e-5


def test_state_carries_across_calls() -> None:
    """Two kernel calls with the state carried equal one call (the streaming invariant at the op level)."""
    q, k, v, _ = make(2, 45, 2, 16, 16, "taylor", False)
    full, (s, z) = linear_attention_triton(q, k, v, "taylor", chunk_size=16)
    y1, st = linear_attention_triton(q[:, :19], k[:, :19], v[:, :19], "taylor", chunk_size=16)
    y2, (s2, z2) = linear_attention_triton(q[:, 19:], k[:, 19:], v[:, 19:], "taylor", initial_state=st, chunk_size=16)
    assert rel(torch.cat([y1, y2], 1), full) <= 1e-5 and rel(s2, s) <= 1e-5 and rel(z2, z) <= 1e-5


@pytest.mark.parametrize("feature,dk,dv", [("elu_plus_one", 16, 24), ("elu_plus_one", 16, 100), ("taylor", 16, 24), ("taylor", 5, 100)])
@pytest.mark.parametrize("inplace", [False, True])
def test_decode_step_matches_recurrent_reference(feature, dk, dv, inplace) -> None:
    """Dv = 100 spans two value tiles: in place, z must be read before it is overwritten."""
    b, h, steps = 3, 2, 3
    q, k, v, state = make(b, steps, h, dk, dv, feature, True, seed=4)
    s, z = state[0].clone(), state[1].clone()
    phi = feature_map(feature)
    ry, (rs, rz) = linear_attention_recurrent(phi(q.double()), phi(k.double()), v.double(), (s.double(), z.double()), eps=EPS)
    st = (s, z)
    for i in range(steps):
        y, st = linear_attention_step_triton(q[:, i], k[:, i], v[:, i], st, feature, eps=EPS, inplace=inplace)
        assert rel(y, ry[:, i]) <= 1e-5
    assert rel(st[0], rs) <= 1e-5 and rel(st[1], rz) <= 1e-5
    assert (st[0] is s) == inplace  # in place: the caller's buffers hold the new state


def test_op_dispatch_triton_backend() -> None:
    q, k, v, state = make(1, 24, 2, 8, 8, "elu_plus_one", True)
    ref, (rs, rz) = linear_attention(q.double(), k.double(), v.double(), initial_state=tuple(x.double() for x in state), eps=EPS)
    for mode in ("chunked", "recurrent"):
        y, (s, z) = linear_attention(q, k, v, initial_state=state, eps=EPS, mode=mode, backend="triton", chunk_size=16)
        assert rel(y, ref) <= 1e-5 and rel(s, rs) <= 1e-5 and rel(z, rz) <= 1e-5, mode


def test_relu_all_zero_features_give_zero_output() -> None:
    """relu features can vanish; the denominator is then ε and the output 0/ε = 0, not NaN."""
    q, k, v, _ = make(1, 20, 1, 16, 16, "relu", False)
    y, _ = linear_attention_triton(-q.abs() - 0.1, k, v, "relu", chunk_size=16)
    assert torch.isfinite(y).all() and y.abs().max() == 0


def test_mixer_kernel_path_matches_reference_path() -> None:
    """The mixers' Triton path (taken on CUDA) equals their reference path, streamed token by token."""
    from mnemotorch.layers import get_mixer

    torch.manual_seed(0)
    for name, kw in (("based", {"feature_dim": 4}), ("linear_attention", {"feature": "elu_plus_one"})):
        m = get_mixer(name, dim=32, num_heads=2, **kw)
        x = torch.randn(2, 20, 32)
        ref, ref_state = m(x)
        q = m.q_proj(x).view(2, 20, 2, m.feature_dim)
        k = m.k_proj(x).view(2, 20, 2, m.feature_dim)
        v = m.v_proj(x).view(2, 20, 2, m.head_dim)
        y, (s, z) = m._kernel_forward(q, k, v, m.init_state(2))
        assert rel(m.o_proj(y.reshape(2, 20, 32)), ref) <= 1e-5 and rel(s, ref_state.S) <= 1e-5, name
        with torch.no_grad():  # the decode-step kernel
            st = m.init_state(2)
            for i in range(3):
                y1, (s1, z1) = m._kernel_forward(q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1], st)
                st = type(st)(seen_tokens=i + 1, S=s1, z=z1)
            y_ref, st_ref = m(x[:, :3])
            assert rel(m.o_proj(y1.reshape(2, 1, 32)), y_ref[:, 2:3]) <= 1e-5 and rel(s1, st_ref.S) <= 1e-5, name


def test_bad_input_clear_errors() -> None:
    q, k, v, _ = make(1, 8, 1, 32, 16, "taylor", False)
    with pytest.raises(ValueError, match="Taylor q/k feature dims d in 1..16"):
        linear_attention_triton(q, k, v, "taylor")
    with pytest.raises(ValueError, match="Taylor q/k feature dims"):
        linear_attention(q, k, v, feature="taylor", backend="triton")
    big = torch.randn(1, 8, 1, 256)
    with pytest.raises(ValueError, match="q/k head dims 1..128"):
        linear_attention_triton(big, big, v, "elu_plus_one")
    with pytest.raises(ValueError, match="value head dims"):
        linear_attention_triton(q, k, torch.randn(1, 8, 1, 512), "relu")
    with pytest.raises(NotImplementedError, match="float16, bfloat16 and float32"):
        linear_attention_triton(q.double(), k.double(), v.double(), "relu")
    with pytest.raises(ValueError, match="feature maps"):
        linear_attention(q, k, v, feature=torch.relu, backend="triton")
    with pytest.raises(ValueError, match="parallel"):
        linear_attention(q, k, v, mode="parallel", backend="triton")
    with pytest.raises(ValueError, match="forward-only"):
        linear_attention(q.requires_grad_(), k, v, mode="recurrent", backend="triton")
    with pytest.raises(ValueError, match=r"S0 must have shape \[1, 1, 32, 16\]"):
        linear_attention_triton(q, k, v, "relu", initial_state=(torch.zeros(1, 1, 31, 16), torch.zeros(1, 1, 32)))
    with pytest.raises(ValueError, match=r"\[B, H, D\]"):
        linear_attention_step_triton(q, k, v, (torch.zeros(1), torch.zeros(1)), "relu")
    with pytest.raises(TypeError, match="inplace=True needs a contiguous float32 state"):
        linear_attention_step_triton(q[:, 0], k[:, 0], v[:, 0], (torch.zeros(1, 1, 32, 16, dtype=torch.float64), torch.zeros(1, 1, 32)), "relu", inplace=True)


# ---------------------------------------------------------------------------------------------
# The one-pass forward (_la_fwd_fused, MNEMO_LINEAR_FWD=fused): no chunk states in the forward,
# the backward recomputes them. Dv = 40 spans three value tiles of the interpreter's BV = 16 (the
# last one partial); T = 37 ends inside a chunk.
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fused_forward(monkeypatch):
    """Selects the one-pass forward and counts its launches and the forward state passes."""
    import mnemotorch.ops.linear.triton as K

    calls = {"fused": 0, "states": 0}
    orig_fused, orig_states = K._fused_fwd, K._states_fwd
    monkeypatch.setattr(K, "_fused_fwd", lambda *a, **kw: calls.__setitem__("fused", calls["fused"] + 1) or orig_fused(*a, **kw))
    monkeypatch.setattr(K, "_states_fwd", lambda *a, **kw: calls.__setitem__("states", calls["states"] + 1) or orig_states(*a, **kw))
    monkeypatch.setenv("MNEMO_LINEAR_FWD", "fused")
    return calls


FUSED_FP32_CASES = [  # feature, Dk, normalize, initial state (identity is not normalised: φ(q)ᵀz may cancel)
    (f, dk, n, s) for f, dk in (("identity", 16), ("elu_plus_one", 8), ("relu", 24)) for n in (False, True) for s in (False, True)
    if not (f == "identity" and n)
]


@pytest.mark.parametrize("feature,dk,normalize,with_state", FUSED_FP32_CASES)
def test_fused_forward_fp32_matches_reference(fused_forward, feature, dk, normalize, with_state) -> None:
    """Outputs, final states and every gradient through the op (the backward recomputing the chunk
    states) at the fp32 tolerance, for each elementwise map, with/without normaliser and S0."""
    errs = compare(feature, normalize, with_state, t=37, dk=dk, dv=40, chunk=16)
    for name, e in zip(NAMES, errs):
        assert e <= 1e-5, f"{name}: {e:.2e}"
    # one fused forward; the only forward state pass is the backward's recomputation
    assert fused_forward == {"fused": 1, "states": 1}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("feature,normalize,dk,dv,t,chunk", [("identity", False, 64, 40, 150, 64), ("elu_plus_one", True, 16, 40, 40, 16)])
def test_fused_forward_half_matches_reference(gpu_numerics, fused_forward, dtype, feature, normalize, dk, dv, t, chunk) -> None:
    """Half inputs with the GPU's rounding: identity features take the raw-tile products (and, in
    bf16, the bf16 state product the two-pass form uses); tolerances as test_kernel_half_matches_reference."""
    errs = compare(feature, normalize, True, t=t, dk=dk, dv=dv, dtype=dtype, chunk=chunk)
    assert errs[0] <= 5e-3, f"y: {errs[0]:.2e}"
    for name, e in zip(NAMES[1:], errs[1:]):
        assert e <= 1e-2, f"{name}: {e:.2e}"
    assert fused_forward["fused"] == 1


def test_fused_forward_independent_of_program_order(reversed_programs, fused_forward) -> None:
    """Two sequences × two heads × three value tiles run in reverse order: the same answer."""
    errs = compare("elu_plus_one", True, True, b=2, t=45, dk=24, dv=40, chunk=16)
    for name, e in zip(NAMES, errs):
        assert e <= 1e-5, f"{name}: {e:.2e}"


@pytest.mark.parametrize("feature", ["identity", "elu_plus_one"])
def test_fused_forward_equals_two_pass(monkeypatch, feature) -> None:
    """The one-pass and two-pass forwards compute the same products (to fp32 rounding), normalised
    identity features included."""
    q, k, v, state = make(2, 45, 2, 24, 40, feature, True, seed=3)
    out = {}
    for path in ("two_pass", "fused"):
        monkeypatch.setenv("MNEMO_LINEAR_FWD", path)
        out[path] = linear_attention_triton(q, k, v, feature, True, state, eps=EPS, chunk_size=16)
    (y1, (s1, z1)), (y2, (s2, z2)) = out["two_pass"], out["fused"]
    assert rel(y2, y1) <= 1e-6 and rel(s2, s1) <= 1e-6 and rel(z2, z1) <= 1e-6


def test_fused_forward_without_grad_writes_no_states(fused_forward) -> None:
    """Inference: one launch, no state pass; two calls with the state carried equal one call."""
    q, k, v, _ = make(1, 45, 2, 16, 24, "elu_plus_one", False)
    with torch.no_grad():
        full, (s, z) = linear_attention_triton(q, k, v, "elu_plus_one", chunk_size=16)
        y1, st = linear_attention_triton(q[:, :19], k[:, :19], v[:, :19], "elu_plus_one", chunk_size=16)
        y2, (s2, z2) = linear_attention_triton(q[:, 19:], k[:, 19:], v[:, 19:], "elu_plus_one", initial_state=st, chunk_size=16)
    assert fused_forward == {"fused": 3, "states": 0}
    assert rel(torch.cat([y1, y2], 1), full) <= 1e-5 and rel(s2, s) <= 1e-5 and rel(z2, z) <= 1e-5


def test_forward_path_selection(monkeypatch) -> None:
    from mnemotorch.ops.linear.triton import FEATURE_IDS, forward_path

    monkeypatch.delenv("MNEMO_LINEAR_FWD", raising=False)
    assert forward_path(FEATURE_IDS["identity"], 128) == "two_pass"  # auto, training: two-pass (the backward reuses the states)
    assert forward_path(FEATURE_IDS["identity"], 128, needs_grad=False) == "fused"  # auto, 16-bit inference: one pass
    assert forward_path(FEATURE_IDS["identity"], 128, needs_grad=False, normalize=True) == "two_pass"  # not tuned
    assert forward_path(FEATURE_IDS["identity"], 128, needs_grad=False, half=False) == "two_pass"  # fp32: not measured
    assert forward_path(FEATURE_IDS["taylor"], 16, needs_grad=False) == "two_pass"
    monkeypatch.setenv("MNEMO_LINEAR_FWD", "fused")
    assert forward_path(FEATURE_IDS["relu"], 128) == "fused"
    assert forward_path(FEATURE_IDS["taylor"], 16) == "two_pass"  # BASED has its own kernels
    monkeypatch.setenv("MNEMO_LINEAR_FWD", "one_pass")
    with pytest.raises(ValueError, match="MNEMO_LINEAR_FWD"):
        forward_path(FEATURE_IDS["relu"], 16)


@pytest.mark.parametrize("normalize", [False, True])
def test_output_final_state_false_skips_the_state(monkeypatch, normalize: bool) -> None:
    """``output_final_state=False`` returns the same output and no state, under grad (two-pass) and
    under no_grad (auto picks the one-pass forward), and trains (gradients equal)."""
    from mnemotorch.ops.linear.triton import linear_attention_triton

    monkeypatch.delenv("MNEMO_LINEAR_FWD", raising=False)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 37, 2, 16, generator=g) for _ in range(3))
    y_ref, (s_ref, z_ref) = linear_attention_triton(q, k, v, "identity", normalize, chunk_size=16)
    with torch.no_grad():
        y_inf, st = linear_attention_triton(q, k, v, "identity", normalize, chunk_size=16, output_final_state=False)
    assert st is None and rel(y_inf, y_ref) <= 1e-5
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    y, st = linear_attention_triton(qg, kg, vg, "identity", normalize, chunk_size=16, output_final_state=False)
    assert st is None and rel(y, y_ref) <= 1e-6
    gy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, (qg, kg, vg), gy)
    qh, kh, vh = (x.clone().requires_grad_() for x in (q, k, v))
    want = torch.autograd.grad(linear_attention_triton(qh, kh, vh, "identity", normalize, chunk_size=16)[0], (qh, kh, vh), gy)
    for a, b in zip(grads, want):
        assert rel(a, b) <= 1e-6
