"""The fused forward kernel of the Titans memory (``ops/memory/fused_triton.py``) compiled for a real GPU,
at the benchmark's head shape (d = 64, hidden 256, chunk 64, 16 heads), against the chunked path.

Run on the GPU machine: ``MNEMO_GPU_TESTS=1 python -m pytest -q -p no:cacheprovider tests/gpu/test_memory_fused_gpu.py``
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mnemotorch.ops.memory import MemoryState, memory_hidden_shapes, neural_memory_chunked
from mnemotorch.ops.memory.fused_triton import neural_memory_fused_forward

pytestmark = pytest.mark.gpu

MATCHED = dict(activation="gelu", residual=True, layer_norm=True, max_grad_norm=None)
DEFAULT = dict(activation="silu", residual=True, layer_norm=False, max_grad_norm=1.0)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make(t: int, dtype: torch.dtype, b: int = 1, h: int = 16, d: int = 64, hidden: int = 256, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    uni = lambda lo, hi: lo + (hi - lo) * torch.rand(b, t, h, device="cuda", generator=g)  # noqa: E731
    q, k = F.normalize(rnd(b, t, h, d), dim=-1), F.normalize(rnd(b, t, h, d), dim=-1)
    v = rnd(b, t, h, d)
    w = tuple(rnd(b, h, i, o) / i**0.5 for i, o in memory_hidden_shapes(d, d, 2, hidden))
    s = tuple(0.1 * rnd(*x.shape) for x in w)
    qkv = tuple(x.to(dtype) for x in (q, k, v))
    return qkv, (uni(0.0, 0.1), uni(0.5, 1.0), uni(0.0, 0.1)), MemoryState(w, s, w, 0)


def check_state(out: MemoryState, ref: MemoryState, tol: float) -> None:
    for name in ("weights", "momentum"):
        for i, (x, y) in enumerate(zip(getattr(out, name), getattr(ref, name))):
            assert rel(x, y) <= tol, f"{name}[{i}]: {rel(x, y):.3e}"


@pytest.mark.parametrize("config", ["matched", "default"])
@pytest.mark.parametrize("t", [4096, 16384])
def test_fused_bf16_vs_chunked_fp32(config: str, t: int) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = MATCHED if config == "matched" else DEFAULT
    (q, k, v), gates, st = make(t, torch.bfloat16)
    with torch.no_grad():
        y_ref, s_ref = neural_memory_chunked(q.float(), k.float(), v.float(), *gates, st, 64, **cfg)  # the same rounded inputs, fp32
        y, s = neural_memory_fused_forward(q, k, v, *gates, st, 64, **cfg)
    torch.cuda.synchronize()
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert rel(y, y_ref) <= 5e-3, rel(y, y_ref)
    check_state(s, s_ref, 5e-3)


@pytest.mark.parametrize("config", ["matched", "default"])
def test_fused_fp32_vs_chunked_fp64(config: str) -> None:
    """float32 inputs (IEEE products in the kernel) against the float64 chunked path, L = 4096."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = MATCHED if config == "matched" else DEFAULT
    (q, k, v), gates, st = make(4096, torch.float32, b=1, h=4)
    f64 = lambda xs: tuple(x.double() for x in xs)  # noqa: E731
    with torch.no_grad():
        y_ref, s_ref = neural_memory_chunked(*f64((q, k, v)), *f64(gates), MemoryState(f64(st.weights), f64(st.momentum), f64(st.weights), 0), 64, **cfg)
        y, s = neural_memory_fused_forward(q, k, v, *gates, st, 64, **cfg)
    assert rel(y, y_ref) <= 1e-5, rel(y, y_ref)
    check_state(s, s_ref, 1e-5)


def test_layer_env_switch(monkeypatch) -> None:
    """``MNEMO_MEMORY_FUSED=1``: the titans_lmm layer's inference forward runs the kernel, same output."""
    from mnemotorch.bench.neural_memory import build_ours
    from mnemotorch.ops.memory import fused_triton

    calls = []
    real = fused_triton.neural_memory_fused_forward

    def counting(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(fused_triton, "neural_memory_fused_forward", counting)
    torch.manual_seed(0)
    layer = build_ours(1024, 16, 64, "matched", torch.device("cuda"), torch.bfloat16)
    x = torch.randn(1, 4096 + 37, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        monkeypatch.delenv("MNEMO_MEMORY_FUSED", raising=False)
        y0 = layer(x)[0]
        monkeypatch.setenv("MNEMO_MEMORY_FUSED", "1")
        y1 = layer(x)[0]
    assert len(calls) == 1, "the fused path did not run"
    assert rel(y1, y0) <= 5e-3, rel(y1, y0)
