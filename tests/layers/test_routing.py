"""Routing attention (Roy et al., 2020): brute-force references, the causality leak, online k-means."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mnemotorch.layers import get_mixer
from mnemotorch.layers.routing import RoutingAttention, routing_aux_loss, update_routing_centroids
from mnemotorch.ops.rotary import apply_rotary, rotary_cos_sin
from mnemotorch.ops.routing import (
    balanced_topw_assignment,
    balanced_topw_attention,
    causal_exact_attention,
    commitment_loss,
    kmeans_ema_update,
    nearest_centroid,
)

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def perturb(mixer: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return mixer


def make(seed: int = 0, **kw) -> RoutingAttention:
    torch.manual_seed(seed)
    kw = {"dim": 24, "num_heads": 3, "num_clusters": 3, **kw}
    return perturb(get_mixer("routing", **kw).to(F64), seed)


# ----------------------------------------------------------------------------- brute force
def layer_norm_plain(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean = z.mean()
    var = ((z - mean) ** 2).mean()
    return (z - mean) / torch.sqrt(var + eps)


def argmax_plain(r: torch.Tensor, mu: torch.Tensor) -> int:
    scores = [float((r @ mu[c]).detach()) for c in range(mu.shape[0])]
    return max(range(len(scores)), key=lambda c: (scores[c], -c))  # ties: lower index


def routing_loop(m: RoutingAttention, x: torch.Tensor) -> torch.Tensor:
    """The mixer's causal-exact forward, query by query, head by head (slow, plain)."""
    b, t, _ = x.shape
    h, hl, d = m.num_heads, m.local_heads, m.head_dim
    q = (x @ m.q_proj.weight.T).view(b, t, h, d)
    k = q if m.k_proj is None else (x @ m.k_proj.weight.T).view(b, t, h, d)
    v = (x @ m.v_proj.weight.T).view(b, t, h, d)
    cq = [[[argmax_plain(layer_norm_plain(q[bi, i, hl + g]), m.centroids[g]) for g in range(h - hl)] for i in range(t)] for bi in range(b)]
    ck = [[[argmax_plain(layer_norm_plain(k[bi, j, hl + g]), m.centroids[g]) for g in range(h - hl)] for j in range(t)] for bi in range(b)]
    if m.rope_theta is not None:
        cos, sin = rotary_cos_sin(torch.arange(t), d, m.rope_theta, dtype=x.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    rows = []
    for bi in range(b):
        per_t = []
        for i in range(t):
            heads = []
            for hi in range(h):
                if hi < hl:
                    keys = [j for j in range(t) if i - m.local_window < j <= i]
                else:
                    g = hi - hl
                    keys = [j for j in range(t) if j <= i and ck[bi][j][g] == cq[bi][i][g]]
                if not keys:
                    heads.append(torch.zeros(d, dtype=x.dtype))
                    continue
                logits = torch.stack([q[bi, i, hi] @ k[bi, j, hi] for j in keys]) / math.sqrt(d)
                heads.append(logits.softmax(0) @ v[bi, keys, hi])
            per_t.append(torch.cat(heads))
        rows.append(torch.stack(per_t))
    return torch.stack(rows) @ m.o_proj.weight.T


def balanced_loop(q, k, v, rq, rk, mu, w, causal=True):
    """The paper's balanced rule, per batch row, head, centroid and query (slow, plain)."""
    b, t, h, d = q.shape
    out = torch.zeros_like(v)
    for bi in range(b):
        for hi in range(h):
            total = [torch.zeros(v.shape[-1], dtype=v.dtype) for _ in range(t)]
            count = [0] * t
            for c in range(mu.shape[1]):
                def members(r):
                    scores = [float((r[bi, i, hi] @ mu[hi, c]).detach()) for i in range(t)]
                    best = sorted(range(t), key=lambda i: (-scores[i], i))[: min(w, t)]
                    return sorted(best)
                mq, mk = members(rq), members(rk)
                for i in mq:
                    keys = [j for j in mk if j <= i] if causal else mk
                    count[i] += 1
                    if keys:
                        logits = torch.stack([q[bi, i, hi] @ k[bi, j, hi] for j in keys]) / math.sqrt(d)
                        total[i] = total[i] + logits.softmax(0) @ v[bi, keys, hi]
            for i in range(t):
                if count[i]:
                    out[bi, i, hi] = total[i] / count[i]
    return out


def grads(fn, tensors, weights):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    y = fn(*tensors)
    return y, torch.autograd.grad((y * weights).sum(), tensors)


# ------------------------------------------------------------------------ causal exact (op)
@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("tq", [13, 5])
def test_causal_exact_op_matches_loop(backend: str, tq: int) -> None:
    g = torch.Generator().manual_seed(0)
    b, tk, h, d, c = 2, 13, 2, 8, 3
    q = torch.randn(b, tq, h, d, dtype=F64, generator=g)
    k, v = (torch.randn(b, tk, h, d, dtype=F64, generator=g) for _ in range(2))
    ck = torch.randint(0, c, (b, tk, h), generator=g)
    cq = torch.randint(0, c, (b, tq, h), generator=g)
    cq[0, 1, 0] = c  # a cluster no key is in

    def loop(q, k, v):
        out = torch.zeros_like(q)
        for bi in range(b):
            for hi in range(h):
                for i in range(tq):
                    keys = [j for j in range(tk) if j <= tk - tq + i and ck[bi, j, hi] == cq[bi, i, hi]]
                    if keys:
                        p = (torch.stack([q[bi, i, hi] @ k[bi, j, hi] for j in keys]) / math.sqrt(d)).softmax(0)
                        out[bi, i, hi] = p @ v[bi, keys, hi]
        return out

    w = torch.randn(b, tq, h, d, dtype=F64, generator=g)
    y_ref, g_ref = grads(loop, [q, k, v], w)
    y, g_got = grads(lambda q, k, v: causal_exact_attention(q, k, v, cq, ck, backend=backend), [q, k, v], w)
    assert rel(y, y_ref) <= 1e-10
    for a, r in zip(g_got, g_ref):
        assert torch.isfinite(a).all() and rel(a, r) <= 1e-10
    # a query with no visible key outputs exactly 0
    assert (y[0, 1, 0] == 0).all()


# ----------------------------------------------------------------------- causal exact (mixer)
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"local_heads": 1, "local_window": 4},
        {"shared_qk": False, "rope_theta": None},
        {"shared_qk": False, "local_heads": 2, "local_window": 3, "backend": "reference"},
    ],
)
def test_mixer_matches_brute_force(kw: dict) -> None:
    m = make(**kw)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 11, 24, dtype=F64, generator=g)
    w = torch.randn(2, 11, 24, dtype=F64, generator=g)
    # several clusters are really used (the test would be weak otherwise)
    y_ref = routing_loop(m, x)
    y, _ = m(x)
    assert rel(y, y_ref) <= 1e-10
    params = [p for _, p in m.named_parameters()]
    g_ref = torch.autograd.grad((routing_loop(m, x.requires_grad_(True)) * w).sum(), [x] + params)
    x.grad = None
    g_got = torch.autograd.grad((m(x)[0] * w).sum(), [x] + params)
    for a, r in zip(g_got, g_ref):
        assert rel(a, r) <= 1e-10


def test_clusters_are_used() -> None:
    m = make()
    x = torch.randn(2, 40, 24, dtype=F64)
    rq = torch.nn.functional.layer_norm(m.q_proj(x).view(2, 40, 3, 8), (8,))
    c = nearest_centroid(rq, m.centroids)
    for head in range(3):
        assert len(torch.unique(c[..., head])) >= 2


def test_streaming_separate_qk_one_token_at_a_time() -> None:
    m = make(shared_qk=False, local_heads=1, local_window=5)
    x = torch.randn(2, 23, 24, dtype=F64)
    full, _ = m(x)
    state, outs = None, []
    for i in range(23):
        y, state = m(x[:, i : i + 1], state)
        outs.append(y)
    assert rel(torch.cat(outs, 1), full) <= 1e-10
    assert state.clusters.shape == (2, 23, 2) and state.clusters.dtype == torch.int64
    assert state.k_local.shape[1] == 4
    assert m.state_size(23) == sum(t[:1].numel() for t in state.tensors().values())


# ------------------------------------------------------------------------------- the leak
def future_change(m: RoutingAttention, t: int = 48, cut: int = 32, seed: int = 3) -> float:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, t, 24, dtype=F64, generator=g)
    x2 = x.clone()
    x2[:, cut:] = 3 * torch.randn(1, t - cut, 24, dtype=F64, generator=g)
    with torch.no_grad():
        y1, _ = m(x)
        y2, _ = m(x2)
        again, _ = m(x)
    assert torch.equal(y1, again)  # deterministic: any change below comes from the input
    return (y1[:, :cut] - y2[:, :cut]).abs().max().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_topw_leaks_the_future(seed: int) -> None:
    m = make(seed, mode="balanced_topw", top_w=8, num_clusters=4, allow_future_leak=True).eval()
    leak = future_change(m, seed=seed)
    assert leak > 1e-3, f"expected balanced top-w to leak the future, max change {leak:.2e}"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kw", [{}, {"shared_qk": False, "local_heads": 1, "local_window": 6}])
def test_causal_exact_never_leaks(seed: int, kw: dict) -> None:
    m = make(seed, num_clusters=4, **kw).eval()
    assert future_change(m, seed=seed) == 0.0


# --------------------------------------------------------------------------- balanced top-w
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_balanced_op_matches_paper_rule(causal: bool, shared: bool) -> None:
    g = torch.Generator().manual_seed(5)
    b, t, h, d, c, w = 2, 14, 2, 6, 3, 5
    q, k, v = (torch.randn(b, t, h, d, dtype=F64, generator=g) for _ in range(3))
    if shared:
        k = q
    mu = torch.randn(h, c, d, dtype=F64, generator=g)
    rq = torch.nn.functional.layer_norm(q, (d,))
    rk = torch.nn.functional.layer_norm(k, (d,))
    mq = balanced_topw_assignment(rq, mu, w)
    mk = balanced_topw_assignment(rk, mu, w)
    assert mq.shape == (b, h, c, w) and bool((mq.diff(dim=-1) > 0).all())  # sorted by position, distinct
    wt = torch.randn(b, t, h, d, dtype=F64, generator=g)
    y_ref, g_ref = grads(lambda q, k, v: balanced_loop(q, k, v, rq, rk, mu, w, causal), [q, k, v], wt)
    y, g_got = grads(lambda q, k, v: balanced_topw_attention(q, k, v, mq, mk, causal), [q, k, v], wt)
    assert rel(y, y_ref) <= 1e-10
    for a, r in zip(g_got, g_ref):
        assert rel(a, r) <= 1e-10
    # the rule really produces tokens in no cluster and tokens in several
    hits = torch.zeros(b, h, t).scatter_add_(2, mq.reshape(b, h, -1), torch.ones(b, h, c * w))
    assert (hits == 0).any() and (hits > 1).any()
    assert (y.permute(0, 2, 1, 3)[hits == 0] == 0).all()


def test_balanced_mixer_matches_paper_rule() -> None:
    m = make(mode="balanced_topw", top_w=4, allow_future_leak=True, local_heads=1, local_window=3)
    x = torch.randn(2, 10, 24, dtype=F64)
    h, hl, d = 3, 1, 8
    q = m.q_proj(x).view(2, 10, h, d)
    v = m.v_proj(x).view(2, 10, h, d)
    rq = torch.nn.functional.layer_norm(q[:, :, hl:], (d,))
    cos, sin = rotary_cos_sin(torch.arange(10), d, m.rope_theta, dtype=F64)
    qr = apply_rotary(q, cos, sin)
    route = balanced_loop(qr[:, :, hl:], qr[:, :, hl:], v[:, :, hl:], rq, rq, m.centroids, 4)
    from mnemotorch.ops.sliding_window import sliding_window_attention_reference

    local = sliding_window_attention_reference(qr[:, :, :hl], qr[:, :, :hl], v[:, :, :hl], 3)
    expected = m.o_proj(torch.cat([local, route], 2).reshape(2, 10, 24))
    y, state = m(x)
    assert rel(y, expected) <= 1e-10
    assert m.state_size(10) == 0 and sum(t.numel() for t in state.tensors().values()) == 0
    with pytest.raises(ValueError, match="cannot continue"):
        m(x, state)


# ------------------------------------------------------------------------------ k-means
def test_kmeans_ema_update_formula() -> None:
    g = torch.Generator().manual_seed(7)
    h, c, d, n = 2, 4, 5, 30
    sums = torch.randn(h, c, d, dtype=F64, generator=g)
    counts = torch.rand(h, c, dtype=F64, generator=g) + 0.5
    x = torch.randn(3, n, h, d, dtype=F64, generator=g)
    a = torch.randint(0, c - 1, (3, n, h), generator=g)  # centroid c-1 receives nothing
    lam = 0.9
    mu, new_sums, new_counts = kmeans_ema_update(sums, counts, x, a, decay=lam)
    for hi in range(h):
        for ci in range(c):
            sel = x[..., hi, :][a[..., hi] == ci]
            s = lam * sums[hi, ci] + (1 - lam) * sel.sum(0)
            nc = lam * counts[hi, ci] + (1 - lam) * sel.shape[0]
            assert torch.allclose(new_sums[hi, ci], s, rtol=1e-12, atol=1e-12)
            assert abs(new_counts[hi, ci].item() - nc.item()) <= 1e-12
            assert torch.allclose(mu[hi, ci], s / nc, rtol=1e-12, atol=1e-12)
    # an empty centroid keeps its value (sums and counts decay together)
    assert torch.allclose(mu[:, c - 1], sums[:, c - 1] / counts[:, c - 1, None], rtol=1e-12)
    mu_n, _, _ = kmeans_ema_update(sums, counts, x, a, decay=lam, normalize_to=3.0)
    assert torch.allclose(mu_n.norm(dim=-1), torch.full((h, c), 3.0, dtype=F64))
    assert torch.allclose(mu_n, mu * (3.0 / mu.norm(dim=-1, keepdim=True)))


def test_commitment_loss_value_and_gradient() -> None:
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 6, 3, 4, dtype=F64, generator=g, requires_grad=True)
    mu = torch.randn(3, 5, 4, dtype=F64, generator=g, requires_grad=True)
    a = torch.randint(0, 5, (2, 6, 3), generator=g)
    loss = commitment_loss(x, mu, a, beta=1e-4)
    expected = 0.0
    for bi in range(2):
        for i in range(6):
            for hi in range(3):
                expected += float(((x[bi, i, hi] - mu[hi, a[bi, i, hi]]) ** 2).sum().detach())
    assert abs(loss.item() - 1e-4 * expected / 36) <= 1e-15
    loss.backward()
    assert mu.grad is None  # stop-gradient on the centroids
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_aux_loss_and_centroid_update_api() -> None:
    m = make(shared_qk=True, num_clusters=4)
    before = m.centroids.clone()
    x = torch.randn(2, 16, 24, dtype=F64)
    m.eval()
    m(x)
    assert m.routing_aux_loss().item() == 0.0 and not m.update_centroids()
    m.train()
    y, _ = m(x)
    # forward and backward never touch the centroids
    (y.sum() + m.routing_aux_loss()).backward()
    assert torch.equal(m.centroids, before)
    m(x)
    aux = m.routing_aux_loss()
    rq = torch.nn.functional.layer_norm(m.q_proj(x).view(2, 16, 3, 8), (8,))
    a = nearest_centroid(rq, m.centroids)
    assert abs(aux.item() - commitment_loss(rq, m.centroids, a, 1e-4).item()) <= 1e-15
    assert aux.requires_grad
    sums, counts = m.ema_sums.clone(), m.ema_counts.clone()
    assert m.update_centroids()
    mu, s, n = kmeans_ema_update(sums, counts, torch.cat([rq, rq]), torch.cat([a, a]), decay=0.999, normalize_to=math.sqrt(8))
    assert torch.allclose(m.centroids, mu, rtol=1e-12, atol=1e-12)
    assert torch.allclose(m.ema_counts, n) and torch.allclose(m.ema_sums, s)
    assert not m.update_centroids()  # statistics were consumed


def test_training_loop_helpers_on_a_model() -> None:
    from mnemotorch.models import MnemoConfig, MnemoForCausalLM

    torch.manual_seed(0)
    plan = [{"type": "routing", "num_clusters": 2, "local_heads": 1, "local_window": 4}, "attention"]
    model = MnemoForCausalLM(MnemoConfig(vocab_size=37, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, layer_plan=plan, intermediate_size=32))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 37, (2, 12))
    layer = model.model.layers[0].mixer
    start = layer.centroids.clone()
    for _ in range(2):
        out = model(input_ids=ids, labels=ids)
        loss = out.loss + routing_aux_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert update_routing_centroids(model) == 1
    assert not torch.equal(layer.centroids, start)
    assert "centroids" in "".join(model.state_dict())
    model.eval()
    with torch.no_grad():
        full = model(input_ids=ids).logits
        gen = model.generate(ids[:, :5], max_new_tokens=3, do_sample=False)
        assert torch.equal(gen[:, :5], ids[:, :5])
        assert full.shape == (2, 12, 37)


# --------------------------------------------------------------------------------- bad args
@pytest.mark.parametrize(
    "kw,match",
    [
        ({"mode": "balanced_topw"}, "allow_future_leak"),
        ({"top_w": 0}, "top_w"),
        ({"num_clusters": 0}, "num_clusters"),
        ({"num_clusters": 2.0}, "num_clusters"),
        ({"mode": "kmeans"}, "mode"),
        ({"local_heads": 3}, "local_heads"),
        ({"local_window": 0}, "local_window"),
        ({"local_heads": 1, "causal": False}, "causal"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"commitment_beta": -1.0}, "commitment_beta"),
        ({"backend": "flash"}, "backend"),
        ({"allow_future_leak": 1}, "allow_future_leak"),
    ],
)
def test_bad_arguments(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_mixer("routing", dim=24, num_heads=3, **kw)


def test_allowed_non_streaming_modes() -> None:
    # balanced top-w without causality (an encoder) needs no flag; neither mode streams then
    for kw in ({"mode": "balanced_topw", "causal": False}, {"causal": False}):
        m = make(**kw)
        x = torch.randn(1, 9, 24, dtype=F64)
        y, state = m(x)
        assert torch.isfinite(y).all()
        with pytest.raises(ValueError, match="cannot continue"):
            m(x[:, :2], state)


def test_op_argument_checks() -> None:
    q = torch.randn(1, 4, 2, 8)
    c = torch.zeros(1, 4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="k_cluster"):
        causal_exact_attention(q, q, q, c, c.float())
    with pytest.raises(ValueError, match="backend"):
        causal_exact_attention(q, q, q, c, c, backend="fast")
    with pytest.raises(ValueError, match="triton"):
        causal_exact_attention(q, q, q, c, c, backend="triton")  # CPU tensors
    with pytest.raises(ValueError, match="decay"):
        kmeans_ema_update(torch.zeros(2, 3, 8), torch.ones(2, 3), q, c, decay=1.5)


# ------------------------------------------------------------------------ GPU (Flex) path
@pytest.mark.gpu
@pytest.mark.parametrize("t", [384, 300])
@pytest.mark.parametrize("shared,causal", [(True, True), (False, True), (True, False)])
def test_flex_path_matches_reference(t: int, shared: bool, causal: bool) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, d, c = 2, 3, 32, 4
    q, k, v = (torch.randn(b, t, h, d, device="cuda", generator=g) for _ in range(3))
    cq = torch.randint(0, c, (b, t, h), device="cuda", generator=g)
    cq[0, :130, 0] = 1  # a long run in one cluster: full tiles
    ck = cq if shared else torch.randint(0, c, (b, t, h), device="cuda", generator=g)
    w = torch.randn(b, t, h, d, device="cuda", generator=g)
    ref = lambda q, k, v: causal_exact_attention(q.double(), k.double(), v.double(), cq, ck, causal, backend="reference")  # noqa: E731
    got = lambda q, k, v: causal_exact_attention(q, k, v, cq, ck, causal, backend="triton")  # noqa: E731
    y_ref, g_ref = grads(ref, [q, k, v], w.double())
    y, g_got = grads(got, [q, k, v], w)
    assert rel(y.double(), y_ref) <= 1e-5
    for a, r in zip(g_got, g_ref):
        assert rel(a.double(), r) <= 1e-5
    yb = causal_exact_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cq, ck, causal, backend="triton")
    assert rel(yb.double(), y_ref) <= 2e-2


@pytest.mark.gpu
def test_mixer_on_cuda_streams_and_matches_reference() -> None:
    torch.manual_seed(0)
    m = get_mixer("routing", dim=128, num_heads=4, num_clusters=4, local_heads=1, local_window=64, backend="triton").cuda()
    ref = get_mixer("routing", dim=128, num_heads=4, num_clusters=4, local_heads=1, local_window=64, backend="reference").cuda()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 300, 128, device="cuda")
    y, _ = m(x)
    assert rel(y, ref(x)[0]) <= 1e-5
    state, outs = None, []
    for piece in torch.split(x, [200, 1, 99], dim=1):
        o, state = m(piece, state)
        outs.append(o)
    assert rel(torch.cat(outs, 1), y) <= 1e-5


@pytest.mark.parametrize("t", [300, 700])
@pytest.mark.parametrize("shared,causal", [(True, True), (False, True), (True, False), (False, False)])
def test_flex_block_lists_cover_the_rule(t: int, shared: bool, causal: bool) -> None:
    """CPU check of the GPU path's tile lists: every allowed pair (in sorted coordinates) lies in a
    visited tile, full tiles hold only allowed pairs, and tiles are actually skipped."""
    from mnemotorch.ops.routing.flex import BLOCK, sorted_block_lists

    g = torch.Generator().manual_seed(t)
    b, h, c = 2, 2, 3
    cq = torch.randint(0, c, (b, t, h), generator=g)
    cq[0, : t // 2, 0] = 1  # a long run of one cluster: full tiles
    ck = cq if shared else torch.randint(0, c, (b, t, h), generator=g)
    lists = sorted_block_lists(cq, ck, causal)
    qperm, kperm, sq, sk = lists["qperm"], lists["kperm"], lists["sqc"], lists["skc"]
    assert torch.equal(sq, cq.permute(0, 2, 1).gather(-1, qperm)) and bool((sq.diff(dim=-1) >= 0).all())
    allowed = sq[..., :, None] == sk[..., None, :]
    if causal:
        allowed &= kperm[..., None, :] <= qperm[..., :, None]
    n = -(-t // BLOCK)
    pad = n * BLOCK - t
    tiles = torch.nn.functional.pad(allowed, (0, pad, 0, pad)).reshape(b, h, n, BLOCK, n, BLOCK)
    any_allowed, all_allowed = tiles.any(-1).any(-2), tiles.all(-1).all(-2)

    def dense(num, idx):
        valid = torch.arange(n) < num[..., None]  # the first num entries of each row are real
        return torch.zeros(b, h, n, n, dtype=torch.bool).scatter(-1, idx.long(), valid)  # idx rows are permutations

    partial, full = dense(lists["kv_num"], lists["kv_idx"]), dense(lists["full_num"], lists["full_idx"])
    assert not (partial & full).any()
    assert bool((~any_allowed | partial | full).all())
    assert bool((~full | all_allowed).all())
    assert (partial | full).float().mean() < 1.0
    if t == 700 and shared:
        assert full.any()


def test_pending_kmeans_stats_follow_the_module() -> None:
    """Statistics recorded before ``.to()`` move with the module (on a GPU: CPU -> CUDA), so the
    next training forward can add to them."""
    m = get_mixer("routing", dim=24, num_heads=3, num_clusters=2).train()
    m(torch.randn(2, 12, 24))
    assert m._pending_sums is not None and m._pending_sums.dtype == torch.float32
    m.double()
    assert m._pending_sums.dtype == torch.float64
    m(torch.randn(2, 12, 24, dtype=torch.float64))
    assert m._pending_sums.dtype == torch.float64


# ------------------------------------------------------------- memory: nothing O(L^2) allocated
class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any aten op allocates (outputs that do not alias an input)."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes, self.where = 0, ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for o in tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs and o.untyped_storage().nbytes() > self.nbytes:
                self.nbytes, self.where = o.untyped_storage().nbytes(), f"{func} -> {list(o.shape)} {o.dtype}"
        return out


def test_routing_layer_allocates_no_quadratic_tensor(monkeypatch) -> None:
    """The GPU (FlexAttention) path's glue -- assignment, sort, tile lists, BlockMask, gathers, scatter
    back, commitment loss, k-means statistics -- forward and backward at L = 4096, 32 clusters: no
    tensor beyond a few [L, dim] activations. The unchunked centroid scores allocated the
    [B, L, H, C, D] product (32 x [L, dim] here; 32 GiB at L = 64K on the GPU benchmark)."""
    import mnemotorch.ops.routing as routing_ops
    from mnemotorch.ops.routing import flex

    # FlexAttention has no CPU backward: force the flex path with an O(L * H * D) stand-in kernel
    monkeypatch.setattr(routing_ops, "flex_supported", lambda q: True)
    monkeypatch.setattr(flex, "_flex", lambda: (lambda qs, ks, vs, block_mask=None, scale=None: vs + 0.0 * (qs + ks)))
    L, dim = 4096, 256
    torch.manual_seed(0)
    m = get_mixer("routing", dim=dim, num_heads=4, num_clusters=32, backend="triton").train()
    x = torch.randn(1, L, dim, requires_grad=True)
    big = _LargestAllocation()
    with big:
        y, _ = m(x)
        torch.autograd.grad(y.sum() + m.routing_aux_loss(), [x, *m.parameters()])
    assert big.nbytes <= 4 * L * dim * x.element_size(), f"largest allocation {big.nbytes / 2**20:.1f} MiB: {big.where}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_routing_scores_chunking_is_bit_identical(monkeypatch, dtype: torch.dtype) -> None:
    """Chunked centroid scores / nearest centroids equal the one-shot product-and-sum bit for bit
    (any chunk size), ties included (duplicate centroids: the lower index wins)."""
    from mnemotorch.ops.routing import centroid_scores, reference

    g = torch.Generator().manual_seed(0)
    b, t, h, c, d = 2, 301, 3, 5, 16
    x = torch.nn.functional.layer_norm(torch.randn(b, t, h, d, generator=g), (d,)).to(dtype)
    mu = torch.randn(h, c, d, generator=g)
    mu[:, 3] = mu[:, 1]
    work = torch.float64 if dtype == torch.float64 else torch.float32
    one_shot = (x.to(work)[..., None, :] * mu.to(work)).sum(-1)
    for limit in (1 << 40, 7 * c * h * d, 1):  # unchunked, 7 tokens per chunk, one token per chunk
        monkeypatch.setattr(reference, "SCORE_CHUNK_ELEMENTS_CPU", limit)
        assert torch.equal(centroid_scores(x, mu), one_shot)
        ids = nearest_centroid(x, mu)
        assert ids.shape == (b, t, h) and torch.equal(ids, one_shot.argmax(-1))
    assert nearest_centroid(x[:, :0], mu).shape == (b, 0, h)


def test_cuda_graph_option_is_validated_and_off_the_gpu_changes_nothing() -> None:
    """``cuda_graph`` must be a bool; on the CPU (no CUDA graphs) a ``cuda_graph=True`` layer runs eagerly and
    equals the default one, outputs and gradients (the graphed path itself: tests/gpu/test_routing_graphed_layer_gpu.py)."""
    with pytest.raises(ValueError, match="cuda_graph"):
        get_mixer("routing", dim=16, num_heads=2, num_clusters=2, cuda_graph=1)
    torch.manual_seed(0)
    a = get_mixer("routing", dim=16, num_heads=2, num_clusters=2, local_heads=1, local_window=4)
    b = get_mixer("routing", dim=16, num_heads=2, num_clusters=2, local_heads=1, local_window=4, cuda_graph=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 9, 16)
    outs = []
    for m in (a, b):
        xx = x.clone().requires_grad_()
        y, st = m(xx)
        (y.sum() + m.routing_aux_loss()).backward()
        outs.append((y, xx.grad, st.k, st.k_local))
    for u, v in zip(*outs):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert len(b._graphs) == 0


def test_cuda_graph_layer_copies_and_pickles_without_its_graphs() -> None:
    """``copy.deepcopy`` (an EMA copy) and ``torch.save`` of a whole layer work after graphs were captured: the
    copy starts with none (they belong to the original's buffers and memory pool)."""
    import copy
    import io

    m = get_mixer("routing", dim=16, num_heads=2, num_clusters=2, cuda_graph=True)
    m._graphs._entries["key"] = object()  # stands for a captured graph (CUDA graphs cannot be made on the CPU)
    m._graphs.captures = 1
    c = copy.deepcopy(m)
    assert len(c._graphs) == 0 and c._graphs.captures == 0 and len(m._graphs) == 1
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    r = torch.load(buf, weights_only=False)
    assert len(r._graphs) == 0 and r.cuda_graph
    x = torch.randn(1, 5, 16)
    torch.testing.assert_close(r(x)[0], m(x)[0])
