"""One softmax over [initial tokens ‖ retrieved events ‖ remainder ‖ local window] (InfLLM / EM-LLM).

Positions follow InfLLM (Xiao et al., 2024): the local window keeps true relative RoPE distances,
every memory token (initial tokens, retrieved events, the not-yet-segmented remainder, and
working tokens that already left a query's window) sits at the same distance ``n_local`` from
the query. Memory keys are stored *without* RoPE; the query is rotated by the angle of position
``n_local`` instead, so ``<R(n_local) q, k>`` is the score of a key ``n_local`` tokens away.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["episodic_attention", "episodic_attention_reference", "rotate", "rotate_half"]


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dimension (the rotate-half RoPE layout of Llama)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE as ``transformers`` applies it: ``x * cos + rotate_half(x) * sin`` (same op order)."""
    return (x * cos) + (rotate_half(x) * sin)


def episodic_attention(
    q_loc: Tensor,
    q_mem: Tensor,
    mem_k: Tensor,
    mem_v: Tensor,
    n_always: int,
    work_k: Tensor,
    work_kr: Tensor,
    work_v: Tensor,
    q_pos: Tensor,
    work_pos: Tensor,
    n_local: int,
    scaling: float,
    mem_heads: Tensor | None = None,
    query_tile: int = 256,
) -> tuple[Tensor, Tensor]:
    """Attention of ``C`` queries of one sequence over memory and working tokens, one softmax.

    Args:
        q_loc: ``[Hq, C, D]`` queries rotated at their true positions ``q_pos``.
        q_mem: ``[Hq, C, D]`` the same queries rotated at position ``n_local``.
        mem_k, mem_v: ``[Hkv, M, D]`` memory keys (no RoPE) and values, in temporal order.
        n_always: the first ``n_always`` memory tokens (the initial tokens) are seen by every
            head; the rest only by ``mem_heads``.
        work_k, work_kr, work_v: ``[Hkv, L, D]`` working tokens (the local buffer followed by
            the current chunk): keys without RoPE, keys rotated at ``work_pos``, values.
        q_pos: ``[C]`` absolute positions of the queries; ``work_pos``: ``[L]`` of working tokens.
        n_local: window size. Query ``i`` sees working token ``j`` through the window (true
            RoPE) when ``pos_i - n_local < pos_j <= pos_i``, and as memory when
            ``pos_j <= pos_i - n_local``.
        scaling: the logit scale (``head_dim ** -0.5`` for Llama).
        mem_heads: ``[Hq]`` bool, the heads that read the episodic memory (``None``: all).

    Returns:
        ``out [Hq, C, D]`` and ``received [Hkv, L]``: the attention each working token received
        through the window, summed over queries and the query heads of its group (EM-LLM's
        statistic for representative keys). Half-precision inputs get a float32 softmax.
    """
    hq, c, d = q_loc.shape
    hkv, m = mem_k.shape[0], mem_k.shape[1]
    g = hq // hkv
    work_len = work_k.shape[1]
    sdtype = torch.float32 if q_loc.dtype in (torch.float16, torch.bfloat16) else q_loc.dtype
    out = torch.empty_like(q_loc)
    received = torch.zeros(hkv, work_len, dtype=sdtype, device=q_loc.device)
    neg = torch.finfo(sdtype).min
    # [Hkv, G, 1, 1] visibility of the episodic part per head.
    if mem_heads is None:
        sel = torch.ones(hkv, g, 1, 1, dtype=torch.bool, device=q_loc.device)
    else:
        sel = mem_heads.to(q_loc.device).view(hkv, g, 1, 1)
    mem_always = torch.arange(m, device=q_loc.device) < n_always
    vals = torch.cat([mem_v, work_v, work_v], 1)  # [Hkv, M + 2L, D]
    for lo in range(0, c, query_tile):
        hi = min(c, lo + query_tile)
        ql = q_loc[:, lo:hi].reshape(hkv, g, hi - lo, d)
        qm = q_mem[:, lo:hi].reshape(hkv, g, hi - lo, d)
        pos = q_pos[lo:hi, None]
        a_mem = torch.einsum("kgcd,kmd->kgcm", qm, mem_k) * scaling
        a_wm = torch.einsum("kgcd,kmd->kgcm", qm, work_k) * scaling
        a_wl = torch.einsum("kgcd,kmd->kgcm", ql, work_kr) * scaling
        vis_mem = mem_always[None, None, None, :] | sel
        vis_wm = (work_pos[None, :] <= pos - n_local)[None, None] & sel
        vis_wl = ((work_pos[None, :] <= pos) & (work_pos[None, :] > pos - n_local))[None, None]
        logits = torch.cat([a_mem.to(sdtype).masked_fill(~vis_mem, neg),
                            a_wm.to(sdtype).masked_fill(~vis_wm, neg),
                            a_wl.to(sdtype).masked_fill(~vis_wl, neg)], -1)
        w = torch.softmax(logits, dim=-1)
        # Masked entries are exactly zero after the softmax (exp underflows), and every row sees
        # at least its own token, so no row is empty.
        w = torch.where(torch.cat([vis_mem.expand_as(a_mem), vis_wm.expand_as(a_wm), vis_wl.expand_as(a_wl)], -1), w, 0)
        received += w[..., m + work_len:].sum(dim=(1, 2))
        o = torch.einsum("kgcm,kmd->kgcd", w.to(vals.dtype), vals)
        out[:, lo:hi] = o.reshape(hq, hi - lo, d)
    return out, received


def episodic_attention_reference(
    q_loc: Tensor, q_mem: Tensor, mem_k: Tensor, mem_v: Tensor, n_always: int,
    work_k: Tensor, work_kr: Tensor, work_v: Tensor, q_pos: Tensor, work_pos: Tensor,
    n_local: int, scaling: float, mem_heads: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Query-by-query, head-by-head form of :func:`episodic_attention` (the specification)."""
    hq, c, d = q_loc.shape
    hkv = mem_k.shape[0]
    g = hq // hkv
    out = torch.zeros_like(q_loc)
    received = torch.zeros(hkv, work_k.shape[1], dtype=q_loc.dtype)
    for h in range(hq):
        kv = h // g
        reads_memory = mem_heads is None or bool(mem_heads[h])
        for i in range(c):
            p = int(q_pos[i])
            logits, values, window_index = [], [], []
            for j in range(mem_k.shape[1]):
                if j < n_always or reads_memory:
                    logits.append(float(q_mem[h, i] @ mem_k[kv, j]) * scaling)
                    values.append(mem_v[kv, j])
                    window_index.append(-1)
            for j in range(work_k.shape[1]):
                pj = int(work_pos[j])
                if pj <= p - n_local and reads_memory:
                    logits.append(float(q_mem[h, i] @ work_k[kv, j]) * scaling)
                    values.append(work_v[kv, j])
                    window_index.append(-1)
                elif p - n_local < pj <= p:
                    logits.append(float(q_loc[h, i] @ work_kr[kv, j]) * scaling)
                    values.append(work_v[kv, j])
                    window_index.append(j)
            mx = max(logits)
            e = [math.exp(x - mx) for x in logits]
            z = sum(e)
            for wgt, val, j in zip(e, values, window_index):
                out[h, i] += (wgt / z) * val
                if j >= 0:
                    received[kv, j] += wgt / z
    return out, received
