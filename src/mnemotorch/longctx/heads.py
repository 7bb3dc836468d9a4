"""Retrieval heads (Wu et al., 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality").

A head is a *retrieval head* when, while the model copies a needle out of a long haystack, its
strongest attention points at the needle token it is copying. The paper's retrieval score of a
head is the fraction of needle tokens it copy-pastes this way, averaged over prompts (context
lengths x needle depths); heads scoring >= 0.1 are retrieval heads (< 5% of heads).

* :func:`retrieval_scores` — the copy-paste score from recorded attention rows (pure function).
* :func:`detect_retrieval_heads` — runs needle prompts through a model and scores every head.
* :func:`mask_heads` — context manager that makes chosen heads attend uniformly (ablation).

The heads found plug into :class:`~mnemotorch.longctx.EpisodicMemory` (``retrieval_heads=``) so
that only they query the episodic store.
"""

from __future__ import annotations

import contextlib
import inspect
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["NeedlePrompt", "RetrievalHeads", "build_needle_prompt", "detect_retrieval_heads", "mask_heads", "retrieval_scores"]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids without special tokens, for a Hugging Face tokenizer or one of ours (``encode``)."""
    if hasattr(tokenizer, "eos_id") or not callable(tokenizer):
        return list(tokenizer.encode(text))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class NeedlePrompt:
    """A needle-in-a-haystack prompt: ``input_ids``, the answer tokens and where they sit."""

    input_ids: list[int]
    answer: list[int]
    span: tuple[int, int]  # positions of the answer tokens inside the needle


def build_needle_prompt(
    tokenizer: Any,
    length: int,
    depth: float,
    value: str,
    *,
    haystack: str | None = None,
    prefix: Sequence[int] = (),
) -> NeedlePrompt:
    """``prefix + haystack[:a] + needle + haystack[a:] + question``, exactly ``length`` tokens.

    The needle is "The special magic number is {value}." and the question ends with "The special
    magic number is", so the answer is a copy of the ``value`` tokens. ``depth`` in ``[0, 1]``
    places the needle (0 = start of the haystack, 1 = end). Pieces are tokenised separately so
    the answer span is exact for any tokenizer.
    """
    if not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    pre = _encode(tokenizer, "The special magic number is")
    ans = _encode(tokenizer, f" {value}")
    post = _encode(tokenizer, ".")
    question = _encode(tokenizer, " What is the special magic number? The special magic number is")
    fill = _encode(tokenizer, haystack if haystack is not None else FILLER)
    n_hay = int(length) - len(prefix) - len(pre) - len(ans) - len(post) - len(question)
    if n_hay < 1 or not fill:
        raise ValueError(f"length {length} is too short for the needle and question ({int(length) - n_hay + 1} tokens needed)")
    hay = (fill * (n_hay // len(fill) + 1))[:n_hay]
    at = int(round(float(depth) * n_hay))
    ids = list(prefix) + hay[:at] + pre
    start = len(ids)
    ids += ans + post + hay[at:] + question
    return NeedlePrompt(input_ids=ids, answer=ans, span=(start, start + len(ans)))


def retrieval_scores(
    attentions: Sequence[Tensor],
    generated: Sequence[int],
    tokens: Sequence[int],
    span: tuple[int, int],
) -> Tensor:
    """The copy-paste retrieval score of every head for one prompt, ``[L, H]``.

    Args:
        attentions: one ``[L, H, N_s]`` tensor per decoding step ``s``: the attention of the
            step's query over the ``N_s`` positions before it (the step that produces token
            ``generated[s]``).
        generated: the token produced at each step.
        tokens: the whole sequence (prompt followed by the generated tokens).
        span: ``[start, end)`` of the needle's answer tokens in ``tokens``.

    At step ``s`` a head earns ``1 / |needle|`` when ``generated[s]`` is a needle token, the
    head's top-1 position lies in ``span`` and holds that token. The top-1 must be strict: a
    head whose largest weight is tied (e.g. uniform attention) points nowhere and earns nothing.
    """
    if not attentions:
        raise ValueError("attentions is empty")
    if len(attentions) != len(generated):
        raise ValueError(f"{len(attentions)} attention rows for {len(generated)} generated tokens")
    a, b = span
    if not 0 <= a < b <= len(tokens):
        raise ValueError(f"span {span} is outside the {len(tokens)} tokens")
    toks = torch.as_tensor(list(tokens), dtype=torch.long)
    needle = set(toks[a:b].tolist())
    n_layers, n_heads = attentions[0].shape[:2]
    hits = torch.zeros(n_layers, n_heads, dtype=torch.long)
    for att, tok in zip(attentions, generated):
        if int(tok) not in needle:
            continue
        att = att.detach().float().cpu()
        if att.shape[-1] < 2:
            continue
        top = att.topk(2, dim=-1)
        pos = top.indices[..., 0]
        strict = top.values[..., 0] > top.values[..., 1]
        hit = strict & (pos >= a) & (pos < b) & (toks[pos.clamp_max(len(toks) - 1)] == int(tok))
        hits += hit.long()
    # Counts first, one division at the end: a perfect copy head scores exactly 1.0.
    return hits.double() / (b - a)


@dataclass
class RetrievalHeads:
    """Result of :func:`detect_retrieval_heads`: ``scores [L, H]`` averaged over prompts."""

    scores: Tensor
    threshold: float = 0.1
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def heads(self) -> list[tuple[int, int]]:
        """``(layer, head)`` with score >= threshold, best first."""
        return self.top(None)

    def top(self, k: int | None) -> list[tuple[int, int]]:
        """The ``k`` best heads at or above the threshold (``None``: all of them), best first."""
        flat = self.scores.flatten()
        order = torch.argsort(flat, descending=True, stable=True).tolist()
        h = self.scores.shape[1]
        out = [(i // h, i % h) for i in order if float(flat[i]) >= self.threshold]
        return out if k is None else out[:k]


def _cache_kw(model: nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@contextlib.contextmanager
def _eager(model: nn.Module) -> Iterator[None]:
    """Attention weights are needed: switch built-in fused kernels to eager, keep custom ones."""
    impl = getattr(model.config, "_attn_implementation", None)
    switch = impl in (None, "sdpa", "flex_attention") or str(impl).startswith("flash") or "paged" in str(impl)
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch and impl is not None:
            model.set_attn_implementation(impl)


@torch.no_grad()
def detect_retrieval_heads(
    model: nn.Module,
    tokenizer: Any,
    *,
    lengths: Sequence[int] = (1000, 2000, 4000),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    value_digits: int = 6,
    threshold: float = 0.1,
    teacher_forcing: bool = False,
    haystack: str | None = None,
    seed: int = 0,
) -> RetrievalHeads:
    """Score every head with the copy-paste retrieval score over needle prompts.

    For each ``(length, depth)``, a prompt with a random ``value_digits``-digit needle is fed,
    then the answer is decoded greedily (``teacher_forcing=True`` feeds the true answer instead:
    useful for small models that cannot retrieve yet, so that copying heads still show) for as
    many steps as the answer has tokens; each step's attention rows are scored by
    :func:`retrieval_scores`. Built-in fused attention (sdpa, flash) is switched to eager for
    the duration, since attention weights are needed.

    Returns:
        :class:`RetrievalHeads` with ``scores [L, H]`` averaged over the prompts; ``.heads``
        lists those >= ``threshold`` (paper: 0.1).
    """
    if not lengths or not depths:
        raise ValueError("lengths and depths must be non-empty")
    if any(int(n) < 1 for n in lengths):
        raise ValueError(f"lengths must be positive, got {list(lengths)}")
    if value_digits < 1:
        raise ValueError(f"value_digits must be >= 1, got {value_digits}")
    model.eval()
    device = next(model.parameters()).device
    bos = getattr(tokenizer, "bos_token_id", None)
    prefix = [int(bos)] if bos is not None else []
    rng = random.Random(seed)
    kw = _cache_kw(model)
    total, n = None, 0
    with _eager(model):
        for length in lengths:
            for depth in depths:
                value = "".join(rng.choice("0123456789") for _ in range(value_digits))
                p = build_needle_prompt(tokenizer, int(length), float(depth), value, haystack=haystack, prefix=prefix)
                ids = torch.tensor([p.input_ids], device=device)
                out = model(input_ids=ids[:, :-1], use_cache=True)
                cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
                cur = ids[:, -1:]
                tokens = list(p.input_ids)
                rows, gen = [], []
                for step in range(len(p.answer)):
                    out = model(input_ids=cur, use_cache=True, output_attentions=True, **{kw: cache})
                    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
                    if not out.attentions or out.attentions[0] is None:
                        raise RuntimeError(f"attention implementation {model.config._attn_implementation!r} returns no weights")
                    rows.append(torch.stack([a[0, :, -1, :] for a in out.attentions]))  # [L, H, N]
                    tok = p.answer[step] if teacher_forcing else int(out.logits[0, -1].argmax())
                    gen.append(tok)
                    tokens.append(tok)
                    cur = torch.tensor([[tok]], device=device)
                s = retrieval_scores(rows, gen, tokens, p.span)
                total = s if total is None else total + s
                n += 1
    settings = {"lengths": [int(x) for x in lengths], "depths": [float(d) for d in depths], "value_digits": value_digits,
                "teacher_forcing": teacher_forcing, "seed": seed, "prompts": n}
    return RetrievalHeads(scores=total / n, threshold=threshold, settings=settings)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    attns = [getattr(layer, "self_attn", None) for layer in (layers or [])]
    if not attns or any(a is None or not hasattr(a, "q_proj") or not hasattr(a, "head_dim") for a in attns):
        raise ValueError(f"mask_heads needs a decoder whose layers have self_attn.q_proj and head_dim; got {type(model).__name__}")
    return attns


@contextlib.contextmanager
def mask_heads(model: nn.Module, heads: Iterable[tuple[int, int]]) -> Iterator[nn.Module]:
    """Make the ``(layer, head)`` heads attend uniformly over their causal prefix, for the block.

    The head's query is zeroed (a forward hook on ``q_proj``), so all its logits are 0 and its
    softmax is uniform — the paper's ablation. Any attention implementation sees the same
    effect. The hooks are removed on exit.
    """
    attns = _attention_modules(model)
    n_heads = int(model.config.num_attention_heads)
    by_layer: dict[int, list[int]] = {}
    for item in heads:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"heads must be (layer, head) pairs, got {item!r}")
        layer, head = int(item[0]), int(item[1])
        if not (0 <= layer < len(attns) and 0 <= head < n_heads):
            raise ValueError(f"head ({layer}, {head}) is outside the model ({len(attns)} layers x {n_heads} heads)")
        by_layer.setdefault(layer, []).append(head)
    handles = []

    def make_hook(idx: list[int], d: int) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
            out = output.clone()
            view = out.view(*out.shape[:-1], -1, d)
            view[..., idx, :] = 0
            return out
        return hook

    try:
        for layer, idx in by_layer.items():
            handles.append(attns[layer].q_proj.register_forward_hook(make_hook(sorted(set(idx)), int(attns[layer].head_dim))))
        yield model
    finally:
        for h in handles:
            h.remove()
