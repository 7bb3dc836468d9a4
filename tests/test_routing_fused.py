"""The routing layer's fused glue (Triton interpreter on the CPU).

* ``route_assign``: layer norm + nearest centroid + commitment distances + k-means statistics in one
  kernel, on strided (head-sliced) raw vectors, against ``scale_free_layer_norm`` -> ``nearest_centroid``
  -> ``commitment_loss`` / ``kmeans_batch_stats`` (ids, loss value, loss gradient through the one-kernel
  backward, sums and counts).
* ``rotary_fused``: RoPE in one launch against ``apply_rotary`` (values, gradient against float64).
* ``rotary_commit``: its one backward kernel (rotation and commitment loss) against float64, for incoming
  gradients of any strides (the masked-SDPA path can hand it one whose last stride is not 1).
* The mixer with the fused glue (``FUSED_GLUE="on"``) against the same weights without it: outputs,
  gradients of the input and every parameter, the commitment loss and its gradient, and the centroids
  after ``update_centroids`` (whose k-means statistics the fused path adds inside its kernel).
"""

from __future__ import annotations

import os

import pytest
import torch

import mnemotorch.layers.routing as routing_layer
from mnemotorch.layers import get_mixer
from mnemotorch.ops.rotary import apply_rotary, rotary_cos_sin
from mnemotorch.ops.routing import (
    commitment_loss,
    kmeans_batch_stats,
    nearest_centroid,
    rotary_commit,
    rotary_fused,
    route_assign,
    route_assign_distances,
    scale_free_layer_norm,
)

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (tests/conftest.py)")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [16, 24])
def test_route_assign_matches_the_unfused_ops(dtype: torch.dtype, d: int) -> None:
    g = torch.Generator().manual_seed(d)
    b, t, h_all, hl, c = 2, 70, 4, 1, 5
    proj = (torch.randn(b, t, h_all, d, generator=g) * 3 + 1).to(dtype)
    x = proj[:, :, hl:]  # the routing heads' slice: not contiguous
    mu = torch.randn(h_all - hl, c, d, generator=g)
    mu = (mu * (d**0.5 / mu.norm(dim=-1, keepdim=True))).to(dtype)
    r = scale_free_layer_norm(x)
    ids_ref = nearest_centroid(r, mu, backend="reference")
    xg = x.detach().clone().requires_grad_()
    ids, loss = route_assign(xg, mu, beta=1e-2)
    assert ids.shape == ids_ref.shape and ids.dtype == torch.int64
    assert (ids != ids_ref).float().mean().item() <= 0.01  # only where the two layer norms round differently at a tie
    ids_alone, none = route_assign(x, mu)
    assert none is None and torch.equal(ids_alone, ids)
    xr = x.detach().clone().requires_grad_()
    want = commitment_loss(scale_free_layer_norm(xr.float()), mu.float(), ids, 1e-2)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert abs(loss.item() - want.item()) <= tol * abs(want.item())
    (gx,) = torch.autograd.grad(loss, xg, retain_graph=True)
    (gr,) = torch.autograd.grad(commitment_loss(scale_free_layer_norm(xr), mu, ids, 1e-2), xr)
    assert rel(gx, gr) <= (1e-5 if dtype == torch.float32 else 1e-2)
    # and against float64 (the kernel's backward runs in fp32 whatever the input dtype)
    x64 = x.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(commitment_loss(scale_free_layer_norm(x64), mu.double(), ids, 1e-2), x64)
    assert rel(gx, g64) <= (1e-5 if dtype == torch.float32 else 1e-2)
    # the scalar that scales the gradient is read on the device: a non-unit one
    (gx3,) = torch.autograd.grad(loss, xg, torch.tensor(3.0, dtype=loss.dtype))
    assert rel(gx3, 3 * gx.double()) <= (1e-6 if dtype == torch.float32 else 1e-2)

    # k-means statistics added in place into buffers that already hold some
    sums0 = torch.randn(h_all - hl, c, d, generator=g)
    counts0 = torch.randint(0, 5, (h_all - hl, c), generator=g).float()  # whole: the difference below is exact
    sums, counts = sums0.clone(), counts0.clone()
    ids_s, _ = route_assign(x, mu, stats=(sums, counts))
    assert torch.equal(ids_s, ids)
    want_sums, want_counts = kmeans_batch_stats(scale_free_layer_norm(x), ids, c)
    assert torch.equal(counts - counts0, want_counts)
    # bf16: the interpreter rounds the kernel's fp32 -> bf16 conversions toward zero (the GPU: to nearest), so
    # the normalised vectors may differ from F.layer_norm's by an ulp (2^-8 relative)
    assert rel(sums - sums0, want_sums) <= (1e-6 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("c", [5, 40], ids=["one-chunk", "two-chunks"])
def test_route_assign_launches_agree(monkeypatch, c: int) -> None:
    """The default launch (8 token tiles per program, statistics summed in registers when C fits one chunk,
    centroid scores on the tensor cores) against the simple one (a tile per program, fp32 multiply-and-sum
    scores): the same ids and counts, the same sums to fp32 rounding, over several programs with a partial
    last tile, and against the reference."""
    g = torch.Generator().manual_seed(c)
    b, t, h, d = 2, 300, 2, 16
    x = torch.randn(b, t, h, d, generator=g) * 3 + 1
    mu = torch.randn(h, c, d, generator=g)
    mu = mu * (d**0.5 / mu.norm(dim=-1, keepdim=True))
    out = {}
    for mode in ("simple", ""):
        monkeypatch.setenv("MNEMO_ROUTE_ASSIGN", mode)
        sums, counts = torch.zeros(h, c, d), torch.zeros(h, c)
        ids, _ = route_assign(x, mu, stats=(sums, counts))
        out[mode] = (ids, sums, counts)
    assert torch.equal(out[""][0], out["simple"][0])
    assert torch.equal(out[""][0], nearest_centroid(scale_free_layer_norm(x), mu, backend="reference"))
    assert torch.equal(out[""][2], out["simple"][2]) and out[""][2].sum().item() == b * t * h
    assert rel(out[""][1], out["simple"][1]) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [16, 24])
def test_rotary_fused_matches_apply_rotary(dtype: torch.dtype, d: int) -> None:
    g = torch.Generator().manual_seed(d)
    b, t, h_all, start = 2, 37, 3, 11
    proj = torch.randn(b, t, h_all + 1, d, generator=g).to(dtype)
    x = proj[:, :, 1:]  # a head slice: not contiguous
    cos, sin = rotary_cos_sin(torch.arange(start, start + t), d, 10000.0, dtype=dtype)
    y = rotary_fused(x, cos, sin)
    want = apply_rotary(x, cos, sin)
    want64 = apply_rotary(x.double(), cos.double(), sin.double())
    # bf16: the kernel rounds once (fp32 -> bf16); the interpreter rounds that conversion toward zero (up to an
    # ulp off), the GPU to nearest (tests/gpu/test_routing_gpu.py checks it there at 8K x 16 heads)
    assert rel(y, want) <= (1e-6 if dtype == torch.float32 else 8e-3)
    assert rel(y, want64) <= (1e-6 if dtype == torch.float32 else 8e-3)
    xg = x.detach().clone().requires_grad_()
    gy = torch.randn(b, t, h_all, d, generator=g).to(dtype)
    (gx,) = torch.autograd.grad(rotary_fused(xg, cos, sin), xg, gy)
    x64 = x.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(apply_rotary(x64, cos.double(), sin.double()), x64, gy.double())
    assert gx.dtype == dtype and rel(gx, g64) <= (1e-6 if dtype == torch.float32 else 5e-3)


@pytest.mark.parametrize("with_loss", [False, True], ids=["rotation_only", "rotation_and_loss"])
@pytest.mark.parametrize("layout", ["contiguous", "t_fastest", "head_slice"])
def test_rotary_commit_backward_takes_any_gradient_layout(layout: str, with_loss: bool) -> None:
    """``rotary_commit``'s one backward kernel for the rotation and the commitment loss, whatever the strides of the
    incoming gradient. The masked-SDPA backend hands the keys' gradient over as the transpose of its ``[B, H, D, T]``
    product under SDPA's math kernel: last stride ``T``, not 1. The kernel assumed a unit last stride and read the
    wrong elements (the H100's separate-q/k input-gradient gap, docs/results/block_sparse.md)."""
    g = torch.Generator().manual_seed(3)
    b, t, h, hl, d, c = 2, 40, 3, 1, 16, 4
    q = torch.randn(b, t, h, d, generator=g)
    mu = torch.randn(h - hl, c, d, generator=g)
    mu = mu * (d**0.5 / mu.norm(dim=-1, keepdim=True))
    cos, sin = rotary_cos_sin(torch.arange(t), d, 10000.0)
    gy = torch.randn(b, t, h, d, generator=g)
    if layout == "t_fastest":
        gy_in = gy.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # strides (h d t, 1, d t, t)
        assert gy_in.stride(-1) == t
    elif layout == "head_slice":
        gy_in = torch.cat([gy, gy[:, :, :1]], dim=2)[:, :, :h]  # unit last stride, not contiguous
        assert not gy_in.is_contiguous() and gy_in.stride(-1) == 1
    else:
        gy_in = gy
    assert torch.equal(gy_in, gy)

    def grad(gy_arg):
        qg = q.clone().requires_grad_()
        ids, sq, coef = route_assign_distances(qg[:, :, hl:], mu, 0.5)
        y, loss = rotary_commit(qg, cos, sin, mu, ids, sq, coef, hl=hl)
        outs, seeds = ([y, loss], [gy_arg, torch.ones(())]) if with_loss else ([y], [gy_arg])
        return torch.autograd.grad(outs, qg, seeds)[0], ids

    got, ids = grad(gy_in)
    q64 = q.double().requires_grad_()
    y64 = apply_rotary(q64, cos.double(), sin.double())
    total = (y64 * gy.double()).sum()
    if with_loss:
        total = total + commitment_loss(scale_free_layer_norm(q64[:, :, hl:]), mu.double(), ids, 0.5)
    (want,) = torch.autograd.grad(total, q64)
    assert rel(got, want) <= 1e-5
    assert torch.equal(got, grad(gy)[0])  # the same bits as with the contiguous gradient


@pytest.mark.parametrize("shared_qk", [True, False])
def test_fused_mixer_equals_unfused(monkeypatch, shared_qk: bool) -> None:
    torch.manual_seed(0)
    kw = dict(dim=64, num_heads=4, num_clusters=3, local_heads=1, local_window=16, shared_qk=shared_qk, backend="block_sparse")
    a = get_mixer("routing", **kw).train()
    z = get_mixer("routing", **kw).train()
    z.load_state_dict(a.state_dict())
    x = torch.randn(2, 90, 64)
    # training calls take route_assign_distances + rotary_commit (the loss rides on the rotation), the
    # others route_assign + rotary_fused: count the pairs together
    calls = {"route_assign": 0, "rotary_fused": 0, "route_assign_distances": 0, "rotary_commit": 0}

    def spy(name):
        fn = getattr(routing_layer, name)

        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(routing_layer, name, wrapped)

    for name in calls:
        spy(name)

    def step(m, mode):
        monkeypatch.setattr(routing_layer, "FUSED_GLUE", mode)
        before = dict(calls)
        xs = x.clone().requires_grad_()
        y, _ = m(xs)
        fused_calls = 1 if shared_qk else 2
        n_assign = calls["route_assign"] + calls["route_assign_distances"] - before["route_assign"] - before["route_assign_distances"]
        n_rotate = calls["rotary_fused"] + calls["rotary_commit"] - before["rotary_fused"] - before["rotary_commit"]
        assert n_assign == (fused_calls if mode == "on" else 0)  # the path taken
        assert n_rotate == (fused_calls if mode == "on" else 0)
        assert m._pending_sums is not None and m._pending_raw is None  # the statistics are there after the forward
        aux = m.routing_aux_loss()
        params = [xs, *m.parameters()]
        gy = torch.autograd.grad((y * y).sum(), params, retain_graph=True)
        ga = torch.autograd.grad(aux, [xs], allow_unused=True)[0]
        # a second training call before the update: its statistics add to the first call's
        m(x)
        m.routing_aux_loss()
        assert m.update_centroids()
        return y, aux, gy, ga

    y0, aux0, g0, ga0 = step(a, "off")
    y1, aux1, g1, ga1 = step(z, "on")
    assert z._pending_raw is None and a._pending_raw is None
    assert rel(y1, y0) <= 1e-5
    assert abs(aux1.item() - aux0.item()) <= 1e-5 * abs(aux0.item())
    for p, q in zip(g1, g0):
        assert rel(p, q) <= 1e-5
    assert ga0 is not None and rel(ga1, ga0) <= 1e-5
    for name in ("centroids", "ema_sums", "ema_counts"):
        assert torch.allclose(getattr(z, name), getattr(a, name), rtol=1e-6, atol=1e-6), name


def test_fused_mixer_streams(monkeypatch) -> None:
    """Eval-mode continuation through the fused glue gives the one-call outputs (streaming invariant)."""
    monkeypatch.setattr(routing_layer, "FUSED_GLUE", "on")
    torch.manual_seed(1)
    m = get_mixer("routing", dim=64, num_heads=4, num_clusters=4, backend="block_sparse").eval()
    x = torch.randn(1, 80, 64)
    with torch.no_grad():
        y, _ = m(x)
        state, outs = None, []
        for piece in torch.split(x, [50, 1, 29], dim=1):
            o, state = m(piece, state)
            outs.append(o)
    assert rel(torch.cat(outs, 1), y) <= 1e-5
