"""CPU guards for what stops a layer's step from being captured in a CUDA graph (shared by the tests).

On the CPU there is no device to wait for and no capture to fail, so the guards watch for the
operations themselves while a step runs:

* host syncs: aten ops that read a tensor's values on the host (``.item()``, ``int(t)``, ``bool(t)``,
  ``nonzero``, ``unique``, boolean-mask indexing, ``repeat_interleave`` without ``output_size``), seen by
  a dispatch mode;
* host reads without an aten op: ``Tensor.tolist`` / ``.cpu`` / ``.numpy`` (patched to raise);
* random ops (``torch.Tag.nondeterministic_seeded``): inside a capture they draw from the graph's
  generator state, so replays do not draw what the eager call drew;
* torch factory calls from the watched modules without ``device=`` (a CPU tensor on a CUDA run) and
  tensors made from host data (a host-to-device copy inside the capture).

``live_accumulators`` watches the third hazard, an autograd node that outlives its step (an
``AccumulateGrad`` node made on the default stream and reused by a captured backward).

Users: ``tests/test_routing_no_sync.py``, ``tests/test_routing_graph_capture.py``,
``tests/layers/test_titans_capture.py``, ``tests/ops/test_swa_capture.py``.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
#: ops that read device values on the host (a sync on CUDA), or whose output shape depends on values
SYNCING = {
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
FACTORIES = ("arange", "empty", "empty_strided", "eye", "full", "linspace", "logspace", "ones", "rand", "randint", "randn",
             "randperm", "scalar_tensor", "zeros")
#: functions that turn host data into a tensor (a host-to-device copy on a CUDA run, whatever the device)
FROM_HOST = ("tensor", "as_tensor", "from_numpy", "frombuffer")
#: Tensor methods that read values on the host without an aten op
HOST_READS = ("tolist", "cpu", "numpy")


class CaptureHazard(AssertionError):
    pass


def sync_hazard(func, args, kwargs) -> str | None:
    """Why this aten call syncs with the host, or None."""
    if func in SYNCING:
        return "host sync"
    if func in (_aten.repeat_interleave.Tensor, _aten.repeat_interleave.self_Tensor) and kwargs.get("output_size") is None:
        return "host sync (repeat_interleave without output_size)"
    if func in (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default) and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
    ):
        return "host sync (boolean-mask indexing)"
    return None


class _Guard(TorchDispatchMode):
    def __init__(self, syncs: bool, random: bool):
        super().__init__()
        self.syncs, self.random = syncs, random

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = sync_hazard(func, args, kwargs) if self.syncs else None
        if what is None and self.random and torch.Tag.nondeterministic_seeded in func.tags:
            what = "random op"
        if what:
            raise CaptureHazard(f"{what}: {func}")
        return func(*args, **kwargs)


def _guarded_factory(name: str, fn, watched: tuple[str, ...]):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if sys._getframe(1).f_globals.get("__name__", "").startswith(watched):
            if name in FROM_HOST and not (args and isinstance(args[0], torch.Tensor)):
                raise CaptureHazard(f"torch.{name} on host data (a host-to-device copy on a CUDA run)")
            if name in FACTORIES and kwargs.get("device") is None:
                raise CaptureHazard(f"torch.{name} without device= (a CPU tensor on a CUDA run)")
        return fn(*args, **kwargs)

    return call


def _refuse(what: str):
    def method(self, *args, **kwargs):
        raise CaptureHazard(f"host read: Tensor.{what}")

    return method


@contextlib.contextmanager
def capture_guard(syncs: bool = True, host_reads: tuple[str, ...] = HOST_READS, random: bool = True, factories: bool = True,
                  watched: tuple[str, ...] = ("mnemotorch",)):
    """Context in which the selected hazards raise :class:`CaptureHazard`: host syncs (``syncs``), the
    ``host_reads`` Tensor methods, random ops (``random``), and factory / host-data calls made from
    modules whose name starts with one of ``watched`` (``factories``)."""
    saved_torch = {name: getattr(torch, name) for name in FACTORIES + FROM_HOST} if factories else {}
    saved_tensor = {name: getattr(torch.Tensor, name) for name in host_reads}
    try:
        for name, fn in saved_torch.items():
            setattr(torch, name, _guarded_factory(name, fn, tuple(watched)))
        for name in saved_tensor:
            setattr(torch.Tensor, name, _refuse(name))
        with _Guard(syncs, random):
            yield
    finally:
        for name, fn in saved_torch.items():
            setattr(torch, name, fn)
        for name, fn in saved_tensor.items():
            setattr(torch.Tensor, name, fn)


def live_accumulators(leaves: dict) -> list:
    """Hooks on the ``AccumulateGrad`` node each leaf has now; the returned list collects the names of
    those that run in a later backward (``.backward()``). A node nothing else holds dies here with its
    hook, so a name appears only if a node from before survived (an autograd graph still referenced).

    On CUDA a node runs on the stream that was current when it was made: a node made by an eager call
    on the default stream and reused by a captured backward fails the capture
    (``cudaErrorStreamCaptureImplicit``)."""
    fired: list = []
    for name, t in leaves.items():
        node = t.view_as(t).grad_fn.next_functions[0][0]
        node.register_prehook(lambda grads, name=name: fired.append(name))
    return fired
