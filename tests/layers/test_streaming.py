"""The streaming invariant, enforced for every registered mixer.

Running a sequence in pieces with the state carried must equal one call on the whole sequence
(float64 <= 1e-10 relative, float32 <= 1e-5), for any split -- one token at a time included.
"""

from __future__ import annotations

import random

import pytest
import torch

from mnemotorch.layers import get_mixer, list_mixers, mixer_class

DIM, HEADS, BATCH, T = 32, 4, 2, 37


def build(name: str, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    mixer = get_mixer(name, dim=DIM, num_heads=HEADS, **mixer_class(name).example_kwargs).to(dtype)
    # Random, non-trivial parameters: some mixers initialise parts to zero.
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mixer


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def random_splits(total: int, rng: random.Random) -> list[int]:
    cuts = sorted(rng.sample(range(1, total), rng.randint(1, min(8, total - 1))))
    return [b - a for a, b in zip([0] + cuts, cuts + [total])]


def run_pieces(mixer, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    state, outs = None, []
    for piece in torch.split(x, sizes, dim=1):
        y, state = mixer(piece, state)
        outs.append(y)
    return torch.cat(outs, dim=1)


def splits_to_test() -> list[list[int]]:
    rng = random.Random(1234)
    return [[1] * T, [T - 1, 1], [1, T - 1]] + [random_splits(T, rng) for _ in range(6)]


@pytest.mark.parametrize("name", list_mixers())
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_streaming_invariant(name: str, dtype: torch.dtype, tol: float) -> None:
    mixer = build(name, dtype)
    torch.manual_seed(1)
    x = torch.randn(BATCH, T, DIM, dtype=dtype)
    with torch.no_grad():
        full, _ = mixer(x)
        assert full.shape == x.shape
        for sizes in splits_to_test():
            streamed = run_pieces(mixer, x, sizes)
            err = rel(streamed, full)
            assert err <= tol, f"{name} {dtype} split {sizes}: relative error {err:.3e} > {tol:.0e}"


@pytest.mark.parametrize("name", list_mixers())
def test_init_state_equals_none(name: str) -> None:
    mixer = build(name, torch.float64)
    x = torch.randn(BATCH, 9, DIM, dtype=torch.float64)
    y0, _ = mixer(x)
    y1, _ = mixer(x, mixer.init_state(BATCH, x.device, x.dtype))
    assert rel(y1, y0) <= 1e-12


@pytest.mark.parametrize("name", list_mixers())
def test_gradient_flow(name: str) -> None:
    """Every parameter gets a finite, non-zero gradient, and streamed backward equals full backward."""
    mixer = build(name, torch.float64)
    x = torch.randn(BATCH, 19, DIM, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(BATCH, 19, DIM, dtype=torch.float64)

    y, _ = mixer(x)
    (y * weights).sum().backward()
    full_grads = {n: p.grad.clone() for n, p in mixer.named_parameters()}
    full_xgrad = x.grad.clone()
    for n, g in full_grads.items():
        assert torch.isfinite(g).all(), f"{name}: non-finite gradient for {n}"
        assert g.abs().sum() > 0, f"{name}: zero gradient for {n}"

    mixer.zero_grad()
    x.grad = None
    y2 = run_pieces(mixer, x, [5, 1, 7, 6])
    (y2 * weights).sum().backward()
    for n, p in mixer.named_parameters():
        assert rel(p.grad, full_grads[n]) <= 1e-10, f"{name}: streamed gradient of {n} differs"
    assert rel(x.grad, full_xgrad) <= 1e-10


@pytest.mark.parametrize("name", list_mixers())
def test_state_size_is_consistent(name: str) -> None:
    mixer = build(name, torch.float32)
    x = torch.randn(1, 24, DIM)
    _, state = mixer(x)
    held = sum(t.numel() for t in state.tensors().values())
    assert mixer.state_size(24) == held, f"{name}: state_size(24)={mixer.state_size(24)} but the state holds {held} elements"


@pytest.mark.parametrize("name", list_mixers())
def test_bad_input_is_rejected(name: str) -> None:
    mixer = build(name, torch.float32)
    with pytest.raises(ValueError, match="shape"):
        mixer(torch.randn(2, 5, DIM + 1))
    with pytest.raises(ValueError, match="shape"):
        mixer(torch.randn(5, DIM))
    with pytest.raises(TypeError, match="floating"):
        mixer(torch.ones(2, 5, DIM, dtype=torch.long))
    _, state = mixer(torch.randn(2, 5, DIM))
    with pytest.raises(ValueError, match="batch size"):
        mixer(torch.randn(3, 5, DIM), state)
