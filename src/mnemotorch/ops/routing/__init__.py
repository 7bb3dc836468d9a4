"""Routing attention (Roy et al., 2020): content-based sparse attention through online k-means.

* ``causal_exact_attention(q, k, v, q_cluster, k_cluster)`` -- attention inside clusters (a
  document mask on the cluster ids, plus the causal mask on original positions). Backends:
  ``"reference"`` (dense float64-ready logits; the oracle), ``"torch"`` (SDPA with cluster masks
  over query chunks), ``"block_sparse"`` (sort by cluster, pack the clusters of every batch row and
  head into one sequence, run the project's block-sparse Triton kernel; ``block_sparse.py``) and
  ``"flex"`` (sort by cluster, block-sparse FlexAttention on whole sequences; ``flex.py``;
  ``"triton"`` is its former name and still selects it). ``"auto"`` is decided once per call, at
  this boundary: ``"block_sparse"`` on CUDA when the kernel supports the inputs and there are at least
  ``AUTO_MIN_QUERIES`` queries (``AUTO_USES_BLOCK_SPARSE = False`` turns that off), ``"torch"``
  otherwise.
* ``balanced_topw_attention(q, k, v, q_members, k_members)`` -- the paper's balanced clusters
  (gather, dense attention per cluster, scatter-mean over duplicates).
* assignment: ``nearest_centroid`` (one Triton kernel on CUDA, ``triton.py``; the chunked
  product-and-sum of ``reference.py`` elsewhere), ``balanced_topw_assignment``; routing vectors:
  ``scale_free_layer_norm``; online k-means: ``kmeans_ema_update`` (and its pieces
  ``kmeans_batch_stats``, ``kmeans_ema_step``), ``commitment_loss``.

See ``reference.py`` for the equations and ``docs/mixers/routing.md`` for the causality caveat.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_qkv
from .block_sparse import block_sparse_supported, causal_exact_attention_block_sparse, routed_layout
from .flex import causal_exact_attention_flex, flex_supported
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
    scale_free_layer_norm,
)
from .reference import nearest_centroid as nearest_centroid_reference

#: Backends of :func:`causal_exact_attention` (``"triton"``: the former name of ``"flex"``).
BACKENDS = ("auto", "reference", "torch", "block_sparse", "flex", "triton")
#: The dispatch decision of ``backend="auto"``: on CUDA, the block-sparse kernel path (issue #7: the
#: Flex path took 7.2 / 8.1 / 69 ms for the benchmark layer at 8K / 16K / 64K on an H200, and the
#: masked-SDPA path is dense). Its lists, outputs and gradients are tested against brute force and
#: the float64 reference under the Triton interpreter (``tests/test_routing_block_sparse.py``); the
#: same checks at GPU sizes are ``tests/gpu/test_routing_gpu.py`` (``pytest -m gpu``). On the first
#: H100 run (2026-11-26) the benchmark layer matched Flex and masked SDPA (1.7e-3 / 2.2e-3 in bf16) and
#: was the fastest path, but bf16 dq with shared Q/K failed (1.7e-2 against a bf16 peer's 2.4e-3: the
#: backward's Delta came from the bf16-rounded output) and fp32 at D = 128 ran out of shared memory.
#: Both were fixed; on the H100 (2026-11-26, later session) the reference checks at D = 64 / 128
#: (shared and separate Q/K, a cache offset, an encoder; fp32 and bf16: 10 cases), the mixer's bf16
#: checks against Flex and masked SDPA and the 32K check passed, so "auto" takes this path.
AUTO_USES_BLOCK_SPARSE = True
#: Fewer queries than this (decoding, short continuations) go to ``"torch"`` under ``"auto"``:
#: sorting and packing the whole cache would cost more than the masked SDPA over a few queries.
AUTO_MIN_QUERIES = 128
#: Whether ``nearest_centroid(..., backend="auto")`` runs the Triton kernel on CUDA (float16 /
#: bfloat16 / float32 vectors, head dim <= 256): one launch instead of the reference's chunked
#: ``[n, H, C, D]`` products (~256 chunks and tens of ms at the benchmark's 64K tokens).
AUTO_ASSIGN_KERNEL = True
ASSIGN_BACKENDS = ("auto", "reference", "triton")


def nearest_centroid(x: Tensor, centroids: Tensor, backend: str = "auto") -> Tensor:
    """Cluster id ``argmax_c x . mu_c`` of every token and head: ``x [B, T, H, D]``, ``centroids [H, C, D]``
    -> ``int64 [B, T, H]`` (exact ties: the lower index; no gradient).

    ``backend``: ``"reference"`` (``reference.nearest_centroid``: chunked product and sum, float32 at
    least, any device), ``"triton"`` (one kernel: CUDA, or the CPU under ``TRITON_INTERPRET=1``) or
    ``"auto"`` (the kernel on CUDA for float16 / bfloat16 / float32 inputs with head dim <= 256, see
    ``AUTO_ASSIGN_KERNEL``; else the reference). Either way a token's id does not depend on the other
    tokens of the call (streaming), but the two backends sum over ``D`` in different orders, so they
    may differ on near-ties (a few fp32 ulps).
    """
    if backend not in ASSIGN_BACKENDS:
        raise ValueError(f"nearest_centroid: backend must be one of {ASSIGN_BACKENDS}, got {backend!r}")
    kernel_ok = x.dtype in (torch.float16, torch.bfloat16, torch.float32) and x.shape[-1] <= 256 and x.ndim == 4
    if backend == "triton" or (backend == "auto" and AUTO_ASSIGN_KERNEL and x.is_cuda and kernel_ok):
        if not kernel_ok:
            raise ValueError(f"nearest_centroid: the Triton kernel needs x [B, T, H, D<=256] in float16/bfloat16/float32, got {list(x.shape)} {x.dtype}")
        from .triton import nearest_centroid_triton

        return nearest_centroid_triton(x, centroids)
    return nearest_centroid_reference(x, centroids)


class _FusedCommitment(torch.autograd.Function):
    """``beta * mean ||LN(x) - sg(mu_c)||^2`` from the fused kernel's per-token scaled squared distances
    (``sq = beta / (B T H) * ||r - mu_c||^2``); the backward is one kernel (``route_commit_grad_triton``:
    the layer norm recomputed in registers, its backward in fp32)."""

    @staticmethod
    def forward(ctx, x, centroids, ids, sq, coef, eps):
        ctx.save_for_backward(x, centroids, ids)
        ctx.coef, ctx.eps = coef, eps
        return sq.sum().to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        from .triton import route_commit_grad_triton

        x, mu, ids = ctx.saved_tensors
        return route_commit_grad_triton(x, mu, ids, g, ctx.coef, ctx.eps), None, None, None, None, None


def route_assign_supported(x: Tensor) -> bool:
    """Whether :func:`route_assign` can run ``x`` on its kernel: CUDA (or CPU under ``TRITON_INTERPRET=1``),
    ``[B, T, H, D <= 256]`` in float16 / bfloat16 / float32."""
    return x.ndim == 4 and route_assign_supports(x.device, x.dtype, x.shape[-1])


def route_assign_supports(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """:func:`route_assign_supported` from the device, dtype and head dim alone."""
    import os

    device = torch.device(device)
    on_device = device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    return on_device and dtype in (torch.float16, torch.bfloat16, torch.float32) and head_dim <= 256


def route_assign(
    x: Tensor, centroids: Tensor, beta: float | None = None, eps: float = 1e-5, stats: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor | None]:
    """``nearest_centroid(scale_free_layer_norm(x), centroids)`` and the commitment loss, in one kernel launch.

    Args:
        x: ``[B, T, H, D]`` raw (not normalised) routing vectors, any strides with a unit last stride
            (e.g. the routing heads' slice of a projection); float16 / bfloat16 / float32.
        centroids: ``[H, C, D]``.
        beta: if given, also return ``commitment_loss(scale_free_layer_norm(x), centroids, ids, beta)``
            (a scalar in ``x``'s dtype with gradient to ``x``; summed in fp32 from the kernel's per-token
            distances; its backward is one kernel too).
        stats: ``(sums, counts)``, float32 ``[H, C, D]`` (unit last stride) and ``[H, C]``: if given, the
            kernel adds this call's ``kmeans_batch_stats(scale_free_layer_norm(x), ids, C)`` into them in
            place (fp32 atomics: the order of the additions, hence the last bits, may vary between runs).

    Returns:
        ``(ids int64 [B, T, H], loss or None)``. The normalised vectors are formed in registers only
        (rounded to ``x``'s dtype, as ``F.layer_norm`` would return them), so the ids equal
        ``nearest_centroid(scale_free_layer_norm(x), centroids, backend="triton")`` except where the
        two layer norms round a vector differently next to a tie.
    """
    if not route_assign_supported(x):
        raise ValueError(f"route_assign: needs x [B, T, H, D<=256] float16/bfloat16/float32 on CUDA (or the interpreter), got {list(x.shape)} {x.dtype} {x.device}")
    from .triton import route_assign_triton

    ids, sq, coef = route_assign_distances(x, centroids, beta, eps, stats)
    if sq is None:
        return ids, None
    return ids, _FusedCommitment.apply(x, centroids, ids, sq, coef, float(eps))


def route_assign_distances(
    x: Tensor, centroids: Tensor, beta: float | None = None, eps: float = 1e-5, stats: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor | None, float]:
    """:func:`route_assign`'s kernel without the loss's autograd node: ``(ids, sq, coef)``, ``sq [B * T, H]`` the
    per-token squared distances times ``coef = beta / (B T H)`` (None without ``beta``), no gradient. For
    :func:`rotary_commit`, which attaches the loss to the rotation so that both backwards are one kernel."""
    if not route_assign_supported(x):
        raise ValueError(f"route_assign: needs x [B, T, H, D<=256] float16/bfloat16/float32 on CUDA (or the interpreter), got {list(x.shape)} {x.dtype} {x.device}")
    from .triton import route_assign_triton

    want = beta is not None
    coef = float(beta) / max(1, x.shape[0] * x.shape[1] * x.shape[2]) if want else 1.0
    ids, sq = route_assign_triton(x, centroids, eps, loss=want, loss_coef=coef, stats=stats)
    return ids, sq, coef


def rotary_commit(q: Tensor, cos: Tensor, sin: Tensor, centroids: Tensor, ids: Tensor, sq: Tensor, coef: float,
                  eps: float = 1e-5, hl: int = 0) -> tuple[Tensor, Tensor]:
    """``(rotary_fused(q, cos, sin), commitment loss of q[:, :, hl:])`` where ``ids, sq, coef`` come from
    ``route_assign_distances(q[:, :, hl:], centroids, beta, eps)``: the same values as ``rotary_fused`` and
    ``route_assign``'s loss, but one backward kernel computes both gradients into ``q`` (rounded once)."""
    from .triton import rotary_commit_triton

    return rotary_commit_triton(q, cos, sin, centroids, ids, sq, coef, eps, hl)


def rotary_fused(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``mnemotorch.ops.rotary.apply_rotary(x, cos, sin)`` in one Triton launch (and one in the backward), for
    the inputs :func:`route_assign_supported` accepts (with an even ``D``); see ``triton.rotary_triton``."""
    from .triton import rotary_triton

    return rotary_triton(x, cos, sin)


def causal_exact_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_cluster: Tensor,
    k_cluster: Tensor,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
    num_clusters: int | None = None,
) -> Tensor:
    """Attention restricted to keys of the query's own cluster (and, if ``causal``, not after it).

    Args:
        q: ``[B, Tq, H, D]``; query ``i`` sits at absolute key position ``Tk - Tq + i``.
        k: ``[B, Tk, H, D]``; v: ``[B, Tk, H, Dv]``.
        q_cluster: ``[B, Tq, H]`` integer cluster ids of the queries; k_cluster: ``[B, Tk, H]``.
        causal: causal mask on original positions.
        scale: logit scale, default ``D ** -0.5``.
        backend: ``"reference"``, ``"torch"``, ``"block_sparse"`` (CUDA, or the CPU under
            ``TRITON_INTERPRET=1``; float16/bfloat16/float32, head dim 16..256, ``Dv == D``; any
            ``Tq <= Tk``), ``"flex"`` (= ``"triton"``; CUDA, ``Tq == Tk``, head dim a power of two in
            16..256) or ``"auto"`` (``"block_sparse"`` on CUDA where it applies and ``Tq >=
            AUTO_MIN_QUERIES``, else ``"torch"``). Pass the same tensor as ``q_cluster`` and
            ``k_cluster`` when queries and keys share clusters (and the same tensor as ``q`` and
            ``k`` with shared Q/K): the kernel paths then pack queries and keys once and skip tiles
            above the diagonal.
        num_clusters: ``C`` when every id is in ``[0, C)`` (a contract, not checked): the block-sparse
            path then sizes its layout from the shapes alone, with no host synchronisation (CUDA-graph
            capturable; see ``block_sparse.routed_layout``). Other backends ignore it.

    Returns:
        ``[B, Tq, H, Dv]``; a query with no visible key outputs 0.
    """
    fn = "causal_exact_attention"
    check_qkv(fn, q, k, v)
    if backend not in BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {BACKENDS}, got {backend!r}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"{fn}: q and k must have the same number of heads, got {q.shape[2]} and {k.shape[2]}")
    for name, c, t in (("q_cluster", q_cluster, q), ("k_cluster", k_cluster, k)):
        if not isinstance(c, Tensor) or c.shape != t.shape[:3] or c.dtype.is_floating_point or c.dtype == torch.bool:
            raise ValueError(f"{fn}: {name} must be an integer tensor of shape {list(t.shape[:3])}, got {getattr(c, 'shape', c)!r}")
    if backend == "auto":
        use_kernel = AUTO_USES_BLOCK_SPARSE and q.is_cuda and q.shape[1] >= AUTO_MIN_QUERIES and block_sparse_supported(q, v)
        backend = "block_sparse" if use_kernel else "torch"
    if backend == "reference":
        return causal_exact_attention_reference(q, k, v, q_cluster, k_cluster, causal, scale)
    if backend == "block_sparse":
        if not block_sparse_supported(q, v, interpreter=True):
            raise ValueError(
                f"{fn}: backend='block_sparse' needs CUDA tensors (or CPU ones under TRITON_INTERPRET=1), dtype float16, "
                f"bfloat16 or float32, a head dim in 16..256 and v's head dim equal to q's; got device {q.device}, "
                f"dtype {q.dtype}, D={q.shape[-1]}, Dv={v.shape[-1]}"
            )
        return causal_exact_attention_block_sparse(q, k, v, q_cluster, k_cluster, causal, scale, num_clusters=num_clusters)
    if backend in ("flex", "triton"):
        whole = q.shape[1] == k.shape[1] and v.shape[-1] == q.shape[-1]
        if not (whole and flex_supported(q)):
            raise ValueError(
                f"{fn}: backend={backend!r} (FlexAttention) needs CUDA tensors, Tq == Tk, v's head dim equal to q's and a head "
                f"dim that is a power of two in 16..256; got device {q.device}, Tq={q.shape[1]}, Tk={k.shape[1]}, "
                f"D={q.shape[-1]}, Dv={v.shape[-1]}"
            )
        return causal_exact_attention_flex(q, k, v, q_cluster, k_cluster, causal, scale)
    return causal_exact_attention_torch(q, k, v, q_cluster, k_cluster, causal, scale)


__all__ = [
    "AUTO_MIN_QUERIES",
    "AUTO_USES_BLOCK_SPARSE",
    "BACKENDS",
    "balanced_topw_assignment",
    "balanced_topw_attention",
    "block_sparse_supported",
    "causal_exact_attention",
    "causal_exact_attention_block_sparse",
    "causal_exact_attention_flex",
    "causal_exact_attention_reference",
    "causal_exact_attention_torch",
    "centroid_scores",
    "commitment_loss",
    "kmeans_batch_stats",
    "kmeans_ema_step",
    "kmeans_ema_update",
    "nearest_centroid",
    "nearest_centroid_reference",
    "rotary_fused",
    "route_assign",
    "route_assign_distances",
    "route_assign_supported",
    "rotary_commit",
    "route_assign_supports",
    "routed_layout",
    "scale_free_layer_norm",
]
