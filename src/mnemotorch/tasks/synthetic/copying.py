"""Small, fast sanity tasks: selective copying, induction heads, single-query associative recall.

All three return ``(input_ids, labels)`` as ``LongTensor [num_examples, L]`` with *aligned*
labels (``cross_entropy(logits[:, t], labels[:, t])``; ``-100`` where nothing is scored).

* **Selective copying** (Gu & Dao 2023, "Mamba", Sec. 3.1 / Fig. 2): ``num_tokens`` data tokens
  sit at random positions of a context of noise tokens; then come ``num_tokens`` marker tokens,
  and at the ``i``-th marker the model must output the ``i``-th data token. The positions vary
  from example to example, so a time-invariant (convolutional) model cannot solve it.
* **Induction heads** (Olsson et al. 2022; the synthetic of Fu et al. 2023, "H3"): a random
  sequence contains a trigger token once, followed by some token ``x``; the sequence ends with the
  trigger again, and the model must output ``x`` (``[A][B] ... [A] -> [B]``).
* **Associative recall** (single query; Ba et al. 2016, the H3 / Zoology "AR" task): ``N`` key-value
  pairs then one query key; the model outputs its value.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._common import IGNORE_INDEX, check_int, numpy_rng
from .mqar import _unique_draws

__all__ = ["associative_recall", "induction_heads", "selective_copying"]


def selective_copying(
    num_examples: int,
    seq_len: int,
    num_tokens: int,
    vocab_size: int = 16,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Selective copying (Gu & Dao 2023).

    Layout of a row of length ``L = seq_len``::

        [0, L - K)     context: K data tokens at random distinct positions (in order), 0 (noise) elsewhere
        [L - K, L)     K marker tokens (id ``vocab_size - 1``)

    ``labels[L - K + i]`` = the ``i``-th data token; all other labels are ``-100``.

    Args:
        num_examples: rows.
        seq_len: ``L``, total length; the context holds ``L - K >= K`` positions.
        num_tokens: ``K``, data tokens to copy.
        vocab_size: ids ``0`` (noise), ``1 .. V - 2`` (data), ``V - 1`` (marker); ``V >= 3``.
        seed: the examples are a pure function of the arguments and ``seed``.

    Returns:
        ``(input_ids, labels)``, ``LongTensor [num_examples, seq_len]`` each.
    """
    n_ex = check_int(num_examples, "num_examples", 1)
    length = check_int(seq_len, "seq_len", 2)
    k = check_int(num_tokens, "num_tokens", 1)
    vocab = check_int(vocab_size, "vocab_size", 3)
    context = length - k
    if context < k:
        raise ValueError(
            f"selective copying needs seq_len - num_tokens >= num_tokens (a context able to hold the K "
            f"data tokens), got seq_len={length}, num_tokens={k}"
        )
    rng = numpy_rng(seed)
    data = rng.integers(1, vocab - 1, size=(n_ex, k))
    positions = np.sort(_unique_draws(n_ex, context, k, rng), axis=1)  # in order: copy order = reading order
    input_ids = np.zeros((n_ex, length), dtype=np.int64)
    np.put_along_axis(input_ids, positions, data, axis=1)
    input_ids[:, context:] = vocab - 1
    labels = np.full((n_ex, length), IGNORE_INDEX, dtype=np.int64)
    labels[:, context:] = data
    return torch.from_numpy(input_ids), torch.from_numpy(labels)


def induction_heads(
    num_examples: int,
    seq_len: int,
    vocab_size: int = 16,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Induction heads: ``... s x ... s`` -> ``x``.

    Tokens are uniform in ``[0, V - 1)``; the trigger ``s = V - 1`` appears exactly twice: at a
    random position ``p in [0, L - 3]`` and at ``L - 1``. ``labels[L - 1] = input_ids[p + 1]``
    (the token that followed the trigger); all other labels are ``-100``.

    Args:
        num_examples: rows.
        seq_len: ``L >= 3``.
        vocab_size: ``V >= 3`` (the trigger plus at least two ordinary tokens).
        seed: the examples are a pure function of the arguments and ``seed``.

    Returns:
        ``(input_ids, labels)``, ``LongTensor [num_examples, seq_len]`` each.
    """
    n_ex = check_int(num_examples, "num_examples", 1)
    length = check_int(seq_len, "seq_len", 3)
    vocab = check_int(vocab_size, "vocab_size", 3)
    rng = numpy_rng(seed)
    trigger = vocab - 1
    input_ids = rng.integers(0, trigger, size=(n_ex, length))
    pos = rng.integers(0, length - 2, size=n_ex)  # p <= L - 3, so p + 1 <= L - 2 precedes the final trigger
    rows = np.arange(n_ex)
    input_ids[rows, pos] = trigger
    input_ids[:, -1] = trigger
    labels = np.full((n_ex, length), IGNORE_INDEX, dtype=np.int64)
    labels[:, -1] = input_ids[rows, pos + 1]
    return torch.from_numpy(input_ids.astype(np.int64)), torch.from_numpy(labels)


def associative_recall(
    num_examples: int,
    num_kv_pairs: int,
    vocab_size: int = 64,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Single-query associative recall: ``k1 v1 ... kN vN q`` -> value of ``q``.

    Keys are distinct, drawn from ``[0, V // 2)``; values from ``[V // 2, V)`` (may repeat); the
    query is one of the keys, uniformly. Length ``L = 2 N + 1``; only ``labels[L - 1]`` is scored.

    Args:
        num_examples: rows.
        num_kv_pairs: ``N``, at most ``V // 2`` (distinct keys).
        vocab_size: ``V >= 2``.
        seed: the examples are a pure function of the arguments and ``seed``.

    Returns:
        ``(input_ids, labels)``, ``LongTensor [num_examples, 2 N + 1]`` each.
    """
    n_ex = check_int(num_examples, "num_examples", 1)
    pairs = check_int(num_kv_pairs, "num_kv_pairs", 1)
    vocab = check_int(vocab_size, "vocab_size", 2)
    half = vocab // 2
    if pairs > half:
        raise ValueError(
            f"associative recall needs num_kv_pairs <= vocab_size // 2 (distinct keys from [0, V/2)), "
            f"got N={pairs}, V={vocab}"
        )
    rng = numpy_rng(seed)
    keys = _unique_draws(n_ex, half, pairs, rng)
    values = rng.integers(half, vocab, size=(n_ex, pairs))
    which = rng.integers(0, pairs, size=n_ex)
    rows = np.arange(n_ex)
    length = 2 * pairs + 1
    input_ids = np.empty((n_ex, length), dtype=np.int64)
    input_ids[:, 0:-1:2] = keys
    input_ids[:, 1:-1:2] = values
    input_ids[:, -1] = keys[rows, which]
    labels = np.full((n_ex, length), IGNORE_INDEX, dtype=np.int64)
    labels[:, -1] = values[rows, which]
    return torch.from_numpy(input_ids), torch.from_numpy(labels)
