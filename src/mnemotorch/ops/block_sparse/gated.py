"""Block-gated attention: softmax normalised inside each key block, blocks mixed by gate weights.

The keys are cut into consecutive blocks of ``block_len`` positions (block ``b`` holds positions
``b*l .. b*l + l - 1``; the last block may be shorter). For a query ``i`` (absolute position ``p_i``;
queries are the last ``Tq`` of the ``Tk`` key positions) and a block ``b``:

    C_ib      = { j in b : allowed(i, j) }                   (causal: j <= p_i; optionally the last
                                                              position of each block is excluded)
    lambda_ib = LSE_{j in C_ib} s_ij,      s_ij = scale * q_i . k_j
    o_ib      = sum_{j in C_ib} exp(s_ij - lambda_ib) v_j     (softmax inside the block)
    gamma_ib  = lambda_ib                       if block b is "LSE-gated" for query i
              = scale * q_i . gk_b              otherwise, when gate keys are given
              (+ bias_ib when a gate bias is given; -inf removes a block)
    out_i     = sum_b softmax_b(gamma_ib) o_ib  (over blocks with C_ib non-empty and finite gate)

``lse_gate`` chooses the LSE-gated blocks: ``"all"`` (then the op is ordinary attention, the bias
aside), ``"own"`` (only the block holding the query; needs ``causal``) or ``"none"``. A query with
no visible block outputs 0.

* **Landmark attention** (Mohtashami & Jaggi, 2023): blocks of ``l + 1`` positions, the last one
  the landmark; ``exclude_last=True`` (a landmark is a gate, never content), ``gate_keys`` = the
  landmark keys, ``lse_gate="own"``. Earlier blocks then get ``softmax_{G_g}(s) * exp(s_{i,L_g}) / Z_i``
  and the current block's tokens ``exp(s_ij) / Z_i`` with the same ``Z_i``: the grouped softmax.
* **HCAM** (Lampinen et al., 2021): blocks = chunks, ``lse_gate="none"``, ``gate_bias`` = the
  summary logits of the kept chunks (``-inf`` elsewhere), or ``gate_keys`` = the summaries plus a
  0/-inf top-k mask as ``gate_bias``.

``block_gated_attention_reference`` is the specification (dense, explicit per-block outputs,
float64-ready). The Triton kernels (forward, dK/dV/dgate-key, dQ) never build a ``Tq x Tk`` tensor:
each key block fits in one key tile, so a program computes a block's (m, l, acc) exactly and folds
it into an online softmax over the gate logits. The backward recomputes everything per block from
the per-query gate log-normaliser ``Gamma_i = LSE_b gamma_ib`` saved by the forward, using

    d v_j   = sum_i w_ij do_i,                      w_ij = pi_ib p_ij, pi = softmax_b(gamma)
    d gamma_ib = pi_ib (delta_ib - Delta_i),        delta_ib = do_i . o_ib, Delta_i = do_i . out_i
    d s_ij  = w_ij (do_i . v_j - delta_ib) + [b LSE-gated] p_ij d gamma_ib
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ..checks import check_backend, check_qkv

LSE_GATES = ("all", "own", "none")
_LSE_CODE = {"all": 0, "own": 1, "none": 2}
SUPPORTED_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_KERNEL_BLOCK = 128  # a whole key block must fit in one key tile of the kernels


def num_blocks(k_len: int, block_len: int) -> int:
    """Number of key blocks ``ceil(Tk / block_len)``."""
    return -(-k_len // block_len)


def _allowed(tq: int, tk: int, block_len: int, causal: bool, exclude_last: bool, device) -> Tensor:
    """``[Tq, Tk]`` bool: which keys may carry weight for which query (content, not gates)."""
    qpos = torch.arange(tk - tq, tk, device=device)[:, None]
    kpos = torch.arange(tk, device=device)[None, :]
    ok = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if causal:
        ok = ok & (kpos <= qpos)
    if exclude_last:
        ok = ok & (kpos % block_len != block_len - 1)
    return ok


def block_gated_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_len: int,
    gate_keys: Tensor | None = None,
    gate_bias: Tensor | None = None,
    lse_gate: str = "all",
    exclude_last: bool = False,
    causal: bool = True,
    scale: float | None = None,
) -> Tensor:
    """The block-gated attention of the module docstring, written out block by block.

    Shapes as in :func:`block_gated_attention`. Memory ``O(B H Tq Tk Dv / block_len)`` for the
    explicit per-block outputs: for tests and small inputs only.
    """
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    nb = num_blocks(tk, block_len)
    rep = h // hkv
    k_h = k.repeat_interleave(rep, dim=2)
    v_h = v.repeat_interleave(rep, dim=2)
    dev, dt = q.device, q.dtype
    lowest = torch.finfo(dt).min

    s = torch.einsum("bihd,bjhd->bhij", q, k_h) * scale  # [B, H, Tq, Tk]
    allowed = _allowed(tq, tk, block_len, causal, exclude_last, dev)
    pad = nb * block_len - tk
    allowed_b = torch.nn.functional.pad(allowed, (0, pad), value=False).reshape(tq, nb, block_len)
    # A large finite fill (not -inf) keeps logsumexp's backward finite for blocks with no allowed key.
    s_b = torch.nn.functional.pad(torch.where(allowed, s, lowest), (0, pad), value=lowest).reshape(b, h, tq, nb, block_len)
    has = allowed_b.any(-1)  # [Tq, NB]
    lam = s_b.logsumexp(-1)  # [B, H, Tq, NB]
    p = torch.where(allowed_b, torch.exp(s_b - lam[..., None]), 0.0)  # softmax inside each block
    v_b = torch.nn.functional.pad(v_h, (0, 0, 0, 0, 0, pad)).reshape(b, nb, block_len, h, v.shape[-1])
    o_blocks = torch.einsum("bhinl,bnlhe->bhine", p, v_b)  # [B, H, Tq, NB, Dv]: per-block outputs

    qblock = torch.arange(tk - tq, tk, device=dev) // block_len
    blocks = torch.arange(nb, device=dev)
    if lse_gate == "all":
        lse_gated = torch.ones(tq, nb, dtype=torch.bool, device=dev)
    elif lse_gate == "own":
        lse_gated = qblock[:, None] == blocks[None, :]
    else:
        lse_gated = torch.zeros(tq, nb, dtype=torch.bool, device=dev)
    key_gate = torch.zeros((), dtype=dt, device=dev)
    if gate_keys is not None:
        gk = gate_keys.repeat_interleave(rep, dim=2)[:, :nb]  # [B, NBgk, H, D]
        key_gate = torch.einsum("bihd,bnhd->bhin", q, gk) * scale
        if key_gate.shape[-1] < nb:  # blocks without a gate key can only ever be LSE-gated (checked)
            key_gate = torch.nn.functional.pad(key_gate, (0, nb - key_gate.shape[-1]))
    gamma = torch.where(lse_gated, lam, key_gate)
    if gate_bias is not None:
        gamma = gamma + gate_bias.permute(0, 2, 1, 3)  # [B, Tq, H, NB] -> [B, H, Tq, NB]
    visible = has & torch.isfinite(gamma)
    g_fill = torch.where(visible, gamma, lowest)
    e = torch.where(visible, torch.exp(g_fill - g_fill.amax(-1, keepdim=True).detach()), 0.0)
    z = e.sum(-1, keepdim=True)
    pi = e / torch.where(z > 0, z, 1.0)  # softmax over the visible blocks; all-invisible rows -> 0
    out = torch.einsum("bhin,bhine->bihe", pi, o_blocks)
    return out


def _check_int(fn: str, name: str, value, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{fn}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_args(fn, q, k, v, block_len, gate_keys, gate_bias, lse_gate, exclude_last, causal) -> None:
    check_qkv(fn, q, k, v)
    _check_int(fn, "block_len", block_len, 2 if exclude_last else 1)
    if lse_gate not in LSE_GATES:
        raise ValueError(f"{fn}: lse_gate must be one of {LSE_GATES}, got {lse_gate!r}")
    if not isinstance(exclude_last, bool) or not isinstance(causal, bool):
        raise TypeError(f"{fn}: exclude_last and causal must be bools, got {exclude_last!r}, {causal!r}")
    if lse_gate == "own" and not causal:
        raise ValueError(f"{fn}: lse_gate='own' (the query's own block) needs causal=True")
    if lse_gate == "all" and gate_keys is not None:
        raise ValueError(f"{fn}: gate_keys are unused with lse_gate='all'; pass lse_gate='own' or 'none'")
    if lse_gate != "all" and gate_keys is None and gate_bias is None:
        raise ValueError(f"{fn}: lse_gate={lse_gate!r} needs gate_keys and/or gate_bias for the other blocks")
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    nb = num_blocks(tk, block_len)
    if gate_keys is not None:
        if not isinstance(gate_keys, Tensor) or gate_keys.ndim != 4:
            raise ValueError(f"{fn}: gate_keys must be a tensor [batch, blocks, kv_heads, head_dim], got {getattr(gate_keys, 'shape', gate_keys)}")
        nfull = tk // block_len
        # With lse_gate='own' (causal), a block is gated by its key only for queries after it, so it
        # is complete: a trailing partial block needs no gate key.
        ok_counts = (nb, nfull) if lse_gate == "own" else (nb,)
        if gate_keys.shape[0] != b or gate_keys.shape[2] != hkv or gate_keys.shape[3] != d or gate_keys.shape[1] not in ok_counts:
            raise ValueError(
                f"{fn}: gate_keys must have shape [{b}, {' or '.join(map(str, sorted(set(ok_counts))))}, {hkv}, {d}] "
                f"(one key per block of {block_len}), got {list(gate_keys.shape)}"
            )
        if gate_keys.dtype != q.dtype or gate_keys.device != q.device:
            raise TypeError(f"{fn}: gate_keys must match q's dtype/device ({q.dtype}, {q.device}), got {gate_keys.dtype}, {gate_keys.device}")
    if gate_bias is not None:
        if not isinstance(gate_bias, Tensor) or tuple(gate_bias.shape) != (b, tq, h, nb):
            raise ValueError(f"{fn}: gate_bias must have shape [batch, q_len, heads, blocks] = {[b, tq, h, nb]}, got {getattr(gate_bias, 'shape', gate_bias)}")
        if not gate_bias.is_floating_point() or gate_bias.device != q.device:
            raise TypeError(f"{fn}: gate_bias must be a floating tensor on {q.device}, got {gate_bias.dtype} on {gate_bias.device}")


def _triton_available(device: torch.device) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover
        return False
    return device.type == "cuda"


def block_gated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_len: int,
    *,
    gate_keys: Tensor | None = None,
    gate_bias: Tensor | None = None,
    lse_gate: str = "all",
    exclude_last: bool = False,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Block-gated attention (see the module docstring for the exact formula).

    Args:
        q: ``[B, Tq, H, D]``; query ``i`` sits at absolute position ``Tk - Tq + i``.
        k: ``[B, Tk, Hkv, D]``; v: ``[B, Tk, Hkv, Dv]`` (``H % Hkv == 0``: GQA).
        block_len: positions per key block ``l`` (the kernel needs ``l <= 128``).
        gate_keys: ``[B, NB, Hkv, D]`` one gate key per block (``NB = ceil(Tk / l)``; with
            ``lse_gate="own"`` also ``floor(Tk / l)``); gate logit ``scale * q_i . gk_b``.
        gate_bias: ``[B, Tq, H, NB]`` added to every gate logit (``-inf`` hides a block).
        lse_gate: ``"all"``, ``"own"`` or ``"none"``: which blocks use their own log-sum-exp as gate.
        exclude_last: the last position of every block carries no weight on the values (landmarks).
        causal: keys after the query carry no weight.
        scale: logit scale, default ``D ** -0.5`` (used for the gate keys too).
        backend: ``"auto"`` (Triton on CUDA, else the reference), ``"triton"`` or ``"reference"``.

    Returns:
        ``[B, Tq, H, Dv]``. Differentiable in ``q, k, v, gate_keys, gate_bias``.
    """
    fn = "block_gated_attention"
    check_backend(fn, backend)
    if backend == "torch":
        raise ValueError(f"{fn}: backend 'torch' does not exist; use 'auto', 'triton' or 'reference'")
    _check_args(fn, q, k, v, block_len, gate_keys, gate_bias, lse_gate, exclude_last, causal)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    use_kernel = backend == "triton" or (backend == "auto" and _triton_available(q.device) and q.dtype in SUPPORTED_KERNEL_DTYPES)
    if not use_kernel:
        return block_gated_attention_reference(q, k, v, block_len, gate_keys, gate_bias, lse_gate, exclude_last, causal, scale)
    if q.dtype not in SUPPORTED_KERNEL_DTYPES:
        raise TypeError(f"{fn}: the Triton kernel supports {SUPPORTED_KERNEL_DTYPES}, got {q.dtype}")
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"{fn}: the Triton kernel needs v's head dim equal to q's ({v.shape[-1]} vs {q.shape[-1]})")
    if not 16 <= q.shape[-1] <= 128:
        raise ValueError(f"{fn}: the Triton kernel supports head dims 16..128, got {q.shape[-1]}")
    if block_len > MAX_KERNEL_BLOCK:
        raise ValueError(f"{fn}: the Triton kernel supports block_len <= {MAX_KERNEL_BLOCK}, got {block_len} (use backend='reference')")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if gate_keys is not None and gate_keys.stride(-1) != 1:
        gate_keys = gate_keys.contiguous()
    if gate_bias is not None:
        gate_bias = gate_bias.to(torch.float32).contiguous()
    out, _ = block_gated_attn_fwd(q, k, v, gate_keys, gate_bias, block_len, scale, _LSE_CODE[lse_gate], exclude_last, causal)
    return out


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the reference still works without Triton
    triton = None

LOG2E = 1.4426950408889634

if triton is not None:

    @triton.jit
    def _block_stats(q, k_ptr, v_ptr, n, pos_q, m_ok, offs_j, offs_d, d_ok, skt, svt, qk_scale2, Lk,
                     BL: tl.constexpr, CAUSAL: tl.constexpr, EXCL: tl.constexpr, IEEE: tl.constexpr):
        """Scores of key block ``n`` in base 2, its per-row max / sum / LSE, and its K, V tiles."""
        kpos = n * BL + offs_j
        col_ok = (offs_j < BL) & (kpos < Lk)
        if EXCL:
            col_ok = col_ok & (offs_j != BL - 1)
        k = tl.load(k_ptr + kpos[:, None].to(tl.int64) * skt + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_ptr + kpos[:, None].to(tl.int64) * svt + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale2
        else:
            s = tl.dot(q, tl.trans(k)) * qk_scale2
        allowed = col_ok[None, :] & m_ok[:, None]
        if CAUSAL:
            allowed = allowed & (kpos[None, :] <= pos_q[:, None])
        s = tl.where(allowed, s, float("-inf"))
        mb = tl.max(s, 1)
        mb_safe = tl.where(mb == float("-inf"), 0.0, mb)
        p = tl.math.exp2(s - mb_safe[:, None])
        lb = tl.sum(p, 1)
        has = lb > 0.0
        lb_safe = tl.where(has, lb, 1.0)
        lam = tl.where(has, mb_safe + tl.math.log2(lb_safe), float("-inf"))
        return k, v, p, lb_safe, lam, has

    @triton.jit
    def _gate(q, lam, has, n, pos_q, offs_m, m_ok, offs_d, d_ok, gk_ptr, sgn, bias_ptr, sbt, NGK, qk_scale2,
              BL: tl.constexpr, BLOCK_D: tl.constexpr, LSE_MODE: tl.constexpr, HAS_GK: tl.constexpr, HAS_BIAS: tl.constexpr):
        """Gate logits (base 2) of block ``n`` for the query rows, -inf for invisible blocks."""
        own = (pos_q // BL) == n
        if LSE_MODE == 0:
            lse_gated = pos_q >= 0
        elif LSE_MODE == 1:
            lse_gated = own
        else:
            lse_gated = pos_q < 0
        g = tl.where(lse_gated, lam, 0.0)
        gk = tl.zeros([BLOCK_D], tl.float32)
        if HAS_GK:
            gk = tl.load(gk_ptr + n * sgn + offs_d, mask=d_ok & ((offs_d * 0 + n) < NGK), other=0.0).to(tl.float32)
            key_gate = tl.sum(q.to(tl.float32) * gk[None, :], 1) * qk_scale2
            g = tl.where(lse_gated, g, key_gate)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_m.to(tl.int64) * sbt + n, mask=m_ok, other=float("-inf"))
            g = g + bias * 1.4426950408889634
        g = tl.where(has, g, float("-inf"))
        return g, lse_gated, gk

    @triton.jit
    def _gated_fwd_kernel(
        Q, K, V, GK, BIAS, O, GAM,
        sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
        sgb, sgn, sgh, sbb, sbt, sbh,
        qk_scale2, Lq, Lk, NB, NGK,
        H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BL: tl.constexpr,
        LSE_MODE: tl.constexpr, CAUSAL: tl.constexpr, EXCL: tl.constexpr,
        HAS_GK: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    ):
        qt = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // GROUP
        offs_m = qt * BM + tl.arange(0, BM)
        offs_j = tl.arange(0, BN)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        m_ok = offs_m < Lq
        pos_q = offs_m + (Lk - Lq)
        q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqt + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        k_ptr = K + b.to(tl.int64) * skb + hk * skh
        v_ptr = V + b.to(tl.int64) * svb + hk * svh
        gk_ptr = GK + b.to(tl.int64) * sgb + hk * sgh
        bias_ptr = BIAS + b.to(tl.int64) * sbb + h * sbh
        n_hi = NB
        if CAUSAL:
            n_hi = tl.minimum(NB, (tl.minimum(qt * BM + BM, Lq) - 1 + (Lk - Lq)) // BL + 1)
        g_max = tl.full([BM], float("-inf"), tl.float32)  # running max of the gate logits
        g_sum = tl.zeros([BM], tl.float32)  # running sum of exp2(gate - g_max)
        acc = tl.zeros([BM, BLOCK_D], tl.float32)  # running sum of exp2(gate - g_max) * o_b
        for n in range(0, n_hi):
            k, v, p, lb_safe, lam, has = _block_stats(q, k_ptr, v_ptr, n, pos_q, m_ok, offs_j, offs_d, d_ok, skt, svt,
                                                      qk_scale2, Lk, BL, CAUSAL, EXCL, IEEE)
            g, lse_gated, gk = _gate(q, lam, has, n, pos_q, offs_m, m_ok, offs_d, d_ok, gk_ptr, sgn, bias_ptr, sbt, NGK,
                                     qk_scale2, BL, BLOCK_D, LSE_MODE, HAS_GK, HAS_BIAS)
            if IEEE:
                ob = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                ob = tl.dot(p.to(v.dtype), v)
            g_new = tl.maximum(g_max, g)
            g_safe = tl.where(g_new == float("-inf"), 0.0, g_new)
            alpha = tl.math.exp2(g_max - g_safe)
            beta = tl.math.exp2(g - g_safe)
            g_sum = g_sum * alpha + beta
            acc = acc * alpha[:, None] + (beta / lb_safe)[:, None] * ob
            g_max = g_new
        empty = g_sum == 0.0
        out = acc / tl.where(empty, 1.0, g_sum)[:, None]
        gam = tl.where(empty, float("inf"), g_max + tl.math.log2(tl.where(empty, 1.0, g_sum)))
        tl.store(O + b.to(tl.int64) * sob + h * soh + offs_m[:, None].to(tl.int64) * sot + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
        tl.store(GAM + bh.to(tl.int64) * Lq + offs_m, gam, mask=m_ok)

    @triton.jit
    def _block_grads(q, do, k, v, p, lb_safe, gam, delta, g, lse_gated, IEEE: tl.constexpr):
        """Per-block backward quantities: weights w, dP, block gate gradient and dS (natural units)."""
        pn = p / lb_safe[:, None]  # softmax inside the block
        if IEEE:
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        else:
            dp = tl.dot(do, tl.trans(v))
        delta_b = tl.sum(pn * dp, 1)  # do_i . o_ib
        pi = tl.math.exp2(g - gam)  # gam = +inf on empty rows, g = -inf on invisible blocks -> 0
        w = pi[:, None] * pn
        dgam = pi * (delta_b - delta)
        ds = w * (dp - delta_b[:, None]) + tl.where(lse_gated, dgam, 0.0)[:, None] * pn
        return w, ds, dgam

    @triton.jit
    def _gated_bwd_dkdv_kernel(
        Q, K, V, GK, BIAS, DO, GAM, DELTA, DK, DV, DGK, DBIAS,
        sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh, sdkb, sdkt, sdkh,
        sgb, sgn, sgh, sdgb, sdgn, sdgh, sbb, sbt, sbh,
        qk_scale2, sm_scale, Lq, Lk, NB, NGK,
        H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BL: tl.constexpr,
        LSE_MODE: tl.constexpr, CAUSAL: tl.constexpr, EXCL: tl.constexpr,
        HAS_GK: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    ):
        # One program: key block n of query head h. dK/dV/dGK are written per query head (summed over
        # the GQA group outside); the block's gate-bias gradient column is written here.
        n = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // GROUP
        offs_j = tl.arange(0, BN)
        offs_m0 = tl.arange(0, BM)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        k_ptr = K + b.to(tl.int64) * skb + hk * skh
        v_ptr = V + b.to(tl.int64) * svb + hk * svh
        gk_ptr = GK + b.to(tl.int64) * sgb + hk * sgh
        bias_ptr = BIAS + b.to(tl.int64) * sbb + h * sbh
        dbias_ptr = DBIAS + b.to(tl.int64) * sbb + h * sbh
        q_base = Q + b.to(tl.int64) * sqb + h * sqh
        do_base = DO + b.to(tl.int64) * sdob + h * sdoh
        dk = tl.zeros([BN, BLOCK_D], tl.float32)
        dv = tl.zeros([BN, BLOCK_D], tl.float32)
        dgk = tl.zeros([BLOCK_D], tl.float32)
        m_lo = 0
        if CAUSAL:
            m_lo = tl.maximum(n * BL - (Lk - Lq), 0) // BM
        for mt in range(m_lo, tl.cdiv(Lq, BM)):
            offs_m = mt * BM + offs_m0
            m_ok = offs_m < Lq
            pos_q = offs_m + (Lk - Lq)
            q = tl.load(q_base + offs_m[:, None].to(tl.int64) * sqt + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            do = tl.load(do_base + offs_m[:, None].to(tl.int64) * sdot + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            gam = tl.load(GAM + bh.to(tl.int64) * Lq + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA + bh.to(tl.int64) * Lq + offs_m, mask=m_ok, other=0.0)
            k, v, p, lb_safe, lam, has = _block_stats(q, k_ptr, v_ptr, n, pos_q, m_ok, offs_j, offs_d, d_ok, skt, svt,
                                                      qk_scale2, Lk, BL, CAUSAL, EXCL, IEEE)
            g, lse_gated, gk = _gate(q, lam, has, n, pos_q, offs_m, m_ok, offs_d, d_ok, gk_ptr, sgn, bias_ptr, sbt, NGK,
                                     qk_scale2, BL, BLOCK_D, LSE_MODE, HAS_GK, HAS_BIAS)
            w, ds, dgam = _block_grads(q, do, k, v, p, lb_safe, gam, delta, g, lse_gated, IEEE)
            if IEEE:
                dv += tl.dot(tl.trans(w.to(do.dtype)), do, input_precision="ieee")
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")
            else:
                dv += tl.dot(tl.trans(w.to(do.dtype)), do)
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
            if HAS_GK:
                dgk += tl.sum(tl.where(lse_gated, 0.0, dgam)[:, None] * q.to(tl.float32), 0)
            if HAS_BIAS:
                tl.store(dbias_ptr + offs_m.to(tl.int64) * sbt + n, dgam, mask=m_ok)
        kpos = n * BL + offs_j
        row_ok = (offs_j < BL) & (kpos < Lk)
        out_off = b.to(tl.int64) * sdkb + h * sdkh + kpos[:, None].to(tl.int64) * sdkt + offs_d[None, :]
        msk = row_ok[:, None] & d_ok[None, :]
        tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=msk)
        tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=msk)
        if HAS_GK:
            tl.store(DGK + b.to(tl.int64) * sdgb + h * sdgh + n * sdgn + offs_d, dgk * sm_scale, mask=d_ok & ((offs_d * 0 + n) < NGK))

    @triton.jit
    def _gated_bwd_dq_kernel(
        Q, K, V, GK, BIAS, DO, GAM, DELTA, DQ,
        sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh, sdqb, sdqt, sdqh,
        sgb, sgn, sgh, sbb, sbt, sbh,
        qk_scale2, sm_scale, Lq, Lk, NB, NGK,
        H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BL: tl.constexpr,
        LSE_MODE: tl.constexpr, CAUSAL: tl.constexpr, EXCL: tl.constexpr,
        HAS_GK: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    ):
        qt = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // GROUP
        offs_m = qt * BM + tl.arange(0, BM)
        offs_j = tl.arange(0, BN)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        m_ok = offs_m < Lq
        pos_q = offs_m + (Lk - Lq)
        q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqt + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(DO + b.to(tl.int64) * sdob + h * sdoh + offs_m[:, None].to(tl.int64) * sdot + offs_d[None, :],
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        gam = tl.load(GAM + bh.to(tl.int64) * Lq + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + bh.to(tl.int64) * Lq + offs_m, mask=m_ok, other=0.0)
        k_ptr = K + b.to(tl.int64) * skb + hk * skh
        v_ptr = V + b.to(tl.int64) * svb + hk * svh
        gk_ptr = GK + b.to(tl.int64) * sgb + hk * sgh
        bias_ptr = BIAS + b.to(tl.int64) * sbb + h * sbh
        n_hi = NB
        if CAUSAL:
            n_hi = tl.minimum(NB, (tl.minimum(qt * BM + BM, Lq) - 1 + (Lk - Lq)) // BL + 1)
        dq = tl.zeros([BM, BLOCK_D], tl.float32)
        for n in range(0, n_hi):
            k, v, p, lb_safe, lam, has = _block_stats(q, k_ptr, v_ptr, n, pos_q, m_ok, offs_j, offs_d, d_ok, skt, svt,
                                                      qk_scale2, Lk, BL, CAUSAL, EXCL, IEEE)
            g, lse_gated, gk = _gate(q, lam, has, n, pos_q, offs_m, m_ok, offs_d, d_ok, gk_ptr, sgn, bias_ptr, sbt, NGK,
                                     qk_scale2, BL, BLOCK_D, LSE_MODE, HAS_GK, HAS_BIAS)
            w, ds, dgam = _block_grads(q, do, k, v, p, lb_safe, gam, delta, g, lse_gated, IEEE)
            if IEEE:
                dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
            else:
                dq += tl.dot(ds.to(k.dtype), k)
            if HAS_GK:
                dq += tl.where(lse_gated, 0.0, dgam)[:, None] * gk[None, :]
        tl.store(DQ + b.to(tl.int64) * sdqb + h * sdqh + offs_m[:, None].to(tl.int64) * sdqt + offs_d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _alloc(like: Tensor, shape, dtype) -> Tensor:
    """Output buffers; NaN-filled when MNEMO_POISON=1 (tests) so unwritten elements fail."""
    if os.environ.get("MNEMO_POISON") == "1":
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def _tiles(d: int, block_len: int, dtype: torch.dtype) -> dict:
    bn = max(16, triton.next_power_of_2(block_len))
    bd = max(16, triton.next_power_of_2(d))
    bm = 64
    if dtype == torch.float32 and bd * bn > 64 * 64:
        bm = 32  # fp32 tiles take twice the registers / shared memory of 16-bit ones
    return dict(BM=bm, BN=bn, BLOCK_D=bd)


def _meta(q: Tensor, k: Tensor, block_len: int, lse_mode: int, exclude_last: bool, causal: bool, has_gk: bool, has_bias: bool) -> dict:
    h, d, hkv = q.shape[2], q.shape[3], k.shape[2]
    meta = dict(H=h, GROUP=h // hkv, D=d, BL=block_len, LSE_MODE=lse_mode, CAUSAL=causal, EXCL=exclude_last,
                HAS_GK=has_gk, HAS_BIAS=has_bias, IEEE=q.dtype == torch.float32)
    meta.update(_tiles(d, block_len, q.dtype))
    return meta


def _launch(kernel, grid, args, meta, device) -> None:
    warps = 4 if meta["BM"] * max(meta["BLOCK_D"], meta["BN"]) < 64 * 128 else 8
    if device.type == "cuda":
        kernel[grid](*args, **meta, num_warps=warps, num_stages=2)
    else:  # Triton's CPU interpreter (tests)
        kernel[grid](*args, **meta)


def _gk_strides(gk: Tensor | None) -> tuple[int, int, int]:
    return (gk.stride(0), gk.stride(1), gk.stride(2)) if gk is not None else (0, 0, 0)


def _bias_strides(bias: Tensor | None) -> tuple[int, int, int]:
    return (bias.stride(0), bias.stride(1), bias.stride(2)) if bias is not None else (0, 0, 0)


def _fwd_impl(q, k, v, gate_keys, gate_bias, block_len, scale, lse_mode, exclude_last, causal):
    b, lq, h, d = q.shape
    lk = k.shape[1]
    nb = num_blocks(lk, block_len)
    ngk = gate_keys.shape[1] if gate_keys is not None else 0
    o = _alloc(q, q.shape, q.dtype)
    gam = _alloc(q, (b, h, lq), torch.float32)
    meta = _meta(q, k, block_len, lse_mode, exclude_last, causal, gate_keys is not None, gate_bias is not None)
    gk = gate_keys if gate_keys is not None else q  # placeholder pointer, never read (HAS_GK=False)
    bias = gate_bias if gate_bias is not None else gam
    args = (
        q, k, v, gk, bias, o, gam,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        *_gk_strides(gate_keys), *_bias_strides(gate_bias),
        scale * LOG2E, lq, lk, nb, ngk,
    )
    _launch(_gated_fwd_kernel, (triton.cdiv(lq, meta["BM"]), b * h), args, meta, q.device)
    return o, gam


def _bwd_impl(do, q, k, v, gate_keys, gate_bias, o, gam, block_len, scale, lse_mode, exclude_last, causal):
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    group = h // hkv
    nb = num_blocks(lk, block_len)
    ngk = gate_keys.shape[1] if gate_keys is not None else 0
    do = do.contiguous() if do.stride(-1) != 1 else do
    delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, Lq]: do_i . out_i
    meta = _meta(q, k, block_len, lse_mode, exclude_last, causal, gate_keys is not None, gate_bias is not None)
    kv_dtype = k.dtype if group == 1 else torch.float32
    dk = _alloc(q, (b, lk, h, d), kv_dtype)
    dv = _alloc(q, (b, lk, h, d), kv_dtype)
    dgk = _alloc(q, (b, ngk, h, d), torch.float32) if gate_keys is not None else None
    # Zero-filled on purpose: causal programs skip (query, block) pairs where the block lies after
    # the query, and 0 is exactly the gradient there.
    dbias = torch.zeros_like(gate_bias) if gate_bias is not None else None
    gk = gate_keys if gate_keys is not None else q
    bias = gate_bias if gate_bias is not None else gam
    dgk_buf = dgk if dgk is not None else gam
    dbias_buf = dbias if dbias is not None else gam
    dkdv_args = (
        q, k, v, gk, bias, do, gam, delta, dk, dv, dgk_buf, dbias_buf,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
        *_gk_strides(gate_keys), *_gk_strides(dgk), *_bias_strides(gate_bias),
        scale * LOG2E, scale, lq, lk, nb, ngk,
    )
    _launch(_gated_bwd_dkdv_kernel, (nb, b * h), dkdv_args, meta, q.device)
    dq = _alloc(q, q.shape, q.dtype)
    dq_args = (
        q, k, v, gk, bias, do, gam, delta, dq,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
        *_gk_strides(gate_keys), *_bias_strides(gate_bias),
        scale * LOG2E, scale, lq, lk, nb, ngk,
    )
    _launch(_gated_bwd_dq_kernel, (triton.cdiv(lq, meta["BM"]), b * h), dq_args, meta, q.device)
    if group > 1:
        dk = dk.view(b, lk, hkv, group, d).sum(3).to(k.dtype)
        dv = dv.view(b, lk, hkv, group, d).sum(3).to(v.dtype)
    if dgk is not None:
        dgk = dgk.view(b, ngk, hkv, group, d).sum(3).to(gate_keys.dtype)
    return dq, dk, dv, dgk, dbias


if triton is not None:

    @torch.library.custom_op("mnemotorch::block_gated_attn_fwd", mutates_args=())
    def block_gated_attn_fwd(
        q: Tensor, k: Tensor, v: Tensor, gate_keys: Optional[Tensor], gate_bias: Optional[Tensor],
        block_len: int, scale: float, lse_mode: int, exclude_last: bool, causal: bool,
    ) -> tuple[Tensor, Tensor]:
        return _fwd_impl(q, k, v, gate_keys, gate_bias, block_len, scale, lse_mode, exclude_last, causal)

    @block_gated_attn_fwd.register_fake
    def _(q, k, v, gate_keys, gate_bias, block_len, scale, lse_mode, exclude_last, causal):
        return torch.empty_like(q), q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)

    @torch.library.custom_op("mnemotorch::block_gated_attn_bwd", mutates_args=())
    def block_gated_attn_bwd(
        do: Tensor, q: Tensor, k: Tensor, v: Tensor, gate_keys: Optional[Tensor], gate_bias: Optional[Tensor],
        o: Tensor, gam: Tensor, block_len: int, scale: float, lse_mode: int, exclude_last: bool, causal: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        # Absent gate inputs get empty gradients (custom ops return tensors, never None).
        dq, dk, dv, dgk, dbias = _bwd_impl(do, q, k, v, gate_keys, gate_bias, o, gam, block_len, scale, lse_mode, exclude_last, causal)
        return dq, dk, dv, q.new_empty(0) if dgk is None else dgk, q.new_empty(0) if dbias is None else dbias

    @block_gated_attn_bwd.register_fake
    def _(do, q, k, v, gate_keys, gate_bias, *rest):
        return (
            torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(0) if gate_keys is None else torch.empty_like(gate_keys),
            q.new_empty(0) if gate_bias is None else torch.empty_like(gate_bias),
        )

    def _setup_context(ctx, inputs, output):
        q, k, v, gate_keys, gate_bias, block_len, scale, lse_mode, exclude_last, causal = inputs
        o, gam = output
        ctx.has_gk, ctx.has_bias = gate_keys is not None, gate_bias is not None
        ctx.save_for_backward(q, k, v, gate_keys, gate_bias, o, gam)
        ctx.args = (block_len, scale, lse_mode, exclude_last, causal)

    def _backward(ctx, do, dgam):
        q, k, v, gate_keys, gate_bias, o, gam = ctx.saved_tensors
        dq, dk, dv, dgk, dbias = block_gated_attn_bwd(do, q, k, v, gate_keys, gate_bias, o, gam, *ctx.args)
        dgk = dgk if ctx.has_gk else None
        dbias = dbias if ctx.has_bias else None
        return dq, dk, dv, dgk, dbias, None, None, None, None, None

    block_gated_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


__all__ = [
    "LSE_GATES",
    "block_gated_attention",
    "block_gated_attention_reference",
    "num_blocks",
]
