"""2-D neighborhood attention and HaloNet modules against their float64 references.

The NA-2D rule is checked against a brute-force transcription of the spec (explicit member lists,
written here independently); the fast paths (gather, block-sparse with the tile permutation, the
Triton kernel under the interpreter) against the dense-masked reference, outputs and gradients.
HaloNet's blocked computation is checked against the dense reference, which is itself checked
against an explicit per-query loop and against the block-sparse library's ``halo_pattern``.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from mnemotorch.layers import HaloAttention, NeighborhoodAttention2D
from mnemotorch.layers.vision import (
    _na_axis_neighbors,
    halo_attention,
    halo_attention_reference,
    na2d,
    na2d_mask,
    na2d_reference,
)
from mnemotorch.ops.block_sparse import block_sparse_attention_reference, halo_pattern

F64 = torch.float64


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ============================================================================================
# the NATTEN rule, transcribed from shared/specs/sparse-attention.md


def bf_axis(L: int, k: int, d: int, s: int, causal: bool) -> list[set[int]]:
    """For every coordinate, the set of visible key coordinates along one axis."""
    visible = [set() for _ in range(L)]
    for g in range(d):
        members = list(range(g, L, d))
        n = len(members)
        for t, i in enumerate(members):
            if causal:
                leader = min((t // s) * s + s - 1, n - 1)
                visible[i] = {members[u] for u in range(n) if u <= t and leader - u < k}
            else:
                leader = min((t // s) * s + s // 2, n - 1)
                start = min(max(leader - k // 2, 0), n - k)  # the window slides inward at the borders
                visible[i] = {members[u] for u in range(start, start + k)}
    return visible


def bf_mask(shape, ks, ds, ss, cs) -> torch.Tensor:
    (h, w) = shape
    rows = bf_axis(h, ks[0], ds[0], ss[0], cs[0])
    cols = bf_axis(w, ks[1], ds[1], ss[1], cs[1])
    m = torch.zeros(h * w, h * w, dtype=torch.bool)
    for qi, qj, ki, kj in itertools.product(range(h), range(w), range(h), range(w)):
        m[qi * w + qj, ki * w + kj] = ki in rows[qi] and kj in cols[qj]
    return m


NA_CASES = [
    # (H, W), kernel, dilation, stride, causal
    ((5, 7), (3, 3), (1, 1), (1, 1), (False, False)),
    ((6, 7), (3, 5), (2, 1), (1, 2), (False, False)),
    ((7, 6), (4, 2), (1, 3), (3, 1), (False, False)),  # even kernels, unequal dilation groups
    ((6, 6), (3, 3), (2, 1), (1, 1), (True, False)),
    ((5, 6), (3, 4), (1, 1), (2, 3), (True, True)),
    ((9, 8), (4, 3), (2, 2), (3, 2), (False, True)),
    ((4, 5), (4, 5), (1, 1), (1, 1), (False, False)),  # kernel = map: full attention
]


@pytest.mark.parametrize("shape,ks,ds,ss,cs", NA_CASES)
def test_na2d_rule_matches_brute_force(shape, ks, ds, ss, cs) -> None:
    want = bf_mask(shape, ks, ds, ss, cs)
    assert torch.equal(na2d_mask(shape, ks, ds, ss, cs), want)
    # the gather path's window slots hold exactly the visible keys, once each
    for axis, (L, k, d, s, c) in enumerate(zip(shape, ks, ds, ss, cs)):
        idx, valid, _ = _na_axis_neighbors(L, k, d, s, c)
        for i, keys in enumerate(bf_axis(L, k, d, s, c)):
            got = idx[i][valid[i]].tolist()
            assert sorted(got) == sorted(keys) and len(got) == len(set(got)), (axis, i)
        if not c:
            assert bool(valid.all())  # non-causal: every query sees exactly k keys per axis


def _qkv(shape, heads=2, d=4, seed=0, dtype=F64):
    return [randn(2, *shape, heads, d, seed=seed + i, dtype=dtype).requires_grad_() for i in range(3)]


def _grads(out, inputs, seed=99):
    go = randn(*out.shape, seed=seed).to(out.dtype)  # the same numbers whatever out's dtype
    return torch.autograd.grad(out, inputs, go)


@pytest.mark.parametrize("shape,ks,ds,ss,cs", NA_CASES)
@pytest.mark.parametrize("backend", ["gather", "block_sparse"])
def test_na2d_paths_match_reference_float64(shape, ks, ds, ss, cs, backend) -> None:
    q, k, v = _qkv(shape)
    ref = na2d_reference(q, k, v, ks, ds, ss, cs)
    out = na2d(q, k, v, ks, ds, ss, cs, backend=backend, tile_shape=(4, 4))
    assert rel(out, ref) <= 1e-10
    for g, r in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        assert rel(g, r) <= 1e-10


@pytest.mark.parametrize("shape,ks,ds,cs", [((6, 7), (3, 5), (2, 1), (False, False)), ((6, 6), (3, 3), (1, 2), (True, False))])
def test_na2d_rpb_gather_matches_reference_float64(shape, ks, ds, cs) -> None:
    q, k, v = _qkv(shape)
    rpb = randn(2, 2 * ks[0] - 1, 2 * ks[1] - 1, seed=7).requires_grad_()
    ref = na2d_reference(q, k, v, ks, ds, 1, cs, rpb=rpb)
    out = na2d(q, k, v, ks, ds, 1, cs, rpb=rpb)  # auto -> gather (the kernel has no bias)
    assert rel(out, ref) <= 1e-10
    for g, r in zip(_grads(out, (q, k, v, rpb)), _grads(ref, (q, k, v, rpb))):
        assert rel(g, r) <= 1e-10
    # the bias matters (a test that cannot fail would pass without it)
    assert rel(na2d(q, k, v, ks, ds, 1, cs), ref) > 1e-3


def test_na2d_rpb_indexing_explicit() -> None:
    # 1 x W map, kernel 3: the interior query 2 sees keys 1, 2, 3 with rpb columns 0, 1, 2; with
    # all logits from q.k zero (q = 0), the weights are softmax(rpb row) exactly.
    w = 5
    q = torch.zeros(1, 1, w, 1, 2, dtype=F64)
    k = randn(1, 1, w, 1, 2, seed=1)
    v = randn(1, 1, w, 1, 2, seed=2)
    rpb = randn(1, 1, 5, seed=3)  # kh = 1 -> one row; kw = 3 -> 5 columns
    out = na2d(q, k, v, (1, 3), rpb=rpb)
    wts = torch.softmax(rpb[0, 0, [1, 2, 3]], 0)  # offsets -1, 0, +1 -> columns 1, 2, 3
    assert torch.allclose(out[0, 0, 2, 0], (wts[:, None] * v[0, 0, 1:4, 0]).sum(0), atol=1e-14)
    # query 0 at the border: window slid to keys 0, 1, 2 -> offsets 0, +1, +2 -> columns 2, 3, 4
    wts = torch.softmax(rpb[0, 0, [2, 3, 4]], 0)
    assert torch.allclose(out[0, 0, 0, 0], (wts[:, None] * v[0, 0, 0:3, 0]).sum(0), atol=1e-14)


def test_na2d_full_kernel_is_dense_attention() -> None:
    q, k, v = _qkv((4, 5))
    out = na2d(q, k, v, (4, 5), backend="gather")
    qf, kf, vf = (t.reshape(2, 20, 2, 4) for t in (q, k, v))
    p = torch.softmax(torch.einsum("bihd,bjhd->bhij", qf, kf) / 2.0, -1)
    dense = torch.einsum("bhij,bjhd->bihd", p, vf).reshape(2, 4, 5, 2, 4)
    assert rel(out, dense) <= 1e-12


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter (tests/conftest.py)")
@pytest.mark.parametrize("ks,ds,cs", [((5, 3), (1, 2), (False, False)), ((3, 3), (2, 1), (True, False))])
def test_na2d_triton_interpreter_fp32(ks, ds, cs) -> None:
    pytest.importorskip("triton")
    shape = (8, 8)
    q, k, v = _qkv(shape, heads=2, d=16, dtype=torch.float32)
    out = na2d(q, k, v, ks, ds, 1, cs, backend="triton", tile_shape=(4, 4))
    assert not torch.isnan(out).any()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = na2d_reference(qd, kd, vd, ks, ds, 1, cs)
    assert rel(out, ref) <= 1e-5
    for g, r in zip(_grads(out, (q, k, v)), _grads(ref, (qd, kd, vd))):
        assert rel(g, r) <= 1e-5


def test_na2d_module_float64() -> None:
    torch.manual_seed(0)
    m = NeighborhoodAttention2D(16, 2, kernel_size=3, dilation=(1, 2), rel_pos_bias=True).double()
    with torch.no_grad():
        m.rpb.normal_()  # the 0.02 initialisation would hide an indexing bug
    x = randn(2, 6, 7, 16, seed=5).requires_grad_()
    y = m(x)
    q, k, v = m.qkv(x).reshape(2, 6, 7, 3, 2, 8).unbind(3)
    manual = m.proj(na2d_reference(q, k, v, 3, (1, 2), rpb=m.rpb).reshape(2, 6, 7, 16))
    assert y.shape == x.shape and rel(y, manual) <= 1e-10
    y.square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # without a bias, the block-sparse path (tile permutation) gives the gather path's layer
    m2 = NeighborhoodAttention2D(16, 2, kernel_size=(3, 5), stride=(1, 2), backend="gather").double()
    x = randn(1, 6, 7, 16, seed=6)
    a = m2(x)
    m2.backend = "block_sparse"
    assert rel(m2(x), a) <= 1e-10


# ============================================================================================
# HaloNet


def halo_loop(q, k, v, b, h, rel_h, rel_w, mask_padding):
    """One query at a time: its block's window, padded keys zero (or absent), relative logits."""
    B, H, W, nh, d = q.shape
    out = torch.zeros_like(q)
    for bi, r, c, hd in itertools.product(range(B), range(H), range(W), range(nh)):
        r0, c0 = (r // b) * b - h, (c // b) * b - h
        logits, values = [], []
        for kr, kc in itertools.product(range(r0, r0 + b + 2 * h), range(c0, c0 + b + 2 * h)):
            inside = 0 <= kr < H and 0 <= kc < W
            if not inside and mask_padding:
                continue
            kk = k[bi, kr, kc, hd] if inside else torch.zeros(d, dtype=q.dtype)
            vv = v[bi, kr, kc, hd] if inside else torch.zeros(d, dtype=q.dtype)
            qq = q[bi, r, c, hd]
            s = qq @ kk + qq @ rel_h[kr - r + b + h - 1] + qq @ rel_w[kc - c + b + h - 1]
            logits.append(s * d**-0.5)
            values.append(vv)
        p = torch.softmax(torch.stack(logits), 0)
        out[bi, r, c, hd] = (p[:, None] * torch.stack(values)).sum(0)
    return out


HALO_CASES = [
    # (H, W), block, halo, mask_padding
    ((8, 8), 4, 1, True),
    ((8, 8), 4, 1, False),
    ((6, 9), 3, 2, True),
    ((4, 6), 2, 0, True),
    ((4, 4), 2, 3, False),  # halo wider than the block
    ((8, 4), 2, 1, True),
]


@pytest.mark.parametrize("shape,b,h,mask_padding", HALO_CASES)
def test_halo_blocked_matches_dense_reference_float64(shape, b, h, mask_padding) -> None:
    q, k, v = _qkv(shape)
    rel_h = randn(2 * (b + h) - 1, 4, seed=11).requires_grad_()
    rel_w = randn(2 * (b + h) - 1, 4, seed=12).requires_grad_()
    ref = halo_attention_reference(q, k, v, b, h, rel_h, rel_w, mask_padding)
    out = halo_attention(q, k, v, b, h, rel_h, rel_w, mask_padding)
    assert rel(out, ref) <= 1e-10
    for g, r in zip(_grads(out, (q, k, v, rel_h, rel_w)), _grads(ref, (q, k, v, rel_h, rel_w))):
        assert rel(g, r) <= 1e-10


@pytest.mark.parametrize("mask_padding", [True, False])
def test_halo_reference_matches_explicit_loop(mask_padding) -> None:
    b, h = 2, 1
    q, k, v = (t.detach()[:1] for t in _qkv((4, 6)))
    rel_h, rel_w = randn(2 * (b + h) - 1, 4, seed=11), randn(2 * (b + h) - 1, 4, seed=12)
    ref = halo_attention_reference(q, k, v, b, h, rel_h, rel_w, mask_padding)
    assert rel(ref, halo_loop(q, k, v, b, h, rel_h, rel_w, mask_padding)) <= 1e-12
    # border outputs depend on the padding rule; interior blocks do not exist at this size
    other = halo_attention_reference(q, k, v, b, h, rel_h, rel_w, not mask_padding)
    assert rel(other, ref) > 1e-3


def test_halo_masked_equals_block_sparse_halo_pattern() -> None:
    # without relative logits, masked HaloNet is exactly the library's halo_pattern
    q, k, v = (t.detach() for t in _qkv((6, 9)))
    out = halo_attention(q, k, v, 3, 2)
    pat = halo_pattern(6, 9, 3, 2, permute=False, q_block=16, k_block=16).pattern
    flat = [t.reshape(2, 54, 2, 4) for t in (q, k, v)]
    assert rel(out, block_sparse_attention_reference(*flat, pat).reshape(out.shape)) <= 1e-12


def test_halo_module_float64() -> None:
    torch.manual_seed(0)
    m = HaloAttention(16, 2, block_size=4, halo_size=2).double()
    x = randn(2, 8, 4, 16, seed=3).requires_grad_()
    y = m(x)
    q = m.q(x).reshape(2, 8, 4, 2, 8)
    k, v = m.kv(x).reshape(2, 8, 4, 2, 2, 8).unbind(3)
    manual = m.proj(halo_attention_reference(q, k, v, 4, 2, m.rel_h, m.rel_w).reshape(2, 8, 4, 16))
    assert y.shape == x.shape and rel(y, manual) <= 1e-10
    y.square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# ============================================================================================
# bad input


def test_bad_input_is_rejected() -> None:
    na = NeighborhoodAttention2D(16, 2, kernel_size=5, dilation=2)
    with pytest.raises(ValueError, match="kernel_size"):
        na(torch.randn(1, 4, 12, 16))  # kernel 5 > height 4
    with pytest.raises(ValueError, match="dilation"):
        na(torch.randn(1, 8, 12, 16))  # 5 * 2 > 8
    with pytest.raises(ValueError, match="shape"):
        na(torch.randn(2, 12, 16))
    with pytest.raises(ValueError, match="shape"):
        na(torch.randn(1, 12, 12, 8))  # wrong channels
    with pytest.raises(TypeError, match="floating"):
        na(torch.ones(1, 12, 12, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="stride"):
        NeighborhoodAttention2D(16, 2, kernel_size=3, stride=4)
    with pytest.raises(ValueError, match="stride"):
        NeighborhoodAttention2D(16, 2, kernel_size=3, stride=2, rel_pos_bias=True)
    with pytest.raises(ValueError, match="num_heads"):
        NeighborhoodAttention2D(16, 3)
    with pytest.raises(ValueError, match="backend"):
        NeighborhoodAttention2D(16, 2, backend="cuda")
    with pytest.raises(ValueError, match="tile_shape"):
        NeighborhoodAttention2D(16, 2, tile_shape=(3, 5))
    q, k, v = _qkv((6, 6))
    with pytest.raises(ValueError, match="rpb"):
        na2d(q, k, v, 3, rpb=torch.zeros(2, 3, 3, dtype=F64))
    with pytest.raises(ValueError, match="shape"):
        na2d(q, k[:, :5], v, 3)
    with pytest.raises(ValueError, match="kernel_size"):
        na2d(q, k, v, 0)

    halo = HaloAttention(16, 2, block_size=4, halo_size=1)
    with pytest.raises(ValueError, match="block_size"):
        halo(torch.randn(1, 6, 8, 16))
    with pytest.raises(ValueError, match="shape"):
        halo(torch.randn(1, 8, 8, 15))
    with pytest.raises(ValueError, match="halo_size"):
        HaloAttention(16, 2, block_size=4, halo_size=-1)
    with pytest.raises(ValueError, match="rel_h"):
        halo_attention(q, k, v, 3, 1, rel_h=torch.zeros(5, 4, dtype=F64))


# ============================================================================================
# the digits classifier


def test_digits_classifier_trains() -> None:
    pytest.importorskip("sklearn")
    from mnemotorch.tasks.digits import DigitsClassifier, load_digits_split, train_digits

    x_tr, y_tr, x_te, y_te = load_digits_split()
    assert x_tr.shape == (1438, 8, 8) and x_te.shape == (359, 8, 8) and 0 <= x_tr.min() and x_tr.max() <= 1
    assert set(y_te.tolist()) == set(range(10))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for attention in ("na2d", "halo"):
            # a small model and a high learning rate leave the initial plateau (loss ~ ln 10) quickly
            res = train_digits(attention, max_steps=60, lr=2e-2, progress=False, dim=16, depth=1, num_heads=2)
            first, last = sum(res["losses"][:5]) / 5, sum(res["losses"][-5:]) / 5
            assert res["steps"] == 60 and last < first - 0.3, (attention, first, last)
            assert 0.0 <= res["test_accuracy"] <= 1.0
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="attention"):
        DigitsClassifier("swin")
    with pytest.raises(ValueError, match="images"):
        DigitsClassifier()(torch.randn(2, 64))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the kernel on CPU needs TRITON_INTERPRET=1")
def test_module_rel_pos_bias_on_the_kernel_equals_gather() -> None:
    """The learned NAT bias through the kernel's additive-bias hook: outputs and every gradient
    (the bias table's included) equal the gather backend's."""
    torch.manual_seed(0)
    m = NeighborhoodAttention2D(32, 2, kernel_size=3, dilation=(1, 2), rel_pos_bias=True, backend="gather")
    with torch.no_grad():
        m.rpb.normal_()
    x = torch.randn(1, 8, 10, 32)
    outs = []
    for backend in ("gather", "triton"):
        m.backend = backend
        m.zero_grad()
        y = m(x)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        outs.append([y.detach().clone(), m.rpb.grad.clone(), m.qkv.weight.grad.clone()])
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()
