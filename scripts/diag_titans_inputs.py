"""The titans_lmm layer's forward + backward with the fused memory, its input path (conv, SiLU, ℓ2 norms) and the
memory's gate coefficients each eager or ``torch.compile``d (``MNEMO_MEMORY_COMPILE_INPUTS``,
``fused_triton.COMPILE_COEFFICIENTS``), bf16, dim 1024, 16 heads: CUDA-event medians, the variants alternated twice.
Variant names: ``eager`` (both eager), ``inputs`` (the input path compiled), ``both``.

Usage (GPU): ``python scripts/diag_titans_inputs.py --length 16384 --config matched --out diag_titans_inputs.json``
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from mnemotorch.bench.block_sparse import median_ms
from mnemotorch.bench.neural_memory import build_ours
from mnemotorch.ops.memory import fused_triton


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--config", default="matched")
    ap.add_argument("--rep", type=int, default=7)
    ap.add_argument("--variants", default="eager,inputs,both")
    ap.add_argument("--out", default="diag_titans_inputs.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    os.environ["MNEMO_MEMORY_FUSED"] = "1"
    layer = build_ours(1024, 16, 64, args.config, torch.device("cuda"), torch.bfloat16)
    x = torch.randn(1, args.length, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    go = torch.randn_like(x)
    params = [x, *layer.parameters()]
    fwd_bwd = lambda: torch.autograd.grad(layer(x)[0], params, go)  # noqa: E731
    row = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "length": args.length, "config": args.config}
    variants = args.variants.split(",")
    for mode in variants * 2:  # alternated twice
        os.environ["MNEMO_MEMORY_COMPILE_INPUTS"] = "0" if mode == "eager" else "1"
        fused_triton.COMPILE_COEFFICIENTS = None if mode == "both" else False
        t0 = time.perf_counter()
        fwd_bwd()
        torch.cuda.synchronize()
        row.setdefault(f"first_call_s_{mode}", time.perf_counter() - t0)
        row.setdefault(f"fwd_bwd_ms_{mode}", []).append(median_ms(fwd_bwd, 2, args.rep))
        print(mode, row[f"fwd_bwd_ms_{mode}"], flush=True)
    with open(args.out, "w") as fh:
        json.dump(row, fh, indent=1)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
