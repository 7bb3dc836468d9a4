"""Attention rhythm: the spec's checks on constructed maps, loop references, and real models."""

from __future__ import annotations

import math

import pytest
import torch

from mnemotorch.analysis import (
    attention_maps,
    attention_rhythm,
    future_attention_influence,
    head_spans,
    middle_layers,
    plot_attention_rhythm,
    select_heads,
    windowed_attention_distance,
)


def uniform_causal(t: int) -> torch.Tensor:
    a = torch.tril(torch.ones(t, t, dtype=torch.float64))
    return a / a.sum(-1, keepdim=True)


def random_causal(*shape: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, t, t, generator=g, dtype=torch.float64) * 2
    return logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -math.inf).softmax(-1)


def test_waad_uniform_attention_is_955_over_101():
    waad = windowed_attention_distance(uniform_causal(101), window=10)
    assert abs(float(waad[100]) - 955 / 101) < 1e-12


def test_waad_previous_token_and_self_heads():
    t = 30
    prev = torch.zeros(t, t, dtype=torch.float64)
    prev[0, 0] = 1
    prev[torch.arange(1, t), torch.arange(t - 1)] = 1
    w = windowed_attention_distance(prev)
    assert torch.equal(w[1:], torch.ones(t - 1, dtype=torch.float64)) and float(w[0]) == 0
    assert torch.equal(windowed_attention_distance(torch.eye(t, dtype=torch.float64)), torch.zeros(t, dtype=torch.float64))
    # a head that looks 25 back is clipped at W
    far = torch.zeros(t, t, dtype=torch.float64)
    far[torch.arange(t), (torch.arange(t) - 25).clamp_min(0)] = 1
    assert float(windowed_attention_distance(far, window=10)[-1]) == 10


def test_fai_is_one_for_a_fully_attended_column():
    t, s = 80, 7
    a = torch.eye(t, dtype=torch.float64)
    a[s:] = 0
    a[s:, s] = 1  # every row from s on puts all its weight on column s
    fai = future_attention_influence(a)
    assert float(fai[s]) == 1.0
    assert float(fai[s + 1]) == 0.0  # nobody attends there 10..50 tokens later
    assert torch.isnan(fai[t - 10:]).all() and not torch.isnan(fai[: t - 10]).any()


def test_metrics_match_loops():
    t, window, lo, hi = 64, 10, 10, 50
    a = random_causal(2, 3, t=t)
    waad, fai, span = windowed_attention_distance(a, window), future_attention_influence(a, lo, hi), head_spans(a)
    for b in range(2):
        for h in range(3):
            m = a[b, h]
            for q in range(t):
                ref = sum(float(m[q, s]) * min(q - s, window) for s in range(q + 1))
                assert abs(float(waad[b, h, q]) - ref) < 1e-12
            for s in range(t):
                rows = [q for q in range(s + lo, min(s + hi, t - 1) + 1)]
                ref = sum(float(m[q, s]) for q in rows) / len(rows) if rows else math.nan
                assert (math.isnan(ref) and math.isnan(float(fai[b, h, s]))) or abs(float(fai[b, h, s]) - ref) < 1e-12
            ref = sum(sum(float(m[q, s]) * (q - s) for s in range(q + 1)) for q in range(t)) / t
            assert abs(float(span[b, h]) - ref) < 1e-10


def test_select_heads():
    spans = torch.tensor([[9.0, 9.0, 9.0], [5.0, 1.0, 7.0], [3.0, 8.0, 2.0], [0.0, 0.0, 0.0]])
    assert middle_layers(4) == [1, 2] and middle_layers(2) == [0, 1] and middle_layers(8) == [2, 3, 4, 5]
    local, glob = select_heads(spans, 0.3)  # middle layers 1, 2: 6 heads, 2 per group
    assert local == [(1, 1), (2, 2)] and glob == [(2, 1), (1, 2)]
    local, glob = select_heads(spans, 0.3, layers=[0, 1, 2, 3])
    assert set(local) <= {(3, 0), (3, 1), (3, 2), (1, 1)} and glob[0] in {(0, 0), (0, 1), (0, 2)}
    with pytest.raises(ValueError, match="fraction"):
        select_heads(spans, 0.7)
    with pytest.raises(ValueError, match="layer 4"):
        select_heads(spans, 0.3, layers=[4])
    with pytest.raises(ValueError, match="square"):
        windowed_attention_distance(torch.ones(3, 4))


def test_mnemo_attention_maps_reproduce_the_mixer(mnemo):
    """A v with the captured A gives the mixers' own outputs (float64), and the masks are right."""
    model = mnemo([{"type": "sliding_window", "window": 6}, "attention", {"type": "relative", "max_distance": 4}], layers=3)
    ids = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(1))
    maps = attention_maps(model, ids)  # [L, B, H, T, T]
    assert maps.shape == (3, 2, 4, 20, 20) and maps.dtype == torch.float64
    assert torch.allclose(maps.sum(-1), torch.ones_like(maps.sum(-1)), atol=1e-12)
    assert float(maps.triu(1).abs().max()) == 0
    assert float(maps[0].tril(-6).abs().max()) == 0 and float(maps[1].tril(-6).abs().min()) >= 0  # window 6
    assert float(maps[1].tril(-6).abs().max()) > 0
    inputs, outputs = {}, {}

    def keep(i):
        def hook(module, args, out):
            inputs[i], outputs[i] = args[0], out[0]
        return hook

    hooks = [layer.mixer.register_forward_hook(keep(i)) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    for i, layer in enumerate(model.model.layers):
        mixer = layer.mixer
        _, _, v = mixer._project(inputs[i], 0)
        v = v.repeat_interleave(mixer.num_heads // mixer.num_kv_heads, dim=2)  # [B, T, H, D]
        y = torch.einsum("bhts,bshd->bthd", maps[i], v).reshape(2, 20, -1)
        ref = outputs[i]
        with torch.no_grad():
            err = float((mixer.o_proj(y) - ref).norm() / ref.norm())
        assert err < 1e-10, i


def test_llama_eager_maps_and_sdpa_error(llama):
    model = llama("eager")
    ids = torch.randint(0, 257, (1, 12), generator=torch.Generator().manual_seed(2))
    maps = attention_maps(model, ids, layers=[-1, 0])
    with torch.no_grad():
        atts = model(ids, output_attentions=True).attentions
    assert torch.equal(maps[0], atts[2]) and torch.equal(maps[1], atts[0])
    with pytest.raises(ValueError, match='attn_implementation="eager"'):
        attention_maps(llama("sdpa"), ids)
    with pytest.raises(ValueError, match="out of range"):
        attention_maps(model, ids, layers=[3])


def test_mnemo_without_softmax_layers_is_refused(mnemo):
    model = mnemo(["linear_attention", "attention"])
    ids = torch.randint(0, 257, (1, 8))
    with pytest.raises(ValueError, match=r"layers 0 \(.*\) have no softmax attention weights; .*\[1\]"):
        attention_maps(model, ids)
    assert attention_maps(model, ids, layers=[1]).shape == (1, 1, 4, 8, 8)


def test_attention_rhythm_end_to_end(mnemo, llama, tmp_path):
    from mnemotorch.tasks.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
    ids = tok.encode(text)
    for model in (mnemo(), llama()):
        r = attention_rhythm(model, ids, tokenizer=tok)
        n_layers = len(r.spans)
        assert r.waad.shape == (len(ids),) and r.fai.shape == (len(ids),)
        assert len(r.local_heads) == len(r.global_heads) >= 1
        assert not set(r.local_heads) & set(r.global_heads)
        assert max(r.spans[l, h] for l, h in r.local_heads) <= min(r.spans[l, h] for l, h in r.global_heads)
        maps = attention_maps(model, ids)[:, 0]
        ref = torch.stack([maps[l, h] for l, h in r.local_heads]).mean(0)
        assert torch.allclose(r.waad, windowed_attention_distance(ref), atol=1e-12)
        assert (r.waad >= 0).all() and (r.waad <= 10).all() and n_layers == len(model.model.layers)
        assert r.tokens is not None and "".join(r.tokens) == text
    fig = plot_attention_rhythm(r, tmp_path / "rhythm.png")
    assert (tmp_path / "rhythm.png").stat().st_size > 1000 and len(fig.axes) == 2
    with pytest.raises(ValueError, match="batch 1"):
        attention_rhythm(model, torch.zeros(2, 5, dtype=torch.long))
