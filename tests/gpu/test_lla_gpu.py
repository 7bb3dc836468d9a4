"""Local Linear Attention: the Triton CG kernels on a real GPU against the float64 solve path.

Run on the GPU machine:
``MNEMO_GPU_TESTS=1 python -m pytest -q -p no:cacheprovider tests/gpu/test_lla_gpu.py``.

The issue's criterion is the first test: the CG path within 1e-2 of the solve path in bf16 at
lengths 64, 1024 and 4096 (outputs and gradients; ``cg_iters=32``, λ = 1, D = 64). The reference
is :func:`lla_reference` in float64 on the GPU on the same bf16-rounded inputs. Not yet run on a
GPU when written (the kernels passed the CPU interpreter tests, tests/ops/test_lla_triton.py, with
the GPU's bf16/TF32 rounding emulated).
"""

from __future__ import annotations

import pytest
import torch

from mnemotorch.ops.lla import lla_cg, lla_reference, local_linear_attention
from mnemotorch.ops.lla import triton as lla_triton
from mnemotorch.ops.lla.triton import lla_cg_triton

pytestmark = pytest.mark.gpu


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make(b, tq, tk, h, hkv, d, dv, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, tq, h, d, device="cuda", generator=g)
    k = torch.randn(b, tk, hkv, d, device="cuda", generator=g)
    v = torch.randn(b, tk, hkv, dv, device="cuda", generator=g)
    return [x.to(dtype).requires_grad_() for x in (q, k, v)]


def compare(q, k, v, ridge=1.0, iters=32, precondition=False, seed=1):
    """Relative errors of (o, dq, dk, dv) of the kernels against float64 ``lla_reference``."""
    out = lla_cg_triton(q, k, v, ridge, None, iters, precondition)
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(out.shape, device="cuda", generator=g)
    grads = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
    r = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = lla_reference(*r, ridge)
    ref_grads = torch.autograd.grad((ref * w.double()).sum(), r)
    for x in (out, *grads):
        assert torch.isfinite(x).all()
    assert out.dtype == q.dtype
    return [rel(out, ref)] + [rel(a, b) for a, b in zip(grads, ref_grads)]


@pytest.mark.parametrize("t", [64, 1024, 4096])
def test_bf16_within_1e2_of_solve(t) -> None:
    """The issue's acceptance: bf16 CG within 1e-2 of the solve path (and ARCHITECTURE's 5e-3 for outputs)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    errs = compare(*make(1, t, t, 2, 2, 64, 64, torch.bfloat16, seed=t))
    print(f"bf16 T={t}: o {errs[0]:.2e} dq {errs[1]:.2e} dk {errs[2]:.2e} dv {errs[3]:.2e}")
    assert errs[0] <= 5e-3, f"o {errs[0]:.2e}"
    assert max(errs) <= 1e-2, f"(o, dq, dk, dv) {errs}"


def test_fp32_matches_solve_and_cg_path() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    q, k, v = make(2, 1024, 1024, 2, 2, 64, 64, torch.float32, seed=5)
    errs = compare(q, k, v)
    assert max(errs) <= 1e-5, f"(o, dq, dk, dv) {errs}"
    with torch.no_grad():
        # 8 CG iterations do not converge here, so two fp32 runs that sum in different orders drift
        # apart (1.3e-4 on an H100, 2026-11-26). Judge the kernel against the float64 CG with the same
        # iteration count, next to the plain-PyTorch CG in fp32: the kernel must be no less accurate.
        exact = lla_cg(q.double(), k.double(), v.double(), 1.0, None, 8)
        err_kernel = rel(lla_cg_triton(q, k, v, 1.0, None, 8).double(), exact)
        err_torch = rel(lla_cg(q, k, v, 1.0, None, 8).double(), exact)
        print(f"fp32 CG(8) vs float64 CG(8): kernel {err_kernel:.2e}, torch fp32 {err_torch:.2e}")
        assert err_kernel <= max(2 * err_torch, 1e-5), (err_kernel, err_torch)


@pytest.mark.parametrize(
    "dtype,b,tq,tk,h,hkv,d,dv,pre",
    [
        (torch.float16, 1, 1000, 1000, 4, 2, 128, 128, False),  # D = 128 (fixed tiles 64 x 32, 8 warps), GQA, T off the tile grid
        (torch.bfloat16, 2, 300, 1500, 2, 1, 32, 48, True),  # queries after a cache, Dv != D, Jacobi
        (torch.bfloat16, 1, 777, 777, 2, 2, 16, 16, False),  # the smallest head dim
    ],
)
def test_half_shapes(dtype, b, tq, tk, h, hkv, d, dv, pre) -> None:
    errs = compare(*make(b, tq, tk, h, hkv, d, dv, dtype, seed=tq), precondition=pre)
    assert errs[0] <= 5e-3, f"o {errs[0]:.2e}"
    assert max(errs) <= 1e-2, f"(o, dq, dk, dv) {errs}"


def test_autotuned_launches_match_fixed(monkeypatch) -> None:
    """Every autotune candidate compiles and the tuned launches give the fixed launches' answer."""
    q, k, v = make(1, 700, 700, 2, 1, 64, 64, torch.bfloat16, seed=3)
    monkeypatch.setattr(lla_triton, "_AUTOTUNE", False)
    fixed = compare(q, k, v)
    monkeypatch.setattr(lla_triton, "_AUTOTUNE", True)
    tuned = compare(q, k, v)
    assert max(tuned) <= 1e-2 and abs(tuned[0] - fixed[0]) <= 2e-3, (fixed, tuned)


def test_auto_dispatch_mixer_and_compile() -> None:
    from mnemotorch.layers import get_mixer

    q, k, v = make(1, 256, 256, 2, 2, 64, 64, torch.bfloat16, seed=9)
    out = local_linear_attention(q, k, v, solver="cg")  # backend="auto" on CUDA: the kernels
    assert rel(out, lla_cg_triton(q, k, v)) <= 1e-6
    compiled = torch.compile(lambda q, k, v: lla_cg_triton(q, k, v, 1.0, None, 32), fullgraph=True)
    assert rel(compiled(q, k, v), out) <= 1e-6
    torch.manual_seed(0)
    mixer = get_mixer("lla", dim=128, num_heads=2, solver="cg").cuda()
    x = torch.randn(2, 300, 128, device="cuda")
    full, _ = mixer(x)
    y1, st = mixer(x[:, :123])
    y2, _ = mixer(x[:, 123:], st)
    assert rel(torch.cat([y1, y2], 1), full) <= 1e-5
    ref = get_mixer("lla", dim=128, num_heads=2, solver="solve").cuda()
    ref.load_state_dict(mixer.state_dict())
    # two float32 computations of the same function (32 CG steps vs linalg.solve), each ~1e-6 off exact
    assert rel(full, ref(x)[0]) <= 1e-4
