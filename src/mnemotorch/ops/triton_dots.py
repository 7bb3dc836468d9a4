"""Products with fp32 operands at about fp32 accuracy on the bf16 tensor cores (Triton helpers).

An fp32 value ``x`` splits into two bf16 parts, ``hi = bf16(x)`` and ``lo = bf16(x − hi)`` (the remainder is exact
in fp32), which together carry ~16 significant bits: ``|x − hi − lo| ≤ 2⁻¹⁸ |x|``. A product of two fp32 operands
then takes three bf16 products, ``a_hi b_hi + a_hi b_lo + a_lo b_hi`` (the dropped ``a_lo b_lo`` is ~2⁻¹⁶ of it),
accumulated in fp32: a relative error of ~2⁻¹⁷ per term, where one TF32 product has 2⁻¹¹ and Triton's "tf32x3"
~2⁻²¹ at six bf16 products' worth of tensor-core time. A product whose other operand is already bf16 (a value
loaded from bf16 inputs) takes two. Used where rounding accumulates through a recurrence (the Titans memory's
state, LLA's conjugate-gradient vectors) and plain TF32 is not enough.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bf16_parts(x):
    """``(hi, lo)``, both bf16, with ``x ≈ hi + lo`` to ~16 significant bits."""
    hi = x.to(tl.bfloat16)
    return hi, (x - hi.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def dot_split(a, b, acc=None):
    """``acc + a @ b`` (``acc`` None: ``a @ b``) for fp32 ``a`` and ``b``: three bf16 products of their parts, the largest
    first, accumulated in fp32."""
    ah, al = bf16_parts(a)
    bh, bl = bf16_parts(b)
    return tl.dot(al, bh, tl.dot(ah, bl, tl.dot(ah, bh, acc)))


@triton.jit
def dot_split_left(a, b, acc=None):
    """``acc + a @ b`` (``acc`` None: ``a @ b``) for fp32 ``a`` and bf16 ``b``: two bf16 products."""
    hi, lo = bf16_parts(a)
    return tl.dot(lo, b, tl.dot(hi, b, acc))


@triton.jit
def dot_split_right(a, b, acc=None):
    """``acc + a @ b`` (``acc`` None: ``a @ b``) for bf16 ``a`` and fp32 ``b``: two bf16 products."""
    hi, lo = bf16_parts(b)
    return tl.dot(a, lo, tl.dot(a, hi, acc))
