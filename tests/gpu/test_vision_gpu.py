"""CUDA checks of the 2-D attention modules: NA-2D through the Triton block-sparse kernel (with the
tile permutation) against the float64 dense reference, in fp32 and bf16; HaloAttention on CUDA.

Run on the GPU machine:  MNEMO_GPU_TESTS=1 python -m pytest -q -p no:cacheprovider tests/gpu/test_vision_gpu.py
"""

from __future__ import annotations

import copy

import pytest
import torch

from mnemotorch.layers import HaloAttention, NeighborhoodAttention2D
from mnemotorch.layers.vision import halo_attention, halo_attention_reference, na2d, na2d_reference

pytestmark = pytest.mark.gpu

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (5e-3, 1e-2)}  # (outputs, gradients), ARCHITECTURE.md


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


CASES = [
    # (H, W), kernel, dilation, stride, causal, tile
    ((32, 32), (7, 7), (1, 1), (1, 1), (False, False), (8, 16)),
    ((32, 32), (5, 7), (2, 3), (1, 1), (False, False), (8, 16)),
    ((24, 40), (7, 5), (1, 2), (2, 5), (False, False), (8, 8)),
    ((32, 32), (7, 7), (1, 1), (1, 1), (True, True), (8, 16)),
    ((30, 20), (9, 5), (3, 1), (1, 1), (False, True), (8, 16)),  # map not a multiple of the tile
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,ks,ds,ss,cs,tile", CASES)
def test_na2d_triton_matches_reference(shape, ks, ds, ss, cs, tile, dtype) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, *shape, 4, 32, generator=g).cuda().to(dtype).requires_grad_() for _ in range(3))
    out = na2d(q, k, v, ks, ds, ss, cs, backend="triton", tile_shape=tile)
    go = torch.randn(out.shape, generator=g).cuda()
    grads = torch.autograd.grad(out, (q, k, v), go.to(dtype))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = na2d_reference(qd, kd, vd, ks, ds, ss, cs)
    rgrads = torch.autograd.grad(ref, (qd, kd, vd), go.double())
    tol_out, tol_grad = TOL[dtype]
    assert not torch.isnan(out).any() and rel(out, ref) <= tol_out
    for name, a, b in zip("qkv", grads, rgrads):
        assert rel(a, b) <= tol_grad, f"d{name}"


def test_na2d_module_auto_uses_kernel_and_matches_float64() -> None:
    torch.manual_seed(0)
    m64 = NeighborhoodAttention2D(128, 4, kernel_size=7, dilation=(1, 2)).double()
    mg = copy.deepcopy(m64).float().cuda()
    x = torch.randn(2, 32, 32, 128, dtype=torch.float64)
    assert rel(mg(x.float().cuda()).cpu(), m64(x)) <= 1e-5  # auto -> Triton (head_dim 32, fp32, CUDA)
    mg.backend = "gather"
    assert rel(mg(x.float().cuda()).cpu(), m64(x)) <= 1e-5


def test_halo_cuda_matches_float64() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 32, 32, 4, 32, generator=g, dtype=torch.float64) for _ in range(3))
    rh, rw = (torch.randn(2 * (8 + 3) - 1, 32, generator=g, dtype=torch.float64) for _ in range(2))
    for mask_padding in (True, False):
        ref = halo_attention_reference(q.cuda(), k.cuda(), v.cuda(), 8, 3, rh.cuda(), rw.cuda(), mask_padding)
        qf, kf, vf, rhf, rwf = (t.float().cuda() for t in (q, k, v, rh, rw))
        out = halo_attention(qf, kf, vf, 8, 3, rhf, rwf, mask_padding)
        assert rel(out, ref) <= 1e-5
    m64 = HaloAttention(128, 4, block_size=8, halo_size=3).double()
    mg = copy.deepcopy(m64).float().cuda()
    x = torch.randn(2, 32, 32, 128, dtype=torch.float64)
    assert rel(mg(x.float().cuda()).cpu(), m64(x)) <= 1e-5
