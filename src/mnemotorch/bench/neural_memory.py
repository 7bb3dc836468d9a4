"""Speed of the Titans neural long-term memory (issue #5): layer vs titans-pytorch, MAG model, decoding.

Three cases (``--cases``, comma list):

* ``lmm`` -- the ``titans_lmm`` mixer as a full layer (q/k/v/gate/output projections, convs, the
  memory), ``B = 1``, forward and forward + backward (gradients of the input and every parameter),
  median ms and peak memory above the inputs, against titans-pytorch's ``NeuralMemory`` built and
  called as in the peer anchors (``NeuralMemory(dim=dim, chunk_size=C, heads=H, dim_head=dim // H)``,
  cast to the dtype, ``mem(x)[0]``) on the same input and output gradient. Ours runs in two
  configurations: ``matched`` -- the peer's default memory (2-layer MLP, hidden ``4·d_head``, GELU,
  ``x + LN(f(x))``, no gradient clipping, unbounded η) -- and ``default`` (``TitansLMM``'s own
  defaults). Both configurations, the peer's and the code path ours ran (the chunked dual form,
  segments per call, Triton module present or not, torch.compile or not) go into the JSON.
  titans-pytorch is optional: without it its entry is ``{"skipped": reason}``.
* ``mag_model`` -- tokens/s of a training step (forward + loss + backward) of a ``MnemoForCausalLM``
  with a ``titans_mag`` layer plan under autocast, and of baseline plans of the same size.
* ``decode`` -- per-token latency of ``titans_lmm`` / ``titans_mag`` models after prefilling
  contexts of several lengths (a bounded state: the latency should not grow with the context).

``--compile`` also runs each configuration with the memory's per-chunk step ``torch.compile``'d
(``TitansLMM(compile_memory=...)``, ``ours_<config>_compiled``; ``--compile-mode``, ``--compile-backend``,
``--compile-only``): the first forward and first forward + backward (the compilations) are timed
apart from the medians (``first_fwd_s``, ``first_fwd_bwd_s``), and the speedup over the eager layer
is recorded. The compiled step is cached per process and its shapes do not depend on ``L``: only
the first row of a configuration (``compiled_in_this_row``) pays the compilation. Example on the GPU::

    mnemo bench memory -- --cases lmm --configs matched --lengths 4096,16384 --compile --warmup 2 --rep 5

``--cuda-graph`` (lmm case, CUDA only; a no-op with a note on the CPU): after the eager timings of a
length, each of ours that ran (eager, ``--compile``'d and, with ``--fused``, the fused kernel's layer) and titans-pytorch are timed again, forward
and forward + backward, as CUDA-graph replays of one captured call (``bench.block_sparse.graph_ms``
via ``measure_graphed``: warm-up on a side stream, capture in a private pool, the gradients of the
inputs the backward reaches returned by ``torch.autograd.grad``), under ``<name>_graphed``, or
recorded as ``not_capturable`` with the reason (not retried at the later lengths). The replays leave
out the host's Python and per-kernel launch overhead, which the eager timings charge: for our
launch-bound chunk loop they give the device time of the same work. Each result says its ``timing``
(``TIMING_MODES``, also in the report); ``speedup_*_vs_titans_pytorch`` sets every timing of ours
against the peer's eager one (``..._vs_titans_pytorch_graphed``: against its graphed one), and
``cuda_graph_summary`` (also printed) lists eager, graphed and ``host_ms`` per result of ours.

``--profile`` adds a ``torch.profiler`` breakdown of our layer's forward + backward at the first
length: the top ops, ops (and CUDA kernels) per chunk, kernel time vs wall time.

Every case also runs on the CPU at tiny sizes: ``mnemo bench memory -- --device cpu --quick``
(the tests do). On the GPU: ``mnemo bench memory -- --out memory.json``. Spec anchors
(``specs/neural-memory.md``): titans-pytorch takes 62 ms forward + backward at ``L = 16K``,
``dim = 1024``, 16 heads, chunk 64 (H100, bf16); the target for ours is at most 12 ms.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
import time
from typing import Callable

import torch

from .block_sparse import (GRAPH_SLOW_MS, TIMING_MODES, device_info, graph_ms, measure_graphed, median_ms, peer_graph_part,
                           peer_graph_summary, wall_median_ms)

CASES = ("lmm", "mag_model", "decode")
PEERS = ("titans_pytorch",)
DTYPES = ("bfloat16", "float16", "float32")

#: Spec anchors (specs/neural-memory.md): H100, bf16, B = 1, dim 1024, 16 heads, chunk 64, L = 16K.
SPEC = {"titans_pytorch_fwd_bwd_ms": 62.0, "target_ours_fwd_bwd_ms": 12.0, "L": 16384, "dim": 1024, "heads": 16, "chunk_size": 64}

#: titans-pytorch 0.5.5's default memory, as ``NeuralMemory(dim, chunk_size, heads, dim_head)`` builds it.
PEER_DEFAULT_MEMORY = {
    "model": "ResidualNorm(MemoryMLP(dim_head, depth=2, expansion_factor=4.0))",
    "depth": 2,
    "hidden": "4 * dim_head",
    "activation": "gelu",
    "form": "M(x) = x + LN(W_2 gelu(W_1 x)) * (gamma + 1), LN affine-free, gamma a memory parameter (init 0, updated at test time)",
    "biases": False,
    "update": "gradients of every chunk at the learned initial weights (no batch_size): no sequential dependency "
    "between chunks; momentum (order 1) and decay by an associative scan over chunks; adaptive step per token, "
    "momentum and decay gates per chunk",
    "max_grad_norm": None,
    "extras": "pre-RMSNorm on the stored and retrieved sequences, per-head retrieve gate, no q/k/v convs, "
    "q/k/v linear without activation",
}

#: Our configurations of ``titans_lmm`` (kwargs on top of dim, heads, chunk_size).
OUR_CONFIGS: dict[str, dict] = {
    # the peer's memory architecture and update rule bounds
    "matched": {"depth": 2, "expansion": 4, "activation": "gelu", "residual": True, "layer_norm": True, "max_grad_norm": None, "max_momentum": 1.0},
    # TitansLMM's own defaults
    "default": {},
}

#: Sizes of the full run and of ``--quick`` (tiny: the CPU tests use them). Explicit options win.
FULL = {
    "lengths": [4096, 16384], "dim": 1024, "heads": 16, "chunk_size": 64, "configs": ["matched", "default"],
    "mag_length": 4096, "mag_hidden": 512, "mag_heads": 8, "mag_layers": 6, "mag_window": 512, "vocab": 32000,
    "mag_baselines": ["attention", "sliding_window"],
    "decode_contexts": [1024, 4096, 16384], "decode_steps": 32, "decode_plans": ["titans_lmm", "titans_mag"],
    "warmup": 5, "rep": 20,
}
QUICK = {
    "lengths": [64], "dim": 32, "heads": 2, "chunk_size": 16, "configs": ["matched", "default"],
    "mag_length": 64, "mag_hidden": 32, "mag_heads": 2, "mag_layers": 1, "mag_window": 16, "vocab": 257,
    "mag_baselines": ["sliding_window"],
    "decode_contexts": [16, 48], "decode_steps": 3, "decode_plans": ["titans_lmm", "titans_mag"],
    "warmup": 1, "rep": 2,
}

_MIXERS_FOR_PLANS = ("attention", "sliding_window", "titans_lmm", "titans_mag", "titans_mal", "titans_mac")


# ---------------------------------------------------------------------------------------------
# timing (CUDA: block_sparse.median_ms, CUDA events; CPU: wall clock)
# ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 5, rep: int = 20) -> float:
    """Median time of ``fn`` in ms: CUDA events on a GPU (``block_sparse.median_ms``), wall clock on the CPU."""
    if device.type == "cuda":
        return median_ms(fn, warmup, rep)
    return wall_median_ms(fn, warmup, rep)


def _peak_start(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_gib(device: torch.device, base: int) -> float | None:
    if device.type != "cuda":
        return None  # no allocator statistics on the CPU
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30


def _guard(fn: Callable[[], dict], device: torch.device) -> dict:
    """Run one measurement; an out-of-memory or a failing implementation becomes an ``error`` entry."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"error": "oom"}
    except Exception as exc:  # a failing implementation must not stop the benchmark
        return {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}


def measure_layer(fwd: Callable[[], torch.Tensor], inputs: list[torch.Tensor], grad_out: torch.Tensor, device: torch.device,
                  warmup: int, rep: int, used: list[bool] | None = None) -> dict:
    """Forward (no grad) and forward + backward (gradients of ``inputs``) median ms; peak extra GiB of one fwd+bwd.

    ``used`` (a list): filled with one flag per input, whether the backward reached it (a peer may hold
    parameters its forward does not use; the CUDA-graph timing differentiates only the used ones)."""

    def fwd_bwd():
        return torch.autograd.grad(fwd(), inputs, grad_out, allow_unused=True)

    with torch.no_grad():
        t_f = time_ms(fwd, device, warmup, rep)
    grads = fwd_bwd()  # warm-up: autotuning / allocator growth stay out of the peak reading
    if used is not None:
        used[:] = [g is not None for g in grads]
    del grads
    base = _peak_start(device)
    fwd_bwd()
    peak = _peak_gib(device, base)
    t_fb = time_ms(fwd_bwd, device, warmup, rep)
    return {"fwd_ms": t_f, "fwd_bwd_ms": t_fb, "peak_extra_gib": peak}


# ---------------------------------------------------------------------------------------------
# case 1: the LMM layer vs titans-pytorch
# ---------------------------------------------------------------------------------------------
def load_peer(name: str = "titans_pytorch"):
    """``(NeuralMemory class, version)`` of titans-pytorch, or ``(None, reason)`` when it cannot be imported."""
    if importlib.util.find_spec(name) is None:
        return None, f"{name} not installed"
    try:
        module = importlib.import_module(name)
        cls = module.NeuralMemory
    except Exception as exc:  # installed but a dependency is missing or broken
        return None, f"{name} not importable ({type(exc).__name__}: {str(exc)[:200]})"
    return cls, _installed_version(name) or getattr(module, "__version__", None)


def _installed_version(name: str) -> str | None:
    """The installed distribution's version (``titans_pytorch`` -> ``titans-pytorch``), or None."""
    try:
        from importlib.metadata import version

        return version(name.replace("_", "-"))
    except Exception:
        return None


def build_ours(dim: int, heads: int, chunk_size: int, config: str, device: torch.device, dtype: torch.dtype):
    from mnemotorch.layers.titans import TitansLMM

    return TitansLMM(dim, heads, chunk_size=chunk_size, **OUR_CONFIGS[config]).to(device=device, dtype=dtype)


def our_config_record(layer) -> dict:
    """The resolved configuration of a ``TitansLMM`` (what the JSON records)."""
    return {
        "depth": layer.depth, "expansion": layer.expansion, "hidden": layer.expansion * layer.head_dim,
        "activation": layer.activation, "residual": layer.residual, "layer_norm": layer.layer_norm,
        "form": ("M(x) = " + ("x + " if layer.residual else "") + ("LN(f(x))" if layer.layer_norm else "f(x)")
                 + f", f = {layer.depth}-layer MLP ({layer.activation}), no biases"),
        "chunk_size": layer.chunk_size, "conv_size": layer.conv_size, "output_gate": layer.output_gate,
        "max_lr": layer.max_lr, "max_momentum": layer.max_momentum, "max_grad_norm": layer.max_grad_norm,
        "memory_shapes": [list(s) for s in layer.memory_shapes], "memory_params_per_head": layer.params_per_head,
        "parameters": sum(p.numel() for p in layer.parameters()),
    }


def peer_config_record(mem) -> dict:
    """The peer instance's memory model as built (checked against :data:`PEER_DEFAULT_MEMORY`)."""
    rec = dict(PEER_DEFAULT_MEMORY)
    model = getattr(mem, "memory_model", None)
    if model is not None:  # what this version actually built (the defaults above are 0.5.5's)
        rec["memory_model_repr"] = " ".join(repr(model).split())
        rec["memory_parameters"] = {n: list(p.shape) for n, p in model.named_parameters()}
    for name in ("init_weight_shape", "chunk_size", "heads", "max_grad_norm"):
        if hasattr(mem, name):
            value = getattr(mem, name)
            rec[name] = [list(v) for v in value] if name == "init_weight_shape" else value
    rec["parameters"] = sum(p.numel() for p in mem.parameters())
    return rec


def code_path_compile_record(comp) -> dict | bool:
    """``compile_memory`` as JSON: the normalised ``torch.compile`` options, or False (eager)."""
    from mnemotorch.ops.memory import compile_options

    opts = compile_options(comp)
    return {k: (v if isinstance(v, (str, type(None), dict)) else repr(v)) for k, v in opts.items()} if opts else False


def code_path(layer, x: torch.Tensor) -> dict:
    """Which implementation our layer's forward runs: counts calls of the chunked and the recurrent
    memory functions and of the per-segment step during one forward (wrapped for this call only)."""
    import mnemotorch.ops.memory as mem_ops
    from mnemotorch.ops.memory import chunked

    calls = {"neural_memory_chunked": 0, "neural_memory_reference": 0, "segments": 0, "partial_segments": 0, "full_chunk_steps": 0}
    originals = (mem_ops.neural_memory_chunked, mem_ops.neural_memory_reference, chunked._segment, chunked._full_chunk_stepper)

    def counting(name, fn, also=None):
        def wrapper(*a, **k):
            calls[name] += 1
            if also:
                calls[also] += 1
            return fn(*a, **k)
        return wrapper

    def counting_stepper(*a, **k):  # the full-chunk step (eager or compiled) that the loop calls
        return counting("full_chunk_steps", originals[3](*a, **k), "segments")

    mem_ops.neural_memory_chunked = counting("neural_memory_chunked", originals[0])
    mem_ops.neural_memory_reference = counting("neural_memory_reference", originals[1])
    chunked._segment = counting("partial_segments", originals[2], "segments")
    chunked._full_chunk_stepper = counting_stepper
    try:
        with torch.no_grad():
            layer(x)
    finally:
        mem_ops.neural_memory_chunked, mem_ops.neural_memory_reference, chunked._segment, chunked._full_chunk_stepper = originals
    compiled = chunked.compile_options(getattr(layer, "compile_memory", False))
    if calls["neural_memory_chunked"]:
        path = ("mnemotorch.ops.memory.chunked.neural_memory_chunked (dual form, a Python loop over chunks; "
                + ("each full chunk's step torch.compile'd, partial segments eager)" if compiled else "plain PyTorch ops)"))
    elif calls["neural_memory_reference"]:
        path = "mnemotorch.ops.memory.reference.neural_memory_reference (token loop)"
    else:
        path = "unknown"
    return {
        "memory_function": path,
        "calls": calls,
        "segments_per_forward": calls["segments"],
        # a GPU-specific path would live in ops/memory/triton.py (ARCHITECTURE.md); neural_memory has no backend for it yet
        "triton_module": importlib.util.find_spec("mnemotorch.ops.memory.triton") is not None,
        # the full-chunk step through torch.compile(fullgraph=True, dynamic=False, **these options), or False (eager)
        "torch_compile": code_path_compile_record(getattr(layer, "compile_memory", False)),
        "autocast_inside_memory": False,  # neural_memory disables autocast; the recurrence runs in float32 for half inputs
    }


def lmm_flops_fwd(L: int, dim: int, heads: int, chunk_size: int, shapes: list[tuple[int, int]], batch: int = 1) -> dict:
    """Matmul FLOPs of one ``titans_lmm`` forward (chunked dual form), an analytic count.

    Per chunk of ``c`` tokens, head and memory layer ``(d_in, d_out)``: the keys' forward ``X W``, the
    backward ``Δ W^T`` (layers after the first), the read ``X̂ [W|S]``, ``X̂ X^T`` and ``(G∘·) Δ``, and
    the state update ``[gX|nX]^T Δ``; plus ``A [N|m]`` per chunk and the layer's projections.
    """
    full, rest = divmod(L, chunk_size)
    memory = 0
    for c, n in ((chunk_size, full), (rest, 1 if rest else 0)):
        per = 2 * c * c * (c + 1)
        for i, (din, dout) in enumerate(shapes):
            per += 2 * c * din * dout * (1 + (1 if i else 0) + 2) + 2 * c * c * (din + dout) + 2 * (2 * din) * c * dout
        memory += n * per
    memory *= heads * batch
    projections = 2 * batch * L * dim * (3 * dim + 3 * heads + 2 * dim)  # q/k/v, gates, output gate, output
    return {"memory": memory, "projections": projections, "total": memory + projections}


def first_calls(layer, x: torch.Tensor, inputs: list[torch.Tensor], grad_out: torch.Tensor, device: torch.device) -> dict:
    """Wall seconds of the first forward (no grad) and the first forward + backward: with ``compile_memory``
    these compile the inference and the training graph of the chunk step (kept out of the medians)."""
    out = {}
    for name, grad in (("first_fwd_s", False), ("first_fwd_bwd_s", True)):
        _sync(device)
        t0 = time.perf_counter()
        if grad:
            torch.autograd.grad(layer(x)[0], inputs, grad_out, allow_unused=True)
        else:
            with torch.no_grad():
                layer(x)
        _sync(device)
        out[name] = time.perf_counter() - t0
    return out


def _graphed(call: Callable[[], torch.Tensor], grad_out: torch.Tensor, params: list[torch.Tensor], skip_fwd_bwd: str | None,
             slow: bool) -> dict:
    """Forward and forward + backward ms of CUDA-graph replays of ``call``: ``bench.block_sparse.measure_graphed``
    (see there) timed with this module's ``graph_ms`` (which the CPU tests replace by a stand-in)."""
    return measure_graphed(call, grad_out, params, skip_fwd_bwd, slow=slow, timer=graph_ms,
                           not_retried="its forward + backward capture failed at a shorter length")


def _graph_phase(L: int, res: dict, jobs: list[tuple[str, Callable[[], torch.Tensor], list[torch.Tensor], list[str]]],
                 grad_out: torch.Tensor, device: torch.device, graph_failures: dict[str, str]) -> None:
    """``--cuda-graph``, after every eager timing of the row (so that a failed capture cannot disturb them):
    each job ``(name, call, params, unused)`` is timed as CUDA-graph replays of one captured call and stored
    under ``<name>_graphed``. ``params``: the inputs the backward reaches (``unused``: the names of those
    left out). A capture that failed at an earlier length (``graph_failures``, keys ``name:fwd`` /
    ``name:fwd_bwd``) is not tried again; its reason is repeated."""
    for r in res.values():
        if "fwd_ms" in r:
            r.setdefault("timing", "eager")
    for name, call, params, unused in jobs:
        key = f"{name}_graphed"
        if f"{name}:fwd" in graph_failures:
            res[key] = {"timing": "cuda_graph", "not_capturable": graph_failures[f"{name}:fwd"],
                        "not_retried": "its forward capture failed at a shorter length"}
            continue
        eager = res.get(name, {})
        slow = max(eager.get("fwd_ms") or 0.0, eager.get("fwd_bwd_ms") or 0.0) > GRAPH_SLOW_MS
        r = _guard(lambda: _graphed(call, grad_out, params, graph_failures.get(f"{name}:fwd_bwd"), slow), device)
        r.setdefault("timing", "cuda_graph")
        r["replays"] = {"warmup": 1, "rep": 5} if slow else {"warmup": 3, "rep": 20}
        r["grad_inputs"] = len(params)
        if unused:
            r["inputs_without_grad"] = unused  # never reached by the backward (the eager timing's allow_unused)
        if "not_capturable" in r and "not_retried" not in r:
            phase = "fwd" if r.get("fwd_ms") is None else "fwd_bwd"
            graph_failures[f"{name}:{phase}"] = f"(L={L}) {r['not_capturable']}"
        res[key] = r
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _graph_summary(res: dict) -> dict:
    """Per metric: titans-pytorch's eager (and graphed) time beside each of ours eager and graphed, with
    ``host_ms`` and the ratios ``titans-pytorch / ours`` (> 1: ours is faster): ``speedup_eager`` (both
    eager), ``speedup_graphed`` (ours graphed vs the peer eager) and ``speedup_graphed_vs_graphed`` (both
    graphed); see :func:`~mnemotorch.bench.block_sparse.peer_graph_summary`."""
    return {"reference": "titans_pytorch, eager", "ratios": "titans_pytorch / ours (> 1: ours is faster)",
            **peer_graph_summary(res, "titans_pytorch", extras=True)}


def _graph_summary_lines(row: dict) -> list[str]:
    """The printed form of ``cuda_graph_summary`` (one line per metric) and of each capture that failed."""
    s = row.get("cuda_graph_summary")
    if not s:
        return []

    def f(x, p=2):
        return "n/a" if x is None else f"{x:.{p}f}"

    lines = []
    for metric, label in (("fwd_bwd_ms", "fwd+bwd"), ("fwd_ms", "fwd")):
        m = s[metric]
        parts = [f"titans_pytorch eager {f(m['titans_pytorch_eager'])} ms, graphed {f(m['titans_pytorch_graphed'])} ms"]
        parts += [peer_graph_part(name, d) for name, d in m.items() if name.startswith("ours_")]
        lines.append(f"  L={row['L']} {label}, CUDA graphs (x: titans_pytorch eager / ours): " + " || ".join(parts))
    for name, r in row["results"].items():
        if name.endswith("_graphed") and ("not_capturable" in r or "error" in r):
            lines.append(f"  {name}: " + (f"not capturable: {r['not_capturable']}" if "not_capturable" in r else r["error"]))
    return lines


def _ratios(res: dict, chunks: int) -> None:
    """``speedup_*_vs_<peer>`` of every result of ours (eager, compiled, graphed) against titans-pytorch's
    eager timing and, with ``--cuda-graph``, its graphed one (``..._vs_titans_pytorch_graphed``): peer / ours."""
    for peer_name in ("titans_pytorch", "titans_pytorch_graphed"):
        peer = res.get(peer_name, {})
        if peer.get("fwd_ms") is None:
            continue
        for name, ours in res.items():
            if not name.startswith("ours") or ours.get("fwd_ms") is None:
                continue
            ours[f"speedup_fwd_vs_{peer_name}"] = peer["fwd_ms"] / ours["fwd_ms"]
            if peer.get("fwd_bwd_ms") is not None and ours.get("fwd_bwd_ms") is not None:
                ours[f"speedup_fwd_bwd_vs_{peer_name}"] = peer["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
            if ours.get("peak_extra_gib") is not None and peer.get("peak_extra_gib") is not None:
                ours[f"memory_ratio_vs_{peer_name}"] = peer["peak_extra_gib"] / max(ours["peak_extra_gib"], 1e-9)
    for name, ours in res.items():
        if name.startswith("ours") and ours.get("fwd_bwd_ms") is not None:
            ours["fwd_bwd_ms_per_chunk"] = ours["fwd_bwd_ms"] / chunks


def lmm_case(L: int, dim: int, heads: int, chunk_size: int, configs: list[str], peers: tuple[str, ...], device: torch.device,
             dtype: torch.dtype, batch: int = 1, warmup: int = 5, rep: int = 20, compile_memory: bool | str | dict | None = None,
             eager: bool = True, cuda_graph: bool = False, graph_failures: dict[str, str] | None = None, fused: bool = False) -> dict:
    """Our ``titans_lmm`` layer (each configuration) and titans-pytorch on the same ``x [B, L, dim]`` and output gradient.

    ``compile_memory`` (not None/False): each configuration also runs with the memory's chunk step
    ``torch.compile``'d (``ours_<config>_compiled``), its first calls (the compilation) timed apart from
    the medians; ``eager=False`` skips the eager runs.

    ``cuda_graph`` (CUDA only; the caller checks): after every eager timing of the row, each of ours
    that ran (eager and compiled) and titans-pytorch are timed again, forward and forward + backward, as
    CUDA-graph replays of one captured call (``<name>_graphed``, or ``not_capturable`` with the reason;
    ``graph_failures`` carries failed captures to the next lengths, where they are not retried). Every
    result then says its ``timing`` (``TIMING_MODES``) and the row has a ``cuda_graph_summary``.

    ``fused`` (CUDA only; the caller checks): each configuration with the fused kernel
    (``MNEMO_MEMORY_FUSED=1``, ``ops/memory/fused_triton.py``) as ``ours_<config>_fused``: the inference
    forward (``fwd_ms``, no grad), its first call apart (``first_call_s``) and its output's relative RMS
    difference from the chunked path's; then training (``fwd_bwd_ms``, ``peak_extra_gib``, the first
    forward + backward apart, the backward's phases and the input gradient's difference from the
    chunked path's); see :func:`fused_forward`.
    """
    graph_failures = {} if graph_failures is None else graph_failures
    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(batch, L, dim, generator=g).to(device=device, dtype=dtype)
    go = torch.randn(batch, L, dim, generator=g).to(device=device, dtype=dtype)
    row: dict = {"case": "lmm", "L": L, "dim": dim, "heads": heads, "head_dim": dim // heads, "chunk_size": chunk_size, "B": batch,
                 "dtype": str(dtype).replace("torch.", ""), "chunks": math.ceil(L / chunk_size), "results": {}}
    res = row["results"]
    # (name, call, inputs the backward reaches, names of those it does not) of the CUDA-graph timings
    graph_jobs: list[tuple[str, Callable[[], torch.Tensor], list[torch.Tensor], list[str]]] = []

    def graph_job(name: str, call: Callable[[], torch.Tensor], names: list[str], inputs: list[torch.Tensor], used: list[bool]) -> None:
        if cuda_graph and "fwd_ms" in res[name] and len(used) == len(inputs):
            graph_jobs.append((name, call, [t for t, u in zip(inputs, used) if u], [n for n, u in zip(names, used) if not u]))

    variants = ([(False, "")] if eager else []) + ([(compile_memory, "_compiled")] if compile_memory not in (None, False) else [])
    for config in configs:
        for comp, suffix in variants:
            torch.manual_seed(0)
            layer = build_ours(dim, heads, chunk_size, config, device, dtype)
            layer.compile_memory = comp
            x = x0.clone().requires_grad_()
            inputs = [x, *layer.parameters()]
            used: list[bool] = []

            def run(layer=layer, x=x, inputs=inputs, comp=comp, used=used):
                from mnemotorch.ops.memory import chunked

                cached = len(chunked._COMPILED_STEPS)
                first = first_calls(layer, x, inputs, go, device) if comp else {}
                if comp:  # the chunk step's shapes do not depend on L: a later length reuses the graphs
                    first["compiled_in_this_row"] = len(chunked._COMPILED_STEPS) > cached
                return {**measure_layer(lambda: layer(x)[0], inputs, go, device, warmup, rep, used), **first}

            name = f"ours_{config}{suffix}"
            r = _guard(run, device)
            r["config"] = our_config_record(layer)
            r["compile_memory"] = code_path_compile_record(comp)
            flops = lmm_flops_fwd(L, dim, heads, chunk_size, layer.memory_shapes, batch)
            r["flops_fwd"] = flops
            if "fwd_ms" in r:  # the memory's matmuls run in float32 (tf32 per --tf32), the projections in the layer dtype
                r["fwd_tflops"] = flops["total"] / (r["fwd_ms"] * 1e-3) / 1e12
            res[name] = r
            graph_job(name, lambda layer=layer, x=x: layer(x)[0], ["x", *(n for n, _ in layer.named_parameters())], inputs, used)
            del layer, x, inputs
        if fused:
            fjob: list = []  # (call, names, inputs, used) of the fused layer's CUDA-graph timing, filled by fused_forward
            res[f"ours_{config}_fused"] = _guard(lambda config=config, fjob=fjob: fused_forward(config, dim, heads, chunk_size, x0, device, dtype,
                                                                                                 warmup, rep, graph=fjob if cuda_graph else None),
                                                 device)  # fmt: skip
            if fjob:
                graph_job(f"ours_{config}_fused", *fjob)
        e, c = res.get(f"ours_{config}", {}), res.get(f"ours_{config}_compiled", {})
        if "fwd_ms" in e and "fwd_ms" in c:
            c["speedup_fwd_vs_eager"] = e["fwd_ms"] / c["fwd_ms"]
            c["speedup_fwd_bwd_vs_eager"] = e["fwd_bwd_ms"] / c["fwd_bwd_ms"]
    if "titans_pytorch" in peers:
        cls, info = load_peer()
        if cls is None:
            res["titans_pytorch"] = {"skipped": info}
        else:
            peer_used: list[bool] = []
            peer_job: list = []

            def run_peer():
                torch.manual_seed(0)
                mem = cls(dim=dim, chunk_size=chunk_size, heads=heads, dim_head=dim // heads).to(device).to(dtype)
                xp = x0.clone().requires_grad_()
                inputs = [xp, *mem.parameters()]
                peer_job[:] = [lambda: mem(xp)[0], ["x", *(n for n, _ in mem.named_parameters())], inputs]
                r = measure_layer(lambda: mem(xp)[0], inputs, go, device, warmup, rep, peer_used)
                r["config"] = peer_config_record(mem)
                r["version"] = info
                return r

            res["titans_pytorch"] = _guard(run_peer, device)
            if peer_job:
                graph_job("titans_pytorch", *peer_job, peer_used)
    if cuda_graph:
        # ours first (eager, then compiled), the peer last: a failed capture is what could disturb what follows
        _graph_phase(L, res, graph_jobs, go, device, graph_failures)
        graph_jobs.clear()
        row["cuda_graph_summary"] = _graph_summary(res)
    _ratios(res, row["chunks"])
    if (L, dim, heads, chunk_size) == (SPEC["L"], SPEC["dim"], SPEC["heads"], SPEC["chunk_size"]):
        row["spec"] = dict(SPEC)
        ours = res.get("ours_matched", {})
        if "fwd_bwd_ms" in ours:
            row["meets_target"] = ours["fwd_bwd_ms"] <= SPEC["target_ours_fwd_bwd_ms"]
        if cuda_graph:  # the device work alone, per result of ours that has a forward + backward
            row["meets_target_by_result"] = {n: r["fwd_bwd_ms"] <= SPEC["target_ours_fwd_bwd_ms"] for n, r in res.items()
                                             if n.startswith("ours_") and r.get("fwd_bwd_ms") is not None}
    return row


def fused_forward(config: str, dim: int, heads: int, chunk_size: int, x: torch.Tensor, device: torch.device, dtype: torch.dtype,
                  warmup: int, rep: int, train: bool = True, graph: list | None = None) -> dict:
    """The layer with ``MNEMO_MEMORY_FUSED=1`` (the fused kernel) against the same layer without it.

    Inference (no grad): ``fwd_ms``, ``first_call_s`` (the kernel's compilation), ``rel_rms_vs_chunked``.
    ``train``: ``fwd_bwd_ms`` and ``peak_extra_gib`` (:func:`measure_layer`, gradients of ``x`` and the
    parameters), ``first_fwd_bwd_s`` (the sweep step's ``torch.compile`` included), ``bwd_phases_ms`` (one
    backward's CUDA-event phases, ``fused_triton.BACKWARD["timing"]``) and ``rel_grad_x_vs_chunked`` (the
    input gradient against the chunked path's, same output gradient).
    ``graph`` (a list, with ``train``): filled with ``(call, names, inputs, used)`` for the row's CUDA-graph
    timing (``--cuda-graph``): the warmed-up layer with ``fused_memory`` set, so the capture does not depend on
    the environment variable."""
    from mnemotorch.ops.memory import fused_triton

    torch.manual_seed(0)
    layer = build_ours(dim, heads, chunk_size, config, device, dtype)
    prev = os.environ.get("MNEMO_MEMORY_FUSED")
    out: dict = {"inference": True}
    try:
        with torch.no_grad():
            os.environ["MNEMO_MEMORY_FUSED"] = "0"
            y0 = layer(x)[0].double()
            os.environ["MNEMO_MEMORY_FUSED"] = "1"
            _sync(device)
            t0 = time.perf_counter()
            y1 = layer(x)[0].double()
            _sync(device)
            out["first_call_s"] = time.perf_counter() - t0
            out["rel_rms_vs_chunked"] = ((y1 - y0).norm() / y0.norm()).item()
            out["fwd_ms"] = time_ms(lambda: layer(x), device, warmup, rep)
        if train:
            g = torch.Generator(device="cpu").manual_seed(1)
            go = torch.randn(x.shape, generator=g).to(device=device, dtype=x.dtype)
            xg = x.clone().requires_grad_()
            inputs = [xg, *layer.parameters()]
            os.environ["MNEMO_MEMORY_FUSED"] = "0"
            (gx0,) = torch.autograd.grad(layer(xg)[0], [xg], go)
            os.environ["MNEMO_MEMORY_FUSED"] = "1"
            _sync(device)
            t0 = time.perf_counter()
            (gx1,) = torch.autograd.grad(layer(xg)[0], [xg], go)
            _sync(device)
            out["first_fwd_bwd_s"] = time.perf_counter() - t0
            out["rel_grad_x_vs_chunked"] = ((gx1.double() - gx0.double()).norm() / gx0.double().norm()).item()
            del gx0, gx1
            phases: dict = {}
            fused_triton.BACKWARD["timing"] = phases
            try:
                torch.autograd.grad(layer(xg)[0], inputs, go)
            finally:
                fused_triton.BACKWARD["timing"] = None
            out["bwd_phases_ms"] = phases
            used: list[bool] = []
            timed = measure_layer(lambda: layer(xg)[0], inputs, go, device, warmup, rep, used)
            out["fwd_bwd_ms"], out["peak_extra_gib"] = timed["fwd_bwd_ms"], timed["peak_extra_gib"]
            out["inference"] = False
            out["backward_settings"] = {k: (v if k != "timing" else None) for k, v in fused_triton.BACKWARD.items()}
            if graph is not None:
                layer.fused_memory = True
                graph[:] = [lambda: layer(xg)[0], ["x", *(n for n, _ in layer.named_parameters())], inputs, used]
    finally:
        if prev is None:
            os.environ.pop("MNEMO_MEMORY_FUSED", None)
        else:
            os.environ["MNEMO_MEMORY_FUSED"] = prev
    out["config"] = our_config_record(layer)
    return out


# ---------------------------------------------------------------------------------------------
# profiler breakdown of our layer
# ---------------------------------------------------------------------------------------------
# Aten ops that launch no kernel themselves (metadata, or composites whose copies show up as children).
_NO_KERNEL = {
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::_reshape_alias", "aten::transpose", "aten::t", "aten::permute",
    "aten::slice", "aten::select", "aten::narrow", "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::expand_as",
    "aten::as_strided", "aten::split", "aten::split_with_sizes", "aten::unbind", "aten::unflatten", "aten::flatten",
    "aten::alias", "aten::detach", "aten::detach_", "aten::lift_fresh", "aten::view_as", "aten::chunk", "aten::empty",
    "aten::empty_strided", "aten::empty_like", "aten::resize_", "aten::result_type", "aten::contiguous", "aten::numpy_T",
    "aten::is_nonzero", "aten::set_", "aten::to", "aten::_to_copy", "aten::resolve_conj", "aten::resolve_neg",
    "aten::_has_compatible_shallow_copy_type", "aten::is_same_size", "aten::stride", "aten::size",
}


def _kernel_ops(events) -> list:
    """Aten ops that launch a kernel: not metadata-only, and no aten op below them does (the innermost op
    doing the work: ``aten::mm`` under ``aten::matmul``, ``aten::copy_`` under ``aten::clone``)."""
    below: dict[int, bool] = {}  # id -> this op or one below it launches a kernel
    own: dict[int, bool] = {}  # id -> this op is the innermost one that launches it

    def launches(e) -> bool:
        key = id(e)
        if key not in below:
            sub = any([launches(c) for c in getattr(e, "cpu_children", []) if c.name.startswith("aten::")])  # all children, memoised
            own[key] = not sub and e.name not in _NO_KERNEL
            below[key] = sub or own[key]
        return below[key]

    aten = [e for e in events if e.name.startswith("aten::") and str(getattr(e, "device_type", "CPU")).endswith("CPU")]
    for e in aten:
        launches(e)
    return [e for e in aten if own[id(e)]]


def _evt_time(e, *names: str) -> float:
    for n in names:
        if hasattr(e, n):
            return float(getattr(e, n))
    return 0.0


def profile_layer(layer, x: torch.Tensor, grad_out: torch.Tensor, device: torch.device, chunks: int, top: int = 15) -> dict:
    """``torch.profiler`` over one forward (no grad) and one forward + backward of ``layer``.

    Per phase: wall ms; *leaf* aten ops that launch a kernel (the CPU's estimate of GPU launches;
    view/metadata ops excluded) in total and per chunk; on CUDA the real kernel count and summed
    kernel time (kernel time ≪ wall time means launch-bound); the top ops by self time.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    params = [x, *layer.parameters()]

    def fwd():
        with torch.no_grad():
            layer(x)

    def fwd_bwd():
        torch.autograd.grad(layer(x)[0], params, grad_out, allow_unused=True)

    out: dict = {"chunks": chunks}
    for name, warm in (("first_fwd_s", fwd), ("first_fwd_bwd_s", fwd_bwd)):
        # warm-up of both graphs, timed (with a compiled memory: the compilations, kept out of the profile)
        _sync(device)
        t0 = time.perf_counter()
        warm()
        _sync(device)
        out[name] = time.perf_counter() - t0
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for phase, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            fn()
            _sync(device)
        wall = (time.perf_counter() - t0) * 1e3
        events = list(prof.events())
        leaf_kernel_ops = _kernel_ops(events)
        top_level = [e for e in events if e.name.startswith("aten::") and getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU
                     and not (getattr(e, "cpu_parent", None) is not None and e.cpu_parent.name.startswith("aten::"))]
        rec = {
            "wall_ms_profiled": wall,
            "aten_top_level_ops": len(top_level),
            "aten_kernel_ops": len(leaf_kernel_ops),
            "aten_kernel_ops_per_chunk": len(leaf_kernel_ops) / chunks,
        }
        if device.type == "cuda":
            kernels = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA]
            k_ms = sum(_evt_time(e, "device_time_total", "cuda_time_total") for e in kernels) / 1e3
            rec.update({"cuda_kernels": len(kernels), "cuda_kernels_per_chunk": len(kernels) / chunks, "cuda_kernel_ms": k_ms,
                        "kernel_busy_fraction": k_ms / wall if wall else None})
        sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = []
        for a in prof.key_averages():
            table.append({
                "name": a.key, "count": a.count,
                "self_cpu_ms": _evt_time(a, "self_cpu_time_total") / 1e3,
                "self_device_ms": _evt_time(a, "self_device_time_total", "self_cuda_time_total") / 1e3 if device.type == "cuda" else None,
            })
        key = "self_device_ms" if device.type == "cuda" else "self_cpu_ms"
        table.sort(key=lambda r: -(r[key] or 0.0))
        rec["sort"] = sort_key
        rec["top_ops"] = table[:top]
        leaf_counts: dict[str, int] = {}
        for e in leaf_kernel_ops:
            leaf_counts[e.name] = leaf_counts.get(e.name, 0) + 1
        rec["kernel_ops_by_name_per_chunk"] = {k: round(v / chunks, 2) for k, v in sorted(leaf_counts.items(), key=lambda kv: -kv[1])[:top]}
        out[phase] = rec
    return out


def profile_case(L: int, dim: int, heads: int, chunk_size: int, config: str, device: torch.device, dtype: torch.dtype, top: int = 15,
                 compile_memory: bool | str | dict | None = None) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    torch.manual_seed(0)
    layer = build_ours(dim, heads, chunk_size, config, device, dtype)
    layer.compile_memory = compile_memory or False
    x = torch.randn(1, L, dim, generator=g).to(device=device, dtype=dtype).requires_grad_()
    go = torch.randn(1, L, dim, generator=g).to(device=device, dtype=dtype)
    row = {"case": "profile", "L": L, "dim": dim, "heads": heads, "chunk_size": chunk_size, "config": config,
           "dtype": str(dtype).replace("torch.", ""), "compile_memory": code_path_compile_record(compile_memory), "code_path": code_path(layer, x.detach())}
    row.update(profile_layer(layer, x, go, device, math.ceil(L / chunk_size), top))
    return row


# ---------------------------------------------------------------------------------------------
# case 2: MAG model training throughput
# ---------------------------------------------------------------------------------------------
def _plan_spec(name: str, window: int, chunk_size: int) -> dict:
    """The layer spec of a one-mixer plan: the window and memory chunk size where the mixer takes them."""
    spec: dict = {"type": name}
    if name in ("titans_mag", "titans_mal", "sliding_window"):
        spec["window"] = window
    if name in ("titans_lmm", "titans_mag", "titans_mal"):
        spec["chunk_size"] = chunk_size
    if name == "titans_mac":
        spec["segment_size"] = chunk_size
    return spec


def build_model(plan: str, hidden: int, heads: int, layers: int, vocab: int, window: int, chunk_size: int, device: torch.device):
    from mnemotorch.models import MnemoConfig, MnemoForCausalLM

    torch.manual_seed(0)
    cfg = MnemoConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      layer_plan=_plan_spec(plan, window, chunk_size))
    return MnemoForCausalLM(cfg).to(device)


def mag_model_case(plan: str, L: int, hidden: int, heads: int, layers: int, vocab: int, window: int, chunk_size: int,
                   device: torch.device, dtype: torch.dtype, batch: int = 1, warmup: int = 5, rep: int = 20, fused: bool = False) -> dict:
    """Tokens/s of one training step (forward, LM loss, backward; no optimizer) of a ``plan`` model under autocast.

    ``fused``: every Titans memory of the model trains through the fused kernel (``fused_memory = True``;
    the first step, which compiles, is outside the timing)."""
    model = build_model(plan, hidden, heads, layers, vocab, window, chunk_size, device).train()
    if fused:
        from mnemotorch.layers.titans import TitansLMM

        for m in model.modules():
            if isinstance(m, TitansLMM):
                m.fused_memory = True
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (batch, L), generator=g).to(device)
    use_amp = dtype != torch.float32

    def step():
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=use_amp):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        torch.autograd.grad(loss, params, allow_unused=True)

    row = {"case": "mag_model", "plan": plan + ("_fused" if fused else ""), "fused_memory": fused,
           "layer_spec": _plan_spec(plan, window, chunk_size), "L": L, "B": batch, "hidden": hidden,
           "heads": heads, "layers": layers, "vocab": vocab, "autocast": str(dtype).replace("torch.", "") if use_amp else None,
           "parameters": sum(p.numel() for p in params)}

    def run():
        step()
        base = _peak_start(device)
        step()
        peak = _peak_gib(device, base)
        ms = time_ms(step, device, warmup, rep)
        return {"step_ms": ms, "tokens_per_s": batch * L / (ms * 1e-3), "peak_extra_gib": peak}

    row.update(_guard(run, device))
    return row


# ---------------------------------------------------------------------------------------------
# case 3: decode latency vs context
# ---------------------------------------------------------------------------------------------
def decode_case(plan: str, contexts: list[int], steps: int, hidden: int, heads: int, layers: int, vocab: int, window: int,
                chunk_size: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Prefill each context in one call (cache on), then time ``steps`` one-token steps (batch 1)."""
    from mnemotorch.models import MnemoCache

    model = build_model(plan, hidden, heads, layers, vocab, window, chunk_size, device).to(dtype).eval()
    g = torch.Generator(device="cpu").manual_seed(0)
    row: dict = {"case": "decode", "plan": plan, "layer_spec": _plan_spec(plan, window, chunk_size), "hidden": hidden, "heads": heads,
                 "layers": layers, "vocab": vocab, "dtype": str(dtype).replace("torch.", ""), "steps": steps, "contexts": []}
    with torch.no_grad():
        # warm-up (kernel compilation / autotuning) on a short prefill and two steps
        cache = MnemoCache(layers)
        model(input_ids=torch.randint(0, vocab, (1, 2 * chunk_size), generator=g).to(device), cache=cache, logits_to_keep=1)
        for _ in range(2):
            model(input_ids=torch.randint(0, vocab, (1, 1), generator=g).to(device), cache=cache, logits_to_keep=1)
        for ctx in contexts:
            def one(ctx=ctx) -> dict:
                ids = torch.randint(0, vocab, (1, ctx + steps), generator=g).to(device)
                cache = MnemoCache(layers)
                _sync(device)
                t0 = time.perf_counter()
                model(input_ids=ids[:, :ctx], cache=cache, logits_to_keep=1)
                _sync(device)
                prefill = (time.perf_counter() - t0) * 1e3
                times = []
                for i in range(steps):
                    tok = ids[:, ctx + i : ctx + i + 1]
                    if device.type == "cuda":
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s.record()
                        model(input_ids=tok, cache=cache, logits_to_keep=1)
                        e.record()
                        torch.cuda.synchronize(device)
                        times.append(s.elapsed_time(e))
                    else:
                        t1 = time.perf_counter()
                        model(input_ids=tok, cache=cache, logits_to_keep=1)
                        times.append((time.perf_counter() - t1) * 1e3)
                times.sort()
                med = times[len(times) // 2]
                return {"context": ctx, "prefill_ms": prefill, "prefill_tokens_per_s": ctx / (prefill * 1e-3),
                        "step_ms_median": med, "step_ms_p10": times[len(times) // 10], "step_ms_p90": times[min(len(times) - 1, (9 * len(times)) // 10)],
                        "step_ms_mean": sum(times) / len(times), "tokens_per_s": 1e3 / med, "state_elements": model.state_size(ctx + steps)}

            row["contexts"].append({"context": ctx, **_guard(one, device)})
    meds = [c["step_ms_median"] for c in row["contexts"] if "step_ms_median" in c]
    if len(meds) >= 2:
        row["latency_ratio_longest_vs_shortest_context"] = meds[-1] / meds[0]
    return row


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _names(allowed: tuple[str, ...], what: str, allow_none: bool = False) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        if allow_none and names in ([], ["none"]):
            return []
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, bad)) or repr(text)}; choose from {', '.join(allowed)}" + (" (or 'none')" if allow_none else ""))
        return names
    return parse


def _line(row: dict) -> str:
    if row.get("case") == "lmm":
        parts = []
        for name, r in row["results"].items():
            if r.get("fwd_ms") is not None:
                peak = f" peak {r['peak_extra_gib']:.2f} GiB" if r.get("peak_extra_gib") is not None else ""
                sp = f" x{r['speedup_fwd_bwd_vs_titans_pytorch']:.2f} fwd+bwd vs peer" if "speedup_fwd_bwd_vs_titans_pytorch" in r else ""
                cp = (f" (first calls {r['first_fwd_s']:.1f}/{r['first_fwd_bwd_s']:.1f} s, x{r['speedup_fwd_bwd_vs_eager']:.2f} fwd+bwd vs eager)"
                      if "speedup_fwd_bwd_vs_eager" in r else f" (first calls {r['first_fwd_s']:.1f}/{r['first_fwd_bwd_s']:.1f} s)" if "first_fwd_s" in r else "")
                fb = "n/a" if r.get("fwd_bwd_ms") is None else f"{r['fwd_bwd_ms']:.2f}"
                nc = f" (not capturable: {r['not_capturable']})" if "not_capturable" in r else ""
                fz = f" (inference, first call {r['first_call_s']:.1f} s, rel {r['rel_rms_vs_chunked']:.1e} vs chunked)" if r.get("inference") else ""
                parts.append(f"{name} {r['fwd_ms']:.2f}/{fb} ms{peak}{sp}{cp}{nc}{fz}")
            elif "not_capturable" in r:
                parts.append(f"{name} not capturable: {r['not_capturable']}")
            else:
                parts.append(f"{name} {r.get('skipped') or r.get('error')}")
        return "\n".join([f"lmm L={row['L']} dim={row['dim']} H={row['heads']} C={row['chunk_size']} {row['dtype']}: " + " | ".join(parts),
                          *_graph_summary_lines(row)])
    if row.get("case") == "mag_model":
        if "step_ms" in row:
            return f"model {row['plan']} L={row['L']} hidden={row['hidden']} x{row['layers']}: {row['step_ms']:.1f} ms/step, {row['tokens_per_s']:.0f} tok/s"
        return f"model {row['plan']}: {row.get('error')}"
    if row.get("case") == "decode":
        cells = [f"{c['context']}: {c['step_ms_median']:.2f} ms" if "step_ms_median" in c else f"{c['context']}: {c.get('error')}" for c in row["contexts"]]
        return f"decode {row['plan']} per-token latency by context: " + ", ".join(cells)
    if row.get("case") == "profile":
        f, fb = row["fwd"], row["fwd_bwd"]
        extra = f", {fb['cuda_kernels_per_chunk']:.0f} CUDA kernels/chunk, kernels busy {fb['kernel_busy_fraction']:.0%}" if "cuda_kernels" in fb else ""
        return (f"profile{' (compiled memory)' if row.get('compile_memory') else ''} L={row['L']} dim={row['dim']}: kernel-launching ops per chunk fwd {f['aten_kernel_ops_per_chunk']:.0f}, "
                f"fwd+bwd {fb['aten_kernel_ops_per_chunk']:.0f}{extra}; first calls {row.get('first_fwd_s', 0):.1f}/{row.get('first_fwd_bwd_s', 0):.1f} s")
    return str(row)


def main(argv: list[str] | None = None) -> int:
    """``mnemo bench memory -- [--cases lmm,mag_model,decode] [--device cuda|cpu] [--quick] [--out F] ...``."""
    ap = argparse.ArgumentParser(prog="mnemo bench memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="neural_memory_bench.json")
    ap.add_argument("--cases", type=_names(CASES, "case"), default=list(CASES), help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cuda (default) or cpu (tiny sizes with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (CPU smoke test); explicit options still win")
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="layer dtype (lmm), autocast dtype (mag_model), weights (decode)")
    ap.add_argument("--peers", type=_names(PEERS, "peer", allow_none=True), default=list(PEERS), help="titans_pytorch or none")
    ap.add_argument("--time-budget", type=float, default=None, help="start no new job after this many seconds")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (default off, as in the other suites; "
                    "the memory recurrence runs its matmuls in float32)")
    ap.add_argument("--threads", type=_positive_int, default=1, help="CPU intra-op threads during a --device cpu run (default 1)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up calls per timing (default 5; --quick 1)")
    ap.add_argument("--rep", type=_positive_int, default=None, help="timed calls per median (default 20; --quick 2)")
    g = ap.add_argument_group("lmm")
    g.add_argument("--lengths", type=_positive_ints, default=None, help="sequence lengths (default 4096,16384)")
    g.add_argument("--dim", type=_positive_int, default=None, help="layer width (default 1024)")
    g.add_argument("--heads", type=_positive_int, default=None, help="heads (default 16)")
    g.add_argument("--chunk-size", type=_positive_int, default=None, help="memory chunk size, every case (default 64)")
    g.add_argument("--batch", type=_positive_int, default=1, help="batch of the lmm and mag_model cases (default 1)")
    g.add_argument("--configs", type=_names(tuple(OUR_CONFIGS), "config"), default=None, help="our configurations: matched,default")
    g.add_argument("--compile", action="store_true", help="also time our layers with the memory's chunk step torch.compile'd "
                   "(ours_<config>_compiled; compilation = the first calls, recorded apart from the medians)")
    g.add_argument("--compile-mode", default="default", help="torch.compile mode of --compile: default (inductor's default; "
                   "the default), max-autotune-no-cudagraphs, reduce-overhead (CUDA graphs), max-autotune")
    g.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --compile (default inductor; aot_eager for CPU tests)")
    g.add_argument("--compile-only", action="store_true", help="with --compile: skip the eager runs of our layers")
    g.add_argument("--cuda-graph", action="store_true",
                   help="CUDA only: also time each of ours that ran (eager and --compile'd) and titans-pytorch, forward and "
                   "forward + backward, as CUDA-graph replays of one captured call (<name>_graphed: the device work without "
                   "the host's launch overhead; 'not_capturable' with the reason if its capture fails), beside the eager "
                   "timings; each result records its 'timing'. Ignored (with a note) on --device cpu")
    g.add_argument("--fused", action="store_true", help="CUDA only: also time each configuration with the fused kernel "
                   "(MNEMO_MEMORY_FUSED=1), inference forward and training: ours_<config>_fused; and the titans_mag model trained "
                   "with it (plan titans_mag_fused). Ignored (with a note) on --device cpu")
    g.add_argument("--profile", action="store_true", help="torch.profiler breakdown of our layer (matched) at the first length "
                   "(with --compile: of the compiled layer too)")
    g.add_argument("--profile-top", type=_positive_int, default=15, help="top ops listed by the profile")
    g = ap.add_argument_group("mag_model / decode")
    g.add_argument("--mag-length", type=_positive_int, default=None, help="training sequence length (default 4096)")
    g.add_argument("--mag-hidden", type=_positive_int, default=None, help="model width (default 512)")
    g.add_argument("--mag-heads", type=_positive_int, default=None, help="heads (default 8)")
    g.add_argument("--mag-layers", type=_positive_int, default=None, help="layers (default 6)")
    g.add_argument("--mag-window", type=_positive_int, default=None, help="sliding window of titans_mag / sliding_window (default 512)")
    g.add_argument("--vocab", type=_positive_int, default=None, help="vocabulary (default 32000)")
    g.add_argument("--mag-baselines", type=_names(_MIXERS_FOR_PLANS, "plan", allow_none=True), default=None,
                   help="other plans of the same size for mag_model (default attention,sliding_window; 'none')")
    g.add_argument("--decode-contexts", type=_positive_ints, default=None, help="prefill lengths (default 1024,4096,16384)")
    g.add_argument("--decode-steps", type=_positive_int, default=None, help="timed one-token steps per context (default 32)")
    g.add_argument("--decode-plans", type=_names(_MIXERS_FOR_PLANS, "plan"), default=None, help="default titans_lmm,titans_mag")
    args = ap.parse_args(argv)

    sizes = QUICK if args.quick else FULL
    opt = {k: (getattr(args, k) if getattr(args, k, None) is not None else v) for k, v in sizes.items() if k not in ("warmup", "rep")}
    warmup = sizes["warmup"] if args.warmup is None else args.warmup
    rep = sizes["rep"] if args.rep is None else args.rep
    if warmup < 0:
        ap.error(f"--warmup must be >= 0, got {warmup}")
    if args.time_budget is not None and args.time_budget <= 0:
        ap.error(f"--time-budget must be > 0 seconds, got {args.time_budget}")
    if opt["dim"] % opt["heads"]:
        ap.error(f"--dim ({opt['dim']}) must be divisible by --heads ({opt['heads']})")
    if opt["mag_hidden"] % opt["mag_heads"] or (opt["mag_hidden"] // opt["mag_heads"]) % 2:
        ap.error(f"--mag-hidden ({opt['mag_hidden']}) must be divisible by --mag-heads ({opt['mag_heads']}) with an even head dim (RoPE)")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("mnemo bench memory: --device cuda but no CUDA device is available; use --device cpu (with --quick) for a CPU run",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    cases = args.cases
    peers = tuple(args.peers)
    if args.compile_only and not args.compile:
        ap.error("--compile-only needs --compile")
    compile_memory = ({"backend": args.compile_backend, "mode": None if args.compile_mode == "default" else args.compile_mode}
                      if args.compile else None)

    cuda_graph = args.cuda_graph and device.type == "cuda"
    graph_note = None
    if args.cuda_graph and not cuda_graph:
        graph_note = "--cuda-graph ignored: CUDA graphs need CUDA (this is a --device cpu run); eager timings only"
    elif cuda_graph and "lmm" not in args.cases:
        graph_note = "--cuda-graph applies to the lmm case only"
    if graph_note:
        print(graph_note, flush=True)
    fused = args.fused and device.type == "cuda"
    if args.fused and not fused:
        print("--fused ignored: the fused forward kernel is timed on CUDA only (this is a --device cpu run)", flush=True)

    env = device_info()
    env["device_type"] = device.type
    cls, info = load_peer()
    env["titans_pytorch"] = info if cls is not None else None
    report: dict = {
        "suite": "memory", "env": env, "argv": list(argv or []), "quick": args.quick, "cases": cases, "peers": list(peers),
        "settings": {**opt, "batch": args.batch, "dtype": args.dtype, "warmup": warmup, "rep": rep, "tf32": args.tf32,
                     "cpu_threads": args.threads if device.type == "cpu" else None,
                     "compile_memory": code_path_compile_record(compile_memory), "compile_only": args.compile_only,
                     "cuda_graph": cuda_graph, "fused": fused},
        "spec": dict(SPEC), "configs": {"ours": {k: dict(v) for k, v in OUR_CONFIGS.items()}, "titans_pytorch_default": dict(PEER_DEFAULT_MEMORY)},
        "lmm": [], "mag_model": [], "decode": [],
    }
    if graph_note:
        report["cuda_graph_note"] = graph_note
    if cuda_graph:
        report["timing_modes"] = TIMING_MODES

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    jobs: list[tuple[str, Callable[[], dict]]] = []
    C = opt["chunk_size"]
    if "lmm" in cases:
        if args.profile:
            for comp in ([None] if not args.compile_only else []) + ([compile_memory] if compile_memory else []):
                jobs.append(("profile", lambda comp=comp: profile_case(opt["lengths"][0], opt["dim"], opt["heads"], C, "matched", device, dtype,
                                                                      args.profile_top, comp)))
        graph_failures: dict[str, str] = {}  # failed captures, not retried at the later lengths
        for L in opt["lengths"]:
            jobs.append(("lmm", lambda L=L: lmm_case(L, opt["dim"], opt["heads"], C, opt["configs"], peers, device, dtype, args.batch, warmup, rep,
                                                     compile_memory, not args.compile_only, cuda_graph, graph_failures, fused)))
    if "mag_model" in cases:
        for plan in ["titans_mag", *[p for p in opt["mag_baselines"] if p != "titans_mag"]]:
            jobs.append(("mag_model", lambda plan=plan: mag_model_case(plan, opt["mag_length"], opt["mag_hidden"], opt["mag_heads"], opt["mag_layers"],
                                                                        opt["vocab"], opt["mag_window"], C, device, dtype, args.batch, warmup, rep)))
            if fused and plan == "titans_mag":  # the same model, its memories trained through the fused kernel
                jobs.append(("mag_model", lambda plan=plan: mag_model_case(plan, opt["mag_length"], opt["mag_hidden"], opt["mag_heads"],
                                                                            opt["mag_layers"], opt["vocab"], opt["mag_window"], C, device, dtype,
                                                                            args.batch, warmup, rep, fused=True)))
    if "decode" in cases:
        for plan in opt["decode_plans"]:
            jobs.append(("decode", lambda plan=plan: decode_case(plan, opt["decode_contexts"], opt["decode_steps"], opt["mag_hidden"], opt["mag_heads"],
                                                                  opt["mag_layers"], opt["vocab"], opt["mag_window"], C, device, dtype)))

    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # Tiny CPU runs are op-overhead bound; on a shared machine OpenMP regions over several threads
        # turn each op into milliseconds of contention. One thread (unless --threads) gives stable numbers.
        torch.set_num_threads(args.threads)
    try:
        for kind, job in jobs:
            if args.time_budget is not None and time.perf_counter() - t_start > args.time_budget:
                report["stopped_early"] = True
                print("time budget reached; remaining jobs not run", flush=True)
                break
            t0 = time.perf_counter()
            try:
                row = job()
            except Exception as exc:  # record and go on
                row = {"case": kind, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            row["seconds"] = time.perf_counter() - t0
            if kind == "profile":
                if row.get("compile_memory"):
                    report["profile_compiled"] = row
                else:
                    report["profile"] = row
                    if "code_path" in row:
                        report["code_path"] = row["code_path"]
            else:
                report[kind].append(row)
            print(_line(row) if "error" not in row else row, f"[{row['seconds']:.1f}s]", flush=True)
            save()
        if "lmm" in cases and "code_path" not in report:
            # which implementation ran (a short forward at the benchmark's width; the path does not depend on L)
            layer = build_ours(opt["dim"], opt["heads"], C, "matched", device, dtype)
            report["code_path"] = code_path(layer, torch.randn(1, 2 * C, opt["dim"], device=device, dtype=dtype))
    finally:
        torch.set_num_threads(threads)
    report["total_seconds"] = time.perf_counter() - t_start
    save()
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
