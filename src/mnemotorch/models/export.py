"""Export an attention-only :class:`MnemoForCausalLM` as a Hugging Face ``LlamaForCausalLM``.

An attention-only mnemo model *is* the Llama architecture: pre-norm blocks of
RMSNorm -> multi-head (GQA) causal attention with rotate-half RoPE -> residual -> RMSNorm ->
SwiGLU -> residual, a final RMSNorm and a (tied) output head, no biases. Exporting it lets the
same weights run through ``transformers``' own ``LlamaForCausalLM`` -- the model class users point
``mnemotorch.longctx`` at -- so what we measure on our evaluation model is measured on real
``transformers`` code, not on our re-implementation of it.

    from mnemotorch.models.export import save_as_llama
    save_as_llama(model, tokenizer, "runs/eval_model/hf", max_position_embeddings=1024)
    # then: mnemo eval passkey --model hf:runs/eval_model/hf ...

The parameter mapping (ours -> Llama):
``model.layers.i.mixer_norm`` -> ``model.layers.i.input_layernorm``,
``model.layers.i.mixer.{q,k,v,o}_proj`` -> ``model.layers.i.self_attn.{q,k,v,o}_proj``,
``model.layers.i.mlp_norm`` -> ``model.layers.i.post_attention_layernorm``; embeddings, MLP,
final norm and head keep their names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .modeling import MnemoForCausalLM

__all__ = ["ExportError", "llama_config_from", "save_as_llama", "to_llama"]


class ExportError(ValueError):
    """The model cannot be expressed as a Llama model (names the layer and the reason)."""


def _check_exportable(model: MnemoForCausalLM) -> None:
    from ..layers.attention import CausalSelfAttention

    if not isinstance(model, MnemoForCausalLM):
        raise ExportError(f"model must be a MnemoForCausalLM, got {type(model).__name__}")
    cfg = model.config
    if not cfg.intermediate_size:
        raise ExportError("intermediate_size is 0 (blocks without an MLP); Llama blocks always have a SwiGLU MLP")
    for i, block in enumerate(model.model.layers):
        mixer = block.mixer
        if type(mixer) is not CausalSelfAttention:
            raise ExportError(
                f"layer {i} is a {type(mixer).__name__!r} mixer; only plain 'attention' layers (RoPE, GQA) map onto "
                "LlamaForCausalLM. Other mixers stay MnemoForCausalLM models (save_pretrained works for those)"
            )
        if not mixer.rope:
            raise ExportError(f"layer {i}: attention without RoPE has no Llama equivalent")


def llama_config_from(model: MnemoForCausalLM, max_position_embeddings: int) -> Any:
    """The ``LlamaConfig`` equal to ``model``'s architecture.

    ``max_position_embeddings`` is the context the model was trained at: ``transformers`` uses it
    only as metadata for plain RoPE, and :mod:`mnemotorch.longctx` derives its default budgets from it.
    """
    from transformers import LlamaConfig

    _check_exportable(model)
    if isinstance(max_position_embeddings, bool) or not isinstance(max_position_embeddings, int) or max_position_embeddings <= 0:
        raise ExportError(f"max_position_embeddings must be a positive int (the training context), got {max_position_embeddings!r}")
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = cfg.num_key_value_heads or heads
    mixer = model.model.layers[0].mixer
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=cfg.hidden_size // heads,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(mixer.rope_theta)},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=bool(cfg.tie_word_embeddings),
        initializer_range=cfg.initializer_range,
    )


def _rename(name: str) -> str:
    name = name.replace(".mixer_norm.", ".input_layernorm.").replace(".mlp_norm.", ".post_attention_layernorm.")
    return name.replace(".mixer.", ".self_attn.")


def to_llama(model: MnemoForCausalLM, max_position_embeddings: int) -> Any:
    """A ``LlamaForCausalLM`` with ``model``'s weights (copied; same dtype and device).

    Raises:
        ExportError: a layer is not plain RoPE attention, or the blocks have no MLP.
    """
    from transformers import LlamaForCausalLM

    config = llama_config_from(model, max_position_embeddings)
    first = next(model.parameters())
    llama = LlamaForCausalLM(config).to(device=first.device, dtype=first.dtype)
    ours = {_rename(k): v for k, v in model.state_dict().items()}
    theirs = llama.state_dict()
    missing = sorted(set(theirs) - set(ours) - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    extra = sorted(set(ours) - set(theirs))
    if missing or extra:
        raise ExportError(f"parameter names do not map onto Llama: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, v in ours.items():
        if tuple(theirs[k].shape) != tuple(v.shape):
            raise ExportError(f"{k}: shape {tuple(v.shape)} != Llama's {tuple(theirs[k].shape)}")
    with torch.no_grad():
        for k, v in ours.items():
            theirs[k].copy_(v)
    if config.tie_word_embeddings:
        llama.tie_weights()
    return llama.eval()


def save_as_llama(model: MnemoForCausalLM, tokenizer: Any, path: str | os.PathLike[str], max_position_embeddings: int) -> Path:
    """Write ``model`` as a ``LlamaForCausalLM`` directory (config, safetensors weights, tokenizer).

    Args:
        model: an attention-only :class:`MnemoForCausalLM`.
        tokenizer: our :class:`~mnemotorch.tasks.tokenizer.BPETokenizer` (saved as a
            ``PreTrainedTokenizerFast`` whose EOS is ``<|endoftext|>`` and that adds no BOS, as in
            training), an HF tokenizer (saved as is), or ``None``.
        path: output directory, loadable with ``AutoModelForCausalLM.from_pretrained`` and
            ``mnemo eval ... --model hf:PATH``.
        max_position_embeddings: the training context.
    """
    path = Path(path).expanduser()
    llama = to_llama(model, max_position_embeddings)
    path.mkdir(parents=True, exist_ok=True)
    llama.save_pretrained(path)
    if tokenizer is not None:
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(path)
        elif hasattr(tokenizer, "hf_tokenizer"):
            from transformers import PreTrainedTokenizerFast

            eos = getattr(tokenizer, "EOS_TOKEN", "<|endoftext|>")
            PreTrainedTokenizerFast(tokenizer_object=tokenizer.hf_tokenizer, eos_token=eos, bos_token=eos).save_pretrained(path)
        else:
            raise ExportError(
                f"tokenizer {type(tokenizer).__name__} has no Hugging Face form (the byte tokenizer has none); "
                "train with the BPE tokenizer or pass tokenizer=None"
            )
    return path
