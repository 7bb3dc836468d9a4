"""Music Transformer relative attention: ``relative_attention(q, k, v, rel_emb)``.

Backends:

* ``"reference"``, ``"torch"``, ``"auto"`` -- plain PyTorch (``reference.py``): the skewing
  procedure when the queries are the whole sequence (``Tq == Tk``), the clipped-distance gather
  after a cache (``Tq < Tk``). ``O(L D + L^2)`` memory, never ``L^2 D``.
* ``"triton"`` -- the fused FlashAttention-style kernel (``triton.py``): loads only the ``E`` band
  each (query tile, key tile) needs and skews it in registers, so the extra memory is ``O(L D)``,
  never ``L^2`` or ``L^2 D``; forward and backward (dQ, dK, dV, dE). float32/float16/bfloat16, head
  dim 16..256, ``v``'s head dim equal to ``q``'s. Runs on CPU tensors only under Triton's interpreter.

``"auto"`` picks the kernel for CUDA tensors of a supported dtype and head dim, the reference
otherwise (the CPU, float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_backend, check_qkv
from .reference import (
    relative_attention_reference,
    relative_distance_index,
    relative_logits_explicit,
    relative_logits_gather,
    relative_logits_skew,
)


def check_rel_emb(fn: str, q: Tensor, rel_emb: Tensor) -> None:
    """``rel_emb`` must be ``[1 or H, R + 1, D]`` floating point, on q's device."""
    if not isinstance(rel_emb, Tensor):
        raise TypeError(f"{fn}: rel_emb must be a torch.Tensor, got {type(rel_emb).__name__}")
    h, d = q.shape[2], q.shape[3]
    if rel_emb.ndim != 3 or rel_emb.shape[0] not in (1, h) or rel_emb.shape[2] != d or rel_emb.shape[1] < 1:
        raise ValueError(f"{fn}: rel_emb must have shape [1 or {h}, max_distance + 1, {d}], got {list(rel_emb.shape)}")
    if not rel_emb.is_floating_point():
        raise TypeError(f"{fn}: rel_emb must be floating point, got {rel_emb.dtype}")
    if rel_emb.device != q.device:
        raise ValueError(f"{fn}: rel_emb is on {rel_emb.device} but q is on {q.device}")


#: dtypes the Triton kernel accepts (float64 stays on the reference).
SUPPORTED_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_available(device: torch.device) -> bool:
    """Whether ``backend="auto"`` picks the kernel: on CUDA with Triton installed."""
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
        return False
    return True


def _kernel_refusal(q: Tensor, v: Tensor) -> Exception | None:
    """The error explaining why the kernel cannot run on these inputs (``None``: it can)."""
    if q.dtype not in SUPPORTED_KERNEL_DTYPES:
        return TypeError(f"relative_attention: the Triton kernel supports dtypes {SUPPORTED_KERNEL_DTYPES}, got {q.dtype}")
    if v.shape[-1] != q.shape[-1]:
        return ValueError(f"relative_attention: the Triton kernel needs v's head dim equal to q's, got {v.shape[-1]} and {q.shape[-1]}")
    if not 1 <= q.shape[-1] <= 256:
        return ValueError(f"relative_attention: the Triton kernel supports head dims up to 256, got {q.shape[-1]}")
    return None


def relative_attention(
    q: Tensor, k: Tensor, v: Tensor, rel_emb: Tensor, scale: float | None = None, backend: str = "auto"
) -> Tensor:
    """Causal attention with learned relative-position logits (Huang et al., 2019).

    Args:
        q: ``[B, Tq, H, D]`` queries; query ``i`` sits at absolute position ``Tk - Tq + i``.
        k: ``[B, Tk, Hkv, D]`` keys (``H % Hkv == 0``); v: ``[B, Tk, Hkv, Dv]`` values.
        rel_emb: ``[Hr, R + 1, D]``, ``Hr`` in ``{1, H}``: row ``d`` is the embedding of distance
            ``i - j = d``; distances beyond ``R`` use row ``R``.
        scale: logit scale applied to ``q.k + q.e``, default ``D ** -0.5``.
        backend: ``"auto"`` (the Triton kernel on CUDA for float32/16 and bfloat16, else plain
            PyTorch), ``"triton"`` (the kernel; on CPU tensors only under ``TRITON_INTERPRET=1``),
            ``"torch"`` or ``"reference"`` (plain PyTorch: skewing or distance gather).

    Returns:
        ``[B, Tq, H, Dv]``.
    """
    check_qkv("relative_attention", q, k, v)
    check_backend("relative_attention", backend)
    check_rel_emb("relative_attention", q, rel_emb)
    rel_emb = rel_emb.to(q.dtype)
    use_kernel = backend == "triton" or (backend == "auto" and triton_available(q.device))
    use_kernel = use_kernel and q.shape[1] > 0  # nothing to launch for an empty query block
    if use_kernel:
        refusal = _kernel_refusal(q, v)
        if refusal is None:
            from .triton import relative_attention_triton

            return relative_attention_triton(q, k, v, rel_emb, q.shape[-1] ** -0.5 if scale is None else float(scale))
        if backend == "triton":
            raise refusal
    form = "skew" if q.shape[1] == k.shape[1] else "gather"
    return relative_attention_reference(q, k, v, rel_emb, scale, form=form)


__all__ = [
    "SUPPORTED_KERNEL_DTYPES",
    "relative_attention",
    "relative_attention_reference",
    "relative_distance_index",
    "relative_logits_explicit",
    "relative_logits_gather",
    "relative_logits_skew",
]
