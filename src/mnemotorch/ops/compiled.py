"""``torch.compile`` with only the sequence length symbolic.

The elementwise passes around our kernels (a layer's input path, the memory's gate coefficients, an output norm and
gate) gain from inductor's fusion, but not with ``dynamic=True``: every size is then symbolic, and inductor's GPU
kernels divide each element's index by runtime sizes. Marking only the length dynamic (``maybe_mark_dynamic`` on one
axis of the named arguments, at each call) keeps channels, heads and head sizes static and still gives one graph for
every length at or above ``min_length`` (shorter calls compile their own, once per length).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from torch import Tensor

_COMPILED: dict = {}


def compiled_over_length(fn: Callable, args: Sequence[int], backend="inductor", axis: int = 1, min_length: int = 2) -> Callable:
    """``fn`` through ``torch.compile(fullgraph=True, dynamic=None)``, cached per ``(fn, args, backend, axis, min_length)``.

    Args:
        fn: a plain function (not a partial: dynamo keys its cache by code object).
        args: the positions of the tensor arguments whose ``axis`` is the length.
        backend: any ``torch.compile`` backend, a name or a callable (tests pass a recording one).
        axis: the length's axis in those arguments.
        min_length: the length is marked dynamic only from here on.
    """
    key = (fn, tuple(args), backend, axis, min_length)
    if key not in _COMPILED:
        compiled = torch.compile(fn, backend=backend, dynamic=None, fullgraph=True)

        def call(*a):
            for i in args:
                x = a[i]
                if isinstance(x, Tensor) and x.shape[axis] >= min_length:
                    torch._dynamo.maybe_mark_dynamic(x, axis)
            return compiled(*a)

        _COMPILED[key] = call
    return _COMPILED[key]


def compile_allowed(x: Tensor) -> bool:
    """Whether a fast path may call a compiled function on ``x`` now: on CUDA, outside Triton's interpreter, outside an
    enclosing ``torch.compile`` trace and outside CUDA-graph capture."""
    if not x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing()


def forget_compiled(backend) -> None:
    """Drop the cached functions compiled with ``backend`` (tests that pass their own backend)."""
    for key in [k for k in _COMPILED if k[2] is backend or k[2] == backend]:
        del _COMPILED[key]
