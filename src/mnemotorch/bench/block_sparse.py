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


def wall_median_ms(fn: Callable[[], object], warmup: int = 5, rep: int = 20) -> float:
    """Median wall-clock time of ``fn`` in ms (CPU runs, where there are no device events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def median_ms(fn: Callable[[], object], warmup: int = 5, rep: int = 20) -> float:
    """Median wall time of ``fn`` on the device, in ms (CUDA events around each call).

    Slow cases (> 50 ms a call, e.g. dense attention at 128K) take 2 warm-ups and 5 timed calls.
    """
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    if time.perf_counter() - t0 > 0.05:
        warmup, rep = 1, 5
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


def sliding_window_case(L: int, W: int, D: int, H: int = 16, B: int = 1, dtype=torch.bfloat16, peers=("sdpa", "flex"),
                        blocks: tuple[tuple[int, int], ...] = ((128, 64),)) -> dict:
    from mnemotorch.ops.block_sparse import block_sparse_attention, sliding_window_pattern

    dev = "cuda"
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, L, H, D, device=dev, dtype=dtype) for _ in range(3))
    g = torch.randn(B, L, H, D, device=dev, dtype=dtype)
    t0 = time.perf_counter()
    pattern = sliding_window_pattern(L, W, q_block=blocks[0][0], k_block=blocks[0][1], device=dev)
    build_s = time.perf_counter() - t0
    row = {"case": "sliding_window", "L": L, "W": W, "D": D, "H": H, "B": B, "dtype": str(dtype).replace("torch.", ""),
           "pattern_build_s": build_s, "computed_pairs": pattern.computed_pairs(), "allowed_pairs": pattern.allowed_pairs()}
    res = {}
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    res["ours"] = measure(lambda: block_sparse_attention(qs, ks, vs, pattern), g, [qs, ks, vs])
    res["ours"]["blocks"] = list(blocks[0])
    print(f"  ours L={L} W={W} D={D} blocks {blocks[0]}: {res['ours']} (build {build_s:.1f}s)", flush=True)
    for qb_, kb_ in blocks[1:]:  # other pattern tile sizes, ours only
        alt = sliding_window_pattern(L, W, q_block=qb_, k_block=kb_, device=dev)
        name = f"ours_{qb_}x{kb_}"
        res[name] = measure(lambda: block_sparse_attention(qs, ks, vs, alt), g, [qs, ks, vs])
        res[name]["blocks"] = [qb_, kb_]
        print(f"  {name}: {res[name]}", flush=True)
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
    return _rate_and_ratios(row, res, row["computed_pairs"], row["allowed_pairs"], B, H, D)


def _rate_and_ratios(row: dict, res: dict, computed_pairs: int, allowed_pairs: int, B: int, H: int, D: int) -> dict:
    flops_computed = 4 * B * H * D * computed_pairs
    flops_allowed = 4 * B * H * D * allowed_pairs
    for name, r in res.items():
        if "fwd_ms" in r:
            r["fwd_tflops_computed"] = flops_computed / (r["fwd_ms"] * 1e-3) / 1e12 if name.startswith("ours") else None
            r["fwd_tflops_allowed"] = flops_allowed / (r["fwd_ms"] * 1e-3) / 1e12
            r["fwd_bwd_tflops_allowed"] = 3.5 * flops_allowed / (r["fwd_bwd_ms"] * 1e-3) / 1e12
    if "fwd_ms" in res.get("ours", {}):
        for name, r in res.items():
            if not name.startswith("ours") and "fwd_ms" in r:
                row[f"speedup_fwd_vs_{name}"] = r["fwd_ms"] / res["ours"]["fwd_ms"]
                row[f"speedup_fwd_bwd_vs_{name}"] = r["fwd_bwd_ms"] / res["ours"]["fwd_bwd_ms"]
    row["results"] = res
    return row


def _flex(res: dict, name: str, mask_mod, L: int, qt, kt, vt, gt) -> None:
    """FlexAttention (compiled, compiled block-mask build) on BHLD tensors, recorded under ``name``."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        bm = create_block_mask(mask_mod, B=None, H=None, Q_LEN=L, KV_LEN=L, device="cuda", _compile=True)
        flex = torch.compile(flex_attention)
        res[name] = measure(lambda: flex(qt, kt, vt, block_mask=bm), gt, [qt, kt, vt])
        print(f"  {name}: {res[name]}", flush=True)
    except Exception as exc:  # a peer failing must not stop the benchmark
        res[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def neighborhood_case(shape: tuple[int, ...], kernel_size: int, D: int, H: int, B: int = 1, dtype=torch.bfloat16,
                      tile_shape=None, peers=("sdpa", "flex"), q_block=None, k_block=None, alternatives=()) -> dict:
    """NATTEN-semantics neighborhood attention (non-causal, dilation 1) in 1-D or 2-D.

    Ours runs on tokens permuted into tiles (2-D) and the timing includes the permutation of q/k/v and
    the inverse permutation of the output, as a module on row-major tokens pays it. Flex runs on
    row-major tokens with the same mask; SDPA is dense (non-causal) attention over all tokens.
    ``alternatives``: other ``(tile_shape, q_block, k_block)`` timed for ours only.
    """
    from mnemotorch.ops.block_sparse import block_sparse_attention, neighborhood_pattern

    L = 1
    for n in shape:
        L *= n
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=dtype) for _ in range(3))
    g = torch.randn(B, L, H, D, device="cuda", dtype=dtype)
    t0 = time.perf_counter()
    pp = neighborhood_pattern(tuple(shape), kernel_size, tile_shape=tile_shape, q_block=q_block, k_block=k_block, device="cuda")
    build_s = time.perf_counter() - t0
    pat = pp.pattern
    row = {"case": f"neighborhood_{len(shape)}d", "shape": list(shape), "kernel_size": kernel_size, "L": L, "D": D, "H": H, "B": B,
           "tile_shape": list(tile_shape) if tile_shape else None, "dtype": str(dtype).replace("torch.", ""),
           "pattern_build_s": build_s, "computed_pairs": pat.computed_pairs(), "allowed_pairs": pat.allowed_pairs()}
    res: dict = {}
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))

    def ours():
        out = block_sparse_attention(pp.permute(qs), pp.permute(ks), pp.permute(vs), pat)
        return pp.unpermute(out)

    res["ours"] = measure(ours, g, [qs, ks, vs])
    res["ours"]["blocks"] = [pat.q_block, pat.k_block]
    print(f"  ours {row['case']} {shape} k={kernel_size}: {res['ours']} (build {build_s:.1f}s)", flush=True)
    for alt_tile, alt_q, alt_k in alternatives:
        alt = neighborhood_pattern(tuple(shape), kernel_size, tile_shape=alt_tile, q_block=alt_q, k_block=alt_k, device="cuda")
        name = f"ours_tile{'x'.join(map(str, alt_tile or ()))}_{alt.pattern.q_block}x{alt.pattern.k_block}"

        def ours_alt(alt=alt):
            return alt.unpermute(block_sparse_attention(alt.permute(qs), alt.permute(ks), alt.permute(vs), alt.pattern))

        res[name] = measure(ours_alt, g, [qs, ks, vs])
        res[name]["computed_pairs"] = alt.pattern.computed_pairs()
        print(f"  {name}: {res[name]}", flush=True)
    qt, kt, vt = (t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    gt = g.transpose(1, 2).contiguous()
    if "sdpa" in peers:
        res["sdpa_dense"] = measure(lambda: F.scaled_dot_product_attention(qt, kt, vt), gt, [qt, kt, vt])
        print(f"  sdpa dense: {res['sdpa_dense']}", flush=True)
    if "flex" in peers:
        K = kernel_size
        if len(shape) == 1:
            def mask_mod(b, h, qi, ki):
                start = torch.clamp(qi - K // 2, 0, L - K)
                return (ki >= start) & (ki < start + K)
        else:
            R, C = shape

            def mask_mod(b, h, qi, ki):
                qy, qx, ky, kx = qi // C, qi % C, ki // C, ki % C
                sy = torch.clamp(qy - K // 2, 0, R - K)
                sx = torch.clamp(qx - K // 2, 0, C - K)
                return (ky >= sy) & (ky < sy + K) & (kx >= sx) & (kx < sx + K)
        _flex(res, "flex_row_major", mask_mod, L, qt, kt, vt, gt)
    return _rate_and_ratios(row, res, row["computed_pairs"], row["allowed_pairs"], B, H, D)


def power_case(L: int, D: int = 128, H: int = 16, B: int = 1, dtype=torch.bfloat16, block_size: int = 256,
               window_blocks: int = 5, sink_blocks: int = 1, peers=("sdpa",)) -> dict:
    """PowerAttention (paper setting: 256-token blocks, 5 window blocks, 1 sink block) vs dense causal SDPA."""
    from mnemotorch.ops.block_sparse import block_sparse_attention, power_pattern

    torch.manual_seed(0)
    q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=dtype) for _ in range(3))
    g = torch.randn(B, L, H, D, device="cuda", dtype=dtype)
    t0 = time.perf_counter()
    pat = power_pattern(L, block_size, window_blocks, sink_blocks, device="cuda")
    build_s = time.perf_counter() - t0
    row = {"case": "power", "L": L, "D": D, "H": H, "B": B, "block_size": block_size, "window_blocks": window_blocks,
           "sink_blocks": sink_blocks, "dtype": str(dtype).replace("torch.", ""), "pattern_build_s": build_s,
           "computed_pairs": pat.computed_pairs(), "allowed_pairs": pat.allowed_pairs()}
    res: dict = {}
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    res["ours"] = measure(lambda: block_sparse_attention(qs, ks, vs, pat), g, [qs, ks, vs])
    print(f"  ours power L={L}: {res['ours']} (build {build_s:.1f}s)", flush=True)
    if "sdpa" in peers:
        qt, kt, vt = (t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        gt = g.transpose(1, 2).contiguous()
        res["sdpa_dense_causal"] = measure(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True), gt, [qt, kt, vt])
        print(f"  sdpa dense causal: {res['sdpa_dense_causal']}", flush=True)
    return _rate_and_ratios(row, res, row["computed_pairs"], row["allowed_pairs"], B, H, D)


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


def _line(row: dict) -> str:
    r = row["results"]
    o = r["ours"]
    line = f"{row['case']} L={row['L']} D={row['D']}" + (f" W={row['W']}" if "W" in row else "") + \
        f": ours {o['fwd_ms']:.3f}/{o['fwd_bwd_ms']:.3f} ms ({o['fwd_tflops_computed']:.0f} TF/s computed, peak {o['peak_extra_gib']:.2f} GiB)"
    for peer, x in r.items():
        if peer == "ours":
            continue
        if "fwd_ms" in x and not peer.startswith("ours"):
            line += f" | {peer} {x['fwd_ms']:.3f}/{x['fwd_bwd_ms']:.3f} ms peak {x['peak_extra_gib']:.2f} " \
                    f"x{row[f'speedup_fwd_vs_{peer}']:.2f}/x{row[f'speedup_fwd_bwd_vs_{peer}']:.2f}"
        elif "fwd_ms" in x:
            line += f" | {peer} {x['fwd_ms']:.3f}/{x['fwd_bwd_ms']:.3f} ms"
        else:
            line += f" | {peer} {x}"
    return line


def main(argv: list[str] | None = None) -> int:
    """``mnemo bench kernels -- [--cases swa,na1d,na2d,power] [--quick] [--out F] ...`` (CUDA only)."""
    ap = argparse.ArgumentParser(prog="mnemo bench kernels", description=__doc__)
    ap.add_argument("--out", default="block_sparse_bench.json")
    ap.add_argument("--quick", action="store_true", help="one small sliding-window case")
    ap.add_argument("--cases", default="swa,na1d,na2d,power", help="comma list of swa, na1d, na2d, power")
    ap.add_argument("--lengths", default="16384,65536", help="sliding window: sequence lengths")
    ap.add_argument("--windows", default="1024,4096", help="sliding window: window sizes")
    ap.add_argument("--dims", default="64,128", help="sliding window: head dims")
    ap.add_argument("--blocks", default="128x64", help="sliding window: pattern tiles QxK; extra entries are timed for ours only")
    ap.add_argument("--power-lengths", default="65536,131072")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--correctness-dtypes", default="float32,bfloat16", help="dtypes of the kernel-vs-float64 checks")
    ap.add_argument("--peers", default="sdpa,flex")
    ap.add_argument("--time-budget", type=float, default=None, help="start no new case after this many seconds")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("block_sparse benchmark needs a CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    t_start = time.perf_counter()
    report = {"env": device_info(), "argv": list(argv or []), "correctness": [], "speed": []}
    checks = () if args.skip_correctness else ((1000, 300, 64, torch.float32), (1000, 300, 64, torch.bfloat16), (2048, 512, 128, torch.bfloat16))
    checks = tuple(c for c in checks if str(c[3]).replace("torch.", "") in args.correctness_dtypes.split(","))
    for (L, W, D, dtype) in checks:
        t0 = time.perf_counter()
        c = correctness_case(L, W, D, dtype=dtype)
        c["seconds"] = time.perf_counter() - t0
        report["correctness"].append(c)
        print("correctness", c, flush=True)
    peers = tuple(args.peers.split(","))
    blocks = tuple(tuple(int(x) for x in b.split("x")) for b in args.blocks.split(","))
    kinds = args.cases.split(",")
    jobs: list = []
    if args.quick:
        jobs.append(lambda: sliding_window_case(4096, 1024, 64, peers=peers, blocks=blocks))
    else:
        if "swa" in kinds:
            for L in map(int, args.lengths.split(",")):
                for W in map(int, args.windows.split(",")):
                    for D in map(int, args.dims.split(",")):
                        jobs.append(lambda L=L, W=W, D=D: sliding_window_case(L, W, D, peers=peers, blocks=blocks))
        if "na1d" in kinds:  # the case: L = 32K, kernel 2048, D = 128, H = 1
            jobs.append(lambda: neighborhood_case((32768,), 2048, 128, 1, peers=peers, alternatives=((None, 128, 128),)))
        if "na2d" in kinds:  # 128 x 128 tokens, kernel 13 x 13, D = 64, H = 16; tiles of 8 x 8 tokens
            jobs.append(lambda: neighborhood_case((128, 128), 13, 64, 16, tile_shape=(8, 8), q_block=64, k_block=64, peers=peers,
                                                  alternatives=(((16, 8), 128, 64), ((8, 16), 128, 64))))
        if "power" in kinds:
            for L in map(int, args.power_lengths.split(",")):
                jobs.append(lambda L=L: power_case(L, peers=tuple(p for p in peers if p == "sdpa")))
    for job in jobs:
        if args.time_budget is not None and time.perf_counter() - t_start > args.time_budget:
            report["stopped_early"] = True
            print("time budget reached; remaining cases not run", flush=True)
            break
        t0 = time.perf_counter()
        try:
            row = job()
        except Exception as exc:  # record and go on
            row = {"case": "error", "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            print(row, flush=True)
        row["seconds"] = time.perf_counter() - t0
        report["speed"].append(row)
        if "results" in row:
            print(_line(row), f"[{row['seconds']:.0f}s]", flush=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    from mnemotorch.ops.block_sparse.triton import tuned_configs

    report["tuned_configs"] = tuned_configs()
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
