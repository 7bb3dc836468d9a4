"""Retrieval heads (Wu et al., 2024): the copy-paste score, detection on a model, head masking."""

from __future__ import annotations

import pytest
import torch

from mnemotorch.longctx import RetrievalHeads, build_needle_prompt, detect_retrieval_heads, mask_heads, retrieval_scores
from mnemotorch.tasks.tokenizer import ByteTokenizer


def test_retrieval_scores_oracle_copy_uniform_and_partial():
    tokens = list(range(100, 130))  # distinct tokens; the needle's answer is positions 10..14
    span = (10, 15)
    steps = 5
    generated = tokens[10:15]
    rows = []
    for s in range(steps):
        n = len(tokens) + s
        att = torch.zeros(1, 4, n)
        att[0, 0, 10 + s] = 1.0  # oracle copy head: on the needle token being produced
        att[0, 1] = 1.0 / n  # uniform head: no strict top-1
        att[0, 2, 10 + (s + 1) % 5] = 1.0  # looks inside the needle, but at the wrong token
        att[0, 3, (10 + s) if s < 2 else 0] = 0.9  # copies the first two tokens only
        att[0, 3, 1] = 0.05
        rows.append(att)
    score = retrieval_scores(rows, generated, tokens + generated, span)
    assert score.shape == (1, 4)
    assert score[0, 0] == 1.0 and score[0, 1] == 0.0 and score[0, 2] == 0.0
    assert score[0, 3] == pytest.approx(0.4)
    # Tokens that are not in the needle earn nothing, whatever the attention.
    assert retrieval_scores(rows, [1] * steps, tokens + [1] * steps, span).sum() == 0
    with pytest.raises(ValueError, match="generated"):
        retrieval_scores(rows, generated[:2], tokens, span)


def test_needle_prompt_layout():
    tok = ByteTokenizer()
    p = build_needle_prompt(tok, 200, 0.5, "4821")
    assert len(p.input_ids) == 200
    assert tok.decode(p.input_ids[p.span[0]:p.span[1]]) == " 4821" and p.answer == p.input_ids[p.span[0]:p.span[1]]
    assert tok.decode(p.input_ids).endswith("The special magic number is")
    with pytest.raises(ValueError, match="too short"):
        build_needle_prompt(tok, 30, 0.5, "4821")


def _oracle_attention(span_start: int, prompt_len: int):
    """Eager attention, except in layer 1: head 0 copies the needle token being produced, head 1 is uniform."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    def fn(module, query, key, value, attention_mask, **kwargs):
        out, w = eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
        if module.layer_idx == 1 and query.shape[2] == 1:
            n = key.shape[2]
            w = w.clone()
            w[:, 0] = 0
            w[:, 0, :, span_start + (n - prompt_len)] = 1.0
            w[:, 1] = 1.0 / n
        return out, w

    return fn


def test_detect_retrieval_heads_oracle_head_scores_one_uniform_zero(tiny):
    from transformers import AttentionInterface

    model = tiny("llama", dtype=torch.float32)
    tok = ByteTokenizer()
    length, depth = 160, 0.25
    p = build_needle_prompt(tok, length, depth, "000000")  # byte tokens: the span does not depend on the digits
    AttentionInterface.register("mnemo_test_oracle", _oracle_attention(p.span[0], length))
    model.set_attn_implementation("mnemo_test_oracle")
    res = detect_retrieval_heads(model, tok, lengths=[length], depths=[depth], teacher_forcing=True)
    assert model.config._attn_implementation == "mnemo_test_oracle"  # custom implementations are kept
    assert res.scores.shape == (2, 4)
    assert res.scores[1, 0] == 1.0
    assert res.scores[1, 1] == 0.0
    assert res.heads[0] == (1, 0) and (1, 1) not in res.heads


def test_detect_on_a_plain_model_restores_sdpa(tiny):
    model = tiny("llama", dtype=torch.float32)
    assert model.config._attn_implementation == "sdpa"
    res = detect_retrieval_heads(model, ByteTokenizer(), lengths=[120], depths=[0.0, 1.0], value_digits=3)
    assert model.config._attn_implementation == "sdpa"
    assert isinstance(res, RetrievalHeads) and res.settings["prompts"] == 2
    assert bool((res.scores >= 0).all()) and bool((res.scores <= 1).all())


def test_mask_heads_makes_heads_uniform_and_is_removed(tiny):
    model = tiny("llama", dtype=torch.float32)
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 257, (1, 12), generator=torch.Generator().manual_seed(0))
    before = model(ids, output_attentions=True)
    with mask_heads(model, [(0, 2), (1, 0)]):
        masked = model(ids, output_attentions=True)
    after = model(ids, output_attentions=True)
    causal = torch.tril(torch.ones(12, 12))
    uniform = causal / causal.sum(-1, keepdim=True)
    for layer, head in [(0, 2), (1, 0)]:
        assert torch.allclose(masked.attentions[layer][0, head], uniform, atol=1e-6)
    # Layer 0's other heads see the same input, so they are untouched.
    for head in (0, 1, 3):
        assert torch.equal(masked.attentions[0][0, head], before.attentions[0][0, head])
    assert not torch.equal(masked.logits, before.logits)
    assert torch.equal(after.logits, before.logits)
    with pytest.raises(ValueError, match="outside the model"):
        with mask_heads(model, [(0, 4)]):
            pass
