"""1-D neighborhood attention through the list-free kernels' NA1D mode (ops/block_sparse/swa_triton.py)
on a real GPU: L = 4096, K in {2, 1023, 2048}, D in {64, 128}, bf16 and fp32, GQA (H = 4, Hkv = 2);
output and every gradient against a float64 reference under the dense NATTEN mask (tolerances of
ARCHITECTURE.md), and the dispatch from ``block_sparse_attention`` with ``MNEMO_NA1D_KERNEL=fast``
against the generic list kernel on the same inputs. Written without a GPU at hand: not yet run.

    MNEMO_GPU_TESTS=1 python -m pytest -q -p no:cacheprovider tests/gpu/test_na1d_gpu.py
"""

from __future__ import annotations

import os

import pytest
import torch

from mnemotorch.ops.block_sparse import block_sparse_attention, neighborhood_pattern_1d

pytestmark = pytest.mark.gpu
if os.environ.get("MNEMO_GPU_TESTS") != "1" or not torch.cuda.is_available():  # pragma: no cover
    pytest.skip("GPU checks: set MNEMO_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

from mnemotorch.ops.block_sparse import swa_triton  # noqa: E402

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (5e-3, 1e-2)}  # (outputs, gradients)
L, H, HKV = 4096, 4, 2


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _mask(ks: int) -> torch.Tensor:
    i = torch.arange(L, device="cuda")
    st = (i - ks // 2).clamp(0, L - ks)
    return (i[None, :] >= st[:, None]) & (i[None, :] < st[:, None] + ks)


def _reference(q, k, v, go, ks):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    qd, kd, vd = leaves
    kd, vd = kd.repeat_interleave(H // HKV, dim=2), vd.repeat_interleave(H // HKV, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", qd, kd) * q.shape[-1] ** -0.5
    s = s.masked_fill(~_mask(ks), float("-inf"))
    out = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), vd)
    return (out.detach(), *torch.autograd.grad(out, leaves, go.double()))


def _inputs(d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, L, H, d, device="cuda", generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(1, L, HKV, d, device="cuda", generator=g).to(dtype).requires_grad_() for _ in range(2))
    go = torch.randn(1, L, H, d, device="cuda", generator=g).to(dtype)
    return q, k, v, go


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("ks", [2, 1023, 2048])
def test_na1d_matches_reference(ks, d, dtype) -> None:
    q, k, v, go = _inputs(d, dtype)
    out = swa_triton.na1d_attention_triton(q, k, v, ks, d**-0.5)
    grads = torch.autograd.grad(out, (q, k, v), go)
    ref = _reference(q, k, v, go, ks)
    tol_out, tol_grad = TOL[dtype]
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert rel(out, ref[0]) <= tol_out, f"out {rel(out, ref[0]):.2e}"
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref[1:]):
        assert rel(g, r) <= tol_grad, f"{name} {rel(g, r):.2e}"


@pytest.fixture
def _fixed_generic_launch():
    """The generic kernel with its fixed launch (its autotuner would take minutes here)."""
    from mnemotorch.ops.block_sparse import triton as bs_triton

    before = bs_triton._AUTOTUNE_MODE
    bs_triton.set_autotune("off")
    yield
    bs_triton.set_autotune(before)


def test_dispatch_equals_the_generic_kernel(monkeypatch, _fixed_generic_launch) -> None:
    q, k, v, go = _inputs(128, torch.bfloat16, seed=1)
    pat = neighborhood_pattern_1d(L, 1024, device="cuda")
    res = {}
    for mode in ("off", "fast"):
        monkeypatch.setenv("MNEMO_NA1D_KERNEL", mode)
        out = block_sparse_attention(q, k, v, pat, backend="triton")
        res[mode] = (out, *torch.autograd.grad(out, (q, k, v), go))
    for name, a, b in zip(("out", "dq", "dk", "dv"), res["fast"], res["off"]):
        assert rel(a, b) <= (5e-3 if name == "out" else 1e-2), name
