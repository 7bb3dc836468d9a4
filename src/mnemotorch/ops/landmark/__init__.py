"""Landmark attention (Mohtashami & Jaggi, 2023, arXiv:2305.16300).

* ``reference.py``: the grouped softmax of training, and the equivalent flat softmax over shifted
  logits (float64 specification);
* ``attention.py``: :func:`landmark_attention`, the grouped softmax on the block-gated Triton
  kernel (CUDA) or the reference;
* ``retrieval.py``: inference-time top-k block retrieval through the landmark keys, a per-query
  reference and the store-based implementation the ``landmark`` mixer uses (:class:`BlockStore`:
  the growable, optionally pinned block store);
* ``data.py``: the data transform inserting a landmark token every ``block_len`` tokens (and moving
  aligned labels along with their tokens).
"""

from .attention import landmark_attention
from .data import (
    check_landmarks,
    insert_landmarks,
    labels_with_landmarks,
    landmark_index,
    landmark_labels,
    landmark_positions,
    remove_landmarks,
    with_landmarks_length,
)
from .reference import (
    flat_softmax_weights,
    grouped_softmax_weights,
    landmark_grouped_attention_reference,
    landmark_mask,
    shifted_logits,
)
from .retrieval import GRANULARITIES, BlockStore, landmark_retrieval_reference, retrieve_and_attend

__all__ = [
    "GRANULARITIES",
    "BlockStore",
    "check_landmarks",
    "flat_softmax_weights",
    "grouped_softmax_weights",
    "insert_landmarks",
    "labels_with_landmarks",
    "landmark_attention",
    "landmark_grouped_attention_reference",
    "landmark_index",
    "landmark_labels",
    "landmark_mask",
    "landmark_positions",
    "landmark_retrieval_reference",
    "remove_landmarks",
    "retrieve_and_attend",
    "shifted_logits",
    "with_landmarks_length",
]
