"""GPU-like numerics for Triton's CPU interpreter, shared by the kernel tests of tests/ops.

The interpreter hides what only a GPU does; two fixtures bring some of it back:

* ``gpu_numerics``: the interpreter multiplies the raw bit patterns of bfloat16 ``tl.dot`` operands,
  truncates fp32 -> bf16 casts and computes "tf32" products in full fp32; the fixture makes it
  compute like the GPU (bf16 values, round-to-nearest-even casts, TF32-rounded operands);
* ``reversed_programs``: the interpreter runs a launch's programs one after the other in grid order;
  the fixture runs them in reverse, so a program that reads what another program of the same launch
  writes (no ordering on a GPU) gives a different answer;
* ``descriptor_reduce``: the interpreter has no tensor-descriptor reductions (``desc.atomic_add``, a
  TMA reduction on Hopper); the fixture adds them as element atomics at the addresses the descriptor
  covers, out-of-bounds elements skipped as TMA skips them. It checks a kernel's offsets and bounds,
  not the GPU lowering (that is for the GPU tests).

Import the fixtures into a test module (``from interpreter_numerics import gpu_numerics``); the
module needs ``TRITON_INTERPRET=1`` (tests/conftest.py sets it).
"""

from __future__ import annotations

import numpy as np
import pytest
import triton.language as tl
from triton._C.libtriton import ir
from triton.runtime import interpreter as interp

def _tf32(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def _bf16_bits_to_f32(h) -> np.ndarray:
    return (np.ascontiguousarray(h.data).astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    xs = np.ascontiguousarray(x, dtype=np.float32)
    bits = xs.view(np.uint32).astype(np.uint64)
    out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    out[np.isnan(xs)] = 0x7FC0
    return out


@pytest.fixture
def gpu_numerics(monkeypatch):
    """Interpreter products and casts as on the GPU (see the module docstring)."""
    builder = interp.InterpreterBuilder
    orig_dot, orig_cast, orig_fp2fp = builder.create_dot, builder.cast_impl, builder.create_fp_to_fp

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 in (a.dtype.scalar, b.dtype.scalar):
            ad = _bf16_bits_to_f32(a) if a.dtype.scalar == tl.bfloat16 else a.data
            bd = _bf16_bits_to_f32(b) if b.dtype.scalar == tl.bfloat16 else b.data
            return interp.TensorHandle(np.matmul(ad, bd, dtype=d.data.dtype) + d.data, d.dtype.scalar)
        if a.dtype.scalar == b.dtype.scalar == tl.float32 and input_precision == ir.INPUT_PRECISION.TF32:
            return interp.TensorHandle(np.matmul(_tf32(a.data), _tf32(b.data), dtype=d.data.dtype) + d.data, d.dtype.scalar)
        return orig_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interp.TensorHandle(_f32_to_bf16_bits(src.data), dst_type.scalar)
        return orig_cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return cast_impl(self, src, dst_type)
        return orig_fp2fp(self, src, dst_type, rounding_mode)

    monkeypatch.setattr(builder, "create_dot", create_dot)
    monkeypatch.setattr(builder, "cast_impl", cast_impl)
    monkeypatch.setattr(builder, "create_fp_to_fp", create_fp_to_fp)
    monkeypatch.setattr(builder, "create_fp_trunc", lambda self, src, dst_type: cast_impl(self, src, dst_type))


@pytest.fixture
def reversed_programs(monkeypatch):
    """Run every launch's programs in reverse grid order."""
    orig = interp.InterpreterBuilder.set_grid_idx

    def set_grid_idx(self, x, y, z):
        nx, ny, nz = self.grid_dim
        return orig(self, nx - 1 - x, ny - 1 - y, nz - 1 - z)

    monkeypatch.setattr(interp.InterpreterBuilder, "set_grid_idx", set_grid_idx)


def _descriptor_reduce(self, kind, desc, value, indices):
    if kind != ir.DESCRIPTOR_REDUCE_KIND.ADD:
        raise NotImplementedError(f"descriptor_reduce fixture: only ADD, got {kind}")
    ptrs, mask = desc.materialize_pointers(indices)
    return self.create_atomic_rmw(ir.ATOMIC_OP.FADD if value.dtype.scalar.is_floating() else ir.ATOMIC_OP.ADD, ptrs, value, mask,
                                  ir.MEM_SEMANTIC.RELAXED, ir.MEM_SYNC_SCOPE.GPU)


@pytest.fixture
def descriptor_reduce(monkeypatch):
    """Tensor-descriptor reductions (``desc.atomic_add``) in the interpreter, where it has none."""
    if not hasattr(interp.InterpreterBuilder, "create_descriptor_reduce"):
        monkeypatch.setattr(interp.InterpreterBuilder, "create_descriptor_reduce", _descriptor_reduce, raising=False)
