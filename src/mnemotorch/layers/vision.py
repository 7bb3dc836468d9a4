"""2-D local attention on feature maps: neighborhood attention (NATTEN semantics) and HaloNet.

Both modules take feature maps ``x [B, H, W, C]`` (channels last, NATTEN's layout) and return the
same shape. They are *not* registered token mixers: they are bidirectional 2-D operators for
vision backbones, not causal sequence mixers with a streaming state.

* :class:`NeighborhoodAttention2D` -- every query attends the ``kh x kw`` neighbourhood around it,
  with NATTEN's exact rules per axis (window slid inward at the borders, dilation, stride, causal;
  Hassani et al. 2023 "Neighborhood Attention Transformer", 2022 "Dilated Neighborhood
  Attention Transformer"). The attention core runs through the block-sparse kernel
  (:func:`mnemotorch.ops.block_sparse.block_sparse_attention`) on tokens permuted into spatial
  tiles, with NATTEN's relative positional bias as the kernel's additive bias (one joint table,
  looked up per tile), or through a gather path in plain PyTorch (``O(HW * kh * kw)``).
* :class:`HaloAttention` -- HaloNet blocked local attention (Vaswani et al. 2021, "Scaling Local
  Self-Attention for Parameter Efficient Visual Backbones"): every ``b x b`` query block attends
  one shared ``(b + 2h) x (b + 2h)`` window, with separate row and column relative-position
  logits. On CUDA (masked padding) it runs through the block-sparse kernel on tokens permuted
  block by block, the relative logits ``q . rel_h[dy]`` / ``q . rel_w[dx]`` being the kernel's
  per-query bias tables; elsewhere a blocked (unfold-style) computation in plain PyTorch,
  ``O(HW * (b + 2h)^2)``.

Float64 dense-masked references (:func:`na2d_reference`, :func:`halo_attention_reference`) are
the specifications the fast paths are tested against. The rules are written out in
``docs/mixers/vision_2d.md``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.block_sparse import (
    SUPPORTED_KERNEL_DTYPES,
    PermutedPattern,
    RelativeBias,
    block_sparse_attention,
    halo_pattern,
    na2d_fast_path,
    neighborhood_pattern_2d,
    neighborhood_predicate,
    relative_bias_grid,
    triton_available,
)

__all__ = [
    "HaloAttention",
    "NeighborhoodAttention2D",
    "halo_attention",
    "halo_attention_reference",
    "na2d",
    "na2d_mask",
    "na2d_reference",
]

NA2D_BACKENDS = ("auto", "block_sparse", "triton", "gather")
HALO_BACKENDS = ("auto", "blocked", "block_sparse", "triton")


# --------------------------------------------------------------------------------------------
# argument checks (loud, early, naming the argument)


def _pair(fn: str, name: str, value, minimum: int) -> tuple[int, int]:
    def ok(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= minimum

    if ok(value):
        return (value, value)
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2 and all(ok(v) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{fn}: {name} must be an int >= {minimum} or a pair of them, got {value!r}")


def _bool_pair(fn: str, name: str, value) -> tuple[bool, bool]:
    if isinstance(value, bool):
        return (value, value)
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, bool) for v in value):
        return (value[0], value[1])
    raise ValueError(f"{fn}: {name} must be a bool or a pair of bools, got {value!r}")


def _check_na_axes(fn: str, shape: tuple[int, int], ks, ds, ss) -> None:
    for a, axis in enumerate(("height", "width")):
        if ks[a] > shape[a]:
            raise ValueError(f"{fn}: kernel_size[{a}] = {ks[a]} is larger than the map {axis} = {shape[a]}")
        if ks[a] * ds[a] > shape[a]:
            raise ValueError(
                f"{fn}: kernel_size[{a}] * dilation[{a}] = {ks[a]} * {ds[a]} = {ks[a] * ds[a]} is larger than the map "
                f"{axis} = {shape[a]}"
            )
        if ss[a] > ks[a]:
            raise ValueError(f"{fn}: stride[{a}] = {ss[a]} is larger than kernel_size[{a}] = {ks[a]}")


def _check_heads(fn: str, q: Tensor, k: Tensor, v: Tensor) -> None:
    """``q, k, v [B, H, W, heads, D]``, one shape, one floating dtype, one device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 5:
            raise ValueError(f"{fn}: {name} must have shape [batch, height, width, heads, head_dim], got {list(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be floating point, got {t.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{fn}: q, k, v must have one shape, got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{fn}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{fn}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def _check_map(fn: str, x: Tensor, dim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[-1] != dim:
        raise ValueError(f"{fn}: x must have shape [batch, height, width, {dim}] (channels last), got {list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: x must be floating point, got {x.dtype}")


# --------------------------------------------------------------------------------------------
# neighborhood attention 2-D: the rule, the reference, the gather path, the block-sparse path


def na2d_mask(
    shape: Sequence[int],
    kernel_size: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    stride: int | Sequence[int] = 1,
    causal: bool | Sequence[bool] = False,
) -> Tensor:
    """``bool [H*W, H*W]``: which (query, key) pairs of a row-major ``H x W`` grid NA-2D allows.

    ``O((HW)^2)``: for references and tests. The element rule is the block-sparse library's
    :func:`~mnemotorch.ops.block_sparse.neighborhood_predicate` (NATTEN semantics per axis, ANDed).
    """
    h, w = _pair("na2d_mask", "shape", tuple(shape), 1)
    n = h * w
    allowed = neighborhood_predicate((h, w), kernel_size, dilation, stride, causal)
    idx = torch.arange(n, dtype=torch.int64)
    return allowed(idx[:, None], idx[None, :])


def na2d_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel_size: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    stride: int | Sequence[int] = 1,
    causal: bool | Sequence[bool] = False,
    rpb: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Dense-masked 2-D neighborhood attention (the specification; run it in float64).

    Args:
        q, k, v: ``[B, H, W, heads, D]``.
        kernel_size, dilation, stride, causal: per axis (an int / bool, or a pair).
        rpb: optional relative positional bias ``[heads, 2*kh - 1, 2*kw - 1]`` (NAT / DiNAT):
            pair (query at group coordinates ``(ti, tj)``, key at ``(ui, uj)``) gets the logit bias
            ``rpb[head, ui - ti + kh - 1, uj - tj + kw - 1]``. Needs ``stride == 1``.
        scale: logit scale, default ``D ** -0.5``.

    Returns:
        ``[B, H, W, heads, D]``. ``O((HW)^2)`` memory: small inputs only.
    """
    fn = "na2d_reference"
    _check_heads(fn, q, k, v)
    b, h, w, nh, d = q.shape
    ks, ds, ss = _pair(fn, "kernel_size", kernel_size, 1), _pair(fn, "dilation", dilation, 1), _pair(fn, "stride", stride, 1)
    cs = _bool_pair(fn, "causal", causal)
    _check_na_axes(fn, (h, w), ks, ds, ss)
    scale = d**-0.5 if scale is None else float(scale)
    mask = na2d_mask((h, w), ks, ds, ss, cs).to(q.device)
    qf, kf, vf = (t.reshape(b, h * w, nh, d) for t in (q, k, v))
    s = torch.einsum("bihd,bjhd->bhij", qf, kf) * scale
    if rpb is not None:
        _check_rpb(fn, rpb, nh, ks, ss)
        pos = torch.arange(h * w, device=q.device)
        # group coordinates: a key is only ever visible from its own dilation group
        ti, tj = (pos // w) // ds[0], (pos % w) // ds[1]
        di = (ti[None, :] - ti[:, None] + ks[0] - 1).clamp(0, 2 * ks[0] - 2)  # clamped where masked anyway
        dj = (tj[None, :] - tj[:, None] + ks[1] - 1).clamp(0, 2 * ks[1] - 2)
        s = s + rpb[:, di, dj].to(s.dtype)[None]
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)  # every query sees >= 1 key (itself at least)
    return torch.einsum("bhij,bjhd->bihd", p, vf).reshape(b, h, w, nh, d)


def _check_rpb(fn: str, rpb: Tensor, heads: int, ks, ss) -> None:
    want = (heads, 2 * ks[0] - 1, 2 * ks[1] - 1)
    if not isinstance(rpb, Tensor) or tuple(rpb.shape) != want:
        got = list(rpb.shape) if isinstance(rpb, Tensor) else type(rpb).__name__
        raise ValueError(f"{fn}: rpb must have shape [heads, 2*kh-1, 2*kw-1] = {list(want)}, got {got}")
    if ss != (1, 1):
        # With a stride, a query shares its leader's window, so key offsets leave the 2k-1 table.
        raise ValueError(f"{fn}: a relative positional bias (rpb) needs stride 1, got stride {ss}")


def _na_axis_neighbors(size: int, k: int, d: int, s: int, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per coordinate of one axis: its ``k`` window slots.

    Returns ``(index [size, k], valid [size, k], offset [size, k])``: the key coordinate of each
    slot, whether the slot holds a visible key (always, unless causal), and the rpb column
    ``u - t + k - 1`` (group coordinates).
    """
    i = torch.arange(size, dtype=torch.int64)
    g, t = i % d, i // d
    group_len = (size - g + d - 1) // d  # dilation groups can be unequal
    if causal:
        leader = torch.minimum((t // s) * s + s - 1, group_len - 1)  # last query of the stride group
        start = leader - k + 1  # the window ends at the leader; slots past the query are invisible
    else:
        left, right = k // 2, k // 2 + (k % 2 - 1)
        leader = torch.minimum((t // s) * s + s // 2, group_len - 1)  # centre query of the stride group
        centre = torch.maximum(torch.minimum(leader, group_len - 1 - right), torch.full_like(leader, left))
        start = centre - left  # slid inward at the borders: always k keys
    u = start[:, None] + torch.arange(k, dtype=torch.int64)[None, :]
    valid = (u >= 0) & (u <= t[:, None]) if causal else torch.ones(size, k, dtype=torch.bool)
    u = u.clamp(min=0)
    offset = (u - t[:, None] + k - 1).clamp(0, 2 * k - 2)
    return g[:, None] + u * d, valid, offset


def _na2d_gather(q: Tensor, k: Tensor, v: Tensor, ks, ds, ss, cs, rpb: Tensor | None, scale: float) -> Tensor:
    """NA-2D by gathering each query's ``kh * kw`` keys: ``O(HW * kh * kw)`` time and memory."""
    b, h, w, nh, d = q.shape
    ri, rv, ro = _na_axis_neighbors(h, ks[0], ds[0], ss[0], cs[0])
    ci, cv, co = _na_axis_neighbors(w, ks[1], ds[1], ss[1], cs[1])
    n, kk = h * w, ks[0] * ks[1]
    # [H, W, kh, kw] -> [HW, kh*kw]: row-major key index, validity, rpb coordinates
    idx = (ri[:, None, :, None] * w + ci[None, :, None, :]).reshape(n, kk).to(q.device)
    valid = (rv[:, None, :, None] & cv[None, :, None, :]).reshape(n, kk)
    masked = not bool(valid.all())  # decided on the CPU: no device sync
    valid = valid.to(q.device)
    kf = k.reshape(b, n, nh, d)[:, idx]  # [B, HW, K, heads, D]
    vf = v.reshape(b, n, nh, d)[:, idx]
    qf = q.reshape(b, n, nh, d)
    # Broadcast-multiply and sum rather than einsum: einsum would run B*HW*heads tiny matmuls.
    s = (qf[:, :, None] * kf).sum(-1) * scale  # [B, HW, K, heads]
    if rpb is not None:
        oi = ro[:, None, :, None].expand(h, w, ks[0], ks[1]).reshape(n, kk).to(q.device)
        oj = co[None, :, None, :].expand(h, w, ks[0], ks[1]).reshape(n, kk).to(q.device)
        s = s + rpb[:, oi, oj].permute(1, 2, 0).to(s.dtype)[None]  # [1, HW, K, heads]
    if masked:
        s = s.masked_fill(~valid[None, :, :, None], float("-inf"))
    p = torch.softmax(s, dim=2)
    return (p[..., None] * vf).sum(2).reshape(b, h, w, nh, d)


_PATTERN_CACHE: dict[tuple, PermutedPattern] = {}


def _na2d_pattern(shape, ks, ds, ss, cs, tile_shape, device: torch.device) -> PermutedPattern:
    key = (shape, ks, ds, ss, cs, tile_shape, str(device))
    pp = _PATTERN_CACHE.get(key)
    if pp is None:
        if len(_PATTERN_CACHE) > 64:  # many map sizes: keep the cache bounded
            _PATTERN_CACHE.clear()
        block = math.prod(tile_shape)
        pp = neighborhood_pattern_2d(shape, ks, ds, ss, cs, tile_shape=tile_shape, q_block=block, k_block=block)
        pp = PermutedPattern(pp.pattern.to(device), pp.perm.to(device), pp.inv_perm.to(device))
        _PATTERN_CACHE[key] = pp
    return pp


_COORD_CACHE: dict[tuple, RelativeBias] = {}


def _grid_bias(tables, shape, perm: Tensor, dilation, joint: bool, key: tuple, device: torch.device) -> RelativeBias:
    """:func:`relative_bias_grid` with its coordinates built once per layout and kept on ``device``."""
    key = (*key, joint, tuple(t is None for t in tables) if not joint else None, str(device))
    cached = _COORD_CACHE.get(key)
    if cached is None:
        if len(_COORD_CACHE) > 64:
            _COORD_CACHE.clear()
        cached = relative_bias_grid(tables, shape, perm=perm, dilation=dilation, joint=joint).to(device)
        _COORD_CACHE[key] = cached
    used = (tables,) if joint else tuple(t for t in tables if t is not None)
    if joint:
        n_axes = len(shape)
        used = (tables.reshape(*tables.shape[: tables.dim() - n_axes], -1),)
    return RelativeBias(used, cached.q_coords, cached.k_coords)


def _na2d_block_sparse(
    q: Tensor, k: Tensor, v: Tensor, ks, ds, ss, cs, scale: float, tile_shape, backend: str, rpb: Tensor | None = None
) -> Tensor:
    b, h, w, nh, d = q.shape
    pp = _na2d_pattern((h, w), ks, ds, ss, cs, tile_shape, q.device)
    # tokens tile by tile, so a query block is a spatial tile whose neighbourhood covers few key tiles
    qp, kp, vp = (pp.permute(t.reshape(b, h * w, nh, d)) for t in (q, k, v))
    bias = None
    if rpb is not None:
        # NAT's rpb[head, dy + kh - 1, dx + kw - 1] (group coordinates) as one joint table
        key = ("na2d", (h, w), ks, ds, ss, cs, tuple(tile_shape))
        bias = _grid_bias(rpb, (h, w), pp.perm, ds, True, key, q.device)
    out = block_sparse_attention(qp, kp, vp, pp.pattern, scale=scale, backend=backend, bias=bias)
    return pp.unpermute(out).reshape(b, h, w, nh, d)


def _kernel_ok(q: Tensor) -> bool:
    return triton_available(q.device) and q.dtype in SUPPORTED_KERNEL_DTYPES and 16 <= q.shape[-1] <= 256


def _check_tile(fn: str, tile_shape) -> tuple[int, int]:
    tile = _pair(fn, "tile_shape", tile_shape, 1)
    block = tile[0] * tile[1]
    if block < 16 or block & (block - 1):
        raise ValueError(f"{fn}: tile_shape {tile} must hold a power-of-two number (>= 16) of tokens: the kernel's block")
    return tile


def na2d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel_size: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    stride: int | Sequence[int] = 1,
    causal: bool | Sequence[bool] = False,
    rpb: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    tile_shape: Sequence[int] = (8, 16),
) -> Tensor:
    """2-D neighborhood attention with NATTEN's semantics (like ``natten.functional.na2d``).

    Args:
        q, k, v: ``[B, H, W, heads, D]``.
        kernel_size, dilation, stride, causal: per axis, an int / bool or a pair (see
            :func:`~mnemotorch.ops.block_sparse.neighborhood_pattern`). Checks: kernel <= axis,
            kernel * dilation <= axis, stride <= kernel.
        rpb: optional relative positional bias ``[heads, 2*kh-1, 2*kw-1]`` (see
            :func:`na2d_reference`); every path supports it (the kernel as its additive bias).
        scale: logit scale, default ``D ** -0.5``.
        backend: ``"auto"`` (the Triton kernel on CUDA when the kernel supports the dtype and
            head dim, else ``"gather"``), ``"block_sparse"`` (the
            block-sparse op with its own ``auto`` dispatch: Triton on CUDA, its dense reference
            elsewhere), ``"triton"`` (the kernel, also under ``TRITON_INTERPRET=1``), or
            ``"gather"`` (plain PyTorch, ``O(HW * kh * kw)``). On ``"triton"``, plain NA-2D
            (dilation 1, stride 1, non-causal, no ``rpb``) runs the list-free kernels of
            ``ops/block_sparse/na2d_triton.py`` on row-major tokens (``tile_shape`` unused) unless
            ``MNEMO_NA2D_KERNEL=off``.
        tile_shape: spatial tile of the token permutation for the block-sparse paths; its
            ``prod`` is the kernel's query/key block (a power of two >= 16).

    Returns:
        ``[B, H, W, heads, D]``.
    """
    fn = "na2d"
    _check_heads(fn, q, k, v)
    if backend not in NA2D_BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {NA2D_BACKENDS}, got {backend!r}")
    ks, ds, ss = _pair(fn, "kernel_size", kernel_size, 1), _pair(fn, "dilation", dilation, 1), _pair(fn, "stride", stride, 1)
    cs = _bool_pair(fn, "causal", causal)
    _check_na_axes(fn, tuple(q.shape[1:3]), ks, ds, ss)
    tile = _check_tile(fn, tile_shape)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if rpb is not None:
        _check_rpb(fn, rpb, q.shape[3], ks, ss)
    if backend == "auto":
        backend = "triton" if _kernel_ok(q) else "gather"
    if backend == "gather":
        return _na2d_gather(q, k, v, ks, ds, ss, cs, rpb, scale)
    if backend == "triton" and ds == (1, 1) and ss == (1, 1) and cs == (False, False) and rpb is None and na2d_fast_path():
        # plain NA-2D: the list-free kernels gather spatial tiles from row-major tokens (no permutation)
        from ..ops.block_sparse.na2d_triton import na2d_attention_triton

        b, h, w, nh, d = q.shape
        out = na2d_attention_triton(*(t.reshape(b, h * w, t.shape[3], d) for t in (q, k, v)), (h, w), ks, scale)
        return out.reshape(b, h, w, nh, d)
    return _na2d_block_sparse(q, k, v, ks, ds, ss, cs, scale, tile, "triton" if backend == "triton" else "auto", rpb)


class NeighborhoodAttention2D(nn.Module):
    """2-D neighborhood attention layer on feature maps ``[B, H, W, C]`` (NAT / DiNAT).

    ``x -> qkv = Linear(C, 3C) -> na2d per head -> Linear(C, C)``, as NATTEN's
    ``NeighborhoodAttention2D``. Every query attends ``kh x kw`` keys around it (fewer only when
    causal), windows slid inward at the borders; see :func:`na2d` for the arguments.

    Args:
        dim: channels ``C``; num_heads must divide it.
        kernel_size, dilation, stride, causal: NATTEN's per-axis knobs (int / bool or pairs).
        qkv_bias: bias in the q/k/v projection.
        rel_pos_bias: learn NAT's relative positional bias ``[heads, 2kh-1, 2kw-1]`` (needs
            stride 1; on the kernel backends it is the kernel's additive bias, looked up per tile,
            with its gradient accumulated in the backward).
        backend, tile_shape: see :func:`na2d`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int | Sequence[int] = 7,
        dilation: int | Sequence[int] = 1,
        stride: int | Sequence[int] = 1,
        causal: bool | Sequence[bool] = False,
        qkv_bias: bool = True,
        rel_pos_bias: bool = False,
        backend: str = "auto",
        tile_shape: Sequence[int] = (8, 16),
    ):
        super().__init__()
        fn = "NeighborhoodAttention2D"
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"{fn}: dim must be a positive int, got {dim!r}")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0 or dim % num_heads:
            raise ValueError(f"{fn}: num_heads must be a positive divisor of dim ({dim}), got {num_heads!r}")
        self.kernel_size = _pair(fn, "kernel_size", kernel_size, 1)
        self.dilation = _pair(fn, "dilation", dilation, 1)
        self.stride = _pair(fn, "stride", stride, 1)
        self.causal = _bool_pair(fn, "causal", causal)
        for a in range(2):
            if self.stride[a] > self.kernel_size[a]:
                raise ValueError(f"{fn}: stride[{a}] = {self.stride[a]} is larger than kernel_size[{a}] = {self.kernel_size[a]}")
        if not isinstance(rel_pos_bias, bool):
            raise ValueError(f"{fn}: rel_pos_bias must be a bool, got {rel_pos_bias!r}")
        if rel_pos_bias and self.stride != (1, 1):
            raise ValueError(f"{fn}: rel_pos_bias needs stride 1, got stride {self.stride}")
        if backend not in NA2D_BACKENDS:
            raise ValueError(f"{fn}: backend must be one of {NA2D_BACKENDS}, got {backend!r}")
        self.tile_shape = _check_tile(fn, tile_shape)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if rel_pos_bias:
            kh, kw = self.kernel_size
            self.rpb = nn.Parameter(torch.empty(num_heads, 2 * kh - 1, 2 * kw - 1))
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
            f"stride={self.stride}, causal={self.causal}, rel_pos_bias={self.rpb is not None}, backend={self.backend!r}"
        )

    def attention(self, q: Tensor, k: Tensor, v: Tensor, backend: str | None = None) -> Tensor:
        """The attention core on ``q, k, v [B, H, W, heads, D]`` (with this layer's rpb)."""
        return na2d(
            q, k, v, self.kernel_size, self.dilation, self.stride, self.causal, self.rpb, self.scale,
            self.backend if backend is None else backend, self.tile_shape,
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        _check_map("NeighborhoodAttention2D", x, self.dim)
        b, h, w, _ = x.shape
        _check_na_axes("NeighborhoodAttention2D", (h, w), self.kernel_size, self.dilation, self.stride)
        q, k, v = self.qkv(x).reshape(b, h, w, 3, self.num_heads, self.head_dim).unbind(3)
        out = self.attention(q, k, v)
        return self.proj(out.reshape(b, h, w, self.dim))


# --------------------------------------------------------------------------------------------
# HaloNet blocked local attention


def _check_halo(fn: str, q: Tensor, k: Tensor, v: Tensor, block_size, halo_size, rel_h, rel_w) -> tuple[int, int]:
    _check_heads(fn, q, k, v)
    for name, val, lo in (("block_size", block_size, 1), ("halo_size", halo_size, 0)):
        if isinstance(val, bool) or not isinstance(val, int) or val < lo:
            raise ValueError(f"{fn}: {name} must be an int >= {lo}, got {val!r}")
    h, w = q.shape[1], q.shape[2]
    if h % block_size or w % block_size:
        raise ValueError(f"{fn}: the map ({h} x {w}) must be a multiple of block_size ({block_size}) along both axes")
    want = (2 * (block_size + halo_size) - 1, q.shape[-1])
    for name, t in (("rel_h", rel_h), ("rel_w", rel_w)):
        if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != want):
            got = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{fn}: {name} must have shape [2*(block_size+halo_size)-1, head_dim] = {list(want)}, got {got}")
    return block_size, halo_size


def halo_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_size: int,
    halo_size: int,
    rel_h: Tensor | None = None,
    rel_w: Tensor | None = None,
    mask_padding: bool = True,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """HaloNet blocked local attention (the paper's algorithm, or the block-sparse kernel).

    The map is cut into ``b x b`` query blocks; block ``(R, C)`` attends the keys of the
    ``(b + 2h) x (b + 2h)`` window of image rows ``R*b - h .. R*b + b + h - 1`` (columns alike).
    The logit of query ``(r, c)`` and key ``(r', c')`` is
    ``scale * (q . k + q . rel_h[r' - r + b + h - 1] + q . rel_w[c' - c + b + h - 1])``.

    Args:
        q, k, v: ``[B, H, W, heads, D]``; ``H`` and ``W`` multiples of ``block_size``.
        block_size (b), halo_size (h): ``b >= 1``, ``h >= 0``.
        rel_h, rel_w: optional relative embeddings ``[2*(b+h) - 1, D]`` (shared by the heads).
        mask_padding: window positions outside the image are excluded from the softmax (True), or
            attended as zero keys and values (False: zero padding as timm's ``HaloAttn``; their
            logit is then the relative term alone).
        scale: default ``D ** -0.5``.
        backend: ``"auto"`` (the kernel on CUDA when ``mask_padding`` and the kernel supports the
            dtype and head dim, else ``"blocked"``), ``"blocked"`` (block by block in plain
            PyTorch), ``"block_sparse"`` (the block-sparse op over :func:`halo_pattern` with its
            own dispatch: Triton on CUDA, its dense reference elsewhere) or ``"triton"`` (the
            kernel, also under ``TRITON_INTERPRET=1``). The block-sparse paths need
            ``mask_padding=True``: padded keys do not exist in the pattern. They add the relative
            logits as the kernel's per-query bias tables ``scale * q . rel[r]`` (``O(HW * (b+h))``).

    Returns:
        ``[B, H, W, heads, D]``. Time and memory ``O(H * W * (b + 2h)^2)``.
    """
    fn = "halo_attention"
    b, h = _check_halo(fn, q, k, v, block_size, halo_size, rel_h, rel_w)
    if not isinstance(mask_padding, bool):
        raise ValueError(f"{fn}: mask_padding must be a bool, got {mask_padding!r}")
    if backend not in HALO_BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {HALO_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if mask_padding and _kernel_ok(q) else "blocked"
    if backend != "blocked":
        if not mask_padding:
            raise ValueError(f"{fn}: backend {backend!r} needs mask_padding=True (zero-padded keys are not in the pattern); use 'blocked'")
        return _halo_block_sparse(q, k, v, b, h, rel_h, rel_w, scale, "triton" if backend == "triton" else "auto")
    bsz, hh, ww, nh, d = q.shape
    nbh, nbw, win = hh // b, ww // b, b + 2 * h
    scale = d**-0.5 if scale is None else float(scale)
    # query blocks: [B, nbh, nbw, heads, b, b, D]
    qb = q.reshape(bsz, nbh, b, nbw, b, nh, d).permute(0, 1, 3, 5, 2, 4, 6)
    # key windows: pad by the halo, then overlapping (b+2h)-windows every b pixels
    # -> [B, nbh, nbw, heads, D, win, win] -> [B, nbh, nbw, heads, win*win, D]
    def windows(t: Tensor) -> Tensor:
        t = F.pad(t, (0, 0, 0, 0, h, h, h, h))
        t = t.unfold(1, win, b).unfold(2, win, b)
        return t.permute(0, 1, 2, 3, 5, 6, 4).reshape(bsz, nbh, nbw, nh, win * win, d)

    kw_, vw = windows(k), windows(v)
    s = torch.einsum("bijhxyd,bijhkd->bijhxyk", qb, kw_)  # [B, nbh, nbw, heads, b, b, win*win]
    if rel_h is not None or rel_w is not None:
        # window position a, query position x inside the block: offset a - (x + h), in [-(b+h-1), b+h-1]
        off = (torch.arange(win)[None, :] - torch.arange(b)[:, None] - h + b + h - 1).to(q.device)  # [b, win]
        rel = torch.zeros(bsz, nbh, nbw, nh, b, b, win, win, dtype=s.dtype, device=s.device)
        if rel_h is not None:
            rel = rel + torch.einsum("bijhxyd,xad->bijhxya", qb, rel_h[off].to(q.dtype))[..., :, None]
        if rel_w is not None:
            rel = rel + torch.einsum("bijhxyd,ycd->bijhxyc", qb, rel_w[off].to(q.dtype))[..., None, :]
        s = s + rel.reshape(s.shape)
    s = s * scale
    if mask_padding and h > 0:
        # window row a of block row R is image row R*b - h + a; it exists iff inside [0, H)
        rows = torch.arange(nbh)[:, None] * b - h + torch.arange(win)[None, :]
        cols = torch.arange(nbw)[:, None] * b - h + torch.arange(win)[None, :]
        ok_r, ok_c = (rows >= 0) & (rows < hh), (cols >= 0) & (cols < ww)
        ok = (ok_r[:, None, :, None] & ok_c[None, :, None, :]).reshape(nbh, nbw, win * win).to(q.device)
        s = s.masked_fill(~ok[None, :, :, None, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)  # a query always sees its own block
    out = torch.einsum("bijhxyk,bijhkd->bijhxyd", p, vw)  # [B, nbh, nbw, heads, b, b, D]
    return out.permute(0, 1, 4, 2, 5, 3, 6).reshape(bsz, hh, ww, nh, d)


_HALO_CACHE: dict[tuple, PermutedPattern] = {}


def _halo_block_sparse(q: Tensor, k: Tensor, v: Tensor, b: int, h: int, rel_h, rel_w, scale, backend: str) -> Tensor:
    """HaloNet through the block-sparse op: tokens ordered block by block (one ``b x b`` block is one
    kernel tile when ``b*b`` is a power of two >= 16), relative logits as per-query bias tables."""
    bsz, hh, ww, nh, d = q.shape
    scale = d**-0.5 if scale is None else float(scale)
    key = (hh, ww, b, h, str(q.device))
    pp = _HALO_CACHE.get(key)
    if pp is None:
        if len(_HALO_CACHE) > 64:
            _HALO_CACHE.clear()
        pp = halo_pattern(hh, ww, b, h, permute=True)
        pp = PermutedPattern(pp.pattern.to(q.device), pp.perm.to(q.device), pp.inv_perm.to(q.device))
        _HALO_CACHE[key] = pp
    qp, kp, vp = (pp.permute(t.reshape(bsz, hh * ww, nh, d)) for t in (q, k, v))
    bias = None
    if rel_h is not None or rel_w is not None:
        # logit term scale * q_i . rel[key coord - query coord + b + h - 1]: per query, a table over
        # the 2(b+h)-1 offsets (at least fp32: it is small and feeds the softmax directly)
        tdt = torch.promote_types(q.dtype, torch.float32)
        tables = tuple(
            None if rel is None else torch.einsum("blhd,rd->blhr", qp.to(tdt), rel.to(tdt)) * scale for rel in (rel_h, rel_w)
        )
        bias = _grid_bias(tables, (hh, ww), pp.perm, 1, False, ("halo", hh, ww, b, h), q.device)
    out = block_sparse_attention(qp, kp, vp, pp.pattern, scale=scale, backend=backend, bias=bias)
    return pp.unpermute(out).reshape(bsz, hh, ww, nh, d)


def halo_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_size: int,
    halo_size: int,
    rel_h: Tensor | None = None,
    rel_w: Tensor | None = None,
    mask_padding: bool = True,
    scale: float | None = None,
) -> Tensor:
    """HaloNet attention written densely (the specification; run it in float64).

    Keys live on the zero-padded ``(H + 2h) x (W + 2h)`` grid; every query scores every key
    (``HW x (H+2h)(W+2h)`` logits), a mask keeps its block's window (and, with
    ``mask_padding``, only keys inside the image), and the relative logits are looked up by the
    global offset ``key row - query row``. Same arguments and result as :func:`halo_attention`.
    """
    fn = "halo_attention_reference"
    b, h = _check_halo(fn, q, k, v, block_size, halo_size, rel_h, rel_w)
    bsz, hh, ww, nh, d = q.shape
    hp, wp = hh + 2 * h, ww + 2 * h
    scale = d**-0.5 if scale is None else float(scale)
    kp = F.pad(k, (0, 0, 0, 0, h, h, h, h)).reshape(bsz, hp * wp, nh, d)
    vp = F.pad(v, (0, 0, 0, 0, h, h, h, h)).reshape(bsz, hp * wp, nh, d)
    qf = q.reshape(bsz, hh * ww, nh, d)
    s = torch.einsum("bihd,bjhd->bhij", qf, kp)  # [B, heads, HW, HpWp]
    r = torch.arange(hh, device=q.device)
    c = torch.arange(ww, device=q.device)
    pr = torch.arange(hp, device=q.device) - h  # image row of each padded row
    pc = torch.arange(wp, device=q.device) - h

    def in_window(qc: Tensor, kc: Tensor) -> Tensor:  # query coord -> its block's window
        start = (qc // b) * b - h
        return (kc[None, :] >= start[:, None]) & (kc[None, :] < start[:, None] + b + 2 * h)

    ok_r, ok_c = in_window(r, pr), in_window(c, pc)  # [H, Hp], [W, Wp]
    if mask_padding:
        ok_r = ok_r & ((pr >= 0) & (pr < hh))[None, :]
        ok_c = ok_c & ((pc >= 0) & (pc < ww))[None, :]
    mask = (ok_r[:, None, :, None] & ok_c[None, :, None, :]).reshape(hh * ww, hp * wp)
    if rel_h is not None or rel_w is not None:
        span = b + h - 1
        qg = q  # [B, H, W, heads, D]
        bias = torch.zeros(bsz, nh, hh, ww, hp, wp, dtype=s.dtype, device=s.device)
        if rel_h is not None:
            idx = (pr[None, :] - r[:, None] + span).clamp(0, 2 * span)  # outside the window: masked anyway
            bias = bias + torch.einsum("bxyhd,xpd->bhxyp", qg, rel_h[idx].to(q.dtype))[..., :, None]
        if rel_w is not None:
            idx = (pc[None, :] - c[:, None] + span).clamp(0, 2 * span)
            bias = bias + torch.einsum("bxyhd,ypd->bhxyp", qg, rel_w[idx].to(q.dtype))[..., None, :]
        s = s + bias.reshape(s.shape)
    s = (s * scale).masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhij,bjhd->bihd", p, vp).reshape(bsz, hh, ww, nh, d)


class HaloAttention(nn.Module):
    """HaloNet blocked local self-attention on feature maps ``[B, H, W, C]`` (Vaswani et al. 2021).

    ``q = Linear(C, C)(x)``, ``k, v = Linear(C, 2C)(x)``; each ``b x b`` query block attends its
    ``(b + 2h) x (b + 2h)`` neighbourhood with 2-D relative-position logits (a row table and a
    column table ``[2(b+h) - 1, head_dim]``, shared by the heads); then ``Linear(C, C)``.

    Args:
        dim: channels ``C``; num_heads must divide it.
        block_size (b), halo_size (h): typical ``b = 8, h = 3``; ``H`` and ``W`` must be multiples
            of ``b``.
        qkv_bias: bias in the q/kv projections (HaloNet uses none).
        rel_pos: learn the relative-position tables (True, as the paper).
        mask_padding: exclude window positions outside the image (True), or attend them as
            zero-padded keys/values like timm (False). See :func:`halo_attention`.
        backend: ``"auto"`` (the block-sparse kernel on CUDA with ``mask_padding``, else
            ``"blocked"``), ``"blocked"``, ``"block_sparse"`` or ``"triton"``; see
            :func:`halo_attention`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        block_size: int = 8,
        halo_size: int = 3,
        qkv_bias: bool = False,
        rel_pos: bool = True,
        mask_padding: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        fn = "HaloAttention"
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"{fn}: dim must be a positive int, got {dim!r}")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0 or dim % num_heads:
            raise ValueError(f"{fn}: num_heads must be a positive divisor of dim ({dim}), got {num_heads!r}")
        for name, val, lo in (("block_size", block_size, 1), ("halo_size", halo_size, 0)):
            if isinstance(val, bool) or not isinstance(val, int) or val < lo:
                raise ValueError(f"{fn}: {name} must be an int >= {lo}, got {val!r}")
        for name, val in (("rel_pos", rel_pos), ("mask_padding", mask_padding), ("qkv_bias", qkv_bias)):
            if not isinstance(val, bool):
                raise ValueError(f"{fn}: {name} must be a bool, got {val!r}")
        if backend not in HALO_BACKENDS:
            raise ValueError(f"{fn}: backend must be one of {HALO_BACKENDS}, got {backend!r}")
        if backend in ("block_sparse", "triton") and not mask_padding:
            raise ValueError(f"{fn}: backend {backend!r} needs mask_padding=True; use 'blocked' or 'auto'")
        self.backend = backend
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.block_size, self.halo_size, self.mask_padding = block_size, halo_size, mask_padding
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if rel_pos:
            n_rel = 2 * (block_size + halo_size) - 1
            self.rel_h = nn.Parameter(torch.randn(n_rel, self.head_dim) * self.scale)
            self.rel_w = nn.Parameter(torch.randn(n_rel, self.head_dim) * self.scale)
        else:
            self.register_parameter("rel_h", None)
            self.register_parameter("rel_w", None)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, block_size={self.block_size}, halo_size={self.halo_size}, "
            f"rel_pos={self.rel_h is not None}, mask_padding={self.mask_padding}, backend={self.backend!r}"
        )

    def attention(self, q: Tensor, k: Tensor, v: Tensor, backend: str | None = None) -> Tensor:
        """The attention core on ``q, k, v [B, H, W, heads, D]`` (with this layer's tables)."""
        return halo_attention(
            q, k, v, self.block_size, self.halo_size, self.rel_h, self.rel_w, self.mask_padding, self.scale,
            self.backend if backend is None else backend,
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        _check_map("HaloAttention", x, self.dim)
        b, h, w, _ = x.shape
        if h % self.block_size or w % self.block_size:
            raise ValueError(
                f"HaloAttention: the map ({h} x {w}) must be a multiple of block_size ({self.block_size}) along both axes"
            )
        q = self.q(x).reshape(b, h, w, self.num_heads, self.head_dim)
        k, v = self.kv(x).reshape(b, h, w, 2, self.num_heads, self.head_dim).unbind(3)
        out = self.attention(q, k, v)
        return self.proj(out.reshape(b, h, w, self.dim))
