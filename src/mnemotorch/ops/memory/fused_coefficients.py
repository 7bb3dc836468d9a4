"""The gate coefficients of whole chunks in one Triton program per (chunk, batch row, head), forward and backward.

:func:`~.chunked.gate_coefficients` builds, per chunk of ``C`` tokens, from the log gates ``a_t = log(1 − α_t)``
(retention), ``e_t = log η_t`` (momentum) and the step sizes ``θ_t`` (docs/mixers/titans.md, "chunk coefficients"):

* the segment sums ``S^a[t, s] = Σ_{r = s+1..t} a_r`` (``s ≤ t``) and ``S^e`` likewise;
* ``A = exp(S^a)``, ``N[t, s] = exp(S^e[t, s]) θ_s`` (zero above the diagonal), ``G = A N``;
* ``β_t = exp(Σ_{r ≤ t} a_r)``, ``m_t = exp(Σ_{r ≤ t} e_r)``, ``f = A m``.

In PyTorch (compiled by inductor) that is six elementwise / reduction kernels over ``[n, B, H, C, C]`` and a batched
fp32 GEMM each way: ~1.2 ms of a 16K-token Titans layer's forward + backward on an H200 (twenty-sixth session's
profile, docs/results/neural_memory.md). Here one program holds its chunk's ``[C, C]`` tiles in registers: the forward
writes ``G, N, β, m, f`` once, and the backward recomputes ``A`` and ``exp(S^e)`` from the ``C`` gates, reads ``N`` and the
coefficients' cotangents, and writes the three gate gradients.

The backward, for cotangents ``Ḡ, N̄, β̄, m̄, f̄``:

* ``Ā = Ḡ Nᵀ + f̄ mᵀ``; ``N̄' = N̄ + Aᵀ Ḡ``; ``m̄' = m̄ + Aᵀ f̄``;
* ``S̄^a = Ā ∘ A``, ``S̄^e = N̄' ∘ N``, ``θ̄_s = Σ_t N̄'[t, s] exp(S^e[t, s])``;
* a segment sum's adjoint: ``x̄_r = Σ_{t ≥ r} Σ_{s < r} S̄[t, s]`` (a reverse cumulative sum down the rows, then each
  row summed left of the diagonal); a prefix sum's: ``x̄_r = Σ_{t ≥ r} ȳ_t``, with ``ȳ = β̄ ∘ β`` for ``a`` and
  ``m̄' ∘ m`` for ``e``.

Both run in fp32, the two ``[C, C]`` products as three TF32 products each (``PRECISION``); the sums run in another order
than the PyTorch form's fp32 ones, so the values differ from it by about fp32 rounding (≤ 2e-6 relative, the gradients
≤ 1e-5, in the tests). The log gates go in as ``[B, n·C, H]`` (any strides);
the coefficients come out chunk-major, ``G, N [n, B, H, C, C]``, ``β, m, f [n, B, H, C]``, as the fused kernels read
them. Tests: ``tests/ops/test_memory_coefficients_triton.py`` (against float64 PyTorch, through Triton's interpreter on
the CPU) and ``tests/gpu/test_memory_fused_gpu.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..eager import direct
from ..triton_launch import launcher

#: The ``[C, C]`` products' ``tl.dot`` input precision: "tf32x3" (three TF32 products on the matrix unit, ~2⁻²¹ relative
#: error a term). "ieee" is exact fp32 but builds as CUDA-core FMAs whose operand tiles spill (offline sm_90a builds,
#: C = 64, 4 warps: 900 bytes a thread forward, 17 KB backward; ``scripts/aot_memory.py --kernels coef_fwd,coef_bwd``).
PRECISION = "tf32x3"


@triton.jit
def _program_chunk(pid, B, H):
    """``(b, i, h)``: the batch row, chunk and head of program ``pid = (i · B + b) · H + h`` (chunk-major order)."""
    return (pid // H) % B, pid // (H * B), pid % H


@triton.jit
def _gate_rows(P, pid, B, H, sb, st, sh, C: tl.constexpr):
    """Program ``pid``'s chunk of a ``[B, n·C, H]`` gate in fp32: ``[C]``."""
    b, i, h = _program_chunk(pid, B, H)
    t = i * C + tl.arange(0, C)
    return tl.load(P + b * sb + t * st + h * sh).to(tl.float32)


@triton.jit
def _segment_sums(x, C: tl.constexpr):
    """``S[t, s] = Σ_{r = s+1..t} x_r`` for ``s < t`` (0 on and above the diagonal): ``[C, C]`` from ``x [C]``."""
    r = tl.arange(0, C)
    return tl.cumsum(tl.where(r[:, None] > r[None, :], x[:, None], 0.0), axis=0)


@triton.jit
def _coef_fwd_kernel(LA, LE, TH, G, N, BETA, M, F, B, H, sab, sat, sah, seb, set_, seh, stb, stt, sth, C: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    r = tl.arange(0, C)
    causal = r[:, None] >= r[None, :]
    la = _gate_rows(LA, pid, B, H, sab, sat, sah, C)
    le = _gate_rows(LE, pid, B, H, seb, set_, seh, C)
    th = _gate_rows(TH, pid, B, H, stb, stt, sth, C)
    a = tl.where(causal, tl.exp(_segment_sums(la, C)), 0.0)
    nm = tl.where(causal, tl.exp(_segment_sums(le, C)) * th[None, :], 0.0)
    beta = tl.exp(tl.cumsum(la, 0))
    m = tl.exp(tl.cumsum(le, 0))
    mat = pid * C * C + r[:, None] * C + r[None, :]
    tl.store(N + mat, nm)
    # N's tile goes into the product from memory (its own lines, just written): built in registers, as the
    # cumulative sum lays it out, it took all 255 registers and spilled (offline sm_90a builds; 165 this way)
    tl.debug_barrier()
    tl.store(G + mat, tl.dot(a, tl.load(N + mat), input_precision=PREC))
    tl.store(BETA + pid * C + r, beta)
    tl.store(M + pid * C + r, m)
    tl.store(F + pid * C + r, tl.sum(a * m[None, :], 1))


@triton.jit
def _coef_bwd_kernel(LA, LE, N, DG, DN, DBETA, DM, DF, DLA, DLE, DTH, B, H, sab, sat, sah, seb, set_, seh, C: tl.constexpr,
                     PREC: tl.constexpr):  # fmt: skip
    # (θ itself is not needed: N = E ∘ θ is read, E recomputed, and θ̄ = Σ_t N̄'[t, s] E[t, s])
    pid = tl.program_id(0)
    r = tl.arange(0, C)
    causal = r[:, None] >= r[None, :]
    below = r[:, None] > r[None, :]
    # (in this order, few [C, C] tiles are live at once: A's share first, then N's)
    la = _gate_rows(LA, pid, B, H, sab, sat, sah, C)
    le = _gate_rows(LE, pid, B, H, seb, set_, seh, C)
    m = tl.exp(tl.cumsum(le, 0))
    mat = pid * C * C + r[:, None] * C + r[None, :]
    nm = tl.load(N + mat)  # the forward's N (a product's operand from memory: see the forward)
    dg = tl.load(DG + mat)
    df = tl.load(DF + pid * C + r)
    # Aᵀ for the product built transposed (cumulative sums along the columns): tl.trans of A's tile as an operand took
    # every register and spilled (offline sm_90a builds)
    at = tl.where(below.T | (r[:, None] == r[None, :]), tl.exp(tl.cumsum(tl.where(r[None, :] > r[:, None], la[None, :], 0.0), axis=1)), 0.0)
    dn = tl.load(DN + mat) + tl.dot(at, dg, input_precision=PREC)
    a = tl.where(causal, tl.exp(_segment_sums(la, C)), 0.0)
    dm = tl.load(DM + pid * C + r) + tl.sum(a * df[:, None], 0)
    da = tl.dot(dg, tl.trans(nm), input_precision=PREC) + df[:, None] * m[None, :]
    # the segment sums' adjoint, then the prefix sums' (β = exp(Σ a), m = exp(Σ e))
    dla = tl.sum(tl.where(below, tl.cumsum(da * a, axis=0, reverse=True), 0.0), 1)
    dla += tl.cumsum(tl.load(DBETA + pid * C + r) * tl.exp(tl.cumsum(la, 0)), 0, reverse=True)
    dle = tl.sum(tl.where(below, tl.cumsum(dn * nm, axis=0, reverse=True), 0.0), 1)
    dle += tl.cumsum(dm * m, 0, reverse=True)
    e = tl.where(causal, tl.exp(_segment_sums(le, C)), 0.0)
    dth = tl.sum(dn * e, 0)
    b, i, h = _program_chunk(pid, B, H)
    out = (b * (tl.num_programs(0) // (H * B)) * C + i * C + r) * H + h  # [B, n·C, H] contiguous
    tl.store(DLA + out, dla)
    tl.store(DLE + out, dle)
    tl.store(DTH + out, dth)


def _check(log_retain: Tensor, log_eta: Tensor, theta: Tensor, chunk_size: int) -> tuple[int, int, int, int]:
    if not (log_retain.shape == log_eta.shape == theta.shape) or log_retain.dim() != 3:
        raise ValueError(f"memory_coefficients: the gates must share one [B, T, H] shape, got {tuple(log_retain.shape)}, "
                         f"{tuple(log_eta.shape)}, {tuple(theta.shape)}")  # fmt: skip
    bsz, t, h = log_retain.shape
    if chunk_size < 16 or chunk_size & (chunk_size - 1) or t % chunk_size:
        raise ValueError(f"memory_coefficients: chunk_size must be a power of two >= 16 dividing T = {t}, got {chunk_size}")
    return bsz, t // chunk_size, h, chunk_size


@torch.library.custom_op("mnemotorch::memory_coefficients", mutates_args=())
def memory_coefficients(log_retain: Tensor, log_eta: Tensor, theta: Tensor, chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(G, N [n, B, H, C, C], β, m, f [n, B, H, C])`` in fp32 of the log gates ``log(1 − α)``, ``log η`` and the
    step sizes ``θ``, each ``[B, n·C, H]``: :func:`~.chunked.gate_coefficients`' values (see the module)."""
    bsz, n, h, c = _check(log_retain, log_eta, theta, chunk_size)
    f32 = dict(device=theta.device, dtype=torch.float32)
    g, nm = torch.empty((n, bsz, h, c, c), **f32), torch.empty((n, bsz, h, c, c), **f32)
    beta, m, f = (torch.empty((n, bsz, h, c), **f32) for _ in range(3))
    if n * bsz * h:
        launcher(_coef_fwd_kernel)[(n * bsz * h,)](log_retain, log_eta, theta, g, nm, beta, m, f, bsz, h, *log_retain.stride(),
                                                   *log_eta.stride(), *theta.stride(), C=c, PREC=PRECISION, num_warps=4)  # fmt: skip
    return g, nm, beta, m, f


@memory_coefficients.register_fake
def _(log_retain, log_eta, theta, chunk_size):
    bsz, n, h, c = _check(log_retain, log_eta, theta, chunk_size)
    mat = theta.new_empty((n, bsz, h, c, c), dtype=torch.float32)
    vec = theta.new_empty((n, bsz, h, c), dtype=torch.float32)
    return mat, torch.empty_like(mat), vec, torch.empty_like(vec), torch.empty_like(vec)


@torch.library.custom_op("mnemotorch::memory_coefficients_bwd", mutates_args=())
def memory_coefficients_bwd(log_retain: Tensor, log_eta: Tensor, theta: Tensor, nmat: Tensor, dg: Tensor, dn: Tensor, dbeta: Tensor,
                            dm: Tensor, df: Tensor, chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The gradients ``(d log(1 − α), d log η, dθ)`` ``[B, n·C, H]`` fp32 of :func:`memory_coefficients` for its outputs'
    cotangents (chunk-major, contiguous fp32); ``nmat``: its output ``N``."""
    bsz, n, h, c = _check(log_retain, log_eta, theta, chunk_size)
    outs = [torch.empty((bsz, n * c, h), device=theta.device, dtype=torch.float32) for _ in range(3)]
    if n * bsz * h:
        launcher(_coef_bwd_kernel)[(n * bsz * h,)](log_retain, log_eta, nmat, dg, dn, dbeta, dm, df, *outs, bsz, h, *log_retain.stride(),
                                                   *log_eta.stride(), C=c, PREC=PRECISION, num_warps=4)  # fmt: skip
    return tuple(outs)


@memory_coefficients_bwd.register_fake
def _(log_retain, log_eta, theta, nmat, dg, dn, dbeta, dm, df, chunk_size):
    _check(log_retain, log_eta, theta, chunk_size)
    return tuple(theta.new_empty(theta.shape, dtype=torch.float32) for _ in range(3))


def _setup_context(ctx, inputs, output) -> None:
    log_retain, log_eta, theta, chunk_size = inputs
    ctx.save_for_backward(log_retain, log_eta, theta, output[1])
    ctx.chunk_size = chunk_size


def _backward(ctx, dg, dn, dbeta, dm, df):
    log_retain, log_eta, theta, nmat = ctx.saved_tensors
    f32 = lambda x, shape: nmat.new_zeros(shape) if x is None else x.to(torch.float32).contiguous()  # noqa: E731
    mat, vec = nmat.shape, nmat.shape[:-1]  # [n, B, H, C, C], [n, B, H, C]
    dla, dle, dth = _coefficients_bwd(log_retain, log_eta, theta, nmat, f32(dg, mat), f32(dn, mat), f32(dbeta, vec),
                                      f32(dm, vec), f32(df, vec), ctx.chunk_size)  # fmt: skip
    return dla.to(log_retain.dtype), dle.to(log_eta.dtype), dth.to(theta.dtype), None


memory_coefficients.register_autograd(_backward, setup_context=_setup_context)
# eager calls without the dispatcher's round trip (ops/eager.py); with autograd, through the same three functions
_coefficients = direct(memory_coefficients, _setup_context, _backward)
_coefficients_bwd = direct(memory_coefficients_bwd)


def gate_coefficients_triton(theta: Tensor, eta: Tensor, alpha: Tensor, chunk_size: int) -> tuple[Tensor, ...]:
    """:func:`~.chunked.gate_coefficients` (fp32) through :func:`memory_coefficients`: gates ``[B, n·C, H]`` ->
    ``(G, N [n, B, H, C, C], β, m, f [n, B, H, C])``. The logs stay in PyTorch (:func:`~.chunked.log_gates`)."""
    from .chunked import log_gates

    return _coefficients(*log_gates(eta, alpha, torch.float32), theta.float(), chunk_size)


__all__ = ["gate_coefficients_triton", "memory_coefficients", "memory_coefficients_bwd"]
