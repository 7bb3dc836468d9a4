"""Landmark attention at inference: top-k block retrieval through the landmark keys.

Layout as in training: blocks of ``l`` ordinary tokens, each closed by a landmark (block ``g`` holds
absolute positions ``g (l+1) .. g (l+1) + l``, its landmark ``L_g`` last). For a query at position
``p`` in block ``b`` and head ``h``, with ``s_pj = scale * q_p . k_j``:

* **selection**: ``S_p`` = the ``top_k`` earlier blocks ``g < b`` by a landmark score (ties: the
  earlier block), all of them while fewer than ``top_k`` exist:
  ``granularity="token"`` (per head and per token, the paper's most flexible setting) scores with
  the query itself, ``s_{p L_g}``; ``granularity="block"`` (per head and per query block) scores
  every query of block ``b`` with the query at the landmark that closes block ``b - 1`` (position
  ``b (l+1) - 1``), so the set is fixed before block ``b`` starts and its KV blocks are fetched once;
* **attention**: the grouped softmax of training restricted to the selected blocks,

      w_pj = softmax_{l in G_g}(s_pl) exp(s_{p L_g}) / Z_p    (j an ordinary token of g in S_p)
      w_pj = exp(s_pj) / Z_p                                 (j ordinary, own block, j <= p)
      Z_p  = sum_{g in S_p} exp(s_{p L_g}) + sum_{own j <= p} exp(s_pj).

With ``top_k`` >= the number of earlier blocks this is exactly the training-time grouped softmax.

:func:`landmark_retrieval_reference` writes this out query by query (the specification).
:func:`retrieve_and_attend` is what the ``landmark`` mixer runs: landmark keys stay on the compute
device, the KV blocks in a store (CPU memory), and only the union of the blocks the queries of one
block segment selected is copied to the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

GRANULARITIES = ("token", "block")


def _check_top_k(fn: str, top_k: int) -> None:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"{fn}: top_k must be an int >= 1, got {top_k!r}")


def _topk_stable(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores along the last dim; ties go to the lower index."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def landmark_retrieval_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_len: int,
    top_k: int,
    granularity: str = "token",
    scale: float | None = None,
    allow_fewer: bool = False,
) -> Tensor:
    """Retrieval-mode landmark attention, one query at a time (plain loops; float64-ready).

    Args:
        q: ``[B, Tq, H, D]`` queries of the last ``Tq`` of the ``Tk`` positions (``granularity="block"``
            needs ``Tq == Tk``: the selector queries come from earlier positions).
        k: ``[B, Tk, Hkv, D]``; v: ``[B, Tk, Hkv, Dv]``, laid out with landmarks.
        block_len: ordinary tokens per block ``l``; top_k: blocks retrieved per query and head.
        granularity: ``"token"`` or ``"block"`` (see the module docstring).
        allow_fewer: without it, ``top_k`` larger than the number of complete blocks in ``k`` is an
            error (nothing would be left out); the mixer passes ``True`` (early queries use all blocks).

    Returns:
        ``[B, Tq, H, Dv]``.
    """
    fn = "landmark_retrieval_reference"
    _check_top_k(fn, top_k)
    if granularity not in GRANULARITIES:
        raise ValueError(f"{fn}: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    b_, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    step = block_len + 1
    n_complete = tk // step
    if top_k > n_complete and not allow_fewer:
        raise ValueError(
            f"{fn}: top_k ({top_k}) is larger than the number of blocks with a landmark ({n_complete}) in {tk} positions "
            f"(block_len {block_len}); use a smaller top_k, the exact grouped softmax, or allow_fewer=True"
        )
    if granularity == "block" and tq != tk:
        raise ValueError(f"{fn}: granularity='block' needs the queries of every position (Tq == Tk), got Tq={tq}, Tk={tk}")
    scale = d**-0.5 if scale is None else scale
    out = q.new_zeros(b_, tq, h, v.shape[-1])
    for bi in range(b_):
        for hi in range(h):
            kh, vh = k[bi, :, hi * hkv // h], v[bi, :, hi * hkv // h]
            for i in range(tq):
                p = tk - tq + i
                blk = p // step
                qp = q[bi, i, hi]
                selector = qp if granularity == "token" else q[bi, blk * step - 1, hi]
                earlier = list(range(blk))
                if earlier:
                    lm_scores = torch.stack([scale * (selector @ kh[g * step + block_len]) for g in earlier])
                    chosen = _topk_stable(lm_scores, min(top_k, blk)).tolist()
                else:
                    chosen = []
                # Terms of Z_p and their value vectors.
                terms, values = [], []
                for g in sorted(chosen):
                    members = slice(g * step, g * step + block_len)
                    inner = (scale * (kh[members] @ qp)).softmax(-1)
                    terms.append(scale * (qp @ kh[g * step + block_len]))
                    values.append(inner @ vh[members])
                for j in range(blk * step, p + 1):
                    if j % step != block_len:
                        terms.append(scale * (qp @ kh[j]))
                        values.append(vh[j])
                weights = torch.stack(terms).softmax(-1)
                out[bi, i, hi] = weights @ torch.stack(values)
    return out


def retrieve_and_attend(
    q: Tensor,
    k_own: Tensor,
    v_own: Tensor,
    own_start: int,
    landmark_keys: Tensor,
    store_k: Tensor,
    store_v: Tensor,
    block_len: int,
    top_k: int,
    scale: float,
    selected: Tensor | None = None,
) -> tuple[Tensor, int]:
    """Retrieval attention for queries that all lie in one block ``b``.

    Args:
        q: ``[B, n, H, D]`` queries at in-block offsets ``own_start .. own_start + n - 1``.
        k_own, v_own: ``[B, own_start + n, Hkv, D]`` the block's keys/values up to the last query.
        landmark_keys: ``[B, b, Hkv, D]`` (compute device) the landmark keys of blocks ``0 .. b-1``.
        store_k, store_v: ``[B, b, l + 1, Hkv, D]`` the earlier blocks, on any device (CPU memory).
        selected: ``[B, H, kk]`` block indices for ``granularity="block"``; ``None`` selects per token.

    Returns:
        ``(out [B, n, H, Dv], blocks fetched per (batch, head))``.
    """
    bsz, n, h, d = q.shape
    hkv = k_own.shape[2]
    rep = h // hkv
    dev = q.device
    nb = landmark_keys.shape[1]
    # Own block: causal, landmark position (offset l) excluded.
    kc = k_own.repeat_interleave(rep, dim=2)
    vc = v_own.repeat_interleave(rep, dim=2)
    s_own = torch.einsum("bihd,bjhd->bhij", q, kc) * scale  # [B, H, n, r]
    j = torch.arange(k_own.shape[1], device=dev)
    own_ok = (j[None, :] <= own_start + torch.arange(n, device=dev)[:, None]) & (j[None, :] != block_len)
    s_own = s_own.masked_fill(~own_ok, float("-inf"))
    if nb == 0:
        return torch.einsum("bhij,bjhd->bihd", s_own.softmax(-1), vc), 0

    kk = min(top_k, nb)
    lm = landmark_keys.repeat_interleave(rep, dim=2)
    if selected is None:
        lm_scores = torch.einsum("bihd,bnhd->bhin", q, lm) * scale  # [B, H, n, nb]
        sel = _topk_stable(lm_scores, kk)  # [B, H, n, kk]
    else:
        sel = selected[:, :, None, :].expand(bsz, h, n, selected.shape[-1])
    # Fetch the union of the selected blocks of each (batch, head) once.
    need = torch.zeros(bsz, h, nb, dtype=torch.bool, device=dev)
    need.scatter_(-1, sel.reshape(bsz, h, -1), True)
    u = int(need.sum(-1).max())
    uidx = _topk_stable(need.to(torch.int8), u)  # [B, H, U], needed blocks first
    uvalid = need.gather(-1, uidx)
    src = store_k.device
    bi = torch.arange(bsz, device=src)[:, None, None]
    hi = (torch.arange(h, device=src) // rep)[None, :, None]
    ui = uidx.to(src)
    fk = store_k[bi, ui, :, hi].to(dev, non_blocking=True)  # [B, H, U, l + 1, D]
    fv = store_v[bi, ui, :, hi].to(dev, non_blocking=True)
    use = (sel[..., :, None] == uidx[:, :, None, None, :]).any(-2) & uvalid[:, :, None, :]  # [B, H, n, U]
    s_blk = torch.einsum("bhid,bhuld->bhiul", q.transpose(1, 2), fk[..., :block_len, :]) * scale  # [B, H, n, U, l]
    inner = s_blk.softmax(-1)
    o_blk = torch.einsum("bhiul,bhule->bhiue", inner, fv[..., :block_len, :])  # per-block outputs
    gate = torch.einsum("bhid,bhud->bhiu", q.transpose(1, 2), fk[..., block_len, :]) * scale  # s_{p L_g}
    gate = gate.masked_fill(~use, float("-inf"))
    logits = torch.cat([gate, s_own], dim=-1)  # the terms of Z_p
    w = logits.softmax(-1)
    out = torch.einsum("bhiu,bhiue->bihe", w[..., :u], o_blk) + torch.einsum("bhij,bjhe->bihe", w[..., u:], vc)
    return out, u
