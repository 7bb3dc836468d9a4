"""A Hopper backward for the sliding window and 1-D neighborhood attention, written in Gluon.

Why: ``swa_triton``'s backward is two kernels, dK/dV (4 matrix products per computed pair) and dQ (3),
at ~430 TFLOP/s on an H100; at the issue's main case that is 4.6-4.9 ms, against the ~3.1 ms that 1.5x
FlexAttention's forward + backward leaves (docs/results/block_sparse.md). A backward that computes each
pair's scores once does 5 products (FlashAttention-2's algorithm with dQ accumulated across key blocks,
Dao 2023; FlashAttention-3's Hopper layout, Shah et al. 2024, arXiv:2407.08608). ``triton.language``
lost that race (``fused_dq``: element or TMA atomics in one 8-warp program, 326 TFLOP/s); this kernel
gives the work to independent warp groups instead:

* a work item is ``2 * BN`` keys (``BN = 64``) of one batch and KV head; its program runs three
  partitions (``gl.warp_specialize``): two *consumer* warp groups, each owning ``BN`` keys and their
  fp32 ``dK``, ``dV`` in registers, and one *loader* warp that brings the item's K and V once, then
  streams the query tiles (``Q``, ``dO``: ``BM = 64`` rows) of every query head of the group through a
  ring of ``STAGES`` slots with TMA; a slot is released when both consumers are done with it;
* per query tile a consumer computes, for its keys (queries as rows, so the per-query ``lse`` and ``Δ`` take
  two registers a thread): ``S = Q Kᵀ``, ``dP = dO Vᵀ``, ``P = exp2(S c - lse)``, ``dS = P ∘ (dP - Δ)``;
  ``P`` and ``dS`` go to shared memory, where ``dV += Pᵀ dO`` and ``dK += dSᵀ Q`` read them transposed;
* ``dQ = dS K`` needs both groups' ``dS``: each writes its own to one of two buffers (tile ``n + 1`` may start
  while tile ``n``'s are read), and group ``w`` computes the columns ``[w D/2, (w + 1) D/2)`` of the tile's ``dQ``
  from both halves (at D = 128 the K operand is a view of the K tiles; at D = 64 the loader brings K again in
  column halves) and adds them to an fp32 accumulator. ``dq="tma"`` (the table's rows): the group stages its
  ``dQ`` tile in shared memory and issues one TMA bulk reduction (``cp.reduce.async.bulk.tensor``, FlashAttention-3's
  way); it waits for the reduction to have read the tile only before staging the next one, a whole tile later.
  ``dq="shared"``: 8-byte element atomics from registers instead; ``dq="own"``: each group reduces its own
  ``dS_w K_w`` with element atomics (no waiting on the other, twice the reductions);
* the grid is persistent (one program per SM over the items ``pid, pid + grid, ...``, key blocks of a
  head adjacent, so the queries they share and their dQ rows stay in L2).

Semantics are ``swa_triton``'s: per key position ``p = i + Lk - Lq`` of query ``i`` a row sees keys
``[lo(p), hi(p))`` (``swa_gluon._window``); ``lse`` is base 2, ``Δ = rowsum(dO ∘ O)`` comes from the
preprocess pass (with the output's rounding residual when kept), ``dK`` is scaled by ``scale`` here and
``dQ`` by the host's cast of the accumulator. Used by ``swa_triton._bwd_impl`` when the dK/dV launch row
has a ``gluon`` dict and :func:`supported` holds (CUDA sm_90, 16-bit, D 64 or 128, TMA-viewable
tensors, ``MNEMO_SWA_GLUON`` not ``0``). Tests: ``tests/gpu/test_swa_gluon_gpu.py`` (GPU) and
``tests/ops/test_swa_gluon_compile.py`` (CPU compile for sm_90).

**Measured** (H100, twenty-third and twenty-fourth sessions; CUDA-graph replays of the whole backward, Δ pass and
dQ cast included; docs/results/block_sparse.md): at L = 64K, W = 1024, D = 128, H = 16 the Triton pair takes
4.46 ms; this kernel 5.44 ms with element atomics (``"shared"``), 7.93 with ``"own"``, 5.64-5.87 ms with a bulk
reduction that waited for each tile's read at once (one ring slot), and **4.12 ms** with ``"tma"`` as it is (two ring
slots). NA-1D (32K, K 2048, H 1): 0.268 against 0.308 ms. D = 64 (three slots): 2.29 against 2.88 ms. So the dK/dV
rows at D 64 and 128 (16-bit) run it; ``MNEMO_SWA_GLUON=0`` turns both Gluon kernels off, ``MNEMO_SWA_GLUON=fwd``
this one only. **Memory:** the fp32 dQ accumulator adds ``4 B Lq H D`` bytes to the backward's peak (plus the
cast's output while it is alive), 0.5 GiB at the main case: ``mnemo bench`` measured 1.508 GiB of extra peak
for one forward + backward against FlexAttention's 1.008 (and the Triton kernels'). FlashAttention-3 keeps the
same accumulator. Launching the key blocks in segments, with an accumulator of about ``segment + W`` rows whose
finished rows are cast after each launch, was tried (commit ae9bbe9): 813 MiB of extra peak against 1284 (Triton
kernels 772) but 4.77 ms against 4.15 (4.60 at 8192-key segments; Triton kernels 4.64), no better than the Triton
kernels on either count, so it was removed. So was issuing the next tile's ``S = Q Kᵀ`` before a tile's dQ is staged
(``pre_s``): correct, 18-20% slower (its registers spill more); and issuing dK after the dQ products, to run under
the dQ staging (``late_dk``): correct, 4-6% slower (dK no longer covers the wait for the other group's dS).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ..triton_launch import CachedLaunch, tma_row_view
from . import swa_gluon

HAVE_GLUON = swa_gluon.HAVE_GLUON
HAVE_TMA_REDUCE = False
if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.language.nvidia.hopper import tma as _tma

    from .swa_gluon import _tma_load, _window

    try:  # private names (Triton 3.6 and 3.9 have them): only dq="tma" needs them
        from triton._C.libtriton import ir as _ir
        from triton.experimental.gluon.language._core import builtin as _builtin

        @_builtin
        def _tma_reduce_add(desc, coord, src, _semantic=None):
            """``desc[coord] += src`` (a shared-memory tile) by one asynchronous TMA bulk reduction
            (``cp.reduce.async.bulk.tensor ... add``), committed to the issuing thread's bulk group: Triton's
            ``ttng.async_tma_reduce``, which Gluon 3.9 calls ``tma.async_atomic_add`` and 3.6 builds but does not
            name. Before the tile is written again, ``_tma.store_wait(0)`` (then a group barrier) waits until the
            reduction has read it."""
            coord = _semantic._convert_to_ir_values(coord, require_i64=False)
            _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, desc.handle, coord, src.handle)

        HAVE_TMA_REDUCE = hasattr(_ir, "DESCRIPTOR_REDUCE_KIND")
    except Exception:  # pragma: no cover - another Triton layout: dq="tma" is refused
        HAVE_TMA_REDUCE = False

    # a barrier of the calling partition's warps (a named barrier inside ``warp_specialize``): Triton 3.6 calls
    # it ``thread_barrier``, 3.9 ``barrier``
    _group_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

#: keys per consumer warp group (the wgmma M of a 4-warp group) and query rows per tile
BN = 64
BM = 64


if HAVE_GLUON:
    _BN = gl.constexpr(BN)
    _BM = gl.constexpr(BM)

    @gluon.jit
    def _queries_of(n0, W, Lq, Lk, NA1D: gl.constexpr):
        """``(i_first, i_last)``: the first and last query index whose window holds a key of
        ``[n0, n0 + 2 BN)`` (``i_last < i_first`` when none does)."""
        offset = Lk - Lq
        n_last = gl.minimum(n0 + 2 * _BN, Lk) - 1
        if NA1D:  # Lq = Lk; the inverse of the clamped window (swa_triton._na_first_query / _na_last_query)
            first = gl.where(n0 - W + 1 <= 0, 0, n0 - W + 1 + W // 2)
            last = gl.where(n_last >= Lk - W, Lk - 1, n_last + W // 2)
        else:
            first = gl.maximum(n0, offset) - offset
            last = gl.minimum(n_last + W - 1, Lk - 1) - offset
        return first, last

    @gluon.jit
    def _item(item, n_kblocks, W, Lq, Lk, HKV: gl.constexpr, NA1D: gl.constexpr):
        """``(b, hk, n0, i0, n_tiles)`` of work item ``item``: batch, KV head, first key, first query
        row of tile 0 and the number of ``BM``-row query tiles (per query head of the group)."""
        bhk = item // n_kblocks
        n0 = (item % n_kblocks) * (2 * _BN)
        first, last = _queries_of(n0, W, Lq, Lk, NA1D)
        n_tiles = gl.where(last >= first, (last - first) // _BM + 1, 0)
        return bhk // HKV, bhk % HKV, n0, first, n_tiles

    @gluon.jit
    def _red_add_v2(base, offs, x, ok):
        """``base[offs] += x`` where ``ok`` (fp32, relaxed, GPU scope), as one 8-byte ``red.v2.f32`` (sm_90) per pair
        of adjacent columns a thread holds in the wgmma accumulator layout: half the instructions and L2 requests
        of ``gl.atomic_add``'s scalar ones (Triton 3.6 does not vectorise float atomics). The pair's first offset
        addresses both (the pairs are columns ``2i, 2i + 1``; GPU-tested against the Triton backward). ``base`` is
        a scalar pointer and ``offs`` int32, so the addresses are formed in the instruction (64-bit addresses
        per element would take 64 registers)."""
        addr = gl.full(offs.shape, 0, gl.int64, layout=offs.type.layout) + base.to(gl.int64)
        gl.inline_asm_elementwise(
            "{ .reg .pred p; .reg .b64 a; setp.ne.b32 p, $6, 0; mad.wide.s32 a, $2, 4, $8; "
            "@p red.relaxed.gpu.global.add.v2.f32 [a], {$4, $5}; mov.b32 $0, 0; mov.b32 $1, 0; }",
            "=r,=r,r,r,f,f,r,r,l,l", [offs, x, ok.to(gl.int32), addr], dtype=gl.int32, is_pure=False, pack=2)

    @gluon.jit
    def _stats(LSE, DELTA, b, h, r0, Lq, H: gl.constexpr, layout: gl.constexpr, pred):
        """lse and Δ of query rows ``[r0, r0 + BM)`` of head ``h`` (+inf and 0 past ``Lq`` or without ``pred``)."""
        rows = r0 + gl.arange(0, _BM, layout=layout)
        ok = (rows < Lq) & pred
        base = (b * H + h).to(gl.int64) * Lq
        # lse = +inf past the end: exp2(s - lse) = 0 zeroes those rows of P (and of dS) without a mask
        return gl.load(LSE + base + rows, mask=ok, other=float("inf")), gl.load(DELTA + base + rows, mask=ok, other=0.0)

    @gluon.jit
    def _k_half(k_smem, kd_smem, w: gl.constexpr, c: gl.constexpr, D: gl.constexpr, K_COPY: gl.constexpr):
        """Columns ``[c D/2, (c + 1) D/2)`` of group ``w``'s K tile, the B operand of dQ = dS K: at D = 128 a
        view of the K tile (its 128-byte swizzle atoms are 64 columns wide, so each half is whole atoms); at D = 64
        the loader's separate copy in column halves (a half is inside one atom)."""
        if K_COPY:
            return kd_smem.index(2 * w + c)
        else:
            return k_smem.index(w).slice(c * (D // 2), D // 2, dim=1)

    @gluon.jit
    def _loader(k_desc, v_desc, kd_desc, q_desc, do_desc, k_smem, v_smem, kd_smem, q_smem, do_smem, bars,
                W, Lq, Lk, n_kblocks, n_items, HKV: gl.constexpr, GROUP: gl.constexpr, D: gl.constexpr,
                STAGES: gl.constexpr, NA1D: gl.constexpr, K_COPY: gl.constexpr, WG: gl.constexpr):
        """One warp: per item, its K and V (each group's half, and at D = 64 K again in ``D / 2``-column halves
        for dQ) once both consumers have finished the last item; then the query tiles of every query head of
        the group through the ring."""
        kv_ready, kv_empty, q_ready, do_ready, qdo_empty, ds_ready, ds_free = bars
        step = 0
        j = 0
        for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
            b, hk, n0, i0, n_tiles = _item(item, n_kblocks, W, Lq, Lk, HKV, NA1D)
            mbarrier.wait(kv_empty, (j & 1) ^ 1)
            mbarrier.expect(kv_ready, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes
                            + (4 * kd_desc.block_type.nbytes if K_COPY else 0))
            for w in gl.static_range(2):
                _tma_load(k_desc, [b * Lk + n0 + w * _BN, hk * D], kv_ready, k_smem.index(w))
                _tma_load(v_desc, [b * Lk + n0 + w * _BN, hk * D], kv_ready, v_smem.index(w))
                if K_COPY:
                    for c in gl.static_range(2):
                        _tma_load(kd_desc, [b * Lk + n0 + w * _BN, hk * D + c * (D // 2)], kv_ready,
                                  kd_smem.index(2 * w + c))
            for g in range(GROUP):
                h = hk * GROUP + g
                for t in range(n_tiles):
                    st = step % STAGES
                    mbarrier.wait(qdo_empty.index(st), ((step // STAGES) & 1) ^ 1)
                    row = b * Lq + i0 + t * _BM
                    mbarrier.expect(q_ready.index(st), q_desc.block_type.nbytes)
                    _tma_load(q_desc, [row, h * D], q_ready.index(st), q_smem.index(st))
                    mbarrier.expect(do_ready.index(st), do_desc.block_type.nbytes)
                    _tma_load(do_desc, [row, h * D], do_ready.index(st), do_smem.index(st))
                    step += 1
            j += 1

    @gluon.jit
    def _consumer(k_desc, v_desc, kd_desc, q_desc, do_desc, dqa_desc, k_smem, v_smem, kd_smem, q_smem, do_smem, p_smem, ds_smem,
                  dq_smem, bars, W, Lq, Lk, n_kblocks, n_items, LSE, DELTA, DQA, DK, DV, sdkb, sdkt, sdkh, sdvb, sdvt, sdvh,
                  qk_scale, sm_scale,
                  H: gl.constexpr, HKV: gl.constexpr, GROUP: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                  NA1D: gl.constexpr, SHARED_DQ: gl.constexpr, DQ_TMA: gl.constexpr, K_COPY: gl.constexpr,
                  WG: gl.constexpr):
        """Warp group ``WG``: keys ``[n0 + WG BN, + BN)`` of each item against every query tile; dQ columns
        ``[WG D/2, (WG + 1) D/2)`` of every tile."""
        kv_ready, kv_empty, q_ready, do_ready, qdo_empty, ds_ready, ds_free = bars
        # S = Q Kᵀ is [BM queries, BN keys]: the per-query lse and Δ are two registers a thread (keys as rows
        # would take 16 each); P and dS go to shared memory, where the next products read them transposed
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, _BN, 16])
        a_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
        q_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D // 2, 16])
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)  # per query
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)  # per key
        offset = Lk - Lq
        dtype: gl.constexpr = q_desc.dtype
        s_zero = gl.zeros([_BM, _BN], gl.float32, layout=s_layout)
        q_zero = gl.zeros([_BM, D // 2], gl.float32, layout=q_layout)
        p_w = p_smem.index(WG)
        step = 0
        j = 0
        for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
            b, hk, n0, i0, n_tiles = _item(item, n_kblocks, W, Lq, Lk, HKV, NA1D)
            k0 = n0 + WG * _BN
            dk = gl.zeros([_BN, D], gl.float32, layout=a_layout)
            dv = gl.zeros([_BN, D], gl.float32, layout=a_layout)
            mbarrier.wait(kv_ready, j & 1)
            k_w = k_smem.index(WG)
            v_w = v_smem.index(WG)
            # the query tiles of every query head of the group, one loop; lse and Δ of tile u + 1 are loaded
            # during tile u (from L2 their latency would sit on each tile's critical path)
            n_steps = GROUP * n_tiles
            lse_n, delta_n = _stats(LSE, DELTA, b, hk * GROUP, i0, Lq, H, row_s, n_steps > 0)
            h = hk * GROUP  # the tile's query head and first row, stepped without a division
            r0 = i0
            for u in range(n_steps):
                rows = r0 + gl.arange(0, _BM, layout=row_s)
                lse = lse_n
                delta = delta_n
                wrap = r0 + _BM >= i0 + n_tiles * _BM  # the next tile is the next head's first
                h_n = gl.where(wrap, h + 1, h)
                r0_n = gl.where(wrap, i0, r0 + _BM)
                lse_n, delta_n = _stats(LSE, DELTA, b, h_n, r0_n, Lq, H, row_s, u + 1 < n_steps)
                st = step % STAGES
                ph = (step // STAGES) & 1
                mbarrier.wait(q_ready.index(st), ph)
                s = warpgroup_mma(q_smem.index(st), k_w.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                mbarrier.wait(do_ready.index(st), ph)
                dp = warpgroup_mma(do_smem.index(st), v_w.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                s = warpgroup_mma_wait(1, deps=(s,))
                # the element mask only where the tile is not wholly inside every row's window
                p0 = r0 + offset
                lo_l, hi_l = _window(p0 + _BM - 1, W, Lk, NA1D)
                lo_f, hi_f = _window(p0, W, Lk, NA1D)
                full = (r0 + _BM <= Lq) & (lo_l <= k0) & (hi_f >= k0 + _BN)
                if full:
                    p = gl.exp2(s * qk_scale - gl.expand_dims(lse, 1))
                else:
                    lo_r, hi_r = _window(rows + offset, W, Lk, NA1D)
                    # keys relative to k0 (fewer live vectors); rows past Lq have lse = +inf, so P = 0 there
                    kr = gl.expand_dims(gl.arange(0, _BN, layout=col_s), 0)
                    ok = (kr >= gl.expand_dims(lo_r - k0, 1)) & (kr < gl.expand_dims(hi_r - k0, 1))
                    p = gl.exp2(gl.where(ok, s, float("-inf")) * qk_scale - gl.expand_dims(lse, 1))
                # P to this group's buffer (its last reader, tile n - 1's dV product, has completed)
                p_w.store(p.to(dtype))
                fence_async_shared()
                _group_barrier()  # this group's four warps
                dv = warpgroup_mma(p_w.permute((1, 0)), do_smem.index(st), dv, is_async=True)
                dp = warpgroup_mma_wait(1, deps=(dp,))
                ds = (p * (dp - gl.expand_dims(delta, 1))).to(dtype)
                qrows = gl.arange(0, _BM, layout=gl.SliceLayout(1, q_layout))
                qcols = gl.arange(0, D // 2, layout=gl.SliceLayout(0, q_layout))
                q_off = gl.expand_dims(qrows * (H * D), 1) + gl.expand_dims(qcols, 0)
                q_ok = gl.expand_dims(qrows < Lq - r0, 1) & gl.expand_dims(qcols >= 0, 0)
                q_row = DQA + ((b.to(gl.int64) * Lq + r0) * H + h) * D
                if SHARED_DQ:
                    # dS to shared memory for dK and both groups' dQ; buffer (step % 2) was read two tiles ago
                    buf = step % 2
                    uses = step // 2
                    ds_w = ds_smem.index(2 * buf + WG)
                    mbarrier.wait(ds_free.index(buf), (uses & 1) ^ 1)
                    ds_w.store(ds)
                    fence_async_shared()
                    _group_barrier()
                    mbarrier.arrive(ds_ready.index(buf), count=1)
                    dk = warpgroup_mma(ds_w.permute((1, 0)), q_smem.index(st), dk, is_async=True)
                    mbarrier.wait(ds_ready.index(buf), uses & 1)
                    # dQ[:, WG D/2 : (WG + 1) D/2] = dS_0 K_0[:, half] + dS_1 K_1[:, half]
                    dq = warpgroup_mma(ds_smem.index(2 * buf), _k_half(k_smem, kd_smem, 0, WG, D, K_COPY), q_zero,
                                       use_acc=False, is_async=True)
                    dq = warpgroup_mma(ds_smem.index(2 * buf + 1), _k_half(k_smem, kd_smem, 1, WG, D, K_COPY), dq,
                                       is_async=True)
                    dq, dv, dk = warpgroup_mma_wait(0, deps=(dq, dv, dk))
                    mbarrier.arrive(qdo_empty.index(st), count=1)
                    mbarrier.arrive(ds_free.index(buf), count=1)
                    if DQ_TMA:
                        # the group's staging tile: the last tile's reduction has had a whole tile to read it; rows
                        # past Lq (the next batch's, in the [B * Lq, H * D] view) add exact zeros (P = 0 there)
                        dq_w = dq_smem.index(WG)
                        _tma.store_wait(0)
                        _group_barrier()
                        dq_w.store(dq)
                        fence_async_shared()
                        _group_barrier()
                        _tma_reduce_add(dqa_desc, [b * Lq + r0, h * D + WG * (D // 2)], dq_w)
                    else:
                        _red_add_v2(q_row + WG * (D // 2), q_off, dq, q_ok)
                else:
                    # this group's own share of dQ, dS_WG K_WG, in two column halves: the groups never wait on
                    # each other (one's softmax runs under the other's products), at twice the reductions
                    ds_w = ds_smem.index(WG)  # its last readers (tile n - 1's dK and dQ) have completed
                    ds_w.store(ds)
                    fence_async_shared()
                    _group_barrier()
                    dk = warpgroup_mma(ds_w.permute((1, 0)), q_smem.index(st), dk, is_async=True)
                    dq = warpgroup_mma(ds_w, _k_half(k_smem, kd_smem, WG, 0, D, K_COPY), q_zero, use_acc=False,
                                       is_async=True)
                    dq, dv, dk = warpgroup_mma_wait(0, deps=(dq, dv, dk))
                    mbarrier.arrive(qdo_empty.index(st), count=1)
                    dq1 = warpgroup_mma(ds_w, _k_half(k_smem, kd_smem, WG, 1, D, K_COPY), q_zero, use_acc=False,
                                        is_async=True)
                    _red_add_v2(q_row, q_off, dq, q_ok)
                    dq1 = warpgroup_mma_wait(0, deps=(dq1,))
                    _red_add_v2(q_row + D // 2, q_off, dq1, q_ok)
                step += 1
                h = h_n
                r0 = r0_n
            # every product that read this item's K and V has completed
            mbarrier.arrive(kv_empty, count=1)
            krows = gl.arange(0, _BN, layout=gl.SliceLayout(1, a_layout))
            dcols = gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(0, a_layout)), 0)
            k_ok = gl.expand_dims(krows < Lk - k0, 1)
            dk_base = DK + b.to(gl.int64) * sdkb + hk * sdkh + k0.to(gl.int64) * sdkt
            gl.store(dk_base + gl.expand_dims(krows * sdkt, 1) + dcols, (dk * sm_scale).to(DK.dtype.element_ty), mask=k_ok)
            dv_base = DV + b.to(gl.int64) * sdvb + hk * sdvh + k0.to(gl.int64) * sdvt
            gl.store(dv_base + gl.expand_dims(krows * sdvt, 1) + dcols, dv.to(DV.dtype.element_ty), mask=k_ok)
            j += 1
        if DQ_TMA:
            _tma.store_wait(0)  # the last reduction has read its tile before the program's shared memory goes

    @gluon.jit
    def _swa_bwd_gluon_kernel(k_desc, v_desc, kd_desc, q_desc, do_desc, dqa_desc, LSE, DELTA, DQA, DK, DV,
                              sdkb, sdkt, sdkh, sdvb, sdvt, sdvh, qk_scale, sm_scale, W, Lq, Lk, n_kblocks, n_items,
                              H: gl.constexpr, HKV: gl.constexpr, GROUP: gl.constexpr, D: gl.constexpr,
                              STAGES: gl.constexpr, NA1D: gl.constexpr, SHARED_DQ: gl.constexpr, DQ_TMA: gl.constexpr,
                              K_COPY: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                              LOADER_REGS: gl.constexpr):
        dtype: gl.constexpr = q_desc.dtype
        k_smem = gl.allocate_shared_memory(dtype, [2, _BN, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [2, _BN, D], v_desc.layout)
        if K_COPY:
            kd_smem = gl.allocate_shared_memory(dtype, [4, _BN, D // 2], kd_desc.layout)
        else:
            kd_smem = k_smem  # unused: the dQ products read views of the K tiles (_k_half)
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, _BM, D], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, _BM, D], do_desc.layout)
        p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_BM, _BN], dtype)
        p_smem = gl.allocate_shared_memory(dtype, [2, _BM, _BN], p_layout)
        ds_smem = gl.allocate_shared_memory(dtype, [4, _BM, _BN], p_layout)
        if DQ_TMA:  # each group's dQ columns of one tile, staged for the bulk reduction
            dq_smem = gl.allocate_shared_memory(gl.float32, [2, _BM, D // 2], dqa_desc.layout)
        else:
            dq_smem = p_smem  # unused
        kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        do_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        qdo_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        ds_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_ready, count=1)
        mbarrier.init(kv_empty, count=2)
        for i in gl.static_range(STAGES):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(do_ready.index(i), count=1)
            mbarrier.init(qdo_empty.index(i), count=2)
        for i in gl.static_range(2):
            mbarrier.init(ds_ready.index(i), count=2)
            mbarrier.init(ds_free.index(i), count=2)
        fence_async_shared()
        bars = (kv_ready, kv_empty, q_ready, do_ready, qdo_empty, ds_ready, ds_free)
        gl.warp_specialize([
            (_consumer, (k_desc, v_desc, kd_desc, q_desc, do_desc, dqa_desc, k_smem, v_smem, kd_smem, q_smem, do_smem, p_smem,
                         ds_smem, dq_smem, bars, W, Lq, Lk, n_kblocks, n_items, LSE, DELTA, DQA, DK, DV, sdkb, sdkt, sdkh, sdvb,
                         sdvt, sdvh, qk_scale, sm_scale, H, HKV, GROUP, D, STAGES, NA1D, SHARED_DQ, DQ_TMA, K_COPY,
                         0)),
            (_consumer, (k_desc, v_desc, kd_desc, q_desc, do_desc, dqa_desc, k_smem, v_smem, kd_smem, q_smem, do_smem, p_smem,
                         ds_smem, dq_smem, bars, W, Lq, Lk, n_kblocks, n_items, LSE, DELTA, DQA, DK, DV, sdkb, sdkt, sdkh, sdvb,
                         sdvt, sdvh, qk_scale, sm_scale, H, HKV, GROUP, D, STAGES, NA1D, SHARED_DQ, DQ_TMA, K_COPY,
                         1)),
            (_loader, (k_desc, v_desc, kd_desc, q_desc, do_desc, k_smem, v_smem, kd_smem, q_smem, do_smem, bars,
                       W, Lq, Lk, n_kblocks, n_items, HKV, GROUP, D, STAGES, NA1D, K_COPY, 2)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


def supported(q: Tensor, k: Tensor, v: Tensor, do: Tensor, scale: float, cfg: dict) -> bool:
    """Whether the Gluon backward can run this call (else ``swa_triton``'s two kernels run). ``MNEMO_SWA_GLUON=fwd``
    keeps the forward in Gluon and the backward in Triton: this kernel's fp32 dQ accumulator, ``[B, Lq, H, D]``,
    raises the backward's peak memory by twice the size of dQ (0.5 GiB at L = 64K, H = 16, D = 128), which the
    Triton kernels do not need."""
    if os.environ.get("MNEMO_SWA_GLUON", "1") == "fwd":
        return False
    return swa_gluon.supported(q, k, v, scale, cfg) and do.dtype == q.dtype and tma_row_view(do) is not None


_BWD = CachedLaunch(_swa_bwd_gluon_kernel) if HAVE_GLUON else None


def _k_copy(d: int) -> bool:
    """Whether the loader also brings K in column halves for dQ (D = 64: a half is inside one 128-byte swizzle
    atom); at D = 128 the dQ products read views of the K tiles."""
    return d < 128


def smem_bytes(d: int, stages: int, elem: int = 2, dq_tma: bool = False) -> int:
    """Shared memory of one program: K, V (and K in column halves at D = 64), the Q / dO ring, two P and four dS
    tiles (and, with ``dq_tma``, each group's fp32 dQ tile staged for the bulk reduction)."""
    kv = (3 if _k_copy(d) else 2) * 2 * BN * d
    return (kv + 2 * stages * BM * d + 6 * BN * BM) * elem + (2 * BM * (d // 2) * 4 if dq_tma else 0)


def backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, window: int, scale: float,
             qk_scale: float, na1d: bool, cfg: dict) -> tuple[Tensor, Tensor, Tensor]:
    """``(dqa, dk, dv)``: dK and dV (``k``'s and ``v``'s dtype, scaled) and ``dqa`` the fp32 dQ accumulator
    ``[B, Lq, H, D]`` still to be multiplied by ``scale``. ``lse`` (base 2) and ``delta`` are ``[B, H, Lq]``.
    ``cfg``: the dK/dV row's ``gluon`` dict (``stages`` ring slots, ``regs`` registers per consumer thread,
    ``persistent``, ``dq``: ``"shared"``, the groups exchange ``dS`` and each reduces half of the columns of
    the sum with 8-byte element atomics, default; ``"tma"``, the same with one TMA bulk reduction per tile from
    a staged shared-memory tile (FlashAttention-3's way; the table's rows; at D = 128 it allows 2 ring slots); or
    ``"own"``, each group reduces its own ``dS K`` share: no waiting on the other group, twice the reductions, 1.5x
    slower on the H100)."""
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    stages = int(cfg.get("stages", 2))
    mode = cfg.get("dq", "shared")
    if mode == "tma" and not HAVE_TMA_REDUCE:
        raise ValueError("swa_gluon_bwd: dq='tma' needs Triton's asynchronous TMA reduction (ttng.async_tma_reduce), "
                         "which this Triton does not expose; use dq='shared'")
    need = smem_bytes(d, stages, dq_tma=mode == "tma")
    if need > swa_gluon.SMEM_LIMIT:
        raise ValueError(f"swa_gluon_bwd: {stages} ring slots at D = {d} with dq={mode!r} need {need // 1024} KiB of "
                         "shared memory (at most 220 on sm_90)")
    dqa = torch.zeros((b, lq, h, d), device=q.device, dtype=torch.float32)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    n_kblocks = (lk + 2 * BN - 1) // (2 * BN)
    n_items = n_kblocks * b * hkv
    desc = swa_gluon._desc
    k_desc = desc(k, BN)
    # K in column halves only where the loader brings that copy (D = 64); elsewhere the argument is unused
    kd_desc = desc(k, BN, d // 2) if _k_copy(d) else k_desc
    _BWD[swa_gluon._grid(n_items, q.device, cfg)](
        k_desc, desc(v, BN), kd_desc, desc(q, BM), desc(do, BM), desc(dqa, BM, d // 2),
        lse, delta, dqa, dk, dv, dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        qk_scale, scale, window, lq, lk, n_kblocks, n_items,
        H=h, HKV=hkv, GROUP=h // hkv, D=d, STAGES=stages, NA1D=bool(na1d), SHARED_DQ=mode != "own", DQ_TMA=mode == "tma",
        K_COPY=_k_copy(d), CONSUMER_REGS=int(cfg.get("regs", 240)), LOADER_REGS=24, num_warps=4,
        maxnreg=int(cfg.get("maxnreg", 168)),
    )
    return dqa, dk, dv


def compile_sm90(d: int = 128, stages: int = 2, na1d: bool = False, dtype: str = "bf16", regs: int = 240,
                 maxnreg: int = 168, loader_regs: int = 24, dq: str = "shared"):
    """Compile the kernel for sm_90 without a GPU (see ``swa_gluon.compile_sm90``)."""
    desc = swa_gluon._desc_type
    sig = dict(k_desc=desc(dtype, BN, d), v_desc=desc(dtype, BN, d), kd_desc=desc(dtype, BN, d // 2 if _k_copy(d) else d),
               q_desc=desc(dtype, BM, d), do_desc=desc(dtype, BM, d), dqa_desc=desc("fp32", BM, d // 2), LSE="*fp32",
               DELTA="*fp32", DQA="*fp32", DK=f"*{dtype}", DV=f"*{dtype}", sdkb="i64", sdkt="i64", sdkh="i64",
               sdvb="i64", sdvt="i64", sdvh="i64", qk_scale="fp32", sm_scale="fp32", W="i32", Lq="i32", Lk="i32",
               n_kblocks="i32", n_items="i32")
    const = dict(H=4, HKV=2, GROUP=2, D=d, STAGES=stages, NA1D=na1d, SHARED_DQ=dq != "own", DQ_TMA=dq == "tma",
                 K_COPY=_k_copy(d), CONSUMER_REGS=regs, LOADER_REGS=loader_regs)
    return swa_gluon._compile_sm90(_swa_bwd_gluon_kernel, sig, const, maxnreg)


__all__ = ["BM", "BN", "HAVE_GLUON", "HAVE_TMA_REDUCE", "backward", "compile_sm90", "smem_bytes", "supported"]
