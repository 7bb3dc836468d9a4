"""The gate coefficients' Triton kernels (``ops/memory/fused_coefficients.py``), on the CPU through Triton's interpreter,
against :func:`~mnemotorch.ops.memory.chunked.gate_coefficients` in float64: values, gradients (autograd through the
float64 PyTorch form) and the fused path that takes them."""

from __future__ import annotations

import pytest
import torch

from mnemotorch.ops.memory import fused_triton
from mnemotorch.ops.memory.chunked import gate_coefficients
from mnemotorch.ops.memory.fused_coefficients import gate_coefficients_triton, memory_coefficients

from test_memory import rel

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def gates(b: int, n: int, h: int, c: int, seed: int = 0, pad: int = 0):
    """``θ, η, α`` ``[b, n·c, h]`` float64 in the mixer's ranges; ``pad`` > 0: slices of a longer, non-contiguous
    ``[b, (n + 2) c, h, 3]`` tensor (what the layer hands over)."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.rand(b, n * c + 2 * pad, h, 3, generator=g, dtype=torch.float64)
    lo = torch.tensor([0.0, 0.5, 0.0], dtype=torch.float64)
    hi = torch.tensor([0.5, 1.0, 0.1], dtype=torch.float64)
    raw = lo + (hi - lo) * raw
    return [raw[:, pad : pad + n * c, :, i] for i in range(3)]


@pytest.mark.parametrize("b,n,h,c,pad", [(2, 3, 2, 16, 0), (1, 2, 3, 32, 16), (1, 1, 1, 64, 0)])
def test_values_and_gradients_against_float64(b, n, h, c, pad):
    th, et, al = gates(b, n, h, c, pad=pad)
    want = gate_coefficients(th.requires_grad_(), et.requires_grad_(), al.requires_grad_(), c, torch.float64)
    leaves = [x.detach().float().requires_grad_() for x in (th, et, al)]
    got = gate_coefficients_triton(*leaves, c)
    shapes = [(n, b, h, c, c)] * 2 + [(n, b, h, c)] * 3
    assert [tuple(x.shape) for x in got] == shapes and all(x.dtype == torch.float32 for x in got)
    for name, x, y in zip("G N beta m f".split(), got, want):
        assert rel(x.double(), y.detach()) <= 2e-6, name
    g = torch.Generator().manual_seed(1)
    cts = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    # the fused path's cotangents of N and m are zero but for the last row / element: one case of that too
    for drop in (False, True):
        ct = list(cts)
        if drop:
            ct[1] = torch.zeros_like(ct[1])
            ct[1][..., -1, :] = cts[1][..., -1, :]
            ct[3] = torch.zeros_like(ct[3])
            ct[3][..., -1] = cts[3][..., -1]
        dw = torch.autograd.grad(want, (th, et, al), ct, retain_graph=True)
        dg = torch.autograd.grad(got, leaves, [x.float() for x in ct], retain_graph=True)
        for name, x, y in zip(("theta", "eta", "alpha"), dg, dw):
            assert x.dtype == torch.float32 and x.shape == y.shape
            assert rel(x.double(), y) <= 1e-5, (name, drop, rel(x.double(), y))


def test_unused_outputs_have_no_cotangent():
    """Only some coefficients used (autograd passes None for the others): the rest of the gradient as if they were zero."""
    th, et, al = gates(1, 2, 2, 16, seed=3)
    leaves = [x.float().requires_grad_() for x in (th, et, al)]
    g, nm, beta, m, f = gate_coefficients_triton(*leaves, 16)
    got = torch.autograd.grad((g.sum() + 2 * f.sum(),), leaves)
    ref = [x.clone().requires_grad_() for x in (th, et, al)]
    G, _, _, _, F = gate_coefficients(*ref, 16, torch.float64)
    want = torch.autograd.grad((G.sum() + 2 * F.sum(),), ref)
    for x, y in zip(got, want):
        assert rel(x.double(), y) <= 1e-5


def test_bad_arguments():
    th, et, al = (x.float() for x in gates(1, 2, 2, 16))
    with pytest.raises(ValueError, match="power of two >= 16 dividing"):
        memory_coefficients(al, et, th, 24)
    with pytest.raises(ValueError, match="power of two >= 16 dividing"):
        memory_coefficients(al[:, :20], et[:, :20], th[:, :20], 16)
    with pytest.raises(ValueError, match="share one"):
        memory_coefficients(al, et, th[..., :1], 16)


def test_opcheck():
    """``torch.library.opcheck`` on both ops: schema, fake tensors and the registered autograd."""
    th, et, al = (x.float() for x in gates(1, 2, 2, 16, seed=5))
    args = (torch.log1p(-al).requires_grad_(), torch.log(et).requires_grad_(), th.requires_grad_(), 16)
    torch.library.opcheck(memory_coefficients, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_fused_coefficients_takes_the_kernel(monkeypatch):
    """``fused_coefficients`` (what the fused memory op calls) goes through the kernel with fp32 accumulation where it
    may (``COEFFICIENT_KERNEL``), and through the PyTorch form otherwise; both give the same values."""
    calls = []
    from mnemotorch.ops.memory import fused_coefficients as fc

    real = fc._coefficients  # (memory_coefficients, called without the dispatcher in eager mode: ops/eager.py)
    monkeypatch.setattr(fc, "_coefficients", lambda *a: calls.append(1) or real(*a))
    th, et, al = (x.float() for x in gates(1, 2, 2, 16, seed=2))
    got = fused_triton.fused_coefficients(th, et, al, 16, torch.float32)
    assert calls == [1]
    monkeypatch.setattr(fused_triton, "COEFFICIENT_KERNEL", False)
    want = fused_triton.fused_coefficients(th, et, al, 16, torch.float32)
    assert calls == [1]
    for x, y in zip(got, want):
        assert rel(x.double(), y.double()) <= 2e-6
