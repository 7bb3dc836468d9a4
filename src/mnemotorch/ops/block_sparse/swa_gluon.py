"""A Hopper forward for the sliding window and 1-D neighborhood attention, written in Gluon.

Why a second forward beside ``swa_triton``'s: Nsight Compute (docs/results/block_sparse.md, twenty-first
session) showed the Triton forward bound by L2 throughput (71% NA-1D, 85% sliding window) and wgmma latency.
Its 64-query programs read every key/value tile from L2 once per program; 128-query programs halve those
reads but, as one 8-warp program, their two warp groups wait on each other and the softmax of one no
longer overlaps the products of the other. ``triton.language`` cannot say "two independent consumers of
one stream of tiles"; Gluon can (FlashAttention-3's layout: Shah et al., 2024, arXiv:2407.08608):

* one program owns ``2 * BM`` queries (``BM = 64``) and runs three partitions
  (``gl.warp_specialize``): two *consumer* warp groups of 4 warps, each with its own ``BM`` queries,
  its own softmax state and its own output, and one *loader* warp that streams the key / value tiles
  both consumers need through a ring of ``STAGES`` shared-memory slots with TMA;
* a slot is released (``empty`` mbarrier, count 2) when both consumers have finished with it, so each
  tile is read from L2 once per ``2 * BM`` queries, and the two consumers are free to drift apart:
  one's exponentials run under the other's wgmma;
* inside a consumer, the product ``S = Q Kᵀ`` of tile ``n`` is issued before the product ``P V`` of tile
  ``n - 1`` and its softmax runs while that ``P V`` is in flight (FlashAttention-3's intra-warpgroup
  overlap); ``P`` goes to the second wgmma from registers;
* the grid is persistent: one program per SM walks the work items (query block x batch-head)
  ``pid, pid + grid, ...``; the ring and two query slots carry across items, so the next item's queries
  and first tiles load while the last item finishes and stores its output (what made the kernel faster
  than the Triton forward, whose two programs per SM hide each other's start and end).

Semantics are ``swa_triton``'s, per key position ``p = i + Lk - Lq`` of query ``i``: a row sees keys
``[lo(p), hi(p))`` with, for the causal window ``W``, ``lo = max(p - W + 1, 0)``, ``hi = p + 1``, and for
NA-1D (kernel ``K``, dilation 1, ``Lq = Lk``) ``lo = clamp(p - K // 2, 0, Lk - K)``, ``hi = lo + K``. Both
are nondecreasing in ``p``, which is all the tiling uses: a program's tiles of ``BN`` keys are anchored at
its first row's window (sliding window: aligned with its diagonal), a consumer takes the tiles its own
rows touch, and a tile needs the element mask only where it crosses its first row's ``hi`` or its last
row's ``lo``. Scores are in base 2 (``lse2 = m + log2 l``), as the backward expects.

Only the forward: the backward stays ``swa_triton``'s (it reads ``o``, ``lse`` and, when kept, the
rounding residual ``o_lo``, all written here exactly as there). Used by ``swa_triton._fwd_impl`` when the
launch table's forward row has a ``gluon`` dict and :func:`supported` holds (CUDA sm_90, 16-bit inputs,
``D`` 64 or 128, positive scale, TMA-able ``[B, T, H, D]`` tensors, ``MNEMO_SWA_GLUON`` not ``0``; ``fwd``
keeps this kernel and turns only the Gluon backward off);
elsewhere the Triton forward runs. Gluon kernels do not run in Triton's interpreter. Tests:
``tests/gpu/test_swa_gluon_gpu.py`` (GPU, against the float64 reference and the Triton forward) and
``tests/ops/test_swa_gluon_compile.py`` (CPU: the kernel compiles for sm_90 with the installed Triton,
which guards the Gluon API between Triton releases). Measurements: docs/results/block_sparse.md.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from ..triton_launch import CachedLaunch, capability, sm_count, tma_row_view

try:  # Gluon is experimental: its module layout and names move between Triton releases
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor

    # Triton 3.6 names the TMA load ``async_copy_global_to_shared``; later releases ``async_load``
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    HAVE_GLUON = True
except Exception:  # pragma: no cover - Triton without Gluon's Hopper API
    HAVE_GLUON = False

#: queries per consumer warp group (the wgmma M of a 4-warp group)
BM = 64


if HAVE_GLUON:
    _BM = gl.constexpr(BM)

    @gluon.jit
    def _window(p, W, Lk, NA1D: gl.constexpr):
        """``(lo, hi)``: the keys ``[lo, hi)`` that key position ``p`` (scalar or tensor) sees."""
        if NA1D:
            lo = gl.minimum(gl.maximum(p - W // 2, 0), Lk - W)
            hi = lo + W
        else:
            lo = gl.maximum(p - W + 1, 0)
            hi = p + 1
        return lo, hi

    @gluon.jit
    def _item_tiles(item, n_qblocks, W, Lq, Lk, H: gl.constexpr, BN: gl.constexpr, NA1D: gl.constexpr):
        """``(b, h, q0, anchor, n_tiles)`` of work item ``item`` (query block ``item % n_qblocks`` of batch-head
        ``item // n_qblocks``): its batch and head, its first query, the key position of its tile 0 and the
        number of key tiles any of its rows touches (the same in every partition)."""
        bh = item // n_qblocks
        q0 = (item % n_qblocks) * (2 * _BM)
        offset = Lk - Lq
        lo0, hi0 = _window(q0 + offset, W, Lk, NA1D)
        if NA1D:
            anchor = lo0
        else:  # tiles aligned with the block's diagonal, so the diagonal crosses as few tiles as it can
            anchor = (q0 + offset) - ((q0 + offset - lo0 + BN - 1) // BN) * BN
        last = gl.minimum(q0 + 2 * _BM, Lq) - 1
        lo_l, hi_l = _window(last + offset, W, Lk, NA1D)
        n_tiles = (hi_l - anchor + BN - 1) // BN
        return bh // H, bh % H, q0, anchor, n_tiles

    @gluon.jit
    def _loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, W, Lq, Lk, n_qblocks, n_items,
                H: gl.constexpr, GROUP: gl.constexpr, D: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
                NA1D: gl.constexpr, WG: gl.constexpr):
        """One warp: for each work item of this program, both consumers' queries (two query slots, so the
        next item's arrive while the last one's are still read), then every key / value tile the item
        touches through the ring (which runs on across items)."""
        q_ready, q_empty, k_ready, v_ready, empty = bars
        tile = 0
        j = 0
        for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
            b, h, q0, anchor, n_tiles = _item_tiles(item, n_qblocks, W, Lq, Lk, H, BN, NA1D)
            hk = h // GROUP
            qs = j % 2
            # slots start free: an mbarrier starts with its phase "1" complete
            mbarrier.wait(q_empty.index(qs), ((j // 2) & 1) ^ 1)
            mbarrier.expect(q_ready.index(qs), 2 * q_desc.block_type.nbytes)
            _tma_load(q_desc, [b * Lq + q0, h * D], q_ready.index(qs), q_smem.index(2 * qs))
            _tma_load(q_desc, [b * Lq + q0 + _BM, h * D], q_ready.index(qs), q_smem.index(2 * qs + 1))
            row0 = b * Lk + anchor
            for n in range(n_tiles):
                st = tile % STAGES
                mbarrier.wait(empty.index(st), ((tile // STAGES) & 1) ^ 1)
                mbarrier.expect(k_ready.index(st), k_desc.block_type.nbytes)
                _tma_load(k_desc, [row0 + n * BN, hk * D], k_ready.index(st), k_smem.index(st))
                mbarrier.expect(v_ready.index(st), v_desc.block_type.nbytes)
                _tma_load(v_desc, [row0 + n * BN, hk * D], v_ready.index(st), v_smem.index(st))
                tile += 1
            j += 1

    @gluon.jit
    def _pass_tile(t, k_ready, v_ready, empty, STAGES: gl.constexpr):
        """Ring tile ``t`` holds keys this consumer's rows do not touch: wait for it (so its slot's two
        arrivals stay in one phase), then release it."""
        st = t % STAGES
        ph = (t // STAGES) & 1
        mbarrier.wait(k_ready.index(st), ph)
        mbarrier.wait(v_ready.index(st), ph)
        mbarrier.arrive(empty.index(st), count=1)

    @gluon.jit
    def _softmax_tile(s, m_i, l_i, a, lo_r, hi_r, lo_last, hi_first, qk_scale,
                      BN: gl.constexpr, s_layout: gl.constexpr):
        """Online softmax of one ``[BM, BN]`` logit tile whose first key is ``a``: ``(p, alpha, m, l)``.
        The element mask applies only where the tile crosses a row's window edge."""
        if (a < lo_last) | (a + BN > hi_first):
            cols = a + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
            cols2 = gl.expand_dims(cols, 0)
            ok = (cols2 >= gl.expand_dims(lo_r, 1)) & (cols2 < gl.expand_dims(hi_r, 1))
            s = gl.where(ok, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        return p, alpha, m_new, l_i

    @gluon.jit
    def _consumer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, W, Lq, Lk, n_qblocks, n_items,
                  O, LSE, OLO, sob, sot, soh, qk_scale,
                  H: gl.constexpr, GROUP: gl.constexpr, D: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
                  NA1D: gl.constexpr, STORE_LO: gl.constexpr, WG: gl.constexpr):
        """One warp group: for each work item of this program, queries ``[q0 + WG * BM, + BM)`` against the
        tiles its rows touch; ``tile`` counts the ring's tiles over all items (slot and phase)."""
        q_ready, q_empty, k_ready, v_ready, empty = bars
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        offset = Lk - Lq
        tile = 0
        j = 0
        for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
            b, h, q0, anchor, n_tiles = _item_tiles(item, n_qblocks, W, Lq, Lk, H, BN, NA1D)
            r0 = q0 + WG * _BM
            rl = gl.minimum(r0 + _BM, Lq) - 1
            lo_first, hi_first = _window(r0 + offset, W, Lk, NA1D)
            lo_last, hi_last = _window(rl + offset, W, Lk, NA1D)
            # this group's tiles [t0, t1): none when all its rows lie past Lq (the last block's second group)
            t0 = (lo_first - anchor) // BN
            t1 = gl.where(r0 < Lq, (hi_last - anchor + BN - 1) // BN, t0)
            t1 = gl.maximum(t1, t0)
            rows = r0 + offset + gl.arange(0, _BM, layout=row_s)
            lo_r, hi_r = _window(rows, W, Lk, NA1D)

            for n in range(0, t0):
                _pass_tile(tile + n, k_ready, v_ready, empty, STAGES)

            m_i = gl.full([_BM], -1.0e30, gl.float32, layout=row_s)  # finite: a fully masked tile gives alpha = 1
            l_i = gl.zeros([_BM], gl.float32, layout=row_s)
            acc = gl.zeros([_BM, D], gl.float32, layout=o_layout)
            s_zero = gl.zeros([_BM, BN], gl.float32, layout=s_layout)
            qs = j % 2
            q = q_smem.index(2 * qs + WG)
            mbarrier.wait(q_ready.index(qs), (j // 2) & 1)
            if t1 > t0:
                # first tile: logits only; its P V is issued in the next step
                t = tile + t0
                st = t % STAGES
                mbarrier.wait(k_ready.index(st), (t // STAGES) & 1)
                s = warpgroup_mma(q, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                s = warpgroup_mma_wait(0, deps=(s,))
                p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, anchor + t0 * BN, lo_r, hi_r, lo_last, hi_first,
                                                   qk_scale, BN, s_layout)
                p_op = gl.convert_layout(p.to(q_desc.dtype), p_layout)
                for n in range(t0 + 1, t1):
                    t = tile + n
                    st = t % STAGES
                    sp = (t - 1) % STAGES
                    mbarrier.wait(k_ready.index(st), (t // STAGES) & 1)
                    s = warpgroup_mma(q, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                    mbarrier.wait(v_ready.index(sp), ((t - 1) // STAGES) & 1)
                    acc = warpgroup_mma(p_op, v_smem.index(sp), acc, is_async=True)
                    # logits of tile n done (the older group); tile n - 1's P V may still run under the softmax
                    s = warpgroup_mma_wait(1, deps=(s,))
                    p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, anchor + n * BN, lo_r, hi_r, lo_last, hi_first,
                                                       qk_scale, BN, s_layout)
                    acc = warpgroup_mma_wait(0, deps=(acc,))
                    mbarrier.arrive(empty.index(sp), count=1)
                    acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
                    p_op = gl.convert_layout(p.to(q_desc.dtype), p_layout)
                t = tile + t1 - 1
                sp = t % STAGES
                mbarrier.wait(v_ready.index(sp), (t // STAGES) & 1)
                acc = warpgroup_mma(p_op, v_smem.index(sp), acc, is_async=True)
                acc = warpgroup_mma_wait(0, deps=(acc,))
                mbarrier.arrive(empty.index(sp), count=1)
            # every product that read this item's queries has completed: the slot may be refilled
            mbarrier.arrive(q_empty.index(qs), count=1)

            for n in range(t1, n_tiles):
                _pass_tile(tile + n, k_ready, v_ready, empty, STAGES)

            # every stored row has seen its own window (l > 0); rows past Lq are not stored
            l_safe = gl.where(l_i == 0.0, 1.0, l_i)
            lse = m_i + gl.log2(l_safe)
            out = acc * gl.expand_dims(gl.convert_layout(1.0 / l_safe, row_o), 1)
            rows_o = r0 + gl.arange(0, _BM, layout=row_o)
            cols_o = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
            row_ok = gl.expand_dims(rows_o < Lq, 1) & gl.expand_dims(cols_o < D, 0)
            o_off = (b.to(gl.int64) * sob + h * soh + gl.expand_dims(rows_o.to(gl.int64) * sot, 1)
                     + gl.expand_dims(cols_o, 0))
            o_lp = out.to(O.dtype.element_ty)
            gl.store(O + o_off, o_lp, mask=row_ok)
            if STORE_LO:
                gl.store(OLO + o_off, (out - o_lp.to(gl.float32)).to(OLO.dtype.element_ty), mask=row_ok)
            rows_s = r0 + gl.arange(0, _BM, layout=row_s)
            gl.store(LSE + (b * H + h).to(gl.int64) * Lq + rows_s, lse, mask=rows_s < Lq)
            tile += n_tiles
            j += 1

    @gluon.jit
    def _swa_fwd_gluon_kernel(q_desc, k_desc, v_desc, O, LSE, OLO, sob, sot, soh, qk_scale, W, Lq, Lk, n_qblocks,
                              n_items, H: gl.constexpr, GROUP: gl.constexpr, D: gl.constexpr, BN: gl.constexpr,
                              STAGES: gl.constexpr, NA1D: gl.constexpr, STORE_LO: gl.constexpr,
                              CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr):
        """Programs walk the work items ``pid, pid + grid, ...`` (a grid of one program per item, or a
        persistent grid of one per SM: then a program's next item loads while its last one finishes)."""
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [4, _BM, D], q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BN, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BN, D], v_desc.layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=2)  # both consumers release a query slot
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # both consumers release a ring slot
        fence_async_shared()
        bars = (q_ready, q_empty, k_ready, v_ready, empty)
        # the argument tuples are written out in the call: a tuple bound to a local name turns its
        # constexprs into tensors (Triton 3.6)
        gl.warp_specialize([
            (_consumer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, W, Lq, Lk, n_qblocks, n_items, O, LSE,
                         OLO, sob, sot, soh, qk_scale, H, GROUP, D, BN, STAGES, NA1D, STORE_LO, 0)),
            (_consumer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, W, Lq, Lk, n_qblocks, n_items, O, LSE,
                         OLO, sob, sot, soh, qk_scale, H, GROUP, D, BN, STAGES, NA1D, STORE_LO, 1)),
            (_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, W, Lq, Lk, n_qblocks, n_items, H, GROUP,
                       D, BN, STAGES, NA1D, 2)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


def supported(q: Tensor, k: Tensor, v: Tensor, scale: float, cfg: dict) -> bool:
    """Whether the Gluon forward can run this call (else the Triton forward runs)."""
    if not (HAVE_GLUON and cfg.get("gluon") and q.is_cuda and scale > 0 and os.environ.get("MNEMO_SWA_GLUON", "1") != "0"):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    d = q.shape[-1]
    if d not in (64, 128) or k.shape[-1] != d or v.shape[-1] != d:
        return False
    if capability(q.device)[0] != 9:
        return False
    return all(tma_row_view(t) is not None for t in (q, k, v))


@functools.lru_cache(maxsize=None)
def _smem_layout(rows: int, d: int, dtype: torch.dtype):
    gdt = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}[dtype]
    return gl.NVMMASharedLayout.get_default_for([rows, d], gdt)


#: shared memory one program may take on sm_90 (227 KiB, less a margin for barriers and the compiler's scratch)
SMEM_LIMIT = 220 * 1024


def _desc(t: Tensor, rows: int, cols: int | None = None):
    """A host TMA descriptor over ``t [B, T, H, D]`` seen as ``[B * T, H * D]``, ``rows`` x ``cols`` tiles
    (``cols`` default ``D``)."""
    shape, strides = tma_row_view(t)
    cols = t.shape[3] if cols is None else cols
    return GluonTensorDescriptor(t, shape=shape, strides=strides, block_shape=[rows, cols],
                                 layout=_smem_layout(rows, cols, t.dtype))


def _grid(n_items: int, device: torch.device, cfg: dict) -> tuple[int]:
    """One program per SM walking the work items (``persistent``, default), or one program per item."""
    return (min(n_items, sm_count(device)) if cfg.get("persistent", True) else n_items,)


def _compile_sm90(fn, sig: dict, const: dict, maxnreg: int):
    """``triton.compile`` of Gluon kernel ``fn`` for sm_90 on a machine without a GPU: ``sig`` the runtime
    arguments' types, ``const`` the constexprs' values."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    names = list(fn.arg_names)
    sig = dict(sig, **{k: "constexpr" for k in const})
    src = GluonASTSource(fn, {n: sig[n] for n in names}, {(names.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=maxnreg))


def _desc_type(dtype: str, rows: int, cols: int) -> str:
    """The signature string of a host descriptor argument (``dtype`` "bf16", "fp16" or "fp32")."""
    gdt = {"bf16": gl.bfloat16, "fp16": gl.float16, "fp32": gl.float32}[dtype]
    return f"tensordesc<{dtype}[{rows}, {cols}],{gl.NVMMASharedLayout.get_default_for([rows, cols], gdt)!r}>"


# eager calls skip Triton's per-call argument binding (ops/triton_launch.py); host descriptors are in its key
_FWD = CachedLaunch(_swa_fwd_gluon_kernel) if HAVE_GLUON else None


def forward(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, o_lo: Tensor | None, window: int, qk_scale: float,
            na1d: bool, cfg: dict) -> None:
    """Fill ``o [B, Lq, H, D]``, ``lse [B, H, Lq]`` (base 2) and, when given, ``o_lo`` (the output's rounding
    residual). ``cfg``: the forward row's ``gluon`` dict (``BN`` keys per tile, ``stages`` ring slots,
    ``regs`` registers per consumer thread, ``persistent``: one program per SM walking the work items,
    default, or one program per item)."""
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    bn = int(cfg.get("BN", 64))
    stages = int(cfg.get("stages", 4))
    regs = int(cfg.get("regs", 240))
    smem = (4 * BM + 2 * stages * bn) * d * q.element_size()
    if smem > SMEM_LIMIT:
        raise ValueError(f"swa_gluon: {stages} slots of {bn} keys at D = {d} need {smem // 1024} KiB of shared memory "
                         "(at most 220 on sm_90); use fewer stages or BN = 64")
    store_lo = o_lo is not None
    n_qblocks = (lq + 2 * BM - 1) // (2 * BM)
    n_items = n_qblocks * b * h
    _FWD[_grid(n_items, q.device, cfg)](
        _desc(q, BM), _desc(k, bn), _desc(v, bn), o, lse, o_lo if store_lo else o,
        o.stride(0), o.stride(1), o.stride(2), qk_scale, window, lq, lk, n_qblocks, n_items,
        H=h, GROUP=h // hkv, D=d, BN=bn, STAGES=stages, NA1D=bool(na1d), STORE_LO=store_lo,
        CONSUMER_REGS=regs, LOADER_REGS=24, num_warps=4, maxnreg=int(cfg.get("maxnreg", 168)),
    )


def compile_sm90(d: int = 128, bn: int = 64, stages: int = 4, na1d: bool = False, store_lo: bool = False,
                 dtype: str = "bf16", regs: int = 240, maxnreg: int = 168):
    """Compile the kernel for sm_90 without a GPU (``triton.compile`` on a Gluon source) and return Triton's
    compiled kernel (``.asm["ptx"]``, ``.metadata``): the CPU test of the Gluon API across Triton releases."""
    sig = dict(q_desc=_desc_type(dtype, BM, d), k_desc=_desc_type(dtype, bn, d), v_desc=_desc_type(dtype, bn, d),
               O=f"*{dtype}", LSE="*fp32", OLO=f"*{dtype}", sob="i64", sot="i64", soh="i64", qk_scale="fp32", W="i32",
               Lq="i32", Lk="i32", n_qblocks="i32", n_items="i32")
    const = dict(H=4, GROUP=2, D=d, BN=bn, STAGES=stages, NA1D=na1d, STORE_LO=store_lo, CONSUMER_REGS=regs, LOADER_REGS=24)
    return _compile_sm90(_swa_fwd_gluon_kernel, sig, const, maxnreg)


__all__ = ["BM", "HAVE_GLUON", "compile_sm90", "forward", "supported"]
