"""The Gluon Hopper forward of the sliding window and NA-1D (ops/block_sparse/swa_gluon.py) on a real
GPU: output, base-2 log-sum-exp and the output's rounding residual against a float64 dense reference
under each mechanism's exact mask, and against the Triton forward on the same inputs; every launch
shape the table may choose; batch > 1, GQA, ragged lengths (a program's second warp group past the end),
``Lq < Lk``, windows of one key and of the whole sequence, NATTEN's clamped borders; gradients through
the public ops. The Gluon backward (ops/block_sparse/swa_gluon_bwd.py) on the same cases: dQ, dK, dV
against float64 and against the Triton backward, both dtypes, repeat runs and CUDA-graph capture.

Run on the GPU machine (sm_90):
    MNEMO_GPU_TESTS=1 python -m pytest -q -p no:cacheprovider tests/gpu/test_swa_gluon_gpu.py
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from mnemotorch.ops.block_sparse import swa_gluon, swa_gluon_bwd, swa_triton

pytestmark = pytest.mark.gpu
if os.environ.get("MNEMO_GPU_TESTS") != "1" or not torch.cuda.is_available():  # pragma: no cover
    pytest.skip("GPU checks: set MNEMO_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)
if torch.cuda.get_device_capability()[0] != 9 or not swa_gluon.HAVE_GLUON:  # pragma: no cover
    pytest.skip("the Gluon forward is for sm_90 with Triton's Gluon", allow_module_level=True)

# persistent (default): one program per SM walking the work items; False: one program per item
CONFIGS = [dict(BN=64, stages=4), dict(BN=128, stages=2), dict(BN=64, stages=2, persistent=False)]
TOL = 5e-3  # relative RMS error of a 16-bit output against float64 (ARCHITECTURE.md)


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _windows(lq, lk, w, na1d, device):
    """``(lo, hi)`` per query: the keys ``[lo, hi)`` each one sees."""
    p = torch.arange(lq, device=device) + (lk - lq)
    if na1d:
        lo = (p - w // 2).clamp(0, lk - w)
        return lo, lo + w
    return (p - w + 1).clamp_min(0), p + 1


def _reference(q, k, v, w, scale, na1d):
    """float64 ``(o, lse2)`` with the dense mask."""
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    kd = k.double().repeat_interleave(h // hkv, dim=2)
    vd = v.double().repeat_interleave(h // hkv, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q.double(), kd) * scale
    lo, hi = _windows(lq, lk, w, na1d, q.device)
    j = torch.arange(lk, device=q.device)
    mask = (j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None])
    s = s.masked_fill(~mask, float("-inf"))
    lse2 = torch.logsumexp(s, -1) / math.log(2.0)
    o = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), vd)
    return o, lse2


def _inputs(b, lq, lk, h, hkv, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, lq, h, d, device="cuda", generator=g).to(dtype)
    k = torch.randn(b, lk, hkv, d, device="cuda", generator=g).to(dtype)
    v = torch.randn(b, lk, hkv, d, device="cuda", generator=g).to(dtype)
    return q, k, v


def _forward(q, k, v, w, na1d, gluon, calls):
    scale = q.shape[-1] ** -0.5
    # gluon False: the Triton forward even where the table's row asks for the Gluon one (NA-1D at D = 128)
    with swa_triton.override_launch(fwd=dict(gluon=gluon)):
        before = calls[0]
        o, lse, o_lo = swa_triton._fwd_impl(q, k, v, w, scale, need_lo=True, na1d=na1d)
        assert (calls[0] > before) == bool(gluon), "the Gluon forward ran where it should not, or did not run"
    return o, lse, o_lo


def _count_calls(monkeypatch, module, name: str) -> list:
    """``[n]``: how many times ``module.name`` has been called since (it still runs)."""
    count = [0]
    real = getattr(module, name)

    def counting(*a, **kw):
        count[0] += 1
        return real(*a, **kw)

    monkeypatch.setattr(module, name, counting)
    return count


@pytest.fixture
def calls(monkeypatch):
    return _count_calls(monkeypatch, swa_gluon, "forward")


CASES = [
    # (B, Lq, Lk, H, Hkv, D, W, na1d)
    (1, 4096, 4096, 4, 4, 128, 1024, False),
    (2, 1000, 1000, 4, 2, 128, 300, False),
    (1, 333, 1000, 2, 1, 64, 129, False),  # Lq < Lk: query i sits at key i + Lk - Lq
    (1, 200, 200, 2, 2, 128, 1, False),
    (1, 777, 777, 2, 2, 64, 777, False),  # plain causal
    (1, 4096, 4096, 2, 2, 128, 2048, True),
    (2, 1000, 1000, 4, 2, 64, 257, True),
    (1, 130, 130, 2, 2, 128, 7, True),
    (1, 515, 515, 1, 1, 128, 515, True),  # the whole sequence
    (1, 190, 190, 1, 1, 128, 64, True),
    # more work items than SMs: programs of the persistent grid walk several, of unequal tile counts
    (2, 4096, 4096, 4, 2, 128, 1024, False),
    (1, 6144, 6144, 4, 4, 64, 515, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"BN{c['BN']}s{c['stages']}")
def test_gluon_forward_matches_reference_and_triton(case, cfg, calls) -> None:
    b, lq, lk, h, hkv, d, w, na1d = case
    q, k, v = _inputs(b, lq, lk, h, hkv, d, torch.bfloat16)
    o, lse, o_lo = _forward(q, k, v, w, na1d, cfg, calls)
    o_t, lse_t, _ = _forward(q, k, v, w, na1d, False, calls)
    ref_o, ref_lse = _reference(q, k, v, w, d**-0.5, na1d)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    assert _rel(o, ref_o) < TOL, _rel(o, ref_o)
    # the fp32 output (o + residual) is far closer to float64 than the 16-bit one
    assert _rel(o.double() + o_lo.double(), ref_o) < 2e-3
    assert (lse.double() - ref_lse).abs().max().item() < 2e-2
    assert _rel(o, o_t) < TOL
    assert (lse - lse_t).abs().max().item() < 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gluon_forward_dtypes_and_no_residual(dtype, calls) -> None:
    q, k, v = _inputs(1, 1024, 1024, 2, 2, 128, dtype)
    scale = 128**-0.5
    with swa_triton.override_launch(fwd=dict(gluon=CONFIGS[0])):
        o, lse, o_lo = swa_triton._fwd_impl(q, k, v, 256, scale, need_lo=False)
    assert o_lo is None and calls[0] == 1
    ref_o, _ = _reference(q, k, v, 256, scale, False)
    assert _rel(o, ref_o) < TOL


@pytest.mark.parametrize("na1d", [False, True])
def test_gradients_through_the_gluon_forward(na1d) -> None:
    """Public ops with the Gluon forward (the table row forced on) and the Triton backward: every
    gradient against float64."""
    b, lq, h, d, w = 1, 1024, 2, 128, 255
    q, k, v = (t.requires_grad_() for t in _inputs(b, lq, lq, h, h, d, torch.bfloat16, seed=3))
    go = torch.randn_like(q)
    with swa_triton.override_launch(fwd=dict(gluon=CONFIGS[0])):
        if na1d:
            out = swa_triton.na1d_attention_triton(q, k, v, w, d**-0.5)
        else:
            out = swa_triton.swa_attention_triton(q, k, v, w, d**-0.5)
        grads = torch.autograd.grad(out, (q, k, v), go)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_o, _ = _reference(*leaves, w, d**-0.5, na1d)
    ref_g = torch.autograd.grad(ref_o, leaves, go.double())
    assert _rel(out, ref_o) < TOL
    for g, r in zip(grads, ref_g):
        assert _rel(g, r) < 1e-2, _rel(g, r)


# ---------------------------------------------------------------------------------------------
# the Gluon backward (ops/block_sparse/swa_gluon_bwd.py): dK, dV and dQ in one kernel

# dq="tma" (TMA bulk reductions of dQ) is the table's form
BWD_CONFIGS = [dict(stages=2), dict(stages=2, dq="own"), dict(stages=1, persistent=False), dict(stages=2, dq="tma"),
               dict(stages=3), dict(stages=3, dq="tma")]


@pytest.fixture
def bwd_calls(monkeypatch):
    return _count_calls(monkeypatch, swa_gluon_bwd, "backward")


def _err(g, r) -> float:
    """Relative error, against at least 1e-3 per element: with a window of one key dQ is zero in exact
    arithmetic (dP = Δ), and both kernels return rounding noise of ~1e-7 there."""
    floor = 1e-3 * r.numel() ** 0.5
    return ((g.double() - r.double()).norm() / r.double().norm().clamp_min(floor)).item()


def _reference_grads(q, k, v, go, w, scale, na1d):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o, _ = _reference(*leaves, w, scale, na1d)
    return torch.autograd.grad(o, leaves, go.double())


def _backward(q, k, v, go, w, na1d, gluon, calls):
    """``(dq, dk, dv)`` from ``swa_triton._bwd_impl`` with the Gluon backward (``gluon`` a row) or the Triton
    kernels (``gluon`` False), after the table's forward."""
    scale = q.shape[-1] ** -0.5
    o, lse, o_lo = swa_triton._fwd_impl(q, k, v, w, scale, need_lo=True, na1d=na1d)
    with swa_triton.override_launch(dkdv=dict(gluon=gluon)):
        before = calls[0]
        grads = swa_triton._bwd_impl(go, q, k, v, o, lse, o_lo, w, scale, na1d=na1d)
        assert (calls[0] > before) == bool(gluon), "the Gluon backward ran where it should not, or did not run"
    return grads


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("cfg", BWD_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_gluon_backward_matches_reference_and_triton(case, cfg, bwd_calls) -> None:
    b, lq, lk, h, hkv, d, w, na1d = case
    if swa_gluon_bwd.smem_bytes(d, cfg["stages"], dq_tma=cfg.get("dq") == "tma") > swa_gluon.SMEM_LIMIT:
        pytest.skip(f"{cfg} does not fit in shared memory at D = {d} (refused by the host)")
    q, k, v = _inputs(b, lq, lk, h, hkv, d, torch.bfloat16, seed=1)
    go = torch.randn(q.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2)).to(q.dtype)
    grads = _backward(q, k, v, go, w, na1d, cfg, bwd_calls)
    tri = _backward(q, k, v, go, w, na1d, False, bwd_calls)
    ref = _reference_grads(q, k, v, go, w, d**-0.5, na1d)
    for name, g, t, r in zip("qkv", grads, tri, ref):
        assert g.shape == r.shape and g.dtype == q.dtype
        assert torch.isfinite(g).all(), name
        assert _err(g, r) < 1e-2, (name, _err(g, r))
        # as close to float64 as the Triton kernels are (both round the same fp32 sums to 16 bits)
        assert _err(g, r) < 1.5 * _err(t, r) + 1e-3, (name, _err(g, r), _err(t, r))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("na1d", [False, True])
@pytest.mark.parametrize("gluon_bwd", ["table", "opt-in"])
@pytest.mark.parametrize("d", [64, 128])
def test_gluon_backward_through_public_ops(dtype, na1d, gluon_bwd, d, calls, bwd_calls) -> None:
    """The public ops with the table's rows as they ship (Gluon forward; the backward the row names: dQ by TMA
    bulk reductions) and with the element-atomic form opted in: every gradient against float64, and the kernels
    that ran are the ones the rows name."""
    b, lq, h, w = 2, 1500, 4, 333
    q, k, v = (t.requires_grad_() for t in _inputs(b, lq, lq, h, h, d, dtype, seed=5))
    go = torch.randn_like(q)
    over = dict(dkdv=dict(gluon=BWD_CONFIGS[0])) if gluon_bwd == "opt-in" else {}
    with swa_triton.override_launch(**over):
        expect_bwd = int(swa_triton.kernels_used(q, k, v, d**-0.5, na1d)["backward"] == "gluon")
        if na1d:
            out = swa_triton.na1d_attention_triton(q, k, v, w, d**-0.5)
        else:
            out = swa_triton.swa_attention_triton(q, k, v, w, d**-0.5)
        grads = torch.autograd.grad(out, (q, k, v), go)
    if gluon_bwd == "opt-in":
        assert expect_bwd == 1, "the opted-in Gluon backward is not supported on these inputs"
    assert calls[0] == 1 and bwd_calls[0] == expect_bwd
    ref = _reference_grads(q, k, v, go, w, d**-0.5, na1d)
    for g, r in zip(grads, ref):
        assert _rel(g, r) < 1e-2, _rel(g, r)


@pytest.mark.parametrize("cfg", [dict(stages=2, dq="tma"), BWD_CONFIGS[0]], ids=["tma", "atomics"])
def test_gluon_backward_is_deterministic_enough_and_graph_capturable(cfg, bwd_calls) -> None:
    """dQ is summed by reductions whose order varies between runs (bulk TMA reductions as shipped, or element
    atomics), so bits may differ; two runs agree to fp32 rounding, and the backward replays under a CUDA graph."""
    q, k, v = _inputs(1, 4096, 4096, 4, 4, 128, torch.bfloat16, seed=7)
    go = torch.randn_like(q)
    a = _backward(q, k, v, go, 1024, False, cfg, bwd_calls)
    b = _backward(q, k, v, go, 1024, False, cfg, bwd_calls)
    for x, y in zip(a, b):
        assert _rel(x, y) < 1e-3
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])  # dK, dV: no atomics
    scale = 128**-0.5
    o, lse, o_lo = swa_triton._fwd_impl(q, k, v, 1024, scale, need_lo=True)
    with swa_triton.override_launch(dkdv=dict(gluon=cfg)):
        swa_triton._bwd_impl(go, q, k, v, o, lse, o_lo, 1024, scale)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = swa_triton._bwd_impl(go, q, k, v, o, lse, o_lo, 1024, scale)
        graph.replay()
        torch.cuda.synchronize()
    for x, y in zip(out, a):
        assert _rel(x, y) < 1e-3
