"""Launch sweep of the list-free causal sliding-window kernels (ops/block_sparse/swa_triton.py).

On CUDA, bf16, B = 1, H = 16, every timing a median of CUDA-graph replays (``bench.block_sparse.graph_ms``):

1. the launch table's defaults (``swa_triton.LAUNCH``) at the main case L = 65536, W = 1024, D = 128;
2. the generic list-walking kernel (``MNEMO_SWA_KERNEL=lists``, fixed launch) and dense causal SDPA there;
3. forward configs (BM / BN / warps / stages / TMA / warp specialisation): forward alone;
4. dK/dV configs (with the best forward; dQ by its own kernel or by atomics): forward + backward;
5. dQ-kernel configs (with the best non-fused dK/dV): forward + backward;
6. FlexAttention (compiled, block mask built once, as ``mnemo bench kernels --cases swa``);
7. the other cases (L = 16384, W = 4096, D = 64) with the defaults and the best configs, then their peers.

Every config is first checked at L = 4096 against SDPA with a dense window mask on fp32 copies of
the inputs (output <= 5e-3, gradients <= 1e-2, no NaN); a failing or non-compiling config is
recorded and skipped. Steps stop once ``--time-budget`` seconds have passed (the JSON is written
after every step). The table printed last has the best configs as rows to paste into ``LAUNCH``.

    PYTHONPATH=src python scripts/diag_swa.py --out swa_sweep.json            # H100: <= ~240 s (--time-budget 210)
    PYTHONPATH=src python scripts/diag_swa.py --smoke --out /tmp/smoke.json   # CPU, Triton interpreter, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

if "--smoke" in sys.argv:  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["MNEMO_SWA_KERNEL"] = "fast"

import torch
import torch.nn.functional as F

from mnemotorch.bench.block_sparse import GraphCaptureError, Run, device_info, graph_ms, wall_median_ms
from mnemotorch.ops.block_sparse import swa_triton, triton as bs_triton
from mnemotorch.ops.sliding_window import sliding_window_attention

# (BM, BN, warps, stages, tma, ws[, lazy]): forward (tma: False, True = host descriptors, "device" =
# in-kernel; lazy: rescale only when a row max grew by more than 2^lazy)
FWD_GRID = [
    (128, 64, 8, 3, False, False), (128, 64, 8, 4, False, False), (128, 128, 8, 3, False, False),
    (128, 64, 4, 3, False, False), (64, 64, 4, 3, False, False), (128, 64, 8, 3, False, False, 8.0),
    (128, 64, 8, 3, True, False), (128, 128, 8, 3, True, False), (128, 64, 8, 3, True, False, 8.0),
    (128, 64, 8, 3, "device", False), (128, 64, 8, 3, "device", True), (128, 128, 8, 3, "device", True),
]
# (BM query tile, BN key block, warps, stages, fused_dq, tma): dK/dV kernel
DKDV_GRID = [
    (64, 128, 8, 2, False, False), (64, 128, 8, 3, False, False), (32, 128, 8, 2, False, False),
    (64, 64, 4, 2, False, False), (32, 64, 4, 3, False, False), (64, 128, 8, 2, False, True),
    (64, 128, 8, 2, True, False), (32, 128, 8, 2, True, False), (64, 64, 4, 2, True, False),
    (64, 128, 8, 2, True, True), (64, 128, 8, 2, False, "device"),
]
# (BM, BN, warps, stages, tma): dQ kernel
DQ_GRID = [
    (128, 64, 8, 2, False), (128, 64, 8, 3, False), (64, 64, 4, 2, False), (128, 128, 8, 2, False),
    (128, 64, 8, 2, True), (64, 32, 4, 3, False),
]
#: seconds a step is expected to take (compilation included): it starts only if that fits the budget
CONFIG_NEED_S, FLEX_NEED_S = 5.0, 40.0
SMOKE_FWD = [(16, 16, 4, 1, False, False), (32, 16, 4, 1, True, False), (16, 16, 4, 1, "device", True, 8.0)]
SMOKE_DKDV = [(16, 32, 4, 1, False, False), (16, 16, 4, 1, True, True), (16, 32, 4, 1, False, "device")]
SMOKE_DQ = [(16, 16, 4, 1, False), (32, 16, 4, 1, True)]


def fwd_cfg(c) -> dict:
    return dict(BM=c[0], BN=c[1], warps=c[2], stages=c[3], tma=c[4], ws=c[5], lazy=c[6] if len(c) > 6 else 0.0)


def dkdv_cfg(c) -> dict:
    return dict(BM=c[0], BN=c[1], warps=c[2], stages=c[3], fused_dq=c[4], tma=c[5], ws=False)


def dq_cfg(c) -> dict:
    return dict(BM=c[0], BN=c[1], warps=c[2], stages=c[3], tma=c[4], ws=False)


def computed_pairs(L: int, W: int, bm: int, bn: int) -> int:
    """(query, key) pairs inside the tiles the forward visits (its FLOP count / (4 D H B))."""
    total = 0
    for qb in range(-(-L // bm)):
        p0 = qb * bm
        p_last = min(p0 + bm, L) - 1
        u = -(-(p0 - max(p0 - W + 1, 0)) // bn)
        total += (u + -(-(p_last - p0 + 1) // bn)) * bn * bm
    return total


def allowed_pairs(L: int, W: int) -> int:
    w = min(W, L)
    return w * (w + 1) // 2 + (L - w) * w


class Sweep:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.cuda = torch.cuda.is_available() and not self.smoke
        self.dev = "cuda" if self.cuda else "cpu"
        self.dtype = torch.float32 if self.smoke else torch.bfloat16
        self.t0 = time.perf_counter()
        self.H = 2 if self.smoke else 16
        self.check_L = 64 if self.smoke else 4096
        self.report: dict = {"device": device_info(), "argv": sys.argv[1:], "budget_s": args.time_budget, "cases": {},
                             "fwd_sweep": [], "dkdv_sweep": [], "dq_sweep": [], "notes": []}
        self.inputs: dict = {}
        self.refs: dict = {}
        self.run = Run(self.dev, dtype=self.dtype)

    # ---- bookkeeping
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over(self, what: str, need: float = 0.0) -> bool:
        """Whether the budget is spent (``need``: seconds the step is expected to take)."""
        if self.elapsed() + need > self.args.time_budget:
            msg = f"skipped after {self.elapsed():.0f} s (budget {self.args.time_budget} s): {what}"
            if msg not in self.report["notes"]:
                self.report["notes"].append(msg)
                print("  " + msg, flush=True)
            return True
        return False

    def save(self) -> None:
        self.report["elapsed_s"] = self.elapsed()
        if self.args.out:
            with open(self.args.out, "w") as f:
                json.dump(self.report, f, indent=1, default=str)

    # ---- data
    def get_inputs(self, L: int, D: int):
        key = (L, D)
        if key not in self.inputs:
            g = torch.Generator().manual_seed(L + D)
            ts = [torch.randn(1, L, self.H, D, generator=g).to(self.dev, self.dtype) for _ in range(4)]
            for t in ts[:3]:
                t.requires_grad_()
            self.inputs[key] = ts
        return self.inputs[key]

    def reference(self, W: int, D: int):
        """SDPA with a dense window mask on fp32 copies at the check length: (out, dq, dk, dv)."""
        key = (W, D)
        if key not in self.refs:
            q, k, v, go = self.get_inputs(self.check_L, D)
            leaves = [t.detach().float().transpose(1, 2).requires_grad_() for t in (q, k, v)]
            i = torch.arange(self.check_L, device=self.dev)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - W)
            out = F.scaled_dot_product_attention(*leaves, attn_mask=mask)
            grads = torch.autograd.grad(out, leaves, go.float().transpose(1, 2))
            self.refs[key] = [t.detach().transpose(1, 2) for t in (out, *grads)]
        return self.refs[key]

    # ---- timing
    def timed(self, step) -> float:
        if not self.cuda:
            return wall_median_ms(step, 0, 1)
        try:
            return graph_ms(step)
        except GraphCaptureError as exc:  # recorded by the caller through the exception text
            raise RuntimeError(str(exc)) from exc

    def ours(self, L, W, D, mode="auto"):
        q, k, v, go = self.get_inputs(L, D)
        os.environ["MNEMO_SWA_KERNEL"] = "fast" if (self.smoke and mode == "auto") else mode

        def call():
            return sliding_window_attention(q, k, v, W, backend="triton")

        return call, q, k, v, go

    def check(self, W, D, with_grads: bool) -> dict:
        call, q, k, v, go = self.ours(self.check_L, W, D)
        ref = self.reference(W, D)
        with torch.no_grad():
            out = call()
        errs = {"out": _rel(out, ref[0])}
        if with_grads:
            grads = torch.autograd.grad(call(), (q, k, v), go)
            errs.update({n: _rel(g, r) for n, g, r in zip(("dq", "dk", "dv"), grads, ref[1:])})
        ok = all(e == e and e <= (5e-3 if n == "out" else 1e-2) for n, e in errs.items())
        return {"errors": errs, "ok": ok}

    def time_fwd(self, L, W, D, mode="auto") -> float:
        call, *_ = self.ours(L, W, D, mode)

        def step():
            with torch.no_grad():
                return call()

        return self.timed(step)

    def time_fwd_bwd(self, L, W, D, mode="auto") -> float:
        call, q, k, v, go = self.ours(L, W, D, mode)
        return self.timed(lambda: torch.autograd.grad(call(), (q, k, v), go))

    def rates(self, row: dict, L, W, D, bm=128, bn=64) -> dict:
        pairs_c, pairs_a = computed_pairs(L, W, bm, bn), allowed_pairs(L, W)
        f = 4 * self.H * D
        if row.get("fwd_ms"):
            row["fwd_tflops_computed"] = f * pairs_c / (row["fwd_ms"] * 1e-3) / 1e12
            row["fwd_tflops_allowed"] = f * pairs_a / (row["fwd_ms"] * 1e-3) / 1e12
        if row.get("fwd_bwd_ms"):
            row["fwd_bwd_tflops_allowed"] = 3.5 * f * pairs_a / (row["fwd_bwd_ms"] * 1e-3) / 1e12
        return row

    # ---- steps
    def measure_config(self, kind: str, cfg: dict, overrides: dict, L, W, D, fwd_only: bool) -> dict:
        row = {"kind": kind, "config": cfg, "L": L, "W": W, "D": D}
        t = time.perf_counter()
        try:
            with swa_triton.override_launch(**overrides):
                row.update(self.check(W, D, with_grads=not fwd_only))
                row["compile_and_check_s"] = time.perf_counter() - t
                if row["ok"]:
                    if fwd_only:
                        row["fwd_ms"] = self.time_fwd(L, W, D)
                    else:
                        row["fwd_bwd_ms"] = self.time_fwd_bwd(L, W, D)
        except Exception as exc:  # noqa: BLE001 - a config that fails to compile or run is recorded
            row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            row["traceback_tail"] = traceback.format_exc()[-1200:]
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        self.rates(row, L, W, D, cfg.get("BM", 128), cfg.get("BN", 64)) if kind == "fwd" else None
        print(f"  {kind:5s} {_cfg_text(cfg):58s} {_row_text(row)}", flush=True)
        return row

    def peers(self, L, W, D, case: dict, flex: bool) -> None:
        res = case.setdefault("results", {})
        if "lists" not in res and not self.over(f"lists kernel at L={L} W={W} D={D}"):
            res["lists"] = self._peer(lambda: self.time_fwd(L, W, D, "lists"), lambda: self.time_fwd_bwd(L, W, D, "lists"))
            self.rates(res["lists"], L, W, D)
            print(f"  lists kernel (fixed launch): {_row_text(res['lists'])}", flush=True)
        q, k, v, go = self.get_inputs(L, D)
        if "sdpa_dense_causal" not in res and not self.over(f"SDPA at L={L} D={D}"):
            qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
            gt = go.transpose(1, 2)

            def fwd():
                with torch.no_grad():
                    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

            res["sdpa_dense_causal"] = self._peer(lambda: self.timed(fwd), lambda: self.timed(
                lambda: torch.autograd.grad(F.scaled_dot_product_attention(qt, kt, vt, is_causal=True), (qt, kt, vt), gt)))
            print(f"  dense causal SDPA: {_row_text(res['sdpa_dense_causal'])}", flush=True)
        if flex and self.cuda and "flex" not in res and not self.over(f"FlexAttention at L={L} W={W} D={D}", FLEX_NEED_S):
            qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
            gt = go.transpose(1, 2)

            def swa(b, h, qi, ki):
                return (qi >= ki) & (qi - ki < W)

            try:
                t = time.perf_counter()
                bm = self.run.block_mask(swa, L)
                flex_fn = self.run.flex_fn()

                def fwd():
                    with torch.no_grad():
                        return flex_fn(qt, kt, vt, block_mask=bm)

                res["flex"] = self._peer(lambda: self.timed(fwd), lambda: self.timed(
                    lambda: torch.autograd.grad(flex_fn(qt, kt, vt, block_mask=bm), (qt, kt, vt), gt)))
                res["flex"]["mask_build_and_compile_s"] = time.perf_counter() - t
            except Exception as exc:  # noqa: BLE001
                res["flex"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"  FlexAttention (compiled): {_row_text(res['flex'])}", flush=True)
        ours = res.get("ours_best") or res.get("ours_default") or {}
        for name, r in res.items():
            if name.startswith("ours") or not isinstance(r, dict):
                continue
            for m in ("fwd_ms", "fwd_bwd_ms"):
                if r.get(m) and ours.get(m):
                    case.setdefault("speedup_vs", {}).setdefault(name, {})[m] = r[m] / ours[m]
        self.save()

    def _peer(self, fwd, fwd_bwd) -> dict:
        r: dict = {}
        for key, fn in (("fwd_ms", fwd), ("fwd_bwd_ms", fwd_bwd)):
            try:
                r[key] = fn()
            except Exception as exc:  # noqa: BLE001
                r[f"{key}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                if self.cuda:
                    torch.cuda.empty_cache()
        return r

    def ours_case(self, L, W, D, label: str, overrides: dict) -> dict:
        r: dict = {"overrides": overrides}
        try:
            with swa_triton.override_launch(**overrides):
                r.update(self.check(W, D, with_grads=True))
                r["fwd_ms"] = self.time_fwd(L, W, D)
                r["fwd_bwd_ms"] = self.time_fwd_bwd(L, W, D)
        except Exception as exc:  # noqa: BLE001
            r["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        fb = overrides.get("fwd") or swa_triton.launch_config("fwd", D, self.dtype)
        self.rates(r, L, W, D, fb.get("BM", 128), fb.get("BN", 64))
        print(f"  ours ({label}): {_row_text(r)}", flush=True)
        return r


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _cfg_text(c: dict) -> str:
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in c.items())


def _row_text(r: dict) -> str:
    if "error" in r:
        return "ERROR " + r["error"]
    parts = []
    if "errors" in r:
        parts.append(("ok " if r.get("ok") else "WRONG ") + " ".join(f"{k} {v:.1e}" for k, v in r["errors"].items()))
    for key, label in (("fwd_ms", "fwd"), ("fwd_bwd_ms", "fwd+bwd")):
        if r.get(key) is not None:
            parts.append(f"{label} {r[key]:.3f} ms")
        elif r.get(f"{key}_error"):
            parts.append(f"{label} ERROR {r[f'{key}_error'][:120]}")
    if r.get("fwd_tflops_computed"):
        parts.append(f"{r['fwd_tflops_computed']:.0f} TFLOP/s computed")
    return ", ".join(parts)


def _best(rows: list[dict], key: str) -> dict | None:
    good = [r for r in rows if r.get(key) is not None]
    return min(good, key=lambda r: r[key]) if good else None


def _table_row(kind: str, d: int, cfg: dict, dtype=torch.bfloat16) -> str:
    body = ", ".join(f"{k}={v!r}" for k, v in cfg.items())
    return f'    ("{kind}", {swa_triton._dclass(d)}, "{"32" if dtype == torch.float32 else "16"}"): dict({body}),'


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT/diag_swa.json when OUT is set)")
    ap.add_argument("--time-budget", type=float, default=210.0,
                    help="seconds; a step starts only if its expected time fits (the run ends within ~30 s after)")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run: Triton interpreter, tiny sizes, 2 configs per kernel")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compilation takes tens of seconds)")
    ap.add_argument("--lists-autotune", default="off", choices=bs_triton.AUTOTUNE_MODES, help="launch tuning of the generic kernel")
    args = ap.parse_args(argv)
    if args.out is None and os.environ.get("OUT"):
        args.out = os.path.join(os.environ["OUT"], "diag_swa.json")
    if not torch.cuda.is_available() and not args.smoke:
        print("diag_swa: needs a CUDA device (or --smoke for the CPU interpreter)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    bs_triton.set_autotune(args.lists_autotune)
    sw = Sweep(args)
    smoke = args.smoke
    main_case = (256, 64, 32) if smoke else (65536, 1024, 128)
    others = [(128, 32, 32), (256, 64, 16)] if smoke else [(16384, 1024, 128), (65536, 4096, 128), (65536, 1024, 64),
                                                           (16384, 4096, 128), (16384, 1024, 64), (65536, 4096, 64), (16384, 4096, 64)]
    L, W, D = main_case
    print(f"diag_swa on {sw.report['device'].get('device', 'cpu')}: main case L={L} W={W} D={D} H={sw.H} {sw.dtype}", flush=True)
    case = sw.report["cases"][f"L{L}_W{W}_D{D}"] = {"L": L, "W": W, "D": D, "results": {}}
    res = case["results"]

    print("[1] launch-table defaults", flush=True)
    res["ours_default"] = sw.ours_case(L, W, D, "table defaults", {})
    case["default_launch"] = {k: swa_triton.launch_config(k, D, sw.dtype) for k in ("fwd", "dkdv", "dq")}
    sw.save()

    print("[2] generic kernel and dense SDPA", flush=True)
    sw.peers(L, W, D, case, flex=False)

    print("[3] forward configs", flush=True)
    for c in (SMOKE_FWD if smoke else FWD_GRID):
        if sw.over("rest of the forward sweep", CONFIG_NEED_S):
            break
        cfg = fwd_cfg(c)
        sw.report["fwd_sweep"].append(sw.measure_config("fwd", cfg, {"fwd": cfg}, L, W, D, fwd_only=True))
        sw.save()
    best_fwd = _best(sw.report["fwd_sweep"], "fwd_ms")
    fwd_over = {"fwd": best_fwd["config"]} if best_fwd else {}

    print("[4] dK/dV configs (forward: the best above)", flush=True)
    for c in (SMOKE_DKDV if smoke else DKDV_GRID):
        if sw.over("rest of the dK/dV sweep", CONFIG_NEED_S):
            break
        cfg = dkdv_cfg(c)
        sw.report["dkdv_sweep"].append(sw.measure_config("dkdv", cfg, {**fwd_over, "dkdv": cfg}, L, W, D, fwd_only=False))
        sw.save()
    best_dkdv = _best(sw.report["dkdv_sweep"], "fwd_bwd_ms")
    best_sep = _best([r for r in sw.report["dkdv_sweep"] if not r["config"]["fused_dq"]], "fwd_bwd_ms")

    print("[5] dQ-kernel configs (dK/dV: the best without fused dQ)", flush=True)
    sep_over = {**fwd_over, "dkdv": best_sep["config"]} if best_sep else dict(fwd_over)
    for c in (SMOKE_DQ if smoke else DQ_GRID):
        if sw.over("rest of the dQ sweep", CONFIG_NEED_S):
            break
        cfg = dq_cfg(c)
        sw.report["dq_sweep"].append(sw.measure_config("dq", cfg, {**sep_over, "dq": cfg}, L, W, D, fwd_only=False))
        sw.save()
    best_dq = _best(sw.report["dq_sweep"], "fwd_bwd_ms")

    best_over = dict(fwd_over)
    if best_dkdv is not None:
        use_sep = best_dq is not None and best_dq["fwd_bwd_ms"] < best_dkdv["fwd_bwd_ms"]
        best_over["dkdv"] = best_sep["config"] if use_sep else best_dkdv["config"]
        if use_sep:
            best_over["dq"] = best_dq["config"]
    sw.report["best_overrides"] = best_over
    if best_over and not sw.over("ours with the best configs"):
        res["ours_best"] = sw.ours_case(L, W, D, "best configs", best_over)
    sw.peers(L, W, D, case, flex=False)  # speed-ups against the best

    print("[6] FlexAttention", flush=True)
    if not args.no_flex:
        sw.peers(L, W, D, case, flex=True)

    print("[7] other cases", flush=True)
    for (l2, w2, d2) in others:
        if sw.over(f"case L={l2} W={w2} D={d2}", CONFIG_NEED_S):
            break
        c2 = sw.report["cases"][f"L{l2}_W{w2}_D{d2}"] = {"L": l2, "W": w2, "D": d2, "results": {}}
        c2["results"]["ours_default"] = sw.ours_case(l2, w2, d2, "table defaults", {})
        if best_over and d2 == D:
            c2["results"]["ours_best"] = sw.ours_case(l2, w2, d2, f"best configs of L={L} D={D}", best_over)
        sw.peers(l2, w2, d2, c2, flex=False)
        sw.save()
    for (l2, w2, d2) in others:
        key = f"L{l2}_W{w2}_D{d2}"
        if key in sw.report["cases"] and not args.no_flex and not sw.over(f"FlexAttention at {key}", FLEX_NEED_S):
            sw.peers(l2, w2, d2, sw.report["cases"][key], flex=True)

    # ---- summary
    print("\n=== summary (ms; CUDA-graph replays; x = peer / ours-best) ===" if sw.cuda else "\n=== summary (smoke: wall clock) ===")
    print(f"{'case':22s} {'ours default':>20s} {'ours best':>20s} {'lists':>20s} {'flex':>20s} {'sdpa causal':>20s}  vs flex")
    for key, c in sw.report["cases"].items():
        r = c.get("results", {})

        def cell(name):
            x = r.get(name, {})
            f, fb = x.get("fwd_ms"), x.get("fwd_bwd_ms")
            return f"{'-' if f is None else f'{f:.3f}'} / {'-' if fb is None else f'{fb:.3f}'}"

        sp = c.get("speedup_vs", {}).get("flex", {})
        vs = f"{sp.get('fwd_ms', float('nan')):.2f}x / {sp.get('fwd_bwd_ms', float('nan')):.2f}x" if sp else "-"
        print(f"{key:22s} {cell('ours_default'):>20s} {cell('ours_best'):>20s} {cell('lists'):>20s} {cell('flex'):>20s} "
              f"{cell('sdpa_dense_causal'):>20s}  {vs}")
    ob = res.get("ours_best") or res.get("ours_default") or {}
    if ob.get("fwd_tflops_computed"):
        print(f"main case forward on computed tiles: {ob['fwd_tflops_computed']:.0f} TFLOP/s "
              f"(target >= 0.7 x 614 = 430); allowed pairs: {ob.get('fwd_tflops_allowed', 0):.0f} TFLOP/s")
    print(f"\nrows for swa_triton.LAUNCH (the best at the main case, D = {D}, {sw.dtype}):")
    for kind in ("fwd", "dkdv", "dq"):
        cfg = best_over.get(kind)
        if cfg:
            print(_table_row(kind, D, cfg, sw.dtype))
    failed = [r for k in ("fwd_sweep", "dkdv_sweep", "dq_sweep") for r in sw.report[k] if "error" in r or r.get("ok") is False]
    if failed:
        print(f"\n{len(failed)} config(s) failed or gave wrong results:")
        for r in failed:
            print(f"  {r['kind']} {_cfg_text(r['config'])}: {_row_text(r)}")
    sw.report["launch_rows"] = [_table_row(k, D, best_over[k], sw.dtype) for k in ("fwd", "dkdv", "dq") if k in best_over]
    sw.save()
    print(f"\ndone in {sw.elapsed():.0f} s" + (f"; JSON: {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
