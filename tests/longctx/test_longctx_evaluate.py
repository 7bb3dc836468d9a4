"""``mnemo eval passkey --memory ...`` building block: evaluate_passkey under a memory."""

from __future__ import annotations

import pytest
import torch

from mnemotorch.bench.evaluate import EvalModel, evaluate_passkey
from mnemotorch.longctx import EpisodicMemory, InfLLM, default_budgets, evaluate_passkey_with_memory, make_memory
from mnemotorch.tasks.tokenizer import ByteTokenizer


def test_default_budgets_stay_inside_the_training_context():
    for length in (64, 256, 1024, 8192):
        b = default_budgets(length)
        mem = EpisodicMemory(**b, min_event=min(8, b["max_event"]))
        assert mem.n_init + mem.n_mem + mem.max_event + mem.n_local <= length
    with pytest.raises(ValueError, match="train_length"):
        default_budgets(10)


def test_make_memory_by_name(tiny):
    model = tiny("llama")
    mem = make_memory("em-llm", model)
    assert isinstance(mem, EpisodicMemory) and mem.n_local == 512
    assert isinstance(make_memory("infllm", model, n_local=64), InfLLM)
    assert make_memory("none", model) is None


def test_passkey_under_memory(tiny):
    em = EvalModel(tiny("llama", dtype=torch.float32), ByteTokenizer(), kind="hf")
    kw = dict(lengths=[300], depths=[0.5], trials=2, kind="passkey", batch_size=2)
    small = {"n_init": 8, "n_local": 32, "n_mem": 48, "block": 32, "max_event": 16, "min_event": 4}
    res = evaluate_passkey_with_memory(em, "em-llm", memory_kwargs=small, **kw)
    assert res["settings"]["memory"]["name"] == "EpisodicMemory"
    assert res["settings"]["memory"]["n_local"] == 32
    mem = InfLLM(**{k: v for k, v in small.items() if k != "min_event"})
    evaluate_passkey_with_memory(em, mem, **kw)
    assert len(mem.events) == 2 and all(mem.events) and min(mem.retrievals) > 0  # the memory was used
    assert len(res["rows"]) == 1 and 0.0 <= res["grid"][0][0] <= 1.0
    plain = evaluate_passkey_with_memory(em, "none", **kw)
    assert plain["settings"]["memory"] is None
    assert plain["grid"] == evaluate_passkey(em, **kw)["grid"]
    assert "forward" not in em.model.__dict__  # the memory is gone after the evaluation
