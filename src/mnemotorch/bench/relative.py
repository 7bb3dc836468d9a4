"""Speed and peak memory of the fused relative-attention kernel vs the naive skew and dense SDPA (GPU).

For each sequence length the same inputs go through three implementations in this process:

* ``kernel`` -- ``relative_attention(..., backend="triton")``: the E band loaded per tile, O(L D);
* ``naive_skew`` -- the reference's skewing procedure in plain PyTorch (``Q E^T``, pad, reshape,
  slice, masked softmax): several ``L x L`` matrices per head, the memory the kernel avoids;
* ``sdpa`` -- dense causal ``scaled_dot_product_attention`` *without* the relative term: the speed a
  relative kernel is up against (what the relative logits cost on top of plain attention).

Reported per case: the median of device-event timings after warm-up for the forward and the
forward + backward, the peak memory above the inputs during forward + backward (GiB), and the
kernel's ratios. ``R = max_distance``: ``--max-distances full`` means ``R = L - 1`` (Music
Transformer's table over all relative positions; no far tiles), a number clips (most tiles are far).
A naive skew that runs out of memory is recorded as ``"oom"``.

Usage: ``mnemo bench relative -- --out relative.json`` or ``python -m mnemotorch.bench.relative --quick``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from .block_sparse import device_info, measure


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def correctness_case(L: int, R: int, D: int, H: int = 4, dtype=torch.bfloat16) -> dict:
    """Kernel vs the float64 reference (outputs and the gradients of q, k, v, rel_emb)."""
    from mnemotorch.ops.relative import relative_attention, relative_attention_reference

    g = torch.Generator(device="cuda").manual_seed(0)
    base = [torch.randn(s, device="cuda", dtype=torch.float64, generator=g) for s in ((1, L, H, D),) * 3 + ((H, R + 1, D),)]
    go = torch.randn(1, L, H, D, device="cuda", dtype=torch.float64, generator=g)
    lo = [x.to(dtype).requires_grad_() for x in base]
    out = relative_attention(*lo, backend="triton")
    grads = torch.autograd.grad(out, lo, go.to(dtype))
    hi = [x.detach().double().requires_grad_() for x in lo]
    ref = relative_attention_reference(*hi)
    ref_grads = torch.autograd.grad(ref, hi, go.to(dtype).double())
    row = {"case": "correctness", "L": L, "R": R, "D": D, "H": H, "dtype": str(dtype).replace("torch.", ""), "out": _rel(out, ref)}
    row.update({f"d{n}": _rel(a, b) for n, a, b in zip(("q", "k", "v", "rel_emb"), grads, ref_grads)})
    return row


def _try(fn) -> dict:
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"error": "oom"}


def speed_case(L: int, R: int | None, D: int, H: int, B: int = 1, dtype=torch.bfloat16, peers=("naive_skew", "sdpa")) -> dict:
    """One shape: the kernel and each peer on the same inputs. ``R=None`` means ``L - 1``."""
    from mnemotorch.ops.relative import relative_attention, relative_attention_reference

    R = L - 1 if R is None else R
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    e = (0.1 * torch.randn(H, R + 1, D, device="cuda", dtype=torch.float32, generator=g)).to(dtype)
    go = torch.randn(B, L, H, D, device="cuda", dtype=dtype, generator=g)
    leaves = [x.requires_grad_() for x in (q, k, v, e)]
    row: dict = {"case": "relative", "L": L, "R": R, "D": D, "H": H, "B": B, "dtype": str(dtype).replace("torch.", ""), "results": {}}
    res = row["results"]
    res["kernel"] = _try(lambda: measure(lambda: relative_attention(*leaves, backend="triton"), go, leaves))
    if "naive_skew" in peers:
        res["naive_skew"] = _try(lambda: measure(lambda: relative_attention_reference(*leaves, form="skew"), go, leaves))
    if "sdpa" in peers:
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        res["sdpa"] = _try(lambda: measure(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True), go.transpose(1, 2), [qt, kt, vt]))
    ours = res["kernel"]
    if "fwd_ms" in ours:
        # attention FLOPs of the causal half (q.k and p.v), as counted for SDPA; the relative term is extra
        flops = 2 * 2 * B * H * D * L * L / 2
        ours["fwd_tflops_attention"] = flops / (ours["fwd_ms"] * 1e-3) / 1e12
        for name, peer in res.items():
            if name != "kernel" and "fwd_ms" in peer:
                ours[f"speedup_fwd_vs_{name}"] = peer["fwd_ms"] / ours["fwd_ms"]
                ours[f"speedup_fwd_bwd_vs_{name}"] = peer["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
                ours[f"memory_ratio_vs_{name}"] = peer["peak_extra_gib"] / max(ours["peak_extra_gib"], 1e-9)
    return row


def _line(row: dict) -> str:
    head = f"L={row['L']} R={row['R']} D={row['D']} H={row['H']} {row['dtype']}"
    parts = []
    for name, x in row["results"].items():
        if "fwd_ms" in x:
            parts.append(f"{name} {x['fwd_ms']:.2f}/{x['fwd_bwd_ms']:.2f} ms peak {x['peak_extra_gib']:.3f} GiB")
        else:
            parts.append(f"{name} {x.get('error')}")
    return head + ": " + " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """``mnemo bench relative -- [--lengths 4096,8192,16384] [--max-distances full,512] [--quick] [--out F]``."""
    ap = argparse.ArgumentParser(prog="mnemo bench relative", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="relative_bench.json")
    ap.add_argument("--quick", action="store_true", help="one case: L = 4096, R = L - 1")
    ap.add_argument("--lengths", default="4096,8192,16384")
    ap.add_argument("--max-distances", default="full,512", help="comma list: 'full' (R = L - 1) or integers")
    ap.add_argument("--dim", type=int, default=64, help="head dim")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--peers", default="naive_skew,sdpa")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--time-budget", type=float, default=None, help="start no new case after this many seconds")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("relative benchmark needs a CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    t_start = time.perf_counter()
    report: dict = {"env": device_info(), "argv": list(argv or []), "correctness": [], "speed": []}
    if not args.skip_correctness:
        for (L, R, D, dt) in ((1024, 1023, 64, torch.float32), (2048, 256, 64, torch.bfloat16), (2048, 2047, 128, torch.bfloat16)):
            c = correctness_case(L, R, D, dtype=dt)
            report["correctness"].append(c)
            print("correctness", c, flush=True)
    lengths = [4096] if args.quick else [int(x) for x in args.lengths.split(",")]
    dists = ["full"] if args.quick else args.max_distances.split(",")
    peers = tuple(p for p in args.peers.split(",") if p)
    for L in lengths:
        for r in dists:
            if args.time_budget is not None and time.perf_counter() - t_start > args.time_budget:
                report["stopped_early"] = True
                print("time budget reached; remaining cases not run", flush=True)
                break
            t0 = time.perf_counter()
            R = None if r == "full" else int(r)
            try:
                row = speed_case(L, R, args.dim, args.heads, args.batch, dtype, peers)
            except Exception as exc:  # record and go on
                row = {"case": "error", "L": L, "R": r, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            row["seconds"] = time.perf_counter() - t0
            report["speed"].append(row)
            print(_line(row) if "results" in row else row, f"[{row['seconds']:.0f}s]", flush=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
    from mnemotorch.ops.relative.triton import tuned_configs

    report["tuned_configs"] = tuned_configs()
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
