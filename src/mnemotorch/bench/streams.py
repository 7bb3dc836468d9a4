"""How much GPU work of one stream ran while a given kernel ran on another: the check behind a two-stream schedule.

The fused Titans memory's backward queues its batched passes on a second CUDA stream beside the sequential sweep
(``ops/memory/fused_triton.py``, ``BACKWARD["overlap"]``). Whether they actually run during the sweep, or wait for
its SMs, is a question about time intervals on a profiler trace: :func:`kernels_from_chrome_trace` reads the kernel
events (name, stream, start, duration) of a ``torch.profiler`` Chrome trace, :func:`stream_overlap` measures, for
the intervals of the kernels whose name contains ``key``, how much kernel time of the other streams fell inside them.
``scripts/profile_titans_layer.py --overlap`` prints and records it. :func:`idle_gaps` finds where no kernel ran at all,
:func:`host_during_gaps` what the host was doing meanwhile, and :func:`cprofile_tables` where the host's own time went
(Python functions, cProfile).
"""

from __future__ import annotations

import json
from collections.abc import Iterable


def kernels_from_chrome_trace(path: str) -> list[dict]:
    """The GPU kernel events of a Chrome trace written by ``torch.profiler.profile.export_chrome_trace``:
    ``[{"name", "stream", "ts", "dur"}]`` (µs; events of category ``kernel`` with a stream in their args)."""
    with open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    out = []
    for e in events:
        if e.get("ph") != "X" or e.get("cat") != "kernel":
            continue
        stream = (e.get("args") or {}).get("stream")
        if stream is None:
            continue
        out.append({"name": e.get("name", ""), "stream": int(stream), "ts": float(e["ts"]), "dur": float(e.get("dur", 0.0))})
    return out


def _merge(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of ``[start, end)`` intervals, sorted and disjoint."""
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if b <= a:
            continue
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _inside(a: float, b: float, windows: list[tuple[float, float]]) -> float:
    """Length of ``[a, b)`` that lies inside the disjoint ``windows``."""
    return sum(max(0.0, min(b, y) - max(a, x)) for x, y in windows)


def stream_overlap(kernels: list[dict], key: str, top: int = 10) -> dict:
    """For the kernels whose name contains ``key`` (on whatever streams they ran): their summed time and wall span
    (``key_ms``, ``key_span_ms``: the union of their intervals), and of every kernel on *other* streams the summed time
    (``others_ms``), the part of it inside those intervals (``others_during_key_ms``) and that part's share
    (``during_fraction``); the kernels contributing most to the part inside, by name (``during_by_kernel``, ``top``
    of them); and the union of the other streams' busy time inside the key's intervals (``others_busy_during_key_ms``:
    how much of the key's span saw any other work at all). Times in ms; ``kernels`` as
    :func:`kernels_from_chrome_trace` returns them."""
    keyed = [k for k in kernels if key in k["name"]]
    streams = {k["stream"] for k in keyed}
    windows = _merge((k["ts"], k["ts"] + k["dur"]) for k in keyed)
    others = [k for k in kernels if k["stream"] not in streams]
    during: dict[str, float] = {}
    for k in others:
        t = _inside(k["ts"], k["ts"] + k["dur"], windows)
        if t > 0:
            during[k["name"]] = during.get(k["name"], 0.0) + t
    others_ms = sum(k["dur"] for k in others) / 1e3
    during_ms = sum(during.values()) / 1e3
    busy = _merge((k["ts"], k["ts"] + k["dur"]) for k in others)
    busy_during = sum(_inside(a, b, windows) for a, b in busy) / 1e3
    return {
        "key": key,
        "key_streams": sorted(streams),
        "key_ms": sum(k["dur"] for k in keyed) / 1e3,
        "key_span_ms": sum(b - a for a, b in windows) / 1e3,
        "others_ms": others_ms,
        "others_during_key_ms": during_ms,
        "during_fraction": during_ms / others_ms if others_ms > 0 else 0.0,
        "others_busy_during_key_ms": busy_during,
        "during_by_kernel": [{"kernel": n, "ms": t / 1e3} for n, t in sorted(during.items(), key=lambda x: -x[1])[:top]],
    }


def idle_gaps(kernels: list[dict], top: int = 12) -> dict:
    """Where the GPU ran no kernel inside the traced span (all streams together): ``{"span_ms", "busy_ms", "idle_ms",
    "gaps": [{"ms", "after", "before"}]}``, the ``top`` longest gaps with the kernels that end and begin them. On a
    host-bound stretch (many small launches, Python between them) the idle time is what the host costs the step."""
    if not kernels:
        return {"span_ms": 0.0, "busy_ms": 0.0, "idle_ms": 0.0, "gaps": []}
    ordered = sorted(kernels, key=lambda k: k["ts"])
    busy = _merge((k["ts"], k["ts"] + k["dur"]) for k in ordered)
    span = busy[-1][1] - busy[0][0]
    gaps = []
    for (a0, a1), (b0, _) in zip(busy, busy[1:]):
        after = max((k for k in ordered if k["ts"] + k["dur"] <= a1 + 1e-3 and k["ts"] < a1), key=lambda k: k["ts"] + k["dur"])
        before = min((k for k in ordered if k["ts"] >= b0 - 1e-3), key=lambda k: k["ts"])
        gaps.append({"ms": (b0 - a1) / 1e3, "after": after["name"], "before": before["name"]})
    gaps.sort(key=lambda g: -g["ms"])
    busy_us = sum(b - a for a, b in busy)
    return {"span_ms": span / 1e3, "busy_ms": busy_us / 1e3, "idle_ms": (span - busy_us) / 1e3, "gaps": gaps[:top]}


def host_during_gaps(path: str, top: int = 8, ops: int = 6) -> dict:
    """What the host ran while the device waited for it, from a ``torch.profiler`` Chrome trace (CPU and CUDA activity).

    For each of the ``top`` longest gaps in which no kernel ran (as :func:`idle_gaps` finds them), the kernel that ends
    the gap was launched at some host time ``L`` (its runtime or driver launch event, matched by correlation id). The
    device was idle from the gap's start ``a`` until that launch reached it, so the host's work in ``[a, L]`` on the
    launching thread is what the gap cost: each instant of that window goes to the innermost CPU op or user annotation
    (``record_function``) running then, and ``host_ops`` lists their names with the time each got (``ops`` of them,
    longest first; an annotation's own Python shows up as its time outside the ops it contains); ``other_ms`` is the
    window's time in none of them. ``host_bound`` is False where the launch came before the gap began (the kernel
    waited for something else: an event of another stream). Returns ``{"gaps": [those rows], "by_op": [{"op", "ms"}]}``,
    ``by_op`` summed over every host-bound gap (``ops`` · 3 names). Times in ms.
    """
    with open(path) as f:
        trace = json.load(f)
    events = [e for e in (trace["traceEvents"] if isinstance(trace, dict) else trace) if e.get("ph") == "X"]
    kernels = [e for e in events if e.get("cat") == "kernel" and (e.get("args") or {}).get("correlation") is not None]
    launches = {}
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and (e.get("args") or {}).get("correlation") is not None:
            launches[e["args"]["correlation"]] = e
    host = sorted((e for e in events if e.get("cat") in ("cpu_op", "user_annotation")), key=lambda e: (e["ts"], -e.get("dur", 0)))
    kernels.sort(key=lambda e: e["ts"])
    busy = _merge((float(k["ts"]), float(k["ts"]) + float(k.get("dur", 0))) for k in kernels)
    out, total = [], {}
    for (_, a), (b, _) in zip(busy, busy[1:]):
        nxt = min((k for k in kernels if float(k["ts"]) >= b - 1e-3), key=lambda k: float(k["ts"]))
        launch = launches.get(nxt["args"]["correlation"])
        row = {"ms": (b - a) / 1e3, "before": nxt.get("name", ""), "host_bound": None, "host_ops": [], "other_ms": 0.0}
        spent: dict[str, float] = {}
        if launch is not None:
            end = float(launch["ts"])
            row["host_bound"] = end > a
            spent = _innermost_time([e for e in host if e.get("tid") == launch.get("tid") and float(e["ts"]) < end
                                     and float(e["ts"]) + float(e.get("dur", 0)) > a], a, end)
            row["host_ops"] = [{"op": n, "ms": t} for n, t in sorted(spent.items(), key=lambda x: -x[1])[:ops]]
            row["other_ms"] = max(0.0, (end - a) / 1e3 - sum(spent.values()))
        out.append(row)
        for name, t in (spent.items() if row["host_bound"] else ()):
            total[name] = total.get(name, 0.0) + t
    out.sort(key=lambda r: -r["ms"])
    return {"gaps": out[:top], "by_op": [{"op": n, "ms": t} for n, t in sorted(total.items(), key=lambda x: -x[1])[: 3 * ops]]}


def _innermost_time(events: list[dict], a: float, b: float) -> dict[str, float]:
    """``{name: ms}``: each instant of ``[a, b]`` (µs) given to the innermost of the (properly nested) ``events``
    covering it, the one that began last."""
    cuts = sorted({a, b, *(min(max(float(e["ts"]), a), b) for e in events),
                   *(min(max(float(e["ts"]) + float(e.get("dur", 0)), a), b) for e in events)})
    spent: dict[str, float] = {}
    for x, y in zip(cuts, cuts[1:]):
        mid = (x + y) / 2
        inner = None
        for e in events:
            if float(e["ts"]) <= mid < float(e["ts"]) + float(e.get("dur", 0)) and (inner is None or float(e["ts"]) >= float(inner["ts"])):
                inner = e
        if inner is not None:
            spent[inner.get("name", "")] = spent.get(inner.get("name", ""), 0.0) + (y - x) / 1e3
    return spent


def cprofile_tables(fn, calls: int, keys: tuple = ("tottime",), top: int = 25) -> dict:
    """``fn()`` called ``calls`` times under cProfile (this thread; the CUDA device synchronised after, where there is
    one, so that the profile covers the host's side of the calls and no later work): per pstats sort key in ``keys``,
    the table of the ``top`` functions as pstats prints it."""
    import cProfile
    import io
    import pstats

    import torch

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    tables = {}
    for key in keys:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(top)
        tables[key] = buf.getvalue()
    return tables


__all__ = ["cprofile_tables", "host_during_gaps", "idle_gaps", "kernels_from_chrome_trace", "stream_overlap"]
