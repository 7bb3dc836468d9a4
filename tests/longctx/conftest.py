"""Tiny randomly initialised Hugging Face decoders for the long-context memory tests (no downloads)."""

from __future__ import annotations

import pytest
import torch


def tiny_model(kind: str = "llama", dtype: torch.dtype = torch.float64, seed: int = 0, **overrides):
    """A 2-layer, hidden-64 causal LM of ``kind`` (llama, mistral, qwen2, qwen3), in eval mode."""
    import transformers

    common = dict(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    common.update(overrides)
    if kind == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif kind == "mistral":
        cfg, cls = transformers.MistralConfig(sliding_window=None, **common), transformers.MistralForCausalLM
    elif kind == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    elif kind == "qwen3":
        cfg, cls = transformers.Qwen3Config(head_dim=16, **common), transformers.Qwen3ForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    return cls(cfg).eval().to(dtype)


@pytest.fixture
def tiny():
    """The :func:`tiny_model` factory (test modules here get it as a fixture, not an import)."""
    return tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: one thread is fastest and does not fight the other test processes for the CPU.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():  # inference-time memory: no test needs gradients
        yield
    torch.set_num_threads(n)
