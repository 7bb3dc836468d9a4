"""Causal-exact routing attention on the block-sparse kernel (``ops/routing/block_sparse.py``).

* The packed layout's block lists against a brute-force predicate over every (query, key) pair:
  shared and separate clusters, causal and not, queries after a cache, empty and single-token
  clusters, several tile sizes; the transposed lists against the forward lists; no ``L x L`` tensor.
* The kernel path (Triton interpreter on the CPU) against the float64 reference: outputs and the
  gradients of q, k, v within ARCHITECTURE.md's float32 tolerance (1e-5), outputs NaN-poisoned.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mnemotorch.layers import get_mixer
from mnemotorch.ops.routing import causal_exact_attention, routed_layout
from mnemotorch.ops.routing.block_sparse import causal_exact_attention_block_sparse, static_layout_sizes

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py)")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def clusters(b: int, tq: int, tk: int, h: int, c: int, shared: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with a long run (full tiles), a single-token cluster and ids no key has (empty clusters)."""
    g = torch.Generator().manual_seed(seed)
    ck = torch.randint(0, c, (b, tk, h), generator=g)
    ck[0, : min(tk, 70), 0] = c  # a long run of one cluster
    ck[-1, tk // 2, h - 1] = c + 1  # a cluster of one token
    if shared:
        return ck[:, tk - tq :] if tq < tk else ck, ck
    cq = torch.randint(0, c + 3, (b, tq, h), generator=g)  # c + 2: no key is in it
    return cq, ck


def brute_force(cq: torch.Tensor, ck: torch.Tensor, causal: bool) -> torch.Tensor:
    """``bool [B*Tq*H, B*Tk*H]`` in token order: same row, head and cluster (and key position <= query's)."""
    b, tq, h = cq.shape
    tk = ck.shape[1]

    def coords(t: int, first: int) -> tuple[torch.Tensor, ...]:
        grid = torch.meshgrid(torch.arange(b), torch.arange(first, first + t), torch.arange(h), indexing="ij")
        return tuple(x.reshape(-1) for x in grid)

    bi, ti, hi = coords(tq, tk - tq)
    bj, tj, hj = coords(tk, 0)
    ok = (bi[:, None] == bj) & (hi[:, None] == hj) & (cq.reshape(-1)[:, None] == ck.reshape(-1)[None, :])
    return ok & (tj[None, :] <= ti[:, None]) if causal else ok


def pairs(idx: torch.Tensor, cnt: torch.Tensor, tile: torch.Tensor | None = None) -> dict:
    return {(r, int(idx[r, j])): (None if tile is None else int(tile[r, j])) for r in range(idx.shape[0]) for j in range(int(cnt[r]))}


CASES = [  # (B, Tq, Tk, H, C, shared clusters, causal, q_block, k_block)
    (2, 97, 97, 2, 5, True, True, 32, 16),
    (1, 200, 200, 3, 9, True, True, 128, 64),
    (1, 200, 200, 3, 9, True, True, 16, 16),
    (2, 97, 97, 2, 5, True, False, 32, 16),
    (2, 90, 90, 2, 4, False, True, 32, 16),
    (2, 90, 90, 2, 4, False, True, 128, 64),
    (1, 37, 150, 2, 6, False, True, 16, 16),  # queries after a cache of 113 keys
    (1, 37, 150, 2, 6, True, True, 32, 16),  # continuation with the keys' own ids: not one packing
    (2, 64, 64, 2, 3, False, False, 32, 16),
    (1, 5, 5, 1, 7, True, True, 128, 64),  # shorter than a tile
]


@pytest.mark.parametrize("static", [False, True], ids=["exact_sizes", "static_sizes"])
@pytest.mark.parametrize("b,tq,tk,h,c,shared,causal,q_block,k_block", CASES)
def test_block_lists_match_brute_force(b, tq, tk, h, c, shared, causal, q_block, k_block, static) -> None:
    """``static``: sizes from the shapes and ``num_clusters`` (ids reach ``c + 2``), padding query tiles
    and rows past the packed length; every check below holds on them too (they visit nothing)."""
    cq, ck = clusters(b, tq, tk, h, c, shared, seed=tq + tk + c)
    if shared and tq == tk:
        cq = ck  # one tensor: the shared packing
    lay = routed_layout(cq, ck, causal, q_block, k_block, num_clusters=c + 3 if static else None)
    p = lay.pattern
    if static:
        sizes = static_layout_sizes(b, tq, tk, h, c + 3, lay.shared, causal, q_block, k_block)
        assert (p.q_len, p.k_len) == (sizes.q_len, sizes.k_len)
        exact = routed_layout(cq, ck, causal, q_block, k_block).pattern
        # the real query tiles have the exact layout's lists; the padding ones are empty
        n = exact.num_q_blocks
        assert torch.equal(p.full_cnt[:n], exact.full_cnt) and torch.equal(p.part_cnt[:n], exact.part_cnt)
        assert not p.full_cnt[n:].any() and not p.part_cnt[n:].any()
        assert (p.full_idx.shape[1], p.part_idx.shape[1], p.t_full_idx.shape[1], p.t_part_idx.shape[1]) == (
            sizes.w_full, sizes.w_part, sizes.w_t_full, sizes.w_t_part)
        if not (lay.shared and causal):  # (shared and causal: the diagonal tiles, shared by every query tile)
            assert int(p.part_cnt.sum()) <= sizes.n_tiles <= p.tiles.shape[0]
    assert lay.shared == (cq is ck and tq == tk)
    assert p.q_len % q_block == 0 and p.k_len % k_block == 0 and p.k_len >= p.q_len
    assert lay.q_rows.unique().numel() == b * tq * h and lay.k_rows.unique().numel() == b * tk * h  # injective
    mask = p.dense_mask()
    # every real (query, key) pair: the rule, exactly
    assert torch.equal(mask[lay.q_rows][:, lay.k_rows], brute_force(cq, ck, causal))
    # real queries never see a padding key
    pad_key = torch.ones(p.k_len, dtype=torch.bool)
    pad_key[lay.k_rows] = False
    assert not mask[lay.q_rows][:, pad_key].any()
    # the lists encode the layout's interval rule on every packed row (padding rows included)
    qi, kj = torch.arange(p.q_len)[:, None], torch.arange(p.k_len)[None, :]
    assert torch.equal(p.predicate(qi, kj), mask)
    # transposed lists = forward lists transposed (tile ids included); partial tiles are partial
    full = pairs(p.full_idx, p.full_cnt)
    part = pairs(p.part_idx, p.part_cnt, p.part_tile)
    assert {(kb, qb): v for (qb, kb), v in full.items()} == pairs(p.t_full_idx, p.t_full_cnt)
    assert {(kb, qb): v for (qb, kb), v in part.items()} == pairs(p.t_part_idx, p.t_part_cnt, p.t_part_tile)
    assert not set(full) & set(part)
    for t in set(part.values()):
        assert p.tiles[t].bool().any() and not p.tiles[t].bool().all()
    # nothing visited outside the segments: every visited tile holds an allowed pair
    tiles_any = mask.view(p.num_q_blocks, q_block, p.num_k_blocks, k_block).any(3).any(1)
    visited = torch.zeros_like(tiles_any)
    for qb, kb in [*full, *part]:
        visited[qb, kb] = True
    assert torch.equal(visited, tiles_any)
    if shared and causal and tq == tk:
        assert p.tiles.shape[0] == q_block // k_block  # the diagonal tiles, shared by every query tile


@needs_interpreter
@pytest.mark.parametrize("num_clusters", [None, "c+3", 300], ids=["exact_sizes", "counting_sort", "torch_sort"])
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[6], CASES[4]], ids=["shared", "encoder", "cache", "separate"])
def test_triton_layout_equals_torch_layout(case, num_clusters) -> None:
    """The fused kernels of ``triton.py`` (the CUDA default) build exactly the torch builder's tensors:
    with exact sizes (read back) and with static ones (``num_clusters``: the counting sort, or above
    ``_COUNT_SORT_MAX_C`` clusters torch.sort; the mask tiles past the real ones are not compared)."""
    b, tq, tk, h, c, shared, causal, q_block, k_block = case
    cq, ck = clusters(b, tq, tk, h, c, shared, seed=tq + tk + c)
    if shared and tq == tk:
        cq = ck
    nc = c + 3 if num_clusters == "c+3" else num_clusters
    a = routed_layout(cq, ck, causal, q_block, k_block, impl="torch", num_clusters=nc)
    z = routed_layout(cq, ck, causal, q_block, k_block, impl="triton", num_clusters=nc)
    for name in ("full_idx", "full_cnt", "part_idx", "part_tile", "part_cnt", "t_full_idx", "t_full_cnt",
                 "t_part_idx", "t_part_tile", "t_part_cnt", "q_len", "k_len"):
        assert torch.equal(torch.as_tensor(getattr(a.pattern, name)), torch.as_tensor(getattr(z.pattern, name))), name
    n_tiles = a.pattern.tiles.shape[0] if (a.shared and causal) else int(a.pattern.part_cnt.sum())
    assert torch.equal(a.pattern.tiles[:n_tiles], z.pattern.tiles[:n_tiles])
    if nc is None:
        assert a.pattern.tiles.shape == z.pattern.tiles.shape
    for name in ("q_rows", "k_rows", "row_lo", "row_hi", "q_src", "k_src"):
        assert torch.equal(getattr(a, name), getattr(z, name)), name
    assert (z.k_rows is z.q_rows) == z.shared
    # the packing kernels' gather maps invert the token -> row maps; every other row is padding (-1)
    for rows, src in ((z.q_rows, z.q_src), (z.k_rows, z.k_src)):
        assert torch.equal(src[rows], torch.arange(rows.numel()))
        assert int((src >= 0).sum()) == rows.numel() and bool((src >= -1).all())


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_static_sizes_are_reached(impl: str) -> None:
    """The static bounds are tight: segments of 1 + 16 a tokens (a = 6, 0, 0, 0) pad to the most tiles the
    bound allows (4 + (100 - 4) // 16 = 10 per group), and one cluster holding every token of a group
    reaches the widest lists (head 1: 7 of its 10 tiles); the layout is still exact."""
    t, c, bm, bn = 100, 4, 16, 16
    ids = torch.tensor([0] * 97 + [1, 2, 3])[torch.randperm(t, generator=torch.Generator().manual_seed(0))]
    cl = torch.stack([ids, torch.zeros(t, dtype=torch.int64)], dim=-1)[None]  # [1, T, 2]: head 1 one cluster
    lay = routed_layout(cl, cl, True, bm, bn, impl=impl, num_clusters=c)
    sizes = static_layout_sizes(1, t, t, 2, c, True, True, bm, bn)
    assert lay.q_len == sizes.q_len == 2 * 10 * bm
    assert int((lay.row_lo < lay.k_len).sum()) == (10 + 7) * bm  # real rows (the tail's interval is [N_k, N_k))
    p = lay.pattern
    assert int(p.full_cnt.max()) == sizes.w_full and int(p.t_full_cnt.max()) == sizes.w_t_full
    assert torch.equal(p.dense_mask()[lay.q_rows][:, lay.k_rows], brute_force(cl, cl, True))


def test_layout_sizes_and_single_packing() -> None:
    """Shared clusters: one packing (queries are keys); segments padded to the query tile."""
    cq = torch.tensor([[[0], [1], [0], [2], [2], [1], [0]]])  # [1, 7, 1]: clusters of 3, 2, 2 tokens
    lay = routed_layout(cq, cq, True, 16, 16)
    assert lay.k_rows is lay.q_rows and lay.q_len == 3 * 16
    assert lay.q_rows.tolist() == [0, 16, 1, 32, 33, 17, 2]  # (cluster, position) order, each cluster at a tile start


class _LargestAllocation(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.nbytes, self.where = 0, ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.untyped_storage().nbytes() > self.nbytes:
                self.nbytes, self.where = o.untyped_storage().nbytes(), f"{func} -> {list(o.shape)} {o.dtype}"
        return out


@pytest.mark.parametrize("shared", [True, False])
def test_layout_allocates_nothing_quadratic(shared: bool) -> None:
    """L = 16384, 4 heads, 32 clusters: the largest tensor is O(L H) (an L x L bool would be 256 MiB)."""
    L, h = 16384, 4
    g = torch.Generator().manual_seed(0)
    ck = torch.randint(0, 32, (1, L, h), generator=g)
    cq = ck if shared else torch.randint(0, 32, (1, L, h), generator=g)
    big = _LargestAllocation()
    with big:
        lay = routed_layout(cq, ck, True)
    tiles = lay.pattern.tiles.numel()
    assert big.nbytes <= max(64 * L * h, 2 * tiles), f"largest allocation {big.nbytes / 2**20:.1f} MiB: {big.where}"


# ----------------------------------------------------------------------------------- kernel
KERNEL_CASES = [  # (B, Tq, Tk, H, C, shared clusters and Q/K, causal, q_block, k_block); the interpreter is slow
    (1, 256, 256, 2, 9, True, True, 32, 16),  # the causal-LM case: two diagonal tiles per query tile
    (1, 64, 256, 2, 7, False, True, 32, 32),  # separate clusters, queries after a cache
    (1, 128, 128, 2, 5, False, True, 32, 32),
    (1, 128, 128, 2, 5, True, False, 32, 32),
]


@needs_interpreter
@pytest.mark.parametrize("b,tq,tk,h,c,shared,causal,q_block,k_block", KERNEL_CASES)
def test_kernel_matches_reference(b, tq, tk, h, c, shared, causal, q_block, k_block) -> None:
    d = 16
    cq, ck = clusters(b, tq, tk, h, c, shared and tq == tk, seed=tq + c)
    if shared:
        cq = ck
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, tq, h, d, generator=g, dtype=torch.float64)
    k = q if shared else torch.randn(b, tk, h, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, tk, h, d, generator=g, dtype=torch.float64)
    w = torch.randn(b, tq, h, d, generator=g, dtype=torch.float64)
    leaves = [q, v] if shared else [q, k, v]

    def run(fn, dtype):
        xs = [t.to(dtype).requires_grad_() for t in leaves]
        qq, vv = xs[0], xs[-1]
        kk = qq if shared else xs[1]
        y = fn(qq, kk, vv)
        return y, torch.autograd.grad((y * w.to(dtype)).sum(), xs)

    y_ref, g_ref = run(lambda q, k, v: causal_exact_attention(q, k, v, cq, ck, causal, backend="reference"), torch.float64)
    y, g_got = run(lambda q, k, v: causal_exact_attention_block_sparse(q, k, v, cq, ck, causal, q_block=q_block, k_block=k_block), torch.float32)
    assert torch.isfinite(y).all()
    assert rel(y, y_ref) <= 1e-5
    for name, a, r in zip("qv" if shared else "qkv", g_got, g_ref):
        assert torch.isfinite(a).all() and rel(a, r) <= 1e-5, f"d{name}"
    if not shared:  # queries of a cluster no key is in output exactly 0
        none = cq == c + 2
        assert none.any() and (y[none] == 0).all()


@needs_interpreter
def test_public_op_and_mixer_stream_through_the_kernel() -> None:
    """backend="block_sparse" (default 128 x 64 tiles) in the op and in the mixer, whose continuations
    (queries after a cache) take the same path; both equal the reference."""
    torch.manual_seed(0)
    kw = dict(dim=64, num_heads=4, num_clusters=5, local_heads=1, local_window=16)
    m = get_mixer("routing", backend="block_sparse", **kw)
    ref = get_mixer("routing", backend="reference", **kw)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(1, 100, 64)
    y, _ = m(x)
    assert rel(y, ref(x)[0]) <= 1e-5
    state, outs = None, []
    for piece in torch.split(x, [70, 1, 29], dim=1):
        o, state = m(piece, state)
        outs.append(o)
    assert rel(torch.cat(outs, 1), y) <= 1e-5


def test_dispatch_and_argument_checks(monkeypatch) -> None:
    import mnemotorch.ops.routing as routing_ops

    q = torch.randn(1, 200, 2, 16)
    c = torch.randint(0, 3, (1, 200, 2))
    calls = []
    monkeypatch.setattr(routing_ops, "causal_exact_attention_block_sparse", lambda *a, **k: calls.append(1) or a[0])
    causal_exact_attention(q, q, q, c, c)  # "auto" on the CPU: masked SDPA
    assert not calls
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="block_sparse"):
        causal_exact_attention(q, q, q, c, c, backend="block_sparse")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    causal_exact_attention(q, q, q, c, c, backend="block_sparse")
    assert calls == [1]
    with pytest.raises(ValueError, match="head dim"):
        causal_exact_attention(q[..., :8], q[..., :8], q[..., :8], c, c, backend="block_sparse")
    with pytest.raises(ValueError, match="backend"):
        causal_exact_attention(q, q, q, c, c, backend="kernel")
    with pytest.raises(ValueError, match="backend"):
        get_mixer("routing", dim=32, num_heads=2, backend="kernel")
    with pytest.raises(ValueError, match="multiple"):
        routed_layout(c, c, True, 48, 32)
    with pytest.raises(ValueError, match="impl"):
        routed_layout(c, c, True, impl="cuda")


def test_layout_is_deterministic_across_calls() -> None:
    cq, ck = clusters(2, 50, 80, 2, 4, False, seed=3)
    a, b = routed_layout(cq, ck, True, 16, 16), routed_layout(cq, ck, True, 16, 16)
    for name in ("full_idx", "part_idx", "part_tile", "t_full_idx", "t_part_idx", "t_part_tile", "tiles"):
        assert torch.equal(getattr(a.pattern, name), getattr(b.pattern, name)), name
    assert torch.equal(a.q_rows, b.q_rows) and torch.equal(a.k_rows, b.k_rows)

