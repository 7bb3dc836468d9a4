"""The launch cache on the GPU (ops/triton_launch.py): a cached launch gives bit-identical results to
the normal launch path, for the NA-2D and NA-1D / sliding-window kernels, forward and backward."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and os.environ.get("MNEMO_GPU_TESTS") == "1"),
                                reason="needs a CUDA device and MNEMO_GPU_TESTS=1")


def _run(fn, q, k, v, go):
    out = fn(q, k, v)
    return [out.detach().clone(), *(g.clone() for g in torch.autograd.grad(out, (q, k, v), go))]


@pytest.mark.parametrize("case", ["na2d", "na1d", "swa"])
def test_cached_launch_equals_normal_launch(case, monkeypatch):
    from mnemotorch.ops.block_sparse import na2d_triton, swa_triton
    from mnemotorch.ops.block_sparse.na2d_triton import na2d_attention_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    if case == "na2d":
        shape, heads, d = (48, 40), 4, 64
        fn = lambda q, k, v: na2d_attention_triton(q, k, v, shape, (7, 5))  # noqa: E731
        launchers = (na2d_triton._FWD, na2d_triton._DQ, na2d_triton._DKDV)
        n = shape[0] * shape[1]
    else:
        n, heads, d = 3000, 2, 128
        fn = (lambda q, k, v: swa_triton.na1d_attention_triton(q, k, v, 257, d**-0.5)) if case == "na1d" else \
            (lambda q, k, v: swa_triton.swa_attention_triton(q, k, v, 300, d**-0.5))
        launchers = (swa_triton._FWD, swa_triton._DQ, swa_triton._DKDV)
    q, k, v = (torch.randn(2, n, heads, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3))
    go = torch.randn_like(q)
    monkeypatch.setenv("MNEMO_LAUNCH_CACHE", "0")
    normal = _run(fn, q, k, v, go)
    monkeypatch.setenv("MNEMO_LAUNCH_CACHE", "1")
    hits = sum(x.hits for x in launchers)
    _run(fn, q, k, v, go)  # fills the cache
    cached = _run(fn, q, k, v, go)
    assert sum(x.hits for x in launchers) > hits, "no launch went through the cache"
    for a, b in zip(normal, cached):
        assert torch.equal(a, b)
