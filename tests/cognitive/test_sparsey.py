"""Sparsey CSA (Rinkus): overlaps of codes. Q = K = 20, 50 stored patterns of 20-of-1000 bits."""

from __future__ import annotations

import pytest
import torch

from mnemotorch.cognitive import SparseyCSA

N_BITS, ACTIVE, Q, K, STORED = 1000, 20, 20, 20, 50


def random_patterns(count: int, g: torch.Generator) -> torch.Tensor:
    x = torch.zeros(count, N_BITS, dtype=torch.bool)
    for i in range(count):
        x[i, torch.randperm(N_BITS, generator=g)[:ACTIVE]] = True
    return x


def perturb(x: torch.Tensor, keep: int, g: torch.Generator) -> torch.Tensor:
    """Keep ``keep`` of each pattern's active bits, move the others to fresh positions."""
    out = torch.zeros_like(x)
    for i, row in enumerate(x):
        on = row.nonzero().squeeze(-1)
        on = on[torch.randperm(len(on), generator=g)]
        off = (~row).nonzero().squeeze(-1)
        out[i, on[:keep]] = True
        out[i, off[torch.randperm(len(off), generator=g)[: ACTIVE - keep]]] = True
    return out


@pytest.fixture(scope="module")
def trained():
    g = torch.Generator().manual_seed(0)
    sparsey = SparseyCSA(N_BITS, num_modules=Q, module_size=K)
    patterns = random_patterns(STORED, g)
    codes = sparsey.encode(patterns, learn=True, generator=g)
    return sparsey, patterns, codes, g


def test_codes_have_one_winner_per_module(trained) -> None:
    sparsey, patterns, codes, _ = trained
    assert codes.shape == (STORED, Q) and codes.min() >= 0 and codes.max() < K
    # Single-trial Hebbian learning: a stored input fully matches its code's units (V = 1).
    v = sparsey.match(patterns)
    assert torch.equal(v.gather(-1, codes[..., None]).squeeze(-1), torch.ones(STORED, Q, dtype=torch.float64))
    assert torch.allclose(sparsey.familiarity(patterns), torch.ones(STORED, dtype=torch.float64))
    # Exactly |x| * Q weights per pattern at most, and no weight for inactive bits of a lone pattern.
    assert sparsey.weights.sum() <= STORED * ACTIVE * Q


def test_repeat_reactivates_stored_code(trained) -> None:
    sparsey, patterns, codes, g = trained
    overlap = SparseyCSA.overlap(sparsey.encode(patterns, generator=g), codes).double().mean()
    assert overlap >= 19.5  # the spec: ~ 20 / 20


def test_novel_input_gets_chance_overlap(trained) -> None:
    sparsey, _, codes, g = trained
    novel = random_patterns(STORED, g)
    assert sparsey.familiarity(novel).mean() < 0.3  # crosstalk only: far from a stored pattern's 1.0
    assert sparsey.win_probabilities(novel).amax(-1).mean() < 1.1 / K  # so choices are (nearly) uniform
    new = sparsey.encode(novel, generator=g)
    overlap = SparseyCSA.overlap(new[:, None], codes[None]).double().mean()  # 2500 code pairs
    # Expected Q / K = 1; the standard error over 2500 (weakly dependent) pairs is ~0.02.
    assert abs(overlap - Q / K) < 0.15


def test_similar_inputs_get_similar_codes(trained) -> None:
    sparsey, patterns, codes, g = trained
    means = []
    for keep in (0, 10, 14, 20):
        x = perturb(patterns, keep, g)
        means.append(SparseyCSA.overlap(sparsey.encode(x, generator=g), codes).double().mean().item())
    assert means[0] < 1.5 and means[-1] >= 19.5
    assert means == sorted(means) and 1.5 < means[1] < means[-1]  # partial overlap lies in between


def test_uniform_when_unfamiliar_and_no_gradients() -> None:
    sparsey = SparseyCSA(50, num_modules=3, module_size=4)
    x = torch.zeros(50, dtype=torch.bool)
    x[:5] = True
    rho = sparsey.win_probabilities(x)
    assert torch.allclose(rho, torch.full((1, 3, 4), 0.25, dtype=torch.float64))
    assert list(sparsey.parameters()) == []


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(ValueError, match="module_size"):
        SparseyCSA(10, module_size=1)
    with pytest.raises(ValueError, match="familiarity_floor"):
        SparseyCSA(10, familiarity_floor=1.0)
    s = SparseyCSA(10, num_modules=2, module_size=3)
    with pytest.raises(ValueError, match=r"shape \[batch, 10\]"):
        s.encode(torch.zeros(2, 11, dtype=torch.bool))
    with pytest.raises(ValueError, match="binary"):
        s.encode(torch.full((1, 10), 0.5))
    with pytest.raises(ValueError, match="code"):
        s.store_code(torch.ones(10, dtype=torch.bool), torch.zeros(3, dtype=torch.long))
