"""The list-free causal sliding-window kernels (ops/block_sparse/swa_triton.py) on a real GPU at
realistic sizes: L = 4096, W in {1024, 4096 (= plain causal here)}, D in {64, 128}, bf16 and fp32,
GQA (H = 4, Hkv = 2); output and every gradient against a float64 dense-mask reference (tolerances of
ARCHITECTURE.md), against the generic list-walking kernel (MNEMO_SWA_KERNEL=lists) and against SDPA
with a dense boolean mask, on the same inputs. The launch variants the sweep may choose (dQ by
atomics, TMA descriptors) are checked too.

Run on the GPU machine:
    MNEMO_GPU_TESTS=1 python -m pytest -q -p no:cacheprovider tests/gpu/test_swa_gpu.py
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from mnemotorch.ops.block_sparse import block_sparse_attention, sliding_window_pattern

pytestmark = pytest.mark.gpu
if os.environ.get("MNEMO_GPU_TESTS") != "1" or not torch.cuda.is_available():  # pragma: no cover
    pytest.skip("GPU checks: set MNEMO_GPU_TESTS=1 on a CUDA machine", allow_module_level=True)

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (5e-3, 1e-2)}  # (outputs, gradients)
L, H, HKV = 4096, 4, 2


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(autouse=True)
def _fixed_generic_launch():
    """The generic kernel with its fixed launch (its autotuner would take minutes here)."""
    from mnemotorch.ops.block_sparse import triton as bs_triton

    before = bs_triton._AUTOTUNE_MODE
    bs_triton.set_autotune("off")
    yield
    bs_triton.set_autotune(before)


def _mask(w: int) -> torch.Tensor:
    i = torch.arange(L, device="cuda")
    return (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - w)


def _reference(q, k, v, go, w):
    """Dense float64 attention with the window mask; returns (out, dq, dk, dv)."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    qd, kd, vd = leaves
    kd = kd.repeat_interleave(H // HKV, dim=2)
    vd = vd.repeat_interleave(H // HKV, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", qd, kd) * q.shape[-1] ** -0.5
    s = s.masked_fill(~_mask(w), float("-inf"))
    out = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), vd)
    return (out.detach(), *torch.autograd.grad(out, leaves, go.double()))


def _inputs(d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, L, H, d, device="cuda", generator=g).to(dtype).requires_grad_()
    k = torch.randn(1, L, HKV, d, device="cuda", generator=g).to(dtype).requires_grad_()
    v = torch.randn(1, L, HKV, d, device="cuda", generator=g).to(dtype).requires_grad_()
    go = torch.randn(1, L, H, d, device="cuda", generator=g).to(dtype)
    return q, k, v, go


def _run(q, k, v, go, pattern, mode, monkeypatch):
    monkeypatch.setenv("MNEMO_SWA_KERNEL", mode)
    out = block_sparse_attention(q, k, v, pattern, backend="triton")
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), go))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("w", [1024, 4096])
def test_fast_path_vs_reference_generic_kernel_and_sdpa(monkeypatch, w, d, dtype) -> None:
    q, k, v, go = _inputs(d, dtype)
    pat = sliding_window_pattern(L, w, device="cuda")
    ours = _run(q, k, v, go, pat, "auto", monkeypatch)
    ref = _reference(q, k, v, go, w)
    tol_out, tol_grad = TOL[dtype]
    for n, (a, r) in enumerate(zip(ours, ref)):
        assert torch.isfinite(a).all(), f"{'out dq dk dv'.split()[n]}: non-finite"
        assert rel(a, r) <= (tol_out if n == 0 else tol_grad), f"{'out dq dk dv'.split()[n]}: {rel(a, r):.2e}"
    generic = _run(q, k, v, go, pat, "lists", monkeypatch)
    for n, (a, r) in enumerate(zip(ours, generic)):  # two roundings of the same function
        assert rel(a, r) <= 2 * (tol_out if n == 0 else tol_grad), f"vs generic kernel {'out dq dk dv'.split()[n]}: {rel(a, r):.2e}"
    with torch.no_grad():
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k.repeat_interleave(H // HKV, 2), v.repeat_interleave(H // HKV, 2)))
        sdpa = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=_mask(w)).transpose(1, 2)
    assert rel(ours[0], sdpa) <= 2 * tol_out, f"vs SDPA: {rel(ours[0], sdpa):.2e}"


@pytest.mark.parametrize("variant", [
    dict(fwd=dict(lazy=8.0, one_loop=False), dkdv=dict(fused_dq=True)),  # lazy rescaling lives in the three-loop forward
    dict(fwd=dict(tma=True), dkdv=dict(tma=True), dq=dict(tma=True)),
    dict(fwd=dict(tma=True, BN=128), dkdv=dict(fused_dq=True, tma=True, BM=32)),
    dict(fwd=dict(tma="device"), dkdv=dict(tma="device"), dq=dict(tma="device")),
    dict(fwd=dict(one_loop=True, tma=True), dkdv=dict(one_loop=True), dq=dict(one_loop=True, delta=True)),
    dict(fwd=dict(one_loop=True, BM=64, BN=64, warps=4, tma=False), dkdv=dict(one_loop=True, tma=True), dq=dict(one_loop=True, tma=True)),
    dict(dkdv=dict(fused_dq="tma", BM=64, BN=128, warps=8, stages=2)),
    dict(dkdv=dict(fused_dq="tma", BM=64, BN=128, warps=8, stages=2, one_loop=True, tma=True)),
], ids=["lazy_fused_dq", "tma", "tma_fused_bn128", "device_tma", "one_loop_delta_in_dq", "one_loop_pointer_fwd", "tma_reduce",
        "tma_reduce_one_loop"])
@pytest.mark.parametrize("d", [64, 128])
def test_launch_variants_vs_reference(monkeypatch, variant, d) -> None:
    """The switches the launch sweep may turn on (lazy rescaling, dQ by atomics or TMA reductions, host /
    in-kernel TMA descriptors, one loop per program, Delta in the dQ kernel, other tiles): each must
    compile on this card and stay correct."""
    from mnemotorch.ops.block_sparse import swa_triton

    q, k, v, go = _inputs(d, torch.bfloat16, seed=1)
    pat = sliding_window_pattern(L, 1024, device="cuda")
    with swa_triton.override_launch(**variant):
        ours = _run(q, k, v, go, pat, "auto", monkeypatch)
    ref = _reference(q, k, v, go, 1024)
    for n, (a, r) in enumerate(zip(ours, ref)):
        assert torch.isfinite(a).all() and rel(a, r) <= (5e-3 if n == 0 else 1e-2), f"{'out dq dk dv'.split()[n]}: {rel(a, r):.2e}"


@pytest.mark.parametrize("variant", [
    {},
    dict(fwd=dict(tma=True, BN=128), dkdv=dict(fused_dq=True), dq=dict(tma=True)),
    dict(fwd=dict(tma="device"), dkdv=dict(tma="device"), dq=dict(tma="device")),
    dict(fwd=dict(one_loop=True), dkdv=dict(one_loop=True), dq=dict(one_loop=True, delta=True)),
    dict(fwd=dict(one_loop=True), dkdv=dict(fused_dq="tma", BM=64, BN=128, warps=8, stages=2, one_loop=True)),
], ids=["table", "host_tma_fused_dq", "device_tma", "one_loop_delta_in_dq", "tma_reduce"])
def test_sliding_window_op_and_graph_capture(monkeypatch, variant) -> None:
    """The mixer op takes the fast path without a pattern, and its forward + backward captures in a
    CUDA graph (no host syncs in the fast path; host TMA descriptors are kernel parameters, in-kernel
    ones take their scratch from torch's allocator), whose replays give the eager gradients.

    The eager check runs under ``no_grad``: an output kept with its autograd graph keeps the leaves'
    AccumulateGrad nodes, made on the default stream, and the captured backward would accumulate
    into them there -- ``cudaErrorStreamCaptureImplicit`` ("operation would make the legacy stream
    depend on a capturing blocking stream"), what the first H100 run of this test hit (it kept
    ``out``); tests/ops/test_swa_capture.py checks both sides of that on the CPU."""
    from mnemotorch.bench.block_sparse import capture_graph
    from mnemotorch.ops import sliding_window_attention
    from mnemotorch.ops.block_sparse import swa_triton

    monkeypatch.setenv("MNEMO_SWA_KERNEL", "auto")
    q, k, v, go = _inputs(128, torch.bfloat16, seed=2)
    with swa_triton.override_launch(**variant):
        with torch.no_grad():
            out = sliding_window_attention(q, k, v, 1024)
        eager = torch.autograd.grad(sliding_window_attention(q, k, v, 1024), (q, k, v), go)
        graph, static = capture_graph(lambda: torch.autograd.grad(sliding_window_attention(q, k, v, 1024), (q, k, v), go))
    ref = _reference(q, k, v, go, 1024)
    assert rel(out, ref[0]) <= 5e-3
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    for name, a, e, r in zip("qkv", static, eager, ref[1:]):
        assert rel(a, r) <= 1e-2, f"d{name} (replay) {rel(a, r):.2e}"
        assert rel(a, e) <= (1e-2 if variant.get("dkdv", {}).get("fused_dq") else 0.0), f"d{name}: replay != eager"
    del static
    graph.reset()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [32, 96, 256])
def test_other_head_dims_and_ragged_lengths(d, dtype) -> None:
    """The launch table's other rows (head dims 32, 96 -> padded 128, 256) fit the card's shared
    memory and are exact, at lengths that are no multiple of any tile, with queries the last 1000 of
    1100 keys, B = 2 (host descriptors must not read across sequences) and GQA."""
    from mnemotorch.ops.sliding_window import sliding_window_attention

    g = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(2, 1000, 4, d, device="cuda", generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(2, 1100, 2, d, device="cuda", generator=g).to(dtype).requires_grad_() for _ in range(2))
    go = torch.randn(2, 1000, 4, d, device="cuda", generator=g).to(dtype)
    out = sliding_window_attention(q, k, v, 300, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), go)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    kd, vd = (t.repeat_interleave(2, dim=2) for t in leaves[1:])
    pos, key = torch.arange(100, 1100, device="cuda"), torch.arange(1100, device="cuda")
    mask = (key[None, :] <= pos[:, None]) & (key[None, :] > pos[:, None] - 300)
    s = torch.einsum("bihd,bjhd->bhij", leaves[0], kd).masked_fill(~mask, float("-inf")) * d**-0.5
    ref = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), vd)
    rgrads = torch.autograd.grad(ref, leaves, go.double())
    tol_out, tol_grad = TOL[dtype]
    assert torch.isfinite(out).all() and rel(out, ref) <= tol_out, f"out {rel(out, ref):.2e}"
    for name, a, r in zip("qkv", grads, rgrads):
        assert torch.isfinite(a).all() and rel(a, r) <= tol_grad, f"d{name} {rel(a, r):.2e}"
