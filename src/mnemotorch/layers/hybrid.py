"""Composite mixer: several registered mixers applied one after another inside one block -- ``hybrid``.

The form implemented, for sub-mixers ``m_1 … m_n`` (each a registered mixer of the same width)::

    h_0 = x
    h_i = h_{i-1} + m_i(h_{i-1})        for i < n   (residual=True, the default)
    h_i = m_i(h_{i-1})                  for i < n   (residual=False: plain composition)
    y   = m_n(h_{n-1})

so ``[short_conv, based]`` gives ``y = based(x + conv(x))`` by default and ``y = based(conv(x))``
with ``residual=False``. There is no norm between the sub-mixers; the decoder block's own pre-norm
and residual wrap the whole composite, which is why the last sub-mixer gets no residual of its own.
The typical use is a short causal convolution in front of a position-free mixer: the convolution
mixes each token with the ``K − 1`` before it, which lets a linear-attention layer bind a key token
to the value token right after it -- the job Zoology (Arora et al., 2023) gives its ``BaseConv``.

Why the inner residual is the default: Zoology's ``BaseConv`` returns ``u + conv(u) ⊙ W u``, so the
mixer after it always sees its input plus the convolution term. Our ``short_conv`` has no such skip
and starts near zero under the decoder's initialisation (a product of three small projections), so
plain composition hands the next mixer an almost-zero input; in a small CPU MQAR check
``[short_conv, based]`` learned the task with the residual and stayed at chance without it.

Not Zoology's ``Hybrid`` class: that one takes a list of configs and builds *one* of them per layer,
``configs[layer_idx % len(configs)]``, so a 2-layer model with ``[BaseConv, Based]`` is a conv
layer followed by a Based layer, each in its own residual block. That alternation needs no code
here -- it is the layer plan ``[short_conv, based]`` -- while this mixer puts both inside the same
block (docs/mixers/hybrid.md compares the two).

State: a :class:`HybridState` holding the sub-mixers' states in order, so the streaming invariant
holds whenever it holds for every part; ``state_size`` is the sum of the parts' sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .base import Mixer, MixerState
from .registry import get_mixer, mixer_kwargs, parse_mixer_spec, register_mixer

#: settings the decoder fills in for mixers that accept them (models.modeling.build_mixer); the
#: composite accepts them too and hands them on to the sub-mixers that take them.
_SHARED = ("num_kv_heads", "rope_theta")


@dataclass
class HybridState(MixerState):
    """The sub-mixers' states, in order (``None`` for a sub-mixer that keeps none)."""

    parts: tuple[MixerState | None, ...]

    def tensors(self) -> dict[str, Tensor]:
        # Flattened with the sub-mixer's index as prefix, so generic code (check_input, state
        # accounting) sees every tensor; batch edits go through the parts themselves (below).
        return {f"{i}.{name}": t for i, part in enumerate(self.parts) if part is not None for name, t in part.tensors().items()}

    def index_select_batch(self, index: Tensor) -> None:
        for part in self.parts:
            if part is not None:
                part.index_select_batch(index)

    def repeat_interleave_batch(self, repeats: int) -> None:
        for part in self.parts:
            if part is not None:
                part.repeat_interleave_batch(repeats)


def _normalize_spec(i: int, spec: Any) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``{"type": name, **kwargs}`` -> ``(name, kwargs)``, with errors naming ``mixers[i]``."""
    name, kwargs = parse_mixer_spec(spec, f"hybrid: mixers[{i}]")
    fixed = sorted({"dim", "num_heads"} & set(kwargs))
    if fixed:
        raise ValueError(f"hybrid: mixers[{i}] ({name!r}) must not set {fixed}: the composite passes its own dim and num_heads")
    return name, kwargs


@register_mixer("hybrid")
class Hybrid(Mixer):
    """Sub-mixers applied in sequence inside one block: ``y = m_n(h)``, ``h = x + m_1(x)`` for two parts.

    Args:
        dim, num_heads: model width and heads, passed to every sub-mixer.
        mixers: the sub-mixers in order, each a registered mixer name or a spec dict
            ``{"type": name, **kwargs}`` as in a layer plan (a ``hybrid`` may nest). At least one.
        residual: if True (default), every sub-mixer but the last adds its output to its input
            (``h ← h + m_i(h)``), as Zoology's ``BaseConv`` does inside itself; False composes
            plainly, ``y = m_n(… m_1(x))``.
        num_kv_heads, rope_theta: when given (the decoder passes its config's values), handed to
            each sub-mixer that accepts the argument and whose spec does not set it.

    ``state_size(T) = Σ_i m_i.state_size(T)``.
    """

    description = "composite: registered mixers applied in sequence inside one block (e.g. a short conv, then BASED); the parts' states side by side"
    example_kwargs = {
        "mixers": [{"type": "short_conv", "kernel_size": 3}, {"type": "based", "feature_dim": 4, "chunk_size": 8},
                   {"type": "sliding_window", "window": 8}],
        "residual": False,  # the default (True) is covered by tests/layers/test_hybrid.py
    }
    demo_kwargs = {"mixers": [{"type": "short_conv", "kernel_size": 3}, {"type": "based", "feature_dim": 16, "chunk_size": 32}]}
    demo_default = False  # its parts are in the demo already

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mixers: Sequence[Any] = ("short_conv", "based"),
        residual: bool = True,
        num_kv_heads: int | None = None,
        rope_theta: float | None = None,
    ):
        super().__init__(dim, num_heads)
        if isinstance(mixers, (str, dict)) or not isinstance(mixers, Sequence) or len(mixers) == 0:
            raise ValueError(f"hybrid: mixers must be a non-empty list of mixer specs (names or dicts with 'type'), got {mixers!r}")
        if not isinstance(residual, bool):
            raise TypeError(f"hybrid: residual must be a bool, got {residual!r}")
        shared = {"num_kv_heads": num_kv_heads, "rope_theta": rope_theta}
        parts = []
        for i, spec in enumerate(mixers):
            name, kwargs = _normalize_spec(i, spec)
            accepted = mixer_kwargs(name)
            for key in _SHARED:
                if key in accepted and key not in kwargs and shared[key] is not None:
                    kwargs[key] = shared[key]
            try:
                parts.append(get_mixer(name, dim=dim, num_heads=num_heads, **kwargs))
            except (TypeError, ValueError) as err:
                raise type(err)(f"hybrid: mixers[{i}] ({name!r}): {err}") from err
        self.parts = nn.ModuleList(parts)
        self.residual = residual

    def _param(self) -> Tensor | None:
        return next(self.parameters(), None)

    def init_state(self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> HybridState:
        p = self._param()
        device = device or (p.device if p is not None else None)
        dtype = dtype or (p.dtype if p is not None else None)
        return HybridState(seen_tokens=0, parts=tuple(m.init_state(batch_size, device, dtype) for m in self.parts))

    def state_size(self, seq_len: int) -> int:
        return sum(m.state_size(seq_len) for m in self.parts)

    def forward(self, x: Tensor, state: HybridState | None = None) -> tuple[Tensor, HybridState]:
        """``x [B, T, dim]`` -> ``(y [B, T, dim], state)``."""
        self.check_input(x, state)
        if state is None:
            states: tuple[MixerState | None, ...] = (None,) * len(self.parts)
            seen = 0
        else:
            if not isinstance(state, HybridState) or len(state.parts) != len(self.parts):
                raise TypeError(f"Hybrid: state must be a HybridState with {len(self.parts)} parts returned by this mixer, got {state!r:.200}")
            states, seen = state.parts, state.seen_tokens
        h, new = x, []
        last = len(self.parts) - 1
        for i, (mixer, s) in enumerate(zip(self.parts, states)):
            out, s = mixer(h, s)
            h = h + out if self.residual and i < last else out
            new.append(s)
        return h, HybridState(seen_tokens=seen + x.shape[1], parts=tuple(new))

    def extra_repr(self) -> str:
        return f"residual={self.residual}"
