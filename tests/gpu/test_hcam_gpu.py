"""HCAM on the block-gated Triton kernel, on a real GPU, against the PyTorch reference path in float64.

Run on the GPU machine: ``MNEMO_GPU_TESTS=1 python -m pytest -q -p no:cacheprovider tests/gpu/test_hcam_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from mnemotorch.layers import get_mixer
from mnemotorch.layers.hcam import chunk_summaries, hcam_attention, hcam_gate_logits

pytestmark = pytest.mark.gpu

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (5e-3, 1e-2)}  # (outputs, gradients): ARCHITECTURE.md


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# bf16 failed on the H100 (2026-11-25): output relative error 3.5e-2 against the float64 reference
# (tolerance 5e-3): the top-k chunk choice was made from bf16 logits in the kernel path and float64
# logits in the reference, so picks near ties differed. The test passes the kernel path's selection
# (`keep`) to the reference; all three bf16 cases then passed on the H100 (2026-11-26, XPASS), so the
# xfail is gone.
_BF16 = pytest.param(torch.bfloat16, id="bf16")


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), _BF16])
@pytest.mark.parametrize(
    "t,tq,h,hkv,d,chunk,top_k,local_chunk",
    [(1024, 1024, 4, 2, 64, 32, 4, True), (2048, 2048, 2, 2, 128, 64, 8, False), (1500, 77, 4, 1, 32, 16, 3, True)],
)
def test_hcam_kernel_gpu(dtype, t, tq, h, hkv, d, chunk, top_k, local_chunk) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, tq, h, d, device="cuda", dtype=torch.float64, generator=g)
    k = torch.randn(1, t, hkv, d, device="cuda", dtype=torch.float64, generator=g)
    v = torch.randn(1, t, hkv, d, device="cuda", dtype=torch.float64, generator=g)
    lo = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    out = hcam_attention(lo[0], lo[1], lo[2], chunk_summaries(lo[1], chunk), chunk, top_k, local_chunk, backend="triton")
    go = torch.randn(out.shape, device="cuda", dtype=torch.float64, generator=g)
    grads = torch.autograd.grad(out, lo, go.to(dtype))
    hi = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = hcam_attention(hi[0], hi[1], hi[2], chunk_summaries(hi[1], chunk), chunk, top_k, local_chunk, backend="reference")
    rgrads = torch.autograd.grad(ref, hi, go)
    t_out, t_grad = TOL[dtype]
    # bf16 rounds the level-1 logits differently, which can change a top-k pick near a tie; compare
    # the kernel against the reference *at the same rounded inputs* for the selection to agree.
    if dtype != torch.float32:
        hi = [x.detach().to(dtype).double().requires_grad_() for x in lo]
        # ... and under the kernel path's own top-k choice, so that near-ties cannot flip a pick.
        with torch.no_grad():
            gate_lo = hcam_gate_logits(lo[0], lo[1], chunk_summaries(lo[1], chunk), chunk, top_k, local_chunk)
        keep = torch.isfinite(gate_lo[..., : t // chunk])
        ref = hcam_attention(hi[0], hi[1], hi[2], chunk_summaries(hi[1], chunk), chunk, top_k, local_chunk,
                             backend="reference", keep=keep)
        rgrads = torch.autograd.grad(ref, hi, go)
    assert rel(out, ref) <= t_out
    for name, a, r in zip("qkv", grads, rgrads):
        assert rel(a, r) <= t_grad, name


def test_hcam_mixer_auto_uses_the_kernel_on_cuda(monkeypatch) -> None:
    import mnemotorch.ops.block_sparse.gated as gated

    calls = []
    orig = gated.block_gated_attention

    def spy(*a, **k):
        calls.append(k.get("backend"))
        return orig(*a, **k)

    monkeypatch.setattr(gated, "block_gated_attention", spy)
    torch.manual_seed(0)
    mixer = get_mixer("hcam", dim=128, num_heads=4, chunk_size=16, top_k=4).cuda()
    x = torch.randn(2, 300, 128, device="cuda")
    y, st = mixer(x[:, :200])
    y2, _ = mixer(x[:, 200:], st)
    assert calls == ["triton", "triton"]
    ref_mixer = get_mixer("hcam", dim=128, num_heads=4, chunk_size=16, top_k=4, backend="reference").cuda().double()
    ref_mixer.load_state_dict(mixer.state_dict())
    full, _ = ref_mixer(x.double())
    torch.backends.cuda.matmul.allow_tf32 = False
    assert rel(torch.cat([y, y2], 1), full) <= 1e-5
