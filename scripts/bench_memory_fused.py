"""Time the fused forward kernel of the Titans memory (``ops/memory/fused_triton.py``) on a GPU.

Forward only (inference / prefill), B = 1, the benchmark's heads (dim 1024 / 16 heads: d = 64,
hidden 4·d = 256, chunk 64), bf16 q/k/v: the op (``neural_memory_fused_forward``) against the chunked
path (``neural_memory_chunked``, eager, no grad) on the same inputs, and the ``titans_lmm`` layer's
forward under ``torch.no_grad()`` with ``MNEMO_MEMORY_FUSED=1`` and without. Median of CUDA-event
timings after warm-up; the kernel's first call (its compilation) is timed apart. Also the relative
RMS difference of the outputs, and the achieved TFLOP/s from the count in docs/results/neural_memory.md.

    python scripts/bench_memory_fused.py --lengths 4096,16384 --out $OUT/memory_fused.json
    python scripts/bench_memory_fused.py --device cpu --dim 64 --heads 4 --lengths 128 --rep 1 --warmup 0   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import time

import sys

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1 :][:1] == ["cpu"]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch

from mnemotorch.bench.neural_memory import build_ours, time_ms
from mnemotorch.ops.memory import MemoryState, memory_hidden_shapes, neural_memory_chunked
from mnemotorch.ops.memory.fused_triton import neural_memory_fused_forward


def flops_forward(t: int, h: int, d: int, hidden: int, c: int) -> float:
    """Multiply-adds ×2 of the fused forward (depth 2), per docs/results/neural_memory.md."""
    per_chunk = 11 * c * d * hidden + 2 * c * c * hidden + 2 * c * c * d  # K W1, H W2, Δ2 W2ᵀ, Q[W1|S1], Ĥ[W2|S2], 4 updates; GΔ1, ĤHᵀ; QKᵀ, (G∘P)Δ2
    return 2.0 * per_chunk * (t // c) * h


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="4096,16384")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--configs", default="matched,default")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rep", type=int, default=10)
    ap.add_argument("--out", default="memory_fused.json")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run through Triton's interpreter (tiny sizes)")
    args = ap.parse_args()
    dev, dt = torch.device(args.device), torch.bfloat16
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    h, d = args.heads, args.dim // args.heads
    rows = []
    for config in args.configs.split(","):
        layer = build_ours(args.dim, h, 64, config, dev, dt)  # the bench's configuration (OUR_CONFIGS), its memory settings
        cfg = dict(activation=layer.activation, residual=layer.residual, layer_norm=layer.layer_norm, max_grad_norm=layer.max_grad_norm)
        hidden = layer.expansion * d
        for t in map(int, args.lengths.split(",")):
            g = torch.Generator(device=dev).manual_seed(0)
            rnd = lambda *s: torch.randn(*s, device=dev, generator=g)  # noqa: E731
            q, k = (torch.nn.functional.normalize(rnd(1, t, h, d), dim=-1).to(dt) for _ in range(2))
            v = rnd(1, t, h, d).to(dt)
            gates = (0.1 * torch.rand(1, t, h, device=dev), 0.5 + 0.5 * torch.rand(1, t, h, device=dev), 0.01 * torch.rand(1, t, h, device=dev))  # α ≤ 0.01: with 0.1 the clipped default config decays to zero
            w = tuple(rnd(1, h, i, o) / i**0.5 for i, o in memory_hidden_shapes(d, d, 2, hidden))
            st = MemoryState(w, tuple(torch.zeros_like(x) for x in w), w, 0)
            row = {"config": config, "memory": cfg, "L": t, "heads": h, "d": d, "hidden": hidden, "chunk": 64, "dtype": "bfloat16"}
            with torch.no_grad():
                t0 = time.perf_counter()
                y1, _ = neural_memory_fused_forward(q, k, v, *gates, st, 64, **cfg)
                sync()
                row["fused_first_call_s"] = time.perf_counter() - t0
                y0, _ = neural_memory_chunked(q, k, v, *gates, st, 64, **cfg)
                row["rel_rms_fused_vs_chunked"] = ((y1.double() - y0.double()).norm() / y0.double().norm()).item()
                row["op_fused_fwd_ms"] = time_ms(lambda: neural_memory_fused_forward(q, k, v, *gates, st, 64, **cfg), dev, args.warmup, args.rep)
                row["op_chunked_fwd_ms"] = time_ms(lambda: neural_memory_chunked(q, k, v, *gates, st, 64, **cfg), dev, 1, 3)
                row["op_fused_tflops"] = flops_forward(t, h, d, hidden, 64) / row["op_fused_fwd_ms"] * 1e-9
                x = torch.randn(1, t, args.dim, device=dev, dtype=dt)
                for flag, key in (("0", "layer_chunked_fwd_ms"), ("1", "layer_fused_fwd_ms")):
                    os.environ["MNEMO_MEMORY_FUSED"] = flag
                    row[key] = time_ms(lambda: layer(x), dev, 1 if flag == "0" else args.warmup, 3 if flag == "0" else args.rep)
                os.environ.pop("MNEMO_MEMORY_FUSED")
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (Triton interpreter)", "torch": torch.__version__, "triton": __import__("triton").__version__}
    with open(args.out, "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
