"""The input path's Triton kernels (``ops/conv_triton.py``: causal depthwise conv, SiLU, per-head ℓ2 norm), on the CPU
through Triton's interpreter, against the PyTorch form (:func:`~mnemotorch.layers.short_conv.conv_silu_qkv`): values,
the new conv window and the gradients of the inputs, the taps and the carried window, in fp32; the ops' registration."""

from __future__ import annotations

import pytest
import torch

from mnemotorch.layers.short_conv import conv_silu_qkv
from mnemotorch.ops.conv_triton import conv_silu_norm_bwd, conv_silu_norm_fwd, conv_silu_qkv_triton


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make(b, t, h, d, k, seed=0, past=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    c = 3 * h * d
    qkv = torch.randn(b, t, c, generator=g, dtype=dtype)
    w = (torch.randn(c, k, generator=g) / k ** 0.5).to(dtype)
    p = torch.randn(b, k - 1, c, generator=g, dtype=dtype) if past else None
    return qkv, w, p


@pytest.mark.parametrize("b,t,h,d,k,past", [(2, 37, 2, 16, 4, True), (1, 64, 1, 32, 4, False), (1, 2, 2, 16, 4, True), (2, 33, 1, 16, 3, True),
                                            (1, 5, 1, 16, 1, False)])  # fmt: skip
def test_values_window_and_gradients_match_the_pytorch_form(b, t, h, d, k, past) -> None:
    qkv, w, p = make(b, t, h, d, k, past=past)
    leaves_ref = [x.clone().requires_grad_() for x in (qkv, w)] + ([p.clone().requires_grad_()] if past else [])
    leaves = [x.clone().requires_grad_() for x in (qkv, w)] + ([p.clone().requires_grad_()] if past else [])
    want = conv_silu_qkv(leaves_ref[0], leaves_ref[1], leaves_ref[2] if past else None, h, d)
    got = conv_silu_qkv_triton(leaves[0], leaves[1], leaves[2] if past else None, h, d)
    for name, x, y in zip(("q", "k", "v", "window"), got, want):
        assert x.shape == y.shape and x.dtype == y.dtype, name
        assert rel(x, y) <= 1e-6, (name, rel(x, y))
    g = torch.Generator().manual_seed(1)
    cot = [torch.randn(x.shape, generator=g) for x in want[:3]]
    gw = torch.autograd.grad(want[:3], leaves_ref, cot)
    gg = torch.autograd.grad(got[:3], leaves, cot)
    for name, x, y in zip(("qkv", "weight", "past"), gg, gw):
        assert rel(x, y) <= 1e-5, (name, rel(x, y))


def test_a_zero_head_takes_the_norms_epsilon_branch() -> None:
    """A head whose SiLU output is exactly 0 (inputs and window 0): ``F.normalize`` divides by ε there, in both forms."""
    qkv, w, p = make(1, 8, 1, 16, 4)
    qkv[:, :, :16] = 0.0
    p[:, :, :16] = 0.0
    a = [x.clone().requires_grad_() for x in (qkv, w, p)]
    r = [x.clone().requires_grad_() for x in (qkv, w, p)]
    got, want = conv_silu_qkv_triton(*a, 1, 16), conv_silu_qkv(*r, 1, 16)
    assert torch.equal(got[0], want[0])
    assert got[0].abs().max() == 0 and got[1].abs().max() > 0  # (the q head is the zero one)
    cot = torch.randn(got[1].shape, generator=torch.Generator().manual_seed(3))
    gg = torch.autograd.grad(got[0].sum() + (got[1] * cot).sum(), a)
    gw = torch.autograd.grad(want[0].sum() + (want[1] * cot).sum(), r)
    for x, y in zip(gg, gw):  # (the zero head's input gradients are ~1e12: 1/ε)
        assert rel(x, y) <= 1e-5


def test_bfloat16_within_rounding_of_the_fp32_form() -> None:
    """In bf16 the kernels keep fp32 inside (eager rounds after every op): within bf16 rounding of the fp32 form."""
    qkv, w, p = make(1, 40, 2, 16, 4)
    want = conv_silu_qkv(qkv, w, p, 2, 16)
    got = conv_silu_qkv_triton(qkv.bfloat16(), w.bfloat16(), p.bfloat16(), 2, 16)
    for x, y in zip(got[:3], want[:3]):
        assert x.dtype == torch.bfloat16 and rel(x.float(), y) <= 1e-2


def test_bad_arguments_raise() -> None:
    qkv, w, p = make(1, 8, 1, 16, 4)
    with pytest.raises(ValueError, match="weight must be"):
        conv_silu_norm_fwd(qkv, w[:-1], p, 16, 32)
    with pytest.raises(ValueError, match="head_dim"):
        conv_silu_norm_fwd(qkv, w, p, 12, 24)


def test_opcheck() -> None:
    qkv, w, p = make(1, 9, 1, 16, 4)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(conv_silu_norm_fwd, (qkv.requires_grad_(), w.requires_grad_(), p, 16, 32), test_utils=tests)
    torch.library.opcheck(conv_silu_norm_bwd, (qkv.detach(), w.detach(), p, torch.randn_like(qkv), 16, 32), test_utils=tests)


def test_the_layer_takes_the_kernels_when_asked(monkeypatch) -> None:
    """``MNEMO_MEMORY_INPUT_KERNEL=1`` with the fused memory (here through the interpreter): the layer's input path runs
    in the kernels, and its output and every gradient equal the layer's with the PyTorch input path (fp32)."""
    from mnemotorch.layers import get_mixer
    from mnemotorch.ops import conv_triton

    calls = []
    real = conv_triton.conv_silu_qkv_triton
    monkeypatch.setattr(conv_triton, "conv_silu_qkv_triton", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    layer = get_mixer("titans_lmm", dim=64, num_heads=4, chunk_size=16, expansion=4, conv_size=4, fused_memory=True)
    x = torch.randn(1, 16 * 2 + 3, 64, requires_grad=True)
    params = [x, *layer.parameters()]
    ct = torch.randn(1, 16 * 2 + 3, 64)
    monkeypatch.delenv("MNEMO_MEMORY_INPUT_KERNEL", raising=False)
    y0, s0 = layer(x)
    want = torch.autograd.grad(y0, params, ct)
    assert calls == []
    monkeypatch.setenv("MNEMO_MEMORY_INPUT_KERNEL", "1")
    y1, s1 = layer(x)
    got = torch.autograd.grad(y1, params, ct)
    assert calls == [1]
    assert rel(y1, y0) <= 1e-5 and rel(s1.conv, s0.conv) == 0
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel(a, b) <= 1e-5, (i, rel(a, b))
