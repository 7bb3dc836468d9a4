"""Block-sparse attention patterns: which key blocks each query block visits, and how.

A pattern over ``Lq`` queries and ``Lk`` keys, tiled in blocks of ``q_block x k_block``, lists for
every query block the key blocks to visit, split into

* **full** blocks -- every (query, key) pair in the tile is allowed: no mask work in the kernel;
* **partial** blocks -- some pairs are allowed: the kernel applies an element mask. The mask of each
  partial tile is stored once, as a ``[q_block, k_block]`` boolean tile in ``tiles``.

plus the *transposed* lists (for every key block, the query blocks that visit it, with the same tile
ids) that the backward pass needs for dK/dV. This is the structure of FlexAttention's BlockMask; it
is built in O(L/B * nnz) time and memory by asking the pattern only about *candidate* blocks, never
by materialising an ``Lq x Lk`` mask.

Patterns are the same for every batch row and head (document masks that differ per row can be
expressed by building one pattern per row and stacking; see ``stack_patterns``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Iterable

import torch
from torch import Tensor

#: ``allowed(q_idx [n, 1], k_idx [1, m]) -> bool [n, m]`` -- the element-level rule of a pattern.
Predicate = Callable[[Tensor, Tensor], Tensor]
#: ``candidates(query_block) -> iterable of key-block indices`` that may contain allowed pairs.
Candidates = Callable[[int], Iterable[int]]


@dataclass
class BlockSparsePattern:
    """Block lists of a sparsity pattern (see the module docstring).

    Attributes (``nQ = ceil(Lq / q_block)``, ``nK = ceil(Lk / k_block)``):
        q_len, k_len, q_block, k_block: sizes.
        full_idx: ``int32 [nQ, max_full]`` key-block ids of the full blocks (padding: -1).
        full_cnt: ``int32 [nQ]``.
        part_idx: ``int32 [nQ, max_part]`` key-block ids of the partial blocks (padding: -1).
        part_tile: ``int32 [nQ, max_part]`` index into ``tiles`` of each partial block.
        part_cnt: ``int32 [nQ]``.
        tiles: ``bool [n_tiles, q_block, k_block]`` element masks of the partial blocks
            (rows/columns past the end of the sequence are False).
        t_full_idx, t_full_cnt, t_part_idx, t_part_tile, t_part_cnt: the transposed lists, per key
            block: the query blocks visiting it (``[nK, ...]``).
        predicate: the element rule the lists were built from (kept for references and tests).
        causal_window: set by :func:`sliding_window_pattern` (and ``sink_window_pattern`` without
            sinks): the pattern is exactly ``i + Lk - Lq - W < j <= i + Lk - Lq`` with
            ``W = causal_window`` (``k_len`` for plain causal), which lets the kernels take the
            list-free sliding-window fast path (``swa_triton.py``). ``None`` for every other pattern;
            a pattern whose lists are edited must drop it.
        na1d: set by :func:`~mnemotorch.ops.block_sparse.neighborhood_pattern` for a plain 1-D
            neighborhood (dilation 1, stride 1, no tiling): ``(kernel_size, causal)``. With
            ``MNEMO_NA1D_KERNEL`` (default: on CUDA) the kernels then take the list-free NA-1D path (causal: the
            sliding-window path, which equals it). ``None`` otherwise; edited lists must drop it.
    """

    q_len: int
    k_len: int
    q_block: int
    k_block: int
    full_idx: Tensor
    full_cnt: Tensor
    part_idx: Tensor
    part_tile: Tensor
    part_cnt: Tensor
    tiles: Tensor
    t_full_idx: Tensor
    t_full_cnt: Tensor
    t_part_idx: Tensor
    t_part_tile: Tensor
    t_part_cnt: Tensor
    predicate: Predicate | None = None
    causal_window: int | None = None
    na1d: tuple[int, bool] | None = None

    @property
    def num_q_blocks(self) -> int:
        return self.full_cnt.shape[0]

    @property
    def num_k_blocks(self) -> int:
        return self.t_full_cnt.shape[0]

    def to(self, device: torch.device | str) -> "BlockSparsePattern":
        moved = {f.name: (getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), Tensor) else getattr(self, f.name))
                 for f in fields(self)}
        return BlockSparsePattern(**moved)

    def on_device(self, device: torch.device | str) -> "BlockSparsePattern":
        """``self.to(device)``, made once and kept on this pattern (for a pattern built on one
        device and used on another call after call, e.g. a module's CPU-built pattern with CUDA
        inputs: one host-to-device copy of the lists instead of one per call). The copy is redone
        when a field has been replaced since; patterns are not meant to be edited in place."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        cache = self.__dict__.setdefault("_on_device", {})
        src = tuple(getattr(self, f.name) for f in fields(self))
        hit = cache.get(device)
        if hit is not None and len(hit[0]) == len(src) and all(a is b for a, b in zip(hit[0], src)):
            return hit[1]
        moved = self.to(device)
        cache[device] = (src, moved)
        return moved

    def computed_pairs(self) -> int:
        """(query, key) pairs inside visited blocks: what a kernel computes (FLOP accounting)."""
        blocks = int(self.full_cnt.sum()) + int(self.part_cnt.sum())
        return blocks * self.q_block * self.k_block

    def allowed_pairs(self) -> int:
        """(query, key) pairs the pattern allows (for effective-FLOP accounting)."""
        full = 0
        for qb in range(self.num_q_blocks):
            q_rows = min(self.q_block, self.q_len - qb * self.q_block)
            for kb in self.full_idx[qb, : int(self.full_cnt[qb])].tolist():
                full += q_rows * min(self.k_block, self.k_len - kb * self.k_block)
        return full + int(self.tiles.sum())

    def dense_mask(self) -> Tensor:
        """``bool [Lq, Lk]`` -- for tests and small references only (O(L^2))."""
        m = torch.zeros(self.num_q_blocks * self.q_block, self.num_k_blocks * self.k_block, dtype=torch.bool)
        for qb in range(self.num_q_blocks):
            rows = slice(qb * self.q_block, (qb + 1) * self.q_block)
            for kb in self.full_idx[qb, : int(self.full_cnt[qb])].tolist():
                m[rows, kb * self.k_block : (kb + 1) * self.k_block] = True
            for kb, t in zip(self.part_idx[qb, : int(self.part_cnt[qb])].tolist(), self.part_tile[qb, : int(self.part_cnt[qb])].tolist()):
                m[rows, kb * self.k_block : (kb + 1) * self.k_block] = self.tiles[t].cpu()
        return m[: self.q_len, : self.k_len]


def _pad_lists(lists: list[list[int]], fill: int = -1) -> tuple[Tensor, Tensor]:
    width = max([len(x) for x in lists] + [1])
    idx = torch.full((len(lists), width), fill, dtype=torch.int32)
    for i, x in enumerate(lists):
        if x:
            idx[i, : len(x)] = torch.tensor(x, dtype=torch.int32)
    cnt = torch.tensor([len(x) for x in lists], dtype=torch.int32)
    return idx, cnt


def build_pattern(
    predicate: Predicate,
    q_len: int,
    k_len: int,
    q_block: int = 128,
    k_block: int = 64,
    candidates: Candidates | None = None,
    device: torch.device | str | None = None,
) -> BlockSparsePattern:
    """Classify the candidate tiles of every query block as empty, full or partial.

    Args:
        predicate: element rule ``allowed(q_idx, k_idx) -> bool`` on broadcastable int64 tensors of
            absolute query and key positions (it is called on ``[n, 1, BM, 1]`` and ``[n, C, 1, BN]``,
            so it must use elementwise, broadcasting operations only).
        q_len, k_len: numbers of queries and keys.
        q_block, k_block: tile sizes (the kernel's BLOCK_M / BLOCK_N).
        candidates: key blocks worth testing for a query block; default all of them (O(L^2):
            fine for small inputs, but every pattern of the library passes its own bound).
        device: where to put the lists.

    Cost: ``O(sum over query blocks of |candidates| * q_block * k_block)``.
    """
    for name, v in (("q_len", q_len), ("k_len", k_len), ("q_block", q_block), ("k_block", k_block)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"build_pattern: {name} must be a positive int, got {v!r}")
    nq, nk = -(-q_len // q_block), -(-k_len // k_block)
    if candidates is None:
        candidates = lambda qb: range(nk)  # noqa: E731
    cand_lists = [sorted({int(c) for c in candidates(qb) if 0 <= int(c) < nk}) for qb in range(nq)]
    cand, cand_cnt = _pad_lists(cand_lists)
    cand = cand.long()
    n_c = cand.shape[1]
    ar_q = torch.arange(q_block, dtype=torch.int64)
    ar_k = torch.arange(k_block, dtype=torch.int64)
    # Evaluate the predicate on all candidate tiles at once, a chunk of query blocks at a time
    # (the predicate only needs elementwise, broadcasting ops).
    full_mask = torch.zeros(nq, n_c, dtype=torch.bool)
    part_mask = torch.zeros(nq, n_c, dtype=torch.bool)
    tile_chunks: list[Tensor] = []
    chunk = max(1, (1 << 24) // max(1, n_c * q_block * k_block))
    for q0 in range(0, nq, chunk):
        qbs = torch.arange(q0, min(nq, q0 + chunk))
        qi = (qbs[:, None, None, None] * q_block + ar_q[None, None, :, None])  # [n, 1, BM, 1]
        kbs = cand[qbs]  # [n, C]
        kj = (kbs[:, :, None, None].clamp(min=0) * k_block + ar_k[None, None, None, :])  # [n, C, 1, BN]
        valid = (qi < q_len) & (kj < k_len) & (kbs >= 0)[:, :, None, None]
        ok = predicate(qi, kj).to(torch.bool) & valid
        n_ok = ok.flatten(2).sum(-1)
        is_full = (ok == valid).flatten(2).all(-1) & valid.flatten(2).all(-1) & (n_ok > 0)
        is_part = (n_ok > 0) & ~is_full
        full_mask[qbs] = is_full
        part_mask[qbs] = is_part
        tile_chunks.append(ok[is_part])
    tiles_all = torch.cat(tile_chunks) if tile_chunks else torch.zeros(0, q_block, k_block, dtype=torch.bool)
    # Partial tiles are numbered in (query block, candidate) order.
    tile_id = torch.full((nq, n_c), -1, dtype=torch.int64)
    tile_id[part_mask] = torch.arange(int(part_mask.sum()))
    full: list[list[int]] = []
    part: list[list[int]] = []
    part_t: list[list[int]] = []
    t_full: list[list[int]] = [[] for _ in range(nk)]
    t_part: list[list[int]] = [[] for _ in range(nk)]
    t_part_t: list[list[int]] = [[] for _ in range(nk)]
    cand_l, full_l, part_l, tid_l = cand.tolist(), full_mask.tolist(), part_mask.tolist(), tile_id.tolist()
    for qb in range(nq):
        f = [cand_l[qb][c] for c in range(n_c) if full_l[qb][c]]
        pc = [c for c in range(n_c) if part_l[qb][c]]
        full.append(f)
        part.append([cand_l[qb][c] for c in pc])
        part_t.append([tid_l[qb][c] for c in pc])
        for kb in f:
            t_full[kb].append(qb)
        for c in pc:
            t_part[cand_l[qb][c]].append(qb)
            t_part_t[cand_l[qb][c]].append(tid_l[qb][c])
    full_idx, full_cnt = _pad_lists(full)
    part_idx, part_cnt = _pad_lists(part)
    part_tile, _ = _pad_lists(part_t)
    t_full_idx, t_full_cnt = _pad_lists(t_full)
    t_part_idx, t_part_cnt = _pad_lists(t_part)
    t_part_tile, _ = _pad_lists(t_part_t)
    tile_tensor = tiles_all if tiles_all.shape[0] else torch.zeros(1, q_block, k_block, dtype=torch.bool)
    pat = BlockSparsePattern(
        q_len, k_len, q_block, k_block, full_idx, full_cnt, part_idx, part_tile, part_cnt, tile_tensor,
        t_full_idx, t_full_cnt, t_part_idx, t_part_tile, t_part_cnt, predicate,
    )
    return pat.to(device) if device is not None else pat


def causal_window_predicate(window: int | None, offset: int = 0) -> Predicate:
    """Key j is visible to query i (at absolute position i + offset) iff ``i + offset - W < j <= i + offset``."""

    def allowed(qi: Tensor, kj: Tensor) -> Tensor:
        p = qi + offset
        ok = kj <= p
        if window is not None:
            ok = ok & (kj > p - window)
        return ok

    return allowed


def sliding_window_pattern(
    q_len: int, window: int | None, k_len: int | None = None, q_block: int = 128, k_block: int = 64, device=None
) -> BlockSparsePattern:
    """Causal sliding window (``window=None``: plain causal). Queries are the last ``q_len`` of ``k_len`` keys."""
    k_len = q_len if k_len is None else k_len
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"sliding_window_pattern: window must be an int >= 1 or None, got {window!r}")
    if k_len < q_len:
        raise ValueError(f"sliding_window_pattern: k_len ({k_len}) must be >= q_len ({q_len})")
    offset = k_len - q_len

    def candidates(qb: int) -> range:
        first_q = qb * q_block + offset
        last_q = min(q_len, (qb + 1) * q_block) - 1 + offset
        lo = 0 if window is None else max(0, first_q - window + 1)
        return range(lo // k_block, last_q // k_block + 1)

    pat = build_pattern(causal_window_predicate(window, offset), q_len, k_len, q_block, k_block, candidates, device)
    pat.causal_window = k_len if window is None else min(window, k_len)
    return pat
