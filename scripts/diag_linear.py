"""GPU diagnostic for the linear-attention kernels: run forward+backward at benchmark sizes with
every autotuner trial announced before it runs, so that a faulting launch (under
CUDA_LAUNCH_BLOCKING=1) is attributed to its kernel and config.

    CUDA_LAUNCH_BLOCKING=1 PYTHONPATH=src python scripts/diag_linear.py [T]
"""

import sys

import torch
import triton.runtime.autotuner as autotuner

_orig_bench = autotuner.Autotuner._bench


def _announced_bench(self, *args, config, **kwargs):
    name = getattr(getattr(self, "fn", None), "__name__", "?")
    print(f"trial {name} {config}", flush=True)
    return _orig_bench(self, *args, config=config, **kwargs)


autotuner.Autotuner._bench = _announced_bench

from mnemotorch.ops.linear.triton import linear_attention_triton  # noqa: E402

T = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
for feature, dk, dv, normalize in (("identity", 128, 128, False), ("identity", 128, 128, True), ("taylor", 16, 64, True)):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, T, 16, d, device="cuda", dtype=torch.bfloat16).mul_(0.3).requires_grad_() for d in (dk, dk, dv))
    print(f"== {feature} dk={dk} dv={dv} normalize={normalize} T={T}", flush=True)
    y = linear_attention_triton(q, k, v, feature, normalize)[0]
    torch.cuda.synchronize()
    print("   forward ok", tuple(y.shape), flush=True)
    y.float().square().sum().backward()
    torch.cuda.synchronize()
    print("   backward ok", flush=True)
