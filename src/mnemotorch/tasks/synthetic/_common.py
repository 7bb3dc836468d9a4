"""Helpers shared by the synthetic task generators: argument checks, seeded generators, a Dataset.

Label convention (all synthetic tasks): ``labels`` is *aligned*, not shifted. ``labels[n, t]`` is
the token the model should predict from position ``t``, so the loss is
``cross_entropy(logits[:, t], labels[:, t])`` over positions whose label is not ``-100``. This is
the convention of Zoology and of :class:`~mnemotorch.tasks.RandomWindowBatches`. Hugging Face's
``model(input_ids, labels=...)`` shifts labels itself; use :func:`to_shifted_labels` before
passing these labels there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..data import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "TaskDataset", "to_shifted_labels"]

# torch.Generator.manual_seed takes at most 64 bits.
_SEED_MOD = 1 << 64


def check_int(value: Any, name: str, minimum: int | None = None) -> int:
    """``value`` as an int (bools rejected), at least ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def numpy_rng(seed: Any) -> np.random.Generator:
    """numpy's PCG64 seeded with ``seed`` (any int; taken mod 2**64).

    The token-level generators draw with numpy rather than torch: it is seeded and
    platform-independent like a ``torch.Generator``, and far faster for the many small per-row
    operations they need (sorting a few dozen ints per row).
    """
    return np.random.Generator(np.random.PCG64(check_int(seed, "seed") % _SEED_MOD))


def to_shifted_labels(labels: Tensor) -> Tensor:
    """Aligned labels ``[N, L]`` -> labels for a model that shifts internally (Hugging Face).

    ``out[:, t + 1] = labels[:, t]`` and ``out[:, 0] = -100``. A label at the last position
    (``t = L - 1``) has no slot after it and is dropped, so prefer the aligned loss when a task
    labels the last position (selective copying, induction, associative recall do).
    """
    if not isinstance(labels, Tensor) or labels.dim() != 2:
        raise ValueError(f"labels must be a 2-D tensor [N, L], got {getattr(labels, 'shape', labels)!r}")
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, 1:] = labels[:, :-1]
    return out


class TaskDataset(Dataset):
    """A ``torch.utils.data.Dataset`` over task tensors.

    Item ``i`` is ``{"input_ids": LongTensor [L], "labels": LongTensor [L]}`` (labels aligned:
    see the module docstring), ready for ``DataLoader`` with the default collate.

    Args:
        input_ids: ``[N, L]`` token ids.
        labels: ``[N, L]`` aligned labels, ``-100`` where nothing is scored.
    """

    def __init__(self, input_ids: Tensor, labels: Tensor) -> None:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a 2-D tensor [N, L], got {getattr(input_ids, 'shape', input_ids)!r}")
        if not isinstance(labels, Tensor) or labels.shape != input_ids.shape:
            raise ValueError(
                f"labels must be a tensor of the same shape as input_ids {tuple(input_ids.shape)}, "
                f"got {getattr(labels, 'shape', labels)!r}"
            )
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}

    def __repr__(self) -> str:
        n, length = self.input_ids.shape
        return f"TaskDataset(num_examples={n}, seq_len={length})"
