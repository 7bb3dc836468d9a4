"""Titans MAC / MAG / MAL on a real GPU against the same mixer in float64 on the CPU.

MAG's prefill runs the block-sparse Triton kernel (sink-window pattern) on CUDA; the CPU float64
run uses masked SDPA, checked against the paper's token loop in tests/layers/test_titans_variants.py.

Run on the GPU machine: ``MNEMO_GPU_TESTS=1 python -m pytest -q -p no:cacheprovider tests/gpu/test_titans_variants_gpu.py``
"""

from __future__ import annotations

import pytest
import torch

from mnemotorch.layers import get_mixer
from mnemotorch.layers.titans_variants import prefix_window_attention

pytestmark = pytest.mark.gpu

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (5e-3, 1e-2)}  # (outputs, gradients): ARCHITECTURE.md


def rel(a, b):
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefix_window_kernel_vs_float64(dtype):
    torch.manual_seed(0)
    b, t, h, d, n_p, w = 2, 1000, 4, 64, 4, 128
    q = torch.randn(b, t, h, d, dtype=torch.float64)
    k, v = (torch.randn(b, n_p + t, h, d, dtype=torch.float64) for _ in range(2))
    ref_in = [x.clone().requires_grad_(True) for x in (q, k, v)]
    ref = prefix_window_attention(*ref_in, n_p, w, backend="reference")
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out)
    gpu_in = [x.to("cuda", dtype).requires_grad_(True) for x in (q, k, v)]
    out = prefix_window_attention(*gpu_in, n_p, w, backend="auto")  # the kernel on CUDA
    grads = torch.autograd.grad(out, gpu_in, grad_out.to("cuda", dtype))
    tol_out, tol_grad = TOL[dtype]
    assert rel(out, ref) <= tol_out
    for g, rg in zip(grads, ref_grads):
        assert rel(g, rg) <= tol_grad


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("titans_mac", {"segment_size": 64, "chunk_size": 16}),
        ("titans_mag", {"window": 64, "chunk_size": 16}),
        ("titans_mal", {"window": 64, "chunk_size": 16}),
    ],
)
def test_mixer_cuda_fp32_vs_cpu_float64(name, kwargs):
    torch.manual_seed(0)
    m = get_mixer(name, dim=128, num_heads=4, depth=2, expansion=2, **kwargs).double()
    x = torch.randn(2, 300, 128, dtype=torch.float64, requires_grad=True)
    ref, _ = m(x)
    w = torch.randn_like(ref)
    (ref_gx,) = torch.autograd.grad((ref * w).sum(), x)
    mc = m.float().cuda()
    xc = x.detach().float().cuda().requires_grad_(True)
    out, _ = mc(xc)
    (gx,) = torch.autograd.grad((out * w.float().cuda()).sum(), xc)
    assert rel(out, ref) <= 1e-5
    assert rel(gx, ref_gx) <= 1e-5
    # Decoding after a prefill on the GPU equals the whole-sequence pass.
    with torch.no_grad():
        y1, st = mc(xc[:, :257])
        y2, st = mc(xc[:, 257:258], st)
    assert rel(torch.cat([y1, y2], 1), out[:, :258].detach()) <= 1e-5
