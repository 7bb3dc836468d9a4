"""Block-gated attention: the float64 reference's semantics, and the Triton kernel (interpreter on CPU) against it."""

from __future__ import annotations

import os

import pytest
import torch

from mnemotorch.layers.hcam import chunk_summaries, hcam_attention
from mnemotorch.ops.block_sparse.gated import block_gated_attention, block_gated_attention_reference, num_blocks
from mnemotorch.ops.landmark import landmark_grouped_attention_reference

F64 = torch.float64
KERNEL = os.environ.get("TRITON_INTERPRET") == "1"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def rand(*shape, gen, dtype=F64):
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)


def plain_causal(q, k, v):
    h, t, tk = q.shape[2], q.shape[1], k.shape[1]
    k, v = (x.repeat_interleave(h // x.shape[2], dim=2) for x in (k, v))
    s = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
    future = torch.arange(tk)[None, :] > torch.arange(tk - t, tk)[:, None]
    return torch.einsum("bhij,bjhd->bihd", s.masked_fill(future, float("-inf")).softmax(-1), v)


# --- the reference's semantics ------------------------------------------------------------------


def test_lse_gates_everywhere_is_ordinary_causal_attention() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = rand(2, 9, 4, 8, gen=g), rand(2, 23, 2, 8, gen=g), rand(2, 23, 2, 8, gen=g)
    for block_len in (1, 4, 7, 30):
        out = block_gated_attention_reference(q, k, v, block_len)
        assert rel(out, plain_causal(q, k, v)) <= 1e-14


def test_landmark_grouped_softmax_through_the_gated_op() -> None:
    """Landmark training attention = gated op with landmark gate keys, own-block LSE gate, landmarks excluded."""
    g = torch.Generator().manual_seed(1)
    l, t = 4, 27  # blocks of 4 tokens + 1 landmark; a trailing partial block without landmark
    q, k, v = rand(2, t, 4, 8, gen=g), rand(2, t, 2, 8, gen=g), rand(2, t, 2, 8, gen=g)
    w = rand(2, t, 4, 8, gen=g)
    res = []
    for fn in ("gated", "landmark"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        if fn == "gated":
            qq, kk, vv = leaves
            out = block_gated_attention(qq, kk, vv, l + 1, gate_keys=kk[:, l :: l + 1], lse_gate="own", exclude_last=True)
        else:
            out = landmark_grouped_attention_reference(*leaves, block_len=l)
        res.append((out, torch.autograd.grad((out * w).sum(), leaves)))
    (o1, g1), (o2, g2) = res
    assert rel(o1, o2) <= 1e-13
    for name, a, b in zip("qkv", g1, g2):
        assert rel(a, b) <= 1e-12, name
    # queries after a prefix (streaming): the last 6 queries alone give the same rows
    part = block_gated_attention(q[:, -6:], k, v, l + 1, gate_keys=k[:, l :: l + 1], lse_gate="own", exclude_last=True)
    assert rel(part, o1.detach()[:, -6:]) <= 1e-14


def hcam_gate(q, k, chunk, top_k):
    """HCAM's chunk logits written plainly: top-k complete chunks, the query's partial chunk by running mean."""
    b, tq, h, d = q.shape
    tk = k.shape[1]
    nb = num_blocks(tk, chunk)
    k = k.repeat_interleave(h // k.shape[2], dim=2)
    gate = torch.full((b, tq, h, nb), float("-inf"), dtype=q.dtype)
    for i in range(tq):
        p = tk - tq + i
        for bb in range(b):
            for hh in range(h):
                logits = {c: (q[bb, i, hh] @ k[bb, c * chunk : c * chunk + chunk, hh].mean(0)) / d**0.5 for c in range((p + 1) // chunk)}
                for c in sorted(logits, key=lambda c: (-logits[c].item(), c))[:top_k]:
                    gate[bb, i, hh, c] = logits[c]
                if (p + 1) % chunk:
                    c = p // chunk
                    gate[bb, i, hh, c] = q[bb, i, hh] @ k[bb, c * chunk : p + 1, hh].mean(0) / d**0.5
    return gate


def test_hcam_through_the_gated_op() -> None:
    """HCAM (no RoPE) = gated op with the chunk logits as gate bias and no LSE gates."""
    g = torch.Generator().manual_seed(2)
    chunk, top_k, t = 3, 2, 14
    q, k, v = rand(1, t, 2, 8, gen=g), rand(1, t, 2, 8, gen=g), rand(1, t, 2, 8, gen=g)
    ref = hcam_attention(q, k, v, chunk_summaries(k, chunk), chunk, top_k, local_chunk=True, rope_theta=None)
    out = block_gated_attention(q, k, v, chunk, gate_bias=hcam_gate(q, k, chunk, top_k), lse_gate="none")
    assert rel(out, ref) <= 1e-13


def test_query_without_visible_block_outputs_zero() -> None:
    g = torch.Generator().manual_seed(3)
    q, k, v = rand(1, 6, 1, 4, gen=g), rand(1, 6, 1, 4, gen=g), rand(1, 6, 1, 4, gen=g)
    bias = torch.zeros(1, 6, 1, 2, dtype=F64)
    bias[:, 1] = float("-inf")  # query 1 sees no block
    out = block_gated_attention(q, k, v, 3, gate_bias=bias.requires_grad_(), lse_gate="none")
    assert (out[:, 1] == 0).all() and torch.isfinite(out).all()
    grads = torch.autograd.grad(out.sum(), bias)
    assert torch.isfinite(grads[0]).all()


def test_gradcheck_reference_with_gate_keys_and_bias() -> None:
    g = torch.Generator().manual_seed(4)
    q, k, v = (rand(1, 7, 2, 3, gen=g).requires_grad_() for _ in range(3))
    gk = rand(1, 3, 2, 3, gen=g).requires_grad_()
    bias = rand(1, 7, 2, 3, gen=g).requires_grad_()
    fn = lambda *a: block_gated_attention_reference(a[0], a[1], a[2], 3, gate_keys=a[3], gate_bias=a[4], lse_gate="own", causal=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, gk, bias))


def test_bad_arguments() -> None:
    q = torch.randn(1, 8, 2, 4, dtype=F64)
    with pytest.raises(ValueError, match="block_len"):
        block_gated_attention(q, q, q, 0)
    with pytest.raises(ValueError, match="block_len"):
        block_gated_attention(q, q, q, 1, exclude_last=True, gate_keys=q[:, :8], lse_gate="own")
    with pytest.raises(ValueError, match="lse_gate"):
        block_gated_attention(q, q, q, 2, lse_gate="some")
    with pytest.raises(ValueError, match="gate_keys"):
        block_gated_attention(q, q, q, 2, gate_keys=q[:, :4])  # lse_gate="all" ignores them
    with pytest.raises(ValueError, match="needs gate_keys"):
        block_gated_attention(q, q, q, 2, lse_gate="none")
    with pytest.raises(ValueError, match="causal"):
        block_gated_attention(q, q, q, 2, gate_keys=q[:, :4], lse_gate="own", causal=False)
    with pytest.raises(ValueError, match=r"gate_keys must have shape"):
        block_gated_attention(q, q, q, 3, gate_keys=q[:, :4], lse_gate="none")
    with pytest.raises(ValueError, match=r"gate_bias must have shape"):
        block_gated_attention(q, q, q, 3, gate_bias=torch.zeros(1, 8, 2, 2, dtype=F64), lse_gate="none")
    with pytest.raises(ValueError, match="backend"):
        block_gated_attention(q, q, q, 2, backend="cuda")
    if KERNEL:
        with pytest.raises(TypeError, match="Triton kernel supports"):
            block_gated_attention(q, q, q, 2, backend="triton")  # float64
        qf = q.float()
        with pytest.raises(ValueError, match="head dims"):
            block_gated_attention(qf, qf, qf, 2, backend="triton")  # D = 4


# --- the Triton kernel against the reference (interpreter: small sizes) ------------------------


def run_kernel_case(b, tq, tk, h, hkv, d, block_len, mode, causal=True, dtype=torch.float32, seed=0):
    """Kernel output and gradients (all inputs) vs the float64 reference; returns the relative errors."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = rand(b, tq, h, d, gen=g), rand(b, tk, hkv, d, gen=g), rand(b, tk, hkv, d, gen=g)
    nb = num_blocks(tk, block_len)
    kwargs: dict = {"causal": causal}
    extra = {}
    if mode == "landmark":
        kwargs.update(lse_gate="own", exclude_last=True)
        extra["gate_keys"] = k[:, block_len - 1 :: block_len].clone()  # floor(Tk / l) keys
    elif mode == "keys_topk":
        kwargs.update(lse_gate="none")
        extra["gate_keys"] = rand(b, nb, hkv, d, gen=g)
        bias = 0.5 * rand(b, tq, h, nb, gen=g)
        bias[torch.rand(bias.shape, generator=g) < 0.3] = float("-inf")  # blocks dropped by a top-k
        extra["gate_bias"] = bias
    elif mode == "bias":
        kwargs.update(lse_gate="none")
        extra["gate_bias"] = 2 * rand(b, tq, h, nb, gen=g)
    elif mode == "lse_bias":
        extra["gate_bias"] = rand(b, tq, h, nb, gen=g)
    names = ["q", "k", "v"] + list(extra)
    base = [q, k, v] + list(extra.values())

    def call(tensors, backend):
        kw = dict(kwargs, **dict(zip(names[3:], tensors[3:])))
        return block_gated_attention(tensors[0], tensors[1], tensors[2], block_len, backend=backend, **kw)

    lo = [x.to(dtype).requires_grad_() for x in base]
    out = call(lo, "triton")
    go = rand(*out.shape, gen=g)
    grads = torch.autograd.grad(out, lo, go.to(dtype))
    hi = [x.clone().requires_grad_() for x in base]
    ref = call(hi, "reference")
    rgrads = torch.autograd.grad(ref, hi, go)
    assert torch.isfinite(out).all() and all(torch.isfinite(x).all() for x in grads), "NaN/inf (unwritten output?)"
    errs = {"out": rel(out, ref)}
    for name, a, r in zip(names, grads, rgrads):
        fin = torch.isfinite(base[names.index(name)]) if name == "gate_bias" else None
        if fin is not None:  # -inf bias entries: gradient 0 in both
            assert (a[~fin] == 0).all() and (r[~fin] == 0).all()
        errs["d" + name] = rel(a, r)
    return errs


KERNEL_CASES = [
    # (b, tq, tk, h, hkv, d, block_len, mode, causal)
    (1, 37, 37, 2, 1, 16, 5, "all", True),  # ordinary causal attention, GQA, ragged last block
    (1, 11, 30, 2, 2, 24, 6, "landmark", True),  # queries after a prefix, head dim 24
    (2, 29, 29, 2, 1, 16, 5, "landmark", True),
    (1, 33, 33, 2, 1, 32, 8, "keys_topk", True),  # HCAM-style: gate keys + top-k mask
    (1, 20, 26, 1, 1, 16, 7, "bias", False),  # non-causal, external gates only
    (1, 25, 25, 2, 2, 16, 4, "lse_bias", True),
]


@pytest.mark.skipif(not KERNEL, reason="needs TRITON_INTERPRET=1 (tests/conftest.py sets it)")
@pytest.mark.parametrize("case", KERNEL_CASES, ids=[f"{c[7]}-d{c[5]}-l{c[6]}" for c in KERNEL_CASES])
def test_kernel_matches_reference_fp32(case) -> None:
    b, tq, tk, h, hkv, d, block_len, mode, causal = case
    errs = run_kernel_case(b, tq, tk, h, hkv, d, block_len, mode, causal)
    bad = {k: e for k, e in errs.items() if not e <= 1e-5}
    assert not bad, f"relative errors above 1e-5: {bad}"
