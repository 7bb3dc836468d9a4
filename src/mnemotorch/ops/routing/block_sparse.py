"""GPU path of causal-exact routing attention on the project's block-sparse Triton kernel.

Per batch row and head (a *group* ``g = b * H + h``), tokens are sorted by ``(cluster, position)``:
every cluster becomes one contiguous *segment*, and inside a segment sorted order is position order.
The groups' sorted tokens are then **packed** into one long sequence of ``N`` rows, every segment
starting at an aligned offset (zero rows pad each segment up to the alignment). In packed
coordinates the visible keys of query row ``i`` are one interval ``[lo_i, hi_i)``:

* ``lo_i`` -- the first packed key of the query's cluster (in its group);
* ``hi_i`` -- ``lo_i`` plus the number of that cluster's keys at positions ``<=`` the query's position
  (all of the cluster's keys when ``causal=False``).

This is the element rule "same cluster and ``orig_pos_k <= orig_pos_q``" of
:func:`~mnemotorch.ops.routing.causal_exact_attention`: inside a segment a key precedes a query in
position iff it precedes it in packed order. Both ``lo`` and ``hi`` are non-decreasing over the
packed rows, segments never share a query tile (query segments are aligned to the query tile) and
key segments start on key-tile boundaries, so for query tile ``qb`` (rows ``q0 .. q1 - 1``):

* it visits key tiles ``lo_{q0} / BN .. ceil(hi_{q1-1} / BN) - 1`` (its cluster, up to its own end);
* the *full* ones are those below ``hi_{q0} / BN`` (every row sees every column), the rest are
  *partial* (the element mask: column ``< hi`` of the row);
* the transposed lists (per key tile, the query tiles visiting it) are contiguous ranges too, found
  by ``searchsorted`` on the three non-decreasing per-tile arrays.

Everything is built in O(N / BM * nnz) time and memory (no ``L x L`` tensor, no Python loop over heads
or tiles): here with vectorised torch ops (the specification, and the CPU path), on CUDA by the few
fused kernels of ``triton.py`` (``routed_layout(..., impl=...)``; tested equal). With shared clusters and ``Tq == Tk``
(shared Q/K, the causal-LM case), queries and keys share one packing, ``hi_i = i + 1``, and the
partial tiles are the ``BM / BN`` diagonal tiles of a causal mask: the same few mask tiles serve every
query tile, so no per-tile mask is stored. Otherwise the partial tiles' masks are computed on the
device (``BM x BN`` bytes each).

The kernel then runs once over the packed sequence (one "head", the lists shared by all its rows),
and the outputs are gathered back to ``[B, Tq, H, D]``. Packing and unpacking are row copies with
index tensors (``index_copy`` / ``index_select``), whose backward is the opposite copy.

Host synchronisations: none when the number of clusters ``C`` is given (``num_clusters``; the layer
always passes it): every size is then a static bound computed from the shapes alone
(:func:`static_layout_sizes`), and the rows, tiles and list entries past the real ones are padding
that the kernels skip (padding query tiles have empty lists, padding rows the empty interval
``[N_k, N_k)``). Nothing on the path reads a device value on the host, so the layer's forward and
backward can be captured in a CUDA graph. Without ``num_clusters`` the sizes are the exact ones, read
back from the device: one synchronisation (packed lengths, longest segment) with shared clusters and
the causal mask, two (plus the list widths and the number of partial tiles) otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from ..block_sparse import BlockSparsePattern, block_sparse_attention

#: Query / key tile sizes of the kernel (``BM`` / ``BN``); ``BM`` must be a multiple of ``BN``.
Q_BLOCK = 128
K_BLOCK = 64
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def block_sparse_supported(q: Tensor, v: Tensor | None = None, interpreter: bool = False) -> bool:
    """Whether :func:`causal_exact_attention_block_sparse` can run these inputs on the kernel.

    CUDA tensors (or, with ``interpreter``, CPU tensors under ``TRITON_INTERPRET=1``), dtype
    float16 / bfloat16 / float32, head dim 16..256, ``v``'s head dim equal to ``q``'s, Triton importable.
    """
    on_device = q.is_cuda or (interpreter and q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    if not on_device or q.dtype not in SUPPORTED_DTYPES or not 16 <= q.shape[-1] <= 256:
        return False
    if v is not None and v.shape[-1] != q.shape[-1]:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class RoutedLayout:
    """Where every token goes in the packed sequence, and the kernel's block lists over it.

    Attributes:
        pattern: block lists over ``(q_len, k_len)`` packed rows (one head); ``pattern.predicate``
            is the element rule ``row_lo[i] <= j < row_hi[i]``.
        q_rows: ``int64 [B * Tq * H]`` packed row of each query, in ``[B, Tq, H]`` (row-major) order.
        k_rows: ``int64 [B * Tk * H]`` packed row of each key (the same tensor as ``q_rows`` when shared).
        row_lo, row_hi: ``int64 [q_len]`` the visible key interval of every packed query row (padding
            rows included: they repeat their segment's last real row, or, when shared and causal, see
            their own prefix; their outputs are discarded).
        shared: queries and keys share one packing (shared clusters, ``Tq == Tk``).
        q_src, k_src: ``int64 [q_len]`` / ``[k_len]`` the token (index into ``q_rows`` / ``k_rows``) of
            every packed row, -1 for padding rows (the same tensor when shared): the row kernels'
            gather map (packing is a gather over rows, so every packed row is written once).
    """

    pattern: BlockSparsePattern
    q_rows: Tensor
    k_rows: Tensor
    row_lo: Tensor
    row_hi: Tensor
    shared: bool
    q_src: Tensor | None = None
    k_src: Tensor | None = None

    @property
    def q_len(self) -> int:
        return self.pattern.q_len

    @property
    def k_len(self) -> int:
        return self.pattern.k_len


def _group_major(cluster: Tensor) -> Tensor:
    """``[B, T, H]`` ids -> ``[B * H, T]`` int64."""
    b, t, h = cluster.shape
    return cluster.permute(0, 2, 1).to(torch.int64).contiguous().view(b * h, t)


def _packed_bound(groups: int, t: int, num_clusters: int, align: int) -> int:
    """Largest packed length of ``groups`` groups of ``t`` tokens in at most ``num_clusters`` clusters, every
    segment padded to a multiple of ``align``: a group of ``S`` non-empty segments takes at most
    ``S + floor((t - S) / align)`` tiles (non-decreasing in ``S``, so ``S = min(C, t)`` is the worst)."""
    s = min(num_clusters, t)
    return groups * align * (s + (t - s) // align)


@dataclass(frozen=True)
class LayoutSizes:
    """Static sizes of a layout (:func:`static_layout_sizes`): packed lengths, list widths, mask tiles."""

    q_len: int
    k_len: int
    w_full: int
    w_part: int
    w_t_full: int
    w_t_part: int
    n_tiles: int


def static_layout_sizes(
    b: int, tq: int, tk: int, h: int, num_clusters: int, shared: bool, causal: bool, q_block: int = Q_BLOCK, k_block: int = K_BLOCK
) -> LayoutSizes:
    """Upper bounds of every size of :func:`routed_layout`, from the shapes alone (no device value).

    With ids in ``[0, num_clusters)`` (at most ``C`` segments per group):

    * packed lengths: :func:`_packed_bound` per side (``k_len >= q_len``, as the kernel wants);
    * a segment holds at most ``T`` tokens, so it spans at most ``ceil(T / align) * align / BN`` key
      tiles and ``ceil(Tq / BM)`` query tiles: the widths of the forward and transposed lists
      (shared and causal: ``(S - BM) / BN`` full and ``BM / BN`` diagonal tiles, ``S / BM - 1`` and 1
      transposed, ``S`` the longest padded segment);
    * partial mask tiles (generic layouts): ``hi`` is non-decreasing over the packed rows, so the
      partial ranges ``[hi_{q0} / BN, ceil(hi_{q1-1} / BN))`` of successive query tiles overlap in at
      most one key tile: at most ``n_q_tiles + n_k_tiles`` of them.
    """
    bm, bn, g = q_block, k_block, b * h
    canonical = shared and causal
    if shared:
        nq = nk = _packed_bound(g, tk, num_clusters, bm)
        k_align = bm
    else:
        nq = _packed_bound(g, tq, num_clusters, bm)
        nk = max(_packed_bound(g, tk, num_clusters, bn), nq)
        k_align = bn
    if canonical:
        max_seg = -(-tk // bm) * bm
        w = ((max_seg - bm) // bn, bm // bn, max_seg // bm - 1, 1)
        n_tiles = 0
    else:
        k_tiles = -(-tk // k_align) * k_align // bn
        q_tiles = -(-tq // bm)
        w = (k_tiles, k_tiles, q_tiles, q_tiles)
        n_tiles = min(nq // bm * k_tiles, nq // bm + nk // bn)
    w = tuple(max(1, int(x)) for x in w)
    return LayoutSizes(nq, nk, *w, n_tiles)


def _sort(cluster_g: Tensor, mult: int, first_pos: int) -> tuple[Tensor, Tensor]:
    """Sort ``[G, n]`` ids by (cluster, position): composite keys ``cluster * mult + position`` and the
    permutation (sorted index -> original index). Positions are ``first_pos + t``, below ``mult``."""
    n = cluster_g.shape[1]
    pos = torch.arange(first_pos, first_pos + n, device=cluster_g.device)
    return torch.sort(cluster_g * mult + pos, dim=-1)


def _segments(sorted_key: Tensor, mult: int, align: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Pack sorted ``[G, n]`` composite keys: each (group, cluster) segment starts at a multiple of ``align``.

    Returns ``dest [G, n]`` (packed row of each sorted element), ``seg_start [G, n]`` (packed row of
    its segment's first element), ``group_end [G]`` (packed end of each group), and 0-d tensors
    ``total`` (packed length) and ``max_seg`` (longest padded segment).
    """
    g, n = sorted_key.shape
    dev = sorted_key.device
    cl = torch.div(sorted_key, mult, rounding_mode="floor")
    new = torch.ones_like(cl, dtype=torch.bool)
    new[:, 1:] = cl[:, 1:] != cl[:, :-1]
    last = torch.ones_like(new)
    last[:, :-1] = new[:, 1:]
    ar = torch.arange(n, device=dev)
    rank = ar - torch.where(new, ar, 0).cummax(-1).values
    seg_len = torch.where(last, rank + 1, 0)
    pad = torch.remainder(-seg_len, align)  # 0 where not last
    flat = pad.reshape(-1)
    extra = (flat.cumsum(0) - flat).view(g, n)
    dest = torch.arange(g * n, device=dev).view(g, n) + extra
    seg_start = dest - rank
    group_end = dest[:, -1] + 1 + pad[:, -1]
    return dest, seg_start, group_end, group_end[-1], (seg_len + pad).max()


def _to_token_order(dest: Tensor, perm: Tensor, b: int, h: int) -> Tensor:
    """``dest [G, n]`` in sorted order -> packed rows in ``[B, n, H]`` row-major token order."""
    orig = torch.empty_like(dest).scatter_(1, perm, dest)
    return orig.view(b, h, -1).permute(0, 2, 1).reshape(-1)


def _fill_rows(n_rows: int, dest: Tensor, *values: Tensor) -> list[Tensor]:
    """Scatter per-token ``values`` ([G, n], sorted order) to their packed rows; padding rows take the
    value of the nearest real row before them (the last real row of their segment)."""
    src = torch.full((n_rows,), -1, dtype=torch.int64, device=dest.device)
    src.index_copy_(0, dest.reshape(-1), torch.arange(dest.numel(), device=dest.device))
    src = src.cummax(0).values
    return [v.reshape(-1)[src] for v in values]


def _ranges(start: Tensor, count: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Padded index lists ``int32 [n, width]`` of the ranges ``start .. start + count - 1`` (padding -1)."""
    ar = torch.arange(width, device=start.device)
    valid = ar[None, :] < count[:, None]
    return torch.where(valid, start[:, None] + ar, -1).to(torch.int32), valid


def routed_layout(
    q_cluster: Tensor,
    k_cluster: Tensor,
    causal: bool = True,
    q_block: int = Q_BLOCK,
    k_block: int = K_BLOCK,
    impl: str = "auto",
    num_clusters: int | None = None,
) -> RoutedLayout:
    """Packed layout and block lists of causal-exact routing attention (see the module docstring).

    Args:
        q_cluster: ``[B, Tq, H]`` integer cluster ids of the queries (query ``i`` sits at key position
            ``Tk - Tq + i``).
        k_cluster: ``[B, Tk, H]`` ids of the keys; pass the same tensor object as ``q_cluster`` when
            queries and keys share clusters (then one packing serves both).
        causal: key visible only at positions ``<=`` the query's.
        q_block, k_block: kernel tiles (``q_block`` a multiple of ``k_block``).
        impl: ``"torch"`` (vectorised torch ops: the specification, ~100 small launches),
            ``"triton"`` (a few fused kernels, ``triton.py``: CUDA, or the CPU under
            ``TRITON_INTERPRET=1``) or ``"auto"`` (``"triton"`` on CUDA). Both give the same tensors
            (the mask tiles past the real ones aside: zeros here, unwritten by the kernels).
        num_clusters: ``C``, if every id is in ``[0, C)`` (the layer's case): sizes are then the static
            bounds of :func:`static_layout_sizes` and nothing is read back from the device (no host
            synchronisation; the kernels also replace the sort by a counting sort for ``C <= 256``).
            Ids outside ``[0, C)`` then break the layout: this is a contract, not checked (a check would
            be a synchronisation). ``None``: exact sizes, read back from the device.

    Cost: O(B H T log T) for the sort, O(N / BM * nnz) for the lists; no ``T x T`` tensor.
    """
    if q_block % k_block:
        raise ValueError(f"routed_layout: q_block ({q_block}) must be a multiple of k_block ({k_block})")
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"routed_layout: impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if q_cluster.shape[1] == 0:
        raise ValueError("routed_layout: no queries")
    if num_clusters is not None and (not isinstance(num_clusters, int) or isinstance(num_clusters, bool) or num_clusters < 1):
        raise ValueError(f"routed_layout: num_clusters must be an int >= 1 or None, got {num_clusters!r}")
    if impl == "triton" or (impl == "auto" and q_cluster.is_cuda):
        from .triton import routed_layout_triton

        return routed_layout_triton(q_cluster, k_cluster, causal, q_block, k_block, num_clusters)
    return _routed_layout_torch(q_cluster, k_cluster, causal, q_block, k_block, num_clusters)


def _routed_layout_torch(
    q_cluster: Tensor, k_cluster: Tensor, causal: bool, q_block: int, k_block: int, num_clusters: int | None = None
) -> RoutedLayout:
    b, tq, h = q_cluster.shape
    tk = k_cluster.shape[1]
    dev = q_cluster.device
    bm, bn = q_block, k_block
    shared = q_cluster is k_cluster and tq == tk
    static = None if num_clusters is None else static_layout_sizes(b, tq, tk, h, num_clusters, shared, causal, bm, bn)
    kc = _group_major(k_cluster)
    skey, kperm = _sort(kc, tk, 0)
    if shared:
        kdest, kstart, kend, total, max_seg = _segments(skey, tk, bm)
        q_total = total
        if static is None:
            nq = nk = int(total)  # host sync 1
            max_seg = int(max_seg)
        else:
            nq, nk = static.q_len, static.k_len
        qdest, qperm, sq = kdest, kperm, skey
    else:
        kdest, kstart, kend, k_total, _ = _segments(skey, tk, bn)
        qc = _group_major(q_cluster)
        sq, qperm = _sort(qc, tk, tk - tq)
        qdest, _, _, q_total, _ = _segments(sq, tk, bm)
        if static is None:
            nq, nk = torch.stack([q_total, k_total]).tolist()  # host sync 1
            # block_sparse_attention wants k_len >= q_len: trailing key tiles that no query visits
            nk = max(nk, nq)
        else:
            nq, nk = static.q_len, static.k_len

    if shared and causal:
        # hi_i = i + 1 on every packed row; lo = the segment start (padding rows are in their segment)
        (row_lo,) = _fill_rows(nq, qdest, kstart)
        row_hi = torch.arange(1, nq + 1, device=dev)
    else:
        cq = torch.div(sq, tk, rounding_mode="floor")
        lo_rel = torch.searchsorted(skey, cq * tk)
        hi_rel = torch.searchsorted(skey, sq, right=True) if causal else torch.searchsorted(skey, (cq + 1) * tk)
        # packed start of the cluster's key segment; a cluster without keys gets an empty interval at
        # the place its segment would have (so lo and hi stay non-decreasing)
        k_ext = torch.cat([kstart, kend[:, None]], dim=1)
        lo = k_ext.gather(1, lo_rel)
        hi = lo + (hi_rel - lo_rel)
        row_lo, row_hi = _fill_rows(nq, qdest, lo, hi)
    if static is not None:
        # the rows past the packed length (static sizes): the empty interval [nk, nk), so lo and hi stay
        # non-decreasing and the padding query tiles visit nothing
        tail = torch.arange(nq, device=dev) >= q_total
        row_lo = torch.where(tail, nk, row_lo)
        row_hi = torch.where(tail, nk, row_hi)

    n_qb, n_kb = nq // bm, nk // bn
    lo_b = row_lo[0::bm]
    kb_start = lo_b // bn
    f_end = row_hi[0::bm] // bn
    p_end = (row_hi[bm - 1 :: bm] + bn - 1) // bn
    n_full, n_part = f_end - kb_start, p_end - f_end
    kbs = torch.arange(n_kb, device=dev)
    tf_lo = torch.searchsorted(f_end, kbs, right=True)
    t_n_full = (torch.searchsorted(kb_start, kbs, right=True) - tf_lo).clamp(min=0)
    tp_lo = torch.searchsorted(p_end, kbs, right=True)
    t_n_part = (tf_lo - tp_lo).clamp(min=0)

    canonical = shared and causal
    if static is not None:
        w_f, w_p, w_tf, w_tp, n_tiles = static.w_full, static.w_part, static.w_t_full, static.w_t_part, static.n_tiles
    elif canonical:
        # widths from the longest segment: query tile j of a segment has j * BM / BN full tiles and
        # BM / BN diagonal ones; a key tile is full for the later query tiles of its segment
        w_f, w_p, w_tf, w_tp, n_tiles = (max_seg - bm) // bn, bm // bn, max_seg // bm - 1, 1, 0
    else:
        w_f, w_p, w_tf, w_tp, n_tiles = torch.stack(
            [n_full.max(), n_part.max(), t_n_full.max(), t_n_part.max(), n_part.sum()]
        ).tolist()  # host sync 2
    w_f, w_p, w_tf, w_tp = (max(1, int(w)) for w in (w_f, w_p, w_tf, w_tp))

    full_idx, _ = _ranges(kb_start, n_full, w_f)
    part_idx, part_valid = _ranges(f_end, n_part, w_p)
    t_full_idx, _ = _ranges(tf_lo, t_n_full, w_tf)
    t_part_idx, t_part_valid = _ranges(tp_lo, t_n_part, w_tp)
    ar_p = torch.arange(w_p, device=dev)
    ar_tp = torch.arange(w_tp, device=dev)
    if canonical:
        # diagonal tile d (key tile f_end + d of query tile q0 / BM, f_end = q0 / BN): column c <= row r - d * BN
        r = torch.arange(bm, device=dev)[:, None]
        c = torch.arange(bn, device=dev)[None, :]
        tiles = torch.stack([(d * bn + c <= r) for d in range(bm // bn)]).view(torch.int8)
        part_tile = torch.where(part_valid, ar_p, -1).to(torch.int32)
        t_part_tile = torch.where(t_part_valid, (kbs % (bm // bn))[:, None] + 0 * ar_tp, -1).to(torch.int32)
    else:
        tile_base = n_part.cumsum(0) - n_part
        part_tile = torch.where(part_valid, tile_base[:, None] + ar_p, -1).to(torch.int32)
        qb_t = (tp_lo[:, None] + ar_tp).clamp(max=max(n_qb - 1, 0))
        t_part_tile = torch.where(t_part_valid, tile_base[qb_t] + (kbs[:, None] - f_end[qb_t]), -1).to(torch.int32)
        if n_tiles:
            # the query tile of every tile id (ids past the real ones: none, their tiles all False)
            ids = torch.arange(n_tiles, device=dev)
            tile_qb = torch.searchsorted(tile_base + n_part, ids, right=True)
            real = tile_qb < n_qb
            tile_qb = tile_qb.clamp(max=n_qb - 1)
            kb_t = f_end[tile_qb] + ids - tile_base[tile_qb]
            cols = kb_t[:, None, None] * bn + torch.arange(bn, device=dev)[None, None, :]
            tiles = ((cols < row_hi.view(n_qb, bm)[tile_qb][:, :, None]) & real[:, None, None]).view(torch.int8)
        else:
            tiles = torch.zeros(1, bm, bn, dtype=torch.int8, device=dev)

    pattern = BlockSparsePattern(
        nq, nk, bm, bn,
        full_idx, n_full.to(torch.int32), part_idx, part_tile, n_part.to(torch.int32), tiles,
        t_full_idx, t_n_full.to(torch.int32), t_part_idx, t_part_tile, t_n_part.to(torch.int32),
        interval_predicate(row_lo, row_hi),
    )
    q_rows = _to_token_order(qdest, qperm, b, h)
    k_rows = q_rows if shared else _to_token_order(kdest, kperm, b, h)
    q_src = _sources(q_rows, nq)
    k_src = q_src if shared else _sources(k_rows, nk)
    return RoutedLayout(pattern, q_rows, k_rows, row_lo, row_hi, shared, q_src, k_src)


def _sources(rows: Tensor, n: int) -> Tensor:
    """The inverse of a token -> packed row map: ``int64 [n]``, -1 where no token lands (padding)."""
    return torch.full((n,), -1, dtype=torch.int64, device=rows.device).index_copy_(0, rows, torch.arange(rows.numel(), device=rows.device))


def interval_predicate(row_lo: Tensor, row_hi: Tensor):
    """The element rule of a layout: key ``j`` visible to packed query row ``i`` iff ``lo_i <= j < hi_i``."""
    n = row_lo.shape[0]

    def allowed(qi: Tensor, kj: Tensor) -> Tensor:
        i = qi.clamp(0, n - 1).to(row_lo.device)
        j = kj.to(row_lo.device)
        return ((j >= row_lo[i]) & (j < row_hi[i])).to(qi.device)

    return allowed


def _pack(x: Tensor, rows: Tensor, n: int) -> Tensor:
    """``x [B, T, H, D]`` -> ``[1, n, 1, D]`` with token ``(b, t, h)`` at packed row ``rows[(b*T + t)*H + h]``;
    padding rows are zeros (finite: padding queries' outputs are discarded, but must not be NaN)."""
    d = x.shape[-1]
    return x.new_zeros(n, d).index_copy(0, rows, x.reshape(-1, d)).view(1, n, 1, d)


def causal_exact_attention_block_sparse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_cluster: Tensor,
    k_cluster: Tensor,
    causal: bool = True,
    scale: float | None = None,
    q_block: int = Q_BLOCK,
    k_block: int = K_BLOCK,
    backend: str = "triton",
    num_clusters: int | None = None,
) -> Tensor:
    """Same contract as :func:`mnemotorch.ops.routing.causal_exact_attention`, on the block-sparse kernel.

    Args:
        q: ``[B, Tq, H, D]``; k: ``[B, Tk, H, D]``; v: ``[B, Tk, H, D]`` (``Tq <= Tk``: queries are the last
            ``Tq`` positions).
        q_cluster, k_cluster: ``[B, Tq, H]`` / ``[B, Tk, H]`` integer ids (the same tensor object when
            shared, and then ``k is q`` packs the queries once and uses them as keys).
        causal, scale: as in ``causal_exact_attention``.
        q_block, k_block: kernel tiles (tests use small ones).
        backend: ``"triton"`` (the kernel; CUDA, or CPU under ``TRITON_INTERPRET=1``) or
            ``"reference"`` (the block-sparse op's dense reference over the packed rows: tests only).
        num_clusters: ``C`` when every id is in ``[0, C)``: static sizes, no host synchronisation
            (see :func:`routed_layout`).

    Returns:
        ``[B, Tq, H, D]``; a query with no visible key outputs 0.
    """
    b, tq, h, _ = q.shape
    dv = v.shape[-1]
    if tq == 0:
        return q.new_zeros(b, 0, h, dv)
    layout = routed_layout(q_cluster, k_cluster, causal, q_block, k_block, num_clusters=num_clusters)
    if backend == "triton" and layout.q_src is not None and dv == q.shape[-1]:
        # row kernels (triton.py): one launch packs q (and v when they share the packing), one gathers
        # the output back; their backwards are the opposite gathers (padding rows get zero gradient)
        from .triton import PackRows, UnpackRows

        nq, nk, d = layout.q_len, layout.k_len, q.shape[-1]
        if k is q and layout.shared:
            # kp: a view of qp, so that the query and key gradients are summed by the unpacking gather
            qp, kp, vp = PackRows.apply(layout.q_src, layout.q_rows, nq, True, q, v)
        elif layout.shared:
            qp, kp, vp = (*PackRows.apply(layout.q_src, layout.q_rows, nq, False, q, k), PackRows.apply(layout.k_src, layout.k_rows, nk, False, v)[0])
        else:
            (qp,) = PackRows.apply(layout.q_src, layout.q_rows, nq, False, q)
            kp, vp = PackRows.apply(layout.k_src, layout.k_rows, nk, False, k, v)
        out = block_sparse_attention(qp.view(1, nq, 1, d), kp.view(1, nk, 1, d), vp.view(1, nk, 1, d), layout.pattern, scale, backend=backend)
        return UnpackRows.apply(layout.q_src, layout.q_rows, out.view(nq, dv), (b, tq, h, dv))
    qp = _pack(q, layout.q_rows, layout.q_len)
    kp = qp if (k is q and layout.shared) else _pack(k, layout.k_rows, layout.k_len)
    vp = _pack(v, layout.k_rows, layout.k_len)
    out = block_sparse_attention(qp, kp, vp, layout.pattern, scale, backend=backend)  # [1, Nq, 1, Dv]
    return out.view(-1, dv).index_select(0, layout.q_rows).view(b, tq, h, dv)


__all__ = [
    "K_BLOCK",
    "LayoutSizes",
    "Q_BLOCK",
    "RoutedLayout",
    "block_sparse_supported",
    "causal_exact_attention_block_sparse",
    "routed_layout",
    "static_layout_sizes",
]
