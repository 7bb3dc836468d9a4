"""CUDA graphs of a layer's training call, for layers whose eager cost is the host's launches.

A layer with many small kernels (the routing glue: assignment, layout, packing, RoPE, the attention
kernel and their backwards) spends more time in Python and kernel launches than on the GPU when
called eagerly. :class:`TrainingGraphs` captures the layer's forward and backward once per input
signature with :func:`torch.cuda.make_graphed_callables` and replays them afterwards: the caller
still calls the layer eagerly, inside an ordinary training loop, and autograd sees one node.

Contract (that of ``make_graphed_callables``; checked where it can be):

* ``args[0]`` is the call's input (copied into the graph's own input buffer at each call); the other
  arguments (weights, buffers) are read in place while they are the same tensors as at the capture
  (else copied in);
* the body is a pure function of its tensor arguments, plus tensors it reads or writes in place whose
  storage never moves while the graphs live (the caller puts their addresses in the key or resets the
  cache when they move);
* the graphed outputs and saved activations are static buffers, overwritten by the next replay: a
  call that comes while an earlier call's backward is still pending (its autograd node alive and not
  yet run) runs **eagerly** instead (one warning), so gradient accumulation over several forwards and
  activation checkpointing stay correct, just not graphed;
* outputs the caller keeps beyond the next call must be cloned by the caller.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from typing import Callable, Hashable, Sequence

import torch
from torch import Tensor


class _Entry:
    __slots__ = ("fn", "node", "ran")

    def __init__(self, fn: Callable[..., tuple[Tensor, ...]]):
        self.fn = fn
        self.node: weakref.ref | None = None  # autograd node of the last replay
        self.ran = [True]  # whether its backward has run (a list: the hook of that replay holds it)

    def busy(self) -> bool:
        """The last replay's backward may still come: its node is alive and has not run."""
        return self.node is not None and self.node() is not None and not self.ran[0]


class TrainingGraphs:
    """Per-signature CUDA graphs (forward + backward) of one layer's training call.

    Args:
        name: the layer's name, for warnings.
        max_entries: signatures kept (least recently used dropped); each holds its own memory pool
            with the call's activations.
    """

    def __init__(self, name: str, max_entries: int = 4):
        self.name = name
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._warned = False
        self.captures = 0  # graphs made so far (tests read it)
        self.replays = 0

    def reset(self) -> None:
        """Drop every graph (e.g. when buffers the bodies read have moved)."""
        self._entries.clear()

    # A copy of the layer (``copy.deepcopy`` for an EMA model, ``torch.save`` of a whole module) gets no
    # graphs: they belong to this layer's buffers and memory pool; the copy captures its own when called.
    def __deepcopy__(self, memo) -> "TrainingGraphs":
        return TrainingGraphs(self.name, self.max_entries)

    def __getstate__(self) -> dict:
        return {"name": self.name, "max_entries": self.max_entries}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["name"], state["max_entries"])

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def run(self, key: Hashable, body: Callable[..., tuple[Tensor, ...]], args: Sequence[Tensor],
            after_capture: Callable[[], None] | None = None) -> tuple[Tensor, ...] | None:
        """``body(*args)`` replayed from the graphs of ``key`` (captured on first use), or ``None`` when this
        call must run eagerly (the previous replay's backward is still pending).

        ``after_capture`` runs once after a capture (whose warm-up calls ran ``body`` a few times):
        the caller resets what those calls accumulated in place.
        """
        entry = self._entries.get(key)
        if entry is not None and entry.busy():
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"{self.name}(cuda_graph=True): called again before the previous call's backward ran; this call and "
                    "others like it run eagerly (the graph's outputs and saved activations would be overwritten). "
                    "Call backward after each forward to keep the graphed speed.",
                    stacklevel=3,
                )
            return None
        if entry is None:
            ctx = _autocast_without_cache()
            # the graph's static inputs are its sample arguments: the first one (the layer's input) is a copy,
            # so later calls copy their input into memory of ours, never into the caller's first tensor;
            # the others (weights, buffers) are the caller's own, read in place when they are the same tensors
            first = args[0].detach().clone().requires_grad_(args[0].requires_grad)
            with ctx:
                fn = torch.cuda.make_graphed_callables(body, (first, *args[1:]), allow_unused_input=True)
            entry = _Entry(fn)
            self._entries[key] = entry
            self.captures += 1
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            if after_capture is not None:
                after_capture()
        self._entries.move_to_end(key)
        out = entry.fn(*args)
        self.replays += 1
        node = next((o.grad_fn for o in out if o.grad_fn is not None), None)
        if node is not None:
            ran = [False]
            node.register_prehook(lambda grads, ran=ran: ran.__setitem__(0, True))
            entry.node, entry.ran = weakref.ref(node), ran
        else:
            entry.node, entry.ran = None, [True]
        return tuple(out)


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _autocast_without_cache():
    """``make_graphed_callables`` refuses autocast's weight-cast cache; under autocast, capture with the same
    dtype and the cache off (the results are the same; the cache only saves repeated casts)."""
    if torch.is_autocast_enabled("cuda") and torch.is_autocast_cache_enabled():
        return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
    return _Nothing()


def autocast_key() -> tuple:
    """The autocast state a graph was captured under (part of a cache key)."""
    on = torch.is_autocast_enabled("cuda")
    return (on, torch.get_autocast_dtype("cuda") if on else None)


__all__ = ["TrainingGraphs", "autocast_key"]
