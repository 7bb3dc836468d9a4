"""EpisodicMemory / InfLLM on tiny random Hugging Face decoders: the acceptance invariants."""

from __future__ import annotations

import math

import pytest
import torch

from mnemotorch.longctx import EpisodicMemory, EpisodicMemoryError, InfLLM, memory_from_name


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def small(cls=EpisodicMemory, **kw):
    args = dict(n_init=4, n_local=16, n_mem=32, block=16, min_event=2, max_event=8, surprise_window=16)
    if cls is InfLLM:
        args.pop("min_event")
    args.update(kw)
    return cls(**args)


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("cls", [EpisodicMemory, InfLLM])
def test_full_window_equals_plain_model_fp64(kind, cls, tiny):
    model = tiny(kind)
    ids = torch.randint(0, 257, (2, 70), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits
    # n_local >= sequence length: nothing ever leaves the window; blocks of 16 < 70 still chunk the prefill.
    mem = small(cls, n_local=80, block=16)
    with mem(model):
        out = model(ids).logits
    assert out.shape == ref.shape
    assert rel(out, ref) <= 1e-12
    assert mem.events == [[], []]


@pytest.mark.parametrize("keep", [0, 1, 16, 30, 69, 70, 200])
def test_logits_to_keep_across_execution_blocks(keep, tiny):
    # Regression: keep == t (the sliding-window perplexity scores a whole first window) used to drop
    # the first execution block's logits (7,936 of 8,192 on the GPU run).
    model = tiny("llama")
    ids = torch.randint(0, 257, (1, 70), generator=torch.Generator().manual_seed(3))
    ref = model(ids).logits
    with small(n_local=80, block=16)(model):
        out = model(ids, logits_to_keep=keep).logits
    want = ref if keep == 0 else ref[:, -keep:]
    assert out.shape == want.shape
    assert rel(out, want) <= 1e-12


def test_full_window_equals_plain_model_fp32_and_generate(tiny):
    model = tiny("llama", dtype=torch.float32)
    ids = torch.randint(0, 257, (1, 50), generator=torch.Generator().manual_seed(2))
    ref = model(ids).logits
    ref_gen = model.generate(ids, max_new_tokens=10, do_sample=False)
    mem = small(n_local=64, block=16)
    with mem(model):
        out = model(ids).logits
        gen = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert rel(out, ref) <= 1e-5
    assert torch.equal(gen, ref_gen)


def test_manual_cache_loop_continues_the_memory(tiny):
    """Prefill once, then feed one token at a time with the returned cache (as evaluate.py does)."""
    model = tiny("llama")
    ids = torch.randint(0, 257, (1, 40), generator=torch.Generator().manual_seed(3))
    full = model(ids).logits
    mem = small(n_local=64, block=8)
    with mem(model):
        out = model(ids[:, :30], use_cache=True)
        logits = [out.logits]
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        for t in range(30, 40):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            logits.append(out.logits)
        assert cache.get_seq_length() == 40
    assert rel(torch.cat(logits, 1), full) <= 1e-12


# --------------------------------------------------------------------------- hooks


def test_hooks_removed_on_exit_bitwise(tiny):
    model = tiny("llama", dtype=torch.float32)
    ids = torch.randint(0, 257, (1, 60), generator=torch.Generator().manual_seed(4))
    before = model(ids).logits
    gen_before = model.generate(ids, max_new_tokens=4, do_sample=False)
    mem = small(refine="modularity")
    with mem(model):
        inside = model(ids).logits
        model.generate(ids, max_new_tokens=4, do_sample=False)
    assert not torch.equal(inside, before)  # the memory did change the computation...
    assert "forward" not in model.__dict__
    assert all("forward" not in layer.self_attn.__dict__ for layer in model.model.layers)
    assert not model.model.norm._forward_hooks
    assert torch.equal(model(ids).logits, before)  # ...and is gone, bit for bit
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), gen_before)


def test_hooks_removed_after_an_error(tiny):
    model = tiny("llama")
    ids = torch.randint(0, 257, (1, 20))
    before = model(ids).logits
    mem = small()
    with pytest.raises(RuntimeError, match="boom"):
        with mem(model):
            model(ids)
            raise RuntimeError("boom")
    assert torch.equal(model(ids).logits, before)
    with mem(model):  # reusable
        model(ids)


# --------------------------------------------------------------------------- retrieval invariants


def test_retrieval_runs_once_per_decode_step(tiny):
    model = tiny("llama", dtype=torch.float32)
    ids = torch.randint(0, 257, (1, 100), generator=torch.Generator().manual_seed(5))
    mem = small(record=True)
    new = 7
    with mem(model):
        model.generate(ids, max_new_tokens=new, do_sample=False)
    prefill_blocks = math.ceil(100 / 16)
    assert mem.retrievals == [prefill_blocks + new - 1] * 2
    for layer in range(2):
        starts = [e["start"] for e in mem.log if e["layer"] == layer]
        assert starts == list(range(0, 100, 16)) + list(range(100, 100 + new - 1))


@pytest.mark.parametrize("cls,kw", [(EpisodicMemory, {}), (EpisodicMemory, {"refine": "conductance"}),
                                    (EpisodicMemory, {"refine": "modularity", "gamma": 0.0}), (InfLLM, {})])
def test_events_never_straddle_the_local_window_and_come_in_temporal_order(cls, kw, tiny):
    model = tiny("llama", dtype=torch.float32)
    ids = torch.randint(0, 257, (1, 150), generator=torch.Generator().manual_seed(6))
    mem = small(cls, record=True, n_mem=24, **kw)
    with mem(model):
        model.generate(ids, max_new_tokens=6, do_sample=False)
    events = mem.events[0]
    assert events, "the test must form events"
    # Events tile the evicted stream after the initial tokens, within the size limits.
    assert events[0][0] == mem.n_init
    assert all(a[1] == b[0] for a, b in zip(events, events[1:]))
    lo = mem.max_event if cls is InfLLM else mem.min_event
    assert all(lo <= e - s <= mem.max_event for s, e in events)
    retrieved_any = False
    for entry in mem.log:
        got = entry["events"]
        retrieved_any |= bool(got)
        window_start = entry["start"] - mem.n_local + 1  # first position in the first query's window
        assert all(e <= window_start for _, e in got), (entry, window_start)
        assert got == sorted(got) and all(a[1] <= b[0] for a, b in zip(got, got[1:]))
        assert sum(e - s for s, e in got) <= mem.n_mem
    assert retrieved_any


def test_surprise_is_the_models_negative_log_likelihood(tiny):
    model = tiny("llama")
    ids = torch.randint(0, 257, (1, 45), generator=torch.Generator().manual_seed(7))
    logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    expected = -logp[:-1].gather(1, ids[0, 1:, None])[:, 0].double()
    mem = small(n_local=64, block=16, record=True)  # full window: logits equal the plain model's
    with mem(model):
        model(ids)
    got = torch.tensor(mem.surprises[0], dtype=torch.float64)
    assert math.isnan(got[0])
    assert torch.allclose(got[1:], expected, rtol=1e-6, atol=1e-6)


def test_retrieval_head_selector(tiny):
    model = tiny("llama", dtype=torch.float32)
    ids = torch.randint(0, 257, (1, 80), generator=torch.Generator().manual_seed(8))
    mem = small(retrieval_heads=[(0, 1), (0, 3)], record=True)
    with mem(model):
        a = model(ids).logits
    assert mem.retrievals[0] > 0 and mem.retrievals[1] == 0
    none = small(retrieval_heads=[])
    with none(model):
        b = model(ids).logits
    assert none.retrievals == [0, 0]
    assert not torch.equal(a, b)


def test_memory_reads_retrieved_events(tiny):
    """Once events exist and are retrieved, they change the output (vs. heads that never read memory)."""
    model = tiny("llama")
    ids = torch.randint(0, 257, (1, 90), generator=torch.Generator().manual_seed(9))
    reads = small(InfLLM, record=True)
    with reads(model):
        x = model(ids).logits
    assert any(e["events"] for e in reads.log)
    blind = small(InfLLM, retrieval_heads=[])
    with blind(model):
        y = model(ids).logits
    assert rel(x, y) > 1e-6


def test_event_store_is_bounded_and_matches_storage():
    from mnemotorch.longctx import EventStore

    store = EventStore("cpu", "cpu", cache_tokens=20, offload=True)
    ks = []
    for i in range(6):
        k = torch.randn(2, 8, 4, dtype=torch.float64)
        ks.append(k)
        store.add(8 * i, 8 * i + 8, k, -k, k.mean(1))
    for ids in ([0, 1], [2], [0, 3], [4, 5], [1, 2], [0, 1]):
        k, v = store.fetch(ids)
        assert torch.equal(k, torch.cat([ks[i] for i in ids], 1)) and torch.equal(v, -k)
        assert store.cached_tokens <= 20
    assert store.stats.peak_tokens <= 20 and store.stats.evictions > 0 and store.stats.hits > 0


def test_infllm_uses_fixed_blocks(tiny):
    model = tiny("llama", dtype=torch.float32)
    ids = torch.randint(0, 257, (1, 120))
    mem = small(InfLLM)
    with mem(model):
        model(ids)
    assert all(e - s == mem.max_event for s, e in mem.events[0])


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kw,match", [
    ({"gamma": -1.0}, "gamma"),
    ({"n_local": 0}, "n_local"),
    ({"min_event": 9, "max_event": 8}, "min_event"),
    ({"n_mem": 8, "max_event": 16}, "memory budget"),
    ({"refine": "louvain"}, "refine"),
    ({"contiguity": 1.0}, "contiguity"),
    ({"cache_tokens": 4}, "cache_tokens"),
    ({"retrieval_heads": [(0, -1)]}, "retrieval_heads"),
    ({"block": 2.5}, "block"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        small(**kw)


def test_bad_model_and_calls(tiny):
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(EpisodicMemoryError, match="llama, mistral, qwen2, qwen3"):
        with small()(gpt2):
            pass
    model = tiny("llama")
    with pytest.raises(EpisodicMemoryError, match="max_position_embeddings"):
        with small(n_local=1024, n_mem=32)(model):
            pass
    with pytest.raises(EpisodicMemoryError, match="outside the model"):
        with small(retrieval_heads=[(2, 0)])(model):
            pass
    mem = small()
    ids = torch.randint(0, 257, (2, 20))
    with mem(model):
        with pytest.raises(EpisodicMemoryError, match="padded"):
            model(ids, attention_mask=torch.tensor([[0] * 3 + [1] * 17, [1] * 20]))
        with pytest.raises(EpisodicMemoryError, match="model.model"):
            model.model(ids)
        out = model(ids, use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        model(ids[:, :1], cache=cache, use_cache=True)  # continue: fine
        other = model(ids[:, :5], use_cache=True)  # a new sequence resets the memory...
        with pytest.raises(EpisodicMemoryError, match="cache holds"):
            model(ids[:, :1], cache=cache, use_cache=True)  # ...so the old cache no longer matches
        del other
    with pytest.raises(EpisodicMemoryError, match="with memory"):
        with small():
            pass


def test_memory_from_name():
    assert isinstance(memory_from_name("em-llm", n_local=64), EpisodicMemory)
    assert type(memory_from_name("InfLLM")) is InfLLM
    assert memory_from_name("none") is None
    with pytest.raises(ValueError, match="em-llm, infllm or none"):
        memory_from_name("h2o")
