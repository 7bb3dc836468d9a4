"""Attention rhythm: head span, local/global heads, WAAD and FAI (Preplan-and-Anchor, arXiv 2510.13554).

Definitions (A is one head's causal attention map, row t = query, column s = key, 0-indexed):

* head span            d(l, h) = mean_t  sum_s A[t, s] (t - s)
* local / global heads  the ``fraction`` (30%) of heads with the lowest / highest span, among the
                        heads of the chosen (by default middle) layers; their maps are averaged
                        into ``A_loc`` and ``A_glob``
* WAAD                 WAAD_t = sum_s A_loc[t, s] min(t - s, W),  W = 10
* FAI                  FAI_s  = mean of A_glob[t, s] over t in [s + 10, s + 50] (rows that exist)

Every function takes maps with any leading dimensions ``[..., T, T]`` and works in the maps'
dtype (float64 maps give float64 metrics).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._model import as_ids, attention_maps, decoder_layers, resolve_layer

__all__ = [
    "AttentionRhythm",
    "attention_rhythm",
    "future_attention_influence",
    "head_spans",
    "middle_layers",
    "plot_attention_rhythm",
    "select_heads",
    "windowed_attention_distance",
]


def _check_maps(attn: Tensor, argument: str = "attn") -> Tensor:
    if not isinstance(attn, Tensor) or attn.ndim < 2 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"{argument} must be square attention maps [..., T, T], got {getattr(attn, 'shape', type(attn))}")
    if not attn.is_floating_point():
        raise TypeError(f"{argument} must be a floating-point tensor, got {attn.dtype}")
    return attn


def _distance(t: int, like: Tensor) -> Tensor:
    """``D[t, s] = t - s`` (negative above the diagonal, where causal maps are zero)."""
    pos = torch.arange(t, device=like.device, dtype=like.dtype)
    return pos[:, None] - pos[None, :]


def head_spans(attn: Tensor) -> Tensor:
    """Mean attention distance of each map, ``d = mean_t sum_s A[t, s] (t - s)``: ``[..., T, T]`` -> ``[...]``."""
    attn = _check_maps(attn)
    return (attn * _distance(attn.shape[-1], attn)).sum(-1).mean(-1)


def windowed_attention_distance(attn: Tensor, window: int = 10) -> Tensor:
    """WAAD_t = sum_s A[t, s] min(t - s, W): ``[..., T, T]`` -> ``[..., T]``.

    Near 1 for a previous-token head, 0 for a head that attends to itself, ``W`` for a head that
    looks at least ``W`` tokens back. The clip keeps one far-away glance from dominating.
    """
    attn = _check_maps(attn)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    # min(t - s, W) on the causal part; the clamp at 0 only touches entries a causal map zeroes anyway.
    dist = _distance(attn.shape[-1], attn).clamp(0, window)
    return (attn * dist).sum(-1)


def future_attention_influence(attn: Tensor, start: int = 10, end: int = 50) -> Tensor:
    """FAI_s = mean of A[t, s] over t in [s + start, s + end] (inclusive, t < T): ``[..., T, T]`` -> ``[..., T]``.

    A token that every later row attends to with weight 1 scores 1. Tokens too close to the end
    to have any row in the range (``s + start >= T``) get NaN: their influence is unobserved.
    """
    attn = _check_maps(attn)
    if not (isinstance(start, int) and isinstance(end, int)) or start < 1 or end < start:
        raise ValueError(f"need integers 1 <= start <= end, got start={start!r}, end={end!r}")
    gap = _distance(attn.shape[-1], attn)  # t - s
    inside = ((gap >= start) & (gap <= end)).to(attn.dtype)  # [T(t), T(s)]
    count = inside.sum(0)  # rows in range for each column s
    total = (attn * inside).sum(-2)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))


def middle_layers(num_layers: int) -> list[int]:
    """The middle half of the layers, ``L//4 .. L - L//4 - 1`` (all of them when ``L < 4``)."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    q = num_layers // 4
    return list(range(q, num_layers - q))


def select_heads(spans: Tensor, fraction: float = 0.3, layers: Sequence[int] | None = None) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Local and global heads: the ``fraction`` of heads with the lowest / highest span.

    Args:
        spans: ``[L, H]`` head spans (:func:`head_spans`).
        fraction: share of the candidate heads in each group (paper: 30%); at least one head each.
        layers: candidate layers (default :func:`middle_layers`).

    Returns:
        ``(local, global)`` lists of ``(layer, head)``, ordered by span (local: shortest first,
        global: longest first). Ties are broken by position, so the result is deterministic.
    """
    if not isinstance(spans, Tensor) or spans.ndim != 2:
        raise ValueError(f"spans must be [L, H], got {getattr(spans, 'shape', type(spans))}")
    if not 0.0 < float(fraction) <= 0.5:
        raise ValueError(f"fraction must be in (0, 0.5] so that the two groups do not overlap, got {fraction}")
    n_layers, n_heads = spans.shape
    layers = middle_layers(n_layers) if layers is None else list(layers)
    for i in layers:
        if not 0 <= int(i) < n_layers:
            raise ValueError(f"layer {i} is out of range for spans of {n_layers} layers")
    if not layers:
        raise ValueError("layers is empty")
    cand = [(int(i), h) for i in layers for h in range(n_heads)]
    k = max(1, int(round(float(fraction) * len(cand))))
    values = torch.stack([spans[i, h] for i, h in cand]).double()
    order = torch.argsort(values, stable=True).tolist()
    local = [cand[j] for j in order[:k]]
    glob = [cand[j] for j in reversed(order[len(order) - k :])]
    return local, glob


@dataclass
class AttentionRhythm:
    """Result of :func:`attention_rhythm` for one text of ``T`` tokens.

    Attributes:
        spans: ``[L, H]`` head spans over the text.
        local_heads, global_heads: ``(layer, head)`` pairs (indices into all layers).
        local_map, global_map: ``[T, T]`` averaged maps ``A_loc`` and ``A_glob``.
        waad: ``[T]`` windowed average attention distance of ``A_loc``.
        fai: ``[T]`` future attention influence of ``A_glob`` (NaN for the last ``fai_start`` tokens).
        tokens: the token strings, when a tokenizer was given (plot labels).
    """

    spans: Tensor
    local_heads: list[tuple[int, int]]
    global_heads: list[tuple[int, int]]
    local_map: Tensor
    global_map: Tensor
    waad: Tensor
    fai: Tensor
    tokens: list[str] | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def _group_map(maps: Tensor, heads: list[tuple[int, int]]) -> Tensor:
    return torch.stack([maps[i, h] for i, h in heads]).mean(0)


@torch.no_grad()
def attention_rhythm(
    model: nn.Module,
    input_ids: Tensor | Sequence[int],
    *,
    tokenizer: Any = None,
    layers: Sequence[int] | None = None,
    fraction: float = 0.3,
    window: int = 10,
    fai_start: int = 10,
    fai_end: int = 50,
) -> AttentionRhythm:
    """WAAD and FAI of one text under ``model`` (Preplan-and-Anchor).

    Args:
        model: a causal LM that can give attention weights (see :func:`attention_maps`).
        input_ids: one text, ``[T]`` or ``[1, T]``.
        tokenizer: optional; decodes each token for the plot labels.
        layers: the layers heads are selected from (default: the middle half).
        fraction, window, fai_start, fai_end: the paper's 30%, W = 10, and t in [s + 10, s + 50].
    """
    ids = as_ids(input_ids, model)
    if ids.shape[0] != 1:
        raise ValueError(f"input_ids must hold one text (batch 1), got batch {ids.shape[0]}")
    n_layers = len(decoder_layers(model))
    pool = middle_layers(n_layers) if layers is None else [resolve_layer(model, int(i), "layers") for i in layers]
    if not pool:
        raise ValueError("layers is empty")
    maps = attention_maps(model, ids, layers=pool)[:, 0].double()  # [L', H, T, T]
    full = torch.full((n_layers, maps.shape[1]), math.nan, dtype=torch.float64, device=maps.device)
    spans_pool = head_spans(maps)
    full[pool] = spans_pool
    local, glob = select_heads(spans_pool, fraction, layers=range(len(pool)))
    local_map, global_map = _group_map(maps, local), _group_map(maps, glob)
    tokens = None
    if tokenizer is not None:
        from ._model import decode

        tokens = [decode(tokenizer, [int(t)]) for t in ids[0].tolist()]
    return AttentionRhythm(
        spans=full.cpu(),
        local_heads=[(pool[i], h) for i, h in local],
        global_heads=[(pool[i], h) for i, h in glob],
        local_map=local_map.cpu(),
        global_map=global_map.cpu(),
        waad=windowed_attention_distance(local_map, window).cpu(),
        fai=future_attention_influence(global_map, fai_start, fai_end).cpu(),
        tokens=tokens,
        settings={"layers": pool, "fraction": fraction, "window": window, "fai_start": fai_start, "fai_end": fai_end},
    )


def plot_attention_rhythm(rhythm: AttentionRhythm, path: str | Path | None = None, *, title: str | None = None, max_labels: int = 80) -> Any:
    """Plot WAAD (top) and FAI (bottom) along the text; save to ``path`` (PNG) when given.

    Returns the matplotlib ``Figure`` (an Agg canvas: no display or pyplot state needed). Token
    strings label the x-axis when the text is at most ``max_labels`` tokens long.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    t = rhythm.waad.shape[-1]
    x = list(range(t))
    fig = Figure(figsize=(min(16.0, 4.0 + 0.12 * t), 5.0))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.plot(x, rhythm.waad.tolist(), color="tab:blue", lw=1.2)
    ax1.set_ylabel(f"WAAD (W={rhythm.settings.get('window', 10)})")
    ax1.set_title(title or f"attention rhythm: {len(rhythm.local_heads)} local / {len(rhythm.global_heads)} global heads")
    ax1.grid(alpha=0.3)
    ax2.bar(x, [0.0 if math.isnan(v) else v for v in rhythm.fai.tolist()], color="tab:orange", width=0.8)
    ax2.set_ylabel("FAI")
    ax2.set_xlabel("token position")
    ax2.grid(alpha=0.3)
    if rhythm.tokens is not None and t <= max_labels:
        labels = [repr(s)[1:-1] if s.strip() else "\u2423" for s in rhythm.tokens]
        ax2.set_xticks(x)
        ax2.set_xticklabels(labels, fontsize=6, rotation=90)
    fig.tight_layout()
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    return fig
