"""Training-time landmark attention: the grouped softmax, on the block-gated kernel when it can."""

from __future__ import annotations

from torch import Tensor

from ..block_sparse.gated import SUPPORTED_KERNEL_DTYPES, block_gated_attention
from ..checks import check_backend, check_qkv
from .reference import landmark_grouped_attention_reference


def landmark_attention(q: Tensor, k: Tensor, v: Tensor, block_len: int, scale: float | None = None, backend: str = "auto") -> Tensor:
    """Landmark attention's grouped softmax over a sequence with a landmark after every ``block_len`` tokens.

    Args:
        q: ``[B, Tq, H, D]`` for the last ``Tq`` of the ``Tk`` positions (absolute positions start at 0
            with the first key, so the landmark layout is fixed by position).
        k: ``[B, Tk, Hkv, D]``; v: ``[B, Tk, Hkv, D]``.
        block_len: ordinary tokens per block ``l`` (blocks of ``l + 1`` positions; the kernel needs ``l + 1 <= 128``).
        backend: ``"auto"`` (the block-gated Triton kernel on CUDA, the flat float64-ready reference
            elsewhere), ``"triton"`` or ``"reference"``.

    Returns:
        ``[B, Tq, H, D]``.

    The kernel runs :func:`~mnemotorch.ops.block_sparse.gated.block_gated_attention` with blocks of
    ``l + 1`` positions, the landmark keys as gate keys, the own block gated by its log-sum-exp and
    the landmarks excluded from the values: exactly the grouped softmax (tested in float64).
    """
    fn = "landmark_attention"
    check_qkv(fn, q, k, v)
    check_backend(fn, backend)
    if not isinstance(block_len, int) or isinstance(block_len, bool) or block_len < 1:
        raise ValueError(f"{fn}: block_len must be an int >= 1, got {block_len!r}")
    use_kernel = backend == "triton" or (
        backend == "auto" and q.device.type == "cuda" and q.dtype in SUPPORTED_KERNEL_DTYPES and block_len + 1 <= 128 and 16 <= q.shape[-1] <= 128
    )
    if not use_kernel:
        return landmark_grouped_attention_reference(q, k, v, block_len, scale=scale, form="flat")
    step = block_len + 1
    return block_gated_attention(
        q, k, v, step, gate_keys=k[:, block_len::step], lse_gate="own", exclude_last=True, scale=scale, backend="triton"
    )


__all__ = ["landmark_attention"]
