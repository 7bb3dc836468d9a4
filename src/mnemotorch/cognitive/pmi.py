"""PMI memory: working memory with top-k competitive writes plus a long-term memory.

Zeng, Lin, Hu, Huang, Zhang. *A Framework for Inference Inspired by Human Memory Mechanisms*
(ICLR 2024, arXiv:2310.09297). docs/cognitive/pmi.md gives the equations and our reading of them.

PMI is *not* a causal token mixer: at each step ``t`` (a layer of the host network, or a time step
of a recurrent host) the working memory is written from the **whole** set of current perceptions
``X^t`` by competition, so a token's read-out depends on later tokens of the same step. It is a
plain ``nn.Module`` that carries its memories between calls in a :class:`PMIState`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

VARIANTS = ("paper", "reference_code")
WRITES = ("topk", "soft")


@dataclass
class PMIState:
    """Memories carried between steps.

    ``working``: ``M_w [B, N, D_m]``. ``long_term``: ``M_l [B, C, N, D_m]`` for ``variant="paper"``
    (the third-order tensor of the paper), ``[B, N, D_m]`` for ``variant="reference_code"``.
    ``step`` counts the writes so far.
    """

    working: Tensor
    long_term: Tensor
    step: int = 0


def topk_softmax(scores: Tensor, k: int) -> Tensor:
    """Softmax over the ``k`` largest entries of each row of ``scores [..., T]``; exactly 0 elsewhere.

    Ties at the k-th value are broken by ``torch.topk`` (lowest index first), so every row has
    exactly ``k`` non-zero weights (softmax weights are strictly positive).
    """
    if not 1 <= k <= scores.shape[-1]:
        raise ValueError(f"k must be in [1, {scores.shape[-1]}] (the number of inputs), got {k}")
    values, index = scores.topk(k, dim=-1)
    weights = torch.softmax(values, dim=-1)
    return torch.zeros_like(scores).scatter(-1, index, weights)


class PMIMemory(nn.Module):
    """Perception -> working memory (competitive write) -> long-term memory (association) -> read-out.

    Args:
        dim: width ``D`` of the perceptions ``x [B, T, D]`` and of the read-out ``U [B, T, D]``.
        num_slots: ``N``, working-memory slots.
        slot_dim: ``D_m``, width of a slot (default ``dim``).
        top_k: ``k``, inputs each slot may attend to when it is written (``write="topk"``).
        ltm_channels: ``C``, the extra order of the long-term tensor ``M_l [C, N, D_m]`` (paper variant).
        variant: ``"paper"`` (outer-product association into ``M_l [C, N, D_m]``, learnable mixing
            ``alpha``) or ``"reference_code"`` (the authors' code: the association reduces to a learned
            per-slot scaling of ``M_w`` added to ``M_l [N, D_m]``, and ``alpha`` is a fixed number).
        alpha: initial mixing weight of the working-memory read (paper: learnable, through a sigmoid),
            or the fixed constant (reference_code).
        write: ``"topk"`` (the paper) or ``"soft"`` (ablation: plain softmax over all inputs).
        use_working, use_long_term: ablations; switching one off reads only the other memory.
    """

    def __init__(
        self,
        dim: int,
        num_slots: int = 8,
        slot_dim: int | None = None,
        top_k: int = 4,
        ltm_channels: int = 4,
        variant: str = "paper",
        alpha: float = 0.5,
        write: str = "topk",
        use_working: bool = True,
        use_long_term: bool = True,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("num_slots", num_slots), ("top_k", top_k), ("ltm_channels", ltm_channels)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        slot_dim = dim if slot_dim is None else slot_dim
        if not isinstance(slot_dim, int) or slot_dim <= 0:
            raise ValueError(f"slot_dim must be a positive int, got {slot_dim!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if write not in WRITES:
            raise ValueError(f"write must be one of {WRITES}, got {write!r}")
        if not 0.0 < alpha < 1.0 and variant == "paper":
            raise ValueError(f"alpha must be in (0, 1) for variant='paper' (it is learned through a sigmoid), got {alpha}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not (use_working or use_long_term):
            raise ValueError("use_working and use_long_term cannot both be False: nothing would be read")
        self.dim, self.num_slots, self.slot_dim, self.top_k = dim, num_slots, slot_dim, top_k
        self.ltm_channels, self.variant, self.write = ltm_channels, variant, write
        self.use_working, self.use_long_term = use_working, use_long_term

        # External write channel: slots query the perceptions.
        self.write_q = nn.Linear(slot_dim, slot_dim, bias=False)
        self.write_k = nn.Linear(dim, slot_dim, bias=False)
        self.write_v = nn.Linear(dim, slot_dim, bias=False)
        # LSTM-style input/forget gates of the slot update (as in relational / global-workspace memories).
        self.gate_candidate = nn.Linear(slot_dim, 2 * slot_dim)
        self.gate_memory = nn.Linear(slot_dim, 2 * slot_dim, bias=False)
        # Internal write channel (WM -> LTM).
        if variant == "paper":
            self.assoc = nn.Linear(slot_dim, ltm_channels)  # c_i = W_c m_i, then c_i (x) m_i
            self.alpha_logit = nn.Parameter(torch.tensor(math.log(alpha / (1 - alpha))))
        else:
            self.assoc = nn.Linear(slot_dim, 1)  # one scale per slot
            self.register_buffer("alpha_fixed", torch.tensor(float(alpha)), persistent=False)
        # Inference: perceptions query WM, and WM-conditioned LTM.
        self.read_q = nn.Linear(dim, slot_dim, bias=False)
        self.read_k = nn.Linear(slot_dim, slot_dim, bias=False)
        self.read_v = nn.Linear(slot_dim, dim, bias=False)
        self.initial_slots = nn.Parameter(torch.randn(num_slots, slot_dim) / math.sqrt(slot_dim))

    # -- state -------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None, dtype=None) -> PMIState:
        """Learned initial slots for ``M_w``; an empty (zero) long-term memory."""
        p = self.initial_slots
        device, dtype = device or p.device, dtype or p.dtype
        working = p.to(device=device, dtype=dtype).expand(batch_size, -1, -1)
        if self.variant == "paper":
            lt_shape = (batch_size, self.ltm_channels, self.num_slots, self.slot_dim)
        else:
            lt_shape = (batch_size, self.num_slots, self.slot_dim)
        return PMIState(working=working, long_term=torch.zeros(lt_shape, device=device, dtype=dtype))

    def alpha(self) -> Tensor:
        return torch.sigmoid(self.alpha_logit) if self.variant == "paper" else self.alpha_fixed

    # -- the three stages -------------------------------------------------------------------
    def write_weights(self, x: Tensor, working: Tensor) -> Tensor:
        """Competitive write attention ``A [B, N, T]``: slot ``i`` over perceptions ``t``.

        ``write="topk"``: each row has exactly ``top_k`` non-zeros (softmax over the k best scores).
        """
        q = self.write_q(working)                                   # [B, N, D_m]
        k = self.write_k(x)                                         # [B, T, D_m]
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.slot_dim)  # [B, N, T]
        if self.write == "soft":
            return torch.softmax(scores, dim=-1)
        if self.top_k > x.shape[1]:
            raise ValueError(f"top_k ({self.top_k}) is larger than the number of perceptions T={x.shape[1]} in x")
        return topk_softmax(scores, self.top_k)

    def update_working(self, x: Tensor, working: Tensor) -> tuple[Tensor, Tensor]:
        """``M_w^t = sigma(f) * M_w^{t-1} + sigma(i) * tanh(A V)``; returns ``(M_w^t, A)``."""
        attn = self.write_weights(x, working)
        candidate = attn @ self.write_v(x)                          # [B, N, D_m]
        gates = self.gate_candidate(candidate) + self.gate_memory(torch.tanh(working))
        g_in, g_forget = gates.chunk(2, dim=-1)
        new = torch.sigmoid(g_in) * torch.tanh(candidate) + torch.sigmoid(g_forget) * working
        return new, attn

    def update_long_term(self, working: Tensor, long_term: Tensor) -> Tensor:
        """Internal write channel: paper ``M_l += c_i (x) m_i`` per slot; reference_code ``M_l += s_i m_i``."""
        if self.variant == "paper":
            c = self.assoc(working)                                 # [B, N, C]
            return long_term + torch.einsum("bnc,bnd->bcnd", c, working)
        return long_term + self.assoc(working) * working            # per-slot scalar s_i

    def long_term_read(self, working: Tensor, long_term: Tensor) -> Tensor:
        """Associate WM with LTM: ``M_wl [B, N, D_m]``, the LTM content each slot retrieves."""
        if self.variant == "paper":
            # Slot i retrieves from its C long-term traces by content: softmax_c(m_i . M_l[c, i]).
            scores = torch.einsum("bnd,bcnd->bnc", working, long_term) / math.sqrt(self.slot_dim)
            return torch.einsum("bnc,bcnd->bnd", torch.softmax(scores, dim=-1), long_term)
        return long_term

    def attend(self, x: Tensor, memory: Tensor) -> Tensor:
        """Content-based read of a memory ``[B, N, D_m]`` by perceptions ``x [B, T, D]`` -> ``[B, T, D]``."""
        scores = self.read_q(x) @ self.read_k(memory).transpose(-1, -2) / math.sqrt(self.slot_dim)
        return torch.softmax(scores, dim=-1) @ self.read_v(memory)

    def forward(self, x: Tensor, state: PMIState | None = None) -> tuple[Tensor, PMIState]:
        """One PMI step.

        Args:
            x: perceptions ``[B, T, D]`` (floating point).
            state: memories from the previous step, or ``None`` (fresh memories).
        Returns:
            ``U [B, T, D] = alpha U_w + (1 - alpha) U_wl`` and the new :class:`PMIState`.
        """
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != self.dim:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"PMIMemory: x must have shape [batch, time, {self.dim}], got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"PMIMemory: x must be a floating-point tensor, got dtype {x.dtype}")
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        elif not isinstance(state, PMIState):
            raise TypeError(f"PMIMemory: state must be a PMIState or None, got {type(state).__name__}")
        elif state.working.shape[0] != x.shape[0]:
            raise ValueError(f"PMIMemory: state was built for batch size {state.working.shape[0]}, but x has batch size {x.shape[0]}")
        working, _ = self.update_working(x, state.working)
        long_term = self.update_long_term(working, state.long_term)
        u_w = self.attend(x, working) if self.use_working else None
        u_wl = self.attend(x, self.long_term_read(working, long_term)) if self.use_long_term else None
        if u_w is None:
            u = u_wl
        elif u_wl is None:
            u = u_w
        else:
            a = self.alpha().to(x.dtype)
            u = a * u_w + (1 - a) * u_wl
        return u, PMIState(working=working, long_term=long_term, step=state.step + 1)
