"""Tiny randomly initialised models for the analysis tests (no downloads)."""

from __future__ import annotations

import pytest
import torch


def mnemo_model(layer_plan=None, layers: int = 2, dtype: torch.dtype = torch.float64, seed: int = 0):
    from mnemotorch.models import MnemoConfig, MnemoForCausalLM

    torch.manual_seed(seed)
    plan = layer_plan or [{"type": "sliding_window", "window": 6}, "attention"]
    cfg = MnemoConfig(vocab_size=257, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      layer_plan=plan, intermediate_size=64)
    return MnemoForCausalLM(cfg).eval().to(dtype)


def llama_model(attn: str = "eager", dtype: torch.dtype = torch.float64, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=512, attn_implementation=attn)
    return transformers.LlamaForCausalLM(cfg).eval().to(dtype)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: one thread is fastest and leaves the other cores to the other test processes.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def mnemo():
    """The :func:`mnemo_model` factory."""
    return mnemo_model


@pytest.fixture
def llama():
    """The :func:`llama_model` factory."""
    return llama_model
