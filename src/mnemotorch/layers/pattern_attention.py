"""Attention mixers over fixed sparsity patterns of absolute positions.

* ``power`` -- PowerAttention (Chen et al., 2025, arXiv:2503.03588): over blocks of ``block_size``
  tokens, query ``i`` sees key ``j <= i`` iff the block distance ``i//B - j//B`` is below
  ``window_blocks``, or is a power of two, or ``j`` lies in the first ``sink_blocks`` blocks.
  ``d`` layers reach ``2^d`` blocks back with no gaps. State: the full KV cache (power-of-two
  distances keep every past block reachable).
* ``neighborhood`` -- causal 1-D neighborhood attention (Hassani et al., 2023; NATTEN semantics with
  ``causal=True``, stride 1): query ``i`` sees keys ``j <= i`` with ``j = i (mod dilation)`` and
  ``(i - j) / dilation < kernel_size``. With ``dilation = 1`` this is a sliding window of
  ``kernel_size``. State: the last ``(kernel_size - 1) * dilation`` keys/values.

On CUDA, training-size calls starting at position 0 run the block-sparse Triton kernel with the
patterns of ``ops.block_sparse`` (cached per length); other calls (CPU, streaming continuations)
run PyTorch SDPA over query chunks with the element mask of the same rule.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import _QKVAttention
from .registry import register_mixer


def _masked_sdpa(q: Tensor, k: Tensor, v: Tensor, q_start: int, k_start: int, allowed, chunk: int = 512) -> Tensor:
    """``q [B, Tq, H, D]``, ``k/v [B, Tk, Hkv, D]`` with mask ``allowed(qpos [n,1], kpos [1,m])``; empty rows give 0."""
    h, hkv = q.shape[2], k.shape[2]
    if h != hkv:
        k = k.repeat_interleave(h // hkv, dim=2)
        v = v.repeat_interleave(h // hkv, dim=2)
    kpos = torch.arange(k_start, k_start + k.shape[1], device=q.device)[None, :]
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    outs = []
    for s in range(0, q.shape[1], chunk):
        qs = q[:, s : s + chunk]
        qpos = torch.arange(q_start + s, q_start + s + qs.shape[1], device=q.device)[:, None]
        mask = allowed(qpos, kpos)
        o = F.scaled_dot_product_attention(qs.transpose(1, 2), kt, vt, attn_mask=mask)
        # a row with no allowed key comes back NaN from SDPA; define it as 0 (as the kernel does)
        o = torch.where(mask.any(-1)[None, None, :, None], o, torch.zeros((), dtype=o.dtype, device=o.device))
        outs.append(o.transpose(1, 2))
    return torch.cat(outs, dim=1)


class _PatternAttention(_QKVAttention):
    """Softmax attention restricted by ``allowed(qpos, kpos)`` on absolute positions."""

    #: how far back (in positions) a key can stay visible; None = forever (keep the whole cache)
    reach: int | None = None

    def allowed(self, qpos: Tensor, kpos: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _kernel_pattern(self, length: int, device: str):  # pragma: no cover
        raise NotImplementedError

    def _attend_at(self, q: Tensor, k: Tensor, v: Tensor, q_start: int, k_start: int) -> Tensor:
        use_kernel = (
            self.backend in ("auto", "triton") and q.is_cuda and q_start == 0 and k_start == 0 and q.shape[1] == k.shape[1]
            and q.shape[1] >= 16 and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        )
        if use_kernel:
            from ..ops.block_sparse import block_sparse_attention

            return block_sparse_attention(q, k, v, self._kernel_pattern(q.shape[1], str(q.device)), backend="triton")
        return _masked_sdpa(q, k, v, q_start, k_start, self.allowed)

    def _keep(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.reach is None:
            return k, v
        if self.reach == 0:
            return k[:, :0], v[:, :0]
        return k[:, -self.reach :], v[:, -self.reach :]

    def state_size(self, seq_len: int) -> int:
        held = seq_len if self.reach is None else min(seq_len, self.reach)
        return 2 * held * self.num_kv_heads * self.head_dim


@lru_cache(maxsize=16)
def _power_pattern_cached(length: int, block_size: int, window_blocks: int, sink_blocks: int, device: str):
    from ..ops.block_sparse import power_pattern

    return power_pattern(length, block_size, window_blocks, sink_blocks, device=device)


@lru_cache(maxsize=16)
def _na_pattern_cached(length: int, kernel_size: int, dilation: int, device: str):
    from ..ops.block_sparse import neighborhood_pattern_1d

    return neighborhood_pattern_1d(length, kernel_size, dilation=dilation, causal=True, device=device)


def _check_pos_int(name: str, value, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


@register_mixer("power")
class PowerAttention(_PatternAttention):
    """PowerAttention: local window blocks + power-of-two block distances + sink blocks (causal).

    Args:
        dim, num_heads, num_kv_heads, rope_theta: as for ``attention``.
        block_size: ``B``, tokens per block (paper: 256).
        window_blocks: blocks of local window, the query's own included (paper: 5).
        sink_blocks: leading blocks always visible (paper: 1).
        backend: ``"auto"`` (Triton kernel on CUDA for whole sequences) or ``"reference"`` (masked SDPA).
    """

    description = "PowerAttention: window + power-of-two block distances + sink (Chen et al. 2025); full KV state"
    example_kwargs = {"block_size": 4, "window_blocks": 2, "sink_blocks": 1}
    demo_kwargs = {"block_size": 16, "window_blocks": 2, "sink_blocks": 1}

    def __init__(self, dim: int, num_heads: int, block_size: int = 256, window_blocks: int = 5, sink_blocks: int = 1,
                 num_kv_heads: int | None = None, rope_theta: float = 10000.0, backend: str = "auto"):
        super().__init__(dim, num_heads, num_kv_heads=num_kv_heads, rope_theta=rope_theta, backend=backend)
        self.block_size = _check_pos_int("block_size", block_size, 1)
        self.window_blocks = _check_pos_int("window_blocks", window_blocks, 1)
        self.sink_blocks = _check_pos_int("sink_blocks", sink_blocks, 0)

    def allowed(self, qpos: Tensor, kpos: Tensor) -> Tensor:
        dist = qpos // self.block_size - kpos // self.block_size
        power_of_two = (dist > 0) & ((dist & (dist - 1)) == 0)
        return (kpos <= qpos) & ((dist < self.window_blocks) | power_of_two | (kpos < self.sink_blocks * self.block_size))

    def _kernel_pattern(self, length: int, device: str):
        return _power_pattern_cached(length, self.block_size, self.window_blocks, self.sink_blocks, device)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, window_blocks={self.window_blocks}, sink_blocks={self.sink_blocks}"


@register_mixer("neighborhood")
class NeighborhoodAttention1D(_PatternAttention):
    """Causal 1-D neighborhood attention with dilation (for language).

    Args:
        dim, num_heads, num_kv_heads, rope_theta: as for ``attention``.
        kernel_size: keys per query (the query included) once the sequence is long enough.
        dilation: spacing between attended keys.
        backend: ``"auto"`` or ``"reference"``.
    """

    description = "causal 1-D neighborhood attention, kernel k, dilation d (NATTEN semantics); (k-1)d KV state"
    example_kwargs = {"kernel_size": 4, "dilation": 2}
    demo_kwargs = {"kernel_size": 16, "dilation": 4}

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 64, dilation: int = 1,
                 num_kv_heads: int | None = None, rope_theta: float = 10000.0, backend: str = "auto"):
        super().__init__(dim, num_heads, num_kv_heads=num_kv_heads, rope_theta=rope_theta, backend=backend)
        self.kernel_size = _check_pos_int("kernel_size", kernel_size, 1)
        self.dilation = _check_pos_int("dilation", dilation, 1)
        self.reach = (self.kernel_size - 1) * self.dilation

    def allowed(self, qpos: Tensor, kpos: Tensor) -> Tensor:
        gap = qpos - kpos
        return (gap >= 0) & (gap % self.dilation == 0) & (gap // self.dilation < self.kernel_size)

    def _kernel_pattern(self, length: int, device: str):
        return _na_pattern_cached(length, self.kernel_size, self.dilation, device)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, dilation={self.dilation}"
