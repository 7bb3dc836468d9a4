"""What capturing the routing layer's training step in a CUDA graph needs, beyond having no host sync
(that part: ``tests/test_routing_no_sync.py``), checked on the CPU.

During a capture all work must go to the capturing stream, and a replay should compute what an eager
call does. Three things get in the way, and none needs a GPU to be seen:

* a tensor made without ``device=`` (``torch.tensor(list)``, ``torch.arange(n)``, ...): on a CUDA run it
  is a CPU tensor, copied to the device inside the captured region (or mixed with device tensors);
* a random op: inside a capture it draws from the graph's registered generator state, so replays do
  not draw what the eager call drew (and a capture that aborts leaves the default CUDA generator in
  capture mode: its next use fails with "Offset increment outside graph capture encountered
  unexpectedly", the last error of that H100 run);
* an autograd node that outlives its step. A node runs its backward on the stream that was current when
  it was made, so an ``AccumulateGrad`` node of a parameter made by an eager call on the default stream
  and kept alive (a stored output or loss still holding its graph) makes the captured backward
  accumulate on the legacy default stream: ``cudaErrorStreamCaptureImplicit``, what the first H100 run
  of ``tests/gpu/test_routing_gpu.py::test_mixer_block_sparse_has_no_host_sync_and_captures_in_a_cuda_graph``
  hit (its eager call's output was kept).

The first two are watched while the step runs (forward and backward): every torch factory function
called from ``mnemotorch`` code must be given a ``device`` (and none may turn Python or NumPy data into a
tensor), and a dispatch mode raises on every random op (``torch.Tag.nondeterministic_seeded``). The
third, by hooks on the ``AccumulateGrad`` nodes that exist after a step: a hook that runs in the next
backward means its node survived.
"""

from __future__ import annotations

import functools
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import capture_guards as guards
import mnemotorch.layers.routing as routing_layer
import mnemotorch.ops.routing.block_sparse as bs
from capture_guards import CaptureHazard, live_accumulators
from mnemotorch.layers import get_mixer

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (tests/conftest.py)")


#: modules whose factory calls are watched (the guards' own test adds itself)
_WATCHED = ["mnemotorch"]


def capture_guard():
    """Context: factory calls from mnemotorch without ``device=``, tensors from host data and random ops
    raise (tests/capture_guards.py; host syncs are tests/test_routing_no_sync.py's part)."""
    return guards.capture_guard(syncs=False, host_reads=(), watched=tuple(_WATCHED))


def _mixer(shared_qk: bool):
    torch.manual_seed(0)
    return get_mixer("routing", dim=64, num_heads=4, num_clusters=3, shared_qk=shared_qk, backend="block_sparse").train()


def _step(m, x, reset: bool = True):
    """The GPU test's step: forward, loss with the aux loss claimed, backward; the output detached.
    ``reset``: first drop the k-means statistics a previous call left (the GPU test keeps them out)."""
    if reset:
        m._pending_raw = m._pending_loss = None
    y, _ = m(x)
    ((y * y).sum() + m.routing_aux_loss()).backward()
    return y.detach()


def test_the_guards_catch_their_hazards(monkeypatch) -> None:
    """Each guard fires on what it is for (else the tests below could pass vacuously), in the forward
    and in the backward."""
    monkeypatch.setattr(sys.modules[__name__], "_WATCHED", ["mnemotorch", __name__])
    x = torch.randn(6)
    hazards = (
        lambda: x[:3] + torch.arange(3),  # a constant built without device=
        lambda: x.index_select(0, torch.tensor([0, 2])),  # a Python list turned into an index
        lambda: x[:2] * torch.zeros(2, dtype=x.dtype),
        lambda: torch.randn(3, device=x.device),
        lambda: F.dropout(x, 0.5, training=True),
        lambda: torch.randperm(4, device=x.device),
    )
    for fn in hazards:
        with pytest.raises(CaptureHazard), capture_guard():
            fn()
    with capture_guard():
        x[:3] + torch.arange(3, device=x.device) + torch.full((3,), 2.0, device=x.device)
        x.new_zeros(2) + torch.zeros_like(x[:2])
        torch.as_tensor(x)

    # planted in the layer's backward (the rotation's and the commitment loss's one-kernel backward): a tensor
    # without device=
    import mnemotorch.ops.routing.triton as routing_kernels

    real_backward = routing_kernels.RotaryCommit.backward

    def backward(ctx, g, gl):
        scale = torch.ones(1)  # the hazard
        return real_backward(ctx, g * scale.to(g.device)[0].to(g.dtype), gl)

    monkeypatch.setattr(routing_layer, "FUSED_GLUE", "on")
    monkeypatch.setattr(routing_kernels.RotaryCommit, "backward", staticmethod(backward))
    m = _mixer(True)
    xi = torch.randn(1, 40, 64, requires_grad=True)
    _step(m, xi)
    with pytest.raises(CaptureHazard), capture_guard():
        _step(m, xi)

    # an output kept with its graph (the H100 failure's pattern): its AccumulateGrad nodes serve the next step
    monkeypatch.undo()  # the real commitment loss (and the CPU's unfused glue)
    kept = m(xi)[0]
    m.routing_aux_loss()
    stale = live_accumulators({"x": xi, **dict(m.named_parameters())})
    _step(m, xi)
    assert sorted(set(stale)) == ["o_proj.weight", "q_proj.weight", "v_proj.weight", "x"]
    del kept


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("shared_qk", [True, False], ids=["shared_qk", "separate_qk"])
def test_block_sparse_step_makes_no_host_tensor_and_draws_no_random_number(monkeypatch, impl: str, shared_qk: bool) -> None:
    """After one warm-up step (as before a capture), the block-sparse path's training forward and backward
    make every tensor on the inputs' device and draw no random number; the guarded step computes what the
    warm-up did."""
    monkeypatch.setattr(routing_layer, "FUSED_GLUE", "on")  # the CUDA default: the kernels' glue
    monkeypatch.setattr(bs, "routed_layout", functools.partial(bs.routed_layout, impl=impl))
    m = _mixer(shared_qk)
    x = torch.randn(1, 70, 64, requires_grad=True)
    y0 = _step(m, x)
    g0 = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    x.grad = None
    m.zero_grad(set_to_none=True)
    rng = torch.get_rng_state()
    with capture_guard():
        y1 = _step(m, x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert y1.device == x.device and torch.equal(y1, y0)
    for a, b in zip([x.grad] + [p.grad for p in m.parameters()], g0):
        assert a.device == b.device and torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shared_qk", [True, False], ids=["shared_qk", "separate_qk"])
def test_no_autograd_node_outlives_its_step(monkeypatch, shared_qk: bool) -> None:
    """The GPU test's protocol (warm-up steps, an eager step, then the step it captures): every step makes
    fresh AccumulateGrad nodes for the input and the parameters, so the captured one would make them on the
    capturing stream. The layer keeps nothing with a graph between calls (its unclaimed aux loss aside,
    which the step claims)."""
    monkeypatch.setattr(routing_layer, "FUSED_GLUE", "on")
    m = _mixer(shared_qk)
    x = torch.randn(1, 70, 64, requires_grad=True)
    leaves = {"x": x, **dict(m.named_parameters())}
    for _ in range(2):
        _step(m, x, reset=False)  # (without reset: what the layer keeps between calls is under test too)
    y_eager = _step(m, x, reset=False)
    stale = live_accumulators(leaves)
    y_next = _step(m, x, reset=False)
    assert stale == [], f"AccumulateGrad nodes reused from the previous step: {sorted(set(stale))}"
    assert torch.equal(y_next, y_eager)
    # what the layer does hold between calls: an unclaimed commitment loss (summed into the next call's)
    # keeps the routing projection's node, so a training loop claims it every step before capturing one
    m(x)
    stale = live_accumulators(leaves)
    y, _ = m(x)
    ((y * y).sum() + m.routing_aux_loss()).backward()
    assert "q_proj.weight" in stale
