"""Concept injection: exactly alpha * v from `start` on, nothing before, hooks removed, through generate()."""

from __future__ import annotations

import pytest
import torch

from mnemotorch.analysis import ConceptInjector, concept_vector, default_layer, residual_stream, run_injection_trials
from mnemotorch.analysis._model import decoder_layers
from mnemotorch.tasks.tokenizer import ByteTokenizer


def layer_outputs(model, ids):
    """Output of every decoder layer, ``[L][B, T, D]``."""
    outs, hooks = [], []
    for layer in decoder_layers(model):
        hooks.append(layer.register_forward_hook(lambda m, a, o: outs.append((o if isinstance(o, torch.Tensor) else o[0]).clone())))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return outs


@pytest.mark.parametrize("kind", ["mnemo", "llama"])
def test_injection_adds_exactly_alpha_v_from_start(kind, mnemo, llama):
    model = mnemo() if kind == "mnemo" else llama()
    layer, start, alpha = 0, 5, 3.5
    ids = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(0))
    v = torch.randn(32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    base = layer_outputs(model, ids)
    with ConceptInjector(model, layer, v, alpha=alpha, start=start) as inj:
        hit = layer_outputs(model, ids)
    assert inj.calls == 1
    diff = hit[layer] - base[layer]
    assert torch.equal(diff[:, :start], torch.zeros_like(diff[:, :start]))
    assert torch.allclose(diff[:, start:], (alpha * v).expand_as(diff[:, start:]), rtol=0, atol=1e-13)
    for later in range(layer + 1, len(base)):  # causality: nothing before `start` moves downstream either
        assert torch.equal(hit[later][:, :start], base[later][:, :start])
        assert not torch.allclose(hit[later][:, start:], base[later][:, start:])
    # the hook is gone after the block
    after = layer_outputs(model, ids)
    assert all(torch.equal(a, b) for a, b in zip(after, base))


def test_hook_removed_after_an_error(mnemo):
    model = mnemo()
    n_hooks = lambda: sum(len(layer._forward_hooks) for layer in decoder_layers(model))  # noqa: E731
    with pytest.raises(RuntimeError, match="boom"):
        with ConceptInjector(model, 1, torch.ones(32, dtype=torch.float64)):
            assert n_hooks() == 1
            raise RuntimeError("boom")
    assert n_hooks() == 0


def test_per_sequence_vectors(mnemo):
    model = mnemo()
    ids = torch.randint(0, 257, (2, 6))
    v = torch.randn(2, 32, dtype=torch.float64)
    base = residual_stream(model, ids, 1)
    with ConceptInjector(model, 1, v, alpha=2.0, start=0):
        hit = residual_stream(model, ids, 1)
    assert torch.allclose(hit - base, 2.0 * v[:, None, :].expand(-1, 6, -1), rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind", ["mnemo", "llama"])
def test_injection_continues_through_cached_generate(kind, mnemo, llama):
    """generate() with a cache feeds one token per step: positions must still count from the prompt start."""
    model = mnemo() if kind == "mnemo" else llama()
    ids = torch.randint(0, 257, (1, 7), generator=torch.Generator().manual_seed(3))
    v = torch.randn(32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with ConceptInjector(model, 0, v, alpha=40.0, start=4):
        out = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
        seq = ids
        with torch.no_grad():
            for _ in range(6):  # the same decoding without a cache: every call starts at position 0
                seq = torch.cat([seq, model(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)
    plain = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    assert not torch.equal(plain, out)  # alpha = 40 changes the greedy continuation of a random model


def test_concept_vector_and_trials(mnemo):
    model, tok = mnemo(), ByteTokenizer()
    assert default_layer(model) == 1
    v = concept_vector(model, tok, "ocean", ["tree", "stone", "bread"], template="Think of {}.")
    last = lambda w: residual_stream(model, tok.encode(f"Think of {w}."), 1)[0, -1]  # noqa: E731
    ref = last("ocean") - (last("tree") + last("stone") + last("bread")) / 3
    assert v.shape == (32,) and torch.allclose(v, ref, rtol=0, atol=1e-14)

    trials = run_injection_trials(model, tok, {"ocean": v, "stone": -v}, "Do you notice an injected thought?", alphas=(0.0, 50.0),
                                  max_new_tokens=5, grader=lambda text, word: len(text) > 0)
    rows = trials.trials
    assert len(rows) == 4 and all(r["control"] is not None for r in rows)
    assert len({r["control"] for r in rows}) == 1  # the control is the same prompt, seed, no injection
    assert all(r["injected"] == r["control"] for r in rows if r["alpha"] == 0.0)
    assert any(r["injected"] != r["control"] for r in rows if r["alpha"] == 50.0)
    rates = trials.rates()
    assert rates["trials"] == 4 and rates["control"] == 1.0 and trials.settings["start"] == len(tok.encode("Do you notice an injected thought?")) - 1


def test_bad_arguments(mnemo):
    model = mnemo()
    with pytest.raises(ValueError, match="layer=2 is out of range: the model has 2 layers"):
        ConceptInjector(model, 2, torch.ones(32))
    with pytest.raises(ValueError, match="hidden size is 32"):
        with ConceptInjector(model, 0, torch.ones(16, dtype=torch.float64)):
            model(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="start"):
        ConceptInjector(model, 0, torch.ones(32), start=-1)
    with pytest.raises(ValueError, match="baseline_words"):
        concept_vector(model, ByteTokenizer(), "a", [])
