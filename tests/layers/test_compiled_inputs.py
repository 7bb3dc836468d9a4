"""The Titans input path under ``torch.compile`` (:func:`~mnemotorch.layers.short_conv.compiled_conv_silu_qkv`).

A recording backend that runs the captured graph as it is: the compiled path must give the eager path's outputs and
gradients bit for bit, and the graph must keep only the length symbolic (one graph for every length > 1, the
channel count static: with every size symbolic, inductor's GPU kernels divided each index by runtime sizes).
"""

from __future__ import annotations

import torch

from mnemotorch.layers import short_conv


def test_compiled_inputs_one_graph_with_only_the_length_symbolic() -> None:
    torch._dynamo.reset()
    placeholders: list[list] = []

    def backend(gm, example_inputs):
        placeholders.append([n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"])
        return gm.forward

    fn = short_conv.compiled_conv_silu_qkv(backend)
    torch.manual_seed(0)
    heads, d = 2, 8
    weight = torch.randn(3 * heads * d, 4, requires_grad=True)
    for t in (37, 300, 1):
        x = torch.randn(2, t, 3 * heads * d, requires_grad=True)
        past = torch.randn(2, 3, 3 * heads * d)
        got = fn(x, weight, past, heads, d)
        want = short_conv.conv_silu_qkv(x, weight, past, heads, d)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        cts = [torch.randn_like(o) for o in want[:3]]
        ga = torch.autograd.grad(got[:3], (x, weight), cts)
        gb = torch.autograd.grad(want[:3], (x, weight), cts)
        for a, b in zip(ga, gb):
            assert torch.equal(a, b)
    assert len(placeholders) == 2, "lengths 37 and 300 share one graph; a length of 1 has its own"
    qkv = [v for v in placeholders[0] if isinstance(v, torch.Tensor) and v.dim() == 3 and v.shape[-1] == 3 * heads * d]
    assert qkv, placeholders[0]
    shape = qkv[0].shape
    assert isinstance(shape[1], torch.SymInt), shape
    assert isinstance(shape[0], int) and isinstance(shape[2], int), f"only the length may be symbolic: {shape}"
    from mnemotorch.ops.compiled import forget_compiled

    forget_compiled(backend)


def test_compiled_output_gate_equals_the_modules() -> None:
    """``norm_silu_gate`` (eager and compiled over the length) is the layers' ``RMSNorm(o) ⊙ SiLU(g_proj(x))`` with the
    ``nn.RMSNorm`` module, values and gradients, one graph for two lengths."""
    from mnemotorch.ops.compiled import compiled_over_length, forget_compiled

    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    heads, d = 3, 8
    norm = torch.nn.RMSNorm(d, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    fn = compiled_over_length(short_conv.norm_silu_gate, (0, 1), backend)
    for t in (5, 40):
        o = torch.randn(2, t, heads, d, requires_grad=True)
        g = torch.randn(2, t, heads * d, requires_grad=True)
        want = norm(o) * torch.nn.functional.silu(g).view(2, t, heads, d)
        for got in (short_conv.norm_silu_gate(o, g, norm.weight, norm.eps), fn(o, g, norm.weight, norm.eps)):
            assert torch.equal(got, want)
            ct = torch.randn_like(want)
            want_grads = torch.autograd.grad(want, (o, g, norm.weight), ct, retain_graph=True)
            for a, b in zip(torch.autograd.grad(got, (o, g, norm.weight), ct), want_grads):
                assert torch.equal(a, b)
    assert len(graphs) == 1
    forget_compiled(backend)
