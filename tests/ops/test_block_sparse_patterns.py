"""Pattern builders of the block-sparse kernel: exact element rules, block classification, tightness.

Every builder is checked against a brute-force rule written here independently, as a direct
transcription of ``shared/specs/sparse-attention.md`` over all (query, key) pairs (explicit
loops, explicit member lists; never the builders' own predicates). A few kernel runs through the
Triton interpreter compare outputs and gradients with the float64 reference.
"""

from __future__ import annotations

import os

# The kernels (and triton.language's own @jit helpers) are decorated at import time: the
# interpreter must be on before triton is first imported. If another test module imported triton
# first (importing mnemotorch pulls it in through transformers/torch), the kernel tests below
# re-run themselves in a fresh interpreter process instead (see ``kernel_subprocess``).
_SET_INTERPRET = "TRITON_INTERPRET" not in os.environ
os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from mnemotorch.ops.block_sparse import (  # noqa: E402
    block_sparse_attention,
    block_sparse_attention_reference,
    document_pattern,
    halo_pattern,
    neighborhood_pattern,
    neighborhood_pattern_1d,
    neighborhood_pattern_2d,
    neighborhood_pattern_3d,
    neighborhood_predicate,
    power_pattern,
    predicate_pattern,
    prefix_lm_pattern,
    sink_window_pattern,
    tile_permutation,
)
from mnemotorch.ops.block_sparse import patterns_misc, patterns_natten  # noqa: E402

try:  # noqa: E402
    import triton  # noqa: F401
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    import mnemotorch.ops.block_sparse.triton as bs_triton

    HAVE_TRITON = True
    # Live only if both our kernels and triton's own @jit helpers were decorated for the interpreter.
    INTERPRETED = isinstance(bs_triton._fwd_kernel, InterpretedFunction) and isinstance(tl.zeros, InterpretedFunction)
except ImportError:  # pragma: no cover
    HAVE_TRITON = INTERPRETED = False
finally:
    # Only this module's kernel tests need the interpreter; don't route other tests' backend="auto" to it.
    if _SET_INTERPRET:
        os.environ.pop("TRITON_INTERPRET", None)


# ============================================================================================
# brute-force rules (the spec, transcribed)


def bf_na_axis(L: int, k: int, d: int, s: int, causal: bool) -> list[list[bool]]:
    """``allowed[i][j]`` along one axis, built from explicit dilation-group member lists."""
    allowed = [[False] * L for _ in range(L)]
    for g in range(d):
        members = list(range(g, L, d))  # the group, in order; its own length
        n = len(members)
        for t, i in enumerate(members):
            if causal:
                leader = min((t // s) * s + s - 1, n - 1)  # last query of the stride group
                keys = [members[u] for u in range(n) if u <= t and leader - u < k]
            else:
                leader = min((t // s) * s + s // 2, n - 1)  # centre query of the stride group
                # the window of k keys around the leader, slid inward to stay inside the group
                start = min(max(leader - k // 2, 0), n - k)
                keys = members[start : start + k]
            for j in keys:
                allowed[i][j] = True
    return allowed


def bf_na(shape, ks, ds, ss, cs) -> torch.Tensor:
    """AND of the per-axis rules over a row-major grid -> ``bool [N, N]``."""
    axes = [bf_na_axis(*args) for args in zip(shape, ks, ds, ss, cs)]
    coords = list(itertools.product(*[range(n) for n in shape]))  # row-major
    n = len(coords)
    out = torch.zeros(n, n, dtype=torch.bool)
    for a, ca in enumerate(coords):
        for b, cb in enumerate(coords):
            out[a, b] = all(ax[x][y] for ax, x, y in zip(axes, ca, cb))
    return out


def bf_tile_order(shape, tile) -> list[int]:
    """Row-major indices of the tokens, listed tile by tile (tiles row-major, tokens row-major)."""
    grid = [range(0, n, t) for n, t in zip(shape, tile)]
    order = []
    for origin in itertools.product(*grid):
        ranges = [range(o, min(o + t, n)) for o, t, n in zip(origin, tile, shape)]
        for c in itertools.product(*ranges):
            order.append(sum(x * math.prod(shape[a + 1 :]) for a, x in enumerate(c)))
    return order


def permuted(mask: torch.Tensor, perm: list[int]) -> torch.Tensor:
    p = torch.tensor(perm)
    return mask[p][:, p]


def bf_power(L, B, W, sink) -> torch.Tensor:
    out = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(i + 1):
            blk = i // B - j // B
            out[i, j] = blk < W or (blk & (blk - 1)) == 0 or j < sink * B
    return out


def bf_halo(H, W, b, h) -> torch.Tensor:
    out = torch.zeros(H * W, H * W, dtype=torch.bool)
    for r, c in itertools.product(range(H), range(W)):
        top, left = (r // b) * b - h, (c // b) * b - h  # the (b + 2h)^2 window, padded keys dropped
        for r2, c2 in itertools.product(range(H), range(W)):
            out[r * W + c, r2 * W + c2] = top <= r2 < top + b + 2 * h and left <= c2 < left + b + 2 * h
    return out


def bf_document(ids, causal) -> torch.Tensor:
    L = len(ids)
    return torch.tensor([[ids[i] == ids[j] and (j <= i or not causal) for j in range(L)] for i in range(L)])


def bf_sink_window(q_len, k_len, W, n_sink) -> torch.Tensor:
    out = torch.zeros(q_len, k_len, dtype=torch.bool)
    for i in range(q_len):
        p = k_len - q_len + i
        for j in range(p + 1):
            out[i, j] = p - W < j or j < n_sink
    return out


# ============================================================================================
# structure checks


def check_structure(pat, expected: torch.Tensor) -> None:
    """dense mask == expected; full tiles all allowed; partial tiles == expected sub-tile, non-empty
    and not full; every allowed pair inside a listed tile; transposed lists == forward lists."""
    assert torch.equal(pat.dense_mask(), expected), "dense mask differs from the brute-force rule"
    lq, lk, QB, KB = pat.q_len, pat.k_len, pat.q_block, pat.k_block
    nq, nk = -(-lq // QB), -(-lk // KB)
    assert pat.num_q_blocks == nq and pat.num_k_blocks == nk
    exp = torch.zeros(nq * QB, nk * KB, dtype=torch.bool)
    exp[:lq, :lk] = expected
    valid = torch.zeros_like(exp)
    valid[:lq, :lk] = True
    covered = torch.zeros_like(exp)
    fwd, bwd = set(), set()

    def tile(m, qb, kb):
        return m[qb * QB : (qb + 1) * QB, kb * KB : (kb + 1) * KB]

    for qb in range(nq):
        fc, pc = int(pat.full_cnt[qb]), int(pat.part_cnt[qb])
        full, part = pat.full_idx[qb, :fc].tolist(), pat.part_idx[qb, :pc].tolist()
        tiles = pat.part_tile[qb, :pc].tolist()
        assert (pat.full_idx[qb, fc:] == -1).all() and (pat.part_idx[qb, pc:] == -1).all()
        assert len(set(full) | set(part)) == fc + pc, "a key block is listed twice"
        for kb in full:
            assert tile(valid, qb, kb).all(), "a full block reaches past the end of the sequence"
            assert tile(exp, qb, kb).all(), "a full block holds a forbidden pair"
            tile(covered, qb, kb)[:] = True
            fwd.add((qb, kb, -1))
        for kb, t in zip(part, tiles):
            m = pat.tiles[t].cpu()
            assert torch.equal(m, tile(exp, qb, kb)), "a partial tile's mask is wrong"
            assert m.any(), "an empty block is listed"
            assert not (tile(valid, qb, kb).all() and m.all()), "a full block is listed as partial"
            tile(covered, qb, kb)[:] = True
            fwd.add((qb, kb, t))
    assert not (exp & ~covered).any(), "an allowed pair lies outside every listed block"
    for kb in range(nk):
        fc, pc = int(pat.t_full_cnt[kb]), int(pat.t_part_cnt[kb])
        assert (pat.t_full_idx[kb, fc:] == -1).all() and (pat.t_part_idx[kb, pc:] == -1).all()
        for qb in pat.t_full_idx[kb, :fc].tolist():
            bwd.add((qb, kb, -1))
        for qb, t in zip(pat.t_part_idx[kb, :pc].tolist(), pat.t_part_tile[kb, :pc].tolist()):
            bwd.add((qb, kb, t))
    n_fwd = int(pat.full_cnt.sum() + pat.part_cnt.sum())
    assert len(bwd) == int(pat.t_full_cnt.sum() + pat.t_part_cnt.sum()) == n_fwd
    assert fwd == bwd, "transposed lists disagree with the forward lists"


class CandidateSpy:
    """Records the candidate key blocks each builder hands to build_pattern."""

    def __init__(self, monkeypatch):
        self.calls: list[list[list[int]]] = []
        real = patterns_natten.build_pattern

        def spy(predicate, q_len, k_len, q_block=128, k_block=64, candidates=None, device=None):
            nq, nk = -(-q_len // q_block), -(-k_len // k_block)
            cands = [sorted(set(int(c) for c in candidates(qb))) for qb in range(nq)]
            assert all(0 <= c < nk for cs in cands for c in cs), "candidate key block out of range"
            self.calls.append(cands)
            return real(predicate, q_len, k_len, q_block, k_block, candidates, device)

        monkeypatch.setattr(patterns_natten, "build_pattern", spy)
        monkeypatch.setattr(patterns_misc, "build_pattern", spy)

    def assert_tight(self, pat) -> None:
        """The candidates are exactly the non-empty key blocks (so building costs O(nnz))."""
        cands = self.calls[-1]
        for qb, cs in enumerate(cands):
            listed = set(pat.full_idx[qb, : int(pat.full_cnt[qb])].tolist()) | set(pat.part_idx[qb, : int(pat.part_cnt[qb])].tolist())
            assert set(cs) == listed, f"query block {qb}: candidates {cs} vs non-empty blocks {sorted(listed)}"


# ============================================================================================
# neighborhood attention, 1-D


def na1d_configs(lengths):
    for L in lengths:
        for k in range(1, L + 1):
            for d in range(1, L // k + 1):
                for s in sorted({1, 2, max(1, k // 2), k}):
                    if s <= k:
                        for causal in (False, True):
                            yield L, k, d, s, causal


def test_na1d_exhaustive_small() -> None:
    """Every legal (kernel, dilation, stride, causal) at lengths with unequal dilation groups."""
    n = 0
    for L, k, d, s, causal in na1d_configs([1, 2, 3, 5, 7, 10, 13]):
        pat = neighborhood_pattern_1d(L, k, d, s, causal, q_block=4, k_block=3)
        expected = bf_na((L,), (k,), (d,), (s,), (causal,))
        check_structure(pat, expected)
        if not causal:  # every query sees exactly k keys, borders, dilation and stride included
            assert (expected.sum(1) == k).all()
        n += 1
    assert n > 300


@pytest.mark.parametrize("L,k,d,s,causal,qb,kb", [
    (37, 9, 1, 1, False, 8, 8), (37, 8, 1, 1, False, 16, 4), (64, 64, 1, 1, False, 16, 16),
    (50, 7, 3, 1, False, 8, 16), (50, 7, 3, 4, False, 8, 8), (45, 6, 2, 6, False, 4, 8),
    (41, 10, 4, 3, True, 8, 8), (33, 5, 1, 5, True, 16, 16), (70, 12, 5, 7, False, 16, 8),
])
def test_na1d_larger_and_tight(L, k, d, s, causal, qb, kb, monkeypatch) -> None:
    spy = CandidateSpy(monkeypatch)
    pat = neighborhood_pattern_1d(L, k, d, s, causal, q_block=qb, k_block=kb)
    check_structure(pat, bf_na((L,), (k,), (d,), (s,), (causal,)))
    spy.assert_tight(pat)


def test_na1d_every_query_sees_k_keys_plain() -> None:
    for L in range(1, 30):
        for k in range(1, L + 1):
            m = neighborhood_pattern_1d(L, k, q_block=8, k_block=8).dense_mask()
            assert (m.sum(1) == k).all()
            # keys form one contiguous run containing the query
            for i in range(L):
                js = m[i].nonzero().flatten()
                assert js[-1] - js[0] == k - 1 and js[0] <= i <= js[-1]


def test_na1d_special_cases() -> None:
    L = 24
    assert neighborhood_pattern_1d(L, L, q_block=8, k_block=8).dense_mask().all()  # k = L: full
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    assert torch.equal(neighborhood_pattern_1d(L, L, causal=True, q_block=8, k_block=8).dense_mask(), causal)
    # s = k: blocked (Swin-like) attention when k divides L
    blocked = torch.tensor([[i // 6 == j // 6 for j in range(L)] for i in range(L)])
    assert torch.equal(neighborhood_pattern_1d(L, 6, stride=6, q_block=8, k_block=8).dense_mask(), blocked)
    # causal k: the plain causal sliding window
    window = torch.tensor([[i - 5 < j <= i for j in range(L)] for i in range(L)])
    assert torch.equal(neighborhood_pattern_1d(L, 5, causal=True, q_block=8, k_block=8).dense_mask(), window)


def test_na1d_stride_tail_and_causal_leader_values() -> None:
    """Hand-worked windows at a short tail stride group (NATTEN: leader clamped to L_g - 1)."""
    m = neighborhood_pattern_1d(10, 4, stride=4, q_block=4, k_block=4).dense_mask()
    # stride groups {0..3}, {4..7}, {8, 9}; leaders 2, 6, min(10, 9) = 9 -> centre clamp(9, 2, 8) = 8
    assert m[0].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert m[5].nonzero().flatten().tolist() == [4, 5, 6, 7]
    assert m[8].nonzero().flatten().tolist() == [6, 7, 8, 9] == m[9].nonzero().flatten().tolist()
    c = neighborhood_pattern_1d(10, 4, stride=4, causal=True, q_block=4, k_block=4).dense_mask()
    # causal leaders 3, 7, min(11, 9) = 9: window ends at the query, starts at leader - k + 1
    assert c[4].nonzero().flatten().tolist() == [4]
    assert c[6].nonzero().flatten().tolist() == [4, 5, 6]
    assert c[8].nonzero().flatten().tolist() == [6, 7, 8]
    assert c[9].nonzero().flatten().tolist() == [6, 7, 8, 9]
    # even stride: the right-hand centre query leads; L = 9, k = 5, s = 2: group {4, 5} -> leader 5
    e = neighborhood_pattern_1d(9, 5, stride=2, q_block=4, k_block=4).dense_mask()
    assert e[4].nonzero().flatten().tolist() == [3, 4, 5, 6, 7] == e[5].nonzero().flatten().tolist()
    # dilation with unequal groups: L = 10, d = 3 -> groups {0,3,6,9}, {1,4,7}, {2,5,8}; k = 3
    g = neighborhood_pattern_1d(10, 3, dilation=3, q_block=4, k_block=4).dense_mask()
    assert g[9].nonzero().flatten().tolist() == [3, 6, 9]
    assert g[1].nonzero().flatten().tolist() == [1, 4, 7] == g[7].nonzero().flatten().tolist()


# ============================================================================================
# neighborhood attention, 2-D and 3-D


def random_na_configs(rng: random.Random, shape_choices, n: int):
    out = []
    while len(out) < n:
        shape = rng.choice(shape_choices)
        ks, ds, ss, cs = [], [], [], []
        for L in shape:
            k = rng.randint(1, L)
            d = rng.randint(1, L // k)
            s = rng.randint(1, k)
            ks.append(k), ds.append(d), ss.append(s), cs.append(rng.random() < 0.3)
        out.append((shape, tuple(ks), tuple(ds), tuple(ss), tuple(cs)))
    return out


def test_na2d_exhaustive_random_params() -> None:
    rng = random.Random(0)
    shapes = [(5, 7), (6, 4), (8, 8), (3, 9), (7, 6)]
    tiles = [None, (2, 2), (2, 3), (4, 4), (3, 2)]
    for i, (shape, ks, ds, ss, cs) in enumerate(random_na_configs(rng, shapes, 60)):
        tile = tiles[i % len(tiles)]
        qb, kb = (8, 8) if tile is None else (math.prod(tile), math.prod(tile))
        pat, perm, inv = neighborhood_pattern_2d(shape, ks, ds, ss, cs, tile_shape=tile, q_block=qb, k_block=kb)
        order = list(range(math.prod(shape))) if tile is None else bf_tile_order(shape, tile)
        assert perm.tolist() == order
        assert torch.equal(inv[perm], torch.arange(len(order)))
        expected = bf_na(shape, ks, ds, ss, cs)
        check_structure(pat, permuted(expected, order))
        noncausal = [not c for c in cs]
        if all(noncausal):
            assert (expected.sum(1) == math.prod(ks)).all()


def test_na3d_exhaustive_random_params() -> None:
    rng = random.Random(1)
    shapes = [(3, 4, 5), (4, 4, 4), (2, 5, 3)]
    tiles = [None, (1, 2, 2), (2, 2, 2), (3, 2, 1)]
    for i, (shape, ks, ds, ss, cs) in enumerate(random_na_configs(rng, shapes, 16)):
        tile = tiles[i % len(tiles)]
        pat, perm, _ = neighborhood_pattern_3d(shape, ks, ds, ss, cs, tile_shape=tile, q_block=8, k_block=4)
        order = list(range(math.prod(shape))) if tile is None else bf_tile_order(shape, tile)
        assert perm.tolist() == order
        check_structure(pat, permuted(bf_na(shape, ks, ds, ss, cs), order))


@pytest.mark.parametrize("shape,ks,ds,ss,cs,tile", [
    ((8, 16), (5, 7), (1, 2), (1, 3), (False, False), (4, 8)),
    ((12, 12), (3, 5), (2, 1), (3, 1), (True, False), (4, 4)),
    ((4, 8, 8), (3, 3, 5), (1, 2, 1), (1, 1, 2), (True, False, False), (2, 4, 4)),
])
def test_tiled_candidates_are_tight(shape, ks, ds, ss, cs, tile, monkeypatch) -> None:
    """With tile-aligned blocks the candidate lists are exactly the non-empty key blocks."""
    spy = CandidateSpy(monkeypatch)
    pat, perm, _ = neighborhood_pattern(shape, ks, ds, ss, cs, tile_shape=tile)
    spy.assert_tight(pat)
    check_structure(pat, permuted(bf_na(shape, ks, ds, ss, cs), perm.tolist()))


def test_tiling_reduces_visited_blocks() -> None:
    """The point of the token permutation: fewer, fuller blocks than row-major order."""
    kw = dict(shape=(24, 128), kernel_size=(13, 13))
    rowmajor = neighborhood_pattern(**kw, q_block=128, k_block=128).pattern
    tiled = neighborhood_pattern(**kw, tile_shape=(8, 16)).pattern
    assert tiled.allowed_pairs() == rowmajor.allowed_pairs()
    assert tiled.computed_pairs() < 0.75 * rowmajor.computed_pairs()


def test_tile_permutation_roundtrip_and_nondivisible() -> None:
    perm, inv = tile_permutation((5, 7), (2, 3))
    assert perm.tolist() == bf_tile_order((5, 7), (2, 3))
    assert torch.equal(perm[inv], torch.arange(35)) and torch.equal(inv[perm], torch.arange(35))
    x = torch.randn(2, 35, 3, 4)
    pp = neighborhood_pattern_2d((5, 7), 3, tile_shape=(2, 3), q_block=6, k_block=6)
    assert torch.equal(pp.unpermute(pp.permute(x)), x)


def test_neighborhood_predicate_matches_pattern() -> None:
    pred = neighborhood_predicate((5, 6), (3, 4), (1, 1), (1, 2), (False, True))
    i = torch.arange(30)
    assert torch.equal(pred(i[:, None], i[None, :]), bf_na((5, 6), (3, 4), (1, 1), (1, 2), (False, True)))


@pytest.mark.parametrize("call,match", [
    (lambda: neighborhood_pattern_1d(8, 9), "kernel_size"),
    (lambda: neighborhood_pattern_1d(8, 3, dilation=3), "dilation"),
    (lambda: neighborhood_pattern_1d(8, 3, stride=4), "stride"),
    (lambda: neighborhood_pattern_1d(8, 0), "kernel_size"),
    (lambda: neighborhood_pattern_1d(8, 3, dilation=0), "dilation"),
    (lambda: neighborhood_pattern_1d(8, 3, stride=0), "stride"),
    (lambda: neighborhood_pattern_1d(0, 1), "length"),
    (lambda: neighborhood_pattern_2d((8, 6), (3, 7)), r"kernel_size\[1\]"),
    (lambda: neighborhood_pattern_2d((8, 6), 3, dilation=(1, 3)), r"dilation\[1\]"),
    (lambda: neighborhood_pattern_2d((8, 6), (3, 2), stride=(2, 3)), r"stride\[1\]"),
    (lambda: neighborhood_pattern_2d((8, 6), (3, 3, 3)), "kernel_size"),
    (lambda: neighborhood_pattern_3d((8, 6), 3), "shape"),
    (lambda: neighborhood_pattern_2d((8, 6), 3, causal=(True, 1)), "causal"),
    (lambda: neighborhood_pattern_2d((8, 6), 3, tile_shape=(2, 0)), "tile_shape"),
])
def test_na_bad_arguments_are_named(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# ============================================================================================
# PowerAttention, HaloNet, documents, sinks, prefix-LM, predicate


@pytest.mark.parametrize("L,B,W,sink,qb,kb", [
    (40, 1, 1, 0, 8, 8), (40, 1, 2, 1, 4, 8), (77, 4, 2, 1, 8, 8), (100, 8, 5, 1, 16, 4),
    (64, 16, 1, 0, 8, 8), (90, 3, 3, 2, 16, 16), (129, 8, 5, 1, 32, 16), (33, 5, 1, 3, 4, 4),
])
def test_power_pattern(L, B, W, sink, qb, kb, monkeypatch) -> None:
    spy = CandidateSpy(monkeypatch)
    pat = power_pattern(L, B, W, sink, q_block=qb, k_block=kb)
    check_structure(pat, bf_power(L, B, W, sink))
    spy.assert_tight(pat)


def test_power_pattern_paper_setting_distances() -> None:
    """B = 256, 5-block window, 1 sink: query block 40 sees blocks 36..40, 40-{8,16,32}, and 0."""
    B = 256
    pat = power_pattern(41 * B, q_block=B, k_block=B)
    qb = 40
    seen = set(pat.full_idx[qb, : int(pat.full_cnt[qb])].tolist()) | set(pat.part_idx[qb, : int(pat.part_cnt[qb])].tolist())
    assert seen == {36, 37, 38, 39, 40, 32, 24, 8, 0}


@pytest.mark.parametrize("H,W,b,h,permute,qb,kb", [
    (8, 8, 2, 1, True, 4, 4), (8, 12, 4, 1, True, None, None), (12, 8, 4, 2, False, 16, 8),
    (6, 9, 3, 1, True, 9, 9), (16, 16, 8, 3, True, None, None), (10, 10, 5, 0, False, 8, 8),
])
def test_halo_pattern(H, W, b, h, permute, qb, kb, monkeypatch) -> None:
    spy = CandidateSpy(monkeypatch)
    pat, perm, inv = halo_pattern(H, W, b, h, permute=permute, q_block=qb, k_block=kb)
    order = bf_tile_order((H, W), (b, b)) if permute else list(range(H * W))
    assert perm.tolist() == order
    expected = bf_halo(H, W, b, h)
    check_structure(pat, permuted(expected, order))
    if permute and pat.q_block == b * b:
        spy.assert_tight(pat)
    # block (1, 1) sees its (b + 2h)^2 window, cut at the image border
    if H >= 2 * b and W >= 2 * b:
        rows = min(H, 2 * b + h) - max(0, b - h)
        cols = min(W, 2 * b + h) - max(0, b - h)
        assert int(expected[b * W + b].sum()) == rows * cols


def test_halo_bad_arguments() -> None:
    with pytest.raises(ValueError, match="block_size"):
        halo_pattern(10, 8, 4, 1)
    with pytest.raises(ValueError, match="halo"):
        halo_pattern(8, 8, 4, -1)


@pytest.mark.parametrize("lengths", [[10, 25, 1, 34], [7], [1, 1, 1, 1, 5], [33, 31]])
@pytest.mark.parametrize("causal", [True, False])
def test_document_pattern(lengths, causal, monkeypatch) -> None:
    ids = [d for d, n in enumerate(lengths) for _ in range(n)]
    spy = CandidateSpy(monkeypatch)
    pat = document_pattern(torch.tensor(ids) * 7 - 3, causal=causal, q_block=8, k_block=4)  # any ints
    check_structure(pat, bf_document(ids, causal))
    spy.assert_tight(pat)


def test_document_pattern_noncontiguous_ids() -> None:
    ids = [0, 0, 1, 1, 0, 2, 1, 0, 2, 2, 2, 0, 1]
    for causal in (True, False):
        check_structure(document_pattern(torch.tensor(ids), causal=causal, q_block=4, k_block=2), bf_document(ids, causal))
    with pytest.raises(ValueError, match="doc_ids"):
        document_pattern(torch.zeros(3, 2, dtype=torch.long))


@pytest.mark.parametrize("q_len,k_len,W,n_sink,qb,kb", [
    (40, 40, 5, 2, 8, 8), (40, 40, 1, 0, 8, 4), (37, 37, 9, 11, 4, 8), (10, 50, 7, 3, 4, 4),
    (64, 64, 16, 4, 16, 16), (30, 30, 40, 1, 8, 8), (1, 20, 3, 2, 16, 16),
])
def test_sink_window_pattern(q_len, k_len, W, n_sink, qb, kb, monkeypatch) -> None:
    spy = CandidateSpy(monkeypatch)
    pat = sink_window_pattern(q_len, W, n_sink, k_len=k_len, q_block=qb, k_block=kb)
    check_structure(pat, bf_sink_window(q_len, k_len, W, n_sink))
    spy.assert_tight(pat)


@pytest.mark.parametrize("L,pre", [(30, 0), (30, 7), (30, 30), (45, 20)])
def test_prefix_lm_pattern(L, pre) -> None:
    expected = torch.tensor([[j <= i or j < pre for j in range(L)] for i in range(L)])
    check_structure(prefix_lm_pattern(L, pre, q_block=8, k_block=4), expected)


def test_predicate_pattern_with_and_without_candidates() -> None:
    def stripes(qi, kj):  # every third key, plus the diagonal
        return (kj % 3 == 0) | (kj == qi)

    expected = torch.tensor([[j % 3 == 0 or j == i for j in range(26)] for i in range(21)])
    check_structure(predicate_pattern(stripes, 21, 26, q_block=8, k_block=4), expected)
    check_structure(predicate_pattern(stripes, 21, 26, candidates=lambda qb: range(7), q_block=8, k_block=4), expected)
    with pytest.raises(ValueError, match="predicate"):
        predicate_pattern("not callable", 4)


def test_misc_bad_arguments_are_named() -> None:
    for call, match in [
        (lambda: power_pattern(0), "length"),
        (lambda: power_pattern(64, block_size=0), "block_size"),
        (lambda: power_pattern(64, window_blocks=0), "window_blocks"),
        (lambda: power_pattern(64, sink_blocks=-1), "sink_blocks"),
        (lambda: sink_window_pattern(8, 0, 1), "window"),
        (lambda: sink_window_pattern(8, 2, -1), "n_sink"),
        (lambda: sink_window_pattern(8, 2, 1, k_len=4), "k_len"),
        (lambda: prefix_lm_pattern(8, -1), "prefix_len"),
        (lambda: document_pattern(torch.tensor([0.5, 1.0])), "doc_ids"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()


# ============================================================================================
# kernel runs through the Triton interpreter (fp32) vs the float64 reference


def rel(a, b) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def run_kernel_vs_reference(pat, L: int, perm=None, inv=None, h=2, hkv=1, d=16, seed=0) -> None:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, L, n, d, generator=g) for n in (h, hkv, hkv))
    do = torch.randn(1, L, h, d, generator=g)
    if perm is not None:  # row-major tensors in, row-major out: permute -> kernel -> un-permute
        q, k, v = q[:, perm], k[:, perm], v[:, perm]
    ins32 = [t.clone().requires_grad_() for t in (q, k, v)]
    ins64 = [t.double().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*ins32, pat, backend="triton")
    ref = block_sparse_attention_reference(*ins64, pat)
    if inv is not None:
        out, ref, do = out[:, inv], ref[:, inv], do[:, inv]
    assert torch.isfinite(out).all()
    assert rel(out, ref) <= 1e-5
    grads = torch.autograd.grad(out, ins32, do)
    grads_ref = torch.autograd.grad(ref, ins64, do.double())
    for name, a, b in zip("qkv", grads, grads_ref):
        assert torch.isfinite(a).all(), f"d{name} not finite"
        assert rel(a, b) <= 1e-5, f"d{name}: {rel(a, b):.2e}"


needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
_IN_SUBPROCESS = os.environ.get("MNEMO_PATTERN_KERNEL_SUBPROCESS") == "1"


@pytest.fixture(scope="module")
def kernel_subprocess():
    """Run this module's kernel tests once in a fresh process with the interpreter on from the start;
    returns ``{test name: (passed, report)}``."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TRITON_INTERPRET="1", MNEMO_PATTERN_KERNEL_SUBPROCESS="1")
    cmd = [sys.executable, "-m", "pytest", __file__, "-k", "test_kernel_", "-q", "-rA", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=600)
    status = {}
    for m in re.finditer(r"^(PASSED|FAILED|ERROR) \S*::(test_kernel_\S+)", proc.stdout, re.M):
        status[m.group(2)] = m.group(1) == "PASSED"
    return status, proc.stdout[-6000:] + proc.stderr[-2000:]


@pytest.fixture
def interpreter(request, monkeypatch):
    """In-process when the kernels are interpreted here; otherwise delegate to ``kernel_subprocess``."""
    if INTERPRETED or _IN_SUBPROCESS:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        return True
    status, report = request.getfixturevalue("kernel_subprocess")
    name = request.node.name
    assert status.get(name), f"{name} failed in the interpreter subprocess:\n{report}"
    return False


@needs_triton
@pytest.mark.parametrize("k,d,s,causal", [(40, 1, 3, False), (9, 2, 4, True)])
def test_kernel_na1d(k, d, s, causal, interpreter) -> None:
    if interpreter:
        L = 75
        run_kernel_vs_reference(neighborhood_pattern_1d(L, k, d, s, causal, q_block=16, k_block=16), L)


@needs_triton
def test_kernel_na2d_tiled(interpreter) -> None:
    if interpreter:
        pat, perm, inv = neighborhood_pattern_2d((8, 12), (7, 9), stride=(2, 1), tile_shape=(4, 4))
        assert pat.q_block == pat.k_block == 16 and int(pat.full_cnt.sum()) > 0
        run_kernel_vs_reference(pat, 96, perm, inv)


@needs_triton
def test_kernel_power(interpreter) -> None:
    if interpreter:
        run_kernel_vs_reference(power_pattern(90, block_size=8, window_blocks=2, sink_blocks=1, q_block=16, k_block=16), 90)


@needs_triton
def test_kernel_document(interpreter) -> None:
    if interpreter:
        ids = torch.tensor([d for d, n in enumerate([10, 40, 1, 45]) for _ in range(n)])
        pat = document_pattern(ids, causal=True, q_block=16, k_block=16)
        assert int(pat.full_cnt.sum()) > 0 and int(pat.part_cnt.sum()) > 0
        run_kernel_vs_reference(pat, 96)
