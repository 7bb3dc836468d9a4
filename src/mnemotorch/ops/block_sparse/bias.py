"""Additive relative-position bias for block-sparse attention, looked up from small tables.

The bias of (query ``i``, key ``j``) is a sum of at most two *terms*; term ``t`` reads a table
``T_t`` at the index

    ``idx_t(i, j) = clamp(k_coord[t, j] - q_coord[t, i], 0, R_t - 1)``

where ``q_coord`` / ``k_coord`` are integer coordinates of every query and key (in the pattern's
token order) and ``R_t`` is the table's last dimension. The table may depend on the head, the
batch row and the query (e.g. HaloNet's content-dependent ``q . rel_h[dy]``):

    ``logit(b, h, i, j) = scale * q_i . k_j + sum_t T_t[b, i, h, idx_t(i, j)]``

with ``T_t`` of shape ``[R]``, ``[H, R]`` or ``[B|1, Lq|1, H|1, R]`` (size-1 axes broadcast). The
kernels look the values up per tile (``O(L * R)`` memory, never an ``L x L`` tensor) and
accumulate the table's gradient in the backward (atomic adds in the dQ kernel, fp32).

Builders:

* :func:`relative_bias_1d` -- ``table[..., clamp(j - i - min_offset, 0, R - 1)]`` (a clamped
  relative offset; ``min_offset`` defaults to ``-(R - 1) // 2``, symmetric).
* :func:`relative_bias_grid` -- on an N-D token grid (optionally permuted into tiles): one table
  per axis, summed (HaloNet's ``rel_h[dy] + rel_w[dx]``), or one joint table over all axes
  (NAT / DiNAT's ``rpb[h, dy, dx]``), with offsets in dilation-group coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

#: the kernels add at most this many table terms
MAX_TERMS = 2

__all__ = ["MAX_TERMS", "RelativeBias", "relative_bias_1d", "relative_bias_grid"]


def _canonical(fn: str, table: Tensor) -> Tensor:
    """``[R]``, ``[H, R]`` or ``[B, Lq, H, R]`` -> a 4-D view ``[B|1, Lq|1, H|1, R]``."""
    if not isinstance(table, Tensor):
        raise TypeError(f"{fn}: every table must be a torch.Tensor, got {type(table).__name__}")
    if not table.is_floating_point():
        raise TypeError(f"{fn}: tables must be floating point, got {table.dtype}")
    if table.dim() == 1:
        return table.view(1, 1, 1, -1)
    if table.dim() == 2:
        return table.unsqueeze(0).unsqueeze(0)
    if table.dim() == 4:
        return table
    raise ValueError(f"{fn}: a table must have shape [R], [H, R] or [B, Lq, H, R], got {list(table.shape)}")


@dataclass
class RelativeBias:
    """An additive logit bias ``sum_t tables[t][b, i, h, clamp(k_coords[t, j] - q_coords[t, i], 0, R_t - 1)]``.

    Attributes:
        tables: one or two tables, each ``[R]``, ``[H, R]`` or ``[B|1, Lq|1, H|1, R]`` (any
            floating dtype; gradients flow to them). ``H`` counts query heads.
        q_coords: ``int [T, Lq]``, the coordinate of every query per term (pattern order).
        k_coords: ``int [T, Lk]``, the coordinate of every key per term.

    The bias is added to the *scaled* logits (``scale * q . k + bias``), as FlexAttention's
    ``score_mod`` does. Built by :func:`relative_bias_1d` / :func:`relative_bias_grid`, or directly.
    """

    tables: tuple[Tensor, ...]
    q_coords: Tensor
    k_coords: Tensor

    def __post_init__(self) -> None:
        fn = "RelativeBias"
        if isinstance(self.tables, Tensor):
            self.tables = (self.tables,)
        self.tables = tuple(self.tables)
        if not 1 <= len(self.tables) <= MAX_TERMS:
            raise ValueError(f"{fn}: needs 1 to {MAX_TERMS} tables, got {len(self.tables)}")
        for t in self.tables:
            _canonical(fn, t)
        for name, c in (("q_coords", self.q_coords), ("k_coords", self.k_coords)):
            if not isinstance(c, Tensor) or c.dim() != 2 or c.shape[0] != len(self.tables):
                got = list(c.shape) if isinstance(c, Tensor) else type(c).__name__
                raise ValueError(f"{fn}: {name} must be an integer tensor [terms={len(self.tables)}, length], got {got}")
            if c.is_floating_point() or c.dtype == torch.bool or c.is_complex():
                raise TypeError(f"{fn}: {name} must have an integer dtype, got {c.dtype}")

    @property
    def num_terms(self) -> int:
        return len(self.tables)

    @property
    def q_len(self) -> int:
        return self.q_coords.shape[1]

    @property
    def k_len(self) -> int:
        return self.k_coords.shape[1]

    def canonical_tables(self) -> list[Tensor]:
        """The tables as 4-D views ``[B|1, Lq|1, H|1, R]``."""
        return [_canonical("RelativeBias", t) for t in self.tables]

    def check(self, fn: str, batch: int, q_len: int, k_len: int, heads: int) -> None:
        """Loud shape checks against the attention call ``q [batch, q_len, heads, D]``, ``k [.., k_len, ..]``."""
        if (self.q_len, self.k_len) != (q_len, k_len):
            raise ValueError(
                f"{fn}: bias coordinates are for (Lq, Lk) = ({self.q_len}, {self.k_len}) but q, k have ({q_len}, {k_len})"
            )
        for n, t in enumerate(self.canonical_tables()):
            for axis, (size, full) in enumerate(zip(t.shape[:3], (batch, q_len, heads))):
                if size not in (1, full):
                    raise ValueError(
                        f"{fn}: bias table {n} has shape {list(self.tables[n].shape)}; as [B, Lq, H, R] its axis {axis} "
                        f"must be 1 or {full}"
                    )
            if t.shape[3] < 1:
                raise ValueError(f"{fn}: bias table {n} is empty")

    def index(self, term: int) -> Tensor:
        """``int64 [Lq, Lk]``: the table index of every pair for ``term`` (O(Lq * Lk): references only)."""
        r = self.tables[term].shape[-1]
        qc = self.q_coords[term].to(torch.int64)
        kc = self.k_coords[term].to(torch.int64)
        return (kc[None, :] - qc[:, None]).clamp(0, r - 1)

    def dense(self) -> Tensor:
        """``[B|1, H|1, Lq, Lk]``: the bias of every pair (O(Lq * Lk): references and tests only)."""
        out = None
        for n, t in enumerate(self.canonical_tables()):
            bt, lt, ht, r = t.shape
            idx = self.index(n).to(t.device)
            rows = t.permute(0, 2, 1, 3).expand(bt, ht, self.q_len, r)  # [Bt, Ht, Lq, R]
            val = torch.gather(rows, 3, idx.expand(bt, ht, self.q_len, self.k_len))
            out = val if out is None else out + val
        return out

    def to(self, device: torch.device | str) -> "RelativeBias":
        """Coordinates on ``device`` (the tables stay where they are: they carry gradients)."""
        return RelativeBias(self.tables, self.q_coords.to(device), self.k_coords.to(device))


def _check_table_last(fn: str, table: Tensor, name: str = "table") -> int:
    if not isinstance(table, Tensor) or table.dim() not in (1, 2, 4):
        got = list(table.shape) if isinstance(table, Tensor) else type(table).__name__
        raise ValueError(f"{fn}: {name} must have shape [R], [H, R] or [B, Lq, H, R], got {got}")
    return table.shape[-1]


def relative_bias_1d(
    table: Tensor, q_len: int, k_len: int | None = None, min_offset: int | None = None
) -> RelativeBias:
    """A learned bias of the clamped relative offset ``j - p_i`` on a 1-D sequence.

    Query ``i`` sits at position ``p_i = i + k_len - q_len`` (the last ``q_len`` of ``k_len``
    keys, as in :func:`~mnemotorch.ops.block_sparse.sliding_window_pattern`); pair ``(i, j)`` gets
    ``table[..., clamp(j - p_i - min_offset, 0, R - 1)]``: offsets ``min_offset .. min_offset + R - 1``
    have their own entry, offsets beyond either end share the end entries.

    Args:
        table: ``[R]``, ``[H, R]`` (per head, the usual learned table) or ``[B, Lq, H, R]``.
        q_len, k_len: lengths (``k_len`` defaults to ``q_len``).
        min_offset: the offset of entry 0; default ``-((R - 1) // 2)`` (symmetric around 0 for odd
            ``R``); for causal attention ``-(R - 1)`` gives every entry to offsets ``<= 0``.
    """
    fn = "relative_bias_1d"
    r = _check_table_last(fn, table)
    k_len = q_len if k_len is None else k_len
    for name, v in (("q_len", q_len), ("k_len", k_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{fn}: {name} must be an int >= 1, got {v!r}")
    if k_len < q_len:
        raise ValueError(f"{fn}: k_len ({k_len}) must be >= q_len ({q_len})")
    min_offset = -((r - 1) // 2) if min_offset is None else min_offset
    if isinstance(min_offset, bool) or not isinstance(min_offset, int):
        raise ValueError(f"{fn}: min_offset must be an int, got {min_offset!r}")
    qc = torch.arange(q_len, dtype=torch.int32) + (k_len - q_len) + min_offset
    kc = torch.arange(k_len, dtype=torch.int32)
    return RelativeBias((table,), qc[None], kc[None])


def relative_bias_grid(
    tables: Tensor | Sequence[Tensor | None],
    shape: int | Sequence[int],
    perm: Tensor | None = None,
    dilation: int | Sequence[int] = 1,
    joint: bool = False,
) -> RelativeBias:
    """Relative-position bias on an N-D token grid (row-major, or permuted with ``perm``).

    Offsets are taken per axis in dilation-group coordinates ``t_a = x_a // dilation_a`` (a key is
    only visible from its own group in dilated neighborhood attention), so axis ``a``'s offset of
    (query, key) is ``u_a - t_a``.

    * ``joint=False`` (HaloNet): ``tables`` has one entry per axis (``None`` skips an axis, at most
      two tables), each with an odd last dimension ``R_a = 2 M_a + 1``; the bias is
      ``sum_a tables[a][..., clamp(u_a - t_a + M_a, 0, R_a - 1)]``. For HaloNet with block ``b``
      and halo ``h``: ``M = b + h - 1``, and the content-dependent logits ``q . rel_h[dy]`` are the
      per-query table ``[B, L, H, R] = scale * einsum('blhd,rd->blhr', q, rel_h)``.
    * ``joint=True`` (NAT / DiNAT ``rpb``): ``tables`` is one table whose last ``N`` axes are the
      odd sizes ``(R_0, .., R_{N-1})``, e.g. ``[H, 2kh - 1, 2kw - 1]``; the bias is
      ``table[..., u_0 - t_0 + M_0, .., u_{N-1} - t_{N-1} + M_{N-1}]``. The lookup is exact for pairs
      whose every axis offset lies in ``[-M_a, M_a]`` (all pairs a neighborhood pattern of kernel
      ``2 M_a + 1`` or less allows); other pairs read some in-range entry (mask them).

    Args:
        tables: see above; leading axes ``[]``, ``[H]`` or ``[B, L, H]`` (``L`` in the pattern's
            token order, i.e. permuted when ``perm`` is given).
        shape: the grid, e.g. ``(H, W)``.
        perm: ``perm[p]`` = row-major index of the token at position ``p`` (as
            :class:`~mnemotorch.ops.block_sparse.PermutedPattern`); ``None``: row-major order.
        dilation: per axis (an int or one per axis).
    """
    fn = "relative_bias_grid"
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    ndim = len(shape)
    if ndim < 1 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"{fn}: shape must be positive ints, got {shape!r}")
    dil = (dilation,) * ndim if isinstance(dilation, int) else tuple(dilation)
    if len(dil) != ndim or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dil):
        raise ValueError(f"{fn}: dilation must be an int >= 1 or one per axis of shape {shape}, got {dilation!r}")
    n = math.prod(shape)
    if perm is None:
        pos = torch.arange(n, dtype=torch.int64)
    else:
        if not isinstance(perm, Tensor) or perm.shape != (n,):
            raise ValueError(f"{fn}: perm must be an int tensor [{n}], got {getattr(perm, 'shape', perm)!r}")
        pos = perm.detach().to("cpu", torch.int64)
    coords = []
    rest = pos
    for size in reversed(shape):
        coords.append(rest % size)
        rest = rest // size
    coords.reverse()
    group = [c // d for c, d in zip(coords, dil)]
    if joint:
        if isinstance(tables, (list, tuple)):
            if len(tables) != 1:
                raise ValueError(f"{fn}: joint=True takes one table, got {len(tables)}")
            tables = tables[0]
        if not isinstance(tables, Tensor) or tables.dim() not in (ndim, ndim + 1, ndim + 3):
            got = list(tables.shape) if isinstance(tables, Tensor) else type(tables).__name__
            raise ValueError(f"{fn}: a joint table must have shape [*lead, R_0, .., R_{ndim - 1}] with lead [], [H] or [B, L, H], got {got}")
        sizes = tables.shape[tables.dim() - ndim :]
        if any(r % 2 == 0 for r in sizes):
            raise ValueError(f"{fn}: the joint table's grid axes must be odd (2M+1), got {list(sizes)}")
        flat = torch.zeros(n, dtype=torch.int64)
        centre = 0
        for t, r in zip(group, sizes):
            flat = flat * r + t
            centre = centre * r + (r - 1) // 2
        table = tables.reshape(*tables.shape[: tables.dim() - ndim], math.prod(sizes))
        return RelativeBias((table,), (flat - centre).to(torch.int32)[None], flat.to(torch.int32)[None])
    if isinstance(tables, Tensor):
        tables = (tables,)
    tables = tuple(tables)
    if len(tables) != ndim:
        raise ValueError(f"{fn}: give one table (or None) per axis of shape {shape}, got {len(tables)}")
    used, qcs, kcs = [], [], []
    for a, t in enumerate(tables):
        if t is None:
            continue
        r = _check_table_last(fn, t, f"tables[{a}]")
        if r % 2 == 0:
            raise ValueError(f"{fn}: tables[{a}] must have an odd last dimension (2M+1), got {r}")
        used.append(t)
        qcs.append(group[a] - (r - 1) // 2)
        kcs.append(group[a])
    if not 1 <= len(used) <= MAX_TERMS:
        raise ValueError(f"{fn}: needs 1 to {MAX_TERMS} tables that are not None, got {len(used)} (use joint=True for more axes)")
    return RelativeBias(tuple(used), torch.stack(qcs).to(torch.int32), torch.stack(kcs).to(torch.int32))
