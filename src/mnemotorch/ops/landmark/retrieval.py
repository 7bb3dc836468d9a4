"""Landmark attention at inference: top-k block retrieval through the landmark keys.

Layout as in training: blocks of ``l`` ordinary tokens, each closed by a landmark (block ``g`` holds
absolute positions ``g (l+1) .. g (l+1) + l``, its landmark ``L_g`` last). For a query at position
``p`` in block ``b`` and head ``h``, with ``s_pj = scale * q_p . k_j``:

* **selection**: ``S_p`` = the ``top_k`` earlier blocks ``g < b`` by a landmark score (ties: the
  earlier block), all of them while fewer than ``top_k`` exist:
  ``granularity="token"`` (per head and per token, the paper's most flexible setting) scores with
  the query itself, ``s_{p L_g}``; ``granularity="block"`` (per head and per query block) scores
  every query of block ``b`` with the query at the landmark that closes block ``b - 1`` (position
  ``b (l+1) - 1``), so the set is fixed before block ``b`` starts and its KV blocks are fetched once;
* **attention**: the grouped softmax of training restricted to the selected blocks,

      w_pj = softmax_{l in G_g}(s_pl) exp(s_{p L_g}) / Z_p    (j an ordinary token of g in S_p)
      w_pj = exp(s_pj) / Z_p                                 (j ordinary, own block, j <= p)
      Z_p  = sum_{g in S_p} exp(s_{p L_g}) + sum_{own j <= p} exp(s_pj).

With ``top_k`` >= the number of earlier blocks this is exactly the training-time grouped softmax.

:func:`landmark_retrieval_reference` writes this out query by query (the specification).
:func:`retrieve_and_attend` is what the ``landmark`` mixer runs: landmark keys stay on the compute
device, the KV blocks in a :class:`BlockStore` (CPU memory, pinned when the compute device is CUDA),
and only the union of the blocks the queries of one block segment selected is copied to the device,
each distinct (sequence, KV head, block) once.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

GRANULARITIES = ("token", "block")


def _check_top_k(fn: str, top_k: int) -> None:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"{fn}: top_k must be an int >= 1, got {top_k!r}")


def _topk_stable(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores along the last dim; ties go to the lower index."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def landmark_retrieval_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_len: int,
    top_k: int,
    granularity: str = "token",
    scale: float | None = None,
    allow_fewer: bool = False,
) -> Tensor:
    """Retrieval-mode landmark attention, one query at a time (plain loops; float64-ready).

    Args:
        q: ``[B, Tq, H, D]`` queries of the last ``Tq`` of the ``Tk`` positions (``granularity="block"``
            needs ``Tq == Tk``: the selector queries come from earlier positions).
        k: ``[B, Tk, Hkv, D]``; v: ``[B, Tk, Hkv, Dv]``, laid out with landmarks.
        block_len: ordinary tokens per block ``l``; top_k: blocks retrieved per query and head.
        granularity: ``"token"`` or ``"block"`` (see the module docstring).
        allow_fewer: without it, ``top_k`` larger than the number of complete blocks in ``k`` is an
            error (nothing would be left out); the mixer passes ``True`` (early queries use all blocks).

    Returns:
        ``[B, Tq, H, Dv]``.
    """
    fn = "landmark_retrieval_reference"
    _check_top_k(fn, top_k)
    if granularity not in GRANULARITIES:
        raise ValueError(f"{fn}: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    b_, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    step = block_len + 1
    n_complete = tk // step
    if top_k > n_complete and not allow_fewer:
        raise ValueError(
            f"{fn}: top_k ({top_k}) is larger than the number of blocks with a landmark ({n_complete}) in {tk} positions "
            f"(block_len {block_len}); use a smaller top_k, the exact grouped softmax, or allow_fewer=True"
        )
    if granularity == "block" and tq != tk:
        raise ValueError(f"{fn}: granularity='block' needs the queries of every position (Tq == Tk), got Tq={tq}, Tk={tk}")
    scale = d**-0.5 if scale is None else scale
    out = q.new_zeros(b_, tq, h, v.shape[-1])
    for bi in range(b_):
        for hi in range(h):
            kh, vh = k[bi, :, hi * hkv // h], v[bi, :, hi * hkv // h]
            for i in range(tq):
                p = tk - tq + i
                blk = p // step
                qp = q[bi, i, hi]
                selector = qp if granularity == "token" else q[bi, blk * step - 1, hi]
                earlier = list(range(blk))
                if earlier:
                    lm_scores = torch.stack([scale * (selector @ kh[g * step + block_len]) for g in earlier])
                    chosen = _topk_stable(lm_scores, min(top_k, blk)).tolist()
                else:
                    chosen = []
                # Terms of Z_p and their value vectors.
                terms, values = [], []
                for g in sorted(chosen):
                    members = slice(g * step, g * step + block_len)
                    inner = (scale * (kh[members] @ qp)).softmax(-1)
                    terms.append(scale * (qp @ kh[g * step + block_len]))
                    values.append(inner @ vh[members])
                for j in range(blk * step, p + 1):
                    if j % step != block_len:
                        terms.append(scale * (qp @ kh[j]))
                        values.append(vh[j])
                weights = torch.stack(terms).softmax(-1)
                out[bi, i, hi] = weights @ torch.stack(values)
    return out


def retrieve_and_attend(
    q: Tensor,
    k_own: Tensor,
    v_own: Tensor,
    own_start: int,
    landmark_keys: Tensor,
    store_k: Tensor,
    store_v: Tensor,
    block_len: int,
    top_k: int,
    scale: float,
    selected: Tensor | None = None,
    *,
    store: BlockStore | None = None,
) -> tuple[Tensor, int]:
    """Retrieval attention for queries that all lie in one block ``b``.

    Args:
        q: ``[B, n, H, D]`` queries at in-block offsets ``own_start .. own_start + n - 1``.
        k_own, v_own: ``[B, own_start + n, Hkv, D]`` the block's keys/values up to the last query.
        landmark_keys: ``[B, b, Hkv, D]`` (compute device) the landmark keys of blocks ``0 .. b-1``.
        store_k, store_v: ``[B, b, l + 1, Hkv, D]`` the earlier blocks, on any device (CPU memory).
        selected: ``[B, H, kk]`` block indices for ``granularity="block"``; ``None`` selects per token.
        store: the :class:`BlockStore` that ``store_k``/``store_v`` are views of (``store.views(b)``);
            blocks are then fetched through it: each distinct (sequence, KV head, block) once, via a
            reusable pinned staging buffer when the store is on another device. ``None``: indexed
            from ``store_k``/``store_v`` directly.

    Returns:
        ``(out [B, n, H, Dv], blocks fetched per (batch, head))``.
    """
    bsz, n, h, d = q.shape
    hkv = k_own.shape[2]
    rep = h // hkv
    dev = q.device
    nb = landmark_keys.shape[1]
    # Own block: causal, landmark position (offset l) excluded.
    kc = k_own.repeat_interleave(rep, dim=2)
    vc = v_own.repeat_interleave(rep, dim=2)
    s_own = torch.einsum("bihd,bjhd->bhij", q, kc) * scale  # [B, H, n, r]
    j = torch.arange(k_own.shape[1], device=dev)
    own_ok = (j[None, :] <= own_start + torch.arange(n, device=dev)[:, None]) & (j[None, :] != block_len)
    s_own = s_own.masked_fill(~own_ok, float("-inf"))
    if nb == 0:
        return torch.einsum("bhij,bjhd->bihd", s_own.softmax(-1), vc), 0

    kk = min(top_k, nb)
    lm = landmark_keys.repeat_interleave(rep, dim=2)
    if selected is None:
        lm_scores = torch.einsum("bihd,bnhd->bhin", q, lm) * scale  # [B, H, n, nb]
        sel = _topk_stable(lm_scores, kk)  # [B, H, n, kk]
    else:
        sel = selected[:, :, None, :].expand(bsz, h, n, selected.shape[-1])
    # Fetch the union of the selected blocks of each (batch, head) once.
    need = torch.zeros(bsz, h, nb, dtype=torch.bool, device=dev)
    need.scatter_(-1, sel.reshape(bsz, h, -1), True)
    u = int(need.sum(-1).max())
    uidx = _topk_stable(need.to(torch.int8), u)  # [B, H, U], needed blocks first
    uvalid = need.gather(-1, uidx)
    if store is None:
        src = store_k.device
        bi = torch.arange(bsz, device=src)[:, None, None]
        hi = (torch.arange(h, device=src) // rep)[None, :, None]
        ui = uidx.to(src)
        fk = store_k[bi, ui, :, hi].to(dev)  # [B, H, U, l + 1, D]
        fv = store_v[bi, ui, :, hi].to(dev)
    else:
        # Padding slots (uvalid False) get weight exactly 0; point them at a needed block so
        # nothing unneeded is copied.
        fk, fv = store.fetch(torch.where(uvalid, uidx, uidx[..., :1]), rep, dev)
    use = (sel[..., :, None] == uidx[:, :, None, None, :]).any(-2) & uvalid[:, :, None, :]  # [B, H, n, U]
    s_blk = torch.einsum("bhid,bhuld->bhiul", q.transpose(1, 2), fk[..., :block_len, :]) * scale  # [B, H, n, U, l]
    inner = s_blk.softmax(-1)
    o_blk = torch.einsum("bhiul,bhule->bhiue", inner, fv[..., :block_len, :])  # per-block outputs
    gate = torch.einsum("bhid,bhud->bhiu", q.transpose(1, 2), fk[..., block_len, :]) * scale  # s_{p L_g}
    gate = gate.masked_fill(~use, float("-inf"))
    logits = torch.cat([gate, s_own], dim=-1)  # the terms of Z_p
    w = logits.softmax(-1)
    out = torch.einsum("bhiu,bhiue->bihe", w[..., :u], o_blk) + torch.einsum("bhij,bjhe->bihe", w[..., u:], vc)
    return out, u


# Tests set this to exercise the staging path (unique gather -> staging buffer -> copy) on one device.
_STAGE_SAME_DEVICE = False


def _empty(shape, dtype, device, pin: bool) -> Tensor:
    """``torch.empty``, in pinned host memory when asked and possible (no CUDA: pageable)."""
    if pin and torch.device(device).type == "cpu":
        try:
            return torch.empty(shape, dtype=dtype, device=device, pin_memory=True)
        except RuntimeError:  # no pinned-memory allocator on this machine
            pass
    return torch.empty(shape, dtype=dtype, device=device)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _room(rows: int, row_bytes: int, pin: bool) -> int:
    """Rows to allocate for at least ``rows``: pinned allocations are rounded up to a power of two
    bytes by PyTorch's caching host allocator, so fill that rounding with rows instead of waste."""
    if not pin or rows == 0 or row_bytes == 0:
        return rows
    return (1 << (rows * row_bytes - 1).bit_length()) // row_bytes


class BlockStore:
    """Complete blocks of a batch of sequences (keys and values, or landmark keys), with room to grow.

    Buffers are head-major, ``[B, Hkv, capacity, *block]`` (KV: ``block = (l + 1, D)``; landmark keys:
    ``block = (D,)``), so one (sequence, KV head, block) is one contiguous row of the flattened
    buffer, and a fetch is one ``index_select``. :meth:`views` gives the logical layout the states
    carry, ``[B, nb, *block[:-1], Hkv, D]``: views into the buffer, no copies.

    Growth: appending writes in place while there is room; otherwise the capacity doubles (one copy
    of what is there), so appending n blocks one at a time costs O(n) copies in all, not O(n^2).

    States stay values: a store is shared by the successive states of one sequence, and only the
    state that has seen all ``filled`` blocks may append in place (:meth:`can_append`); a state
    from further back (a branch) or one whose tensors were replaced (beam reordering) gets a copy
    (:meth:`from_views`). Blocks below ``filled`` are never written again, so every view stays valid.

    With ``pin=True`` (the mixer passes it when the store is on the CPU and the compute device is
    CUDA) the buffers live in pinned host memory, falling back to pageable memory where pinning is
    unavailable, and fetches go through a reusable pinned staging buffer and asynchronous copies.
    Pinned capacities are rounded up to fill a power of two bytes (what PyTorch's caching host
    allocator reserves anyway). That allocator keeps freed pinned buffers cached for reuse, so after
    growth steps the process holds up to about twice the live capacity in page-locked memory
    (``torch.cuda.host_memory_stats()`` shows it); the mixer sizes the store once for a prefill
    given in one call, which avoids the growth steps there.
    """

    def __init__(self, buffers: tuple[Tensor, ...], filled: int, pin: bool = False):
        self.buffers = buffers
        self.filled = filled
        self.pin = pin
        self.frozen = False  # set for stores built under autograd: never written in place again
        self.allocations = 1  # buffer allocations (growth steps + 1): counters for tests/diagnostics
        self.blocks_copied = 0  # blocks moved from an old buffer into a grown one
        self.rows_fetched = 0  # (sequence, KV head, block) rows read by fetch()
        self._staging: list[Tensor | None] = [None] * len(buffers)
        self._event = None  # the last asynchronous copy out of the staging buffers

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_views(cls, views: tuple[Tensor, ...], capacity: int = 0, pin: bool = False, device=None, dtype=None) -> BlockStore:
        """A new store holding a copy of ``views`` (logical layout ``[B, nb, ..., Hkv, D]``)."""
        nb = views[0].shape[1]
        device = views[0].device if device is None else torch.device(device)
        dtypes = [dtype or v.dtype for v in views]
        row_bytes = max(math.prod((v.shape[0], *v.shape[2:])) * _itemsize(dt) for v, dt in zip(views, dtypes))
        cap = _room(max(capacity, nb), row_bytes, pin)
        bufs = tuple(_empty(cls._physical_shape(v.shape, cap), dt, device, pin) for v, dt in zip(views, dtypes))
        for buf, v in zip(bufs, views):
            buf[:, :, :nb].copy_(v.movedim(-2, 1))
        return cls(bufs, nb, pin)

    @staticmethod
    def _physical_shape(logical, capacity: int) -> tuple[int, ...]:
        b, _, *block, hkv, d = logical
        return (b, hkv, capacity, *block, d)

    def __deepcopy__(self, memo):
        # Buffers through ``memo`` so that deep-copied states keep viewing the copied buffers; the
        # staging buffers and the CUDA event are per-process scratch and are not copied.
        new = BlockStore(tuple(copy.deepcopy(b, memo) for b in self.buffers), self.filled, self.pin)
        new.frozen, new.allocations, new.blocks_copied = self.frozen, self.allocations, self.blocks_copied
        return new

    # -- layout ----------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2]

    def views(self, nb: int | None = None) -> tuple[Tensor, ...]:
        """The first ``nb`` (default ``filled``) blocks in the logical layout ``[B, nb, ..., Hkv, D]``."""
        nb = self.filled if nb is None else nb
        return tuple(buf[:, :, :nb].movedim(1, -2) for buf in self.buffers)

    def holds(self, views: tuple[Tensor, ...]) -> bool:
        """Whether ``views`` are views of this store's current buffers (its first ``filled`` blocks at most)."""
        if len(views) != len(self.buffers):
            return False
        for v, buf in zip(views, self.buffers):
            nb = v.shape[1]
            if nb > self.filled or v.dtype != buf.dtype or v.device != buf.device:
                return False
            ref = buf[:, :, :nb].movedim(1, -2)
            if v.shape != ref.shape or (nb and (v.data_ptr() != ref.data_ptr() or v.stride() != ref.stride())):
                return False
        return True

    def can_append(self, views: tuple[Tensor, ...]) -> bool:
        """Whether the state owning ``views`` may append in place (it has seen every block written)."""
        if any(b.is_inference() for b in self.buffers) and not torch.is_inference_mode_enabled():
            return False  # built under torch.inference_mode(): not writable outside it
        return not self.frozen and self.holds(views) and views[0].shape[1] == self.filled

    # -- growth ----------------------------------------------------------------------------------
    def append(self, blocks: tuple[Tensor, ...], min_capacity: int = 0) -> None:
        """Write ``blocks`` (logical layout ``[B, n, ..., Hkv, D]``, any device) after the filled ones.

        Grows to ``max(2 * capacity, filled + n, min_capacity)`` when full.
        """
        n = blocks[0].shape[1]
        if self.frozen:
            raise RuntimeError("BlockStore: this store was built under autograd and is read-only; copy it with from_views")
        end = self.filled + n
        if end > self.capacity:
            row_bytes = max(math.prod((*b.shape[:2], *b.shape[3:])) * b.element_size() for b in self.buffers)
            cap = _room(max(2 * self.capacity, end, min_capacity), row_bytes, self.pin)
            grown = []
            for buf in self.buffers:
                new = _empty((*buf.shape[:2], cap, *buf.shape[3:]), buf.dtype, buf.device, self.pin)
                new[:, :, : self.filled].copy_(buf[:, :, : self.filled])
                grown.append(new)
            self.buffers = tuple(grown)
            self.allocations += 1
            self.blocks_copied += self.filled
        for buf, blk in zip(self.buffers, blocks):
            buf[:, :, self.filled : end].copy_(blk.movedim(-2, 1))  # blocking: readable by the next fetch
        self.filled = end

    # -- fetch -----------------------------------------------------------------------------------
    def fetch(self, blocks: Tensor, rep: int, device) -> tuple[Tensor, ...]:
        """Gather ``blocks [B, H, U]`` (block indices per query head; head ``h`` reads KV head ``h // rep``).

        Returns one ``[B, H, U, *block]`` tensor per buffer, on ``device``. Across devices each
        distinct (sequence, KV head, block) is gathered once into a reusable (pinned) staging buffer
        (``torch.index_select(out=...)``), copied with ``non_blocking=True``, and expanded to
        ``[B, H, U]`` on ``device``; on the store's own device the rows are gathered directly.
        """
        device = torch.device(device)
        bsz, h, u = blocks.shape
        hkv, cap = self.buffers[0].shape[1], self.capacity
        seq_head = torch.arange(bsz, device=blocks.device)[:, None] * hkv + torch.arange(h, device=blocks.device)[None, :] // rep
        rows = (seq_head[:, :, None] * cap + blocks).reshape(-1)  # rows of the flattened buffers
        flat = [buf.view(-1, *buf.shape[3:]) for buf in self.buffers]
        grad = torch.is_grad_enabled() and any(buf.requires_grad for buf in self.buffers)
        src = self.buffers[0].device
        if grad or (src == device and not _STAGE_SAME_DEVICE):
            idx = rows.to(src)
            self.rows_fetched += idx.numel()
            return tuple(f.index_select(0, idx).to(device).view(bsz, h, u, *f.shape[1:]) for f in flat)
        uniq, inverse = torch.unique(rows, return_inverse=True)
        uniq = uniq.to(src)
        m = uniq.numel()
        self.rows_fetched += m
        stage_pin = src.type == "cpu" and device.type == "cuda"
        if self._event is not None:
            self._event.synchronize()  # the previous copy out of the staging buffers has finished
        out = []
        for i, f in enumerate(flat):
            stage = self._staging[i]
            if stage is None or stage.shape[0] < m or stage.dtype != f.dtype or stage.shape[1:] != f.shape[1:]:
                rows_needed = max(m, 2 * (0 if stage is None else stage.shape[0]))
                rows_needed = _room(rows_needed, f[0].numel() * f.element_size(), stage_pin)
                stage = _empty((rows_needed, *f.shape[1:]), f.dtype, src, stage_pin)
                self._staging[i] = stage
            torch.index_select(f, 0, uniq, out=stage[:m])
            out.append(stage[:m].to(device, non_blocking=True))
        if device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(device))
        inverse = inverse.to(device)
        return tuple(o.index_select(0, inverse).view(bsz, h, u, *o.shape[1:]) for o in out)
