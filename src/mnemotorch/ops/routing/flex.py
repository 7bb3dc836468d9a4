"""GPU path of causal-exact routing attention: sort by cluster, then block-sparse FlexAttention.

Per batch row and head, queries are sorted by ``(cluster, position)`` and so are keys. Each cluster
becomes one contiguous segment of the sorted order, and inside a segment the sorted order is the
position order. The visible pairs are then a block-diagonal (document) pattern in sorted
coordinates, with the causal rule inside each block, so whole ``128 x 128`` tiles can be skipped:

* a tile is visited iff the cluster range of its query rows overlaps that of its key columns
  (and, with shared queries/keys under the causal mask, the key tile is not after the query tile);
* a visited tile is *full* (no mask work) iff all its rows and columns are in one cluster and, when
  causal, every key precedes every query (shared Q/K: the key tile lies strictly before the query tile);
* the element rule of the partial tiles: same cluster and key position <= query position.

The block lists are computed on the GPU with O(B * H * (T/128)^2) work; nothing is ``T x T``.
Outputs are scattered back to the original order. A query with no visible key outputs 0.

Only for whole sequences (``Tq == Tk``): streaming continuations use the SDPA path.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 128
_compiled = None


def flex_supported(q: Tensor) -> bool:
    """Whether :func:`causal_exact_attention_flex` can run these inputs (CUDA, FlexAttention, head dim)."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    d = q.shape[-1]
    if d < 16 or d > 256 or d & (d - 1):
        return False
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _flex():
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def _sorted_order(cluster: Tensor) -> Tensor:
    """``cluster [B, H, T]`` -> permutation ``[B, H, T]`` sorting by (cluster, position)."""
    t = cluster.shape[-1]
    pos = torch.arange(t, device=cluster.device)
    return torch.argsort(cluster.to(torch.int64) * t + pos, dim=-1)


def _block_ends(sorted_cluster: Tensor, n_blocks: int) -> tuple[Tensor, Tensor]:
    """Cluster of the first and last element of every block of the sorted ids ``[B, H, T]``."""
    t = sorted_cluster.shape[-1]
    first = torch.arange(n_blocks, device=sorted_cluster.device) * BLOCK
    last = (first + BLOCK - 1).clamp(max=t - 1)
    return sorted_cluster[..., first], sorted_cluster[..., last]


def _lists(mask: Tensor) -> tuple[Tensor, Tensor]:
    """``bool [B, H, nQ, nK]`` -> (counts ``int32 [B, H, nQ]``, indices ``int32 [B, H, nQ, nK]``, True ones first)."""
    counts = mask.sum(-1, dtype=torch.int32)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts, order


def sorted_block_lists(q_cluster: Tensor, k_cluster: Tensor, causal: bool = True) -> dict[str, Tensor]:
    """Sort orders and tile lists of the sorted-by-cluster pattern (see the module docstring).

    Args:
        q_cluster, k_cluster: ``[B, T, H]`` cluster ids (the same tensor object when queries and
            keys share clusters, which enables the causal pruning above the diagonal).

    Returns:
        ``qperm, kperm [B, H, T]`` (sorted index -> original position), ``sqc, skc [B, H, T]`` (sorted
        cluster ids), ``kv_num [B, H, nQ]``, ``kv_idx [B, H, nQ, nK]`` (partial tiles) and
        ``full_num``, ``full_idx`` (full tiles), in FlexAttention's ``BlockMask.from_kv_blocks`` layout.
    """
    shared = q_cluster is k_cluster
    t = q_cluster.shape[1]
    qc = q_cluster.permute(0, 2, 1)  # [B, H, T]
    kc = qc if shared else k_cluster.permute(0, 2, 1)
    qperm = _sorted_order(qc)
    kperm = qperm if shared else _sorted_order(kc)
    sqc = qc.gather(-1, qperm)
    skc = sqc if shared else kc.gather(-1, kperm)

    n = -(-t // BLOCK)
    q_lo, q_hi = _block_ends(sqc, n)
    k_lo, k_hi = (q_lo, q_hi) if shared else _block_ends(skc, n)
    # [B, H, nQ, nK]: cluster ranges overlap (ids are sorted inside every block)
    visit = (q_lo[..., :, None] <= k_hi[..., None, :]) & (k_lo[..., None, :] <= q_hi[..., :, None])
    idx = torch.arange(n, device=qc.device)
    one_cluster = (q_lo[..., :, None] == q_hi[..., :, None]) & (k_lo[..., None, :] == k_hi[..., None, :]) & (q_lo[..., :, None] == k_lo[..., None, :])
    if causal and shared:
        visit = visit & (idx[None, :] <= idx[:, None])
        full = one_cluster & (idx[None, :] < idx[:, None])
    elif causal:
        full = torch.zeros_like(visit)
    else:
        full = one_cluster
    # the last tile is ragged: keep it partial so the kernel masks the padding
    if t % BLOCK:
        full[..., -1, :] = False
        full[..., :, -1] = False
    kv_num, kv_idx = _lists(visit & ~full)
    full_num, full_idx = _lists(full)
    return {"qperm": qperm, "kperm": kperm, "sqc": sqc, "skc": skc, "kv_num": kv_num, "kv_idx": kv_idx, "full_num": full_num, "full_idx": full_idx}


def causal_exact_attention_flex(
    q: Tensor, k: Tensor, v: Tensor, q_cluster: Tensor, k_cluster: Tensor, causal: bool = True, scale: float | None = None
) -> Tensor:
    """Same contract as :func:`mnemotorch.ops.routing.causal_exact_attention` for ``Tq == Tk``.

    Args:
        q, k, v: ``[B, T, H, D]``; q_cluster, k_cluster: ``[B, T, H]`` (the same tensor object when
            queries and keys share their clusters, which enables the causal tile pruning).
    """
    from torch.nn.attention.flex_attention import BlockMask

    t = q.shape[1]
    lists = sorted_block_lists(q_cluster, k_cluster, causal)
    qperm, kperm = lists["qperm"], lists["kperm"]
    pad = -(-t // BLOCK) * BLOCK - t
    # padded ids never match (-1 vs -2) and padded positions are never "before" anything
    sqc_p = torch.nn.functional.pad(lists["sqc"], (0, pad), value=-1)
    skc_p = torch.nn.functional.pad(lists["skc"], (0, pad), value=-2)
    qpos_p = torch.nn.functional.pad(qperm, (0, pad), value=-1)
    kpos_p = torch.nn.functional.pad(kperm, (0, pad), value=t)

    if causal:
        def mask_mod(bi, hi, qi, kj):
            return (sqc_p[bi, hi, qi] == skc_p[bi, hi, kj]) & (kpos_p[bi, hi, kj] <= qpos_p[bi, hi, qi])
    else:
        def mask_mod(bi, hi, qi, kj):
            return sqc_p[bi, hi, qi] == skc_p[bi, hi, kj]

    block_mask = BlockMask.from_kv_blocks(
        lists["kv_num"], lists["kv_idx"], lists["full_num"], lists["full_idx"], BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(t, t)
    )

    def sort_heads(x: Tensor, perm: Tensor) -> Tensor:
        xh = x.permute(0, 2, 1, 3)  # [B, H, T, D]
        return xh.gather(2, perm[..., None].expand(-1, -1, -1, xh.shape[-1]))

    qs, ks, vs = sort_heads(q, qperm), sort_heads(k, kperm), sort_heads(v, kperm)
    out = _flex()(qs, ks, vs, block_mask=block_mask, scale=scale)  # [B, H, T, Dv], sorted queries
    # back to the original order: qperm is a permutation, so every row of the (uninitialised) target
    # is written exactly once; in place, so no zero fill and no second [B, H, T, Dv] buffer (the
    # out-of-place ``zeros_like(out).scatter`` allocated and filled both)
    out = torch.empty_like(out).scatter_(2, qperm[..., None].expand(-1, -1, -1, out.shape[-1]), out)
    return out.permute(0, 2, 1, 3)
