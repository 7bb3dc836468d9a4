"""The fused Titans memory's backward (``ops/memory/fused_backward.py`` and the training path of
``fused_triton.py``).

1. :func:`state_adjoint` (the hand-written ``J_iᵀ`` of one chunk's state map) equals autograd of the
   chunked path's key pass + clip + update, in float64, for every configuration the fused path takes
   and a few it does not (depth 3), with the clip both active and inactive on different tokens.
2. The fused training path (forward kernel with per-chunk checkpoints through Triton's interpreter,
   then the batched / sequential backward) gives the chunked path's outputs and gradients of every
   input: q, k, v, θ, η, α and the initial weights and momentum.
3. ``BACKWARD["fold_read"]``: the read's key-pass cotangents folded into the sweep and the update's VJP
   (:class:`ReadCotangents`) give the same gradients, in float64 per chunk and through training.
"""

from __future__ import annotations

import pytest
import torch

from mnemotorch.ops.memory import MemoryState, neural_memory, neural_memory_chunked
from mnemotorch.ops.memory.chunked import _clipped, _key_forward, _key_pass, _read, _update, chunk_coefficients
from mnemotorch.ops.memory.fused_backward import ReadCotangents, key_pass_from_forward, key_pass_saved, read_vjp, state_adjoint

from test_memory import make_inputs, make_state, rel

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

MATCHED = dict(activation="gelu", residual=True, layer_norm=True)
DEFAULT = dict(activation="silu", residual=True, layer_norm=False)

# (name, depth, config, max_grad_norm)
ADJ_CASES = [
    ("matched", 2, MATCHED, None),
    ("matched_clip", 2, MATCHED, 1.0),  # clip: any value (the test puts τ at the median gradient norm)
    ("default_clip", 2, DEFAULT, 0.3),
    ("default", 2, DEFAULT, None),
    ("relu_plain", 2, dict(activation="relu", residual=False, layer_norm=False), None),
    ("silu_ln_noresidual_clip", 2, dict(activation="silu", residual=False, layer_norm=True), 0.5),
    ("depth1", 1, dict(activation="silu", residual=False, layer_norm=False), None),
    ("depth1_ln_clip", 1, dict(activation="silu", residual=True, layer_norm=True), 0.3),
    ("depth3_gelu_ln_clip", 3, dict(activation="gelu", residual=True, layer_norm=True), 0.3),
]


@pytest.mark.parametrize("name,depth,cfg,clip", ADJ_CASES, ids=[c[0] for c in ADJ_CASES])
def test_state_adjoint_equals_autograd_float64(name, depth, cfg, clip):
    torch.manual_seed(3)
    b, h, c, d, hid = 2, 3, 8, 8, 16
    q, k, v, th, et, al = make_inputs(b=b, t=c, h=h, dk=d, dv=d, seed=5, theta_max=0.5)
    st = make_state(b, h, d, d, depth, hidden=hid, position=0)
    w = [(x * 3).detach().requires_grad_() for x in st.weights]
    s = [torch.randn_like(x).requires_grad_() for x in st.momentum]
    bhc = lambda x: x.transpose(1, 2)  # noqa: E731  [B, T, H, ...] -> [B, H, T, ...]
    kk, vv = bhc(k), bhc(v)
    g_mat, n_mat, beta, m, f = chunk_coefficients(bhc(th), torch.log1p(-bhc(al)), torch.log(bhc(et)))
    xs, deltas = _key_pass(kk, vv, w, cfg["activation"], cfg["residual"], cfg["layer_norm"], 1e-5)
    if clip is not None:  # τ between the tokens' gradient norms: the clip acts on about half of them
        sq = sum(x.pow(2).sum(-1) * dl.pow(2).sum(-1) for x, dl in zip(xs, deltas))
        clip = float(sq.detach().sqrt().median()) * 1.0001
        frac = (sq > clip * clip).double().mean().item()
        assert 0.2 < frac < 0.8, f"the clip should act on some tokens only, acts on {frac:.2f}"
    gm, nm = _clipped(xs, deltas, g_mat, n_mat, clip)
    w_new, s_new = _update(xs, deltas, gm, nm, beta, m, f, w, s)
    adj_w = [torch.randn_like(x) for x in w_new]
    adj_s = [torch.randn_like(x) for x in s_new]
    want = torch.autograd.grad([*w_new, *s_new], [*w, *s], [*adj_w, *adj_s])
    with torch.no_grad():
        kp = key_pass_saved(kk, vv, w, cfg["activation"], cfg["residual"], cfg["layer_norm"], 1e-5)
        for a, b_ in zip(kp.deltas, deltas):  # the saved key pass is the chunked path's
            assert torch.equal(a, b_)
        got_w, got_s = state_adjoint(kp, g_mat[..., -1, :], n_mat[..., -1, :], beta[..., -1], m[..., -1], f[..., -1],
                                     w, adj_w, adj_s, cfg["layer_norm"], clip)  # fmt: skip
    for i, (x, y) in enumerate(zip([*got_w, *got_s], want)):
        err = rel(x, y)
        assert err <= 1e-12, f"adjoint {i}: {err:.3e}"


@pytest.mark.parametrize("name,depth,cfg,clip", ADJ_CASES, ids=[c[0] for c in ADJ_CASES])
def test_state_adjoint_inputs_equal_autograd_float64(name, depth, cfg, clip):
    """``state_adjoint(inputs=True)``: the update's share of the gradients of k, v and the coefficients' last
    rows / elements, from the same cotangents as the state's adjoint, equals float64 autograd of the key pass
    + clip + update (what the backward's batched update pass computes)."""
    b, h, c, d, hid = 2, 3, 8, 8, 16
    q, k, v, th, et, al = make_inputs(b=b, t=c, h=h, dk=d, dv=d, seed=5, theta_max=0.5)
    st = make_state(b, h, d, d, depth, hidden=hid, position=0)
    w = [(x * 3).detach() for x in st.weights]
    s = [torch.randn_like(x) for x in st.momentum]
    bhc = lambda x: x.transpose(1, 2)  # noqa: E731
    kk, vv = (bhc(x).detach().requires_grad_() for x in (k, v))
    coefs = [x.detach().requires_grad_() for x in chunk_coefficients(bhc(th), torch.log1p(-bhc(al)), torch.log(bhc(et)))]
    g_mat, n_mat, beta, m, f = coefs
    kw = dict(activation=cfg["activation"], residual=cfg["residual"], layer_norm=cfg["layer_norm"], ln_eps=1e-5)
    xs, deltas = _key_pass(kk, vv, w, **kw)
    if clip is not None:
        sq = sum(x.pow(2).sum(-1) * dl.pow(2).sum(-1) for x, dl in zip(xs, deltas))
        clip = float(sq.detach().sqrt().median()) * 1.0001
    gm, nm = _clipped(xs, deltas, g_mat, n_mat, clip)
    w_new, s_new = _update(xs, deltas, gm, nm, beta, m, f, w, s)
    adj = [torch.randn_like(x) for x in (*w_new, *s_new)]
    want = torch.autograd.grad([*w_new, *s_new], [kk, vv, *coefs], adj)
    with torch.no_grad():
        kp = key_pass_saved(kk, vv, w, **kw)
        *_, got = state_adjoint(kp, g_mat[..., -1, :], n_mat[..., -1, :], beta[..., -1], m[..., -1], f[..., -1], w, adj[:depth], adj[depth:],
                                cfg["layer_norm"], clip, inputs=True, s=s, residual=cfg["residual"])  # fmt: skip
    dk, dv, dg, dn, db, dm, df = got
    full = [torch.zeros_like(x) for x in coefs]  # the update reads only the coefficients' last row / element
    full[0][..., -1, :], full[1][..., -1, :] = dg, dn
    full[2][..., -1], full[3][..., -1], full[4][..., -1] = db, dm, df
    for i, (x, y) in enumerate(zip([dk, dv, *full], want)):
        err = rel(x, y) if y.abs().max() > 0 else x.abs().max().item()
        assert err <= 1e-12, f"input {i}: {err:.3e}"


def _chunk_case(depth: int, cfg: dict, clip, coef_leaves: bool) -> tuple:
    """One chunk in float64 for the written-out VJPs' tests: q, k, v ``[B, H, C, d]`` (leaves), the state ``w, s``
    (leaves), the coefficients (leaves where ``coef_leaves``), the key pass's ``X, Δ``, the clipped ``G̃, Ñ`` and the
    clip's τ (at the median token, so that the clip acts on about half of them; None without the clip)."""
    b, h, c, d, hid = 2, 3, 8, 8, 16
    q, k, v, th, et, al = make_inputs(b=b, t=c, h=h, dk=d, dv=d, seed=7, theta_max=0.5)
    st = make_state(b, h, d, d, depth, hidden=hid, position=0)
    bhc = lambda x: x.transpose(1, 2)  # noqa: E731
    w = [(x * 3).detach().requires_grad_() for x in st.weights]
    s = [torch.randn_like(x).requires_grad_() for x in st.momentum]
    qkv = [bhc(x).detach().requires_grad_() for x in (q, k, v)]
    coefs = chunk_coefficients(bhc(th), torch.log1p(-bhc(al)), torch.log(bhc(et)))
    if coef_leaves:
        coefs = tuple(x.detach().requires_grad_() for x in coefs)
    kw = dict(activation=cfg["activation"], residual=cfg["residual"], layer_norm=cfg["layer_norm"], ln_eps=1e-5)
    xs, deltas = _key_pass(qkv[1], qkv[2], w, **kw)
    if clip is not None:
        sq = sum(x.pow(2).sum(-1) * dl.pow(2).sum(-1) for x, dl in zip(xs, deltas))
        clip = float(sq.detach().sqrt().median()) * 1.0001
    gm, nm = _clipped(xs, deltas, coefs[0], coefs[1], clip)
    return qkv, w, s, coefs, kw, xs, deltas, gm, nm, clip


@pytest.mark.parametrize("name,depth,cfg,clip", ADJ_CASES, ids=[c[0] for c in ADJ_CASES])
def test_read_vjp_equals_autograd_float64(name, depth, cfg, clip):
    """:func:`read_vjp` (the read's transpose written out, then the key pass's VJP of its cotangents) equals float64
    autograd of the chunked path's key pass + clip + dual-form read, for every input: q, k, v, G, β, f, W, S."""
    (qq, kk, vv), w, s, (g_mat, n_mat, beta, m, f), kw, xs, deltas, gm, _, clip = _chunk_case(depth, cfg, clip, coef_leaves=True)
    y = _read(qq, xs, deltas, gm, beta, f, w, s, **kw)
    dy = torch.randn_like(y)
    leaves = [qq, kk, vv, g_mat, beta, f, *w, *s]
    want = torch.autograd.grad(y, leaves, dy)
    with torch.no_grad():
        kp = key_pass_saved(kk, vv, w, **kw)
        dq, dk, dv, dg, db, df, b_w, b_s = read_vjp(qq, kp, g_mat, beta, f, w, s, dy, **kw, max_grad_norm=clip)
    for i, (x, y_) in enumerate(zip([dq, dk, dv, dg, db, df, *b_w, *b_s], want)):
        err = rel(x, y_)
        assert err <= 1e-12, f"input {i}: {err:.3e}"


@pytest.mark.parametrize("name,depth,cfg,clip", ADJ_CASES, ids=[c[0] for c in ADJ_CASES])
def test_state_adjoint_folds_read_cotangents_float64(name, depth, cfg, clip):
    """``read_vjp(fold=True)`` hands the read's key-pass cotangents on (the clip's backward not applied) and
    ``state_adjoint(add_cot=...)`` takes them with the update's: the entering state's adjoint (plus the read's
    direct share ``b_w, b_s``) and, with ``inputs``, dk, dv equal float64 autograd of the chunk's read and update
    together (≤ 1e-12); the read's other outputs are the unfolded :func:`read_vjp`'s."""
    (qq, kk, vv), w, s, (g_mat, n_mat, beta, m, f), kw, xs, deltas, gm, nm, clip = _chunk_case(depth, cfg, clip, coef_leaves=False)
    y = _read(qq, xs, deltas, gm, beta, f, w, s, **kw)
    w_new, s_new = _update(xs, deltas, gm, nm, beta, m, f, w, s)
    dy = torch.randn_like(y)
    adj = [torch.randn_like(x) for x in (*w_new, *s_new)]
    want = torch.autograd.grad([y, *w_new, *s_new], [kk, vv, *w, *s], [dy, *adj])
    last = (g_mat[..., -1, :], n_mat[..., -1, :], beta[..., -1], m[..., -1], f[..., -1])
    with torch.no_grad():
        kp = key_pass_saved(kk, vv, w, **kw)
        plain = read_vjp(qq, kp, g_mat, beta, f, w, s, dy, **kw, max_grad_norm=clip)
        dq, cot, dg, db, df, b_w, b_s = read_vjp(qq, kp, g_mat, beta, f, w, s, dy, **kw, max_grad_norm=clip, fold=True)
        assert isinstance(cot, ReadCotangents) and (cot.dsc is None) == (clip is None)
        adj_w, adj_s = state_adjoint(kp, *last, w, adj[:depth], adj[depth:], cfg["layer_norm"], clip, b_w, b_s, add_cot=cot)
        *_, (dk, dv, *_) = state_adjoint(kp, *last, w, adj[:depth], adj[depth:], cfg["layer_norm"], clip, inputs=True, s=s,
                                         residual=cfg["residual"], add_cot=cot)  # fmt: skip
    for i, (x, y_) in enumerate(zip([dk, dv, *adj_w, *adj_s], want)):
        err = rel(x, y_)
        assert err <= 1e-12, f"gradient {i}: {err:.3e}"
    for x, y_ in zip([dq, dg, db, df, *b_s], [plain[0], *plain[3:6], *plain[7]]):  # the same arithmetic as unfolded
        assert torch.equal(x, y_)


@pytest.mark.parametrize("slices", [1, 2], ids=["one_slice", "two_slices"])
@pytest.mark.parametrize("name,depth,cfg,clip", [c for c in ADJ_CASES if c[1] == 2], ids=[c[0] for c in ADJ_CASES if c[1] == 2])
def test_read_vjp_kernel_equals_written_out(monkeypatch, name, depth, cfg, clip, slices):
    """The Triton read-VJP kernels (:mod:`fused_read_vjp`, interpreter, fp32) + their PyTorch rest equal
    :func:`read_vjp` in float64 on the same inputs, batched ``[G, B, H, …]`` as the backward holds them, for every
    output: dq, dk, dv, dG, dβ, df and the state's adjoint shares."""
    from mnemotorch.ops.memory import fused_read_vjp
    gen = torch.Generator().manual_seed(11)
    n, b, h, c, d, hid = 3, 2, 2, 16, 16, 32
    # hidden slices per program of the slice kernel (partials summed after it) and per step of pass A
    monkeypatch.setitem(fused_read_vjp.LAUNCH_READ_VJP, "slice", hid // slices)
    monkeypatch.setitem(fused_read_vjp.LAUNCH_READ_VJP, "a_slice", hid // slices)
    rnd = lambda *shape, s=1.0: (torch.randn(*shape, generator=gen, dtype=torch.float64) * s)  # noqa: E731
    q, k, v = (rnd(n, b, h, c, d) for _ in range(3))
    k = k / k.norm(dim=-1, keepdim=True)
    w = [rnd(n, b, h, d, hid, s=0.5), rnd(n, b, h, hid, d, s=0.2)]
    s = [rnd(n, b, h, d, hid, s=0.1), rnd(n, b, h, hid, d, s=0.1)]
    g_mat = torch.tril(rnd(n, b, h, c, c, s=0.1).abs())
    beta, f = rnd(n, b, h, c).sigmoid(), rnd(n, b, h, c, s=0.1)
    dy = rnd(n, b, h, c, d)
    kw = dict(activation=cfg["activation"], residual=cfg["residual"], layer_norm=cfg["layer_norm"], ln_eps=1e-5)
    kp = key_pass_saved(k, v, w, **kw)
    if clip is not None:  # τ at the median token: the clip acts on about half of them
        sq = sum(x.pow(2).sum(-1) * dl.pow(2).sum(-1) for x, dl in zip(kp.xs, kp.deltas))
        clip = float(sq.sqrt().median()) * 1.0001
    want = read_vjp(q, kp, g_mat, beta, f, w, s, dy, **kw, max_grad_norm=clip)
    f32 = lambda x: x.float()  # noqa: E731
    kp32 = type(kp)(*([f32(x) for x in part] if isinstance(part, list) else (None if part is None else f32(part)) for part in kp))
    gt = g_mat if clip is None else g_mat * fused_triton_clip_scale(kp, clip).unsqueeze(-2)
    w32, s32 = [f32(x) for x in w], [f32(x) for x in s]
    parts = fused_read_vjp.launch(f32(q), f32(k), f32(gt), f32(beta), f32(f), w32, s32, kp32.xs[1], kp32.deltas[0], kp32.deltas[1], f32(dy),
                                  cfg["activation"], cfg["layer_norm"], 1e-5, "ieee")  # fmt: skip
    dq, dk, dv, dg, db, df, b_w, b_s = fused_read_vjp.after_kernels(f32(q), f32(k), f32(gt), f32(dy), kp32, f32(g_mat), parts, w32, cfg["residual"],
                                                                    cfg["layer_norm"], clip)  # fmt: skip
    got = [dq, dk, dv, dg, db, df, *b_w, *b_s]
    names = ["dq", "dk", "dv", "dG", "dbeta", "df", "bW1", "bW2", "bS1", "bS2"]
    for nm, x, y in zip(names, got, [*want[:6], *want[6], *want[7]]):
        err = rel(x.double(), y)
        assert err <= 1e-5, f"{nm}: {err:.3e}"


@pytest.mark.parametrize("folded", [False, True], ids=["own", "with_read_cotangents"])
@pytest.mark.parametrize("slices", [1, 2], ids=["one_slice", "two_slices"])
@pytest.mark.parametrize("name,depth,cfg,clip", [c for c in ADJ_CASES if c[1] == 2], ids=[c[0] for c in ADJ_CASES if c[1] == 2])
def test_update_vjp_kernel_equals_written_out(monkeypatch, name, depth, cfg, clip, slices, folded):
    """The Triton update-VJP kernel (:mod:`fused_update_vjp`, interpreter, fp32) equals :func:`state_adjoint` with
    ``inputs`` in float64 on the same inputs, batched ``[G, B, H, …]`` as the backward holds them: dk, dv, the
    cotangents of G's and N's last rows and of β, m, f's last elements, with and without the read's folded
    cotangents, the clip acting on about half of the tokens where it is on."""
    from mnemotorch.ops.memory import fused_update_vjp
    from mnemotorch.ops.memory.fused_backward import _clip_stats

    gen = torch.Generator().manual_seed(13)
    n, b, h, c, d, hid = 3, 2, 2, 16, 16, 32
    monkeypatch.setitem(fused_update_vjp.LAUNCH_UPDATE_VJP, "slice", hid // slices)
    rnd = lambda *shape, s=1.0: (torch.randn(*shape, generator=gen, dtype=torch.float64) * s)  # noqa: E731
    k, v = (rnd(n, b, h, c, d) for _ in range(2))
    k = k / k.norm(dim=-1, keepdim=True)
    w = [rnd(n, b, h, d, hid, s=0.5), rnd(n, b, h, hid, d, s=0.2)]
    s = [rnd(n, b, h, d, hid, s=0.1), rnd(n, b, h, hid, d, s=0.1)]
    adj_w = [rnd(n, b, h, d, hid), rnd(n, b, h, hid, d)]
    adj_s = [rnd(n, b, h, d, hid), rnd(n, b, h, hid, d)]
    g_last, n_last = rnd(n, b, h, c, s=0.1).abs(), rnd(n, b, h, c, s=0.1).abs()
    ends = [rnd(n, b, h).sigmoid() for _ in range(3)]
    kw = dict(activation=cfg["activation"], residual=cfg["residual"], layer_norm=cfg["layer_norm"], ln_eps=1e-5)
    kp = key_pass_saved(k, v, w, **kw)
    stats = None
    if clip is not None:  # τ at the median token: the clip acts on about half of them
        sq = sum(x.pow(2).sum(-1) * dl.pow(2).sum(-1) for x, dl in zip(kp.xs, kp.deltas))
        clip = float(sq.sqrt().median()) * 1.0001
        stats = _clip_stats(kp, clip)
    cot = None
    if folded:
        cot = ReadCotangents([rnd(n, b, h, c, hid), rnd(n, b, h, c, d)], [rnd(n, b, h, c, d), rnd(n, b, h, c, hid)],
                             None if clip is None else rnd(n, b, h, c))  # fmt: skip
    *_, want = state_adjoint(kp, g_last, n_last, *ends, w, adj_w, adj_s, cfg["layer_norm"], clip, inputs=True, s=s, residual=cfg["residual"],
                             add_cot=cot, stats=stats)  # fmt: skip
    f32 = lambda x: None if x is None else x.float()  # noqa: E731
    kp32 = type(kp)(*([f32(x) for x in part] if isinstance(part, list) else f32(part) for part in kp))
    stats32 = None if stats is None else ([f32(x) for x in stats[0]], [f32(x) for x in stats[1]], f32(stats[2]), f32(stats[3]))
    cot32 = None if cot is None else ReadCotangents([f32(x) for x in cot.d_delta], [f32(x) for x in cot.d_x], f32(cot.dsc))
    got = fused_update_vjp.launch(f32(k), kp32, f32(g_last), f32(n_last), [f32(x) for x in w], [f32(x) for x in s], [f32(x) for x in adj_w],
                                  [f32(x) for x in adj_s], cfg["residual"], cfg["layer_norm"], clip, stats32, cot32, "ieee")  # fmt: skip
    for nm, x, y in zip(["dk", "dv", "dg_last", "dn_last", "dbeta_c", "dm_c", "df_c"], got, want):
        assert x.shape == y.shape, nm
        err = rel(x.double(), y)
        assert err <= 1e-5, f"{nm}: {err:.3e}"


def fused_triton_clip_scale(kp, clip):
    from mnemotorch.ops.memory.fused_backward import _clip_stats

    return _clip_stats(kp, clip)[3]


# --- the fused training path (interpreter) against the float64 chunked path -----------------------

# (name, depth, config, max_grad_norm, d, hidden, chunk, T, position)
TRAIN_CASES = [
    ("matched", 2, MATCHED, None, 16, 32, 16, 3 * 16 + 5, 0),
    ("default_clip", 2, DEFAULT, 0.3, 16, 32, 16, 3 * 16, 0),
    ("relu_plain_entered_mid_chunk", 2, dict(activation="relu", residual=False, layer_norm=False), None, 16, 32, 16, 3 * 16 + 3, 5),
    ("depth1", 1, dict(activation="silu", residual=False, layer_norm=False), None, 16, 16, 16, 3 * 16, 0),
    ("depth1_ln_clip", 1, dict(activation="silu", residual=True, layer_norm=True), 0.3, 16, 16, 16, 2 * 16 + 7, 0),
]


def _train_grads(fn, dtype, q, k, v, gates, st, chunk, cfg, clip, seed=0):
    """Outputs and the gradients of every input (q, k, v, θ, η, α, weights, momentum[, chunk-start weights])
    of a random linear function of the outputs and the returned state."""
    xs = [x.to(dtype).detach().requires_grad_() for x in (q, k, v, *gates)]
    depth = len(st.weights)
    ws = [x.to(dtype).detach().requires_grad_() for x in (*st.weights, *st.momentum)]
    start = tuple(ws[:depth]) if st.position == 0 else tuple(x.to(dtype).detach().requires_grad_() for x in st.chunk_start)
    state = MemoryState(tuple(ws[:depth]), tuple(ws[depth:]), start, st.position)
    y, s = fn(*xs, state, chunk, **cfg, max_grad_norm=clip)
    g = torch.Generator().manual_seed(seed)
    ct = lambda x: torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)  # noqa: E731
    outs = [y, *s.weights, *s.momentum]
    leaves = xs + ws + (list(start) if st.position else [])
    grads = torch.autograd.grad(outs, leaves, [ct(o) for o in outs], allow_unused=True)
    return y, grads


NAMES = ["q", "k", "v", "theta", "eta", "alpha", "weights/momentum...", "", "", "", "", "", "", ""]


@pytest.mark.parametrize("name,depth,cfg,clip,d,hidden,chunk,t,pos", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_fused_training_matches_chunked_fp32(monkeypatch, name, depth, cfg, clip, d, hidden, chunk, t, pos):
    from mnemotorch.ops.memory import fused_triton

    # several backward groups (chunks batched 2 at a time), so the adjoint crosses group boundaries
    monkeypatch.setitem(fused_triton.BACKWARD, "group_elements", 2 * 2 * 2 * chunk * max(hidden, d))
    # small steps for the unnormalised relu memory, which diverges (1e54 after 3 chunks) at θ ≤ 0.5
    q, k, v, th, et, al = make_inputs(b=2, t=t, h=2, dk=d, dv=d, seed=7, theta_max=0.5 if cfg.get("layer_norm") or clip else 0.05)
    st = make_state(2, 2, d, d, depth, hidden=hidden, position=pos)
    y_ref, g_ref = _train_grads(neural_memory_chunked, torch.float64, q, k, v, (th, et, al), st, chunk, cfg, clip)
    y, g = _train_grads(fused_triton.neural_memory_fused, torch.float32, q, k, v, (th, et, al), st, chunk, cfg, clip)
    assert rel(y.double(), y_ref) <= 1e-5
    assert len(g) == len(g_ref)
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert a is not None and a.dtype == torch.float32 and torch.isfinite(a).all(), i
        err = rel(a.double(), b)
        assert err <= 1e-5, f"gradient {i} ({NAMES[i] or 'state'}): {err:.3e}"


def test_fused_training_split_kernel(monkeypatch):
    """The split forward kernel (2 programs per head) writes the same per-chunk checkpoints; the split sweep
    kernel (2 programs per head) walks them back."""
    from mnemotorch.ops.memory import fused_triton

    calls = []
    real = fused_triton._launch_split
    monkeypatch.setattr(fused_triton, "_launch_split", lambda *a, **kw: calls.append(a[8]) or real(*a, **kw))
    monkeypatch.setitem(fused_triton.LAUNCH, "split_slice", 16)
    monkeypatch.setitem(fused_triton.LAUNCH, "sweep_split", 16)
    launched = []
    monkeypatch.setattr(fused_triton, "_lmm_split_sweep_kernel", _Recording(fused_triton._lmm_split_sweep_kernel, "split_sweep", launched))
    q, k, v, th, et, al = make_inputs(b=1, t=3 * 32, h=2, dk=16, dv=16, seed=3, theta_max=0.5)
    st = make_state(1, 2, 16, 16, 2, hidden=32)
    y_ref, g_ref = _train_grads(neural_memory_chunked, torch.float64, q, k, v, (th, et, al), st, 32, MATCHED, 0.3)
    y, g = _train_grads(fused_triton.neural_memory_fused, torch.float32, q, k, v, (th, et, al), st, 32, MATCHED, 0.3)
    assert calls == [2] and launched
    for i, (a, b) in enumerate(zip([y, *g], [y_ref, *g_ref])):
        assert rel(a.double(), b) <= 1e-5, (i, rel(a.double(), b))


@pytest.mark.parametrize("act,residual,ln", [("gelu", True, True), ("silu", True, False), ("relu", False, True)])
def test_key_pass_from_forward_equals_recomputed(act, residual, ln):
    """The key pass built elementwise from the forward's ``Z_1, P, Δ_2, Z_2`` equals the recomputed one (float64)."""
    g = torch.Generator().manual_seed(5)
    k, v = (torch.randn(3, 2, 16, 8, generator=g, dtype=torch.float64) for _ in range(2))
    w = [torch.randn(3, 2, 8, 32, generator=g, dtype=torch.float64) / 3, torch.randn(3, 2, 32, 8, generator=g, dtype=torch.float64) / 6]
    ref = key_pass_saved(k, v, w, act, residual, ln, 1e-5)
    _, zs, d2 = _key_forward(k, v, w, act, residual, ln, 1e-5)[:3]
    got = key_pass_from_forward(k, v, zs[0], d2 @ w[1].transpose(-1, -2), d2, zs[1], act, residual, ln, 1e-5)
    for a, b in zip(got, ref):
        for x, y in zip(*((a, b) if isinstance(a, list) else ([a], [b]))):
            assert (x is None) == (y is None)
            if x is not None:  # (ReLU's σ'' is 0: compare those exactly)
                assert rel(x, y) <= 1e-12 if y.abs().max() > 0 else x.abs().max() == 0


def test_fused_training_key_pass_kept_or_recomputed(monkeypatch):
    """Training with the key pass kept from the forward and recomputed in the backward gives the same gradients."""
    from mnemotorch.ops.memory import fused_triton

    monkeypatch.setitem(fused_triton.LAUNCH, "split_slice", 16)
    q, k, v, th, et, al = make_inputs(b=1, t=2 * 32, h=2, dk=16, dv=16, seed=6, theta_max=0.5)
    st = make_state(1, 2, 16, 16, 2, hidden=32)
    kept = []
    real = fused_triton._kept_key_pass
    monkeypatch.setattr(fused_triton, "_kept_key_pass", lambda *a, **kw: kept.append(1) or real(*a, **kw))
    y1, g1 = _train_grads(fused_triton.neural_memory_fused, torch.float32, q, k, v, (th, et, al), st, 32, MATCHED, 0.3)
    assert kept
    monkeypatch.setitem(fused_triton.BACKWARD, "key_pass_from_forward", False)
    kept.clear()
    y2, g2 = _train_grads(fused_triton.neural_memory_fused, torch.float32, q, k, v, (th, et, al), st, 32, MATCHED, 0.3)
    assert not kept
    for a, b in zip([y1, *g1], [y2, *g2]):
        assert rel(a.double(), b.double()) <= 1e-6


@pytest.mark.parametrize("name,cfg,clip", [("matched", MATCHED, None), ("silu_ln_clip", dict(activation="silu", residual=False, layer_norm=True), 0.3)])
def test_fused_training_read_sums_kept_or_recomputed(monkeypatch, name, cfg, clip):
    """The read VJP's passes with the forward's kept sums ``Ĥ W_2, Ĥ S_2, Ĥ X_1ᵀ`` and ``Ẑ_1``
    (``BACKWARD["read_sums_from_forward"]``, ``["read_z_from_forward"]``, the defaults), with the sums alone and with
    the read recomputed give the same output and gradients; what is kept does reach the read's custom op."""
    from mnemotorch.ops.memory import fused_read_vjp, fused_triton

    monkeypatch.setitem(fused_triton.LAUNCH, "split_slice", 16)
    q, k, v, th, et, al = make_inputs(b=1, t=2 * 32, h=2, dk=16, dv=16, seed=7, theta_max=0.5)
    st = make_state(1, 2, 16, 16, 2, hidden=32)
    seen = []
    real = fused_read_vjp._lmm_read_vjp  # (the op, called without the dispatcher in eager mode: ops/eager.py)
    monkeypatch.setattr(fused_read_vjp, "_lmm_read_vjp", lambda *a: seen.append(len(a)) or real(*a))
    y1, g1 = _train_grads(fused_triton.neural_memory_fused, torch.float32, q, k, v, (th, et, al), st, 32, cfg, clip)
    assert seen and all(x == 21 for x in seen)  # (13 tensors, 4 settings, the 3 sums, Ẑ_1)
    for key, n_args in (("read_z_from_forward", 20), ("read_sums_from_forward", 17)):
        monkeypatch.setitem(fused_triton.BACKWARD, key, False)
        seen.clear()
        y2, g2 = _train_grads(fused_triton.neural_memory_fused, torch.float32, q, k, v, (th, et, al), st, 32, cfg, clip)
        assert seen and all(x == n_args for x in seen)
        for a, b in zip([y1, *g1], [y2, *g2]):
            assert rel(a.double(), b.double()) <= 1e-6


@pytest.mark.parametrize("read,update", [("autograd", "autograd"), ("autograd", "adjoint"), ("adjoint", "autograd"), ("adjoint", "adjoint"),
                                         ("triton", "autograd"), ("triton", "adjoint"), ("autograd", "triton"), ("triton", "triton")])
@pytest.mark.parametrize("name,depth,cfg,clip,d,hidden,chunk,t,pos", [c for c in TRAIN_CASES if c[0] in ("matched", "default_clip", "depth1_ln_clip")],
                         ids=["matched", "default_clip", "depth1_ln_clip"])  # fmt: skip
def test_fused_training_vjp_forms(monkeypatch, name, depth, cfg, clip, d, hidden, chunk, t, pos, read, update):
    """``BACKWARD["read_vjp"]`` / ``["update_vjp"]``: the read's and the update's shares of the input gradients by
    autograd passes or written out (:func:`read_vjp` in PyTorch or its Triton kernel, :func:`state_adjoint` with
    ``inputs`` or its Triton kernel), in every mix with autograd and the default pair (Triton + Triton, which the tests
    above cover too), give the float64 chunked path's gradients."""
    from mnemotorch.ops.memory import fused_triton

    monkeypatch.setitem(fused_triton.BACKWARD, "read_vjp", read)
    monkeypatch.setitem(fused_triton.BACKWARD, "update_vjp", update)
    from mnemotorch.ops.memory import fused_read_vjp

    used = {"read": [], "update": [], "kernel": [], "update_kernel": []}
    for key, mod, fn in (("read", fused_triton, "read_vjp"), ("update", fused_triton, "_update_vjp_adjoint"), ("kernel", fused_read_vjp, "launch"),
                         ("update_kernel", fused_triton, "_update_vjp_triton")):  # fmt: skip
        real = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, _r=real, _k=key, **kw: used[_k].append(1) or _r(*a, **kw))
    q, k, v, th, et, al = make_inputs(b=1, t=t, h=2, dk=d, dv=d, seed=2, theta_max=0.5)
    st = make_state(1, 2, d, d, depth, hidden=hidden, position=pos)
    y_ref, g_ref = _train_grads(neural_memory_chunked, torch.float64, q, k, v, (th, et, al), st, chunk, cfg, clip)
    y, g = _train_grads(fused_triton.neural_memory_fused, torch.float32, q, k, v, (th, et, al), st, chunk, cfg, clip)
    kernel = read == "triton" and depth == 2  # (the kernel is depth 2 only; elsewhere "triton" is "adjoint")
    assert bool(used["kernel"]) == kernel and bool(used["read"]) == (read != "autograd" and not kernel)
    update_kernel = update == "triton" and depth == 2  # (likewise)
    assert bool(used["update_kernel"]) == update_kernel and bool(used["update"]) == (update != "autograd" and not update_kernel)
    for i, (a, b) in enumerate(zip([y, *g], [y_ref, *g_ref])):
        assert rel(a.double(), b) <= 1e-5, (i, rel(a.double(), b))


@pytest.mark.parametrize("read", ["adjoint", "triton"])
def test_vjps_written_out_compile(monkeypatch, read):
    """The written-out VJPs of the read and the update go through ``torch.compile(fullgraph=True)`` (aot_eager here;
    inductor on a GPU) with the eager gradients."""
    from mnemotorch.ops.memory import fused_triton

    monkeypatch.setitem(fused_triton.BACKWARD, "update_vjp", "adjoint")
    monkeypatch.setitem(fused_triton.BACKWARD, "read_vjp", read)
    q, k, v, *gates = make_inputs(b=1, t=2 * 16, h=2, dk=16, dv=16, seed=8, theta_max=0.5)
    args = (q, k, v, tuple(gates), make_state(1, 2, 16, 16, 2, hidden=32), 16, MATCHED, 0.3)
    _, g_eager = _train_grads(fused_triton.neural_memory_fused, torch.float32, *args)
    monkeypatch.setitem(fused_triton.BACKWARD, "compile_batched", {"backend": "aot_eager"})
    _, g_comp = _train_grads(fused_triton.neural_memory_fused, torch.float32, *args)
    assert any(key[0] == "_update_vjp_adjoint" for key, _ in fused_triton._COMPILED_SWEEP)
    assert any(key[0] == ("read_vjp" if read == "adjoint" else "after_kernels") for key, _ in fused_triton._COMPILED_SWEEP)
    for a, b in zip(g_comp, g_eager):
        assert rel(a.double(), b.double()) <= 1e-6


def test_fused_training_through_neural_memory_and_no_state_gradient():
    """``neural_memory(fused=True)`` trains; inputs alone requiring grad (a fixed initial state) work,
    and a loss on the output only (no cotangent for the returned state) too."""
    q, k, v, th, et, al = make_inputs(b=1, t=2 * 16, h=2, dk=16, dv=16, seed=4, theta_max=0.5)
    st = make_state(1, 2, 16, 16, 2, hidden=32)
    st32 = MemoryState(*(tuple(x.float() for x in part) for part in (st.weights, st.momentum, st.chunk_start)), 0)
    qf = q.float().requires_grad_()
    y, _ = neural_memory(qf, k.float(), v.float(), th.float(), et.float(), al.float(), st32, 16, fused=True)
    (gq,) = torch.autograd.grad(y.square().sum(), qf)
    qd = q.clone().requires_grad_()
    y0, _ = neural_memory_chunked(qd, k, v, th, et, al, st, 16)
    (gq0,) = torch.autograd.grad(y0.square().sum(), qd)
    assert rel(gq.double(), gq0) <= 1e-5


def test_compiled_sweep_step(monkeypatch):
    """The adjoint sweep and the batched read / update trace whole under ``torch.compile(fullgraph=True)``
    (aot_eager here; inductor on the GPU), the sweep in blocks of 2 chunks and one chunk at a time (7
    chunks: 3 blocks and a single one), and give the eager backward's gradients."""
    from mnemotorch.ops.memory import fused_triton

    monkeypatch.setitem(fused_triton.BACKWARD, "sweep_block", 2)
    monkeypatch.setitem(fused_triton.BACKWARD, "triton_sweep", False)  # the PyTorch sweep, compiled
    # the autograd forms of the read's and the update's VJPs (the written-out ones: test_vjps_written_out_compile)
    monkeypatch.setitem(fused_triton.BACKWARD, "read_vjp", "autograd")
    monkeypatch.setitem(fused_triton.BACKWARD, "update_vjp", "autograd")
    q, k, v, th, et, al = make_inputs(b=1, t=7 * 16, h=2, dk=16, dv=16, seed=5, theta_max=0.5)
    st = make_state(1, 2, 16, 16, 2, hidden=32)
    args = (q, k, v, (th, et, al), st, 16, MATCHED, 0.3)
    _, g_eager = _train_grads(fused_triton.neural_memory_fused, torch.float32, *args)
    monkeypatch.setitem(fused_triton.BACKWARD, "compile_sweep", {"backend": "aot_eager"})
    monkeypatch.setitem(fused_triton.BACKWARD, "compile_batched", {"backend": "aot_eager"})
    _, g_comp = _train_grads(fused_triton.neural_memory_fused, torch.float32, *args)
    names = {key[0] for key, _ in fused_triton._COMPILED_SWEEP if "aot_eager" in key[1]}
    assert names >= {"state_adjoint", "sweep_block", "_batched_read", "_batched_update"}, names  # (the cache is shared by tests)
    for a, b in zip(g_comp, g_eager):
        assert rel(a.double(), b.double()) <= 1e-6


# (split, fold, form, id): the kernels' three code paths with FOLD (the one-program kernel; the split one phase by
# phase, its phase 3 recomputing Δ_2's cotangent; the walk keeping it in registers) on the clip and the LayerNorm on and
# off; the split kernel's forms (LAUNCH["sweep_form"]; "auto" the default: joined without the clip, three phases with it)
SWEEP_KINDS = [(0, False, "auto", "one_program"), (16, False, "auto", "split2"), (8, False, "auto", "split4"),
               ("walk", False, "auto", "split1_walk"), ("walk_keep", False, "auto", "split1_walk_keep"),
               (0, True, "auto", "one_program_fold"), (16, True, "auto", "split2_fold"),
               ("walk_keep", True, "auto", "split1_walk_keep_fold"),
               (16, True, "three_phase", "split2_fold_three_phase"), ("walk_keep", True, "three_phase", "split1_walk_keep_fold_three_phase"),
               ("walk", True, "three_phase", "split1_walk_fold_three_phase"),
               (16, True, "joined", "split2_fold_joined"), (8, False, "joined", "split4_joined"),
               ("walk_keep", True, "joined", "split1_walk_keep_fold_joined")]  # fmt: skip
SWEEP_CASES = [(*c, sp, fold, form, f"{c[0]}-{sid}") for c in ADJ_CASES if c[1] == 2 for sp, fold, form, sid in SWEEP_KINDS
               if not fold or c[0] in ("matched", "matched_clip", "default", "default_clip")]  # fmt: skip


def _sweep_kind(monkeypatch, split, form: str) -> None:
    """The sweep kernel a test runs: ``split`` 0 the one-program kernel, an int the split kernel at that many hidden
    columns a program (one launch per phase and chunk under the interpreter), "walk" / "walk_keep" the split kernel with
    one program per head walking every chunk in one launch as on the GPU (``LAUNCH["sweep_keep"]`` off / on); ``form``
    its ``LAUNCH["sweep_form"]``."""
    from mnemotorch.ops.memory import fused_triton

    monkeypatch.setitem(fused_triton.LAUNCH, "sweep_form", form)
    if isinstance(split, str):  # the split kernel, one program per head, PHASE 0
        monkeypatch.setattr(fused_triton, "_sweep_programs", lambda *a: 1)
        monkeypatch.setattr(fused_triton, "_sweep_split_on", lambda ns: True)
        monkeypatch.setitem(fused_triton.LAUNCH, "sweep_keep", split == "walk_keep")
    else:
        monkeypatch.setitem(fused_triton.LAUNCH, "sweep_split", split)


@pytest.mark.parametrize("name,depth,cfg,clip,split,fold,form", [c[:-1] for c in SWEEP_CASES], ids=[c[-1] for c in SWEEP_CASES])
def test_triton_sweep_equals_pytorch_sweep(monkeypatch, name, depth, cfg, clip, split, fold, form):
    """The depth-2 sweep kernel (one launch per group of chunks; or the hidden dimension split over 2 or 4
    programs per head, one launch per phase and chunk under the interpreter; or the split kernel with one
    program per head walking every chunk in one launch as on the GPU, phase 3 taking phase 2's values from
    registers or recomputing them, ``LAUNCH["sweep_keep"]``) gives the PyTorch sweep's adjoints: the one
    entering the group and the one leaving every chunk (fp32, ≤ 1e-6). ``fold``: both also take (random) read
    cotangents of the key pass (``add_cot``, the kernels' ``FOLD``). ``form``: the split kernel's
    ``LAUNCH["sweep_form"]`` (phase 2 joined to phase 1, one barrier a chunk, or the three phases; "auto" picks by the
    clip)."""
    from mnemotorch.ops.memory import fused_triton
    from mnemotorch.ops.memory.fused_backward import sweep_block

    _sweep_kind(monkeypatch, split, form)
    launched = []
    for name_ in ("_lmm_sweep_kernel", "_lmm_split_sweep_kernel"):
        kern = getattr(fused_triton, name_)
        monkeypatch.setattr(fused_triton, name_, _Recording(kern, name_, launched))

    torch.manual_seed(0)
    g_n, b, h, c, d, hid = 3, 1, 2, 16, 16, 32
    k = torch.nn.functional.normalize(torch.randn(g_n, b, h, c, d), dim=-1)
    v = torch.randn(g_n, b, h, c, d)
    ws = [torch.randn(g_n, b, h, d, hid) / 4, torch.randn(g_n, b, h, hid, d) / 6]
    kp = key_pass_saved(k, v, ws, cfg["activation"], cfg["residual"], cfg["layer_norm"], 1e-5)
    if clip is not None:  # τ at the median gradient norm: the clip acts on about half the tokens
        sq = sum(x.pow(2).sum(-1) * dl.pow(2).sum(-1) for x, dl in zip(kp.xs, kp.deltas))
        clip = float(sq.sqrt().median()) * 1.0001
    g_last, n_last = torch.rand(g_n, b, h, c), torch.rand(g_n, b, h, c)
    ends = [0.5 + 0.5 * torch.rand(g_n, b, h) for _ in range(3)]
    rnd = lambda *lead: [torch.randn(*lead, b, h, d, hid), torch.randn(*lead, b, h, hid, d)]  # noqa: E731
    adj_w, adj_s, b_w, b_s = rnd(), rnd(), rnd(g_n), rnd(g_n)
    cot = None
    if fold:  # of Δ_1, Δ_2; of k, σ(Z_1); of the clip's scale
        per_token = lambda *dims: torch.randn(g_n, b, h, c, *dims)  # noqa: E731
        cot = ReadCotangents([per_token(hid), per_token(d)], [per_token(d), per_token(hid)], None if clip is None else per_token())
    want = sweep_block(kp, g_last, n_last, *ends, ws, adj_w, adj_s, b_w, b_s, cfg["layer_norm"], clip, cot)
    got = fused_triton._sweep_triton(kp, ws, b_w, b_s, g_last, n_last, ends, adj_w, adj_s, cfg["layer_norm"], clip, False, cot)
    assert set(launched) == {"_lmm_split_sweep_kernel" if split else "_lmm_sweep_kernel"}
    for i, (a, b_) in enumerate(zip([*got[0], *got[1], *got[2]], [*want[0], *want[1], *want[2]])):
        assert rel(a, b_) <= 1e-6, (i, rel(a, b_))


@pytest.mark.parametrize("form,clip", [("joined", None), ("three_phase", 0.3)])
def test_sweep_pre_adjoint_bit_identical(monkeypatch, form, clip):
    """``LAUNCH["sweep_pre_adjoint"]`` (the new adjoint's parts without ``dW`` written in the split sweep's phase 1) gives
    the same adjoints, bit for bit, as writing the whole of it in phase 3: the same sums in the same order."""
    from mnemotorch.ops.memory import fused_triton

    monkeypatch.setitem(fused_triton.LAUNCH, "sweep_form", form)
    monkeypatch.setitem(fused_triton.LAUNCH, "sweep_split", 16)
    torch.manual_seed(3)
    g_n, b, h, c, d, hid = 2, 1, 2, 16, 16, 32
    k = torch.nn.functional.normalize(torch.randn(g_n, b, h, c, d), dim=-1)
    ws = [torch.randn(g_n, b, h, d, hid) / 4, torch.randn(g_n, b, h, hid, d) / 6]
    kp = key_pass_saved(k, torch.randn(g_n, b, h, c, d), ws, "gelu", True, True, 1e-5)
    rnd = lambda *lead: [torch.randn(*lead, b, h, d, hid), torch.randn(*lead, b, h, hid, d)]  # noqa: E731
    args = (kp, ws, rnd(g_n), rnd(g_n), torch.rand(g_n, b, h, c), torch.rand(g_n, b, h, c), [0.5 + 0.5 * torch.rand(g_n, b, h) for _ in range(3)],
            rnd(), rnd(), True, clip, False)  # fmt: skip
    runs = []
    for pre in (False, True):
        monkeypatch.setitem(fused_triton.LAUNCH, "sweep_pre_adjoint", pre)
        a_w, a_s, leaving = fused_triton._sweep_triton(*args)
        runs.append([*a_w, *a_s, *leaving])
    for i, (x, y) in enumerate(zip(*runs)):
        assert torch.isfinite(x).all() and torch.equal(x, y), i


# (split, form, id): the sweep kernels' code paths that store Δ_2's cotangent for the update's VJP
U_KINDS = [(0, "auto", "one_program"), (16, "joined", "split2_joined"), (16, "three_phase", "split2_three_phase"),
           ("walk_keep", "joined", "split1_walk_keep_joined"), ("walk_keep", "three_phase", "split1_walk_keep_three_phase"),
           ("walk", "three_phase", "split1_walk_three_phase")]  # fmt: skip
U_CASES = [(*c, *kind, "masked") for c in ADJ_CASES if c[0] in ("matched", "default_clip", "silu_ln_noresidual_clip") for kind in U_KINDS]
U_CASES += [(*c, 16, form, f"split2_{form}_{store}", store) for c in ADJ_CASES if c[0] == "default_clip" for form in ("joined", "three_phase")
            for store in ("rows", "first")]  # (LAUNCH["sweep_u_store"]'s other forms)  # fmt: skip


@pytest.mark.parametrize("name,depth,cfg,clip,split,form,kind,store", U_CASES, ids=[f"{c[0]}-{c[-2]}" for c in U_CASES])
def test_sweep_u_feeds_update_vjp(monkeypatch, name, depth, cfg, clip, split, form, kind, store):
    """``BACKWARD["update_u_from_sweep"]``: the cotangent of Δ_2 (and with the clip those of ``g̃, ñ``) that the sweep
    kernels store (``SAVE_U``: every row once, whichever program holds it) give the update-VJP kernel the same
    gradients as its own recomputation (fp32, ≤ 1e-6), with the read's folded cotangents in both; and the stores
    change nothing in the adjoints (bit for bit)."""
    from mnemotorch.ops.memory import fused_triton, fused_update_vjp
    from mnemotorch.ops.memory.fused_backward import _clip_stats

    _sweep_kind(monkeypatch, split, form)
    monkeypatch.setitem(fused_triton.LAUNCH, "sweep_u_store", store)
    monkeypatch.setitem(fused_update_vjp.LAUNCH_UPDATE_VJP, "slice", 16)  # two slices
    torch.manual_seed(5)
    g_n, b, h, c, d, hid = 2, 1, 2, 16, 16, 32
    k = torch.nn.functional.normalize(torch.randn(g_n, b, h, c, d), dim=-1)
    v = torch.randn(g_n, b, h, c, d)
    ws = [torch.randn(g_n, b, h, d, hid) / 4, torch.randn(g_n, b, h, hid, d) / 6]
    ss = [torch.randn(g_n, b, h, d, hid) / 10, torch.randn(g_n, b, h, hid, d) / 10]
    kp = key_pass_saved(k, v, ws, cfg["activation"], cfg["residual"], cfg["layer_norm"], 1e-5)
    stats = None
    if clip is not None:  # τ at the median gradient norm: the clip acts on about half the tokens
        sq = sum(x.pow(2).sum(-1) * dl.pow(2).sum(-1) for x, dl in zip(kp.xs, kp.deltas))
        clip = float(sq.sqrt().median()) * 1.0001
        stats = _clip_stats(kp, clip)
    g_last, n_last = torch.rand(g_n, b, h, c), torch.rand(g_n, b, h, c)
    ends = [0.5 + 0.5 * torch.rand(g_n, b, h) for _ in range(3)]
    rnd = lambda *lead: [torch.randn(*lead, b, h, d, hid), torch.randn(*lead, b, h, hid, d)]  # noqa: E731
    adj_w, adj_s, b_w, b_s = rnd(), rnd(), rnd(g_n), rnd(g_n)
    per_token = lambda *dims: torch.randn(g_n, b, h, c, *dims)  # noqa: E731
    cot = ReadCotangents([per_token(hid), per_token(d)], [per_token(d), per_token(hid)], None if clip is None else per_token())
    args = (kp, ws, b_w, b_s, g_last, n_last, ends, adj_w, adj_s, cfg["layer_norm"], clip, False, cot)
    u = torch.full((g_n, b, h, c, d), float("nan"))
    gsum = None if clip is None else torch.full((g_n, b, h, 2, c), float("nan"))
    plain = fused_triton._sweep_triton(*args, stats=stats)
    saved = fused_triton._sweep_triton(*args, stats=stats, u_out=u, g_out=gsum)
    for x, y in zip([*plain[0], *plain[1], *plain[2]], [*saved[0], *saved[1], *saved[2]]):
        assert torch.equal(x, y)
    assert torch.isfinite(u).all() and (gsum is None or torch.isfinite(gsum).all())  # every row written
    leaving = saved[2]
    upd = (k, kp, g_last, n_last, ws, ss, leaving[:2], leaving[2:], cfg["residual"], cfg["layer_norm"], clip, stats, cot, "ieee")
    want = fused_update_vjp.launch(*upd)
    got = fused_update_vjp.launch(*upd, u, gsum)
    for nm, x, y in zip(["dk", "dv", "dg_last", "dn_last", "dbeta_c", "dm_c", "df_c"], got, want):
        assert rel(x.double(), y.double()) <= 1e-6, (nm, rel(x.double(), y.double()))
    if clip is not None:  # u alone (gsum recomputed) as well
        got = fused_update_vjp.launch(*upd, u)
        for nm, x, y in zip(["dk", "dv", "dg_last", "dn_last"], got, want):
            assert rel(x.double(), y.double()) <= 1e-6, (nm, rel(x.double(), y.double()))


def test_fused_training_update_u_from_sweep(monkeypatch):
    """Training with the sweep's Δ_2 cotangent handed to the update's VJP (the default) and with it recomputed there give
    the same outputs and gradients (≤ 1e-6), for the matched and the silu + LayerNorm + clip configs; what is handed on
    reaches the custom op."""
    from mnemotorch.ops.memory import fused_triton, fused_update_vjp

    monkeypatch.setitem(fused_triton.LAUNCH, "split_slice", 16)
    q, k, v, th, et, al = make_inputs(b=1, t=2 * 16, h=2, dk=16, dv=16, seed=9, theta_max=0.5)
    st = make_state(1, 2, 16, 16, 2, hidden=32)
    seen, side = [], []
    real = fused_update_vjp._lmm_update_vjp  # (the op, called without the dispatcher in eager mode: ops/eager.py)
    monkeypatch.setattr(fused_update_vjp, "_lmm_update_vjp", lambda *a: seen.append((a[-2] is not None, a[-1] is not None)) or real(*a))
    real_side = fused_triton._Streams.used_on_side  # (with BACKWARD["overlap"] the update VJP reads them on the second stream)
    monkeypatch.setattr(fused_triton._Streams, "used_on_side", lambda self, ts: side.append([tuple(t.shape) for t in ts]) or real_side(self, ts))
    for cfg, clip in ((MATCHED, None), (dict(activation="silu", residual=False, layer_norm=True), 0.3)):
        monkeypatch.setitem(fused_triton.BACKWARD, "update_u_from_sweep", True)
        seen.clear(), side.clear()
        y1, g1 = _train_grads(fused_triton.neural_memory_fused, torch.float32, q, k, v, (th, et, al), st, 16, cfg, clip)
        assert seen and all(x == (True, clip is not None) for x in seen)
        # the handed-on tensors ([n, B, H, C, d_v], and with the clip [n, B, H, 2, C]) are recorded for the second stream
        assert side and all((2, 1, 2, 16, 16) in s_ and ((2, 1, 2, 2, 16) in s_) == (clip is not None) for s_ in side)
        monkeypatch.setitem(fused_triton.BACKWARD, "update_u_from_sweep", False)
        seen.clear()
        y2, g2 = _train_grads(fused_triton.neural_memory_fused, torch.float32, q, k, v, (th, et, al), st, 16, cfg, clip)
        assert seen and all(x == (False, False) for x in seen)
        for a, b in zip([y1, *g1], [y2, *g2]):
            assert rel(a.double(), b.double()) <= 1e-6


class _Recording:
    """A Triton kernel whose launches (``kernel[grid](...)``) are recorded by name."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


def test_fused_training_pytorch_sweep(monkeypatch):
    """The PyTorch sweep (``BACKWARD["triton_sweep"] = False``; depth 2 otherwise takes the kernel) against
    the float64 chunked path."""
    from mnemotorch.ops.memory import fused_triton

    monkeypatch.setitem(fused_triton.BACKWARD, "triton_sweep", False)
    calls = []
    real = fused_triton._sweep_triton
    monkeypatch.setattr(fused_triton, "_sweep_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, th, et, al = make_inputs(b=1, t=3 * 16, h=2, dk=16, dv=16, seed=9, theta_max=0.5)
    st = make_state(1, 2, 16, 16, 2, hidden=32)
    y_ref, g_ref = _train_grads(neural_memory_chunked, torch.float64, q, k, v, (th, et, al), st, 16, MATCHED, 0.3)
    y, g = _train_grads(fused_triton.neural_memory_fused, torch.float32, q, k, v, (th, et, al), st, 16, MATCHED, 0.3)
    assert calls == []
    for i, (a, b) in enumerate(zip([y, *g], [y_ref, *g_ref])):
        assert rel(a.double(), b) <= 1e-5, (i, rel(a.double(), b))


# (read form, sweep, config): the read's two written-out forms, the three sweeps, the clip and the LayerNorm on and off;
# pairwise (every read form and every sweep meets all four configurations) rather than all 24 (interpreter time)
FOLD_CFGS = {"ln_clip": (MATCHED, 0.3), "plain": (DEFAULT, None), "ln": (MATCHED, None), "clip": (DEFAULT, 0.3)}
FOLD_CASES = [(r, sw, c) for i, r in enumerate(("triton", "adjoint")) for j, sw in enumerate(("one_program", "split", "pytorch"))
              for c in (("ln_clip", "plain"), ("ln", "clip"))[(i + j) % 2]]  # fmt: skip


@pytest.mark.parametrize("read,sweep,case", FOLD_CASES, ids=["-".join(x) for x in FOLD_CASES])
def test_fused_training_fold_read(monkeypatch, read, sweep, case):
    """``BACKWARD["fold_read"]``: the read's key-pass cotangents go to the sweep (PyTorch, the one-program or the split
    kernel) and the update's VJP (its kernel with the read's kernel, its PyTorch form with the read's) instead of through
    their own key-pass VJP; the gradients equal those unfolded and the float64 chunked path's (≤ 1e-5), over two groups
    of chunks."""
    from mnemotorch.ops.memory import fused_triton

    cfg, clip = FOLD_CFGS[case]
    update = "triton" if read == "triton" else "adjoint"  # (the update's kernel with the read's; its PyTorch form with the other)
    monkeypatch.setitem(fused_triton.BACKWARD, "read_vjp", read)
    monkeypatch.setitem(fused_triton.BACKWARD, "update_vjp", update)
    monkeypatch.setitem(fused_triton.BACKWARD, "fold_read", False)  # (the default is on) the unfolded baseline first
    monkeypatch.setitem(fused_triton.BACKWARD, "group_elements", 2 * 16 * 32)  # two chunks a group: 3 chunks in 2 groups
    if sweep == "pytorch":
        monkeypatch.setitem(fused_triton.BACKWARD, "triton_sweep", False)
    else:
        monkeypatch.setitem(fused_triton.LAUNCH, "sweep_split", 16 if sweep == "split" else 0)  # hidden 32: 2 programs a head, or 1
    launched, folded = [], []
    for name_ in ("_lmm_sweep_kernel", "_lmm_split_sweep_kernel"):
        monkeypatch.setattr(fused_triton, name_, _Recording(getattr(fused_triton, name_), name_, launched))

    def spy(fn, cot):  # records (fn, whether the read's cotangents came along); "state_adjoint+": the update's VJP
        real = getattr(fused_triton, fn)

        def call(*a, **kw):
            folded.append((fn + "+" * bool(kw.get("inputs")), cot(a, kw) is not None))
            return real(*a, **kw)

        monkeypatch.setattr(fused_triton, fn, call)

    spy("_sweep_triton", lambda a, kw: a[-1])
    spy("_update_vjp_adjoint", lambda a, kw: a[-1])
    spy("_update_vjp_triton", lambda a, kw: a[11])
    spy("state_adjoint", lambda a, kw: kw.get("add_cot"))  # (the PyTorch sweep's step; called by the update's VJP too)
    # one head (interpreter time): the kernels' head offsets with FOLD are test_triton_sweep_equals_pytorch_sweep's (2 heads)
    q, k, v, th, et, al = make_inputs(b=1, t=3 * 16, h=1, dk=16, dv=16, seed=2, theta_max=0.5)
    st = make_state(1, 1, 16, 16, 2, hidden=32)
    args = (q, k, v, (th, et, al), st, 16, cfg, clip)
    y_ref, g_ref = _train_grads(neural_memory_chunked, torch.float64, *args)
    _, g_off = _train_grads(fused_triton.neural_memory_fused, torch.float32, *args)
    assert folded and not any(f for _, f in folded)
    folded.clear(), launched.clear()
    monkeypatch.setitem(fused_triton.BACKWARD, "fold_read", True)
    y, g = _train_grads(fused_triton.neural_memory_fused, torch.float32, *args)
    want = {"one_program": {"_lmm_sweep_kernel"}, "split": {"_lmm_split_sweep_kernel"}, "pytorch": set()}[sweep]
    assert set(launched) == want
    updates = {"_update_vjp_triton"} if update == "triton" else {"_update_vjp_adjoint", "state_adjoint+"}
    assert {f for f, on in folded if on} == updates | {"state_adjoint" if sweep == "pytorch" else "_sweep_triton"}
    assert all(on for _, on in folded)
    assert rel(y.double(), y_ref) <= 1e-5
    for i, (a, b_, r) in enumerate(zip(g, g_off, g_ref)):
        assert rel(a.double(), b_.double()) <= 1e-5, (i, rel(a.double(), b_.double()))
        assert rel(a.double(), r) <= 1e-5, (i, rel(a.double(), r))


def test_fused_training_fold_read_depth1(monkeypatch):
    """Depth 1 (the read's PyTorch form and the PyTorch sweep, whatever the settings say) folds too."""
    from mnemotorch.ops.memory import fused_triton

    _, depth, cfg, clip, d, hidden, chunk, t, pos = next(c for c in TRAIN_CASES if c[0] == "depth1_ln_clip")
    q, k, v, th, et, al = make_inputs(b=1, t=t, h=2, dk=d, dv=d, seed=2, theta_max=0.5)
    args = (q, k, v, (th, et, al), make_state(1, 2, d, d, depth, hidden=hidden, position=pos), chunk, cfg, clip)
    y_ref, g_ref = _train_grads(neural_memory_chunked, torch.float64, *args)
    monkeypatch.setitem(fused_triton.BACKWARD, "fold_read", True)
    y, g = _train_grads(fused_triton.neural_memory_fused, torch.float32, *args)
    for i, (a, b) in enumerate(zip([y, *g], [y_ref, *g_ref])):
        assert rel(a.double(), b) <= 1e-5, (i, rel(a.double(), b))


def test_fold_read_compiles(monkeypatch):
    """With ``fold_read`` the read's tail (:func:`~.fused_read_vjp.after_kernels`; :func:`read_vjp` shares its
    :func:`read_vjp_tail`), the PyTorch sweep (a block of 2 chunks and one chunk alone) and the update's VJP, which
    pass :class:`ReadCotangents` between them, trace whole under ``torch.compile(fullgraph=True)`` (aot_eager here)
    with the eager gradients."""
    from mnemotorch.ops.memory import fused_triton

    monkeypatch.setitem(fused_triton.BACKWARD, "fold_read", True)
    monkeypatch.setitem(fused_triton.BACKWARD, "triton_sweep", False)
    monkeypatch.setitem(fused_triton.BACKWARD, "sweep_block", 2)
    q, k, v, *gates = make_inputs(b=1, t=3 * 16, h=2, dk=16, dv=16, seed=8, theta_max=0.5)
    args = (q, k, v, tuple(gates), make_state(1, 2, 16, 16, 2, hidden=32), 16, MATCHED, 0.3)
    _, g_eager = _train_grads(fused_triton.neural_memory_fused, torch.float32, *args)
    for key in ("compile_sweep", "compile_batched"):
        monkeypatch.setitem(fused_triton.BACKWARD, key, {"backend": "aot_eager"})
    _, g_comp = _train_grads(fused_triton.neural_memory_fused, torch.float32, *args)
    for a, b in zip(g_comp, g_eager):
        assert rel(a.double(), b.double()) <= 1e-6


def test_fold_read_setting_is_checked(monkeypatch):
    """``BACKWARD["fold_read"]`` must be a bool; it is on by default and does not apply with the autograd update, which
    cannot take the read's cotangents (the read's tail then gives its own share of dk, dv): same gradients either way."""
    from mnemotorch.ops.memory import fused_triton

    assert fused_triton.BACKWARD["fold_read"] is True
    q, k, v, *gates = make_inputs(b=1, t=16, h=2, dk=16, dv=16, seed=8, theta_max=0.5)
    args = (q, k, v, tuple(gates), make_state(1, 2, 16, 16, 2, hidden=32), 16, MATCHED, None)
    monkeypatch.setitem(fused_triton.BACKWARD, "fold_read", 1)
    with pytest.raises(ValueError, match="fold_read.*must be a bool"):
        _train_grads(fused_triton.neural_memory_fused, torch.float32, *args)
    grads = {}
    for fold in (True, False):
        monkeypatch.setitem(fused_triton.BACKWARD, "fold_read", fold)
        monkeypatch.setitem(fused_triton.BACKWARD, "update_vjp", "autograd")
        _, grads[fold] = _train_grads(fused_triton.neural_memory_fused, torch.float32, *args)
    for a, b in zip(grads[True], grads[False]):
        assert rel(a.double(), b.double()) <= 1e-6


@pytest.mark.parametrize("key", ["read_vjp", "update_vjp"])
def test_unknown_vjp_form_is_refused(monkeypatch, key):
    """A misspelt ``BACKWARD["read_vjp"]`` / ``["update_vjp"]`` raises, naming the setting, rather than falling back."""
    from mnemotorch.ops.memory import fused_triton

    monkeypatch.setitem(fused_triton.BACKWARD, key, "bogus")
    q, k, v, *gates = make_inputs(b=1, t=16, h=2, dk=16, dv=16, seed=8, theta_max=0.5)
    with pytest.raises(ValueError, match=key):
        _train_grads(fused_triton.neural_memory_fused, torch.float32, q, k, v, tuple(gates), make_state(1, 2, 16, 16, 2, hidden=32), 16, MATCHED, None)


def test_read_vjp_custom_op_passes_opcheck(monkeypatch):
    """``mnemotorch::lmm_read_vjp`` (the read-VJP kernels, interpreter) passes ``torch.library.opcheck``: its fake
    gives the real outputs' shapes and dtypes, and it traces."""
    from mnemotorch.ops.memory import fused_read_vjp

    monkeypatch.setitem(fused_read_vjp.LAUNCH_READ_VJP, "slice", 16)  # two slices: the partials' leading dimension
    gen = torch.Generator().manual_seed(3)
    n, b, h, c, d, hid = 2, 1, 2, 16, 16, 32
    rnd = lambda *shape: torch.randn(*shape, generator=gen) * 0.3  # noqa: E731
    args = (rnd(n, b, h, c, d), rnd(n, b, h, c, d), torch.tril(rnd(n, b, h, c, c).abs()), rnd(n, b, h, c).sigmoid(), rnd(n, b, h, c),
            rnd(n, b, h, d, hid), rnd(n, b, h, d, hid), rnd(n, b, h, hid, d), rnd(n, b, h, hid, d), rnd(n, b, h, c, hid), rnd(n, b, h, c, hid),
            rnd(n, b, h, c, d), rnd(n, b, h, c, d), "gelu", True, 1e-5, "ieee")  # fmt: skip
    out = fused_read_vjp.lmm_read_vjp(*args)
    assert out[3].shape == (2, n, b, h, c, d)  # per-slice partials of dq
    torch.library.opcheck(fused_read_vjp.lmm_read_vjp, args)
    sums = (rnd(n, b, h, c, d), rnd(n, b, h, c, d), rnd(n, b, h, c, c))  # the forward's kept sums (any values, for the schema)
    torch.library.opcheck(fused_read_vjp.lmm_read_vjp, (*args, *sums))
    torch.library.opcheck(fused_read_vjp.lmm_read_vjp, (*args, *sums, rnd(n, b, h, c, hid)))  # and the read's Ẑ_1
    with pytest.raises(ValueError, match="come together"):
        fused_read_vjp.lmm_read_vjp(*args, *sums[:2])



@pytest.mark.parametrize("clip", [False, True], ids=["plain", "ln_clip_cot"])
def test_update_vjp_custom_op_passes_opcheck(monkeypatch, clip):
    """``mnemotorch::lmm_update_vjp`` (the update-VJP kernel, interpreter) passes ``torch.library.opcheck`` with its
    optional inputs absent and present: its fake gives the real outputs' shapes and dtypes, and it traces."""
    from mnemotorch.ops.memory import fused_update_vjp

    monkeypatch.setitem(fused_update_vjp.LAUNCH_UPDATE_VJP, "slice", 16)  # two slices
    gen = torch.Generator().manual_seed(4)
    n, b, h, c, d, hid = 2, 1, 2, 16, 16, 32
    rnd = lambda *shape: torch.randn(*shape, generator=gen) * 0.3  # noqa: E731
    ch, cd, row = (n, b, h, c, hid), (n, b, h, c, d), (n, b, h, c)
    w_shapes = [(n, b, h, d, hid), (n, b, h, hid, d)] * 2 + [(n, b, h, d, hid)] * 2 + [(n, b, h, hid, d)] * 2  # W1, W2, S1, S2, A^W1, A^S1, A^W2, A^S2
    opt = (lambda *shape: rnd(*shape)) if clip else (lambda *shape: None)  # noqa: E731
    args = (rnd(*cd), *(rnd(*ch) for _ in range(4)), rnd(*cd), opt(*cd), opt(*row).abs() + 1 if clip else None, opt(*row),
            *(rnd(*s_) for s_ in w_shapes), rnd(*row), rnd(*row), *(opt(*row) for _ in range(6)),
            opt(*ch), opt(*cd), opt(*cd), opt(*ch), opt(*row), True, 0.5 if clip else 0.0, "ieee")  # fmt: skip
    out = fused_update_vjp.lmm_update_vjp(*args)
    assert [tuple(x.shape) for x in out] == [cd, cd, row, row, (n, b, h, 3)]
    torch.library.opcheck(fused_update_vjp.lmm_update_vjp, args)
    # the sweep's cotangent of Δ_2 (and with the clip g̃, ñ's): any values, for the schema and the fake
    torch.library.opcheck(fused_update_vjp.lmm_update_vjp, (*args, rnd(*cd), rnd(n, b, h, 2, c) if clip else None))
    if not clip:
        with pytest.raises(ValueError, match="gsum"):
            fused_update_vjp.lmm_update_vjp(*args, rnd(*cd), rnd(n, b, h, 2, c))

class _RecordingKw:
    """A Triton kernel whose launches record one keyword argument's value."""

    def __init__(self, kernel, key, log):
        self.kernel, self.key, self.log = kernel, key, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(kwargs.get(self.key))
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_exact_keys_bit_identical(monkeypatch):
    """bf16 keys under "bf16x3" products: with ``LAUNCH["exact_keys"]`` the walk's and the sweep's products with k take
    two bf16 products (k's low part is zero) and give the same output, state and gradients, bit for bit, as three."""
    from mnemotorch.ops.memory import fused_triton

    monkeypatch.setitem(fused_triton.LAUNCH, "half_precision", "bf16x3")
    monkeypatch.setitem(fused_triton.LAUNCH, "split_slice", 16)
    monkeypatch.setitem(fused_triton.LAUNCH, "sweep_split", 16)
    seen: list = []
    for name in ("_lmm_split_fwd_kernel", "_lmm_split_sweep_kernel"):
        monkeypatch.setattr(fused_triton, name, _RecordingKw(getattr(fused_triton, name), "KB", seen))
    q, k, v, th, et, al = make_inputs(b=1, t=2 * 32, h=2, dk=16, dv=16, seed=5, theta_max=0.5)
    st = make_state(1, 2, 16, 16, 2, hidden=32)

    def run(exact: bool):
        monkeypatch.setitem(fused_triton.LAUNCH, "exact_keys", exact)
        seen.clear()
        xs = [x.bfloat16().requires_grad_() for x in (q, k, v)] + [x.float().requires_grad_() for x in (th, et, al)]
        ws = [x.float().requires_grad_() for x in (*st.weights, *st.momentum)]
        y, s = fused_triton.neural_memory_fused(*xs, MemoryState(tuple(ws[:2]), tuple(ws[2:]), tuple(ws[:2]), 0), 32, **MATCHED, max_grad_norm=0.3)
        g = torch.Generator().manual_seed(1)
        outs = [y, *s.weights, *s.momentum]
        grads = torch.autograd.grad(outs, xs + ws, [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs])
        return [y.detach(), *(x.detach() for x in (*s.weights, *s.momentum)), *grads], sorted(set(seen), key=str)

    two, kb_on = run(True)
    three, kb_off = run(False)
    assert kb_on == [True] and kb_off == [False]
    for i, (a, b) in enumerate(zip(two, three)):
        assert torch.isfinite(a.float()).all() and torch.equal(a, b), i


@pytest.mark.parametrize("sweep_prec", [None, "tf32"])
def test_sweep_precision_reaches_the_sweep_only(monkeypatch, sweep_prec):
    """``LAUNCH["sweep_precision"]`` (a diagnostic: TF32 there left the clipped config's bf16 gradients 1.3e-2 / 5.8e-2
    from the fp32 path at 4K / 16K on an H200, over the 1e-2 bound) sets the adjoint sweep's products alone; the walk
    keeps ``LAUNCH["half_precision"]``, and None gives the sweep that one too."""
    from mnemotorch.ops.memory import fused_triton

    monkeypatch.setitem(fused_triton.LAUNCH, "half_precision", "bf16x3")
    monkeypatch.setitem(fused_triton.LAUNCH, "sweep_precision", sweep_prec)
    monkeypatch.setitem(fused_triton.LAUNCH, "split_slice", 16)
    monkeypatch.setitem(fused_triton.LAUNCH, "sweep_split", 16)
    walk: list = []
    sweep: list = []
    monkeypatch.setattr(fused_triton, "_lmm_split_fwd_kernel", _RecordingKw(fused_triton._lmm_split_fwd_kernel, "PREC", walk))
    monkeypatch.setattr(fused_triton, "_lmm_split_sweep_kernel", _RecordingKw(fused_triton._lmm_split_sweep_kernel, "PREC", sweep))
    q, k, v, th, et, al = make_inputs(b=1, t=2 * 32, h=2, dk=16, dv=16, seed=5, theta_max=0.5)
    st = make_state(1, 2, 16, 16, 2, hidden=32)
    xs = [x.bfloat16().requires_grad_() for x in (q, k, v)] + [x.float().requires_grad_() for x in (th, et, al)]
    ws = [x.float().requires_grad_() for x in (*st.weights, *st.momentum)]
    y, _ = fused_triton.neural_memory_fused(*xs, MemoryState(tuple(ws[:2]), tuple(ws[2:]), tuple(ws[:2]), 0), 32, **MATCHED)
    grads = torch.autograd.grad(y.float().sum(), xs + ws)
    assert set(walk) == {"bf16x3"} and set(sweep) == {sweep_prec or "bf16x3"}
    assert all(torch.isfinite(g.float()).all() for g in grads)
    monkeypatch.setitem(fused_triton.LAUNCH, "sweep_precision", "tf16")
    y, _ = fused_triton.neural_memory_fused(*xs, MemoryState(tuple(ws[:2]), tuple(ws[2:]), tuple(ws[:2]), 0), 32, **MATCHED)
    with pytest.raises(ValueError, match="MNEMO_MEMORY_SWEEP_PRECISION"):
        y.float().sum().backward()


def test_update_vjp_launch_from_env():
    """``MNEMO_MEMORY_UPDATE_VJP_LAUNCH`` parses "slice:warps:stages" and names itself when malformed."""
    from mnemotorch.ops.memory.fused_update_vjp import _launch_from_env

    assert _launch_from_env("64:8:3") == {"slice": 64, "warps": 8, "stages": 3}
    for bad in ("64:8", "64:x:1", "0:4:1", "32:4:2:1"):
        with pytest.raises(ValueError, match="MNEMO_MEMORY_UPDATE_VJP_LAUNCH"):
            _launch_from_env(bad)


def test_read_vjp_launch_from_env():
    """``MNEMO_MEMORY_READ_VJP_LAUNCH`` takes "slice:warps:stages:a_slice:a_warps" through the shared parser, which
    names the variable and the expected form when the value is malformed."""
    from mnemotorch.ops.memory.fused_read_vjp import _ENV_KEYS
    from mnemotorch.ops.memory.fused_triton import launch_from_env

    assert launch_from_env("MNEMO_MEMORY_READ_VJP_LAUNCH", "32:4:1:32:8", _ENV_KEYS) == dict(slice=32, warps=4, stages=1, a_slice=32, a_warps=8)
    for bad in ("32:4", "32:4:1:32:x", "0:4:1:32:4"):
        with pytest.raises(ValueError, match="MNEMO_MEMORY_READ_VJP_LAUNCH must be 'slice:warps:stages:a_slice:a_warps'"):
            launch_from_env("MNEMO_MEMORY_READ_VJP_LAUNCH", bad, _ENV_KEYS)


def test_fused_coefficients_compiled_one_graph_per_length(monkeypatch):
    """The gate coefficients the fused op takes, through ``torch.compile`` (a recording backend that runs the captured
    graph as it is): the eager values and gradients bit for bit, gates that are slices of a longer call, and one graph
    for every number of chunks > 1 (only the length symbolic)."""
    from mnemotorch.ops.memory import fused_triton

    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(fused_triton, "COMPILE_COEFFICIENTS", backend)
    monkeypatch.setattr(fused_triton, "COEFFICIENT_KERNEL", False)  # (the kernels have their own tests)
    torch.manual_seed(0)
    c = 16
    for n in (3, 7, 1):
        raw = torch.rand(2, (n + 2) * c, 4, 3, dtype=torch.float64) * 0.6 + 0.2
        gates = [raw[:, c : (n + 1) * c, :, i].requires_grad_() for i in range(3)]
        got = fused_triton.fused_coefficients(*gates, c, torch.float32)
        want = fused_triton.gate_coefficients(*gates, c, torch.float32)
        assert [tuple(x.shape) for x in got] == [(n, 2, 4, c, c)] * 2 + [(n, 2, 4, c)] * 3
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        cts = [torch.randn_like(x) for x in want]
        for a, b in zip(torch.autograd.grad(got, gates, cts), torch.autograd.grad(want, gates, cts)):
            assert torch.equal(a, b)
    assert len(graphs) == 2, "3 and 7 chunks share one graph; one chunk has its own"
    from mnemotorch.ops.compiled import forget_compiled

    forget_compiled(backend)


def test_group_grads_copy_add_and_zero_the_unwritten_rows():
    """The fused backward's gradient buffers: a slice's first part is copied, later parts added, rows no slice wrote
    (a gradient nobody contributes to) come back zero."""
    from mnemotorch.ops.memory.fused_triton import _GroupGrads

    like = torch.full((5, 2), float("nan"))
    sums = _GroupGrads((like, like))
    sums.add(0, slice(3, 5), torch.ones(2, 2))
    sums.add(0, slice(3, 5), torch.ones(2, 2))
    sums.add(0, slice(0, 1), torch.full((1, 2), 3.0))
    sums.add(1, slice(3, 5), None)
    a, b = sums.finish()
    assert torch.equal(a, torch.tensor([[3.0, 3.0], [0, 0], [0, 0], [2, 2], [2, 2]]))
    assert torch.equal(b, torch.zeros(5, 2))
