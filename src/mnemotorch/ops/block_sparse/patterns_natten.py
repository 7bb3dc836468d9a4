"""Neighborhood attention patterns with NATTEN's exact semantics, in 1-D, 2-D and 3-D.

Per axis of length ``L`` with kernel size ``k``, dilation ``d``, stride ``s`` and a causal flag
(Hassani et al. 2023, "Neighborhood Attention Transformer"; Hassani et al. 2024, "Faster
Neighborhood Attention"; the rules below are those of NATTEN's reference and FNA kernels):

* **dilation** -- token ``i`` belongs to group ``g = i mod d`` and has group coordinate
  ``t = i // d``; group ``g`` holds ``L_g = ceil((L - g) / d)`` tokens (groups can be unequal).
  A key is only ever visible from its own group, and every rule below runs in group coordinates.
* **stride** -- queries ``t`` with the same ``t // s`` share one window, that of the *leader*:
  ``leader = min((t // s) * s + s // 2, L_g - 1)`` (the centre query of the stride group, the right
  one of the two centres when ``s`` is even, clamped into a short tail group); causal:
  ``leader = min((t // s) * s + s - 1, L_g - 1)`` (the last query of the group).
* **non-causal window** -- ``left = k // 2``, ``right = k // 2 + (k % 2 - 1)``, centre
  ``c = clamp(leader, left, L_g - 1 - right)``; key ``u`` (group coordinate) is visible iff
  ``c - left <= u <= c + right``. The window slides inward at the borders, so every query sees
  exactly ``k`` keys per axis.
* **causal window** -- key ``u`` is visible iff ``u <= t`` and ``leader - u < k``: the window ends
  at the query itself, and at the borders it is cut rather than shifted.

In 2-D and 3-D the per-axis rules are ANDed on a row-major token grid, each axis with its own
``k``, ``d``, ``s`` and causal flag. Optionally the tokens are permuted into spatial tiles (e.g.
8 x 16 tokens = one 128-token query block), the trick of NATTEN's Hopper/Blackwell kernels: a tile's
neighbourhood then covers few key tiles, most of them full, instead of many thin, mostly masked
row-major blocks. The caller permutes ``q``/``k``/``v`` with ``perm`` and un-permutes the output
with ``inv_perm`` (see :class:`PermutedPattern`).

Every builder hands :func:`~mnemotorch.ops.block_sparse.pattern.build_pattern` the element
predicate and a *tight* ``candidates(query_block)``: per axis, the union of the windows of the
block's queries (exact for contiguous coordinate ranges), crossed over the axes and mapped to key
blocks. Building costs O(L/B * nnz); no ``L x L`` mask is ever formed.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .pattern import BlockSparsePattern, Predicate, build_pattern

__all__ = [
    "PermutedPattern",
    "neighborhood_pattern",
    "neighborhood_pattern_1d",
    "neighborhood_pattern_2d",
    "neighborhood_pattern_3d",
    "neighborhood_predicate",
    "tile_permutation",
]


class PermutedPattern(NamedTuple):
    """A pattern over *permuted* token positions, with the permutation.

    Attributes:
        pattern: block lists over positions ``p`` of the permuted sequence.
        perm: ``int64 [L]``; ``perm[p]`` is the row-major index of the token at position ``p``,
            so ``x[:, perm]`` puts a ``[B, L, H, D]`` tensor into the pattern's order.
        inv_perm: ``int64 [L]``; ``inv_perm[o]`` is the position of row-major token ``o``, so
            ``out[:, inv_perm]`` puts the kernel's output back into row-major order.
    """

    pattern: BlockSparsePattern
    perm: Tensor
    inv_perm: Tensor

    def permute(self, x: Tensor, dim: int = 1) -> Tensor:
        """Row-major tokens -> the pattern's order (``x.index_select(dim, perm)``)."""
        return x.index_select(dim, self.perm.to(x.device))

    def unpermute(self, x: Tensor, dim: int = 1) -> Tensor:
        """The pattern's order -> row-major tokens (``x.index_select(dim, inv_perm)``)."""
        return x.index_select(dim, self.inv_perm.to(x.device))


# --------------------------------------------------------------------------------------------
# argument checks


def _per_axis(fn: str, name: str, value, ndim: int, kind=int) -> tuple:
    def ok(v) -> bool:
        return isinstance(v, bool) if kind is bool else isinstance(v, int) and not isinstance(v, bool)

    if ok(value):
        return (value,) * ndim
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == ndim and all(ok(v) for v in value):
        return tuple(value)
    what = "a bool" if kind is bool else "an int"
    raise ValueError(f"{fn}: {name} must be {what} or a sequence of {ndim} of them, got {value!r}")


def _check_na_args(fn: str, shape, kernel_size, dilation, stride, causal, ndim: int):
    shape = _per_axis(fn, "shape", shape, ndim)
    ks = _per_axis(fn, "kernel_size", kernel_size, ndim)
    ds = _per_axis(fn, "dilation", dilation, ndim)
    ss = _per_axis(fn, "stride", stride, ndim)
    cs = _per_axis(fn, "causal", causal, ndim, kind=bool)
    sfx = (lambda a: f"[{a}]") if ndim > 1 else (lambda a: "")
    length_name = "shape" if ndim > 1 else "length"
    for a in range(ndim):
        for name, v in ((length_name, shape[a]), ("kernel_size", ks[a]), ("dilation", ds[a]), ("stride", ss[a])):
            if v < 1:
                raise ValueError(f"{fn}: {name}{sfx(a)} must be >= 1, got {v}")
        if ks[a] > shape[a]:
            raise ValueError(f"{fn}: kernel_size{sfx(a)} = {ks[a]} is larger than the axis length {length_name}{sfx(a)} = {shape[a]}")
        if ks[a] * ds[a] > shape[a]:
            raise ValueError(
                f"{fn}: kernel_size{sfx(a)} * dilation{sfx(a)} = {ks[a]} * {ds[a]} = {ks[a] * ds[a]} is larger than the "
                f"axis length {length_name}{sfx(a)} = {shape[a]}"
            )
        if ss[a] > ks[a]:
            raise ValueError(f"{fn}: stride{sfx(a)} = {ss[a]} is larger than kernel_size{sfx(a)} = {ks[a]}")
    return shape, ks, ds, ss, cs


# --------------------------------------------------------------------------------------------
# token permutation into tiles


def tile_permutation(shape: Sequence[int], tile_shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Order the tokens of a row-major grid tile by tile.

    Tiles are visited in row-major order over the tile grid, and the tokens of a tile in row-major
    order inside it. When an axis is not a multiple of its tile size the border tiles are cut
    short (correct, but later 1-D blocks then straddle tiles; divisible shapes with
    ``q_block == prod(tile_shape)`` make every query block exactly one tile).

    Returns:
        ``(perm, inv_perm)``, ``int64 [prod(shape)]``: ``perm[p]`` is the row-major index of the
        token at position ``p``; ``inv_perm`` is its inverse.
    """
    shape = tuple(int(x) for x in shape)
    tile_shape = tuple(int(x) for x in tile_shape)
    if len(tile_shape) != len(shape):
        raise ValueError(f"tile_permutation: tile_shape {tile_shape} must have one entry per axis of shape {shape}")
    if any(t < 1 for t in tile_shape):
        raise ValueError(f"tile_permutation: tile_shape entries must be >= 1, got {tile_shape}")
    n = math.prod(shape)
    idx = torch.arange(n, dtype=torch.int64)
    tile_id = torch.zeros(n, dtype=torch.int64)
    offset_id = torch.zeros(n, dtype=torch.int64)
    rest = idx
    coords = []
    for size in reversed(shape):
        coords.append(rest % size)
        rest = rest // size
    coords.reverse()
    for c, size, t in zip(coords, shape, tile_shape):
        tile_id = tile_id * (-(-size // t)) + c // t
        offset_id = offset_id * t + c % t
    key = tile_id * math.prod(tile_shape) + offset_id
    perm = torch.argsort(key, stable=True)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = idx
    return perm, inv_perm


# --------------------------------------------------------------------------------------------
# the separable engine: per axis, each query coordinate sees a range of key group coordinates


class _Axis(NamedTuple):
    size: int
    dilation: int
    group: Tensor  # int64 [size]: coordinate -> dilation group
    lo: Tensor  # int64 [size]: first visible key, in group coordinates
    hi: Tensor  # int64 [size]: last visible key, in group coordinates (inclusive)


def _na_axis(size: int, k: int, d: int, s: int, causal: bool) -> _Axis:
    i = torch.arange(size, dtype=torch.int64)
    g, t = i % d, i // d
    group_len = (size - g + d - 1) // d
    if causal:
        leader = torch.minimum((t // s) * s + s - 1, group_len - 1)
        lo, hi = (leader - k + 1).clamp(min=0), t
    else:
        left, right = k // 2, k // 2 + (k % 2 - 1)
        leader = torch.minimum((t // s) * s + s // 2, group_len - 1)
        # clamp(leader, left, L_g - 1 - right); L_g >= k is guaranteed by k * d <= L.
        centre = torch.maximum(torch.minimum(leader, group_len - 1 - right), torch.full_like(leader, left))
        lo, hi = centre - left, centre + right
    return _Axis(size, d, g, lo, hi)


def _unravel(flat: Tensor, shape: tuple[int, ...]) -> list[Tensor]:
    coords = []
    for size in reversed(shape):
        coords.append(flat % size)
        flat = flat // size
    coords.reverse()
    return coords


def _separable_predicate(axes: Sequence[_Axis], perm: Tensor | None) -> Predicate:
    shape = tuple(a.size for a in axes)
    n = math.prod(shape)

    def allowed(qi: Tensor, kj: Tensor) -> Tensor:
        # build_pattern also asks about rows/columns past the end (masked out afterwards): clamp.
        qi, kj = qi.clamp(0, n - 1), kj.clamp(0, n - 1)
        if perm is not None:
            qi, kj = perm[qi], perm[kj]
        ok = None
        for ax, qa, ka in zip(axes, _unravel(qi, shape), _unravel(kj, shape)):
            # Lookups on the un-broadcast inputs; only the comparisons are pair-sized.
            kt = ka // ax.dilation
            m = (kt >= ax.lo[qa]) & (kt <= ax.hi[qa])
            if ax.dilation > 1:
                m &= ax.group[ka] == ax.group[qa]
            ok = m if ok is None else ok & m
        return ok

    return allowed


def _axis_key_coords(ax: _Axis, q_coords: Tensor) -> Tensor:
    """Key coordinates visible along one axis from any of ``q_coords`` (exact for contiguous runs)."""
    d = ax.dilation
    g = ax.group[q_coords]
    lo = torch.full((d,), ax.size, dtype=torch.int64).scatter_reduce(0, g, ax.lo[q_coords], "amin")
    hi = torch.full((d,), -1, dtype=torch.int64).scatter_reduce(0, g, ax.hi[q_coords], "amax")
    present = hi >= 0
    groups, lo, hi = torch.arange(d)[present], lo[present], hi[present]
    counts = hi - lo + 1
    steps = torch.arange(int(counts.max()), dtype=torch.int64)
    coords = (groups + lo * d)[:, None] + steps[None, :] * d  # [groups, longest run]
    return coords[steps[None, :] < counts[:, None]]


def _separable_pattern(
    axes: Sequence[_Axis], perm: Tensor | None, inv_perm: Tensor | None, q_block: int, k_block: int, device
) -> BlockSparsePattern:
    shape = tuple(a.size for a in axes)
    n = math.prod(shape)
    row_strides = [math.prod(shape[a + 1 :]) for a in range(len(shape))]

    def candidates(qb: int) -> list[int]:
        pos = torch.arange(qb * q_block, min(n, (qb + 1) * q_block), dtype=torch.int64)
        orig = perm[pos] if perm is not None else pos
        flat = None
        for ax, qa, stride in zip(axes, _unravel(orig, shape), row_strides):
            kc = _axis_key_coords(ax, torch.unique(qa)) * stride
            flat = kc if flat is None else (flat[:, None] + kc[None, :]).reshape(-1)
        kpos = inv_perm[flat] if inv_perm is not None else flat
        return torch.unique(kpos // k_block).tolist()

    return build_pattern(_separable_predicate(axes, perm), n, n, q_block, k_block, candidates, device)


# --------------------------------------------------------------------------------------------
# public builders


def neighborhood_predicate(
    shape: int | Sequence[int],
    kernel_size: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    stride: int | Sequence[int] = 1,
    causal: bool | Sequence[bool] = False,
    perm: Tensor | None = None,
) -> Predicate:
    """The element rule of N-D neighborhood attention, ``allowed(q_pos [n, 1], k_pos [1, m])``.

    Positions index the row-major token grid, or the permuted sequence when ``perm`` is given
    (``perm[p]`` = row-major index of position ``p``). Useful to compose NA with other predicates.
    """
    ndim = 1 if isinstance(shape, int) else len(shape)
    shape, ks, ds, ss, cs = _check_na_args("neighborhood_predicate", shape, kernel_size, dilation, stride, causal, ndim)
    axes = [_na_axis(*args) for args in zip(shape, ks, ds, ss, cs)]
    return _separable_predicate(axes, None if perm is None else perm.to(torch.int64).cpu())


def neighborhood_pattern(
    shape: int | Sequence[int],
    kernel_size: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    stride: int | Sequence[int] = 1,
    causal: bool | Sequence[bool] = False,
    tile_shape: Sequence[int] | None = None,
    q_block: int | None = None,
    k_block: int | None = None,
    device: torch.device | str | None = None,
    *,
    _fn: str = "neighborhood_pattern",
) -> PermutedPattern:
    """Neighborhood attention over an N-D token grid (N = 1, 2, 3), NATTEN semantics per axis.

    Args:
        shape: token grid, e.g. ``(H, W)``; tokens are numbered row-major (last axis fastest).
        kernel_size, dilation, stride, causal: an int / bool for every axis, or one per axis.
        tile_shape: optional spatial tile (one entry per axis); tokens are permuted tile by tile
            (:func:`tile_permutation`). ``None``: row-major order (identity permutation).
        q_block, k_block: kernel tile sizes; default ``prod(tile_shape)`` when tiling, else
            128 / 64. The Triton kernel needs powers of two >= 16.
        device: where to put the lists.

    Returns:
        :class:`PermutedPattern` ``(pattern, perm, inv_perm)``; run the kernel on
        ``q[:, perm]``, ``k[:, perm]``, ``v[:, perm]`` and take ``out[:, inv_perm]``.

    Raises:
        ValueError naming the argument when ``kernel_size > axis``, ``kernel_size * dilation >
        axis``, ``stride > kernel_size``, or any size is < 1.
    """
    ndim = 1 if isinstance(shape, int) else len(shape)
    if ndim not in (1, 2, 3):
        raise ValueError(f"{_fn}: shape must have 1, 2 or 3 axes, got {shape!r}")
    shape, ks, ds, ss, cs = _check_na_args(_fn, shape, kernel_size, dilation, stride, causal, ndim)
    n = math.prod(shape)
    if tile_shape is not None:
        tile_shape = _per_axis(_fn, "tile_shape", tile_shape, ndim)
        if any(t < 1 for t in tile_shape):
            raise ValueError(f"{_fn}: tile_shape entries must be >= 1, got {tile_shape}")
        perm, inv_perm = tile_permutation(shape, tile_shape)
        default_block = math.prod(tile_shape)
        q_block = default_block if q_block is None else q_block
        k_block = default_block if k_block is None else k_block
        identity = False
    else:
        perm = inv_perm = torch.arange(n, dtype=torch.int64)
        q_block = 128 if q_block is None else q_block
        k_block = 64 if k_block is None else k_block
        identity = True
    axes = [_na_axis(*args) for args in zip(shape, ks, ds, ss, cs)]
    pat = _separable_pattern(axes, None if identity else perm, None if identity else inv_perm, q_block, k_block, device)
    if ndim == 1 and identity and ds[0] == 1 and ss[0] == 1:
        pat.na1d = (ks[0], cs[0])  # plain 1-D neighborhood: the list-free kernels' NA1D mode can run it
    return PermutedPattern(pat, perm, inv_perm)


def neighborhood_pattern_1d(
    length: int,
    kernel_size: int,
    dilation: int = 1,
    stride: int = 1,
    causal: bool = False,
    q_block: int = 128,
    k_block: int = 64,
    device: torch.device | str | None = None,
) -> BlockSparsePattern:
    """1-D neighborhood attention over ``length`` tokens (NATTEN's ``na1d`` rule; see the module doc).

    ``kernel_size == length`` (without dilation, stride or causal) is full attention;
    ``stride == kernel_size`` is blocked attention; ``causal=True`` with ``kernel_size == length``
    is causal attention. Returns the :class:`BlockSparsePattern` (no permutation in 1-D).
    """
    if isinstance(length, bool) or not isinstance(length, int):
        raise ValueError(f"neighborhood_pattern_1d: length must be an int, got {length!r}")
    for name, v in (("kernel_size", kernel_size), ("dilation", dilation), ("stride", stride)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"neighborhood_pattern_1d: {name} must be an int, got {v!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"neighborhood_pattern_1d: causal must be a bool, got {causal!r}")
    return neighborhood_pattern(
        length, kernel_size, dilation, stride, causal, None, q_block, k_block, device, _fn="neighborhood_pattern_1d"
    ).pattern


def neighborhood_pattern_2d(
    shape: Sequence[int],
    kernel_size: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    stride: int | Sequence[int] = 1,
    causal: bool | Sequence[bool] = False,
    tile_shape: Sequence[int] | None = None,
    q_block: int | None = None,
    k_block: int | None = None,
    device: torch.device | str | None = None,
) -> PermutedPattern:
    """2-D neighborhood attention on an ``(H, W)`` grid; see :func:`neighborhood_pattern`.

    Example tiling: ``tile_shape=(8, 16)`` with the default ``q_block = k_block = 128``.
    """
    if isinstance(shape, int) or len(shape) != 2:
        raise ValueError(f"neighborhood_pattern_2d: shape must be (H, W), got {shape!r}")
    return neighborhood_pattern(
        tuple(shape), kernel_size, dilation, stride, causal, tile_shape, q_block, k_block, device, _fn="neighborhood_pattern_2d"
    )


def neighborhood_pattern_3d(
    shape: Sequence[int],
    kernel_size: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    stride: int | Sequence[int] = 1,
    causal: bool | Sequence[bool] = False,
    tile_shape: Sequence[int] | None = None,
    q_block: int | None = None,
    k_block: int | None = None,
    device: torch.device | str | None = None,
) -> PermutedPattern:
    """3-D neighborhood attention on a ``(T, H, W)`` grid; see :func:`neighborhood_pattern`.

    Example tiling: ``tile_shape=(2, 8, 8)`` with the default ``q_block = k_block = 128``.
    """
    if isinstance(shape, int) or len(shape) != 3:
        raise ValueError(f"neighborhood_pattern_3d: shape must be (T, H, W), got {shape!r}")
    return neighborhood_pattern(
        tuple(shape), kernel_size, dilation, stride, causal, tile_shape, q_block, k_block, device, _fn="neighborhood_pattern_3d"
    )
