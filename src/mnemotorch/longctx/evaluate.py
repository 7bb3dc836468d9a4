"""Evaluation with a memory applied: what ``mnemo eval passkey --memory em-llm|infllm|none`` calls.

The benchmark code in :mod:`mnemotorch.bench.evaluate` is unchanged; the memory is a context
around it. Budgets default to fractions of the model's training context (``max_position_embeddings``)
so that every relative position the model sees stays inside what it was trained on.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

from .memory import EpisodicMemory, memory_from_name

__all__ = ["default_budgets", "evaluate_passkey_with_memory", "make_memory"]


def default_budgets(train_length: int) -> dict[str, int]:
    """Budgets for a model trained at ``train_length`` tokens (our choice, scaled from the papers'
    Llama-3.1-8B setting of 128 init + 4096 local + 4096 memory at an 8K-128K context).

    ``n_local = L/2``, ``n_mem = L/4``, ``n_init = min(128, L/16)``, ``block = min(512, L/4)``:
    a query sees at most ``n_init + n_mem + max_event + n_local`` < ``L`` tokens, all within
    relative distance ``n_local``.
    """
    if train_length < 64:
        raise ValueError(f"train_length must be >= 64, got {train_length}")
    n_mem = train_length // 4
    return {"n_init": min(128, train_length // 16), "n_local": train_length // 2, "n_mem": n_mem,
            "block": min(512, train_length // 4), "max_event": min(128, n_mem // 2)}


def make_memory(name: str | EpisodicMemory | None, model: Any = None, **overrides: Any) -> EpisodicMemory | None:
    """A memory by name (``"em-llm"``, ``"infllm"``, ``"none"``), budgets from ``model``'s
    ``max_position_embeddings`` (:func:`default_budgets`) unless given in ``overrides``."""
    if name is None or isinstance(name, EpisodicMemory):
        if overrides:
            raise ValueError("overrides are only used when the memory is given by name")
        return name
    if str(name).lower() in ("none", "plain"):
        return memory_from_name("none", **overrides)
    kwargs: dict[str, Any] = {}
    mp = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if mp:
        kwargs.update(default_budgets(int(mp)))
        if kwargs["max_event"] < 8 and "min_event" not in overrides:
            kwargs["min_event"] = 1
    kwargs.update(overrides)
    return memory_from_name(str(name), **kwargs)


def evaluate_passkey_with_memory(
    model: Any,
    memory: str | EpisodicMemory | None = "em-llm",
    lengths: Sequence[int] = (1024, 4096),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    trials: int = 10,
    memory_kwargs: dict[str, Any] | None = None,
    **passkey_kwargs: Any,
) -> dict[str, Any]:
    """:func:`mnemotorch.bench.evaluate.evaluate_passkey` with ``memory`` applied to the model.

    ``model`` is an ``EvalModel`` (``load_eval_model("hf:PATH")``) or a Hugging Face causal LM
    with a tokenizer attached via ``EvalModel``. The result's ``settings["memory"]`` records the
    memory and its budgets (``None`` for the plain model).
    """
    from ..bench.evaluate import _as_eval_model, evaluate_passkey

    em = _as_eval_model(model)
    mem = make_memory(memory, em.model, **(memory_kwargs or {}))
    ctx = mem(em.model) if mem is not None else contextlib.nullcontext()
    with ctx:
        result = evaluate_passkey(em, lengths, depths, trials, **passkey_kwargs)
    if mem is None:
        result["settings"]["memory"] = None
    else:
        fields = {f.name: getattr(mem, f.name) for f in dataclasses.fields(mem)}
        result["settings"]["memory"] = {"name": type(mem).__name__, **fields}
    return result
