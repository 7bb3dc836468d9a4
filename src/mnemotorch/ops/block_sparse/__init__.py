"""Block-sparse attention: one FlashAttention-style kernel driven by block lists.

``block_sparse_attention(q, k, v, pattern)`` where ``pattern`` is a :class:`BlockSparsePattern`
(built by ``sliding_window_pattern`` or ``build_pattern`` from any element predicate).

A plain causal sliding window (``pattern.causal_window`` set, no bias) takes a list-free fast
path (``swa_triton.py``) on CUDA; ``MNEMO_SWA_KERNEL`` chooses (:func:`swa_kernel_mode`). A plain
1-D neighborhood pattern (``pattern.na1d`` set) takes the same kernels' NA1D mode on CUDA
(:func:`na1d_fast_path`, ``MNEMO_NA1D_KERNEL``). Plain 2-D
neighborhood attention on row-major tokens has its own list-free kernels (``na2d_triton.py``), which
``layers.vision.na2d`` takes unless ``MNEMO_NA2D_KERNEL=off`` (:func:`na2d_fast_path`).
"""

from __future__ import annotations

import os


import torch
from torch import Tensor

from ..checks import check_backend, check_qkv
from .bias import RelativeBias, relative_bias_1d, relative_bias_grid
from .pattern import BlockSparsePattern, build_pattern, causal_window_predicate, sliding_window_pattern
from .patterns_misc import (
    document_pattern,
    halo_pattern,
    power_pattern,
    predicate_pattern,
    prefix_lm_pattern,
    sink_window_pattern,
)
from .patterns_natten import (
    PermutedPattern,
    neighborhood_pattern,
    neighborhood_pattern_1d,
    neighborhood_pattern_2d,
    neighborhood_pattern_3d,
    neighborhood_predicate,
    tile_permutation,
)
from .reference import block_sparse_attention_reference

SUPPORTED_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_available(device: torch.device) -> bool:
    """Whether ``backend="auto"`` picks the kernel: on CUDA with Triton installed.

    On the CPU the kernel runs only when asked for (``backend="triton"``) under Triton's
    interpreter (``TRITON_INTERPRET=1``, as the tests do); ``auto`` uses the reference there.
    """
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda"


SWA_KERNEL_ENV = "MNEMO_SWA_KERNEL"
SWA_KERNEL_MODES = ("auto", "lists", "fast")


def swa_kernel_mode() -> str:
    """``MNEMO_SWA_KERNEL``, read on every call (so one process can time both kernels):
    ``"auto"`` (default) -- the list-free sliding-window kernels for CUDA inputs;
    ``"lists"`` -- always the generic list-walking kernel; ``"fast"`` -- the list-free kernels
    wherever the Triton kernels run, Triton's CPU interpreter included (tests)."""
    mode = os.environ.get(SWA_KERNEL_ENV, "auto")
    if mode not in SWA_KERNEL_MODES:
        raise ValueError(f"{SWA_KERNEL_ENV} must be one of {SWA_KERNEL_MODES}, got {mode!r}")
    return mode


NA1D_KERNEL_ENV = "MNEMO_NA1D_KERNEL"
NA1D_KERNEL_MODES = ("auto", "off", "fast")


def na1d_fast_path(q: Tensor | None = None) -> bool:
    """``MNEMO_NA1D_KERNEL``, read on every call: ``"auto"`` (default) -- a plain 1-D neighborhood
    pattern (``pattern.na1d`` set, no bias) on CUDA inputs runs the list-free kernels' NA1D mode
    (causal: the causal sliding window, the same rule); on an H100 it is 1.22x the generic kernel
    forward and 1.06x forward + backward at L = 32K, K = 2048, D = 128 (docs/results/block_sparse.md);
    ``"fast"`` -- that path wherever the Triton kernels run, Triton's CPU interpreter included (tests);
    ``"off"`` -- always the generic list kernel."""
    mode = os.environ.get(NA1D_KERNEL_ENV, "auto")
    if mode not in NA1D_KERNEL_MODES:
        raise ValueError(f"{NA1D_KERNEL_ENV} must be one of {NA1D_KERNEL_MODES}, got {mode!r}")
    return mode == "fast" or (mode == "auto" and q is not None and q.is_cuda)


NA2D_KERNEL_ENV = "MNEMO_NA2D_KERNEL"
NA2D_KERNEL_MODES = ("off", "fast")


def na2d_fast_path() -> bool:
    """``MNEMO_NA2D_KERNEL``, read on every call: ``"fast"`` (default) -- ``layers.vision.na2d`` on the
    Triton backend runs plain NA-2D (dilation 1, stride 1, non-causal, no bias) through the list-free
    kernels of ``na2d_triton.py`` on row-major tokens; ``"off"`` -- the generic list kernel on tokens
    permuted into tiles (the path every other NA-2D case takes)."""
    mode = os.environ.get(NA2D_KERNEL_ENV, "fast")
    if mode not in NA2D_KERNEL_MODES:
        raise ValueError(f"{NA2D_KERNEL_ENV} must be one of {NA2D_KERNEL_MODES}, got {mode!r}")
    return mode == "fast"


def swa_fast_path(q: Tensor) -> bool:
    """Whether a causal sliding window on ``q``'s device runs the list-free kernels (given that the
    Triton kernels run at all and support the dtype / head dim: the callers check that)."""
    mode = swa_kernel_mode()
    return mode == "fast" or (mode == "auto" and q.device.type == "cuda")


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: BlockSparsePattern,
    scale: float | None = None,
    backend: str = "auto",
    bias: RelativeBias | None = None,
) -> Tensor:
    """Attention restricted to the pairs a block-sparse pattern allows.

    Args:
        q: ``[B, Lq, H, D]``.
        k: ``[B, Lk, Hkv, D]`` with ``H % Hkv == 0`` (GQA).
        v: ``[B, Lk, Hkv, D]`` (same head dim as q/k in the kernel).
        pattern: block lists for ``(Lq, Lk)``; query ``i`` / key ``j`` are the pattern's positions.
        scale: logit scale, default ``D ** -0.5``.
        backend: ``"auto"`` (Triton on CUDA or under the interpreter, else the reference),
            ``"triton"`` or ``"reference"``.
        bias: optional additive relative-position bias (:class:`RelativeBias`, built by
            :func:`relative_bias_1d` / :func:`relative_bias_grid`): ``scale * q . k + bias`` is the
            logit. Looked up per tile in the kernel from small tables, whose gradients the
            backward accumulates.

    Returns:
        ``[B, Lq, H, D]``; a query with no allowed key gets zeros.
    """
    check_qkv("block_sparse_attention", q, k, v)
    check_backend("block_sparse_attention", backend)
    if not isinstance(pattern, BlockSparsePattern):
        raise TypeError(f"block_sparse_attention: pattern must be a BlockSparsePattern, got {type(pattern).__name__}")
    if (pattern.q_len, pattern.k_len) != (q.shape[1], k.shape[1]):
        raise ValueError(
            f"block_sparse_attention: pattern is for (Lq, Lk) = ({pattern.q_len}, {pattern.k_len}) but q, k have ({q.shape[1]}, {k.shape[1]})"
        )
    if bias is not None:
        if not isinstance(bias, RelativeBias):
            raise TypeError(f"block_sparse_attention: bias must be a RelativeBias or None, got {type(bias).__name__}")
        bias.check("block_sparse_attention", q.shape[0], q.shape[1], k.shape[1], q.shape[2])
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    use_kernel = backend == "triton" or (backend == "auto" and triton_available(q.device))
    if backend == "torch":
        raise ValueError("block_sparse_attention: backend 'torch' does not exist; use 'auto', 'triton' or 'reference'")
    if not use_kernel:
        return block_sparse_attention_reference(q, k, v, pattern, scale, bias)
    if q.dtype not in SUPPORTED_KERNEL_DTYPES:
        if backend == "triton":
            raise TypeError(f"block_sparse_attention: the Triton kernel supports {SUPPORTED_KERNEL_DTYPES}, got {q.dtype}")
        return block_sparse_attention_reference(q, k, v, pattern, scale, bias)
    if v.shape[-1] != q.shape[-1]:
        raise ValueError("block_sparse_attention: the Triton kernel needs v's head dim equal to q's")
    if not 16 <= q.shape[-1] <= 256:
        raise ValueError(f"block_sparse_attention: the Triton kernel supports head dims 16..256, got {q.shape[-1]}")
    if bias is None and pattern.causal_window is not None and swa_fast_path(q):
        from .swa_triton import swa_attention_triton

        return swa_attention_triton(*_unit_last_stride(q, k, v), pattern.causal_window, scale)
    if bias is None and pattern.na1d is not None and na1d_fast_path(q):
        from . import swa_triton

        kernel_size, causal = pattern.na1d
        if causal:  # NATTEN causal, dilation 1, stride 1: keys t - K < j <= t, the causal sliding window
            return swa_triton.swa_attention_triton(*_unit_last_stride(q, k, v), kernel_size, scale)
        return swa_triton.na1d_attention_triton(*_unit_last_stride(q, k, v), kernel_size, scale)
    if pattern.full_idx.device != q.device:
        pattern = pattern.on_device(q.device)
    global _triton_impl
    if _triton_impl is None:
        from .triton import block_sparse_attention_triton as _triton_impl
    return _triton_impl(*_unit_last_stride(q, k, v), pattern, scale, bias)


def _unit_last_stride(*ts: Tensor) -> tuple[Tensor, ...]:
    # The kernels take any strides but a unit last one: no copy for q[:, :, h0:h1], transposes of
    # [B, H, L, D] tensors and the like.
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in ts)


_triton_impl = None


__all__ = [
    "BlockSparsePattern",
    "RelativeBias",
    "relative_bias_1d",
    "relative_bias_grid",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "build_pattern",
    "causal_window_predicate",
    "sliding_window_pattern",
    "PermutedPattern",
    "document_pattern",
    "halo_pattern",
    "neighborhood_pattern",
    "neighborhood_pattern_1d",
    "neighborhood_pattern_2d",
    "neighborhood_pattern_3d",
    "neighborhood_predicate",
    "na1d_fast_path",
    "na2d_fast_path",
    "power_pattern",
    "predicate_pattern",
    "prefix_lm_pattern",
    "sink_window_pattern",
    "swa_fast_path",
    "swa_kernel_mode",
    "tile_permutation",
]
