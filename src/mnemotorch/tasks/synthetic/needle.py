"""Passkey retrieval and single needle-in-a-haystack (S-NIAH), at a chosen token length and depth.

* Passkey retrieval: Mohtashami & Jaggi (2023), "Landmark Attention: Random-Access Infinite
  Context Length for Transformers", arXiv:2305.16300 — the filler "The grass is green. The sky is
  blue. The sun is yellow. Here we go. There and back again." repeated, with "The pass key is N.
  Remember it. N is the pass key." hidden inside; N is a 5-digit number.
* Needle in a haystack: Kamradt (2023), "Needle In A Haystack — pressure testing LLMs" — a fact
  inserted at a chosen depth of a long real text.
* RULER S-NIAH: Hsieh et al. (2024), "RULER: What's the Real Context Size of Your Long-Context
  Language Models?", arXiv:2404.06654 — "One of the special magic {numbers|words} for {key} is:
  {value}." in synthetic noise or in essays; we use a 7-digit number or a word as the value.

Every example is built at an exact token length for a given tokenizer: the instruction, the
haystack (whole sentences plus at most one cut sentence and a few single-token spaces to hit the
length exactly), the needle inserted *between sentences* at the boundary nearest to the requested
depth, the question and the answer. Pieces are encoded separately and concatenated, so
``input_ids`` decodes back to exactly ``prompt + answer`` for byte-level tokenizers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._common import IGNORE_INDEX, check_int, numpy_rng

__all__ = [
    "FILLER_SENTENCES",
    "NEEDLE_KINDS",
    "NeedleExample",
    "make_needle_example",
    "make_needle_examples",
    "needle_in_haystack",
]

#: The classic passkey filler (Mohtashami & Jaggi 2023), repeated to any length.
FILLER_SENTENCES: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

#: Needle kinds: a 5-digit pass key, a RULER 7-digit magic number, a RULER magic word.
NEEDLE_KINDS: tuple[str, ...] = ("passkey", "number", "word")

_TEMPLATES: dict[str, dict[str, str]] = {
    "passkey": {
        "instruction": (
            "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there."
        ),
        "needle": " The pass key is {value}. Remember it. {value} is the pass key.",
        "question": "\nWhat is the pass key? The pass key is",
    },
    "number": {
        "instruction": (
            "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the numbers afterwards."
        ),
        "needle": " One of the special magic numbers for {key} is: {value}.",
        "question": (
            "\nWhat is the special magic number for {key} mentioned in the provided text? "
            "The special magic number for {key} mentioned in the provided text is"
        ),
    },
    "word": {
        "instruction": (
            "Some special magic words are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the words afterwards."
        ),
        "needle": " One of the special magic words for {key} is: {value}.",
        "question": (
            "\nWhat is the special magic word for {key} mentioned in the provided text? "
            "The special magic word for {key} mentioned in the provided text is"
        ),
    },
}

# Keys are "adjective-noun" (as in RULER); word values are nouns. Small fixed lists keep the task
# deterministic without a dependency.
_ADJECTIVES = (
    "ancient", "bitter", "brave", "calm", "clever", "crimson", "curious", "damp", "eager", "faint",
    "fierce", "gentle", "gloomy", "golden", "hollow", "humble", "icy", "jolly", "lazy", "lively",
    "loud", "lucky", "mellow", "misty", "noble", "odd", "pale", "polite", "proud", "quiet",
    "rapid", "rusty", "shaggy", "silent", "silver", "sleepy", "sour", "steady", "sticky", "swift",
    "tame", "tidy", "tiny", "vast", "wary", "wicked", "wild", "witty", "wooden", "young",
)
_NOUNS = (
    "anchor", "apple", "badge", "basket", "beacon", "bicycle", "blanket", "bottle", "bucket", "button",
    "camera", "candle", "canyon", "carpet", "castle", "cherry", "chimney", "compass", "cookie", "crayon",
    "dolphin", "drum", "engine", "falcon", "feather", "fiddle", "garden", "glacier", "guitar", "hammer",
    "harbor", "helmet", "island", "jacket", "kettle", "ladder", "lantern", "lemon", "magnet", "meadow",
    "mirror", "mitten", "needle", "notebook", "orchard", "oyster", "paddle", "parrot", "pebble", "pepper",
    "pillow", "pocket", "puzzle", "rabbit", "ribbon", "rocket", "saddle", "scarf", "shovel", "spider",
    "spoon", "statue", "teapot", "ticket", "tiger", "tomato", "trumpet", "tunnel", "turtle", "umbrella",
    "valley", "violin", "wagon", "walnut", "whistle", "window", "wizard", "yogurt", "zebra", "zipper",
)
# Sentence units: cut after . ! ? when whitespace follows; the whitespace starts the next unit, so
# each unit (but the first) begins with whitespace and byte-level BPE encodes it as in running text.
_SENTENCE_END = re.compile(r"(?<=[.!?])(?=\s)")
_WORD = re.compile(r"\s*\S+")
# Fresh values are drawn when a value or key happens to occur in a real haystack text.
_MAX_VALUE_TRIES = 50


@dataclass(frozen=True)
class NeedleExample:
    """One needle-in-a-haystack example.

    Attributes:
        prompt: the text the model reads (instruction, haystack with the needle, question).
        answer: the continuation to produce, with its leading space (``" 12345"``).
        input_ids: ``LongTensor [length]``: ``prompt`` tokens then ``answer`` tokens.
        labels: ``LongTensor [length]``, aligned: ``labels[t]`` is the answer token predicted
            at position ``t`` (the last prompt token and all answer tokens but the last);
            ``-100`` elsewhere.
        kind: one of :data:`NEEDLE_KINDS`.
        key: the needle's key (``""`` for passkey).
        value: the needle's value, the answer without its leading space.
        needle: the needle text as inserted (with its leading space).
        needle_span: ``(start, end)`` token positions of the needle in ``input_ids``.
        haystack_span: ``(start, end)`` token positions of the haystack, needle included.
        depth: the requested depth in ``[0, 1]``.
        achieved_depth: the needle's token offset into the haystack divided by the haystack's
            token count (within one sentence of ``depth``).
    """

    prompt: str
    answer: str
    input_ids: Tensor
    labels: Tensor
    kind: str
    key: str
    value: str
    needle: str
    needle_span: tuple[int, int]
    haystack_span: tuple[int, int]
    depth: float
    achieved_depth: float


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Ids of ``text`` without special tokens (Hugging Face tokenizers add a BOS by default)."""
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        ids = tokenizer.encode(text)
    return list(ids)


def _check_depth(depth: Any) -> float:
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or math.isnan(depth) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a number in [0, 1] (0 = start of the haystack, 1 = end), got {depth!r}")
    return float(depth)


def _occurs(text: str, token: str) -> bool:
    """Whether ``token`` occurs in ``text`` as a whole number / word (case-insensitive)."""
    return re.search(rf"(?<![\w]){re.escape(token)}(?![\w])", text, flags=re.IGNORECASE) is not None


class _HaystackBuilder:
    """Encodes haystack sentences lazily (cached) and assembles examples of an exact length."""

    def __init__(self, tokenizer: Any, haystack: str | None, kind: str, instruction: bool) -> None:
        if kind not in NEEDLE_KINDS:
            raise ValueError(f"kind must be one of {list(NEEDLE_KINDS)}, got {kind!r}")
        if not hasattr(tokenizer, "encode"):
            raise TypeError(f"tokenizer must have an encode(text) method, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.kind = kind
        self.template = _TEMPLATES[kind]
        self.instruction = self.template["instruction"] + "\n" if instruction else ""
        self.synthetic = haystack is None
        if self.synthetic:
            self.units: Sequence[str] = tuple(" " + s for s in FILLER_SENTENCES)
            self.text = "".join(self.units)
        else:
            if not isinstance(haystack, str):
                raise TypeError(f"haystack must be None (synthetic filler) or a str of real text, got {type(haystack).__name__}")
            self.units = [u for u in _SENTENCE_END.split(haystack) if u.strip()]
            if not self.units:
                raise ValueError("haystack text is empty (no sentence to fill the context with)")
            self.text = haystack
        self._ids: dict[int, list[int]] = {}
        self._words: frozenset[str] | None = None
        pad = _encode(tokenizer, " ")
        if len(pad) != 1:
            raise ValueError(f"the tokenizer must encode ' ' as one token (used to reach the exact length), got {pad!r}")
        self.pad_id = pad[0]

    def unit(self, i: int) -> str:
        return self.units[i % len(self.units)] if self.synthetic else self.units[i]

    def unit_ids(self, i: int) -> list[int]:
        key = i % len(self.units) if self.synthetic else i
        if key not in self._ids:
            self._ids[key] = _encode(self.tokenizer, self.units[key])
        return self._ids[key]

    def _in_text(self, token: str) -> bool:
        """``_occurs(self.text, token)``, with a word set for single words: a regex scan of a whole
        book per drawn value is what made building training batches slow."""
        if re.fullmatch(r"\w+", token):
            if self._words is None:
                self._words = frozenset(re.findall(r"\w+", self.text.lower()))
            return token.lower() in self._words
        return _occurs(self.text, token)

    def draw_key_value(self, rng: np.random.Generator) -> tuple[str, str]:
        for _ in range(_MAX_VALUE_TRIES):
            if self.kind == "passkey":
                key, value = "", str(int(rng.integers(10_000, 100_000)))
            else:
                key = f"{_ADJECTIVES[rng.integers(len(_ADJECTIVES))]}-{_NOUNS[rng.integers(len(_NOUNS))]}"
                if self.kind == "number":
                    value = str(int(rng.integers(1_000_000, 10_000_000)))
                else:
                    value = _NOUNS[rng.integers(len(_NOUNS))]
            # The answer must be findable only through the needle -- and never be spelled out by
            # the key itself, which the question repeats ("... the magic word for noble-spider").
            if key and _occurs(key, value):
                continue
            if self.synthetic or not (self._in_text(value) or (key and self._in_text(key))):
                return key, value
        raise ValueError(
            f"could not draw a {self.kind} value absent from the haystack text in {_MAX_VALUE_TRIES} tries"
        )

    def partial(self, unit: str, budget: int, from_end: bool) -> tuple[str, list[int]]:
        """The most words from the start (or end) of ``unit`` whose encoding fits ``budget``."""
        words = _WORD.findall(unit)
        best_text, best_ids = "", []
        for k in range(1, len(words) + 1):
            text = "".join(words[-k:] if from_end else words[:k])
            ids = _encode(self.tokenizer, text)
            if len(ids) > budget:
                break
            best_text, best_ids = text, ids
        return best_text, best_ids

    def build(self, length: int, depth: float, rng: np.random.Generator) -> NeedleExample:
        key, value = self.draw_key_value(rng)
        needle = self.template["needle"].format(key=key, value=value)
        question = self.template["question"].format(key=key)
        answer = " " + value
        pre_ids, needle_ids = _encode(self.tokenizer, self.instruction), _encode(self.tokenizer, needle)
        q_ids, a_ids = _encode(self.tokenizer, question), _encode(self.tokenizer, answer)
        fixed = len(pre_ids) + len(needle_ids) + len(q_ids) + len(a_ids)
        budget = length - fixed
        if budget < 0:
            raise ValueError(
                f"length={length} is shorter than the {self.kind} prompt without any haystack "
                f"({fixed} tokens: instruction, needle, question, answer); use length >= {fixed}"
            )

        # Whole sentences from a random start, forward; if the text ends first, extend backward.
        n = len(self.units)
        start = int(rng.integers(n)) if self.synthetic or n == 1 else int(rng.integers(1, n))
        end, used = start, 0
        while (self.synthetic or end < n) and used + len(self.unit_ids(end)) <= budget:
            used += len(self.unit_ids(end))
            end += 1
        head: tuple[str, list[int]] = ("", [])
        tail: tuple[str, list[int]] = ("", [])
        if self.synthetic or end < n:
            # Stopped by the budget: the next sentence, cut at a word, ends the haystack.
            tail = self.partial(self.unit(end), budget - used, from_end=False)
        else:
            while start > 0 and used + len(self.unit_ids(start - 1)) <= budget:
                start -= 1
                used += len(self.unit_ids(start))
            if used < budget:
                if start == 0:
                    raise ValueError(
                        f"haystack text is too short: it holds {used} tokens of whole sentences but "
                        f"length={length} needs {budget} haystack tokens besides the {fixed} prompt tokens"
                    )
                head = self.partial(self.unit(start - 1), budget - used, from_end=True)
        pads = budget - used - len(head[1]) - len(tail[1])
        # pieces: (text, ids); whole sentences in between the (optional) cut ones.
        pieces: list[tuple[str, list[int]]] = []
        if head[1]:
            pieces.append((" " * pads + head[0], [self.pad_id] * pads + head[1]))
            pads = 0
        pieces += [(self.unit(i), self.unit_ids(i)) for i in range(start, end)]
        if tail[1] or pads:
            pieces.append((tail[0] + " " * pads, tail[1] + [self.pad_id] * pads))

        # The needle goes at the piece boundary nearest to depth * (haystack tokens).
        bounds = np.cumsum([0] + [len(ids) for _, ids in pieces])
        j = int(np.argmin(np.abs(bounds - depth * budget)))
        hay_text = "".join(t for t, _ in pieces[:j]) + needle + "".join(t for t, _ in pieces[j:])
        hay_ids = [i for _, ids in pieces[:j] for i in ids] + needle_ids + [i for _, ids in pieces[j:] for i in ids]
        prompt = self.instruction + hay_text + question
        ids = pre_ids + hay_ids + q_ids + a_ids
        assert len(ids) == length, (len(ids), length)  # the budget arithmetic above guarantees it
        if prompt.count(needle.strip()) != 1:
            raise AssertionError("needle must occur exactly once in the prompt")  # guarded by draw_key_value
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
        labels[length - len(a_ids) - 1 : length - 1] = torch.tensor(a_ids, dtype=torch.long)
        needle_start = len(pre_ids) + int(bounds[j])
        return NeedleExample(
            prompt=prompt,
            answer=answer,
            input_ids=input_ids,
            labels=labels,
            kind=self.kind,
            key=key,
            value=value,
            needle=needle,
            needle_span=(needle_start, needle_start + len(needle_ids)),
            haystack_span=(len(pre_ids), len(pre_ids) + len(hay_ids)),
            depth=depth,
            achieved_depth=float(bounds[j] / budget) if budget else 0.0,
        )


def make_needle_examples(
    tokenizer: Any,
    num_examples: int,
    length: int,
    depth: float | None = None,
    kind: str = "passkey",
    haystack: str | None = None,
    seed: int = 0,
    instruction: bool = True,
) -> list[NeedleExample]:
    """Build ``num_examples`` needle examples of exactly ``length`` tokens.

    Args:
        tokenizer: anything with ``encode(text) -> list[int]`` (our byte/BPE tokenizers, or a
            Hugging Face tokenizer: special tokens are not added). ``" "`` must be one token.
        num_examples: examples to build.
        length: tokens per example, prompt plus answer.
        depth: where the needle goes, in ``[0, 1]`` of the haystack (0 = right after the
            instruction, 1 = right before the question); ``None`` draws it uniformly per example.
        kind: ``"passkey"`` (5 digits), ``"number"`` (7 digits, RULER) or ``"word"`` (RULER).
        haystack: ``None`` for the synthetic filler, or a real text (e.g. a book) to cut from at a
            random sentence; the value and key are redrawn if they occur in it.
        seed: the examples are a pure function of the arguments and ``seed``.
        instruction: begin with the task's instruction sentence (omit it for tiny lengths).

    Raises:
        ValueError: depth outside ``[0, 1]``, ``length`` too short for the prompt, or a
            ``haystack`` text too short for ``length``.
    """
    n_ex = check_int(num_examples, "num_examples", 1)
    length = check_int(length, "length", 1)
    if depth is not None:
        depth = _check_depth(depth)
    builder = _HaystackBuilder(tokenizer, haystack, kind, instruction)
    rng = numpy_rng(seed)
    examples = []
    for _ in range(n_ex):
        d = float(rng.random()) if depth is None else depth
        examples.append(builder.build(length, d, rng))
    return examples


def make_needle_example(
    tokenizer: Any,
    length: int,
    depth: float,
    kind: str = "passkey",
    haystack: str | None = None,
    seed: int = 0,
    instruction: bool = True,
) -> NeedleExample:
    """One example at ``depth`` (see :func:`make_needle_examples` for the arguments)."""
    return make_needle_examples(tokenizer, 1, length, _check_depth(depth), kind, haystack, seed, instruction)[0]


def needle_in_haystack(
    tokenizer: Any,
    num_examples: int,
    length: int,
    depth: float | None = None,
    kind: str = "passkey",
    haystack: str | None = None,
    seed: int = 0,
    instruction: bool = True,
) -> tuple[Tensor, Tensor]:
    """Stacked tensors for training / evaluation (arguments as :func:`make_needle_examples`).

    Returns:
        ``(input_ids, labels)``, ``LongTensor [num_examples, length]`` each; score with
        :func:`~mnemotorch.tasks.synthetic.sequence_accuracy` (exact match of the answer).
    """
    examples = make_needle_examples(tokenizer, num_examples, length, depth, kind, haystack, seed, instruction)
    return torch.stack([e.input_ids for e in examples]), torch.stack([e.labels for e in examples])
