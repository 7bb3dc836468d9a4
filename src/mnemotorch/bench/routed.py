"""Content-routed attention benchmarks (issue #7): routing attention and landmark retrieval (GPU).

Two cases, each run in this process on the same inputs for every implementation:

* ``routing`` -- our ``routing`` mixer (causal-exact nearest-centroid routing, shared Q/K, causal,
  ``C = L / window`` clusters so a cluster holds ``window`` tokens on average) as a whole layer with
  its projections, against lucidrains' ``routing_transformer.routing_transformer.SelfAttention``
  (routing heads only, ``window_size=window``, ``causal=True``, ``shared_qk=True``: the call of
  ``shared/peers/peers_gpu2.py``; an optional peer, skipped with a note when it is not importable)
  and against dense causal SDPA with the same q/k/v/o projections (our ``attention`` mixer), so
  projections are included on all sides. Ours runs with each backend of its attention:
  ``block_sparse`` (``backend="block_sparse"``, the default on CUDA: sort by cluster, pack every
  head's clusters into one sequence, the project's block-sparse Triton kernel; CUDA only),
  ``block_sparse_graphs`` (the same with ``cuda_graph=True``: the layer, still called eagerly, replays its
  training calls from CUDA graphs it captured at the first call; its ``no_grad`` forward is eager),
  ``flex`` (``backend="flex"``: sort by cluster, block-sparse FlexAttention; CUDA only) and
  ``sdpa_masks`` (``backend="torch"``: SDPA with cluster masks over query chunks, dense compute;
  only up to ``--sdpa-masks-max-len``). Reported per length: the median of device-event timings
  after warm-up for the forward (under ``torch.no_grad``, the project's convention; the peer numbers
  of the spec were taken with grad enabled) and the forward + backward (gradients of the input and
  every parameter), the peak memory above the inputs during forward + backward, the ratios
  ``peer / ours`` (``speedup_*_vs_PEER`` > 1: ours is faster), the cluster sizes and the fraction
  of causal 128 x 128 tiles the flex path visits, the packed length and tiles of the block-sparse
  path, and the relative differences between our backends' outputs. All modules stay in training mode (both routing layers compute their k-means
  statistics and commitment losses; neither loss is back-propagated, as in ``peers_gpu2.py``).
  Centroids are random, as in a freshly initialised model: a trained model's clusters are less
  balanced.
* ``landmark`` -- our ``landmark`` mixer at inference in retrieval mode (top-k blocks through the
  landmark keys, complete KV blocks held in CPU memory) on contexts of ``factor x train_len``
  positions (landmarks included), fed in chunks of ``--landmark-chunk`` positions with the state
  carried, then ``--landmark-decode-tokens`` single-token steps. Recorded per length: the GPU peak
  memory above the module's weights (prefill and decode; it should stay nearly flat as the context
  grows), a trace of allocated memory over the prefill, the state's bytes on the GPU and in the CPU
  store, prefill seconds and ms per position, decode ms per token; the same for the exact mode
  (grouped softmax over every block, KV cache on the GPU) where it fits. Random weights: this
  measures cost, not retrieval quality.

``--cuda-graph`` (routing case, CUDA only; a no-op with a note on the CPU): after the eager timings of
a length, every implementation that ran is timed again as CUDA-graph replays of one captured call
(``bench.block_sparse.graph_ms``: warm-up on a side stream, capture in a private memory pool, the
gradients returned by ``torch.autograd.grad`` as static outputs), under ``<name>_graphed``, or recorded
as ``not_capturable`` with the reason (a host sync in the captured call, say). This separates the
device work from the host's Python and launch overhead, which the eager timings charge. Each result
says its ``timing`` (``TIMING_MODES``, also in the report), and ``cuda_graph_summary`` sets
routing-transformer's eager time beside ours eager and graphed. The ratios ``speedup_*_vs_PEER`` then
pair every timing of ours with every peer timing, whatever the modes.

``--device cpu --quick`` runs both cases at tiny sizes (wall-clock timings, no memory readings): a
smoke test of the harness, not a measurement.

Usage: ``mnemo bench routed -- --out routed.json`` (add ``--cases routing --cuda-graph`` for the graphed
timings) or ``python -m mnemotorch.bench.routed --quick``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from .block_sparse import TIMING_MODES, device_info, graph_ms, measure, measure_graphed, peer_graph_part, peer_graph_summary, wall_median_ms

CASES = ("routing", "landmark")
ROUTING_BACKENDS = {"block_sparse": "block_sparse", "block_sparse_graphs": "block_sparse", "flex": "flex", "sdpa_masks": "torch"}
#: Ours run with ``cuda_graph=True`` (the layer replays its training calls from CUDA graphs; still called eagerly).
LAYER_GRAPH_BACKENDS = ("block_sparse_graphs",)
#: Ours that need CUDA (``--device cpu`` records them as skipped).
CUDA_ONLY_BACKENDS = ("block_sparse", "block_sparse_graphs", "flex")
PEERS = ("routing_transformer", "sdpa")
GRANULARITIES = ("block", "token")
#: Peer numbers of shared/specs/sparse-attention.md (H100, bf16, B = 1, dim 1024, 16 heads, window 512,
#: incl. projections; fwd measured with grad enabled). Only comparable to a run of the same shape.
SPEC_PEER_MS = {
    8192: {"routing_transformer": {"fwd_ms": 3.34, "fwd_bwd_ms": 5.86, "peak_gib": 0.87}},
    16384: {"routing_transformer": {"fwd_ms": 5.50, "fwd_bwd_ms": 8.90, "peak_gib": 1.67}},
}

# Sizes when an option is not given: (full run, --quick on CUDA, --quick on CPU).
_DEFAULTS = {
    "lengths": ("8192,16384,65536", "4096", "128"),
    "dim": (1024, 1024, 32),
    "heads": (16, 16, 2),
    "window": (512, 512, 32),
    "landmark_train_len": (512, 512, 16),
    "landmark_factors": ("16,32", "4,8", "2,4"),
    "landmark_block_len": (50, 50, 3),
    "landmark_top_k": (4, 4, 2),
    "landmark_decode_tokens": (32, 8, 3),
}


# ---------------------------------------------------------------------------------------------
# timing and memory (CUDA: block_sparse's device-event helpers; CPU: wall clock, no memory)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _measure(fwd: Callable[[], torch.Tensor], grad_out: torch.Tensor, params: list[torch.Tensor], device: torch.device) -> dict:
    """Median fwd / fwd+bwd ms and peak extra GiB of one fwd+bwd; the first call's seconds (compilation)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        fwd()
    _sync(device)
    first = time.perf_counter() - t0
    if device.type == "cuda":
        out = measure(fwd, grad_out, params)
    else:
        def fwd_bwd():
            torch.autograd.grad(fwd(), params, grad_out)

        with torch.no_grad():
            t_f = wall_median_ms(fwd, 1, 3)
        out = {"fwd_ms": t_f, "fwd_bwd_ms": wall_median_ms(fwd_bwd, 1, 3), "peak_extra_gib": None}
    out["first_call_s"] = first
    return out


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _guard(fn: Callable[[], dict], device: torch.device) -> dict:
    """Run one implementation; an OOM or a failure is recorded, never raised (the others still run)."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        _free(device)
        return {"error": "oom"}
    except Exception as exc:  # noqa: BLE001 - a failing implementation must not stop the benchmark
        _free(device)
        return {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------
# routing


def _routing_stats(m, x: torch.Tensor) -> dict:
    """Cluster sizes of the routing heads on ``x``, the causal 128 x 128 tiles the flex path visits, and
    the packed rows and tiles of the block-sparse path."""
    from mnemotorch.ops.routing import nearest_centroid, routed_layout, scale_free_layer_norm
    from mnemotorch.ops.routing.flex import BLOCK, sorted_block_lists

    with torch.no_grad():
        b, t, _ = x.shape
        q = m.q_proj(x).view(b, t, m.num_heads, m.head_dim)[:, :, m.local_heads :]
        c = nearest_centroid(scale_free_layer_norm(q), m.centroids)  # [B, T, H_route]
        sizes = torch.zeros(b, c.shape[2], m.num_clusters, device=x.device).scatter_add_(
            2, c.permute(0, 2, 1), torch.ones(b, c.shape[2], t, device=x.device)
        )
        lists = sorted_block_lists(c, c, causal=True)
        n = -(-t // BLOCK)
        causal_tiles = b * c.shape[2] * n * (n + 1) / 2
        visited = (lists["kv_num"].sum() + lists["full_num"].sum()).item()
        lay = routed_layout(c, c, causal=True)
        p = lay.pattern
        bs_full, bs_part = int(p.full_cnt.sum()), int(p.part_cnt.sum())
        causal_pairs = b * c.shape[2] * t * (t + 1) / 2
    return {
        "cluster_size_mean": t / m.num_clusters,
        "cluster_size_max": sizes.max().item(),
        "cluster_size_min": sizes.min().item(),
        "empty_clusters_fraction": (sizes == 0).float().mean().item(),
        "flex_tiles_visited_fraction_of_causal": visited / causal_tiles,
        "flex_full_tiles_fraction_of_visited": lists["full_num"].sum().item() / max(visited, 1),
        "block_sparse_packed_rows_per_token": lay.q_len / (b * c.shape[2] * t),
        "block_sparse_tiles": {"q_block": p.q_block, "k_block": p.k_block, "full": bs_full, "partial": bs_part,
                               "list_widths": [p.full_idx.shape[1], p.part_idx.shape[1], p.t_full_idx.shape[1], p.t_part_idx.shape[1]]},
        "block_sparse_computed_pairs_fraction_of_causal": (bs_full + bs_part) * p.q_block * p.k_block / causal_pairs,
    }


def _clear_routing_records(m) -> None:
    """Drop what our routing layer carries from one training call to the next (the k-means statistics
    waiting to be folded, the unclaimed commitment loss), as ``update_centroids`` would after an
    optimizer step: every captured / replayed step then starts from the same state and does the same
    work, and no tensor of an earlier call (a loss with its autograd graph, or memory freed since) is
    read by the graph. The same reset as the CUDA-graph test of tests/gpu/test_routing_gpu.py."""
    m._pending_raw = m._pending_sums = m._pending_counts = m._pending_loss = None


def _graphed(call: Callable[[], torch.Tensor], grad_out: torch.Tensor, params: list[torch.Tensor],
             skip_fwd_bwd: str | None = None) -> dict:
    """Forward and forward + backward ms of CUDA-graph replays of ``call``: ``bench.block_sparse.measure_graphed``
    (see there) timed with this module's ``graph_ms`` (which the CPU tests replace by a stand-in)."""
    return measure_graphed(call, grad_out, params, skip_fwd_bwd, timer=graph_ms)


def _graph_phase(L: int, res: dict, jobs: list[tuple[str, Callable[[str | None], dict]]], device: torch.device,
                 graph_failures: dict[str, str]) -> None:
    """Run the CUDA-graph timings ``jobs`` in order: ``(name, fn)``, ``fn(skip_fwd_bwd)`` gives the result
    stored under ``name + "_graphed"`` (``_graphed``'s).

    A capture that failed at an earlier length (``graph_failures``, keys ``name:fwd`` and
    ``name:fwd_bwd``) is not tried again (a failed capture is the one event here that could disturb
    what runs after it); its reason is repeated."""
    for name, fn in jobs:
        key = f"{name}_graphed"
        if f"{name}:fwd" in graph_failures:
            res[key] = {"timing": "cuda_graph", "not_capturable": graph_failures[f"{name}:fwd"],
                        "not_retried": "its forward capture failed at a shorter length"}
            continue
        r = _guard(lambda: fn(graph_failures.get(f"{name}:fwd_bwd")), device)
        r.setdefault("timing", "cuda_graph")
        if "not_capturable" in r and "not_retried" not in r:
            phase = "fwd" if r.get("fwd_ms") is None else "fwd_bwd"
            graph_failures[f"{name}:{phase}"] = f"(L={L}) {r['not_capturable']}"
        res[key] = r
        _free(device)


def _graph_summary(res: dict) -> dict:
    """Per metric: routing-transformer's eager time beside each of our backends eager and graphed, and
    the ratios ``routing_transformer eager / ours`` (> 1: ours is faster); see
    :func:`~mnemotorch.bench.block_sparse.peer_graph_summary`."""
    return {"reference": "routing_transformer, eager", **peer_graph_summary(res, "routing_transformer")}


def _graph_summary_lines(row: dict) -> list[str]:
    s = row.get("cuda_graph_summary")
    if not s:
        return []
    lines = []
    for metric, label in (("fwd_bwd_ms", "fwd+bwd"), ("fwd_ms", "fwd")):
        m = s[metric]
        rt = m["routing_transformer_eager"]
        parts = ["routing_transformer eager " + ("n/a" if rt is None else f"{rt:.2f} ms")]
        if m["routing_transformer_graphed"] is not None:
            parts[0] += f" (graphed {m['routing_transformer_graphed']:.2f} ms)"
        parts += [peer_graph_part(name, d) for name, d in m.items() if name.startswith("ours_")]
        lines.append(f"  L={row['L']} {label} (x: routing_transformer eager / ours): " + " || ".join(parts))
    return lines


def routing_case(L: int, dim: int, heads: int, window: int, device: torch.device, dtype: torch.dtype, batch: int = 1,
                 backends: tuple[str, ...] = tuple(ROUTING_BACKENDS), peers: tuple[str, ...] = PEERS,
                 sdpa_masks_max_len: int = 16384, cuda_graph: bool = False, graph_failures: dict[str, str] | None = None) -> dict:
    """One length: our routing layer (each backend) vs routing-transformer's SelfAttention vs dense SDPA.

    ``cuda_graph`` (CUDA only; the caller checks): after all the eager timings of the length, each
    implementation that ran is timed again as CUDA-graph replays (``<name>_graphed``, or
    ``not_capturable`` with the reason); ``graph_failures`` (name -> reason) carries failed captures
    over to the next lengths, where they are not retried. Every result then says its ``timing``
    (``TIMING_MODES``) and the row has a ``cuda_graph_summary``."""
    from mnemotorch.layers import get_mixer

    graph_failures = {} if graph_failures is None else graph_failures
    C = L // window
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, L, dim, generator=g).to(device, dtype).requires_grad_()
    go = torch.randn(batch, L, dim, generator=g).to(device, dtype)
    row: dict = {"case": "routing", "L": L, "B": batch, "dim": dim, "heads": heads, "window": window, "num_clusters": C,
                 "dtype": _dtype_name(dtype), "results": {}}
    res = row["results"]

    torch.manual_seed(0)
    ours = get_mixer("routing", dim=dim, num_heads=heads, num_clusters=C, mode="causal_exact", shared_qk=True, causal=True,
                     local_heads=0).to(device, dtype)
    row["config_ours"] = {"mixer": "routing", "mode": ours.mode, "shared_qk": ours.shared_qk, "num_clusters": C,
                          "local_heads": 0, "rope_theta": ours.rope_theta, "training": ours.training}
    row["routing_stats"] = _guard(lambda: _routing_stats(ours, x.detach()), device)
    ours_params = [x, *[p for p in ours.parameters() if p.requires_grad]]
    outputs: dict[str, torch.Tensor] = {}
    # (name, fn) of the CUDA-graph timings, run after every eager timing of this length
    graph_jobs: dict[str, Callable[[str | None], dict]] = {}
    for name in backends:
        key = f"ours_{name}"
        if name in CUDA_ONLY_BACKENDS and device.type != "cuda":
            res[key] = {"skipped": f"the {name} path (backend={ROUTING_BACKENDS[name]!r}) needs CUDA"}
            continue
        if name == "sdpa_masks" and L > sdpa_masks_max_len:
            res[key] = {"skipped": f"dense masked SDPA skipped above --sdpa-masks-max-len {sdpa_masks_max_len}"}
            continue
        ours.backend = ROUTING_BACKENDS[name]
        ours.cuda_graph = name in LAYER_GRAPH_BACKENDS

        def fwd():
            y, _ = ours(x)
            ours.routing_aux_loss()  # drop the recorded commitment loss (the peer's aux loss is not back-propagated either)
            return y

        res[key] = _guard(lambda: _measure(fwd, go, ours_params, device), device)
        if "fwd_ms" in res[key]:
            with torch.no_grad():
                outputs[name] = fwd().detach()
            if cuda_graph and name not in LAYER_GRAPH_BACKENDS:  # (a graphed layer inside a captured call: the same graph)
                def ours_graphed(skip_fwd_bwd: str | None, backend=ROUTING_BACKENDS[name]) -> dict:
                    ours.backend = backend
                    ours.cuda_graph = False

                    def call():
                        # one training call's whole work, as the eager timing does it: the previous call's
                        # k-means statistics are folded at the start of a call, here at the end of this one
                        _clear_routing_records(ours)
                        y, _ = ours(x)
                        ours.routing_aux_loss()
                        ours._flush_raw()
                        return y

                    try:
                        return _graphed(call, go, ours_params, skip_fwd_bwd)
                    finally:
                        _clear_routing_records(ours)

                graph_jobs[key] = ours_graphed
        ours.cuda_graph = False
        _free(device)
    names = [n for n in ROUTING_BACKENDS if n in outputs]
    for i, a in enumerate(names):
        for other in names[i + 1 :]:
            row[f"rel_diff_{a}_vs_{other}"] = _rel(outputs[a], outputs[other])
    outputs.clear()
    _clear_routing_records(ours)
    if not cuda_graph:
        del ours, ours_params
    _free(device)

    if "routing_transformer" in peers:
        try:
            from routing_transformer.routing_transformer import SelfAttention
        except Exception as exc:  # noqa: BLE001 - an optional peer
            res["routing_transformer"] = {
                "skipped": f"routing_transformer is not importable ({type(exc).__name__}: {str(exc)[:200]}); install the wheels "
                "of shared/peers/wheels into a folder on PYTHONPATH (shared/peers/README.md)"
            }
        else:
            def run_peer() -> dict:
                # the call of shared/peers/peers_gpu2.py (routing heads only, shared QK, causal)
                m = SelfAttention(dim=dim, depth=1, max_seq_len=L, heads=heads, local_attn_heads=0, window_size=window,
                                  causal=True, shared_qk=True).to(device).to(dtype)
                params = [x, *[p for p in m.parameters() if p.requires_grad]]
                r = _measure(lambda: m(x)[0], go, params, device)
                if cuda_graph:
                    graph_jobs["routing_transformer"] = lambda skip: _graphed(lambda: m(x)[0], go, params, skip)
                return r

            res["routing_transformer"] = _guard(run_peer, device)
            _free(device)
    if "sdpa" in peers:
        def run_dense() -> dict:
            torch.manual_seed(0)
            m = get_mixer("attention", dim=dim, num_heads=heads).to(device, dtype)
            params = [x, *[p for p in m.parameters() if p.requires_grad]]
            r = _measure(lambda: m(x)[0], go, params, device)
            if cuda_graph:
                graph_jobs["sdpa_dense"] = lambda skip: _graphed(lambda: m(x)[0], go, params, skip)
            return r

        res["sdpa_dense"] = _guard(run_dense, device)
        _free(device)

    if cuda_graph:
        for r in res.values():
            if "fwd_ms" in r:
                r["timing"] = "eager"
        # the captures least likely to fail first: a failed capture is the one thing that could disturb what follows
        first = [n for n in ("ours_block_sparse", "sdpa_dense") if n in graph_jobs]
        order = first + [n for n in graph_jobs if n not in first and n != "routing_transformer"]
        order += [n for n in ("routing_transformer",) if n in graph_jobs]
        _graph_phase(L, res, [(n, graph_jobs[n]) for n in order], device, graph_failures)
        graph_jobs.clear()
        del ours, ours_params
        _free(device)

    for name, ours_r in res.items():
        if not name.startswith("ours_") or ours_r.get("fwd_ms") is None:
            continue
        for peer, r in res.items():
            if peer.startswith("ours_") or r.get("fwd_ms") is None:
                continue
            ours_r[f"speedup_fwd_vs_{peer}"] = r["fwd_ms"] / ours_r["fwd_ms"]
            if r.get("fwd_bwd_ms") is not None and ours_r.get("fwd_bwd_ms") is not None:
                ours_r[f"speedup_fwd_bwd_vs_{peer}"] = r["fwd_bwd_ms"] / ours_r["fwd_bwd_ms"]
            if r.get("peak_extra_gib") is not None and ours_r.get("peak_extra_gib") is not None:
                ours_r[f"memory_ratio_vs_{peer}"] = r["peak_extra_gib"] / max(ours_r["peak_extra_gib"], 1e-9)
    if cuda_graph:
        row["cuda_graph_summary"] = _graph_summary(res)
    if (dim, heads, window, batch, dtype) == (1024, 16, 512, 1, torch.bfloat16) and L in SPEC_PEER_MS and device.type == "cuda":
        row["spec_peer_ms"] = SPEC_PEER_MS[L]
    del x, go
    _free(device)
    return row


def _routing_line(row: dict) -> str:
    parts = []
    for name, r in row["results"].items():
        if r.get("fwd_ms") is not None:
            pk = "" if r.get("peak_extra_gib") is None else f" peak {r['peak_extra_gib']:.3f} GiB"
            sp = "".join(f" x{r[k]:.2f} vs {k[len('speedup_fwd_bwd_vs_'):]}" for k in r if k.startswith("speedup_fwd_bwd_vs_"))
            fb = "n/a" if r.get("fwd_bwd_ms") is None else f"{r['fwd_bwd_ms']:.2f}"
            nc = f" (not capturable: {r['not_capturable']})" if "not_capturable" in r else ""
            parts.append(f"{name} {r['fwd_ms']:.2f}/{fb} ms{pk}{sp}{nc}")
        elif "not_capturable" in r:
            parts.append(f"{name}: not capturable: {r['not_capturable']}")
        else:
            parts.append(f"{name}: {r.get('error') or r.get('skipped')}")
    return "\n".join([f"routing L={row['L']} C={row['num_clusters']}: " + " | ".join(parts), *_graph_summary_lines(row)])


# ---------------------------------------------------------------------------------------------
# landmark


def _state_bytes(state) -> dict:
    out: dict[str, int] = {}
    for t in state.tensors().values():
        kind = "gpu" if t.device.type == "cuda" else t.device.type
        out[kind] = out.get(kind, 0) + t.numel() * t.element_size()
    return out


def landmark_run(L: int, mode: str, granularity: str | None, dim: int, heads: int, block_len: int, top_k: int, chunk: int,
                 decode_tokens: int, device: torch.device, dtype: torch.dtype, x_ctx: torch.Tensor, x_dec: torch.Tensor,
                 trace_points: int = 16) -> dict:
    """Chunked prefill of ``x_ctx`` (CPU) then single-token decoding of ``x_dec``; GPU memory above the weights."""
    from mnemotorch.layers import get_mixer

    torch.manual_seed(0)
    kw = {"mode": mode, "top_k": top_k, "offload_device": "cpu"}
    if granularity is not None:
        kw["granularity"] = granularity
    m = get_mixer("landmark", dim=dim, num_heads=heads, block_len=block_len, **kw).to(device, dtype).eval()
    cuda = device.type == "cuda"
    step = block_len + 1
    with torch.no_grad():
        # warm-up on a fresh state: a few blocks and one decode step (kernel compilation, first allocations)
        st = None
        warm = min(L, 3 * step + 2)
        for s in range(0, warm, chunk):
            _, st = m(x_ctx[:, s : min(s + chunk, warm)].to(device), st)
        m(x_dec[:, :1].to(device), st)
        del st
        _free(device)
        _sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        every = max(1, -(-L // chunk) // trace_points)
        trace = []
        st = None
        t0 = time.perf_counter()
        for i, s in enumerate(range(0, L, chunk)):
            y, st = m(x_ctx[:, s : s + chunk].to(device), st)
            if cuda and (i % every == 0 or s + chunk >= L):
                trace.append([min(s + chunk, L), round((torch.cuda.memory_allocated() - base) / 2**20, 3)])
        del y
        _sync(device)
        prefill_s = time.perf_counter() - t0
        peak_prefill = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
        state_bytes = _state_bytes(st)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(decode_tokens):
            xi = x_dec[:, i : i + 1].to(device)
            t1 = time.perf_counter()
            y, st = m(xi, st)
            _sync(device)
            times.append((time.perf_counter() - t1) * 1e3)
        peak_decode = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    times.sort()
    out = {
        "mode": mode, "granularity": granularity, "top_k": top_k if mode == "retrieval" else None,
        "prefill_s": prefill_s, "prefill_ms_per_position": prefill_s * 1e3 / L,
        "decode_ms_per_token_median": times[len(times) // 2] if times else None,
        "decode_ms_per_token_mean": sum(times) / len(times) if times else None,
        "gpu_peak_extra_mib_prefill": peak_prefill, "gpu_peak_extra_mib_decode": peak_decode,
        "state_mib_gpu": state_bytes.get("gpu", 0) / 2**20, "state_mib_cpu": state_bytes.get("cpu", 0) / 2**20,
        "gpu_allocated_trace_mib": trace,
    }
    del m, st
    _free(device)
    return out


def landmark_case(L: int, train_len: int, variants: list[tuple[str, str | None]], dim: int, heads: int, block_len: int, top_k: int,
                  chunk: int, decode_tokens: int, device: torch.device, dtype: torch.dtype) -> dict:
    """One context length: every variant (``("retrieval", granularity)`` or ``("exact", None)``) on the same inputs."""
    g = torch.Generator().manual_seed(0)
    x_ctx = torch.randn(1, L, dim, generator=g).to(dtype)  # held in CPU memory, moved chunk by chunk
    x_dec = torch.randn(1, max(decode_tokens, 1), dim, generator=g).to(dtype)
    row: dict = {"case": "landmark", "L": L, "train_len": train_len, "factor": L / train_len, "dim": dim, "heads": heads,
                 "block_len": block_len, "blocks": L // (block_len + 1), "chunk": chunk, "decode_tokens": decode_tokens,
                 "dtype": _dtype_name(dtype), "offload_device": "cpu", "results": {}}
    for mode, gran in variants:
        name = mode if gran is None else f"{mode}_{gran}"
        row["results"][name] = _guard(
            lambda: landmark_run(L, mode, gran, dim, heads, block_len, top_k, chunk, decode_tokens, device, dtype, x_ctx, x_dec), device
        )
    exact = row["results"].get("exact", {})
    for name, r in row["results"].items():
        if name == "exact" or "prefill_s" not in r or "prefill_s" not in exact:
            continue
        if r["gpu_peak_extra_mib_prefill"] is not None and exact["gpu_peak_extra_mib_prefill"] is not None:
            r["memory_ratio_exact_vs_this"] = exact["gpu_peak_extra_mib_prefill"] / max(r["gpu_peak_extra_mib_prefill"], 1e-9)
        r["prefill_speedup_vs_exact"] = exact["prefill_s"] / r["prefill_s"]
        if r["decode_ms_per_token_median"] and exact["decode_ms_per_token_median"]:
            r["decode_speedup_vs_exact"] = exact["decode_ms_per_token_median"] / r["decode_ms_per_token_median"]
    return row


def _landmark_summary(rows: list[dict]) -> dict:
    """Per variant: peak GPU memory per length and its growth from the shortest to the longest context."""
    out: dict = {}
    for row in rows:
        for name, r in row.get("results", {}).items():
            if "prefill_s" in r:
                out.setdefault(name, {"L": [], "gpu_peak_extra_mib_prefill": [], "prefill_ms_per_position": []})
                out[name]["L"].append(row["L"])
                out[name]["gpu_peak_extra_mib_prefill"].append(r["gpu_peak_extra_mib_prefill"])
                out[name]["prefill_ms_per_position"].append(r["prefill_ms_per_position"])
    for s in out.values():
        pk = s["gpu_peak_extra_mib_prefill"]
        if len(pk) > 1 and pk[0] is not None and pk[-1] is not None:
            s["peak_growth"] = pk[-1] / max(pk[0], 1e-9)
            s["length_growth"] = s["L"][-1] / s["L"][0]
    return out


def _landmark_line(row: dict) -> str:
    parts = []
    for name, r in row["results"].items():
        if "prefill_s" in r:
            pk = "" if r["gpu_peak_extra_mib_prefill"] is None else f" peak {r['gpu_peak_extra_mib_prefill']:.1f} MiB"
            dec = r["decode_ms_per_token_median"]
            parts.append(f"{name} prefill {r['prefill_s']:.2f} s ({r['prefill_ms_per_position']:.3f} ms/pos)"
                         + (f" decode {dec:.2f} ms/tok" if dec is not None else "") + pk)
        else:
            parts.append(f"{name}: {r.get('error') or r.get('skipped')}")
    return f"landmark L={row['L']} ({row['factor']:g}x{row['train_len']}): " + " | ".join(parts)


# ---------------------------------------------------------------------------------------------
# command line


def _int_list(ap: argparse.ArgumentParser, value: str, name: str, minimum: int = 1) -> list[int]:
    try:
        out = [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        ap.error(f"{name}: expected a comma-separated list of integers, got {value!r}")
    if not out:
        ap.error(f"{name}: empty list")
    bad = [v for v in out if v < minimum]
    if bad:
        ap.error(f"{name}: values must be >= {minimum}, got {bad}")
    return out


def _choice_list(ap: argparse.ArgumentParser, value: str, name: str, allowed) -> list[str]:
    out = [v.strip() for v in str(value).split(",") if v.strip()]
    bad = [v for v in out if v not in allowed]
    if bad:
        ap.error(f"{name}: unknown value(s) {', '.join(map(repr, bad))}; choose from {', '.join(allowed)}")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mnemo bench routed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="routed_bench.json", help="JSON results file (rewritten after every case)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma list of: " + ", ".join(CASES))
    ap.add_argument("--quick", action="store_true", help="small sizes (tiny on --device cpu): a smoke run")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run of the harness (use with --quick)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--time-budget", type=float, default=None, help="start no new case (length) after this many seconds")
    ap.add_argument("--dim", type=int, default=None, help="model width of both cases (default 1024)")
    ap.add_argument("--heads", type=int, default=None, help="heads of both cases (default 16)")
    g = ap.add_argument_group("routing")
    g.add_argument("--lengths", default=None, help="sequence lengths, multiples of --window (default 8192,16384,65536)")
    g.add_argument("--window", type=int, default=None, help="tokens per cluster: C = L / window clusters (default 512)")
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--routing-backends", default=",".join(ROUTING_BACKENDS),
                   help="ours: block_sparse (our kernel, CUDA), block_sparse_graphs (the same layer with cuda_graph=True, CUDA), "
                   "flex (FlexAttention, CUDA) and/or sdpa_masks")
    g.add_argument("--peers", default=",".join(PEERS), help="comma list of: routing_transformer, sdpa (dense causal SDPA layer); "
                   "'none' for ours only")
    g.add_argument("--sdpa-masks-max-len", type=int, default=16384, help="skip ours_sdpa_masks (dense compute) above this length")
    g.add_argument("--cuda-graph", action="store_true",
                   help="CUDA only: also time every implementation that ran as CUDA-graph replays of one captured call "
                   "(<name>_graphed: no host launch overhead; 'not_capturable' with the reason if its capture fails), "
                   "beside the eager timings; each result records its 'timing'. Ignored on --device cpu")
    g = ap.add_argument_group("landmark")
    g.add_argument("--landmark-train-len", type=int, default=None, help="training length the contexts are multiples of (default 512)")
    g.add_argument("--landmark-factors", default=None, help="context = factor x train length (default 16,32)")
    g.add_argument("--landmark-block-len", type=int, default=None, help="ordinary tokens per block (default 50, the paper's)")
    g.add_argument("--landmark-top-k", type=int, default=None, help="blocks retrieved per query / query block and head (default 4)")
    g.add_argument("--landmark-granularities", default="block,token", help="retrieval granularities to run: block, token")
    g.add_argument("--landmark-chunk", type=int, default=None, help="prefill chunk in positions (default: the training length)")
    g.add_argument("--landmark-decode-tokens", type=int, default=None, help="single-token steps after the prefill (default 32)")
    g.add_argument("--landmark-exact-max-len", type=int, default=None, help="run the exact mode only up to this length (default: all)")
    g.add_argument("--no-landmark-exact", action="store_true", help="skip the exact-mode baseline")
    return ap


def _resolve(ap: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """Options with the size defaults of the run (full / quick CUDA / quick CPU) filled in and checked."""
    which = 0 if not args.quick else (1 if args.device == "cuda" else 2)
    o = {k: (getattr(args, k) if getattr(args, k) is not None else v[which]) for k, v in _DEFAULTS.items()}
    o["cases"] = _choice_list(ap, args.cases, "--cases", CASES)
    if not o["cases"]:
        ap.error("--cases: empty list")
    o["lengths"] = _int_list(ap, o["lengths"], "--lengths")
    o["landmark_factors"] = _int_list(ap, o["landmark_factors"], "--landmark-factors")
    for name in ("dim", "heads", "window", "landmark_train_len", "landmark_block_len", "landmark_top_k"):
        if o[name] < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {o[name]}")
    if o["landmark_decode_tokens"] < 0:
        ap.error(f"--landmark-decode-tokens must be >= 0, got {o['landmark_decode_tokens']}")
    if args.batch < 1:
        ap.error(f"--batch must be >= 1, got {args.batch}")
    if o["dim"] % o["heads"] or (o["dim"] // o["heads"]) % 2:
        ap.error(f"--dim ({o['dim']}) must be a multiple of --heads ({o['heads']}) with an even head dim (RoPE)")
    if "routing" in o["cases"]:
        bad = [L for L in o["lengths"] if L % o["window"]]
        if bad:
            ap.error(f"--lengths: {bad} not a multiple of --window {o['window']} (the clusters are L / window; the peer requires it too)")
    o["routing_backends"] = _choice_list(ap, args.routing_backends, "--routing-backends", tuple(ROUTING_BACKENDS))
    o["peers"] = [] if args.peers.strip() == "none" else _choice_list(ap, args.peers, "--peers", PEERS)
    o["granularities"] = _choice_list(ap, args.landmark_granularities, "--landmark-granularities", GRANULARITIES)
    o["chunk"] = args.landmark_chunk if args.landmark_chunk is not None else o["landmark_train_len"]
    if o["chunk"] < 1:
        ap.error(f"--landmark-chunk must be >= 1, got {o['chunk']}")
    if args.time_budget is not None and args.time_budget < 0:
        ap.error(f"--time-budget must be >= 0, got {args.time_budget}")
    o["dtype"] = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    return o


def main(argv: list[str] | None = None) -> int:
    """``mnemo bench routed -- [--cases routing,landmark] [--quick] [--device cpu] [--out F] ...``."""
    ap = build_parser()
    args = ap.parse_args(argv)
    o = _resolve(ap, args)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("mnemo bench routed: error: no CUDA device; use --device cpu --quick for a CPU smoke run of the harness", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    dtype = o["dtype"]
    t_start = time.perf_counter()
    env = device_info()
    env["bench_device"] = device.type
    notes = []
    if device.type == "cpu":
        notes.append("CPU run: wall-clock timings of a smoke test, no memory readings; not a measurement")
    settings = {k: v for k, v in o.items() if k != "dtype"}
    cuda_graph = args.cuda_graph and device.type == "cuda"
    if args.cuda_graph and not cuda_graph:
        msg = "--cuda-graph ignored: CUDA graphs need CUDA (this is a --device cpu run); eager timings only"
        notes.append(msg)
        print(msg, flush=True)
    elif cuda_graph and "routing" not in o["cases"]:
        notes.append("--cuda-graph applies to the routing case only")
    settings.update(dtype=_dtype_name(dtype), batch=args.batch, quick=args.quick, device=device.type,
                    sdpa_masks_max_len=args.sdpa_masks_max_len, landmark_exact=not args.no_landmark_exact,
                    landmark_exact_max_len=args.landmark_exact_max_len, time_budget=args.time_budget, cuda_graph=cuda_graph)
    report: dict = {"suite": "routed", "env": env, "argv": list(argv or []), "settings": settings, "notes": notes,
                    "routing": [], "landmark": [], "stopped_early": False}
    if cuda_graph:
        report["timing_modes"] = TIMING_MODES
    out = Path(args.out)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        report["elapsed_s"] = time.perf_counter() - t_start
        out.write_text(json.dumps(report, indent=1) + "\n")

    def over_budget() -> bool:
        if args.time_budget is not None and time.perf_counter() - t_start > args.time_budget:
            if not report["stopped_early"]:
                print("time budget reached; remaining cases not run", flush=True)
            report["stopped_early"] = True
        return report["stopped_early"]

    if "routing" in o["cases"]:
        peers = tuple(o["peers"])
        if "routing_transformer" in peers:
            try:
                import routing_transformer  # noqa: F401
            except Exception as exc:  # noqa: BLE001
                notes.append(f"peer routing_transformer skipped: not importable ({type(exc).__name__}); "
                             "see shared/peers/README.md for its wheels")
        graph_failures: dict[str, str] = {}  # failed captures, not retried at the next lengths
        for L in o["lengths"]:
            if over_budget():
                break
            t0 = time.perf_counter()
            try:
                row = routing_case(L, o["dim"], o["heads"], o["window"], device, dtype, args.batch, tuple(o["routing_backends"]),
                                   peers, args.sdpa_masks_max_len, cuda_graph=cuda_graph, graph_failures=graph_failures)
            except Exception as exc:  # noqa: BLE001 - record and go on
                row = {"case": "routing", "L": L, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            row["seconds"] = time.perf_counter() - t0
            report["routing"].append(row)
            print(_routing_line(row) if "results" in row else row, f"[{row['seconds']:.0f}s]", flush=True)
            save()

    if "landmark" in o["cases"]:
        train_len = o["landmark_train_len"]
        for factor in o["landmark_factors"]:
            if over_budget():
                break
            L = factor * train_len
            variants: list[tuple[str, str | None]] = [("retrieval", gr) for gr in o["granularities"]]
            if not args.no_landmark_exact and (args.landmark_exact_max_len is None or L <= args.landmark_exact_max_len):
                variants.append(("exact", None))
            t0 = time.perf_counter()
            try:
                row = landmark_case(L, train_len, variants, o["dim"], o["heads"], o["landmark_block_len"], o["landmark_top_k"],
                                    o["chunk"], o["landmark_decode_tokens"], device, dtype)
            except Exception as exc:  # noqa: BLE001 - record and go on
                row = {"case": "landmark", "L": L, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            row["seconds"] = time.perf_counter() - t0
            report["landmark"].append(row)
            print(_landmark_line(row) if "results" in row else row, f"[{row['seconds']:.0f}s]", flush=True)
            report["landmark_summary"] = _landmark_summary(report["landmark"])
            save()
    save()
    print(f"wrote {out} ({report['elapsed_s']:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
