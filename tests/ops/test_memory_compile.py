"""The compiled chunk step of the Titans memory (``neural_memory_chunked(..., compile=...)``).

The eager path is the reference: the compiled path must give the same outputs, final state and
gradients (q, k, v, θ, η, α, initial weights, momentum, chunk-start weights), including calls that
start and end inside a chunk; ``fullgraph=True`` must capture the step without graph breaks, and one
graph must serve every full chunk. CI uses the ``aot_eager`` backend (AOTAutograd's forward/backward
split without code generation: seconds); inductor on the CPU is a slow test, on CUDA a GPU test.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

from mnemotorch.layers import get_mixer
from mnemotorch.ops.memory import MemoryState, compile_options, neural_memory, neural_memory_chunked
from mnemotorch.ops.memory import chunked as chunked_mod

from test_memory import make_inputs, make_state, rel

AOT = {"backend": "aot_eager"}
TOL = {torch.float64: 1e-12, torch.float32: 1e-6}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (and dynamo's per-function recompile limit is not shared)."""
    torch._dynamo.reset()
    chunked_mod._COMPILED_STEPS.clear()
    yield
    torch._dynamo.reset()
    chunked_mod._COMPILED_STEPS.clear()


class CountingBackend:
    """``aot_eager`` that counts the graphs dynamo hands it and the calls of the compiled code."""

    def __init__(self) -> None:
        self.graphs = 0
        self.calls = 0
        self.inner = lookup_backend("aot_eager")

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        compiled = self.inner(gm, example_inputs)

        def run(*args):
            self.calls += 1
            return compiled(*args)

        return run


def run_both(dtype, depth, activation, residual, layer_norm, max_grad_norm, position, t, chunk, compile_opts, b=2, h=2, d=4, theta_max=0.3):
    """(outputs, final state, gradients) of the eager and the compiled path on the same leaves."""
    # drawn in float64 and rounded, so that both dtypes see the same numbers
    q, k, v, th, et, al = (x.to(dtype) for x in make_inputs(b=b, t=t, h=h, dk=d, dv=d, seed=41, theta_max=theta_max))
    st64 = make_state(b, h, d, d, depth, hidden=6, position=position)
    cast = lambda xs: tuple(x.to(dtype) for x in xs)  # noqa: E731
    st = MemoryState(cast(st64.weights), cast(st64.momentum), cast(st64.chunk_start), position)
    g = torch.Generator().manual_seed(43)
    cot = torch.randn(b, t, h, d, generator=g, dtype=torch.float64).to(dtype)
    results = []
    for comp in (False, compile_opts):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, th, et, al, *st.weights, *st.momentum, *st.chunk_start)]
        n = depth
        w, s, start = leaves[6 : 6 + n], leaves[6 + n : 6 + 2 * n], leaves[6 + 2 * n :]
        state = MemoryState(tuple(w), tuple(s), tuple(start) if position else tuple(w), position)
        y, out = neural_memory_chunked(*leaves[:6], state, chunk, activation, residual, layer_norm, max_grad_norm=max_grad_norm, compile=comp)
        # every returned tensor enters the loss, each with its own weights
        loss = (y * cot).sum() + sum((x * x).sum() * (0.3 + 0.1 * i) for i, x in enumerate(out.tensors()))
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        if not position:
            grads = grads[: 6 + 2 * n]  # the chunk-start leaves are unused at a chunk boundary
        results.append((y, out, grads))
    return results


CASES = [
    # depth, activation, residual, layer_norm, max_grad_norm, position, T, chunk
    (2, "gelu", True, True, None, 3, 23, 5),  # the benchmark's "matched" memory; starts and ends inside a chunk
    (2, "silu", True, False, 0.5, 0, 20, 4),  # TitansLMM's default (clipped); whole chunks only
    (1, "silu", False, False, 0.7, 2, 13, 4),  # linear memory, clipped, starts and ends inside a chunk
    (3, "relu", False, True, None, 1, 11, 3),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"d{c[0]}-{c[1]}-pos{c[5]}-T{c[6]}-C{c[7]}")
def test_compiled_equals_eager(dtype, case) -> None:
    depth, act, residual, ln, tau, position, t, chunk = case
    counter = CountingBackend()
    (y0, s0, g0), (y1, s1, g1) = run_both(dtype, depth, act, residual, ln, tau, position, t, chunk, {"backend": counter})
    tol = TOL[dtype]
    assert counter.graphs >= 1 and counter.calls >= 1, "the compiled step never ran"
    assert rel(y1, y0) <= tol
    assert s1.position == s0.position == (position + t) % chunk
    for name in ("weights", "momentum", "chunk_start"):
        for i, (a, b) in enumerate(zip(getattr(s1, name), getattr(s0, name))):
            assert rel(a, b) <= tol, f"{name}[{i}]: {rel(a, b):.3e}"
    names = ["q", "k", "v", "theta", "eta", "alpha"] + [f"leaf{i}" for i in range(len(g0) - 6)]
    for name, a, b in zip(names, g1, g0):
        assert b is not None and a is not None, name
        assert b.abs().sum() > 0, name  # a gradient that is identically zero would test nothing
        assert rel(a, b) <= tol, f"d/d{name}: {rel(a, b):.3e}"


@pytest.mark.parametrize("position", [1, 0])
def test_one_graph_serves_every_full_chunk(position) -> None:
    """fullgraph=True compiles the step without graph breaks (a break raises), once for all chunks.

    position 1: a 3-token head segment, 6 chunks, a 2-token tail. position 0: the first chunk gets
    the caller's state (not requiring grad), the later ones a state that does: still one graph.
    """
    counter = CountingBackend()
    q, k, v, th, et, al = make_inputs(b=1, t=(3 if position else 0) + 6 * 4 + 2, h=2, dtype=torch.float32, seed=47)
    st = make_state(1, 2, 4, 4, 2, dtype=torch.float32, position=position)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, th, et, al)]
    y, out = neural_memory_chunked(*leaves, st, 4, "gelu", True, True, compile={"backend": counter})
    torch.autograd.grad(y.sum() + out.weights[0].sum(), leaves)
    assert (counter.graphs, counter.calls) == (1, 6)  # the partial segments ran eagerly
    neural_memory_chunked(*leaves, st, 4, "gelu", True, True, compile={"backend": counter})  # same shapes: no recompile
    assert (counter.graphs, counter.calls) == (1, 12)
    with torch.no_grad():  # inference is its own graph (no backward saved)
        neural_memory_chunked(q, k, v, th, et, al, st, 4, "gelu", True, True, compile={"backend": counter})
    assert (counter.graphs, counter.calls) == (2, 18)


def test_fullgraph_is_enforced() -> None:
    """The compiled step is built with fullgraph=True: a graph break inside it is an error, not a silent split."""
    fn = chunked_mod._full_chunk_stepper(compile_options(AOT), "silu", False, False, 1e-5, None)

    def broken(*a):
        torch._dynamo.graph_break()
        return chunked_mod._chunk_step(*a)

    ok = torch.compile(broken, fullgraph=True, dynamic=False, backend="aot_eager")
    x = torch.randn(1, 1, 4, 4)
    w = [torch.randn(1, 1, 4, 4)]
    coefs = chunked_mod.chunk_coefficients(torch.rand(1, 1, 4), -torch.rand(1, 1, 4), -torch.rand(1, 1, 4))
    with pytest.raises(Exception, match="(?i)graph.?break"):
        ok(x, x, x, *coefs, w, w, w, "silu", False, False, 1e-5, None)
    y, _, _ = fn(x, x, x, *coefs, w, w)  # the real step compiles whole
    assert torch.isfinite(y).all()


def test_titans_layer_compiled_matches_eager() -> None:
    """TitansLMM(compile_memory=...) = the eager layer: outputs, state, parameter gradients, streaming."""
    torch.manual_seed(0)
    kw = dict(dim=16, num_heads=2, expansion=2, chunk_size=4, activation="gelu", layer_norm=True)
    eager = get_mixer("titans_lmm", **kw).double()
    comp = get_mixer("titans_lmm", compile_memory=AOT, **kw).double()
    comp.load_state_dict(eager.state_dict())
    x = torch.randn(2, 14, 16, dtype=torch.float64)
    go = torch.randn(2, 14, 16, dtype=torch.float64)
    outs = []
    for layer in (eager, comp):
        y, st = layer(x)
        grads = torch.autograd.grad((y * go).sum() + st.weights.sum(), list(layer.parameters()))
        y1, s1 = layer(x[:, :6])  # ends inside a chunk
        y2, s2 = layer(x[:, 6:], s1)  # starts inside a chunk
        outs.append((y, st, grads, torch.cat([y1, y2], 1), s2))
    (y0, st0, g0, ys0, ss0), (y1, st1, g1, ys1, ss1) = outs
    assert rel(y1, y0) <= 1e-12 and rel(ys1, ys0) <= 1e-12 and rel(ys1, y1) <= 1e-10
    for a, b in ((st1.weights, st0.weights), (st1.momentum, st0.momentum), (ss1.chunk_start, ss0.chunk_start)):
        assert rel(a, b) <= 1e-12
    for (name, _), a, b in zip(eager.named_parameters(), g1, g0):
        assert rel(a, b) <= 1e-12, name
    assert eager.compile_memory is False and comp.compile_memory == AOT


@pytest.mark.parametrize(
    "value,error,match",
    [({"fullgraph": False}, ValueError, "unknown torch.compile option"), (3, TypeError, "compile must be")],
)
def test_bad_compile_argument(value, error, match) -> None:
    q, k, v, th, et, al = make_inputs(t=4)
    st = make_state(2, 2, 4, 4, 1)
    with pytest.raises(error, match=match):
        neural_memory(q, k, v, th, et, al, st, chunk_size=4, compile=value)
    with pytest.raises(error, match=match):
        get_mixer("titans_lmm", dim=8, num_heads=2, compile_memory=value)


def test_compile_options_normalised() -> None:
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == {"backend": "inductor", "mode": None}
    assert compile_options("max-autotune-no-cudagraphs") == {"backend": "inductor", "mode": "max-autotune-no-cudagraphs"}
    assert compile_options("default") == {"backend": "inductor", "mode": None}
    assert compile_options(AOT) == {"backend": "aot_eager", "mode": None}


@pytest.mark.slow
def test_inductor_cpu_matches_eager() -> None:
    """Inductor's generated code (C++ on the CPU): float32, the matched memory, partial segments (~30 s).

    Inductor fuses and orders reductions differently, so float32 results differ by rounding. Outputs
    and states must agree to 1e-5; the gradients' float32 rounding floor here is itself ~1e-5 (eager
    float32 against float64), so each compiled gradient must be within 3x eager's own float32 error
    of the float64 result.
    """
    args = (2, "gelu", True, True, None, 3, 23, 5)
    (y0, s0, g0), (y1, s1, g1) = run_both(torch.float32, *args, True, theta_max=0.1)
    (_, _, g64), _ = run_both(torch.float64, *args, AOT, theta_max=0.1)
    assert rel(y1, y0) <= 1e-5
    for a, b in zip(s1.tensors(), s0.tensors()):
        assert rel(a, b) <= 1e-5
    for i, (a, b, c) in enumerate(zip(g1, g0, g64)):
        eager_err, compiled_err = rel(b.double(), c), rel(a.double(), c)
        assert eager_err <= 1e-4, i  # the comparison itself is meaningful
        assert compiled_err <= max(3 * eager_err, 1e-6), f"grad {i}: compiled {compiled_err:.2e} vs eager {eager_err:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("config", ["matched", "default"])
def test_inductor_cuda_layer_matches_eager(config) -> None:
    """The benchmark's layers (bf16, small) with inductor on the GPU against the eager layer."""
    from mnemotorch.bench.neural_memory import OUR_CONFIGS

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    kw = dict(dim=256, num_heads=4, chunk_size=64, **OUR_CONFIGS[config])
    eager = get_mixer("titans_lmm", **kw).cuda().bfloat16()
    comp = get_mixer("titans_lmm", compile_memory=True, **kw).cuda().bfloat16()
    comp.load_state_dict(eager.state_dict())
    x = torch.randn(2, 4 * 64 + 17, 256, device="cuda", dtype=torch.bfloat16)
    go = torch.randn_like(x)
    res = []
    for layer in (eager, comp):
        xi = x.clone().requires_grad_()
        y, _ = layer(xi)
        res.append((y.float(), *[g.float() for g in torch.autograd.grad(y, [xi, *layer.parameters()], go)]))
    assert rel(res[1][0], res[0][0]) <= 5e-3
    for a, b in zip(res[1][1:], res[0][1:]):
        assert rel(a, b) <= 1e-2
