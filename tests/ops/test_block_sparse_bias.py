"""The block-sparse kernel's additive relative-position bias (RelativeBias) against float64 references.

Kernels run through Triton's interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1) or
on the GPU with MNEMO_GPU_TESTS=1. Every case checks the output and every gradient, the bias
tables' included, with NaN-poisoned kernel outputs.
"""

from __future__ import annotations

import os

import pytest
import torch

from mnemotorch.ops.block_sparse import (
    RelativeBias,
    block_sparse_attention,
    block_sparse_attention_reference,
    build_pattern,
    neighborhood_pattern_2d,
    relative_bias_1d,
    relative_bias_grid,
    sliding_window_pattern,
)

DEVICE = "cuda" if os.environ.get("MNEMO_GPU_TESTS") == "1" and torch.cuda.is_available() else "cpu"
KERNEL = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
needs_kernel = pytest.mark.skipif(not KERNEL, reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py) or a GPU")
F64 = torch.float64


def rel(a, b) -> float:
    den = b.norm().item()
    return ((a.double() - b.double()).norm() / (den if den > 1e-6 else 1.0)).item()


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(DEVICE, dtype)


def check_kernel(pattern, q, k, v, make_bias, tables, tol=1e-5):
    """Kernel (fp32) vs reference (float64): output and gradients of q, k, v and every table."""
    pattern = pattern.to(DEVICE)
    ins = [t.clone().requires_grad_() for t in (q, k, v, *tables)]
    ins64 = [t.detach().double().requires_grad_() for t in (q, k, v, *tables)]
    out = block_sparse_attention(*ins[:3], pattern, backend="triton", bias=make_bias(*ins[3:]))
    ref = block_sparse_attention_reference(*ins64[:3], pattern, bias=make_bias(*ins64[3:]))
    assert torch.isfinite(out).all()
    assert rel(out, ref) <= tol, f"out {rel(out, ref):.2e}"
    go = randn(*out.shape, seed=99)
    grads = torch.autograd.grad(out, ins, go)
    rgrads = torch.autograd.grad(ref, ins64, go.double())
    for n, (g, r) in enumerate(zip(grads, rgrads)):
        name = "qkv"[n] if n < 3 else f"table{n - 3}"
        assert torch.isfinite(g).all(), f"d{name} not finite"
        assert rel(g, r) <= tol, f"d{name}: {rel(g, r):.2e}"
    return out, ref


# ------------------------------------------------------------------------------------------
# the reference's bias: explicit index rules (float64, no kernel)


def test_relative_bias_1d_dense_is_the_clamped_offset_rule() -> None:
    table = randn(3, 7, dtype=F64)
    bias = relative_bias_1d(table, 5, k_len=9, min_offset=-4)
    dense = bias.dense()  # [1, 3, 5, 9]
    assert dense.shape == (1, 3, 5, 9)
    for i in range(5):
        p = i + 4  # the last 5 of 9 keys
        for j in range(9):
            assert torch.equal(dense[0, :, i, j], table[:, min(max(j - p + 4, 0), 6)])
    # default min_offset: symmetric
    d2 = relative_bias_1d(table, 4).dense()
    assert torch.equal(d2[0, :, 2, 1], table[:, 3 - 1]) and torch.equal(d2[0, :, 0, 3], table[:, 6])


def test_relative_bias_grid_separable_and_joint_rules() -> None:
    shape = (4, 5)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(1))
    th, tw = randn(2, 5, dtype=F64, seed=1), randn(2, 3, dtype=F64, seed=2)
    sep = relative_bias_grid((th, tw), shape, perm=perm).dense()[0]  # [2, 20, 20]
    joint_t = randn(2, 5, 7, dtype=F64, seed=3)
    joint = relative_bias_grid(joint_t, shape, perm=perm, dilation=(1, 2), joint=True).dense()[0]
    for p in range(20):
        r, c = divmod(int(perm[p]), 5)
        for pk in range(20):
            r2, c2 = divmod(int(perm[pk]), 5)
            want = th[:, min(max(r2 - r + 2, 0), 4)] + tw[:, min(max(c2 - c + 1, 0), 2)]
            assert torch.equal(sep[:, p, pk], want)
            dy, dx = r2 - r, c2 // 2 - c // 2  # dilation 2 on the width: group coordinates
            if abs(dy) <= 2 and abs(dx) <= 3:
                assert torch.equal(joint[:, p, pk], joint_t[:, dy + 2, dx + 3])


def test_bias_arguments_are_checked() -> None:
    pat = sliding_window_pattern(16, 4, q_block=16, k_block=16)
    q = randn(1, 16, 2, 16)
    with pytest.raises(ValueError, match="coordinates are for"):
        block_sparse_attention(q, q, q, pat, bias=relative_bias_1d(randn(2, 5), 12))
    with pytest.raises(ValueError, match="axis 2 must be 1 or 2"):
        block_sparse_attention(q, q, q, pat, bias=relative_bias_1d(randn(3, 5), 16))
    with pytest.raises(TypeError, match="RelativeBias"):
        block_sparse_attention(q, q, q, pat, bias=randn(2, 5))
    with pytest.raises(ValueError, match="shape"):
        relative_bias_1d(randn(1, 2, 5), 16)
    with pytest.raises(ValueError, match="1 to 2 tables"):
        RelativeBias((randn(5),) * 3, torch.zeros(3, 16, dtype=torch.int32), torch.zeros(3, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="odd"):
        relative_bias_grid((randn(4), None), (4, 4))
    with pytest.raises(TypeError, match="integer"):
        RelativeBias((randn(5),), torch.zeros(1, 16), torch.zeros(1, 16))


# ------------------------------------------------------------------------------------------
# the kernel (interpreter on the CPU)


@needs_kernel
@pytest.mark.parametrize("table_shape", ["head", "query", "shared"])
def test_kernel_1d_bias_sliding_window_gqa(table_shape) -> None:
    # 30 queries = the last 30 of 41 keys, window 13, GQA 2 -> 1, partial and full blocks
    lq, lk, h = 30, 41, 2
    pat = sliding_window_pattern(lq, 13, k_len=lk, q_block=16, k_block=16)
    q, k, v = randn(1, lq, h, 16, seed=1), randn(1, lk, 1, 16, seed=2), randn(1, lk, 1, 16, seed=3)
    shape = {"head": (h, 9), "query": (1, lq, h, 9), "shared": (9,)}[table_shape]
    table = randn(*shape, seed=4)
    check_kernel(pat, q, k, v, lambda t: relative_bias_1d(t, lq, k_len=lk, min_offset=-8), [table])


@needs_kernel
def test_kernel_two_terms_on_tiled_neighborhood_with_batch_and_sliced_tiles(monkeypatch) -> None:
    # 2-D NA on a permuted 4 x 8 grid (16-token tiles), separable per-query tables for the
    # batch (row table) and broadcast over it (column table), key blocks walked in 16-row slices
    from mnemotorch.ops.block_sparse import triton as bs_triton

    monkeypatch.setattr(bs_triton, "FIXED_SUB", 16)
    pat, perm, _ = neighborhood_pattern_2d((4, 8), (3, 5), tile_shape=(4, 4), q_block=16, k_block=32)
    n, h = 32, 2
    q, k, v = (randn(2, n, h, 16, seed=s) for s in (1, 2, 3))
    tables = [randn(2, n, h, 5, seed=4), randn(1, n, 1, 9, seed=5)]
    check_kernel(pat, q, k, v, lambda a, b: relative_bias_grid((a, b), (4, 8), perm=perm), tables)


@needs_kernel
def test_kernel_bias_with_empty_rows() -> None:
    # queries < 10 see no key: zero output, zero gradients, no NaN from the bias path
    pat = build_pattern(lambda i, j: (i >= 10) & (j <= i), 24, 24, 16, 16)
    q, k, v = (randn(1, 24, 1, 16, seed=s) for s in (1, 2, 3))
    out, _ = check_kernel(pat, q, k, v, lambda t: relative_bias_1d(t, 24, min_offset=-6), [randn(1, 7, seed=4)])
    assert torch.all(out[:, :10] == 0)


@needs_kernel
def test_halo_attention_kernel_matches_reference_with_relative_logits() -> None:
    from mnemotorch.layers.vision import halo_attention, halo_attention_reference

    b, hl = 4, 1  # 4 x 4 blocks (16-token kernel tiles), halo 1, relative tables [2(b+h)-1, D]
    q, k, v = (randn(1, 8, 4, 2, 16, seed=s) for s in (1, 2, 3))
    rel_h, rel_w = randn(9, 16, seed=4), randn(9, 16, seed=5)
    ins = [t.clone().requires_grad_() for t in (q, k, v, rel_h, rel_w)]
    ins64 = [t.detach().double().requires_grad_() for t in (q, k, v, rel_h, rel_w)]
    out = halo_attention(*ins[:3], b, hl, *ins[3:], backend="triton")
    ref = halo_attention_reference(*ins64[:3], b, hl, *ins64[3:])
    assert rel(out, ref) <= 1e-5
    go = randn(*out.shape, seed=9)
    for n, (g, r) in enumerate(zip(torch.autograd.grad(out, ins, go), torch.autograd.grad(ref, ins64, go.double()))):
        assert rel(g, r) <= 1e-5, f"grad {n}: {rel(g, r):.2e}"


@needs_kernel
def test_na2d_rpb_kernel_matches_reference() -> None:
    from mnemotorch.layers.vision import na2d, na2d_reference

    ks, ds = (3, 5), (1, 2)
    q, k, v = (randn(1, 4, 10, 1, 16, seed=s) for s in (1, 2, 3))
    rpb = randn(1, 5, 9, seed=4)
    ins = [t.clone().requires_grad_() for t in (q, k, v, rpb)]
    ins64 = [t.detach().double().requires_grad_() for t in (q, k, v, rpb)]
    out = na2d(*ins[:3], ks, ds, rpb=ins[3], backend="triton", tile_shape=(4, 4))
    ref = na2d_reference(*ins64[:3], ks, ds, rpb=ins64[3])
    assert rel(out, ref) <= 1e-5
    go = randn(*out.shape, seed=9)
    for n, (g, r) in enumerate(zip(torch.autograd.grad(out, ins, go), torch.autograd.grad(ref, ins64, go.double()))):
        assert rel(g, r) <= 1e-5, f"grad {n}: {rel(g, r):.2e}"


# ------------------------------------------------------------------------------------------
# the 2-D modules' block-sparse paths without the kernel (float64 reference dispatch)


def test_halo_block_sparse_path_float64_and_backend_checks() -> None:
    from mnemotorch.layers.vision import HaloAttention, halo_attention, halo_attention_reference

    q, k, v = (randn(2, 6, 9, 2, 8, seed=s, dtype=F64) for s in (1, 2, 3))
    rel_h, rel_w = randn(9, 8, seed=4, dtype=F64), randn(9, 8, seed=5, dtype=F64)
    out = halo_attention(q, k, v, 3, 2, rel_h, rel_w, backend="block_sparse")
    assert rel(out, halo_attention_reference(q, k, v, 3, 2, rel_h, rel_w)) <= 1e-12
    out = halo_attention(q, k, v, 3, 2, None, rel_w, backend="block_sparse")
    assert rel(out, halo_attention_reference(q, k, v, 3, 2, None, rel_w)) <= 1e-12
    with pytest.raises(ValueError, match="mask_padding"):
        halo_attention(q, k, v, 3, 2, mask_padding=False, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        halo_attention(q, k, v, 3, 2, backend="cuda")
    with pytest.raises(ValueError, match="mask_padding"):
        HaloAttention(16, 2, mask_padding=False, backend="block_sparse")
    m = HaloAttention(16, 2, block_size=3, halo_size=1, backend="block_sparse").double()
    x = randn(1, 6, 6, 16, seed=6, dtype=F64)
    torch.testing.assert_close(m(x), m.proj(m.attention(*_halo_qkv(m, x), backend="blocked").reshape(1, 6, 6, 16)))


def _halo_qkv(m, x):
    b, h, w, _ = x.shape
    q = m.q(x).reshape(b, h, w, m.num_heads, m.head_dim)
    k, v = m.kv(x).reshape(b, h, w, 2, m.num_heads, m.head_dim).unbind(3)
    return q, k, v


def test_na2d_rpb_block_sparse_path_float64() -> None:
    from mnemotorch.layers.vision import na2d, na2d_reference

    q, k, v = (randn(1, 7, 9, 2, 8, seed=s, dtype=F64) for s in (1, 2, 3))
    rpb = randn(2, 5, 5, seed=4, dtype=F64)
    for cs in (False, (True, False)):
        out = na2d(q, k, v, 3, (2, 1), causal=cs, rpb=rpb, backend="block_sparse", tile_shape=(4, 4))
        assert rel(out, na2d_reference(q, k, v, 3, (2, 1), causal=cs, rpb=rpb)) <= 1e-12


def test_autotune_modes() -> None:
    triton_mod = pytest.importorskip("mnemotorch.ops.block_sparse.triton")
    mode = triton_mod._AUTOTUNE_MODE
    try:
        triton_mod.set_autotune("small")
        assert len(triton_mod._tuned(triton_mod._fwd_kernel, 64).configs) == 2
        triton_mod.set_autotune("full")
        assert len(triton_mod._tuned(triton_mod._bwd_dq_kernel, 64).configs) == 6
        with pytest.raises(ValueError, match="mode"):
            triton_mod.set_autotune("fast")
    finally:
        triton_mod.set_autotune(mode)
