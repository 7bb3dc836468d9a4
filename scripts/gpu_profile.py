"""Per-kernel GPU time of our fast paths and their peers (torch.profiler), to find where time goes.

Each case runs forward and forward+backward a few times under ``torch.profiler`` and reports, per
CUDA kernel name, the total device time per call, the launch count per call and the share of the
call's device time; plus the wall time per call (CUDA-event median outside the profiler). One JSON
and one text table per run:

    PYTHONPATH=src python scripts/gpu_profile.py --cases linear,based,routing,na1d --out prof.json

Cases (bf16, B = 1, H = 16 unless said): ``linear`` (identity φ, D = 128, L = 16K, ours vs fla
``chunk_linear_attn``), ``based`` (Taylor Dqk = 16, Dv = 64, L = 16K, ours vs fla
``fused_chunk_based``), ``routing`` (our routing layer, ``backend="block_sparse"``, dim 1024,
window 512, L = 8K, vs routing-transformer's ``SelfAttention``), ``na1d`` (L = 32K, kernel 2048,
D = 128, H = 1, vs dense SDPA).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import torch

from mnemotorch.bench.block_sparse import median_ms


def _kernel_table(fn, calls=3, top=14):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    agg: dict = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA"):
            t = getattr(e, "device_time", None)
            if t is None:
                t = getattr(e, "cuda_time", 0.0)
            agg[e.name][0] += t / 1000.0
            agg[e.name][1] += 1
    total = sum(v[0] for v in agg.values()) / calls
    rows = sorted(((n, v[0] / calls, v[1] / calls) for n, v in agg.items()), key=lambda r: -r[1])
    return {"device_ms_per_call": total, "kernels_per_call": sum(v[1] for v in agg.values()) / calls,
            "top": [{"name": n[:90], "ms": round(ms, 4), "launches": round(c, 1), "share": round(ms / max(total, 1e-9), 3)}
                    for n, ms, c in rows[:top]]}


def _fwd_bwd(fwd, params):
    out = fwd()
    g = torch.randn_like(out)

    def fb():
        torch.autograd.grad(fwd(), params, g)

    def f():
        with torch.no_grad():
            fwd()

    return f, fb


def _profile(name, fwd, params, report):
    try:
        f, fb = _fwd_bwd(fwd, params)
        r = {"fwd_ms": median_ms(f), "fwd_bwd_ms": median_ms(fb), "fwd": _kernel_table(f), "fwd_bwd": _kernel_table(fb)}
    except Exception as exc:  # noqa: BLE001
        r = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    report[name] = r
    print(f"\n### {name}: " + (r.get("error") or f"fwd {r['fwd_ms']:.3f} ms, fwd+bwd {r['fwd_bwd_ms']:.3f} ms"))
    for part in ("fwd", "fwd_bwd"):
        if part in r:
            t = r[part]
            print(f"  [{part}] device {t['device_ms_per_call']:.3f} ms in {t['kernels_per_call']:.0f} kernels")
            for k in t["top"]:
                print(f"    {k['ms']:8.4f} ms  x{k['launches']:<6} {100 * k['share']:5.1f}%  {k['name']}")
    torch.cuda.empty_cache()


def _qkv(L, H, dk, dv, scale=1.0):
    torch.manual_seed(0)
    mk = lambda d: (torch.randn(1, L, H, d, device="cuda") * scale).bfloat16().requires_grad_()  # noqa: E731
    return mk(dk), mk(dk), mk(dv)


def case_linear(report, L):
    from mnemotorch.ops.linear.triton import linear_attention_triton

    q, k, v = _qkv(L, 16, 128, 128, 128**-0.25)
    qs = (q * 128**-0.5).detach().requires_grad_()
    _profile(f"linear_ours_L{L}", lambda: linear_attention_triton(qs, k, v, "identity", False)[0], [qs, k, v], report)
    try:
        from fla.ops.linear_attn import chunk_linear_attn

        _profile(f"linear_fla_L{L}", lambda: chunk_linear_attn(q, k, v, normalize=False)[0], [q, k, v], report)
    except ImportError as exc:
        report[f"linear_fla_L{L}"] = {"skipped": str(exc)}


def case_based(report, L):
    from mnemotorch.ops.linear.triton import linear_attention_triton

    q, k, v = _qkv(L, 16, 16, 64, 0.5)
    _profile(f"based_ours_L{L}", lambda: linear_attention_triton(q, k, v, "taylor", True)[0], [q, k, v], report)
    try:
        from fla.ops.based import fused_chunk_based

        _profile(f"based_fla_L{L}", lambda: fused_chunk_based(q, k, v, use_norm=True), [q, k, v], report)
    except ImportError as exc:
        report[f"based_fla_L{L}"] = {"skipped": str(exc)}


def case_routing(report, L):
    dim, heads, window = 1024, 16, 512
    x, ours = _routing_layer(L)

    def fwd():
        y, _ = ours(x)
        ours.routing_aux_loss()
        return y

    _profile(f"routing_ours_L{L}", fwd, [x, *[p for p in ours.parameters() if p.requires_grad]], report)
    try:
        from routing_transformer.routing_transformer import SelfAttention

        peer = SelfAttention(dim=dim, depth=1, max_seq_len=L, heads=heads, local_attn_heads=0, window_size=window,
                             causal=True, shared_qk=True).cuda().bfloat16()
        _profile(f"routing_peer_L{L}", lambda: peer(x)[0], [x, *peer.parameters()], report)
    except Exception as exc:  # noqa: BLE001
        report[f"routing_peer_L{L}"] = {"skipped": f"{type(exc).__name__}: {exc}"[:300]}


def _routing_layer(L):
    from mnemotorch.layers import get_mixer

    dim, heads, window = 1024, 16, 512
    torch.manual_seed(0)
    x = torch.randn(1, L, dim, device="cuda").bfloat16().requires_grad_()
    ours = get_mixer("routing", dim=dim, num_heads=heads, num_clusters=L // window, mode="causal_exact", shared_qk=True,
                     causal=True, local_heads=0).cuda().bfloat16()
    ours.backend = "block_sparse"
    return x, ours


def case_routing_graphs(report, L):
    """The routing layer eager and with ``cuda_graph=True`` at one length: per-kernel device time of each
    (the graphed layer's replays included), to see what the graphed call adds to the device work."""
    for graphs in (False, True):
        x, ours = _routing_layer(L)
        ours.cuda_graph = graphs

        def fwd():
            y, _ = ours(x)
            ours.routing_aux_loss()
            return y

        _profile(f"routing_{'graphs' if graphs else 'eager'}_L{L}", fwd, [x, *[p for p in ours.parameters() if p.requires_grad]], report)
        del x, ours


def case_routing_host(report, L):
    """Where the eager layer's host time goes: cProfile (Python functions) and the CPU side of
    torch.profiler (aten ops and launches), over eager forward+backward calls of the bench layer."""
    import time

    from torch.profiler import ProfilerActivity, profile

    from mnemotorch.bench.streams import cprofile_tables

    x, ours = _routing_layer(L)
    params = [x, *[p for p in ours.parameters() if p.requires_grad]]

    def fb():
        y, _ = ours(x)
        aux = ours.routing_aux_loss()
        torch.autograd.grad((y.float().sum() + aux) if aux is not None else y.float().sum(), params)

    def f():
        with torch.no_grad():
            ours(x)

    r = {}
    for name, fn in (("fwd", f), ("fwd_bwd", fb)):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        n = 30
        t = time.perf_counter()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - t) / n * 1e3  # host time per call while the GPU queue is not full
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / n * 1e3
        cprofile = "".join(cprofile_tables(fn, n, ("tottime", "cumulative"), 40).values())
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        r[name] = {"host_ms_per_call": host, "wall_ms_per_call": wall, "cprofile": cprofile[-20000:], "cpu_ops": table}
        print(f"\n### routing host {name} L={L}: host {host:.3f} ms, wall {wall:.3f} ms per call")
        print(table[:6000])
        print(cprofile[:8000])
    report[f"routing_host_L{L}"] = r


def case_na1d(report, L):
    from mnemotorch.ops.block_sparse import block_sparse_attention, neighborhood_pattern

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, L, 1, 128, device="cuda").bfloat16().requires_grad_() for _ in range(3))
    pp = neighborhood_pattern((L,), 2048, device="cuda")
    _profile(f"na1d_ours_L{L}", lambda: block_sparse_attention(q, k, v, pp.pattern, backend="triton"), [q, k, v], report)
    import torch.nn.functional as F

    _profile(f"na1d_sdpa_dense_L{L}", lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
             [q, k, v], report)


CASES = {"linear": (case_linear, 16384), "based": (case_based, 16384), "routing": (case_routing, 8192), "na1d": (case_na1d, 32768),
         "routing_host": (case_routing_host, 8192), "routing_graphs": (case_routing_graphs, 16384)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default="profile.json")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name in args.cases.split(","):
        fn, L = CASES[name]
        try:
            fn(report, L)
        except Exception as exc:  # noqa: BLE001
            report[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(name, report[name])
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
