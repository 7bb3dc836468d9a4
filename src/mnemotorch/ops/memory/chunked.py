"""Titans neural memory, chunked "dual form": matmuls inside a chunk, a loop only across chunks.

Same semantics as :func:`~mnemotorch.ops.memory.reference.neural_memory_reference` (gradients of a
chunk's tokens at its start weights). Inside a chunk the gradients no longer depend on each other,
so the momentum and decay recurrences are *linear* in them and collapse into ``c × c`` coefficient
matrices, built in log space (``la = log(1 − α)``, ``le = log η``)::

    A_ts = exp(Σ_{r=s+1..t} la_r)        (s ≤ t, else 0)        decay from token s to t
    N_ts = θ_s exp(Σ_{r=s+1..t} le_r)    (s ≤ t, else 0)        momentum weight of ∇_s in S_t
    G = A N,  β_t = exp(Σ_{r≤t} la_r),  m_t = exp(Σ_{r≤t} le_r),  f = A m
    S_t = m_t S_0 − Σ_{s≤t} N_ts ∇_s,     M_t = β_t M_0 + f_t S_0 − Σ_{s≤t} G_ts ∇_s

(``M_0, S_0``: weights and momentum entering the segment; ``∇_s``: the gradient at the chunk-start
weights.) The segment sums are formed by a masked cumulative sum, not as differences of one
cumulative sum, so no cancellation happens and saturated gates (η = 0, α = 1) give exact zeros.

Per layer ``l`` of the memory, with ``X_{l−1}`` the layer's inputs and ``Δ_l = ∂ℓ/∂Z_l`` its
pre-activation gradients, both for the chunk's keys at the chunk-start weights, the per-token
gradient is the outer product ``X_{l−1}[s]ᵀ Δ_l[s]``; it is never materialised. The read with
``M_t`` ("dual form", TTT-MLP style generalised with the coefficient matrices) is, layer by layer
from ``X̂_0 = Q``::

    Ẑ_l = β ⊙ (X̂_{l−1} W_l) + f ⊙ (X̂_{l−1} S_l) − (G ∘ X̂_{l−1} X_{l−1}ᵀ) Δ_l,   X̂_l = σ(Ẑ_l)

and the state leaving the segment uses the last row ``g = G[c−1]``, ``n = N[c−1]``::

    W_l' = β_c W_l + f_c S_l − (g ⊙ X_{l−1})ᵀ Δ_l,    S_l' = m_c S_l − (n ⊙ X_{l−1})ᵀ Δ_l

A call may start or end inside a chunk: the first segment runs from the carried ``position`` to
the chunk's end with the carried chunk-start weights, and a partial last chunk leaves its start
weights and position in the returned state. Any ``T`` is accepted; there is no padding.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import DEFAULT_LN_EPS, MemoryState, accumulation_dtype, check_max_grad_norm, check_memory_args, clip_scale


def _masks(c: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(strictly below the diagonal, on or below it)`` boolean ``[c, c]`` masks.

    Built by comparing index vectors rather than with ``tril``: on a busy CPU every op that enters
    an OpenMP region costs milliseconds, and these masks are rebuilt for every segment.
    """
    i = torch.arange(c, device=device)
    return i.unsqueeze(-1) > i, i.unsqueeze(-1) >= i


def segment_sum(x: Tensor) -> Tensor:
    """``x [..., c] -> [..., c, c]`` with ``out[t, s] = Σ_{r=s+1..t} x_r`` for ``s ≤ t``, ``-inf`` above the diagonal."""
    c = x.shape[-1]
    below, causal = _masks(c, x.device)
    out = x.unsqueeze(-1).expand(*x.shape, c).masked_fill(~below, 0.0).cumsum(-2)
    return out.masked_fill(~causal, float("-inf"))


def chunk_coefficients(theta: Tensor, log_retain: Tensor, log_eta: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The coefficient matrices of one segment (gates ``[..., c]``).

    Returns ``(G [..., c, c], N [..., c, c], β [..., c], m [..., c], f [..., c])``.
    """
    a = segment_sum(log_retain).exp()  # A
    n = segment_sum(log_eta).exp() * theta.unsqueeze(-2)  # N_ts = θ_s exp(e_t − e_s)
    beta = log_retain.cumsum(-1).exp()
    m = log_eta.cumsum(-1).exp()
    gf = a @ torch.cat([n, m.unsqueeze(-1)], -1)  # one matmul for G = A N and f = A m
    return gf[..., :-1], n, beta, m, gf[..., -1]


def _act(name: str, z: Tensor) -> Tensor:
    if name == "silu":
        return F.silu(z)
    if name == "gelu":
        return F.gelu(z)
    return F.relu(z)


def _act_grad(name: str, z: Tensor) -> Tensor:
    """σ'(z), written out: the chunked path does not call autograd inside its forward."""
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if name == "gelu":
        return 0.5 * (1 + torch.erf(z / math.sqrt(2.0))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return (z > 0).to(z.dtype)


def _layer_norm(z: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    mu = z.mean(-1, keepdim=True)
    rstd = torch.rsqrt((z - mu).pow(2).mean(-1, keepdim=True) + eps)
    return (z - mu) * rstd, rstd


def _key_forward(
    k: Tensor, v: Tensor, w0: Sequence[Tensor], activation: str, residual: bool, layer_norm: bool, ln_eps: float
) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The memory's forward on the keys at ``w0`` and the loss gradient at its last pre-output.

    Returns ``(xs, zs, Δ_L, out, rstd, dmean)``: the layer inputs ``X_{l−1}`` (``xs[0] = k``), the
    pre-activations ``Z_l``, ``Δ_L = ∂‖M(k) − v‖² / ∂Z_L`` (through the affine-free LayerNorm when on) and,
    with LayerNorm, its output, ``1/σ`` and ``mean(D ∘ out)`` of ``D = ∂ℓ/∂pred`` (else None).
    """
    depth = len(w0)
    xs, zs = [k], []
    h = k
    for i, wl in enumerate(w0):
        z = h @ wl
        zs.append(z)
        if i < depth - 1:
            h = _act(activation, z)
            xs.append(h)
    out, rstd, dmean = (*_layer_norm(z, ln_eps), None) if layer_norm else (z, None, None)
    pred = out + k if residual else out
    d = 2 * (pred - v)  # ∂‖pred − v‖² / ∂pred
    if layer_norm:  # backward of the affine-free LayerNorm
        dmean = (d * out).mean(-1, keepdim=True)
        d = rstd * (d - d.mean(-1, keepdim=True) - out * dmean)
        return xs, zs, d, out, rstd, dmean
    return xs, zs, d, None, None, None


def _key_pass(
    k: Tensor, v: Tensor, w0: Sequence[Tensor], activation: str, residual: bool, layer_norm: bool, ln_eps: float
) -> tuple[list[Tensor], list[Tensor]]:
    """Layer inputs ``X_{l−1}`` and pre-activation gradients ``Δ_l`` of a segment's keys at ``w0`` (hand-written backward)."""
    depth = len(w0)
    xs, zs, d = _key_forward(k, v, w0, activation, residual, layer_norm, ln_eps)[:3]
    deltas = [d]
    for i in range(depth - 1, 0, -1):
        d = (d @ w0[i].transpose(-1, -2)) * _act_grad(activation, zs[i - 1])
        deltas.append(d)
    deltas.reverse()
    return xs, deltas


def _clipped(
    xs: Sequence[Tensor], deltas: Sequence[Tensor], g_mat: Tensor, n_mat: Tensor, max_grad_norm: float | None
) -> tuple[Tensor, Tensor]:
    """``G, N`` with the clip applied (unchanged without one).

    ‖∇_s‖² = Σ_l ‖X_{l−1}[s]‖² ‖Δ_l[s]‖² (Frobenius norm of each outer product), so the clip needs no
    materialised gradient. It scales ∇_s, i.e. the step θ_s, which enters N (and G = A N) only as a
    factor of column s: scaling those columns is scaling θ_s.
    """
    if max_grad_norm is None:
        return g_mat, n_mat
    sq = sum(x.pow(2).sum(-1) * dl.pow(2).sum(-1) for x, dl in zip(xs, deltas))
    scale = clip_scale(sq, max_grad_norm).unsqueeze(-2)  # [..., 1, c]
    return g_mat * scale, n_mat * scale


def _read(
    q: Tensor, xs: Sequence[Tensor], deltas: Sequence[Tensor], g_mat: Tensor, beta: Tensor, f: Tensor,
    w: Sequence[Tensor], s: Sequence[Tensor], activation: str, residual: bool, layer_norm: bool, ln_eps: float,
) -> Tensor:  # fmt: skip
    """Every token of the segment read with its own ``M_t`` (dual form); ``G`` already clipped."""
    depth = len(w)
    h = q
    for i in range(depth):
        dout = w[i].shape[-1]
        hw = h @ torch.cat([w[i], s[i]], -1)  # X̂ W and X̂ S in one matmul
        z = beta.unsqueeze(-1) * hw[..., :dout] + f.unsqueeze(-1) * hw[..., dout:] - (g_mat * (h @ xs[i].transpose(-1, -2))) @ deltas[i]
        if i < depth - 1:
            h = _act(activation, z)
    y = _layer_norm(z, ln_eps)[0] if layer_norm else z
    return y + q if residual else y


def _update(
    xs: Sequence[Tensor], deltas: Sequence[Tensor], g_mat: Tensor, n_mat: Tensor, beta: Tensor, m: Tensor, f: Tensor,
    w: Sequence[Tensor], s: Sequence[Tensor],
) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
    """The state leaving the segment (last row of the clipped coefficients)."""
    g_last, n_last = g_mat[..., -1, :].unsqueeze(-1), n_mat[..., -1, :].unsqueeze(-1)
    b_c, m_c, f_c = (x[..., -1, None, None] for x in (beta, m, f))
    w_new, s_new = [], []
    for i in range(len(w)):
        din = w[i].shape[-2]
        upd = torch.cat([g_last * xs[i], n_last * xs[i]], -1).transpose(-1, -2) @ deltas[i]  # [B, H, 2·d_in, d_out]
        w_new.append(b_c * w[i] + f_c * s[i] - upd[..., :din, :])
        s_new.append(m_c * s[i] - upd[..., din:, :])
    return w_new, s_new


def _chunk_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g_mat: Tensor,
    n_mat: Tensor,
    beta: Tensor,
    m: Tensor,
    f: Tensor,
    w0: Sequence[Tensor],
    w: Sequence[Tensor],
    s: Sequence[Tensor],
    activation: str,
    residual: bool,
    layer_norm: bool,
    ln_eps: float,
    max_grad_norm: float | None,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """One segment given its coefficient matrices (:func:`chunk_coefficients`): read outputs and the state after it.

    A pure function of tensors (the configuration arguments are Python constants), so that
    ``torch.compile(fullgraph=True)`` captures it whole, forward and backward. Leading dimensions
    are batch dimensions: the fused path's backward runs it over all chunks at once.
    """
    # 1) Gradients of every token at the chunk-start weights w0.
    xs, deltas = _key_pass(k, v, w0, activation, residual, layer_norm, ln_eps)
    g_mat, n_mat = _clipped(xs, deltas, g_mat, n_mat, max_grad_norm)
    # 2) Read every token with its own M_t (dual form).  3) State leaving the segment.
    y = _read(q, xs, deltas, g_mat, beta, f, w, s, activation, residual, layer_norm, ln_eps)
    return (y, *_update(xs, deltas, g_mat, n_mat, beta, m, f, w, s))


def _segment(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    log_retain: Tensor,
    log_eta: Tensor,
    w0: Sequence[Tensor],
    w: Sequence[Tensor],
    s: Sequence[Tensor],
    activation: str,
    residual: bool,
    layer_norm: bool,
    ln_eps: float,
    max_grad_norm: float | None = None,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """One segment (``c`` tokens of one chunk), all ``[B, H, c, ·]``: read outputs and the state after it.

    Builds the segment's coefficient matrices and runs :func:`_chunk_step`; always eager. Used for
    the partial segments of a call (the rest of a chunk begun earlier, a chunk the call ends inside).
    """
    g_mat, n_mat, beta, m, f = chunk_coefficients(theta, log_retain, log_eta)
    return _chunk_step(q, k, v, g_mat, n_mat, beta, m, f, w0, w, s, activation, residual, layer_norm, ln_eps, max_grad_norm)


def _make_full_chunk_step(activation: str, residual: bool, layer_norm: bool, ln_eps: float, max_grad_norm: float | None):
    """The step of a full chunk entered at its start (``w0 = w``), the configuration bound as constants."""

    def full_chunk_step(q, k, v, g_mat, n_mat, beta, m, f, w, s):
        return _chunk_step(q, k, v, g_mat, n_mat, beta, m, f, w, w, s, activation, residual, layer_norm, ln_eps, max_grad_norm)

    return full_chunk_step


#: torch.compile'd full-chunk steps, one per (compile options, memory configuration).
_COMPILED_STEPS: dict[tuple, object] = {}
#: What ``compile=True`` means: inductor's default mode (no autotuning sweep, no CUDA graphs).
DEFAULT_COMPILE_OPTIONS: dict = {"backend": "inductor", "mode": None}


def compile_options(compile: bool | str | dict | None) -> dict | None:
    """Normalise the ``compile`` argument of :func:`neural_memory_chunked` to ``torch.compile`` kwargs (or None)."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return dict(DEFAULT_COMPILE_OPTIONS)
    if isinstance(compile, str):
        return {**DEFAULT_COMPILE_OPTIONS, "mode": None if compile == "default" else compile}
    if isinstance(compile, dict):
        bad = sorted(set(compile) - {"backend", "mode", "options"})
        if bad:
            raise ValueError(f"compile: unknown torch.compile option(s) {bad}; allowed: backend, mode, options "
                             "(fullgraph=True and dynamic=False are fixed)")
        return {**DEFAULT_COMPILE_OPTIONS, **compile}
    raise TypeError(f"compile must be a bool, a torch.compile mode string or a dict of torch.compile options, got {compile!r}")


def _full_chunk_stepper(compile: dict | None, activation: str, residual: bool, layer_norm: bool, ln_eps: float, max_grad_norm: float | None):
    """The callable that runs each full chunk: eager, or its ``torch.compile``'d form (cached)."""
    step = _make_full_chunk_step(activation, residual, layer_norm, ln_eps, max_grad_norm)
    if compile is None:
        return step
    key = (repr(sorted(compile.items(), key=lambda kv: kv[0])), activation, residual, layer_norm, ln_eps, max_grad_norm)
    fn = _COMPILED_STEPS.get(key)
    if fn is None:
        fn = torch.compile(step, fullgraph=True, dynamic=False, **compile)
        _COMPILED_STEPS[key] = fn
    return fn


def _chunk_major(x: Tensor, n: int, c: int, dtype: torch.dtype | None = None) -> Tensor:
    """``[B, n·c, H, ...] -> [n, B, H, c, ...]`` contiguous, in ``dtype`` (default ``x``'s): each chunk one contiguous
    block for the matmuls. One copy for the layout and the cast together (``x.to(dtype)`` first would be two passes)."""
    x = x.unflatten(1, (n, c))
    x = x.permute(1, 0, 3, 2, *range(4, x.ndim))
    if dtype is None or dtype == x.dtype:
        return x.contiguous()
    return torch.empty(x.shape, dtype=dtype, device=x.device).copy_(x)


def log_gates(eta: Tensor, alpha: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(log(1 − α), log η)`` in ``acc`` (``log1p`` keeps the retention's log exact for small ``α``)."""
    return torch.log1p(-alpha.to(acc)), torch.log(eta.to(acc))


def gate_coefficients(theta: Tensor, eta: Tensor, alpha: Tensor, chunk_size: int, acc: torch.dtype) -> tuple[Tensor, ...]:
    """:func:`chunk_coefficients` of whole chunks, chunk-major: gates ``[B, n·C, H]`` ->
    ``(G, N [n, B, H, C, C], β, m, f [n, B, H, C])`` in ``acc``."""
    n = theta.shape[1] // chunk_size
    cm = lambda x: _chunk_major(x, n, chunk_size, acc)  # noqa: E731
    la, le = log_gates(eta, alpha, acc)
    return chunk_coefficients(cm(theta), cm(la), cm(le))


def neural_memory_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    initial_state: MemoryState | Sequence[Tensor],
    chunk_size: int = 64,
    activation: str = "silu",
    residual: bool = False,
    layer_norm: bool = False,
    ln_eps: float = DEFAULT_LN_EPS,
    debug: bool = False,
    max_grad_norm: float | None = None,
    compile: bool | str | dict = False,
) -> tuple[Tensor, MemoryState]:
    """Chunked dual-form Titans memory; arguments and returns as :func:`neural_memory_reference`.

    A call is cut into segments: the rest of a chunk begun by an earlier call (if ``position > 0``),
    the full chunks, and a partial last chunk. The gate coefficients (``G, N, β, m, f``) of all full
    chunks are built in one batched computation before the loop over chunks; q/k/v are laid out
    chunk-major once, so each chunk's operands are contiguous.

    ``compile``: run each *full* chunk's step (key gradients, clip, dual-form read, state update)
    through ``torch.compile(fullgraph=True, dynamic=False)``, so that inductor fuses the elementwise,
    LayerNorm and activation work around the matmuls, forward and backward (AOTAutograd). All full
    chunks share one shape, so one compilation serves every chunk of every call with the same shapes,
    dtype, grad mode and configuration (each new combination compiles again; dynamo's
    ``recompile_limit`` bounds how many it keeps). The partial first/last segments (at most two per
    call) run eagerly: compiling each odd length would recompile for every decoding position.
    ``False`` (default): eager, the reference the compiled path is tested against. ``True``: inductor,
    default mode. A string: that ``torch.compile`` mode (``"max-autotune-no-cudagraphs"``,
    ``"reduce-overhead"`` for CUDA graphs; ``"default"``). A dict: ``torch.compile``'s ``backend`` /
    ``mode`` / ``options`` (tests use ``{"backend": "aot_eager"}``). Same semantics either way.

    ``debug=True`` checks the gates' ranges before and the state's finiteness after every chunk
    (host syncs: slow), and names the gate that saturated when the state stops being finite.
    """
    fn = "neural_memory_chunked"
    state = check_memory_args(fn, q, k, v, theta, eta, alpha, initial_state, chunk_size, activation, residual, layer_norm)
    max_grad_norm = check_max_grad_norm(fn, max_grad_norm)
    opts = compile_options(compile)
    acc = accumulation_dtype(q.dtype)
    if debug:
        _check_gates(fn, theta, eta, alpha)
    w = [t.to(acc) for t in state.weights]
    s = [t.to(acc) for t in state.momentum]
    pos = state.position
    # At a chunk boundary the chunk-start weights are the current weights (as in the reference).
    w0 = [t.to(acc) for t in state.chunk_start] if pos else w
    cfg = (activation, residual, layer_norm, ln_eps, max_grad_norm)
    th = theta.to(acc)  # [B, T, H]
    la, le = log_gates(eta, alpha, acc)

    def bhtd(x: Tensor, lo: int, hi: int) -> Tensor:  # [B, T, H, ...] -> [B, H, hi-lo, ...]
        return x[:, lo:hi].to(acc).transpose(1, 2)

    def partial(lo: int, hi: int, w0, w, s):
        gates = (bhtd(g, lo, hi) for g in (th, la, le))
        return _segment(bhtd(q, lo, hi), bhtd(k, lo, hi), bhtd(v, lo, hi), *gates, w0, w, s, *cfg)

    total = q.shape[1]
    outs, start, index = [], 0, 0
    if pos and total:  # the rest of a chunk an earlier call began, with its carried start weights
        c = min(chunk_size - pos, total)
        y, w, s = partial(0, c, w0, w, s)
        if debug:
            _check_state(fn, w, s, theta, eta, alpha, 0, c, index)
        outs.append(y.transpose(1, 2))
        start, pos, index = c, (pos + c) % chunk_size, 1
        if pos == 0:
            w0 = w
    n_full = (total - start) // chunk_size
    if n_full:
        end = start + n_full * chunk_size
        cm = lambda x: _chunk_major(x[:, start:end], n_full, chunk_size, acc)  # noqa: E731
        qc, kc, vc = cm(q), cm(k), cm(v)  # [n, B, H, C, D]
        coefs = gate_coefficients(theta[:, start:end], eta[:, start:end], alpha[:, start:end], chunk_size, acc)  # every chunk at once
        step = _full_chunk_stepper(opts, *cfg)
        if opts is not None and torch.is_grad_enabled() and any(x.requires_grad for x in (qc, kc, vc, *coefs, *w, *s)):
            # Every chunk after the first gets a state that requires grad; give the first one the same
            # signature (a detached alias: its gradient is computed and dropped) so one graph serves all.
            w = [x if x.requires_grad else x.detach().requires_grad_() for x in w]
            s = [x if x.requires_grad else x.detach().requires_grad_() for x in s]
        ys = []
        for i in range(n_full):
            y, w, s = step(qc[i], kc[i], vc[i], *(x[i] for x in coefs), w, s)
            if debug:
                lo = start + i * chunk_size
                _check_state(fn, w, s, theta, eta, alpha, lo, lo + chunk_size, index)
            ys.append(y)
            index += 1
        w0 = w
        outs.append(torch.stack(ys, 0).permute(1, 0, 3, 2, 4).flatten(1, 2))  # [B, n·C, H, Dv]
        start = end
    if start < total:  # a partial last chunk, entered at its start; its start weights stay in the state
        y, w_new, s = partial(start, total, w, w, s)
        if debug:
            _check_state(fn, w_new, s, theta, eta, alpha, start, total, index)
        outs.append(y.transpose(1, 2))
        w0, w, pos = w, w_new, total - start
    y = torch.cat(outs, 1) if len(outs) > 1 else outs[0] if outs else v.to(acc)
    return y.to(q.dtype), MemoryState(tuple(w), tuple(s), tuple(w0), pos)


def _check_gates(fn: str, theta: Tensor, eta: Tensor, alpha: Tensor) -> None:
    problems = []
    for name, g, ok, rule in (
        ("theta", theta, lambda x: x >= 0, "θ >= 0"),
        ("eta", eta, lambda x: (x > 0) & (x <= 1), "0 < η <= 1"),
        ("alpha", alpha, lambda x: (x >= 0) & (x < 1), "0 <= α < 1"),
    ):
        bad = ~(torch.isfinite(g) & ok(g))
        if bool(bad.any()):
            idx = bad.nonzero()[0].tolist()
            problems.append(f"{name} breaks {rule} at [b, t, h] = {idx} (value {g[tuple(idx)].item()!r})")
    if problems:
        raise ValueError(f"{fn}: " + "; ".join(problems))


def _check_state(fn: str, w: list[Tensor], s: list[Tensor], theta: Tensor, eta: Tensor, alpha: Tensor, lo: int, hi: int, index: int) -> None:
    if all(bool(torch.isfinite(t).all()) for t in (*w, *s)):
        return
    th, et, al = (g[:, lo:hi].float() for g in (theta, eta, alpha))
    raise FloatingPointError(
        f"{fn}: the memory state became non-finite in segment {index} (tokens {lo}..{hi - 1}). Gates there: "
        f"theta max {th.max().item():.3g}, eta min {et.min().item():.3g}, alpha max {al.max().item():.3g}. "
        "A step size θ too large for the key norms makes the test-time gradient descent diverge "
        "(keep keys ℓ2-normalised and θ well below 1), and η close to 1 with α close to 0 lets the momentum "
        "accumulate it; η -> 0 or α -> 1 saturate the log-space coefficients (their gradients become infinite)."
    )
