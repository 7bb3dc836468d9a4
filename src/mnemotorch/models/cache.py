"""`MnemoCache`: a `transformers` Cache that carries each layer's mixer state during generation."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from ..layers.base import MixerState


class MnemoCache(Cache):
    """Per-layer :class:`~mnemotorch.layers.MixerState` objects, one per block.

    Whatever a mixer remembers -- a KV cache, a bounded window, a recurrent matrix, memory-MLP
    weights -- lives in its state; the cache only keeps them in order and counts tokens. Because
    every mixer obeys the streaming invariant, decoding one token at a time with this cache gives
    the outputs of a full forward pass.
    """

    is_compileable = False

    def __init__(self, num_layers: int):
        # The base class's layer machinery (update/KV tensors) does not apply to general mixer
        # states, so it is not initialised; the methods generate() uses are overridden below.
        self.layers = []
        self.layer_class_to_replicate = None
        self.offloading = False
        self.states: list[MixerState | None] = [None] * num_layers

    def __len__(self) -> int:
        return len(self.states)

    def __repr__(self) -> str:
        return f"MnemoCache(layers={len(self.states)}, seen_tokens={self.get_seq_length()})"

    @property
    def is_linear(self) -> list[bool]:  # read by generate(); "linear" would skip input slicing we rely on
        return [False] * len(self.states)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        state = self.states[layer_idx] if self.states else None
        return 0 if state is None else state.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def reset(self) -> None:
        self.states = [None] * len(self.states)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for state in self.states:
            if state is not None:
                state.index_select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for state in self.states:
            if state is not None:
                state.repeat_interleave_batch(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("MnemoCache cannot be cropped: recurrent mixer states cannot forget tokens")

    def update(self, *args, **kwargs):  # pragma: no cover - mixers keep their own state
        raise NotImplementedError("MnemoCache stores mixer states; it has no key/value update()")
