"""Metrics over aligned labels: token accuracy (MQAR, copying) and sequence exact match (needle).

``logits[:, t]`` (or a prediction ``preds[:, t]``) is compared with ``labels[:, t]``; positions
labelled ``-100`` are not scored (see :mod:`mnemotorch.tasks.synthetic` for the convention).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ._common import IGNORE_INDEX

__all__ = ["masked_cross_entropy", "sequence_accuracy", "token_accuracy"]


def _predictions(logits_or_preds: Tensor, labels: Tensor) -> Tensor:
    if not isinstance(labels, Tensor) or labels.dim() != 2:
        raise ValueError(f"labels must be [N, L], got {getattr(labels, 'shape', labels)!r}")
    x = logits_or_preds
    if x.dim() == 3:
        x = x.argmax(dim=-1)
    if x.shape != labels.shape:
        raise ValueError(
            f"predictions must be [N, L] token ids or [N, L, V] logits matching labels {tuple(labels.shape)}, "
            f"got {tuple(logits_or_preds.shape)}"
        )
    return x


def token_accuracy(logits_or_preds: Tensor, labels: Tensor) -> float:
    """Fraction of labelled positions whose argmax (or prediction) equals the label.

    Args:
        logits_or_preds: ``[N, L, V]`` logits or ``[N, L]`` predicted ids.
        labels: ``[N, L]`` aligned labels, ``-100`` where nothing is scored.

    Returns:
        Accuracy in ``[0, 1]``; ``nan`` if nothing is labelled.
    """
    preds = _predictions(logits_or_preds, labels)
    mask = labels != IGNORE_INDEX
    total = int(mask.sum())
    if total == 0:
        return float("nan")
    return int(((preds == labels) & mask).sum()) / total


def sequence_accuracy(logits_or_preds: Tensor, labels: Tensor) -> float:
    """Fraction of rows (with at least one label) whose labelled positions are *all* right.

    With teacher forcing this equals greedy-decoding exact match: if every answer token is the
    argmax given the correct prefix, greedy decoding produces exactly the answer.
    """
    preds = _predictions(logits_or_preds, labels)
    mask = labels != IGNORE_INDEX
    rows = mask.any(dim=1)
    if not bool(rows.any()):
        return float("nan")
    wrong = ((preds != labels) & mask).any(dim=1)
    return int((~wrong & rows).sum()) / int(rows.sum())


def masked_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits [N, L, V]`` against aligned ``labels [N, L]`` (``-100`` ignored)."""
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(f"logits must be [N, L, V] with [N, L] = labels.shape {tuple(labels.shape)}, got {tuple(logits.shape)}")
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


# Used by the experiment runner to look metrics up by name.
METRICS = {"token_accuracy": token_accuracy, "sequence_accuracy": sequence_accuracy}
