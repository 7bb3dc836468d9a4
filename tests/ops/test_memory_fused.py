"""The fused forward Triton kernel of the Titans memory (``ops/memory/fused_triton.py``), on the CPU
through Triton's interpreter.

It must give :func:`neural_memory_chunked`'s outputs and final state (weights and momentum), which
are checked against the float64 token reference in ``test_memory.py``; here the fused kernel is
compared with the chunked path in float64 (and once with the token reference directly). Outputs are
NaN-poisoned before the kernel runs (``MNEMO_POISON=1``, tests/conftest.py), so an unwritten element
fails the comparison.
"""

from __future__ import annotations


import pytest
import torch
import triton
import triton.language as tl

from mnemotorch.ops.memory import MemoryState, neural_memory, neural_memory_chunked, neural_memory_reference
from mnemotorch.ops.memory import fused_triton
from mnemotorch.ops.memory.fused_triton import fused_supported, lmm_fused_fwd, neural_memory_fused_forward

from interpreter_numerics import gpu_numerics  # noqa: F401 (pytest fixture)
from test_memory import make_inputs, make_state, rel

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # silu's sigmoid on numpy

MATCHED = dict(activation="gelu", residual=True, layer_norm=True)
DEFAULT = dict(activation="silu", residual=True, layer_norm=False)

# (name, depth, config, max_grad_norm, d, hidden, chunk, n_chunks)
CASES = [
    ("matched", 2, MATCHED, None, 16, 64, 16, 3),
    ("matched_clip_2slices", 2, MATCHED, 0.3, 32, 128, 16, 3),
    ("default_clip", 2, DEFAULT, 0.3, 16, 32, 16, 4),
    ("default_noclip", 2, DEFAULT, None, 16, 32, 16, 3),
    ("relu_plain", 2, dict(activation="relu", residual=False, layer_norm=False), None, 16, 32, 16, 3),
    ("depth1", 1, dict(activation="silu", residual=False, layer_norm=False), None, 16, 16, 16, 3),
    ("depth1_ln_clip", 1, dict(activation="silu", residual=True, layer_norm=True), 0.3, 16, 16, 16, 3),
]


def inputs(depth, d, hidden, t, dtype=torch.float64, position=0, seed=7):
    q, k, v, th, et, al = make_inputs(b=2, t=t, h=2, dk=d, dv=d, seed=seed, theta_max=0.5)
    st = make_state(2, 2, d, d, depth, hidden=hidden, position=position)
    cast = lambda xs: tuple(x.to(dtype) for x in xs)  # noqa: E731
    return cast((q, k, v)), (th, et, al), st


def assert_state(out: MemoryState, ref: MemoryState, tol: float) -> None:
    assert out.position == ref.position
    for name in ("weights", "momentum", "chunk_start"):
        for i, (x, y) in enumerate(zip(getattr(out, name), getattr(ref, name))):
            assert x.dtype == torch.float32
            assert torch.isfinite(x).all(), f"{name}[{i}] not finite"
            err = rel(x.double(), y.double())
            assert err <= tol, f"{name}[{i}]: {err:.3e}"


@pytest.mark.parametrize("name,depth,cfg,clip,d,hidden,chunk,n", CASES, ids=[c[0] for c in CASES])
def test_fused_matches_chunked_fp32(name, depth, cfg, clip, d, hidden, chunk, n):
    (q, k, v), gates, st = inputs(depth, d, hidden, n * chunk)
    y_ref, s_ref = neural_memory_chunked(q, k, v, *gates, st, chunk, **cfg, max_grad_norm=clip)  # float64
    f32 = lambda xs: [x.float() for x in xs]  # noqa: E731
    st32 = MemoryState(tuple(f32(st.weights)), tuple(f32(st.momentum)), tuple(f32(st.chunk_start)), 0)
    with torch.no_grad():
        y, s = neural_memory_fused_forward(*f32((q, k, v)), *f32(gates), st32, chunk, **cfg, max_grad_norm=clip)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    assert torch.isfinite(y).all()
    assert rel(y.double(), y_ref) <= 1e-5, rel(y.double(), y_ref)
    assert_state(s, s_ref, 1e-5)
    if clip is not None:  # the clip is active at these sizes: without it the result differs
        y_free, _ = neural_memory_chunked(q, k, v, *gates, st, chunk, **cfg)
        assert rel(y_free, y_ref) > 1e-3


def test_fused_matches_token_reference():
    """Once directly against the float64 token loop (the specification)."""
    (q, k, v), gates, st = inputs(2, 16, 32, 32)
    y_ref, s_ref = neural_memory_reference(q, k, v, *gates, st, 16, **MATCHED, max_grad_norm=0.3)
    with torch.no_grad():
        y, s = neural_memory_fused_forward(q.float(), k.float(), v.float(), *(g.float() for g in gates), st, 16, **MATCHED, max_grad_norm=0.3)
    assert rel(y.double(), y_ref) <= 1e-5
    assert_state(s, s_ref, 1e-5)


@pytest.mark.parametrize("prec", ["tf32x3", "bf16x3"])
@pytest.mark.parametrize("cfg,clip", [(MATCHED, 0.3), (DEFAULT, 0.3)], ids=["matched", "default"])
def test_fused_bf16(gpu_numerics, monkeypatch, cfg, clip, prec):
    """bf16 q/k/v (the GPU's products and casts, emulated) against the float64 chunked path on the same rounded
    values, with either precision of the state's products."""
    monkeypatch.setitem(fused_triton.LAUNCH, "half_precision", prec)
    (q, k, v), gates, st = inputs(2, 32, 128, 48, dtype=torch.bfloat16)
    y_ref, s_ref = neural_memory_chunked(q.double(), k.double(), v.double(), *gates, st, 16, **cfg, max_grad_norm=clip)
    with torch.no_grad():
        y, s = neural_memory_fused_forward(q, k, v, *(g.float() for g in gates), st, 16, **cfg, max_grad_norm=clip)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    assert rel(y.double(), y_ref) <= 5e-3, rel(y.double(), y_ref)
    assert_state(s, s_ref, 5e-3)


@triton.jit
def _product_kernel(A, B, O, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    rm, rk, rn = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(A + rm[:, None] * K + rk[None, :])
    b = tl.load(B + rk[:, None] * N + rn[None, :])
    if ACC:  # the accumulating form, onto O's values
        out = fused_triton._mmap(a, b, tl.load(O + rm[:, None] * N + rn[None, :]), PREC)
    else:
        out = fused_triton._mmp(a, b, PREC)
    tl.store(O + rm[:, None] * N + rn[None, :], out)


@pytest.mark.parametrize("acc", [False, True])
def test_product_precisions(gpu_numerics, acc):
    """The kernels' fp32 products: "bf16x3" (three bf16 products of the operands' hi / lo parts) is within ~2⁻¹⁷
    of the exact product, far closer than one TF32 product (2⁻¹¹) or one bf16 product; the accumulating form adds
    onto its accumulator."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(32, 64, generator=g), torch.randn(64, 16, generator=g) * 1e3  # any scale
    o0 = torch.randn(32, 16, generator=g)
    exact = a.double() @ b.double() + (o0.double() if acc else 0)
    errs = {}
    for prec in ("tf32", "bf16x3", "ieee"):
        out = o0.clone() if acc else torch.empty(32, 16)
        _product_kernel[(1,)](a, b, out, M=32, K=64, N=16, PREC=prec, ACC=acc)
        errs[prec] = rel(out.double(), exact)
    one_bf16 = rel((a.bfloat16().double() @ b.bfloat16().double() + (o0.double() if acc else 0)), exact)
    assert errs["ieee"] <= 1e-6, errs
    assert errs["bf16x3"] <= 2e-5, errs
    assert errs["tf32"] >= 1e-4 and one_bf16 >= 1e-3, (errs, one_bf16)


def test_fused_split_calls_and_partial_chunks():
    """Calls that start and end inside chunks: the partial segments run eagerly, the state carries."""
    chunk, t = 16, 7 + 2 * 16 + 5 + 16 + 3
    (q, k, v), gates, st = inputs(2, 16, 32, t)
    y_ref, s_ref = neural_memory_chunked(q, k, v, *gates, st, chunk, **DEFAULT, max_grad_norm=0.3)
    q, k, v = q.float(), k.float(), v.float()
    gates = tuple(g.float() for g in gates)
    ys, state = [], st
    cuts = [0, 7, 7 + 2 * 16 + 5, t]  # position 0 -> 7; 7 -> (two full chunks) -> 5; 5 -> (one full chunk) -> 3
    with torch.no_grad():
        for lo, hi in zip(cuts, cuts[1:]):
            y, state = neural_memory_fused_forward(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], *(g[:, lo:hi] for g in gates), state, chunk,
                                                   **DEFAULT, max_grad_norm=0.3)  # fmt: skip
            ys.append(y)
    assert rel(torch.cat(ys, 1).double(), y_ref) <= 1e-5
    assert_state(state, s_ref, 1e-5)


def test_neural_memory_fused_switch():
    """``neural_memory(fused=True)``: the kernel without grad, the chunked path (with gradients) otherwise."""
    (q, k, v), gates, st = inputs(2, 16, 32, 32, dtype=torch.float32)
    gates = tuple(g.float() for g in gates)
    f32 = lambda xs: tuple(x.float() for x in xs)  # noqa: E731
    st = MemoryState(f32(st.weights), f32(st.momentum), f32(st.chunk_start), 0)
    y0, s0 = neural_memory(q, k, v, *gates, st, 16, **MATCHED)
    with torch.no_grad():
        y1, s1 = neural_memory(q, k, v, *gates, st, 16, **MATCHED, fused=True)
    assert rel(y1, y0) <= 1e-5
    assert_state(s1, s0, 1e-5)
    qg = q.clone().requires_grad_()
    y2, _ = neural_memory(qg, k, v, *gates, st, 16, **MATCHED, fused=True)  # falls back: a gradient is needed
    y2.sum().backward()
    assert qg.grad is not None and rel(y2.detach(), y0) <= 1e-6
    with pytest.raises(ValueError, match="fused=True"):
        neural_memory(q, k, v, *gates, st, 16, mode="recurrent", fused=True)
    with pytest.raises(TypeError, match="fused"):
        neural_memory(q, k, v, *gates, st, 16, fused=1)


def test_fused_errors():
    (q, k, v), gates, st = inputs(2, 16, 32, 32, dtype=torch.float32)
    gates = tuple(g.float() for g in gates)
    with torch.no_grad():
        with pytest.raises(ValueError, match="q dtype"):
            neural_memory_fused_forward(q.double(), k.double(), v.double(), *gates, st, 16)
        with pytest.raises(ValueError, match="chunk_size"):
            neural_memory_fused_forward(q[:, :24], k[:, :24], v[:, :24], *(g[:, :24] for g in gates), st, 12)
        with pytest.raises(ValueError, match="depth"):
            neural_memory_fused_forward(q, k, v, *gates, make_state(2, 2, 16, 16, 3, hidden=32), 16)
        with pytest.raises(ValueError, match="hidden"):
            neural_memory_fused_forward(q, k, v, *gates, make_state(2, 2, 16, 16, 2, hidden=24), 16)
        with pytest.raises(ValueError, match="Dk"):
            qs, ks = q[..., :8].contiguous(), k[..., :8].contiguous()
            neural_memory_fused_forward(qs, ks, v, *gates, make_state(2, 2, 8, 16, 2, hidden=32), 16)
        with pytest.raises(ValueError, match="k and v"):
            neural_memory_fused_forward(q, k.bfloat16(), v, *gates, st, 16)
        with pytest.raises(ValueError, match="theta"):
            neural_memory_fused_forward(q, k, v, gates[0][:, :5], *gates[1:], st, 16)
    assert fused_supported(q, k, v, st, 16) and not fused_supported(q, k, v, st, 8)


def test_fused_empty_and_custom_op():
    (q, k, v), gates, st = inputs(2, 16, 32, 16, dtype=torch.float32)
    gates = tuple(g.float() for g in gates)
    with torch.no_grad():
        y, s = neural_memory_fused_forward(q[:, :0], k[:, :0], v[:, :0], *(g[:, :0] for g in gates), st, 16)
    assert y.shape == (2, 0, 2, 16) and s.position == 0
    # the custom op's schema and fake (meta) implementation
    from mnemotorch.ops.memory.chunked import _chunk_major, chunk_coefficients

    cm = lambda x: _chunk_major(x, 1, 16)  # noqa: E731
    coefs = chunk_coefficients(cm(gates[0]), cm(torch.log1p(-gates[2])), cm(torch.log(gates[1])))
    args = (q, k, v, *coefs, [w.float() for w in st.weights], [m.float() for m in st.momentum], "gelu", True, True, 1e-5, 0.3)
    for store_states in (False, True):  # with the per-chunk state checkpoints the backward reads
        torch.library.opcheck(lmm_fused_fwd, (*args, store_states), test_utils=("test_schema", "test_faketensor"))


def test_custom_op_keeps_key_pass(monkeypatch):
    """With ``keep_key_pass`` (split kernel, batched read) the op also returns every chunk's ``Z_1, P, Δ_2, Z_2``:
    shapes as its fake says, and values equal to the chunked path's key pass at the stored entering states."""
    from mnemotorch.ops.memory import fused_triton
    from mnemotorch.ops.memory.chunked import _chunk_major, _key_forward, _key_pass, chunk_coefficients

    monkeypatch.setitem(fused_triton.LAUNCH, "split_slice", 16)
    (q, k, v), gates, st = inputs(2, 16, 32, 2 * 16, dtype=torch.float32)
    gates = tuple(g.float() for g in gates)
    cm = lambda x: _chunk_major(x, 2, 16)  # noqa: E731
    coefs = chunk_coefficients(cm(gates[0]), cm(torch.log1p(-gates[2])), cm(torch.log(gates[1])))
    ws, ms = [w.float() for w in st.weights], [m.float() for m in st.momentum]
    assert fused_triton.keeps_key_pass(q, ws, 16)
    args = (q, k, v, *coefs, ws, ms, "gelu", True, True, 1e-5, None, True, True)
    torch.library.opcheck(lmm_fused_fwd, args, test_utils=("test_schema", "test_faketensor"))
    res = lmm_fused_fwd(*args)
    z1, p, d2, z2, sum_w, sum_s, sum_x, z_read = res[5:]
    assert z1.shape == (2, 2, 2, 16, 32) and d2.shape == z2.shape == (2, 2, 2, 16, 16)
    assert sum_w.shape == sum_s.shape == sum_x.shape == (2, 2, 2, 16, 16)  # ([n, B, H, C, Dv], [n, B, H, C, C]: Dv = C here)
    w_in = [x[:-1].double() for x in res[1:3]]  # the state entering each chunk
    s_in = [x[:-1].double() for x in res[3:5]]
    kc, vc = (cm(x.double()) for x in (k, v))
    xs, zs, d_ref = _key_forward(kc, vc, w_in, "gelu", True, True, 1e-5)[:3]
    assert rel(z1.double(), zs[0]) <= 1e-6 and rel(z2.double(), zs[1]) <= 1e-6 and rel(d2.double(), d_ref) <= 1e-6
    assert rel(p.double(), d_ref @ w_in[1].transpose(-1, -2)) <= 1e-6
    # the read's sums over the hidden dimension, Ĥ W_2, Ĥ S_2, Ĥ σ(Z_1)ᵀ, from the dual-form read in float64
    xs_k, deltas = _key_pass(kc, vc, w_in, "gelu", True, True, 1e-5)
    g_mat, _, beta, _, f = (x.double() for x in coefs)
    qc = cm(q.double())
    z_ref = beta.unsqueeze(-1) * (qc @ w_in[0]) + f.unsqueeze(-1) * (qc @ s_in[0]) - (g_mat * (qc @ kc.transpose(-1, -2))) @ deltas[0]
    h_read = torch.nn.functional.gelu(z_ref)
    assert rel(z_read.double(), z_ref) <= 1e-6 and z_read.shape == z1.shape
    assert rel(sum_w.double(), h_read @ w_in[1]) <= 1e-6 and rel(sum_s.double(), h_read @ s_in[1]) <= 1e-6
    assert rel(sum_x.double(), h_read @ xs_k[1].transpose(-1, -2)) <= 1e-6
    monkeypatch.setitem(fused_triton.BACKWARD, "read_z_from_forward", False)  # the three sums without Ẑ_1
    torch.library.opcheck(lmm_fused_fwd, args, test_utils=("test_schema", "test_faketensor"))
    assert len(lmm_fused_fwd(*args)) == 12
    monkeypatch.setitem(fused_triton.BACKWARD, "read_sums_from_forward", False)  # only the key pass then
    torch.library.opcheck(lmm_fused_fwd, args, test_utils=("test_schema", "test_faketensor"))
    assert len(lmm_fused_fwd(*args)) == 9
    with pytest.raises(ValueError, match="keep_key_pass"):
        monkeypatch.setitem(fused_triton.LAUNCH, "split_read", "inline")
        lmm_fused_fwd(*args)


def test_fused_hidden_slices(monkeypatch):
    """Narrower hidden slices (more passes per chunk) give the same result."""
    from mnemotorch.ops.memory import fused_triton

    (q, k, v), gates, st = inputs(2, 16, 64, 32)
    y_ref, s_ref = neural_memory_chunked(q, k, v, *gates, st, 16, **MATCHED, max_grad_norm=0.3)
    monkeypatch.setitem(fused_triton.LAUNCH, "hidden_slice", 16)
    with torch.no_grad():
        y, s = neural_memory_fused_forward(q.float(), k.float(), v.float(), *(g.float() for g in gates), st, 16, **MATCHED, max_grad_norm=0.3)
    assert rel(y.double(), y_ref) <= 1e-5
    assert_state(s, s_ref, 1e-5)


SPLIT_CASES = [  # (name, config, max_grad_norm, d, hidden, chunk, split_slice) -> hidden / split_slice programs per head
    ("matched_2progs", MATCHED, None, 16, 32, 32, 16),
    ("default_clip_2progs", DEFAULT, 0.3, 16, 32, 32, 16),
    ("relu_plain_4progs", dict(activation="relu", residual=False, layer_norm=False), None, 16, 64, 64, 16),
    ("matched_clip_4progs", MATCHED, 0.3, 16, 64, 64, 16),
]


@pytest.mark.parametrize("read", ["batched", "inline", "batched/recompute"])
@pytest.mark.parametrize("name,cfg,clip,d,hidden,chunk,split", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
def test_split_kernel_matches_chunked_fp32(monkeypatch, name, cfg, clip, d, hidden, chunk, split, read):
    """Depth 2 with the hidden dimension split over programs (``_lmm_split_fwd_kernel``; in the
    interpreter one launch per phase and chunk, as the GPU's grid barriers order them), the read either
    in its own kernel after the walk (``batched``, :func:`_lmm_chunk_read_kernel`) or inside it."""
    from mnemotorch.ops.memory import fused_triton

    calls = []
    real = fused_triton._launch_split
    monkeypatch.setattr(fused_triton, "_launch_split", lambda *a, **kw: calls.append(a[8]) or real(*a, **kw))
    monkeypatch.setitem(fused_triton.LAUNCH, "split_slice", split)
    read, _, phase3 = read.partition("/")
    monkeypatch.setitem(fused_triton.LAUNCH, "split_read", read)
    monkeypatch.setitem(fused_triton.LAUNCH, "split_phase3", phase3 or "scratch")
    (q, k, v), gates, st = inputs(2, d, hidden, 2 * chunk + 5, position=0)
    y_ref, s_ref = neural_memory_chunked(q, k, v, *gates, st, chunk, **cfg, max_grad_norm=clip)  # float64
    f32 = lambda xs: [x.float() for x in xs]  # noqa: E731
    st32 = MemoryState(tuple(f32(st.weights)), tuple(f32(st.momentum)), tuple(f32(st.chunk_start)), 0)
    with torch.no_grad():
        y, s = neural_memory_fused_forward(*f32((q, k, v)), *f32(gates), st32, chunk, **cfg, max_grad_norm=clip)
    assert calls == [hidden // split]
    assert torch.isfinite(y).all() and rel(y.double(), y_ref) <= 1e-5, rel(y.double(), y_ref)
    assert_state(s, s_ref, 1e-5)


def test_split_count_widens_slices_until_the_grid_fits(monkeypatch):
    """The split walk needs all of a head's programs resident: the slice width doubles (up to 64 columns) until
    ``B · H · programs`` fits the SMs (and, with the inline read, each program keeps ≥ 16 chunk rows); 0 when no split
    fits."""
    from mnemotorch.ops.memory import fused_triton

    monkeypatch.setitem(fused_triton.LAUNCH, "split_read", "batched")
    count = fused_triton._split_count
    assert count(256, 64, 16, 32, 132) == 8  # 128 programs
    assert count(256, 64, 32, 32, 132) == 4  # 256 would not fit: 64 columns
    assert count(256, 64, 64, 32, 132) == 0  # 128 columns (2 programs) would fit, but no wider than 64 columns is run
    assert count(256, 64, 64, 128, 132) == 2  # unless asked for
    assert count(256, 64, 200, 32, 132) == 0
    assert count(256, 64, 200, 32, None) == 8  # the interpreter: no residency limit
    assert count(64, 64, 1, 64, 132) == 0  # one slice is the one-program kernel
    monkeypatch.setitem(fused_triton.LAUNCH, "split_read", "inline")
    assert count(256, 64, 16, 32, None) == 4  # 8 rows a program would be too few for the inline read


def test_split_slice_auto_follows_ptxas_and_clip(monkeypatch):
    """``split_slice="auto"``: 32 columns only without the clip and where the walk is built with a ptxas of CUDA 12.9
    or newer (the 12.8 one Triton 3.6 builds Hopper kernels with builds the 32-column walk wrong; its newer bundled one,
    where there is one, is taken instead); under the interpreter 64; an int is taken as given.
    The walk's two-product key products stay on from 64 columns on a GPU, always under the interpreter."""
    from mnemotorch.ops.memory import fused_triton

    q = torch.zeros(1)
    monkeypatch.setitem(fused_triton.LAUNCH, "split_slice", "auto")
    assert fused_triton._split_slice(q) == 64 and fused_triton._split_slice(q, clip=True) == 64
    monkeypatch.setattr(fused_triton, "_interpreted", lambda x: False)
    for release, width in [((12, 8), 64), ((12, 9), 32), ((13, 0), 32), ((13, 4), 32), (None, 64)]:
        monkeypatch.setattr(fused_triton, "_walk_ptxas", lambda x, r=release: (None, r))
        assert fused_triton._split_slice(q) == width, release
        assert fused_triton._split_slice(q, clip=True) == 64
    # Triton 3.6: builds Hopper with 12.8, bundles 12.9 (ptxas-blackwell), which the walk then takes
    monkeypatch.setattr(fused_triton, "_walk_ptxas", lambda x: ("/t/ptxas-blackwell", (12, 9)))
    assert fused_triton._split_slice(q) == 32 and fused_triton._split_slice(q, clip=True) == 64
    monkeypatch.setitem(fused_triton.LAUNCH, "split_slice", 16)
    assert fused_triton._split_slice(q, clip=True) == 16
    kb = torch.zeros(1, dtype=torch.bfloat16)
    assert not fused_triton._walk_exact_keys(kb, 32) and fused_triton._walk_exact_keys(kb, 64)
    assert not fused_triton._walk_exact_keys(kb.float(), 64)
    monkeypatch.setattr(fused_triton, "_interpreted", lambda x: True)
    assert fused_triton._walk_exact_keys(kb, 16)


def test_split_batched_read_in_groups(monkeypatch):
    """Without stored checkpoints the batched read walks the chunks in groups with their own slots
    (``LAUNCH["read_group_bytes"]``): one chunk per group here, the same result as one group."""
    from mnemotorch.ops.memory import fused_triton

    monkeypatch.setitem(fused_triton.LAUNCH, "split_slice", 16)
    (q, k, v), gates, st = inputs(2, 16, 32, 3 * 16 + 3, position=0)
    y_ref, s_ref = neural_memory_chunked(q, k, v, *gates, st, 16, **DEFAULT, max_grad_norm=0.3)
    f32 = lambda xs: [x.float() for x in xs]  # noqa: E731
    st32 = MemoryState(tuple(f32(st.weights)), tuple(f32(st.momentum)), tuple(f32(st.chunk_start)), 0)
    launched = []
    monkeypatch.setattr(fused_triton, "_lmm_chunk_read_kernel", _GridRecorder(fused_triton._lmm_chunk_read_kernel, launched))
    monkeypatch.setitem(fused_triton.LAUNCH, "read_group_bytes", 1)
    with torch.no_grad():
        y, s = neural_memory_fused_forward(*f32((q, k, v)), *f32(gates), st32, 16, **DEFAULT, max_grad_norm=0.3)
    assert launched == [(4, 1)] * 3  # B·H = 4 heads, one chunk per group
    assert rel(y.double(), y_ref) <= 1e-5
    assert_state(s, s_ref, 1e-5)


@pytest.mark.parametrize("carry,phase3", [(False, "recompute"), (False, "scratch"), (False, "registers"), (True, "auto")])
@pytest.mark.parametrize("name,cfg,clip", [("matched", MATCHED, None), ("default_clip", DEFAULT, 0.3)])
def test_split_walk_in_one_launch(monkeypatch, name, cfg, clip, carry, phase3):
    """The walk as the GPU runs it, one launch over every chunk with its grid barriers (possible in the
    interpreter with one program per head), with the state slices carried in registers (``split_carry``)
    or read back every chunk, and each way phase 3 gets phases 1-2's values (``split_phase3``); then the
    batched read."""
    from mnemotorch.ops.memory import fused_triton

    monkeypatch.setattr(fused_triton, "_split_programs", lambda *a: 1)
    monkeypatch.setitem(fused_triton.LAUNCH, "split_carry", carry)
    monkeypatch.setitem(fused_triton.LAUNCH, "split_phase3", phase3)
    launched = []
    real = fused_triton._lmm_split_fwd_kernel
    monkeypatch.setattr(fused_triton, "_lmm_split_fwd_kernel", _GridRecorder(real, launched))
    (q, k, v), gates, st = inputs(2, 16, 32, 3 * 16 + 5, position=0)
    y_ref, s_ref = neural_memory_chunked(q, k, v, *gates, st, 16, **cfg, max_grad_norm=clip)
    f32 = lambda xs: [x.float() for x in xs]  # noqa: E731
    st32 = MemoryState(tuple(f32(st.weights)), tuple(f32(st.momentum)), tuple(f32(st.chunk_start)), 0)
    with torch.no_grad():
        y, s = neural_memory_fused_forward(*f32((q, k, v)), *f32(gates), st32, 16, **cfg, max_grad_norm=clip)
    assert len(launched) == 1  # one launch walked all 3 full chunks
    assert rel(y.double(), y_ref) <= 1e-5, rel(y.double(), y_ref)
    assert_state(s, s_ref, 1e-5)


class _GridRecorder:
    """Wraps a Triton kernel: records each launch's grid."""

    def __init__(self, kernel, seen: list):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        self.seen.append(tuple(grid))
        return self.kernel[grid]


@pytest.mark.parametrize("read,used", [("inline", False), ("batched", True)])
def test_split_rows_per_program(monkeypatch, read, used):
    """The inline read splits the chunk's rows over the programs too: with fewer than 16 rows per
    program (a tl.dot tile) it keeps the one-program-per-head kernel. The batched read does not."""
    from mnemotorch.ops.memory import fused_triton

    calls = []
    real = fused_triton._launch_split
    monkeypatch.setattr(fused_triton, "_launch_split", lambda *a, **kw: calls.append(a[8]) or real(*a, **kw))
    monkeypatch.setitem(fused_triton.LAUNCH, "split_slice", 16)
    monkeypatch.setitem(fused_triton.LAUNCH, "split_read", read)
    (q, k, v), gates, st = inputs(2, 16, 32, 32)
    with torch.no_grad():  # chunk 16, 2 programs: 8 rows each
        y, _ = neural_memory_fused_forward(q.float(), k.float(), v.float(), *(g.float() for g in gates), st, 16, **MATCHED)
    y_ref, _ = neural_memory_chunked(q, k, v, *gates, st, 16, **MATCHED)
    assert bool(calls) == used
    assert rel(y.double(), y_ref) <= 1e-5


def test_layer_fused_memory_flag(monkeypatch):
    """``TitansLMM(fused_memory=True)`` (an attribute, also for the variants' ``layer.memory``): no-grad
    calls run the kernel (here through the interpreter), equal the chunked layer, and stream across
    calls that split chunks; training calls run it too (the fused backward) with the chunked layer's gradients."""
    from mnemotorch.layers import get_mixer
    from mnemotorch.ops.memory import fused_triton

    calls = []
    real = fused_triton.neural_memory_fused
    monkeypatch.setattr(fused_triton, "neural_memory_fused", lambda *a, **kw: calls.append(a[0].shape[1]) or real(*a, **kw))
    monkeypatch.delenv("MNEMO_MEMORY_FUSED", raising=False)
    torch.manual_seed(0)
    layer = get_mixer("titans_lmm", dim=64, num_heads=4, chunk_size=16, expansion=4, conv_size=2)
    x = torch.randn(1, 16 * 3 + 5, 64)
    with torch.no_grad():
        y0, s0 = layer(x)
        assert calls == []
        layer.fused_memory = True
        y1, s1 = layer(x)
        assert calls == [16 * 3 + 5] and "fused_memory=True" in repr(layer)
        assert rel(y1, y0) <= 1e-5 and rel(s1.weights, s0.weights) <= 1e-5
        ya, sa = layer(x[:, :21])  # ends inside a chunk; the next call starts there
        yb, _ = layer(x[:, 21:], sa)
        assert rel(torch.cat([ya, yb], 1), y0) <= 1e-5
    calls.clear()
    xg = x.clone().requires_grad_()
    y2, _ = layer(xg)  # training: the fused forward and backward
    assert calls == [16 * 3 + 5] and rel(y2.detach(), y0) <= 1e-5
    params = [xg, *layer.parameters()]
    ct = torch.randn_like(y2)
    got = torch.autograd.grad(y2, params, ct)
    layer.fused_memory = False
    want = torch.autograd.grad(layer(xg)[0], params, ct)
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel(a, b) <= 1e-5, (i, rel(a, b))
    with pytest.raises(TypeError, match="fused_memory must be a bool"):
        get_mixer("titans_lmm", dim=64, num_heads=4, fused_memory="yes")
    mag = get_mixer("titans_mag", dim=64, num_heads=4, chunk_size=16, window=8)
    with torch.no_grad():
        z0, _ = mag(x)
        mag.memory.fused_memory = True
        z1, _ = mag(x)
    assert calls and rel(z1, z0) <= 1e-5  # MAG reads the memory for its persistent tokens too
    xm = x.clone().requires_grad_()  # MAG trains through the fused memory: the chunked layer's gradients
    params = [xm, *mag.parameters()]
    got = torch.autograd.grad(mag(xm)[0], params, ct)
    mag.memory.fused_memory = False
    want = torch.autograd.grad(mag(xm)[0], params, ct)
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None) and (a is None or rel(a, b) <= 1e-5), i
