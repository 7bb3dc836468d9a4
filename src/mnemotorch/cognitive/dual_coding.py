"""Dual-coding episodic memory (Hill, Tieleman, von Glehn, Wong, Merzic, Clark, 2021).

*Grounded Language Learning Fast and Slow*, ICLR 2021, arXiv:2009.01719. docs/cognitive/dual_coding.md.

Each step ``t`` of an episode contributes up to two **separate** entries: a visual one (keyed by the
visual embedding ``v_t``) and a language one (keyed by the language embedding ``l_t``). A read is
attention over all entries with a query from either modality; every entry returns both embeddings of
its step, so a name retrieves the object seen when the name was heard (a cross-modal read).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

MODALITIES = ("visual", "language")


@dataclass
class DualCodingState:
    """The episode so far. ``visual [B, S, D_v]``, ``language [B, S, D_l]``; ``has_visual``/``has_language``
    ``[B, S]`` (bool) say which entries exist (a step without an utterance writes no language entry)."""

    visual: Tensor
    language: Tensor
    has_visual: Tensor
    has_language: Tensor

    @property
    def num_steps(self) -> int:
        return self.visual.shape[1]


@dataclass
class DualCodingRead:
    """``visual [B, D_v]`` and ``language [B, D_l]`` read out; ``weights [B, 2, S]`` over the entries
    (row 0: visual entries, row 1: language entries; they sum to 1 over both rows)."""

    visual: Tensor
    language: Tensor
    weights: Tensor


class DualCodingMemory(nn.Module):
    """Key-value episodic memory with modality-separate entries and cross-modal reads.

    Args:
        visual_dim: ``D_v``; language_dim: ``D_l``.
        key_dim: width of the shared key space. ``None``: no projections (requires ``D_v == D_l``):
            keys and queries are the raw embeddings, which is the untrained setting of the check.
        inverse_temperature: ``beta`` of the read softmax (times ``1/sqrt(key_dim)``).
    """

    def __init__(self, visual_dim: int, language_dim: int, key_dim: int | None = None, inverse_temperature: float = 1.0):
        super().__init__()
        for name, value in (("visual_dim", visual_dim), ("language_dim", language_dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if key_dim is None and visual_dim != language_dim:
            raise ValueError(f"key_dim=None needs visual_dim == language_dim, got {visual_dim} and {language_dim}; give key_dim")
        if key_dim is not None and (not isinstance(key_dim, int) or key_dim <= 0):
            raise ValueError(f"key_dim must be a positive int or None, got {key_dim!r}")
        if not inverse_temperature > 0:
            raise ValueError(f"inverse_temperature must be > 0, got {inverse_temperature}")
        self.visual_dim, self.language_dim = visual_dim, language_dim
        self.key_dim = visual_dim if key_dim is None else key_dim
        self.inverse_temperature = inverse_temperature
        dims = {"visual": visual_dim, "language": language_dim}
        if key_dim is None:
            self.keys = nn.ModuleDict({m: nn.Identity() for m in MODALITIES})
            self.queries = nn.ModuleDict({m: nn.Identity() for m in MODALITIES})
        else:
            self.keys = nn.ModuleDict({m: nn.Linear(dims[m], key_dim, bias=False) for m in MODALITIES})
            self.queries = nn.ModuleDict({m: nn.Linear(dims[m], key_dim, bias=False) for m in MODALITIES})

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> DualCodingState:
        z = lambda d: torch.zeros(batch_size, 0, d, device=device, dtype=dtype)  # noqa: E731
        e = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        return DualCodingState(z(self.visual_dim), z(self.language_dim), e, e.clone())

    def write(
        self,
        state: DualCodingState | None,
        visual: Tensor | None = None,
        language: Tensor | None = None,
    ) -> DualCodingState:
        """Append one step. ``visual [B, D_v]`` and/or ``language [B, D_l]``; a missing modality
        (``None``) writes no entry of that modality for this step. Returns a new state."""
        if visual is None and language is None:
            raise ValueError("write needs visual and/or language embeddings, got neither")
        ref = visual if visual is not None else language
        if ref.ndim != 2:
            raise ValueError(f"visual/language must have shape [batch, dim], got {list(ref.shape)}")
        batch = ref.shape[0]
        for name, t, d in (("visual", visual, self.visual_dim), ("language", language, self.language_dim)):
            if t is not None and (t.ndim != 2 or t.shape != (batch, d)):
                raise ValueError(f"{name} must have shape [{batch}, {d}], got {list(t.shape)}")
            if t is not None and not t.is_floating_point():
                raise TypeError(f"{name} must be floating point, got {t.dtype}")
        if state is None:
            state = self.init_state(batch, ref.device, ref.dtype)
        if state.visual.shape[0] != batch:
            raise ValueError(f"state was built for batch size {state.visual.shape[0]}, but the embeddings have batch size {batch}")
        v = visual if visual is not None else torch.zeros(batch, self.visual_dim, device=ref.device, dtype=ref.dtype)
        l_ = language if language is not None else torch.zeros(batch, self.language_dim, device=ref.device, dtype=ref.dtype)
        flag = lambda present: torch.full((batch, 1), present, dtype=torch.bool, device=ref.device)  # noqa: E731
        return DualCodingState(
            visual=torch.cat([state.visual, v[:, None]], 1),
            language=torch.cat([state.language, l_[:, None]], 1),
            has_visual=torch.cat([state.has_visual, flag(visual is not None)], 1),
            has_language=torch.cat([state.has_language, flag(language is not None)], 1),
        )

    def read(self, state: DualCodingState, query: Tensor, modality: str) -> DualCodingRead:
        """Attend over every entry (both modalities) with a query ``[B, D_modality]``.

        ``w = softmax(beta / sqrt(d_k) * q . k_e)`` over the existing entries ``e``; the read-out is
        ``sum_e w_e [v_{step(e)}, l_{step(e)}]``: both embeddings of the entry's step.
        """
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        dim = self.visual_dim if modality == "visual" else self.language_dim
        if query.ndim != 2 or query.shape[-1] != dim:
            raise ValueError(f"query must have shape [batch, {dim}] for modality={modality!r}, got {list(query.shape)}")
        if state.num_steps == 0 or not (state.has_visual.any(1) | state.has_language.any(1)).all():
            raise ValueError("the memory is empty: write at least one step before reading")
        if query.shape[0] != state.visual.shape[0]:
            raise ValueError(f"query has batch size {query.shape[0]}, the memory {state.visual.shape[0]}")
        q = self.queries[modality](query)                                      # [B, d_k]
        keys = torch.stack([self.keys["visual"](state.visual), self.keys["language"](state.language)], 1)  # [B, 2, S, d_k]
        scores = torch.einsum("bd,bmsd->bms", q, keys) * (self.inverse_temperature / math.sqrt(self.key_dim))
        present = torch.stack([state.has_visual, state.has_language], 1)       # [B, 2, S]
        scores = scores.masked_fill(~present, float("-inf"))
        b = scores.shape[0]
        w = torch.softmax(scores.reshape(b, -1), -1).reshape_as(scores)
        per_step = w.sum(1)                                                    # [B, S]
        return DualCodingRead(
            visual=torch.einsum("bs,bsd->bd", per_step, state.visual),
            language=torch.einsum("bs,bsd->bd", per_step, state.language),
            weights=w,
        )
