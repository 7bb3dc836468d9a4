"""Music Transformer relative attention: ``relative_attention(q, k, v, rel_emb)``.

Backends:

* ``"reference"``, ``"torch"``, ``"auto"`` -- plain PyTorch (``reference.py``): the skewing
  procedure when the queries are the whole sequence (``Tq == Tk``), the clipped-distance gather
  after a cache (``Tq < Tk``). ``O(L D + L^2)`` memory, never ``L^2 D``.
* ``"triton"`` -- not written yet (a fused kernel that loads the ``E_r`` band per tile: issue 7).
"""

from __future__ import annotations

from torch import Tensor

from ..checks import check_backend, check_qkv
from .reference import (
    relative_attention_reference,
    relative_distance_index,
    relative_logits_explicit,
    relative_logits_gather,
    relative_logits_skew,
)


def check_rel_emb(fn: str, q: Tensor, rel_emb: Tensor) -> None:
    """``rel_emb`` must be ``[1 or H, R + 1, D]`` floating point, on q's device."""
    if not isinstance(rel_emb, Tensor):
        raise TypeError(f"{fn}: rel_emb must be a torch.Tensor, got {type(rel_emb).__name__}")
    h, d = q.shape[2], q.shape[3]
    if rel_emb.ndim != 3 or rel_emb.shape[0] not in (1, h) or rel_emb.shape[2] != d or rel_emb.shape[1] < 1:
        raise ValueError(f"{fn}: rel_emb must have shape [1 or {h}, max_distance + 1, {d}], got {list(rel_emb.shape)}")
    if not rel_emb.is_floating_point():
        raise TypeError(f"{fn}: rel_emb must be floating point, got {rel_emb.dtype}")
    if rel_emb.device != q.device:
        raise ValueError(f"{fn}: rel_emb is on {rel_emb.device} but q is on {q.device}")


def relative_attention(
    q: Tensor, k: Tensor, v: Tensor, rel_emb: Tensor, scale: float | None = None, backend: str = "auto"
) -> Tensor:
    """Causal attention with learned relative-position logits (Huang et al., 2019).

    Args:
        q: ``[B, Tq, H, D]`` queries; query ``i`` sits at absolute position ``Tk - Tq + i``.
        k: ``[B, Tk, Hkv, D]`` keys (``H % Hkv == 0``); v: ``[B, Tk, Hkv, Dv]`` values.
        rel_emb: ``[Hr, R + 1, D]``, ``Hr`` in ``{1, H}``: row ``d`` is the embedding of distance
            ``i - j = d``; distances beyond ``R`` use row ``R``.
        scale: logit scale applied to ``q.k + q.e``, default ``D ** -0.5``.
        backend: ``"auto"``, ``"torch"`` or ``"reference"`` (all plain PyTorch for now); ``"triton"``
            raises ``NotImplementedError``.

    Returns:
        ``[B, Tq, H, Dv]``.
    """
    check_qkv("relative_attention", q, k, v)
    check_backend("relative_attention", backend)
    check_rel_emb("relative_attention", q, rel_emb)
    if backend == "triton":
        raise NotImplementedError("relative_attention has no Triton backend yet; use backend='auto'")
    rel_emb = rel_emb.to(q.dtype)
    form = "skew" if q.shape[1] == k.shape[1] else "gather"
    return relative_attention_reference(q, k, v, rel_emb, scale, form=form)


__all__ = [
    "relative_attention",
    "relative_attention_reference",
    "relative_distance_index",
    "relative_logits_explicit",
    "relative_logits_gather",
    "relative_logits_skew",
]
