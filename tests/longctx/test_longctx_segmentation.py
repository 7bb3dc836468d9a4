"""Segmentation, boundary refinement, two-stage retrieval and the episodic attention against references."""

from __future__ import annotations

import itertools
from collections import deque

import pytest
import torch

from mnemotorch.longctx import (
    SurpriseThreshold,
    conductance,
    episodic_attention,
    episodic_attention_reference,
    form_events,
    modularity,
    refine_boundaries,
    select_events,
    similarity_graph,
    surprise_boundaries_reference,
)


def test_surprise_threshold_streams_like_the_reference():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(200, generator=g, dtype=torch.float64) ** 4 * 10
    s[0] = float("nan")
    ref = surprise_boundaries_reference(s.tolist(), window=16, gamma=1.0)
    assert 5 < sum(ref) < 100  # the test data has boundaries, and not everywhere
    for cuts in ([200], [1, 199], [7, 64, 1, 128]):
        thr = SurpriseThreshold(16, 1.0)
        flags, i = [], 0
        for n in cuts:
            flags += thr.update(s[i:i + n]).tolist()
            i += n
        assert flags == ref


def test_surprise_boundary_definition():
    # window [1, 1, 1, 3]: mean 1.5, std sqrt(0.75) = 0.866 -> threshold 2.366 at gamma 1
    flags = surprise_boundaries_reference([float("nan"), 1, 1, 1, 3, 2.3, 2.5], window=4, gamma=1.0)
    assert flags == [False, False, False, False, True, False, False]
    # the next window [1, 1, 3, 2.3]: mean 1.825, std 0.8258 -> 2.65; 2.5 is below it
    with pytest.raises(ValueError, match="gamma"):
        SurpriseThreshold(8, -0.5)


def test_form_events_sizes_and_chunking_invariance():
    g = torch.Generator().manual_seed(1)
    flags = (torch.rand(300, generator=g) < 0.15).tolist()
    is_b = lambda t: flags[t]  # noqa: E731
    once = form_events(10, 300, is_b, 4, 16)
    assert all(4 <= e - s <= 16 for s, e in once)
    assert once[0][0] == 10 and all(a[1] == b[0] for a, b in zip(once, once[1:]))
    # Cuts happen at flagged tokens unless the event is too short (merged) or too long (split).
    for s, e in once:
        assert flags[e] or e - s == 16
    # Feeding the evicted stream in pieces forms the same events.
    events, start = [], 10
    for stop in (13, 50, 51, 120, 300):
        new = form_events(start, stop, is_b, 4, 16)
        events += new
        start = new[-1][1] if new else start
    assert events == once
    assert form_events(0, 40, None, 16, 16) == [(0, 16), (16, 32)]


def _planted_graph(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    adj = torch.rand(n, n, generator=g, dtype=torch.float64) * 0.1
    adj = adj + (labels[:, None] == labels[None, :]) * 1.0
    adj = (adj + adj.T) / 2
    adj.fill_diagonal_(0)
    return adj


@pytest.mark.parametrize("metric", ["modularity", "conductance"])
def test_refinement_recovers_planted_boundaries(metric):
    adj = _planted_graph([9, 12, 7, 10])
    # Surprise put the boundaries at 11 and 18 and 30; the communities end at 9, 21, 28.
    events = [(100, 111), (111, 118), (118, 130), (130, 138)]
    refined = refine_boundaries(adj, 100, events, metric, 3, 16)
    assert refined == [(100, 109), (109, 121), (121, 128), (128, 138)]


@pytest.mark.parametrize("metric", ["modularity", "conductance"])
def test_refinement_step_is_the_brute_force_optimum(metric):
    """One boundary between two events: the chosen split is the best of all valid splits,
    scored by the reference metric on the whole graph."""
    g = torch.Generator().manual_seed(3)
    keys = [torch.randn(2, 24, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    adj = similarity_graph(keys)
    refined = refine_boundaries(adj, 0, [(0, 10), (10, 24)], metric, 3, 20)
    assert len(refined) == 2 and refined[0][0] == 0 and refined[1][1] == 24

    def full_score(p):
        labels = torch.tensor([0] * p + [1] * (24 - p))
        if metric == "modularity":
            return modularity(adj, labels)
        return -(conductance(adj, labels == 0) + conductance(adj, labels == 1))

    scores = {p: full_score(p) for p in range(4, 21)}  # every split keeping both sizes in [3, 20]
    best = max(scores.values())
    assert scores[refined[0][1]] >= best - 1e-12
    assert refined[0][1] != 10 or scores[10] >= best - 1e-12


def test_similarity_graph_is_symmetric_nonnegative():
    k = torch.randn(3, 12, 4, dtype=torch.float64)
    a = similarity_graph([k])
    assert torch.equal(a, a.T) and bool((a >= 0).all()) and bool((a.diagonal() == 0).all())
    full = torch.einsum("hnd,hmd->nm", k, k).clamp_min(0)
    full.fill_diagonal_(0)
    assert torch.allclose(a, full)


def test_two_stage_retrieval():
    sizes = [8, 8, 4, 8, 8, 8, 8]
    scores = torch.tensor([0.0, 5.0, 1.0, 0.5, 4.0, -1.0, 3.0])
    queue: deque[int] = deque()
    # Similarity budget 20: events 1 (8) and 4 (8) fit, 6 (8) does not, 2 (4) still fits.
    got = select_events(scores, sizes, 20, queue, 16)
    # Neighbours of hits 1, 4, 2 (best first): 0, (2 is a hit), 3, 5, (1 is a hit), 3 again (moved to
    # the back: most recent) -> [0, 5, 3]; 24 tokens > 16, so the oldest (0) is dropped.
    assert list(queue) == [5, 3]
    assert got == [1, 2, 3, 4, 5]
    # The queue persists: a new query that hits event 6 adds its neighbour 5 (moved to the back).
    got = select_events(torch.tensor([0, 0, 0, 0, 0, 0, 9.0]), sizes, 8, queue, 16)
    assert list(queue) == [3, 5] and got == [3, 5, 6]
    assert select_events(scores, sizes, 20, None, 0) == [1, 2, 4]


@pytest.mark.parametrize("c,n_local,heads", [(5, 4, None), (12, 4, [True, False, False, True]), (3, 20, None)])
def test_episodic_attention_matches_reference(c, n_local, heads):
    g = torch.Generator().manual_seed(c)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    hq, hkv, d, m, lbuf = 4, 2, 8, 9, 6
    start = 40
    q_loc, q_mem = r(hq, c, d), r(hq, c, d)
    mem_k, mem_v = r(hkv, m, d), r(hkv, m, d)
    work_k, work_kr, work_v = r(hkv, lbuf + c, d), r(hkv, lbuf + c, d), r(hkv, lbuf + c, d)
    q_pos = torch.arange(start, start + c)
    work_pos = torch.arange(start - lbuf, start + c)
    mh = None if heads is None else torch.tensor(heads)
    args = (q_loc, q_mem, mem_k, mem_v, 3, work_k, work_kr, work_v, q_pos, work_pos, n_local, 0.35, mh)
    out, rec = episodic_attention(*args, query_tile=4)
    ref_out, ref_rec = episodic_attention_reference(*args)
    assert float((out - ref_out).norm() / ref_out.norm()) <= 1e-12
    assert float((rec - ref_rec).norm() / ref_rec.norm()) <= 1e-12
