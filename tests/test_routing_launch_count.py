"""How many device launches one training call of the routing layer makes (issue #7), counted on the CPU.

Graphed, the layer's forward + backward on the H100 is GPU work only, and most of that work is small
kernels around the attention (the per-kernel profile in docs/results/profile_2026-11-26_h100_na1d_routing.json).
This test counts them: every aten op that would launch a kernel on CUDA (views, allocations, and ops on
empty tensors launch none) plus every Triton launch, for one call of the benchmark's layer (shared Q/K,
no local heads, causal-exact mode, the block-sparse path with the kernels' layout builder and the fused
glue -- the CUDA defaults, here under the Triton interpreter) at a toy size, in the benchmark's protocol:

* ``forward``: a training-mode forward, the commitment loss claimed and dropped, and the k-means
  statistics of the call folded (``_flush_raw``), as ``mnemo bench routed`` does per step;
* ``forward+backward``: the same with ``torch.autograd.grad`` of the output (the benchmark's step);
* ``training step``: forward, and the backward of the output plus the commitment loss (a real training
  step's layer work; the optimizer and ``update_centroids`` are per step, not per call, and left out).

The counts are upper bounds: a change that adds launches fails here and must say why. The listings
(``python tests/test_routing_launch_count.py``) show where each launch comes from.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mnemotorch.layers.routing as routing_layer
import mnemotorch.ops.block_sparse.triton as bs_triton
import mnemotorch.ops.routing.block_sparse as bs
from mnemotorch.layers import get_mixer

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (tests/conftest.py)")

#: aten ops that launch nothing on CUDA: allocations and storage bookkeeping (views are told by ``is_view``)
_NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "set_", "_to_copy_noop", "detach",
              "lift_fresh", "_reshape_alias", "_unsafe_view", "view", "alias", "_local_scalar_dense"}


def _launches_of(out) -> bool:
    """Whether an op's result needs a kernel: an op whose outputs are all empty launches none."""
    ts = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]
    return not ts or any(t.numel() > 0 for t in ts)


class LaunchLog(TorchDispatchMode):
    """Records ``(kind, name)`` of every launch: ``("aten", op)`` for kernel-launching aten ops, ``("triton",
    kernel)`` for Triton kernels (the aten ops the interpreter itself runs inside a launch are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, str]] = []
        self._inside = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not self._inside and func.namespace == "aten" and not func.is_view and name not in _NO_LAUNCH and _launches_of(out):
            self.log.append(("aten", str(func.overloadpacket)))
        return out


@contextlib.contextmanager
def counting():
    """Context yielding a :class:`LaunchLog` that records the aten ops and Triton launches inside it."""
    from triton.runtime.interpreter import InterpretedFunction

    mode = LaunchLog()
    run = InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        mode.log.append(("triton", self.__name__))
        mode._inside += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            mode._inside -= 1

    InterpretedFunction.run = counted_run
    try:
        with mode:
            yield mode
    finally:
        InterpretedFunction.run = run


def _benchmark_layer():
    """The benchmark's layer at toy size: bf16, shared Q/K, causal-exact, no local heads, 4 clusters of ~64 tokens."""
    torch.manual_seed(0)
    m = get_mixer("routing", dim=64, num_heads=4, num_clusters=4, shared_qk=True, local_heads=0, backend="block_sparse")
    m = m.to(torch.bfloat16).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 256, 64, generator=g).to(torch.bfloat16).requires_grad_()
    go = torch.randn(1, 256, 64, generator=g).to(torch.bfloat16)
    return m, x, go


def _clear(m) -> None:
    m._pending_raw = m._pending_sums = m._pending_counts = m._pending_loss = None


def count_call(part: str) -> list[tuple[str, str]]:
    """The launches of one call of the benchmark layer (``part``: ``"forward"``, ``"forward+backward"`` or
    ``"training step"``), after a warm-up call (caches of the RoPE tables and mask tiles filled)."""
    m, x, go = _benchmark_layer()
    params = [x, *m.parameters()]

    def call():
        _clear(m)
        if part == "forward":
            y, _ = m(x)
            m.routing_aux_loss()
            m._flush_raw()
            return
        y, _ = m(x)
        aux = m.routing_aux_loss()
        m._flush_raw()
        if part == "forward+backward":
            torch.autograd.grad(y, params, go)
        else:
            torch.autograd.grad([y, aux], params, [go, torch.ones_like(aux)])

    call()
    with counting() as log:
        call()
    return log.log


@pytest.fixture
def cuda_path(monkeypatch):
    """The CUDA code path as far as the CPU can take it: the fused glue, the kernels' layout builder, no NaN
    poisoning of kernel outputs (a test-only fill)."""
    monkeypatch.setattr(routing_layer, "FUSED_GLUE", "on")
    monkeypatch.setattr(bs, "routed_layout", functools.partial(bs.routed_layout, impl="triton"))
    monkeypatch.setenv("MNEMO_POISON", "0")


def test_the_counter_counts() -> None:
    """Launching ops, Triton launches and nothing else (else the bounds below could pass vacuously)."""
    from mnemotorch.ops.routing.triton import nearest_centroid_triton

    x = torch.randn(4, 3, 2, 16)
    mu = torch.randn(2, 3, 16)
    with counting() as log:
        y = x * 2  # 1 launch
        z = y.view(-1).reshape(4, 6, 16)[:, 1:]  # views: none
        w = torch.empty(5)  # an allocation: none
        torch.zeros(0) + 1  # an empty tensor: none
        nearest_centroid_triton(x, mu)  # 1 Triton launch
        z.sum()  # 1
    assert log.log == [("aten", "aten.mul"), ("triton", "_nearest_centroid_kernel"), ("aten", "aten.sum")], log.log
    del w


#: upper bounds of the launches per call (shared Q/K benchmark layer, see the module docstring); lower
#: them when a change removes launches, and raise them only with a reason. Before the glue cut of
#: 2026-11-27 (commit f1dad5e): 30 / 52 / 68 -- RoPE as five elementwise launches (about seven in its
#: backward), the k-means statistics folded by the next call (layer norm, cast, two zero-fills, two
#: scatter-adds), the commitment loss's backward as ~15 autograd launches (layer norm again, gather, its
#: backward), the shared-Q/K query and key gradients added before the unpacking gather. Of the 34 left in
#: the forward + backward: 9 matmuls (projections), the attention's 4 kernels, 9 of layout and packing,
#: 2 zero-filled gradients of the attention op's unused outputs (lse, rounding residual: ops/block_sparse).
#: Then 33 / 36: the attention backward's Delta pass went into its dQ kernel (bs_triton.DELTA_IN_DQ; with
#: MNEMO_BS_DELTA=preprocess the old order and one launch more are allowed).
BOUNDS = {"forward": 19, "forward+backward": 33, "training step": 36}
#: aten ops the fused path must not run any more (each was a slow or avoidable kernel in the 8K profile)
GONE = {"aten.native_layer_norm", "aten.native_layer_norm_backward", "aten.cat", "aten.scatter_add_", "aten.neg",
        "aten.slice_backward", "aten.index", "aten.pow", "aten.mean"}


@pytest.mark.parametrize("part", list(BOUNDS))
def test_launches_per_call(cuda_path, part: str) -> None:
    log = count_call(part)
    listing = "\n".join(f"  {k} {n}" for k, n in log)
    bound = BOUNDS[part] + (part != "forward" and not bs_triton.DELTA_IN_DQ)
    assert len(log) <= bound, f"{part}: {len(log)} launches > {bound}:\n{listing}"
    back = sorted({n for k, n in log if n in GONE})
    assert not back, f"{part}: {back} are back in the fused path:\n{listing}"


def test_the_fused_glue_is_the_path_counted(cuda_path) -> None:
    """The counted call runs the kernels it is meant to (else a fallback could pass the bounds)."""
    names = [n for k, n in count_call("training step") if k == "triton"]
    for kernel in ("_route_assign_kernel", "_rotary_kernel", "_rotary_commit_bwd_kernel", "_pack_kernel", "_unpack_kernel",
                   "_fwd_kernel", "_bwd_dq_kernel", "_rows_kernel"):
        assert kernel in names, kernel
    # the rotation's forward; its backward and the commitment loss's in one kernel
    assert names.count("_rotary_kernel") == 1 and names.count("_rotary_commit_bwd_kernel") == 1
    assert "_route_commit_bwd_kernel" not in names


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    routing_layer.FUSED_GLUE = "on"
    bs.routed_layout = functools.partial(bs.routed_layout, impl="triton")
    os.environ["MNEMO_POISON"] = "0"
    for part in BOUNDS:
        log = count_call(part)
        print(f"== {part}: {len(log)} launches ({sum(k == 'triton' for k, _ in log)} Triton)")
        if "-v" in sys.argv:
            for k, n in log:
                print(f"   {k:6s} {n}")
        else:
            for (k, n), c in collections.Counter(log).most_common():
                print(f"   {c:3d} x {k:6s} {n}")
