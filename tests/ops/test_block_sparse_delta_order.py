"""The generic block-sparse backward's two orders give the same gradients.

``DELTA_IN_DQ`` (default): the dQ kernel computes Delta = rowsum(dO * O) (with the 16-bit output's
rounding residual ``o_lo``) itself and runs before dK/dV; ``False`` (``MNEMO_BS_DELTA=preprocess``):
``_bwd_preprocess``, dK/dV, dQ. Same arithmetic, so the gradients agree (bitwise under the
interpreter; <= 1e-6 relative allowed). Kernel outputs are NaN-poisoned (tests/conftest.py), so a
Delta the dK/dV kernel reads before it is written would show.
"""

from __future__ import annotations

import os

import pytest
import torch

from mnemotorch.ops.block_sparse import block_sparse_attention, build_pattern, relative_bias_1d, sliding_window_pattern
from mnemotorch.ops.block_sparse import triton as bs_triton

DEVICE = "cuda" if os.environ.get("MNEMO_GPU_TESTS") == "1" and torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py) or a GPU", allow_module_level=True)
BLOCK = 16 if DEVICE == "cpu" else 64


@pytest.fixture(autouse=True)
def _generic_kernel(monkeypatch):
    monkeypatch.setenv("MNEMO_SWA_KERNEL", "lists")  # sliding windows on the generic kernel on a GPU too


def _grads(pattern, lq, lk, h, hkv, d, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, lq, h, d, generator=g).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(2, lk, hkv, d, generator=g).to(DEVICE, dtype).requires_grad_()
    v = torch.randn(2, lk, hkv, d, generator=g).to(DEVICE, dtype).requires_grad_()
    leaves = [q, k, v]
    rb = None
    if bias:
        table = (0.5 * torch.randn(h, 2 * BLOCK + 1, generator=g)).to(DEVICE).requires_grad_()
        leaves.append(table)
        rb = relative_bias_1d(table, lq, k_len=lk)
    out = block_sparse_attention(q, k, v, pattern.to(DEVICE), backend="triton", bias=rb)
    go = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    return out, torch.autograd.grad(out, leaves, go)


CASES = {
    # fp32, GQA, query rows 0..19 see no key (lse = +inf, output and gradient 0)
    "fp32-gqa-empty-rows": (lambda: build_pattern(lambda i, j: (i >= 20) & (j <= i), 40, 40, BLOCK, BLOCK), 40, 40, 4, 2, 16,
                            torch.float32, False),
    # bf16 (o_lo residual), GQA, a partial last query block, padded head dim (24 -> 32)
    "bf16-gqa-window": (lambda: sliding_window_pattern(50, 13, q_block=BLOCK, k_block=BLOCK), 50, 50, 4, 1, 24,
                        torch.bfloat16, False),
    # bf16 with a relative bias and empty rows (table gradient through the dQ kernel's atomics)
    "bf16-bias-empty-rows": (lambda: build_pattern(lambda i, j: (i >= 9) & (j <= i) & (j > i - 20), 37, 37, BLOCK, BLOCK),
                             37, 37, 2, 2, 16, torch.bfloat16, True),
    # fp32, bias, rectangular (Lq < Lk), blocks of 2 * BLOCK walked in slices of BLOCK
    "fp32-bias-sliced": (lambda: sliding_window_pattern(30, 21, k_len=45, q_block=2 * BLOCK, k_block=BLOCK), 30, 45, 2, 1, 16,
                         torch.float32, True),
}


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "custom-op"])
@pytest.mark.parametrize("case", list(CASES))
def test_delta_in_dq_matches_preprocess_order(monkeypatch, case, eager) -> None:
    make, lq, lk, h, hkv, d, dtype, bias = CASES[case]
    if case == "fp32-bias-sliced":
        monkeypatch.setattr(bs_triton, "FIXED_SUB", BLOCK)
    if not eager:  # the torch.library custom-op path (what torch.compile traces)
        monkeypatch.setattr(bs_triton, "_eager_ok", lambda *a: False)
    pat = make()
    runs = {}
    for order in (False, True):
        monkeypatch.setattr(bs_triton, "DELTA_IN_DQ", order)
        runs[order] = _grads(pat, lq, lk, h, hkv, d, dtype, bias, seed=11)
    (o0, g0), (o1, g1) = runs[False], runs[True]
    assert torch.equal(o0, o1)
    for name, a, b in zip(("dq", "dk", "dv", "dtable"), g0, g1):
        assert not torch.isnan(b).any(), name
        if not torch.equal(a, b):
            err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
            # On a GPU the two kernels may sum Delta's row in different orders (register layouts), and
            # a last-bit change of Delta can flip a 16-bit rounding of dS: looser there for bf16.
            tol = 2e-3 if DEVICE == "cuda" and dtype != torch.float32 else 1e-6
            assert err <= tol, f"{case} {name}: relative {err:.3g}"
    if case.endswith("empty-rows"):
        first = 20 if case.startswith("fp32") else 9
        assert torch.all(g1[0][:, :first] == 0)


def test_env_switch_is_validated() -> None:
    import subprocess
    import sys

    code = "import mnemotorch.ops.block_sparse.triton as t; print(t.DELTA_IN_DQ)"
    env = dict(os.environ, MNEMO_BS_DELTA="preprocess")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
    env["MNEMO_BS_DELTA"] = "bogus"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "MNEMO_BS_DELTA" in out.stderr
