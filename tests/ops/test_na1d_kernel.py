"""1-D neighborhood attention (NATTEN semantics, dilation 1, stride 1, non-causal) through the
list-free sliding-window kernels in their ``NA1D`` mode (ops/block_sparse/swa_triton.py), against a
float64 dense reference with the brute-force NATTEN mask (``neighborhood_predicate``), in Triton's
CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1 and NaN-poisons the kernels' outputs);
and the dispatch behind ``MNEMO_NA1D_KERNEL``.

Small tiles (16 / 32 rows) make every phase appear at these sizes: masked tiles at both window
edges, unmasked tiles (pointer loads and TMA descriptors), the clamped windows at both sequence
ends, query tiles of the dK/dV kernel anchored at a block's first query, the one-loop variants.
"""

from __future__ import annotations

import os

import pytest
import torch

from mnemotorch.ops.block_sparse import block_sparse_attention, neighborhood_pattern_1d, neighborhood_predicate

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)

from interpreter_numerics import descriptor_reduce, gpu_numerics  # noqa: E402,F401 (pytest fixtures)

from mnemotorch.ops.block_sparse import swa_triton  # noqa: E402
from swa_launch import rel, tiles  # noqa: E402

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (5e-3, 1e-2)}  # (outputs, gradients): ARCHITECTURE.md


def na_mask(length: int, kernel_size: int) -> torch.Tensor:
    i = torch.arange(length)
    return neighborhood_predicate(length, kernel_size)(i[:, None], i[None, :])


def dense_reference(q, k, v, kernel_size: int, scale: float):
    """float64 dense attention under the brute-force NATTEN mask; GQA by repeating K/V heads."""
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = s.masked_fill(~na_mask(q.shape[1], kernel_size), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def check(b, length, h, hkv, d, kernel_size, dtype, launch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, length, n, d, generator=gen).to(dtype).requires_grad_() for n in (h, hkv, hkv))
    go = torch.randn(b, length, h, d, generator=gen).to(dtype)
    with swa_triton.override_launch(**launch):
        out = swa_triton.na1d_attention_triton(q, k, v, kernel_size, d**-0.5)
        grads = torch.autograd.grad(out, (q, k, v), go)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = dense_reference(*leaves, kernel_size, d**-0.5)
    rgrads = torch.autograd.grad(ref, leaves, go.double())
    tol_out, tol_grad = TOL[dtype]
    assert torch.isfinite(out).all() and all(torch.isfinite(g_).all() for g_ in grads), "unwritten (NaN) or non-finite elements"
    assert rel(out, ref) <= tol_out, f"out {rel(out, ref):.2e}"
    for name, g_, r in zip("qkv", grads, rgrads):
        assert rel(g_, r) <= tol_grad, f"d{name} {rel(g_, r):.2e}"


def test_start_rule_matches_the_predicate() -> None:
    """The kernels' window start clamp(t - K // 2, 0, L - K) is NATTEN's rule (even and odd K)."""
    for length in (1, 7, 37):
        for ks in range(1, length + 1):
            t = torch.arange(length)
            st = (t - ks // 2).clamp(0, length - ks)
            want = (t[None, :] >= st[:, None]) & (t[None, :] < st[:, None] + ks)
            assert torch.equal(na_mask(length, ks), want), (length, ks)


# (b, L, h, hkv, d, K, (BM, BN), fused dQ, TMA)
FP32_CASES = [
    (1, 1, 2, 1, 16, 1, (16, 16), False, False),       # one token
    (2, 37, 4, 2, 16, 5, (16, 16), False, False),      # GQA 2, window inside one tile
    (1, 37, 2, 1, 64, 37, (16, 16), True, False),      # K = L: full attention; D = 64
    (1, 130, 4, 2, 16, 1, (16, 32), False, True),      # K = 1: output = v
    (1, 130, 2, 1, 16, 2, (32, 16), True, True),       # even K
    (1, 130, 4, 2, 16, 64, (32, 16), False, True),     # every phase, TMA on unmasked tiles
    (1, 130, 4, 2, 64, 129, (16, 16), True, "device"), # even-ish: K = L - 1, odd; in-kernel descriptors
    (1, 300, 2, 1, 16, 129, (32, 16), False, True),    # interior with unmasked tiles and both clamped ends
    (1, 300, 2, 2, 16, 64, (16, 32), True, False),     # even K, dQ by atomics
    (1, 130, 2, 1, 16, 130, (16, 16), False, False),   # K = L
]


@pytest.mark.parametrize("b,length,h,hkv,d,ks,blocks,fused,tma", FP32_CASES)
def test_fp32_matches_reference(b, length, h, hkv, d, ks, blocks, fused, tma) -> None:
    check(b, length, h, hkv, d, ks, torch.float32, tiles(*blocks, fused, tma))


# the rest of L in {37, 130, 300} x K in {1, 2, 5, 64, 129, L} (K <= L), one head, D = 16
SWEEP = [(37, 1), (37, 2), (130, 5), (300, 1), (300, 2), (300, 5), (300, 300)]


@pytest.mark.parametrize("length,ks", SWEEP)
def test_fp32_length_kernel_sweep(length, ks) -> None:
    check(1, length, 1, 1, 16, ks, torch.float32, tiles(32, 32, False, True, one_loop=ks % 2 == 1, delta=True), seed=ks)


@pytest.mark.parametrize("b,length,h,hkv,d,ks,blocks,fused,tma", FP32_CASES[4:8])
def test_fp32_one_loop_delta_in_dq(descriptor_reduce, b, length, h, hkv, d, ks, blocks, fused, tma) -> None:
    check(b, length, h, hkv, d, ks, torch.float32, tiles(*blocks, "tma" if fused else False, tma, one_loop=True, delta=not fused))


def test_bf16_matches_reference(gpu_numerics) -> None:
    check(1, 130, 4, 2, 64, 64, torch.bfloat16, tiles(32, 16, False, True, one_loop=True, delta=True), seed=1)


def test_dispatch_follows_the_knob(monkeypatch) -> None:
    """``MNEMO_NA1D_KERNEL=fast`` sends a plain NA-1D pattern to the NA1D kernels (causal: the causal
    sliding window, which it equals); unset, the generic list kernel runs; dilation keeps the lists."""
    calls = []
    monkeypatch.setattr(swa_triton, "na1d_attention_triton", lambda *a: calls.append("na1d") or a[0] * 0)
    monkeypatch.setattr(swa_triton, "swa_attention_triton", lambda *a: calls.append(("swa", a[3])) or a[0] * 0)
    q = torch.randn(1, 40, 2, 16)
    for env, pat, want in [(None, neighborhood_pattern_1d(40, 7, q_block=16, k_block=16), []),
                           ("fast", neighborhood_pattern_1d(40, 7, q_block=16, k_block=16), ["na1d"]),
                           ("fast", neighborhood_pattern_1d(40, 7, causal=True, q_block=16, k_block=16), [("swa", 7)]),
                           ("fast", neighborhood_pattern_1d(40, 7, dilation=2, q_block=16, k_block=16), []),
                           ("fast", neighborhood_pattern_1d(40, 7, stride=2, q_block=16, k_block=16), [])]:
        if env is None:
            monkeypatch.delenv("MNEMO_NA1D_KERNEL", raising=False)
        else:
            monkeypatch.setenv("MNEMO_NA1D_KERNEL", env)
        calls.clear()
        out = block_sparse_attention(q, q, q, pat, backend="triton")
        assert calls == want, (env, pat.na1d, calls)
        assert out.shape == q.shape
    monkeypatch.setenv("MNEMO_NA1D_KERNEL", "bogus")
    with pytest.raises(ValueError, match="MNEMO_NA1D_KERNEL"):
        block_sparse_attention(q, q, q, neighborhood_pattern_1d(40, 7, q_block=16, k_block=16), backend="triton")


def test_custom_ops_equal_the_eager_path_and_pass_opcheck(monkeypatch) -> None:
    """What torch.compile traces (the NA-1D custom ops) computes bitwise what eager calls compute;
    schema, fake tensors, autograd registration of both ops."""
    def run():
        gen = torch.Generator().manual_seed(2)
        q, k, v = (torch.randn(1, 40, n, 16, generator=gen).requires_grad_() for n in (2, 1, 1))
        go = torch.randn(1, 40, 2, 16, generator=gen)
        with swa_triton.override_launch(**tiles(16, 16, False, False)):
            out = swa_triton.na1d_attention_triton(q, k, v, 10, 0.25)
            return [out, *torch.autograd.grad(out, (q, k, v), go)]

    eager = run()
    monkeypatch.setattr(swa_triton, "_eager_ok", lambda *a: False)
    via_op = run()
    for a, b in zip(eager, via_op):
        assert torch.equal(a, b)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 20, 2, 16, generator=g).requires_grad_()
    k, v = (torch.randn(1, 20, 1, 16, generator=g).requires_grad_() for _ in range(2))
    with swa_triton.override_launch(**tiles(16, 16, False, False)):
        torch.library.opcheck(swa_triton.na1d_attn_fwd, (q, k, v, 6, 0.25))
        o, lse, lo = swa_triton.na1d_attn_fwd(q, k, v, 6, 0.25)
        args = (torch.randn(o.shape, generator=g), q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), lo.detach(), 6, 0.25)
        torch.library.opcheck(swa_triton.na1d_attn_bwd, args)
    with pytest.raises(ValueError, match="kernel_size"):
        swa_triton.na1d_attention_triton(q, k, v, 21, 0.25)


def test_one_loop_and_three_loops_both_run(monkeypatch, descriptor_reduce) -> None:
    """With ``one_loop`` the interior programs take the one loop, those at the clamped ends the three
    loops (the tests above could pass with one of them never taken)."""
    from test_swa_kernel import _Calls

    calls = _Calls(monkeypatch)
    check(1, 300, 2, 1, 16, 129, torch.float32, tiles(32, 16, "tma", True, one_loop=True), seed=5)
    assert all(calls.n[n] > 0 for n in ("_fwd_one", "_fwd_three", "_dkdv_one", "_dkdv_three")), calls.n
    check(1, 300, 2, 1, 16, 129, torch.float32, tiles(32, 16, False, False, one_loop=True, delta=True), seed=5)
    assert calls.n["_dq_one"] > 0 and calls.n["_dq_three"] > 0, calls.n


def test_warp_specialised_launch_matches_reference() -> None:
    """``ws=True`` (with in-kernel descriptors) reaches every kernel's one loop and three loops; the interpreter
    ignores the pass itself, so this checks the flag's plumbing (the GPU's numbers: scripts/diag_ws.py)."""
    launch = tiles(32, 16, False, "device", one_loop=True, delta=True)
    for kind in launch:
        launch[kind]["ws"] = True
    check(1, 300, 2, 1, 16, 129, torch.float32, launch, seed=3)
