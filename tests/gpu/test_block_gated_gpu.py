"""Block-gated attention kernel on a real GPU against the float64 reference (L = 1024-4096).

Run on the GPU machine: ``MNEMO_GPU_TESTS=1 python -m pytest -q -p no:cacheprovider tests/gpu/test_block_gated_gpu.py``
and ``python tests/gpu/test_block_gated_gpu.py`` for timings vs SDPA.
"""

from __future__ import annotations

import pytest
import torch

from mnemotorch.ops.block_sparse.gated import block_gated_attention, block_gated_attention_reference, num_blocks

pytestmark = pytest.mark.gpu

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (5e-3, 1e-2)}  # (outputs, gradients): ARCHITECTURE.md


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(b, t, h, hkv, d, block_len, mode, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, t, h, d, device="cuda", dtype=torch.float64, generator=g)
    k = torch.randn(b, t, hkv, d, device="cuda", dtype=torch.float64, generator=g)
    v = torch.randn(b, t, hkv, d, device="cuda", dtype=torch.float64, generator=g)
    extra, kw = {}, {}
    if mode == "landmark":
        kw = dict(lse_gate="own", exclude_last=True)
        extra["gate_keys"] = k[:, block_len - 1 :: block_len].clone()
    elif mode == "topk":
        nb = num_blocks(t, block_len)
        kw = dict(lse_gate="none")
        extra["gate_keys"] = torch.randn(b, nb, hkv, d, device="cuda", dtype=torch.float64, generator=g)
        bias = torch.zeros(b, t, h, nb, device="cuda", dtype=torch.float64)
        bias[torch.rand(bias.shape, device="cuda", generator=g) < 0.5] = float("-inf")
        extra["gate_bias"] = bias
    return [q, k, v], extra, kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "t,h,hkv,d,block_len,mode",
    [(1024, 4, 2, 64, 64, "all"), (2048, 2, 2, 128, 51, "landmark"), (4096, 2, 1, 64, 65, "landmark"), (1024, 2, 2, 32, 32, "topk")],
)
def test_gated_kernel_gpu(dtype, t, h, hkv, d, block_len, mode) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    qkv, extra, kw = inputs(1, t, h, hkv, d, block_len, mode)
    names = ["q", "k", "v"] + list(extra)
    base = qkv + list(extra.values())
    lo = [x.to(dtype).requires_grad_() if n != "gate_bias" else x.float() for n, x in zip(names, base)]
    out = block_gated_attention(*lo[:3], block_len, backend="triton", **kw, **dict(zip(names[3:], lo[3:])))
    go = torch.randn_like(out)
    want = [x for x in lo if x.requires_grad]
    grads = torch.autograd.grad(out, want, go)
    hi = [x.clone().requires_grad_() if n != "gate_bias" else x for n, x in zip(names, base)]
    ref = block_gated_attention_reference(*hi[:3], block_len, causal=True, **kw, **dict(zip(names[3:], hi[3:])))
    rgrads = torch.autograd.grad(ref, [x for x in hi if x.requires_grad], go.double())
    t_out, t_grad = TOL[dtype]
    assert rel(out, ref) <= t_out
    for n, a, r in zip([n for n in names if n != "gate_bias"], grads, rgrads):
        assert rel(a, r) <= t_grad, f"d{n}"


def test_landmark_retrieval_cuda_matches_cpu_float64() -> None:
    """Retrieval mode with the compute on CUDA and the KV blocks in CPU memory."""
    from mnemotorch.layers import get_mixer

    torch.manual_seed(0)
    m = get_mixer("landmark", dim=64, num_heads=4, block_len=5, mode="retrieval", top_k=2, num_kv_heads=2).double()
    x = torch.randn(2, 61, 64, dtype=torch.float64)
    ref, _ = m(x)
    mc = m.float().cuda()
    state, outs = None, []
    for piece in torch.split(x.float().cuda(), [7, 1, 30, 23], dim=1):
        y, state = mc(piece, state)
        outs.append(y)
    assert state.store_k.device.type == "cpu" and state.landmark_k.device.type == "cuda"
    assert rel(torch.cat(outs, 1).cpu(), ref) <= 1e-5


def test_landmark_retrieval_gpu_memory_is_bounded() -> None:
    """Streaming 32K tokens: peak GPU memory at 32K stays near that at 4K (KV blocks live in host memory).

    Block granularity fetches exactly top_k blocks per query block, so the only growth on the GPU
    is one landmark key per block (token granularity fetches a union of up to (l + 1) * top_k)."""
    from mnemotorch.layers import get_mixer

    torch.manual_seed(0)
    m = get_mixer("landmark", dim=256, num_heads=4, block_len=50, mode="retrieval", top_k=4, granularity="block").cuda().eval()
    state, peaks = None, {}
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        for step in range(64):  # 64 chunks of 512 tokens
            _, state = m(torch.randn(1, 512, 256, device="cuda"), state)
            if (step + 1) * 512 in (4096, 32768):
                peaks[(step + 1) * 512] = torch.cuda.max_memory_allocated()
    kv_growth = 2 * (32768 - 4096) * 256 * 4  # what a GPU KV cache would grow by from 4K to 32K (fp32)
    assert state.store_k.device.type == "cpu" and state.store_k.shape[1] == 32768 // 51
    assert peaks[32768] - peaks[4096] < kv_growth / 8, peaks


def speed_report() -> None:
    """Prints fwd / fwd+bwd times of the landmark configuration vs SDPA causal."""
    import torch.nn.functional as F

    b, t, h, d, block_len = 1, 8192, 16, 128, 65
    q, k, v = (torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def gated():
        return block_gated_attention(q, k, v, block_len, gate_keys=k[:, block_len - 1 :: block_len], lse_gate="own", exclude_last=True)

    def sdpa():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)

    def timeit(fn, backward):
        for _ in range(3):
            o = fn()
            if backward:
                o.sum().backward()
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            o = fn()
            if backward:
                o.sum().backward()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        return sorted(times)[len(times) // 2]

    res = {name: (timeit(fn, False), timeit(fn, True)) for name, fn in (("gated", gated), ("sdpa", sdpa))}
    print(f"\nL={t} H={h} D={d} bf16, block {block_len}: " + ", ".join(f"{n}: fwd {a:.2f} ms, fwd+bwd {c:.2f} ms" for n, (a, c) in res.items()))


if __name__ == "__main__":  # python tests/gpu/test_block_gated_gpu.py: timings only
    speed_report()
