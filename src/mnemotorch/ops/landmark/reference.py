"""Landmark attention's grouped softmax, written plainly (the specification; runs in float64).

Mohtashami & Jaggi, 2023, "Landmark Attention: Random-Access Infinite Context Length for
Transformers" (arXiv:2305.16300). The sequence is cut into blocks of ``block_len`` ordinary tokens,
each followed by one landmark token, so block ``g`` occupies absolute positions
``g (l+1) .. g (l+1) + l`` and its landmark ``L_g`` sits at ``g (l+1) + l`` (``l = block_len``).
A trailing incomplete block has no landmark yet.

For a query at absolute position ``i`` in block ``b``, with logits ``s_ij``:

* earlier blocks ``g < b`` are reached through their landmark: the tokens ``G_g`` of block ``g``
  get ``softmax_{l in G_g}(s_il) * exp(s_{i L_g}) / Z_i``;
* the current block's ordinary tokens ``j <= i`` get ``exp(s_ij) / Z_i``;
* ``Z_i = sum_{g < b} exp(s_{i L_g}) + sum_{l in cur, l <= i} exp(s_il)``;
* landmark tokens (earlier ones and the current block's own, if the query is one) get zero weight
  on the values: a landmark is a gate, never content.

Equivalently (tested): one flat softmax over the *shifted* logits

    z_ij = s_ij + s_{i L_g} - LSE_{l in G_g}(s_il)   (j in an earlier block g),
    z_ij = s_ij                                       (j ordinary, current block, j <= i),
    z_ij = -inf                                       (landmarks, future tokens),

because ``sum_{j in G_g} exp(z_ij) = exp(s_{i L_g})``. The flat form is what a block-gated
FlashAttention kernel computes (normalise inside a block, then gate the block).

The weights functions take raw logits ``scores [..., Tq, Tk]`` whose queries are the last ``Tq`` of
the ``Tk`` positions (absolute positions start at 0 with the first key).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_block_len(fn: str, block_len: int) -> None:
    if not isinstance(block_len, int) or isinstance(block_len, bool) or block_len < 1:
        raise ValueError(f"{fn}: block_len must be an int >= 1, got {block_len!r}")


def landmark_mask(length: int, block_len: int, device=None) -> Tensor:
    """``[length]`` bool: ``True`` at landmark positions ``p`` with ``p mod (block_len + 1) == block_len``."""
    _check_block_len("landmark_mask", block_len)
    return torch.arange(length, device=device) % (block_len + 1) == block_len


def _positions(tq: int, tk: int, block_len: int, device):
    qpos = torch.arange(tk - tq, tk, device=device)
    kpos = torch.arange(tk, device=device)
    return qpos, kpos, qpos // (block_len + 1), kpos // (block_len + 1), kpos % (block_len + 1) == block_len


def grouped_softmax_weights(scores: Tensor, block_len: int) -> Tensor:
    """Attention weights ``[..., Tq, Tk]`` by the paper's grouped-softmax formula, block by block."""
    _check_block_len("grouped_softmax_weights", block_len)
    tq, tk = scores.shape[-2:]
    if tq > tk:
        raise ValueError(f"grouped_softmax_weights: more queries ({tq}) than keys ({tk})")
    qpos, kpos, qblock, kblock, is_landmark = _positions(tq, tk, block_len, scores.device)
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    current = (kblock[None, :] == qblock[:, None]) & (kpos[None, :] <= qpos[:, None]) & ~is_landmark[None, :]
    s_cur = torch.where(current, scores, neg_inf)
    # Terms of Z_i (before a common shift m_i for stability): one gate per earlier block, plus current tokens.
    num_blocks = int(kblock[-1]) + 1 if tk else 0
    gates, groups = [], []
    for g in range(num_blocks):
        lm = g * (block_len + 1) + block_len
        if lm >= tk:
            break  # the trailing block has no landmark yet; no query can see it as an earlier block
        earlier = qblock > g  # [Tq]
        gate = torch.where(earlier, scores[..., :, lm], neg_inf)  # s_{i L_g}, or -inf when g is not earlier
        members = (kblock == g) & ~is_landmark
        inner = torch.where(members, scores, neg_inf).softmax(dim=-1)  # softmax over G_g
        gates.append(gate)
        groups.append(inner)
    m = s_cur.amax(dim=-1)
    if gates:
        m = torch.maximum(m, torch.stack(gates, dim=-1).amax(dim=-1))
    m = m.detach()
    z = torch.exp(s_cur - m[..., None]).sum(dim=-1)
    for gate in gates:
        z = z + torch.exp(gate - m)
    weights = torch.exp(s_cur - m[..., None]) / z[..., None]
    for gate, inner in zip(gates, groups):
        weights = weights + inner * (torch.exp(gate - m) / z)[..., None]
    return weights


def shifted_logits(scores: Tensor, block_len: int) -> Tensor:
    """The flat form's logits ``z [..., Tq, Tk]`` (``-inf`` where a key gets zero weight)."""
    _check_block_len("shifted_logits", block_len)
    tq, tk = scores.shape[-2:]
    if tq > tk:
        raise ValueError(f"shifted_logits: more queries ({tq}) than keys ({tk})")
    qpos, kpos, qblock, kblock, is_landmark = _positions(tq, tk, block_len, scores.device)
    step = block_len + 1
    nb = -(-tk // step)
    # LSE over each block's ordinary tokens, and each block's landmark logit.
    padded = torch.nn.functional.pad(scores, (0, nb * step - tk), value=float("-inf"))
    blocks = padded.reshape(*scores.shape[:-1], nb, step)
    lse = blocks[..., :block_len].logsumexp(dim=-1)  # [..., Tq, nb]; every block has >= 1 ordinary token
    gate = blocks[..., block_len]  # [..., Tq, nb]; -inf (padding) for a trailing block without landmark
    earlier = (kblock[None, :] < qblock[:, None]) & ~is_landmark[None, :]
    current = (kblock[None, :] == qblock[:, None]) & (kpos[None, :] <= qpos[:, None]) & ~is_landmark[None, :]
    shift = gate[..., kblock] - lse[..., kblock]  # [..., Tq, Tk]
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    return torch.where(earlier, scores + shift, torch.where(current, scores, neg_inf))


def flat_softmax_weights(scores: Tensor, block_len: int) -> Tensor:
    """Attention weights ``[..., Tq, Tk]`` as one softmax over :func:`shifted_logits`."""
    return shifted_logits(scores, block_len).softmax(dim=-1)


FORMS = ("grouped", "flat")


def landmark_grouped_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, block_len: int, scale: float | None = None, form: str = "grouped"
) -> Tensor:
    """Training-time landmark attention over a sequence laid out with a landmark after every ``block_len`` tokens.

    Args:
        q: ``[B, Tq, H, D]``; query ``i`` sits at absolute position ``Tk - Tq + i``.
        k: ``[B, Tk, Hkv, D]``; v: ``[B, Tk, Hkv, Dv]`` (``H % Hkv == 0``).
        block_len: ordinary tokens per block (``l``; the paper uses 50).
        scale: default ``D ** -0.5``.
        form: ``"grouped"`` (the paper's formula) or ``"flat"`` (softmax over shifted logits).

    Returns:
        ``[B, Tq, H, Dv]``.
    """
    if form not in FORMS:
        raise ValueError(f"landmark_grouped_attention_reference: form must be one of {FORMS}, got {form!r}")
    h, d = q.shape[2], q.shape[3]
    hkv = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    k = k.repeat_interleave(h // hkv, dim=2)
    v = v.repeat_interleave(h // hkv, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    weights = grouped_softmax_weights(scores, block_len) if form == "grouped" else flat_softmax_weights(scores, block_len)
    return torch.einsum("bhij,bjhd->bihd", weights, v)
