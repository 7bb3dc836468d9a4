"""HCAM: Hierarchical Chunk Attention Memory (Lampinen et al., 2021, arXiv:2105.14039), causal.

The past is stored in chunks of ``C`` consecutive tokens. Each chunk has one *summary key*, the mean
of its (un-rotated) keys. A query first attends coarsely over the chunk summaries, keeps its
``top_k`` best chunks, and then attends in detail inside each kept chunk (RoPE inside chunks); the
detailed results are mixed with the softmax of the kept summary logits:

    g_ic = q_i . s_c / sqrt(D),            s_c = mean_{j in chunk c} k_j
    K_i  = top_k { c : chunk c complete at i }          (ties: the earlier chunk wins)
    y_i  = sum_{c in K_i} softmax_{c' in K_i}(g_ic')_c * Attn(q_i, chunk c)

Causality (our definition, so that decoding reproduces the parallel pass exactly): chunk ``c``
(positions ``cC .. cC + C - 1``) is *complete* for query ``i`` iff ``cC + C - 1 <= i``, i.e. once its
last token -- possibly ``i`` itself -- has been seen. With ``local_chunk=True`` (default) the
current *partial* chunk ``cC .. i`` (when ``i`` does not complete its chunk) always takes part as one
extra chunk, outside the top-k competition, with summary logit ``q_i . mean(k_cC..k_i) / sqrt(D)``
and causal attention over ``cC .. i``. With ``local_chunk=False`` a query sees completed chunks only,
and a query with none (the first ``C - 1`` tokens) outputs 0.

With ``C = 1`` every past token, the current one included, is a completed chunk, the summary of a
chunk is its key, and attention inside a one-token chunk returns its value; so with ``top_k >= T``
HCAM is exactly ordinary causal softmax attention (without positions, since RoPE acts only inside chunks).

Computation: the weighted sum over chunks equals one softmax over the keys of the kept chunks with
shifted logits ``q.k_j/sqrt(D) - LSE_{chunk(j)} + g_{i,chunk(j)}`` (the block-gated form also used by
landmark attention), which is what :func:`hcam_attention` evaluates: densely in PyTorch (the reference, O(Tq * Tk) memory)
or, on CUDA, with the block-gated Triton kernel of ``ops.block_sparse.gated`` (chunks = key blocks,
level-1 logits as its ``gate_bias``, ``lse_gate="none"``), which never builds a ``Tq x Tk`` tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..ops.rotary import apply_rotary, rotary_cos_sin
from .base import Mixer, MixerState
from .registry import register_mixer


def chunk_summaries(k: Tensor, chunk_size: int, start_chunk: int = 0) -> Tensor:
    """Mean keys ``[B, n, Hkv, D]`` of the complete chunks ``start_chunk ..`` of ``k [B, T, Hkv, D]``."""
    b, t, hkv, d = k.shape
    stop = t // chunk_size
    n = max(stop - start_chunk, 0)
    part = k[:, start_chunk * chunk_size : stop * chunk_size]
    return part.reshape(b, n, chunk_size, hkv, d).mean(dim=2)


def hcam_gate_logits(
    q: Tensor,
    k: Tensor,
    summaries: Tensor,
    chunk_size: int,
    top_k: int,
    local_chunk: bool = True,
    scale: float | None = None,
    keep: Tensor | None = None,
) -> Tensor:
    """HCAM's level 1: the gate logit of every (query, chunk), ``-inf`` for chunks a query does not read.

    Args:
        q: ``[B, Tq, H, D]`` un-rotated queries at absolute positions ``Tk - Tq ..``.
        k: ``[B, Tk, Hkv, D]`` un-rotated keys; summaries: ``[B, Tk // C, Hkv, D]``.
        chunk_size, top_k, local_chunk, scale: as :func:`hcam_attention`.
        keep: optional ``bool [B, H, Tq, Tk // C]``: the complete chunks each query reads, instead of
            the top-k of the summary logits (e.g. ``torch.isfinite(gate[..., :Tk // C])`` of a gate
            computed in another precision, to compare two paths under one selection: near-ties of
            the top-k otherwise flip between bf16 and float64 logits).

    Returns:
        ``[B, H, Tq, ceil(Tk / C)]`` in float32 for half inputs, else the input dtype: the summary
        logits of the kept complete chunks and (``local_chunk``) of the query's own partial chunk.
    """
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    n_done = tk // chunk_size
    n_all = -(-tk // chunk_size)
    dev = q.device
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qpos = torch.arange(tk - tq, tk, device=dev)  # [Tq]
    qchunk = qpos // chunk_size
    rep = h // hkv

    # Summary logits over complete chunks; top_k of the eligible ones, earlier chunk first on ties.
    neg_inf = torch.tensor(float("-inf"), dtype=work, device=dev)
    gate = torch.full((b, h, tq, n_all), float("-inf"), dtype=work, device=dev)
    if n_done > 0:
        g = torch.einsum("bihd,bchd->bhic", q, summaries.repeat_interleave(rep, dim=2)).to(work) * scale
        eligible = (torch.arange(n_done, device=dev)[None, :] + 1) * chunk_size - 1 <= qpos[:, None]  # [Tq, n_done]
        g = torch.where(eligible, g, neg_inf)
        if keep is None:
            kk = min(top_k, n_done)
            order = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., :kk]
            keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, order, True) & eligible
        else:
            if keep.shape != g.shape or keep.dtype != torch.bool:
                raise ValueError(f"keep must be a bool tensor of shape {tuple(g.shape)}, got {keep.dtype} {tuple(keep.shape)}")
            keep = keep & eligible
        gate[..., :n_done] = torch.where(keep, g, neg_inf)

    # The current partial chunk cC .. i (when i does not complete its chunk), outside the competition.
    partial = (qpos + 1) % chunk_size != 0  # [Tq]
    if local_chunk and bool(partial.any()):
        k_h = k.repeat_interleave(rep, dim=2)
        pad = n_all * chunk_size - tk
        kc = torch.nn.functional.pad(k_h, (0, 0, 0, 0, 0, pad)).reshape(b, n_all, chunk_size, h, d)
        count = torch.arange(1, chunk_size + 1, device=dev, dtype=kc.dtype)
        running_mean = kc.cumsum(dim=2) / count[None, None, :, None, None]  # mean of cC .. cC + r
        local_sum = running_mean.reshape(b, n_all * chunk_size, h, d)[:, qpos]  # [B, Tq, H, D]
        g_local = (q * local_sum).sum(-1).transpose(1, 2).to(work) * scale  # [B, H, Tq]
        is_cur = torch.arange(n_all, device=dev)[None, :] == qchunk[:, None]  # [Tq, n_all]
        gate = torch.where(is_cur & partial[:, None], g_local[..., None], gate)
    return gate


def _kernel_ok(q: Tensor, v: Tensor, chunk_size: int) -> bool:
    """Whether the block-gated Triton kernel takes these shapes (see ``ops.block_sparse.gated``)."""
    from ..ops.block_sparse.gated import MAX_KERNEL_BLOCK, SUPPORTED_KERNEL_DTYPES

    d = q.shape[-1]
    return q.dtype in SUPPORTED_KERNEL_DTYPES and v.shape[-1] == d and 16 <= d <= 128 and chunk_size <= MAX_KERNEL_BLOCK


def hcam_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    summaries: Tensor,
    chunk_size: int,
    top_k: int,
    local_chunk: bool = True,
    rope_theta: float | None = 10000.0,
    scale: float | None = None,
    backend: str = "reference",
    keep: Tensor | None = None,
) -> Tensor:
    """Causal HCAM read-out for the last ``Tq`` of ``Tk`` positions (keys start at position 0).

    Args:
        q: ``[B, Tq, H, D]`` un-rotated queries; query ``i`` sits at absolute position ``Tk - Tq + i``.
        k: ``[B, Tk, Hkv, D]`` un-rotated keys of every position ``0 .. Tk - 1``; v: ``[B, Tk, Hkv, Dv]``.
        summaries: ``[B, Tk // C, Hkv, D]``, the mean key of each complete chunk (:func:`chunk_summaries`).
        chunk_size: ``C``; top_k: chunks kept per query and head; local_chunk: see the module docstring.
        rope_theta: RoPE base for the attention inside chunks (``None``: no positions).
        scale: logit scale for both levels, default ``D ** -0.5``.
        backend: ``"reference"`` (default; dense PyTorch, O(Tq·Tk) memory, any dtype), ``"triton"``
            (the block-gated kernel of ``ops.block_sparse.gated``: chunks = key blocks, the level-1
            logits as ``gate_bias``, ``lse_gate="none"``; on CPU through the Triton interpreter) or
            ``"auto"`` (the kernel for CUDA tensors it supports: fp32/fp16/bf16, ``16 <= D <= 128``,
            ``Dv == D``, ``C <= 128``; else the reference).
        keep: optional precomputed top-k choice (see :func:`hcam_gate_logits`).

    Returns:
        ``[B, Tq, H, Dv]``.
    """
    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"hcam_attention: backend must be 'auto', 'reference' or 'triton', got {backend!r}")
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    n_all = -(-tk // chunk_size)
    dev = q.device
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qpos = torch.arange(tk - tq, tk, device=dev)  # [Tq]
    kpos = torch.arange(tk, device=dev)  # [Tk]
    kchunk = kpos // chunk_size

    # Level 1: which chunks each query reads, and with which logit.
    gate = hcam_gate_logits(q, k, summaries, chunk_size, top_k, local_chunk, scale, keep)  # [B, H, Tq, NB]

    # Level 2: attention inside chunks (RoPE at absolute positions), normalised per chunk, then gated.
    if rope_theta is not None:
        cos_q, sin_q = rotary_cos_sin(qpos, d, rope_theta, dtype=q.dtype)
        cos_k, sin_k = rotary_cos_sin(kpos, d, rope_theta, dtype=q.dtype)
        q_r, k_r = apply_rotary(q, cos_q, sin_q), apply_rotary(k, cos_k, sin_k)
    else:
        q_r, k_r = q, k
    if backend == "triton" or (backend == "auto" and q.is_cuda and _kernel_ok(q, v, chunk_size)):
        from ..ops.block_sparse.gated import block_gated_attention

        # The gated op's formula with lse_gate="none" is exactly the sum below: softmax inside each
        # chunk, chunks mixed by softmax of the gate logits (-inf = not read); GQA by the kernel.
        return block_gated_attention(
            q_r, k_r, v, chunk_size, gate_bias=gate.permute(0, 2, 1, 3), lse_gate="none", causal=True, scale=scale, backend="triton"
        )

    rep = h // hkv
    k_r, v_h = k_r.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q_r, k_r).to(work) * scale  # [B, H, Tq, Tk]
    neg_inf = torch.tensor(float("-inf"), dtype=work, device=dev)
    gate_k = gate[..., kchunk]  # [B, H, Tq, Tk]
    allowed = torch.isfinite(gate_k) & (kpos[None, :] <= qpos[:, None])
    # A large finite fill keeps logsumexp's backward finite for chunks with no allowed key.
    lowest = torch.finfo(work).min
    s_masked = s.masked_fill(~allowed, lowest)
    pad = n_all * chunk_size - tk
    lse = torch.nn.functional.pad(s_masked, (0, pad), value=lowest).reshape(b, h, tq, n_all, chunk_size).logsumexp(-1)
    z = torch.where(allowed, s - lse[..., kchunk] + torch.where(allowed, gate_k, 0.0), neg_inf)
    has_any = allowed.any(dim=-1, keepdim=True)
    p = torch.where(has_any, z, 0.0).softmax(dim=-1) * has_any
    return torch.einsum("bhij,bjhd->bihd", p.to(v.dtype), v_h)


@dataclass
class HCAMState(MixerState):
    """Un-rotated keys and values of every token seen ``[B, T, Hkv, D]`` (complete chunks and the
    current partial one) and the summary key of each complete chunk ``[B, T // C, Hkv, D]``."""

    k: Tensor
    v: Tensor
    summaries: Tensor


def _check_int(name: str, value, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


@register_mixer("hcam")
class HierarchicalChunkAttention(Mixer):
    """HCAM: top-k chunk selection by mean-key summaries, attention inside the kept chunks (causal).

    Args:
        dim: model width; num_heads: query heads.
        chunk_size: ``C``, tokens per memory chunk.
        top_k: chunks kept per query and head (fewer while fewer chunks are complete).
        local_chunk: let each query also attend inside its own partial chunk (see module docstring).
        num_kv_heads: key/value heads (GQA; default ``num_heads``).
        rope_theta: RoPE base for attention inside chunks; ``None`` for no positions.
        backend: ``"auto"`` (the block-gated Triton kernel on CUDA when the shapes allow it, else the
            PyTorch reference), ``"triton"`` (always the kernel; CPU interpreter in tests) or ``"reference"``.

    The state keeps every key and value (HCAM forgets nothing; it reads sparsely) plus one summary
    per complete chunk: ``state_size(T) = (2 T + T // C) * Hkv * D``.
    """

    description = "HCAM: mean-key chunk summaries, top-k chunks, attention inside them (Lampinen et al. 2021); KV + summaries state"
    example_kwargs = {"chunk_size": 4, "top_k": 2}

    def __init__(
        self,
        dim: int,
        num_heads: int,
        chunk_size: int = 16,
        top_k: int = 4,
        local_chunk: bool = True,
        num_kv_heads: int | None = None,
        rope_theta: float | None = 10000.0,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads)
        if backend not in ("auto", "reference", "triton"):
            raise ValueError(f"backend must be 'auto', 'reference' or 'triton', got {backend!r}")
        self.backend = backend
        self.chunk_size = _check_int("chunk_size", chunk_size, 1)
        self.top_k = _check_int("top_k", top_k, 1)
        if not isinstance(local_chunk, bool):
            raise ValueError(f"local_chunk must be a bool, got {local_chunk!r}")
        self.local_chunk = local_chunk
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if not isinstance(num_kv_heads, int) or num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(f"num_kv_heads must be a positive divisor of num_heads ({num_heads}), got {num_kv_heads!r}")
        if rope_theta is not None and self.head_dim % 2:
            raise ValueError(f"head_dim = dim / num_heads must be even for RoPE (or pass rope_theta=None), got {self.head_dim}")
        self.num_kv_heads = num_kv_heads
        self.rope_theta = None if rope_theta is None else float(rope_theta)
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)

    def init_state(self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> HCAMState:
        dtype = dtype or self.q_proj.weight.dtype
        device = device or self.q_proj.weight.device
        empty = torch.zeros(batch_size, 0, self.num_kv_heads, self.head_dim, device=device, dtype=dtype)
        return HCAMState(seen_tokens=0, k=empty, v=empty.clone(), summaries=empty.clone())

    def forward(self, x: Tensor, state: HCAMState | None = None) -> tuple[Tensor, HCAMState]:
        """``x [B, T, dim]`` -> ``(y [B, T, dim], state)``."""
        self.check_input(x, state)
        if state is not None and not isinstance(state, HCAMState):
            raise TypeError(f"HierarchicalChunkAttention: state must be an HCAMState, got {type(state).__name__}")
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        k_all = torch.cat([state.k.to(k.dtype), k], dim=1)
        v_all = torch.cat([state.v.to(v.dtype), v], dim=1)
        done = state.summaries.shape[1]
        # A chunk's summary is computed once, when it completes, from exactly the keys the full pass uses.
        summaries = torch.cat([state.summaries.to(k.dtype), chunk_summaries(k_all, self.chunk_size, done)], dim=1)
        y = hcam_attention(q, k_all, v_all, summaries, self.chunk_size, self.top_k, self.local_chunk, self.rope_theta, backend=self.backend)
        y = self.o_proj(y.reshape(b, t, self.num_heads * self.head_dim))
        return y, HCAMState(seen_tokens=state.seen_tokens + t, k=k_all, v=v_all, summaries=summaries)

    def state_size(self, seq_len: int) -> int:
        return (2 * seq_len + seq_len // self.chunk_size) * self.num_kv_heads * self.head_dim

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, top_k={self.top_k}, local_chunk={self.local_chunk}"
