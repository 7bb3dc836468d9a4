"""Titans architectures: memory as a context (``titans_mac``), a gate (``titans_mag``), a layer (``titans_mal``).

Behrouz, Zhong & Mirrokni, "Titans: Learning to Memorize at Test Time" (arXiv 2501.00663), §4.
Each combines three memories: attention (short-term, exact), the neural long-term memory
(:class:`~mnemotorch.layers.titans.TitansLMM`, trained at test time) and ``N_p`` persistent
tokens (learned, input-independent). With ``⊗(a, b) = RMSNorm_a(a) ⊙ σ(RMSNorm_b(b))``
(learned norm weights, sigmoid; §4.2)::

    MAC (§4.1), per segment S of C tokens:
        h = M*_{start}(q)             read the memory as it was when the segment began (no update)
        y = Attn([P ‖ h ‖ S])         causal over positions: query i sees P, h_{≤i}, S_{≤i}
        M ← M(y)                      write the attention output into the memory, token by token
        o = W_O (y ⊗ M*_t(y_t))       read the updated memory with the attention output
    MAG (§4.2):  x̃ = [P ‖ x];  o = W_O (SWA*(x̃) ⊗ M(x̃))     SWA* = sliding window + the prefix P
    MAL (§4.3):  x̃ = [P ‖ x];  o = SWA(M(x̃))

The memory is the ``titans_lmm`` module (q/k/v projections, depthwise causal convs, SiLU, ℓ2-normalised
q/k, per-token θ/η/α, chunk-frozen gradients); the attention reuses the projections and RoPE of
``layers.attention`` and the masks of ``ops.block_sparse``. Equations, choices where the paper is
ambiguous, and the state each variant keeps: ``docs/mixers/titans.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.rotary import apply_rotary, rotary_cos_sin
from .attention import CausalSelfAttention, KVState, SlidingWindowAttention
from .base import Mixer, MixerState
from .registry import register_mixer
from .titans import MAX_GRAD_NORM, MAX_MOMENTUM, TitansLMM, TitansState

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_int(name: str, value, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


@lru_cache(maxsize=32)
def _sink_window_pattern(q_len: int, window: int, n_sink: int, device: str):
    from ..ops.block_sparse import sink_window_pattern

    return sink_window_pattern(q_len, window, n_sink, k_len=n_sink + q_len, device=device)


def prefix_window_attention(
    q: Tensor, k: Tensor, v: Tensor, n_prefix: int, window: int, backend: str = "auto", chunk: int = 512
) -> Tensor:
    """Sliding-window attention with an always-visible prefix (the paper's ``SW-Attn*``).

    Args:
        q: ``[B, Tq, H, D]``, the last ``Tq`` tokens of the key run.
        k, v: ``[B, n_prefix + Tr, H, D]``: the ``n_prefix`` prefix keys, then a contiguous run of
            ``Tr >= Tq`` token keys ending with the queries' own.
        n_prefix: prefix keys every query sees. window: ``W``, token keys each query sees, itself included.
        backend: ``"auto"`` (the block-sparse Triton kernel on CUDA for whole sequences, else masked
            SDPA), ``"triton"`` (force the kernel; CPU interpreter in tests) or ``"reference"``.

    Returns:
        ``[B, Tq, H, D]``.
    """
    b, tq, h, d = q.shape
    tr = k.shape[1] - n_prefix
    whole = tr == tq  # no cached keys: the layout is exactly [prefix ‖ x], the kernel's pattern
    kernel_ok = whole and q.dtype in _KERNEL_DTYPES and 16 <= d <= 256 and v.shape[-1] == d
    if kernel_ok and (backend == "triton" or (backend == "auto" and q.is_cuda and tq >= 16)):
        from ..ops.block_sparse import block_sparse_attention

        pattern = _sink_window_pattern(tq, window, n_prefix, str(q.device))
        return block_sparse_attention(q, k, v, pattern, backend="triton")
    offset = tr - tq  # token index (in the run) of the first query
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    outs = []
    for s in range(0, tq, chunk):
        e = min(tq, s + chunk)
        lo = max(0, offset + s - window + 1)  # first run key any query of the chunk can see
        cols = torch.cat([torch.arange(n_prefix, device=q.device), n_prefix + torch.arange(lo, offset + e, device=q.device)])
        qpos = torch.arange(offset + s, offset + e, device=q.device)[:, None]
        rpos = torch.arange(lo, offset + e, device=q.device)[None, :]
        band = (rpos <= qpos) & (rpos > qpos - window)
        mask = torch.cat([torch.ones(e - s, n_prefix, dtype=torch.bool, device=q.device), band], dim=1)
        o = F.scaled_dot_product_attention(q[:, s:e].transpose(1, 2), kt[:, :, cols], vt[:, :, cols], attn_mask=mask)
        outs.append(o.transpose(1, 2))
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


class _TitansHybrid(Mixer):
    """Shared parts: the LMM, the persistent tokens, and the ``⊗`` combination."""

    def _build_common(self, num_persistent: int, depth: int, expansion: int, activation: str, chunk_size: int,
                      conv_size: int, max_lr: float, output_gate: bool, max_momentum: float = MAX_MOMENTUM,
                      max_grad_norm: float | None = MAX_GRAD_NORM) -> None:
        self.num_persistent = _check_int("num_persistent", num_persistent, 0)
        self.memory = TitansLMM(
            self.dim, self.num_heads, depth=depth, expansion=expansion, activation=activation,
            chunk_size=chunk_size, conv_size=conv_size, output_gate=output_gate, max_lr=max_lr,
            max_momentum=max_momentum, max_grad_norm=max_grad_norm,
            init_theta=min(0.01, 0.1 * max_lr) if isinstance(max_lr, (int, float)) and max_lr > 0 else 0.01,
        )  # fmt: skip  (θ starts at the LMM's 0.01, or at max_lr / 10 for a smaller max_lr)
        self.persistent = nn.Parameter(torch.empty(num_persistent, self.dim)) if num_persistent else None

    def _build_gate(self) -> None:
        self.norm_attn = nn.RMSNorm(self.dim, eps=1e-6)
        self.norm_memory = nn.RMSNorm(self.dim, eps=1e-6)
        self.o_proj = nn.Linear(self.dim, self.dim, bias=False)

    def _combine(self, y: Tensor, m: Tensor) -> Tensor:
        """``W_O (y ⊗ m)``: both branches normalised with learned vectors, the memory gates (§4.2)."""
        return self.o_proj(self.norm_attn(y) * torch.sigmoid(self.norm_memory(m)))

    def reset_mixer_parameters(self) -> None:
        """Persistent tokens at the scale of the RMS-normalised hidden states the mixer reads."""
        if self.persistent is not None:
            with torch.no_grad():
                self.persistent.normal_(0.0, 1.0)

    def _persistent_tokens(self, batch_size: int, device, dtype) -> Tensor:
        """``[B, N_p, dim]`` (a broadcast view of the one learned set)."""
        return self.persistent.to(device=device, dtype=dtype).unsqueeze(0).expand(batch_size, -1, -1)

    def _check_state(self, x: Tensor, state: MixerState | None, cls: type) -> None:
        self.check_input(x, state)
        if state is not None and not isinstance(state, cls):
            raise TypeError(f"{type(self).__name__}: state must be a {cls.__name__} returned by this mixer or None, got {type(state).__name__}")

    def _memory_state(self, state, seen: int) -> TitansState:
        return TitansState(seen_tokens=seen, weights=state.weights, momentum=state.momentum, chunk_start=state.chunk_start, conv=state.conv)

    @property
    def _dtype(self) -> torch.dtype:
        return self.memory.o_proj.weight.dtype

    @property
    def _device(self) -> torch.device:
        return self.memory.o_proj.weight.device


# ----------------------------------------------------------------------------------------------
# MAG: memory as a gate
# ----------------------------------------------------------------------------------------------
@dataclass
class TitansMAGState(MixerState):
    """LMM weights / momentum / chunk-start ``[B, H, P]``, its conv window ``[B, K−1, 3·dim]``, and the
    last ``min(t, W−1)`` rotated keys / values of the window ``[B, ·, H, D]`` (the persistent tokens'
    keys are recomputed from the parameters)."""

    weights: Tensor
    momentum: Tensor
    chunk_start: Tensor
    conv: Tensor
    k: Tensor
    v: Tensor


@register_mixer("titans_mag")
class TitansMAG(_TitansHybrid):
    """Titans MAG (memory as a gate): sliding-window attention with a persistent prefix, gated by the LMM.

    ``x̃ = [P ‖ x]``; ``o = W_O(RMSNorm(SWA*(x̃)) ⊙ σ(RMSNorm(M(x̃))))`` where ``SWA*`` sees the
    ``N_p`` persistent tokens always plus the last ``window`` tokens, and ``M`` is the LMM
    (``titans_lmm`` without its own output gate) that reads the persistent tokens first.

    Args:
        dim, num_heads: model width and heads (``head_dim`` even, for RoPE).
        window: ``W``, tokens each query sees (itself included) besides the persistent ones.
        num_persistent: ``N_p`` learned tokens prefixed to every sequence (0 disables them).
        depth, expansion, activation, chunk_size, conv_size, max_lr, max_momentum, max_grad_norm: the LMM's (see ``titans_lmm``).
        rope_theta: RoPE base of the attention. backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    ``state_size(T) = 3HP + 3(K−1)·dim + 2·min(T, W−1)·dim``: bounded.
    """

    description = "Titans MAG: sliding-window attention (+ persistent tokens) gated by the neural long-term memory (Behrouz et al. 2024)"
    example_kwargs = {"window": 8, "num_persistent": 2, "chunk_size": 4, "depth": 2, "expansion": 2, "conv_size": 3}
    demo_kwargs = {"window": 32, "num_persistent": 4, "chunk_size": 16, "depth": 2, "expansion": 2}

    def __init__(self, dim: int, num_heads: int, window: int = 64, num_persistent: int = 4, depth: int = 2, expansion: int = 4,
                 activation: str = "silu", chunk_size: int = 64, conv_size: int = 4, max_lr: float = 0.1,
                 max_momentum: float = MAX_MOMENTUM, max_grad_norm: float | None = MAX_GRAD_NORM,
                 rope_theta: float = 10000.0, backend: str = "auto"):
        super().__init__(dim, num_heads)
        self.attn = SlidingWindowAttention(dim, num_heads, window=window, rope_theta=rope_theta, backend=backend)
        self._build_common(num_persistent, depth, expansion, activation, chunk_size, conv_size, max_lr, output_gate=False,
                           max_momentum=max_momentum, max_grad_norm=max_grad_norm)
        self._build_gate()
        self.reset_mixer_parameters()

    @property
    def window(self) -> int:
        """``W``, the attention branch's sliding window."""
        return self.attn.window

    def init_state(self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TitansMAGState:
        device, dtype = device or self._device, dtype or self._dtype
        mem = self.memory.init_state(batch_size, device, dtype)
        if self.persistent is not None:  # the memory reads x̃ = [P ‖ x]: write the prefix first
            _, mem = self.memory(self._persistent_tokens(batch_size, device, dtype), mem)
        empty = torch.zeros(batch_size, 0, self.num_heads, self.head_dim, device=device, dtype=dtype)
        return TitansMAGState(0, mem.weights, mem.momentum, mem.chunk_start, mem.conv, empty, empty.clone())

    def state_size(self, seq_len: int) -> int:
        return self.memory.state_size(seq_len) + 2 * min(seq_len, self.window - 1) * self.dim

    def forward(self, x: Tensor, state: TitansMAGState | None = None) -> tuple[Tensor, TitansMAGState]:
        """``x [B, T, dim]`` -> ``(y [B, T, dim], state)``."""
        self._check_state(x, state, TitansMAGState)
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        b, t, _ = x.shape
        n_p, seen = self.num_persistent, state.seen_tokens
        m, mem = self.memory(x, self._memory_state(state, n_p + seen))
        # Positions in x̃: persistent tokens at 0..N_p−1, token s at N_p + s.
        q, k, v = self.attn._project(x, n_p + seen)
        k_run = torch.cat([state.k.to(k.dtype), k], dim=1)
        v_run = torch.cat([state.v.to(v.dtype), v], dim=1)
        if self.persistent is not None:
            _, kp, vp = self.attn._project(self._persistent_tokens(b, x.device, x.dtype), 0)
            k_all, v_all = torch.cat([kp.to(k.dtype), k_run], 1), torch.cat([vp.to(v.dtype), v_run], 1)
        else:
            k_all, v_all = k_run, v_run
        y = prefix_window_attention(q, k_all, v_all, n_p, self.window, backend=self.attn.backend)
        y = self.attn.o_proj(y.reshape(b, t, self.dim))
        first = max(0, k_run.shape[1] - (self.window - 1))  # keep the last W − 1 keys (fewer early on)
        k_keep, v_keep = k_run[:, first:], v_run[:, first:]
        new = TitansMAGState(seen + t, mem.weights, mem.momentum, mem.chunk_start, mem.conv, k_keep, v_keep)
        return self._combine(y, m), new

    def extra_repr(self) -> str:
        return f"window={self.window}, num_persistent={self.num_persistent}"


# ----------------------------------------------------------------------------------------------
# MAL: memory as a layer
# ----------------------------------------------------------------------------------------------
@dataclass
class TitansMALState(MixerState):
    """LMM weights / momentum / chunk-start ``[B, H, P]``, its conv window ``[B, K−1, 3·dim]``, and the
    sliding window's last ``min(N_p + t, W−1)`` rotated keys / values ``[B, ·, H, D]``."""

    weights: Tensor
    momentum: Tensor
    chunk_start: Tensor
    conv: Tensor
    k: Tensor
    v: Tensor


@register_mixer("titans_mal")
class TitansMAL(_TitansHybrid):
    """Titans MAL (memory as a layer): the LMM layer, then sliding-window attention over its output.

    ``x̃ = [P ‖ x]``; ``o = SWA(LMM(x̃))`` restricted to the positions of ``x``. ``LMM`` is the full
    ``titans_lmm`` layer (RMSNorm + SiLU output gate, ``W_O``); ``SWA`` is ``sliding_window``.

    Args:
        dim, num_heads, window, num_persistent, depth, expansion, activation, chunk_size, conv_size,
        max_lr, max_momentum, max_grad_norm, rope_theta, backend: as for ``titans_mag``.

    ``state_size(T) = 3HP + 3(K−1)·dim + 2·min(N_p + T, W−1)·dim``: bounded.
    """

    description = "Titans MAL: the neural long-term memory layer (+ persistent tokens) followed by sliding-window attention (Behrouz et al. 2024)"
    example_kwargs = {"window": 8, "num_persistent": 2, "chunk_size": 4, "depth": 2, "expansion": 2, "conv_size": 3}
    demo_kwargs = {"window": 32, "num_persistent": 4, "chunk_size": 16, "depth": 2, "expansion": 2}

    def __init__(self, dim: int, num_heads: int, window: int = 64, num_persistent: int = 4, depth: int = 2, expansion: int = 4,
                 activation: str = "silu", chunk_size: int = 64, conv_size: int = 4, max_lr: float = 0.1,
                 max_momentum: float = MAX_MOMENTUM, max_grad_norm: float | None = MAX_GRAD_NORM,
                 rope_theta: float = 10000.0, backend: str = "auto"):
        super().__init__(dim, num_heads)
        self._build_common(num_persistent, depth, expansion, activation, chunk_size, conv_size, max_lr, output_gate=True,
                           max_momentum=max_momentum, max_grad_norm=max_grad_norm)
        self.attn = SlidingWindowAttention(dim, num_heads, window=window, rope_theta=rope_theta, backend=backend)
        self.reset_mixer_parameters()

    @property
    def window(self) -> int:
        """``W``, the attention branch's sliding window."""
        return self.attn.window

    def init_state(self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TitansMALState:
        device, dtype = device or self._device, dtype or self._dtype
        mem = self.memory.init_state(batch_size, device, dtype)
        kv = self.attn.init_state(batch_size, device, dtype)
        if self.persistent is not None:  # run the prefix through both layers: x̃ = [P ‖ x]
            y, mem = self.memory(self._persistent_tokens(batch_size, device, dtype), mem)
            _, kv = self.attn(y, kv)
        return TitansMALState(0, mem.weights, mem.momentum, mem.chunk_start, mem.conv, kv.k, kv.v)

    def state_size(self, seq_len: int) -> int:
        return self.memory.state_size(seq_len) + 2 * min(self.num_persistent + seq_len, self.window - 1) * self.dim

    def forward(self, x: Tensor, state: TitansMALState | None = None) -> tuple[Tensor, TitansMALState]:
        """``x [B, T, dim]`` -> ``(y [B, T, dim], state)``."""
        self._check_state(x, state, TitansMALState)
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        seen = self.num_persistent + state.seen_tokens
        y, mem = self.memory(x, self._memory_state(state, seen))
        o, kv = self.attn(y, KVState(seen_tokens=seen, k=state.k, v=state.v))
        return o, TitansMALState(state.seen_tokens + x.shape[1], mem.weights, mem.momentum, mem.chunk_start, mem.conv, kv.k, kv.v)

    def extra_repr(self) -> str:
        return f"window={self.window}, num_persistent={self.num_persistent}"


# ----------------------------------------------------------------------------------------------
# MAC: memory as a context
# ----------------------------------------------------------------------------------------------
@dataclass
class TitansMACState(MixerState):
    """What MAC carries, all of fixed size.

    * ``weights``, ``momentum``, ``chunk_start`` ``[B, H, P]`` and ``conv`` ``[B, K−1, 3·dim]``: the LMM
      (written with the attention outputs ``y``).
    * ``segment_start`` ``[B, H, P]``: the memory weights when the current segment began (``h`` reads them).
    * ``query_conv`` ``[B, K−1, dim]``: the conv window of the retrieval queries (a stream of ``x``).
    * ``segment_kv`` ``[B, C−1, 4, H, D]``: the rotated keys / values of ``h`` and of ``x`` of the current
      segment's first ``seen_tokens mod C`` tokens (slots beyond that are zero), so a split anywhere
      inside a segment is exact.
    """

    weights: Tensor
    momentum: Tensor
    chunk_start: Tensor
    conv: Tensor
    segment_start: Tensor
    query_conv: Tensor
    segment_kv: Tensor


@register_mixer("titans_mac")
class TitansMAC(_TitansHybrid):
    """Titans MAC (memory as a context): attention per segment over [persistent ‖ memory read ‖ segment].

    Per segment ``S`` of ``segment_size`` tokens (absolute positions ``0, C, 2C, ...``):
    ``h = M*_start(q)`` (the LMM's queries of ``S``, the weights at the segment's start, no update);
    ``y = W_O^att Attn([P ‖ h ‖ S])`` (RoPE at the positions of the concatenation, causal: the
    query of token ``i`` sees ``P``, ``h_{≤i}`` and ``S_{≤i}``); the LMM is then written with ``y``
    token by token and read at ``y``: ``m_t = M_t(y_t)``; ``o = W_O(RMSNorm(y) ⊙ σ(RMSNorm(m)))``.

    Args:
        dim, num_heads: model width and heads (``head_dim`` even, for RoPE).
        segment_size: ``C``, tokens per attention segment (the attention's context is ``N_p + 2C``).
        num_persistent: ``N_p`` learned tokens prefixed to every segment (0 disables them).
        depth, expansion, activation, chunk_size, conv_size, max_lr, max_momentum, max_grad_norm: the LMM's (see ``titans_lmm``);
            ``chunk_size`` (frozen gradients) is independent of ``segment_size``.
        rope_theta: RoPE base of the attention.

    ``state_size = 4HP + 3(K−1)·dim + (K−1)·dim + 4(C−1)·dim``, whatever the length.
    """

    description = "Titans MAC: segment attention over [persistent tokens | long-term memory read | segment], memory written with the attention output (Behrouz et al. 2024)"
    example_kwargs = {"segment_size": 8, "num_persistent": 2, "chunk_size": 4, "depth": 2, "expansion": 2, "conv_size": 3}
    demo_kwargs = {"segment_size": 32, "num_persistent": 4, "chunk_size": 16, "depth": 2, "expansion": 2}  # stable with the default bounds (docs)

    def __init__(self, dim: int, num_heads: int, segment_size: int = 64, num_persistent: int = 4, depth: int = 2, expansion: int = 4,
                 activation: str = "silu", chunk_size: int = 64, conv_size: int = 4, max_lr: float = 0.1,
                 max_momentum: float = MAX_MOMENTUM, max_grad_norm: float | None = MAX_GRAD_NORM,
                 rope_theta: float = 10000.0):
        super().__init__(dim, num_heads)
        self.segment_size = _check_int("segment_size", segment_size, 1)
        # Only the projections and RoPE of the attention module are used; the mask is MAC's own.
        self.attn = CausalSelfAttention(dim, num_heads, rope_theta=rope_theta)
        self._build_common(num_persistent, depth, expansion, activation, chunk_size, conv_size, max_lr, output_gate=False,
                           max_momentum=max_momentum, max_grad_norm=max_grad_norm)
        self._build_gate()
        self.reset_mixer_parameters()

    def init_state(self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TitansMACState:
        device, dtype = device or self._device, dtype or self._dtype
        mem = self.memory.init_state(batch_size, device, dtype)
        k = max(self.memory.conv_size - 1, 0)
        return TitansMACState(
            seen_tokens=0, weights=mem.weights, momentum=mem.momentum, chunk_start=mem.chunk_start, conv=mem.conv,
            segment_start=mem.weights,
            query_conv=torch.zeros(batch_size, k, self.dim, device=device, dtype=dtype),
            segment_kv=torch.zeros(batch_size, self.segment_size - 1, 4, self.num_heads, self.head_dim, device=device, dtype=dtype),
        )  # fmt: skip

    def state_size(self, seq_len: int) -> int:
        per_head = self.num_heads * self.memory.params_per_head
        return self.memory.state_size(seq_len) + per_head + max(self.memory.conv_size - 1, 0) * self.dim + 4 * (self.segment_size - 1) * self.dim

    def _keys_values(self, tokens: Tensor, offset: int) -> tuple[Tensor, Tensor]:
        """Rotated keys and values ``[B, n, H, D]`` of ``tokens [B, n, dim]`` at positions ``offset..``."""
        b, n, _ = tokens.shape
        k = self.attn.k_proj(tokens).view(b, n, self.num_heads, self.head_dim)
        v = self.attn.v_proj(tokens).view(b, n, self.num_heads, self.head_dim)
        cos, sin = rotary_cos_sin(torch.arange(offset, offset + n, device=tokens.device), self.head_dim, self.attn.rope_theta, dtype=k.dtype)
        return apply_rotary(k, cos, sin), v

    def forward(self, x: Tensor, state: TitansMACState | None = None) -> tuple[Tensor, TitansMACState]:
        """``x [B, T, dim]`` -> ``(y [B, T, dim], state)``."""
        self._check_state(x, state, TitansMACState)
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        b, t, _ = x.shape
        c, n_p, d, h = self.segment_size, self.num_persistent, self.dim, self.num_heads
        # The retrieval queries depend on x only: project (and convolve) the whole call at once.
        qx, query_conv = self.memory.project_queries(x, state.query_conv)
        # Positions of the concatenation [P ‖ h ‖ S]: P at 0..N_p−1, h_i at N_p + i, S_i at N_p + C + i.
        q_all = self.attn.q_proj(x).view(b, t, h, self.head_dim)
        if self.persistent is not None:
            kp, vp = self._keys_values(self._persistent_tokens(b, x.device, x.dtype), 0)
        mem = self._memory_state(state, state.seen_tokens)
        seg_start, buf, pos = state.segment_start, state.segment_kv, state.seen_tokens % c
        ys, ms = [], []
        i = 0
        while i < t:
            n = min(c - pos, t - i)  # stay inside one segment
            read = self.memory.read(seg_start, qx[:, i : i + n]).reshape(b, n, d)  # h = M*_{start}(q)
            kh, vh = self._keys_values(read, n_p + pos)
            kx, vx = self._keys_values(x[:, i : i + n], n_p + c + pos)
            cos, sin = rotary_cos_sin(torch.arange(n_p + c + pos, n_p + c + pos + n, device=x.device), self.head_dim, self.attn.rope_theta, dtype=kx.dtype)
            q = apply_rotary(q_all[:, i : i + n], cos, sin)
            seg = torch.cat([buf[:, :pos].to(kx.dtype), torch.stack([kh, vh, kx, vx], dim=2)], dim=1)  # [B, pos+n, 4, H, D]
            keys = [seg[:, :, 0], seg[:, :, 2]]
            values = [seg[:, :, 1], seg[:, :, 3]]
            if self.persistent is not None:
                keys, values = [kp.to(kx.dtype)] + keys, [vp.to(vx.dtype)] + values
            # Causal over positions: h_j and S_j are visible to the query of S_i iff j <= i.
            causal = torch.arange(pos + n, device=x.device)[None, :] <= torch.arange(pos, pos + n, device=x.device)[:, None]
            mask = torch.cat([torch.ones(n, n_p, dtype=torch.bool, device=x.device), causal, causal], dim=1)
            att = F.scaled_dot_product_attention(
                q.transpose(1, 2), torch.cat(keys, 1).transpose(1, 2), torch.cat(values, 1).transpose(1, 2), attn_mask=mask
            ).transpose(1, 2)
            y = self.attn.o_proj(att.reshape(b, n, d))
            m, mem = self.memory(y, mem)  # write y into the memory token by token, read M_t(y_t)
            ys.append(y)
            ms.append(m)
            pos += n
            i += n
            if pos == c:  # segment complete: the next one reads the memory as it is now
                seg_start, pos = mem.weights, 0
                buf = buf.new_zeros(buf.shape)
            else:
                buf = torch.cat([seg, seg.new_zeros(b, c - 1 - pos, 4, h, self.head_dim)], dim=1)
        y, m = torch.cat(ys, 1), torch.cat(ms, 1)
        new = TitansMACState(
            seen_tokens=state.seen_tokens + t, weights=mem.weights, momentum=mem.momentum, chunk_start=mem.chunk_start,
            conv=mem.conv, segment_start=seg_start, query_conv=query_conv, segment_kv=buf,
        )  # fmt: skip
        return self._combine(y, m), new

    def extra_repr(self) -> str:
        return f"segment_size={self.segment_size}, num_persistent={self.num_persistent}"
