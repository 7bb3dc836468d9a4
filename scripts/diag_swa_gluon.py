"""Sweep the Gluon Hopper forward (ops/block_sparse/swa_gluon.py) against the Triton forward on the GPU.

For the issue's main cases (NA-1D L = 32K, kernel 2048, D = 128, H = 1; sliding window L = 64K / 16K,
W = 1024, D = 128, H = 16; bf16, B = 1) it times, as medians of CUDA-graph replays of one forward call
(``bench.block_sparse.graph_ms``): the table's Triton forward, each Gluon launch (ring slots ``stages``,
keys per tile ``BN``, consumer registers ``regs``), and dense SDPA (non-causal for NA-1D, causal for
the window: the issue's ratios). Every Gluon launch's output is compared with the Triton forward's on
the same inputs first, so a wrong launch is reported, not timed. Writes JSON (``--out``) and prints a
table; the rows to put in ``swa_triton.LAUNCH`` are the fastest correct ones.

    python scripts/diag_swa_gluon.py --out $OUT/gluon_sweep.json

``--backward`` does the same for the Gluon backward (ops/block_sparse/swa_gluon_bwd.py): CUDA-graph replays of
``swa_triton._bwd_impl`` alone (Δ pass, kernels and dQ cast) on one forward's outputs, the Triton dK/dV + dQ
kernels against each Gluon launch (``stages``, ``regs``, ``persistent``, ``dq``), each launch's dQ, dK, dV first compared
with the Triton kernels' (relative error < 1e-2, else reported and not timed).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from mnemotorch.bench.block_sparse import _rel_diff, device_info, graph_ms, peak_extra_bytes
from mnemotorch.ops.block_sparse import swa_triton

CASES = {
    "na1d": dict(L=32768, W=2048, H=1, na1d=True),
    "swa64k": dict(L=65536, W=1024, H=16, na1d=False),
    "swa16k": dict(L=16384, W=1024, H=16, na1d=False),
}
GLUON = [dict(BN=64, stages=4), dict(BN=64, stages=4, persistent=False), dict(BN=64, stages=3), dict(BN=128, stages=2),
         dict(BN=128, stages=2, persistent=False), dict(BN=64, stages=4, regs=224)]


def _sweep(row: dict, name: str, kind: str, configs: list, run, errors, tol: float, rep: int) -> None:
    """Each Gluon launch ``cfg`` of kernel row ``kind`` ("fwd" or "dkdv"): ``run()`` under it, its errors against the
    Triton kernels' (``errors(out)``, a dict), timed only when every error is below ``tol``; the fastest correct
    launch as ``row["best_gluon"]`` and its speed-up over ``row["triton_ms"]``."""
    row["gluon"] = []
    for cfg in configs:
        r = {"cfg": cfg}
        try:
            with swa_triton.override_launch(**{kind: dict(gluon=cfg)}):
                out = run()
                torch.cuda.synchronize()
                r["rel_vs_triton"] = errors(out)
                del out
                r["peak_extra_mib"] = peak_extra_bytes(run) / 2**20
                if not all(e < tol for e in r["rel_vs_triton"].values()):
                    r["error"] = "differs from the Triton kernels' result"
                else:
                    r["ms"] = graph_ms(run, rep=rep)
        except Exception as e:  # report and go on: one launch must not stop the sweep
            r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        row["gluon"].append(r)
        print(name, kind, cfg, {k: v for k, v in r.items() if k != "cfg"}, flush=True)
    ok = [r for r in row["gluon"] if "ms" in r]
    if ok:
        row["best_gluon"] = min(ok, key=lambda r: r["ms"])
        row["best_vs_triton"] = row["triton_ms"] / row["best_gluon"]["ms"]


def run_case(name: str, c: dict, D: int, rep: int, configs: list) -> dict:
    L, W, H, na1d = c["L"], c["W"], c["H"], c["na1d"]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, L, H, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    scale = D**-0.5

    def fwd():
        with torch.no_grad():
            return swa_triton._fwd_impl(q, k, v, W, scale, need_lo=False, na1d=na1d)[0]

    row = {"case": name, **c, "D": D, "B": 1}
    # gluon=False: the Triton forward, also where the table's row names the Gluon one
    with swa_triton.override_launch(fwd=dict(gluon=False)):
        o_ref = fwd().clone()
        row["triton_ms"] = graph_ms(fwd, rep=rep)
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    with torch.no_grad():
        row["sdpa_ms"] = graph_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=not na1d), rep=rep)
    _sweep(row, name, "fwd", configs, fwd, lambda o: {"out": _rel_diff(o, o_ref)}, 5e-3, rep)
    if "best_gluon" in row:
        row["best_vs_sdpa"] = row["sdpa_ms"] / row["best_gluon"]["ms"]
    row["triton_vs_sdpa"] = row["sdpa_ms"] / row["triton_ms"]
    return row


BWD_GLUON = [dict(stages=2, dq="tma"), dict(stages=2), dict(stages=2, dq="tma", regs=232)]


def run_bwd_case(name: str, c: dict, D: int, rep: int, configs: list) -> dict:
    L, W, H, na1d = c["L"], c["W"], c["H"], c["na1d"]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(1, L, H, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(4))
    scale = D**-0.5
    o, lse, o_lo = swa_triton._fwd_impl(q, k, v, W, scale, need_lo=True, na1d=na1d)

    def bwd():
        return swa_triton._bwd_impl(do, q, k, v, o, lse, o_lo, W, scale, na1d=na1d)

    row = {"case": name, **c, "D": D, "B": 1, "timing": "backward alone (Δ, kernels, dQ cast)"}
    row["fwd_ms"] = graph_ms(lambda: swa_triton._fwd_impl(q, k, v, W, scale, need_lo=True, na1d=na1d), rep=rep)
    with swa_triton.override_launch(dkdv=dict(gluon=False)):
        ref = [t.clone() for t in bwd()]
        row["triton_ms"] = graph_ms(bwd, rep=rep)
        row["triton_peak_extra_mib"] = peak_extra_bytes(bwd) / 2**20
    _sweep(row, name, "dkdv", configs, bwd,
           lambda out: {n: _rel_diff(a, b) for n, a, b in zip(("dq", "dk", "dv"), out, ref)}, 1e-2, rep)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="na1d,swa64k,swa16k")
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--rep", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=1, help="run the whole sweep this many times (spread)")
    ap.add_argument("--configs", default=None, help="JSON list of gluon dicts (default: the built-in sweep)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--backward", action="store_true", help="sweep the Gluon backward instead of the forward")
    args = ap.parse_args()
    configs = json.loads(args.configs) if args.configs else (BWD_GLUON if args.backward else GLUON)
    run, line = (run_bwd_case, _bwd_line) if args.backward else (run_case, _fwd_line)
    what = "backward" if args.backward else "forward"
    res = {"device": device_info(), "timing": f"median of CUDA-graph replays of one {what} call", "rows": []}
    t0 = time.time()
    for it in range(args.repeat):
        for name in args.cases.split(","):
            row = run(name, CASES[name], args.D, args.rep, configs)
            row["repeat"] = it
            res["rows"].append(row)
            print(f"[{it}] {name}: {line(row)}", flush=True)
    res["seconds"] = time.time() - t0
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def _best(row: dict) -> str:
    best = row.get("best_gluon", {})
    return (f"best gluon {best.get('cfg')} {best.get('ms', float('nan')):.4f} ms "
            f"({row.get('best_vs_triton', float('nan')):.3f}x triton")


def _fwd_line(row: dict) -> str:
    return (f"triton {row['triton_ms']:.4f} ms, sdpa {row['sdpa_ms']:.4f} ms ({row['triton_vs_sdpa']:.2f}x); "
            f"{_best(row)}, {row.get('best_vs_sdpa', float('nan')):.2f}x sdpa)")


def _bwd_line(row: dict) -> str:
    return f"forward {row['fwd_ms']:.4f} ms; backward triton {row['triton_ms']:.4f} ms, {_best(row)})"


if __name__ == "__main__":
    raise SystemExit(main())
