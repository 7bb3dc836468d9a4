"""The delta rule's chunked (DeltaNet WY) form against the token loop that specifies it.

``hebbian_memory(rule="delta")`` runs :func:`mnemotorch.ops.memory.miras.wy_delta_rule`; the
reference is :func:`hebbian_memory_reference`. float64 throughout, 1e-10 relative (ARCHITECTURE.md).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mnemotorch.layers import get_mixer
from mnemotorch.ops.linear import hebbian_memory, hebbian_memory_reference

F64 = torch.float64
TOL = 1e-10


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def inputs(b=2, t=37, h=2, dk=6, dv=5, seed=0, dtype=F64, requires_grad=False):
    """Unit keys and queries (as the mixer passes them), random values and a random initial state."""
    g = torch.Generator().manual_seed(seed)
    k = F.normalize(torch.randn(b, t, h, dk, generator=g, dtype=F64), dim=-1)
    q = F.normalize(torch.randn(b, t, h, dk, generator=g, dtype=F64), dim=-1)
    v = torch.randn(b, t, h, dv, generator=g, dtype=F64)
    m0 = torch.randn(b, h, dv, dk, generator=g, dtype=F64) / dk**0.5
    return [x.to(dtype).requires_grad_(requires_grad) for x in (k, v, q, m0)]


@pytest.mark.parametrize("t,chunk", [(37, 8), (32, 8), (37, 1), (5, 64), (64, 64), (1, 4), (37, 37)])
@pytest.mark.parametrize("lr", [1.0, 0.3, 1.7])
def test_chunked_equals_token_loop(t: int, chunk: int, lr: float) -> None:
    k, v, q, m0 = inputs(t=t)
    y_ref, m_ref = hebbian_memory_reference(k, v, q, "delta", lr, m0)
    y, m = hebbian_memory(k, v, q, "delta", lr, m0, chunk_size=chunk)
    assert y.shape == y_ref.shape and m.shape == m_ref.shape
    assert rel(y, y_ref) <= TOL and rel(m, m_ref) <= TOL


def test_no_initial_state_and_per_token_lr() -> None:
    k, v, q, _ = inputs(t=29)
    lr = 0.1 + 0.9 * torch.rand(2, 29, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    y_ref, m_ref = hebbian_memory_reference(k, v, q, "delta", lr)
    y, m = hebbian_memory(k, v, q, "delta", lr, chunk_size=8)
    assert rel(y, y_ref) <= TOL and rel(m, m_ref) <= TOL


def test_default_is_the_chunked_form() -> None:
    """The default path is not the token loop: its rounding differs from the loop's (but within 1e-10)."""
    k, v, q, m0 = inputs(t=64)
    y_ref, _ = hebbian_memory_reference(k, v, q, "delta", 1.0, m0)
    y_default, _ = hebbian_memory(k, v, q, "delta", 1.0, m0)
    y_64, _ = hebbian_memory(k, v, q, "delta", 1.0, m0, chunk_size=64)
    assert torch.equal(y_default, y_64) and not torch.equal(y_default, y_ref) and rel(y_default, y_ref) <= TOL


@pytest.mark.parametrize("t,chunk", [(23, 8), (23, 1), (16, 16)])
def test_gradients_equal_token_loop(t: int, chunk: int) -> None:
    k, v, q, m0 = inputs(t=t, requires_grad=True)
    w = torch.randn(2, t, 2, 5, generator=torch.Generator().manual_seed(7), dtype=F64)
    w_m = torch.randn(2, 2, 5, 6, generator=torch.Generator().manual_seed(8), dtype=F64)
    grads = []
    for y, m in (hebbian_memory_reference(k, v, q, "delta", 0.8, m0), hebbian_memory(k, v, q, "delta", 0.8, m0, chunk_size=chunk)):
        grads.append(torch.autograd.grad((y * w).sum() + (m * w_m).sum(), (q, k, v, m0)))
    for name, a, b in zip("q k v m0".split(), grads[1], grads[0]):
        assert rel(a, b) <= TOL, name


def test_gradcheck() -> None:
    k, v, q, m0 = inputs(b=1, t=5, h=1, dk=3, dv=2, seed=3, requires_grad=True)
    lr = (0.2 + 0.6 * torch.rand(1, 5, 1, generator=torch.Generator().manual_seed(4), dtype=F64)).requires_grad_()

    def fn(k, v, q, m0, lr):
        return hebbian_memory(k, v, q, "delta", lr, m0, chunk_size=2)

    assert torch.autograd.gradcheck(fn, (k, v, q, m0, lr), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_float32_and_bfloat16() -> None:
    k, v, q, m0 = inputs(t=70)
    y_ref, m_ref = hebbian_memory_reference(k, v, q, "delta", 1.0, m0)
    y, m = hebbian_memory(*(x.float() for x in (k, v, q)), "delta", 1.0, m0.float(), chunk_size=16)
    assert y.dtype == m.dtype == torch.float32 and rel(y.double(), y_ref) <= 1e-5 and rel(m.double(), m_ref) <= 1e-5
    kb, vb, qb = (x.bfloat16() for x in (k, v, q))
    yb, mb = hebbian_memory(kb, vb, qb, "delta", 1.0, m0.bfloat16(), chunk_size=16)
    y_ref_b, _ = hebbian_memory_reference(*(x.double() for x in (kb, vb, qb)), "delta", 1.0, m0.bfloat16().double())
    assert yb.dtype == torch.bfloat16 and mb.dtype == torch.float32 and rel(yb.double(), y_ref_b) <= 5e-3


def test_streaming_across_chunk_boundaries() -> None:
    k, v, q, m0 = inputs(t=37)
    full, m_full = hebbian_memory(k, v, q, "delta", 0.9, m0, chunk_size=8)
    state, outs, start = m0, [], 0
    for n in (3, 1, 13, 8, 12):
        y, state = hebbian_memory(k[:, start : start + n], v[:, start : start + n], q[:, start : start + n], "delta", 0.9, state, chunk_size=8)
        outs.append(y)
        start += n
    assert rel(torch.cat(outs, 1), full) <= TOL and rel(state, m_full) <= TOL


def test_mixer_delta_equals_token_loop() -> None:
    torch.manual_seed(0)
    mixer = get_mixer("hebbian", dim=16, num_heads=2, rule="delta", lr=0.7, chunk_size=4).double()
    x = torch.randn(2, 19, 16, dtype=F64)
    y, st = mixer(x)
    shape = (2, 19, 2, 8)
    q = F.normalize(mixer.q_proj(x).view(shape), dim=-1)
    k = F.normalize(mixer.k_proj(x).view(shape), dim=-1)
    v = mixer.v_proj(x).view(shape)
    y_ref, m_ref = hebbian_memory_reference(k, v, q, "delta", 0.7)
    assert rel(y, mixer.o_proj(y_ref.reshape(2, 19, 16))) <= TOL and rel(st.M, m_ref) <= TOL


def test_bad_chunk_size_is_named() -> None:
    k, v, q, _ = inputs(t=4)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="chunk_size"):
            hebbian_memory(k, v, q, "delta", chunk_size=bad)
