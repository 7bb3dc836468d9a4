"""The ``titans_lmm`` layer's chunked path can be captured in a CUDA graph at fixed shapes (issue #5:
``mnemo bench memory --cuda-graph`` times it as graph replays), checked on the CPU.

A capture refuses a host sync (``.item()``, ``float(t)``, ``bool(t)`` and ``if t:``, ``.tolist()``,
``.cpu()``, ``nonzero``, ``unique``, boolean-mask indexing, ``repeat_interleave`` without
``output_size``), and a replay repeats one call's work only if the call makes no tensor from host data
or on the default device (a CPU tensor on a CUDA run) and draws no random number. On the CPU there is
no device to wait for, so the tests watch the operations themselves while the layer's forward
(no grad) and forward + backward run: every aten op goes through a dispatch mode that raises on the
syncing and the random ones, ``Tensor.tolist`` / ``.cpu`` / ``.numpy`` (which read a CPU tensor
without a syncing aten op) raise, and every torch factory called from ``mnemotorch`` code must be
given ``device=``. The compiled chunk step (``compile_memory``) cannot run under a dispatch mode
(dynamo refuses one): there the forward and backward graphs AOTAutograd hands the backend are read
for the same ops, and everything around the step (and the step's backward, which the autograd engine
runs) runs under the guards. A planted ``.item()`` shows that the guards catch a regression.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch.utils._python_dispatch import _disable_current_modes

import capture_guards as guards
import mnemotorch.ops.memory.chunked as chunked
from capture_guards import CaptureHazard
from mnemotorch.layers.titans import TitansLMM

_aten = torch.ops.aten

#: modules whose factory calls are watched (the guards' own test adds itself)
_WATCHED = ["mnemotorch"]


def capture_guard():
    """Context: host syncs, host reads, random ops and device-less factory calls from mnemotorch raise
    (tests/capture_guards.py)."""
    return guards.capture_guard(watched=tuple(_WATCHED))


CONFIGS = {
    # the bench's "matched" configuration (the peer's memory) and TitansLMM's defaults (SiLU, clipped gradients)
    "matched": {"depth": 2, "expansion": 4, "activation": "gelu", "residual": True, "layer_norm": True, "max_grad_norm": None, "max_momentum": 1.0},
    "default": {},
}


def _layer(config: str, **kw) -> TitansLMM:
    torch.manual_seed(0)
    return TitansLMM(32, 2, chunk_size=8, **CONFIGS[config], **kw)


def _steps(layer: TitansLMM, x: torch.Tensor, go: torch.Tensor, state=None):
    """The two steps the bench captures: the forward under no_grad, and the gradients of x and every
    parameter of a forward + backward (``torch.autograd.grad``, as ``measure_graphed``; a call given a
    state does not use the memory's initial weights)."""
    params = [x, *layer.parameters()]
    with torch.no_grad():
        y_fwd = layer(x, state)[0]
    grads = torch.autograd.grad(layer(x, state)[0], params, go, allow_unused=state is not None)
    return y_fwd, grads


def _check_layer(layer: TitansLMM, lengths=(32, 29)) -> None:
    """Warm-up, then the guarded steps: the bench's fixed shape (whole chunks from an empty state), a
    partial last chunk, and a call continuing a chunk begun earlier; each agrees with its warm-up."""
    g = torch.Generator().manual_seed(1)
    for t in lengths:
        x = torch.randn(1, t, 32, generator=g).requires_grad_()
        go = torch.randn(1, t, 32, generator=g)
        ref = _steps(layer, x, go)
        with capture_guard():
            out = _steps(layer, x, go)
        for a, b in zip((ref[0], *ref[1]), (out[0], *out[1])):
            assert torch.equal(a, b)
    with torch.no_grad():
        state = layer(torch.randn(1, 13, 32, generator=g))[1]  # 13 = a chunk and 5 tokens of the next
    x = torch.randn(1, 20, 32, generator=g).requires_grad_()
    go = torch.randn(1, 20, 32, generator=g)
    _steps(layer, x, go, state)
    with capture_guard():
        _steps(layer, x, go, state)


def test_the_guards_catch_their_hazards(monkeypatch) -> None:
    """Each guard fires (else the tests below could pass vacuously), and a ``.item()`` planted in the
    chunked path (inside the per-chunk step, forward and backward) is caught."""
    monkeypatch.setattr(sys.modules[__name__], "_WATCHED", ["mnemotorch", __name__])
    x = torch.arange(6.0)
    hazards = (
        lambda: x.sum().item(), lambda: float(x[0]), lambda: bool(x[0] > 1), lambda: x.tolist(), lambda: x.cpu(),
        lambda: x.numpy(), lambda: x.nonzero(), lambda: x[x > 2], lambda: torch.unique(x), lambda: torch.rand(2, device=x.device),
        lambda: x[:3] + torch.arange(3), lambda: x[:2] * torch.tensor([1.0, 2.0]), lambda: x[:2] + torch.zeros(2),
    )
    for fn in hazards:
        with pytest.raises(CaptureHazard), capture_guard():
            fn()
    with capture_guard():
        x[:3] + torch.arange(3, device=x.device) + torch.full((3,), 2.0, device=x.device) + torch.zeros_like(x[:3])

    plain_act = chunked._act

    def syncing_act(name, z):  # a data-dependent branch on a tensor value
        if z.abs().max().item() > 1e9:
            raise AssertionError
        return plain_act(name, z)

    monkeypatch.setattr(chunked, "_act", syncing_act)
    layer = _layer("matched")
    with pytest.raises(CaptureHazard, match="_local_scalar_dense"):
        _check_layer(layer, lengths=(16,))


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_eager_layer_has_no_capture_hazard(config: str) -> None:
    _check_layer(_layer(config))


class _RecordingBackend:
    """``aot_eager`` that keeps the ops of every forward / backward / inference graph AOTAutograd compiles."""

    def __init__(self) -> None:
        from torch._dynamo.backends.common import aot_autograd
        from torch._functorch.aot_autograd import make_boxed_func

        self.graphs: list[set] = []

        def record(gm, example_inputs):
            self.graphs.append({n.target for n in gm.graph.nodes if n.op == "call_function"})
            return make_boxed_func(gm.forward)

        self.backend = aot_autograd(fw_compiler=record, bw_compiler=record)

    def __call__(self, gm, example_inputs):
        return self.backend(gm, example_inputs)


@pytest.mark.parametrize("config", ["matched"])
def test_compiled_layer_has_no_capture_hazard(monkeypatch, config: str) -> None:
    """``compile_memory``: the compiled step's graphs hold no syncing or random op, and the rest of the
    layer (the chunk loop around the step, the projections, the step's backward) runs clean under the
    guards. The step's forward runs with the dispatch mode off (dynamo refuses to run under one)."""
    torch._dynamo.reset()
    chunked._COMPILED_STEPS.clear()
    backend = _RecordingBackend()
    plain_stepper = chunked._full_chunk_stepper

    def stepper(compile, *args):
        step = plain_stepper(compile, *args)
        if compile is None:  # eager: nothing to hide
            return step

        def outside_the_mode(*a):
            with _disable_current_modes():
                return step(*a)

        return outside_the_mode

    monkeypatch.setattr(chunked, "_full_chunk_stepper", stepper)
    try:
        layer = _layer(config, compile_memory={"backend": backend})
        _check_layer(layer, lengths=(32,))
        assert len(backend.graphs) >= 3  # inference forward, training forward, backward
        for ops in backend.graphs:
            bad = [op for op in ops if isinstance(op, torch._ops.OpOverload) and (guards.sync_hazard(op, ((), [None]), {}) or torch.Tag.nondeterministic_seeded in op.tags)]
            assert not bad, f"capture hazards in a compiled graph: {bad}"
            assert ops & {_aten.mm.default, _aten.bmm.default}, "the recorded graph is not the chunk step"
    finally:
        torch._dynamo.reset()
        chunked._COMPILED_STEPS.clear()
