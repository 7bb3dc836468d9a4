"""Multi-query associative recall (MQAR), with the generator semantics of Zoology.

Arora, Eyuboglu, Timalsina, Johnson, Poli, Zou, Rudra, Ré, "Zoology: Measuring and Improving
Recall in Efficient Language Models" (2023), arXiv:2312.04927. Reimplemented from the paper and
the description of its ``multiquery_ar`` generator; no code copied.

One example of length ``L`` with ``N`` pairs and vocabulary ``V``::

    position   0   1   2   3  ...  2N-2 2N-1 | 2N  ...                                L-1
    input      k1  v1  k2  v2 ...  kN   vN   | filler, and each key k_i once more (its query)
    label      -100 everywhere except at each query position q, where label[q] = value of input[q]

* keys are drawn without replacement from ``[1, V // 2)`` (unique within an example; 0 is the
  filler token), values without replacement from ``[V // 2, V)``;
* query ``i`` sits at ``q_i = 2N + 2 g_i``; the gaps ``g_i`` are distinct slots of
  ``{0, ..., (L - 2N) // 2 - 1}`` drawn one after another without replacement, each draw with
  probability proportional to ``a (g + 1) ** (a - 1)`` over the slots left (``a = power_a``,
  0.01 in Zoology, so queries cluster right after the pairs; ``a = 1`` is uniform);
* the label sits *at* the query position: the model, having just read the query key, predicts
  the value (aligned labels: ``cross_entropy(logits[:, t], labels[:, t])``). The value itself is
  not in the input after the query;
* the remaining positions are 0, or with ``random_non_queries=True`` uniform tokens from
  ``[0, V)`` (which may repeat a key as a distractor; such positions are still unlabelled).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._common import IGNORE_INDEX, check_int, numpy_rng

__all__ = ["mqar_gap_probabilities", "multiquery_ar"]

# Rows generated per chunk: bounds the [rows, max(V/2, L)] temporaries.
_CHUNK_ELEMENTS = 1 << 22


def mqar_gap_probabilities(num_slots: int, power_a: float = 0.01) -> Tensor:
    """The power law over query slots: ``p[g] ∝ a (g + 1) ** (a - 1)``, ``g = 0 .. num_slots - 1``.

    This is the distribution of the *first* query's gap; later queries are drawn from the same
    weights renormalised over the slots not yet taken.

    Returns:
        ``float64 [num_slots]`` summing to 1.
    """
    num_slots = check_int(num_slots, "num_slots", 1)
    if not isinstance(power_a, (int, float)) or isinstance(power_a, bool) or not power_a > 0:
        raise ValueError(f"power_a must be a number > 0 (0.01 in Zoology; 1 is uniform), got {power_a!r}")
    g = torch.arange(1, num_slots + 1, dtype=torch.float64)
    p = power_a * g ** (power_a - 1)
    return p / p.sum()


def _unique_draws(rows: int, population: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``[rows, k]`` indices in ``[0, population)``, distinct within a row, uniformly at random
    and in random order.

    When collisions are rare (birthday bound ``k (k - 1) / 2 <= population``) i.i.d. draws are
    redrawn, row by row, until distinct: conditioning i.i.d. uniform tuples on distinctness gives
    the uniform distribution over ordered distinct tuples, at O(k) per row. Otherwise a random
    permutation of the (then small) population per row, truncated to k (same distribution).
    """
    if k * (k - 1) // 2 > population:
        return np.argsort(rng.random((rows, population)), axis=1)[:, :k]
    out = rng.integers(0, population, size=(rows, k))
    pending = np.arange(rows)
    while pending.size:
        ordered = np.sort(out[pending], axis=1)
        pending = pending[(ordered[:, 1:] == ordered[:, :-1]).any(axis=1)]
        out[pending] = rng.integers(0, population, size=(pending.size, k))
    return out


def _power_law_gaps(rows: int, probs: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``[rows, k]`` distinct slots drawn one after another without replacement, each draw
    proportional to ``probs`` over the slots left.

    Gumbel-top-k: the k largest of ``log p + Gumbel noise`` are distributed exactly as
    successive sampling without replacement (Vieira 2014; Kool et al. 2019), i.e. as
    ``numpy.random.choice(..., replace=False, p=p)`` which Zoology uses, vectorised over rows.
    (The order of the k slots is irrelevant: keys are already in uniformly random order.)
    """
    scores = np.log(probs)[None, :] + rng.gumbel(size=(rows, probs.size))
    if k == probs.size:
        return np.argsort(-scores, axis=1)
    return np.argpartition(-scores, k - 1, axis=1)[:, :k]


def multiquery_ar(
    num_examples: int,
    seq_len: int,
    num_kv_pairs: int,
    vocab_size: int = 8192,
    power_a: float = 0.01,
    random_non_queries: bool = False,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Generate MQAR examples (Zoology semantics; see the module docstring).

    Args:
        num_examples: ``N_ex``, rows to generate.
        seq_len: ``L``, even (pairs and query slots are two tokens wide).
        num_kv_pairs: ``N`` pairs (and queries) per example; ``4 N <= L``.
        vocab_size: ``V > L`` (Zoology's constraint; 8192 in the paper).
        power_a: exponent ``a`` of the query-gap power law, > 0.
        random_non_queries: fill non-pair, non-query positions with uniform tokens from
            ``[0, V)`` instead of 0 (the Zoology paper's figures use 0).
        seed: the examples are a pure function of the arguments and ``seed``.

    Returns:
        ``(input_ids, labels)``, both ``LongTensor [num_examples, seq_len]``; ``labels`` is
        ``-100`` except at the ``N`` query positions of each row, where it holds the value
        paired with the key at that position.

    Raises:
        ValueError: a constraint is violated (``L`` odd, ``V <= L``, ``4 N > L``, ``a <= 0``).
    """
    n_ex = check_int(num_examples, "num_examples", 1)
    length = check_int(seq_len, "seq_len", 2)
    pairs = check_int(num_kv_pairs, "num_kv_pairs", 1)
    vocab = check_int(vocab_size, "vocab_size", 1)
    if length % 2:
        raise ValueError(f"seq_len must be even (key/value pairs and query slots are two tokens wide), got {length}")
    if vocab <= length:
        raise ValueError(f"MQAR needs vocab_size > seq_len (V > L, Zoology's constraint), got V={vocab}, L={length}")
    if 4 * pairs > length:
        raise ValueError(
            f"MQAR needs 4 * num_kv_pairs <= seq_len (4N <= L: 2N tokens of pairs plus N two-token query slots), "
            f"got N={pairs}, L={length}"
        )
    if not isinstance(random_non_queries, bool):
        raise TypeError(f"random_non_queries must be a bool, got {random_non_queries!r}")
    context = 2 * pairs
    num_slots = (length - context) // 2
    probs = mqar_gap_probabilities(num_slots, power_a).numpy()
    half = vocab // 2
    rng = numpy_rng(seed)

    input_ids = np.zeros((n_ex, length), dtype=np.int64)
    labels = np.full((n_ex, length), IGNORE_INDEX, dtype=np.int64)
    chunk = max(1, _CHUNK_ELEMENTS // max(half, num_slots, length))
    for lo in range(0, n_ex, chunk):
        rows = min(chunk, n_ex - lo)
        keys = _unique_draws(rows, half - 1, pairs, rng) + 1  # [rows, N] in [1, V/2)
        values = _unique_draws(rows, vocab - half, pairs, rng) + half  # [rows, N] in [V/2, V)
        queries = context + 2 * _power_law_gaps(rows, probs, pairs, rng)  # [rows, N]
        x = input_ids[lo : lo + rows]
        x[:, 0:context:2] = keys
        x[:, 1:context:2] = values
        np.put_along_axis(x, queries, keys, axis=1)
        np.put_along_axis(labels[lo : lo + rows], queries, values, axis=1)
        if random_non_queries:
            filler = x == 0  # keys are >= 1 and values >= V/2, so 0 marks exactly the filler
            x[filler] = rng.integers(0, vocab, size=int(filler.sum()))
    return torch.from_numpy(input_ids), torch.from_numpy(labels)
