"""The landmark data transform: a landmark token after every ``block_len`` ordinary tokens.

Landmark attention (Mohtashami & Jaggi, 2023) reads the landmark positions from the layout of the
sequence: with blocks of ``block_len`` ordinary tokens, absolute position ``p`` is a landmark iff
``p % (block_len + 1) == block_len``. These helpers build that layout from token ids, check it
(loudly, naming the first bad position), and map per-token tensors back to the ordinary tokens.

>>> import torch
>>> ids = torch.tensor([[5, 6, 7, 8, 9]])
>>> insert_landmarks(ids, block_len=2, landmark_id=0).tolist()
[[5, 6, 0, 7, 8, 0, 9]]
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(fn: str, block_len: int, landmark_id: int | None = None) -> None:
    if not isinstance(block_len, int) or isinstance(block_len, bool) or block_len < 1:
        raise ValueError(f"{fn}: block_len must be an int >= 1, got {block_len!r}")
    if landmark_id is not None and (not isinstance(landmark_id, int) or isinstance(landmark_id, bool) or landmark_id < 0):
        raise ValueError(f"{fn}: landmark_id must be a non-negative int (a token id), got {landmark_id!r}")


def landmark_positions(length: int, block_len: int, offset: int = 0, device=None) -> Tensor:
    """``[length]`` bool, ``True`` at landmark positions of the absolute positions ``offset .. offset + length - 1``."""
    _check("landmark_positions", block_len)
    return (torch.arange(offset, offset + length, device=device) % (block_len + 1)) == block_len


def with_landmarks_length(length: int, block_len: int) -> int:
    """Length after :func:`insert_landmarks` of ``length`` ordinary tokens (a landmark closes each full block)."""
    _check("with_landmarks_length", block_len)
    return length + length // block_len


def landmark_index(length: int, block_len: int, device=None) -> Tensor:
    """``[length]`` long: where ordinary token ``t`` (``0 <= t < length``) sits after
    :func:`insert_landmarks`, i.e. ``t + t // block_len`` (one landmark closes each earlier full block)."""
    _check("landmark_index", block_len)
    t = torch.arange(length, device=device)
    return t + torch.div(t, block_len, rounding_mode="floor")


def _spread(x: Tensor, block_len: int, fill: int) -> Tensor:
    """``x [..., T]`` at the ordinary positions of the landmark layout, ``fill`` at the landmarks."""
    out_len = with_landmarks_length(x.shape[-1], block_len)
    out = torch.full((*x.shape[:-1], out_len), fill, dtype=x.dtype, device=x.device)
    out[..., landmark_index(x.shape[-1], block_len, device=x.device)] = x
    return out


def insert_landmarks(ids: Tensor, block_len: int, landmark_id: int) -> Tensor:
    """Insert ``landmark_id`` after every ``block_len`` tokens of ``ids [..., T]`` -> ``[..., T + T // block_len]``.

    A trailing incomplete block gets no landmark (it has none yet, as in streaming).
    """
    _check("insert_landmarks", block_len, landmark_id)
    if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.ndim < 1:
        raise TypeError(f"insert_landmarks: ids must be an integer tensor [..., T], got {getattr(ids, 'dtype', type(ids).__name__)}")
    return _spread(ids, block_len, landmark_id)


def labels_with_landmarks(labels: Tensor, block_len: int, ignore_index: int = -100) -> Tensor:
    """Aligned labels of the ordinary tokens ``[..., T]`` laid out as :func:`insert_landmarks` lays out the ids.

    Each label moves with its token: ``labels[..., t]`` (what the model should predict from token
    ``t``) goes to position ``t + t // block_len`` (:func:`landmark_index`), and every landmark
    position gets ``ignore_index``. So a loss or a score over the result covers exactly the original
    labelled tokens, in the same row-major order; the token before a landmark still predicts the
    next *ordinary* token (its label is unchanged), and landmarks are never scored.
    :func:`remove_landmarks` (``dim=-1``) maps the result back to ``labels``.
    """
    _check("labels_with_landmarks", block_len)
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.ndim < 1:
        raise TypeError(f"labels_with_landmarks: labels must be an integer tensor [..., T], got {getattr(labels, 'dtype', type(labels).__name__)}")
    return _spread(labels, block_len, ignore_index)


def check_landmarks(ids: Tensor, block_len: int, landmark_id: int, offset: int = 0) -> None:
    """Raise ``ValueError`` unless ``ids [..., T]`` (absolute positions from ``offset``) holds
    ``landmark_id`` exactly at the landmark positions: the layout the ``landmark`` mixer assumes."""
    _check("check_landmarks", block_len, landmark_id)
    if ids.shape[-1] == 0:
        return  # nothing to check (and no row shape to fold the batch into)
    is_lm = landmark_positions(ids.shape[-1], block_len, offset, device=ids.device)
    found = ids == landmark_id
    missing = is_lm & ~found.reshape(-1, ids.shape[-1]).all(0)
    if bool(missing.any()):
        p = int(missing.nonzero()[0]) + offset
        raise ValueError(
            f"check_landmarks: missing landmark token at position {p}: landmark mode expects token {landmark_id} "
            f"after every {block_len} tokens (positions p with p % {block_len + 1} == {block_len}); "
            "build the inputs with insert_landmarks(ids, block_len, landmark_id)"
        )
    stray = ~is_lm & found.reshape(-1, ids.shape[-1]).any(0)
    if bool(stray.any()):
        p = int(stray.nonzero()[0]) + offset
        raise ValueError(f"check_landmarks: landmark token {landmark_id} at position {p}, which is not a landmark position")


def landmark_labels(ids: Tensor, block_len: int, landmark_id: int, ignore_index: int = -100) -> Tensor:
    """Language-model labels for ids laid out with landmarks: the landmark tokens are never targets."""
    check_landmarks(ids, block_len, landmark_id)
    return ids.masked_fill(landmark_positions(ids.shape[-1], block_len, device=ids.device), ignore_index)


def remove_landmarks(x: Tensor, block_len: int, dim: int = 1, offset: int = 0) -> Tensor:
    """Drop the landmark positions along ``dim`` (e.g. logits ``[B, T, V]`` -> ``[B, T', V]``)."""
    _check("remove_landmarks", block_len)
    keep = ~landmark_positions(x.shape[dim], block_len, offset, device=x.device)
    return x.index_select(dim, keep.nonzero().flatten())
