"""Where the ``titans_lmm`` layer's forward + backward time goes with the fused memory kernel (issue #5).

``mnemo bench memory --fused`` times the layer; ``diag_memory_fused.py --train`` times the memory op alone. The
difference (the projections, convs, gates, output norm and gate, the coefficients, layout changes and casts, and
the memory's own phases) is what this script attributes: one forward + backward of the layer on CUDA under
``torch.profiler`` (after warm-up calls that compile everything), every CUDA kernel grouped by name with its count
and summed device time, sorted, plus the backward's CUDA-event phases (``fused_triton.BACKWARD["timing"]``) from a
separate unprofiled call. JSON to ``--out`` (default ``$OUT/profile_titans_layer.json``)::

    PYTHONPATH=src python scripts/profile_titans_layer.py --length 16384 --config matched --top 40 [--overlap]

``--overlap`` adds, from the profiler's Chrome trace, how much kernel time of the other streams ran inside the adjoint
sweep's and the forward walk's intervals (``mnemotorch.bench.streams``): whether the backward's second stream
(``fused_triton.BACKWARD["overlap"]``) actually runs beside the sweep.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

import torch


def host_issue(step, n: int, rep: dict) -> None:
    """``n`` steps, each timed as issued by the host and as run on the device, into ``rep``; then one step under
    ``torch.cuda.set_sync_debug_mode("warn")``, its synchronising operations (the warnings' messages, deduplicated)."""
    import warnings

    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    host, dev, fwd = [], [], []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        a.record()
        step()
        host.append((time.perf_counter() - t0) * 1e3)
        b.record()
        torch.cuda.synchronize()
        dev.append(a.elapsed_time(b))
    rep["host_issue_ms"], rep["device_step_ms"] = host, dev
    # the same steps with the host given a head start (a sleep kernel queued first): the device's time a step when it
    # never waits for the host, the floor of what cutting host work can give
    lead = []
    for _ in range(n):
        torch.cuda.synchronize()
        torch.cuda._sleep(int(2 * max(host) * 1e-3 * 2.0e9))  # ≥ twice the host's issue time at up to ~2 GHz
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        lead.append(a.elapsed_time(b))
    rep["device_step_with_host_lead_ms"] = lead
    rep["launch_cache"] = launch_cache_counts()
    print(f"launch cache (hits, misses): {rep['launch_cache']}", flush=True)
    import traceback

    syncs: dict = {}

    def hook(message, category, filename, lineno, file=None, line=None):  # the innermost frames of ours, with the message
        ours = [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-1]
                if "mnemotorch" in f.filename or "scripts" in f.filename]
        key = " < ".join(reversed(ours[-4:])) + f" | {str(message)[:120]}"
        syncs[key] = syncs.get(key, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    rep["syncs"] = [{"where": k, "count": c} for k, c in syncs.items()]
    print(f"host issue ms {[round(x, 2) for x in host]}; device step ms {[round(x, 2) for x in dev]}; with the host ahead "
          f"{[round(x, 2) for x in lead]}; {len(syncs)} synchronising sites", flush=True)
    for k, c in syncs.items():
        print(f"  sync x{c}: {k}", flush=True)


def launch_timeline(step, n: int) -> list[dict]:
    """Unprofiled: at every launch of the memory's Triton kernels, every call of :data:`TIMELINE_MARKS` and of the
    layer's linear projections (and at the step's start, the forward's end and the step's end) the host's time since the step began and the device's (a CUDA event recorded just before the launch:
    the device reaches it when all earlier work is done, or when the host enqueued it if that came later). Where the
    device's time is within ~0.05 ms of the host's, the device had drained its queue and waited for the host there.
    The median over ``n`` steps: ``[{"at", "host_ms", "device_ms", "lead_ms"}]`` in launch order, ``lead_ms`` = device −
    host (how far the host was ahead)."""
    from mnemotorch.ops.memory import fused_coefficients, fused_read_vjp, fused_triton, fused_update_vjp

    marks: list = []
    t0 = [0.0]

    def mark(label):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        marks.append((label, time.perf_counter() - t0[0], ev))

    def make(fn, label):
        def wrapped(*a, **kw):
            # a launcher is marked by the kernel it launches, every other function by its own name
            mark(getattr(a[0], "__name__", "kernel").strip("_").replace("_kernel", "") if label == "launcher" else label)
            return fn(*a, **kw)

        return wrapped

    mods = (fused_triton, fused_read_vjp, fused_update_vjp, fused_coefficients)  # (each took `launcher` into its namespace)
    runs: list = []
    restore = wrap_functions(TIMELINE_MARKS + tuple((m.__name__, "launcher") for m in mods), make)
    hooks = [mod.register_forward_pre_hook(lambda m, a, _n=name: mark(_n)) for name, mod in step.layer.named_children()
             if isinstance(mod, torch.nn.Linear)]
    try:
        for _ in range(n):
            marks.clear()
            torch.cuda.synchronize()
            t0[0] = time.perf_counter()
            mark("step start")
            y = step.forward()
            mark("forward returned")
            step.backward(y)
            mark("step end")
            torch.cuda.synchronize()
            first = marks[0][2]
            runs.append([(label, h * 1e3, first.elapsed_time(ev)) for label, h, ev in marks])
    finally:
        restore()
        for h in hooks:
            h.remove()
    out = []
    for i, (label, _, _) in enumerate(runs[0]):
        hs = sorted(r[i][1] for r in runs if len(r) > i)
        ds = sorted(r[i][2] for r in runs if len(r) > i)
        h, d = hs[len(hs) // 2], ds[len(ds) // 2]
        out.append({"at": label, "host_ms": h, "device_ms": d, "lead_ms": d - h})
    print("launch timeline (median of %d steps): at | host ms | device ms | device - host" % n, flush=True)
    for r in out:
        print(f"  {r['at'][:28]:28s} {r['host_ms']:7.2f} {r['device_ms']:7.2f} {r['lead_ms']:7.2f}", flush=True)
    return out


def launch_cache_counts() -> dict:
    """``{kernel: (hits, misses)}`` of the cached launches so far (mnemotorch.ops.triton_launch.launcher)."""
    from mnemotorch.ops.triton_launch import launchers

    return {getattr(c.kernel, "__name__", repr(c.kernel)): (c.hits, c.misses) for c in launchers()}


def host_profile(forward, step, n: int) -> dict:
    """The host's time in one forward, then in ``n`` whole steps, under cProfile: the top functions by own and by
    cumulative time (``{"forward": [...], "step": [...]}``, lines as pstats prints them)."""
    from mnemotorch.bench.streams import cprofile_tables

    out = {}
    for name, fn, reps in (("forward", forward, 1), ("step", step, n)):
        torch.cuda.synchronize()
        tables = cprofile_tables(fn, reps, ("tottime", "cumulative"))
        out[name] = [f"[{key}] " + ln for key, text in tables.items() for ln in text.splitlines() if ln.strip()]
        print(f"== host profile: {name} ({reps}) ==", flush=True)
        for ln in out[name]:
            print(ln[:230], flush=True)
    return out


#: Functions wrapped in ``torch.profiler.record_function`` under ``--gaps`` (module, attribute path): in the profiler's
#: trace their host time shows up under their names in the gaps' host ops (mnemotorch.bench.streams.host_during_gaps).
MARKS = (
    ("mnemotorch.layers.titans", "TitansLMM.forward"),
    ("mnemotorch.ops.memory.fused_triton", "neural_memory_fused"),
    ("mnemotorch.ops.memory.fused_triton", "check_memory_args"),
    ("mnemotorch.ops.memory.fused_triton", "check_fused_args"),
    ("mnemotorch.ops.memory.fused_triton", "fused_coefficients"),
    ("mnemotorch.ops.memory.fused_triton", "_FusedMemory.forward"),
    ("mnemotorch.ops.memory.fused_triton", "_FusedMemory.backward"),
    ("mnemotorch.ops.memory.fused_triton", "_launch_split"),
    ("mnemotorch.ops.memory.fused_triton", "_kept_key_pass"),
    ("mnemotorch.ops.memory.fused_triton", "_sweep_triton"),
    ("mnemotorch.ops.memory.fused_triton", "_update_vjp_triton"),
    ("mnemotorch.ops.memory.fused_triton", "_chunk_major"),
    ("mnemotorch.ops.memory.fused_triton", "_GroupGrads.add"),
    ("mnemotorch.ops.memory.fused_triton", "_GroupGrads.add_last"),
    ("mnemotorch.ops.memory.fused_triton", "_GroupGrads.finish"),
    ("mnemotorch.ops.memory.fused_read_vjp", "launch"),
    ("mnemotorch.ops.memory.fused_read_vjp", "after_kernels"),
)


#: More points for ``--timeline``: the layer's steps before the memory (module pre-hooks on its projections are added
#: there too) and the op's launch path.
TIMELINE_MARKS = MARKS + (
    ("mnemotorch.layers.titans", "compiled_conv_silu_qkv"),
    ("mnemotorch.layers.titans", "neural_memory"),
    ("mnemotorch.ops.memory.chunked", "log_gates"),
    ("mnemotorch.ops.memory.fused_triton", "_launch"),
)


def wrap_functions(marks, make) -> Callable[[], None]:
    """Replace each ``(module, "Name" or "Class.name")`` of ``marks`` by ``make(fn, label)`` (static methods stay
    static); returns the function that puts the originals back."""
    import functools
    import importlib
    import inspect

    undo = []
    for mod_name, path in marks:
        owner = importlib.import_module(mod_name)
        *outer, attr = path.split(".")
        for part in outer:
            owner = getattr(owner, part)
        try:
            raw = inspect.getattr_static(owner, attr)
        except AttributeError:  # renamed since: not marked
            print(f"wrap_functions: {mod_name}.{path} not found", flush=True)
            continue
        fn = raw.__func__ if isinstance(raw, staticmethod) else raw
        wrapped = functools.wraps(fn)(make(fn, path))
        setattr(owner, attr, staticmethod(wrapped) if isinstance(raw, staticmethod) else wrapped)
        undo.append((owner, attr, raw))

    def restore() -> None:
        for owner, attr, raw in reversed(undo):
            setattr(owner, attr, raw)

    return restore


def mark_functions(marks=MARKS) -> Callable[[], None]:
    """Wrap each function of ``marks`` in ``record_function`` under its name (the profiler's trace shows its host time)."""
    from torch.profiler import record_function

    def make(fn, label):
        def wrapped(*a, **kw):
            with record_function(label):
                return fn(*a, **kw)

        return wrapped

    return wrap_functions(marks, make)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--config", default="matched", choices=("matched", "default"))
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--top", type=int, default=40, help="kernel names kept in the table")
    ap.add_argument("--out", default=None)
    ap.add_argument("--by-stack", type=int, default=0, metavar="N",
                    help="N > 0: also group the device time by the launching op, its input shapes and the autograd node "
                    "or custom op above it (which part of the layer or op issues the elementwise, copy and fill kernels)")
    ap.add_argument("--gaps", action="store_true", help="also report, from the profiler's trace, how long the GPU ran no "
                    "kernel inside the step and the longest such gaps (host-bound stretches; mnemotorch.bench.streams.idle_gaps)")
    ap.add_argument("--host", type=int, default=0, metavar="N",
                    help="N > 0: also time N unprofiled steps, each as the host's time to issue it (until the backward "
                    "returns, no synchronisation) and the device's (CUDA events), and list the operations that synchronise "
                    "the host with the device in one step (torch.cuda.set_sync_debug_mode): whether the host or the device "
                    "bounds the step")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="N > 0: also run the forward of one step and then N whole steps under cProfile and print where the "
                    "host's time goes (top functions by own time and by cumulative time; what the host does before the "
                    "forward walk is launched is the device's idle time at the start of a step)")
    ap.add_argument("--timeline", type=int, default=0, metavar="N",
                    help="N > 0: also, unprofiled, the host's and the device's time at every launch of the memory's kernels "
                    "(a CUDA event before each): where the device caught up with the host (median of N steps)")
    ap.add_argument("--overlap", action="store_true", help="also measure, from the profiler's trace, how much kernel time of "
                    "other streams ran inside the adjoint sweep and the forward walk (the backward's second stream; "
                    "mnemotorch.bench.streams)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_titans_layer: needs a CUDA device", file=sys.stderr)
        return 2
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from mnemotorch.bench.neural_memory import build_ours, device_info
    from mnemotorch.ops.memory import fused_triton

    out_path = args.out or (os.path.join(os.environ["OUT"], "profile_titans_layer.json") if os.environ.get("OUT") else None)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    os.environ["MNEMO_MEMORY_FUSED"] = "1"
    torch.manual_seed(0)
    layer = build_ours(args.dim, args.heads, 64, args.config, dev, dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, args.length, args.dim, generator=g).to(dev, dtype).requires_grad_()
    go = torch.randn(1, args.length, args.dim, generator=g).to(dev, dtype)
    params = [x, *layer.parameters()]

    def step():
        torch.autograd.grad(layer(x)[0], params, go, allow_unused=True)

    t0 = time.perf_counter()
    for _ in range(3):  # compiles the backward's passes on the first call
        step()
    torch.cuda.synchronize()
    rep: dict = {"device": device_info(), "length": args.length, "config": args.config, "dim": args.dim, "heads": args.heads,
                 "warmup_s": time.perf_counter() - t0}
    starts, ends = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    starts.record()
    step()
    ends.record()
    torch.cuda.synchronize()
    rep["fwd_bwd_ms_unprofiled"] = starts.elapsed_time(ends)
    if args.host:
        host_issue(step, args.host, rep)
    if args.cprofile:
        rep["cprofile"] = host_profile(lambda: layer(x)[0], step, args.cprofile)
    if args.timeline:
        step.forward, step.layer = (lambda: layer(x)[0]), layer
        step.backward = lambda y: torch.autograd.grad(y, params, go, allow_unused=True)
        rep["timeline"] = launch_timeline(step, args.timeline)
    if args.gaps:
        mark_functions()
        step()  # once through the wrappers before the profiled step
    phases: dict = {}
    fused_triton.BACKWARD["timing"] = phases
    try:
        step()
    finally:
        fused_triton.BACKWARD["timing"] = None
    rep["bwd_phases_ms"] = phases
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 record_shapes=args.by_stack > 0) as prof:
        step()
        torch.cuda.synchronize()
    by_name: dict[str, list] = {}
    for e in prof.events():
        if getattr(e, "device_type", None) != DeviceType.CUDA:
            continue
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = getattr(e, "cuda_time_total", 0.0)
        row = by_name.setdefault(e.name, [0, 0.0])
        row[0] += 1
        row[1] += t / 1e3
    table = sorted(({"kernel": k, "count": c, "ms": ms} for k, (c, ms) in by_name.items()), key=lambda r: -r["ms"])
    # inductor's "## Call CompiledFxGraph ... ##" ranges show up as device events spanning their graph's kernels: listed,
    # but not added to the total a second time
    rep["kernel_ms_total"] = sum(r["ms"] for r in table if not r["kernel"].startswith("## Call"))
    rep["kernels"] = len(table)
    rep["top_kernels"] = table[: args.top]
    print(f"fwd+bwd {rep['fwd_bwd_ms_unprofiled']:.2f} ms unprofiled; kernels {rep['kernel_ms_total']:.2f} ms in {sum(r['count'] for r in table)} launches",
          flush=True)
    print(f"backward phases: { {k: round(v, 2) for k, v in phases.items()} }", flush=True)
    for r in table[: args.top]:
        print(f"  {r['ms']:8.3f} ms  x{r['count']:<5d} {r['kernel'][:110]}", flush=True)
    if args.by_stack:
        rep["by_stack"] = ops_by_stack(prof, args.by_stack, args.top)
        for r in rep["by_stack"]:
            print(f"  {r['device_ms']:8.3f} ms  x{r['count']:<5d} {r['op'][:80]} {r['shapes'][:80]} [{r['node'][:40]}]", flush=True)
    if args.overlap or args.gaps:
        import tempfile

        from mnemotorch.bench.streams import host_during_gaps, idle_gaps, kernels_from_chrome_trace, stream_overlap

        tmp = tempfile.mkdtemp()
        trace_path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace_path)
        kernels = kernels_from_chrome_trace(trace_path)
    if args.gaps:
        rep["gaps"] = idle_gaps(kernels, 16)
        r = rep["gaps"]
        print(f"gaps: span {r['span_ms']:.2f} ms, kernels busy {r['busy_ms']:.2f} ms, idle {r['idle_ms']:.2f} ms; longest: "
              + "; ".join(f"{x['ms']:.3f} after {x['after'][:40]} before {x['before'][:40]}" for x in r["gaps"]), flush=True)
        rep["gaps_host"] = host_during_gaps(trace_path, 16, 8)
        print("host time in the device's idle gaps, by innermost op: "
              + ", ".join(f"{o['op'][:60]} {o['ms']:.3f}" for o in rep["gaps_host"]["by_op"]), flush=True)
        for x in rep["gaps_host"]["gaps"]:
            print(f"  gap {x['ms']:.3f} ms before {x['before'][:50]} (host-bound: {x['host_bound']}): "
                  + ", ".join(f"{o['op'][:50]} {o['ms']:.3f}" for o in x["host_ops"]) + f"; outside ops {x['other_ms']:.3f}", flush=True)
    if args.overlap:  # did the second stream's passes run during the sequential kernels, or wait for their SMs?
        rep["overlap"] = {key: stream_overlap(kernels, key) for key in ("_lmm_split_sweep_kernel", "_lmm_split_fwd_kernel")}
        for key, r in rep["overlap"].items():
            print(f"overlap {key}: {r['key_ms']:.2f} ms on streams {r['key_streams']}, span {r['key_span_ms']:.2f} ms; other streams "
                  f"{r['others_ms']:.2f} ms of kernels, {r['others_during_key_ms']:.2f} ms of it inside ({r['during_fraction']:.0%}), "
                  f"busy {r['others_busy_during_key_ms']:.2f} ms of the span; inside, by kernel: "
                  + ", ".join(f"{x['kernel'][:40]} {x['ms']:.2f}" for x in r["during_by_kernel"][:5]), flush=True)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(rep, f, indent=1, default=str)
    return 0


def ops_by_stack(prof, n: int, top: int) -> list[dict]:
    """Self device time of every CPU-side op, grouped by (op, input shapes, the autograd node or custom op above it).

    Self time, so a kernel counts once, under the op that launched it. (Python frames are not kept: on torch 2.11 with
    CUDA activity the profiler linked none to the ops, so ``n`` is unused.)
    """
    from torch.autograd import DeviceType

    rows: dict[tuple, dict] = {}
    for e in prof.events():
        if getattr(e, "device_type", None) != DeviceType.CPU:  # the kernels themselves: counted under their op
            continue
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0.0)
        if not t:
            continue
        shapes = str(getattr(e, "input_shapes", ""))
        node, parent = "", getattr(e, "cpu_parent", None)
        while parent is not None:  # backward ops have no Python stack: name the autograd node that ran them
            if "evaluate_function" in parent.name or parent.name.endswith("Backward") or parent.name.startswith("mnemotorch"):
                node = parent.name.replace("autograd::engine::evaluate_function: ", "")
                break
            parent = getattr(parent, "cpu_parent", None)
        key = (e.name, shapes, node)
        row = rows.setdefault(key, {"op": e.name, "shapes": shapes, "node": node, "count": 0, "device_ms": 0.0})
        row["count"] += 1
        row["device_ms"] += t / 1e3
    return sorted(rows.values(), key=lambda r: -r["device_ms"])[:top]


if __name__ == "__main__":
    raise SystemExit(main())
