"""Speed benchmark of the linear-attention Triton kernels against fla and dense SDPA (GPU).

Rows (B = 1, H = 16, bf16, median of CUDA-event timings after warm-up, forward and
forward+backward, peak extra memory of the forward+backward):

* ``linear``: our chunked linear attention (D = 128, identity features, normalised and not) vs
  fla's ``chunk_linear_attn`` (``fla.ops.linear_attn``; its q is scaled by ``D^-1/2``, so ours gets
  the same pre-scaled q);
* ``based``: our Taylor linear attention (Dqk = 16, Dv = 64, normalised) vs fla's
  ``fused_chunk_based`` (``fla.ops.based``), and dense causal SDPA at D = 64;
* ``decode``: batched decoding (batch 128, H = 16) with the one-token step kernel, tokens/s at
  several context lengths (the state does not grow, so neither does the time) and the state bytes;
* ``lla``: Local Linear Attention through its Triton CG kernels (D = 64, λ = 1, ``--lla-iters``
  CG iterations, 32 by default, in the forward and again in the backward's adjoint solve) vs dense
  causal SDPA at D = 64, with the ratio LLA / SDPA and, once per run, the relative error of the
  kernels against the float64 solve path at L = 1024 (B = 1, H = 4, bf16 inputs).

fla is optional: without it, its rows are skipped. ``--quick`` runs one small length.
Usage: ``python -m mnemotorch.bench.linear_attention --out linear.json`` or
``mnemo bench linear -- --quick``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from .block_sparse import median_ms


def _measure(fwd: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> dict:
    """Median fwd and fwd+bwd times (ms) and the peak extra memory of one fwd+bwd (GiB)."""
    out = fwd()
    grad = torch.randn_like(out)

    def fwd_bwd():
        torch.autograd.grad(fwd(), params, grad)

    try:
        with torch.no_grad():
            t_f = median_ms(fwd)
        fwd_bwd()  # warm-up (autotuning buffers stay out of the peak)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        return {"fwd_ms": t_f, "fwd_bwd_ms": median_ms(fwd_bwd), "peak_extra_gib": peak}
    except Exception as exc:  # a failing implementation must not stop the benchmark
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def _inputs(L: int, H: int, dk: int, dv: int, scale: float = 1.0, B: int = 1, dtype=torch.bfloat16):
    torch.manual_seed(0)
    q = (torch.randn(B, L, H, dk, device="cuda") * scale).to(dtype).requires_grad_()
    k = (torch.randn(B, L, H, dk, device="cuda") * scale).to(dtype).requires_grad_()
    v = torch.randn(B, L, H, dv, device="cuda").to(dtype).requires_grad_()
    return q, k, v


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def linear_case(L: int, H: int = 16, D: int = 128, normalize: bool = False) -> dict:
    """Plain chunked linear attention (identity φ) vs fla ``chunk_linear_attn``, same inputs."""
    from mnemotorch.ops.linear.triton import linear_attention_triton

    q, k, v = _inputs(L, H, D, D, scale=D**-0.25)
    row: dict = {"case": "linear", "L": L, "H": H, "D": D, "normalize": normalize, "results": {}}
    res = row["results"]
    # fla scales q by D^-1/2 inside; ours gets that scaled q (made once, outside the timing), so
    # both compute one function on the same values.
    q_scaled = (q * D**-0.5).detach().requires_grad_()
    # no final state, as fla's call below (output_final_state=False is its default); the forward is
    # timed under no_grad, where "auto" takes the one-pass forward, fwd+bwd the two-pass one
    ours = lambda: linear_attention_triton(q_scaled, k, v, "identity", normalize, output_final_state=False)[0]  # noqa: E731
    res["ours"] = _measure(ours, [q_scaled, k, v])
    try:
        from fla.ops.linear_attn import chunk_linear_attn

        fla = lambda: chunk_linear_attn(q, k, v, normalize=normalize)[0]  # noqa: E731
        res["fla_chunk_linear_attn"] = _measure(fla, [q, k, v])
        with torch.no_grad():
            row["rel_diff_vs_fla"] = _rel(ours(), fla())
    except ImportError:
        res["fla_chunk_linear_attn"] = {"skipped": "fla not installed"}
    except Exception as exc:
        res["fla_chunk_linear_attn"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return row


def based_case(L: int, H: int = 16, dk: int = 16, dv: int = 64, sdpa: bool = True) -> dict:
    """BASED Taylor linear attention vs fla ``fused_chunk_based`` and dense causal SDPA (D = Dv)."""
    from mnemotorch.ops.linear.triton import linear_attention_triton

    q, k, v = _inputs(L, H, dk, dv, scale=0.5)
    row: dict = {"case": "based", "L": L, "H": H, "Dqk": dk, "Dv": dv, "results": {}}
    res = row["results"]
    ours = lambda: linear_attention_triton(q, k, v, "taylor", True, output_final_state=False)[0]  # noqa: E731 (fla returns no state either)
    res["ours"] = _measure(ours, [q, k, v])
    try:
        from fla.ops.based import fused_chunk_based

        fla = lambda: fused_chunk_based(q, k, v, use_norm=True)  # noqa: E731
        res["fla_fused_chunk_based"] = _measure(fla, [q, k, v])
        with torch.no_grad():
            row["rel_diff_vs_fla"] = _rel(ours(), fla())
    except ImportError:
        res["fla_fused_chunk_based"] = {"skipped": "fla not installed"}
    except Exception as exc:
        res["fla_fused_chunk_based"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    if sdpa:
        qs, ks, vs = (torch.randn(1, H, L, dv, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        res["sdpa_dense_causal_D64"] = _measure(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True), [qs, ks, vs])
    return row


def decode_case(context: int, batch: int = 128, H: int = 16, feature: str = "taylor", dk: int = 16, dv: int = 64, steps: int = 50) -> dict:
    """Tokens/s of the step kernel for ``batch`` sequences whose state already holds ``context`` tokens."""
    from mnemotorch.ops.linear.triton import linear_attention_step_triton, linear_attention_triton

    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    # Prefill a short prompt with the chunked kernel, then pretend it saw `context` tokens: the
    # state has the same size whatever the context, which is the point being measured.
    q, k, v = (torch.randn(batch, 64, H, d, device=dev, dtype=dt) * 0.5 for d in (dk, dk, dv))
    with torch.no_grad():
        _, (s, z) = linear_attention_triton(q, k, v, feature, True)
    s, z = s * (context / 64), z * (context / 64)
    xq, xk = (torch.randn(batch, H, dk, device=dev, dtype=dt) * 0.5 for _ in range(2))
    xv = torch.randn(batch, H, dv, device=dev, dtype=dt)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()

    def step():
        return linear_attention_step_triton(xq, xk, xv, (s, z), feature, inplace=True)[0]

    ms = median_ms(lambda: [step() for _ in range(steps)], warmup=2, rep=10) / steps
    return {"case": "decode", "context": context, "batch": batch, "H": H, "feature": feature, "Dqk": dk, "Dv": dv,
            "ms_per_step": ms, "tokens_per_s": batch / (ms * 1e-3),
            "state_mib": (s.numel() + z.numel()) * 4 / 2**20,
            "peak_extra_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}


def lla_accuracy(L: int = 1024, H: int = 4, D: int = 64, cg_iters: int = 32, ridge: float = 1.0) -> dict:
    """Relative error of the kernels' output against the float64 solve path on the same bf16 inputs."""
    from mnemotorch.ops.lla import lla_reference
    from mnemotorch.ops.lla.triton import lla_cg_triton

    q, k, v = (x.detach() for x in _inputs(L, H, D, D))
    with torch.no_grad():
        out = lla_cg_triton(q, k, v, ridge, None, cg_iters)
        ref = lla_reference(q.double(), k.double(), v.double(), ridge)
    return {"L": L, "H": H, "D": D, "cg_iters": cg_iters, "ridge": ridge, "dtype": "bfloat16", "rel_err_vs_solve": _rel(out, ref)}


def lla_case(L: int, H: int = 16, D: int = 64, cg_iters: int = 32, ridge: float = 1.0, sdpa: bool = True) -> dict:
    """LLA through the Triton CG kernels vs dense causal SDPA (same B, H, L, D; bf16)."""
    from mnemotorch.ops.lla.triton import lla_cg_triton

    q, k, v = _inputs(L, H, D, D)
    row: dict = {"case": "lla", "L": L, "H": H, "D": D, "cg_iters": cg_iters, "ridge": ridge, "results": {}}
    res = row["results"]
    res["ours"] = _measure(lambda: lla_cg_triton(q, k, v, ridge, None, cg_iters), [q, k, v])
    if sdpa:
        qs, ks, vs = (torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        res["sdpa_dense_causal_D64"] = sd = _measure(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True), [qs, ks, vs])
        ours = res["ours"]
        if "fwd_ms" in ours and "fwd_ms" in sd:
            row["lla_over_sdpa_fwd"] = ours["fwd_ms"] / sd["fwd_ms"]
            row["lla_over_sdpa_fwd_bwd"] = ours["fwd_bwd_ms"] / sd["fwd_bwd_ms"]
    return row


def _fmt(r: dict) -> str:
    if "fwd_ms" in r:
        return f"{r['fwd_ms']:.3f}/{r['fwd_bwd_ms']:.3f} ms ({r['peak_extra_gib']:.2f} GiB)"
    return str(r)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="linear_attention_bench.json")
    ap.add_argument("--quick", action="store_true", help="one length (4K), fewer decode contexts")
    ap.add_argument("--lengths", default="4096,16384,65536")
    ap.add_argument("--contexts", default="1024,16384,131072,1048576", help="decode context lengths")
    ap.add_argument("--skip", default="", help="comma list of cases to skip: linear,based,decode,lla")
    ap.add_argument("--lla-lengths", default="4096,16384", help="lengths of the lla case (--quick: 4096)")
    ap.add_argument("--lla-iters", default="32", help="comma list of CG iteration counts of the lla case")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("linear_attention benchmark needs a CUDA device", file=sys.stderr)
        return 2
    from .block_sparse import device_info

    torch.backends.cuda.matmul.allow_tf32 = False
    lengths = [4096] if args.quick else [int(x) for x in args.lengths.split(",")]
    contexts = [1024, 65536] if args.quick else [int(x) for x in args.contexts.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    lla_lengths = [4096] if args.quick else [int(x) for x in args.lla_lengths.split(",")]
    lla_iters = [int(x) for x in args.lla_iters.split(",")]
    report: dict = {"env": device_info(), "speed": [], "decode": [],
                    "launches": "fixed (MNEMO_AUTOTUNE=0)" if os.environ.get("MNEMO_AUTOTUNE") == "0" else "autotuned"}

    def save():
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    for L in lengths:
        if "linear" not in skip:
            for normalize in (False, True):
                t0 = time.perf_counter()
                row = linear_case(L, normalize=normalize)
                row["seconds"] = time.perf_counter() - t0
                report["speed"].append(row)
                print(f"linear D=128 L={L} normalize={normalize}: " + " | ".join(f"{k} {_fmt(v)}" for k, v in row["results"].items()), flush=True)
                save()
        if "based" not in skip:
            t0 = time.perf_counter()
            row = based_case(L)
            row["seconds"] = time.perf_counter() - t0
            report["speed"].append(row)
            print(f"based Dqk=16 Dv=64 L={L}: " + " | ".join(f"{k} {_fmt(v)}" for k, v in row["results"].items()), flush=True)
            save()
    if "lla" not in skip:
        try:
            report["lla_accuracy"] = [lla_accuracy(cg_iters=it) for it in lla_iters]
        except Exception as exc:
            report["lla_accuracy"] = [{"error": f"{type(exc).__name__}: {str(exc)[:300]}"}]
        print("lla accuracy", report["lla_accuracy"], flush=True)
        save()
        for L in lla_lengths:
            for it in lla_iters:
                t0 = time.perf_counter()
                row = lla_case(L, cg_iters=it)
                row["seconds"] = time.perf_counter() - t0
                report["speed"].append(row)
                ratio = f" | LLA/SDPA fwd {row['lla_over_sdpa_fwd']:.1f}x fwd+bwd {row['lla_over_sdpa_fwd_bwd']:.1f}x" if "lla_over_sdpa_fwd" in row else ""
                print(f"lla D=64 L={L} cg_iters={it}: " + " | ".join(f"{k} {_fmt(v)}" for k, v in row["results"].items()) + ratio, flush=True)
                save()
    for row in report["speed"]:
        ours = row["results"]["ours"]
        for name, r in row["results"].items():
            if name != "ours" and "fwd_ms" in r and "fwd_ms" in ours:
                row[f"speedup_fwd_vs_{name}"] = r["fwd_ms"] / ours["fwd_ms"]
                row[f"speedup_fwd_bwd_vs_{name}"] = r["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
    if "decode" not in skip:
        for feature, dk in (("taylor", 16), ("elu_plus_one", 128)):
            for ctx in contexts:
                try:
                    row = decode_case(ctx, feature=feature, dk=dk, dv=64 if feature == "taylor" else 128)
                except Exception as exc:
                    row = {"case": "decode", "context": ctx, "feature": feature, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                report["decode"].append(row)
                print("decode", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
                save()
    save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
