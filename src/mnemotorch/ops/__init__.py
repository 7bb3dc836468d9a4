"""Functional primitives: tensors in, tensors out, no parameters.

Each family lives in its own folder with ``reference.py`` (the specification, float64-ready),
optionally ``triton.py`` (GPU kernels) and an ``__init__`` exposing the public function.
"""

from .attention import causal_attention
from .rotary import apply_rotary, rotary_cos_sin
from .sliding_window import sliding_window_attention

__all__ = ["apply_rotary", "causal_attention", "rotary_cos_sin", "sliding_window_attention"]
