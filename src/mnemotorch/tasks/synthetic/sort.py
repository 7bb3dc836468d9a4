"""SORT — Sequence Order Recall Tasks (Book-SORT style): which of two segments came first?

Pink, Vo, Wu, Mu, Turek, Hasson, Norman, Michelmann, Huth, Toneva (2024), "Assessing Episodic
Memory in LLMs with Sequence Order Recall Tasks", arXiv:2410.08133. Reimplemented from the paper.

An example takes an excerpt of ``excerpt_words`` consecutive words of a text and two
non-overlapping segments of ``segment_words`` words from it, each occurring exactly once in the
excerpt. It shows them as "Segment A" and "Segment B"; the answer is the label of the segment that
came first. Over ``num_examples`` (even) examples exactly half have answer ``"A"``, so a model that
always answers the same scores exactly 50%.

Conditions (``condition=`` of :func:`sort_prompt` / :func:`evaluate_sort`):

* ``"in_context"``: the excerpt is in the prompt before the question;
* ``"no_context"``: the question alone — the text can only be known from training (parametric
  memory) or from a memory that the caller has filled beforehand.

:func:`evaluate_sort` scores any causal LM that maps ``input_ids`` to ``.logits`` (ours, or a
Hugging Face ``AutoModelForCausalLM``) by comparing ``log p(" A" | prompt)`` with
``log p(" B" | prompt)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._common import check_int, numpy_rng

__all__ = ["SORT_CONDITIONS", "SortExample", "evaluate_sort", "make_sort_examples", "sort_oracle", "sort_prompt"]

#: Conditions understood by :func:`sort_prompt` and :func:`evaluate_sort`.
SORT_CONDITIONS: tuple[str, ...] = ("in_context", "no_context")
_ANSWERS = ("A", "B")
_WORD_SPAN = re.compile(r"\S+")
_MAX_TRIES = 1000


@dataclass(frozen=True)
class SortExample:
    """One SORT item.

    Attributes:
        excerpt: the text excerpt (original spacing kept).
        segment_a: the segment shown as "Segment A".
        segment_b: the segment shown as "Segment B".
        answer: ``"A"`` or ``"B"``, the label of the segment that occurs first in ``excerpt``.
        first_word: word offset (in the excerpt) of the earlier segment.
        second_word: word offset of the later segment.
        distance: words between the end of the earlier segment and the start of the later one.
        excerpt_start: word offset of the excerpt in the whole text.
    """

    excerpt: str
    segment_a: str
    segment_b: str
    answer: str
    first_word: int
    second_word: int
    distance: int
    excerpt_start: int


def make_sort_examples(
    text: str,
    num_examples: int,
    excerpt_words: int = 1000,
    segment_words: int = 20,
    min_distance: int = 0,
    max_distance: int | None = None,
    seed: int = 0,
) -> list[SortExample]:
    """Draw SORT examples from ``text``, balanced: exactly ``num_examples / 2`` answers are "A".

    Args:
        text: the source text (a book); words are runs of non-whitespace.
        num_examples: even, so that the answers can be split exactly in half.
        excerpt_words: words per excerpt (Book-SORT: 250 to 20,000).
        segment_words: words per segment (Book-SORT: 20 or 50).
        min_distance, max_distance: bounds on the words between the two segments (a distance
            bin); ``max_distance=None`` allows up to ``excerpt_words - 2 * segment_words``.
        seed: the examples are a pure function of the arguments and ``seed``.

    Raises:
        ValueError: ``num_examples`` odd; the text has fewer than ``excerpt_words`` words;
            ``2 * segment_words + min_distance > excerpt_words``; or no pair of segments that
            each occur once could be found.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    n_ex = check_int(num_examples, "num_examples", 2)
    if n_ex % 2:
        raise ValueError(f"num_examples must be even so that exactly half the answers are 'A', got {n_ex}")
    e_words = check_int(excerpt_words, "excerpt_words", 2)
    s_words = check_int(segment_words, "segment_words", 1)
    d_min = check_int(min_distance, "min_distance", 0)
    room = e_words - 2 * s_words
    if room < d_min:
        raise ValueError(
            f"need 2 * segment_words + min_distance <= excerpt_words, got 2*{s_words} + {d_min} > {e_words}"
        )
    d_max = room if max_distance is None else min(check_int(max_distance, "max_distance", d_min), room)
    spans = [(m.start(), m.end()) for m in _WORD_SPAN.finditer(text)]
    if len(spans) < e_words:
        raise ValueError(f"text has {len(spans)} words, fewer than excerpt_words={e_words}")
    rng = numpy_rng(seed)
    answers = np.array(["A"] * (n_ex // 2) + ["B"] * (n_ex // 2))
    rng.shuffle(answers)
    examples = []
    for answer in answers:
        for _ in range(_MAX_TRIES):
            start = int(rng.integers(0, len(spans) - e_words + 1))
            words = [text[a:b] for a, b in spans[start : start + e_words]]
            distance = int(rng.integers(d_min, d_max + 1))
            first = int(rng.integers(0, room - distance + 1))
            second = first + s_words + distance
            seg1, seg2 = tuple(words[first : first + s_words]), tuple(words[second : second + s_words])
            # Each segment must occur once in the excerpt, or "which came first" is ill-defined.
            if _count(words, seg1) == 1 and _count(words, seg2) == 1:
                break
        else:
            raise ValueError(f"could not find two segments occurring once each in {_MAX_TRIES} excerpts of the text")
        e_lo, e_hi = spans[start][0], spans[start + e_words - 1][1]
        s1 = text[spans[start + first][0] : spans[start + first + s_words - 1][1]]
        s2 = text[spans[start + second][0] : spans[start + second + s_words - 1][1]]
        a, b = (s1, s2) if answer == "A" else (s2, s1)
        examples.append(
            SortExample(
                excerpt=text[e_lo:e_hi], segment_a=a, segment_b=b, answer=str(answer),
                first_word=first, second_word=second, distance=distance, excerpt_start=start,
            )
        )
    return examples


def _count(words: list[str], segment: tuple[str, ...]) -> int:
    n = len(segment)
    first = segment[0]
    return sum(1 for i in range(len(words) - n + 1) if words[i] == first and tuple(words[i : i + n]) == segment)


def sort_prompt(example: SortExample, condition: str = "in_context") -> str:
    """The prompt, ending with ``"Answer: Segment"``; the answer continues with ``" A"`` or ``" B"``."""
    if condition not in SORT_CONDITIONS:
        raise ValueError(f"condition must be one of {list(SORT_CONDITIONS)}, got {condition!r}")
    where = "the text above" if condition == "in_context" else "the book"
    question = (
        f"Question: Which of the following two segments of {where} appeared first?\n"
        f'Segment A: "{" ".join(example.segment_a.split())}"\n'
        f'Segment B: "{" ".join(example.segment_b.split())}"\n'
        "Answer: Segment"
    )
    if condition == "in_context":
        return example.excerpt + "\n\n" + question
    return question


def sort_oracle(example: SortExample) -> str:
    """The answer of an exact string matcher that reads the excerpt (scores 100%)."""
    norm = " ".join(example.excerpt.split())
    pos_a = norm.find(" ".join(example.segment_a.split()))
    pos_b = norm.find(" ".join(example.segment_b.split()))
    if pos_a < 0 or pos_b < 0:
        raise ValueError("a segment does not occur in the excerpt")
    return "A" if pos_a < pos_b else "B"


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=special))
    except TypeError:
        return list(tokenizer.encode(text))


@torch.no_grad()
def evaluate_sort(
    model: Any,
    tokenizer: Any,
    examples: list[SortExample],
    condition: str = "in_context",
    device: Any = None,
) -> dict[str, Any]:
    """Accuracy of a causal LM on SORT by comparing the log-probabilities of the two answers.

    For each example, ``log p(" A" | prompt)`` and ``log p(" B" | prompt)`` (summed over the
    answer's tokens) are compared; the larger one is the model's choice.

    Args:
        model: a causal LM: ``model(input_ids=[1, T]).logits`` is ``[1, T, V]`` (ours or HF).
        tokenizer: ``encode(text) -> list[int]``; a Hugging Face tokenizer adds its special
            tokens (BOS) to the prompt only.
        examples: from :func:`make_sort_examples`.
        condition: one of :data:`SORT_CONDITIONS`.
        device: where to run; default the model's device.

    Returns:
        ``{"accuracy", "num_examples", "always_a_accuracy" (0.5 for balanced examples),
        "choices" (list of "A"/"B"), "logprob_margin" (mean log p(correct) - log p(wrong))}``.
    """
    if not examples:
        raise ValueError("examples is empty")
    if device is None:
        device = next(model.parameters()).device
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    choices, margins = [], []
    try:
        for ex in examples:
            prompt = sort_prompt(ex, condition)
            prompt_ids = _encode(tokenizer, prompt, special=True)
            conts = []
            for ans in _ANSWERS:
                full = _encode(tokenizer, prompt + " " + ans, special=True)
                # The answer's tokens are what follows the prompt's own tokenization; fall back to
                # encoding the answer alone if the tokenizer merged across the boundary.
                cont = full[len(prompt_ids) :] if full[: len(prompt_ids)] == prompt_ids else _encode(tokenizer, " " + ans, special=False)
                conts.append(cont)
            scores = []
            if all(len(c) == 1 for c in conts):
                # Single-token answers: one forward pass over the prompt scores both.
                logits = _logits(model, prompt_ids, device)[-1].float().log_softmax(-1)
                scores = [float(logits[c[0]]) for c in conts]
            else:
                for cont in conts:
                    logp = _logits(model, prompt_ids + cont, device)[len(prompt_ids) - 1 : -1].float().log_softmax(-1)
                    scores.append(float(logp.gather(1, torch.tensor(cont, device=logp.device)[:, None]).sum()))
            choice = _ANSWERS[int(scores[1] > scores[0])]
            choices.append(choice)
            right = _ANSWERS.index(ex.answer)
            margins.append(scores[right] - scores[1 - right])
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    correct = sum(c == ex.answer for c, ex in zip(choices, examples))
    return {
        "accuracy": correct / len(examples),
        "num_examples": len(examples),
        "always_a_accuracy": sum(ex.answer == "A" for ex in examples) / len(examples),
        "choices": choices,
        "logprob_margin": float(np.mean(margins)),
    }


def _logits(model: Any, ids: list[int], device: Any) -> torch.Tensor:
    x = torch.tensor([ids], dtype=torch.long, device=device)
    try:
        out = model(input_ids=x, use_cache=False)
    except TypeError:
        out = model(input_ids=x)
    logits = out.logits if hasattr(out, "logits") else out
    return logits[0]
