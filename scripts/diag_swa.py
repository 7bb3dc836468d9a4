"""Launch sweep of the list-free causal sliding-window kernels (ops/block_sparse/swa_triton.py).

Second H100 round: the options added since the first sweep (docs/results/swa_sweep_2026-11-26_h100.json)
against the table's current rows (the first sweep's best), on CUDA, bf16, B = 1, H = 16, every timing
a median of CUDA-graph replays (``bench.block_sparse.graph_ms``). In order of priority (the steps stop
once ``--time-budget`` seconds have passed; the JSON is written after every step):

1. main case L = 65536, W = 1024, D = 128: the table's rows (``swa_triton.LAUNCH``), the generic
   list-walking kernel (``MNEMO_SWA_KERNEL=lists``, fixed launch);
2. forward: ``one_loop`` (one pipelined loop per program), 2 programs per SM (BM = 64) with TMA,
   BN = 64 with 4 stages and TMA (one loop);
3. dK/dV (forward: the best above): ``one_loop``; dQ by TMA reductions (``fused_dq="tma"``) at 128- and
   64-key blocks, against element atomics at the same tile;
4. dQ kernel (dK/dV: the best without fused dQ): ``delta`` (Delta in the dQ kernel, no preprocess
   pass), ``one_loop``;
5. the best combination: forward, forward + backward, each kernel alone (forward with the residual,
   Delta, dK/dV, dQ or the fused dQ's cast) with its rate on the tiles it computes, peak memory;
6. FlexAttention there (compiled, block mask built once), its peak memory;
7. D = 64 (L = 65536, W = 1024): backward rows against the generic kernel, whose backward beat the
   table's old 8-warp rows there;
8. the other cases (L = 16384 / 65536, W = 1024 / 4096, D = 64 / 128) with the best rows and the
   generic kernel; 9. FlexAttention at L = 65536, W = 1024, D = 64 (never measured).

Dense SDPA (``--sdpa``) and Flex at the other cases are off by default to fit the budget: the
summary quotes them from the first sweep's JSON, marked "prev". Every config is first checked at
L = 4096 against SDPA with a dense window mask on fp32 copies of the inputs (output <= 5e-3,
gradients <= 1e-2, no NaN); a failing or non-compiling config is recorded and skipped.

    PYTHONPATH=src python scripts/diag_swa.py                     # H100: ~200 s (--time-budget 200); JSON to $OUT/diag_swa.json
    PYTHONPATH=src python scripts/diag_swa.py --smoke --out /tmp/smoke.json   # CPU, Triton interpreter, tiny sizes

``--na1d`` instead times 1-D neighborhood attention (issue #4; NATTEN, dilation 1, stride 1,
non-causal) at L = 32768, K = 2048, D = 128, H = 1, bf16 (~60 s): the list-free kernels' NA1D mode
(``swa_triton.na1d_attention_triton``, the table's rows, then a few forward / backward launch
variants), the generic list kernel on ``neighborhood_pattern_1d`` and dense non-causal SDPA, forward
and forward + backward as CUDA-graph replays; correctness against fp32 SDPA with the dense NATTEN mask
at L = 4096 and against the generic kernel at full length (JSON to ``$OUT/diag_na1d.json``):

    PYTHONPATH=src python scripts/diag_swa.py --na1d [--smoke]

``--na2d`` times 2-D neighborhood attention (NATTEN, dilation 1, stride 1, non-causal) at 128 x 128
tokens, kernel 13 x 13, D = 64, H = 16, bf16 (~90 s, ``--time-budget`` overrides): the list-free NA-2D
kernels on row-major tokens (``na2d_triton.na2d_attention_triton``, the table's rows, then forward /
dK/dV / dQ launch variants of query and key tile shapes and warps, each checked against the table's
rows on the same inputs first), the generic list kernel on 8 x 8-tile-permuted tokens (``layers.vision.na2d``
with ``MNEMO_NA2D_KERNEL=off``, permutations included) and dense SDPA, forward and forward + backward as
CUDA-graph replays; correctness against fp32 SDPA with the dense NATTEN mask at 32 x 32 (JSON to
``$OUT/diag_na2d.json``, written after every step):

    PYTHONPATH=src python scripts/diag_swa.py --na2d [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

if "--smoke" in sys.argv:  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["MNEMO_SWA_KERNEL"] = "fast"

import torch
import torch.nn.functional as F

from mnemotorch.bench.block_sparse import GraphCaptureError, Run, device_info, graph_ms, wall_median_ms
from mnemotorch.ops.block_sparse import swa_triton, triton as bs_triton
from mnemotorch.ops.sliding_window import sliding_window_attention

PREVIOUS = Path(__file__).resolve().parents[1] / "docs" / "results" / "swa_sweep_2026-11-26_h100.json"
ONE = "one"  # marks a one-loop row in the grids

# forward (BM, BN, warps, stages, tma[, "one"]): the table's row is measured in step 1
FWD_GRID = [
    (128, 128, 8, 3, True, ONE), (128, 128, 8, 2, True, ONE), (128, 64, 8, 4, True, ONE),
    (64, 64, 4, 3, True), (64, 64, 4, 3, True, ONE), (64, 64, 4, 4, True, ONE),
]
# dK/dV (BM query tile, BN key block, warps, stages, fused_dq, tma[, "one"])
DKDV_GRID = [
    (32, 64, 4, 3, False, False), (32, 64, 4, 3, False, False, ONE), (64, 64, 4, 3, False, False, ONE),
    (32, 64, 4, 4, False, False, ONE),
    (64, 128, 8, 2, "tma", False), (64, 128, 8, 2, "tma", False, ONE), (64, 128, 8, 2, True, False, ONE),
    (32, 128, 8, 2, "tma", False, ONE), (64, 64, 4, 3, "tma", False, ONE),
]
# dQ (BM, BN, warps, stages, tma, delta[, "one"])
DQ_GRID = [
    (64, 64, 4, 2, False, False), (64, 64, 4, 2, False, True), (64, 64, 4, 2, False, True, ONE),
    (64, 64, 4, 3, False, True, ONE), (128, 64, 8, 2, False, True, ONE),
]
# D = 64 backward: ("dkdv", ...) / ("dq", ...) rows as above; the forward is the table's
D64_GRID = [
    ("dkdv", (64, 64, 4, 2, False, False)), ("dkdv", (64, 64, 4, 2, False, False, ONE)), ("dkdv", (32, 128, 4, 3, False, False, ONE)),
    ("dkdv", (64, 128, 4, 2, False, False, ONE)), ("dkdv", (64, 128, 8, 2, "tma", False, ONE)),
    ("dq", (128, 64, 4, 2, False, True, ONE)), ("dq", (64, 64, 4, 2, False, True, ONE)),
]
#: seconds a step is expected to take (compilation included): it starts only if that fits the budget
CONFIG_NEED_S, FLEX_NEED_S = 4.0, 40.0
SMOKE_FWD = [(16, 16, 4, 1, False, ONE), (32, 16, 4, 1, True, ONE)]
SMOKE_DKDV = [(16, 32, 4, 1, False, False, ONE), (16, 32, 4, 1, True, True, ONE)]
SMOKE_DQ = [(16, 16, 4, 1, False, True), (32, 16, 4, 1, True, True, ONE)]
SMOKE_D64 = [("dkdv", (16, 32, 4, 1, False, False, ONE)), ("dq", (32, 16, 4, 1, False, True, ONE))]


def fwd_cfg(c) -> dict:
    return dict(BM=c[0], BN=c[1], warps=c[2], stages=c[3], tma=c[4], ws=False, lazy=0.0, one_loop=ONE in c[5:])


def dkdv_cfg(c) -> dict:
    return dict(BM=c[0], BN=c[1], warps=c[2], stages=c[3], fused_dq=c[4], tma=c[5], ws=False, one_loop=ONE in c[6:])


def dq_cfg(c) -> dict:
    return dict(BM=c[0], BN=c[1], warps=c[2], stages=c[3], tma=c[4], ws=False, delta=c[5], one_loop=ONE in c[6:])


def computed_pairs(L: int, W: int, bm: int, bn: int) -> int:
    """(query, key) pairs inside the tiles the forward visits (its FLOP count / (4 D H B))."""
    total = 0
    for qb in range(-(-L // bm)):
        p0 = qb * bm
        p_last = min(p0 + bm, L) - 1
        u = -(-(p0 - max(p0 - W + 1, 0)) // bn)
        total += (u + -(-(p_last - p0 + 1) // bn)) * bn * bm
    return total


def dkdv_pairs(L: int, W: int, bm: int, bn: int) -> int:
    """(query, key) pairs inside the tiles the dK/dV kernel visits (BN-key blocks, BM-query tiles)."""
    total = 0
    for n0 in range(0, L, bn):
        p_max = min(n0 + bn + W - 2, L - 1)
        total += ((p_max - n0) // bm + 1) * bm * bn
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
                             "fwd_sweep": [], "dkdv_sweep": [], "dq_sweep": [], "d64_sweep": [], "kernel_times": {},
                             "peak_memory_mb": {}, "notes": []}
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

    def peak_mb(self, step) -> float | None:
        """Peak device memory of one eager call of ``step`` above what was allocated before it, in MB."""
        if not self.cuda:
            return None
        step()  # compiled and warm
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak / 2**20

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
    def measure_config(self, kind: str, cfg: dict, overrides: dict, L, W, D, fwd_only: bool, store: str) -> dict:
        row = {"kind": kind, "config": cfg, "overrides": overrides, "L": L, "W": W, "D": D}
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
        if kind == "fwd":
            self.rates(row, L, W, D, cfg.get("BM", 128), cfg.get("BN", 64))
        print(f"  {kind:5s} {_cfg_text(cfg):70s} {_row_text(row)}", flush=True)
        self.report[store].append(row)
        self.save()
        return row

    def peers(self, L, W, D, case: dict, flex: bool, sdpa: bool) -> None:
        res = case.setdefault("results", {})
        if "lists" not in res and not self.over(f"lists kernel at L={L} W={W} D={D}", CONFIG_NEED_S):
            res["lists"] = self._peer(lambda: self.time_fwd(L, W, D, "lists"), lambda: self.time_fwd_bwd(L, W, D, "lists"))
            self.rates(res["lists"], L, W, D)
            print(f"  lists kernel (fixed launch): {_row_text(res['lists'])}", flush=True)
        q, k, v, go = self.get_inputs(L, D)
        if sdpa and "sdpa_dense_causal" not in res and not self.over(f"SDPA at L={L} D={D}", CONFIG_NEED_S):
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

                def fwd_bwd():
                    return torch.autograd.grad(flex_fn(qt, kt, vt, block_mask=bm), (qt, kt, vt), gt)

                res["flex"] = self._peer(lambda: self.timed(fwd), lambda: self.timed(fwd_bwd))
                res["flex"]["mask_build_and_compile_s"] = time.perf_counter() - t
                res["flex"]["peak_mb_fwd_bwd"] = self.peak_mb(fwd_bwd)
            except Exception as exc:  # noqa: BLE001
                res["flex"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"  FlexAttention (compiled): {_row_text(res['flex'])}", flush=True)
        self.speedups(case)
        self.save()

    @staticmethod
    def speedups(case: dict) -> None:
        res = case.get("results", {})
        ours = res.get("ours_best") or res.get("ours_table") or {}
        for name, r in res.items():
            if name.startswith("ours") or not isinstance(r, dict):
                continue
            for m in ("fwd_ms", "fwd_bwd_ms"):
                if r.get(m) and ours.get(m):
                    case.setdefault("speedup_vs", {}).setdefault(name, {})[m] = r[m] / ours[m]

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

    def ours_case(self, L, W, D, label: str, overrides: dict, peak: bool = False) -> dict:
        r: dict = {"overrides": overrides}
        try:
            with swa_triton.override_launch(**overrides):
                r.update(self.check(W, D, with_grads=True))
                r["fwd_ms"] = self.time_fwd(L, W, D)
                r["fwd_bwd_ms"] = self.time_fwd_bwd(L, W, D)
                if peak:
                    call, q, k, v, go = self.ours(L, W, D)
                    r["peak_mb_fwd_bwd"] = self.peak_mb(lambda: torch.autograd.grad(call(), (q, k, v), go))
        except Exception as exc:  # noqa: BLE001
            r["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        fb = (overrides.get("fwd") or {}) | {}
        fb = {**swa_triton.launch_config("fwd", D, self.dtype), **fb}
        self.rates(r, L, W, D, fb["BM"], fb["BN"])
        print(f"  ours ({label}): {_row_text(r)}", flush=True)
        return r

    def kernel_times(self, L, W, D, overrides: dict) -> dict:
        """Each kernel of the configuration alone (CUDA-graph replays of one launch), with its rate on
        the tiles it computes: the forward with the residual (as in training), Delta, dK/dV, dQ (or the
        fused dQ's cast)."""
        q, k, v, go = (t.detach() for t in self.get_inputs(L, D))
        scale = D**-0.5
        r: dict = {}
        try:
            with swa_triton.override_launch(**overrides):
                cf = swa_triton.launch_config("fwd", D, q.dtype)
                ck = swa_triton.launch_config("dkdv", D, q.dtype)
                cq = swa_triton.launch_config("dq", D, q.dtype)
                o, lse, o_lo = swa_triton._fwd_impl(q, k, v, W, scale, need_lo=True)
                lo = o if o_lo is None else o_lo
                has_lo = o_lo is not None
                delta = torch.empty(lse.shape, device=q.device, dtype=torch.float32)
                swa_triton._delta_launch(go, o, lo, has_lo, delta)
                mm = 2 * self.H * D  # FLOP per pair and matrix product
                r["fwd_with_residual_ms"] = self.timed(lambda: swa_triton._fwd_impl(q, k, v, W, scale, need_lo=True)[0])
                r["fwd_tflops_computed"] = 2 * mm * computed_pairs(L, W, cf["BM"], cf["BN"]) / (r["fwd_with_residual_ms"] * 1e9)
                fused = bool(ck["fused_dq"])
                if fused or not cq.get("delta"):
                    r["delta_ms"] = self.timed(lambda: swa_triton._delta_launch(go, o, lo, has_lo, delta))
                r["dkdv_ms"] = self.timed(lambda: swa_triton._dkdv_launch(ck, go, q, k, v, lse, delta, scale, W)[:2])
                r["dkdv_tflops_computed"] = (5 if fused else 4) * mm * dkdv_pairs(L, W, ck["BM"], ck["BN"]) / (r["dkdv_ms"] * 1e9)
                if fused:
                    dqa = swa_triton._dkdv_launch(ck, go, q, k, v, lse, delta, scale, W)[2]
                    r["fused_dq_cast_ms"] = self.timed(lambda: swa_triton._dq_finish(dqa.clone(), q.dtype, scale))
                else:
                    r["dq_ms"] = self.timed(lambda: swa_triton._dq_launch(cq, go, q, k, v, o, lo, has_lo, lse, delta, scale, W,
                                                                          bool(cq.get("delta"))))
                    r["dq_tflops_computed"] = 3 * mm * computed_pairs(L, W, cq["BM"], cq["BN"]) / (r["dq_ms"] * 1e9)
                r["sum_ms"] = sum(v for key, v in r.items() if key.endswith("_ms"))
        except Exception as exc:  # noqa: BLE001
            r["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        print("  kernels: " + ", ".join(f"{k_} {v_:.3f}" for k_, v_ in r.items() if isinstance(v_, float)), flush=True)
        return r


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _cfg_text(c: dict) -> str:
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in c.items() if k not in ("ws", "lazy") or v)


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
    if r.get("peak_mb_fwd_bwd"):
        parts.append(f"peak {r['peak_mb_fwd_bwd']:.0f} MB")
    return ", ".join(parts)


def _best(rows: list[dict], key: str) -> dict | None:
    good = [r for r in rows if r.get(key) is not None]
    return min(good, key=lambda r: r[key]) if good else None


def _table_row(kind: str, d: int, cfg: dict, dtype=torch.bfloat16) -> str:
    full = {**swa_triton.launch_config(kind, d, dtype), **cfg}
    body = ", ".join(f"{k}={full[k]!r}" for k in swa_triton._KERNEL_KEYS[kind])
    return f'    ("{kind}", {swa_triton._dclass(d)}, "{"32" if dtype == torch.float32 else "16"}"): dict({body}),'


def _previous() -> dict:
    """The first sweep's results per case (quoted in the summary for what this run does not measure)."""
    try:
        return json.loads(PREVIOUS.read_text()).get("cases", {})
    except (OSError, ValueError):
        return {}


def na1d_main(args) -> int:
    """``--na1d``: the NA-1D fast path against the generic kernel and dense SDPA (see the module doc)."""
    from mnemotorch.ops.block_sparse import block_sparse_attention, neighborhood_pattern_1d

    smoke = args.smoke
    dev, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    L, K, D, H = (256, 64, 32, 1) if smoke else (32768, 2048, 128, 1)
    check_L = 128 if smoke else 4096
    budget = args.time_budget if any(a.startswith("--time-budget") for a in sys.argv) else 60.0  # variants stop after it
    t0 = time.perf_counter()
    out_path = args.out or (os.path.join(os.environ["OUT"], "diag_na1d.json") if os.environ.get("OUT") else None)
    rep_: dict = {"device": device_info(), "argv": sys.argv[1:], "L": L, "K": K, "D": D, "H": H, "dtype": str(dtype),
                  "results": {}, "checks": {}, "notes": []}

    def save():
        rep_["elapsed_s"] = time.perf_counter() - t0
        if out_path:
            with open(out_path, "w") as f:
                json.dump(rep_, f, indent=1, default=str)

    def timed(step) -> float:
        return wall_median_ms(step, 0, 1) if smoke else graph_ms(step)

    def inputs(n):
        g = torch.Generator().manual_seed(n)
        ts = [torch.randn(1, n, H, D, generator=g).to(dev, dtype) for _ in range(4)]
        for t in ts[:3]:
            t.requires_grad_()
        return ts

    scale = D**-0.5
    pats = {}

    def fns(n):
        q, k, v, go = inputs(n)
        if n not in pats:
            pats[n] = neighborhood_pattern_1d(n, K, device=dev)

        def ours():
            return swa_triton.na1d_attention_triton(q, k, v, K, scale)

        def lists():
            os.environ["MNEMO_NA1D_KERNEL"] = "off"
            return block_sparse_attention(q, k, v, pats[n], scale=scale, backend="triton")

        def sdpa():
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

        return {"ours": ours, "lists": lists, "sdpa_dense": sdpa}, (q, k, v, go)

    def measure(name, fn, qkvg, row=None):
        q, k, v, go = qkvg
        row = {} if row is None else row
        try:
            def fwd():
                with torch.no_grad():
                    return fn()
            row["fwd_ms"] = timed(fwd)
            row["fwd_bwd_ms"] = timed(lambda: torch.autograd.grad(fn(), (q, k, v), go))
            flops = 4.0 * H * D * L * K  # allowed pairs (dense SDPA: its own L * L below)
            if name == "sdpa_dense":
                flops = 4.0 * H * D * L * L
            row["fwd_tflops"] = flops / row["fwd_ms"] * 1e-9
            row["fwd_bwd_tflops"] = 3.5 * flops / row["fwd_bwd_ms"] * 1e-9
        except Exception as exc:  # noqa: BLE001 - recorded
            row["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        print(f"  {name}: {row}", flush=True)
        return row

    # correctness: vs fp32 SDPA with the dense NATTEN mask at check_L, and vs the generic kernel at L
    try:
        f_c, (q, k, v, go) = fns(check_L)
        i = torch.arange(check_L, device=dev)
        st = (i - K // 2).clamp(0, check_L - K)
        mask = (i[None, :] >= st[:, None]) & (i[None, :] < st[:, None] + K)
        leaves = [t.detach().float().transpose(1, 2).requires_grad_() for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*leaves, attn_mask=mask, scale=scale)
        rg = torch.autograd.grad(ref, leaves, go.float().transpose(1, 2))
        out = f_c["ours"]()
        grads = torch.autograd.grad(out, (q, k, v), go)
        errs = {n: _rel(a, b.transpose(1, 2)) for n, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *rg))}
        del out, grads, ref, rg
        rep_["checks"][f"vs_fp32_sdpa_mask_L{check_L}"] = errs
        rep_["checks"]["ok"] = all(e == e and e <= (5e-3 if n == "out" else 1e-2) for n, e in errs.items())
    except Exception as exc:  # noqa: BLE001
        rep_["checks"]["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    print(f"na1d check: {rep_['checks']}", flush=True)
    save()

    f, qkvg = fns(L)
    try:
        q, k, v, go = qkvg
        o1, o2 = f["ours"](), f["lists"]()
        g1 = torch.autograd.grad(o1, (q, k, v), go)
        g2 = torch.autograd.grad(o2, (q, k, v), go)
        rep_["checks"][f"vs_lists_L{L}"] = {n: _rel(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), (o1, *g1), (o2, *g2))}
        # the eager outputs' autograd graphs hold AccumulateGrad nodes of q, k, v on the default
        # stream: alive, they make every later CUDA-graph capture of a backward fail
        del o1, o2, g1, g2
    except Exception as exc:  # noqa: BLE001
        rep_["checks"]["vs_lists_error"] = f"{type(exc).__name__}: {exc}"
    print(f"na1d vs lists: {rep_['checks'].get(f'vs_lists_L{L}')}", flush=True)
    res = rep_["results"]
    for name in ("ours", "lists", "sdpa_dense"):
        res[name] = measure(name, f[name], qkvg)
        save()
    res["ours"]["launch"] = {kd: swa_triton.launch_config(kd, D, dtype, na1d=True) for kd in ("fwd", "dkdv", "dq")}
    # a few launch variants of ours (each compiles: ~3-5 s), while the budget lasts
    variants = [
        ("fwd BM128 BN128 w8 s3 tma one", dict(fwd=dict(BM=128, BN=128, warps=8, stages=3, tma=True, one_loop=True))),
        ("fwd BM128 BN64 w8 s3 tma one", dict(fwd=dict(BM=128, BN=64, warps=8, stages=3, tma=True, one_loop=True))),
        ("fwd BM64 BN128 w4 s3 tma one", dict(fwd=dict(BM=64, BN=128, warps=4, stages=3, tma=True, one_loop=True))),
        ("fwd BM64 BN64 w4 s4 tma one", dict(fwd=dict(BM=64, BN=64, warps=4, stages=4, tma=True, one_loop=True))),
        ("fwd BM64 BN64 w4 s3 tma three lazy8", dict(fwd=dict(BM=64, BN=64, warps=4, stages=3, tma=True, one_loop=False, lazy=8.0))),
        ("fwd BM64 BN64 w4 s3 one", dict(fwd=dict(BM=64, BN=64, warps=4, stages=3, one_loop=True))),
        ("fwd BM64 BN64 w4 s2 tma one", dict(fwd=dict(BM=64, BN=64, warps=4, stages=2, tma=True, one_loop=True))),
        ("fwd BM64 BN32 w4 s3 tma one", dict(fwd=dict(BM=64, BN=32, warps=4, stages=3, tma=True, one_loop=True))),
        ("fwd BM64 BN64 w4 s3 tma three", dict(fwd=dict(BM=64, BN=64, warps=4, stages=3, tma=True, one_loop=False))),
        ("dkdv BM64 BN64 w4 s3 tma", dict(dkdv=dict(BM=64, BN=64, warps=4, stages=3, tma=True))),
        ("dkdv BM32 BN64 s3 tma one", dict(dkdv=dict(BM=32, BN=64, warps=4, stages=3, tma=True, one_loop=True))),
        ("dkdv BM64 BN128 w8 s2", dict(dkdv=dict(BM=64, BN=128, warps=8, stages=2))),
        ("dq BM64 BN64 s3 tma delta", dict(dq=dict(BM=64, BN=64, warps=4, stages=3, tma=True, delta=True))),
        ("dq BM128 BN64 w8 s2 delta", dict(dq=dict(BM=128, BN=64, warps=8, stages=2, delta=True))),
        ("dkdv BM32 BN64 one", dict(dkdv=dict(BM=32, BN=64, warps=4, stages=3, one_loop=True))),
        ("dkdv BM64 BN128 w8 fused tma one", dict(dkdv=dict(BM=64, BN=128, warps=8, stages=2, fused_dq="tma", one_loop=True))),
        ("dq BM64 BN64 one delta", dict(dq=dict(BM=64, BN=64, warps=4, stages=2, one_loop=True, delta=True))),
    ] if not smoke else [("fwd BM32 BN16", dict(fwd=dict(BM=32, BN=16, warps=4, stages=1)))]
    res["variants"] = {}
    for label, over in variants:
        if time.perf_counter() - t0 > budget:
            rep_["notes"].append(f"variants skipped after {label!r}: budget")
            break
        with swa_triton.override_launch(**over):
            res["variants"][label] = measure(label, f["ours"], qkvg)
        save()
    for m in ("fwd_ms", "fwd_bwd_ms"):
        best = min([r[m] for r in [res["ours"], *res["variants"].values()] if m in r], default=None)
        for peer in ("lists", "sdpa_dense"):
            if best and m in res[peer]:
                rep_.setdefault("speedup_vs", {}).setdefault(peer, {})[m] = {
                    "table": res[peer][m] / res["ours"][m] if m in res["ours"] else None, "best_variant": res[peer][m] / best}
    print(f"na1d speedups: {rep_.get('speedup_vs')}", flush=True)
    save()
    return 0


def na2d_main(args) -> int:
    """``--na2d``: the list-free NA-2D kernels against the generic kernel and dense SDPA (see the module doc)."""
    from mnemotorch.layers.vision import na2d
    from mnemotorch.ops.block_sparse import na2d_triton

    smoke = args.smoke
    dev, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    (R, C), K, D, H = ((16, 16), 5, 32, 2) if smoke else ((128, 128), 13, 64, 16)
    check_shape = (12, 12) if smoke else (32, 32)
    L = R * C
    budget = args.time_budget if any(a.startswith("--time-budget") for a in sys.argv) else 90.0  # variants stop after it
    t0 = time.perf_counter()
    out_path = args.out or (os.path.join(os.environ["OUT"], "diag_na2d.json") if os.environ.get("OUT") else None)
    rep_: dict = {"device": device_info(), "argv": sys.argv[1:], "shape": [R, C], "K": K, "D": D, "H": H, "dtype": str(dtype),
                  "results": {}, "checks": {}, "notes": []}
    scale = D**-0.5
    allowed = L * K * K
    rep_["pairs"] = {"allowed": allowed,
                     "ours_table_fwd": na2d_triton.computed_pairs((R, C), (K, K), na2d_triton.launch_config("fwd", D, dtype))}

    def save():
        rep_["elapsed_s"] = time.perf_counter() - t0
        if out_path:
            with open(out_path, "w") as f:
                json.dump(rep_, f, indent=1, default=str)

    def timed(step) -> float:
        return wall_median_ms(step, 0, 1) if smoke else graph_ms(step)

    def inputs(shape, seed=0):
        g = torch.Generator().manual_seed(seed)
        ts = [torch.randn(1, shape[0] * shape[1], H, D, generator=g).to(dev, dtype) for _ in range(4)]
        for t in ts[:3]:
            t.requires_grad_()
        return ts

    def fns(shape, qkvg):
        q, k, v, go = qkvg

        def ours():
            return na2d_triton.na2d_attention_triton(q, k, v, shape, K, scale)

        def lists():  # the generic kernel on 8 x 8-tile-permuted tokens, permutations included
            os.environ["MNEMO_NA2D_KERNEL"] = "off"
            try:
                grid = [t.view(1, shape[0], shape[1], H, D) for t in (q, k, v)]
                return na2d(*grid, K, scale=scale, backend="triton", tile_shape=(8, 8)).view(1, -1, H, D)
            finally:
                os.environ["MNEMO_NA2D_KERNEL"] = "fast"

        def sdpa():
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

        return {"ours": ours, "lists": lists, "sdpa_dense": sdpa}

    def measure(name, fn, qkvg, fwd_only=False, bwd_only=False, pairs=None):
        q, k, v, go = qkvg
        row: dict = {}
        try:
            if not bwd_only:
                def fwd():
                    with torch.no_grad():
                        return fn()
                row["fwd_ms"] = timed(fwd)
                row["fwd_tflops_allowed"] = 4.0 * H * D * allowed / row["fwd_ms"] * 1e-9
                if pairs:
                    row["fwd_tflops_computed"] = 4.0 * H * D * pairs / row["fwd_ms"] * 1e-9
            if not fwd_only:
                row["fwd_bwd_ms"] = timed(lambda: torch.autograd.grad(fn(), (q, k, v), go))
                row["fwd_bwd_tflops_allowed"] = 3.5 * 4.0 * H * D * allowed / row["fwd_bwd_ms"] * 1e-9
        except Exception as exc:  # noqa: BLE001 - recorded
            row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            traceback.print_exc()
        print(f"  {name}: {row}", flush=True)
        return row

    def eager_all(fn, qkvg):
        """Output and gradients of one eager call, detached (no autograd graph survives: see graph_ms)."""
        q, k, v, go = qkvg
        out = fn()
        grads = torch.autograd.grad(out, (q, k, v), go)
        res = [out.detach(), *grads]
        del out, grads
        return res

    # 1. correctness: vs fp32 SDPA with the dense NATTEN mask at check_shape
    try:
        qkvg_c = inputs(check_shape, seed=1)
        q, k, v, go = qkvg_c
        n = check_shape[0] * check_shape[1]
        i = torch.arange(n, device=dev)
        r, c = i // check_shape[1], i % check_shape[1]
        sr, sc = (r - K // 2).clamp(0, check_shape[0] - K), (c - K // 2).clamp(0, check_shape[1] - K)
        mask = ((r[None, :] >= sr[:, None]) & (r[None, :] < sr[:, None] + K)
                & (c[None, :] >= sc[:, None]) & (c[None, :] < sc[:, None] + K))
        leaves = [t.detach().float().transpose(1, 2).requires_grad_() for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*leaves, attn_mask=mask, scale=scale)
        rg = torch.autograd.grad(ref, leaves, go.float().transpose(1, 2))
        ref = [ref.detach().transpose(1, 2), *(g.transpose(1, 2) for g in rg)]
        for name in ("ours", "lists"):
            got = eager_all(fns(check_shape, qkvg_c)[name], qkvg_c)
            errs = {nm: _rel(a, b) for nm, a, b in zip(("out", "dq", "dk", "dv"), got, ref)}
            rep_["checks"][f"{name}_vs_fp32_sdpa_mask_{check_shape[0]}x{check_shape[1]}"] = errs
            rep_["checks"][f"{name}_ok"] = all(e == e and e <= (5e-3 if nm == "out" else 1e-2) for nm, e in errs.items())
            del got
        del qkvg_c, q, k, v, go, leaves, rg, ref
    except Exception as exc:  # noqa: BLE001
        rep_["checks"]["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        traceback.print_exc()
    print(f"na2d check: {rep_['checks']}", flush=True)
    save()

    # 2. the main case: ours (table), the generic kernel, dense SDPA
    qkvg = inputs((R, C))
    f = fns((R, C), qkvg)
    table_ref = None
    try:
        table_ref = eager_all(f["ours"], qkvg)
        lists_ref = eager_all(f["lists"], qkvg)
        rep_["checks"]["ours_vs_lists"] = {nm: _rel(a, b) for nm, a, b in zip(("out", "dq", "dk", "dv"), table_ref, lists_ref)}
        del lists_ref
    except Exception as exc:  # noqa: BLE001
        rep_["checks"]["ours_vs_lists_error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        traceback.print_exc()
    print(f"na2d ours vs lists: {rep_['checks'].get('ours_vs_lists')}", flush=True)
    save()
    res = rep_["results"]
    for name in ("ours", "lists", "sdpa_dense"):
        res[name] = measure(name, f[name], qkvg, pairs=rep_["pairs"]["ours_table_fwd"] if name == "ours" else None)
        save()
    res["ours"]["launch"] = {kd: na2d_triton.launch_config(kd, D, dtype) for kd in ("fwd", "dkdv", "dq")}

    # 3. launch variants (each compiles: a few s), forward first, while the budget lasts; each is
    # compared with the table's rows on the same inputs before it is timed
    def cfg(qr, qc, ktr, ktc, warps, stages=3):
        return dict(QR=qr, QC=qc, KTR=ktr, KTC=ktc, warps=warps, stages=stages)

    if smoke:
        variants = [("fwd 2x8 q 2x8 k", "fwd", dict(fwd=cfg(2, 8, 2, 8, 4, 1)))]
    else:
        variants = []
        for qr, qc in ((4, 16), (8, 8), (2, 32), (8, 16)):
            for ktr, ktc in ((2, 32), (4, 32), (1, 64), (4, 16)):
                for w in ((4, 8) if qr * qc * ktr * ktc >= 128 * 64 else (4,)):
                    if (qr, qc, ktr, ktc, w) != (4, 16, 2, 32, 4):  # the table's row: measured above
                        variants.append((f"fwd q{qr}x{qc} k{ktr}x{ktc} w{w}", "fwd", dict(fwd=cfg(qr, qc, ktr, ktc, w))))
        for ktr, ktc in ((4, 16), (8, 8), (2, 32)):  # dK/dV: key tile per program, gathered query tiles
            for qr, qc in ((2, 32), (4, 16)):
                for w in (4, 8):
                    variants.append((f"dkdv k{ktr}x{ktc} q{qr}x{qc} w{w}", "bwd", dict(dkdv=cfg(qr, qc, ktr, ktc, w))))
        for qr, qc, ktr, ktc, w in ((8, 8, 2, 32, 4), (8, 16, 2, 32, 8), (4, 16, 4, 32, 8), (2, 32, 4, 16, 4)):
            variants.append((f"dq q{qr}x{qc} k{ktr}x{ktc} w{w}", "bwd", dict(dq=cfg(qr, qc, ktr, ktc, w))))
        # fwd variants first by interest: 4 x 16 and 8 x 8 query tiles before the rest
        variants.sort(key=lambda x: (x[1] != "fwd", not x[0].startswith(("fwd q4x16", "fwd q8x8"))))
        if args.na2d_variants == "bwd":  # the backward only: stages, the Delta placement, a few tile shapes
            dk0, dq0 = na2d_triton.launch_config("dkdv", D, dtype), na2d_triton.launch_config("dq", D, dtype)
            variants = [("dq delta=False (preprocess pass, dK/dV first)", "bwd", dict(dq=dict(dq0, delta=False)))]
            variants += [(f"dkdv stages {st}", "bwd", dict(dkdv=dict(dk0, stages=st))) for st in (2, 4)]
            variants += [(f"dq stages {st}", "bwd", dict(dq=dict(dq0, stages=st))) for st in (2, 4)]
            variants += [(f"dkdv k{ktr}x{ktc} q{qr}x{qc} s{st}", "bwd", dict(dkdv=cfg(qr, qc, ktr, ktc, 4, st)))
                         for ktr, ktc, qr, qc, st in ((4, 16, 4, 16, 2), (4, 32, 2, 32, 2), (4, 32, 2, 32, 3), (2, 32, 2, 32, 2))]
            variants += [(f"dq q{qr}x{qc} k{ktr}x{ktc} s{st}", "bwd", dict(dq=dict(cfg(qr, qc, ktr, ktc, 4, st), delta=True)))
                         for qr, qc, ktr, ktc, st in ((4, 16, 4, 16, 3), (4, 16, 4, 32, 2), (8, 8, 2, 32, 3), (4, 16, 2, 32, 2))]
    res["variants"] = {}
    for label, kind, over in variants:
        if time.perf_counter() - t0 > budget:
            rep_["notes"].append(f"variants skipped from {label!r} on: budget {budget:.0f} s")
            break
        with na2d_triton.override_launch(**over):
            row: dict = {"launch": over}
            try:
                if table_ref is not None:
                    got = eager_all(f["ours"], qkvg)
                    errs = {nm: _rel(a, b) for nm, a, b in zip(("out", "dq", "dk", "dv"), got, table_ref)}
                    del got
                    row["vs_table"] = errs
                    if not all(e == e and e <= (5e-3 if nm == "out" else 1e-2) for nm, e in errs.items()):
                        row["error"] = "disagrees with the table's rows"
                if "error" not in row:
                    pairs = na2d_triton.computed_pairs((R, C), (K, K), na2d_triton.launch_config("fwd", D, dtype))
                    row.update(measure(label, f["ours"], qkvg, fwd_only=kind == "fwd", bwd_only=kind == "bwd", pairs=pairs))
            except Exception as exc:  # noqa: BLE001 - a config that does not compile (shared memory) and the like
                row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            res["variants"][label] = row
        save()
    for m in ("fwd_ms", "fwd_bwd_ms"):
        rows = [("table", res["ours"])] + [(lb, r) for lb, r in res["variants"].items()]
        best = min([(r[m], lb) for lb, r in rows if m in r], default=None)
        if best:
            rep_.setdefault("best", {})[m] = {"ms": best[0], "config": best[1]}
        for peer in ("lists", "sdpa_dense"):
            if best and m in res[peer]:
                rep_.setdefault("speedup_vs", {}).setdefault(peer, {})[m] = {
                    "table": res[peer][m] / res["ours"][m] if m in res["ours"] else None, "best_variant": res[peer][m] / best[0]}
    rep_["notes"].append("fwd variants time the forward only, bwd variants forward + backward with the table's forward; "
                         "the best fwd+bwd combines the best forward and backward rows only if measured together")
    print(f"na2d best: {rep_.get('best')}; speedups: {rep_.get('speedup_vs')}", flush=True)
    save()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT/diag_swa.json when OUT is set)")
    ap.add_argument("--time-budget", type=float, default=200.0,
                    help="seconds; a step starts only if its expected time fits (the run ends within ~30 s after)")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run: Triton interpreter, tiny sizes, 2 configs per kernel")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compilation takes tens of seconds)")
    ap.add_argument("--sdpa", action="store_true", help="also time dense causal SDPA at the main case (~5 s)")
    ap.add_argument("--lists-autotune", default="off", choices=bs_triton.AUTOTUNE_MODES, help="launch tuning of the generic kernel")
    ap.add_argument("--na2d-variants", default="all", choices=("all", "bwd"),
                    help="--na2d launch variants: every forward / backward tile shape (all) or the backward's stages, "
                    "Delta placement and a few tile shapes (bwd)")
    ap.add_argument("--na1d", action="store_true", help="1-D neighborhood attention L=32K K=2048 D=128 H=1 (see the doc); ~60 s")
    ap.add_argument("--na2d", action="store_true", help="2-D neighborhood attention 128x128 K=13x13 D=64 H=16 (see the doc); ~90 s")
    args = ap.parse_args(argv)
    if args.na2d:
        if not torch.cuda.is_available() and not args.smoke:
            print("diag_swa --na2d: needs a CUDA device (or --smoke)", file=sys.stderr)
            return 2
        torch.backends.cuda.matmul.allow_tf32 = False
        return na2d_main(args)
    if args.na1d:
        if not torch.cuda.is_available() and not args.smoke:
            print("diag_swa --na1d: needs a CUDA device (or --smoke)", file=sys.stderr)
            return 2
        torch.backends.cuda.matmul.allow_tf32 = False
        return na1d_main(args)
    if args.out is None and os.environ.get("OUT"):
        args.out = os.path.join(os.environ["OUT"], "diag_swa.json")
    if not torch.cuda.is_available() and not args.smoke:
        print("diag_swa: needs a CUDA device (or --smoke for the CPU interpreter)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    bs_triton.set_autotune(args.lists_autotune)
    sw = Sweep(args)
    smoke = args.smoke
    flex = not args.no_flex
    main_case = (256, 64, 32) if smoke else (65536, 1024, 128)
    d64_case = (256, 64, 16) if smoke else (65536, 1024, 64)
    others = [(128, 32, 32)] if smoke else [(16384, 1024, 128), (65536, 4096, 128), (16384, 1024, 64), (65536, 4096, 64),
                                             (16384, 4096, 64)]
    L, W, D = main_case
    print(f"diag_swa on {sw.report['device'].get('device', 'cpu')}: main case L={L} W={W} D={D} H={sw.H} {sw.dtype}", flush=True)
    case = sw.report["cases"][f"L{L}_W{W}_D{D}"] = {"L": L, "W": W, "D": D, "results": {}}
    res = case["results"]

    print("[1] the table's rows and the generic kernel", flush=True)
    res["ours_table"] = sw.ours_case(L, W, D, "table", {})
    case["table_launch"] = {k: swa_triton.launch_config(k, D, sw.dtype) for k in ("fwd", "dkdv", "dq")}
    sw.save()
    sw.peers(L, W, D, case, flex=False, sdpa=args.sdpa)

    print("[2] forward", flush=True)
    table_fwd = {"kind": "fwd", "config": swa_triton.launch_config("fwd", D, sw.dtype), "L": L, "W": W, "D": D, "table": True,
                 **{k: res["ours_table"].get(k) for k in ("fwd_ms", "fwd_tflops_computed", "ok")}}
    sw.report["fwd_sweep"].append(table_fwd)
    for c in (SMOKE_FWD if smoke else FWD_GRID):
        if sw.over("rest of the forward sweep", CONFIG_NEED_S):
            break
        cfg = fwd_cfg(c)
        sw.measure_config("fwd", cfg, {"fwd": cfg}, L, W, D, fwd_only=True, store="fwd_sweep")
    best_fwd = _best(sw.report["fwd_sweep"], "fwd_ms")
    fwd_over = {"fwd": best_fwd["config"]} if best_fwd else {}

    print("[3] dK/dV (forward: the best above; dQ: the table's)", flush=True)
    for c in (SMOKE_DKDV if smoke else DKDV_GRID):
        if sw.over("rest of the dK/dV sweep", CONFIG_NEED_S):
            break
        cfg = dkdv_cfg(c)
        sw.measure_config("dkdv", cfg, {**fwd_over, "dkdv": cfg}, L, W, D, fwd_only=False, store="dkdv_sweep")
    best_dkdv = _best(sw.report["dkdv_sweep"], "fwd_bwd_ms")
    best_sep = _best([r for r in sw.report["dkdv_sweep"] if not r["config"]["fused_dq"]], "fwd_bwd_ms")

    print("[4] dQ kernel (dK/dV: the best without fused dQ)", flush=True)
    sep_over = {**fwd_over, "dkdv": best_sep["config"]} if best_sep else dict(fwd_over)
    for c in (SMOKE_DQ if smoke else DQ_GRID):
        if sw.over("rest of the dQ sweep", CONFIG_NEED_S):
            break
        cfg = dq_cfg(c)
        sw.measure_config("dq", cfg, {**sep_over, "dq": cfg}, L, W, D, fwd_only=False, store="dq_sweep")
    best_dq = _best(sw.report["dq_sweep"], "fwd_bwd_ms")

    best_over = dict(fwd_over)
    if best_dkdv is not None:
        use_sep = best_dq is not None and best_dq["fwd_bwd_ms"] < best_dkdv["fwd_bwd_ms"]
        best_over["dkdv"] = best_sep["config"] if use_sep else best_dkdv["config"]
        if use_sep:
            best_over["dq"] = best_dq["config"]
    sw.report["best_overrides"] = best_over

    print("[5] the best combination: end to end, each kernel alone, peak memory", flush=True)
    if best_over and not sw.over("ours with the best configs", CONFIG_NEED_S):
        res["ours_best"] = sw.ours_case(L, W, D, "best configs", best_over, peak=True)
    if not sw.over("kernel times", CONFIG_NEED_S):
        sw.report["kernel_times"][f"L{L}_W{W}_D{D} best"] = sw.kernel_times(L, W, D, best_over)
        # the best of the other backward family, for the dK/dV vs dQ shares
        fused_rows = [r for r in sw.report["dkdv_sweep"] if r["config"]["fused_dq"]]
        other = best_sep if (best_over.get("dkdv") or {}).get("fused_dq") else _best(fused_rows, "fwd_bwd_ms")
        if other is not None:
            over = {**fwd_over, "dkdv": other["config"]}
            if not other["config"]["fused_dq"] and best_dq is not None:
                over["dq"] = best_dq["config"]
            sw.report["kernel_times"][f"L{L}_W{W}_D{D} best {'fused' if other['config']['fused_dq'] else 'separate dQ'}"] = (
                sw.kernel_times(L, W, D, over))
    sw.speedups(case)
    sw.save()

    print("[6] FlexAttention", flush=True)
    if flex:
        sw.peers(L, W, D, case, flex=True, sdpa=False)

    print(f"[7] D = {d64_case[2]} backward against the generic kernel", flush=True)
    l6, w6, d6 = d64_case
    c6 = sw.report["cases"][f"L{l6}_W{w6}_D{d6}"] = {"L": l6, "W": w6, "D": d6, "results": {}}
    sw.peers(l6, w6, d6, c6, flex=False, sdpa=False)
    if not sw.over("D=64 table", CONFIG_NEED_S):
        c6["results"]["ours_table"] = sw.ours_case(l6, w6, d6, "table", {})
    for kind, c in (SMOKE_D64 if smoke else D64_GRID):
        if sw.over("rest of the D=64 sweep", CONFIG_NEED_S):
            break
        cfg = dkdv_cfg(c) if kind == "dkdv" else dq_cfg(c)
        over = {kind: cfg}
        if kind == "dq":
            sep = _best([r for r in sw.report["d64_sweep"] if r["kind"] == "dkdv" and not r["config"]["fused_dq"]], "fwd_bwd_ms")
            if sep is not None:
                over["dkdv"] = sep["config"]
        sw.measure_config(kind, cfg, over, l6, w6, d6, fwd_only=False, store="d64_sweep")
    b6 = _best(sw.report["d64_sweep"], "fwd_bwd_ms")  # its overrides: the dK/dV row (and the dQ row it was timed with)
    d64_best = {k: v for k, v in (b6 or {}).get("overrides", {}).items() if k in ("dkdv", "dq")}
    sw.report["best_overrides_d64"] = d64_best
    if d64_best and not sw.over("D=64 best", CONFIG_NEED_S):
        c6["results"]["ours_best"] = sw.ours_case(l6, w6, d6, "best D=64 rows", d64_best)
    sw.speedups(c6)
    sw.save()

    print("[8] other cases (best rows for their head dim)", flush=True)
    for (l2, w2, d2) in others:
        if sw.over(f"case L={l2} W={w2} D={d2}", 2 * CONFIG_NEED_S):
            break
        c2 = sw.report["cases"][f"L{l2}_W{w2}_D{d2}"] = {"L": l2, "W": w2, "D": d2, "results": {}}
        over = best_over if d2 == D else d64_best
        c2["results"]["ours_best"] = sw.ours_case(l2, w2, d2, f"best rows of D={d2}", over)
        sw.peers(l2, w2, d2, c2, flex=False, sdpa=False)

    print("[9] FlexAttention at D = 64", flush=True)
    if flex:
        sw.peers(l6, w6, d6, c6, flex=True, sdpa=False)

    # ---- summary
    prev = _previous()
    print("\n=== summary (ms fwd / fwd+bwd; CUDA-graph replays; 'prev' = first sweep, "
          f"{PREVIOUS.name}) ===" if sw.cuda else "\n=== summary (smoke: wall clock) ===")
    print(f"{'case':20s} {'ours table':>16s} {'ours best':>16s} {'lists':>16s} {'flex':>22s}  {'best vs flex':>13s}  {'vs lists':>11s}")
    for key, c in sw.report["cases"].items():
        r = c.get("results", {})
        p = prev.get(key, {}).get("results", {})

        def cell(x):
            f, fb = (x or {}).get("fwd_ms"), (x or {}).get("fwd_bwd_ms")
            return f"{'-' if f is None else f'{f:.3f}'} / {'-' if fb is None else f'{fb:.3f}'}"

        flex_row, tag = (r.get("flex"), "") if r.get("flex", {}).get("fwd_ms") else (p.get("flex"), " prev")
        ob = r.get("ours_best") or r.get("ours_table") or {}

        def ratio(x):
            if not x or not ob.get("fwd_ms") or not x.get("fwd_ms") or not x.get("fwd_bwd_ms") or not ob.get("fwd_bwd_ms"):
                return "-"
            return f"{x['fwd_ms'] / ob['fwd_ms']:.2f}x/{x['fwd_bwd_ms'] / ob['fwd_bwd_ms']:.2f}x"

        print(f"{key:20s} {cell(r.get('ours_table')):>16s} {cell(r.get('ours_best')):>16s} {cell(r.get('lists')):>16s} "
              f"{cell(flex_row) + tag:>22s}  {ratio(flex_row):>13s}  {ratio(r.get('lists')):>11s}")
    ob = res.get("ours_best") or res.get("ours_table") or {}
    if ob.get("fwd_tflops_computed"):
        print(f"main case forward on computed tiles: {ob['fwd_tflops_computed']:.0f} TFLOP/s "
              f"(target >= 0.7 x 614 = 430); allowed pairs: {ob.get('fwd_tflops_allowed', 0):.0f} TFLOP/s")
    fl = res.get("flex", {})
    if ob.get("peak_mb_fwd_bwd") and fl.get("peak_mb_fwd_bwd"):
        print(f"main case peak memory of one fwd+bwd call: ours {ob['peak_mb_fwd_bwd']:.0f} MB, Flex {fl['peak_mb_fwd_bwd']:.0f} MB")
    for name, kt in sw.report["kernel_times"].items():
        print(f"kernels, {name}: " + ", ".join(f"{k} {v:.3f}" if k.endswith("_ms") else f"{k} {v:.0f}"
                                               for k, v in kt.items() if isinstance(v, float)))
    rows = [_table_row(k, D, best_over[k], sw.dtype) for k in ("fwd", "dkdv", "dq") if k in best_over]
    rows += [_table_row(k, d6, d64_best[k], sw.dtype) for k in ("dkdv", "dq") if k in d64_best]
    print(f"\nrows for swa_triton.LAUNCH (the best at L={L} W={W}, D = {D} and D = {d6}, {sw.dtype}):")
    for row in rows:
        print(row)
    failed = [r for k in ("fwd_sweep", "dkdv_sweep", "dq_sweep", "d64_sweep") for r in sw.report[k]
              if "error" in r or r.get("ok") is False]
    if failed:
        print(f"\n{len(failed)} config(s) failed or gave wrong results:")
        for r in failed:
            print(f"  {r['kind']} D={r['D']} {_cfg_text(r['config'])}: {_row_text(r)}")
    sw.report["launch_rows"] = rows
    sw.save()
    print(f"\ndone in {sw.elapsed():.0f} s" + (f"; JSON: {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
