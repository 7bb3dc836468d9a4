"""``scripts/profile_titans_layer.py``'s host-side instruments, on the CPU: the function wrapping shared by ``--gaps``
(``record_function`` marks) and ``--timeline`` (host clock + CUDA event marks), which must put every original back,
and the timeline's bookkeeping, with CUDA events stood in for by the host's clock."""

from __future__ import annotations

import time

import pytest
import torch

from tests.script_module import load_script


@pytest.fixture(scope="module")
def prof():
    return load_script("profile_titans_layer")


def test_wrap_functions_wraps_module_functions_and_static_methods_then_restores(prof) -> None:
    from mnemotorch.ops.memory import fused_triton

    before_fn, before_static = fused_triton._launch_split, fused_triton.__dict__["_FusedMemory"].__dict__["forward"]
    seen = []

    def make(fn, label):
        def wrapped(*a, **kw):
            seen.append(label)
            return fn(*a, **kw)

        return wrapped

    restore = prof.wrap_functions([("mnemotorch.ops.memory.fused_triton", "_launch_split"),
                                   ("mnemotorch.ops.memory.fused_triton", "_FusedMemory.forward"),
                                   ("mnemotorch.ops.memory.fused_triton", "no_such_function")], make)
    try:
        assert fused_triton._launch_split is not before_fn
        assert isinstance(fused_triton._FusedMemory.__dict__["forward"], staticmethod)  # still static for autograd.Function
        with pytest.raises(Exception):
            fused_triton._launch_split()  # the original runs (and fails on no arguments) after the mark
        assert seen == ["_launch_split"]
    finally:
        restore()
    assert fused_triton._launch_split is before_fn
    assert fused_triton._FusedMemory.__dict__["forward"] is before_static


def test_launch_timeline_marks_launches_calls_and_projections_in_order(prof, monkeypatch) -> None:
    class Event:  # the device "reaches" an event when it is recorded: every lead is ~0
        def __init__(self, enable_timing=True):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, other):
            return (other.t - self.t) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    from mnemotorch.ops.memory import chunked, fused_read_vjp, fused_triton

    real_launcher = fused_triton.launcher
    layer = torch.nn.Module()
    layer.qkv_proj = torch.nn.Linear(2, 2)

    def step():
        pass

    def forward():
        layer.qkv_proj(torch.zeros(1, 2))
        chunked.log_gates(torch.rand(2), torch.rand(2), torch.float32)
        fused_triton.launcher(fused_triton._lmm_split_fwd_kernel)
        return None

    def backward(_):
        fused_read_vjp.launcher(fused_read_vjp._lmm_read_vjp_a_kernel)

    step.forward, step.backward, step.layer = forward, backward, layer
    rows = prof.launch_timeline(step, 3)
    assert [r["at"] for r in rows] == ["step start", "qkv_proj", "log_gates", "lmm_split_fwd", "forward returned", "lmm_read_vjp_a",
                                       "step end"]
    assert all(abs(r["lead_ms"]) < 5 for r in rows)
    host = [r["host_ms"] for r in rows]
    assert host == sorted(host)
    # everything put back: the launcher, the marked functions, the projection's hook
    assert fused_triton.launcher is real_launcher and fused_read_vjp.launcher is real_launcher
    assert chunked.log_gates.__name__ == "log_gates" and not hasattr(chunked.log_gates, "__wrapped__")
    assert not layer.qkv_proj._forward_pre_hooks
