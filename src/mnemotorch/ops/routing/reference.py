"""Routing attention (Roy et al., 2020, arXiv:2003.05997), written plainly: the specification.

Everything here runs in float64 and keeps the tensor layout ``[B, T, H, D]`` of the other ops.

Routing vectors ``r`` (layer-normalised queries/keys, no scale or bias) are assigned to per-head
centroids ``mu [H, C, D]``. Two assignment rules:

* **nearest centroid** (``causal_exact``): ``c(i) = argmax_c r_i . mu_c``. It depends on token ``i``
  alone, so a clustered causal attention (a document mask on the cluster ids plus the causal mask on
  original positions) never lets a future token change a past output, and decoding one token at a
  time reproduces the parallel pass exactly.
* **balanced top-w** (the paper's rule): centroid ``c`` takes the ``w`` tokens with the largest
  ``r_i . mu_c``, sorted by position. A token may be in no cluster or in several. Membership depends
  on the whole sequence, so in a causal model a *future* token can push a *past* key out of (or into)
  a cluster: an information leak.

Online k-means: the EMA of per-centroid sums and counts (decay ``lambda``, the form of
van den Oord et al. 2017's VQ-VAE EMA; Roy et al. write the same update with equal weights on the
query and key sums), and the commitment loss ``beta * ||r - sg(mu_c(r))||^2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def scale_free_layer_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Layer norm over the last dim without scale or bias: ``(x - mean) / sqrt(var + eps)``.

    Routing vectors then lie close to the sphere of radius ``sqrt(D)``, so the largest dot product
    with a centroid picks (nearly) the nearest one.
    """
    return F.layer_norm(x, x.shape[-1:], eps=eps)


#: Most elements of the ``[n, H, C, D]`` product that :func:`centroid_scores` and
#: :func:`nearest_centroid` hold at once: 2^25 (128 MiB in float32) on accelerators, where a chunk
#: must be large enough to hide its 3-4 kernel launches, 2^20 (4 MiB) on the CPU, where a chunk that
#: stays in cache is several times faster than a large one. Unchunked, a whole sequence's product has
#: ``B * T * H * C * D`` elements, and with ``C = T / window`` that grows as ``T^2``: it was the routing
#: layer's whole memory peak (32 GiB at T = 64K, 16 heads, D = 64, C = 128). Chunks split only the
#: token dims; every score is still the same elementwise product summed over ``D``, so the results are
#: bit-identical to the unchunked computation.
SCORE_CHUNK_ELEMENTS = 1 << 25
SCORE_CHUNK_ELEMENTS_CPU = 1 << 20


def _token_step(x: Tensor, centroids: Tensor) -> int:
    """Tokens per chunk so that a chunk's ``[n, H, C, D]`` product stays within the bound above."""
    limit = SCORE_CHUNK_ELEMENTS_CPU if x.device.type == "cpu" else SCORE_CHUNK_ELEMENTS
    return max(1, limit // max(1, centroids.numel()))


def centroid_scores(x: Tensor, centroids: Tensor) -> Tensor:
    """``x [B, T, H, D]`` and ``centroids [H, C, D]`` -> ``x . mu`` as ``[B, T, H, C]`` (float32 at least).

    Written as an elementwise product and a sum over ``D`` rather than a matmul so that the score of
    a token does not depend on how many other tokens share the call (bit-identical in any chunking).
    Long inputs are computed in token chunks (``SCORE_CHUNK_ELEMENTS``), so the ``[..., H, C, D]``
    product is never materialised for the whole sequence.
    """
    work = _work_dtype(x.dtype)
    mu = centroids.to(work)
    flat = x.reshape(-1, *x.shape[-2:])  # [N, H, D]
    step = _token_step(x, centroids)
    if flat.shape[0] <= step:
        return (x.to(work)[..., None, :] * mu).sum(-1)
    parts = [(flat[s : s + step].to(work)[..., None, :] * mu).sum(-1) for s in range(0, flat.shape[0], step)]
    return torch.cat(parts).reshape(*x.shape[:-1], centroids.shape[1])


@torch.no_grad()
def nearest_centroid(x: Tensor, centroids: Tensor) -> Tensor:
    """Cluster id ``argmax_c x . mu_c`` of every token and head: ``[B, T, H]`` int64.

    Exact ties go to the lower centroid index (``argmax`` returns the first maximum). The scores
    (:func:`centroid_scores`) are reduced to ids chunk by chunk: neither the ``[..., H, C, D]``
    product nor the ``[..., H, C]`` scores of the whole input are kept, and no autograd graph is
    built (ids have no gradient; centroids get none through the assignment).
    """
    x = x.detach()
    flat = x.reshape(-1, *x.shape[-2:])  # [N, H, D]
    step = _token_step(x, centroids)
    if flat.shape[0] <= step:
        return centroid_scores(x, centroids).argmax(dim=-1)
    mu = centroids.detach().to(_work_dtype(x.dtype))  # converted once, not per chunk
    out = torch.empty(flat.shape[:2], dtype=torch.int64, device=x.device)
    for s in range(0, flat.shape[0], step):
        out[s : s + step] = centroid_scores(flat[s : s + step], mu).argmax(dim=-1)
    return out.reshape(x.shape[:-1])


def balanced_topw_assignment(x: Tensor, centroids: Tensor, w: int) -> Tensor:
    """The paper's balanced assignment: each centroid takes its ``w`` best tokens, sorted by position.

    Args:
        x: ``[B, T, H, D]`` routing vectors.
        centroids: ``[H, C, D]``.
        w: tokens per centroid (``min(w, T)`` are taken).

    Returns:
        ``[B, H, C, w']`` int64 positions, ascending along the last dim (``w' = min(w, T)``).
        Among equal scores the earlier position wins.
    """
    s = centroid_scores(x, centroids).permute(0, 2, 3, 1)  # [B, H, C, T]
    w = min(int(w), x.shape[1])
    # a stable descending sort makes ties deterministic (earlier position first)
    top = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :w]
    return torch.sort(top, dim=-1).values


def causal_exact_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, q_cluster: Tensor, k_cluster: Tensor, causal: bool = True, scale: float | None = None
) -> Tensor:
    """Attention inside clusters: key ``j`` is visible to query ``i`` iff they share a cluster (and ``j <= i``).

    Args:
        q: ``[B, Tq, H, D]``; query ``i`` sits at absolute key position ``Tk - Tq + i``.
        k: ``[B, Tk, H, D]``; v: ``[B, Tk, H, Dv]``.
        q_cluster: ``[B, Tq, H]`` int cluster id of each query; k_cluster: ``[B, Tk, H]``.
        causal: add the causal mask on original positions.
        scale: logit scale, default ``D ** -0.5``.

    Returns:
        ``[B, Tq, H, Dv]``; a query with no visible key outputs 0. Dense ``[Tq, Tk]`` logits: for tests.
    """
    tq, tk, d = q.shape[1], k.shape[1], q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    work = _work_dtype(q.dtype)
    s = torch.einsum("bihd,bjhd->bhij", q.to(work), k.to(work)) * scale
    allowed = q_cluster.permute(0, 2, 1)[..., :, None] == k_cluster.permute(0, 2, 1)[..., None, :]  # [B, H, Tq, Tk]
    if causal:
        qpos = torch.arange(tk - tq, tk, device=q.device)[:, None]
        allowed = allowed & (torch.arange(tk, device=q.device)[None, :] <= qpos)
    has_any = allowed.any(-1, keepdim=True)
    p = s.masked_fill(~allowed, float("-inf")).masked_fill(~has_any, 0.0).softmax(-1) * has_any
    return torch.einsum("bhij,bjhd->bihd", p, v.to(work)).to(v.dtype)


def causal_exact_attention_torch(
    q: Tensor, k: Tensor, v: Tensor, q_cluster: Tensor, k_cluster: Tensor, causal: bool = True, scale: float | None = None,
    chunk: int = 512,
) -> Tensor:
    """The same rule as :func:`causal_exact_attention_reference` through SDPA over query chunks.

    Memory ``O(B * H * chunk * Tk)`` booleans for the masks; compute is dense (``O(Tq * Tk)``).
    """
    tq, tk = q.shape[1], k.shape[1]
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    kc = k_cluster.permute(0, 2, 1)[:, :, None, :]  # [B, H, 1, Tk]
    kpos = torch.arange(tk, device=q.device)[None, :]
    outs = []
    for s in range(0, tq, chunk):
        qs = q[:, s : s + chunk]
        n = qs.shape[1]
        mask = q_cluster[:, s : s + n].permute(0, 2, 1)[..., None] == kc  # [B, H, n, Tk]
        if causal:
            qpos = torch.arange(tk - tq + s, tk - tq + s + n, device=q.device)[:, None]
            mask = mask & (kpos <= qpos)
        # A row with no visible key would be NaN in SDPA (and poison the backward); let it see
        # everything, then define its output as 0.
        has_any = mask.any(-1, keepdim=True)
        o = F.scaled_dot_product_attention(qs.transpose(1, 2), kt, vt, attn_mask=mask | ~has_any, scale=scale)
        o = torch.where(has_any, o, torch.zeros((), dtype=o.dtype, device=o.device))
        outs.append(o.transpose(1, 2))
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


def _gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """``x [B, T, H, D]``, ``idx [B, H, C, w]`` -> ``[B, H, C, w, D]``."""
    b, t, h, d = x.shape
    xh = x.permute(0, 2, 1, 3)  # [B, H, T, D]
    flat = idx.reshape(b, h, -1)
    out = xh.gather(2, flat[..., None].expand(-1, -1, -1, d))
    return out.reshape(*idx.shape, d)


def balanced_topw_attention(
    q: Tensor, k: Tensor, v: Tensor, q_members: Tensor, k_members: Tensor, causal: bool = True, scale: float | None = None
) -> Tensor:
    """The paper's clustered attention: gather each cluster, attend densely inside it, scatter-mean back.

    Args:
        q: ``[B, T, H, D]``; k: ``[B, T, H, D]``; v: ``[B, T, H, Dv]`` (one sequence, no cache).
        q_members: ``[B, H, C, w]`` query positions of each cluster (:func:`balanced_topw_assignment`);
            k_members: ``[B, H, C, w]`` key positions (the same tensor with shared Q/K).
        causal: inside a cluster, query at position ``i`` sees the cluster's keys at positions ``<= i``.
        scale: logit scale, default ``D ** -0.5``.

    Returns:
        ``[B, T, H, Dv]``: the mean, over the clusters a token's query belongs to, of its attention
        output in each (0 for a cluster with no visible key); a token in no cluster outputs 0.
        Memory ``O(B * H * C * w^2)``.
    """
    b, t, h, d = q.shape
    dv = v.shape[-1]
    scale = d**-0.5 if scale is None else scale
    work = _work_dtype(q.dtype)
    qg = _gather_tokens(q.to(work), q_members)  # [B, H, C, w, D]
    kg = _gather_tokens(k.to(work), k_members)
    vg = _gather_tokens(v.to(work), k_members)
    s = torch.einsum("bhcid,bhcjd->bhcij", qg, kg) * scale
    if causal:
        allowed = k_members[..., None, :] <= q_members[..., :, None]  # [B, H, C, w, w]
        has_any = allowed.any(-1, keepdim=True)
        p = s.masked_fill(~allowed, float("-inf")).masked_fill(~has_any, 0.0).softmax(-1) * has_any
    else:
        p = s.softmax(-1)
    og = torch.einsum("bhcij,bhcjd->bhcid", p, vg)  # [B, H, C, w, Dv]
    flat = q_members.reshape(b, h, -1)
    total = torch.zeros(b, h, t, dv, dtype=work, device=q.device).scatter_add(2, flat[..., None].expand(-1, -1, -1, dv), og.reshape(b, h, -1, dv))
    count = torch.zeros(b, h, t, dtype=work, device=q.device).scatter_add(2, flat, torch.ones_like(flat, dtype=work))
    out = total / count.clamp_min(1.0)[..., None]
    return out.permute(0, 2, 1, 3).to(v.dtype)


# ---------------------------------------------------------------------------------------------
# online k-means


def kmeans_batch_stats(x: Tensor, assignments: Tensor, num_clusters: int) -> tuple[Tensor, Tensor]:
    """Per-head, per-centroid sums and counts of a batch of routing vectors.

    Args:
        x: ``[..., H, D]`` routing vectors (any leading dims, e.g. ``[B, T, H, D]``).
        assignments: ``[..., H]`` int cluster ids (same leading dims).
        num_clusters: ``C``.

    Returns:
        ``sums [H, C, D]`` and ``counts [H, C]`` in float32 at least; no gradient.
    """
    h, d = x.shape[-2], x.shape[-1]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.detach().reshape(-1, h, d).to(work).transpose(0, 1)  # [H, N, D]
    a = assignments.reshape(-1, h).transpose(0, 1).to(torch.int64)  # [H, N]
    sums = torch.zeros(h, num_clusters, d, dtype=work, device=x.device).scatter_add_(1, a[..., None].expand(-1, -1, d), xf)
    counts = torch.zeros(h, num_clusters, dtype=work, device=x.device).scatter_add_(1, a, torch.ones_like(a, dtype=work))
    return sums, counts


def kmeans_ema_step(
    sums: Tensor, counts: Tensor, batch_sums: Tensor, batch_counts: Tensor, decay: float = 0.999, normalize_to: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One EMA step from precomputed batch statistics (see :func:`kmeans_ema_update`)."""
    new_sums = decay * sums + (1.0 - decay) * batch_sums.to(sums.dtype)
    new_counts = decay * counts + (1.0 - decay) * batch_counts.to(counts.dtype)
    centroids = new_sums / new_counts.clamp_min(torch.finfo(new_counts.dtype).tiny)[..., None]
    if normalize_to is not None:
        centroids = centroids * (normalize_to / centroids.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return centroids, new_sums, new_counts


def kmeans_ema_update(
    sums: Tensor,
    counts: Tensor,
    x: Tensor,
    assignments: Tensor,
    decay: float = 0.999,
    normalize_to: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Online k-means by exponential moving averages of per-centroid sums and counts.

    With ``n_c`` the number of vectors assigned to centroid ``c`` in this batch and ``s_c`` their sum::

        N_c <- lambda * N_c + (1 - lambda) * n_c
        S_c <- lambda * S_c + (1 - lambda) * s_c
        mu_c = S_c / N_c                       (then rescaled to norm ``normalize_to`` if given)

    A centroid that receives nothing keeps its direction (``S`` and ``N`` decay together).

    Args:
        sums: ``[H, C, D]`` running sums ``S``; counts: ``[H, C]`` running counts ``N`` (positive).
        x: ``[..., H, D]`` routing vectors; assignments: ``[..., H]`` their cluster ids.
        decay: ``lambda`` (paper: 0.999).
        normalize_to: rescale every centroid to this norm (e.g. ``sqrt(D)``, the radius of the
            layer-normalised routing vectors); ``None`` keeps ``S / N``.

    Returns:
        ``(centroids [H, C, D], new_sums, new_counts)``; nothing is modified in place.
    """
    if not 0.0 <= float(decay) < 1.0:
        raise ValueError(f"kmeans_ema_update: decay must be in [0, 1), got {decay!r}")
    if sums.ndim != 3 or counts.shape != sums.shape[:2]:
        raise ValueError(f"kmeans_ema_update: sums must be [H, C, D] and counts [H, C], got {list(sums.shape)} and {list(counts.shape)}")
    if x.shape[-2:] != (sums.shape[0], sums.shape[2]) or assignments.shape != x.shape[:-1]:
        raise ValueError(
            f"kmeans_ema_update: x must be [..., H={sums.shape[0]}, D={sums.shape[2]}] with assignments [..., H], "
            f"got x {list(x.shape)} and assignments {list(assignments.shape)}"
        )
    batch_sums, batch_counts = kmeans_batch_stats(x, assignments, sums.shape[1])
    return kmeans_ema_step(sums, counts, batch_sums, batch_counts, decay, normalize_to)


def commitment_loss(x: Tensor, centroids: Tensor, assignments: Tensor, beta: float = 1e-4) -> Tensor:
    """``beta * mean ||x - sg(mu_{c(x)})||^2`` over every token and head (sum over ``D``).

    Args:
        x: ``[..., H, D]`` routing vectors (with gradient); centroids ``[H, C, D]`` (no gradient flows
            to them); assignments ``[..., H]``.
    """
    h = x.shape[-2]
    mu = centroids.detach().to(x.dtype)
    a = assignments.reshape(-1, h)  # [N, H]
    picked = mu[torch.arange(h, device=x.device)[None, :], a]  # [N, H, D]
    return beta * (x.reshape(-1, h, x.shape[-1]) - picked).pow(2).sum(-1).mean()
