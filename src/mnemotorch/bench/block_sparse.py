"""Speed benchmark of the block-sparse attention kernel against SDPA and FlexAttention (GPU).

Each case runs every implementation in this process on the same inputs (same values; each in its
native layout), reports the median of device-event timings after warm-up for the forward and the
forward+backward, the peak memory, the effective TFLOP/s on computed blocks and on allowed pairs,
and the ratio against each peer. Usage: ``python -m mnemotorch.bench.block_sparse --out results.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F


def device_info() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
            ).stdout.strip().splitlines()[0]
        except Exception:  # pragma: no cover - informational only
            info["driver"] = None
    return info


def median_ms(fn: Callable[[], object], warmup: int = 5, rep: int = 20) -> float:
    """Median wall time of ``fn`` on the device, in ms (CUDA events around each call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def measure(fwd: Callable[[], torch.Tensor], grad_out: torch.Tensor, params: list[torch.Tensor]) -> dict:
    def fwd_bwd():
        out = fwd()
        torch.autograd.grad(out, params, grad_out)

    with torch.no_grad():
        t_f = median_ms(fwd)
    fwd_bwd()  # warm-up: compilation/autotuning buffers stay out of the peak reading
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    t_fb = median_ms(fwd_bwd)
    return {"fwd_ms": t_f, "fwd_bwd_ms": t_fb, "peak_extra_gib": peak}


def sliding_window_case(L: int, W: int, D: int, H: int = 16, B: int = 1, dtype=torch.bfloat16, peers=("sdpa", "flex")) -> dict:
    from mnemotorch.ops.block_sparse import block_sparse_attention, sliding_window_pattern

    dev = "cuda"
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, L, H, D, device=dev, dtype=dtype) for _ in range(3))
    g = torch.randn(B, L, H, D, device=dev, dtype=dtype)
    t0 = time.perf_counter()
    pattern = sliding_window_pattern(L, W, device=dev)
    build_s = time.perf_counter() - t0
    row = {"case": "sliding_window", "L": L, "W": W, "D": D, "H": H, "B": B, "dtype": str(dtype).replace("torch.", ""),
           "pattern_build_s": build_s, "computed_pairs": pattern.computed_pairs(), "allowed_pairs": pattern.allowed_pairs()}
    flops_computed = 4 * B * H * D * row["computed_pairs"]
    flops_allowed = 4 * B * H * D * row["allowed_pairs"]
    res = {}
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    res["ours"] = measure(lambda: block_sparse_attention(qs, ks, vs, pattern), g, [qs, ks, vs])
    print(f"  ours L={L} W={W} D={D}: {res['ours']} (build {build_s:.1f}s)", flush=True)
    # BHLD layout for the peers (their native layout), same values
    qt, kt, vt = (t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    gt = g.transpose(1, 2).contiguous()
    if "sdpa" in peers:
        res["sdpa_dense_causal"] = measure(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True), gt, [qt, kt, vt])
        print(f"  sdpa: {res['sdpa_dense_causal']}", flush=True)
    if "flex" in peers:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            def swa(b, h, qi, ki):
                return (qi >= ki) & (qi - ki < W)

            bm = create_block_mask(swa, B=None, H=None, Q_LEN=L, KV_LEN=L, device=dev, _compile=True)
            flex = torch.compile(flex_attention)
            print("  flex: block mask built", flush=True)
            res["flex"] = measure(lambda: flex(qt, kt, vt, block_mask=bm), gt, [qt, kt, vt])
            print(f"  flex: {res['flex']}", flush=True)
            # correctness against Flex on the same inputs
            with torch.no_grad():
                ours = block_sparse_attention(q, k, v, pattern).float()
                theirs = flex(qt, kt, vt, block_mask=bm).transpose(1, 2).float()
            row["rel_diff_vs_flex"] = ((ours - theirs).norm() / theirs.norm()).item()
        except Exception as exc:  # a peer failing must not stop the benchmark
            res["flex"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    for name, r in res.items():
        if "fwd_ms" in r:
            r["fwd_tflops_computed"] = flops_computed / (r["fwd_ms"] * 1e-3) / 1e12 if name == "ours" else None
            r["fwd_tflops_allowed"] = flops_allowed / (r["fwd_ms"] * 1e-3) / 1e12
            r["fwd_bwd_tflops_allowed"] = 3.5 * flops_allowed / (r["fwd_bwd_ms"] * 1e-3) / 1e12
    if "fwd_ms" in res["ours"]:
        for name, r in res.items():
            if name != "ours" and "fwd_ms" in r:
                row[f"speedup_fwd_vs_{name}"] = r["fwd_ms"] / res["ours"]["fwd_ms"]
                row[f"speedup_fwd_bwd_vs_{name}"] = r["fwd_bwd_ms"] / res["ours"]["fwd_bwd_ms"]
    row["results"] = res
    return row


def correctness_case(L: int, W: int, D: int, H: int = 4, HKV: int = 2, dtype=torch.bfloat16) -> dict:
    """Kernel vs float64 reference on the GPU, outputs and gradients, NaN-poisoned grads."""
    from mnemotorch.ops.block_sparse import block_sparse_attention, block_sparse_attention_reference, sliding_window_pattern

    torch.manual_seed(1)
    pat = sliding_window_pattern(L, W, device="cuda")
    q = torch.randn(2, L, H, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(2, L, HKV, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(2, L, HKV, D, device="cuda", dtype=dtype, requires_grad=True)
    out = block_sparse_attention(q, k, v, pat, backend="triton")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = block_sparse_attention_reference(qd, kd, vd, pat)
    rgrads = torch.autograd.grad(ref, (qd, kd, vd), g.double())

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    return {"L": L, "W": W, "D": D, "dtype": str(dtype).replace("torch.", ""), "out": rel(out, ref),
            "dq": rel(grads[0], rgrads[0]), "dk": rel(grads[1], rgrads[1]), "dv": rel(grads[2], rgrads[2]),
            "nan": bool(any(torch.isnan(t).any() for t in (out, *grads)))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="block_sparse_bench.json")
    ap.add_argument("--quick", action="store_true", help="one small case")
    ap.add_argument("--lengths", default="16384,65536")
    ap.add_argument("--windows", default="1024,4096")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--peers", default="sdpa,flex")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("block_sparse benchmark needs a CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    report = {"env": device_info(), "correctness": [], "speed": []}
    checks = () if args.skip_correctness else ((1000, 300, 64, torch.float32), (1000, 300, 64, torch.bfloat16), (2048, 512, 128, torch.bfloat16))
    for (L, W, D, dtype) in checks:
        t0 = time.perf_counter()
        c = correctness_case(L, W, D, dtype=dtype)
        c["seconds"] = time.perf_counter() - t0
        report["correctness"].append(c)
        print("correctness", c, flush=True)
    cases = [(4096, 1024, 64)] if args.quick else [
        (L, W, D) for L in map(int, args.lengths.split(",")) for W in map(int, args.windows.split(",")) for D in map(int, args.dims.split(","))
    ]
    for L, W, D in cases:
        t0 = time.perf_counter()
        row = sliding_window_case(L, W, D, peers=tuple(args.peers.split(",")))
        row["seconds"] = time.perf_counter() - t0
        report["speed"].append(row)
        r = row["results"]
        line = f"SWA L={L} W={W} D={D}: ours {r['ours']['fwd_ms']:.3f}/{r['ours']['fwd_bwd_ms']:.3f} ms " \
               f"({r['ours']['fwd_tflops_computed']:.0f} TF/s computed, peak {r['ours']['peak_extra_gib']:.2f} GiB)"
        for peer in ("flex", "sdpa_dense_causal"):
            if peer in r and "fwd_ms" in r[peer]:
                line += f" | {peer} {r[peer]['fwd_ms']:.3f}/{r[peer]['fwd_bwd_ms']:.3f} ms peak {r[peer]['peak_extra_gib']:.2f} " \
                        f"x{row[f'speedup_fwd_vs_{peer}']:.2f}/x{row[f'speedup_fwd_bwd_vs_{peer}']:.2f}"
            elif peer in r:
                line += f" | {peer} {r[peer]}"
        print(line, f"[{row['seconds']:.0f}s]", flush=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
