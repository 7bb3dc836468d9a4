"""Localise a disagreement of the fused Titans-memory forward (``ops/memory/fused_triton.py``) with the
chunked path on a real GPU, and time launch variants.

Correctness part: float32 inputs (IEEE products in the kernel) against the float64 chunked path, for
configurations that switch one feature at a time (activation, LayerNorm, clip, depth), with gates
that keep the memory alive (α ≤ 0.01: with α up to 0.1 a depth-2 memory decays to zero and any
comparison of outputs passes vacuously), and a θ = 0 case (no learning: the output is the read at
the initial weights, which isolates the read from the update). Per chunk, the output's relative
error, so a wrong first chunk (the in-chunk arithmetic) is told apart from drift (the carried state).

Timing part (``--sweep``): the op's forward at the benchmark's head shape (16 heads, d 64, hidden 256,
chunk 64, bf16) for ``fused_triton.LAUNCH`` variants.

Training part (``--train``): the op's forward + backward (fused kernel with per-chunk checkpoints, then
``ops/memory/fused_backward.py``) at the same shape, with the per-chunk adjoint step eager and compiled
(``fused_triton.BACKWARD["compile_sweep"]``): median ms, the first call (compilation) apart, the
backward's phases (CUDA events) and the peak memory of one forward + backward.

With ``--profile`` the sweep also records, per variant, the forward walk's timer stamps (µs per chunk in each
phase and barrier, ``fused_triton.LAUNCH["profile"]``); ``--train`` always records the walk's and the adjoint
sweep's.

    python scripts/diag_memory_fused.py --out $OUT/diag_memory_fused.json [--sweep [--slices 64 --warps 4 --stages 1,2 --precisions tf32/tf32,tf32x3/tf32]]
    python scripts/diag_memory_fused.py --skip-correctness --sweep --splits 64 --warps 4 --reads batched --read-launches 32:4 --phase3 recompute,registers --profile
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import time

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1 :][:1] == ["cpu"]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch
import torch.nn.functional as F

from mnemotorch.bench.neural_memory import time_ms
from mnemotorch.ops.memory import MemoryState, memory_hidden_shapes, neural_memory_chunked
from mnemotorch.ops.memory import fused_triton
from mnemotorch.ops.memory.fused_triton import neural_memory_fused_forward

CONFIGS = {
    "matched": dict(activation="gelu", residual=True, layer_norm=True, max_grad_norm=None),
    "gelu": dict(activation="gelu", residual=True, layer_norm=False, max_grad_norm=None),
    "silu_ln": dict(activation="silu", residual=True, layer_norm=True, max_grad_norm=None),
    "silu": dict(activation="silu", residual=True, layer_norm=False, max_grad_norm=None),
    "default": dict(activation="silu", residual=True, layer_norm=False, max_grad_norm=1.0),
    "relu_plain": dict(activation="relu", residual=False, layer_norm=False, max_grad_norm=None),
}


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def inputs(t, h, d, hidden, depth, dtype, dev, theta_max=0.1, alpha_max=0.01, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, device=dev, generator=g)  # noqa: E731
    uni = lambda lo, hi: lo + (hi - lo) * torch.rand(1, t, h, device=dev, generator=g)  # noqa: E731
    q, k = (F.normalize(rnd(1, t, h, d), dim=-1) for _ in range(2))
    v = rnd(1, t, h, d)
    w = tuple(rnd(1, h, i, o) / i**0.5 for i, o in memory_hidden_shapes(d, d, depth, hidden))
    s = tuple(0.1 * rnd(*x.shape) for x in w)
    gates = (uni(0.0, theta_max), uni(0.5, 1.0), uni(0.0, alpha_max))
    return tuple(x.to(dtype) for x in (q, k, v)), gates, MemoryState(w, s, w, 0)


def correctness(dev, t: int, h: int) -> list:
    rows = []
    d, hidden, c = 64, 256, 64
    f64 = lambda xs: tuple(x.double() for x in xs)  # noqa: E731
    cases = [(name, 2, 0.1) for name in CONFIGS] + [("matched", 1, 0.1), ("default", 1, 0.1), ("matched", 2, 0.0), ("silu", 2, 0.0)]
    for name, depth, theta_max in cases:
        cfg = CONFIGS[name]
        (q, k, v), gates, st = inputs(t, h, d, hidden, depth, torch.float32, dev, theta_max=theta_max)
        with torch.no_grad():
            y_ref, s_ref = neural_memory_chunked(*f64((q, k, v)), *f64(gates), MemoryState(f64(st.weights), f64(st.momentum), f64(st.weights), 0), c, **cfg)
            y, s = neural_memory_fused_forward(q, k, v, *gates, st, c, **cfg)
        per_chunk = [rel(y[:, i : i + c], y_ref[:, i : i + c]) for i in range(0, t, c)]
        row = {"config": name, "depth": depth, "theta_max": theta_max, "t": t, "heads": h, "y_rel": rel(y, y_ref), "y_rel_per_chunk": per_chunk,
               "weights_rel": [rel(a, b) for a, b in zip(s.weights, s_ref.weights)], "momentum_rel": [rel(a, b) for a, b in zip(s.momentum, s_ref.momentum)],
               "weights_norm": [b.norm().item() for b in s_ref.weights], "read_minus_q_rel": rel(y - q, y_ref - q.double())}  # fmt: skip
        print(json.dumps({k_: (v_ if k_ != "y_rel_per_chunk" else [f"{x:.1e}" for x in v_]) for k_, v_ in row.items()}), flush=True)
        rows.append(row)
    return rows


def sweep(dev, t: int, rep: int, slices=(32, 64, 128), warps=(4, 8), precisions=("tf32x3/tf32",), stages=(1,), splits=(0,),
          reads=("batched",), read_launches=("64:8",), carries=(False,), profile=False, phase3s=("auto",)) -> list:
    """``precisions``: "state/read" pairs of ``LAUNCH["half_precision"]`` / ``["half_read_precision"]``; ``reads``:
    ``LAUNCH["split_read"]`` values; ``read_launches``: ``read_slice:read_warps`` of the batched read kernel."""
    h, d, hidden, c = 16, 64, 256, 64
    rows = []
    base = dict(fused_triton.LAUNCH)
    variants = [(r, rl, cy, p3) for r in reads for rl in (read_launches if r == "batched" else ("-",)) for cy in (carries if r == "batched" else (False,))
                for p3 in (phase3s if r == "batched" else ("auto",))]  # fmt: skip
    for name in ("matched", "default"):
        (q, k, v), gates, st = inputs(t, h, d, hidden, 2, torch.bfloat16, dev)
        for sp, bh, nw, ns, prec, (rd, rl, cy, p3) in itertools.product(splits, slices, warps, stages, precisions, variants):
            p_state, _, p_read = prec.partition("/")
            fused_triton.LAUNCH.update(hidden_slice=bh, num_warps=nw, num_stages=ns, half_precision=p_state, half_read_precision=p_read or p_state,
                                       split_slice=sp, split_warps=nw, split_read=rd, split_carry=cy, split_phase3=p3)
            if rl != "-":
                rs, rw = (int(x) for x in rl.split(":"))
                fused_triton.LAUNCH.update(read_slice=rs, read_warps=rw)
            row = {"config": name, "t": t, "hidden_slice": bh, "num_warps": nw, "num_stages": ns, "precision": prec, "split_slice": sp,
                   "split_read": rd, "read_launch": rl, "split_carry": cy, "split_phase3": p3}  # fmt: skip
            try:
                with torch.no_grad():
                    row["ms"] = time_ms(lambda: neural_memory_fused_forward(q, k, v, *gates, st, c, **CONFIGS[name]), dev, 2, rep)
                    if profile:  # two more calls with the walk's timer stamps (LAUNCH["profile"]); the first compiles
                        for _ in range(2):
                            fused_triton.LAUNCH["profile"] = prof = {}
                            neural_memory_fused_forward(q, k, v, *gates, st, c, **CONFIGS[name])
                        fused_triton.LAUNCH["profile"] = None
                        row["profile"] = prof
            except Exception as e:  # noqa: BLE001 (out of resources: recorded, the sweep goes on)
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
        fused_triton.LAUNCH.clear()
        fused_triton.LAUNCH.update(base)
    return rows


def _set_from_options(opts: list, prefix: str, target: dict, name: str) -> list:
    """``--vjps`` options ``":<prefix>key=value"`` set ``target[key]`` (ints and 0/1 flags as ints; ``name`` for the
    error on an unknown key). Returns the ``"key=value"`` items applied."""
    items = [o[1:] for o in opts if o.startswith(prefix) and "=" in o]
    for item in items:
        key, val = item.split("=", 1)
        if key not in target:
            raise SystemExit(f"--vjps: unknown {name} key {key!r}")
        target[key] = int(val) if val.lstrip("-").isdigit() else val
    return items


def train(dev, t: int, rep: int, compile_modes=("1", "0"), configs=("matched", "default"), vjps=("triton:adjoint",), read_vjp_launches=()) -> list:
    """``compile_modes``: "0" nothing compiled, "1" the sweep (blocks) and the batched read / update compiled,
    "s" only the sweep compiled; a suffix ":U" sets the sweep's block of chunks (default 8). ``vjps``:
    "READ:UPDATE" pairs of ``BACKWARD["read_vjp"]`` ("triton", "adjoint", "autograd") / ``["update_vjp"]`` ("triton", "adjoint",
    "autograd"; ":u32w8[s2]" sets the update kernel's slice, warps and stages), a suffix ":fold" sets ``BACKWARD["fold_read"]`` (the read's key-pass cotangents go into the sweep and the
    update's pass instead of their own key-pass VJP). ``read_vjp_launches``: "slice:warps[:a_slice:a_warps[:stages]]" launches of the read-VJP kernels, timed in the "triton" rows."""
    h, d, hidden, c = 16, 64, 256, 64
    rows = []
    from mnemotorch.ops.memory import fused_update_vjp

    saved_update_launch = dict(fused_update_vjp.LAUNCH_UPDATE_VJP)
    saved_all_launch = dict(fused_triton.LAUNCH)
    saved_backward = dict(fused_triton.BACKWARD)
    for name, comp, vjp in itertools.product(configs, compile_modes, vjps):
        rvjp, uvjp, *opts = vjp.split(":")
        fused_triton.LAUNCH.update(saved_all_launch)
        launch_set = _set_from_options(opts, "L", fused_triton.LAUNCH, "LAUNCH")
        fused_triton.BACKWARD.update(saved_backward)
        backward_set = _set_from_options(opts, "B", fused_triton.BACKWARD, "BACKWARD")
        (q, k, v), gates, st = inputs(t, h, d, hidden, 2, torch.bfloat16, dev)
        xs = [x.detach().requires_grad_() for x in (q, k, v, *gates, *st.weights, *st.momentum)]
        state = MemoryState(tuple(xs[6:8]), tuple(xs[8:10]), tuple(xs[6:8]), 0)

        go = torch.randn(q.shape, device=dev, generator=torch.Generator(device=dev).manual_seed(1)).to(q.dtype)

        def fwd_bwd():
            y, _ = neural_memory_fused_forward(*xs[:6], state, c, **CONFIGS[name])
            return torch.autograd.grad([y], xs, [go])

        modes = {"0": (False, False), "1": (True, True), "s": (True, False)}
        comp, _, blk = comp.partition(":")
        fused_triton.BACKWARD["compile_sweep"], fused_triton.BACKWARD["compile_batched"] = modes[comp]
        fused_triton.BACKWARD["sweep_block"] = int(blk or 8)
        fused_triton.BACKWARD["read_vjp"], fused_triton.BACKWARD["update_vjp"] = rvjp, uvjp
        fused_triton.BACKWARD["fold_read"] = "fold" in opts
        fused_triton.BACKWARD["update_tf32"] = "f32" not in opts
        fused_triton.BACKWARD["overlap"] = False if "serial" in opts else True if "overlap" in opts else saved_backward["overlap"]
        gexp = [int(o[1:]) for o in opts if o.startswith("g") and o[1:].isdigit()]
        fused_triton.BACKWARD["group_elements"] = 1 << gexp[0] if gexp else saved_backward["group_elements"]
        precs = [o[1:] for o in opts if o in ("ptf32x3", "pbf16x3", "ptf32")]
        if precs:  # (LAUNCH was restored above: only the options given change it)
            fused_triton.LAUNCH["half_precision"] = precs[0]
        precs = [o[1:] for o in opts if o in ("rtf32x3", "rbf16x3", "rtf32")]
        if precs:
            fused_triton.LAUNCH["half_read_precision"] = precs[0]
        if "nok" in opts:
            fused_triton.LAUNCH["exact_keys"] = False
        ulaunch = [re.fullmatch(r"u(\d+)w(\d+)(?:s(\d+))?", o) for o in opts]  # ":u32w8[s2]": the update-VJP kernel's slice, warps, stages
        ulaunch = [m for m in ulaunch if m]
        fused_update_vjp.LAUNCH_UPDATE_VJP.update(saved_update_launch)
        if ulaunch:
            m = ulaunch[0]
            fused_update_vjp.LAUNCH_UPDATE_VJP.update(slice=int(m[1]), warps=int(m[2]), stages=int(m[3] or saved_update_launch["stages"]))
        row = {"config": name, "t": t, "compile": comp, "sweep_block": fused_triton.BACKWARD["sweep_block"], "read_vjp": rvjp, "update_vjp": uvjp,
               "half_precision": fused_triton.LAUNCH["half_precision"], "half_read_precision": fused_triton.LAUNCH["half_read_precision"],
               "exact_keys": fused_triton.LAUNCH["exact_keys"], "update_vjp_launch": dict(fused_update_vjp.LAUNCH_UPDATE_VJP),
               "launch_set": launch_set, "backward_set": backward_set,
               **{key: fused_triton.BACKWARD[key] for key in ("fold_read", "update_tf32", "overlap", "group_elements")}}
        try:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fwd_bwd()
            torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - t0
            phases: dict = {}
            fused_triton.BACKWARD["timing"] = phases
            fwd_bwd()
            fused_triton.BACKWARD["timing"] = None
            row["bwd_phases_ms"] = phases
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fwd_bwd()
            torch.cuda.synchronize()
            row["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
            row["fwd_bwd_ms"] = time_ms(fwd_bwd, dev, 1, rep)
            with torch.no_grad():
                row["fwd_ms"] = time_ms(lambda: neural_memory_fused_forward(*xs[:6], state, c, **CONFIGS[name]), dev, 1, rep)
            for _ in range(2):  # the walk's and the sweep's timer stamps (the first call compiles the stamped kernels)
                fused_triton.LAUNCH["profile"] = prof = {}
                fwd_bwd()
            row["profile"] = prof
            if rvjp == "triton" and read_vjp_launches:  # the read VJP's phase per kernel launch (slice:warps)
                from mnemotorch.ops.memory import fused_read_vjp

                base_launch = dict(fused_read_vjp.LAUNCH_READ_VJP)
                row["read_vjp_launch_ms"] = {}
                for spec in read_vjp_launches:
                    parts = [int(x) for x in spec.split(":")]  # slice:warps[:a_slice:a_warps[:stages]]
                    fused_read_vjp.LAUNCH_READ_VJP.update(dict(zip(("slice", "warps", "a_slice", "a_warps", "stages"), parts)))
                    try:
                        fwd_bwd()  # compiles this variant
                        phases = {}
                        fused_triton.BACKWARD["timing"] = phases
                        for _ in range(3):
                            fwd_bwd()
                        row["read_vjp_launch_ms"][spec] = {key: phases.get(key, float("nan")) / 3 for key in ("read_vjp", "read_vjp_tail")}
                    except Exception as e:  # noqa: BLE001
                        row["read_vjp_launch_ms"][spec] = f"{type(e).__name__}: {str(e)[:200]}"
                    finally:
                        fused_triton.BACKWARD["timing"] = None
                        fused_read_vjp.LAUNCH_READ_VJP.clear()
                        fused_read_vjp.LAUNCH_READ_VJP.update(base_launch)
                row["read_vjp_kernels"] = [  # registers and spills of every compiled variant (Triton records them at launch)
                    {"kernel": kn, "num_warps": getattr(ck.metadata, "num_warps", None), "n_regs": getattr(ck, "n_regs", None),
                     "n_spills": getattr(ck, "n_spills", None)}
                    for kn in ("_lmm_read_vjp_a_kernel", "_lmm_read_vjp_b_kernel")
                    for cache in getattr(fused_read_vjp, kn).device_caches.values() for ck in cache[0].values()]  # fmt: skip
            if uvjp == "triton":  # registers and spills of the update-VJP kernel's compiled variants
                row["update_vjp_kernels"] = [
                    {"num_warps": getattr(ck.metadata, "num_warps", None), "num_stages": getattr(ck.metadata, "num_stages", None),
                     "n_regs": getattr(ck, "n_regs", None), "n_spills": getattr(ck, "n_spills", None)}
                    for cache in fused_update_vjp._lmm_update_vjp_kernel.device_caches.values() for ck in cache[0].values()]  # fmt: skip
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            fused_triton.LAUNCH["profile"] = None
            fused_triton.BACKWARD["timing"] = None
            fused_triton.BACKWARD["compile_sweep"] = fused_triton.BACKWARD["compile_batched"] = None
            fused_triton.BACKWARD["sweep_block"] = 8
            # (the settings the variant's options change, the ":B" ones included)
            restored = ("read_vjp", "update_vjp", "fold_read", "update_tf32", "overlap", "group_elements", *(x.split("=", 1)[0] for x in backward_set))
            fused_triton.BACKWARD.update({key: saved_backward[key] for key in restored})
            fused_triton.LAUNCH.update(saved_all_launch)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def sweep_launch(dev, t: int, rep: int, launches: list) -> list:
    """The training path's forward + backward (matched config) for ``LAUNCH["sweep_slice"]:["sweep_warps"]``
    variants of the adjoint-sweep kernel."""
    h, d, hidden, c = 16, 64, 256, 64
    (q, k, v), gates, st = inputs(t, h, d, hidden, 2, torch.bfloat16, dev)
    xs = [x.detach().requires_grad_() for x in (q, k, v, *gates, *st.weights, *st.momentum)]
    state = MemoryState(tuple(xs[6:8]), tuple(xs[8:10]), tuple(xs[6:8]), 0)
    go = torch.randn(q.shape, device=dev, generator=torch.Generator(device=dev).manual_seed(1)).to(q.dtype)
    base = dict(fused_triton.LAUNCH)
    rows = []
    for spec in launches:  # slice:warps[:split] (split: LAUNCH["sweep_split"], 0 = one program per head)
        sl, nw, sp = (spec.split(":") + ["", ""])[:3]
        fused_triton.LAUNCH.update(sweep_slice=int(sl), sweep_warps=int(nw or 8), sweep_split=int(sp or 0), sweep_split_warps=int(nw or 4))
        row = {"config": "matched", "t": t, "sweep_slice": int(sl), "sweep_warps": int(nw or 8), "sweep_split": int(sp or 0)}
        try:
            row["fwd_bwd_ms"] = time_ms(lambda: torch.autograd.grad([neural_memory_fused_forward(*xs[:6], state, c, **CONFIGS["matched"])[0]], xs, [go]),
                                        dev, 1, rep)  # fmt: skip
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    fused_triton.LAUNCH.clear()
    fused_triton.LAUNCH.update(base)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--t", type=int, default=256)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-t", type=int, default=16384)
    ap.add_argument("--rep", type=int, default=5)
    ap.add_argument("--slices", default="32,64,128", help="hidden_slice values of the sweep")
    ap.add_argument("--warps", default="4,8", help="num_warps values of the sweep")
    ap.add_argument("--precisions", default="tf32x3/tf32", help="state/read precision pairs of the sweep (tf32, tf32x3), e.g. tf32/tf32,tf32x3/tf32")
    ap.add_argument("--stages", default="1", help="num_stages values of the sweep")
    ap.add_argument("--splits", default="0", help="split_slice values of the sweep (0: one program per head; 64: hidden/64 programs)")
    ap.add_argument("--reads", default="batched", help="LAUNCH['split_read'] values of the sweep: batched, inline")
    ap.add_argument("--read-launches", default="64:8", help="read_slice:read_warps values of the batched read kernel")
    ap.add_argument("--carry", default="0", help="LAUNCH['split_carry'] values of the sweep (0, 1)")
    ap.add_argument("--phase3", default="auto", help="LAUNCH['split_phase3'] values of the sweep: recompute, scratch, registers, auto")
    ap.add_argument("--profile", action="store_true", help="the sweep also records the walk kernel's timer stamps per variant")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--train", action="store_true", help="time the training path (forward + backward) at --sweep-t")
    ap.add_argument("--sweep-launch", default="", help="with --train: sweep kernel launches slice:warps[:split], e.g. 64:8:0,64:4:64,64:4:32")
    ap.add_argument("--vjps", default="triton:adjoint", help="--train's READ:UPDATE[:fold] of BACKWARD['read_vjp'] (triton, adjoint, autograd) / "
                    "['update_vjp'] (triton, adjoint, autograd; ':u32w8[s2]' the update kernel's slice / warps / stages); ':fold' sets BACKWARD['fold_read'], ':f32' clears BACKWARD['update_tf32'], "
                    "':serial' / ':overlap' clear / set BACKWARD['overlap'], ':gNN' sets BACKWARD['group_elements'] = 2**NN, ':pPREC' sets LAUNCH['half_precision'] "
                    "(ptf32x3, pbf16x3, ptf32), ':rPREC' LAUNCH['half_read_precision'] (rtf32, rbf16x3, rtf32x3), ':nok' clears LAUNCH['exact_keys'], "
                    "':Lkey=value' sets LAUNCH[key] (e.g. ':Lsweep_form=three_phase'), ':Bkey=value' BACKWARD[key] "
                    "(e.g. ':Bread_sums_from_forward=0')")
    ap.add_argument("--read-vjp-launches", default="", help="--train: slice:warps[:a_slice:a_warps[:stages]] launches of the read-VJP kernels to time, e.g. 64:4,32:4:32:8:2")
    ap.add_argument("--train-configs", default="matched,default", help="--train's configs")
    ap.add_argument("--train-compile", default="1,0", help="--train's compile modes: 0 (eager), 1 (compiled), s (only the sweep compiled)")
    ap.add_argument("--out", default="diag_memory_fused.json")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device(args.device)
    out = {"meta": {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (Triton interpreter)", "torch": torch.__version__,
                    "triton": __import__("triton").__version__, "launch": dict(fused_triton.LAUNCH)}}  # fmt: skip
    if not args.skip_correctness:
        out["correctness"] = correctness(dev, args.t, args.heads)
    if args.sweep:
        ints = lambda x: tuple(int(i) for i in x.split(","))  # noqa: E731
        out["sweep"] = sweep(dev, args.sweep_t, args.rep, ints(args.slices), ints(args.warps), tuple(args.precisions.split(",")), ints(args.stages), ints(args.splits),
                             tuple(args.reads.split(",")), tuple(args.read_launches.split(",")), tuple(bool(int(x)) for x in args.carry.split(",")),
                             args.profile, tuple(args.phase3.split(",")))  # fmt: skip
    if args.train:
        out["train"] = train(dev, args.sweep_t, args.rep, tuple(args.train_compile.split(",")), configs=tuple(args.train_configs.split(",")), vjps=tuple(args.vjps.split(",")), read_vjp_launches=tuple(x for x in args.read_vjp_launches.split(",") if x))
        if args.sweep_launch:
            out["sweep_launch"] = sweep_launch(dev, args.sweep_t, args.rep, args.sweep_launch.split(","))
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
