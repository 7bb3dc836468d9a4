"""Hardware counters of our Triton kernels, for Nsight Compute (run on the GPU machine).

The bench times the NA-1D forward at ~420-440 TFLOP/s and the sliding window's backward kernels at ~430, below every
pipe's throughput bound (the counts in docs/results/block_sparse.md), and the Titans memory's walks as latency-bound
chains (docs/results/neural_memory.md): the question is where each warp waits. This script only runs the work: warm-up
calls first (compilation, launch caches), then ``--reps`` calls between ``cudaProfilerStart`` / ``cudaProfilerStop``, so
that

    ncu --profile-from-start off --clock-control none --set full -o OUT python3 scripts/ncu_kernels.py --case na1d

profiles the warm kernels alone (``scripts/gpu_na_check.sh``'s ``ncu`` step, which also filters the kernels by name).
Cases:

* ``na1d``: L 32K, kernel 2048, D 128, H 1 (the issue's NA-1D shape), forward only;
* ``swa``: L 64K, W 1024, D 128, H 16, forward and backward;
* ``titans``: the ``titans_lmm`` layer (dim 1024, 16 heads, chunk 64, ``--config``) with the fused memory kernels,
  forward and backward at ``--length`` (default 16K).
"""

from __future__ import annotations

import argparse
import os

import torch


def _launch(text: str) -> dict:
    """``"BM=128,BN=64,warps=8,stages=2,tma=1"`` as a launch-override dict (0/1 for the flags, a float for ``lazy``,
    ints for the rest)."""
    out: dict = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        if key in ("tma", "ws", "one_loop", "fused_dq", "delta"):
            out[key] = bool(int(value))
        else:
            out[key] = float(value) if key == "lazy" else int(value)
    return out


def _attention(case: str, backward: bool, fwd: dict):
    from mnemotorch.ops.block_sparse import swa_triton

    if case == "na1d":
        L, H, D, size = 32768, 1, 128, 2048
        fn = lambda q, k, v: swa_triton.na1d_attention_triton(q, k, v, size, D ** -0.5)  # noqa: E731
    else:
        L, H, D, size = 65536, 16, 128, 1024
        fn = lambda q, k, v: swa_triton.swa_attention_triton(q, k, v, size, D ** -0.5)  # noqa: E731
    q, k, v = (torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=backward) for _ in range(3))
    do = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16)

    def step():
        with swa_triton.override_launch(fwd=fwd or None):
            o = fn(q, k, v)
            if backward:
                o.backward(do)
                q.grad = k.grad = v.grad = None

    return step


def _titans(length: int, config: str):
    from mnemotorch.bench.neural_memory import build_ours

    os.environ["MNEMO_MEMORY_FUSED"] = "1"
    dev, dtype = torch.device("cuda"), torch.bfloat16
    layer = build_ours(1024, 16, 64, config, dev, dtype)
    x = torch.randn(1, length, 1024, device=dev, dtype=dtype, requires_grad=True)
    go = torch.randn(1, length, 1024, device=dev, dtype=dtype)
    params = [x, *layer.parameters()]

    def step():
        torch.autograd.grad(layer(x)[0], params, go, allow_unused=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="na1d", choices=("na1d", "swa", "titans"))
    ap.add_argument("--reps", type=int, default=1, help="profiled calls")
    ap.add_argument("--backward", type=int, default=None, help="attention: also the backward (default: 1 for swa, 0 for na1d)")
    ap.add_argument("--length", type=int, default=16384, help="titans: tokens")
    ap.add_argument("--config", default="matched", choices=("matched", "default"), help="titans: the layer's config")
    ap.add_argument("--fwd", default="", help='attention: forward launch overrides, e.g. "BM=128,BN=64,warps=8,stages=2"')
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.case == "titans":
        step = _titans(args.length, args.config)
    else:
        step = _attention(args.case, bool(args.backward if args.backward is not None else args.case == "swa"), _launch(args.fwd))
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    cudart = torch.cuda.cudart()
    cudart.cudaProfilerStart()
    for _ in range(args.reps):
        step()
    torch.cuda.synchronize()
    cudart.cudaProfilerStop()
    print(f"ran {args.reps} profiled call(s) of {args.case}")


if __name__ == "__main__":
    main()
