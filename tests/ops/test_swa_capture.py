"""What capturing the sliding-window fast path's forward + backward in a CUDA graph needs, checked on
the CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).

The first H100 run of ``tests/gpu/test_swa_gpu.py::test_sliding_window_op_and_graph_capture`` failed
with ``cudaErrorStreamCaptureImplicit`` ("operation would make the legacy stream depend on a capturing
blocking stream"). Its cause was the test, not the kernels' host code: it kept the output of an eager
call with its autograd graph, whose leaves' ``AccumulateGrad`` nodes (made on the default stream) the
captured backward then reused. The launch sweep of the same run (scripts/diag_swa.py) captured the
same forward + backward, host TMA descriptors, in-kernel descriptors and dQ by atomics included, in
every one of its CUDA-graph timings (docs/results/swa_sweep_2026-11-26_h100.json).

Both sides are checked here without a GPU, for every launch switch of ``swa_triton.LAUNCH``:

* the fast path's host code makes no host sync, reads no tensor on the host, makes no tensor from
  host data or without ``device=``, and draws no random number (tests/capture_guards.py);
* a step keeps no autograd node alive for the next one, and an output kept with its graph does
  (what broke the H100 capture).
"""

from __future__ import annotations

import os

import pytest
import torch

import capture_guards as guards
from capture_guards import live_accumulators
from interpreter_numerics import descriptor_reduce  # noqa: F401 (pytest fixture)

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)

from mnemotorch.ops.block_sparse import swa_triton  # noqa: E402


def _launch(tma=False, fused=False, **extra) -> dict:
    """Small tiles (every phase of the kernels appears at L = 70) with the given switches."""
    out = dict(fwd=dict(BM=32, BN=16, warps=4, stages=1, tma=tma),
               dkdv=dict(BM=16, BN=32, warps=4, stages=1, fused_dq=fused, tma=tma),
               dq=dict(BM=32, BN=16, warps=4, stages=1, tma=tma))
    for kind, cfg in extra.items():
        out[kind].update(cfg)
    return out


VARIANTS = {
    "pointers": _launch(),
    "host_tma": _launch(tma=True),
    "device_tma": _launch(tma="device"),
    "fused_dq": _launch(fused=True),
    "host_tma_fused_dq": _launch(tma=True, fused=True),
    "one_loop_delta_in_dq": _launch(tma=True, fwd=dict(one_loop=True), dkdv=dict(one_loop=True), dq=dict(one_loop=True, delta=True)),
    "one_loop_tma_reductions": _launch(tma=True, fused="tma", fwd=dict(one_loop=True), dkdv=dict(one_loop=True)),
}


@pytest.fixture(autouse=True)
def _eager_path(monkeypatch):
    """The path a CUDA-graph capture of eager code takes (``_EagerSWA``). Under the guards' dispatch
    mode ``_eager_ok`` would send the calls through the custom ops, whose bodies run with the mode
    switched off (its host syncs would go unseen)."""
    monkeypatch.setattr(swa_triton, "_eager_ok", lambda *ts: True)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 70, 2, 16, generator=g).requires_grad_()
    k, v = (torch.randn(1, 70, 1, 16, generator=g).requires_grad_() for _ in range(2))
    go = torch.randn(1, 70, 2, 16, generator=g)
    return q, k, v, go


def _step(q, k, v, go):
    out = swa_triton.swa_attention_triton(q, k, v, 20, 0.25)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), go))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fast_path_step_has_no_capture_hazard(descriptor_reduce, variant) -> None:
    """After a warm-up step (as before a capture), forward + backward run under every guard of
    tests/capture_guards.py and compute what the warm-up computed."""
    q, k, v, go = _inputs()
    with swa_triton.override_launch(**VARIANTS[variant]):
        warm = _step(q, k, v, go)
        rng = torch.get_rng_state()
        with guards.capture_guard():
            guarded = _step(q, k, v, go)
    assert torch.equal(torch.get_rng_state(), rng)
    for a, b in zip(guarded, warm):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_the_guards_see_a_host_sync_in_the_fast_path(monkeypatch) -> None:
    """The guards are not vacuous here: a host read planted in the backward's host code is caught."""
    q, k, v, go = _inputs()
    real = swa_triton._bwd_impl

    def bwd(do, *args):
        do.abs().max().item()  # the hazard
        return real(do, *args)

    monkeypatch.setattr(swa_triton, "_bwd_impl", bwd)
    with swa_triton.override_launch(**VARIANTS["pointers"]):
        _step(q, k, v, go)
        with pytest.raises(guards.CaptureHazard, match="host sync"), guards.capture_guard():
            _step(q, k, v, go)


def test_no_autograd_node_outlives_a_step_unless_an_output_is_kept() -> None:
    """A step (forward, backward) leaves no AccumulateGrad node for the next one, so a captured step
    makes its own on the capturing stream. An eager output kept with its graph -- what the H100 test
    did -- keeps the nodes of q, k and v alive, and the next backward reuses them (on CUDA: on the
    default stream they were made on, which a capture cannot depend on)."""
    q, k, v, go = _inputs(1)
    leaves = {"q": q, "k": k, "v": v}

    def step():
        out = swa_triton.swa_attention_triton(q, k, v, 20, 0.25)
        (out * go).sum().backward()

    with swa_triton.override_launch(**VARIANTS["pointers"]):
        step()
        stale = live_accumulators(leaves)
        step()
        assert stale == []
        kept = swa_triton.swa_attention_triton(q, k, v, 20, 0.25)  # the H100 test's `out`
        stale = live_accumulators(leaves)
        step()
        assert sorted(set(stale)) == ["k", "q", "v"]
        del kept
        with torch.no_grad():  # the fixed test's eager check
            swa_triton.swa_attention_triton(q, k, v, 20, 0.25)
        stale = live_accumulators(leaves)
        step()
        assert stale == []
