"""2-D neighborhood attention (NATTEN semantics, dilation 1, stride 1, non-causal) through the
list-free kernels of ops/block_sparse/na2d_triton.py, on row-major tokens, against a float64 dense
reference with the brute-force NATTEN 2-D mask (``layers.vision.na2d_mask``), in Triton's CPU
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 and NaN-poisons the kernels' outputs); the
layer's dispatch behind ``MNEMO_NA2D_KERNEL``; the custom ops.

Small tiles (2 x 8 cells) make every geometry appear at these sizes: unions of several row groups
and column groups, column starts pulled inside the grid, tiles hanging past the grid's right and
bottom edges, windows clamped at every border, inverted windows up to K + K // 2 long.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)

from interpreter_numerics import gpu_numerics  # noqa: E402,F401 (pytest fixture)

from mnemotorch.layers.vision import na2d, na2d_mask  # noqa: E402
from mnemotorch.ops.block_sparse import na2d_triton  # noqa: E402
from swa_launch import rel  # noqa: E402

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (5e-3, 1e-2)}  # (outputs, gradients): ARCHITECTURE.md


def small(qr=2, qc=8, ktr=2, ktc=8, kqr=2, kqc=8, kktr=2, kktc=8) -> dict:
    """Launch overrides: forward / dQ query tiles qr x qc and key tiles ktr x ktc; dK/dV key tiles
    kktr x kktc and query tiles kqr x kqc (one stage: the interpreter has no pipelines)."""
    fq = dict(QR=qr, QC=qc, KTR=ktr, KTC=ktc, warps=4, stages=1)
    return dict(fwd=fq, dq=fq, dkdv=dict(QR=kqr, QC=kqc, KTR=kktr, KTC=kktc, warps=4, stages=1))


def dense_reference(q, k, v, shape, ks, scale):
    """float64 dense attention under the brute-force NATTEN 2-D mask; GQA by repeating K/V heads."""
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = s.masked_fill(~na2d_mask(shape, ks), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def check(shape, ks, b, h, hkv, d, dtype, launch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = shape[0] * shape[1]
    q, k, v = (torch.randn(b, n, m, d, generator=gen).to(dtype).requires_grad_() for m in (h, hkv, hkv))
    go = torch.randn(b, n, h, d, generator=gen).to(dtype)
    scale = d**-0.5
    with na2d_triton.override_launch(**launch):
        out = na2d_triton.na2d_attention_triton(q, k, v, shape, ks, scale)
        grads = torch.autograd.grad(out, (q, k, v), go)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = dense_reference(*leaves, shape, ks, scale)
    rgrads = torch.autograd.grad(ref, leaves, go.double())
    tol_out, tol_grad = TOL[dtype]
    assert torch.isfinite(out).all() and all(torch.isfinite(g_).all() for g_ in grads), "unwritten (NaN) or non-finite elements"
    assert rel(out, ref) <= tol_out, f"out {rel(out, ref):.2e}"
    for name, g_, r in zip("qkv", grads, rgrads):
        assert rel(g_, r) <= tol_grad, f"d{name} {rel(g_, r):.2e}"


def test_start_rule_matches_the_mask() -> None:
    """The kernels' per-axis window start clamp(p - K // 2, 0, L - K), ANDed over the axes, is
    ``na2d_mask`` (NATTEN's rule), odd and even kernels."""
    for shape in ((5, 4), (6, 9)):
        for kr in range(1, shape[0] + 1):
            for kc in range(1, shape[1] + 1):
                i = torch.arange(shape[0] * shape[1])
                r, c = i // shape[1], i % shape[1]
                sr, sc = (r - kr // 2).clamp(0, shape[0] - kr), (c - kc // 2).clamp(0, shape[1] - kc)
                want = ((r[None, :] >= sr[:, None]) & (r[None, :] < sr[:, None] + kr)
                        & (c[None, :] >= sc[:, None]) & (c[None, :] < sc[:, None] + kc))
                assert torch.equal(na2d_mask(shape, (kr, kc)), want), (shape, kr, kc)


# (shape, kernel, b, h, hkv, d, launch)
FP32_CASES = [
    ((5, 4), (5, 4), 2, 4, 2, 16, small()),            # grid == kernel (full attention), B = 2, GQA 2
    ((13, 21), (5, 4), 1, 2, 1, 16, small()),          # non-multiples of the tiles, odd x even kernel, GQA 2
    ((9, 40), (3, 13), 1, 2, 2, 16, small()),          # unions of 3 column groups (column start pulled in)
    ((7, 30), (1, 30), 1, 1, 1, 16, small()),          # kernel 1 on the rows, full width on the columns
    ((16, 17), (6, 1), 1, 2, 1, 48, small()),          # even x 1 kernel, D = 48 (padded head dim)
    ((12, 12), (12, 12), 1, 1, 1, 32, small()),        # kernel == grid
    ((11, 10), (7, 7), 2, 2, 1, 64, small(4, 4, 1, 16, 1, 16, 4, 4)),  # other tile shapes, D = 64, B = 2
    ((20, 19), (13, 13), 1, 1, 1, 16, small(2, 16, 4, 8, 4, 8, 2, 16)),  # inverted windows K + K // 2 long
]


@pytest.mark.parametrize("shape,ks,b,h,hkv,d,launch", FP32_CASES)
def test_fp32_matches_reference(shape, ks, b, h, hkv, d, launch) -> None:
    check(shape, ks, b, h, hkv, d, torch.float32, launch)


def test_fp32_default_launch_d128() -> None:
    """The table's own fp32 rows (the GPU's tile shapes), D = 128, on a grid smaller than a tile."""
    check((9, 13), (5, 6), 1, 2, 1, 128, torch.float32, {}, seed=3)


def test_bf16_matches_reference(gpu_numerics) -> None:
    """bf16 in the interpreter's GPU-like numerics (tests/ops/interpreter_numerics.py), the table's
    16-bit D = 64 rows (4 x 16 query tiles, 2 x 32 key tiles; dK/dV 4 x 16 keys, 2 x 32 queries)."""
    check((20, 36), (13, 13), 1, 4, 2, 64, torch.bfloat16, {}, seed=1)


def test_bf16_small_tiles(gpu_numerics) -> None:
    check((13, 21), (5, 4), 2, 2, 1, 32, torch.bfloat16, small(), seed=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_delta_preprocess_path(dtype, gpu_numerics) -> None:
    """``delta=False`` on the dQ row: Delta from the preprocess pass and dK/dV before dQ (the default
    computes Delta in the dQ kernel, which then runs first); bf16 includes the output's residual."""
    launch = small()
    launch["dq"] = dict(launch["dq"], delta=False)
    check((13, 21), (5, 4), 2, 2, 1, 32, dtype, launch, seed=4)


def test_computed_pairs_at_the_issue_case() -> None:
    """128 x 128, 13 x 13, default 16-bit D = 64 forward row: 512 computed keys per interior query
    (8 key tiles of 2 x 32 per 4 x 16 query tile), never more at the borders."""
    cfg = na2d_triton.launch_config("fwd", 64, torch.bfloat16)
    assert (cfg["QR"], cfg["QC"], cfg["KTR"], cfg["KTC"]) == (4, 16, 2, 32)
    total = na2d_triton.computed_pairs((128, 128), (13, 13), cfg)
    assert total == 504 * 128 * 128  # 512 per interior query, fewer where the unions are clipped at the borders
    # an interior query tile alone: 16 x 28 union -> 8 key tiles of 64
    assert na2d_triton.computed_pairs((128, 128), (13, 13), dict(cfg, QR=128, QC=128)) == 128 * 128 * 128 * 128
    r0, c0 = 64, 64
    row_lo, row_hi = r0 - 6, r0 + 3 - 6 + 13
    col_lo, col_hi = c0 - 6, c0 + 15 - 6 + 13
    assert (row_hi - row_lo, col_hi - col_lo) == (16, 28) and (row_hi - row_lo) // 2 * 64 == 512


def test_layer_dispatch_follows_the_knob(monkeypatch) -> None:
    """``na2d(..., backend="triton")``: plain NA-2D takes the list-free kernels unless
    ``MNEMO_NA2D_KERNEL=off``; dilation, causal, stride or a bias keep the block-list path; both
    paths agree with each other."""
    calls = []
    real = na2d_triton.na2d_attention_triton
    monkeypatch.setattr(na2d_triton, "na2d_attention_triton", lambda *a: calls.append(a[3:5]) or real(*a))
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 8, 8, 2, 16, generator=g) for _ in range(3))
    with na2d_triton.override_launch(**small()):
        outs = {}
        for env in (None, "fast", "off"):
            if env is None:
                monkeypatch.delenv("MNEMO_NA2D_KERNEL", raising=False)
            else:
                monkeypatch.setenv("MNEMO_NA2D_KERNEL", env)
            calls.clear()
            outs[env] = na2d(q, k, v, (3, 5), backend="triton", tile_shape=(4, 4))
            assert calls == ([] if env == "off" else [((8, 8), (3, 5))]), (env, calls)
        monkeypatch.setenv("MNEMO_NA2D_KERNEL", "fast")
        for kw in (dict(dilation=(2, 1)), dict(causal=(True, False)), dict(stride=(1, 2)),
                   dict(rpb=torch.zeros(2, 5, 9))):
            calls.clear()
            na2d(q, k, v, (3, 5), backend="triton", tile_shape=(4, 4), **kw)
            assert calls == [], kw
        calls.clear()
        na2d(q, k, v, (3, 5), backend="gather")
        assert calls == []
    assert rel(outs["fast"], outs["off"]) <= 1e-5 and torch.equal(outs[None], outs["fast"])
    monkeypatch.setenv("MNEMO_NA2D_KERNEL", "bogus")
    with pytest.raises(ValueError, match="MNEMO_NA2D_KERNEL"):
        na2d(q, k, v, 3, backend="triton", tile_shape=(4, 4))


def test_custom_ops_equal_the_eager_path_and_pass_opcheck(monkeypatch) -> None:
    """What torch.compile traces (the custom ops) computes bitwise what eager calls compute; schema,
    fake tensors and autograd registration of both ops."""
    def run():
        gen = torch.Generator().manual_seed(2)
        q, k, v = (torch.randn(1, 42, n, 16, generator=gen).requires_grad_() for n in (2, 1, 1))
        go = torch.randn(1, 42, 2, 16, generator=gen)
        with na2d_triton.override_launch(**small()):
            out = na2d_triton.na2d_attention_triton(q, k, v, (6, 7), (3, 4), 0.25)
            return [out, *torch.autograd.grad(out, (q, k, v), go)]

    eager = run()
    monkeypatch.setattr(na2d_triton, "_eager_ok", lambda *a: False)
    via_op = run()
    for a, b in zip(eager, via_op):
        assert torch.equal(a, b)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 20, 2, 16, generator=g).requires_grad_()
    k, v = (torch.randn(1, 20, 1, 16, generator=g).requires_grad_() for _ in range(2))
    with na2d_triton.override_launch(**small()):
        torch.library.opcheck(na2d_triton.na2d_attn_fwd, (q, k, v, 4, 5, 3, 2, 0.25))
        torch.library.opcheck(na2d_triton.na2d_attn_fwd, (q, k, v, 4, 5, 3, 2, 0.25, True))
        o, lse, lo = na2d_triton.na2d_attn_fwd(q, k, v, 4, 5, 3, 2, 0.25)
        args = (torch.randn(o.shape, generator=g), q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), lo.detach(),
                4, 5, 3, 2, 0.25)
        torch.library.opcheck(na2d_triton.na2d_attn_bwd, args)


def test_bad_arguments_name_the_argument() -> None:
    q = torch.randn(1, 20, 2, 16)
    k = torch.randn(1, 20, 1, 16)
    f = na2d_triton.na2d_attention_triton
    with pytest.raises(ValueError, match="kernel_size"):
        f(q, k, k, (4, 5), (5, 2))
    with pytest.raises(ValueError, match="kernel_size"):
        f(q, k, k, (4, 5), 0)
    with pytest.raises(ValueError, match="shape"):
        f(q, k, k, (4, 6), 3)
    with pytest.raises(ValueError, match="shape"):
        f(q, k, k, (4, 5, 1), 3)
    with pytest.raises(ValueError, match="heads"):
        f(torch.randn(1, 20, 3, 16), torch.randn(1, 20, 2, 16), torch.randn(1, 20, 2, 16), (4, 5), 3)
    with pytest.raises(ValueError, match="k and v"):
        f(q, k, torch.randn(1, 20, 1, 32), (4, 5), 3)
    with pytest.raises(ValueError, match="head dim"):
        f(torch.randn(1, 20, 2, 8), torch.randn(1, 20, 1, 8), torch.randn(1, 20, 1, 8), (4, 5), 3)
    with pytest.raises(TypeError, match="dtype"):
        f(q.double(), k.double(), k.double(), (4, 5), 3)
    with pytest.raises(ValueError, match="q must be a 4-D"):
        f(q[0], k, k, (4, 5), 3)
    with pytest.raises(ValueError, match="QC"):
        with na2d_triton.override_launch(fwd=dict(QR=2, QC=6)):
            f(q, k, k, (4, 5), 3)
    with pytest.raises(ValueError, match="unknown"):
        with na2d_triton.override_launch(fwd=dict(BM=64)):
            pass
