"""Where the host time of an eager call of the list-free kernels goes, on the GPU machine.

The bench's eager timings (a synchronize after every call, as the peers were timed) of the NA-2D,
NA-1D and sliding-window fast paths sit 0.1-0.5 ms above their device time. An earlier version of
this script profiled them with ``torch.profiler`` (``docs/results/diag_host_2026-11-26_h100.json``),
which inflates small host costs; this one times without a profiler:

* ``eager_ms``: the bench's number (``bench.block_sparse.median_ms``), forward (no grad) and
  forward + backward;
* ``device_ms``: the same step replayed as a CUDA graph (``bench.block_sparse.graph_ms``);
* ``host_us``: wall time per call of a loop without synchronisation (the GPU queue absorbs the
  device work, so this is the host's own time);
* ``launch_us``: of that, the time inside Triton's ``JITFunction.run`` per kernel, and inside the
  compiled launcher (``CompiledKernel.run``) it ends in;
* ``cprofile``: the top functions by own time of 200 no-grad forwards and 200 direct backward
  calls (the backward's Python runs on autograd's device thread, out of a main-thread profile).

JSON to ``$OUT/diag_host.json``; ``--launch-cache 0,1`` (default) runs every row without and with the
launch cache (``MNEMO_LAUNCH_CACHE``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

import torch
import triton
import triton.language as tl

_ACC: dict = defaultdict(float)
_CNT: dict = defaultdict(int)


def _instrument() -> None:
    """Accumulate the time spent in Triton's launch path per kernel (works on any thread)."""
    import triton.runtime.jit as jit
    from triton.compiler.compiler import CompiledKernel

    run = jit.JITFunction.run

    def timed_run(self, *a, **kw):
        t = time.perf_counter()
        try:
            return run(self, *a, **kw)
        finally:
            _ACC["jit:" + self.__name__] += time.perf_counter() - t
            _CNT["jit:" + self.__name__] += 1

    jit.JITFunction.run = timed_run
    prop = CompiledKernel.__dict__.get("run")
    if isinstance(prop, property):
        def wrapped(self):
            launcher = prop.fget(self)

            def call(*a, **kw):
                t = time.perf_counter()
                try:
                    return launcher(*a, **kw)
                finally:
                    _ACC["c:" + self.name] += time.perf_counter() - t
                    _CNT["c:" + self.name] += 1
            return call
        CompiledKernel.run = property(wrapped)


def cases(which):
    from mnemotorch.ops.block_sparse import block_sparse_attention, neighborhood_pattern_1d, sliding_window_pattern
    from mnemotorch.ops.block_sparse.na2d_triton import na2d_attention_triton

    g = torch.Generator(device="cuda").manual_seed(0)

    def qkv(n, h, d):
        return [torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3)]

    if "na2d" in which:
        q2, k2, v2 = qkv(16384, 16, 64)
        yield "na2d", (q2, k2, v2), lambda: na2d_attention_triton(q2, k2, v2, (128, 128), 13)
    if "na1d" in which:
        q1, k1, v1 = qkv(32768, 1, 128)
        p1 = neighborhood_pattern_1d(32768, 2048, device="cuda")
        yield "na1d", (q1, k1, v1), lambda: block_sparse_attention(q1, k1, v1, p1, backend="triton")
    if "swa16k" in which:
        qs, ks, vs = qkv(16384, 16, 128)
        ps = sliding_window_pattern(16384, 1024, device="cuda")
        yield "swa16k", (qs, ks, vs), lambda: block_sparse_attention(qs, ks, vs, ps, backend="triton")


def host_us(step, n=100) -> float:
    for _ in range(3):  # warm (compilation, autograd's device thread)
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        step()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


def launch_us(step, n=50) -> dict:
    torch.cuda.synchronize()
    _ACC.clear()
    _CNT.clear()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return {k: round(v / n * 1e6, 2) for k, v in sorted(_ACC.items())}


def profiled(step, calls: int = 200, n: int = 22) -> str:
    """The top ``n`` functions by own time of ``calls`` calls of ``step`` (cProfile, this thread)."""
    from mnemotorch.bench.streams import cprofile_tables

    text = cprofile_tables(step, calls, ("tottime",), n)["tottime"]
    return "\n".join(line for line in text.splitlines() if line.strip())[-4000:]


def direct_backward(name, q, k, v, go):
    """A callable running the case's backward implementation on this thread (for cProfile)."""
    if name == "na2d":
        from mnemotorch.ops.block_sparse import na2d_triton as m
        o, lse, lo = m._fwd_impl(q, k, v, 128, 128, 13, 13, 64**-0.5, need_lo=True)
        return lambda: m._bwd_impl(go, q, k, v, o, lse, lo, 128, 128, 13, 13, 64**-0.5)
    from mnemotorch.ops.block_sparse import swa_triton as m
    window, na1d = (2048, True) if name == "na1d" else (1024, False)
    o, lse, lo = m._fwd_impl(q, k, v, window, q.shape[-1]**-0.5, na1d=na1d)
    return lambda: m._bwd_impl(go, q, k, v, o, lse, lo, window, q.shape[-1]**-0.5, na1d)


def measure(which) -> dict:
    from mnemotorch.bench.block_sparse import graph_ms, median_ms

    rep = {}
    for name, (q, k, v), fn in cases(which):
        go = torch.randn_like(q)

        def fwd():
            with torch.no_grad():
                return fn()

        def fwd_bwd():
            return torch.autograd.grad(fn(), (q, k, v), go)

        row = {}
        first = [t.clone() for t in fwd_bwd()]  # a miss of the launch cache: the normal launch path
        for mode, step in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            r = {"eager_ms": median_ms(step, warmup=5, rep=30), "host_us": host_us(step), "launch_us": launch_us(step)}
            try:
                r["device_ms"] = graph_ms(step)
            except Exception as exc:  # noqa: BLE001 - recorded, not raised
                r["device_ms"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            row[mode] = r
            print(name, mode, json.dumps(r), flush=True)
        row["grads_equal_first_call"] = all(torch.equal(a, b) for a, b in zip(first, fwd_bwd()))
        row["cprofile_fwd"] = profiled(fwd)
        bwd = direct_backward(name, q.detach(), k.detach(), v.detach(), go)
        bwd()
        torch.cuda.synchronize()
        row["bwd_direct_host_us"] = host_us(bwd)
        row["cprofile_bwd"] = profiled(bwd)
        rep[name] = row
    return rep


@triton.jit
def _empty1(x):
    pass


@triton.jit
def _empty40(x0, x1, x2, x3, x4, x5, x6, x7, s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15,
             s16, s17, f0, f1, i0, i1, i2, i3, A: tl.constexpr, B: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
             E: tl.constexpr, F: tl.constexpr, G: tl.constexpr, H: tl.constexpr):
    pass


def baselines() -> dict:
    """Host costs of the pieces every call pays: an empty Triton launch (1 and 40 arguments), an
    allocation, a trivial autograd.Function's forward + backward on CUDA tensors."""
    x = torch.empty(1 << 20, device="cuda")
    ints = [4096 * (i + 1) for i in range(18)]
    out = {}
    out["empty_launch_1arg_us"] = host_us(lambda: _empty1[(1,)](x), 500)
    out["empty_launch_40arg_us"] = host_us(lambda: _empty40[(128, 16)](x, x, x, x, x, x, x, x, *ints, 0.125, 0.5, 128, 128, 13, 13,
                                                                        A=1, B=2, C=3, D=4, E=5, F=6, G=7, H=8), 500)
    out["torch_empty_32MB_us"] = host_us(lambda: torch.empty(16 << 20, device="cuda", dtype=torch.bfloat16), 500)

    class Nop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a.view_as(a)

        @staticmethod
        def backward(ctx, g):
            return g

    a = torch.zeros(16, device="cuda", requires_grad=True)
    gz = torch.ones(16, device="cuda")
    out["autograd_nop_fwd_bwd_us"] = host_us(lambda: torch.autograd.grad(Nop.apply(a), (a,), gz), 500)
    print("baselines", json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="na2d,na1d,swa16k")
    ap.add_argument("--launch-cache", default="0,1", help="MNEMO_LAUNCH_CACHE values to run (ops/triton_launch.py)")
    args = ap.parse_args()
    which = args.cases.split(",")
    _instrument()
    rep = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    rep["triton"] = triton.__version__
    rep["baselines"] = baselines()
    for flag in args.launch_cache.split(","):
        os.environ["MNEMO_LAUNCH_CACHE"] = flag
        rep[f"launch_cache_{flag}"] = measure(which)
    out = os.path.join(os.environ.get("OUT", "."), "diag_host.json")
    with open(out, "w") as f:
        json.dump(rep, f, indent=1)


if __name__ == "__main__":
    main()
