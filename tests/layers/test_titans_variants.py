"""Titans MAC / MAG / MAL against a float64 token loop written from the paper's equations.

The reference below re-derives every mixer from Behrouz et al. (2024), §3 and §4, one token at a
time: the LMM write (gradient of ‖M(k) − v‖² at the chunk-start weights by autograd, momentum,
decay) and read, the convs as explicit sums, RoPE and softmax attention over the visible keys
written out. It shares only the *parameters* with the mixers. The shared streaming / gradient /
state-size / bad-input tests (tests/layers/test_streaming.py) and the model tests cover the
mixers through the registry as well.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mnemotorch.layers import get_mixer
from mnemotorch.layers.titans_variants import TitansMAC, TitansMAG, TitansMAL, prefix_window_attention

F64 = torch.float64
EPS = 1e-6  # the RMSNorm eps of the mixers


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def randomize(module: torch.nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


# ---------------------------------------------------------------------------------------------
# The reference, token by token
# ---------------------------------------------------------------------------------------------
def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def rope(x: torch.Tensor, pos: int, base: float) -> torch.Tensor:
    """Rotate ``x [B, H, D]`` to position ``pos`` (pairs (i, i + D/2), angle pos·base^(−2i/D))."""
    d = x.shape[-1]
    ang = pos * base ** (-torch.arange(0, d, 2, dtype=F64) / d)
    cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
    return x * cos + torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1) * sin


def softmax_attend(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """One query ``[B, H, D]`` over the listed keys/values ``[B, H, D]`` each."""
    k, v = torch.stack(keys, 2), torch.stack(values, 2)  # [B, H, n, D]
    p = torch.softmax((k @ q[..., None]).squeeze(-1) / q.shape[-1] ** 0.5, dim=-1)
    return (p[..., None] * v).sum(2)


def memory_apply(weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Residual MLP memory ``M(x) = x + σ(x W_1) W_2 ...`` per (batch, head); ``x [B, H, D]``."""
    h = x
    for i, w in enumerate(weights):
        h = torch.einsum("bhi,bhio->bho", h, w)
        if i < len(weights) - 1:
            h = F.silu(h)
    return x + h


class LMMRef:
    """The Titans LMM layer (``titans_lmm``), one token per :meth:`step`, with explicit state."""

    def __init__(self, lmm, batch: int):
        self.m, self.b = lmm, batch
        self.h, self.d = lmm.num_heads, lmm.head_dim
        self.W = [w.detach().unsqueeze(0).expand(batch, -1, -1, -1).clone() for w in lmm.memory_init]
        self.S = [torch.zeros_like(w) for w in self.W]
        self.W0 = self.W
        self.hist: list[torch.Tensor] = []  # projected inputs, for the causal conv
        self.qhist: list[torch.Tensor] = []  # the retrieval-query stream (MAC)
        self.t = 0

    def conv(self, hist: list[torch.Tensor], taps: torch.Tensor | None) -> torch.Tensor:
        if taps is None:  # conv_size = 0: no convolution
            return hist[-1]
        k = taps.shape[1]
        out = torch.zeros_like(hist[-1])
        for j in range(k):
            idx = len(hist) - k + j  # taps[:, K−1] multiplies the current token
            if idx >= 0:
                out = out + taps[:, j] * hist[idx]
        return out

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """MAC's retrieval query of token ``x [B, dim]`` (same W_Q and conv taps, own conv window)."""
        dim = self.m.dim
        self.qhist.append(x @ self.m.qkv_proj.weight[:dim].T)
        q = F.silu(self.conv(self.qhist, None if self.m.conv_weight is None else self.m.conv_weight[:dim])).view(self.b, self.h, self.d)
        return F.normalize(q, dim=-1)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        m, b, h, d = self.m, self.b, self.h, self.d
        self.hist.append(x @ m.qkv_proj.weight.T)
        q, k, v = F.silu(self.conv(self.hist, m.conv_weight)).view(b, 3, h, d).unbind(1)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        g = torch.sigmoid(x @ m.gate_proj.weight.T + m.gate_proj.bias)
        theta, eta, alpha = (m.max_lr * g[:, :h], m.max_momentum * g[:, h : 2 * h], g[:, 2 * h :])
        if self.t % m.chunk_size == 0:
            self.W0 = [w.clone() for w in self.W]  # a chunk begins: gradients at these weights
        with torch.enable_grad():
            w0 = [w.detach().requires_grad_(True) for w in self.W0]
            loss = (memory_apply(w0, k) - v).pow(2).sum()  # rows (b, h) are independent
            grads = torch.autograd.grad(loss, w0)
        c = lambda a: a[:, :, None, None]  # noqa: E731
        if m.max_grad_norm is not None:  # clip each token's gradient (all layers, per row and head) to norm τ
            norm = torch.stack([gr.pow(2).sum((-2, -1)) for gr in grads]).sum(0).sqrt()
            grads = [gr * c(torch.clamp(m.max_grad_norm / norm, max=1.0)) for gr in grads]
        self.S = [c(eta) * s - c(theta) * gr for s, gr in zip(self.S, grads)]
        self.W = [(1 - c(alpha)) * w + s for w, s in zip(self.W, self.S)]
        o = memory_apply(self.W, q)  # read with M_t: the token's own write included
        self.t += 1
        if m.output_gate:
            o = rms(o, m.out_norm.weight) * F.silu(x @ m.g_proj.weight.T).view(b, h, d)
        return o.reshape(b, h * d) @ m.o_proj.weight.T


def kv(attn, tok: torch.Tensor, pos: int, heads: int):
    b = tok.shape[0]
    k = (tok @ attn.k_proj.weight.T).view(b, heads, -1)
    v = (tok @ attn.v_proj.weight.T).view(b, heads, -1)
    return rope(k, pos, attn.rope_theta), v


def query(attn, tok: torch.Tensor, pos: int, heads: int):
    return rope((tok @ attn.q_proj.weight.T).view(tok.shape[0], heads, -1), pos, attn.rope_theta)


def combine(mixer, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (rms(y, mixer.norm_attn.weight) * torch.sigmoid(rms(m, mixer.norm_memory.weight))) @ mixer.o_proj.weight.T


def persistent(mixer, b: int) -> list[torch.Tensor]:
    return [] if mixer.persistent is None else [p.expand(b, -1) for p in mixer.persistent]


@torch.no_grad()
def mag_reference(mixer: TitansMAG, x: torch.Tensor) -> torch.Tensor:
    """x̃ = [P ‖ x];  o = W_O(RMSNorm(SWA*(x̃)) ⊙ σ(RMSNorm(M(x̃))))  (paper eqs. 26-28)."""
    b, t, _ = x.shape
    h, n_p, attn = mixer.num_heads, mixer.num_persistent, mixer.attn
    lmm = LMMRef(mixer.memory, b)
    prefix = persistent(mixer, b)
    for p in prefix:
        lmm.step(p)  # the memory reads the persistent tokens first
    pk = [kv(attn, p, j, h) for j, p in enumerate(prefix)]
    toks = [kv(attn, x[:, s], n_p + s, h) for s in range(t)]
    outs = []
    for i in range(t):
        m = lmm.step(x[:, i])
        visible = pk + [toks[s] for s in range(max(0, i - mixer.window + 1), i + 1)]  # prefix + last W tokens
        att = softmax_attend(query(attn, x[:, i], n_p + i, h), [a for a, _ in visible], [c for _, c in visible])
        outs.append(combine(mixer, att.reshape(b, -1) @ attn.o_proj.weight.T, m))
    return torch.stack(outs, 1)


@torch.no_grad()
def mal_reference(mixer: TitansMAL, x: torch.Tensor) -> torch.Tensor:
    """x̃ = [P ‖ x];  y = M(x̃);  o = SWA(y)  (paper eqs. 29-31), outputs at the positions of x."""
    b, t, _ = x.shape
    h, attn = mixer.num_heads, mixer.attn
    lmm = LMMRef(mixer.memory, b)
    seq = persistent(mixer, b) + [x[:, i] for i in range(t)]
    ys = [lmm.step(tok) for tok in seq]
    kvs = [kv(attn, y, u, h) for u, y in enumerate(ys)]
    outs = []
    for u in range(mixer.num_persistent, len(seq)):
        visible = kvs[max(0, u - mixer.window + 1) : u + 1]
        att = softmax_attend(query(attn, ys[u], u, h), [a for a, _ in visible], [c for _, c in visible])
        outs.append(att.reshape(b, -1) @ attn.o_proj.weight.T)
    return torch.stack(outs, 1)


@torch.no_grad()
def mac_reference(mixer: TitansMAC, x: torch.Tensor) -> torch.Tensor:
    """Per segment: h = M*_{t−1}(q); y = Attn([P ‖ h ‖ S]); M_t = M_{t−1}(y); o = y ⊗ M*_t(y)  (eqs. 21-25)."""
    b, t, _ = x.shape
    h, n_p, c, attn = mixer.num_heads, mixer.num_persistent, mixer.segment_size, mixer.attn
    lmm = LMMRef(mixer.memory, b)
    pk = [kv(attn, p, j, h) for j, p in enumerate(persistent(mixer, b))]
    outs = []
    for i in range(t):
        j = i % c
        if j == 0:
            w_seg = [w.clone() for w in lmm.W]  # M_{t−1}: the memory before the segment
            seg_h, seg_x = [], []
        read = memory_apply(w_seg, lmm.queries(x[:, i])).reshape(b, -1)  # h_i (no update)
        seg_h.append(kv(attn, read, n_p + j, h))
        seg_x.append(kv(attn, x[:, i], n_p + c + j, h))
        visible = pk + seg_h + seg_x  # causal: h_{≤i} and S_{≤i} of this segment
        att = softmax_attend(query(attn, x[:, i], n_p + c + j, h), [a for a, _ in visible], [v for _, v in visible])
        y = att.reshape(b, -1) @ attn.o_proj.weight.T
        outs.append(combine(mixer, y, lmm.step(y)))
    return torch.stack(outs, 1)


REFERENCES = {"titans_mac": mac_reference, "titans_mag": mag_reference, "titans_mal": mal_reference}


def build(name: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    mixer = get_mixer(name, dim=16, num_heads=2, **kwargs).to(F64)
    randomize(mixer)
    return mixer


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
CASES = [
    ("titans_mac", {"segment_size": 6, "num_persistent": 2, "chunk_size": 4, "expansion": 2, "conv_size": 3}),
    ("titans_mac", {"segment_size": 4, "num_persistent": 0, "chunk_size": 1, "depth": 1, "conv_size": 2}),
    ("titans_mag", {"window": 5, "num_persistent": 3, "chunk_size": 4, "expansion": 2, "conv_size": 3}),
    ("titans_mag", {"window": 1, "num_persistent": 0, "chunk_size": 3, "depth": 3, "expansion": 1, "conv_size": 0}),
    ("titans_mal", {"window": 6, "num_persistent": 2, "chunk_size": 4, "expansion": 2, "conv_size": 3}),
    ("titans_mal", {"window": 3, "num_persistent": 0, "chunk_size": 5, "depth": 1, "conv_size": 4}),
]


@pytest.mark.parametrize("name,kwargs", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_matches_paper_reference(name: str, kwargs: dict) -> None:
    """Whole-sequence and streamed outputs equal the token loop from the paper's equations (float64)."""
    mixer = build(name, **kwargs)
    torch.manual_seed(1)
    x = torch.randn(2, 15, 16, dtype=F64)
    ref = REFERENCES[name](mixer, x)
    with torch.no_grad():
        full, _ = mixer(x)
        assert rel(full, ref) <= 1e-10, f"{name}: {rel(full, ref):.2e}"
        state, outs = None, []
        for piece in x.split([3, 1, 7, 4], dim=1):  # splits inside segments, chunks and windows
            y, state = mixer(piece, state)
            outs.append(y)
    assert rel(torch.cat(outs, 1), ref) <= 1e-10


def test_mac_reads_the_memory_at_segment_start() -> None:
    """Inside a segment, h comes from the segment-start weights: changing a token's own write cannot
    change h of the later tokens of its segment, but it changes the next segment's h."""
    mixer = build("titans_mac", segment_size=4, num_persistent=1, chunk_size=2, conv_size=2, expansion=2)
    x = torch.randn(1, 8, 16, dtype=F64)
    with torch.no_grad():
        _, st = mixer(x[:, :1])
        assert torch.equal(st.segment_start, mixer.init_state(1, dtype=F64).segment_start)  # not yet updated
        assert not torch.equal(st.weights, st.segment_start)
        _, st4 = mixer(x[:, 1:4], st)
        assert torch.equal(st4.segment_start, st4.weights) and not st4.segment_kv.any()  # a new segment: empty buffer


@pytest.mark.parametrize("name", ["titans_mac", "titans_mag", "titans_mal"])
def test_causal(name: str) -> None:
    """Changing token 9 leaves outputs 0..8 unchanged (no look-ahead through h, the gate or the memory)."""
    mixer = build(name, **dict(CASES[[n for n, _ in CASES].index(name)][1]))
    x = torch.randn(1, 14, 16, dtype=F64)
    x2 = x.clone()
    x2[:, 9] += 1.0
    with torch.no_grad():
        a, _ = mixer(x)
        b, _ = mixer(x2)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("name", ["titans_mac", "titans_mag", "titans_mal"])
def test_constant_decoding_memory(name: str) -> None:
    """state_size is bounded; the state after 1 token and after many has the same shapes (MAC) or
    stops growing once the window is full (MAG/MAL)."""
    mixer = get_mixer(name, dim=16, num_heads=2, **{"titans_mac": {"segment_size": 4}}.get(name, {"window": 4}), chunk_size=2, expansion=1)
    assert mixer.state_size(10**3) == mixer.state_size(10**6)
    x = torch.randn(1, 11, 16)
    with torch.no_grad():
        _, s_a = mixer(x[:, :7])
        _, s_b = mixer(x[:, 7:], s_a)
    shapes = lambda s: {k: tuple(v.shape) for k, v in s.tensors().items()}  # noqa: E731
    assert shapes(s_a) == shapes(s_b)
    assert sum(v.numel() for v in s_b.tensors().values()) == mixer.state_size(11)


def test_prefix_window_attention_matches_sink_pattern() -> None:
    """The masked-SDPA path equals the dense sink-window rule of ops.block_sparse, with cached keys."""
    from mnemotorch.ops.block_sparse import block_sparse_attention_reference, sink_window_pattern

    torch.manual_seed(0)
    n_p, window, tq, cached = 3, 4, 6, 5
    q = torch.randn(2, tq, 2, 8, dtype=F64)
    k, v = (torch.randn(2, n_p + cached + tq, 2, 8, dtype=F64) for _ in range(2))
    out = prefix_window_attention(q, k, v, n_p, window, chunk=4)  # two query chunks
    # The same keys as one sequence: prefix, then the run. Positions in the run shift by n_p.
    pattern = sink_window_pattern(tq, window, n_p, k_len=n_p + cached + tq)
    ref = block_sparse_attention_reference(q, k, v, pattern)
    assert rel(out, ref) <= 1e-12


def test_mag_kernel_path_matches_sdpa() -> None:
    """The block-sparse Triton kernel (CPU interpreter here) equals the masked-SDPA path in float32."""
    torch.manual_seed(0)
    q = torch.randn(1, 20, 2, 16)
    k, v = (torch.randn(1, 3 + 20, 2, 16) for _ in range(2))
    fast = prefix_window_attention(q, k, v, 3, 6, backend="triton")
    ref = prefix_window_attention(q, k, v, 3, 6, backend="reference")
    assert rel(fast, ref) <= 1e-5


@pytest.mark.parametrize(
    "name,kwargs,error,match",
    [
        ("titans_mac", {"segment_size": 0}, ValueError, "segment_size"),
        ("titans_mac", {"num_persistent": -1}, ValueError, "num_persistent"),
        ("titans_mag", {"num_persistent": 1.5}, ValueError, "num_persistent"),
        ("titans_mag", {"window": 0}, ValueError, "window"),
        ("titans_mal", {"chunk_size": 0}, ValueError, "chunk_size"),
        ("titans_mal", {"depth": 5}, ValueError, "depth"),
        ("titans_mac", {"activation": "tanh"}, ValueError, "activation"),
    ],
)
def test_bad_arguments(name: str, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        get_mixer(name, dim=16, num_heads=2, **kwargs)


def test_odd_head_dim_is_rejected() -> None:
    with pytest.raises(ValueError, match="even"):
        get_mixer("titans_mag", dim=12, num_heads=4)  # head_dim 3: no RoPE pairs


def test_state_from_another_mixer_is_rejected() -> None:
    mag = get_mixer("titans_mag", dim=16, num_heads=2, window=4)
    mac = get_mixer("titans_mac", dim=16, num_heads=2, segment_size=4)
    _, state = mag(torch.randn(1, 3, 16))
    with pytest.raises(TypeError, match="state"):
        mac(torch.randn(1, 3, 16), state)
