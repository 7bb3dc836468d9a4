"""2-D neighborhood attention through the list-free kernels (ops/block_sparse/na2d_triton.py) on a
real GPU: output and every gradient against a float64 reference under the dense NATTEN 2-D mask
(tolerances of ARCHITECTURE.md) at a few grids, the issue's case (128 x 128, 13 x 13, D = 64,
H = 16, bf16) among them, GQA, D 64 / 128, bf16 / fp32; and the layer's dispatch
(``layers.vision.na2d``, ``MNEMO_NA2D_KERNEL`` fast vs off: the generic list kernel on tokens
permuted into tiles) on the same inputs. Written without a GPU at hand: not yet run.

    MNEMO_GPU_TESTS=1 python -m pytest -q -p no:cacheprovider tests/gpu/test_na2d_gpu.py
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.gpu
if os.environ.get("MNEMO_GPU_TESTS") != "1" or not torch.cuda.is_available():  # pragma: no cover
    pytest.skip("GPU checks: set MNEMO_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

from mnemotorch.layers.vision import na2d  # noqa: E402
from mnemotorch.ops.block_sparse import na2d_triton  # noqa: E402

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (5e-3, 1e-2)}  # (outputs, gradients)


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _mask(shape, ks) -> torch.Tensor:
    (rows, cols), (kr, kc) = shape, ks
    i = torch.arange(rows * cols, device="cuda")
    r, c = i // cols, i % cols
    sr, sc = (r - kr // 2).clamp(0, rows - kr), (c - kc // 2).clamp(0, cols - kc)
    return ((r[None, :] >= sr[:, None]) & (r[None, :] < sr[:, None] + kr)
            & (c[None, :] >= sc[:, None]) & (c[None, :] < sc[:, None] + kc))


def _reference(q, k, v, go, shape, ks, chunk_heads: int = 2):
    """float64 output and gradients, a few query heads at a time (the issue's case has 16K x 16K
    scores per head: 2 GiB in float64), each chunk's graph freed before the next."""
    h, hkv = q.shape[2], k.shape[2]
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    qd, kd, vd = leaves
    mask = _mask(shape, ks)
    outs, grads = [], [torch.zeros_like(t) for t in leaves]
    for h0 in range(0, h, chunk_heads):
        sl = slice(h0, h0 + chunk_heads)
        kv_heads = torch.arange(h0, min(h0 + chunk_heads, h), device="cuda") // (h // hkv)
        s = torch.einsum("bihd,bjhd->bhij", qd[:, :, sl], kd[:, :, kv_heads]) * q.shape[-1] ** -0.5
        s = s.masked_fill(~mask, float("-inf"))
        out = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), vd[:, :, kv_heads])
        for acc, g in zip(grads, torch.autograd.grad(out, leaves, go[:, :, sl].double())):
            acc += g
        outs.append(out.detach())
        del s, out
    return (torch.cat(outs, 2), *grads)


def _inputs(shape, h, hkv, d, dtype, b=1, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    n = shape[0] * shape[1]
    q = torch.randn(b, n, h, d, device="cuda", generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(b, n, hkv, d, device="cuda", generator=g).to(dtype).requires_grad_() for _ in range(2))
    go = torch.randn(b, n, h, d, device="cuda", generator=g).to(dtype)
    return q, k, v, go


CASES = [
    # shape, kernel, h, hkv, d, dtype
    ((128, 128), (13, 13), 16, 16, 64, torch.bfloat16),   # the case
    ((128, 128), (13, 13), 4, 2, 64, torch.float32),
    ((64, 96), (7, 12), 4, 2, 128, torch.bfloat16),
    ((64, 96), (7, 12), 4, 2, 128, torch.float32),
    ((37, 53), (37, 4), 2, 1, 64, torch.bfloat16),        # full height, even width, odd grid
    ((30, 41), (1, 9), 2, 2, 32, torch.float32),          # kernel 1 on the rows, D = 32
]


@pytest.mark.parametrize("shape,ks,h,hkv,d,dtype", CASES)
def test_na2d_kernel_matches_reference(shape, ks, h, hkv, d, dtype) -> None:
    q, k, v, go = _inputs(shape, h, hkv, d, dtype)
    out = na2d_triton.na2d_attention_triton(q, k, v, shape, ks, d**-0.5)
    grads = torch.autograd.grad(out, (q, k, v), go)
    ref = _reference(q, k, v, go, shape, ks)
    tol_out, tol_grad = TOL[dtype]
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert rel(out, ref[0]) <= tol_out, f"out {rel(out, ref[0]):.2e}"
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref[1:]):
        assert rel(g, r) <= tol_grad, f"{name} {rel(g, r):.2e}"


@pytest.mark.parametrize("launch", [dict(fwd=dict(QR=8, QC=8), dq=dict(QR=8, QC=8)),
                                    dict(fwd=dict(KTR=4, KTC=32, warps=8), dkdv=dict(QR=4, QC=16, KTR=2, KTC=32))],
                         ids=["8x8-queries", "4x32-keys"])
def test_launch_variants_match_reference(launch) -> None:
    """Two of the diag sweep's variants at the issue's shape (fewer heads)."""
    shape, ks = (128, 128), (13, 13)
    q, k, v, go = _inputs(shape, 4, 4, 64, torch.bfloat16, seed=2)
    with na2d_triton.override_launch(**launch):
        out = na2d_triton.na2d_attention_triton(q, k, v, shape, ks, 0.125)
        grads = torch.autograd.grad(out, (q, k, v), go)
    ref = _reference(q, k, v, go, shape, ks)
    assert rel(out, ref[0]) <= 5e-3
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref[1:]):
        assert rel(g, r) <= 1e-2, name


@pytest.fixture
def _fixed_generic_launch():
    """The generic kernel with its fixed launch (its autotuner would take minutes here)."""
    from mnemotorch.ops.block_sparse import triton as bs_triton

    before = bs_triton._AUTOTUNE_MODE
    bs_triton.set_autotune("off")
    yield
    bs_triton.set_autotune(before)


def test_layer_dispatch_fast_equals_off(monkeypatch, _fixed_generic_launch) -> None:
    """``na2d(..., backend="triton")`` on ``[B, H, W, heads, D]``: list-free kernels (fast) vs the
    generic list kernel on 8 x 16-tile-permuted tokens (off), B = 2."""
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(2, 64, 80, 4, 64, device="cuda", generator=g).bfloat16().requires_grad_() for _ in range(3))
    go = torch.randn(2, 64, 80, 4, 64, device="cuda", generator=g).bfloat16()
    res = {}
    for mode in ("off", "fast"):
        monkeypatch.setenv("MNEMO_NA2D_KERNEL", mode)
        out = na2d(q, k, v, (13, 11), backend="triton")
        res[mode] = (out, *torch.autograd.grad(out, (q, k, v), go))
    for name, a, b in zip(("out", "dq", "dk", "dv"), res["fast"], res["off"]):
        assert rel(a, b) <= (5e-3 if name == "out" else 1e-2), name
