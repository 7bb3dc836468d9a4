"""More block-sparse patterns: PowerAttention, HaloNet, documents, attention sinks, prefix-LM, and
an escape hatch for any predicate.

Each builder gives :func:`~mnemotorch.ops.block_sparse.pattern.build_pattern` an element predicate
on absolute positions and a tight ``candidates(query_block)``, so that building costs
O(L/B * nnz) and never forms an ``L x L`` mask (except :func:`predicate_pattern` without
candidates, which is O(L^2) by design). The exact rules are in ``docs/mixers/block_sparse.md``.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

from .pattern import BlockSparsePattern, Predicate, build_pattern
from .patterns_natten import PermutedPattern, _Axis, _separable_pattern, tile_permutation

__all__ = [
    "document_pattern",
    "halo_pattern",
    "power_pattern",
    "predicate_pattern",
    "prefix_lm_pattern",
    "sink_window_pattern",
]


def _check_int(fn: str, name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{fn}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_blocks(fn: str, q_block, k_block) -> None:
    _check_int(fn, "q_block", q_block, 1)
    _check_int(fn, "k_block", k_block, 1)


# --------------------------------------------------------------------------------------------
# PowerAttention (Chen et al., 2025)


def power_pattern(
    length: int,
    block_size: int = 256,
    window_blocks: int = 5,
    sink_blocks: int = 1,
    q_block: int = 128,
    k_block: int = 64,
    device: torch.device | str | None = None,
) -> BlockSparsePattern:
    """PowerAttention: causal, over blocks of ``block_size`` tokens.

    With ``blk = i // block_size - j // block_size``, key ``j`` is visible to query ``i`` iff
    ``j <= i`` and (``blk < window_blocks`` or ``blk`` is a power of two or
    ``j < sink_blocks * block_size``). The paper's setting: ``block_size=256``,
    ``window_blocks=5``, ``sink_blocks=1``. ``block_size`` is the pattern's granularity and is
    independent of the kernel tiles ``q_block`` / ``k_block``.
    """
    fn = "power_pattern"
    _check_int(fn, "length", length, 1)
    bs = _check_int(fn, "block_size", block_size, 1)
    w = _check_int(fn, "window_blocks", window_blocks, 1)
    sink = _check_int(fn, "sink_blocks", sink_blocks, 0)
    _check_blocks(fn, q_block, k_block)
    sink_len = sink * bs
    nb = -(-length // bs)
    # Which block distances are visible, looked up rather than recomputed per pair:
    # blk_ok[nb + blk] for blk in [-nb, nb] (negative distances are in the future).
    dist = torch.arange(nb + 1, dtype=torch.int64)
    blk_ok = torch.zeros(2 * nb + 1, dtype=torch.bool)
    blk_ok[nb:] = (dist < w) | ((dist & (dist - 1)) == 0)

    def allowed(qi: Tensor, kj: Tensor) -> Tensor:
        # Block ids on the (small) un-broadcast inputs; positions past the end are clamped.
        bi = qi.clamp(0, length - 1) // bs + nb
        bj = kj.clamp(0, length - 1) // bs
        return (blk_ok[bi - bj] | (kj < sink_len)) & (kj <= qi)

    def candidates(qb: int) -> list[int]:
        first, last = qb * q_block, min(length, (qb + 1) * q_block) - 1
        pattern_blocks: set[int] = set(range(min(sink, last // bs + 1)))
        for i_blk in range(first // bs, last // bs + 1):
            pattern_blocks.update(range(max(0, i_blk - w + 1), i_blk + 1))
            dist = 1
            while dist <= i_blk:
                pattern_blocks.add(i_blk - dist)
                dist *= 2
        last_kb = last // k_block
        out: set[int] = set()
        for jb in pattern_blocks:
            out.update(range((jb * bs) // k_block, min(last_kb, ((jb + 1) * bs - 1) // k_block) + 1))
        return sorted(out)

    return build_pattern(allowed, length, length, q_block, k_block, candidates, device)


# --------------------------------------------------------------------------------------------
# HaloNet blocked local attention (Vaswani et al., 2021)


def halo_pattern(
    height: int,
    width: int,
    block_size: int,
    halo: int,
    permute: bool = True,
    q_block: int | None = None,
    k_block: int | None = None,
    device: torch.device | str | None = None,
) -> PermutedPattern:
    """HaloNet blocked local attention on an ``H x W`` map.

    The map is cut into ``block_size x block_size`` query blocks; every query of block
    ``(R, C)`` attends the same ``(b + 2h) x (b + 2h)`` key window: key ``(r, c)`` is visible iff
    ``R*b - h <= r < (R+1)*b + h`` and ``C*b - h <= c < (C+1)*b + h``. Keys outside the image
    (the zero padding of the reference implementations) are **masked**, i.e. they do not exist;
    timm's ``HaloAttn`` instead attends the zero-padded keys (logit 0 plus the position bias,
    value 0), so border outputs differ. The 2-D relative-position logits of HaloNet are a separate
    additive bias, not part of the pattern.

    Args:
        height, width: the map; both must be multiples of ``block_size`` (as in timm).
        block_size (b), halo (h): ``b >= 1``, ``h >= 0``.
        permute: order tokens block by block (:func:`tile_permutation` with tile ``(b, b)``) so a
            query block of ``b*b`` tokens is one kernel tile; ``False``: row-major order.
        q_block, k_block: kernel tiles; default ``b*b`` when that is a power of two >= 16
            (e.g. b = 8), else 64.

    Returns:
        :class:`PermutedPattern` ``(pattern, perm, inv_perm)`` (identity permutation when
        ``permute=False``).
    """
    fn = "halo_pattern"
    _check_int(fn, "height", height, 1)
    _check_int(fn, "width", width, 1)
    b = _check_int(fn, "block_size", block_size, 1)
    h = _check_int(fn, "halo", halo, 0)
    if height % b or width % b:
        raise ValueError(f"{fn}: height ({height}) and width ({width}) must be multiples of block_size ({b})")
    if not isinstance(permute, bool):
        raise ValueError(f"{fn}: permute must be a bool, got {permute!r}")
    default = b * b if b * b >= 16 and (b * b) & (b * b - 1) == 0 else 64
    q_block = default if q_block is None else q_block
    k_block = default if k_block is None else k_block
    _check_blocks(fn, q_block, k_block)

    def axis(size: int) -> _Axis:
        r = torch.arange(size, dtype=torch.int64)
        start = (r // b) * b
        return _Axis(size, 1, torch.zeros_like(r), (start - h).clamp(min=0), (start + b + h - 1).clamp(max=size - 1))

    n = height * width
    if permute:
        perm, inv_perm = tile_permutation((height, width), (b, b))
        pat = _separable_pattern([axis(height), axis(width)], perm, inv_perm, q_block, k_block, device)
    else:
        perm = inv_perm = torch.arange(n, dtype=torch.int64)
        pat = _separable_pattern([axis(height), axis(width)], None, None, q_block, k_block, device)
    return PermutedPattern(pat, perm, inv_perm)


# --------------------------------------------------------------------------------------------
# documents / varlen, sinks, prefix-LM


def document_pattern(
    doc_ids: Tensor,
    causal: bool = True,
    q_block: int = 128,
    k_block: int = 64,
    device: torch.device | str | None = None,
) -> BlockSparsePattern:
    """Attention only inside a document: key ``j`` is visible to query ``i`` iff
    ``doc_ids[i] == doc_ids[j]`` (and ``j <= i`` when ``causal``).

    Args:
        doc_ids: ``int [L]``, the document of every token of a packed sequence (any integers;
            documents are usually contiguous runs, which keeps the candidate lists tight, but
            need not be).
        causal: add the causal rule.

    For per-row document layouts, build one pattern per row.
    """
    fn = "document_pattern"
    if not isinstance(doc_ids, Tensor) or doc_ids.dim() != 1 or doc_ids.numel() == 0:
        raise ValueError(f"{fn}: doc_ids must be a non-empty 1-D integer tensor, got {doc_ids!r}")
    if doc_ids.dtype.is_floating_point or doc_ids.dtype.is_complex or doc_ids.dtype == torch.bool:
        raise ValueError(f"{fn}: doc_ids must have an integer dtype, got {doc_ids.dtype}")
    if not isinstance(causal, bool):
        raise ValueError(f"{fn}: causal must be a bool, got {causal!r}")
    _check_blocks(fn, q_block, k_block)
    n = doc_ids.numel()
    _, doc = torch.unique(doc_ids.detach().cpu().to(torch.int64), return_inverse=True)
    n_docs = int(doc.max()) + 1
    pos = torch.arange(n, dtype=torch.int64)
    first = torch.full((n_docs,), n, dtype=torch.int64).scatter_reduce(0, doc, pos, "amin")
    last = torch.full((n_docs,), -1, dtype=torch.int64).scatter_reduce(0, doc, pos, "amax")

    def allowed(qi: Tensor, kj: Tensor) -> Tensor:
        ok = doc[qi.clamp(0, n - 1)] == doc[kj.clamp(0, n - 1)]
        return ok & (kj <= qi) if causal else ok

    def candidates(qb: int) -> list[int]:
        lo_q, hi_q = qb * q_block, min(n, (qb + 1) * q_block)
        docs = torch.unique(doc[lo_q:hi_q])
        lo, hi = first[docs], last[docs]
        if causal:
            hi = hi.clamp(max=hi_q - 1)
        out: set[int] = set()
        for a, z in zip((lo // k_block).tolist(), (hi // k_block).tolist()):
            out.update(range(a, z + 1))
        return sorted(out)

    return build_pattern(allowed, n, n, q_block, k_block, candidates, device)


def sink_window_pattern(
    q_len: int,
    window: int,
    n_sink: int,
    k_len: int | None = None,
    q_block: int = 128,
    k_block: int = 64,
    device: torch.device | str | None = None,
) -> BlockSparsePattern:
    """Causal sliding window plus attention sinks (StreamingLLM-style).

    Queries are the last ``q_len`` of ``k_len`` keys (query ``i`` sits at ``p = i + k_len -
    q_len``); key ``j`` is visible iff ``j <= p`` and (``p - window < j`` or ``j < n_sink``).
    ``n_sink = 0`` is the plain causal sliding window.
    """
    fn = "sink_window_pattern"
    _check_int(fn, "q_len", q_len, 1)
    k_len = q_len if k_len is None else k_len
    _check_int(fn, "k_len", k_len, 1)
    w = _check_int(fn, "window", window, 1)
    sink = _check_int(fn, "n_sink", n_sink, 0)
    _check_blocks(fn, q_block, k_block)
    if k_len < q_len:
        raise ValueError(f"{fn}: k_len ({k_len}) must be >= q_len ({q_len})")
    offset = k_len - q_len

    def allowed(qi: Tensor, kj: Tensor) -> Tensor:
        p = qi + offset
        return (kj <= p) & ((kj > p - w) | (kj < sink))

    def candidates(qb: int) -> list[int]:
        first = qb * q_block + offset
        last = min(q_len, (qb + 1) * q_block) - 1 + offset
        blocks = set(range(max(0, first - w + 1) // k_block, last // k_block + 1))
        if sink:
            blocks.update(range(0, min(sink - 1, last) // k_block + 1))
        return sorted(blocks)

    pat = build_pattern(allowed, q_len, k_len, q_block, k_block, candidates, device)
    if sink == 0:  # the plain causal sliding window: the list-free fast path applies
        pat.causal_window = min(w, k_len)
    return pat


def prefix_lm_pattern(
    length: int, prefix_len: int, q_block: int = 128, k_block: int = 64, device: torch.device | str | None = None
) -> BlockSparsePattern:
    """Prefix-LM: the first ``prefix_len`` tokens attend each other bidirectionally, the rest
    causally: key ``j`` is visible to query ``i`` iff ``j <= i`` or ``j < prefix_len``."""
    fn = "prefix_lm_pattern"
    _check_int(fn, "length", length, 1)
    pre = _check_int(fn, "prefix_len", prefix_len, 0)
    _check_blocks(fn, q_block, k_block)

    def allowed(qi: Tensor, kj: Tensor) -> Tensor:
        return (kj <= qi) | (kj < pre)

    def candidates(qb: int) -> range:
        last = min(length, (qb + 1) * q_block) - 1
        return range(0, max(last, pre - 1) // k_block + 1)

    return build_pattern(allowed, length, length, q_block, k_block, candidates, device)


def predicate_pattern(
    predicate: Predicate,
    q_len: int,
    k_len: int | None = None,
    candidates: Callable[[int], Iterable[int]] | None = None,
    q_block: int = 128,
    k_block: int = 64,
    device: torch.device | str | None = None,
) -> BlockSparsePattern:
    """Any element rule ``predicate(q_idx [n, 1], k_idx [1, m]) -> bool [n, m]`` (int64 absolute
    positions; positions past the end may be asked about and are masked afterwards).

    ``candidates(query_block)`` should list the key blocks that may hold allowed pairs (a
    superset is fine, a missing block silently drops its pairs). Without it every tile of the
    ``q_len x k_len`` grid is tested: O(q_len * k_len) work, fine for small inputs or a one-off
    build, but the library's own patterns all pass a tight bound.
    """
    k_len = q_len if k_len is None else k_len
    if not callable(predicate):
        raise ValueError(f"predicate_pattern: predicate must be callable, got {predicate!r}")
    if candidates is not None and not callable(candidates):
        raise ValueError(f"predicate_pattern: candidates must be callable or None, got {candidates!r}")
    return build_pattern(predicate, q_len, k_len, q_block, k_block, candidates, device)

