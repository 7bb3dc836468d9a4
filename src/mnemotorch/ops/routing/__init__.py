"""Routing attention (Roy et al., 2020): content-based sparse attention through online k-means.

* ``causal_exact_attention(q, k, v, q_cluster, k_cluster)`` -- attention inside clusters (a
  document mask on the cluster ids, plus the causal mask on original positions). Backends:
  ``"reference"`` (dense float64-ready logits), ``"torch"`` (SDPA with cluster masks over query
  chunks) and ``"triton"`` (whole sequences on CUDA: sort by cluster, then block-sparse
  FlexAttention, whose kernels are Triton; ``flex.py``); ``"auto"`` is ``"torch"`` for now (see
  ``AUTO_USES_FLEX``).
* ``balanced_topw_attention(q, k, v, q_members, k_members)`` -- the paper's balanced clusters
  (gather, dense attention per cluster, scatter-mean over duplicates).
* assignment: ``nearest_centroid``, ``balanced_topw_assignment``; routing vectors:
  ``scale_free_layer_norm``; online k-means: ``kmeans_ema_update`` (and its pieces
  ``kmeans_batch_stats``, ``kmeans_ema_step``), ``commitment_loss``.

See ``reference.py`` for the equations and ``docs/mixers/routing.md`` for the causality caveat.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_backend, check_qkv
from .flex import causal_exact_attention_flex, flex_supported

#: Whether ``backend="auto"`` takes the FlexAttention path on CUDA. Off until the GPU tests
#: (``pytest -m gpu tests/layers/test_routing.py``) have passed on an H100; its block lists are
#: checked on the CPU against the element rule (coverage, full tiles) and its outputs there match
#: the reference through FlexAttention's CPU implementation.
AUTO_USES_FLEX = False
from .reference import (
    balanced_topw_assignment,
    balanced_topw_attention,
    causal_exact_attention_reference,
    causal_exact_attention_torch,
    centroid_scores,
    commitment_loss,
    kmeans_batch_stats,
    kmeans_ema_step,
    kmeans_ema_update,
    nearest_centroid,
    scale_free_layer_norm,
)


def causal_exact_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_cluster: Tensor,
    k_cluster: Tensor,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Attention restricted to keys of the query's own cluster (and, if ``causal``, not after it).

    Args:
        q: ``[B, Tq, H, D]``; query ``i`` sits at absolute key position ``Tk - Tq + i``.
        k: ``[B, Tk, H, D]``; v: ``[B, Tk, H, Dv]``.
        q_cluster: ``[B, Tq, H]`` integer cluster ids of the queries; k_cluster: ``[B, Tk, H]``.
        causal: causal mask on original positions.
        scale: logit scale, default ``D ** -0.5``.
        backend: ``"reference"``, ``"torch"``, ``"triton"`` (CUDA, ``Tq == Tk``, head dim a power of
            two in 16..256) or ``"auto"`` (``"triton"`` where it applies, else ``"torch"``). Pass the
            same tensor as ``q_cluster`` and ``k_cluster`` when queries and keys share clusters: the
            Triton path then also skips tiles above the diagonal.

    Returns:
        ``[B, Tq, H, Dv]``; a query with no visible key outputs 0.
    """
    fn = "causal_exact_attention"
    check_qkv(fn, q, k, v)
    check_backend(fn, backend)
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"{fn}: q and k must have the same number of heads, got {q.shape[2]} and {k.shape[2]}")
    for name, c, t in (("q_cluster", q_cluster, q), ("k_cluster", k_cluster, k)):
        if not isinstance(c, Tensor) or c.shape != t.shape[:3] or c.dtype.is_floating_point or c.dtype == torch.bool:
            raise ValueError(f"{fn}: {name} must be an integer tensor of shape {list(t.shape[:3])}, got {getattr(c, 'shape', c)!r}")
    if backend == "reference":
        return causal_exact_attention_reference(q, k, v, q_cluster, k_cluster, causal, scale)
    whole = q.shape[1] == k.shape[1] and v.shape[-1] == q.shape[-1]
    if backend == "triton" and not (whole and flex_supported(q)):
        raise ValueError(
            f"{fn}: backend='triton' needs CUDA tensors, Tq == Tk, v's head dim equal to q's and a head dim that is a power "
            f"of two in 16..256; got device {q.device}, Tq={q.shape[1]}, Tk={k.shape[1]}, D={q.shape[-1]}, Dv={v.shape[-1]}"
        )
    if backend == "triton" or (AUTO_USES_FLEX and backend == "auto" and whole and q.shape[1] >= 128 and flex_supported(q)):
        return causal_exact_attention_flex(q, k, v, q_cluster, k_cluster, causal, scale)
    return causal_exact_attention_torch(q, k, v, q_cluster, k_cluster, causal, scale)


__all__ = [
    "balanced_topw_assignment",
    "balanced_topw_attention",
    "causal_exact_attention",
    "causal_exact_attention_flex",
    "causal_exact_attention_reference",
    "causal_exact_attention_torch",
    "centroid_scores",
    "commitment_loss",
    "kmeans_batch_stats",
    "kmeans_ema_step",
    "kmeans_ema_update",
    "nearest_centroid",
    "scale_free_layer_norm",
]
