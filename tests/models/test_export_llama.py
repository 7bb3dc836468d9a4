"""mnemotorch.models.export: an attention-only MnemoForCausalLM is a LlamaForCausalLM."""

from __future__ import annotations

import pytest
import torch

from mnemotorch.models import MnemoConfig, MnemoForCausalLM
from mnemotorch.models.export import ExportError, save_as_llama, to_llama
from mnemotorch.tasks import BPETokenizer


def _model(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    cfg.update(kw)
    return MnemoForCausalLM(MnemoConfig(**cfg))


@pytest.mark.parametrize("tied", [True, False])
def test_llama_logits_equal_ours(tied):
    model = _model(tie_word_embeddings=tied, rope_theta=5000.0).double()
    llama = to_llama(model, max_position_embeddings=128)
    assert type(llama).__name__ == "LlamaForCausalLM"
    x = torch.randint(0, 300, (2, 37))
    ours, theirs = model(x).logits, llama(x).logits
    # HF's LlamaRMSNorm normalises in float32 even for a float64 model: agreement to ~1e-7, not 1e-12.
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert llama.config.max_position_embeddings == 128
    assert (llama.lm_head.weight.data_ptr() == llama.model.embed_tokens.weight.data_ptr()) == tied


def test_saved_llama_loads_as_hf_eval_model(tmp_path):
    from mnemotorch.bench.evaluate import load_eval_model

    model = _model()
    tok = BPETokenizer.train("the pass key is 12345. remember it. " * 40, vocab_size=300)
    save_as_llama(model, tok, tmp_path / "hf", max_position_embeddings=64)
    em = load_eval_model(f"hf:{tmp_path / 'hf'}", device="cpu")
    assert em.kind == "hf" and em.max_positions == 64
    assert em.prefix_ids == []  # trained without BOS: the exported tokenizer adds none
    assert em.encode("the pass key") == tok.encode("the pass key")
    x = torch.randint(0, 300, (1, 20))
    torch.testing.assert_close(em.model(x).logits, model(x).logits, rtol=0, atol=1e-4)


def test_export_refuses_non_attention_layers(tmp_path):
    with pytest.raises(ExportError, match="layer 1 .*'SlidingWindowAttention'"):
        to_llama(_model(layer_plan=["attention", {"type": "sliding_window", "window": 8}]), 64)
    with pytest.raises(ExportError, match="intermediate_size is 0"):
        to_llama(_model(intermediate_size=0), 64)
    with pytest.raises(ExportError, match="max_position_embeddings"):
        to_llama(_model(), 0)
    from mnemotorch.tasks import ByteTokenizer

    with pytest.raises(ExportError, match="byte tokenizer"):
        save_as_llama(_model(vocab_size=257), ByteTokenizer(), tmp_path / "x", 64)
