"""The list-free causal sliding-window kernels (ops/block_sparse/swa_triton.py) against the float64
reference, through Triton's CPU interpreter at small sizes (tests/conftest.py sets TRITON_INTERPRET=1
and NaN-poisons the kernels' outputs), and the dispatch that picks them.

Small launch tiles (16 / 32 rows) make every phase of the kernels appear at these sizes: the masked
window-edge tiles, the unmasked tiles (pointer loads and TMA descriptors), the masked diagonal; the
dK/dV kernel's loop over the GQA group; dQ by its own kernel and by atomics in the dK/dV kernel
(element atomics, or TMA reductions: the interpreter has none, ``descriptor_reduce`` adds them);
the one-loop variants (``one_loop``: programs whose tiles all lie inside the sequence, the rest
three loops) and Delta computed in the dQ kernel (``delta``).
"""

from __future__ import annotations

import os

import pytest
import torch

from mnemotorch.ops import sliding_window_attention
from mnemotorch.ops.block_sparse import (
    block_sparse_attention,
    block_sparse_attention_reference,
    build_pattern,
    causal_window_predicate,
    relative_bias_1d,
    sink_window_pattern,
    sliding_window_pattern,
)
from mnemotorch.ops.sliding_window import sliding_window_attention_reference

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)

from interpreter_numerics import descriptor_reduce, gpu_numerics  # noqa: E402,F401 (pytest fixtures)
from triton.runtime import interpreter as interp  # noqa: E402

from mnemotorch.ops.block_sparse import swa_triton  # noqa: E402
from swa_launch import rel, tiles  # noqa: E402

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (5e-3, 1e-2)}  # (outputs, gradients): ARCHITECTURE.md


def inputs(b, lq, lk, h, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, h, d, generator=g).to(dtype).requires_grad_()
    k = torch.randn(b, lk, hkv, d, generator=g).to(dtype).requires_grad_()
    v = torch.randn(b, lk, hkv, d, generator=g).to(dtype).requires_grad_()
    go = torch.randn(b, lq, h, d, generator=g).to(dtype)
    return q, k, v, go


def check_against_reference(b, lq, lk, h, hkv, d, window, dtype, launch, seed=0):
    q, k, v, go = inputs(b, lq, lk, h, hkv, d, dtype, seed)
    with swa_triton.override_launch(**launch):
        out = swa_triton.swa_attention_triton(q, k, v, window, d**-0.5)
        grads = torch.autograd.grad(out, (q, k, v), go)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = sliding_window_attention_reference(*leaves, min(window, lk))
    rgrads = torch.autograd.grad(ref, leaves, go.double())
    tol_out, tol_grad = TOL[dtype]
    assert torch.isfinite(out).all() and all(torch.isfinite(g_).all() for g_ in grads), "unwritten (NaN) or non-finite elements"
    assert rel(out, ref) <= tol_out, f"out {rel(out, ref):.2e}"
    for name, g_, r in zip("qkv", grads, rgrads):
        assert rel(g_, r) <= tol_grad, f"d{name} {rel(g_, r):.2e}"


# (b, lq, lk, h, hkv, d, window, (BM, BN), fused dQ, TMA)
FP32_CASES = [
    (2, 37, 37, 4, 2, 16, 5, (16, 16), False, False),     # GQA 2, window inside one tile
    (1, 130, 130, 2, 2, 16, 64, (32, 16), True, True),    # every phase; dQ by atomics; TMA on unmasked tiles
    (1, 130, 130, 4, 1, 16, 1, (16, 32), False, True),    # window 1 (output = v), GQA 4
    (1, 1, 1, 2, 1, 16, 5, (16, 16), True, False),        # one token
    (2, 37, 60, 2, 1, 64, 64, (16, 16), True, False),     # queries are the last 37 of 60 keys, D = 64
    (1, 64, 64, 2, 2, 64, 200, (32, 32), False, "device"),  # window > length: plain causal; in-kernel descriptors
    (1, 50, 50, 2, 1, 24, 13, (16, 16), True, True),      # head dim 24 (padded to 32): host descriptors fall back to pointers
    (2, 50, 50, 2, 1, 24, 13, (16, 16), False, "device"),  # ... in-kernel descriptors zero-fill the padding
]


@pytest.mark.parametrize("b,lq,lk,h,hkv,d,window,blocks,fused,tma", FP32_CASES)
def test_fp32_matches_reference(b, lq, lk, h, hkv, d, window, blocks, fused, tma) -> None:
    check_against_reference(b, lq, lk, h, hkv, d, window, torch.float32, tiles(*blocks, fused, tma))


# the same cases with one loop per program, Delta in the dQ kernel, and dQ by TMA reductions
# where it was by atomics ("tma": falls back to element atomics when D is padded)
@pytest.mark.parametrize("b,lq,lk,h,hkv,d,window,blocks,fused,tma", FP32_CASES)
def test_fp32_one_loop_delta_in_dq_and_tma_reductions(descriptor_reduce, b, lq, lk, h, hkv, d, window, blocks, fused, tma) -> None:
    check_against_reference(b, lq, lk, h, hkv, d, window, torch.float32,
                            tiles(*blocks, "tma" if fused else False, tma, one_loop=True, delta=not fused))


class _Calls:
    """Counts the calls of the kernels' jit helpers (the interpreter runs their rewritten copies)."""

    NAMES = ("_fwd_one", "_fwd_three", "_dq_one", "_dq_three", "_dkdv_one", "_dkdv_three")

    def __init__(self, monkeypatch):
        self.n = dict.fromkeys(self.NAMES, 0)
        table = getattr(interp.InterpretedFunction, "rewritten_fn", None)
        if table is None:  # pragma: no cover - other Triton versions
            pytest.skip("this Triton's interpreter keeps no table of rewritten functions")
        for name in self.NAMES:
            jf = getattr(swa_triton, name)
            fn = jf.rewrite()

            def call(*args, _fn=fn, _name=name, **kwargs):
                self.n[_name] += 1
                return _fn(*args, **kwargs)

            monkeypatch.setitem(table, jf.fn, call)


@pytest.mark.parametrize("lq,lk", [(130, 130), (100, 148)])  # queries the last 100 of 148 keys (offset a multiple of 16)
def test_one_loop_and_three_loops_both_run(monkeypatch, descriptor_reduce, lq, lk) -> None:
    """With ``one_loop`` the programs whose tiles lie inside the sequence take the one loop, those at
    the ends the three loops (the test above could pass with the one loop never taken)."""
    calls = _Calls(monkeypatch)
    check_against_reference(1, lq, lk, 2, 1, 16, 64, torch.float32, tiles(32, 16, "tma", True, one_loop=True), seed=5)
    assert all(calls.n[n] > 0 for n in ("_fwd_one", "_fwd_three", "_dkdv_one", "_dkdv_three")), calls.n
    check_against_reference(1, lq, lk, 2, 1, 16, 64, torch.float32, tiles(32, 16, False, False, one_loop=True, delta=True), seed=5)
    assert calls.n["_dq_one"] > 0 and calls.n["_dq_three"] > 0, calls.n


@pytest.mark.parametrize("fused", [False, True])
def test_bf16_matches_reference(gpu_numerics, fused) -> None:
    """bf16 in the interpreter's GPU-like numerics (tests/ops/interpreter_numerics.py)."""
    check_against_reference(1, 130, 130, 4, 2, 64, 64, torch.bfloat16, tiles(32, 16, fused, "device" if fused else True), seed=1)


@pytest.mark.parametrize("fused", [False, "tma"])
def test_bf16_one_loop_matches_reference(gpu_numerics, descriptor_reduce, fused) -> None:
    check_against_reference(1, 130, 130, 4, 2, 64, 64, torch.bfloat16, tiles(32, 16, fused, True, one_loop=True, delta=not fused),
                            seed=1)


@pytest.mark.parametrize("delta_in_dq", [False, True], ids=["preprocess", "delta_in_dq"])
def test_bf16_shared_qk_gradients_use_the_fp32_output(gpu_numerics, delta_in_dq) -> None:
    """k = q (peaked softmax): Delta must come from the fp32 output (the forward's rounding residual),
    else dq is ~7x worse than an fp32-internal peer (see test_block_sparse_numerics.py); the bound is
    that file's: 1.5x the error of SDPA's math backend in bf16."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    t, d, w = 192, 64, 96
    g = torch.Generator().manual_seed(0)
    x, v, wt = (torch.randn(1, t, 1, d, generator=g, dtype=torch.float64).to(torch.bfloat16) for _ in range(3))
    i = torch.arange(t)
    mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - w)

    def run(which, dtype):
        xs, vs = x.to(dtype).requires_grad_(), v.to(dtype).requires_grad_()
        if which == "peer":
            with sdpa_kernel(SDPBackend.MATH):
                o = torch.nn.functional.scaled_dot_product_attention(xs.transpose(1, 2), xs.transpose(1, 2), vs.transpose(1, 2),
                                                                     attn_mask=mask).transpose(1, 2)
        elif which == "ours":
            with swa_triton.override_launch(**tiles(64, 32, False, False, delta=delta_in_dq)):
                o = swa_triton.swa_attention_triton(xs, xs, vs, w, d**-0.5)
        else:
            o = sliding_window_attention_reference(xs, xs, vs, w)
        return (o, *torch.autograd.grad((o * wt.to(dtype)).sum(), (xs, vs)))

    ref, ours, peer = run("reference", torch.float64), run("ours", torch.bfloat16), run("peer", torch.bfloat16)
    assert rel(ours[0], ref[0]) <= 5e-3
    for name, a, p, r in zip("xv", ours[1:], peer[1:], ref[1:]):
        assert torch.isfinite(a).all() and rel(a, r) <= 1.5 * rel(p, r), f"d{name}: {rel(a, r):.2e} vs peer {rel(p, r):.2e}"


@pytest.mark.parametrize("lazy", [0.5, 8.0])
def test_lazy_rescaling_is_exact(lazy) -> None:
    """Lazy rescaling (skip rescaling while no row max grew by more than 2^lazy) on keys whose scale
    grows along the sequence, so that the running max grows both under and over the threshold."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 130, 2, 16, generator=g).requires_grad_()
    k = (torch.randn(1, 130, 1, 16, generator=g) * torch.linspace(0.2, 3.0, 130)[None, :, None, None]).requires_grad_()
    v = torch.randn(1, 130, 1, 16, generator=g).requires_grad_()
    launch = tiles(32, 16, False, False)
    launch["fwd"]["lazy"] = lazy
    with swa_triton.override_launch(**launch):
        out = swa_triton.swa_attention_triton(q, k, v, 100, 0.25)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = sliding_window_attention_reference(*leaves, 100, 0.25)
    rgrads = torch.autograd.grad(ref, leaves, torch.ones_like(ref))
    assert rel(out, ref) <= 1e-5
    for name, g_, r in zip("qkv", grads, rgrads):
        assert rel(g_, r) <= 1e-5, f"d{name}"


def test_strided_inputs_match_the_reference() -> None:
    """Head slices and [B, H, L, D] transposes reach the kernels without a copy and give the reference."""
    g = torch.Generator().manual_seed(4)
    qb = torch.randn(1, 40, 4, 16, generator=g).requires_grad_()
    kb = torch.randn(1, 2, 40, 16, generator=g).requires_grad_()
    vb = torch.randn(1, 40, 2, 32, generator=g).requires_grad_()
    q, k, v = qb[:, :, ::2], kb.transpose(1, 2), vb[..., 8:24]
    go = torch.randn(1, 40, 2, 16, generator=g).transpose(0, 1).contiguous().transpose(0, 1)
    with swa_triton.override_launch(**tiles(16, 16, True, True)):
        out = swa_triton.swa_attention_triton(q, k, v, 11, 0.3)
        grads = torch.autograd.grad(out, (qb, kb, vb), go)
    leaves = [t.detach().double().requires_grad_() for t in (qb, kb, vb)]
    ref = sliding_window_attention_reference(leaves[0][:, :, ::2], leaves[1].transpose(1, 2), leaves[2][..., 8:24], 11, 0.3)
    rgrads = torch.autograd.grad(ref, leaves, go.double())
    assert rel(out, ref) <= 1e-5
    for name, g_, r in zip("qkv", grads, rgrads):
        assert rel(g_, r) <= 1e-5, f"d{name}"


def test_custom_ops_equal_the_eager_path(monkeypatch) -> None:
    """What torch.compile traces (the custom ops) computes bitwise what eager calls compute."""
    def run():
        q, k, v, go = inputs(1, 40, 40, 2, 1, 16, torch.float32, seed=2)
        with swa_triton.override_launch(**tiles(16, 16, False, False)):
            out = swa_triton.swa_attention_triton(q, k, v, 9, 0.25)
            return [out, *torch.autograd.grad(out, (q, k, v), go)]

    calls = []
    op = swa_triton.swa_attn_fwd
    monkeypatch.setattr(swa_triton, "swa_attn_fwd", lambda *a: calls.append(1) or op(*a))
    eager = run()
    assert not calls
    monkeypatch.setattr(swa_triton, "_eager_ok", lambda *a: False)
    via_op = run()
    assert calls
    for a, b in zip(eager, via_op):
        assert torch.equal(a, b)


# ---- dispatch


class _Spy:
    def __init__(self, monkeypatch):
        self.calls = []
        real = swa_triton.swa_attention_triton

        def spy(q, k, v, window, scale):
            self.calls.append(window)
            return real(q, k, v, window, scale)

        monkeypatch.setattr(swa_triton, "swa_attention_triton", spy)


@pytest.mark.parametrize("mode,taken", [("fast", True), ("lists", False), ("auto", False)])
def test_dispatch_follows_the_knob(monkeypatch, mode, taken) -> None:
    """auto: the fast path for CUDA inputs only (here: the CPU, so the list kernel); fast: everywhere;
    lists: never. Either way the result is the reference's."""
    monkeypatch.setenv("MNEMO_SWA_KERNEL", mode)
    spy = _Spy(monkeypatch)
    q, k, v, _ = inputs(1, 40, 48, 2, 1, 16, torch.float32, seed=3)
    pat = sliding_window_pattern(40, 13, k_len=48, q_block=16, k_block=16)
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, pat, backend="triton")
        via_op = sliding_window_attention(q, k, v, 13, backend="triton")
    assert spy.calls == ([13, 13] if taken else [])
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), pat)
    assert rel(out, ref) <= 1e-5 and rel(via_op, ref) <= 1e-5


def test_only_plain_windows_take_the_fast_path(monkeypatch) -> None:
    monkeypatch.setenv("MNEMO_SWA_KERNEL", "fast")
    spy = _Spy(monkeypatch)
    q, k, v, _ = inputs(1, 32, 32, 2, 2, 16, torch.float32)
    assert sliding_window_pattern(32, None, q_block=16, k_block=16).causal_window == 32  # plain causal
    assert sink_window_pattern(32, 7, 0, q_block=16, k_block=16).causal_window == 7
    assert sink_window_pattern(32, 7, 2, q_block=16, k_block=16).causal_window is None
    assert build_pattern(causal_window_predicate(7), 32, 32, 16, 16).causal_window is None
    assert sliding_window_pattern(32, 7, q_block=16, k_block=16).to("cpu").causal_window == 7
    pat = sliding_window_pattern(32, 7, q_block=16, k_block=16)
    bias = relative_bias_1d(torch.randn(2, 8), 32, min_offset=-7)
    with torch.no_grad():
        block_sparse_attention(q, k, v, sink_window_pattern(32, 7, 2, q_block=16, k_block=16), backend="triton")
        block_sparse_attention(q, k, v, pat, backend="triton", bias=bias)  # a bias: the list kernel
        assert spy.calls == []
        block_sparse_attention(q, k, v, sink_window_pattern(32, 7, 0, q_block=16, k_block=16), backend="triton")
    assert spy.calls == [7]


def test_bad_knob_and_launch_overrides_are_named(monkeypatch) -> None:
    monkeypatch.setenv("MNEMO_SWA_KERNEL", "fastest")
    q = torch.randn(1, 8, 1, 16)
    with pytest.raises(ValueError, match="MNEMO_SWA_KERNEL"):
        sliding_window_attention(q, q, q, 3, backend="triton")
    with pytest.raises(ValueError, match="unknown fwd parameters"):
        with swa_triton.override_launch(fwd=dict(BLOCK_M=64)):
            pass
    with pytest.raises(ValueError, match="kernel must be one of"):
        with swa_triton.override_launch(bwd=dict(BM=64)):
            pass
    monkeypatch.setenv("MNEMO_SWA_KERNEL", "fast")
    with pytest.raises(ValueError, match="lazy rescaling is not implemented in the one-loop"):
        with swa_triton.override_launch(fwd=dict(one_loop=True, lazy=8.0)):
            sliding_window_attention(q, q, q, 3, backend="triton")
    qg = q.clone().requires_grad_()
    with pytest.raises(ValueError, match="fused_dq must be False, True"):
        with swa_triton.override_launch(dkdv=dict(fused_dq="atomics")):
            sliding_window_attention(qg, qg, qg, 3, backend="triton").sum().backward()


def test_launch_table_is_complete() -> None:
    """Every (kernel, head-dim class, operand class) has a full row of power-of-two tiles."""
    for kind, keys in swa_triton._KERNEL_KEYS.items():
        for dcls in (64, 128, 256):
            for ocls in ("16", "32"):
                row = swa_triton.LAUNCH[(kind, dcls, ocls)]
                assert set(row) == set(keys), (kind, dcls, ocls)
                swa_triton._check_tile(kind, row)
    assert swa_triton.launch_config("fwd", 96, torch.bfloat16) == swa_triton.LAUNCH[("fwd", 128, "16")]
    with swa_triton.override_launch(fwd=dict(BM=32)):
        assert swa_triton.launch_config("fwd", 96, torch.bfloat16)["BM"] == 32
    assert swa_triton.launch_config("fwd", 96, torch.bfloat16)["BM"] == swa_triton.LAUNCH[("fwd", 128, "16")]["BM"]


def test_custom_ops_pass_opcheck() -> None:
    """Schema, fake tensors, autograd registration and AOT dispatch of both custom ops (torch.compile's view)."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 20, 2, 16, generator=g).requires_grad_()
    k, v = (torch.randn(1, 20, 1, 16, generator=g).requires_grad_() for _ in range(2))
    with swa_triton.override_launch(**tiles(16, 16, False, False)):
        torch.library.opcheck(swa_triton.swa_attn_fwd, (q, k, v, 7, 0.25))
        o, lse, lo = swa_triton.swa_attn_fwd(q, k, v, 7, 0.25)
        args = (torch.randn(o.shape, generator=g), q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), lo.detach(), 7, 0.25)
        torch.library.opcheck(swa_triton.swa_attn_bwd, args)


def test_rounding_residual_only_for_shared_qk(monkeypatch) -> None:
    """The forward keeps the bf16 output's rounding residual (one more [B, L, H, D] tensor saved for the
    backward) only when ``k is q``; with independent q, k it saves what FlashAttention-2 / Flex save
    (issue #4's peak-memory target). ``PRECISE_DELTA`` keeps it always."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 40, 2, 16, generator=g).to(torch.bfloat16).requires_grad_() for _ in range(3))
    saved = []
    real = swa_triton._fwd_impl
    monkeypatch.setattr(swa_triton, "_fwd_impl", lambda *a, **kw: saved.append(kw.get("need_lo")) or real(*a, **kw))
    with swa_triton.override_launch(**tiles(16, 16, False, False)):
        swa_triton.swa_attention_triton(q, k, v, 9, 0.25).sum().backward()
        swa_triton.swa_attention_triton(q, q, v, 9, 0.25).sum().backward()
        swa_triton.na1d_attention_triton(q, k, v, 9, 0.25).sum().backward()
        monkeypatch.setattr(swa_triton, "PRECISE_DELTA", True)
        swa_triton.swa_attention_triton(q, k, v, 9, 0.25).sum().backward()
    assert saved == [False, True, False, True]
    assert swa_triton.swa_attn_fwd(q, k, v, 9, 0.25)[2].numel() == 0
    assert swa_triton.swa_attn_fwd(q, k, v, 9, 0.25, True)[2].shape == q.shape
    with swa_triton.override_launch(**tiles(16, 16, False, False)):
        torch.library.opcheck(swa_triton.swa_attn_fwd, (q.float(), k.float(), v.float(), 9, 0.25, True))
