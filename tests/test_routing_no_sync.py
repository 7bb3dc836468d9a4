"""No host synchronisation on the routing layer's block-sparse path (issue #7: wall time was 3.3x device time).

A host sync (``.item()``, ``.tolist()``, ``int(t)``, ``bool(t)``, ``nonzero``, ``unique``, boolean-mask
indexing, ``repeat_interleave`` without ``output_size``) blocks the CPU until the GPU drains, so host and
device work serialise, and it makes the path impossible to capture in a CUDA graph. On the CPU there is
no device to wait for, so the test watches for the operations themselves: every aten op of the mixer's
forward and backward goes through a dispatch mode that raises on the ones that read a tensor's values
on the host, and ``Tensor.tolist`` (which on a CPU tensor reads memory without any aten op) is patched
to raise. Both layout builders run: the torch one (the CPU default) and the kernels' one (the CUDA
default, here under the interpreter). On the GPU, ``tests/gpu/test_routing_gpu.py`` checks the same
path under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

import mnemotorch.layers.routing as routing_layer
import mnemotorch.ops.routing.block_sparse as bs
from capture_guards import CaptureHazard, capture_guard
from mnemotorch.layers import get_mixer

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (tests/conftest.py)")

# the guard: tests/capture_guards.py (host syncs and Tensor.tolist only here)
HostSyncError = CaptureHazard


@pytest.fixture
def no_sync():
    return functools.partial(capture_guard, host_reads=("tolist",), random=False, factories=False)


def test_the_guard_catches_syncs(no_sync) -> None:
    """The guard itself: each kind of sync raises (else the test below could pass vacuously)."""
    x = torch.arange(6)
    for fn in (lambda: x.tolist(), lambda: x.sum().item(), lambda: int(x[0]), lambda: bool(x[0] > 1), lambda: x.nonzero(),
               lambda: x[x > 2], lambda: torch.unique(x), lambda: torch.repeat_interleave(x, x)):
        with pytest.raises(HostSyncError), no_sync():
            fn()
    with no_sync():
        torch.repeat_interleave(x, x, output_size=15)
        torch.searchsorted(x, x)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("shared_qk", [True, False], ids=["shared_qk", "separate_qk"])
def test_block_sparse_mixer_forward_backward_has_no_host_sync(monkeypatch, no_sync, impl: str, shared_qk: bool) -> None:
    monkeypatch.setattr(routing_layer, "FUSED_GLUE", "on")
    monkeypatch.setattr(bs, "routed_layout", functools.partial(bs.routed_layout, impl=impl))
    torch.manual_seed(0)
    m = get_mixer("routing", dim=64, num_heads=4, num_clusters=3, local_heads=1, local_window=16, shared_qk=shared_qk,
                  backend="block_sparse").train()
    ref = get_mixer("routing", dim=64, num_heads=4, num_clusters=3, local_heads=1, local_window=16, shared_qk=shared_qk,
                    backend="reference").train()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(1, 70, 64, requires_grad=True)
    with no_sync():
        y, state = m(x)
        loss = (y * y).sum() + m.routing_aux_loss()
        loss.backward()
        # a continuation (queries after a cache: separate packings, generic lists) in eval mode
        with torch.no_grad():
            m.eval()
            y2, _ = m(x[:, :30].detach(), None)
            y3, _ = m(x[:, 30:].detach(), m(x[:, :30].detach())[1])
    # and the sync-free path computes the right thing (outputs against the reference mixer)
    m.train()
    y_ref, _ = ref(x.detach())
    assert ((y.detach() - y_ref).norm() / y_ref.norm()).item() <= 1e-5
    assert ((torch.cat([y2, y3], 1) - y_ref).norm() / y_ref.norm()).item() <= 1e-5
    assert x.grad is not None and torch.isfinite(x.grad).all()
