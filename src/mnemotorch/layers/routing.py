"""Routing attention: content-based sparse attention through online k-means (Roy et al., 2020).

Each routing head clusters its (layer-normalised, scale-free) queries and keys with ``C`` centroids
and lets a query attend only to keys of its own cluster, with the causal mask on original
positions. Optional *local heads* in the same layer run causal sliding-window attention.

Two assignment rules (``mode``):

* ``"causal_exact"`` (default): every token goes to its nearest centroid (max dot product). The
  assignment depends on the token alone, so clusters are variable-length segments (a document mask
  on the cluster id plus the causal mask): no output ever depends on a later token, and decoding
  one token at a time reproduces the parallel pass exactly (the streaming invariant).
* ``"balanced_topw"``: the paper's balanced clusters -- each centroid takes its ``top_w`` best
  tokens, sorted by position; a token may be in no cluster or several (duplicate outputs averaged,
  tokens in no cluster output 0). Membership depends on the whole sequence, so in a causal model a
  future token can change which past keys a query sees: **it leaks the future** (see
  ``allow_future_leak``). It cannot stream.

Centroids are a buffer, never a parameter: they change only when the training loop calls
:meth:`RoutingAttention.update_centroids` (no backward hooks). A training step::

    logits = model(input_ids)                      # training mode: each routing layer records
    loss = lm_loss(logits) + routing_aux_loss(model)   #   its commitment loss and k-means stats
    loss.backward(); optimizer.step(); optimizer.zero_grad()
    update_routing_centroids(model)                # EMA k-means step on the recorded stats

(``routing_aux_loss`` / ``update_routing_centroids`` are this module's helpers over every routing
layer of a model; under DDP every rank must call ``update_routing_centroids``: it all-reduces the
statistics so the centroids stay identical.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.rotary import apply_rotary, rotary_cos_sin
from ..ops.routing import (
    balanced_topw_assignment,
    balanced_topw_attention,
    causal_exact_attention,
    commitment_loss,
    kmeans_batch_stats,
    kmeans_ema_step,
    nearest_centroid,
    rotary_commit,
    rotary_fused,
    route_assign,
    route_assign_distances,
    route_assign_supports,
    scale_free_layer_norm,
)
from ..ops.sliding_window import sliding_window_attention
from .base import Mixer, MixerState
from .cuda_graphs import TrainingGraphs, autocast_key
from .registry import register_mixer

MODES = ("causal_exact", "balanced_topw")
#: The fused routing glue of causal-exact mode: ``ops.routing.route_assign`` (layer norm, nearest centroid,
#: commitment distances and the k-means statistics in one kernel; the commitment loss's backward in one
#: more) and ``ops.routing.rotary_fused`` (RoPE in one launch each way): ``"auto"`` on CUDA, ``"on"``
#: wherever the kernels run (tests: the CPU interpreter), ``"off"`` never.
FUSED_GLUE = "auto"
BACKENDS = ("auto", "torch", "block_sparse", "flex", "triton", "reference")


@dataclass
class RoutingState(MixerState):
    """Cache of a causal-exact routing layer.

    ``k, v [B, T, H_route, D]``: rotated keys and values of every token seen (routing heads);
    ``clusters [B, T, H_route]`` (int64): each cached key's cluster id; ``k_local, v_local
    [B, min(T, W - 1), H_local, D]``: the local heads' sliding window. In the non-streaming modes
    (``balanced_topw``, ``causal=False``) all tensors stay empty.
    """

    k: Tensor
    v: Tensor
    clusters: Tensor
    k_local: Tensor
    v_local: Tensor


def _check_int(name: str, value, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


@register_mixer("routing")
class RoutingAttention(Mixer):
    """Routing Transformer attention with online k-means centroids, optional local heads.

    Args:
        dim: model width; num_heads: heads (``local_heads`` of them local, the rest routing).
        num_clusters: ``C``, centroids per routing head (paper: ``C = sqrt(n)``; released configs
            ``n / 512``).
        mode: ``"causal_exact"`` (default; nearest centroid, exact causality, streams) or
            ``"balanced_topw"`` (the paper's balanced top-``w`` clusters; see ``allow_future_leak``).
        top_w: ``w``, tokens each centroid takes in ``balanced_topw`` mode (paper: 512); unused in
            ``causal_exact`` mode, where clusters have variable length.
        shared_qk: queries double as keys (one projection), as the paper does for causal LMs, so
            queries and keys fall in the same clusters and every query sees at least itself.
        local_heads: heads that run causal sliding-window attention instead of routing (0 ..
            ``num_heads - 1``); they come first in the head order.
        local_window: ``W``, keys per query of the local heads, itself included.
        causal: causal mask on original positions. ``causal=False`` (an encoder) cannot stream
            and takes no local heads.
        allow_future_leak: must be ``True`` to use ``balanced_topw`` with ``causal=True``. **The
            leak:** balanced top-``w`` membership of a past key depends on every token of the
            sequence, later ones included, so changing a token at position ``t`` can change the
            outputs at positions ``< t`` (measured in lucidrains' routing-transformer: changing
            tokens ``>= 200`` changed outputs before 200 by up to 0.86). A causal LM trained this
            way sees information from the future, and its decoding cannot reproduce the parallel
            pass. Use it only to reproduce the paper.
        rope_theta: RoPE base applied to queries and keys inside the attention (``None``: no
            positions). Routing uses the un-rotated vectors, so assignment is by content alone.
        ema_decay: ``lambda`` of the k-means EMA (paper: 0.999).
        commitment_beta: ``beta`` of the commitment loss (paper: 1e-4).
        backend: for the routing heads in ``causal_exact`` mode: ``"auto"`` (on CUDA the
            block-sparse kernel path for calls of at least ``AUTO_MIN_QUERIES`` tokens, else SDPA
            with cluster masks; see ``mnemotorch.ops.routing.causal_exact_attention``),
            ``"block_sparse"`` (always the kernel path: sort by cluster, pack every head's clusters
            into one sequence, the project's block-sparse Triton kernel), ``"torch"`` (SDPA with
            cluster masks over query chunks), ``"flex"`` (former name ``"triton"``; CUDA: whole
            sequences run the sort-by-cluster FlexAttention path, continuations SDPA) or
            ``"reference"`` (dense float64-ready logits). Local heads use
            ``sliding_window_attention`` (``"auto"`` unless ``"reference"``).
        cuda_graph: replay training calls from CUDA graphs (``torch.cuda.make_graphed_callables``, one
            capture per input shape, dtype and autocast state): the layer is still called eagerly, but its
            ~20 kernel launches and their Python run once, at the capture, so a launch-bound layer
            (short and medium lengths) runs at its device time. Applies to CUDA training calls with
            gradients on fresh sequences in ``causal_exact`` mode with the fused glue; every other call
            runs eagerly. **Contract:** call backward after each forward (a call that comes while the
            previous graphed call's backward is pending runs eagerly, with one warning, so gradient
            accumulation stays correct); the graphs read the centroid buffer in place (updates by
            :meth:`update_centroids` are seen; moving the module with ``.to()`` drops the graphs).
            Not used inside ``torch.compile``. The output and the returned state live in the graph's
            static buffers: they hold until the next graphed call of the same shape (clone them to keep
            them longer; a training loop consumes them at once).

    Buffers: ``centroids [H_route, C, D]`` (kept at norm ``sqrt(D)``, the radius of the normalised
    routing vectors), ``ema_sums [H_route, C, D]``, ``ema_counts [H_route, C]``. They are saved in
    the state dict and change only through :meth:`update_centroids`. Keep the mixer in float32 for
    training (bf16 through autocast): a bf16 EMA with decay 0.999 would round away every update.

    ``state_size(T) = H_route (2 T D + T) + 2 H_local min(T, W - 1) D`` in ``causal_exact``
    causal mode (keys, values and one cluster id per cached key), 0 in the non-streaming modes.
    """

    description = "Routing Transformer: k-means clustered attention, causal-exact or balanced top-w, local heads (Roy et al. 2020); KV + cluster-id state"
    example_kwargs = {"num_clusters": 3, "local_heads": 1, "local_window": 8}

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_clusters: int = 16,
        mode: str = "causal_exact",
        top_w: int = 512,
        shared_qk: bool = True,
        local_heads: int = 0,
        local_window: int = 256,
        causal: bool = True,
        allow_future_leak: bool = False,
        rope_theta: float | None = 10000.0,
        ema_decay: float = 0.999,
        commitment_beta: float = 1e-4,
        backend: str = "auto",
        cuda_graph: bool = False,
    ):
        super().__init__(dim, num_heads)
        self.num_clusters = _check_int("num_clusters", num_clusters, 1)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.top_w = _check_int("top_w", top_w, 1)
        self.shared_qk = _check_bool("shared_qk", shared_qk)
        self.causal = _check_bool("causal", causal)
        self.allow_future_leak = _check_bool("allow_future_leak", allow_future_leak)
        if mode == "balanced_topw" and causal and not allow_future_leak:
            raise ValueError(
                "mode='balanced_topw' with causal=True leaks the future (a past key's cluster membership depends on later "
                "tokens); pass allow_future_leak=True to use it anyway, or use mode='causal_exact' (the default)"
            )
        if not isinstance(local_heads, int) or isinstance(local_heads, bool) or not 0 <= local_heads < num_heads:
            raise ValueError(f"local_heads must be an int in 0 .. num_heads - 1 = {num_heads - 1} (one routing head at least), got {local_heads!r}")
        self.local_heads = local_heads
        self.route_heads = num_heads - local_heads
        self.local_window = _check_int("local_window", local_window, 1)
        if local_heads and not causal:
            raise ValueError("local_heads > 0 needs causal=True (the local heads are causal sliding windows)")
        if rope_theta is not None:
            if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or rope_theta <= 0:
                raise ValueError(f"rope_theta must be a positive number or None, got {rope_theta!r}")
            if self.head_dim % 2:
                raise ValueError(f"head_dim = dim / num_heads must be even for RoPE (or pass rope_theta=None), got {self.head_dim}")
        self.rope_theta = None if rope_theta is None else float(rope_theta)
        if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be a number in [0, 1), got {ema_decay!r}")
        self.ema_decay = float(ema_decay)
        if isinstance(commitment_beta, bool) or not isinstance(commitment_beta, (int, float)) or commitment_beta < 0:
            raise ValueError(f"commitment_beta must be a number >= 0, got {commitment_beta!r}")
        self.commitment_beta = float(commitment_beta)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.cuda_graph = _check_bool("cuda_graph", cuda_graph)
        self._graphs = TrainingGraphs(type(self).__name__)
        self._stats_buf: Tensor | None = None
        self._stats_pair: tuple[Tensor, Tensor] | None = None
        self._empty_local: tuple | None = None

        d = self.head_dim
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = None if shared_qk else nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        centroids = torch.randn(self.route_heads, self.num_clusters, d)
        centroids = centroids * (math.sqrt(d) / centroids.norm(dim=-1, keepdim=True))
        self.register_buffer("centroids", centroids)
        self.register_buffer("ema_sums", centroids.clone())
        self.register_buffer("ema_counts", torch.ones(self.route_heads, self.num_clusters))
        self._pending_sums: Tensor | None = None
        self._pending_counts: Tensor | None = None
        self._pending_loss: Tensor | None = None
        # unused since the fused glue computes the k-means statistics in its kernel; kept (always None)
        # for callers that reset it (the benchmark, tests)
        self._pending_raw: list | None = None
        self._rope_cache: tuple | None = None

    # -- protocol ----------------------------------------------------------------------------
    @property
    def streamable(self) -> bool:
        return self.mode == "causal_exact" and self.causal

    def init_state(self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> RoutingState:
        dtype = dtype or self.q_proj.weight.dtype
        device = device or self.q_proj.weight.device
        d = self.head_dim
        hr = self.route_heads if self.streamable else 0
        hl = self.local_heads if self.streamable else 0
        return RoutingState(
            seen_tokens=0,
            k=torch.zeros(batch_size, 0, hr, d, device=device, dtype=dtype),
            v=torch.zeros(batch_size, 0, hr, d, device=device, dtype=dtype),
            clusters=torch.zeros(batch_size, 0, hr, device=device, dtype=torch.int64),
            k_local=torch.zeros(batch_size, 0, hl, d, device=device, dtype=dtype),
            v_local=torch.zeros(batch_size, 0, hl, d, device=device, dtype=dtype),
        )

    def state_size(self, seq_len: int) -> int:
        if not self.streamable:
            return 0
        d = self.head_dim
        return self.route_heads * (2 * seq_len * d + seq_len) + 2 * self.local_heads * min(seq_len, self.local_window - 1) * d

    def forward(self, x: Tensor, state: RoutingState | None = None) -> tuple[Tensor, RoutingState]:
        """``x [B, T, dim]`` -> ``(y [B, T, dim], state)``."""
        self.check_input(x, state)
        if state is not None and not isinstance(state, RoutingState):
            raise TypeError(f"RoutingAttention: state must be a RoutingState, got {type(state).__name__}")
        if state is not None and state.seen_tokens > 0 and not self.streamable:
            raise ValueError(
                f"RoutingAttention(mode={self.mode!r}, causal={self.causal}) cannot continue a sequence: its clusters depend "
                "on the whole sequence; call it on complete sequences (state=None), or use mode='causal_exact' with causal=True"
            )
        if self._graph_eligible(x, state):
            out = self._graphed_forward(x)
            if out is not None:
                return out
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        weights = (self.q_proj.weight, None if self.k_proj is None else self.k_proj.weight, self.v_proj.weight, self.o_proj.weight)
        rope = None
        if self.rope_theta is not None:
            rope = self._rope_tables(state.seen_tokens, x.shape[1], x.device, self._proj_dtype(x))
        fused = self._fused_for(x)
        stats = self._stats_buffers(x.device) if (fused and self.training) else None
        y, cache, losses, record = self._core(x, state, weights, self.centroids, rope, fused, stats)
        if self.training:
            if fused:
                self._record_fused(*losses)
            else:
                self._record(*record)
        return y, self._next_state(state, x, cache)

    def _core(self, x: Tensor, state: RoutingState, weights: tuple, centroids: Tensor, rope: tuple | None, fused: bool,
              stats: tuple[Tensor, Tensor] | None):
        """The layer's work on explicit operands (eager and graphed calls share it), without recording.

        ``weights = (W_q, W_k or None, W_v, W_o)``; ``rope = (cos, sin)`` of this call's positions or None;
        ``stats``: the k-means statistics the fused kernel adds into (training). Returns ``(y, (k_all, v_all,
        c_all, k_loc, v_loc), (loss_q, loss_k), (rq, cq, rk, ck) for the unfused record)``.
        """
        b, t, _ = x.shape
        h, hl, d = self.num_heads, self.local_heads, self.head_dim
        wq, wk, wv, wo = weights
        q = F.linear(x, wq).view(b, t, h, d)
        k = q if wk is None else F.linear(x, wk).view(b, t, h, d)
        v = F.linear(x, wv).view(b, t, h, d)

        # Routing by content: the un-rotated, layer-normalised (no scale, no bias) vectors.
        loss_q = loss_k = rq = rk = None
        if fused:
            # one kernel per side: layer norm in registers, nearest centroid, commitment distances and (training)
            # the k-means statistics, added into ``stats``
            beta = self.commitment_beta if (self.training and torch.is_grad_enabled() and self.commitment_beta > 0) else None
            raw_q, raw_k = q[:, :, hl:], (None if wk is None else k[:, :, hl:])
            if rope is not None and beta is not None:
                # the commitment loss rides on the rotation: one backward kernel for both gradients into q (k)
                cq, sq_q, coef_q = route_assign_distances(raw_q, centroids, beta, stats=stats)
                ck, sq_k, coef_k = (cq, None, None) if raw_k is None else route_assign_distances(raw_k, centroids, beta, stats=stats)
            else:
                cq, loss_q = route_assign(raw_q, centroids, beta, stats=stats)
                ck, loss_k = (cq, None) if raw_k is None else route_assign(raw_k, centroids, beta, stats=stats)
        else:
            rq = scale_free_layer_norm(q[:, :, hl:])
            rk = rq if wk is None else scale_free_layer_norm(k[:, :, hl:])
            cq = nearest_centroid(rq, centroids)
            ck = cq if wk is None else nearest_centroid(rk, centroids)

        if rope is not None:
            cos, sin = rope
            if fused and beta is not None:
                q, loss_q = rotary_commit(q, cos, sin, centroids, cq, sq_q, coef_q, hl=hl)
                k, loss_k = (q, None) if wk is None else rotary_commit(k, cos, sin, centroids, ck, sq_k, coef_k, hl=hl)
            else:
                rotate = rotary_fused if fused else apply_rotary
                q = rotate(q, cos, sin)
                k = q if wk is None else rotate(k, cos, sin)

        if self.mode == "causal_exact":
            q_route = q[:, :, hl:]
            if state.k.shape[1] == 0:
                # a fresh sequence: no copy; ck stays cq (shared clusters) and, with shared Q/K, the keys
                # are the very tensor of the queries, so the kernel paths sort and pack them once
                k_all, v_all, c_all = (q_route if wk is None else k[:, :, hl:]), v[:, :, hl:], ck
            else:
                k_all = torch.cat([state.k.to(k.dtype), k[:, :, hl:]], dim=1)
                v_all = torch.cat([state.v.to(v.dtype), v[:, :, hl:]], dim=1)
                c_all = torch.cat([state.clusters.to(ck.device), ck], dim=1)
            # "flex" runs whole sequences only; continuations of a sequence use SDPA
            op_backend = "torch" if self.backend in ("flex", "triton") and state.k.shape[1] > 0 else self.backend
            # ids are argmaxes over the C centroids: the kernel path sizes its layout statically (no host sync)
            y_route = causal_exact_attention(
                q_route, k_all, v_all, cq, c_all, causal=self.causal, backend=op_backend, num_clusters=self.num_clusters
            )
        else:
            mq = balanced_topw_assignment(rq, centroids, self.top_w)
            mk = mq if wk is None else balanced_topw_assignment(rk, centroids, self.top_w)
            y_route = balanced_topw_attention(q[:, :, hl:], k[:, :, hl:], v[:, :, hl:], mq, mk, causal=self.causal)
            k_all = v_all = c_all = None

        parts = [y_route]
        k_loc = v_loc = None
        if hl:
            k_loc = torch.cat([state.k_local.to(k.dtype), k[:, :, :hl]], dim=1) if self.streamable else k[:, :, :hl]
            v_loc = torch.cat([state.v_local.to(v.dtype), v[:, :, :hl]], dim=1) if self.streamable else v[:, :, :hl]
            sw_backend = "reference" if self.backend == "reference" else "auto"
            parts.insert(0, sliding_window_attention(q[:, :, :hl], k_loc, v_loc, self.local_window, backend=sw_backend))
        y = F.linear((parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)).reshape(b, t, h * d), wo)
        return y, (k_all, v_all, c_all, k_loc, v_loc), (loss_q, loss_k), (rq, cq, rk, ck)

    def _next_state(self, state: RoutingState | None, x: Tensor, cache: tuple) -> RoutingState:
        """The state after a call: the cached keys / values / ids (streaming modes), the local window's tail."""
        b, t, _ = x.shape
        seen = 0 if state is None else state.seen_tokens
        if self.streamable:
            k_all, v_all, c_all, k_loc, v_loc = cache
            keep = self.local_window - 1
            if self.local_heads:
                k_loc, v_loc = (k_loc[:, k_loc.shape[1] - min(keep, k_loc.shape[1]) :], v_loc[:, v_loc.shape[1] - min(keep, v_loc.shape[1]) :])
            elif state is not None:
                k_loc, v_loc = state.k_local, state.v_local
            else:  # no local heads: empty tensors, shared between states (nothing can be written into them)
                key = (b, x.device, x.dtype)
                if self._empty_local is None or self._empty_local[0] != key:
                    empty = self.init_state(b, x.device, x.dtype)
                    self._empty_local = (key, empty.k_local, empty.v_local)
                k_loc, v_loc = self._empty_local[1], self._empty_local[2]
            return RoutingState(seen + t, k=k_all, v=v_all, clusters=c_all, k_local=k_loc, v_local=v_loc)
        empty = self.init_state(b, x.device, x.dtype)
        empty.seen_tokens = seen + t
        return empty

    # -- CUDA graphs of training calls (cuda_graph=True) ---------------------------------------
    def _graph_eligible(self, x: Tensor, state: RoutingState | None) -> bool:
        """Graph this call: ``cuda_graph``, a CUDA training call with gradients on a fresh sequence, the fused
        causal-exact path, and not inside ``torch.compile`` (which makes graphs of its own)."""
        return (
            self.cuda_graph and x.is_cuda and self.training and torch.is_grad_enabled() and (state is None or state.seen_tokens == 0)
            and self.mode == "causal_exact" and self._fused_for(x) and not torch.compiler.is_compiling()
        )

    def _stats_views(self, device) -> tuple[Tensor, Tensor]:
        """The persistent k-means statistics buffer the fused kernels add into, as ``(sums [H, C, D], counts
        [H, C])`` views (made once; a graphed call captures their address, so a new buffer drops the graphs)."""
        h, c, d = self.route_heads, self.num_clusters, self.head_dim
        if self._stats_buf is None or self._stats_buf.device != device:
            self._stats_buf = torch.zeros(h * c * (d + 1), dtype=torch.float32, device=device)
            self._stats_pair = (self._stats_buf[: h * c * d].view(h, c, d), self._stats_buf[h * c * d :].view(h, c))
            self._graphs.reset()
        return self._stats_pair

    def _adopt_pending(self, sums: Tensor, counts: Tensor) -> None:
        """Make the pending k-means statistics live in the persistent buffer (``sums``, ``counts``), keeping any
        recorded by earlier calls (after ``update_centroids`` there are none: the buffer is zeroed)."""
        if self._pending_sums is not None and self._pending_sums.data_ptr() == sums.data_ptr() and self._pending_counts is not None \
                and self._pending_counts.data_ptr() == counts.data_ptr():
            return
        old_sums, old_counts = self._pending_sums, self._pending_counts
        self._stats_buf.zero_()
        if old_sums is not None:
            sums += old_sums.to(sums)
            counts += old_counts.to(counts)
        self._pending_sums, self._pending_counts = sums, counts

    def _graphed_forward(self, x: Tensor) -> tuple[Tensor, RoutingState] | None:
        """A training call replayed from this shape's CUDA graphs (captured at the first such call); None when it
        must run eagerly (the previous graphed call's backward is still pending)."""
        b, t, _ = x.shape
        sums, counts = self._stats_buffers(x.device)  # the pending statistics, in the buffer the graph adds into
        weights = [self.q_proj.weight, self.v_proj.weight, self.o_proj.weight] + ([] if self.k_proj is None else [self.k_proj.weight])
        rope = list(self._rope_tables(0, t, x.device, self._proj_dtype(x))) if self.rope_theta is not None else []
        args = (x, *weights, self.centroids, *rope)
        key = (tuple(x.shape), x.dtype, x.device, x.requires_grad, tuple(w.requires_grad for w in weights), autocast_key(),
               self.commitment_beta > 0, self.backend, self.causal)
        n_w = len(weights)

        def body(x, *rest):
            wq, wv, wo = rest[:3]
            wk = rest[3] if n_w == 4 else None
            centroids = rest[n_w]
            rope_ = tuple(rest[n_w + 1 :]) or None
            y, cache, (lq, lk), _ = self._core(x, self.init_state(b, x.device, x.dtype), (wq, wk, wv, wo), centroids, rope_, True,
                                               (sums, counts))
            loss = torch.zeros((), device=x.device, dtype=y.dtype) if lq is None else (lq if lk is None else (lq + lk) / 2)
            return (y, loss, *(c.detach() for c in cache if c is not None))  # no local heads: no k_loc / v_loc

        # a capture's warm-up calls also add into the statistics buffer: it is restored after one
        snapshot = None if key in self._graphs else self._stats_buf.clone()
        out = self._graphs.run(key, body, args, after_capture=None if snapshot is None else (lambda: self._stats_buf.copy_(snapshot)))
        if out is None:
            return None
        y, loss, *cache = out
        if len(cache) == 3:
            cache += [None, None]
        if self.commitment_beta > 0:
            self._record_fused(loss.clone(), None)  # a copy: the graph's output is overwritten by the next replay
        # the state's tensors are graph outputs like y: valid until the next graphed call (see ``cuda_graph``)
        return y, self._next_state(None, x, tuple(cache))

    def _proj_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype of the projections' outputs (the autocast dtype under autocast)."""
        kind = x.device.type
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype

    def _fused_for(self, x: Tensor) -> bool:
        """Whether a call on ``x`` takes the fused routing glue (see ``FUSED_GLUE``)."""
        if self.mode != "causal_exact" or FUSED_GLUE == "off" or not route_assign_supports(x.device, self._proj_dtype(x), self.head_dim):
            return False
        return FUSED_GLUE == "on" or x.is_cuda

    def _rope_tables(self, start: int, t: int, device, dtype) -> tuple[Tensor, Tensor]:
        """RoPE tables of positions ``start .. start + t - 1``; the last ones are kept (repeated calls of one
        shape, as in training, skip the ~10 small launches of building them)."""
        key = (start, t, str(device), dtype, self.rope_theta, self.head_dim)
        if self._rope_cache is None or self._rope_cache[0] != key:
            pos = torch.arange(start, start + t, device=device)
            self._rope_cache = (key, *rotary_cos_sin(pos, self.head_dim, self.rope_theta, dtype=dtype))
        return self._rope_cache[1], self._rope_cache[2]

    def _apply(self, fn, recurse=True):
        # Statistics recorded but not yet applied follow the module to its new device / dtype
        # (.to(), .cuda(), .double()); otherwise the next training forward would add tensors on
        # two devices.
        self._flush_raw()
        self._rope_cache = None
        self._graphs.reset()  # the graphs read buffers by address: moved buffers need new graphs
        self._stats_buf = self._stats_pair = self._empty_local = None
        out = super()._apply(fn, recurse)
        for name in ("_pending_sums", "_pending_counts"):
            if getattr(self, name, None) is not None:
                setattr(self, name, fn(getattr(self, name)))
        return out

    # -- online k-means: the explicit API a training loop calls -------------------------------
    def _record(self, rq: Tensor, cq: Tensor, rk: Tensor, ck: Tensor) -> None:
        """Accumulate this call's k-means statistics (no gradient) and commitment loss (with gradient)."""
        pairs = [(rq, cq)] if self.k_proj is None else [(rq, cq), (rk, ck)]
        for r, c in pairs:
            sums, counts = kmeans_batch_stats(r, c, self.num_clusters)
            self._pending_sums = sums if self._pending_sums is None else self._pending_sums + sums
            self._pending_counts = counts if self._pending_counts is None else self._pending_counts + counts
        if torch.is_grad_enabled() and self.commitment_beta > 0:
            loss = sum(commitment_loss(r, self.centroids, c, self.commitment_beta) for r, c in pairs) / len(pairs)
            self._pending_loss = loss if self._pending_loss is None else self._pending_loss + loss

    def _stats_buffers(self, device) -> tuple[Tensor, Tensor]:
        """The pending k-means ``(sums [H_route, C, D], counts [H_route, C])`` (float32) that the fused kernel
        adds a training call's statistics into, in place: views of the layer's one persistent buffer
        (``_stats_views``; a graphed call captures its address), holding what earlier calls recorded."""
        sums, counts = self._stats_views(device)
        self._adopt_pending(sums, counts)
        return sums, counts

    def _record_fused(self, loss_q, loss_k) -> None:
        """The fused path's record: its kernel already added the k-means statistics (``_stats_buffers``);
        here the commitment loss (computed by the same kernel)."""
        if loss_q is not None:
            loss = loss_q if loss_k is None else (loss_q + loss_k) / 2
            self._pending_loss = loss if self._pending_loss is None else self._pending_loss + loss

    def _flush_raw(self) -> None:
        """A no-op kept for callers of the former deferred k-means statistics (``mnemo bench routed`` calls it
        after each step): the fused kernel now adds them during the forward, so nothing waits to be folded."""
        self._pending_raw = None

    def routing_aux_loss(self) -> Tensor:
        """The commitment loss ``beta * mean ||r - sg(mu_c(r))||^2`` of the training-mode forward calls
        since the last call of this method (summed over those calls), then forgets it.

        Add it to the training loss before ``backward()``. Its gradient reaches the query/key
        projections through the routing vectors, never the centroids. Returns a zero scalar if
        nothing was recorded (eval mode, ``torch.no_grad()``, ``commitment_beta=0``).
        """
        loss = self._pending_loss
        self._pending_loss = None
        if loss is None:
            return torch.zeros((), device=self.q_proj.weight.device, dtype=self.q_proj.weight.dtype)
        return loss

    @torch.no_grad()
    def update_centroids(self, sync: bool = True) -> bool:
        """One EMA k-means step (decay ``ema_decay``) on the statistics recorded by the training-mode
        forward calls since the last update, then clears them (and any unclaimed aux loss).

        Call it once per optimizer step, after ``optimizer.step()``. With ``sync`` and an initialised
        ``torch.distributed`` process group the statistics are summed over ranks first (every rank
        must call it). Returns whether an update happened (False when nothing was recorded).
        """
        self._flush_raw()
        sums, counts = self._pending_sums, self._pending_counts
        self._pending_sums = self._pending_counts = self._pending_loss = None
        if sums is None:
            return False
        if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(counts)
        work = torch.float64 if self.ema_sums.dtype == torch.float64 else torch.float32
        centroids, new_sums, new_counts = kmeans_ema_step(
            self.ema_sums.to(work), self.ema_counts.to(work), sums.to(work), counts.to(work), self.ema_decay, math.sqrt(self.head_dim)
        )
        self.centroids.copy_(centroids)
        self.ema_sums.copy_(new_sums)
        self.ema_counts.copy_(new_counts)
        return True

    def extra_repr(self) -> str:
        s = f"mode={self.mode!r}, num_clusters={self.num_clusters}, shared_qk={self.shared_qk}, route_heads={self.route_heads}"
        if self.mode == "balanced_topw":
            s += f", top_w={self.top_w}, allow_future_leak={self.allow_future_leak}"
        if self.local_heads:
            s += f", local_heads={self.local_heads}, local_window={self.local_window}"
        return s + ("" if self.causal else ", causal=False")


def routing_layers(model: nn.Module) -> list[RoutingAttention]:
    """Every :class:`RoutingAttention` inside ``model`` (works through DDP/FSDP wrappers)."""
    return [m for m in model.modules() if isinstance(m, RoutingAttention)]


def routing_aux_loss(model: nn.Module) -> Tensor:
    """Sum of :meth:`RoutingAttention.routing_aux_loss` over the routing layers of ``model`` (0 if none)."""
    layers = routing_layers(model)
    if not layers:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    return sum((m.routing_aux_loss() for m in layers[1:]), layers[0].routing_aux_loss())


def update_routing_centroids(model: nn.Module, sync: bool = True) -> int:
    """Call :meth:`RoutingAttention.update_centroids` on every routing layer; returns how many updated."""
    return sum(int(m.update_centroids(sync=sync)) for m in routing_layers(model))


__all__ = ["RoutingAttention", "RoutingState", "routing_aux_loss", "routing_layers", "update_routing_centroids"]
