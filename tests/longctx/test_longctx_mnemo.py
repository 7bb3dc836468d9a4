"""EpisodicMemory / InfLLM on our own MnemoForCausalLM (all layers 'attention' with RoPE)."""

from __future__ import annotations

import math

import pytest
import torch

from mnemotorch.longctx import EpisodicMemory, EpisodicMemoryError, InfLLM
from mnemotorch.models import MnemoConfig, MnemoForCausalLM


def rel(a, b):
    return float((a - b).norm() / b.norm())


def mnemo(plan=None, dtype=torch.float64):
    torch.manual_seed(0)
    cfg = MnemoConfig(vocab_size=257, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, layer_plan=plan)
    return MnemoForCausalLM(cfg).eval().to(dtype)


@pytest.mark.parametrize("cls", [EpisodicMemory, InfLLM])
def test_full_window_equals_plain_mnemo_fp64(cls):
    model = mnemo()
    ids = torch.randint(0, 257, (2, 70), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits
    kw = dict(n_init=4, n_local=80, n_mem=32, block=16, max_event=8)
    mem = cls(**kw, **({"min_event": 2} if cls is EpisodicMemory else {}))
    with mem(model):
        out = model(ids).logits
        # A manual cache loop continues the memory: prefill 50, then one token at a time.
        first = model(ids[:, :50], use_cache=True)
        cache = first.cache if hasattr(first, "cache") else first.past_key_values
        steps = [first.logits] + [model(ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(50, 70)]
    assert rel(out, ref) <= 1e-12 and rel(torch.cat(steps, 1), ref) <= 1e-12
    assert mem.events == [[], []]


def test_generate_and_memory_on_mnemo():
    model = mnemo(dtype=torch.float32)
    ids = torch.randint(0, 257, (1, 60), generator=torch.Generator().manual_seed(2))
    ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    with EpisodicMemory(n_init=4, n_local=64, n_mem=32, block=16, min_event=2, max_event=8)(model):
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), ref)
    before = model(ids).logits
    mem = EpisodicMemory(n_init=4, n_local=16, n_mem=32, block=16, min_event=2, max_event=8, record=True)
    with mem(model):
        model.generate(ids, max_new_tokens=5, do_sample=False)
    assert mem.retrievals == [math.ceil(60 / 16) + 4] * 2  # once per block and per decode step
    events = mem.events[0]
    assert events and events[0][0] == 4 and all(a[1] == b[0] for a, b in zip(events, events[1:]))
    assert all(e <= entry["start"] - 16 + 1 for entry in mem.log for _, e in entry["events"])
    assert all("forward" not in layer.mixer.__dict__ for layer in model.model.layers) and "forward" not in model.__dict__
    assert torch.equal(model(ids).logits, before)


def test_unsupported_mnemo_layers_named():
    model = mnemo(["attention", {"type": "sliding_window", "window": 8}])
    with pytest.raises(EpisodicMemoryError, match=r"1 \(sliding_window\)"):
        with EpisodicMemory(n_init=4, n_local=16, n_mem=32, block=16, min_event=2, max_event=8)(model):
            pass
    assert "forward" not in model.model.layers[0].mixer.__dict__
