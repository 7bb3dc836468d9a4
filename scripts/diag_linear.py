"""GPU diagnostic for the linear-attention Triton kernels (mnemotorch.ops.linear.triton).

One run checks every kernel on its own and end to end against a float64 reference, for
float32 and bfloat16 inputs, three feature settings (Taylor d = 16 / Dv = 64, elu+1 D = 64,
identity D = 128 unnormalised) and L in {64, 1000, 4096} (B = 2, H = 4, chunk 64, an initial
state, a loss on y and on both final states). It runs two phases, each in its own process:

* ``fixed``: ``MNEMO_AUTOTUNE=0`` (the launch parameters used without tuning), all cases;
* ``autotuned``: ``MNEMO_AUTOTUNE=1`` (every tuning trial announced before it runs, so a faulting
  launch is attributed to its kernel and config), the bfloat16 cases by default.

Stages checked per case (each in its own try block; each compares with the float64 value and
reports max |err|, max |err| / max |ref| and the relative RMS ‖err‖/‖ref‖, the tolerance metric
of ARCHITECTURE.md):

* ``states_fwd``  -- ``_states_fwd``: the state entering every chunk (HS, HZ) and S_T, z_T;
* ``out_fwd``     -- ``_out_fwd`` fed the *reference* chunk states: y and the denominators;
* ``states_bwd``  -- ``_states_bwd`` fed reference row statistics: R, ρ per chunk, dS0, dz0;
* ``grads``       -- the dq / dk / dv kernels fed reference chunk states: dq, dk, dv;
* ``e2e``         -- ``linear_attention_triton`` with autograd: y, S_T, z_T, dq, dk, dv, dS0, dz0;
* ``decode``      -- ``linear_attention_step_triton`` (out of place and in place), 3 tokens;
* ``fused_fwd``   -- ``_fused_fwd`` (the one-pass forward, elementwise maps): y, den, S_T, z_T;
* ``e2e_fused``   -- ``e2e`` with ``MNEMO_LINEAR_FWD=fused`` (the backward recomputes the chunk states).

So a wrong kernel shows up by name, not only as a wrong gradient. Buffers are NaN-poisoned
(``MNEMO_POISON=1``): an element no program writes is reported as ``nan``. A CUDA fault (illegal
address, ...) ends that phase's process: the case is recorded as crashed with the last stage and
tuning trial announced, and the phase goes on with the next case in a fresh process.

    CUDA_LAUNCH_BLOCKING=1 PYTHONPATH=src python scripts/diag_linear.py
    # options: --phases fixed,autotuned  --tuned-dtypes bfloat16  --lengths 64,1000,4096  --serial
    PYTHONPATH=src python scripts/diag_linear.py --sweep-case linear   # launch-parameter sweep (also: based)
    PYTHONPATH=src python scripts/diag_linear.py --e2e --lengths 16384,65536 --chunks 64,128   # fwd, fwd+bwd vs fla
    PYTHONPATH=src python scripts/diag_linear.py --sweep-case linear --sweep-kernels _la_fwd_fused   # the one-pass forward alone

Writes ``$OUT/diag_linear.json`` when ``OUT`` is set (or ``--json PATH``). Exit status 0 when
every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

FEATURES = [  # feature, Dk, Dv, normalize
    ("taylor", 16, 64, True),
    ("elu_plus_one", 64, 64, True),
    ("identity", 128, 128, False),
]
DTYPES = ["float32", "bfloat16"]
B, H, CHUNK, EPS = 2, 4, 64, 1e-6
STAGES = ("states_fwd", "out_fwd", "states_bwd", "grads", "e2e", "decode", "fused_fwd", "e2e_fused")
FATAL = ("illegal memory access", "unspecified launch failure", "misaligned address", "illegal instruction",
         "CUDA error", "cudaError", "device-side assert")


def make_cases(lengths):
    cases = []
    for dtype in DTYPES:
        for feature, dk, dv, normalize in FEATURES:
            for t in lengths:
                cases.append(dict(id=len(cases), dtype=dtype, feature=feature, dk=dk, dv=dv, t=t, normalize=normalize))
    return cases


def case_name(c) -> str:
    return f"{c['dtype']:8s} {c['feature']:12s} Dk={c['dk']:<3d} Dv={c['dv']:<3d} L={c['t']:<5d}"


GRADIENTS = ("dq", "dk", "dv", "dS0", "dz0", "R", "rho")


def tolerance(dtype: str, quantity: str) -> float:
    """ARCHITECTURE.md: 1e-5 for float32 (no TF32), 5e-3 for bf16 outputs (and states), 1e-2 for bf16 gradients."""
    if dtype == "float32":
        return 1e-5
    return 1e-2 if quantity in GRADIENTS else 5e-3


# ---------------------------------------------------------------------------------------------
# child: runs cases, appends one JSON line per event to the results file
# ---------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self, path, verbose):
        self.f = open(path, "a", buffering=1)
        self.verbose = verbose

    def event(self, **kw):
        self.f.write(json.dumps(kw) + "\n")
        self.f.flush()
        if self.verbose and kw.get("event") in ("trial", "stage"):
            print("   ", kw, flush=True)


def metrics(a, r):
    import torch

    a64 = a.detach().double()
    r64 = r.detach().double()
    if a64.shape != r64.shape:
        return dict(error=f"shape {list(a64.shape)} vs reference {list(r64.shape)}")
    bad = int((~torch.isfinite(a64)).sum())
    diff = (a64 - r64).abs()
    ref_max = float(r64.abs().max()) if r64.numel() else 0.0
    max_abs = float(diff.max()) if diff.numel() else 0.0
    rn = float(r64.norm())
    rel_rms = float((a64 - r64).norm()) / rn if rn > 0 else float((a64 - r64).norm())
    return dict(max_abs=max_abs, max_rel=max_abs / ref_max if ref_max > 0 else max_abs, rel_rms=rel_rms, nonfinite=bad)


def reference(c, q, k, v, s0, z0, gy, gs, gz):
    """float64 reference: outputs, autograd gradients and the per-chunk quantities of the kernels."""
    import torch
    import torch.nn.functional as F
    from mnemotorch.ops.linear import feature_map, linear_attention_chunked

    phi = feature_map(c["feature"])
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, s0, z0)]
    y, (st, zt) = linear_attention_chunked(phi(leaves[0]), phi(leaves[1]), leaves[2], (leaves[3], leaves[4]), c["normalize"], EPS, chunk_size=CHUNK)
    loss = (y * gy.double()).sum() + (st * gs.double()).sum() + (zt * gz.double()).sum()
    grads = torch.autograd.grad(loss, leaves)
    ref = dict(y=y.detach(), S_T=st.detach(), z_T=zt.detach(), dq=grads[0], dk=grads[1], dv=grads[2], dS0=grads[3], dz0=grads[4])

    # chunk quantities (as in reference.linear_attention_chunked, kept per chunk)
    t = q.shape[1]
    nt = -(-t // CHUNK)
    pad = nt * CHUNK - t
    fq, fk = (F.pad(phi(x.detach().double()), (0, 0, 0, 0, 0, pad)) for x in (q, k))
    vv = F.pad(v.detach().double(), (0, 0, 0, 0, 0, pad))
    fd, dv = fq.shape[-1], vv.shape[-1]
    qc, kc, vc = fq.view(B, nt, CHUNK, H, fd), fk.view(B, nt, CHUNK, H, fd), vv.view(B, nt, CHUNK, H, dv)
    ds = torch.einsum("bnjhd,bnjhe->bnhde", kc, vc)
    dz = kc.sum(2)
    s_in = s0.double().unsqueeze(1) + torch.cat([torch.zeros_like(ds[:, :1]), ds[:, :-1]], 1).cumsum(1)
    z_in = z0.double().unsqueeze(1) + torch.cat([torch.zeros_like(dz[:, :1]), dz[:, :-1]], 1).cumsum(1)
    causal = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).tril()
    scores = torch.einsum("bnihd,bnjhd->bnhij", qc, kc).masked_fill(~causal, 0.0)
    den = (scores.sum(-1).transpose(2, 3) + torch.einsum("bnihd,bnhd->bnih", qc, z_in)).reshape(B, nt * CHUNK, H)[:, :t]
    ref["HS"] = s_in.permute(0, 2, 1, 3, 4).reshape(B * H, nt, fd, dv)
    ref["HZ"] = z_in.permute(0, 2, 1, 3).reshape(B * H, nt, fd)
    ref["den"] = den

    # backward row statistics and reverse chunk states for an upstream gradient dy (rounded like the kernel's)
    dy = gy.to(q.dtype).double()
    if c["normalize"]:
        rden = 1.0 / (den + EPS)
        gd = -(dy * y.detach()).sum(-1) * rden
        gn = dy * rden.unsqueeze(-1)
    else:
        rden = gd = None
        gn = dy
    gnc = F.pad(gn, (0, 0, 0, 0, 0, pad)).view(B, nt, CHUNK, H, dv)
    inc = torch.einsum("bnihd,bnihe->bnhde", qc, gnc)  # chunk n's contribution to R
    if c["normalize"]:
        gdc = F.pad(gd, (0, 0, 0, pad)).view(B, nt, CHUNK, H)
        incz = torch.einsum("bnihd,bnih->bnhd", qc, gdc)
    else:
        incz = torch.zeros(B, nt, H, fd, dtype=torch.float64, device=q.device)

    def after(x):  # Σ over chunks m > n
        rev = torch.flip(x, [1]).cumsum(1)
        return torch.flip(torch.cat([torch.zeros_like(rev[:, :1]), rev[:, :-1]], 1), [1])

    r = gs.double().unsqueeze(1) + after(inc)
    rz = gz.double().unsqueeze(1) + after(incz)
    ref["HR"] = r.permute(0, 2, 1, 3, 4).reshape(B * H, nt, fd, dv)
    ref["HRZ"] = rz.permute(0, 2, 1, 3).reshape(B * H, nt, fd)
    ref["dS0_chunks"] = gs.double() + inc.sum(1)
    ref["dz0_chunks"] = gz.double() + incz.sum(1)
    ref["rden"], ref["gd"], ref["dy"] = rden, gd, gy.to(q.dtype)
    # gradients for that dy (the isolated gradient kernels get it)
    leaves2 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    y2, (st2, zt2) = linear_attention_chunked(phi(leaves2[0]), phi(leaves2[1]), leaves2[2], (s0.double(), z0.double()), c["normalize"], EPS, chunk_size=CHUNK)
    g2 = torch.autograd.grad((y2 * dy).sum() + (st2 * gs.double()).sum() + (zt2 * gz.double()).sum(), leaves2)
    ref["dq_dy"], ref["dk_dy"], ref["dv_dy"] = g2
    return ref


def internal_rows(feature: str, d: int, device):
    """Index of each external state row in the kernels' internal chunk-state layout (Taylor: d padded to 16)."""
    import torch

    if feature != "taylor":
        return None
    from mnemotorch.ops.linear.triton import TBD

    idx = [0] + [1 + i for i in range(d)] + [1 + TBD + i * TBD + j for i in range(d) for j in range(d)]
    return torch.tensor(idx, device=device)


def to_internal(x, idx, rows):
    import torch

    if idx is None:
        return x.float().contiguous()
    out = torch.zeros(*x.shape[:2], rows, *x.shape[3:], dtype=torch.float32, device=x.device)
    out[:, :, idx] = x.float()
    return out


def from_internal(x, idx):
    return x if idx is None else x[:, :, idx]


def run_case(c, rec, dev="cuda", first_stage=0):
    import torch
    import mnemotorch.ops.linear.triton as K
    from mnemotorch.ops.linear import feature_dim, feature_map, linear_attention_recurrent

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    dt = getattr(torch, c["dtype"])
    torch.manual_seed(1000 + c["id"])
    t, dk, dv, feature, normalize = c["t"], c["dk"], c["dv"], c["feature"], c["normalize"]
    fid = K.FEATURE_IDS[feature]
    fd = feature_dim(feature, dk)
    q = (torch.randn(B, t, H, dk, device=dev) * 0.5).to(dt)
    k = (torch.randn(B, t, H, dk, device=dev) * 0.5).to(dt)
    v = torch.randn(B, t, H, dv, device=dev).to(dt)
    s0 = torch.randn(B, H, fd, dv, device=dev) * 0.5
    z0 = torch.rand(B, H, fd, device=dev) + 0.5
    gy, gs, gz = torch.randn(B, t, H, dv, device=dev), torch.randn(B, H, fd, dv, device=dev), torch.randn(B, H, fd, device=dev)
    ref = reference(c, q, k, v, s0, z0, gy, gs, gz)
    idx = internal_rows(feature, dk, dev)
    rows = K.TFP if feature == "taylor" else fd
    out = {}

    inject = os.environ.get("DIAG_LINEAR_INJECT_FAULT", "")  # "case:stage[:abort]", to test the crash handling

    def stage(name, fn):
        rec.event(event="stage", case=c["id"], stage=name)
        t0 = time.time()
        try:
            if inject.split(":")[:2] == [str(c["id"]), name]:
                if inject.endswith(":abort"):
                    os.abort()
                raise RuntimeError("CUDA error: an illegal memory access was encountered (injected by DIAG_LINEAR_INJECT_FAULT)")
            res = fn()
            sync()
            for qname, (a, r) in res.items():
                m = metrics(a, r)
                m["tol"] = tolerance(c["dtype"], qname)
                m["ok"] = "error" not in m and m["nonfinite"] == 0 and m["rel_rms"] <= m["tol"]
                out[f"{name}/{qname}"] = m
            out[f"{name}/_seconds"] = round(time.time() - t0, 3)
        except Exception as e:  # noqa: BLE001 -- one failing stage must not stop the others
            msg = f"{type(e).__name__}: {e}"
            out[f"{name}/_error"] = msg[-2000:]
            out[f"{name}/_traceback"] = traceback.format_exc()[-4000:]
            if any(s in msg for s in FATAL):
                rec.event(event="case", case=c["id"], results=out, fatal=msg[-2000:])
                sys.stdout.flush()
                os._exit(3)  # the CUDA context is unusable: the parent resumes in a new process

    def states_fwd():
        hs, hz, st, zt = K._states_fwd(k, v, s0, z0, fid, CHUNK, True)
        return {"HS": (from_internal(hs, idx), ref["HS"]), "HZ": (from_internal(hz, idx), ref["HZ"]),
                "S_T": (st, ref["S_T"]), "z_T": (zt, ref["z_T"])}

    hs_ref, hz_ref = to_internal(ref["HS"], idx, rows), to_internal(ref["HZ"], idx, rows)

    def out_fwd():
        y, den = K._out_fwd(q, k, v, hs_ref, hz_ref, fid, normalize, EPS, CHUNK)
        res = {"y": (y, ref["y"])}
        if normalize:
            res["den"] = (den, ref["den"])
        return res

    rden = ref["rden"].float().contiguous() if normalize else None
    gd = ref["gd"].float().contiguous() if normalize else None
    dy = ref["dy"].contiguous()

    def states_bwd():
        rd_arg, gd_arg = (rden, gd) if normalize else K._row_stats(dy, None, None, EPS, False)
        hr, hrz, ds0, dz0 = K._states_bwd(q, dy, rd_arg, gd_arg, gs.contiguous(), gz.contiguous(), fid, normalize, CHUNK, True)
        return {"R": (from_internal(hr, idx), ref["HR"]), "rho": (from_internal(hrz, idx), ref["HRZ"]),
                "dS0": (ds0, ref["dS0_chunks"]), "dz0": (dz0, ref["dz0_chunks"])}

    def grads():
        rd_arg, gd_arg = (rden, gd) if normalize else K._row_stats(dy, None, None, EPS, False)
        hr_ref, hrz_ref = to_internal(ref["HR"], idx, rows), to_internal(ref["HRZ"], idx, rows)
        dq, dk_, dv_ = K._grads_chunks(q, k, v, dy, rd_arg, gd_arg, hs_ref, hz_ref, hr_ref, hrz_ref, fid, normalize, CHUNK)
        return {"dq": (dq, ref["dq_dy"]), "dk": (dk_, ref["dk_dy"]), "dv": (dv_, ref["dv_dy"])}

    def e2e():
        leaves = [x.clone().requires_grad_() for x in (q, k, v, s0, z0)]
        y, (st, zt) = K.linear_attention_triton(leaves[0], leaves[1], leaves[2], feature, normalize, (leaves[3], leaves[4]), EPS, CHUNK)
        g = torch.autograd.grad((y.float() * gy).sum() + (st * gs).sum() + (zt * gz).sum(), leaves)
        names = ["y", "S_T", "z_T", "dq", "dk", "dv", "dS0", "dz0"]
        return dict(zip(names, zip([y, st, zt, *g], [ref[n] for n in names])))

    def fused_fwd():
        if feature == "taylor":  # BASED keeps its two-pass kernels
            return {}
        y, den, st, zt = K._fused_fwd(q, k, v, s0, z0, fid, normalize, EPS, CHUNK)
        res = {"y": (y, ref["y"]), "S_T": (st, ref["S_T"]), "z_T": (zt, ref["z_T"])}
        if normalize:
            res["den"] = (den, ref["den"])
        return res

    def e2e_fused():
        if feature == "taylor":
            return {}
        old = os.environ.get("MNEMO_LINEAR_FWD")
        os.environ["MNEMO_LINEAR_FWD"] = "fused"
        try:
            return e2e()
        finally:
            if old is None:
                os.environ.pop("MNEMO_LINEAR_FWD")
            else:
                os.environ["MNEMO_LINEAR_FWD"] = old

    def decode():
        phi = feature_map(feature)
        n = 3
        ry, (rs, rz) = linear_attention_recurrent(phi(q[:, :n].double()), phi(k[:, :n].double()), v[:, :n].double(), (s0.double(), z0.double()), normalize, EPS)
        st = (s0.clone(), z0.clone())
        ys = []
        for i in range(n):
            y, st = K.linear_attention_step_triton(q[:, i], k[:, i], v[:, i], st, feature, normalize, EPS)
            ys.append(y)
        s_ip, z_ip = s0.clone(), z0.clone()
        ys_ip = []
        for i in range(n):
            y, _ = K.linear_attention_step_triton(q[:, i], k[:, i], v[:, i], (s_ip, z_ip), feature, normalize, EPS, inplace=True)
            ys_ip.append(y)
        return {"y": (torch.stack(ys, 1), ry), "S": (st[0], rs), "z": (st[1], rz),
                "y_inplace": (torch.stack(ys_ip, 1), ry), "S_inplace": (s_ip, rs), "z_inplace": (z_ip, rz)}

    fns = dict(states_fwd=states_fwd, out_fwd=out_fwd, states_bwd=states_bwd, grads=grads, e2e=e2e, decode=decode, fused_fwd=fused_fwd, e2e_fused=e2e_fused)
    for name in STAGES[first_stage:]:
        stage(name, fns[name])
    rec.event(event="case", case=c["id"], results=out)


def child_main(args):
    import torch
    import triton
    import triton.runtime.autotuner as autotuner

    rec = Recorder(args.results, args.verbose)
    orig_bench = autotuner.Autotuner._bench

    def announced_bench(self, *a, config, **kw):
        name = getattr(getattr(self, "base_fn", None), "__name__", None) or getattr(getattr(self, "fn", None), "__name__", "?")
        rec.event(event="trial", kernel=name, config=str(config))
        return orig_bench(self, *a, config=config, **kw)

    autotuner.Autotuner._bench = announced_bench
    cuda = args.device == "cuda"
    rec.event(event="env", torch=torch.__version__, triton=triton.__version__, device=torch.cuda.get_device_name(0) if cuda else "cpu (interpreter)",
              capability=list(torch.cuda.get_device_capability(0)) if cuda else [0, 0], autotune=os.environ.get("MNEMO_AUTOTUNE"),
              launch_blocking=os.environ.get("CUDA_LAUNCH_BLOCKING"), poison=os.environ.get("MNEMO_POISON"))
    cases = {c["id"]: c for c in make_cases(args.lengths)}
    import mnemotorch.ops.linear.triton as K

    for i, cid in enumerate(args.cases):
        c = cases[cid]
        print(f"[{args.child}] {case_name(c)}", flush=True)
        t0 = time.time()
        run_case(c, rec, args.device, args.first_stage if i == 0 else 0)
        print(f"[{args.child}]    done in {time.time() - t0:.1f}s", flush=True)
    if os.environ.get("MNEMO_AUTOTUNE", "1") != "0":
        chosen = {name: str(tuner.best_config) for name, tuner in K._TUNED.items() if getattr(tuner, "best_config", None) is not None}
        rec.event(event="tuned_configs", configs=chosen)


# ---------------------------------------------------------------------------------------------
# parent: runs the phases (restarting a phase's process after a CUDA fault), prints, writes JSON
# ---------------------------------------------------------------------------------------------


def run_phase(phase, case_ids, args):
    env = dict(os.environ)
    env["MNEMO_AUTOTUNE"] = "0" if phase == "fixed" else "1"
    env["MNEMO_POISON"] = "1"
    if args.device == "cuda":
        env.setdefault("CUDA_LAUNCH_BLOCKING", "1")
        env.pop("TRITON_INTERPRET", None)
    else:  # a dry run of this script on the CPU, through Triton's interpreter
        env["TRITON_INTERPRET"] = "1"
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    fd, path = tempfile.mkstemp(prefix=f"diag_linear_{phase}_", suffix=".jsonl")
    os.close(fd)
    remaining = list(case_ids)
    first_stage = 0  # after a fault, the faulting case resumes at its next stage in a new process
    results, crashes, envs, tuned = {}, [], [], {}
    lengths = ",".join(str(x) for x in args.lengths)
    while remaining:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", phase, "--results", path, "--lengths", lengths, "--device", args.device,
               "--cases", ",".join(str(x) for x in remaining), "--first-stage", str(first_stage)] + (["--verbose"] if args.verbose else [])
        proc = subprocess.run(cmd, env=env, stdout=None if not args.quiet_children else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        events = [json.loads(line) for line in open(path) if line.strip()]
        open(path, "w").close()
        finished, current, last_stage, last_trial, resume = set(), None, None, None, None
        for ev in events:
            if ev["event"] == "case":
                res = results.setdefault(ev["case"], {})
                res.update(ev["results"])
                finished.add(ev["case"])
                if "fatal" in ev:
                    crashes.append(dict(case=ev["case"], stage=last_stage, trial=last_trial, error=ev["fatal"]))
                    res.setdefault("_crashed", []).append(dict(stage=last_stage, trial=last_trial))
                    resume = (ev["case"], last_stage)
                current = last_stage = last_trial = None
            elif ev["event"] == "stage":
                current, last_stage = ev["case"], ev["stage"]
            elif ev["event"] == "trial":
                last_trial = f"{ev['kernel']} {ev['config']}"
            elif ev["event"] == "env":
                envs.append(ev)
            elif ev["event"] == "tuned_configs":
                tuned.update(ev["configs"])
        if proc.returncode not in (0, 3):  # died without recording its fault (segfault, abort, ...)
            err = (proc.stderr or "")[-3000:]
            cid = current if current is not None else next((c for c in remaining if c not in finished), None)
            if cid is not None:
                results.setdefault(cid, {}).update({"_error": err})
                results[cid].setdefault("_crashed", []).append(dict(stage=last_stage, trial=last_trial))
                crashes.append(dict(case=cid, stage=last_stage, trial=last_trial, error=err))
                finished.add(cid)
                resume = (cid, last_stage)
        if proc.returncode == 0:
            break
        remaining = [c for c in remaining if c not in finished]
        first_stage = 0
        if resume is not None and resume[1] in STAGES and STAGES.index(resume[1]) + 1 < len(STAGES):
            remaining = [resume[0]] + remaining  # the faulting case goes on with its next stage
            first_stage = STAGES.index(resume[1]) + 1
    os.unlink(path)
    return dict(results=results, crashes=crashes, env=envs[0] if envs else None, tuned_configs=tuned)


def fmt(x):
    return "  -    " if x is None else (f"{x:7.1e}" if isinstance(x, float) and math.isfinite(x) else f"{str(x):>7s}")


def print_phase(phase, cases, data):
    print(f"\n===== phase {phase} =====")
    if data["env"]:
        e = data["env"]
        print(f"device {e['device']} (sm_{e['capability'][0]}{e['capability'][1]}), torch {e['torch']}, triton {e['triton']}, "
              f"MNEMO_AUTOTUNE={e['autotune']}, CUDA_LAUNCH_BLOCKING={e['launch_blocking']}, MNEMO_POISON={e['poison']}")
    for c in cases:
        res = data["results"].get(c["id"])
        if res is None:
            print(f"{case_name(c)}  not run")
            continue
        bad = [k for k, m in res.items() if isinstance(m, dict) and "ok" in m and not m["ok"]]
        errs = [k for k in res if k.endswith("/_error")]
        status = "PASS" if not bad and not errs and "_crashed" not in res else "FAIL"
        print(f"{case_name(c)}  {status}")
        for stage in STAGES:
            items = [(k.split("/", 1)[1], m) for k, m in res.items() if k.startswith(stage + "/") and isinstance(m, dict)]
            if items:
                cells = "  ".join(f"{q}={fmt(m.get('rel_rms'))}{'' if m.get('ok') else '!'}" + (f"(nan {m['nonfinite']})" if m.get("nonfinite") else "")
                                  for q, m in items)
                print(f"    {stage:10s} rel_rms  {cells}")
                worst = max(items, key=lambda it: it[1].get("max_rel", 0) if isinstance(it[1].get("max_rel"), float) else 0)
                print(f"    {'':10s} max_abs  " + "  ".join(f"{q}={fmt(m.get('max_abs'))}" for q, m in items) + f"   (worst max_rel {worst[0]}={fmt(worst[1].get('max_rel'))})")
            if f"{stage}/_error" in res:
                print(f"    {stage:10s} ERROR {res[stage + '/_error'][:300]}")
        for crash in res.get("_crashed", []):
            print(f"    CRASHED in stage {crash['stage']} (last tuning trial: {crash['trial']})")
    if data["tuned_configs"]:
        print("autotuner choices:")
        for name, cfg in sorted(data["tuned_configs"].items()):
            print(f"    {name:16s} {cfg}")


# ---------------------------------------------------------------------------------------------
# --sweep: launch-parameter sweep and end-to-end timings at benchmark sizes (GPU only)
# ---------------------------------------------------------------------------------------------

SWEEP_CASES = {  # name: feature, Dk, Dv, normalize (bf16, B = 1, H = 16: the benchmark rows)
    "linear": ("identity", 128, 128, False),
    "based": ("taylor", 16, 64, True),
}


def _c(*rows, bk=False):
    keys = ("BK", "BV", "num_warps", "num_stages") if bk else ("BV", "num_warps", "num_stages")
    return [dict(zip(keys, r)) for r in rows]


SWEEP_CONFIGS = {
    "_la_fwd_states": _c((64, 32, 4, 3), (64, 32, 4, 4), (64, 32, 4, 5), (64, 64, 4, 4), (32, 64, 4, 4), (64, 32, 2, 4),
                         (32, 32, 4, 4), (128, 32, 4, 4), (64, 32, 8, 4), (64, 64, 4, 5), (64, 64, 8, 3), (128, 64, 8, 3),
                         bk=True),  # wider tiles re-read k and v fewer times (long sequences: bandwidth), but fewer programs
    "_la_fwd_out": _c((64, 4, 1), (64, 4, 2), (32, 4, 1), (64, 2, 1), (32, 2, 1), (64, 8, 1),
                      (128, 8, 1), (128, 8, 2), (128, 4, 2)),  # BV = Dv: q and k read once, not once per value tile
    "_la_fwd_fused": _c((32, 4, 3), (32, 4, 2), (32, 4, 4), (32, 8, 2), (32, 8, 3), (16, 4, 2), (16, 4, 3), (16, 4, 4),
                        (16, 8, 3), (64, 4, 2), (64, 4, 3), (64, 8, 2), (64, 8, 3), (64, 8, 4)),
    # B·H·Dv/BV programs only (64 at BV = 32 for the benchmark row): BV = 16 doubles them but reads q and k
    # twice as often; more stages hide the loads of the next chunk behind this chunk's products
    "_la_bwd_states": None,  # same candidates as _la_fwd_states
    "_la_bwd_grads": _c((32, 8, 1), (64, 8, 1), (16, 8, 1)),  # 4 warps faulted (H100, Triton 3.6)
    "_la_bwd_dqk": _c((64, 32, 4, 1), (64, 64, 4, 1), (64, 32, 8, 1), (32, 32, 4, 1), (64, 32, 4, 2), (64, 16, 4, 1), (32, 64, 4, 1), bk=True),
    "_la_bwd_dv": _c((64, 4, 1), (32, 4, 1), (64, 8, 1), (128, 8, 1), (64, 4, 2), (32, 2, 1)),
    "_tl_fwd_states": _c((64, 4, 3), (64, 4, 4), (64, 4, 5), (32, 4, 4), (64, 2, 4), (64, 8, 4), (16, 4, 4)),
    "_tl_fwd_out": _c((64, 4, 2), (64, 8, 2), (32, 4, 2), (64, 4, 1), (64, 2, 2), (32, 2, 2)),
    "_tl_bwd_states": None,
    "_tl_bwd_grads": _c((64, 8, 1), (64, 4, 1), (64, 4, 2), (32, 4, 2), (32, 8, 1), (64, 8, 2), (16, 4, 1)),
}
SWEEP_CONFIGS["_la_bwd_states"] = SWEEP_CONFIGS["_la_fwd_states"]
SWEEP_CONFIGS["_tl_bwd_states"] = SWEEP_CONFIGS["_tl_fwd_states"]


def _cuda_ms(fn):
    """Median CUDA-event time of ``fn`` in ms: the benchmarks' own timer (mnemotorch.bench.block_sparse.median_ms)."""
    from mnemotorch.bench.block_sparse import median_ms

    return median_ms(fn)


def _out_path(args, stem):
    if os.environ.get("OUT"):
        return os.path.join(os.environ["OUT"], stem)
    return os.path.join(os.path.dirname(os.path.abspath(args.json)) if args.json else ".", stem)


def sweep_case(args):
    """Per-kernel times of one benchmark case over SWEEP_CONFIGS (MNEMO_AUTOTUNE=0; ``K._OVERRIDE``
    sets one kernel's launch parameters, the others keep their fixed ones); writes
    ``sweep_<case>.json`` with every time and the best parameters per kernel."""
    import torch
    import mnemotorch.ops.linear.triton as K

    torch.backends.cuda.matmul.allow_tf32 = False
    name = args.sweep_case
    feature, dk, dv, normalize = SWEEP_CASES[name]
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "case": name, "L": args.sweep_length, "kernels": {}, "best": {}}
    path = _out_path(args, f"sweep_{name}.json")

    def save():
        with open(path, "w") as f:
            json.dump(report, f, indent=1)

    eps, C, L = 1e-6, 64, args.sweep_length
    fid = K.FEATURE_IDS[feature]
    torch.manual_seed(0)
    scale = 0.5 if feature == "taylor" else dk**-0.5
    q, k, v, dy = ((torch.randn(1, L, 16, d, device="cuda") * sc).bfloat16() for d, sc in ((dk, scale), (dk, scale), (dv, 1.0), (dv, 1.0)))
    hs, hz, _, _ = K._states_fwd(k, v, None, None, fid, C, True, normalize)
    y, den = K._out_fwd(q, k, v, hs, hz, fid, normalize, eps, C)
    rd, gd = K._row_stats(dy, y, den, eps, normalize)
    hr, hrz, _, _ = K._states_bwd(q, dy, rd, gd, None, None, fid, normalize, C, False, hs.dtype)
    pre = "_tl" if feature == "taylor" else "_la"
    grads = lambda: K._grads_chunks(q, k, v, dy, rd, gd, hs, hz, hr, hrz, fid, normalize, C)  # noqa: E731
    stages = [
        (f"{pre}_fwd_states", None, lambda: K._states_fwd(k, v, None, None, fid, C, True, normalize)),
        (f"{pre}_fwd_out", None, lambda: K._out_fwd(q, k, v, hs, hz, fid, normalize, eps, C)),
    ]
    if feature != "taylor":  # the one-pass forward (compare with _fwd_states + _fwd_out)
        stages.append(("_la_fwd_fused", None, lambda: K._fused_fwd(q, k, v, None, None, fid, normalize, eps, C)))
    stages += [
        (f"{pre}_bwd_states", None, lambda: K._states_bwd(q, dy, rd, gd, None, None, fid, normalize, C, False, hs.dtype)),
    ]
    if feature == "taylor":
        stages.append(("_tl_bwd_grads", None, grads))
    else:  # one launch (split off), or dq+dk then dv (split on; each swept with the other fixed)
        stages += [("_la_bwd_grads", False, grads), ("_la_bwd_dqk", True, grads), ("_la_bwd_dv", True, grads)]
    only = set(filter(None, args.sweep_kernels.split(",")))
    for kname, split, fn in stages:
        if only and kname not in only:
            continue
        if split is not None:
            K._SPLIT_GRADS = split
        rows = []
        for cfg in [None] + SWEEP_CONFIGS[kname]:
            if cfg is not None:
                K._OVERRIDE[kname] = cfg
            try:
                rows.append({"cfg": cfg or "fixed", "ms": round(_cuda_ms(fn), 4)})
            except Exception as e:  # noqa: BLE001
                rows.append({"cfg": cfg or "fixed", "error": f"{type(e).__name__}: {str(e)[:200]}"})
                if "illegal" in str(e) or "CUDA error" in str(e):
                    report["kernels"][kname] = rows
                    save()
                    raise
            K._OVERRIDE.pop(kname, None)
        report["kernels"][kname] = rows
        ok = [r for r in rows if "ms" in r]
        if ok:
            best = min(ok, key=lambda r: r["ms"])
            report["best"][kname] = dict(_fixed_of(K, kname, dk, dv)) if best["cfg"] == "fixed" else best["cfg"]
            report["best_ms_" + kname] = best["ms"]
        print(f"{name}{'' if split is None else (' split' if split else ' fused')} {kname:16s} " +
              "  ".join(f"{'fixed' if isinstance(r['cfg'], str) else tuple(r['cfg'].values())}:{r.get('ms', 'ERR')}" for r in rows), flush=True)
        save()
    K._SPLIT_GRADS = True
    if normalize:
        report["kernels"]["_row_stats"] = [{"cfg": "fixed", "ms": round(_cuda_ms(lambda: K._row_stats(dy, y, den, eps, True)), 4)}]
        print(f"{name} _row_stats {report['kernels']['_row_stats']}", flush=True)
    if feature != "taylor" and not only:  # which gradient form is faster with the best parameters of each
        fused = report.get("best_ms__la_bwd_grads", 1e9)
        K._OVERRIDE.update({n: report["best"][n] for n in ("_la_bwd_dqk", "_la_bwd_dv") if n in report["best"]})
        K._SPLIT_GRADS = True
        split = _cuda_ms(grads)
        K._OVERRIDE.clear()
        report["split_best_ms"], report["fused_best_ms"] = round(split, 4), fused
        report["best"]["_split_grads"] = split < fused
        print(f"{name} grads: split (best) {split:.4f} ms, fused (best) {fused} ms", flush=True)
    save()
    return 0


def _fixed_of(K, kname, dk, dv):
    return K._fixed(kname, dk, dv, False)


def e2e_main(args):
    """End-to-end fwd / fwd+bwd times (as mnemotorch.bench.linear_attention) of the fixed launches,
    of the best swept parameters (``sweep_<case>.json`` when present) and of fla, at ``--lengths``."""
    import torch
    import mnemotorch.ops.linear.triton as K

    torch.backends.cuda.matmul.allow_tf32 = False
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "e2e": [],
              "auto_fwd_path": {"training": K.forward_path(K.FEATURE_IDS["identity"], 128, True), "inference_bf16_unnormalised": K.forward_path(K.FEATURE_IDS["identity"], 128, False)}}  # what MNEMO_LINEAR_FWD=auto picks
    path = _out_path(args, "e2e_linear.json")
    best = {}
    for name in SWEEP_CASES:
        try:
            best[name] = json.load(open(_out_path(args, f"sweep_{name}.json")))["best"]
        except (OSError, KeyError, ValueError):
            best[name] = None
    report["best"] = best
    for L in args.lengths:
        for name, (feature, dk, dv, normalize) in SWEEP_CASES.items():
            torch.manual_seed(0)
            scale = 0.5 if feature == "taylor" else dk**-0.25
            q, k, v = ((torch.randn(1, L, 16, d, device="cuda") * sc).bfloat16().requires_grad_() for d, sc in ((dk, scale), (dk, scale), (dv, 1.0)))
            row = {"case": name, "L": L}
            peers = []
            for chunk in args.chunks:
                if feature == "taylor":
                    params = [q, k, v]
                    ours = lambda c=chunk: K.linear_attention_triton(q, k, v, "taylor", True, chunk_size=c, output_final_state=False)[0]  # noqa: E731
                else:
                    qs = (q * dk**-0.5).detach().requires_grad_()
                    params = [qs, k, v]
                    ours = lambda c=chunk, qs=qs: K.linear_attention_triton(qs, k, v, "identity", False, chunk_size=c, output_final_state=False)[0]  # noqa: E731
                sfx = "" if chunk == K.DEFAULT_CHUNK else f"_chunk{chunk}"
                # no final state, as fla's calls below (their default). The forward form (MNEMO_LINEAR_FWD) of
                # each entry: "ours" is the two-pass form, "ours_fused"
                # the one-pass one (elementwise maps only; its backward recomputes the chunk states)
                peers.append((f"ours{sfx}", ours, params, None, "two_pass"))
                if feature != "taylor":
                    peers.append((f"ours_fused{sfx}", ours, params, None, "fused"))
            ours, params = peers[0][1], peers[0][2]
            if best[name]:
                peers.append(("ours_best", ours, params, best[name], "two_pass"))
                if feature != "taylor" and "_la_fwd_fused" in best[name]:
                    peers.append(("ours_fused_best", ours, params, best[name], "fused"))
            try:
                if feature == "taylor":
                    from fla.ops.based import fused_chunk_based

                    peers.append(("fla", lambda: fused_chunk_based(q, k, v, use_norm=True), [q, k, v], None, None))
                else:
                    from fla.ops.linear_attn import chunk_linear_attn

                    peers.append(("fla", lambda: chunk_linear_attn(q, k, v, normalize=False)[0], [q, k, v], None, None))
            except ImportError:
                pass
            outs = {}
            fwd_env = os.environ.get("MNEMO_LINEAR_FWD")
            for pname, fwd, prm, over, fwd_path in peers:
                K._OVERRIDE.clear()
                K._SPLIT_GRADS = True
                if over:
                    K._SPLIT_GRADS = bool(over.get("_split_grads", True))
                    K._OVERRIDE.update({kn: c for kn, c in over.items() if kn.startswith("_") and isinstance(c, dict)})
                if fwd_path:
                    os.environ["MNEMO_LINEAR_FWD"] = fwd_path
                try:
                    with torch.no_grad():
                        outs[pname] = fwd().float()
                        tf = _cuda_ms(fwd)
                    g = torch.randn_like(outs[pname])
                    tfb = _cuda_ms(lambda: torch.autograd.grad(fwd(), prm, g))
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    torch.autograd.grad(fwd(), prm, g)
                    torch.cuda.synchronize()
                    row[pname] = {"fwd_ms": round(tf, 4), "fwd_bwd_ms": round(tfb, 4), "peak_extra_gib": round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)}
                except Exception as e:  # noqa: BLE001
                    row[pname] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                    if "illegal" in str(e) or "CUDA error" in str(e):
                        report["e2e"].append(row)
                        json.dump(report, open(path, "w"), indent=1)
                        raise
            K._OVERRIDE.clear()
            if fwd_env is None:
                os.environ.pop("MNEMO_LINEAR_FWD", None)
            else:
                os.environ["MNEMO_LINEAR_FWD"] = fwd_env
            if "fla" in outs and "ours" in outs:
                row["rel_diff_vs_fla"] = float((outs["ours"] - outs["fla"]).norm() / outs["fla"].norm())
            if "ours_fused" in outs and "ours" in outs:
                row["rel_diff_fused_vs_ours"] = float((outs["ours_fused"] - outs["ours"]).norm() / outs["ours"].norm())
                if "fla" in outs:
                    row["rel_diff_fused_vs_fla"] = float((outs["ours_fused"] - outs["fla"]).norm() / outs["fla"].norm())
            report["e2e"].append(row)
            print("e2e", json.dumps(row), flush=True)
            json.dump(report, open(path, "w"), indent=1)
            del q, k, v, outs
            torch.cuda.empty_cache()
    print(f"wrote {path}")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", default="fixed,autotuned")
    ap.add_argument("--tuned-dtypes", default="bfloat16", help="dtypes the autotuned phase runs (comma-separated, or 'all')")
    ap.add_argument("--lengths", default="64,1000,4096")
    ap.add_argument("--serial", action="store_true", help="run the phases one after the other (default: both at once)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--verbose", action="store_true", help="print every stage and tuning trial as it starts")
    ap.add_argument("--quiet-children", action="store_true")
    ap.add_argument("--device", default="cuda", help="'cpu' dry-runs this script through Triton's interpreter (float32 cases; use small --lengths)")
    ap.add_argument("--sweep-case", default=None, choices=sorted(SWEEP_CASES),
                    help="GPU: launch-parameter sweep of one benchmark case's kernels at --sweep-length ($OUT/sweep_<case>.json)")
    ap.add_argument("--sweep-length", type=int, default=16384)
    ap.add_argument("--sweep-kernels", default="", help="comma list of kernel names to sweep (default: all of the case), e.g. _la_fwd_states,_la_fwd_out")
    ap.add_argument("--chunks", default="64", help="--e2e: chunk sizes of ours to time (e.g. 64,128: fewer chunk states to write and read at long L)")
    ap.add_argument("--e2e", action="store_true", help="GPU: end-to-end fwd / fwd+bwd times at --lengths (fixed launches, the "
                    "best swept ones, fla; the elementwise case also with the one-pass forward: ours_fused) ($OUT/e2e_linear.json)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--results", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cases", default="", help=argparse.SUPPRESS)
    ap.add_argument("--first-stage", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    args.chunks = [int(x) for x in args.chunks.split(",") if x]
    if args.sweep_case or args.e2e:
        os.environ["MNEMO_AUTOTUNE"] = "0"  # before the kernels module is imported
        return sweep_case(args) if args.sweep_case else e2e_main(args)
    if args.child:
        args.cases = [int(x) for x in args.cases.split(",") if x]
        child_main(args)
        return 0

    t0 = time.time()
    cases = make_cases(args.lengths)
    phases = [p for p in args.phases.split(",") if p]
    tuned_dtypes = DTYPES if args.tuned_dtypes == "all" else args.tuned_dtypes.split(",")
    plan = {p: [c["id"] for c in cases if p == "fixed" or c["dtype"] in tuned_dtypes] for p in phases}
    if args.device == "cpu":  # the plain interpreter computes bf16 tl.dot wrongly (tests/ops/test_linear_triton.py)
        plan = {p: [i for i in ids if cases[i]["dtype"] == "float32"] for p, ids in plan.items()}
    out = {}
    if args.serial or len(phases) == 1:
        for p in phases:
            out[p] = run_phase(p, plan[p], args)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(phases)) as ex:
            futs = {p: ex.submit(run_phase, p, plan[p], args) for p in phases}
            out = {p: f.result() for p, f in futs.items()}
    ok = True
    for p in phases:
        print_phase(p, [c for c in cases if c["id"] in plan[p]], out[p])
        for cid, res in out[p]["results"].items():
            if "_crashed" in res or any(k.endswith("/_error") for k in res) or any(isinstance(m, dict) and "ok" in m and not m["ok"] for m in res.values()):
                ok = False
        ok = ok and all(c in out[p]["results"] for c in plan[p])
    summary = dict(
        ok=ok, seconds=round(time.time() - t0, 1), cases={c["id"]: c for c in cases},
        phases={p: dict(results={str(k): v for k, v in out[p]["results"].items()}, crashes=out[p]["crashes"], env=out[p]["env"],
                        tuned_configs=out[p]["tuned_configs"]) for p in phases},
    )
    path = args.json or (os.path.join(os.environ["OUT"], "diag_linear.json") if os.environ.get("OUT") else None)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(summary, f, indent=1, default=str)
        print(f"\nwrote {path}")
    print(f"\n{'ALL PASS' if ok else 'FAILURES'} in {time.time() - t0:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
