"""The fused forward kernel of the Titans memory (``ops/memory/fused_triton.py``) compiled for a real GPU,
at the benchmark's head shape (d = 64, hidden 256, chunk 64, 16 heads), against the chunked path; and
its training path (per-chunk checkpoints, ``ops/memory/fused_backward.py``; the adjoint step compiled by
inductor): gradients of every input.

Run on the GPU machine: ``MNEMO_GPU_TESTS=1 python -m pytest -q -p no:cacheprovider tests/gpu/test_memory_fused_gpu.py``
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mnemotorch.ops.memory import MemoryState, memory_hidden_shapes, neural_memory_chunked
from mnemotorch.ops.memory.fused_triton import neural_memory_fused, neural_memory_fused_forward

pytestmark = pytest.mark.gpu

MATCHED = dict(activation="gelu", residual=True, layer_norm=True, max_grad_norm=None)
DEFAULT = dict(activation="silu", residual=True, layer_norm=False, max_grad_norm=1.0)
SILU_LN = dict(activation="silu", residual=True, layer_norm=True, max_grad_norm=None)
CONFIGS = {"matched": MATCHED, "default": DEFAULT, "silu_ln": SILU_LN}

# Why the gates and lengths below: with α up to 0.1 a depth-2 memory under the clipped default config
# decays to zero (weights ~1e-14 at 4K, 0 at 16K), so outputs agree vacuously and the state comparison
# measures underflow; α ≤ 0.01 keeps it alive. The matched config (LayerNorm, no clip) is chaotic at
# these gates: rounding differences grow ~1.2-1.6x per chunk in the chunked path itself (fp32 vs
# float64: 0.87 relative at 4K with α ≤ 0.1, 4e-3 by chunk 56 with α ≤ 0.01; scripts/diag_memory_fused.py
# and docs/results/neural_memory.md), so it is compared over 8 chunks, where that growth is bounded.


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make(t: int, dtype: torch.dtype, b: int = 1, h: int = 16, d: int = 64, hidden: int = 256, seed: int = 0, depth: int = 2):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    uni = lambda lo, hi: lo + (hi - lo) * torch.rand(b, t, h, device="cuda", generator=g)  # noqa: E731
    q, k = F.normalize(rnd(b, t, h, d), dim=-1), F.normalize(rnd(b, t, h, d), dim=-1)
    v = rnd(b, t, h, d)
    w = tuple(rnd(b, h, i, o) / i**0.5 for i, o in memory_hidden_shapes(d, d, depth, hidden))
    s = tuple(0.1 * rnd(*x.shape) for x in w)
    qkv = tuple(x.to(dtype) for x in (q, k, v))
    return qkv, (uni(0.0, 0.1), uni(0.5, 1.0), uni(0.0, 0.01)), MemoryState(w, s, w, 0)


def check_state(out: MemoryState, ref: MemoryState, tol: float) -> None:
    for name in ("weights", "momentum"):
        for i, (x, y) in enumerate(zip(getattr(out, name), getattr(ref, name))):
            assert y.norm() > 1e-3, f"{name}[{i}] of the reference decayed to {y.norm().item():.1e}: a vacuous comparison"
            assert rel(x, y) <= tol, f"{name}[{i}]: {rel(x, y):.3e}"


@pytest.mark.parametrize("config,t", [("default", 4096), ("default", 16384), ("matched", 512), ("silu_ln", 512)])
def test_fused_bf16_vs_chunked_fp32(config: str, t: int) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = CONFIGS[config]
    (q, k, v), gates, st = make(t, torch.bfloat16)
    with torch.no_grad():
        y_ref, s_ref = neural_memory_chunked(q.float(), k.float(), v.float(), *gates, st, 64, **cfg)  # the same rounded inputs, fp32
        y, s = neural_memory_fused_forward(q, k, v, *gates, st, 64, **cfg)
    torch.cuda.synchronize()
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert rel(y, y_ref) <= 5e-3, rel(y, y_ref)
    check_state(s, s_ref, 5e-3)


@pytest.mark.parametrize("phase3,carry", [("recompute", False), ("scratch", False), ("registers", False), ("registers", True)])
@pytest.mark.parametrize("config,t", [("default", 4096), ("matched", 512)])
def test_split_walk_variants_bf16_vs_chunked_fp32(monkeypatch, config: str, t: int, phase3: str, carry: bool) -> None:
    """Each way the recurrence walk's phase 3 gets σ(Z_1), Δ_1, Δ_2 (``LAUNCH["split_phase3"]``), with the state
    read back or carried in registers (``split_carry``): the same bounds as the default launch above."""
    from mnemotorch.ops.memory import fused_triton

    monkeypatch.setitem(fused_triton.LAUNCH, "split_phase3", phase3)
    monkeypatch.setitem(fused_triton.LAUNCH, "split_carry", carry)
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = CONFIGS[config]
    (q, k, v), gates, st = make(t, torch.bfloat16)
    with torch.no_grad():
        y_ref, s_ref = neural_memory_chunked(q.float(), k.float(), v.float(), *gates, st, 64, **cfg)
        y, s = neural_memory_fused_forward(q, k, v, *gates, st, 64, **cfg)
    assert rel(y, y_ref) <= 5e-3, rel(y, y_ref)
    check_state(s, s_ref, 5e-3)


@pytest.mark.parametrize("config,depth,t", [("matched", 2, 512), ("silu_ln", 2, 512), ("default", 2, 4096), ("matched", 1, 4096), ("default", 1, 4096)])
def test_fused_fp32_vs_chunked_fp64(config: str, depth: int, t: int) -> None:
    """float32 inputs (IEEE products in the kernel) against the float64 chunked path."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = CONFIGS[config]
    (q, k, v), gates, st = make(t, torch.float32, b=1, h=4, depth=depth)
    f64 = lambda xs: tuple(x.double() for x in xs)  # noqa: E731
    with torch.no_grad():
        y_ref, s_ref = neural_memory_chunked(*f64((q, k, v)), *f64(gates), MemoryState(f64(st.weights), f64(st.momentum), f64(st.weights), 0), 64, **cfg)
        y, s = neural_memory_fused_forward(q, k, v, *gates, st, 64, **cfg)
    assert rel(y - q, y_ref - q.double()) <= 1e-5, rel(y - q, y_ref - q.double())
    check_state(s, s_ref, 1e-5)


@pytest.mark.parametrize("config,t", [("default", 4096 + 37), ("matched", 512 + 37)])
def test_layer_env_switch(monkeypatch, config: str, t: int) -> None:
    """``MNEMO_MEMORY_FUSED=1``: the titans_lmm layer's inference forward runs the kernel, same output
    (the matched config over 8 chunks and a partial one: it is chaotic over long spans, see above).

    The input path stays eager on both sides (``MNEMO_MEMORY_COMPILE_INPUTS=0``), so the switch changes the memory
    alone. With the compiled input path on the fused side only, its bf16 q, k, v round differently and the check would
    compare two differently rounded bf16 layers (an H100 run gave 0.0056 and 0.016 here, and 0.039 for the input's
    gradient in the training check). ``test_layer_compiled_inputs`` checks the compiled input path against the fp32
    layer."""
    from mnemotorch.bench.neural_memory import build_ours
    from mnemotorch.ops.memory import fused_triton

    calls = []
    real = fused_triton.neural_memory_fused

    def counting(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(fused_triton, "neural_memory_fused", counting)
    monkeypatch.setenv("MNEMO_MEMORY_COMPILE_INPUTS", "0")
    torch.manual_seed(0)
    layer = build_ours(1024, 16, 64, config, torch.device("cuda"), torch.bfloat16)
    x = torch.randn(1, t, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        monkeypatch.delenv("MNEMO_MEMORY_FUSED", raising=False)
        y0 = layer(x)[0]
        monkeypatch.setenv("MNEMO_MEMORY_FUSED", "1")
        y1 = layer(x)[0]
    assert len(calls) == 1, "the fused path did not run"
    assert rel(y1, y0) <= 5e-3, rel(y1, y0)


def train_grads(fn, qkv, gates, st, cfg, seed=1):
    """Output and gradients of (q, k, v, θ, η, α, weights, momentum) for random cotangents of the output
    and the returned state (drawn in float32, then cast to each output's dtype)."""
    xs = [x.detach().requires_grad_() for x in (*qkv, *gates)]
    depth = len(st.weights)
    ws = [x.detach().requires_grad_() for x in (*st.weights, *st.momentum)]
    y, s = fn(*xs, MemoryState(tuple(ws[:depth]), tuple(ws[depth:]), tuple(ws[:depth]), 0), 64, **cfg)
    g = torch.Generator(device="cuda").manual_seed(seed)
    outs = [y, *s.weights, *s.momentum]
    cts = [torch.randn(o.shape, device="cuda", generator=g).to(o.dtype) for o in outs]
    return y, torch.autograd.grad(outs, xs + ws, cts)


GRAD_NAMES = ["q", "k", "v", "theta", "eta", "alpha", "w1", "w2", "s1", "s2"]


@pytest.mark.parametrize("config,t", [("default", 4096), ("default", 16384), ("matched", 512), ("silu_ln", 512)])
def test_fused_training_bf16_vs_chunked_fp32(config: str, t: int) -> None:
    """bf16 q/k/v through the fused forward + backward against the fp32 chunked path's autograd on the
    same rounded inputs: outputs ≤ 5e-3, every gradient ≤ 1e-2 (ARCHITECTURE.md's bf16 bounds)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = CONFIGS[config]
    (q, k, v), gates, st = make(t, torch.bfloat16)
    y_ref, g_ref = train_grads(neural_memory_chunked, (q.float(), k.float(), v.float()), gates, st, cfg)
    y, g = train_grads(neural_memory_fused, (q, k, v), gates, st, cfg)
    assert rel(y, y_ref) <= 5e-3, rel(y, y_ref)
    for name, a, b in zip(GRAD_NAMES, g, g_ref):
        assert torch.isfinite(a).all() and b.norm() > 0, name
        assert rel(a, b) <= 1e-2, f"{name}: {rel(a, b):.3e}"


@pytest.mark.parametrize("config,depth,t", [("matched", 2, 512), ("default", 2, 4096), ("default", 1, 4096)])
def test_fused_training_fp32_vs_chunked_fp64(config: str, depth: int, t: int) -> None:
    """float32 through the fused path against float64 autograd of the chunked path: ≤ 1e-5."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = CONFIGS[config]
    (q, k, v), gates, st = make(t, torch.float32, b=1, h=4, depth=depth)
    f64 = lambda xs: tuple(x.double() for x in xs)  # noqa: E731
    st64 = MemoryState(f64(st.weights), f64(st.momentum), f64(st.weights), 0)
    y_ref, g_ref = train_grads(neural_memory_chunked, f64((q, k, v)), f64(gates), st64, cfg)
    y, g = train_grads(neural_memory_fused, (q, k, v), gates, st, cfg)
    assert rel(y - q, y_ref - q.double()) <= 1e-5
    for name, a, b in zip(GRAD_NAMES, g, g_ref):
        assert rel(a, b) <= 1e-5, f"{name}: {rel(a, b):.3e}"


@pytest.mark.parametrize("config,t", [("default", 4096), ("matched", 512), ("silu_ln", 512)])
def test_update_vjp_kernel_vs_pytorch_form(monkeypatch, config: str, t: int) -> None:
    """``BACKWARD["update_vjp"] = "triton"`` (the update's VJP per chunk and head, :mod:`.fused_update_vjp`) against its
    batched PyTorch form ("adjoint") at the benchmark's head shape, bf16: both within the bf16 bound of the fp32 chunked
    path, and the kernel's error not above the PyTorch form's by more than a tenth of that bound (both take TF32 products)."""
    from mnemotorch.ops.memory import fused_triton, fused_update_vjp

    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = CONFIGS[config]
    (q, k, v), gates, st = make(t, torch.bfloat16)
    y_ref, g_ref = train_grads(neural_memory_chunked, (q.float(), k.float(), v.float()), gates, st, cfg)
    launched = []
    real = fused_update_vjp.launch
    monkeypatch.setattr(fused_update_vjp, "launch", lambda *a, **kw: launched.append(1) or real(*a, **kw))
    errs = {}
    for form in ("adjoint", "triton"):
        monkeypatch.setitem(fused_triton.BACKWARD, "update_vjp", form)
        _, g = train_grads(neural_memory_fused, (q, k, v), gates, st, cfg)
        errs[form] = [rel(a, b) for a, b in zip(g, g_ref)]
    assert launched
    for name, e_pt, e_tr in zip(GRAD_NAMES, errs["adjoint"], errs["triton"]):
        assert e_tr <= 1e-2 and e_pt <= 1e-2, f"{name}: kernel {e_tr:.3e}, PyTorch form {e_pt:.3e}"
        assert e_tr <= e_pt + 1e-3, f"{name}: kernel {e_tr:.3e}, PyTorch form {e_pt:.3e}"


@pytest.mark.parametrize("config,t", [("default", 4096), ("matched", 512)])  # (the unclipped matched config is chaotic at 4K: the file's note)
def test_update_u_from_sweep_gpu(monkeypatch, config: str, t: int) -> None:
    """``BACKWARD["update_u_from_sweep"]`` (the sweep stores Δ_2's cotangent, with the clip also ``g̃, ñ``'s, and the
    update-VJP kernel loads them) against the kernel recomputing them, bf16 at the benchmark's head shape: both within
    the bf16 bound of the fp32 chunked path, and the handed-on form no further from it than the other by a tenth of
    that bound (they sum the same terms in different orders). Prints the errors (``-s``)."""
    from mnemotorch.ops.memory import fused_triton, fused_update_vjp

    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = CONFIGS[config]
    (q, k, v), gates, st = make(t, torch.bfloat16)
    y_ref, g_ref = train_grads(neural_memory_chunked, (q.float(), k.float(), v.float()), gates, st, cfg)
    handed = []
    real = fused_update_vjp._lmm_update_vjp  # (the op, called without the dispatcher in eager mode: ops/eager.py)
    monkeypatch.setattr(fused_update_vjp, "_lmm_update_vjp", lambda *a: handed.append(a[-2] is not None) or real(*a))
    errs = {}
    for on in (False, True):
        monkeypatch.setitem(fused_triton.BACKWARD, "update_u_from_sweep", on)
        handed.clear()
        _, g = train_grads(neural_memory_fused, (q, k, v), gates, st, cfg)
        assert handed and all(x == on for x in handed)
        errs[on] = [rel(a, b) for a, b in zip(g, g_ref)]
    print(config, t, {n: (f"{a:.2e}", f"{b:.2e}") for n, a, b in zip(GRAD_NAMES, errs[False], errs[True])})
    for name, e_off, e_on in zip(GRAD_NAMES, errs[False], errs[True]):
        assert e_on <= 1e-2 and e_off <= 1e-2, f"{name}: handed on {e_on:.3e}, recomputed {e_off:.3e}"
        assert e_on <= e_off + 1e-3, f"{name}: handed on {e_on:.3e}, recomputed {e_off:.3e}"


@pytest.mark.parametrize("config,t", [("default", 16384), ("matched", 512)])
def test_sweep_joined_against_three_phase(monkeypatch, config: str, t: int) -> None:
    """The split sweep's joined form (``LAUNCH["sweep_form"] = "joined"``: phase 2 joined to phase 1, one grid barrier
    a chunk, the slices' shares of Δ_2's cotangent summed as one tile) against its three phases at the layer's 16 heads,
    with the clip (its product computed before the launch) at 16K tokens: run twice, it gives bit-identical gradients (a race between
    the head's programs over the exchange buffers would show as a difference between runs), and against the fp32
    chunked path every gradient is within the bf16 bound and no further than the three-phase form's by a tenth of it
    (the forms sum in different orders: on the H100 their bf16 gradients differ by up to 1.1e-3, each 2.0–2.8e-3 from
    the fp32 path). Prints the errors (``-s``)."""
    form = "joined"
    from mnemotorch.ops.memory import fused_triton

    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = CONFIGS[config]
    (q, k, v), gates, st = make(t, torch.bfloat16)
    y_ref, g_ref = train_grads(neural_memory_chunked, (q.float(), k.float(), v.float()), gates, st, cfg)
    runs = {}
    for one in (False, True, True):
        monkeypatch.setitem(fused_triton.LAUNCH, "sweep_form", form if one else "three_phase")
        runs.setdefault(one, []).append(train_grads(neural_memory_fused, (q, k, v), gates, st, cfg))
    (y0, g0), = runs[False]
    (y1, g1), (y2, g2) = runs[True]
    assert torch.equal(y1, y0) and torch.equal(y2, y0)  # the forward is the same kernel
    for name, a, b, c, r in zip(GRAD_NAMES, g1, g2, g0, g_ref):
        e_one, e_two = rel(a, r), rel(c, r)
        print(f"{form} {config} {t} {name}: {form} {e_one:.3e}  three_phase {e_two:.3e}  between {rel(a, c):.3e}")
        assert torch.equal(a, b), f"{name}: two runs of the {form} sweep differ"
        assert e_one <= 1e-2 and e_two <= 1e-2, f"{name}: {form} {e_one:.3e}, three_phase {e_two:.3e}"
        assert e_one <= e_two + 1e-3, f"{name}: {form} {e_one:.3e}, three_phase {e_two:.3e}"


@pytest.mark.parametrize("config", ["default", "matched"])
def test_training_overlap_equals_serial(monkeypatch, config: str) -> None:
    """``BACKWARD["overlap"]`` (the batched passes on a second stream beside the sweep) gives the gradients of the
    one-stream order, over 16 groups of 4 chunks (so that every group's buffers are freed and reused while the
    other stream may still read them: what ``record_stream`` and the events guard), and matches the fp32 chunked
    path as the other training tests do."""
    from mnemotorch.ops.memory import fused_triton

    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = CONFIGS[config]
    (q, k, v), gates, st = make(4096, torch.bfloat16)
    monkeypatch.setitem(fused_triton.BACKWARD, "group_elements", 16 * 64 * 256 * 4)  # 4 chunks a group at 16 heads
    runs = {}
    for overlap in (False, True, True):
        monkeypatch.setitem(fused_triton.BACKWARD, "overlap", overlap)
        runs.setdefault(overlap, []).append(train_grads(neural_memory_fused, (q, k, v), gates, st, cfg))
    (y0, g0), = runs[False]
    for y1, g1 in runs[True]:
        assert torch.equal(y1, y0)
        for name, a, b in zip(GRAD_NAMES, g1, g0):
            assert rel(a, b) <= 1e-6, f"{name}: {rel(a, b):.3e}"
    if config == "default":
        y_ref, g_ref = train_grads(neural_memory_chunked, (q.float(), k.float(), v.float()), gates, st, cfg)
        for name, a, b in zip(GRAD_NAMES, runs[True][0][1], g_ref):
            assert rel(a, b) <= 1e-2, f"{name}: {rel(a, b):.3e}"


@pytest.mark.parametrize("config,t", [("default", 4096 + 37), ("matched", 512 + 37)])
def test_layer_training_env_switch(monkeypatch, config: str, t: int) -> None:
    """``MNEMO_MEMORY_FUSED=1`` trains the bf16 titans_lmm layer through the fused path: the gradients of
    the input and of every parameter match the chunked layer's (≤ 1e-2). The input path stays eager on both sides,
    as in :func:`test_layer_env_switch`."""
    from mnemotorch.bench.neural_memory import build_ours

    monkeypatch.setenv("MNEMO_MEMORY_COMPILE_INPUTS", "0")
    torch.manual_seed(0)
    layer = build_ours(1024, 16, 64, config, torch.device("cuda"), torch.bfloat16)
    x = torch.randn(1, t, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    go = torch.randn(1, t, 1024, device="cuda", dtype=torch.bfloat16)
    params = [x, *layer.parameters()]
    monkeypatch.delenv("MNEMO_MEMORY_FUSED", raising=False)
    want = torch.autograd.grad(layer(x)[0], params, go)
    monkeypatch.setenv("MNEMO_MEMORY_FUSED", "1")
    got = torch.autograd.grad(layer(x)[0], params, go)
    names = ["x", *(n for n, _ in layer.named_parameters())]
    for name, a, b in zip(names, got, want):
        if b.norm() == 0:
            continue
        assert rel(a, b) <= 1e-2, f"{name}: {rel(a, b):.3e}"


@pytest.mark.parametrize("config,lengths", [("default", (4096 + 37, 2048)), ("matched", (512 + 37, 576))])
def test_layer_compiled_inputs(monkeypatch, config: str, lengths: tuple) -> None:
    """With the fused memory on CUDA the layer's input path (conv, SiLU, ℓ2 norms) runs through ``torch.compile``
    (``short_conv.compiled_conv_silu_qkv``; ``MNEMO_MEMORY_COMPILE_INPUTS=0`` keeps it eager): in bf16, over two lengths
    (one graph, dynamic; the matched config over ≤ 9 chunks, where its chaotic growth of rounding differences is bounded)
    and a one-token decode step, every gradient is as close to the fp32 layer's as the eager input path's (within a
    quarter of it plus 2e-3)."""
    from mnemotorch.bench.neural_memory import build_ours
    from mnemotorch.layers import short_conv

    torch.manual_seed(0)
    layer = build_ours(1024, 16, 64, config, torch.device("cuda"), torch.bfloat16)
    ref = build_ours(1024, 16, 64, config, torch.device("cuda"), torch.float32)
    ref.load_state_dict({k_: v_.float() for k_, v_ in layer.state_dict().items()})
    calls = []
    real = short_conv.compiled_conv_silu_qkv
    monkeypatch.setattr("mnemotorch.layers.titans.compiled_conv_silu_qkv", lambda: calls.append(1) or real())
    monkeypatch.setenv("MNEMO_MEMORY_FUSED", "1")
    for t in lengths:
        x = torch.randn(1, t, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        go = torch.randn(1, t, 1024, device="cuda", dtype=torch.bfloat16)
        xf = x.detach().float().requires_grad_()
        monkeypatch.setenv("MNEMO_MEMORY_FUSED", "0")
        want = torch.autograd.grad(ref(xf)[0], [xf, *ref.parameters()], go.float())
        monkeypatch.setenv("MNEMO_MEMORY_FUSED", "1")
        errs = {}
        for mode in ("0", "1"):
            monkeypatch.setenv("MNEMO_MEMORY_COMPILE_INPUTS", mode)
            n0 = len(calls)
            got = torch.autograd.grad(layer(x)[0], [x, *layer.parameters()], go)
            assert (len(calls) > n0) == (mode == "1")
            errs[mode] = [rel(a, b) for a, b in zip(got, want) if b.norm() > 0]
        for e_eager, e_comp in zip(errs["0"], errs["1"]):
            assert e_comp <= 1.25 * e_eager + 2e-3, (t, e_eager, e_comp)
    with torch.no_grad():  # a decode step after a prompt, compiled and eager alike
        x = torch.randn(1, 65, 1024, device="cuda", dtype=torch.bfloat16)
        outs = {}
        for mode in ("0", "1"):
            monkeypatch.setenv("MNEMO_MEMORY_COMPILE_INPUTS", mode)
            _, st = layer(x[:, :64])
            outs[mode] = layer(x[:, 64:], st)[0]
        assert rel(outs["1"], outs["0"]) <= 1e-2


@pytest.mark.parametrize("t,c", [(16384, 64), (4096 + 64, 32)])
def test_coefficient_kernels_vs_float64(t: int, c: int) -> None:
    """The gate coefficients' Triton kernels (``ops/memory/fused_coefficients.py``, what the fused op takes) on the GPU at
    the bench's shape: values and the three gate gradients against the float64 PyTorch form (autograd), for
    cotangents shaped as the fused backward's (``N``, ``m``: last row / element only)."""
    from mnemotorch.ops.memory.chunked import gate_coefficients
    from mnemotorch.ops.memory.fused_coefficients import gate_coefficients_triton

    _, gates, _ = make(t, torch.float32)
    ref = [x.double().requires_grad_() for x in gates]
    want = gate_coefficients(*ref, c, torch.float64)
    leaves = [x.clone().requires_grad_() for x in gates]
    got = gate_coefficients_triton(*leaves, c)
    for name, x, y in zip("G N beta m f".split(), got, want):
        assert x.dtype == torch.float32 and rel(x, y.detach()) <= 2e-6, (name, rel(x, y.detach()))
    g = torch.Generator(device="cuda").manual_seed(3)
    cts = [torch.randn(x.shape, device="cuda", generator=g, dtype=torch.float64) for x in want]
    cts[1] = torch.zeros_like(cts[1]).index_copy_(-2, torch.tensor([c - 1], device="cuda"), cts[1][..., -1:, :])
    cts[3] = torch.zeros_like(cts[3]).index_copy_(-1, torch.tensor([c - 1], device="cuda"), cts[3][..., -1:])
    dw = torch.autograd.grad(want, ref, cts)
    dg = torch.autograd.grad(got, leaves, [x.float() for x in cts])
    for name, x, y in zip(("theta", "eta", "alpha"), dg, dw):
        assert rel(x, y) <= 1e-5, (name, rel(x, y))


@pytest.mark.parametrize("dtype,tol_y,tol_g", [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 1e-2, 2e-2)])
def test_input_path_kernels_gpu(dtype, tol_y: float, tol_g: float) -> None:
    """``ops/conv_triton.py`` (the input path's conv, SiLU and ℓ2 norms in Triton; opt-in ``MNEMO_MEMORY_INPUT_KERNEL=1``)
    at the benchmark's shape, 4K tokens × 3·16·64 channels, 4 taps, a carried window: outputs and the gradients of the
    inputs, taps and window against the PyTorch form in fp32 (bf16: within its rounding). Prints the errors (``-s``)."""
    from mnemotorch.layers.short_conv import conv_silu_qkv
    from mnemotorch.ops.conv_triton import conv_silu_qkv_triton

    g = torch.Generator(device="cpu").manual_seed(0)
    h, d, k, t = 16, 64, 4, 4096
    c = 3 * h * d
    base = [torch.randn(1, t, c, generator=g), torch.randn(c, k, generator=g) / 2, torch.randn(1, k - 1, c, generator=g)]
    ref = [x.cuda().requires_grad_() for x in base]
    ours = [x.cuda().to(dtype).requires_grad_() for x in base]
    want = conv_silu_qkv(*ref, h, d)
    got = conv_silu_qkv_triton(*ours, h, d)
    cot = [torch.randn(x.shape, generator=g).cuda() for x in want[:3]]
    gw = torch.autograd.grad(want[:3], ref, cot)
    gg = torch.autograd.grad(got[:3], ours, [x.to(dtype) for x in cot])
    errs = {n: rel(a.float(), b) for n, a, b in zip(("q", "k", "v", "window"), got, want)}
    errs.update({f"d{n}": rel(a.float(), b) for n, a, b in zip(("qkv", "weight", "past"), gg, gw)})
    print(dtype, {n: f"{e:.2e}" for n, e in errs.items()})
    for n, e in errs.items():
        assert e <= (tol_g if n.startswith("d") else tol_y), (n, e)
