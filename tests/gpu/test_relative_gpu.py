"""The fused relative-attention kernel on a real GPU (L = 1024-4096) and its O(L D) memory.

Run on the GPU machine:
``MNEMO_GPU_TESTS=1 python -m pytest -q -p no:cacheprovider tests/gpu/test_relative_gpu.py``
(``MNEMO_AUTOTUNE=0`` skips autotuning for a faster first run). Timings:
``python -m mnemotorch.bench.relative --quick``.
"""

from __future__ import annotations

import pytest
import torch

from mnemotorch.layers import get_mixer
from mnemotorch.ops.relative import relative_attention, relative_attention_reference

pytestmark = pytest.mark.gpu

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (5e-3, 1e-2)}  # (outputs, gradients): ARCHITECTURE.md


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(b, tq, tk, h, hkv, d, hr, max_distance, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(b, tq, h, d), (b, tk, hkv, d), (b, tk, hkv, d), (hr, max_distance + 1, d), (b, tq, h, d)]
    return [torch.randn(s, device="cuda", dtype=torch.float64, generator=g) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "b,tq,tk,h,hkv,d,hr,r",
    [
        (1, 1024, 1024, 4, 2, 64, 4, 1023),  # no clipping: Music Transformer's E_r over all L distances
        (2, 2048, 2048, 2, 2, 128, 2, 256),  # clipped: far tiles and bands straddling R
        (1, 4096, 4096, 2, 1, 64, 1, 512),  # shared table, GQA
        (1, 1000, 3000, 2, 2, 64, 2, 700),  # queries after a cache, lengths off the tile grid
        (1, 1337, 1337, 2, 2, 48, 2, 97),  # head dim not a power of two
    ],
)
def test_kernel_gpu(dtype, b, tq, tk, h, hkv, d, hr, r) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    q, k, v, e, go = inputs(b, tq, tk, h, hkv, d, hr, r)
    lo = [x.to(dtype).requires_grad_() for x in (q, k, v, e)]
    out = relative_attention(*lo, backend="triton")
    grads = torch.autograd.grad(out, lo, go.to(dtype))
    # the reference sees the same (rounded) inputs, in float64
    hi = [x.detach().double().requires_grad_() for x in lo]
    ref = relative_attention_reference(*hi, form="skew" if tq == tk else "gather")
    ref_grads = torch.autograd.grad(ref, hi, go.to(dtype).double())
    t_out, t_grad = TOL[dtype]
    assert out.dtype == dtype
    assert rel(out, ref) <= t_out, f"output {rel(out, ref):.2e}"
    for name, g, gr in zip(("q", "k", "v", "rel_emb"), grads, ref_grads):
        assert rel(g, gr) <= t_grad, f"gradient of {name}: {rel(g, gr):.2e}"


def _peak_extra(fn) -> int:
    """Bytes allocated above the starting point while ``fn`` runs (after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_peak_memory_is_o_l_d() -> None:
    # fp32, one sequence, H = 4, D = 64, R = L - 1 (no clipping). The kernel's forward + backward
    # holds the output, LSE/delta, dQ/dK/dV and the fp32 dE table: about 5 L H D floats. The naive
    # skew holds several L x L score matrices per head (64x more at L = 4096).
    h, d = 4, 64
    peaks = {}
    for length in (2048, 4096):
        q, k, v, e, go = inputs(1, length, length, h, h, d, h, length - 1)
        leaves = [x.float().requires_grad_() for x in (q, k, v, e)]
        go = go.float()

        def kernel():
            torch.autograd.grad(relative_attention(*leaves, backend="triton"), leaves, go)

        peaks[length] = _peak_extra(kernel)
        lhd = length * h * d * 4
        assert peaks[length] <= 10 * lhd, f"L={length}: {peaks[length] / 2**20:.1f} MiB"
        if length == 4096:

            def naive():
                torch.autograd.grad(relative_attention_reference(*leaves, form="skew"), leaves, go)

            naive_peak = _peak_extra(naive)
            assert naive_peak >= length * length * h * 4  # at least one fp32 L x L matrix per head
            assert peaks[length] * 10 <= naive_peak
    # linear in L: doubling the length at most doubles the memory (plus slack for allocator rounding)
    assert peaks[4096] <= 2.2 * peaks[2048]


def test_mixer_auto_uses_the_kernel_and_streams() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    mixer = get_mixer("relative", dim=256, num_heads=4, max_distance=100).cuda()
    ref = get_mixer("relative", dim=256, num_heads=4, max_distance=100, backend="reference").cuda()
    ref.load_state_dict(mixer.state_dict())
    with torch.no_grad():
        mixer.rel_emb.normal_()
        ref.rel_emb.copy_(mixer.rel_emb)
    x = torch.randn(2, 700, 256, device="cuda")
    y, _ = mixer(x)
    y_ref, _ = ref.double()(x.double())
    assert rel(y, y_ref) <= 1e-5
    # chunked prefill through the kernel (Tq < Tk after the first piece) equals the full pass
    state, pieces = None, []
    for lo, hi in ((0, 300), (300, 301), (301, 700)):
        yp, state = mixer(x[:, lo:hi], state)
        pieces.append(yp)
    assert rel(torch.cat(pieces, 1), y) <= 1e-5


def test_compiles() -> None:
    q, k, v, e, _ = inputs(1, 512, 512, 2, 2, 64, 2, 64)
    q, k, v, e = (x.float() for x in (q, k, v, e))
    eager = relative_attention(q, k, v, e, backend="triton")
    compiled = torch.compile(lambda *a: relative_attention(*a, backend="triton"))(q, k, v, e)
    assert rel(compiled, eager) <= 1e-6
