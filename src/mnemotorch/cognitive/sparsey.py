"""Sparsey's Code Selection Algorithm (CSA): sparse distributed codes learned in a single trial.

Rinkus, *Sparsey: event recognition via deep hierarchical sparse distributed codes* (2014) and
*A radically new theory of how the brain represents and computes with probabilities* / the Sparsey
overview arXiv:1710.07829. docs/cognitive/sparsey.md gives the equations.

A coding field (a "mac") is ``Q`` winner-take-all competitive modules (CMs) of ``K`` binary units.
A code is one winner per CM. Learning is binary and Hebbian (an active input and a winning unit get
a weight of 1), single-trial, and uses no gradients: everything here runs under ``torch.no_grad``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SparseyCSA(nn.Module):
    """One Sparsey coding field: ``Q`` WTA modules of ``K`` units over a binary input of ``input_size`` bits.

    Args:
        input_size: number of input bits ``n``.
        num_modules: ``Q``, competitive modules (the code has exactly ``Q`` active units).
        module_size: ``K``, units per module.
        familiarity_floor: ``G^-``: below this familiarity the code is chosen uniformly at random
            (maximal novelty -> a new, maximally different code).
        max_expansivity: ``chi``: the sigmoid's height at ``G = 1`` is ``1 + chi * K``.
        expansivity_power: ``gamma`` of ``((G - G^-) / (1 - G^-))^gamma``.
        sigmoid_steepness, sigmoid_center: ``lambda`` and ``phi`` of the V -> mu sigmoid.
    """

    def __init__(
        self,
        input_size: int,
        num_modules: int = 20,
        module_size: int = 20,
        familiarity_floor: float = 0.2,
        max_expansivity: float = 100.0,
        expansivity_power: float = 2.0,
        sigmoid_steepness: float = 28.0,
        sigmoid_center: float = 0.5,
    ):
        super().__init__()
        for name, value in (("input_size", input_size), ("num_modules", num_modules), ("module_size", module_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if module_size < 2:
            raise ValueError(f"module_size must be at least 2 (a WTA module needs a competition), got {module_size}")
        if not 0.0 <= familiarity_floor < 1.0:
            raise ValueError(f"familiarity_floor must be in [0, 1), got {familiarity_floor}")
        if max_expansivity < 0 or expansivity_power <= 0 or sigmoid_steepness <= 0:
            raise ValueError("max_expansivity must be >= 0, expansivity_power and sigmoid_steepness > 0")
        self.input_size, self.num_modules, self.module_size = input_size, num_modules, module_size
        self.familiarity_floor, self.max_expansivity = familiarity_floor, max_expansivity
        self.expansivity_power = expansivity_power
        self.sigmoid_steepness, self.sigmoid_center = sigmoid_steepness, sigmoid_center
        # Binary afferent weights, input bit j -> unit (q, k). A buffer: never trained by gradients.
        self.register_buffer("weights", torch.zeros(input_size, num_modules, module_size, dtype=torch.bool))

    # -- checks ------------------------------------------------------------------------------
    def _check(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"SparseyCSA: x must be a tensor of shape [batch, {self.input_size}], got {type(x).__name__}")
        if x.ndim not in (1, 2) or x.shape[-1] != self.input_size:
            raise ValueError(f"SparseyCSA: x must have shape [batch, {self.input_size}] or [{self.input_size}], got {list(x.shape)}")
        if x.dtype != torch.bool and not ((x == 0) | (x == 1)).all():
            raise ValueError("SparseyCSA: x must be binary (bool, or 0/1 values)")
        x = x.bool()
        return x[None] if x.ndim == 1 else x

    # -- the CSA steps -----------------------------------------------------------------------
    @torch.no_grad()
    def match(self, x: Tensor) -> Tensor:
        """``V [B, Q, K]``: fraction of the active input bits connected to each unit (in [0, 1])."""
        x = self._check(x)
        active = x.sum(-1).clamp_min(1).to(torch.float64)                       # pi: active bits
        u = torch.einsum("bn,nqk->bqk", x.double(), self.weights.double())      # input summation
        return u / active[:, None, None]

    @torch.no_grad()
    def familiarity(self, x: Tensor) -> Tensor:
        """``G [B]`` = mean over modules of the module's maximal match."""
        return self.match(x).amax(-1).mean(-1)

    @torch.no_grad()
    def win_probabilities(self, x: Tensor) -> Tensor:
        """``rho [B, Q, K]``: per module, the normalised sigmoid ``mu(V)`` whose height grows with ``G``."""
        v = self.match(x)
        g = v.amax(-1).mean(-1)                                                 # [B]
        lo = self.familiarity_floor
        rel = ((g - lo) / (1 - lo)).clamp_min(0.0) ** self.expansivity_power
        eta = 1 + rel * self.max_expansivity * self.module_size                 # [B]; 1 when G <= G^-
        mu = (eta[:, None, None] - 1) * torch.sigmoid(self.sigmoid_steepness * (v - self.sigmoid_center)) + 1
        return mu / mu.sum(-1, keepdim=True)

    @torch.no_grad()
    def encode(self, x: Tensor, learn: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """The code of each input: winner index per module, ``[B, Q]`` (long).

        With ``learn=True`` the inputs are stored one after the other (each write is visible to the
        next input of the batch), setting weight 1 from every active bit to every winner.
        """
        x = self._check(x)
        codes = []
        for row in x if learn else [x]:
            rows = row[None] if learn else row
            rho = self.win_probabilities(rows)                                  # [b, Q, K]
            flat = rho.reshape(-1, self.module_size)
            code = torch.multinomial(flat, 1, generator=generator).reshape(rows.shape[0], self.num_modules)
            if learn:
                self.store_code(rows[0], code[0])
            codes.append(code)
        return torch.cat(codes)

    @torch.no_grad()
    def store_code(self, x: Tensor, code: Tensor) -> None:
        """Single-trial binary Hebbian learning of one ``(input [n], code [Q])`` pair."""
        x = self._check(x)[0]
        if code.shape != (self.num_modules,):
            raise ValueError(f"SparseyCSA: code must have shape [{self.num_modules}], got {list(code.shape)}")
        bits = x.nonzero().squeeze(-1)
        modules = torch.arange(self.num_modules, device=code.device)
        self.weights[bits[:, None], modules[None, :], code[None, :]] = True

    def forward(self, x: Tensor, learn: bool = False, generator: torch.Generator | None = None) -> Tensor:
        return self.encode(x, learn=learn, generator=generator)

    @staticmethod
    def overlap(a: Tensor, b: Tensor) -> Tensor:
        """Number of modules in which two codes ``[..., Q]`` have the same winner (0..Q)."""
        if a.shape[-1] != b.shape[-1]:
            raise ValueError(f"codes must have the same number of modules, got {a.shape[-1]} and {b.shape[-1]}")
        return (a == b).sum(-1)
