"""PMI memory (Zeng et al., ICLR 2024): competitive top-k writes, LTM association, ablations."""

from __future__ import annotations

import math

import pytest
import torch

from mnemotorch.cognitive import PMIMemory, PMIState, topk_softmax


def perturbed(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module


@pytest.mark.parametrize("variant", ["paper", "reference_code"])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_write_rows_have_exactly_k_nonzeros(variant: str, k: int) -> None:
    torch.manual_seed(0)
    m = PMIMemory(16, num_slots=6, top_k=k, variant=variant).double()
    x = torch.randn(3, 10, 16, dtype=torch.float64)
    state = m.init_state(3, dtype=torch.float64)
    for _ in range(3):  # also after the memory has been written a few times
        a = m.write_weights(x, state.working)
        assert a.shape == (3, 6, 10)
        assert ((a != 0).sum(-1) == k).all()
        assert torch.allclose(a.sum(-1), torch.ones(3, 6, dtype=torch.float64), atol=1e-12)
        _, state = m(x, state)


def test_topk_softmax_matches_masked_softmax() -> None:
    torch.manual_seed(1)
    s = torch.randn(4, 5, 9, dtype=torch.float64)
    w = topk_softmax(s, 4)
    kth = s.topk(4, -1).values[..., -1:]
    ref = torch.softmax(s.masked_fill(s < kth, float("-inf")), -1)
    assert (w - ref).abs().max() < 1e-15


def test_paper_equations_float64() -> None:
    """The module's forward equals the equations written out by hand (docs/cognitive/pmi.md)."""
    torch.manual_seed(2)
    m = perturbed(PMIMemory(8, num_slots=4, slot_dim=6, top_k=2, ltm_channels=3).double())
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    u, st = m(x)
    mw0 = m.initial_slots.expand(2, -1, -1)
    s = (mw0 @ m.write_q.weight.T) @ (x @ m.write_k.weight.T).transpose(1, 2) / math.sqrt(6)
    thr = s.topk(2, -1).values[..., -1:]
    a = torch.softmax(s.masked_fill(s < thr, float("-inf")), -1)
    cand = a @ (x @ m.write_v.weight.T)
    g = cand @ m.gate_candidate.weight.T + m.gate_candidate.bias + torch.tanh(mw0) @ m.gate_memory.weight.T
    mw = torch.sigmoid(g[..., :6]) * torch.tanh(cand) + torch.sigmoid(g[..., 6:]) * mw0
    c = mw @ m.assoc.weight.T + m.assoc.bias                            # [B, N, C]
    ml = c.transpose(1, 2)[..., None] * mw[:, None]                    # [B, C, N, D]
    assert (st.working - mw).abs().max() < 1e-12 and (st.long_term - ml).abs().max() < 1e-12
    ret = torch.softmax(torch.einsum("bnd,bcnd->bnc", mw, ml) / math.sqrt(6), -1)
    mwl = torch.einsum("bnc,bcnd->bnd", ret, ml)

    def read(mem):
        sc = (x @ m.read_q.weight.T) @ (mem @ m.read_k.weight.T).transpose(1, 2) / math.sqrt(6)
        return torch.softmax(sc, -1) @ (mem @ m.read_v.weight.T)

    alpha = torch.sigmoid(m.alpha_logit)
    ref = alpha * read(mw) + (1 - alpha) * read(mwl)
    assert (u - ref).norm() / ref.norm() < 1e-12


def test_reference_code_variant_is_a_per_slot_scaling_with_fixed_alpha() -> None:
    torch.manual_seed(3)
    m = perturbed(PMIMemory(8, num_slots=4, top_k=2, variant="reference_code", alpha=0.3).double())
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    _, st = m(x)
    scale = st.working @ m.assoc.weight.T + m.assoc.bias               # [B, N, 1]
    assert st.long_term.shape == (2, 4, 8)
    assert (st.long_term - scale * st.working).abs().max() < 1e-12
    assert "alpha_logit" not in dict(m.named_parameters()) and float(m.alpha()) == pytest.approx(0.3)
    _, st2 = m(x, st)
    assert (st2.long_term - st.long_term - (st2.working @ m.assoc.weight.T + m.assoc.bias) * st2.working).abs().max() < 1e-12


@pytest.mark.parametrize(
    "kwargs", [{"use_long_term": False}, {"use_working": False}, {"write": "soft"}, {"variant": "reference_code"}]
)
def test_ablations_run_and_train(kwargs: dict) -> None:
    torch.manual_seed(4)
    m = PMIMemory(16, num_slots=5, top_k=2, **kwargs)
    x = torch.randn(2, 9, 16, requires_grad=True)
    u, st = m(x)
    u2, st2 = m(x, st)
    assert u2.shape == (2, 9, 16) and st2.step == 2 and torch.isfinite(u2).all()
    (u2.square().sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    if kwargs.get("write") == "soft":
        assert (m.write_weights(x, st.working) > 0).all()


def test_ablations_differ_from_full_model() -> None:
    torch.manual_seed(5)
    full = perturbed(PMIMemory(8, num_slots=4, top_k=2).double())
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    u_full, _ = full(x)
    for kw in ({"use_long_term": False}, {"use_working": False}, {"write": "soft"}):
        other = PMIMemory(8, num_slots=4, top_k=2, **kw).double()
        other.load_state_dict(full.state_dict())
        assert (other(x)[0] - u_full).abs().max() > 1e-6


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(ValueError, match="variant"):
        PMIMemory(8, variant="nope")
    with pytest.raises(ValueError, match="write"):
        PMIMemory(8, write="hard")
    with pytest.raises(ValueError, match="top_k"):
        PMIMemory(8, top_k=0)
    with pytest.raises(ValueError, match="use_working"):
        PMIMemory(8, use_working=False, use_long_term=False)
    m = PMIMemory(8, top_k=5)
    with pytest.raises(ValueError, match="top_k"):
        m(torch.randn(1, 3, 8))  # k larger than the number of perceptions
    with pytest.raises(ValueError, match="shape"):
        m(torch.randn(1, 6, 7))
    with pytest.raises(TypeError, match="floating"):
        m(torch.ones(1, 6, 8, dtype=torch.long))
    _, st = m(torch.randn(2, 6, 8))
    with pytest.raises(ValueError, match="batch size"):
        m(torch.randn(3, 6, 8), st)
    assert isinstance(st, PMIState)
