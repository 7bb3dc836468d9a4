"""Event segmentation for episodic memory: surprise boundaries, size limits, graph refinement.

EM-LLM (Fountas et al., 2024, "Human-like Episodic Memory for Infinite Context LLMs") cuts the
token stream into *events* where the model is surprised, then optionally moves each boundary so
that the events are communities of the key-similarity graph. InfLLM (Xiao et al., 2024) uses
fixed-size blocks instead. Everything here is plain PyTorch on small tensors, exact in float64.

Conventions: positions are absolute token indices; an event is a half-open range ``(start, end)``;
a boundary at token ``t`` means ``t`` *starts* a new event.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "SurpriseThreshold",
    "conductance",
    "form_events",
    "modularity",
    "refine_boundaries",
    "similarity_graph",
    "surprise_boundaries_reference",
    "token_surprise",
]


def token_surprise(logprobs: Tensor, next_tokens: Tensor) -> Tensor:
    """``-log p(x_{t+1} | x_{<=t})`` from log-probabilities ``[T, V]`` and next tokens ``[T]`` -> ``[T]``."""
    if logprobs.dim() != 2 or next_tokens.dim() != 1 or logprobs.shape[0] != next_tokens.shape[0]:
        raise ValueError(f"logprobs must be [T, V] and next_tokens [T], got {tuple(logprobs.shape)} and {tuple(next_tokens.shape)}")
    return -logprobs.gather(1, next_tokens.long()[:, None])[:, 0]


def surprise_boundaries_reference(surprise: Sequence[float], window: int, gamma: float) -> list[bool]:
    """Token ``t`` is a boundary when ``s_t > mean(S_w) + gamma * std(S_w)``.

    ``S_w`` holds the ``window`` surprises *before* ``t`` (fewer at the start of the stream;
    at least two are needed, so the first two tokens are never boundaries). ``std`` is the
    population standard deviation. NaN surprises (unknown, e.g. the very first token) never
    make a boundary and are left out of later windows. Token-by-token reference.
    """
    flags, history = [], []
    for s in surprise:
        s = float(s)
        prev = history[-window:]
        if s == s and len(prev) >= 2:
            t = torch.tensor(prev, dtype=torch.float64)
            flags.append(bool(s > t.mean() + gamma * t.std(unbiased=False)))
        else:
            flags.append(False)
        if s == s:
            history.append(s)
    return flags


class SurpriseThreshold:
    """Streaming form of :func:`surprise_boundaries_reference`: feed surprises in any pieces.

    Keeps only the last ``window`` finite surprises, so memory is constant in the stream length.
    """

    def __init__(self, window: int, gamma: float) -> None:
        if window < 2:
            raise ValueError(f"surprise_window must be >= 2, got {window}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.window = int(window)
        self.gamma = float(gamma)
        self.history = torch.empty(0, dtype=torch.float64)

    def update(self, surprise: Tensor) -> Tensor:
        """Boundary flags ``[n]`` (bool) for the next ``n`` surprises ``[n]``."""
        s = surprise.detach().to("cpu", torch.float64).reshape(-1)
        flags = torch.zeros(s.numel(), dtype=torch.bool)
        for i in range(s.numel()):  # n is a block (<= a few hundred): the loop is cheap and exact
            v = s[i]
            if torch.isnan(v):
                continue
            prev = self.history[-self.window:]
            if prev.numel() >= 2:
                flags[i] = bool(v > prev.mean() + self.gamma * prev.std(unbiased=False))
            self.history = torch.cat([self.history[-(self.window - 1):], v[None]])
        return flags


def form_events(
    start: int,
    stop: int,
    is_boundary: Callable[[int], bool] | None,
    min_event: int,
    max_event: int,
) -> list[tuple[int, int]]:
    """Close the events of the pending tokens ``[start, stop)``.

    Walking forward from ``start``, the current event is cut before token ``t`` when it has
    reached ``max_event`` tokens, or when ``t`` is a boundary and the event already has
    ``min_event`` tokens (shorter events are merged into the next one). ``is_boundary=None``
    is InfLLM's fixed segmenter (cut every ``max_event`` tokens). The tail after the last cut
    stays pending (it is returned only once it is ``max_event`` long), because a later
    boundary may still end it elsewhere.
    """
    events: list[tuple[int, int]] = []
    a = start
    for t in range(start + 1, stop + 1):
        length = t - a
        if length >= max_event or (t < stop and is_boundary is not None and length >= min_event and is_boundary(t)):
            events.append((a, t))
            a = t
    return events


def similarity_graph(keys: Sequence[Tensor]) -> Tensor:
    """``A = sum over layers and heads of K K^T`` for keys ``[H, N, D]`` each -> ``[N, N]``.

    Negative similarities are set to zero and self-loops removed: modularity and conductance
    are defined for non-negative weighted graphs (the paper does not say how it treats the sign
    of the dot product; this is our choice).
    """
    a = None
    for k in keys:
        kk = k.to(torch.float64)
        g = torch.einsum("hnd,hmd->nm", kk, kk)
        a = g if a is None else a + g
    if a is None:
        raise ValueError("similarity_graph needs at least one key tensor")
    a = a.clamp_min(0)
    a.fill_diagonal_(0)
    return a


def modularity(adj: Tensor, labels: Tensor) -> float:
    """EM-LLM's modularity ``1/(4m) sum_ij (A_ij - k_i k_j / 2m) [c_i == c_j]``, ``2m = sum A`` (reference)."""
    adj = adj.to(torch.float64)
    deg = adj.sum(1)
    two_m = deg.sum()
    if two_m <= 0:
        return 0.0
    same = labels[:, None] == labels[None, :]
    return float(((adj - deg[:, None] * deg[None, :] / two_m) * same).sum() / (2 * two_m))


def conductance(adj: Tensor, members: Tensor) -> float:
    """``cut(S, V\\S) / min(vol S, vol V\\S)`` of the node set ``members`` (bool ``[N]``), reference."""
    adj = adj.to(torch.float64)
    deg = adj.sum(1)
    vol_s = deg[members].sum()
    vol_rest = deg.sum() - vol_s
    denom = torch.minimum(vol_s, vol_rest)
    if denom <= 0:
        return 0.0
    cut = adj[members][:, ~members].sum()
    return float(cut / denom)


def refine_boundaries(
    adj: Tensor,
    base: int,
    events: list[tuple[int, int]],
    metric: str,
    min_event: int,
    max_event: int,
) -> list[tuple[int, int]]:
    """Move each interior boundary of consecutive ``events`` to the best split of its two events.

    ``adj [N, N]`` is the similarity graph of tokens ``base .. base+N`` (covering all events).
    For the boundary between events ``(lo, b)`` and ``(b, hi)``, every split ``p`` that keeps
    both sizes within ``[min_event, max_event]`` is scored and the best kept: ``"modularity"``
    maximises the two communities' modularity terms, ``"conductance"`` minimises the sum of
    their conductances (within the whole graph). Boundaries are visited left to right, each
    using the already-moved previous one; the outer ends and the number of events never change.
    """
    if metric not in ("modularity", "conductance"):
        raise ValueError(f"refine must be None, 'modularity' or 'conductance', got {metric!r}")
    if len(events) < 2:
        return list(events)
    adj = adj.to(torch.float64)
    n = adj.shape[0]
    deg = adj.sum(1)
    two_m = deg.sum()
    if two_m <= 0:
        return list(events)
    # 2-D prefix sums: the weight inside any [a, b) x [a, b) square in O(1).
    pre = torch.zeros(n + 1, n + 1, dtype=torch.float64, device=adj.device)
    pre[1:, 1:] = adj.cumsum(0).cumsum(1)
    dpre = torch.zeros(n + 1, dtype=torch.float64, device=adj.device)
    dpre[1:] = deg.cumsum(0)

    def inner(a: Tensor, b: Tensor) -> Tensor:
        return pre[b, b] - pre[a, b] - pre[b, a] + pre[a, a]

    def score(a: Tensor, b: Tensor) -> Tensor:
        vol = dpre[b] - dpre[a]
        if metric == "modularity":
            return (inner(a, b) - vol * vol / two_m) / (2 * two_m)
        cut = vol - inner(a, b)
        denom = torch.minimum(vol, two_m - vol)
        return -torch.where(denom > 0, cut / denom.clamp_min(1e-300), torch.zeros_like(cut))

    bounds = [events[0][0]] + [e[1] for e in events]
    for i in range(1, len(bounds) - 1):
        lo, hi = bounds[i - 1], bounds[i + 1]
        first = max(lo + min_event, hi - max_event)
        last = min(hi - min_event, lo + max_event)
        if first > last:
            continue
        p = torch.arange(first, last + 1, device=adj.device)
        lo_t = torch.full_like(p, lo - base)
        hi_t = torch.full_like(p, hi - base)
        total = score(lo_t, p - base) + score(p - base, hi_t)
        # Ties keep the earliest split: deterministic and independent of the surprise boundary.
        bounds[i] = int(p[int(torch.argmax(total))])
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
