"""Landmark attention (Mohtashami & Jaggi, 2023, arXiv:2305.16300) as a mixer: ``landmark``.

The input is laid out with a landmark token after every ``block_len`` ordinary tokens (build it with
:func:`mnemotorch.ops.landmark.insert_landmarks`); position ``p`` is a landmark iff
``p % (block_len + 1) == block_len``. The mixer reads the layout from the absolute positions (it
sees hidden states, not token ids), so the *data* must follow it: check token ids with
:func:`mnemotorch.ops.landmark.check_landmarks`, which names the first missing landmark.

Two modes, switchable on a trained model (:func:`set_landmark_mode`):

* ``"exact"`` (training, and the default): the grouped softmax over every earlier block, gated by
  its landmark, plus the own block (:func:`mnemotorch.ops.landmark.landmark_attention`: the
  block-gated Triton kernel on CUDA, the float64-ready reference elsewhere). State: every key and
  value (a KV cache), so streaming reproduces the full pass exactly.
* ``"retrieval"`` (inference): each query keeps only the ``top_k`` earlier blocks with the best
  landmark scores, per head and per token (``granularity="token"``) or per head and per query
  block (``"block"``), and attends to them with the same gated weights
  (:mod:`mnemotorch.ops.landmark.retrieval`). Complete blocks move to a store in ``offload_device``
  memory (CPU by default; pinned when the compute device is CUDA), which grows by doubling its
  capacity (amortised O(1) per block); the compute device holds only the landmark keys (one key per
  block, ``1 / (block_len + 1)`` of the cache), the current block and the blocks fetched for the
  current query block. Inputs longer than ``prefill_chunk`` positions are processed in chunks of
  that many (projections included), so device memory stays bounded however long a prefill is fed
  in one call. ``top_k`` >= the number of blocks gives the exact mode's outputs.

Positions: RoPE at absolute positions (``rope_theta=None`` for no positions; the paper's
position remapping for retrieved blocks is not implemented, see docs/mixers/landmark.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..ops.landmark import GRANULARITIES, landmark_attention, retrieve_and_attend
from ..ops.landmark.retrieval import BlockStore, _topk_stable
from ..ops.rotary import apply_rotary, rotary_cos_sin
from .base import Mixer, MixerState
from .registry import register_mixer

MODES = ("exact", "retrieval")


@dataclass
class LandmarkState(MixerState):
    """Exact mode: rotated keys and values of every position ``[B, T, Hkv, D]``."""

    k: Tensor
    v: Tensor


@dataclass
class LandmarkRetrievalState(MixerState):
    """Retrieval mode.

    ``landmark_k [B, nb, Hkv, D]`` (compute device): the landmark key of each complete block;
    ``store_k, store_v [B, nb, l + 1, Hkv, D]`` (offload device): the complete blocks;
    ``cur_k, cur_v [B, r, Hkv, D]`` (compute device): the current, incomplete block;
    ``selected [B, H, kk]`` (``granularity="block"``): the blocks the current query block uses.

    ``landmark_k``, ``store_k`` and ``store_v`` are views into the growable buffers of
    ``landmark_store`` and ``kv_store`` (:class:`~mnemotorch.ops.landmark.retrieval.BlockStore`),
    shared with the later states of the sequence; those only ever write past this state's blocks,
    so a state stays a value. A state whose tensors were replaced (``index_select_batch``), or an
    earlier state continued again (a branch), gets its own copy of the store before anything is
    written. Outside autograd the store is written in place (amortised O(1) per block); under
    autograd each call builds a new one, as ``torch.cat`` would.
    """

    landmark_k: Tensor
    store_k: Tensor
    store_v: Tensor
    cur_k: Tensor
    cur_v: Tensor
    selected: Tensor
    kv_store: BlockStore | None = field(default=None, repr=False, compare=False)
    landmark_store: BlockStore | None = field(default=None, repr=False, compare=False)


def _check_int(name: str, value, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


@register_mixer("landmark")
class LandmarkAttention(Mixer):
    """Landmark attention: grouped softmax over landmark-gated blocks; top-k block retrieval at inference.

    Args:
        dim: model width; num_heads: query heads.
        block_len: ordinary tokens per block ``l`` (a landmark closes each block; the paper uses 50).
        mode: ``"exact"`` (grouped softmax over all blocks) or ``"retrieval"`` (top-k blocks).
        top_k: blocks retrieved per query (or query block) and head in retrieval mode.
        granularity: ``"token"`` or ``"block"``: what shares one retrieved set (with the head).
        offload_device: where retrieval mode keeps complete KV blocks (``None``: the compute device).
        prefill_chunk: retrieval mode processes inputs longer than this many positions in chunks of
            this many, each exactly as if fed in its own call (``None``: the whole input at once).
        pin_memory: keep the offloaded store in pinned (page-locked) host memory when the compute
            device is CUDA (fetches go through a pinned staging buffer either way).
        num_kv_heads: key/value heads (GQA; default ``num_heads``).
        rope_theta: RoPE base at absolute positions; ``None`` for no positions.
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` for the exact mode's attention.
    """

    description = "Landmark attention: grouped softmax over landmark-gated blocks, top-k block retrieval with CPU-offloaded KV (Mohtashami & Jaggi 2023)"
    example_kwargs = {"block_len": 3, "num_kv_heads": 2}
    demo_kwargs = {"block_len": 7}

    def __init__(
        self,
        dim: int,
        num_heads: int,
        block_len: int = 50,
        mode: str = "exact",
        top_k: int = 4,
        granularity: str = "token",
        offload_device: str | torch.device | None = "cpu",
        num_kv_heads: int | None = None,
        rope_theta: float | None = 10000.0,
        backend: str = "auto",
        prefill_chunk: int | None = 2048,
        pin_memory: bool = True,
    ):
        super().__init__(dim, num_heads)
        self.block_len = _check_int("block_len", block_len, 1)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if not isinstance(num_kv_heads, int) or isinstance(num_kv_heads, bool) or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads must be a positive divisor of num_heads ({num_heads}), got {num_kv_heads!r}")
        if rope_theta is not None and self.head_dim % 2:
            raise ValueError(f"head_dim = dim / num_heads must be even for RoPE (or pass rope_theta=None), got {self.head_dim}")
        if backend not in ("auto", "triton", "reference"):
            raise ValueError(f"backend must be one of ('auto', 'triton', 'reference'), got {backend!r}")
        self.num_kv_heads = num_kv_heads
        self.rope_theta = None if rope_theta is None else float(rope_theta)
        self.backend = backend
        self.offload_device = None if offload_device is None else torch.device(offload_device)
        self.prefill_chunk = None if prefill_chunk is None else _check_int("prefill_chunk", prefill_chunk, 1)
        self.pin_memory = bool(pin_memory)
        self.set_mode(mode, top_k=top_k, granularity=granularity)
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)

    def set_mode(self, mode: str, top_k: int | None = None, granularity: str | None = None) -> None:
        """Switch between ``"exact"`` and ``"retrieval"`` (states of the other mode are rejected)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        top_k = getattr(self, "top_k", 4) if top_k is None else top_k
        granularity = getattr(self, "granularity", "token") if granularity is None else granularity
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.mode = mode
        self.top_k = _check_int("top_k", top_k, 1)
        self.granularity = granularity

    # -- state ----------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None, dtype=None) -> LandmarkState | LandmarkRetrievalState:
        dtype = dtype or self.q_proj.weight.dtype
        device = device or self.q_proj.weight.device
        empty = torch.zeros(batch_size, 0, self.num_kv_heads, self.head_dim, device=device, dtype=dtype)
        if self.mode == "exact":
            return LandmarkState(seen_tokens=0, k=empty, v=empty.clone())
        store = torch.zeros(batch_size, 0, self.block_len + 1, self.num_kv_heads, self.head_dim, device=self._store_device(device), dtype=dtype)
        selected = torch.zeros(batch_size, self.num_heads, 0, dtype=torch.long, device=device)
        return LandmarkRetrievalState(0, empty, store, store.clone(), empty.clone(), empty.clone(), selected)

    def _store_device(self, device) -> torch.device:
        return torch.device(device) if self.offload_device is None else self.offload_device

    def state_size(self, seq_len: int) -> int:
        per_token = self.num_kv_heads * self.head_dim
        if self.mode == "exact":
            return 2 * seq_len * per_token
        step = self.block_len + 1
        nb, r = divmod(seq_len, step)
        selected = self.num_heads * min(self.top_k, nb) if self.granularity == "block" else 0
        return (2 * nb * step + nb + 2 * r) * per_token + selected

    # -- forward ----------------------------------------------------------------------------------
    def _project(self, x: Tensor, offset: int) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.rope_theta is None:
            return q, k, v
        cos, sin = rotary_cos_sin(torch.arange(offset, offset + t, device=x.device), self.head_dim, self.rope_theta, dtype=q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x: Tensor, state: LandmarkState | LandmarkRetrievalState | None = None):
        """``x [B, T, dim]`` (landmark layout by absolute position) -> ``(y [B, T, dim], state)``."""
        self.check_input(x, state)
        want = LandmarkState if self.mode == "exact" else LandmarkRetrievalState
        if state is not None and not isinstance(state, want):
            raise TypeError(f"LandmarkAttention: mode {self.mode!r} needs a {want.__name__}, got {type(state).__name__} (mode switched mid-sequence?)")
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        b, t, _ = x.shape
        chunk = self.prefill_chunk if self.mode == "retrieval" else None
        if chunk is None or t <= chunk:
            return self._forward_piece(x, state, reserve=(state.seen_tokens + t) // (self.block_len + 1))
        # Long input in retrieval mode: project and attend chunk by chunk, so that device memory is
        # bounded by the chunk, not the input. The state carries everything, so this is exactly
        # feeding the chunks one at a time; the store is sized once for the whole input.
        reserve = (state.seen_tokens + t) // (self.block_len + 1)
        y = None
        for start in range(0, t, chunk):
            out, state = self._forward_piece(x[:, start : start + chunk], state, reserve=reserve)
            if y is None:
                y = out.new_empty(b, t, out.shape[-1])
            y[:, start : start + out.shape[1]] = out
        return y, state

    def _forward_piece(self, x: Tensor, state: LandmarkState | LandmarkRetrievalState, reserve: int = 0):
        b, t, _ = x.shape
        q, k, v = self._project(x, state.seen_tokens)
        if self.mode == "exact":
            k_all = torch.cat([state.k.to(k.dtype), k], dim=1)
            v_all = torch.cat([state.v.to(v.dtype), v], dim=1)
            y = landmark_attention(q, k_all, v_all, self.block_len, backend=self.backend)
            new_state = LandmarkState(seen_tokens=state.seen_tokens + t, k=k_all, v=v_all)
        else:
            y, new_state = self._retrieval_forward(q, k, v, state, reserve)
        return self.o_proj(y.reshape(b, t, self.num_heads * self.head_dim)), new_state

    def _retrieval_forward(self, q: Tensor, k: Tensor, v: Tensor, state: LandmarkRetrievalState, reserve: int = 0):
        step, l = self.block_len + 1, self.block_len
        scale = self.head_dim**-0.5
        total = q.shape[1]
        grad = torch.is_grad_enabled() and any(
            a.requires_grad for a in (q, k, v, state.landmark_k, state.store_k, state.store_v, state.cur_k, state.cur_v)
        )
        # The call's keys/values from the start of the current block: kk[:, j * step] opens block nb0 + j.
        kk = torch.cat([state.cur_k.to(k.dtype), k], dim=1)
        vv = torch.cat([state.cur_v.to(v.dtype), v], dim=1)
        r0, nb0 = state.cur_k.shape[1], state.landmark_k.shape[1]
        n_new = (r0 + total) // step
        # Every block this call completes joins the index and the store up front (one copy to the
        # offload device per call); segment j only ever looks at the first nb0 + j of them.
        reserve = max(reserve, nb0 + n_new)
        sk, sv = state.store_k, state.store_v
        kv_store = _extended(
            state.kv_store,
            (sk, sv),
            tuple(a[:, : n_new * step].unflatten(1, (n_new, step)) for a in (kk, vv)),
            device=sk.device,
            dtype=sk.dtype,
            pin=self.pin_memory and sk.device.type == "cpu" and q.device.type == "cuda",
            reserve=reserve,
            grad=grad,
        )
        lm_store = _extended(
            state.landmark_store,
            (state.landmark_k,),
            (kk[:, l : n_new * step : step],),
            device=k.device,
            dtype=k.dtype,
            pin=False,
            reserve=reserve,
            grad=grad,
        )
        (lm_all,), (sk_all, sv_all) = lm_store.views(nb0 + n_new), kv_store.views(nb0 + n_new)
        sel, outs, t = state.selected, [], 0
        # One segment per landmark block touched by this call: its queries share the own block and
        # (per query block) one fetch of the retrieved blocks.
        while t < total:
            j, off = divmod(r0 + t, step)
            n = min(total - t, step - off)
            nb = nb0 + j
            chosen = sel if self.granularity == "block" else None
            own = slice(j * step, r0 + t + n)
            y, _ = retrieve_and_attend(
                q[:, t : t + n], kk[:, own], vv[:, own], off, lm_all[:, :nb], sk_all[:, :nb], sv_all[:, :nb],
                l, self.top_k, scale, chosen, store=kv_store,
            )
            outs.append(y)
            t += n
            if off + n == step and self.granularity == "block":
                # The block is complete; its landmark's query picks the blocks of the next query
                # block (causal, fetched once).
                rep = self.num_heads // self.num_kv_heads
                lm = lm_all[:, : nb + 1].repeat_interleave(rep, dim=2)
                scores = torch.einsum("bhd,bnhd->bhn", q[:, t - 1], lm) * scale
                sel = _topk_stable(scores, min(self.top_k, nb + 1))
        # clone: the remainder must not keep the whole call's keys and values alive
        cur_k, cur_v = kk[:, n_new * step :].clone(), vv[:, n_new * step :].clone()
        new_state = LandmarkRetrievalState(state.seen_tokens + total, lm_all, sk_all, sv_all, cur_k, cur_v, sel, kv_store, lm_store)
        return torch.cat(outs, dim=1), new_state

    def extra_repr(self) -> str:
        return f"block_len={self.block_len}, mode={self.mode!r}, top_k={self.top_k}, granularity={self.granularity!r}"


def _extended(
    store: BlockStore | None, views: tuple[Tensor, ...], new: tuple[Tensor, ...], *, device, dtype, pin: bool, reserve: int, grad: bool
) -> BlockStore:
    """A store whose first blocks are ``views`` (a state's), followed by ``new``.

    Appends in place when ``store`` belongs to the state and nobody has appended since (the usual
    chain of states); otherwise copies ``views`` into a new store first, so that states stay values.
    Under autograd every call builds a new store (in-place writes into a buffer the graph has read
    would be unsafe), as ``torch.cat`` would.
    """
    n = new[0].shape[1]
    fits = store is not None and store.buffers[0].dtype == dtype and store.buffers[0].device == torch.device(device)
    if n == 0 and fits and store.holds(views):
        return store
    if grad or not (fits and store.can_append(views)):
        nb = views[0].shape[1]
        store = BlockStore.from_views(views, nb + n if grad else max(reserve, nb + n), pin=pin, device=device, dtype=dtype)
    store.append(new, min_capacity=reserve)
    store.frozen = grad
    return store


def set_landmark_mode(module: nn.Module, mode: str, top_k: int | None = None, granularity: str | None = None) -> int:
    """Switch every ``landmark`` mixer inside ``module`` (e.g. a trained model); returns how many."""
    count = 0
    for m in module.modules():
        if isinstance(m, LandmarkAttention):
            m.set_mode(mode, top_k=top_k, granularity=granularity)
            count += 1
    return count
