"""IsSameObject probes: formulas, and the spec's synthetic check (linear ~ 0.5, diagonal quadratic ~ 0.98)."""

from __future__ import annotations

import math

import pytest
import torch

from mnemotorch.analysis import PairwiseBindingProbe, sample_pairs, synthetic_object_patches


def test_probe_formulas():
    torch.manual_seed(0)
    x, y = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    for kind in ("linear", "diagonal", "quadratic"):
        p = PairwiseBindingProbe(8, kind).double()
        with torch.no_grad():
            p.bias.fill_(0.25)
        w, b = p.weight.detach(), 0.25
        if kind == "linear":
            ref = x @ w + y @ w + b
        elif kind == "diagonal":
            ref = (x * y) @ w + b
        else:
            ref = torch.einsum("nc,cd,nd->n", x, (w + w.T) / 2, y) / math.sqrt(8) + b
        assert torch.allclose(p(x, y), ref, rtol=0, atol=1e-12)
        assert torch.allclose(p(x, y), p(y, x), rtol=0, atol=1e-12)  # all three are symmetric in the pair


def test_synthetic_data_and_balanced_pairs():
    g = torch.Generator().manual_seed(0)
    tokens, ids = synthetic_object_patches(10, generator=g, noise=0.0)
    assert tokens.shape == (10, 16, 32) and ids.shape == (10, 16)
    assert all(torch.equal(torch.bincount(row, minlength=4), torch.full((4,), 4)) for row in ids)
    same = ids[0][:, None] == ids[0][None, :]
    assert torch.equal((tokens[0][:, None] == tokens[0][None, :]).all(-1), same)  # noise 0: equal codes iff same object
    img, i, j, lab = sample_pairs(ids, 1000, g)
    assert int(lab.sum()) == 500 and bool((i != j).all())
    assert torch.equal((ids[img, i] == ids[img, j]).float(), lab)


def test_linear_is_at_chance_and_diagonal_quadratic_binds():
    g = torch.Generator().manual_seed(0)
    train, test = synthetic_object_patches(128, generator=g), synthetic_object_patches(128, generator=g)
    acc = {}
    for kind in ("linear", "diagonal", "quadratic"):
        torch.manual_seed(0)
        probe = PairwiseBindingProbe(32, kind)
        probe.fit(*train, steps=150, n_pairs=256)
        acc[kind] = probe.accuracy(*test)
    assert abs(acc["linear"] - 0.5) < 0.04, acc
    assert acc["diagonal"] >= 0.96, acc
    assert acc["quadratic"] >= 0.9, acc


def test_bad_inputs():
    p = PairwiseBindingProbe(32, "quadratic")
    with pytest.raises(ValueError, match="same shape"):
        p(torch.zeros(3, 32), torch.zeros(4, 32))
    with pytest.raises(ValueError, match="built for dim=32"):
        p(torch.zeros(3, 16), torch.zeros(3, 16))
    with pytest.raises(ValueError, match=r"object_ids must be \[N, P\] = \(2, 16\)"):
        p.fit(torch.zeros(2, 16, 32), torch.zeros(2, 8, dtype=torch.long), steps=1)
    with pytest.raises(ValueError, match="tokens have dim 8"):
        p.fit(torch.zeros(2, 16, 8), torch.zeros(2, 16, dtype=torch.long), steps=1)
    with pytest.raises(ValueError, match="kind"):
        PairwiseBindingProbe(32, "cubic")
    with pytest.raises(ValueError, match="different-object"):
        sample_pairs(torch.zeros(2, 4, dtype=torch.long), 10)
