"""Concept injection (Lindsey et al., 2025, "Emergent Introspective Awareness in Large Language Models").

A *concept vector* is the residual-stream activation at the last token of a prompt about a word,
minus the mean of the same activation over baseline words, at a layer about two thirds through
the model. *Injection* adds ``alpha * v`` to the residual stream at that layer at every position
from ``start`` on, also while generating. The paper then asks the model whether it notices an
injected thought; every injected trial is paired with a control trial without injection, so a
model that always says "yes" is not mistaken for one that introspects.

This module is the harness only: it makes no claim that a small model can report injections.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._model import as_ids, decode, decoder_layers, encode, residual_stream, resolve_layer

__all__ = ["ConceptInjector", "InjectionTrials", "concept_vector", "default_layer", "run_injection_trials"]


def default_layer(model: nn.Module) -> int:
    """The layer about two thirds through the model, ``round(2 L / 3)`` clipped to ``L - 1``."""
    n = len(decoder_layers(model))
    return min(n - 1, int(round(2 * n / 3)))


@torch.no_grad()
def concept_vector(
    model: nn.Module,
    tokenizer: Any,
    word: str,
    baseline_words: Sequence[str],
    *,
    layer: int | None = None,
    template: str = "Tell me about {}.",
) -> Tensor:
    """``v = h_l(prompt(word))[-1] - mean_b h_l(prompt(b))[-1]``, ``[dim]``.

    Args:
        word: the concept.
        baseline_words: other words whose mean activation is subtracted (paper: ~100 words).
        layer: decoder layer whose output is read (default :func:`default_layer`).
        template: the prompt, with ``{}`` where the word goes.
    """
    if "{}" not in template:
        raise ValueError(f"template must contain '{{}}' where the word goes, got {template!r}")
    if isinstance(baseline_words, str) or len(baseline_words) == 0:
        raise ValueError("baseline_words must be a non-empty list of words")
    layer = default_layer(model) if layer is None else resolve_layer(model, layer)

    def last(w: str) -> Tensor:
        return residual_stream(model, encode(tokenizer, template.format(w)), layer)[0, -1]

    base = torch.stack([last(w) for w in baseline_words]).mean(0)
    return last(word) - base


def _offset(module: nn.Module, args: tuple, kwargs: dict, length: int, device: torch.device) -> Tensor:
    """Absolute positions ``[T]`` (or ``[B, T]``) of the tokens in this call of a decoder layer.

    Hugging Face layers get ``position_ids`` / ``cache_position``; our blocks get their mixer
    state, which counts the tokens seen. Without either, the call is a whole sequence from 0.
    """
    for key in ("position_ids", "cache_position"):
        pos = kwargs.get(key)
        if isinstance(pos, Tensor) and pos.shape[-1] == length:
            return pos.to(device)
    state = args[1] if len(args) > 1 else kwargs.get("state")
    seen = int(getattr(state, "seen_tokens", 0) or 0)
    return torch.arange(seen, seen + length, device=device)


class ConceptInjector:
    """Context manager that adds ``alpha * vector`` to the residual stream after decoder layer ``layer``.

    Args:
        model: a Hugging Face causal LM (ours included).
        layer: decoder layer whose output is modified (negative counts from the end).
        vector: ``[dim]`` (all sequences) or ``[B, dim]`` (one per sequence).
        alpha: injection strength.
        start: first absolute token position that receives the vector; earlier positions are
            untouched. Positions come from the layer's ``position_ids`` (Hugging Face) or the
            mixer state (ours), so the injection continues correctly through cached ``generate()``.

    The hook is registered on ``__enter__`` and removed on ``__exit__``, even after an error.
    Padding is not modelled: with left-padded batches, ``start`` counts the positions the model uses.
    """

    def __init__(self, model: nn.Module, layer: int, vector: Tensor, alpha: float = 1.0, start: int = 0):
        self.model = model
        self.layer = resolve_layer(model, layer)
        if not isinstance(vector, Tensor) or vector.ndim not in (1, 2) or not vector.is_floating_point():
            raise ValueError(f"vector must be a float tensor [dim] or [B, dim], got {getattr(vector, 'shape', type(vector))}")
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise ValueError(f"start must be an int >= 0, got {start!r}")
        self.vector = vector.detach()
        self.alpha = float(alpha)
        self.start = start
        self._handle: Any = None
        self.calls = 0  # forward calls that touched at least one position (for checks and logs)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden = output if isinstance(output, Tensor) else output[0]
        b, t, d = hidden.shape
        if self.vector.shape[-1] != d:
            raise ValueError(f"vector has dim {self.vector.shape[-1]} but layer {self.layer}'s hidden size is {d}")
        vec = self.vector.to(device=hidden.device, dtype=hidden.dtype)
        if vec.ndim == 2:
            if vec.shape[0] != b:
                raise ValueError(f"vector is [{vec.shape[0]}, dim] but the batch has {b} sequences")
            vec = vec[:, None, :]
        pos = _offset(module, args, kwargs, t, hidden.device)
        mask = (pos >= self.start).to(hidden.dtype)
        mask = mask[..., None] if mask.ndim == 2 else mask[None, :, None]  # [B or 1, T, 1]
        if not bool(mask.any()):
            return output
        self.calls += 1
        new = hidden + self.alpha * vec * mask
        if isinstance(output, Tensor):
            return new
        return (new, *output[1:]) if isinstance(output, tuple) else type(output)([new, *output[1:]])

    def __enter__(self) -> ConceptInjector:
        if self._handle is not None:
            raise RuntimeError("ConceptInjector is already active")
        block = decoder_layers(self.model)[self.layer]
        self._handle = block.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _mentions(word: str) -> Callable[[str], bool]:
    pattern = re.compile(r"\b" + re.escape(word.lower()) + r"\b")
    return lambda text: bool(pattern.search(text.lower()))


@dataclass
class InjectionTrials:
    """Paired trials: each injected trial has a control with the same prompt and random seed.

    ``trials`` rows: ``concept, alpha, seed, injected, control`` (generated texts) and
    ``injected_hit, control_hit`` (what the grader said about each).
    """

    trials: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)

    def rates(self) -> dict[str, float]:
        """Hit rate with injection, false-alarm rate of the controls, and their difference."""
        n = len(self.trials)
        hit = sum(bool(r["injected_hit"]) for r in self.trials) / n
        fa = sum(bool(r["control_hit"]) for r in self.trials) / n
        return {"injected": hit, "control": fa, "difference": hit - fa, "trials": n}


@torch.no_grad()
def _generate(model: nn.Module, ids: Tensor, max_new_tokens: int, do_sample: bool, temperature: float, seed: int) -> list[int]:
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "attention_mask": torch.ones_like(ids)}
    if do_sample:
        kwargs["temperature"] = temperature
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad is None:
        eos = getattr(model.config, "eos_token_id", None)
        kwargs["pad_token_id"] = eos if eos is not None else 0
    out = model.generate(ids, **kwargs)
    return out[0, ids.shape[1] :].tolist()


def run_injection_trials(
    model: nn.Module,
    tokenizer: Any,
    concepts: Mapping[str, Tensor],
    prompt: str,
    *,
    layer: int | None = None,
    alphas: Sequence[float] = (4.0,),
    start: int | None = None,
    seeds: Sequence[int] = (0,),
    max_new_tokens: int = 24,
    do_sample: bool = False,
    temperature: float = 1.0,
    grader: Callable[[str, str], bool] | None = None,
) -> InjectionTrials:
    """Run injected trials, each paired with a no-injection control (same prompt, same seed).

    Args:
        concepts: ``{word: vector [dim]}``, e.g. from :func:`concept_vector`.
        prompt: the question put to the model (e.g. "Do you detect an injected thought? ...").
        layer: injection layer (default :func:`default_layer`).
        alphas: strengths; one trial per ``(concept, alpha, seed)``.
        start: first injected position (default: the prompt's last token, so the injection
            covers the whole response).
        seeds: sampling seeds (with ``do_sample=False`` decoding is greedy and one seed suffices).
        grader: ``grader(response, concept) -> bool``, whether a response reports the concept;
            default: the concept word appears in the response (case-insensitive, whole word).
    """
    if not concepts:
        raise ValueError("concepts is empty")
    if not alphas or not seeds:
        raise ValueError("alphas and seeds must be non-empty")
    layer = default_layer(model) if layer is None else resolve_layer(model, layer)
    model.eval()
    ids = as_ids(encode(tokenizer, prompt), model)
    start = ids.shape[1] - 1 if start is None else start
    rows = []
    for word, vec in concepts.items():
        judge = (lambda text, w=word: grader(text, w)) if grader is not None else _mentions(word)
        for alpha in alphas:
            for seed in seeds:
                control = decode(tokenizer, _generate(model, ids, max_new_tokens, do_sample, temperature, seed))
                with ConceptInjector(model, layer, vec, alpha=alpha, start=start):
                    injected = decode(tokenizer, _generate(model, ids, max_new_tokens, do_sample, temperature, seed))
                rows.append({"concept": word, "alpha": float(alpha), "seed": int(seed), "injected": injected, "control": control,
                             "injected_hit": judge(injected), "control_hit": judge(control)})
    settings = {"layer": layer, "start": start, "prompt": prompt, "max_new_tokens": max_new_tokens, "do_sample": do_sample}
    return InjectionTrials(trials=rows, settings=settings)
