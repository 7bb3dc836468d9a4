"""pipeline("mnemo-longctx"): prefill a context once, answer several questions (tiny Llama, offline tokenizer)."""

from __future__ import annotations

import pytest
import torch

from mnemotorch.longctx import EpisodicMemory, InfLLM, TCAAttention, TCABudgets, log_gaussian_configs


@pytest.fixture(scope="module")
def setup():
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, pipeline

    from mnemotorch.tasks import BPETokenizer, load_text

    text = load_text()
    bpe = BPETokenizer.train(text[:20_000], vocab_size=300)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe.hf_tokenizer, bos_token=bpe.EOS_TOKEN, eos_token=bpe.EOS_TOKEN)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=bpe.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      bos_token_id=bpe.eos_id, eos_token_id=bpe.eos_id)
    model = LlamaForCausalLM(cfg).eval().double()
    pipe = pipeline("mnemo-longctx", model=model, tokenizer=tok)
    return pipe, model, tok, text[30_000:31_000]


QUESTIONS = [" Who spoke first?", " Where were they?", " What came next?"]


def greedy(model, ids, n):
    """Reference answer: full forwards without any cache (independent of the pipeline's loop)."""
    out = []
    for _ in range(n):
        nxt = int(model(ids).logits[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


def test_plain_answers_match_fresh_decoding(setup):
    pipe, model, tok, context = setup
    res = pipe(context, questions=QUESTIONS, max_new_tokens=4)
    assert len(res["answers"]) == 3
    ctx = tok(context, return_tensors="pt")["input_ids"]
    for q, ans in zip(QUESTIONS, res["answers"]):
        ids = torch.cat([ctx, tok(q, add_special_tokens=False, return_tensors="pt")["input_ids"]], 1)
        assert ans == tok.decode(greedy(model, ids, 4), skip_special_tokens=True)
    assert pipe(context, question=QUESTIONS[1], max_new_tokens=4) == {"answer": res["answers"][1]}


@pytest.mark.parametrize("make", [
    lambda: EpisodicMemory(n_init=4, n_local=64, n_mem=64, block=64, min_event=4, max_event=16, record=True),
    lambda: InfLLM(n_init=4, n_local=64, n_mem=64, block=64, max_event=16),
    lambda: TCAAttention(TCABudgets.uniform(2, 2, 16, log_gaussian_configs(16)[3]), n_init=4, n_local=64, block=16),
])
def test_memory_answers_each_question_from_the_same_context(setup, make):
    pipe, model, tok, context = setup
    memory = make()
    res = pipe(context, questions=QUESTIONS, max_new_tokens=4, memory=memory)
    if isinstance(memory, EpisodicMemory):
        assert len(memory.events[0]) > 10  # the context went into the episodic store
    # Each answer equals the one given when that question is asked alone: questions do not leak.
    for q, ans in zip(QUESTIONS, res["answers"]):
        assert pipe(context, question=q, max_new_tokens=4, memory=make())["answer"] == ans
    assert "forward" not in model.__dict__ and model.config._attn_implementation != "mnemo_tca"


def test_full_window_memory_equals_plain(setup):
    pipe, model, tok, context = setup
    context = context[:400]  # fewer tokens than n_local (< max_position_embeddings = 512)
    assert tok(context, return_tensors="pt")["input_ids"].shape[1] + 8 < 400
    plain = pipe(context, questions=QUESTIONS[:2], max_new_tokens=3)
    mem = EpisodicMemory(n_init=4, n_local=400, n_mem=64, block=64, min_event=4, max_event=16)
    assert pipe(context, questions=QUESTIONS[:2], max_new_tokens=3, memory=mem) == plain
    assert pipe(context, questions=QUESTIONS[:2], max_new_tokens=3, memory=TCAAttention(n_init=4, n_local=16, block=8)) == plain


def test_errors(setup):
    pipe, _, _, context = setup
    with pytest.raises(ValueError, match="not both"):
        pipe(context, question="a", questions=["b"])
    with pytest.raises(TypeError, match="memory"):
        pipe(context, question="a", memory="em-llm")
    with pytest.raises(ValueError, match="max_new_tokens"):
        pipe(context, question="a", max_new_tokens=0)
    with pytest.raises(TypeError, match="unknown"):
        pipe(context, question="a", temperature=0.5)


def test_snapshot_restore_is_exact(tiny):
    import copy

    model = tiny("llama")
    g = torch.Generator().manual_seed(7)
    ctx, detour, q = (torch.randint(0, 257, (1, n), generator=g) for n in (100, 40, 5))

    def run(with_detour):
        mem = EpisodicMemory(n_init=4, n_local=16, n_mem=32, block=16, min_event=2, max_event=8, contiguity=0.3)
        with mem(model):
            out = model(ctx, use_cache=True)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            n_events = len(mem.events[0])
            if with_detour:
                snap = mem.snapshot()
                model(detour, cache=copy.deepcopy(cache), use_cache=True)
                assert len(mem.events[0]) > n_events  # the detour did change the memory...
                mem.restore(snap)
                assert len(mem.events[0]) == n_events and len(mem.stores()[0]) == n_events  # ...and is undone
            return model(q, cache=copy.deepcopy(cache), use_cache=True).logits

    assert torch.equal(run(True), run(False))
