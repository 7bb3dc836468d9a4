"""Registers, spills and shared memory of the compiled Triton kernels at the benchmarks' shapes (GPU).

The fused Titans-memory kernels run ~100 us per chunk where a count of their dependent products gives
~30-40 us; the NA-2D dK/dV kernel takes twice the forward's time per computed pair. Register spills
(local memory traffic) would explain part of both, and Triton records them per compiled kernel
(``CompiledKernel.n_regs / n_spills`` after its first launch). This runs one training call of each
(the fused memory op at 16K, 16 heads, d 64, hidden 256, chunk 64, matched and default configs; NA-2D
at 128 x 128, 13 x 13, D 64, H 16; NA-1D at 32K, K 2048, D 128; the sliding window at 16K, W 1024,
D 128; bf16) and lists every compiled kernel of those modules. JSON to ``$OUT/diag_kernel_resources.json``.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from diag_memory_fused import CONFIGS, inputs  # noqa: E402

from mnemotorch.ops.block_sparse import na2d_triton, swa_triton  # noqa: E402
from mnemotorch.ops.memory import fused_triton  # noqa: E402
from mnemotorch.ops.memory.fused_triton import neural_memory_fused  # noqa: E402


def run_memory(config: str, t: int = 16384) -> None:
    (q, k, v), gates, st = inputs(t, 16, 64, 256, 2, torch.bfloat16, "cuda")
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    y, _ = neural_memory_fused(*leaves, *gates, st, chunk_size=64, **CONFIGS[config])
    torch.autograd.grad(y.float().square().sum(), leaves)


def run_attention() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)

    def qkv(n, h, d):
        return [torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3)]

    for fn, (n, h, d) in ((lambda q, k, v: na2d_triton.na2d_attention_triton(q, k, v, (128, 128), 13), (16384, 16, 64)),
                          (lambda q, k, v: swa_triton.na1d_attention_triton(q, k, v, 2048, 128**-0.5), (32768, 1, 128)),
                          (lambda q, k, v: swa_triton.swa_attention_triton(q, k, v, 1024, 128**-0.5), (16384, 16, 128))):
        q, k, v = qkv(n, h, d)
        torch.autograd.grad(fn(q, k, v), (q, k, v), torch.randn_like(q))


def compiled_kernels(module) -> list[dict]:
    rows = []
    for name in dir(module):
        fn = getattr(module, name)
        caches = getattr(fn, "device_caches", None)
        if caches is None:
            continue
        for dev_cache in list(caches.values()):
            for key, ck in list(dev_cache[0].items()):
                meta = ck.metadata
                # the specialisation key carries the constexprs (e.g. the sweep's FOLD / KEEP): which variant this row is
                rows.append({"kernel": name, "key": str(key)[-600:], "num_warps": getattr(meta, "num_warps", None),
                             "num_stages": getattr(meta, "num_stages", None), "shared_bytes": getattr(meta, "shared", None),
                             "n_regs": getattr(ck, "n_regs", None), "n_spills": getattr(ck, "n_spills", None)})
    return rows


def main() -> None:
    rep = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton
    rep["triton"] = triton.__version__
    fold_default = fused_triton.BACKWARD["fold_read"]
    for config in ("matched", "default"):
        for fold in (False, True):  # the sweep kernels with and without FOLD (BACKWARD["fold_read"])
            fused_triton.BACKWARD["fold_read"] = fold
            run_memory(config)
    fused_triton.BACKWARD["fold_read"] = fold_default
    run_attention()
    torch.cuda.synchronize()
    for label, module in (("memory", fused_triton), ("na2d", na2d_triton), ("swa", swa_triton)):
        rep[label] = compiled_kernels(module)
        for row in rep[label]:
            print(label, json.dumps(row), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "diag_kernel_resources.json"), "w") as f:
        json.dump(rep, f, indent=1)


if __name__ == "__main__":
    main()
