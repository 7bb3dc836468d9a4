"""CUDA checks of the block-sparse kernel's relative-position bias (RelativeBias) against float64
references: outputs and all gradients, the tables' included, in fp32 and bf16; with the fixed launch
and with the autotuner (whose dQ trials must not leave atomically accumulated table gradients behind);
HaloAttention and NA-2D with NAT's rpb through the kernel.

Run on the GPU machine:
    MNEMO_GPU_TESTS=1 python -m pytest -q -p no:cacheprovider tests/gpu/test_block_sparse_bias_gpu.py
"""

from __future__ import annotations

import pytest
import torch

from mnemotorch.ops.block_sparse import (
    block_sparse_attention,
    block_sparse_attention_reference,
    relative_bias_1d,
    sliding_window_pattern,
)

pytestmark = pytest.mark.gpu

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (5e-3, 1e-2)}  # (outputs, gradients), ARCHITECTURE.md


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _check(fn_kernel, fn_ref, inputs, dtype):
    g = torch.Generator().manual_seed(0)
    ins = [t.cuda().to(dtype).requires_grad_() for t in inputs]
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    out = fn_kernel(*ins)
    ref = fn_ref(*ins64)
    go = torch.randn(out.shape, generator=g).cuda()
    grads = torch.autograd.grad(out, ins, go.to(dtype))
    rgrads = torch.autograd.grad(ref, ins64, go.double())
    tol_out, tol_grad = TOL[dtype]
    assert not torch.isnan(out).any() and rel(out, ref) <= tol_out, f"out {rel(out, ref):.2e}"
    for n, (a, b) in enumerate(zip(grads, rgrads)):
        assert not torch.isnan(a).any() and rel(a, b) <= tol_grad, f"grad {n}: {rel(a, b):.2e}"


@pytest.mark.parametrize("autotune", ["off", "small"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("table_kind", ["head", "query"])
def test_sliding_window_1d_bias(dtype, autotune, table_kind) -> None:
    from mnemotorch.ops.block_sparse import triton as bs_triton

    L, W, H, HKV, D = 1000, 300, 4, 2, 64
    pat = sliding_window_pattern(L, W, device="cuda")
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, L, H, D, generator=g)
    k, v = (torch.randn(2, L, HKV, D, generator=g) for _ in range(2))
    table = torch.randn(H, 257, generator=g) if table_kind == "head" else torch.randn(2, L, H, 257, generator=g)

    def bias(t):
        return relative_bias_1d(t, L, min_offset=-256)  # causal: offsets -256..0 own entries, farther share entry 0

    mode = bs_triton._AUTOTUNE_MODE
    bs_triton.set_autotune(autotune)
    try:
        _check(
            lambda q, k, v, t: block_sparse_attention(q, k, v, pat, backend="triton", bias=bias(t)),
            lambda q, k, v, t: block_sparse_attention_reference(q, k, v, pat, bias=bias(t)),
            [q, k, v, table],
            dtype,
        )
    finally:
        bs_triton.set_autotune(mode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_halo_kernel_relative_logits(dtype) -> None:
    from mnemotorch.layers.vision import halo_attention, halo_attention_reference

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 32, 32, 4, 32, generator=g) for _ in range(3))
    rh, rw = (torch.randn(21, 32, generator=g) * 0.2 for _ in range(2))
    _check(
        lambda q, k, v, rh, rw: halo_attention(q, k, v, 8, 3, rh, rw, backend="triton"),
        lambda q, k, v, rh, rw: halo_attention_reference(q, k, v, 8, 3, rh, rw),
        [q, k, v, rh, rw],
        dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_na2d_kernel_rpb(dtype) -> None:
    from mnemotorch.layers.vision import na2d, na2d_reference

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 32, 32, 4, 32, generator=g) for _ in range(3))
    rpb = torch.randn(4, 13, 13, generator=g)
    _check(
        lambda q, k, v, r: na2d(q, k, v, 7, (1, 2), rpb=r, backend="triton", tile_shape=(8, 16)),
        lambda q, k, v, r: na2d_reference(q, k, v, 7, (1, 2), rpb=r),
        [q, k, v, rpb],
        dtype,
    )
