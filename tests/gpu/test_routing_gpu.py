"""Causal-exact routing attention on the block-sparse kernel (``ops/routing/block_sparse.py``), on a GPU.

Run on the GPU machine:
``MNEMO_GPU_TESTS=1 python -m pytest -q -p no:cacheprovider tests/gpu/test_routing_gpu.py``
(``MNEMO_AUTOTUNE=0`` skips autotuning for a faster first run). Timings:
``python -m mnemotorch.cli bench routed -- --cases routing``.
"""

from __future__ import annotations

import pytest
import torch

from mnemotorch.layers import get_mixer
from mnemotorch.ops.routing import causal_exact_attention, routed_layout

pytestmark = pytest.mark.gpu

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (5e-3, 1e-2)}  # (outputs, gradients): ARCHITECTURE.md


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def ids(b, tq, tk, h, c, shared, seed=0):
    """Random ids with a long run (full tiles), a one-token cluster and (separate) ids no key has."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    ck = torch.randint(0, c, (b, tk, h), device="cuda", generator=g)
    ck[0, : min(tk, 700), 0] = c
    ck[-1, tk // 3, h - 1] = c + 1
    if shared:
        return ck, ck
    return torch.randint(0, c + 3, (b, tq, h), device="cuda", generator=g), ck


CASES = [  # (B, Tq, Tk, H, D, C, shared clusters and Q/K, causal)
    (1, 2048, 2048, 4, 64, 8, True, True),  # the causal-LM case
    (2, 1000, 1000, 3, 64, 5, True, True),  # lengths off the tile grid
    (1, 1024, 1024, 2, 128, 4, False, True),  # separate Q/K
    (1, 512, 3000, 2, 64, 6, False, True),  # queries after a cache
    (1, 1024, 1024, 2, 64, 4, True, False),  # an encoder
    (1, 777, 777, 2, 48, 3, True, True),  # head dim not a power of two
]


# First H100 run (2026-11-26, Triton 3.6): three cases failed. (3) fp32 with separate Q/K at D = 128:
# no number was captured (the run was cut by its time limit while this case was compiling / autotuning
# its fp32 D=128 kernels; every dot is IEEE fp32 for fp32 inputs; 5e-7 in the CPU emulation), so it was
# run again to record its error. Until all pass, "auto" does not choose this path (ops/routing
# AUTO_USES_BLOCK_SPARSE). (1) and (2): bf16 dq with shared Q/K at 1.7e-2 against the masked-SDPA bf16 peer's 2.4e-3 on
# the same inputs. Cause (found on the CPU with the interpreter's GPU-rounding emulation, 2026-11-26):
# the backward's Delta = rowsum(dO * O) was formed from the bf16-rounded output, as in
# FlashAttention-2; with q == k the diagonal logit dominates and dP_ii - Delta_i is small, so that
# rounding (~|dO| |O| 2^-9) was amplified. The forward now keeps the output's rounding residual for
# the backward (ops/block_sparse/triton.py); in the emulation dq went from 1.8e-2 to 2.9e-3 against
# the peer's 2.2e-3 (tests/ops/test_block_sparse_numerics.py); on the H100 (later session, same day) the
# shared-Q/K bf16 cases and the fp32 D = 128 case passed, so "auto" now takes the kernel path (the
# xfail list they were on is gone). The criterion for (1) and (2) stays a bf16 peer baseline (the same
# function through the dense masked-SDPA path in bf16, against the same float64 reference): ours must be
# within PEER_FACTOR of the peer's error.
PEER_FACTOR = 1.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("b,tq,tk,h,d,c,shared,causal", CASES)
def test_block_sparse_matches_reference(b, tq, tk, h, d, c, shared, causal, dtype) -> None:
    """Outputs and the gradients of q, k, v against the float64 reference on the same (rounded) inputs."""
    cq, ck = ids(b, tq, tk, h, c, shared, seed=tq + d)
    g = torch.Generator(device="cuda").manual_seed(1)
    shapes = [(b, tq, h, d)] + ([] if shared else [(b, tk, h, d)]) + [(b, tk, h, d)]
    leaves = [torch.randn(s, device="cuda", dtype=torch.float64, generator=g).to(dtype) for s in shapes]
    w = torch.randn(b, tq, h, d, device="cuda", dtype=torch.float64, generator=g).to(dtype)

    def run(backend, work):
        xs = [t.to(work).requires_grad_() for t in leaves]
        q, v = xs[0], xs[-1]
        k = q if shared else xs[1]
        y = causal_exact_attention(q, k, v, cq, ck, causal, backend=backend)
        return y, torch.autograd.grad((y * w.to(work)).sum(), xs)

    y_ref, g_ref = run("reference", torch.float64)
    y, g_got = run("block_sparse", dtype)
    tol_o, tol_g = TOL[dtype]
    err = rel(y, y_ref)
    assert torch.isfinite(y).all() and err <= tol_o, f"output error {err:.3e} > {tol_o}"
    peer = None
    if dtype == torch.bfloat16 and shared:
        # q == k in value: the diagonal logit |q|^2 / sqrt(D) makes the softmax peaked, and the backward's
        # cancellations amplify bf16 rounding; the criterion is a bf16 peer's error on the same inputs
        _, peer = run("torch", dtype)
    for i, (name, a, r) in enumerate(zip("qv" if shared else "qkv", g_got, g_ref)):
        err = rel(a, r)
        bound = tol_g if peer is None else PEER_FACTOR * rel(peer[i], r)
        assert torch.isfinite(a).all() and err <= bound, f"d{name}: error {err:.3e} > bound {bound:.3e}" + (
            "" if peer is None else f" ({PEER_FACTOR} x the masked-SDPA bf16 peer's {rel(peer[i], r):.3e})")


@pytest.mark.parametrize("shared,causal", [(True, True), (False, True), (True, False)])
def test_layout_on_cuda_equals_cpu(shared: bool, causal: bool) -> None:
    """The device-side list construction (sort, searchsorted, cummax, repeat_interleave) gives the CPU's lists."""
    cq, ck = ids(2, 3000, 3000, 4, 16, shared)
    lay = routed_layout(cq, ck, causal)
    cq_cpu = cq.cpu()
    cpu = routed_layout(cq_cpu, cq_cpu if shared else ck.cpu(), causal)
    for name in ("full_idx", "full_cnt", "part_idx", "part_tile", "part_cnt", "tiles", "t_full_idx", "t_full_cnt",
                 "t_part_idx", "t_part_tile", "t_part_cnt"):
        assert torch.equal(getattr(lay.pattern, name).cpu(), getattr(cpu.pattern, name)), name
    assert torch.equal(lay.q_rows.cpu(), cpu.q_rows) and torch.equal(lay.k_rows.cpu(), cpu.k_rows)


def test_auto_dispatch_on_cuda(monkeypatch) -> None:
    """The mixer's default backend takes the kernel path for whole sequences and chunks of >= 128 tokens,
    masked SDPA for decoding steps; every split gives the outputs of one call."""
    import mnemotorch.ops.routing as routing_ops

    monkeypatch.setattr(routing_ops, "AUTO_USES_BLOCK_SPARSE", True)  # the default; set so the test holds if it is turned off
    calls = []
    real = routing_ops.causal_exact_attention_block_sparse
    monkeypatch.setattr(routing_ops, "causal_exact_attention_block_sparse", lambda *a, **k: calls.append(a[0].shape[1]) or real(*a, **k))
    torch.manual_seed(0)
    m = get_mixer("routing", dim=256, num_heads=4, num_clusters=6, local_heads=1, local_window=64).cuda()
    ref = get_mixer("routing", dim=256, num_heads=4, num_clusters=6, local_heads=1, local_window=64, backend="reference").cuda()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 1500, 256, device="cuda")
    y, _ = m(x)
    assert calls == [1500] and rel(y, ref(x)[0]) <= 1e-5
    state, outs = None, []
    for piece in torch.split(x, [700, 1, 799], dim=1):
        o, state = m(piece, state)
        outs.append(o)
    assert calls == [1500, 700, 799]  # the one-token step went to masked SDPA
    assert rel(torch.cat(outs, 1), y) <= 1e-5


# The separate-Q/K case failed on the H100 (2026-11-26): the "torch" backend's gx was 0.126 from the kernel's,
# outputs agreeing, kernel and Flex agreeing. Cause (found on the CPU, docs/results/block_sparse.md): the fused
# glue's backward kernel (ops/routing/triton.py, RotaryCommit) read the incoming gradient as if its last stride were
# 1; the masked-SDPA path can hand over the keys' gradient with last stride T (on the CPU under SDPA's math kernel:
# gx 0.125 apart at a CPU size, tests/ops/test_routing_separate_qk_bf16.py), and with separate Q/K nothing makes it
# contiguous first. Fixed there; "torch/math" below runs the masked-SDPA path on SDPA's math kernel, so the check
# covers that gradient layout whichever kernel SDPA picks by default.
@pytest.mark.parametrize("shared_qk", [True, False])
def test_mixer_bf16_against_flex_and_masked_sdpa(shared_qk: bool) -> None:
    """The benchmark's layer (bf16) at 8K tokens: the three GPU backends (the masked-SDPA one also on SDPA's math
    kernel) agree, and fwd + bwd are finite."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    m = get_mixer("routing", dim=1024, num_heads=16, num_clusters=16, shared_qk=shared_qk).cuda().to(torch.bfloat16)
    x = torch.randn(1, 8192, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    outs = {}
    for label in ("block_sparse", "flex", "torch", "torch/math"):
        backend, _, kernel = label.partition("/")
        m.backend = backend
        with sdpa_kernel(SDPBackend.MATH) if kernel else nullcontext():
            y, _ = m(x)
            (gx,) = torch.autograd.grad(y.float().pow(2).mean(), [x])
        m.routing_aux_loss()
        assert torch.isfinite(y).all() and torch.isfinite(gx).all(), label
        outs[label] = (y.detach(), gx)
    for other in ("flex", "torch", "torch/math"):
        assert rel(outs["block_sparse"][0], outs[other][0]) <= 1e-2, other
        err = rel(outs["block_sparse"][1], outs[other][1])
        assert err <= 2e-2, f"{other}: gx {err:.3e} from the block-sparse path's"


# Like for like, at the attention itself: the end-to-end check above compares backends through the whole layer
# (the H100 failure was downstream of the attention, in the glue's backward). Here every backend, and the
# masked-SDPA path under each SDPA kernel, runs on the layer's own captured inputs against float64 with the same
# cluster ids, so a discrepancy is attributed to one backend (and one SDPA kernel) rather than to a pair.
SDPA_KERNELS = {"default": None, "math": "MATH", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}


@pytest.mark.parametrize("shared_qk", [True, False], ids=["shared_qk", "separate_qk"])
def test_mixer_backends_against_float64_on_the_same_clusters(monkeypatch, shared_qk: bool) -> None:
    """Like for like: one bf16 forward of the benchmark's layer (8K tokens) hands its attention q, k, v and the
    cluster ids (captured); then every backend runs on those same tensors and is compared with a float64
    reference (outputs and dq, dk, dv for one fixed output weighting). Separate Q/K: ARCHITECTURE.md's bf16
    tolerances; shared Q/K: as ``test_block_sparse_matches_reference``, within PEER_FACTOR of a bf16 peer (the
    masked-SDPA path on SDPA's math kernel) where that is larger. Every forced SDPA kernel that accepts the
    inputs is checked; the message lists all errors."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    import mnemotorch.layers.routing as routing_layer

    cap = {}
    real = routing_layer.causal_exact_attention

    def spy(q, k, v, cq, ck, **kw):
        cap.update(q=q.detach(), k=k.detach(), v=v.detach(), cq=cq, ck=ck, shared=k is q)
        return real(q, k, v, cq, ck, **kw)

    monkeypatch.setattr(routing_layer, "causal_exact_attention", spy)
    torch.manual_seed(0)
    m = get_mixer("routing", dim=1024, num_heads=16, num_clusters=16, shared_qk=shared_qk).cuda().to(torch.bfloat16)
    x = torch.randn(1, 8192, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    m(x)
    m.routing_aux_loss()
    q, k, v, cq, ck, shared = (cap[n] for n in ("q", "k", "v", "cq", "ck", "shared"))
    assert shared == shared_qk
    g = torch.Generator(device="cuda").manual_seed(1)
    w = torch.randn(q.shape, device="cuda", dtype=torch.float64, generator=g)

    def leaves(dtype):
        return [t.to(dtype).requires_grad_() for t in ((q, v) if shared else (q, k, v))]

    def attend(xs, backend, hs=slice(None)):
        qq, vv = xs[0][:, :, hs], xs[-1][:, :, hs]
        kk = qq if shared else xs[1][:, :, hs]
        cqh = cq[:, :, hs]
        return causal_exact_attention(qq, kk, vv, cqh, cqh if shared else ck[:, :, hs], backend=backend, num_clusters=16)

    # float64 reference, one head at a time (dense [T, T] logits; heads are independent, so the gradients add)
    xs64 = leaves(torch.float64)
    ref_y, ref_g = [], [torch.zeros_like(t) for t in xs64]
    for h in range(q.shape[2]):
        y_h = attend(xs64, "reference", slice(h, h + 1))
        for acc, gr in zip(ref_g, torch.autograd.grad((y_h * w[:, :, h : h + 1]).sum(), xs64)):
            acc += gr
        ref_y.append(y_h.detach())
    ref_y = torch.cat(ref_y, dim=2)

    names = ["y", "dq", "dv"] if shared else ["y", "dq", "dk", "dv"]
    errors: dict[str, list[float]] = {}
    runs = [("block_sparse", "block_sparse", None), ("flex", "flex", None)]
    runs += [(f"torch/{name}", "torch", kernel) for name, kernel in SDPA_KERNELS.items()]
    for label, backend, kernel in runs:
        xs = leaves(torch.bfloat16)
        try:
            with nullcontext() if kernel is None else sdpa_kernel(getattr(SDPBackend, kernel)):
                y = attend(xs, backend)
                grads = torch.autograd.grad((y.double() * w).sum(), xs)
        except RuntimeError as e:  # a forced SDPA kernel that does not take these inputs
            if kernel is None or not any(s in str(e) for s in ("No available kernel", "No viable backend")):
                raise
            errors[label] = [float("nan")] * len(names)
            print(f"{label}: not run ({str(e).splitlines()[0][:120]})")
            continue
        assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in grads), label
        errors[label] = [rel(a, r) for a, r in zip((y, *grads), (ref_y, *ref_g))]
    table = "\n".join(f"{label:16s} " + " ".join(f"{n} {e:.3e}" for n, e in zip(names, errs)) for label, errs in errors.items())
    print(table)
    bounds = [TOL[torch.bfloat16][0]] + [TOL[torch.bfloat16][1]] * (len(names) - 1)
    if shared:
        peer = errors["torch/math"]
        assert peer[0] == peer[0], "the math-kernel peer did not run"
        bounds = [max(b, PEER_FACTOR * p) for b, p in zip(bounds, peer)]
    bad = [f"{label} {n} {e:.3e} > {b:.3e}" for label, errs in errors.items() for n, e, b in zip(names, errs, bounds) if e > b]
    assert not bad, "against float64 on the same ids:\n" + "\n".join(bad) + "\nall:\n" + table


def test_long_sequence_against_masked_sdpa() -> None:
    """L = 65536, 16 heads, 128 clusters (the benchmark's 64K shape, attention only, bf16): finite,
    equal to the masked-SDPA path, and the layout's lists stay O(L/B * nnz)."""
    b, t, h, d, c = 1, 65536, 16, 64, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, v = (torch.randn(b, t, h, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    cl = torch.randint(0, c, (b, t, h), device="cuda", generator=g)
    y = causal_exact_attention(q, q, v, cl, cl, backend="block_sparse")
    y_ref = causal_exact_attention(q.float(), q.float(), v.float(), cl, cl, backend="torch")
    assert torch.isfinite(y).all() and rel(y, y_ref) <= 5e-3
    p = routed_layout(cl, cl, True).pattern
    assert p.full_idx.numel() + p.t_full_idx.numel() + p.tiles.numel() < b * t * h  # O(L), not O(L^2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nearest_centroid_kernel_on_cuda(dtype) -> None:
    """The assignment kernel at the benchmark's 64K shape: equal to the reference except within fp32
    rounding of a tie, and independent of how the tokens are chunked."""
    from mnemotorch.ops.routing import centroid_scores, nearest_centroid

    b, t, h, c, d = 1, 65536, 16, 128, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.nn.functional.layer_norm(torch.randn(b, t, h, d, device="cuda", generator=g), (d,)).to(dtype)
    mu = torch.randn(h, c, d, device="cuda", generator=g)
    mu = mu * (d**0.5 / mu.norm(dim=-1, keepdim=True))
    ids = nearest_centroid(x, mu)  # auto: the kernel on CUDA
    ref = nearest_centroid(x, mu, backend="reference")
    diff = ids != ref
    if diff.any():
        s = centroid_scores(x[:, :4096], mu).double()  # a slice, to bound memory: ties are checked there
        picked = s.gather(-1, ids[:, :4096, :, None]).squeeze(-1)
        best = s.gather(-1, ref[:, :4096, :, None]).squeeze(-1)
        assert ((best - picked).abs() <= 1e-4 * best.abs().clamp_min(1.0)).all()
    assert diff.float().mean().item() < 1e-4
    pieces = torch.cat([nearest_centroid(x[:, s : s + n], mu) for s, n in ((0, 1000), (1000, 1), (1001, t - 1001))], 1)
    assert torch.equal(pieces, ids)


def live_accumulators(leaves: dict) -> list:
    """Hooks on the ``AccumulateGrad`` node each leaf has *now*; the returned list collects the names of
    those that run in a later backward. Nodes that nothing else holds die here with their hook, so a name
    appears only if a node from before survived (an autograd graph still referenced somewhere)."""
    fired: list = []
    for name, t in leaves.items():
        node = t.view_as(t).grad_fn.next_functions[0][0]
        node.register_prehook(lambda grads, name=name: fired.append(name))
    return fired


# First H100 run of the capture test (2026-11-26, torch 2.11): both cases failed inside the captured
# backward with cudaErrorStreamCaptureImplicit ("operation would make the legacy stream depend on a
# capturing blocking stream"). Cause: the test itself. Its sync-checked eager call ran on the default
# (legacy) stream and its output ``y_eager`` was kept with its autograd graph, which keeps the
# AccumulateGrad nodes of x and of every parameter alive; a node runs its backward on the stream that
# was current when it was created, so the captured backward reused them and accumulated the gradients
# on the legacy stream (torch warns: "The AccumulateGrad node's stream does not match ..."). The second
# case's ``Offset increment outside graph capture`` came after: the aborted capture had left the default
# CUDA generator in capture mode, and its next torch.randn failed. Now every eager call runs on a side
# stream and returns a detached output, the step claims the aux loss (the layer's one graph reference
# between calls), the inputs come from a private generator, and the test checks that no AccumulateGrad
# node outlives its step (the same check on the CPU: tests/test_routing_graph_capture.py).
@pytest.mark.parametrize("shared_qk", [True, False], ids=["shared_qk", "separate_qk"])
def test_mixer_block_sparse_has_no_host_sync_and_captures_in_a_cuda_graph(shared_qk: bool) -> None:
    """The layer's training forward + backward (aux loss included) on the block-sparse path (static
    layout sizes) under ``torch.cuda.set_sync_debug_mode("error")`` (any host sync raises), then
    captured once in a CUDA graph and replayed: the replay's output and gradients equal the eager
    call's. Training mode draws no random numbers (checked on the CPU), so no RNG state enters the graph."""
    torch.manual_seed(0)  # the module's initialisation (on the CPU)
    m = get_mixer("routing", dim=512, num_heads=8, num_clusters=8, shared_qk=shared_qk, backend="block_sparse").cuda().bfloat16().train()
    gen = torch.Generator(device="cuda").manual_seed(0)  # not the default generator, which a capture registers
    x = torch.randn(1, 2048, 512, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    gy = torch.randn(1, 2048, 512, device="cuda", dtype=torch.bfloat16, generator=gen)

    def step():
        # the previous call's k-means statistics (folded by the next training call) are not this test's path
        m._pending_raw = m._pending_loss = None
        y, _ = m(x)
        ((y * gy).sum() + m.routing_aux_loss()).backward()
        return y.detach()  # no graph outlives the step (see the note above)

    # Every eager call runs on a side stream, as the CUDA-graph docs' warm-up does.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile and autotune (the tuner's benchmarks sync) outside the checks
            step()
        x.grad = None
        m.zero_grad(set_to_none=True)
        torch.cuda.set_sync_debug_mode("error")
        try:
            y_eager = step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    grads_eager = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    x.grad = None
    m.zero_grad(set_to_none=True)
    stale = live_accumulators({"x": x, **dict(m.named_parameters())})
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y_graph = step()
    assert not stale, f"AccumulateGrad nodes from an eager call were reused by the capture: {sorted(set(stale))}"
    g.replay()
    torch.cuda.synchronize()
    assert rel(y_graph, y_eager) == 0.0
    for a, b in zip([x.grad] + [p.grad for p in m.parameters()], grads_eager):
        assert rel(a, b) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_glue_kernels_on_cuda(dtype) -> None:
    """The layer's fused glue at the benchmark's 8K shape (16 heads, D = 64, C = 16): RoPE in one launch,
    forward and backward against float64 (one rounding to the input dtype; the interpreter cannot show the
    GPU's: it truncates fp32 -> bf16); ``route_assign``'s in-kernel k-means statistics against
    ``kmeans_batch_stats`` and its one-kernel commitment backward against float64."""
    from mnemotorch.ops.rotary import apply_rotary, rotary_cos_sin
    from mnemotorch.ops.routing import commitment_loss, kmeans_batch_stats, rotary_fused, route_assign, scale_free_layer_norm

    b, t, h, d, c = 1, 8192, 16, 64, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(b, t, h, d, device="cuda", generator=g) * 3 + 1).to(dtype)
    cos, sin = rotary_cos_sin(torch.arange(t, device="cuda"), d, 10000.0, dtype=dtype)
    y = rotary_fused(x, cos, sin)
    want = apply_rotary(x, cos, sin)
    want64 = apply_rotary(x.double(), cos.double(), sin.double())
    # bf16: one round-to-nearest of the fp32 result, so within 2^-9 of float64 per element; apply_rotary
    # rounds three times (an earlier kernel that copied its roundings still differed in the last bit on
    # ~23% of the elements on an H100, so bit identity is not asked for)
    assert rel(y, want64) <= (1e-6 if dtype == torch.float32 else 2.5e-3)
    assert rel(y, want) <= (1e-6 if dtype == torch.float32 else 5e-3)
    gy = torch.randn(b, t, h, d, device="cuda", generator=g).to(dtype)
    xg = x.detach().clone().requires_grad_()
    (gx,) = torch.autograd.grad(rotary_fused(xg, cos, sin), xg, gy)
    x64 = x.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(apply_rotary(x64, cos.double(), sin.double()), x64, gy.double())
    assert rel(gx, g64) <= (1e-6 if dtype == torch.float32 else 5e-3)

    mu = torch.randn(h, c, d, device="cuda", generator=g)
    mu = (mu * (d**0.5 / mu.norm(dim=-1, keepdim=True))).to(dtype)
    sums = torch.zeros(h, c, d, device="cuda")
    counts = torch.zeros(h, c, device="cuda")
    xg = x.detach().clone().requires_grad_()
    ids, loss = route_assign(xg, mu, beta=1e-2, stats=(sums, counts))
    want_sums, want_counts = kmeans_batch_stats(scale_free_layer_norm(x), ids, c)
    assert torch.equal(counts, want_counts)
    assert rel(sums, want_sums) <= (1e-5 if dtype == torch.float32 else 2e-3)
    (gx,) = torch.autograd.grad(loss, xg)
    (g64,) = torch.autograd.grad(commitment_loss(scale_free_layer_norm(x64), mu.double(), ids, 1e-2), x64)
    assert rel(gx, g64) <= (1e-5 if dtype == torch.float32 else 1e-2)
