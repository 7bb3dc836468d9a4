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

import contextlib
import functools
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import mnemotorch.ops.memory.chunked as chunked
from mnemotorch.layers.titans import TitansLMM

_aten = torch.ops.aten
#: ops that read device values on the host (a sync on CUDA), or whose output shape depends on values
_SYNCING = {
    _aten._local_scalar_dense.default,  # .item(), int(t), float(t), bool(t)
    _aten.is_nonzero.default,
    _aten.equal.default,
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
}
#: factories that make a tensor on the default device (the CPU) unless given ``device=``
_FACTORIES = ("arange", "empty", "eye", "full", "linspace", "ones", "rand", "randint", "randn", "zeros")
#: functions that turn host data into a tensor (a host-to-device copy inside the capture on a CUDA run)
_FROM_HOST = ("tensor", "as_tensor", "from_numpy")
#: modules whose factory calls are watched (the guards' own test adds itself)
_WATCHED = ["mnemotorch"]


class CaptureHazard(AssertionError):
    pass


def _is_hazard(func, args, kwargs) -> str | None:
    if func in _SYNCING:
        return "host sync"
    if func in (_aten.repeat_interleave.Tensor, _aten.repeat_interleave.self_Tensor) and kwargs.get("output_size") is None:
        return "host sync (repeat_interleave without output_size)"
    if func in (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default) and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
    ):
        return "host sync (boolean-mask indexing)"
    if torch.Tag.nondeterministic_seeded in func.tags:
        return "random op"
    return None


class _Guard(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = _is_hazard(func, args, kwargs)
        if what:
            raise CaptureHazard(f"{what}: {func}")
        return func(*args, **kwargs)


def _ours(frame) -> bool:
    return frame.f_globals.get("__name__", "").startswith(tuple(_WATCHED))


def _guarded_factory(name: str, fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if _ours(sys._getframe(1)):
            if name in _FROM_HOST and not (args and isinstance(args[0], torch.Tensor)):
                raise CaptureHazard(f"torch.{name} on host data (a host-to-device copy on a CUDA run)")
            if name in _FACTORIES and kwargs.get("device") is None:
                raise CaptureHazard(f"torch.{name} without device= (a CPU tensor on a CUDA run)")
        return fn(*args, **kwargs)

    return call


def _refuse(what: str):
    def method(self, *args, **kwargs):
        raise CaptureHazard(f"host read: Tensor.{what}")

    return method


@contextlib.contextmanager
def capture_guard():
    """Context: host syncs, host reads, random ops and device-less factory calls from mnemotorch raise."""
    saved_torch = {name: getattr(torch, name) for name in _FACTORIES + _FROM_HOST}
    saved_tensor = {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu", "numpy")}
    try:
        for name, fn in saved_torch.items():
            setattr(torch, name, _guarded_factory(name, fn))
        for name in saved_tensor:
            setattr(torch.Tensor, name, _refuse(name))
        with _Guard():
            yield
    finally:
        for name, fn in saved_torch.items():
            setattr(torch, name, fn)
        for name, fn in saved_tensor.items():
            setattr(torch.Tensor, name, fn)


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
            bad = [op for op in ops if isinstance(op, torch._ops.OpOverload) and _is_hazard(op, ((), [None]), {})]
            assert not bad, f"capture hazards in a compiled graph: {bad}"
            assert ops & {_aten.mm.default, _aten.bmm.default}, "the recorded graph is not the chunk step"
    finally:
        torch._dynamo.reset()
        chunked._COMPILED_STEPS.clear()
