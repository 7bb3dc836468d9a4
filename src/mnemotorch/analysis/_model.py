"""Model plumbing shared by the analysis tools: decoder layers, residual-stream capture, attention maps.

Works on any Hugging Face causal LM whose decoder layers sit in a list (``model.model.layers`` for
Llama/Mistral/Qwen and our :class:`~mnemotorch.models.MnemoForCausalLM`, ``model.transformer.h``
for GPT-2, ``model.gpt_neox.layers``, ...), and on our own models, whose attention mixers never
materialise their weights: for those, :func:`attention_maps` recovers the weights exactly by
running the mixer's own attention once more with one-hot values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["attention_maps", "decoder_layers", "encode", "residual_stream", "resolve_layer"]

_LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.layers", "layers")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of ``model`` (the residual stream passes through each in turn)."""
    for path in _LAYER_PATHS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, (nn.ModuleList, list, tuple)) and len(obj) > 0:
            return obj  # type: ignore[return-value]
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}: looked for {', '.join(_LAYER_PATHS)}"
    )


def resolve_layer(model: nn.Module, layer: int, argument: str = "layer") -> int:
    """Check a layer index (negative counts from the end) and return it as ``0 .. L-1``."""
    n = len(decoder_layers(model))
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise TypeError(f"{argument} must be an int, got {layer!r}")
    if not -n <= layer < n:
        raise ValueError(f"{argument}={layer} is out of range: the model has {n} layers (0 .. {n - 1}, or -{n} .. -1)")
    return layer % n


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens, for a Hugging Face tokenizer or one of ours."""
    if hasattr(tokenizer, "eos_id") or not callable(tokenizer):
        return list(tokenizer.encode(text))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    if hasattr(tokenizer, "eos_id"):
        return tokenizer.decode(list(ids))
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def as_ids(input_ids: Tensor | Sequence[int], model: nn.Module, argument: str = "input_ids") -> Tensor:
    """``input_ids`` as a ``[B, T]`` long tensor on the model's device (a flat list becomes ``[1, T]``)."""
    ids = torch.as_tensor(input_ids) if not isinstance(input_ids, Tensor) else input_ids
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.shape[1] == 0:
        raise ValueError(f"{argument} must be integer token ids [B, T] or [T] with T > 0, got {tuple(ids.shape)} {ids.dtype}")
    return ids.long().to(next(model.parameters()).device)


def _hidden(output: Any) -> Tensor:
    """The hidden states in a decoder layer's output (a tensor, or the first item of a tuple)."""
    return output if isinstance(output, Tensor) else output[0]


@torch.no_grad()
def residual_stream(model: nn.Module, input_ids: Tensor | Sequence[int], layer: int) -> Tensor:
    """The residual stream after decoder layer ``layer`` (its output), ``[B, T, dim]``.

    Captured with a forward hook (removed before returning), so it works for models that do not
    support ``output_hidden_states``. Layer ``L - 1``'s output is taken before the final norm.
    """
    layer = resolve_layer(model, layer)
    ids = as_ids(input_ids, model)
    seen: list[Tensor] = []
    handle = decoder_layers(model)[layer].register_forward_hook(lambda m, a, out: seen.append(_hidden(out).detach()))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return seen[0]


def _softmax_mixers() -> tuple[type, ...]:
    from ..layers.attention import CausalSelfAttention, SlidingWindowAttention
    from ..layers.pattern_attention import _PatternAttention
    from ..layers.relative import RelativeAttention

    return (CausalSelfAttention, SlidingWindowAttention, _PatternAttention, RelativeAttention)


@contextlib.contextmanager
def _record_mnemo(mixers: dict[int, nn.Module], out: dict[int, Tensor]) -> Iterator[None]:
    """Record ``[B, H, Tq, Tk]`` weights of our softmax mixers during one forward.

    Each mixer's output is linear in its values, ``y = A v``: calling the mixer's own attention
    with ``v`` = the identity over key positions returns ``A`` itself, with the mixer's exact
    mask, scale, positions and biases, without re-implementing any of them here. The reference
    backend is used for that call (fused kernels expect the value width to equal the key width).
    """
    saved = {}

    def make(idx: int, mixer: nn.Module) -> Any:
        orig = type(mixer)._attend_at.__get__(mixer)

        def attend_at(q: Tensor, k: Tensor, v: Tensor, q_start: int, k_start: int) -> Tensor:
            y = orig(q, k, v, q_start, k_start)
            b, tk, hkv = k.shape[0], k.shape[1], k.shape[2]
            eye = torch.eye(tk, dtype=q.dtype, device=q.device).view(1, tk, 1, tk).expand(b, tk, hkv, tk)
            backend = mixer.backend
            mixer.backend = "reference"
            try:
                weights = orig(q, k, eye, q_start, k_start)  # [B, Tq, H, Tk]
            finally:
                mixer.backend = backend
            out[idx] = weights.permute(0, 2, 1, 3).detach()
            return y

        return attend_at

    try:
        for idx, mixer in mixers.items():
            saved[idx] = mixer
            mixer._attend_at = make(idx, mixer)  # instance attribute shadows the method
        yield
    finally:
        for mixer in saved.values():
            del mixer._attend_at


@torch.no_grad()
def attention_maps(model: nn.Module, input_ids: Tensor | Sequence[int], layers: Sequence[int] | None = None) -> Tensor:
    """Attention weights of every head of the chosen layers, ``[L', B, H, T, T]`` (rows sum to 1).

    Args:
        model: a Hugging Face causal LM loaded with ``attn_implementation="eager"`` (the fused
            ``sdpa``/``flash_attention_2`` kernels never form the weights), or one of our
            :class:`~mnemotorch.models.MnemoForCausalLM` models (softmax mixers: ``attention``,
            ``sliding_window``, ``power``, ``neighborhood``, ``relative``).
        input_ids: ``[B, T]`` or ``[T]`` token ids.
        layers: which decoder layers (default: all).

    Row ``t`` of a map is the distribution of query ``t`` over keys ``0 .. T-1`` (zero above
    the diagonal). Grouped-query models give one map per query head.
    """
    n = len(decoder_layers(model))
    chosen = list(range(n)) if layers is None else [resolve_layer(model, int(i), "layers") for i in layers]
    if not chosen:
        raise ValueError("layers is empty")
    ids = as_ids(input_ids, model)
    from ..models import MnemoForCausalLM, MnemoModel

    if isinstance(model, (MnemoForCausalLM, MnemoModel)):
        blocks = decoder_layers(model)
        softmax = _softmax_mixers()
        bad = [f"{i} ({type(blocks[i].mixer).__name__})" for i in chosen if not isinstance(blocks[i].mixer, softmax)]
        if bad:
            ok = [i for i in range(n) if isinstance(blocks[i].mixer, softmax)]
            raise ValueError(f"layers {', '.join(bad)} have no softmax attention weights; layers with softmax attention: {ok}")
        recorded: dict[int, Tensor] = {}
        with _record_mnemo({i: blocks[i].mixer for i in chosen}, recorded):
            model(input_ids=ids, use_cache=False)
        return torch.stack([recorded[i] for i in chosen])
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    out = model(input_ids=ids, output_attentions=True, use_cache=False)
    atts = getattr(out, "attentions", None)
    if not atts or any(a is None for a in atts):
        raise ValueError(
            f"{type(model).__name__} returned no attention weights (attn_implementation={impl!r}); load it with "
            "attn_implementation=\"eager\" (from_pretrained(..., attn_implementation=\"eager\")) or call "
            "model.set_attn_implementation(\"eager\")"
        )
    if len(atts) != n:
        raise ValueError(f"the model returned {len(atts)} attention maps for {n} decoder layers")
    return torch.stack([atts[i].detach() for i in chosen])
