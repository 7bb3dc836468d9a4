"""Token-level tasks by name, for the experiment runner: ``make_task("mqar", 1000, seed=0, ...)``.

Each task turns ``(num_examples, seed, **params)`` into a :class:`TaskData`: tensors, the
vocabulary a model needs and the name of the metric that scores it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .copying import associative_recall, induction_heads, selective_copying
from .mqar import multiquery_ar
from .needle import needle_in_haystack

__all__ = ["TASKS", "TaskData", "make_task"]


@dataclass
class TaskData:
    """Examples of a task, ready for :class:`~mnemotorch.models.MnemoForCausalLM`.

    Attributes:
        input_ids: ``LongTensor [N, L]``.
        labels: ``LongTensor [N, L]``, aligned (``logits[:, t]`` predicts ``labels[:, t]``),
            ``-100`` where nothing is scored.
        vocab_size: the model's vocabulary must be at least this.
        metric: ``"token_accuracy"`` or ``"sequence_accuracy"`` (see ``metrics.py``).
    """

    input_ids: Tensor
    labels: Tensor
    vocab_size: int
    metric: str

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])


def _mqar(n: int, seed: int, *, seq_len: int, num_kv_pairs: int, vocab_size: int = 8192, power_a: float = 0.01,
          random_non_queries: bool = False) -> TaskData:
    x, y = multiquery_ar(n, seq_len, num_kv_pairs, vocab_size, power_a, random_non_queries, seed)
    return TaskData(x, y, vocab_size, "token_accuracy")


def _selective_copying(n: int, seed: int, *, seq_len: int, num_tokens: int, vocab_size: int = 16) -> TaskData:
    x, y = selective_copying(n, seq_len, num_tokens, vocab_size, seed)
    return TaskData(x, y, vocab_size, "token_accuracy")


def _induction(n: int, seed: int, *, seq_len: int, vocab_size: int = 16) -> TaskData:
    x, y = induction_heads(n, seq_len, vocab_size, seed)
    return TaskData(x, y, vocab_size, "token_accuracy")


def _associative_recall(n: int, seed: int, *, num_kv_pairs: int, vocab_size: int = 64) -> TaskData:
    x, y = associative_recall(n, num_kv_pairs, vocab_size, seed)
    return TaskData(x, y, vocab_size, "token_accuracy")


@functools.lru_cache(maxsize=8)
def _load_text_cached(source: str) -> str:
    from ..corpus import load_text

    return load_text(source)


@functools.lru_cache(maxsize=8)
def _tokenizer_cached(spec_json: str) -> Any:
    from ..tokenizer import build_tokenizer

    spec = json.loads(spec_json)
    if isinstance(spec, str):
        spec = {"kind": spec}
    kind = spec.get("kind", "byte")
    text = _load_text_cached(spec["source"]) if "source" in spec else None
    return build_tokenizer(kind, text, vocab_size=spec.get("vocab_size", 1024))


def _needle(n: int, seed: int, *, length: int, depth: float | None = None, kind: str = "passkey",
            haystack: str | None = None, tokenizer: Any = "byte", instruction: bool = True) -> TaskData:
    tok = _tokenizer_cached(json.dumps(tokenizer, sort_keys=True))
    text = None if haystack in (None, "synthetic") else _load_text_cached(haystack)
    x, y = needle_in_haystack(tok, n, length, depth, kind, text, seed, instruction)
    return TaskData(x, y, tok.vocab_size, "sequence_accuracy")


#: name -> builder ``(num_examples, seed, **params) -> TaskData``.
TASKS: dict[str, Callable[..., TaskData]] = {
    "mqar": _mqar,
    "needle": _needle,
    "passkey": functools.partial(_needle, kind="passkey"),
    "selective_copying": _selective_copying,
    "induction_heads": _induction,
    "associative_recall": _associative_recall,
}


def make_task(name: str, num_examples: int, seed: int = 0, **params: Any) -> TaskData:
    """Build ``num_examples`` examples of task ``name`` (one of :data:`TASKS`).

    ``params`` are the task's own arguments, e.g. ``seq_len``/``num_kv_pairs``/``vocab_size`` for
    ``"mqar"``, or ``length``/``depth``/``kind``/``haystack``/``tokenizer`` for ``"needle"``
    (``haystack``: ``"synthetic"`` or a source for :func:`~mnemotorch.tasks.load_text`;
    ``tokenizer``: ``"byte"`` or ``{"kind": "bpe", "source": ..., "vocab_size": ...}``).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {sorted(TASKS)}")
    try:
        return TASKS[name](num_examples, seed, **params)
    except TypeError as err:
        if "unexpected keyword" in str(err) or "missing" in str(err):
            raise TypeError(f"task {name!r}: {err}") from None
        raise
