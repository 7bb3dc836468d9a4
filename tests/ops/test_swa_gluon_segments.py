"""The Gluon backward's key segments (``swa_gluon_bwd.segment_plan`` and the host loop of ``backward``) on the CPU:
the plan against brute-force windows, and the per-segment cast and carry of the fp32 dQ accumulator with the kernel
replaced by an exact float64 stand-in that adds each segment's dQ share where the kernel would. The kernel itself is
tested on the GPU (tests/gpu/test_swa_gluon_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from mnemotorch.ops.block_sparse import swa_gluon, swa_gluon_bwd

pytestmark = pytest.mark.skipif(not swa_gluon_bwd.HAVE_GLUON, reason="needs Triton's Gluon")


def _window(i: torch.Tensor, w: int, lq: int, lk: int, na1d: bool):
    p = i + (lk - lq)
    if na1d:
        lo = (p - w // 2).clamp(0, lk - w)
        return lo, lo + w
    return (p - w + 1).clamp_min(0), p + 1


CASES = [(1000, 1000, 129, False, 256), (777, 777, 333, True, 128), (500, 1300, 64, False, 384),
         (4096, 4096, 1024, False, 1024), (3000, 3000, 2048, True, 512), (640, 640, 640, True, 128),
         (300, 300, 1, False, 128), (2000, 2000, 100, False, None)]


@pytest.mark.parametrize("lq,lk,w,na1d,seg", CASES)
def test_segment_plan_matches_brute_force_windows(lq, lk, w, na1d, seg) -> None:
    plan, span = swa_gluon_bwd.segment_plan(lq, lk, w, na1d, seg)
    i = torch.arange(lq)
    lo, hi = _window(i, w, lq, lk, na1d)
    step = 2 * swa_gluon_bwd.BN
    covered, row0 = 0, 0
    for kb0, nb, r0, done, last in plan:
        a, b = kb0 * step, min((kb0 + nb) * step, lk)
        assert a == covered and r0 == row0
        touched = ((lo < b) & (hi > a)).nonzero().flatten()
        if touched.numel():
            assert touched.min() >= r0 and touched.max() <= last and touched.max() < r0 + span
        assert done == int((hi <= b).sum())  # rows whose every key is below b: a prefix
        assert done - r0 <= span and last + 1 - r0 <= span
        covered, row0 = b, done
    assert covered == lk and row0 == lq
    if seg is None:
        assert len(plan) == 1
    else:
        # about seg + W rows; NA-1D's clamped borders (every query near an end sees the same keys) add up to W
        assert len(plan) == -(-lk // max(seg, step)) and span <= seg + (2 if na1d else 1) * w + step


def _fake_launch(contrib: torch.Tensor, kmat: torch.Tensor, w: int, na1d: bool):
    """Stands in for the kernel: adds ``contrib[:, :, rows, keys] @ K`` of the launch's keys to the accumulator rows
    ``row - row0`` (fp64 ``contrib`` ``[B, H, Lq, Lk]``, window-masked; ``kmat`` ``[B, Lk, H, D]``)."""
    calls = []

    class Launch:
        def __getitem__(self, grid):
            def run(*args, **kw):
                dqa = args[8]
                lq, lk, nb, n_items, kb0, row0, rows = args[20:27]
                step = 2 * swa_gluon_bwd.BN
                a, b = kb0 * step, min((kb0 + nb) * step, lk)
                part = torch.einsum("bhij,bjhd->bihd", contrib[:, :, :, a:b], kmat[:, a:b])  # [B, Lq, H, D]
                nz = part.abs().flatten(2).amax(-1).amax(0) > 0  # rows this launch touches
                idx = nz.nonzero().flatten()
                if idx.numel():
                    assert idx.min() >= row0 and idx.max() < row0 + rows, (idx.min(), idx.max(), row0, rows)
                    dqa[:, idx - row0] += part[:, idx].to(dqa.dtype)
                calls.append((kb0, nb, row0, rows))
            return run
    return Launch(), calls


@pytest.mark.parametrize("lq,lk,w,na1d,seg", CASES)
def test_segmented_accumulator_gives_the_whole_sum(monkeypatch, lq, lk, w, na1d, seg) -> None:
    """dQ from the segment loop (cast of finished rows, carry of partial ones, zeroing) equals the sum over all keys."""
    b, h, d = 2, 2, 64
    g = torch.Generator().manual_seed(lq + w)
    lo, hi = _window(torch.arange(lq), w, lq, lk, na1d)
    j = torch.arange(lk)
    mask = (j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None])
    contrib = torch.randn(b, h, lq, lk, generator=g, dtype=torch.float64) * mask
    kmat = torch.randn(b, lk, h, d, generator=g, dtype=torch.float64)
    launch, calls = _fake_launch(contrib, kmat, w, na1d)
    monkeypatch.setattr(swa_gluon_bwd, "_BWD", launch)
    monkeypatch.setattr(swa_gluon_bwd, "sm_count", lambda dev: 1)
    monkeypatch.setattr(swa_gluon, "_grid", lambda n, dev, cfg: (1,))
    monkeypatch.setattr(swa_gluon, "_desc", lambda t, rows, cols=None: None)
    q = torch.zeros(b, lq, h, d, dtype=torch.float32)
    kv = torch.zeros(b, lk, h, d, dtype=torch.float32)
    scale = 0.5
    dq, dk, dv = swa_gluon_bwd.backward(q, q, kv, kv, None, None, w, scale, scale, na1d,
                                        dict(stages=2, dq="shared", segment=seg))
    want = torch.einsum("bhij,bjhd->bihd", contrib, kmat) * scale
    assert dq.dtype == q.dtype and dq.shape == q.shape
    torch.testing.assert_close(dq.double(), want, rtol=1e-5, atol=1e-5)
    plan, span = swa_gluon_bwd.segment_plan(lq, lk, w, na1d, swa_gluon_bwd._segment_keys(dict(segment=seg), b * h, lk,
                                                                                          None))
    assert len(calls) == len(plan)
    assert all(rows == (span if len(plan) > 1 else lq) for *_, rows in calls)  # the accumulator's rows


def test_segment_keys_keeps_every_sm_busy(monkeypatch) -> None:
    monkeypatch.setattr(swa_gluon_bwd, "sm_count", lambda dev: 132)
    assert swa_gluon_bwd._segment_keys({}, 16, 65536, None) is None
    assert swa_gluon_bwd._segment_keys(dict(segment=4096), 16, 65536, None) == 4224  # 4 items per SM: 33 blocks x 16 heads
    assert swa_gluon_bwd._segment_keys(dict(segment=8192), 16, 65536, None) == 8192
    assert swa_gluon_bwd._segment_keys(dict(segment=4096), 1, 32768, None) is None  # one head: one launch
    assert swa_gluon_bwd._segment_keys(dict(segment=256, waves=0), 1, 32768, None) == 256  # as asked (tests)
