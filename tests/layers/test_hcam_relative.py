"""HCAM and relative attention mixers: against per-query references, the HCAM reduction, causality."""

from __future__ import annotations

import os

import pytest
import torch

from mnemotorch.layers import get_mixer
from mnemotorch.layers.hcam import HierarchicalChunkAttention, chunk_summaries, hcam_attention
from mnemotorch.layers.relative import RelativeAttention
from mnemotorch.ops.attention import causal_attention_reference
from mnemotorch.ops.relative import relative_attention_reference
from mnemotorch.ops.rotary import apply_rotary, rotary_cos_sin

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------------------- HCAM
def hcam_loop(q, k, v, chunk_size, top_k, local_chunk=True, rope_theta=10000.0):
    """HCAM query by query, head by head, chunk by chunk, as the paper describes it (slow, plain)."""
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    rep, scale = h // hkv, d**-0.5
    q_start = tk - tq
    if rope_theta is not None:
        q_r = apply_rotary(q, *rotary_cos_sin(torch.arange(q_start, tk), d, rope_theta, dtype=q.dtype))
        k_r = apply_rotary(k, *rotary_cos_sin(torch.arange(tk), d, rope_theta, dtype=k.dtype))
    else:
        q_r, k_r = q, k
    out = torch.zeros(b, tq, h, v.shape[-1], dtype=q.dtype)
    for bi in range(b):
        for hi in range(h):
            g = hi // rep
            for i in range(tq):
                pos = q_start + i
                complete = [c for c in range((pos + 1) // chunk_size)]  # chunks whose last token is <= pos
                logits = {c: (q[bi, i, hi] @ k[bi, c * chunk_size : (c + 1) * chunk_size, g].mean(0)) * scale for c in complete}
                kept = sorted(complete, key=lambda c: (-logits[c].item(), c))[:top_k]  # ties: earlier chunk
                spans = {c: (c * chunk_size, (c + 1) * chunk_size) for c in kept}
                cur = pos // chunk_size
                if local_chunk and (pos + 1) % chunk_size != 0:
                    spans[cur] = (cur * chunk_size, pos + 1)
                    logits[cur] = (q[bi, i, hi] @ k[bi, cur * chunk_size : pos + 1, g].mean(0)) * scale
                if not spans:
                    continue
                weights = torch.stack([logits[c] for c in spans]).softmax(0)
                for w, (lo, hi_) in zip(weights, spans.values()):
                    attn = ((k_r[bi, lo:hi_, g] @ q_r[bi, i, hi]) * scale).softmax(0)
                    out[bi, i, hi] = out[bi, i, hi] + w * (attn @ v[bi, lo:hi_, g])
    return out


def hcam_inputs(b=2, t=19, h=4, hkv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, t, n, d, dtype=F64, generator=g) for n in (h, hkv, hkv))


@pytest.mark.parametrize(
    "chunk_size,top_k,local_chunk,rope_theta,tq",
    [(4, 2, True, 10000.0, 19), (4, 2, False, 10000.0, 19), (3, 1, True, None, 19), (5, 9, True, 10000.0, 19), (4, 2, True, 10000.0, 6), (1, 3, True, 100.0, 19)],
)
def test_hcam_attention_equals_loop_reference(chunk_size, top_k, local_chunk, rope_theta, tq) -> None:
    q, k, v = hcam_inputs()
    q = q[:, -tq:].clone()
    w = torch.randn(q.shape[0], tq, q.shape[2], v.shape[-1], dtype=F64)
    grads = []
    outs = []
    for fn in ("vectorised", "loop"):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        if fn == "vectorised":
            out = hcam_attention(leaves[0], leaves[1], leaves[2], chunk_summaries(leaves[1], chunk_size), chunk_size, top_k, local_chunk, rope_theta)
        else:
            out = hcam_loop(*leaves, chunk_size, top_k, local_chunk, rope_theta)
        (out * w).sum().backward()
        outs.append(out.detach())
        grads.append([x.grad for x in leaves])
    assert rel(outs[0], outs[1]) <= 1e-12
    for name, a, c in zip("qkv", grads[0], grads[1]):
        assert rel(a, c) <= 1e-12, f"gradient of {name}"


@pytest.mark.parametrize("local_chunk", [True, False])
def test_hcam_reduces_to_attention_with_chunk_1_and_all_chunks(local_chunk: bool) -> None:
    """C = 1, k >= T: every past token is a complete chunk whose summary is its key -> ordinary attention."""
    q, k, v = hcam_inputs(t=23)
    out = hcam_attention(q, k, v, chunk_summaries(k, 1), chunk_size=1, top_k=23, local_chunk=local_chunk)
    assert rel(out, causal_attention_reference(q, k, v)) <= 1e-12
    # at the mixer level too: same projections, then plain causal attention
    torch.manual_seed(0)
    mixer = get_mixer("hcam", dim=32, num_heads=4, num_kv_heads=2, chunk_size=1, top_k=64).double()
    x = torch.randn(2, 23, 32, dtype=F64)
    y, state = mixer(x)
    qp, kp, vp = (p(x).view(2, 23, -1, 8) for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
    expected = mixer.o_proj(causal_attention_reference(qp, kp, vp).reshape(2, 23, 32))
    assert rel(y, expected) <= 1e-12
    assert state.summaries.shape == (2, 23, 2, 8) and torch.equal(state.summaries, state.k)


def test_hcam_top_k_bites() -> None:
    """With fewer kept chunks than complete ones the output differs from the all-chunks output."""
    q, k, v = hcam_inputs(t=24)
    s = chunk_summaries(k, 4)
    assert rel(hcam_attention(q, k, v, s, 4, 1), hcam_attention(q, k, v, s, 4, 6)) > 1e-3


def test_hcam_ties_keep_the_earlier_chunk() -> None:
    d = 4
    k = torch.randn(1, 12, 1, d, dtype=F64)
    k[:, 8:12] = k[:, 0:4]  # chunks 0 and 2 identical: equal summaries, equal logits
    v = torch.randn(1, 12, 1, d, dtype=F64)
    v[:, 8:12] = v[:, 0:4] + 10.0  # ...but different values, so the choice is visible
    q = torch.randn(1, 1, 1, d, dtype=F64)
    s = chunk_summaries(k, 4)
    s[:, 1] = -s[:, 0]  # make chunk 1 the loser for the query below
    q = s[:, 0:1].clone()  # q . s_0 = |s_0|^2 > 0 > q . s_1
    out = hcam_attention(q, k, v, s, chunk_size=4, top_k=1, local_chunk=False, rope_theta=None)
    attn = ((k[0, 0:4, 0] @ q[0, 0, 0]) * d**-0.5).softmax(0)
    assert torch.allclose(out[0, 0, 0], attn @ v[0, 0:4, 0], atol=1e-12)  # chunk 0, not chunk 2


def test_hcam_without_local_chunk_is_silent_before_the_first_chunk_completes() -> None:
    torch.manual_seed(0)
    mixer = get_mixer("hcam", dim=16, num_heads=2, chunk_size=4, top_k=2, local_chunk=False).double()
    y, _ = mixer(torch.randn(1, 9, 16, dtype=F64))
    assert (y[:, :3] == 0).all() and (y[:, 3:].abs() > 0).all()


@pytest.mark.parametrize("name", ["hcam", "relative"])
def test_future_tokens_do_not_change_past_outputs(name: str) -> None:
    torch.manual_seed(0)
    mixer = get_mixer(name, dim=16, num_heads=2, **({"chunk_size": 3, "top_k": 2} if name == "hcam" else {"max_distance": 4})).double()
    x = torch.randn(1, 20, 16, dtype=F64)
    x2 = x.clone()
    x2[:, 12:] = torch.randn(1, 8, 16, dtype=F64)
    assert torch.equal(mixer(x)[0][:, :12], mixer(x2)[0][:, :12])


def test_hcam_state_layout() -> None:
    mixer = get_mixer("hcam", dim=16, num_heads=2, chunk_size=4, top_k=2)
    _, s1 = mixer(torch.randn(2, 6, 16))
    assert s1.k.shape == (2, 6, 2, 8) and s1.summaries.shape == (2, 1, 2, 8)
    _, s2 = mixer(torch.randn(2, 3, 16), s1)
    assert s2.seen_tokens == 9 and s2.summaries.shape == (2, 2, 2, 8)
    assert torch.allclose(s2.summaries[:, 1], s2.k[:, 4:8].mean(1))
    assert mixer.state_size(9) == sum(t.numel() for t in s2.tensors().values()) // 2


def test_hcam_bad_arguments() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        HierarchicalChunkAttention(16, 2, chunk_size=0)
    with pytest.raises(ValueError, match="top_k"):
        HierarchicalChunkAttention(16, 2, top_k=0)
    with pytest.raises(ValueError, match="local_chunk"):
        HierarchicalChunkAttention(16, 2, local_chunk="yes")
    with pytest.raises(ValueError, match="num_kv_heads"):
        HierarchicalChunkAttention(16, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="RoPE"):
        HierarchicalChunkAttention(12, 4)  # head_dim 3
    assert HierarchicalChunkAttention(12, 4, rope_theta=None).head_dim == 3
    mixer = HierarchicalChunkAttention(16, 2)
    _, state = get_mixer("attention", dim=16, num_heads=2)(torch.randn(1, 3, 16))
    with pytest.raises(TypeError, match="HCAMState"):
        mixer(torch.randn(1, 3, 16), state)
    with pytest.raises(ValueError, match="backend"):
        HierarchicalChunkAttention(16, 2, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        hcam_attention(*hcam_inputs(t=4)[:2], hcam_inputs(t=4)[2], chunk_summaries(hcam_inputs(t=4)[1], 2), 2, 1, backend="fast")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")
@pytest.mark.parametrize("local_chunk", [True, False])
def test_hcam_mixer_kernel_path_equals_reference_path(local_chunk: bool) -> None:
    """The mixer on the block-gated kernel (interpreter, fp32) = its PyTorch path: outputs, every
    parameter's gradient, and a streamed second call (queries after a cached prefix)."""
    torch.manual_seed(11)
    kw = dict(dim=32, num_heads=2, num_kv_heads=1, chunk_size=4, top_k=2, local_chunk=local_chunk)
    ref_mixer = get_mixer("hcam", backend="reference", **kw)
    ker_mixer = get_mixer("hcam", backend="triton", **kw)
    ker_mixer.load_state_dict(ref_mixer.state_dict())
    x = torch.randn(1, 14, 32)
    go = torch.randn(1, 14, 32)
    outs, grads = [], []
    for mixer in (ref_mixer, ker_mixer):
        y1, st = mixer(x[:, :9])
        y2, _ = mixer(x[:, 9:], st)  # 5 queries over 14 keys: a split inside a chunk
        y = torch.cat([y1, y2], 1)
        outs.append(y)
        grads.append(torch.autograd.grad(y, list(mixer.parameters()), go))
    assert torch.isfinite(outs[1]).all()
    assert rel(outs[1], outs[0]) <= 1e-5
    for (name, _), a, r in zip(ref_mixer.named_parameters(), grads[1], grads[0]):
        assert rel(a, r) <= 1e-5, name
    # the float64 loop agrees with the reference path, so the kernel path is tied to the paper's definition
    full, _ = ref_mixer.double()(x.double())
    assert rel(outs[0].double(), full) <= 1e-5


def test_hcam_auto_backend_uses_the_reference_on_cpu(monkeypatch) -> None:
    import mnemotorch.ops.block_sparse.gated as gated

    def boom(*a, **k):
        raise AssertionError("the kernel must not run for CPU tensors with backend='auto'")

    monkeypatch.setattr(gated, "block_gated_attention", boom)
    mixer = get_mixer("hcam", dim=32, num_heads=2, chunk_size=4, top_k=2)
    y, _ = mixer(torch.randn(1, 9, 32))
    assert torch.isfinite(y).all()


# ---------------------------------------------------------------------------- relative attention
@pytest.mark.parametrize("share_heads", [False, True])
def test_relative_mixer_equals_explicit_reference(share_heads: bool) -> None:
    torch.manual_seed(0)
    mixer = get_mixer("relative", dim=32, num_heads=4, num_kv_heads=2, max_distance=5, share_heads=share_heads).double()
    with torch.no_grad():
        mixer.rel_emb.normal_()
    assert mixer.rel_emb.shape == ((1 if share_heads else 4), 6, 8)
    x = torch.randn(2, 17, 32, dtype=F64)
    y, state = mixer(x)
    qp, kp, vp = (p(x).view(2, 17, -1, 8) for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
    expected = mixer.o_proj(relative_attention_reference(qp, kp, vp, mixer.rel_emb, form="explicit").reshape(2, 17, 32))
    assert rel(y, expected) <= 1e-12
    assert state.k.shape == (2, 17, 2, 8)


def test_relative_distances_beyond_max_share_the_last_embedding() -> None:
    torch.manual_seed(0)
    mixer = get_mixer("relative", dim=16, num_heads=2, max_distance=3).double()
    x = torch.randn(1, 10, 16, dtype=F64)
    y0, _ = mixer(x)
    with torch.no_grad():
        mixer.rel_emb[:, 3] += 1.0
    y1, _ = mixer(x)
    # queries 0..2 have no key at distance >= 3; every later query does
    assert torch.equal(y0[:, :3], y1[:, :3]) and (y0[:, 3:] - y1[:, 3:]).abs().amax(-1).min() > 0


def test_relative_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_distance"):
        RelativeAttention(16, 2, max_distance=-1)
    with pytest.raises(ValueError, match="share_heads"):
        RelativeAttention(16, 2, share_heads=1)
    with pytest.raises(ValueError, match="backend"):
        RelativeAttention(16, 2, backend="cuda")  # "triton" is a backend now (the fused kernel)
    with pytest.raises(ValueError, match="num_kv_heads"):
        RelativeAttention(16, 4, num_kv_heads=3)
    assert RelativeAttention(12, 4).head_dim == 3  # no RoPE: odd head sizes are fine
