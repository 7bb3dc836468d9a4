"""Eager calls of our ``torch.library`` custom ops straight to their implementation.

Every kernel op is registered with ``torch.library.custom_op`` so that ``torch.compile``, FakeTensor tracing,
``opcheck`` and CUDA graphs see one opaque node with a fake implementation. In eager mode that registration has a
host cost on every call: the dispatcher boxes the arguments, re-enters Python and, after the call, checks that no
output aliases an input. On the H200 machine (torch 2.11) a small op with seven tensor arguments took 48 µs a call
through the dispatcher against 15 µs straight; under cProfile the dispatcher's Python frame took ~0.27 ms of its own
a call of the fused memory's ops (20-30 tensors each). Where the host is on the critical path (the start of the
forward, the backward's groups) the GPU waits for that time. Together with launching the memory's kernels through
:func:`~.triton_launch.launcher`, skipping it cut the host's time to issue a 16K Titans layer step from 20-27 to
13-16 ms there (docs/results/neural_memory.md, thirty-second session).

:func:`direct` wraps an op so that a call whose arguments are plain tensors, with no autograd graph to record, no
tracing (``torch.compile``, a dispatch mode such as FakeTensor or ``make_fx``) and no functorch transform active,
runs the implementation directly; anything else goes through the op as before. The implementation is the same
function either way, so the results are identical; what is skipped is only the dispatcher's round trip and its
alias check (the ops' own ``opcheck`` tests keep checking that their outputs alias nothing).
``MNEMO_DIRECT_OPS=0`` sends every call through the dispatcher.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def enabled() -> bool:
    """Whether :func:`direct` may skip the dispatcher (env ``MNEMO_DIRECT_OPS``, default on)."""
    return os.environ.get("MNEMO_DIRECT_OPS", "1") != "0"


def _plain(args: tuple, grad: bool) -> bool:
    """Every tensor in ``args`` (or in a list / tuple among them) a plain tensor, none of them requiring grad where
    ``grad`` (grad mode is on)."""
    for a in args:
        if isinstance(a, (list, tuple)):
            if not _plain(tuple(a), grad):
                return False
        elif isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN or (grad and a.requires_grad):
                return False
    return True


def direct(op, setup_context: Callable | None = None, backward: Callable | None = None) -> Callable:
    """``op`` (a ``torch.library.custom_op``), called in eager mode without the dispatcher where that changes nothing
    (see the module). Positional arguments only, as the call sites here pass them; ``.op`` is the op itself.

    ``setup_context``, ``backward``: what the op was given in ``register_autograd``; with them, a call that needs
    autograd runs the implementation inside a ``torch.autograd.Function`` made of the same three functions (the op's
    own autograd node is a C++ wrapper around them too) where no argument is a list or tuple (autograd.Function
    tracks only tensors passed directly); else such a call goes through the op."""
    impl = op._init_fn
    if set(getattr(op, "_backend_fns", {None: None})) - {None}:  # a device kernel registered besides the default
        impl = None
    fn = None
    if impl is not None and setup_context is not None and backward is not None:

        class _Direct(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                out = impl(*args)
                setup_context(ctx, args, out)
                return out

        _Direct.backward = staticmethod(backward)
        _Direct.__name__ = _Direct.__qualname__ = f"Direct_{getattr(impl, '__name__', 'op')}"
        fn = _Direct

    def call(*args):
        if (
            impl is not None
            and enabled()
            and not torch.compiler.is_compiling()
            and not is_in_torch_dispatch_mode()
            and not torch._C._are_functorch_transforms_active()
        ):
            grad = torch.is_grad_enabled()
            if _plain(args, grad):
                return impl(*args)
            # plain tensors, some requiring grad; autograd.Function sees tensors only as direct arguments, not in lists
            if fn is not None and _plain(args, False) and not any(isinstance(a, (list, tuple)) for a in args):
                return fn.apply(*args)
        return op(*args)

    call.op = op
    call.__name__ = getattr(impl, "__name__", "direct")
    call.__doc__ = getattr(op, "__doc__", None)
    return call


__all__ = ["direct", "enabled"]
