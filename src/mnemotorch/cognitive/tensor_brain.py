"""The Tensor Brain's semantic decoder (narrow implementation) with an episodic time index.

Tresp, Sharifzadeh, Konopatzki, Ma. *The Tensor Brain: Semantic Decoding for Perception and
Memory* (2020, arXiv:2001.11027); Tresp et al., *The Tensor Brain: A Unified Theory of Perception,
Memory and Semantic Decoding*, Neural Computation 35 (2023). docs/cognitive/tensor_brain.md.

Concepts have dual representations: an index ``c`` and an embedding ``a_c``. The representation
layer holds ``q [D]``; decoding samples an index from ``P(c | q) = softmax(beta a_c^T q)``, then writes
the embedding back into ``q``, and goes on: subject -> predicate -> object. An episodic memory stores
one representation per time index and re-decodes it on recall.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

ROLES = ("subject", "predicate", "object")


@dataclass
class Triple:
    subject: int
    predicate: int
    object: int

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.subject, self.predicate, self.object)


def _orthogonal(dim: int, generator: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


class SemanticDecoder(nn.Module):
    """Sequential triple decoding ``s -> p -> o`` from a representation ``q [B, D]``.

    Args:
        num_entities, num_predicates: sizes of the index layer (entities serve as subject and object).
        dim: ``D``, width of the embeddings and of the representation layer.
        inverse_temperature: ``beta`` of ``P(c | q) = softmax(beta a_c^T q)``.
        write_back: ``gamma``: after index ``c`` is sampled, ``q <- q + gamma a_c`` (the embedding is
            broadcast back to the representation layer, priming the next step).
        entity_embeddings, predicate_embeddings: optional fixed ``[N_e, D]`` / ``[N_p, D]`` tables
            (e.g. orthonormal rows for the check); random learnable tables otherwise.
        seed: seed of the fixed role maps (below).

    Role maps: the predicate and object steps read ``q`` through fixed orthogonal maps ``R_p``, ``R_o``
    (the subject step through the identity), and :meth:`represent` binds a triple as
    ``a_s + R_p^T a_p + R_o^T a_o``. This is our deviation (documented): the paper leaves the
    representation-layer dynamics to learning; fixed role maps make an untrained decoder able to
    recall what it stored.
    """

    def __init__(
        self,
        num_entities: int,
        num_predicates: int,
        dim: int,
        inverse_temperature: float = 1.0,
        write_back: float = 1.0,
        entity_embeddings: Tensor | None = None,
        predicate_embeddings: Tensor | None = None,
        seed: int = 0,
    ):
        super().__init__()
        for name, value in (("num_entities", num_entities), ("num_predicates", num_predicates), ("dim", dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not inverse_temperature > 0:
            raise ValueError(f"inverse_temperature must be > 0, got {inverse_temperature}")
        self.num_entities, self.num_predicates, self.dim = num_entities, num_predicates, dim
        self.inverse_temperature, self.write_back = inverse_temperature, write_back

        def table(given: Tensor | None, n: int, name: str) -> nn.Parameter:
            if given is None:
                return nn.Parameter(torch.randn(n, dim) / math.sqrt(dim))
            if given.shape != (n, dim):
                raise ValueError(f"{name} must have shape [{n}, {dim}], got {list(given.shape)}")
            return nn.Parameter(given.detach().clone())

        self.entity_embeddings = table(entity_embeddings, num_entities, "entity_embeddings")
        self.predicate_embeddings = table(predicate_embeddings, num_predicates, "predicate_embeddings")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("role_predicate", _orthogonal(dim, g).to(self.entity_embeddings.dtype))
        self.register_buffer("role_object", _orthogonal(dim, g).to(self.entity_embeddings.dtype))
        # Episodic memory: one representation per time index (grows by one per stored episode).
        self.register_buffer("episodes", torch.zeros(0, dim, dtype=self.entity_embeddings.dtype))
        self.episode_sizes: list[int] = []

    # -- decoding ----------------------------------------------------------------------------
    def _check_q(self, q: Tensor) -> Tensor:
        if not isinstance(q, Tensor) or q.shape[-1] != self.dim or q.ndim not in (1, 2):
            shape = list(q.shape) if isinstance(q, Tensor) else type(q).__name__
            raise ValueError(f"q must have shape [batch, {self.dim}] or [{self.dim}], got {shape}")
        if not q.is_floating_point():
            raise TypeError(f"q must be floating point, got {q.dtype}")
        return q[None] if q.ndim == 1 else q

    def _table_and_map(self, role: str) -> tuple[Tensor, Tensor | None]:
        if role == "subject":
            return self.entity_embeddings, None
        if role == "predicate":
            return self.predicate_embeddings, self.role_predicate
        if role == "object":
            return self.entity_embeddings, self.role_object
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")

    def probabilities(self, q: Tensor, role: str = "subject", inverse_temperature: float | None = None) -> Tensor:
        """``P(c | q) = softmax_c(beta a_c^T R_role q)``: ``[B, N_role]``."""
        q = self._check_q(q)
        beta = self.inverse_temperature if inverse_temperature is None else inverse_temperature
        if not beta > 0:
            raise ValueError(f"inverse_temperature must be > 0, got {beta}")
        emb, role_map = self._table_and_map(role)
        read = q if role_map is None else q @ role_map.T.to(q.dtype)
        return torch.softmax(beta * read @ emb.T.to(q.dtype), dim=-1)

    def decode(
        self,
        q: Tensor,
        sample: bool = False,
        generator: torch.Generator | None = None,
        inverse_temperature: float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Decode one triple per row of ``q [B, D]``.

        Returns ``indices [B, 3]`` (subject, predicate, object) and their probabilities ``[B, 3]``.
        ``sample=False`` takes the most probable index (the ``beta -> inf`` limit of sampling).
        """
        q = self._check_q(q)
        indices, probs = [], []
        for role in ROLES:
            p = self.probabilities(q, role, inverse_temperature)
            c = torch.multinomial(p, 1, generator=generator).squeeze(-1) if sample else p.argmax(-1)
            emb, role_map = self._table_and_map(role)
            a = emb[c].to(q.dtype)
            # Write the embedding back into the representation layer, in the role's frame.
            q = q + self.write_back * (a if role_map is None else a @ role_map.to(q.dtype))
            indices.append(c)
            probs.append(p.gather(-1, c[:, None]).squeeze(-1))
        return torch.stack(indices, -1), torch.stack(probs, -1)

    def represent(self, triples: list[Triple | tuple[int, int, int]]) -> Tensor:
        """Bind triples into one representation ``[D]``: ``sum a_s + R_p^T a_p + R_o^T a_o``."""
        q = torch.zeros(self.dim, dtype=self.entity_embeddings.dtype, device=self.entity_embeddings.device)
        for t in triples:
            s, p, o = t.as_tuple() if isinstance(t, Triple) else t
            if not (0 <= s < self.num_entities and 0 <= o < self.num_entities):
                raise ValueError(f"subject/object indices must be in [0, {self.num_entities}), got {(s, o)}")
            if not 0 <= p < self.num_predicates:
                raise ValueError(f"predicate index must be in [0, {self.num_predicates}), got {p}")
            q = q + self.entity_embeddings[s] + self.predicate_embeddings[p] @ self.role_predicate
            q = q + self.entity_embeddings[o] @ self.role_object
        return q

    # -- episodic memory ---------------------------------------------------------------------
    @torch.no_grad()
    def store_episode(self, triples: list[Triple | tuple[int, int, int]]) -> int:
        """One-shot storage: a new time index whose embedding is the episode's representation."""
        if len(triples) == 0:
            raise ValueError("an episode needs at least one triple")
        self.episodes = torch.cat([self.episodes, self.represent(triples)[None].detach()])
        self.episode_sizes.append(len(triples))
        return len(self.episode_sizes) - 1

    def time_probabilities(self, q: Tensor, inverse_temperature: float | None = None) -> Tensor:
        """``P(t | q) = softmax_t(beta a_t^T q)`` over stored time indices: ``[B, T_episodes]``."""
        q = self._check_q(q)
        if len(self.episode_sizes) == 0:
            raise ValueError("no episode stored yet")
        beta = self.inverse_temperature if inverse_temperature is None else inverse_temperature
        return torch.softmax(beta * q @ self.episodes.T.to(q.dtype), -1)

    @torch.no_grad()
    def recall(self, time_index: int, inverse_temperature: float | None = None) -> list[tuple[int, int, int]]:
        """Recall episode ``time_index``: ``q = a_t``, decode a triple, explain it away
        (``q <- q - represent(triple)``), repeat for the number of triples stored."""
        if not 0 <= time_index < len(self.episode_sizes):
            raise ValueError(f"time_index must be in [0, {len(self.episode_sizes)}), got {time_index}")
        q = self.episodes[time_index].clone()
        out = []
        for _ in range(self.episode_sizes[time_index]):
            idx, _ = self.decode(q, inverse_temperature=inverse_temperature)
            triple = tuple(int(i) for i in idx[0])
            out.append(triple)
            q = q - self.represent([triple])
        return out
