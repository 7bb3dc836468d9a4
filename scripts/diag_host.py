"""Host (CPU) time of one eager call of the list-free kernels, on the GPU machine.

The bench's eager timings of the NA-1D / NA-2D / sliding-window fast paths are 0.1-0.3 ms above their
CUDA-graph replays; this profiles one eager forward and one forward + backward of each with
``torch.profiler`` and prints the ops by CPU self time, the CUDA kernels by device time and the wall
time of the call (host-bound when it exceeds the device time). JSON to ``$OUT/diag_host.json``.
"""

from __future__ import annotations

import json
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from mnemotorch.ops.block_sparse import block_sparse_attention, neighborhood_pattern_1d, sliding_window_pattern
from mnemotorch.ops.block_sparse.na2d_triton import na2d_attention_triton


def cases():
    g = torch.Generator(device="cuda").manual_seed(0)

    def qkv(n, h, d):
        return [torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3)]

    q2, k2, v2 = qkv(16384, 16, 64)
    yield "na2d", (q2, k2, v2), lambda: na2d_attention_triton(q2, k2, v2, (128, 128), 13)
    q1, k1, v1 = qkv(32768, 1, 128)
    p1 = neighborhood_pattern_1d(32768, 2048, device="cuda")
    yield "na1d", (q1, k1, v1), lambda: block_sparse_attention(q1, k1, v1, p1, backend="triton")
    qs, ks, vs = qkv(16384, 16, 128)
    ps = sliding_window_pattern(16384, 1024, device="cuda")
    yield "swa16k", (qs, ks, vs), lambda: block_sparse_attention(qs, ks, vs, ps, backend="triton")


def wall_us(fn, n=50):
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return sorted(ts)[n // 2] * 1e6


def main() -> None:
    rep = {"device": torch.cuda.get_device_name()}
    for name, (q, k, v), fn in cases():
        go = torch.randn_like(q)
        for mode, step in (("fwd_nograd", lambda: torch.no_grad()(fn)()), ("fwd", fn),
                           ("fwd_bwd", lambda: torch.autograd.grad(fn(), (q, k, v), go))):
            for _ in range(3):
                step()
            host = wall_us(step)  # the host's time per call (the queue absorbs the device work)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
            ev = prof.key_averages()
            cpu = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:12]
            gpu = sorted([e for e in ev if e.device_time_total > 0], key=lambda e: -e.device_time_total)[:6]
            row = {"host_us_per_call": host,
                   "cpu_self_us_per_call": {e.key[:70]: e.self_cpu_time_total / 5 for e in cpu},
                   "device_us_per_call": {e.key[:70]: e.device_time_total / 5 for e in gpu}}
            rep[f"{name}_{mode}"] = row
            print(name, mode, json.dumps(row, indent=None)[:900], flush=True)
    out = os.path.join(os.environ.get("OUT", "."), "diag_host.json")
    with open(out, "w") as f:
        json.dump(rep, f, indent=1)


if __name__ == "__main__":
    main()
