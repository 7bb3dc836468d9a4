"""Generic model: HF Auto registration, save/load round trip, generate() with mixer states."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mnemotorch.layers import list_mixers, mixer_class
from mnemotorch.models import MnemoCache, MnemoConfig, MnemoForCausalLM


def tiny_config(plan=None, **kw) -> MnemoConfig:
    base = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, layer_plan=plan)
    base.update(kw)
    return MnemoConfig(**base)


def plans():
    """Each registered mixer alone, and a hybrid of the two foundation mixers."""
    out = [[{"type": n, **mixer_class(n).example_kwargs}] * 2 for n in list_mixers()]
    out.append([{"type": "sliding_window", "window": 4}, "attention"])
    return out


@pytest.mark.parametrize("plan", plans(), ids=lambda p: "+".join(s if isinstance(s, str) else s["type"] for s in p))
def test_hf_round_trip_identical_logits(plan, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(plan)).eval()
    assert isinstance(model, MnemoForCausalLM)
    ids = torch.randint(0, 61, (2, 11))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).layer_plan == model.config.layer_plan
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


@pytest.mark.parametrize("plan", plans(), ids=lambda p: "+".join(s if isinstance(s, str) else s["type"] for s in p))
def test_generate_equals_repeated_full_forward(plan) -> None:
    torch.manual_seed(0)
    model = MnemoForCausalLM(tiny_config(plan)).eval()
    prompt = torch.randint(0, 61, (2, 7))
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, pad_token_id=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_cache_carries_states_and_matches_full_forward() -> None:
    torch.manual_seed(0)
    model = MnemoForCausalLM(tiny_config([{"type": "sliding_window", "window": 3}, "attention"])).eval().double()
    ids = torch.randint(0, 61, (1, 10))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :6], use_cache=True)
        cache = first.cache if hasattr(first, "cache") else first.past_key_values
        assert isinstance(cache, MnemoCache) and cache.get_seq_length() == 6
        second = model(ids[:, 6:], cache=cache, use_cache=True)
    streamed = torch.cat([first.logits, second.logits], dim=1)
    assert ((streamed - full).norm() / full.norm()).item() <= 1e-10


def test_loss_with_labels_matches_manual() -> None:
    torch.manual_seed(0)
    model = MnemoForCausalLM(tiny_config())
    ids = torch.randint(0, 61, (2, 9))
    out = model(ids, labels=ids)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 61), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, manual)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_tied_embeddings_and_state_size() -> None:
    model = MnemoForCausalLM(tiny_config(["attention", {"type": "sliding_window", "window": 8}]))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # attention: 2*T*H*D ; window: 2*(W-1)*H*D
    assert model.state_size(100) == 2 * 100 * 32 + 2 * 7 * 32


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"hiden_size": 3}, "hiden_size"),
        ({"layer_plan": ["attention"]}, "num_hidden_layers"),
        ({"layer_plan": ["nope", "attention"]}, "unknown mixer 'nope'"),
        ({"layer_plan": [{"type": "sliding_window", "widow": 3}, "attention"]}, "widow"),
        ({"hidden_size": 30}, "divisible"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ],
)
def test_config_errors_name_the_field(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_config(**kwargs)


def test_bad_inputs_rejected() -> None:
    model = MnemoForCausalLM(tiny_config()).eval()
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[0, 61]]))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="padding"):
        model(torch.tensor([[1, 2]]), attention_mask=torch.tensor([[0, 1]]))


def test_truncated_checkpoint_raises(tmp_path: Path) -> None:
    model = MnemoForCausalLM(tiny_config())
    model.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(Exception):
        MnemoForCausalLM.from_pretrained(tmp_path)


def test_no_mlp_blocks() -> None:
    model = MnemoForCausalLM(tiny_config(intermediate_size=0))
    assert all(layer.mlp is None for layer in model.model.layers)
    assert model(torch.randint(0, 61, (1, 5))).logits.shape == (1, 5, 61)


@pytest.mark.parametrize("name", list_mixers())
def test_bf16_autocast_cpu(name) -> None:
    """Mixed precision must work for every mixer (the GPU trainer uses bf16 autocast)."""
    torch.manual_seed(0)
    model = MnemoForCausalLM(tiny_config([{"type": name, **mixer_class(name).example_kwargs}] * 2))
    ids = torch.randint(0, 61, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
