"""Music Transformer relative attention, written plainly (the specification; runs in float64).

Huang et al., 2019, "Music Transformer: Generating Music with Long-Term Structure" (arXiv:1809.04281),
building on Shaw et al., 2018 (arXiv:1803.02155). For query ``i`` and key ``j <= i``:

    logits[i, j] = (q_i . k_j + S_rel[i, j]) * scale,   S_rel[i, j] = q_i . E[min(i - j, R)]

``E = rel_emb [Hr, R + 1, D]`` holds one learned vector per distance ``i - j = 0 .. R``
(``R = max_distance``); longer distances are clipped to ``R`` (Shaw et al.'s clipping), so one table
serves any length. ``Hr`` is 1 (one table shared by the heads) or ``H`` (one table per head).

Three ways to compute ``S_rel`` (equal up to rounding; tested):

* :func:`relative_logits_explicit` -- the definition: gather an ``[Tq, Tk, D]`` tensor of
  embeddings and contract it with the queries. ``O(L^2 D)`` memory: small sizes only.
* :func:`relative_logits_skew` -- the paper's memory-efficient *skewing* for the full sequence
  (``Tq = Tk = L``): ``Q E_r^T`` over the ``L`` relative positions ``-(L-1) .. 0``, pad one zero
  column on the left, reshape ``[L, L+1] -> [L+1, L]``, drop the first row. ``O(L D + L^2)``
  memory. Entries above the diagonal are garbage: the causal mask is mandatory.
* :func:`relative_logits_gather` -- for queries after a cache (``Tq < Tk``): ``Q E^T`` over the
  ``R + 1`` distances, then gather each (query, key) entry by its clipped distance, computed from
  absolute positions. ``O(Tq R + Tq Tk)`` memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _rel_heads(rel_emb: Tensor, num_heads: int) -> Tensor:
    """``rel_emb [Hr, R+1, D]`` -> ``[H, R+1, D]`` (a shared table is broadcast, not copied)."""
    return rel_emb.expand(num_heads, -1, -1) if rel_emb.shape[0] == 1 else rel_emb


def relative_distance_index(tq: int, tk: int, max_distance: int, device=None) -> Tensor:
    """``[Tq, Tk]`` row index into ``rel_emb`` for the last ``Tq`` of ``Tk`` positions: ``clamp(i - j, 0, R)``.

    Future keys (``j > i``) get index 0; they are masked out of the softmax anyway.
    """
    qpos = torch.arange(tk - tq, tk, device=device)[:, None]
    kpos = torch.arange(tk, device=device)[None, :]
    return (qpos - kpos).clamp(0, max_distance)


def relative_logits_explicit(q: Tensor, rel_emb: Tensor, tk: int) -> Tensor:
    """``S_rel [B, H, Tq, Tk]`` by the definition: an ``[H, Tq, Tk, D]`` gather (small sizes only)."""
    h = q.shape[2]
    idx = relative_distance_index(q.shape[1], tk, rel_emb.shape[1] - 1, q.device)
    table = _rel_heads(rel_emb, h)[:, idx]  # [H, Tq, Tk, D]: the O(L^2 D) tensor the skew avoids
    return torch.einsum("bihd,hijd->bhij", q, table)


def relative_logits_skew(q: Tensor, rel_emb: Tensor) -> Tensor:
    """``S_rel [B, H, L, L]`` for a whole sequence (``Tq = Tk = L``) by Music Transformer's skewing.

    Only entries ``j <= i`` are meaningful; the upper triangle holds garbage and must be masked.
    """
    b, length, h, _ = q.shape
    max_distance = rel_emb.shape[1] - 1
    # Row r of E_full is relative position r - (L - 1), i.e. distance L - 1 - r (clipped to R).
    dist = (length - 1 - torch.arange(length, device=q.device)).clamp(max=max_distance)
    e_full = _rel_heads(rel_emb, h)[:, dist]  # [H, L, D]: O(L D)
    qe = torch.einsum("bihd,hrd->bhir", q, e_full)  # [B, H, L, L]
    padded = F.pad(qe, (1, 0))  # [B, H, L, L + 1]
    # Row i of the padded matrix, read as rows of length L, lands shifted by one more place per row:
    # after dropping the first row, entry (i, j) is qe[i, L - 1 + j - i] = q_i . e_{j - i}.
    return padded.reshape(b, h, length + 1, length)[:, :, 1:]


def relative_logits_gather(q: Tensor, rel_emb: Tensor, tk: int) -> Tensor:
    """``S_rel [B, H, Tq, Tk]`` for the last ``Tq`` of ``Tk`` positions, gathered by clipped distance."""
    b, tq, h, _ = q.shape
    max_distance = rel_emb.shape[1] - 1
    qe = torch.einsum("bihd,hrd->bhir", q, _rel_heads(rel_emb, h))  # [B, H, Tq, R + 1]
    idx = relative_distance_index(tq, tk, max_distance, q.device)
    return qe.gather(-1, idx.expand(b, h, tq, tk))


FORMS = ("skew", "gather", "explicit")


def relative_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, rel_emb: Tensor, scale: float | None = None, form: str = "skew"
) -> Tensor:
    """Causal relative attention ``softmax((Q K^T + S_rel) * scale + mask) V``.

    Args:
        q: ``[B, Tq, H, D]``; query ``i`` sits at absolute position ``Tk - Tq + i``.
        k: ``[B, Tk, Hkv, D]``; v: ``[B, Tk, Hkv, Dv]`` (``H % Hkv == 0``).
        rel_emb: ``[Hr, R + 1, D]`` with ``Hr`` in ``{1, H}``; row ``d`` is distance ``i - j = d``.
        scale: default ``D ** -0.5``.
        form: how ``S_rel`` is computed: ``"skew"`` (needs ``Tq == Tk``), ``"gather"`` or ``"explicit"``.

    Returns:
        ``[B, Tq, H, Dv]``.
    """
    if form not in FORMS:
        raise ValueError(f"relative_attention_reference: form must be one of {FORMS}, got {form!r}")
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    if form == "skew":
        if tq != tk:
            raise ValueError(f"relative_attention_reference: form='skew' needs Tq == Tk, got {tq} and {tk}; use form='gather'")
        rel = relative_logits_skew(q, rel_emb)
    elif form == "gather":
        rel = relative_logits_gather(q, rel_emb, tk)
    else:
        rel = relative_logits_explicit(q, rel_emb, tk)
    k = k.repeat_interleave(h // hkv, dim=2)
    v = v.repeat_interleave(h // hkv, dim=2)
    scores = (torch.einsum("bihd,bjhd->bhij", q, k) + rel) * scale
    qpos = torch.arange(tk - tq, tk, device=q.device)[:, None]
    kpos = torch.arange(tk, device=q.device)[None, :]
    # The mask is what makes the skew correct: its upper triangle is not S_rel.
    scores = scores.masked_fill(kpos > qpos, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(dim=-1), v)
