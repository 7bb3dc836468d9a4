"""``RoutingAttention(cuda_graph=True)``: training calls replayed from CUDA graphs equal eager calls (GPU).

Run on the GPU machine: ``MNEMO_GPU_TESTS=1 python -m pytest -q -p no:cacheprovider tests/gpu/test_routing_graphed_layer_gpu.py``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from mnemotorch.layers import get_mixer

pytestmark = pytest.mark.gpu


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _pair(shared_qk: bool, local_heads: int, dtype=torch.bfloat16):
    torch.manual_seed(0)
    eager = get_mixer("routing", dim=512, num_heads=8, num_clusters=8, shared_qk=shared_qk, local_heads=local_heads,
                      local_window=128, backend="block_sparse").cuda().to(dtype).train()
    graphed = copy.deepcopy(eager)
    graphed.cuda_graph = True
    return eager, graphed


def _step(m, x, gy):
    y, state = m(x)
    aux = m.routing_aux_loss()
    ((y.float() * gy).sum() + aux.float()).backward()
    return y.detach().clone(), aux.detach().clone(), state


@pytest.mark.parametrize("shared_qk,local_heads", [(True, 0), (False, 0), (True, 2)], ids=["shared", "separate", "local-heads"])
def test_graphed_training_calls_equal_eager_ones(shared_qk: bool, local_heads: int) -> None:
    """Three training steps (each: forward, aux loss, backward, centroid update) of a graphed and an eager
    copy of one layer, on fresh inputs each step: outputs, aux losses, every gradient, the returned state
    and the centroids after each update agree (the same kernels run; only the k-means atomics' order may
    differ in the last bits)."""
    eager, graphed = _pair(shared_qk, local_heads)
    g = torch.Generator(device="cuda").manual_seed(0)
    for step in range(3):
        x = torch.randn(2, 1024, 512, device="cuda", dtype=torch.bfloat16, generator=g)
        gy = torch.randn(2, 1024, 512, device="cuda", generator=g)
        xe, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, le, se = _step(eager, xe, gy)
        yg, lg, sg = _step(graphed, xg, gy)
        assert rel(yg, ye) <= 1e-6, step
        assert rel(lg, le) <= 1e-3, step
        assert rel(xg.grad, xe.grad) <= 1e-6, step
        for (n, pe), pg in zip(eager.named_parameters(), graphed.parameters()):
            assert rel(pg.grad, pe.grad) <= 1e-6, (step, n)
        for f in ("k", "v", "clusters", "k_local", "v_local"):
            a, b = getattr(sg, f), getattr(se, f)
            assert a.shape == b.shape and (a.numel() == 0 or rel(a, b) <= 1e-6), (step, f)
        assert sg.seen_tokens == se.seen_tokens == 1024
        assert rel(graphed._pending_counts, eager._pending_counts) == 0.0
        assert rel(graphed._pending_sums, eager._pending_sums) <= 1e-5
        assert eager.update_centroids() and graphed.update_centroids()
        assert rel(graphed.centroids, eager.centroids) <= 1e-5, step
        for m in (eager, graphed):
            m.zero_grad(set_to_none=True)
    assert graphed._graphs.captures == 1 and graphed._graphs.replays == 3


def test_second_forward_before_backward_runs_eagerly() -> None:
    """Two forwards before one backward (gradient accumulation over micro-batches): the second call runs
    eagerly with a warning, so the first call's graph outputs and saved activations stay intact; the
    gradients equal the eager layer's; a later call is graphed again."""
    eager, graphed = _pair(True, 0)
    g = torch.Generator(device="cuda").manual_seed(1)
    x1, x2 = (torch.randn(1, 1024, 512, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    gy = torch.randn(1, 1024, 512, device="cuda", generator=g)
    _step(graphed, x1.clone().requires_grad_(), gy)  # capture
    graphed.zero_grad(set_to_none=True)
    graphed.update_centroids()
    eager.update_centroids()  # same recorded statistics? not needed: reset both to identical centroids below
    graphed.centroids.copy_(eager.centroids)
    replays = graphed._graphs.replays
    outs = {}
    for name, m in (("eager", eager), ("graphed", graphed)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ya, _ = m(x1)
            yb, _ = m(x2)
            ((ya.float() * gy).sum() + (yb.float() * gy).sum()).backward()
        outs[name] = (ya.detach().clone(), yb.detach().clone(), [p.grad.clone() for p in m.parameters()], caught)
    assert graphed._graphs.replays == replays + 1  # the first call replayed, the second ran eagerly
    assert any("before the previous call's backward" in str(w.message) for w in outs["graphed"][3])
    assert rel(outs["graphed"][0], outs["eager"][0]) <= 1e-6 and rel(outs["graphed"][1], outs["eager"][1]) <= 1e-6
    for a, b in zip(outs["graphed"][2], outs["eager"][2]):
        assert rel(a, b) <= 1e-6
    for m in (eager, graphed):  # the two calls' commitment losses were not claimed: drop them (their graph is freed)
        m.routing_aux_loss()
    graphed.zero_grad(set_to_none=True)
    _step(graphed, x1.clone().requires_grad_(), gy)
    assert graphed._graphs.replays == replays + 2


def test_graphed_layer_under_autocast_and_no_grad() -> None:
    """A float32 layer under bf16 autocast is graphed (captured with autocast's cache off) and equals the eager
    layer under autocast with the cache off; against the eager layer with autocast's default cache, outputs are
    equal and the input's gradient within bf16 rounding (with the cache, the q and v projections share one bf16
    cast of x, so their two input gradients are summed in bf16 before the cast back; without it, in fp32).
    A ``no_grad`` call and an eval-mode call run eagerly."""
    eager, graphed = _pair(True, 0, dtype=torch.float32)
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(1, 1024, 512, device="cuda", generator=g)
    gy = torch.randn(1, 1024, 512, device="cuda", generator=g)
    res = {}
    for name, m, cache in (("eager", eager, False), ("eager_cached", eager, True), ("graphed", graphed, True)):
        xx = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache):
            for _ in range(2):
                xx.grad = None
                m.zero_grad(set_to_none=True)
                y, _ = m(xx)
                ((y.float() * gy).sum() + m.routing_aux_loss().float()).backward()
        res[name] = (y.detach().clone(), xx.grad.clone(), [p.grad.clone() for p in m.parameters()])
    assert graphed._graphs.captures == 1
    assert rel(res["graphed"][0], res["eager"][0]) <= 1e-6 and rel(res["graphed"][1], res["eager"][1]) <= 1e-6
    for a, b in zip(res["graphed"][2], res["eager"][2]):
        assert rel(a, b) <= 1e-6
    assert rel(res["graphed"][0], res["eager_cached"][0]) <= 1e-6 and rel(res["graphed"][1], res["eager_cached"][1]) <= 1e-2
    n = graphed._graphs.replays
    with torch.no_grad():
        graphed(x)
    graphed.eval()
    graphed(x)
    assert graphed._graphs.replays == n
