"""CUDA checks of mnemotorch.longctx: exactness, pinned offload with a bounded device cache, flat memory.

Run on the lent GPU: ``MNEMO_GPU_TESTS=1 python -m pytest -q tests/gpu/test_longctx_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from mnemotorch.longctx import EpisodicMemory, InfLLM

pytestmark = pytest.mark.gpu


def llama(dtype=torch.float32, layers=2, hidden=64, heads=4, kv=2, max_pos=4096):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=257, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max_pos)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval().to("cuda", dtype)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@torch.no_grad()
def test_full_window_equals_plain_model_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False
    model = llama()
    ids = torch.randint(0, 257, (1, 300), device="cuda")
    ref = model(ids).logits
    mem = EpisodicMemory(n_init=4, n_local=512, n_mem=64, block=64, min_event=4, max_event=32)
    with mem(model):
        out = model(ids).logits
    assert rel(out, ref) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("cls", [EpisodicMemory, InfLLM])
def test_offload_is_pinned_bounded_and_exact(cls):
    model = llama()
    ids = torch.randint(0, 257, (1, 1500), device="cuda")
    kw = dict(n_init=8, n_local=128, n_mem=96, block=128, max_event=32, record=True)
    if cls is EpisodicMemory:
        kw["min_event"] = 4
    on = cls(**kw, offload=True, cache_tokens=128)
    with on(model):
        a = model.generate(ids, max_new_tokens=16, do_sample=False)
    stores = on.stores()
    assert all(s.offload and s.pin for s in stores)
    assert all(k.device.type == "cpu" and k.is_pinned() for s in stores for k in s.keys)
    assert all(s.stats.peak_tokens <= 128 for s in stores) and sum(s.stats.evictions for s in stores) > 0
    off = cls(**kw, offload=False)
    with off(model):
        b = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(a, b)  # the cache moves bytes, it does not change the math


@torch.no_grad()
def test_peak_gpu_memory_is_flat_in_context_length():
    model = llama(layers=4, hidden=256, heads=8, kv=8)
    peaks = {}
    for length in (4096, 16384):
        ids = torch.randint(0, 257, (1, length), device="cuda")
        mem = EpisodicMemory(n_init=32, n_local=512, n_mem=512, block=256, min_event=8, max_event=64, cache_tokens=1024)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with mem(model):
            model.generate(ids, max_new_tokens=4, do_sample=False)
        peaks[length] = torch.cuda.max_memory_allocated() - base
        del mem
    # Per-token costs left on the device: repr keys (1 vector per event and head) and the HF
    # cache's one scalar per token and layer; 4x the context must not come near 4x the memory.
    assert peaks[16384] <= 1.5 * peaks[4096], peaks
