"""Landmark attention (Mohtashami & Jaggi, 2023): the grouped softmax used in training.

Only the float64 specification exists so far (``reference.py``): the paper's grouped-softmax
formula and the equivalent flat softmax over shifted logits. The ``landmark`` mixer, the block-gated
Triton kernel and top-k block retrieval at inference come later (issue 7).
"""

from .reference import (
    flat_softmax_weights,
    grouped_softmax_weights,
    landmark_grouped_attention_reference,
    landmark_mask,
    shifted_logits,
)

__all__ = [
    "flat_softmax_weights",
    "grouped_softmax_weights",
    "landmark_grouped_attention_reference",
    "landmark_mask",
    "shifted_logits",
]
