"""The host path of the block-sparse kernels: no hidden copies, no per-call re-derivation, and the
eager fast path (a plain autograd.Function) computing exactly what the custom ops compute.

At small and medium sizes the Python work around the kernels (dispatch, conversions, copies) cost
more than the kernels on an H100 (issue #4); these tests pin what was cut. Kernels run through
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) at tiny sizes.
"""

from __future__ import annotations

import os

import pytest
import torch

from mnemotorch.ops.block_sparse import (
    block_sparse_attention,
    block_sparse_attention_reference,
    neighborhood_pattern,
    relative_bias_1d,
    sliding_window_pattern,
)
from mnemotorch.ops.block_sparse import triton as bs_triton

DEVICE = "cuda" if os.environ.get("MNEMO_GPU_TESTS") == "1" and torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py) or a GPU", allow_module_level=True)


@pytest.fixture(autouse=True)
def _generic_kernel(monkeypatch):
    """This file tests the generic list-walking kernel: keep sliding windows on it on a GPU too (on
    CUDA they would take the list-free path, tests/ops/test_swa_kernel.py)."""
    monkeypatch.setenv("MNEMO_SWA_KERNEL", "lists")


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


class _Recorder:
    """Stands in for ``_launch``: records the tensors each kernel would get, runs nothing."""

    def __init__(self):
        self.calls = []

    def __call__(self, kernel, sliced, rows, grid, args, meta, device):
        self.calls.append((kernel, args))


def test_kernels_get_the_callers_memory_no_copies(monkeypatch) -> None:
    """Strided q/k/v (unit last stride) and the pattern's bool tiles reach the kernel as they are."""
    rec = _Recorder()
    monkeypatch.setattr(bs_triton, "_launch", rec)
    pat = sliding_window_pattern(48, 20, q_block=16, k_block=16).to(DEVICE)
    base = randn(1, 48, 4, 16)
    q = base[:, :, 1:3]  # a head slice: not contiguous
    kv = randn(1, 2, 48, 16, seed=1).transpose(1, 2)  # [B, H, L, D] seen as [B, L, H, D]
    assert not q.is_contiguous() and not kv.is_contiguous()
    with torch.no_grad():
        block_sparse_attention(q, kv, kv, pat, backend="triton")
    (kernel, args), = rec.calls
    assert kernel is bs_triton._fwd_kernel
    assert args[0].data_ptr() == q.data_ptr() and args[0].stride() == q.stride()
    assert args[1].data_ptr() == kv.data_ptr() and args[1].stride() == kv.stride()
    tiles = args[11]  # q k v o lse o_lo, then the 6 list tensors
    assert pat.tiles.dtype == torch.bool
    assert tiles.dtype == torch.int8 and tiles.data_ptr() == pat.tiles.data_ptr(), "the tiles were copied"


def test_strided_inputs_match_the_reference() -> None:
    """The same strided views through the real kernels (forward and every gradient)."""
    pat = sliding_window_pattern(40, 13, q_block=16, k_block=16).to(DEVICE)
    qb = randn(2, 40, 4, 16).requires_grad_()
    kb = randn(2, 2, 40, 16, seed=1).requires_grad_()
    vb = randn(2, 40, 2, 32, seed=2).requires_grad_()
    q, k, v = qb[:, :, ::2], kb.transpose(1, 2), vb[..., 8:24]
    out = block_sparse_attention(q, k, v, pat, backend="triton")
    go = randn(*out.shape, seed=3).transpose(0, 1).contiguous().transpose(0, 1)  # a strided grad too
    grads = torch.autograd.grad(out, (qb, kb, vb), go)
    leaves = [t.detach().double().requires_grad_() for t in (qb, kb, vb)]
    ref = block_sparse_attention_reference(leaves[0][:, :, ::2], leaves[1].transpose(1, 2), leaves[2][..., 8:24], pat)
    rgrads = torch.autograd.grad(ref, leaves, go.double())
    assert rel(out, ref) <= 1e-5
    for name, g, r in zip("qkv", grads, rgrads):
        assert rel(g, r) <= 1e-5, f"d{name}"


def test_pattern_moved_to_another_device_once() -> None:
    pat = neighborhood_pattern((64,), 9, q_block=16, k_block=16).pattern
    a = pat.on_device("meta")
    assert a.full_idx.device.type == "meta" and pat.full_idx.device.type == "cpu"
    assert pat.on_device(torch.device("meta")) is a, "moved again"
    assert pat.to("meta") is not a  # to() stays a plain copy
    pat.part_cnt = pat.part_cnt.clone()  # a replaced field: the cached copy is stale
    assert pat.on_device("meta") is not a


@pytest.mark.parametrize("with_bias", [False, True])
def test_eager_path_equals_the_custom_ops(monkeypatch, with_bias) -> None:
    """Eager calls skip the custom ops' dispatch; the results (output and every gradient, bias
    tables' included) are bitwise those of the custom-op path that torch.compile traces."""
    pat = sliding_window_pattern(40, 17, q_block=16, k_block=16).to(DEVICE)
    table = randn(2, 12, seed=5)

    def run():
        ins = [randn(1, 40, 2, 16, seed=s).requires_grad_() for s in range(3)] + [table.clone().requires_grad_()]
        bias = relative_bias_1d(ins[3], 40, min_offset=-11) if with_bias else None
        out = block_sparse_attention(*ins[:3], pat, backend="triton", bias=bias)
        grads = torch.autograd.grad(out, ins[: 4 if with_bias else 3], randn(*out.shape, seed=9))
        return [out, *grads]

    custom = bs_triton.block_sparse_attn_bias_fwd if with_bias else bs_triton.block_sparse_attn_fwd
    name = "block_sparse_attn_bias_fwd" if with_bias else "block_sparse_attn_fwd"
    calls = []
    monkeypatch.setattr(bs_triton, name, lambda *a: calls.append(1) or custom(*a))
    eager = run()
    assert not calls, "an eager call went through the custom op"
    monkeypatch.setattr(bs_triton, "_eager_ok", lambda *a: False)
    via_op = run()
    assert calls
    for n, (a, b) in enumerate(zip(eager, via_op)):
        if n < 4:
            assert torch.equal(a, b), "out dq dk dv"[3 * n: 3 * n + 3]
        else:  # the table gradient is accumulated with atomics: summation order may differ on a GPU
            assert rel(a, b) <= 1e-6
