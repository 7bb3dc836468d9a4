"""Linear-attention mixers: feature-map linear attention and Hebbian / delta-rule associative memory.

Both keep a fixed-size matrix per head as their state, so ``state_size`` does not grow with the
sequence: the recurrent view of attention (Katharopoulos et al., 2020; Schlag et al., 2021).
Neither uses positional encodings: RoPE would break the positivity the normaliser relies on, and
in hybrid models position comes from the causal order and the neighbouring layers (BASED pairs
linear attention with sliding-window attention and short convolutions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.linear import (
    kernels_enabled,
    DEFAULT_EPS,
    RULES,
    accumulation_dtype,
    feature_dim as features_out,  # renamed: `feature_dim` is also a constructor argument
    feature_map,
    hebbian_memory,
    linear_attention_chunked,
    linear_attention_recurrent,
)
from .base import Mixer, MixerState
from .registry import register_mixer


@dataclass
class LinearAttentionState(MixerState):
    """``S [B, H, Dφ, Dv]`` (Σ φ(k) vᵀ) and ``z [B, H, Dφ]`` (Σ φ(k)), in the accumulation dtype."""

    S: Tensor
    z: Tensor


@dataclass
class HebbianState(MixerState):
    """The associative memory ``M [B, H, Dv, Dk]`` (read as ``y = M q``), in the accumulation dtype."""

    M: Tensor


def _kernels():
    """The Triton module, imported on first CUDA use (CPU-only installs never import triton here)."""
    from ..ops.linear import triton as kernels

    return kernels


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@register_mixer("linear_attention")
class LinearAttention(Mixer):
    """Causal feature-map linear attention, normalised (Katharopoulos et al., 2020; BASED with ``taylor``).

    ``y_t = φ(q_t)ᵀ S_t / (φ(q_t)ᵀ z_t + ε)``, ``S_t = Σ_{s≤t} φ(k_s) v_sᵀ``, ``z_t = Σ_{s≤t} φ(k_s)``
    per head, followed by an output projection.

    Args:
        dim: model width.
        num_heads: heads ``H``; values have ``head_dim = dim / H`` channels.
        feature: φ: ``"elu_plus_one"`` (default), ``"taylor"`` (BASED), ``"relu"`` or ``"identity"``
            (identity is not positive: use it with ``normalize=False``).
        feature_dim: width ``d`` of each head's query/key projection before φ (default ``head_dim``).
            BASED projects to a small ``d`` (16) because ``taylor`` gives ``1 + d + d²`` features.
        normalize: divide by ``φ(q_t)ᵀ z_t + ε`` (default). ``z`` is carried either way.
        chunk_size: chunk length of the chunked (training / prefill) form.
        eps: ε of the denominator.

    Calls with ``T > 1`` use the chunked form; a one-token call (decoding) uses the recurrent step.
    On CUDA tensors (unless ``MNEMO_LINEAR_KERNELS=0``, see :mod:`mnemotorch.ops.linear`) both run as Triton kernels (:mod:`mnemotorch.ops.linear.triton`: the feature
    map, BASED's Taylor map included, is applied inside the kernel; chunk length 64 unless
    ``chunk_size`` is 16/32/64/128) whenever the kernels support the settings (``taylor`` with
    ``feature_dim ≤ 16``, other maps with ``feature_dim ≤ 128``, head size ≤ 256, fp32/bf16/fp16);
    otherwise, and always on the CPU, the reference path runs.
    State: ``S [B, H, Dφ, Dv]`` and ``z [B, H, Dφ]``: ``H · (Dφ · Dv + Dφ)`` elements, whatever the length.
    """

    description = "causal linear attention with a feature map (elu+1, relu, BASED taylor); (S, z) matrix state (Katharopoulos et al. 2020)"
    example_kwargs = {"feature": "taylor", "feature_dim": 4, "chunk_size": 8}

    def __init__(
        self,
        dim: int,
        num_heads: int,
        feature: str = "elu_plus_one",
        feature_dim: int | None = None,
        normalize: bool = True,
        chunk_size: int = 64,
        eps: float = DEFAULT_EPS,
    ):
        super().__init__(dim, num_heads)
        feature_map(feature)  # validates the name with a message listing the choices
        feature_dim = self.head_dim if feature_dim is None else feature_dim
        _check_positive_int("feature_dim", feature_dim)
        _check_positive_int("chunk_size", chunk_size)
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {normalize!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
        self.feature = feature
        self.feature_dim = feature_dim
        self.expanded_dim = features_out(feature, feature_dim)  # Dφ
        self.normalize = normalize
        self.chunk_size = chunk_size
        self.eps = float(eps)
        self.q_proj = nn.Linear(dim, num_heads * feature_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_heads * feature_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)

    def init_state(self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LinearAttentionState:
        acc = accumulation_dtype(dtype or self.q_proj.weight.dtype)
        device = device or self.q_proj.weight.device
        h, df, dv = self.num_heads, self.expanded_dim, self.head_dim
        return LinearAttentionState(
            seen_tokens=0,
            S=torch.zeros(batch_size, h, df, dv, device=device, dtype=acc),
            z=torch.zeros(batch_size, h, df, device=device, dtype=acc),
        )

    def state_size(self, seq_len: int) -> int:
        return self.num_heads * (self.expanded_dim * self.head_dim + self.expanded_dim)

    def forward(self, x: Tensor, state: LinearAttentionState | None = None) -> tuple[Tensor, LinearAttentionState]:
        """``x [B, T, dim]`` -> ``(y [B, T, dim], state)``."""
        self.check_input(x, state)
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.feature_dim)
        k = self.k_proj(x).view(b, t, self.num_heads, self.feature_dim)
        v = self.v_proj(x).view(b, t, self.num_heads, self.head_dim)
        if x.is_cuda and t > 0 and kernels_enabled() and _kernels().kernel_support("linear_attention", q, k, v, self.feature) is None:
            y, (s, z) = self._kernel_forward(q, k, v, state)
            y = self.o_proj(y.reshape(b, t, self.num_heads * self.head_dim))
            return y, LinearAttentionState(seen_tokens=state.seen_tokens + t, S=s, z=z)
        phi = feature_map(self.feature)
        q, k = phi(q), phi(k)
        if t == 1:
            y, (s, z) = linear_attention_recurrent(q, k, v, (state.S, state.z), self.normalize, self.eps)
        else:
            y, (s, z) = linear_attention_chunked(q, k, v, (state.S, state.z), self.normalize, self.eps, chunk_size=self.chunk_size)
        y = self.o_proj(y.reshape(b, t, self.num_heads * self.head_dim))
        return y, LinearAttentionState(seen_tokens=state.seen_tokens + t, S=s, z=z)

    def _kernel_forward(self, q: Tensor, k: Tensor, v: Tensor, state: LinearAttentionState) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The Triton path (raw q/k; φ inside the kernel): decode-step kernel for one token without autograd, else chunked."""
        ops = _kernels()
        init = (state.S.float(), state.z.float())
        if q.shape[1] == 1 and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
            y, st = ops.linear_attention_step_triton(q[:, 0], k[:, 0], v[:, 0], init, self.feature, self.normalize, self.eps)
            y = y.unsqueeze(1)
        else:
            y, st = ops.linear_attention_triton(q, k, v, self.feature, self.normalize, init, self.eps, ops.kernel_chunk(self.chunk_size))
        acc = state.S.dtype  # the state keeps the dtype init_state gave it (fp32 for fp32/half models)
        return y, (st[0].to(acc), st[1].to(acc))

    def extra_repr(self) -> str:
        return f"feature={self.feature!r}, feature_dim={self.feature_dim}, expanded_dim={self.expanded_dim}, normalize={self.normalize}, chunk_size={self.chunk_size}"


@register_mixer("hebbian")
class HebbianMemory(Mixer):
    """Hebbian or delta-rule associative memory per head (Schlag et al., 2021; Qiao, 2025).

    Each head writes ``(k_t, v_t)`` into a matrix ``M [Dv, Dk]`` and reads ``y_t = M_t q_t``:

    * ``rule="hebb"``: ``M_t = M_{t-1} + η v_t k_tᵀ`` (unnormalised linear attention, φ = identity);
    * ``rule="delta"``: ``M_t = M_{t-1} - η (M_{t-1} k_t - v_t) k_tᵀ`` (DeltaNet's write rule with a
      fixed η): the memory's current answer for ``k_t`` moves toward ``v_t`` instead of adding on top.

    Args:
        dim, num_heads: as for every mixer; ``Dk = Dv = head_dim``.
        rule: ``"hebb"`` (default) or ``"delta"``.
        lr: η. With normalised keys the delta update multiplies ``M`` by ``I - η k kᵀ``, whose
            eigenvalues are 1 and ``1 - η``: stable for ``0 < η ≤ 2``, no overshoot for η ≤ 1, and
            η = 1 replaces the stored value for ``k_t`` exactly. ``lr`` must lie in (0, 2] for the
            delta rule when keys are normalised; any η > 0 is allowed for Hebb.
        normalize_keys: ℓ2-normalise keys *and* queries per head (default True). This is what
            makes η ≤ 1 stable for the delta rule, and it bounds Hebb's cross-talk ``k_iᵀ q``
            by 1 (retrieval is then ``v_j`` + interference, as in the capacity analysis).
        chunk_size: chunk length of both rules' chunked forms. Hebb runs as chunked linear
            attention; the delta rule runs exactly in DeltaNet's chunkwise WY form (Yang et al.,
            2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length"):
            per chunk, one unit-triangular solve gives the pseudo-values and the reads and the state
            update are matmuls, so only the loop over chunks is sequential
            (:func:`mnemotorch.ops.linear.hebbian_memory`).

    State: ``M [B, H, Dv, Dk]``: ``H · head_dim²`` elements, whatever the length.
    """

    description = "Hebbian / delta-rule associative memory, y = M q; matrix state (Schlag et al. 2021)"
    example_kwargs = {"rule": "delta", "lr": 0.5, "chunk_size": 8}  # several chunks and a partial one in the shared tests

    def __init__(self, dim: int, num_heads: int, rule: str = "hebb", lr: float = 1.0, normalize_keys: bool = True, chunk_size: int = 64):
        super().__init__(dim, num_heads)
        _check_choice("rule", rule, RULES)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"lr must be a finite float > 0, got {lr!r}")
        if rule == "delta" and normalize_keys and lr > 2:
            raise ValueError(f"lr must be in (0, 2] for the delta rule with normalised keys (I - lr k kᵀ must not expand), got {lr!r}")
        if not isinstance(normalize_keys, bool):
            raise TypeError(f"normalize_keys must be a bool, got {normalize_keys!r}")
        _check_positive_int("chunk_size", chunk_size)
        self.rule = rule
        self.lr = float(lr)
        self.normalize_keys = normalize_keys
        self.chunk_size = chunk_size
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)

    def init_state(self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> HebbianState:
        acc = accumulation_dtype(dtype or self.q_proj.weight.dtype)
        device = device or self.q_proj.weight.device
        d = self.head_dim
        return HebbianState(seen_tokens=0, M=torch.zeros(batch_size, self.num_heads, d, d, device=device, dtype=acc))

    def state_size(self, seq_len: int) -> int:
        return self.num_heads * self.head_dim * self.head_dim

    def forward(self, x: Tensor, state: HebbianState | None = None) -> tuple[Tensor, HebbianState]:
        """``x [B, T, dim]`` -> ``(y [B, T, dim], state)``."""
        self.check_input(x, state)
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        if self.normalize_keys:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        y, m = hebbian_memory(k, v, q, rule=self.rule, lr=self.lr, initial_state=state.M, chunk_size=self.chunk_size)
        y = self.o_proj(y.reshape(b, t, self.num_heads * self.head_dim))
        return y, HebbianState(seen_tokens=state.seen_tokens + t, M=m)

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}, lr={self.lr}, normalize_keys={self.normalize_keys}, chunk_size={self.chunk_size}"
