"""``pipeline("mnemo-longctx", ...)``: prefill a long context once, answer several questions.

The kvpress pattern (NVIDIA kvpress's ``kv-press-text-generation`` pipeline) with our memories::

    from transformers import pipeline
    import mnemotorch.longctx  # registers the task

    pipe = pipeline("mnemo-longctx", model=model, tokenizer=tokenizer)
    out = pipe(context, questions=["Who ...?", "When ...?"], memory=EpisodicMemory(...))
    out["answers"]        # one greedy answer per question

The context is fed once under the memory (``EpisodicMemory``/``InfLLM``, ``TCAAttention`` or
``None`` for the plain model); every question then continues from that same state: the memory is
restored from a snapshot (:meth:`EpisodicMemory.snapshot`) and the cache is cropped back (or
copied, for caches that cannot crop) after each answer, so questions do not see each other.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from transformers import AutoModelForCausalLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .heads import _cache_kw
from .memory import EpisodicMemory
from .tca import TCAAttention

__all__ = ["LongContextPipeline", "TASK"]

TASK = "mnemo-longctx"


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


class LongContextPipeline(Pipeline):
    """Question answering over one long context with a training-free memory.

    Call: ``pipe(context, question=None, questions=None, memory=None, answer_prefix="",
    max_new_tokens=50)``. ``question`` (str) returns ``{"answer": str}``; ``questions`` (list)
    returns ``{"answers": [str, ...]}``. Answers are greedy and stop at the tokenizer's EOS.
    """

    def _sanitize_parameters(self, question: str | None = None, questions: list[str] | None = None,
                             answer_prefix: str = "", memory: Any = None, max_new_tokens: int = 50,
                             **kwargs: Any) -> tuple[dict, dict, dict]:
        if kwargs:
            raise TypeError(f"unknown argument(s) {sorted(kwargs)}; {TASK} takes question, questions, answer_prefix, "
                            "memory, max_new_tokens")
        if question is not None and questions is not None:
            raise ValueError("pass question (one string) or questions (a list), not both")
        if questions is not None and (isinstance(questions, str) or not all(isinstance(q, str) for q in questions)):
            raise ValueError("questions must be a list of strings")
        if memory is not None and not isinstance(memory, (EpisodicMemory, TCAAttention)):
            raise TypeError(f"memory must be an EpisodicMemory, InfLLM, TCAAttention or None, got {type(memory).__name__}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        single = questions is None
        qs = [question if question is not None else ""] if single else list(questions)
        pre = {"questions": qs, "answer_prefix": answer_prefix}
        fwd = {"memory": memory, "max_new_tokens": max_new_tokens}
        return pre, fwd, {"single": single}

    def preprocess(self, context: str, questions: list[str], answer_prefix: str = "") -> dict[str, Any]:
        if not isinstance(context, str) or not context:
            raise ValueError("context must be a non-empty string")
        ctx = self.tokenizer(context, add_special_tokens=True, return_tensors="pt")["input_ids"]
        qs = [self.tokenizer(q + answer_prefix, add_special_tokens=False, return_tensors="pt")["input_ids"] for q in questions]
        if any(q.shape[1] == 0 for q in qs):
            raise ValueError("every question (with answer_prefix) must be at least one token; give a question or an answer_prefix")
        return {"context_ids": ctx, "question_ids": qs}

    def _forward(self, inputs: dict[str, Any], memory: Any = None, max_new_tokens: int = 50) -> dict[str, Any]:
        model = self.model
        kw = _cache_kw(model)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        ctx = inputs["context_ids"].to(model.device)
        answers: list[list[int]] = []
        with memory(model) if memory is not None else contextlib.nullcontext(), torch.no_grad():
            out = model(input_ids=ctx, use_cache=True)
            cache = _cache_of(out)
            n_ctx = ctx.shape[1]
            snap = memory.snapshot() if isinstance(memory, EpisodicMemory) else None
            # An episodic memory's HF cache only counts tokens (cheap to copy); plain KV caches are
            # cropped back instead of copied, so the context's KV is never duplicated.
            crop = snap is None and hasattr(cache, "crop") and type(cache).__name__ != "MnemoCache"
            for q in inputs["question_ids"]:
                qcache = cache if crop else copy.deepcopy(cache)
                out = model(input_ids=q.to(model.device), use_cache=True, **{kw: qcache})
                qcache = _cache_of(out)
                tokens: list[int] = []
                for step in range(max_new_tokens):
                    tok = int(out.logits[0, -1].argmax())
                    if eos is not None and tok == eos:
                        break
                    tokens.append(tok)
                    if step + 1 < max_new_tokens:
                        out = model(input_ids=torch.tensor([[tok]], device=model.device), use_cache=True, **{kw: qcache})
                        qcache = _cache_of(out)
                answers.append(tokens)
                extra = int(cache.get_seq_length()) - n_ctx if crop else 0
                if extra > 0:
                    cache.crop(-extra)  # negative = drop that many: the meaning every 5.x version shares
                if snap is not None:
                    memory.restore(snap)
        return {"answers": answers}

    def postprocess(self, outputs: dict[str, Any], single: bool = True) -> dict[str, Any]:
        texts = [self.tokenizer.decode(a, skip_special_tokens=True) for a in outputs["answers"]]
        return {"answer": texts[0]} if single else {"answers": texts}

    # Pipeline.__call__ batches on lists; a context is one input, so run it directly.
    def __call__(self, context: str, **kwargs: Any) -> dict[str, Any]:
        pre, fwd, post = self._sanitize_parameters(**kwargs)
        return self.postprocess(self._forward(self.preprocess(context, **pre), **fwd), **post)


PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=LongContextPipeline, pt_model=AutoModelForCausalLM)
