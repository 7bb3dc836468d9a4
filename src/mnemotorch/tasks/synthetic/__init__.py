"""Synthetic memory tasks: MQAR, passkey / needle-in-a-haystack, SORT, selective copying,
induction heads, associative recall; their metrics and a ``Dataset`` wrapper.

Every generator is deterministic by ``seed`` and returns tensors ready for
:class:`~mnemotorch.models.MnemoForCausalLM`: ``input_ids [N, L]`` and ``labels [N, L]``.

**Label convention: labels are aligned, not shifted.** ``labels[:, t]`` is the token the model
should predict *from position t*, so the loss is ``cross_entropy(logits[:, t], labels[:, t])``
over positions where ``labels != -100`` (Zoology's convention, and that of
:class:`~mnemotorch.tasks.RandomWindowBatches`). ``model(input_ids, labels=labels)`` of a Hugging
Face model shifts once more: convert with :func:`to_shifted_labels` first, or compute the loss
yourself (:func:`masked_cross_entropy`).

    from mnemotorch.tasks.synthetic import multiquery_ar, token_accuracy
    x, y = multiquery_ar(num_examples=256, seq_len=64, num_kv_pairs=4, vocab_size=8192, seed=0)
    acc = token_accuracy(model(input_ids=x).logits, y)

See ``docs/tasks.md`` for each task's exact semantics and citations.
"""

from ._common import IGNORE_INDEX, TaskDataset, to_shifted_labels
from .copying import associative_recall, induction_heads, selective_copying
from .metrics import masked_cross_entropy, sequence_accuracy, token_accuracy
from .mqar import mqar_gap_probabilities, multiquery_ar
from .needle import (
    FILLER_SENTENCES,
    NEEDLE_KINDS,
    NeedleExample,
    make_needle_example,
    make_needle_examples,
    needle_in_haystack,
)
from .registry import TASKS, TaskData, make_task
from .sort import SORT_CONDITIONS, SortExample, evaluate_sort, make_sort_examples, sort_oracle, sort_prompt

__all__ = [
    "FILLER_SENTENCES",
    "IGNORE_INDEX",
    "NEEDLE_KINDS",
    "SORT_CONDITIONS",
    "TASKS",
    "NeedleExample",
    "SortExample",
    "TaskData",
    "TaskDataset",
    "associative_recall",
    "evaluate_sort",
    "induction_heads",
    "make_needle_example",
    "make_needle_examples",
    "make_sort_examples",
    "make_task",
    "masked_cross_entropy",
    "mqar_gap_probabilities",
    "multiquery_ar",
    "needle_in_haystack",
    "selective_copying",
    "sequence_accuracy",
    "sort_oracle",
    "sort_prompt",
    "to_shifted_labels",
    "token_accuracy",
]
