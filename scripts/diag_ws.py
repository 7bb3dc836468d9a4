"""Triton's automatic warp specialisation (``tl.range(..., warp_specialize=True)``) on the list-free attention kernels.

On Hopper, Triton's warp-specialisation pass splits a loop into a producer warp group (the TMA loads) and
consumer groups (the products and the softmax); with ``BM = 128`` and 4 warps it gives each of two consumer
groups 64 of the rows, FlashAttention-3's layout. It wants in-kernel TMA descriptors (``tma="device"``). Each
variant runs in its own process, since a failing pass can abort the compiler (it asserts). Per variant, at the
issue's cases (bf16, B = 1, D = 128): NA-1D L = 32K, K = 2048, H = 1 and the causal sliding window
L = 64K, W = 1024, H = 16 (``--swa``), forward (and with ``--bwd`` forward + backward) as CUDA-graph replays,
the outputs and gradients against fp32 attention with the dense mask at a small length and against the table's
launch at full length. Dense SDPA at NA-1D's case gives the issue's ratio.

    PYTHONPATH=src python scripts/diag_ws.py [--swa] [--bwd] [--variants name,...]   (JSON: $OUT/diag_ws.json)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

FWD_WS = dict(tma="device", ws=True, one_loop=True)
#: name -> override_launch kwargs ("table": the current launch table)
VARIANTS: dict[str, dict] = {
    "table": {},
    "fwd ws BM128 BN64 w4 s2": dict(fwd=dict(BM=128, BN=64, warps=4, stages=2, **FWD_WS)),
    "fwd ws BM128 BN64 w4 s3": dict(fwd=dict(BM=128, BN=64, warps=4, stages=3, **FWD_WS)),
    "fwd ws BM128 BN128 w4 s2": dict(fwd=dict(BM=128, BN=128, warps=4, stages=2, **FWD_WS)),
    "fwd ws BM128 BN64 w4 s2 three": dict(fwd=dict(BM=128, BN=64, warps=4, stages=2, tma="device", ws=True, one_loop=False)),
    "fwd ws BM64 BN64 w4 s3": dict(fwd=dict(BM=64, BN=64, warps=4, stages=3, **FWD_WS)),
    "fwd ws BM128 BN64 w8 s2": dict(fwd=dict(BM=128, BN=64, warps=8, stages=2, **FWD_WS)),
    "fwd device BM64 BN64 w4 s3 (no ws)": dict(fwd=dict(BM=64, BN=64, warps=4, stages=3, tma="device", ws=False, one_loop=True)),
    "dq ws BM128 BN64 w4 s2": dict(dq=dict(BM=128, BN=64, warps=4, stages=2, tma="device", ws=True, one_loop=True, delta=True)),
    "dkdv ws BM64 BN128 w4 s2": dict(dkdv=dict(BM=64, BN=128, warps=4, stages=2, fused_dq=False, tma="device", ws=True, one_loop=True)),
}


def child(name: str, swa: bool, bwd: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from diag_swa import _rel  # (this folder is on sys.path: the script's own)

    from mnemotorch.bench.block_sparse import graph_ms
    from mnemotorch.ops.block_sparse import swa_triton

    over = VARIANTS[name]
    dev, dt, D = "cuda", torch.bfloat16, 128
    row: dict = {"variant": name, "override": over}

    def inputs(n, h, seed):
        g = torch.Generator().manual_seed(seed)
        ts = [torch.randn(1, n, h, D, generator=g).to(dev, dt) for _ in range(4)]
        for t in ts[:3]:
            t.requires_grad_()
        return ts

    def run_case(tag, n, h, window, na1d, flops):
        call = (lambda q, k, v: swa_triton.na1d_attention_triton(q, k, v, window, D**-0.5)) if na1d else \
            (lambda q, k, v: swa_triton.swa_attention_triton(q, k, v, window, D**-0.5))
        # correctness at a small length against fp32 attention with the dense mask
        ns = 4096 if na1d else 3000
        q, k, v, go = inputs(ns, 2, 1)
        i = torch.arange(ns, device=dev)
        if na1d:
            st = (i - window // 2).clamp(0, ns - window)
            mask = (i[None, :] >= st[:, None]) & (i[None, :] < st[:, None] + window)
        else:
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        leaves = [t.detach().float().transpose(1, 2).requires_grad_() for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*leaves, attn_mask=mask, scale=D**-0.5)
        rg = torch.autograd.grad(ref, leaves, go.float().transpose(1, 2))
        with swa_triton.override_launch(**over):
            out = call(q, k, v)
            gr = torch.autograd.grad(out, (q, k, v), go)
        row[f"{tag}_err_vs_fp32"] = {n_: _rel(a, b.transpose(1, 2)) for n_, a, b in zip(("out", "dq", "dk", "dv"), (out, *gr), (ref, *rg))}
        del out, gr, ref, rg
        # full length: against the table's launch, then timed
        q, k, v, go = inputs(n, h, 2)
        base = call(q, k, v)
        bg = torch.autograd.grad(base, (q, k, v), go)
        with swa_triton.override_launch(**over):
            out = call(q, k, v)
            gr = torch.autograd.grad(out, (q, k, v), go)
            row[f"{tag}_err_vs_table"] = {n_: _rel(a, b) for n_, a, b in zip(("out", "dq", "dk", "dv"), (out, *gr), (base, *bg))}
            row[f"{tag}_nan"] = bool(torch.isnan(out).any())
            del out, gr, base, bg

            def fwd():
                with torch.no_grad():
                    return call(q, k, v)

            row[f"{tag}_fwd_ms"] = min(graph_ms(fwd) for _ in range(3))
            row[f"{tag}_fwd_tflops"] = flops / row[f"{tag}_fwd_ms"] * 1e-9
            if bwd:
                row[f"{tag}_fwd_bwd_ms"] = min(graph_ms(lambda: torch.autograd.grad(call(q, k, v), (q, k, v), go)) for _ in range(2))
        if na1d and name == "table":
            qt, kt, vt = (x.detach().transpose(1, 2) for x in (q, k, v))

            def sdpa():
                with torch.no_grad():
                    return F.scaled_dot_product_attention(qt, kt, vt)

            row["sdpa_dense_fwd_ms"] = min(graph_ms(sdpa) for _ in range(3))

    L, K = 32768, 2048
    run_case("na1d", L, 1, K, True, 4.0 * D * L * K)
    if swa:
        L2, W = 65536, 1024
        run_case("swa", L2, 16, W, False, 4.0 * 16 * D * L2 * W - 2.0 * 16 * D * W * W)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", default=None)
    ap.add_argument("--swa", action="store_true")
    ap.add_argument("--bwd", action="store_true")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--timeout", type=float, default=150.0)
    args = ap.parse_args()
    if args.child is not None:
        print("ROW " + json.dumps(child(args.child, args.swa, args.bwd)), flush=True)
        return 0
    from mnemotorch.bench.block_sparse import device_info

    out = os.path.join(os.environ["OUT"], "diag_ws.json") if os.environ.get("OUT") else None
    rep = {"device": device_info(), "argv": sys.argv[1:], "rows": []}
    for name in args.variants.split(","):
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--child", name] + (["--swa"] if args.swa else []) + (["--bwd"] if args.bwd else [])
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            rows = [json.loads(x[4:]) for x in p.stdout.splitlines() if x.startswith("ROW ")]
            row = rows[0] if rows else {"variant": name, "rc": p.returncode, "stderr_tail": p.stderr[-1500:]}
        except subprocess.TimeoutExpired:
            row = {"variant": name, "error": "timeout"}
        row["wall_s"] = time.perf_counter() - t0
        rep["rows"].append(row)
        print(json.dumps(row), flush=True)
        if out:
            with open(out, "w") as f:
                json.dump(rep, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
