"""The Mixer protocol: every token mixer in mnemotorch is a `Mixer`.

A mixer maps ``x [B, T, dim] -> y [B, T, dim]`` and carries a *state* between calls, so that
running a sequence in pieces (with the state passed along) gives the same outputs as one call on
the whole sequence. That single property -- the *streaming invariant* -- gives generation,
unbounded streaming and chunked prefill to every mixer; ``tests/layers/test_streaming.py``
enforces it for everything in the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class MixerState:
    """Base class of a mixer's carried state.

    Subclasses are dataclasses whose tensor fields all have the batch as their first dimension;
    that convention lets generic code (the HF cache, beam search) reorder or move any state.
    ``seen_tokens`` counts the tokens the mixer has consumed (absolute position of the next token).
    """

    seen_tokens: int

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}

    def index_select_batch(self, index: Tensor) -> None:
        """Keep/reorder the batch rows given by ``index`` (beam search, batch selection)."""
        for name, t in self.tensors().items():
            setattr(self, name, t.index_select(0, index.to(t.device)))

    def repeat_interleave_batch(self, repeats: int) -> None:
        for name, t in self.tensors().items():
            setattr(self, name, t.repeat_interleave(repeats, dim=0))


class Mixer(nn.Module):
    """Base class of token mixers.

    Subclasses implement:

    * ``forward(x, state=None) -> (y, state)``: ``x`` is ``[B, T, dim]``; ``state`` is ``None`` (start
      of a sequence) or what a previous call returned. The returned state continues the sequence.
    * ``init_state(batch_size, device, dtype)``: the state of an empty prefix.
    * ``state_size(seq_len)``: elements held per sequence after ``seq_len`` tokens (the accounting of
      Zoology, Arora et al. 2023): constant for recurrent mixers, growing for a KV cache.
    """

    #: one-line description used by ``mnemo list`` and the docs.
    description: str = ""
    #: which kind of memory (see docs/index.md): "implicit", "explicit" or "agentic".
    memory_kind: str = "implicit"
    #: small constructor arguments (besides dim, num_heads) for tests, `mnemo list` and the demo,
    #: e.g. a window shorter than the test sequences so the window actually bites.
    example_kwargs: dict = {}
    #: constructor arguments for `mnemo demo` (128-token byte sequences on a CPU); {} = defaults.
    demo_kwargs: dict = {}
    #: whether `mnemo demo` without --mixers trains this mixer; False for mixers whose reference-speed
    #: CPU path would dominate the demo's time (they still run with ``--mixers NAME``).
    demo_default: bool = True

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads

    def forward(self, x: Tensor, state: MixerState | None = None) -> tuple[Tensor, MixerState | None]:  # pragma: no cover
        raise NotImplementedError

    def init_state(self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MixerState:  # pragma: no cover
        raise NotImplementedError

    def state_size(self, seq_len: int) -> int:  # pragma: no cover
        raise NotImplementedError

    # -- shared argument checks -------------------------------------------------------------
    def check_input(self, x: Any, state: MixerState | None) -> None:
        """Loud, early checks at the public boundary (shape, dtype, state type)."""
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: x must be a torch.Tensor of shape [batch, time, {self.dim}], got {type(x).__name__}")
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"{name}: x must have shape [batch, time, {self.dim}], got {list(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: x must be a floating-point tensor, got dtype {x.dtype}")
        if state is not None:
            if not isinstance(state, MixerState):
                raise TypeError(f"{name}: state must be a MixerState returned by this mixer or None, got {type(state).__name__}")
            b = next(iter(state.tensors().values())).shape[0] if state.tensors() else x.shape[0]
            if b != x.shape[0]:
                raise ValueError(f"{name}: state was built for batch size {b}, but x has batch size {x.shape[0]}")
