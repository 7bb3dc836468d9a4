"""Speed benchmark of the block-sparse attention kernel against SDPA and FlexAttention.

Each case runs every implementation in this process on the same inputs (same values; each in its
native layout), reports the median of device-event timings after warm-up for the forward and the
forward+backward, the peak memory (after a warm-up call), the effective TFLOP/s on computed blocks
and on allowed pairs, and the ratio against each peer.

Cases (``--cases``, run in this order so that a time budget still covers every kind):

* ``swa``   causal sliding window, every (L, W, D) of ``--lengths x --windows x --dims`` (issue:
  W in {1024, 4096}, L in {16K, 64K}, D in {64, 128}, H = 16), vs FlexAttention (compiled, compiled
  mask build) and dense causal SDPA. The first (W, D) at every L runs first, the rest after the
  other kinds.
* ``na1d``  1-D neighborhood attention, L = 32K, kernel 2048, D = 128, H = 1, vs dense SDPA and Flex.
* ``na2d``  2-D neighborhood attention, 128 x 128 tokens, kernel 13 x 13, D = 64, H = 16, ours on
  8 x 8 token tiles vs Flex on row-major tokens (and dense SDPA).
* ``power`` PowerAttention (256-token blocks, 5 window blocks, 1 sink block) at ``--power-lengths``
  (64K, 128K) vs dense causal SDPA.
* ``bias``  (not in the default list) the 1-D relative-position bias hook: sliding window 16K,
  W = 1024, D = 128 with a per-head table vs the same without the bias and Flex with a ``score_mod``.

``--cuda-graph`` (CUDA only; a no-op with a printed note on the CPU): after the eager timings of a case,
every implementation that ran (ours and its alternatives, SDPA, Flex) is timed again, forward and
forward+backward, as CUDA-graph replays of one captured call (:func:`graph_ms` via
:func:`measure_graphed`), recorded under ``<name>_graphed``; each result says its ``timing``
(``"eager"`` / ``"cuda_graph"``, ``TIMING_MODES`` in the report). A capture that fails is recorded as
``not_capturable: <reason>`` and is not tried again in the later cases of that kind (other sizes). The
replays leave out the host's Python and launch overhead, which the eager timings charge, so the fair
comparison of the device work is ``speedup_*_graphed_vs_<peer>_graphed`` (graphed ours vs graphed
peer); ``speedup_*_graphed_vs_<peer>`` sets graphed ours against the peer's eager time, and
``cuda_graph_summary`` (also printed) has all of them per case. ``--graph-rounds N`` takes those graphed
timings N times per case, ours and the peers interleaved round by round, and records each round's ratio
and their min / median / max (``graph_rounds`` in the row): the spread of a ratio within one process.
Every row of the list-free kernels' cases also records which forward ran (Gluon or Triton) and the launch
rows (``results["ours"]["kernels"]``).

``--tiny`` runs every selected case at tiny sizes, also on the CPU (kernels under Triton's
interpreter, wall-clock timings, FlexAttention forward-only and uncompiled there, since it has no
CPU backward): a smoke test of the whole harness. ``--autotune small`` (default) keeps kernel
compilation inside the budget. Usage: ``mnemo bench kernels -- --out results.json`` (GPU) or
``mnemo bench kernels -- --tiny --out tiny.json`` (any machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


def device_info() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
            ).stdout.strip().splitlines()[0]
        except Exception:  # pragma: no cover - informational only
            info["driver"] = None
        try:  # the ptxas Triton builds with (TRITON_PTXAS_PATH or its own): it decides some launches (Titans walk)
            from ..ops.memory.fused_triton import _NARROW_WALK_PTXAS
            from ..ops.triton_launch import ptxas_for_build, ptxas_release

            cap = torch.cuda.get_device_capability()
            release = ptxas_release(cap)
            info["ptxas"] = ".".join(map(str, release)) if release else None
            info["ptxas_path"] = os.environ.get("TRITON_PTXAS_PATH") or "bundled"
            # the one the Titans walk is built with at 32 columns, where Triton's own is too old for it
            path, walk = ptxas_for_build(cap, _NARROW_WALK_PTXAS)
            info["ptxas_titans_walk"] = (".".join(map(str, walk)) + (f" ({path})" if path else "")) if walk else None
        except Exception:  # pragma: no cover - informational only
            info["ptxas"] = info["ptxas_path"] = info["ptxas_titans_walk"] = None
    return info


def wall_median_ms(fn: Callable[[], object], warmup: int = 5, rep: int = 20) -> float:
    """Median wall-clock time of ``fn`` in ms (CPU runs, where there are no device events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def median_ms(fn: Callable[[], object], warmup: int = 5, rep: int = 20) -> float:
    """Median wall time of ``fn`` on the device, in ms (CUDA events around each call).

    Slow cases (> 50 ms a call, e.g. dense attention at 128K) take 1 warm-up and 5 timed calls.
    """
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    if time.perf_counter() - t0 > 0.05:
        warmup, rep = 1, 5
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


class GraphCaptureError(RuntimeError):
    """A step could not be captured in a CUDA graph. ``str(err)`` reads ``"not capturable: <reason>"``;
    ``err.reason`` is the reason alone (the failing call's error first, then what ending the capture said)."""

    def __init__(self, reason: str):
        super().__init__(f"not capturable: {reason}")
        self.reason = reason


def _tensors_of(obj) -> list[torch.Tensor]:
    """The tensors in ``obj`` (a tensor, or lists / tuples / dicts of them, nested)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors_of(item)]
    return []


def _error_chain(exc: BaseException, limit: int = 300) -> str:
    """``exc`` and the exceptions it was raised while handling, oldest first, one line each.

    A call that is not permitted during a capture (a host sync, say) raises inside the ``with``
    block, and ``torch.cuda.graph``'s exit then fails to end the invalidated capture: the second
    error is the one raised, the first (the cause worth reporting) is its ``__context__``."""
    parts: list[str] = []
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        lines = str(e).strip().splitlines()
        parts.append(f"{type(e).__name__}: {lines[0][:limit] if lines else ''}".rstrip(": "))
        e = e.__cause__ or e.__context__
    return "; then ".join(reversed(parts))


#: what a failed capture's message means, for the causes seen on this project's GPUs (substring -> hint)
_CAPTURE_HINTS = {
    "legacy stream depend on a capturing": (
        "hint: an autograd graph made on the default stream is still alive (an output or loss kept from an eager "
        "call); its leaves' AccumulateGrad nodes run the captured backward's accumulation on the legacy stream. "
        "Drop it (or make the eager call under torch.no_grad()) before capturing"),
}


def _capture_hint(reason: str) -> str:
    """The known cause of a capture failure whose message is ``reason``, as ``" [hint: ...]"`` ("" if none)."""
    for needle, hint in _CAPTURE_HINTS.items():
        if needle in reason:
            return f" [{hint}]"
    return ""


def _abandon_capture(graph, pool, stream, device: int) -> list[str]:
    """Undo what a failed capture left behind, so that later work in this process is not affected.

    ``CUDAGraph.capture_end`` stops routing allocations to the graph's pool only after
    ``cudaStreamEndCapture`` succeeded; when the capture was invalidated it raises first, leaving the
    pool registered as "being captured into" (the caching allocator then defers frees and skips its
    event processing for as long as any capture is registered). This ends that registration and
    drops the pool (``releasePool``, which ``graph.reset()`` does not do for a capture that never
    ended), then resets the graph (which also drops the generators' capture states). Returns notes on
    steps that failed (best effort: private torch functions, whose names changed between releases)."""
    notes = []
    try:
        with torch.cuda.stream(stream):  # only if the failure came before capture_end (which ends it, even when invalid)
            if torch.cuda.is_current_stream_capturing():
                graph.capture_end()
    except Exception as exc:  # noqa: BLE001 - best effort
        notes.append(f"capture_end: {type(exc).__name__}")
    end = getattr(torch._C, "_cuda_endAllocateToPool", None) or getattr(torch._C, "_cuda_endAllocateCurrentStreamToPool", None)
    release = getattr(torch._C, "_cuda_releasePool", None)
    ended = False
    if end is not None:
        try:
            end(device, pool)
            ended = True  # it was still registered: capture_end never got that far
        except Exception as exc:  # noqa: BLE001
            if "not currently recording" not in str(exc):  # else capture_end had ended it: nothing to do
                notes.append(f"endAllocateToPool: {type(exc).__name__}")
    else:
        notes.append("no endAllocateToPool in this torch")
    if ended and release is not None:
        try:
            release(device, pool)
        except Exception as exc:  # noqa: BLE001
            notes.append(f"releasePool: {type(exc).__name__}")
    try:
        graph.reset()
    except Exception as exc:  # noqa: BLE001
        notes.append(f"reset: {type(exc).__name__}")
    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    except Exception as exc:  # noqa: BLE001
        notes.append(f"synchronize: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}")
    return notes


def capture_graph(step: Callable[[], object], warmup: int = 3):
    """Warm ``step`` up on a side stream, then capture one call of it in a CUDA graph.

    Returns ``(graph, static_out)``: ``graph.replay()`` reruns the captured work and rewrites
    ``static_out`` (what the captured call returned) in place. The capture allocates from a fresh
    pool of its own (``torch.cuda.graph_pool_handle()``, shared with no other graph), released by
    ``graph.reset()`` once ``static_out`` is gone. Raises :class:`GraphCaptureError` if the capture
    fails (after undoing what the failed capture left in the allocator, see ``_abandon_capture``) or
    if there is no CUDA device; a ``ValueError`` if a warm-up call returns a tensor with autograd
    history. See :func:`graph_ms` for what ``step`` must do.
    """
    if not torch.cuda.is_available():
        raise GraphCaptureError("CUDA graphs need a CUDA device (torch.cuda.is_available() is False)")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 1)):
            out = step()
            if any(t.grad_fn is not None for t in _tensors_of(out)):
                raise ValueError("graph_ms: step returned a tensor with autograd history; return detached tensors or "
                                 "gradients (torch.autograd.grad), so that no autograd graph outlives a call")
            del out
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    pool = torch.cuda.graph_pool_handle()
    static_out = None
    try:
        # The outer stream context restores the caller's stream even when torch.cuda.graph's exit
        # raises (it ends the capture before it restores the stream).
        with torch.cuda.stream(side), torch.cuda.graph(graph, pool=pool, stream=side):
            static_out = step()
    except Exception as exc:  # noqa: BLE001 - every capture failure becomes one clear error
        static_out = None
        reason = _error_chain(exc)
        reason += _capture_hint(reason)
        notes = _abandon_capture(graph, pool, side, torch.cuda.current_device())
        if notes:
            reason += f" [cleanup after the failed capture: {', '.join(notes)}]"
        raise GraphCaptureError(reason) from exc
    return graph, static_out


def graph_ms(step: Callable[[], object], warmup: int = 3, rep: int = 20) -> float:
    """Median device time of one CUDA-graph replay of ``step``, in ms: what ``step`` costs without the
    host's launch overhead (compare :func:`median_ms`, which times eager calls and so charges it).

    ``step`` is warmed up ``warmup`` times on a side stream, captured once in a CUDA graph (a private
    memory pool), replayed once untimed (instantiation, upload), then replayed ``rep`` times, each
    between two CUDA events and followed by a synchronize (as :func:`median_ms` times its calls).
    The graph and its pool are released before returning. Raises :class:`GraphCaptureError`
    (``"not capturable: <reason>"``) if the capture fails; the caller can report it and go on.

    What ``step`` must do (the rules of PyTorch's CUDA-graph notes):

    * read only static tensors made before the call (inputs, parameters, upstream gradients), the same
      ones on every call; a replay reads them where they are, so new values go in with ``copy_``;
    * no host sync (``.item()``, ``.cpu()``, ``nonzero``, data-dependent shapes, ``synchronize``) and no
      CPU-to-GPU copy of host data: those fail the capture or bake one call's values into the graph;
    * forward + backward: compute the gradients with ``torch.autograd.grad(out, inputs, grad_out)`` and
      **return** them (with anything else to keep, detached). They are allocated in the graph's pool,
      and every replay rewrites the same tensors, so nothing accumulates and nothing needs zeroing;
      ``.grad`` is never touched. (The other pattern, ``.backward()`` into ``.grad``, only works if
      every ``.grad`` is ``None`` when the capture starts; a ``.grad`` that exists then is accumulated
      into on every replay.) Forward only: run it under ``torch.no_grad()`` and return the output;
    * return nothing that holds an autograd graph (checked on the warm-up calls: ``ValueError``), and
      keep none alive between calls (a module that stores a loss with its graph must drop it inside
      the step). A surviving graph keeps the leaves' ``AccumulateGrad`` nodes, which run on the stream
      that was current when they were made, and the captured backward then fails
      (``cudaErrorStreamCaptureImplicit``) when that was the default stream;
    * leave per-call state as it found it (a module that carries statistics from one call to the next
      should have that state reset at the start of the step), so that replays repeat the same work.
    """
    graph, static_out = capture_graph(step, warmup)
    try:
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(max(rep, 1)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    finally:
        del static_out
        graph.reset()
        torch.cuda.empty_cache()
    times.sort()
    return times[len(times) // 2]


#: How each number of a ``--cuda-graph`` run was taken (the ``timing`` field of each result; the
#: kernel bench and ``mnemo bench routed`` both record it).
TIMING_MODES = {
    "eager": "median of per-call device-event timings with a synchronize after each call: the host's Python and "
             "kernel-launch overhead is charged (bench.block_sparse.median_ms)",
    "cuda_graph": "median of CUDA-graph replays of one captured call (bench.block_sparse.graph_ms): the same device work "
                  "without the host's per-kernel launch overhead; inputs, parameters and gradients in static buffers",
}
#: an eager call slower than this (ms) gets fewer graph replays (as :func:`median_ms` does for eager calls)
GRAPH_SLOW_MS = 50.0


def measure_graphed(call: Callable[[], torch.Tensor], grad_out: torch.Tensor, params: list[torch.Tensor],
                    skip_fwd_bwd: str | None = None, *, backward: bool = True, slow: bool = False,
                    timer: Callable[..., float] | None = None,
                    not_retried: str = "its forward + backward capture failed at a shorter length") -> dict:
    """Forward and forward + backward ms of CUDA-graph replays of ``call`` (:func:`graph_ms`): the
    graphed counterpart of :func:`measure`, shared by the kernel and routed benches.

    ``call()`` computes the output from static inputs; the forward step runs it under
    ``torch.no_grad()``, the forward + backward step returns ``torch.autograd.grad(call(), params,
    grad_out)`` (gradients in the graph's pool, rewritten by every replay; ``.grad`` untouched). A
    failed capture is recorded as ``not_capturable`` (its reason), never raised; if the forward does
    not capture, the forward + backward is not tried (it would fail on the same call), nor when
    ``skip_fwd_bwd`` (the reason of an earlier failure, then recorded with ``not_retried``) is given,
    nor with ``backward=False`` (``fwd_bwd_ms`` is ``None``). ``slow``: 1 warm-up and 5 timed replays
    instead of 3 and 20. ``timer`` replaces :func:`graph_ms` (looked up when called, so tests can
    patch it). The peak memory is not measured for replays (``peak_extra_gib`` is ``None``)."""
    timer = graph_ms if timer is None else timer
    reps = {"warmup": 1, "rep": 5} if slow else {}

    def fwd_step():
        with torch.no_grad():
            return call()

    def fwd_bwd_step():
        return torch.autograd.grad(call(), params, grad_out)

    out: dict = {"timing": "cuda_graph"}
    try:
        out["fwd_ms"] = timer(fwd_step, **reps)
    except GraphCaptureError as exc:
        out["not_capturable"] = f"forward: {exc.reason}"
        return out
    if not backward:
        out["fwd_bwd_ms"] = None
    elif skip_fwd_bwd is not None:
        out["fwd_bwd_ms"] = None
        out["not_capturable"] = skip_fwd_bwd
        out["not_retried"] = not_retried
    else:
        try:
            out["fwd_bwd_ms"] = timer(fwd_bwd_step, **reps)
        except GraphCaptureError as exc:
            out["fwd_bwd_ms"] = None
            out["not_capturable"] = f"forward + backward: {exc.reason}"
    out["peak_extra_gib"] = None  # not measured for replays (the graph's pool holds the whole step)
    return out


#: (warm-up, timed) calls on the CPU, where the kernels run in Triton's interpreter (smoke runs)
CPU_REPS = (0, 1)


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """The CUDA memory one ``fn()`` allocates on top of what is live before it, its result included (freed after)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - base


def measure(fwd: Callable[[], torch.Tensor], grad_out: torch.Tensor, params: list[torch.Tensor], backward: bool = True) -> dict:
    """Forward and forward+backward medians (ms) and the extra peak memory of one forward+backward.

    The first call of each (compilation, autotuning) is timed separately (``first_*_s``) and kept
    out of the medians and of the peak reading. ``backward=False`` times the forward only. On a
    CPU the times are wall clock (``CPU_REPS``) and the peak is not measured (``None``).
    """
    cuda = grad_out.device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def fwd_bwd():
        out = fwd()
        torch.autograd.grad(out, params, grad_out)

    def timed(fn):
        return median_ms(fn) if cuda else wall_median_ms(fn, *CPU_REPS)

    res: dict = {}
    with torch.no_grad():
        t0 = time.perf_counter()
        fwd()
        sync()
        res["first_fwd_s"] = time.perf_counter() - t0
        res["fwd_ms"] = timed(fwd)
    if not backward:
        res.update(fwd_bwd_ms=None, peak_extra_gib=None)
        return res
    t0 = time.perf_counter()
    fwd_bwd()  # warm-up: compilation/autotuning buffers stay out of the peak reading
    sync()
    res["first_fwd_bwd_s"] = time.perf_counter() - t0
    res["peak_extra_gib"] = peak_extra_bytes(fwd_bwd) / 2**30 if cuda else None
    res["fwd_bwd_ms"] = timed(fwd_bwd)
    return res


# ---------------------------------------------------------------------------------------------
# run-wide settings


class Run:
    """Settings shared by the cases: device, peers, Flex compilation, budget, SDPA results cache."""

    def __init__(self, device: str, peers=("sdpa", "flex"), flex_compile: bool = True, budget: float | None = None,
                 alternatives: bool = False, dtype=torch.bfloat16, cuda_graph: bool = False, graph_rounds: int = 1):
        self.device = device
        self.peers = tuple(peers)
        self.flex_compile = flex_compile
        self.budget = budget
        self.alternatives = alternatives
        self.dtype = dtype
        self.t_start = time.perf_counter()
        self.sdpa_cache: dict = {}
        self.patterns: dict = {}
        self._flex = None
        #: ``--cuda-graph`` (CUDA only): the implementations of the current case queued for graph
        #: timing (``_GraphJob``), failed captures by ``(case, name, "fwd" | "fwd_bwd")`` (not retried
        #: in later cases of the kind), and graphed SDPA results reused like ``sdpa_cache``
        self.cuda_graph = cuda_graph
        self.graph_jobs: list[_GraphJob] = []
        self.graph_failures: dict[tuple[str, str, str], str] = {}
        self.graph_cache: dict = {}
        #: ``--graph-rounds``: the graphed timings of a case taken this many times, interleaved (ours, then
        #: each peer, per round), so that one process gives the spread of the ratios (``graph_rounds`` in a row)
        self.graph_rounds = max(1, int(graph_rounds))

    def pattern(self, key: tuple, build: Callable):
        """A pattern built once per run (e.g. one sliding window for both head dims): ``(pattern, build seconds)``."""
        if key not in self.patterns:
            t0 = time.perf_counter()
            self.patterns[key] = (build(), time.perf_counter() - t0)
        return self.patterns[key]

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def over_budget(self) -> bool:
        return self.budget is not None and self.elapsed() > self.budget

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def flex_fn(self):
        """``flex_attention`` (compiled with static shapes on CUDA; eager otherwise)."""
        from torch.nn.attention.flex_attention import flex_attention

        if not self.flex_compile:
            return flex_attention
        if self._flex is None:
            # every (shape, mask) is one compilation of the same function: lift dynamo's recompile
            # limit (8) so that later cases do not fall back to eager flex (L x L memory)
            for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(256, getattr(torch._dynamo.config, name)))
            self._flex = torch.compile(flex_attention, dynamic=False)
        return self._flex

    def block_mask(self, mask_mod, L: int):
        from torch.nn.attention.flex_attention import create_block_mask

        if self.flex_compile:
            return create_block_mask(mask_mod, B=None, H=None, Q_LEN=L, KV_LEN=L, device=self.device, _compile=True)
        return create_block_mask(mask_mod, B=None, H=None, Q_LEN=L, KV_LEN=L, device=self.device)


def _inputs(run: Run, B: int, L: int, H: int, D: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, go = (torch.randn(B, L, H, D, generator=g).to(run.device, run.dtype) for _ in range(4))
    return q, k, v, go


def _peer_layout(q, k, v, g, grad: bool = True):
    """BHLD tensors for the peers (their native layout), same values, leaves requiring grad."""
    qt, kt, vt = (t.transpose(1, 2).contiguous().requires_grad_(grad) for t in (q, k, v))
    return qt, kt, vt, g.transpose(1, 2).contiguous()


def _guarded(res: dict, name: str, fn: Callable[[], dict]) -> None:
    """Run one measurement; a failing implementation (or OOM) becomes an ``error`` entry."""
    try:
        res[name] = fn()
        print(f"  {name}: {_fmt(res[name])}", flush=True)
    except Exception as exc:  # a peer failing must not stop the benchmark
        res[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(f"  {name}: {res[name]['error']}", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _fmt(r: dict) -> str:
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    return f"fwd {f(r.get('fwd_ms'))} ms, fwd+bwd {f(r.get('fwd_bwd_ms'))} ms, peak {f(r.get('peak_extra_gib'))} GiB"


class _GraphJob(NamedTuple):
    """One implementation of a case to time again as CUDA-graph replays (``call is None``: an SDPA
    result reused from an earlier case, whose graphed result is taken from ``Run.graph_cache``)."""

    name: str
    call: Callable[[], torch.Tensor] | None
    grad_out: torch.Tensor | None
    params: list[torch.Tensor] | None
    backward: bool = True
    cache_key: tuple | None = None


def _measured(run: Run, res: dict, name: str, fwd: Callable[[], torch.Tensor], grad_out: torch.Tensor,
              params: list[torch.Tensor], backward: bool = True, cache_key: tuple | None = None) -> None:
    """:func:`measure` of one implementation under :func:`_guarded`; with ``run.cuda_graph`` an
    implementation that ran is also queued for the graph timings at the end of the case."""
    _guarded(res, name, lambda: measure(fwd, grad_out, params, backward=backward))
    if run.cuda_graph and "fwd_ms" in res[name]:
        run.graph_jobs.append(_GraphJob(name, fwd, grad_out, params, backward, cache_key))


def _fmt_graphed(r: dict) -> str:
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    if "error" in r:
        return r["error"]
    text = f"fwd {f(r.get('fwd_ms'))} ms, fwd+bwd {f(r.get('fwd_bwd_ms'))} ms (CUDA-graph replays)" if "fwd_ms" in r else ""
    if "not_capturable" in r:
        text += ("; " if text else "") + f"not capturable: {r['not_capturable']}"
    return text


def _graph_one(run: Run, row: dict, res: dict, job: _GraphJob) -> dict:
    """The graphed result of one queued implementation (never raises)."""
    case = row["case"]
    fail = (case, job.name)
    if fail + ("fwd",) in run.graph_failures:
        return {"timing": "cuda_graph", "not_capturable": run.graph_failures[fail + ("fwd",)],
                "not_retried": f"its forward capture failed in an earlier {case} case"}
    if job.call is None:  # defensive: the eager result was reused but no graphed result was kept
        return {"timing": "cuda_graph", "error": "reused eager result without a graphed result to reuse"}
    eager = res.get(job.name, {})
    slow = max(eager.get("fwd_ms") or 0.0, eager.get("fwd_bwd_ms") or 0.0) > GRAPH_SLOW_MS
    try:
        r = measure_graphed(job.call, job.grad_out, job.params, run.graph_failures.get(fail + ("fwd_bwd",)),
                            backward=job.backward, slow=slow,
                            not_retried=f"its forward + backward capture failed in an earlier {case} case")
    except Exception as exc:  # noqa: BLE001 - e.g. OOM in a warm-up call: recorded, the others still run
        r = {"timing": "cuda_graph", "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if "not_capturable" in r and "not_retried" not in r:
        phase = "fwd" if r.get("fwd_ms") is None else "fwd_bwd"
        run.graph_failures[fail + (phase,)] = f"({case} L={row.get('L')}) {r['not_capturable']}"
    return r


def _graph_phase(run: Run, row: dict, res: dict) -> None:
    """``--cuda-graph``, at the end of a case (after every eager timing, so that a failed capture cannot
    disturb them): mark the eager results' ``timing`` and time every queued implementation as graph
    replays, stored under ``<name>_graphed``; ours first, then SDPA, then the rest (the captures
    least likely to fail first). Without ``run.cuda_graph`` it only drops the queue."""
    jobs, run.graph_jobs = run.graph_jobs, []
    if not run.cuda_graph:
        return
    for r in res.values():
        if "fwd_ms" in r:
            r.setdefault("timing", "eager")

    def rank(job: _GraphJob) -> int:
        return 0 if job.name.startswith("ours") else 1 if job.name.startswith("sdpa") else 2

    for job in sorted(jobs, key=rank):
        key = f"{job.name}_graphed"
        if job.cache_key is not None and job.cache_key in run.graph_cache:
            res[key] = dict(run.graph_cache[job.cache_key], reused=True)
        else:
            res[key] = _graph_one(run, row, res, job)
            if job.cache_key is not None:
                run.graph_cache[job.cache_key] = res[key]
        print(f"  {key}: {_fmt_graphed(res[key])}", flush=True)
    if run.graph_rounds > 1:
        _graph_rounds(run, row, res, sorted(jobs, key=rank))
    row["cuda_graph_summary"] = _graph_summary(res)


def _graph_rounds(run: Run, row: dict, res: dict, jobs: list[_GraphJob]) -> None:
    """``--graph-rounds N``: time every graphed implementation of the case N - 1 more times, round by round
    (ours, then the peers, in each round), keep each one's times under ``<metric>_rounds`` and, per peer,
    the ratios ``peer / ours`` of each round with their min / median / max in ``row["graph_rounds"]``.
    Implementations whose graphed result was reused from an earlier case or did not capture are left out."""
    keep = [j for j in jobs if not res.get(f"{j.name}_graphed", {}).get("reused") and j.call is not None]
    for metric in ("fwd_ms", "fwd_bwd_ms"):
        for job in keep:
            r = res[f"{job.name}_graphed"]
            if r.get(metric) is not None:
                r[f"{metric}_rounds"] = [r[metric]]
    for _ in range(run.graph_rounds - 1):
        for job in keep:
            r = res[f"{job.name}_graphed"]
            again = _graph_one(run, row, res, job)
            for metric in ("fwd_ms", "fwd_bwd_ms"):
                if f"{metric}_rounds" in r:
                    r[f"{metric}_rounds"].append(again.get(metric))
    ours = res.get("ours_graphed", {})
    summary: dict = {"rounds": run.graph_rounds, "ratios": "peer / ours per round (> 1: ours is faster)"}
    for job in keep:
        if job.name.startswith("ours"):
            continue
        peer = res[f"{job.name}_graphed"]
        d: dict = {}
        for metric in ("fwd_ms", "fwd_bwd_ms"):
            a, b = ours.get(f"{metric}_rounds"), peer.get(f"{metric}_rounds")
            if not a or not b:
                continue
            ratios = [p / o for o, p in zip(a, b) if o and p]
            if ratios:
                srt = sorted(ratios)
                d[metric] = {"per_round": ratios, "min": srt[0], "median": srt[len(srt) // 2], "max": srt[-1]}
        if d:
            summary[job.name] = d
            for metric, m in d.items():
                print(f"  {job.name} / ours, {metric[:-3]}, {len(m['per_round'])} graphed rounds: min x{m['min']:.2f}, "
                      f"median x{m['median']:.2f}, max x{m['max']:.2f}", flush=True)
    row["graph_rounds"] = summary


def peer_graph_summary(res: dict, peer: str, extras: bool = False) -> dict:
    """For the benches of a layer against one peer (``routed``, ``neural_memory``): per metric, the peer's
    eager and graphed times (``<peer>_eager``, ``<peer>_graphed``) beside each result of ours (``ours_*``)
    eager and graphed, with the ratios peer eager / ours (> 1: ours is faster) ``speedup_eager`` and
    ``speedup_graphed`` (ours graphed); ``extras`` adds ``host_ms`` (eager - graphed: what the host's
    Python and launches add) and ``speedup_graphed_vs_graphed`` (both graphed)."""
    ref, ref_g = res.get(peer, {}), res.get(f"{peer}_graphed", {})
    out: dict = {}
    for metric in ("fwd_ms", "fwd_bwd_ms"):
        p, pg = ref.get(metric), ref_g.get(metric)
        m: dict = {f"{peer}_eager": p, f"{peer}_graphed": pg}
        for name, r in res.items():
            if not name.startswith("ours_") or name.endswith("_graphed") or r.get(metric) is None:
                continue
            e, g = r[metric], res.get(f"{name}_graphed", {}).get(metric)
            d: dict = {"eager": e, "graphed": g}
            if extras:
                d["host_ms"] = None if g is None else e - g
            if p is not None:
                d["speedup_eager"] = p / e
                d["speedup_graphed"] = None if g is None else p / g
            if extras and pg is not None and g is not None:
                d["speedup_graphed_vs_graphed"] = pg / g
            m[name] = d
        out[metric] = m
    return out


def peer_graph_part(name: str, d: dict) -> str:
    """The printed form of one result of ours in :func:`peer_graph_summary`."""
    e = f"eager {d['eager']:.2f} ms" + (f" x{d['speedup_eager']:.2f}" if "speedup_eager" in d else "")
    g = "graphed n/a" if d["graphed"] is None else f"graphed {d['graphed']:.2f} ms"
    g += f" x{d['speedup_graphed']:.2f}" if d.get("speedup_graphed") is not None else ""
    g += f", x{d['speedup_graphed_vs_graphed']:.2f} vs its graphed" if "speedup_graphed_vs_graphed" in d else ""
    g += f" (host {d['host_ms']:.2f} ms)" if d.get("host_ms") is not None else ""
    return f"{name} {e} | {g}"


def _graph_summary(res: dict) -> dict:
    """Per metric, every implementation's eager and graphed time; for the peers the ratios ``peer / ours``
    (> 1: ours is faster): ``speedup_eager`` (both eager), ``speedup_graphed`` (both graphed: the device
    work alone) and ``speedup_ours_graphed_vs_eager`` (ours graphed, the peer eager); for ours and its
    alternatives ``host_ms`` (eager - graphed: what the host's launch overhead added)."""
    out: dict = {"reference": "ours", "ratios": "peer / ours (> 1: ours is faster)"}
    for metric in ("fwd_ms", "fwd_bwd_ms"):
        ours_e, ours_g = res.get("ours", {}).get(metric), res.get("ours_graphed", {}).get(metric)
        m: dict = {}
        for name, r in res.items():
            if name.endswith("_graphed") or r.get(metric) is None:
                continue
            e, g = r[metric], res.get(f"{name}_graphed", {}).get(metric)
            d: dict = {"eager": e, "graphed": g}
            if name.startswith("ours"):
                d["host_ms"] = None if g is None else e - g
            else:
                d["speedup_eager"] = e / ours_e if ours_e else None
                d["speedup_graphed"] = g / ours_g if g and ours_g else None
                d["speedup_ours_graphed_vs_eager"] = e / ours_g if ours_g else None
            m[name] = d
        out[metric] = m
    return out


def _graph_summary_lines(row: dict) -> list[str]:
    """The printed form of ``cuda_graph_summary`` (one line per metric) and of each capture that failed."""
    s = row.get("cuda_graph_summary")
    if not s:
        return []

    def f(x, p=3):
        return "n/a" if x is None else f"{x:.{p}f}"

    lines = []
    for metric, label in (("fwd_bwd_ms", "fwd+bwd"), ("fwd_ms", "fwd")):
        parts = []
        for name, d in s[metric].items():
            if name.startswith("ours"):
                parts.append(f"{name} eager {f(d['eager'])} ms, graphed {f(d['graphed'])} ms")
            else:
                parts.append(f"{name} eager {f(d['eager'])} ms x{f(d['speedup_eager'], 2)}, graphed {f(d['graphed'])} ms "
                             f"x{f(d['speedup_graphed'], 2)} (ours graphed vs its eager x{f(d['speedup_ours_graphed_vs_eager'], 2)})")
        lines.append(f"  L={row.get('L')} {label}, CUDA graphs (x: peer / ours): " + " || ".join(parts))
    for name, r in row["results"].items():
        if name.endswith("_graphed") and ("not_capturable" in r or "error" in r):
            lines.append(f"  {name}: {_fmt_graphed(r)}")
    return lines


def _sdpa(run: Run, res: dict, name: str, causal: bool, q, k, v, g) -> None:
    """Dense SDPA, measured once per (causal, shape) in a run and reused by later cases."""
    key = (causal, tuple(q.shape), str(q.dtype))
    if key in run.sdpa_cache:
        res[name] = dict(run.sdpa_cache[key], reused=True)
        if run.cuda_graph:
            run.graph_jobs.append(_GraphJob(name, None, None, None, cache_key=("sdpa", *key)))
        return
    qt, kt, vt, gt = _peer_layout(q, k, v, g)
    _measured(run, res, name, lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal), gt, [qt, kt, vt],
              cache_key=("sdpa", *key))
    if "fwd_ms" in res[name]:
        run.sdpa_cache[key] = res[name]


def _flex(run: Run, res: dict, name: str, mask_mod, L: int, q, k, v, g, score_mod=None, extra_params=()) -> torch.Tensor | None:
    """FlexAttention on BHLD tensors (compiled mask build and kernel on CUDA), recorded under ``name``.

    Returns its output ``[B, L, H, D]`` on the same values (for the agreement check), computed like
    the timed forward calls so that no recompilation is needed, or ``None`` on failure.
    """
    qt, kt, vt, gt = _peer_layout(q, k, v, g, grad=run.cuda)  # no CPU backward: inputs must not require grad there
    try:
        t0 = time.perf_counter()
        bm = run.block_mask(mask_mod, L)
        build_s = time.perf_counter() - t0
        flex = run.flex_fn()
    except Exception as exc:
        res[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(f"  {name}: {res[name]['error']}", flush=True)
        return None
    # FlexAttention has no backward on the CPU: forward only there
    _measured(run, res, name, lambda: flex(qt, kt, vt, score_mod=score_mod, block_mask=bm), gt, [qt, kt, vt, *extra_params],
              backward=run.cuda)
    res[name]["mask_build_s"] = build_s
    if "fwd_ms" not in res[name]:
        return None
    with torch.no_grad():
        return flex(qt, kt, vt, score_mod=score_mod, block_mask=bm).transpose(1, 2)


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _rate_and_ratios(row: dict, res: dict, computed_pairs: int, allowed_pairs: int, B: int, H: int, D: int) -> dict:
    """TFLOP/s (forward: 4 D flops per pair; forward+backward: 3.5x that) and speed-ups vs each peer."""
    flops_computed = 4 * B * H * D * computed_pairs
    flops_allowed = 4 * B * H * D * allowed_pairs
    for name, r in res.items():
        if r.get("fwd_ms"):
            ours = name.startswith("ours")
            fb = r.get("fwd_bwd_ms")
            r["fwd_tflops_computed"] = flops_computed / (r["fwd_ms"] * 1e-3) / 1e12 if ours else None
            r["fwd_bwd_tflops_computed"] = 3.5 * flops_computed / (fb * 1e-3) / 1e12 if ours and fb else None
            r["fwd_tflops_allowed"] = flops_allowed / (r["fwd_ms"] * 1e-3) / 1e12
            r["fwd_bwd_tflops_allowed"] = 3.5 * flops_allowed / (fb * 1e-3) / 1e12 if fb else None
    # peer / ours: ours eager vs each eager peer (``speedup_*_vs_PEER``); with --cuda-graph also ours graphed
    # vs each peer, graphed (``speedup_*_graphed_vs_PEER_graphed``: the device work alone) and eager
    # (``speedup_*_graphed_vs_PEER``)
    for ours_name, suffix in (("ours", ""), ("ours_graphed", "_graphed")):
        ours = res.get(ours_name, {})
        if not ours.get("fwd_ms"):
            continue
        for name, r in res.items():
            if name.startswith("ours") or not r.get("fwd_ms") or (not suffix and name.endswith("_graphed")):
                continue
            row[f"speedup_fwd{suffix}_vs_{name}"] = r["fwd_ms"] / ours["fwd_ms"]
            if r.get("fwd_bwd_ms") and ours.get("fwd_bwd_ms"):
                row[f"speedup_fwd_bwd{suffix}_vs_{name}"] = r["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
    row["results"] = res
    return row


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------
# cases


def sliding_window_case(L: int, W: int, D: int, H: int = 16, B: int = 1, dtype=torch.bfloat16, peers=("sdpa", "flex"),
                        blocks: tuple[tuple[int, int], ...] = ((128, 64),), run: Run | None = None) -> dict:
    """Causal sliding window ``i - W < j <= i``: ours vs Flex (compiled mask build) vs dense causal SDPA."""
    from mnemotorch.ops.block_sparse import block_sparse_attention, sliding_window_pattern, swa_triton

    run = run or Run("cuda", peers, dtype=dtype)
    q, k, v, g = _inputs(run, B, L, H, D)
    pattern, build_s = run.pattern(("swa", L, W, *blocks[0]), lambda: sliding_window_pattern(
        L, W, q_block=blocks[0][0], k_block=blocks[0][1], device=run.device))
    row = {"case": "sliding_window", "L": L, "W": W, "D": D, "H": H, "B": B, "dtype": _dtype_name(run.dtype),
           "pattern_build_s": build_s, "computed_pairs": pattern.computed_pairs(), "allowed_pairs": pattern.allowed_pairs()}
    res: dict = {}
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    _measured(run, res, "ours", lambda: block_sparse_attention(qs, ks, vs, pattern, backend="triton"), g, [qs, ks, vs])
    res["ours"]["blocks"] = list(blocks[0])
    res["ours"]["kernels"] = swa_triton.kernels_used(q, k, v, D**-0.5)  # what the list-free path runs for these inputs
    for qb_, kb_ in blocks[1:]:  # other pattern tile sizes, ours only
        alt, _ = run.pattern(("swa", L, W, qb_, kb_), lambda: sliding_window_pattern(L, W, q_block=qb_, k_block=kb_, device=run.device))
        name = f"ours_{qb_}x{kb_}"
        _measured(run, res, name, lambda alt=alt: block_sparse_attention(qs, ks, vs, alt, backend="triton"), g, [qs, ks, vs])
        res[name]["blocks"] = [qb_, kb_]
    if "sdpa" in run.peers:
        _sdpa(run, res, "sdpa_dense_causal", True, q, k, v, g)
    if "flex" in run.peers:
        def swa(b, h, qi, ki):
            return (qi >= ki) & (qi - ki < W)

        theirs = _flex(run, res, "flex", swa, L, q, k, v, g)
        if theirs is not None:
            with torch.no_grad():
                row["rel_diff_vs_flex"] = _rel_diff(block_sparse_attention(q, k, v, pattern, backend="triton"), theirs)
    _graph_phase(run, row, res)
    return _rate_and_ratios(row, res, row["computed_pairs"], row["allowed_pairs"], B, H, D)


def neighborhood_case(shape: tuple[int, ...], kernel_size: int, D: int, H: int, B: int = 1, dtype=torch.bfloat16,
                      tile_shape=None, peers=("sdpa", "flex"), q_block=None, k_block=None, alternatives=(),
                      run: Run | None = None) -> dict:
    """NATTEN-semantics neighborhood attention (non-causal, dilation 1) in 1-D or 2-D.

    Ours runs on tokens permuted into tiles (2-D) and the timing includes the permutation of q/k/v and
    the inverse permutation of the output, as a module on row-major tokens pays it. In 2-D,
    ``ours_na2d_fast`` is the list-free NA-2D kernel (``na2d_triton``) on the row-major tokens, with
    its own computed pairs (``computed_pairs`` there) and ratios ``speedup_*_ours_na2d_fast_vs_<peer>``; without tiles
    (``tile_shape=None``, e.g. 1-D) the permutation is the identity and is skipped. Flex runs on
    row-major tokens with the same mask; SDPA is dense (non-causal) attention over all tokens.
    ``alternatives``: other ``(tile_shape, q_block, k_block)`` timed for ours only.
    """
    from mnemotorch.ops.block_sparse import block_sparse_attention, neighborhood_pattern, swa_triton

    run = run or Run("cuda", peers, dtype=dtype)
    L = 1
    for n in shape:
        L *= n
    q, k, v, g = _inputs(run, B, L, H, D)
    t0 = time.perf_counter()
    pp = neighborhood_pattern(tuple(shape), kernel_size, tile_shape=tile_shape, q_block=q_block, k_block=k_block, device=run.device)
    pp = type(pp)(pp.pattern, pp.perm.to(run.device), pp.inv_perm.to(run.device))
    build_s = time.perf_counter() - t0
    pat = pp.pattern
    row = {"case": f"neighborhood_{len(shape)}d", "shape": list(shape), "kernel_size": kernel_size, "L": L, "D": D, "H": H, "B": B,
           "tile_shape": list(tile_shape) if tile_shape else None, "dtype": _dtype_name(run.dtype),
           "pattern_build_s": build_s, "computed_pairs": pat.computed_pairs(), "allowed_pairs": pat.allowed_pairs()}
    res: dict = {}
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))

    def ours():
        if tile_shape is None:  # row-major tokens (identity permutation): nothing to permute
            return block_sparse_attention(qs, ks, vs, pat, backend="triton")
        return pp.unpermute(block_sparse_attention(pp.permute(qs), pp.permute(ks), pp.permute(vs), pat, backend="triton"))

    _measured(run, res, "ours", ours, g, [qs, ks, vs])
    res["ours"]["blocks"] = [pat.q_block, pat.k_block]
    if len(shape) == 1:
        res["ours"]["kernels"] = swa_triton.kernels_used(q, k, v, D**-0.5, na1d=True)
    for alt_tile, alt_q, alt_k in alternatives:
        alt = neighborhood_pattern(tuple(shape), kernel_size, tile_shape=alt_tile, q_block=alt_q, k_block=alt_k, device=run.device)
        alt = type(alt)(alt.pattern, alt.perm.to(run.device), alt.inv_perm.to(run.device))
        name = f"ours_tile{'x'.join(map(str, alt_tile or ()))}_{alt.pattern.q_block}x{alt.pattern.k_block}"

        def ours_alt(alt=alt, alt_tile=alt_tile):
            if alt_tile is None:
                return block_sparse_attention(qs, ks, vs, alt.pattern, backend="triton")
            return alt.unpermute(block_sparse_attention(alt.permute(qs), alt.permute(ks), alt.permute(vs), alt.pattern, backend="triton"))

        _measured(run, res, name, ours_alt, g, [qs, ks, vs])
        res[name]["computed_pairs"] = alt.pattern.computed_pairs()
    fast_pairs = None
    if len(shape) == 2:  # the list-free NA-2D kernels on row-major tokens (no permutation to pay)
        from mnemotorch.ops.block_sparse import na2d_triton

        fast_pairs = na2d_triton.computed_pairs(tuple(shape), (kernel_size, kernel_size),
                                                na2d_triton.launch_config("fwd", D, run.dtype))
        _measured(run, res, "ours_na2d_fast", lambda: na2d_triton.na2d_attention_triton(qs, ks, vs, tuple(shape), kernel_size),
                  g, [qs, ks, vs])
        res["ours_na2d_fast"]["computed_pairs"] = fast_pairs
        res["ours_na2d_fast"]["launch"] = {kd: na2d_triton.launch_config(kd, D, run.dtype) for kd in ("fwd", "dkdv", "dq")}
    if "sdpa" in run.peers:
        _sdpa(run, res, "sdpa_dense", False, q, k, v, g)
    if "flex" in run.peers:
        K = kernel_size
        if len(shape) == 1:
            def mask_mod(b, h, qi, ki):
                start = torch.clamp(qi - K // 2, 0, L - K)
                return (ki >= start) & (ki < start + K)
        else:
            R, C = shape

            def mask_mod(b, h, qi, ki):
                qy, qx, ky, kx = qi // C, qi % C, ki // C, ki % C
                sy = torch.clamp(qy - K // 2, 0, R - K)
                sx = torch.clamp(qx - K // 2, 0, C - K)
                return (ky >= sy) & (ky < sy + K) & (kx >= sx) & (kx < sx + K)
        theirs = _flex(run, res, "flex_row_major", mask_mod, L, q, k, v, g)
        if theirs is not None:
            with torch.no_grad():
                mine = pp.unpermute(block_sparse_attention(pp.permute(q), pp.permute(k), pp.permute(v), pat, backend="triton"))
                row["rel_diff_vs_flex"] = _rel_diff(mine, theirs)
                if "fwd_ms" in res.get("ours_na2d_fast", {}):
                    fast = na2d_triton.na2d_attention_triton(q, k, v, tuple(shape), kernel_size)
                    row["rel_diff_ours_na2d_fast_vs_flex"] = _rel_diff(fast, theirs)
    _graph_phase(run, row, res)
    row = _rate_and_ratios(row, res, row["computed_pairs"], row["allowed_pairs"], B, H, D)
    if fast_pairs is not None:
        _alt_rate_and_ratios(row, res, "ours_na2d_fast", fast_pairs, B, H, D)
    return row


def _alt_rate_and_ratios(row: dict, res: dict, name: str, computed_pairs: int, B: int, H: int, D: int) -> None:
    """For one of ours that computes other pairs than ``ours`` (its own kernel, not a launch variant):
    its TFLOP/s on the pairs it computes, and ``speedup_{fwd,fwd_bwd}[_graphed]_<name>_vs_<peer>``
    (peer / it, > 1: it is faster) against every peer, as ``_rate_and_ratios`` does for ``ours``."""
    flops = 4 * B * H * D * computed_pairs
    for key in (name, f"{name}_graphed"):
        r = res.get(key, {})
        if r.get("fwd_ms"):
            r["fwd_tflops_computed"] = flops / (r["fwd_ms"] * 1e-3) / 1e12
            fb = r.get("fwd_bwd_ms")
            r["fwd_bwd_tflops_computed"] = 3.5 * flops / (fb * 1e-3) / 1e12 if fb else None
    for ours_name, suffix in ((name, ""), (f"{name}_graphed", "_graphed")):
        ours = res.get(ours_name, {})
        if not ours.get("fwd_ms"):
            continue
        for peer, r in res.items():
            if peer.startswith("ours") or not r.get("fwd_ms") or (not suffix and peer.endswith("_graphed")):
                continue
            row[f"speedup_fwd{suffix}_{name}_vs_{peer}"] = r["fwd_ms"] / ours["fwd_ms"]
            if r.get("fwd_bwd_ms") and ours.get("fwd_bwd_ms"):
                row[f"speedup_fwd_bwd{suffix}_{name}_vs_{peer}"] = r["fwd_bwd_ms"] / ours["fwd_bwd_ms"]


def power_case(L: int, D: int = 128, H: int = 16, B: int = 1, dtype=torch.bfloat16, block_size: int = 256,
               window_blocks: int = 5, sink_blocks: int = 1, peers=("sdpa",), run: Run | None = None) -> dict:
    """PowerAttention (paper setting: 256-token blocks, 5 window blocks, 1 sink block) vs dense causal SDPA."""
    from mnemotorch.ops.block_sparse import block_sparse_attention, power_pattern

    run = run or Run("cuda", peers, dtype=dtype)
    q, k, v, g = _inputs(run, B, L, H, D)
    t0 = time.perf_counter()
    pat = power_pattern(L, block_size, window_blocks, sink_blocks, device=run.device)
    build_s = time.perf_counter() - t0
    row = {"case": "power", "L": L, "D": D, "H": H, "B": B, "block_size": block_size, "window_blocks": window_blocks,
           "sink_blocks": sink_blocks, "dtype": _dtype_name(run.dtype), "pattern_build_s": build_s,
           "computed_pairs": pat.computed_pairs(), "allowed_pairs": pat.allowed_pairs()}
    res: dict = {}
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    _measured(run, res, "ours", lambda: block_sparse_attention(qs, ks, vs, pat, backend="triton"), g, [qs, ks, vs])
    if "sdpa" in run.peers:
        _sdpa(run, res, "sdpa_dense_causal", True, q, k, v, g)
    _graph_phase(run, row, res)
    return _rate_and_ratios(row, res, row["computed_pairs"], row["allowed_pairs"], B, H, D)


def bias_case(L: int, W: int, D: int, H: int = 16, B: int = 1, run: Run | None = None) -> dict:
    """Sliding window with a learned per-head relative-position table ``[H, W]`` (distances 0 .. W-1):
    ours with the bias (table gradient included) vs ours without it vs Flex with a ``score_mod``."""
    from mnemotorch.ops.block_sparse import block_sparse_attention, relative_bias_1d, sliding_window_pattern

    run = run or Run("cuda")
    q, k, v, g = _inputs(run, B, L, H, D)
    pattern, _ = run.pattern(("swa", L, W, 128, 64), lambda: sliding_window_pattern(L, W, device=run.device))
    table = (0.1 * torch.randn(H, W, generator=torch.Generator().manual_seed(5))).to(run.device).requires_grad_()
    row = {"case": "sliding_window_bias", "L": L, "W": W, "D": D, "H": H, "B": B, "dtype": _dtype_name(run.dtype),
           "table": [H, W], "computed_pairs": pattern.computed_pairs(), "allowed_pairs": pattern.allowed_pairs()}
    res: dict = {}
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    bias = relative_bias_1d(table, L, min_offset=-(W - 1)).to(run.device)
    _measured(run, res, "ours", lambda: block_sparse_attention(qs, ks, vs, pattern, backend="triton", bias=bias), g, [qs, ks, vs, table])
    _measured(run, res, "ours_no_bias", lambda: block_sparse_attention(qs, ks, vs, pattern, backend="triton"), g, [qs, ks, vs])
    if "flex" in run.peers:
        def swa(b, h, qi, ki):
            return (qi >= ki) & (qi - ki < W)

        def score_mod(score, b, h, qi, ki):
            return score + table[h, torch.clamp(ki - qi + W - 1, 0, W - 1)]

        theirs = _flex(run, res, "flex_score_mod", swa, L, q, k, v, g, score_mod=score_mod, extra_params=(table,))
        if theirs is not None:
            with torch.no_grad():
                row["rel_diff_vs_flex"] = _rel_diff(block_sparse_attention(q, k, v, pattern, backend="triton", bias=bias), theirs)
    _graph_phase(run, row, res)
    return _rate_and_ratios(row, res, row["computed_pairs"], row["allowed_pairs"], B, H, D)


def correctness_case(L: int, W: int, D: int, H: int = 4, HKV: int = 2, dtype=torch.bfloat16, device: str = "cuda",
                     with_bias: bool = False) -> dict:
    """Kernel vs float64 reference, outputs and gradients (with a per-head bias table when asked)."""
    from mnemotorch.ops.block_sparse import (
        block_sparse_attention,
        block_sparse_attention_reference,
        relative_bias_1d,
        sliding_window_pattern,
    )

    gen = torch.Generator().manual_seed(1)
    pat = sliding_window_pattern(L, W, device=device)
    leaves = [torch.randn(2, L, H, D, generator=gen), torch.randn(2, L, HKV, D, generator=gen), torch.randn(2, L, HKV, D, generator=gen)]
    if with_bias:
        leaves.append(torch.randn(H, W, generator=gen))
    ins = [t.to(device, dtype).requires_grad_() for t in leaves]
    ins64 = [t.detach().double().requires_grad_() for t in ins]

    def bias(t):
        return relative_bias_1d(t[0], L, min_offset=-(W - 1)) if t else None

    out = block_sparse_attention(*ins[:3], pat, backend="triton", bias=bias(ins[3:]))
    g = torch.randn(out.shape, generator=gen).to(device, dtype)
    grads = torch.autograd.grad(out, ins, g)
    ref = block_sparse_attention_reference(*ins64[:3], pat, bias=bias(ins64[3:]))
    rgrads = torch.autograd.grad(ref, ins64, g.double())

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    row = {"L": L, "W": W, "D": D, "H": H, "HKV": HKV, "dtype": _dtype_name(dtype), "bias": with_bias, "out": rel(out, ref),
           "dq": rel(grads[0], rgrads[0]), "dk": rel(grads[1], rgrads[1]), "dv": rel(grads[2], rgrads[2]),
           "nan": bool(any(torch.isnan(t).any() for t in (out, *grads)))}
    if with_bias:
        row["dtable"] = rel(grads[3], rgrads[3])
    return row


def _line(row: dict) -> str:
    r = row["results"]
    o = r.get("ours", {})

    def f(x, p=3):
        return "-" if x is None else f"{x:.{p}f}"

    line = f"{row['case']} L={row['L']} D={row['D']}" + (f" W={row['W']}" if "W" in row else "")
    if "fwd_ms" in o:
        line += f": ours {f(o['fwd_ms'])}/{f(o.get('fwd_bwd_ms'))} ms ({f(o.get('fwd_tflops_computed'), 0)}/" \
                f"{f(o.get('fwd_bwd_tflops_computed'), 0)} TF/s computed, peak {f(o.get('peak_extra_gib'), 2)} GiB)"
    for peer, x in r.items():
        if peer == "ours" or peer.endswith("_graphed"):  # graphed results: the summary lines below
            continue
        if "fwd_ms" in x and not peer.startswith("ours"):
            sf, sfb = row.get(f"speedup_fwd_vs_{peer}"), row.get(f"speedup_fwd_bwd_vs_{peer}")
            line += f" | {peer} {f(x['fwd_ms'])}/{f(x.get('fwd_bwd_ms'))} ms peak {f(x.get('peak_extra_gib'), 2)} x{f(sf, 2)}/x{f(sfb, 2)}"
        elif "fwd_ms" in x:
            line += f" | {peer} {f(x['fwd_ms'])}/{f(x.get('fwd_bwd_ms'))} ms"
        else:
            line += f" | {peer} {x}"
    return "\n".join([line, *_graph_summary_lines(row)])


# ---------------------------------------------------------------------------------------------
# the command

#: sizes of ``--tiny`` (every case end to end in seconds, also under Triton's CPU interpreter)
TINY = {
    "swa": {"lengths": [128, 256], "windows": [32, 64], "dims": [32, 16], "H": 2},
    "na1d": {"shape": (256,), "kernel": 32, "D": 32, "H": 1, "alternatives": ((None, 64, 64),)},
    "na2d": {"shape": (16, 16), "kernel": 5, "D": 32, "H": 2, "tile": (8, 8), "alternatives": (((8, 16), 128, 64),)},
    "power": {"lengths": [256, 512], "block_size": 16, "D": 32, "H": 2},
    "bias": {"L": 128, "W": 32, "D": 32, "H": 2},
    "correctness": [(100, 30, 32, torch.float32, False), (100, 30, 32, torch.float32, True)],
}
#: kernel-vs-float64 checks after the speed cases: (L, W, D, dtype, with a bias table)
FULL_CORRECTNESS = [(1000, 300, 64, torch.float32, False), (1000, 300, 64, torch.bfloat16, False),
                    (2048, 512, 128, torch.bfloat16, False), (2048, 512, 128, torch.bfloat16, True)]
CASE_KINDS = ("swa", "na1d", "na2d", "power", "bias")


def _jobs(args, run: Run, blocks) -> list[tuple[str, Callable[[], dict]]]:
    """The selected cases in run order: the first sliding-window (W, D) at every L, then na1d, na2d,
    power, the other sliding-window cases, bias."""
    kinds = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in kinds:
        if c not in CASE_KINDS:
            raise SystemExit(f"--cases: unknown case {c!r}; choose from {','.join(CASE_KINDS)}")
    tiny = args.tiny
    if args.quick:
        return [("swa", lambda: sliding_window_case(4096, 1024, 64, blocks=blocks, run=run))]
    first: list = []
    rest: list = []
    if "swa" in kinds:
        if tiny:
            Ls, Ws, Ds, H = TINY["swa"]["lengths"], TINY["swa"]["windows"], TINY["swa"]["dims"], TINY["swa"]["H"]
        else:
            Ls, Ws, Ds = (list(map(int, x.split(","))) for x in (args.lengths, args.windows, args.dims))
            H = 16
        for D in Ds:
            for W in Ws:
                for L in Ls:
                    job = ("swa", lambda L=L, W=W, D=D: sliding_window_case(L, W, D, H=H, blocks=blocks, run=run))
                    (first if (W, D) == (Ws[0], Ds[0]) else rest).append(job)
    if "na1d" in kinds:  # the case: L = 32K, kernel 2048, D = 128, H = 1
        c = TINY["na1d"] if tiny else {"shape": (32768,), "kernel": 2048, "D": 128, "H": 1, "alternatives": ((None, 128, 128),)}
        alts = c["alternatives"] if run.alternatives else ()
        first.append(("na1d", lambda c=c, alts=alts: neighborhood_case(c["shape"], c["kernel"], c["D"], c["H"], alternatives=alts, run=run)))
    if "na2d" in kinds:  # 128 x 128 tokens, kernel 13 x 13, D = 64, H = 16; tiles of 8 x 8 tokens
        c = TINY["na2d"] if tiny else {"shape": (128, 128), "kernel": 13, "D": 64, "H": 16, "tile": (8, 8),
                                       "alternatives": (((16, 8), 128, 64), ((8, 16), 128, 64))}
        alts = c["alternatives"] if run.alternatives else ()
        first.append(("na2d", lambda c=c, alts=alts: neighborhood_case(c["shape"], c["kernel"], c["D"], c["H"], tile_shape=c["tile"],
                                                                       q_block=64, k_block=64, alternatives=alts, run=run)))
    if "power" in kinds:
        if tiny:
            c = TINY["power"]
            for L in c["lengths"]:
                first.append(("power", lambda L=L, c=c: power_case(L, c["D"], c["H"], block_size=c["block_size"], run=run)))
        else:
            for L in map(int, args.power_lengths.split(",")):
                first.append(("power", lambda L=L: power_case(L, run=run)))
    jobs = first + rest
    if "bias" in kinds:
        c = TINY["bias"] if tiny else {"L": 16384, "W": 1024, "D": 128, "H": 16}
        jobs.append(("bias", lambda c=c: bias_case(c["L"], c["W"], c["D"], c["H"], run=run)))
    return jobs


def build_parser() -> argparse.ArgumentParser:
    """The options of ``mnemo bench kernels``."""
    ap = argparse.ArgumentParser(prog="mnemo bench kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="block_sparse_bench.json", help="JSON report, rewritten after every case")
    ap.add_argument("--quick", action="store_true", help="one small sliding-window case (GPU)")
    ap.add_argument("--tiny", action="store_true", help="every selected case at tiny sizes (smoke test; runs on the CPU too)")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto: cuda when available (cpu needs --tiny)")
    ap.add_argument("--cases", default="swa,na1d,na2d,power", help="comma list of " + ", ".join(CASE_KINDS))
    ap.add_argument("--lengths", default="16384,65536", help="sliding window: sequence lengths")
    ap.add_argument("--windows", default="1024,4096", help="sliding window: window sizes (the first runs early)")
    ap.add_argument("--dims", default="128,64", help="sliding window: head dims (the first runs early)")
    ap.add_argument("--blocks", default="128x64", help="sliding window: pattern tiles QxK; extra entries are timed for ours only")
    ap.add_argument("--power-lengths", default="65536,131072")
    ap.add_argument("--alternatives", action="store_true", help="also time other tile shapes of the neighborhood cases (ours only)")
    ap.add_argument("--skip-correctness", action="store_true", help="no kernel-vs-float64 checks (they run after the speed cases)")
    ap.add_argument("--correctness-dtypes", default="float32,bfloat16", help="dtypes of the kernel-vs-float64 checks")
    ap.add_argument("--peers", default="sdpa,flex")
    ap.add_argument("--flex-compile", default="auto", choices=("auto", "on", "off"), help="auto: compiled on CUDA, eager on the CPU")
    ap.add_argument("--autotune", default="small", choices=("full", "small", "off"),
                    help="kernel launch-parameter search on the GPU: full (6 configs per kernel), small (2), off (fixed)")
    ap.add_argument("--time-budget", type=float, default=None, help="start no new case (or check) after this many seconds")
    ap.add_argument("--graph-rounds", type=int, default=1,
                    help="with --cuda-graph: take each case's graphed timings this many times, interleaved, and record the "
                    "spread of the ratios to each peer (graph_rounds in the row)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="CUDA only: also time every implementation that ran, fwd and fwd+bwd, as CUDA-graph replays of one "
                    "captured call (<name>_graphed: no host launch overhead; 'not_capturable' with the reason if its capture "
                    "fails), beside the eager timings; each result records its 'timing'. A no-op with a note on the CPU")
    return ap


def main(argv: list[str] | None = None) -> int:
    """``mnemo bench kernels -- [--cases swa,na1d,na2d,power,bias] [--tiny|--quick] [--out F] ...``."""
    args = build_parser().parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device", file=sys.stderr)
        return 2
    if device == "cpu":
        if not args.tiny:
            print("block_sparse benchmark: full sizes need a CUDA device; use --tiny for a CPU smoke run", file=sys.stderr)
            return 2
        if os.environ.get("TRITON_INTERPRET") != "1":
            # The kernels run in Triton's interpreter, which must be switched on before triton is
            # imported (importing mnemotorch already did): rerun this command in a fresh process.
            env = dict(os.environ, TRITON_INTERPRET="1")
            cmd = [sys.executable, "-m", "mnemotorch.bench.block_sparse", *(argv if argv is not None else sys.argv[1:])]
            return subprocess.run(cmd, env=env).returncode
    from mnemotorch.ops.block_sparse import triton as bs_triton

    bs_triton.set_autotune(args.autotune)
    torch.backends.cuda.matmul.allow_tf32 = False
    flex_compile = device == "cuda" if args.flex_compile == "auto" else args.flex_compile == "on"
    # bf16 on the GPU; fp32 on the CPU (the interpreter's bf16 is unreliable and the CPU is slow at it)
    cuda_graph = args.cuda_graph and device == "cuda"
    run = Run(device, tuple(p for p in args.peers.split(",") if p), flex_compile, args.time_budget, args.alternatives,
              dtype=torch.bfloat16 if device == "cuda" else torch.float32, cuda_graph=cuda_graph,
              graph_rounds=args.graph_rounds)
    report = {"env": device_info(), "argv": list(argv or []), "device": device, "autotune": args.autotune,
              "flex_compiled": flex_compile, "time_budget_s": args.time_budget, "cuda_graph": cuda_graph,
              "correctness": [], "speed": [], "skipped": []}
    if device == "cpu":
        report["note"] = "CPU smoke run: kernels in Triton's interpreter, wall-clock times, FlexAttention forward only"
    if args.cuda_graph and not cuda_graph:
        report["cuda_graph_note"] = "--cuda-graph ignored: CUDA graphs need CUDA (this is a CPU run); eager timings only"
        print(report["cuda_graph_note"], flush=True)
    if cuda_graph:
        report["timing_modes"] = TIMING_MODES

    def save():
        report["elapsed_s"] = run.elapsed()
        report["tuned_configs"] = bs_triton.tuned_configs()
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    blocks = tuple(tuple(int(x) for x in b.split("x")) for b in args.blocks.split(","))
    for kind, job in _jobs(args, run, blocks):
        if run.over_budget():
            report["skipped"].append(kind)
            continue
        t0 = time.perf_counter()
        run.graph_jobs.clear()  # nothing queued by a case that raised carries over
        try:
            row = job()
        except Exception as exc:  # record and go on
            row = {"case": kind, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            print(row, flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        row["seconds"] = time.perf_counter() - t0
        report["speed"].append(row)
        if "results" in row:
            print(_line(row), f"[{row['seconds']:.0f}s, total {run.elapsed():.0f}s]", flush=True)
        save()
    if not args.skip_correctness:
        checks = TINY["correctness"] if args.tiny else FULL_CORRECTNESS
        dtypes = args.correctness_dtypes.split(",")
        checks = [c for c in checks if _dtype_name(c[3]) in dtypes]
        for (L, W, D, dtype, with_bias) in checks:
            if run.over_budget():
                report["skipped"].append(f"correctness L={L} {_dtype_name(dtype)} bias={with_bias}")
                continue
            t0 = time.perf_counter()
            try:
                c = correctness_case(L, W, D, dtype=dtype, device=device, with_bias=with_bias)
            except Exception as exc:
                c = {"L": L, "dtype": _dtype_name(dtype), "bias": with_bias, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            c["seconds"] = time.perf_counter() - t0
            report["correctness"].append(c)
            print("correctness", c, flush=True)
            save()
    if report["skipped"]:
        print(f"time budget reached; not run: {report['skipped']}", flush=True)
    save()
    print(f"wrote {args.out} ({run.elapsed():.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
