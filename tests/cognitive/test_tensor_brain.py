"""Tensor Brain semantic decoder: q = a_s decodes s as the temperature goes to 0; episodic recall."""

from __future__ import annotations

import pytest
import torch

from mnemotorch.cognitive import SemanticDecoder, Triple

DIM, N_ENT, N_PRED = 256, 40, 12


@pytest.fixture(scope="module")
def decoder() -> SemanticDecoder:
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=torch.float64))
    emb = basis.T  # orthonormal rows
    return SemanticDecoder(N_ENT, N_PRED, DIM, entity_embeddings=emb[:N_ENT], predicate_embeddings=emb[N_ENT : N_ENT + N_PRED]).double()


def test_probability_of_s_goes_to_one_as_temperature_goes_to_zero(decoder) -> None:
    q = decoder.entity_embeddings.detach()                       # q = a_s for every s at once
    probs = []
    for beta in (0.5, 2.0, 8.0, 32.0, 128.0):
        p = decoder.probabilities(q, "subject", inverse_temperature=beta)
        diag = p.diagonal()
        # Orthonormal embeddings: P(s | a_s) = e^beta / (e^beta + N - 1) exactly.
        expected = torch.exp(torch.tensor(beta, dtype=torch.float64))
        expected = expected / (expected + N_ENT - 1)
        assert torch.allclose(diag, expected.expand(N_ENT), rtol=1e-10)
        probs.append(diag.min().item())
    assert probs == sorted(probs) and probs[0] < 0.1 and probs[-1] > 1 - 1e-12
    g = torch.Generator().manual_seed(1)
    idx, _ = decoder.decode(q, sample=True, generator=g, inverse_temperature=128.0)
    assert torch.equal(idx[:, 0], torch.arange(N_ENT))         # sampling decodes s itself


def test_triples_decode_in_order_and_episodes_are_recalled(decoder) -> None:
    g = torch.Generator().manual_seed(2)
    stored = []
    for _ in range(30):
        s, o = torch.randint(N_ENT, (2,), generator=g).tolist()
        p = int(torch.randint(N_PRED, (1,), generator=g))
        t = decoder.store_episode([Triple(s, p, o)])
        stored.append((t, (s, p, o)))
    correct = sum(decoder.recall(t, inverse_temperature=50.0) == [triple] for t, triple in stored)
    assert correct >= 29
    # The time index itself is found from the episode's representation.
    t, (s, p, o) = stored[5]
    pt = decoder.time_probabilities(decoder.represent([(s, p, o)]), inverse_temperature=20.0)
    assert int(pt.argmax()) == t


def test_write_back_enters_the_next_step() -> None:
    """decode() = argmax of P(c | q) with q <- q + gamma a_c (role frame) after every step."""
    torch.manual_seed(3)
    dec = SemanticDecoder(6, 4, 16, write_back=2.5).double()
    q = torch.randn(3, 16, dtype=torch.float64)
    idx, probs = dec.decode(q)
    s = dec.probabilities(q, "subject").argmax(-1)
    q1 = q + 2.5 * dec.entity_embeddings[s]
    p = dec.probabilities(q1, "predicate").argmax(-1)
    q2 = q1 + 2.5 * dec.predicate_embeddings[p] @ dec.role_predicate
    o = dec.probabilities(q2, "object").argmax(-1)
    assert torch.equal(idx, torch.stack([s, p, o], -1))
    assert torch.allclose(probs[:, 2], dec.probabilities(q2, "object").amax(-1), rtol=1e-12)


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(ValueError, match="entity_embeddings"):
        SemanticDecoder(4, 2, 8, entity_embeddings=torch.randn(4, 7))
    dec = SemanticDecoder(4, 2, 8)
    with pytest.raises(ValueError, match="q must have shape"):
        dec.probabilities(torch.randn(3, 9))
    with pytest.raises(ValueError, match="role"):
        dec.probabilities(torch.randn(8), role="verb")
    with pytest.raises(ValueError, match="inverse_temperature"):
        dec.probabilities(torch.randn(8), inverse_temperature=0.0)
    with pytest.raises(ValueError, match="predicate index"):
        dec.store_episode([(0, 5, 1)])
    with pytest.raises(ValueError, match="time_index"):
        dec.recall(0)
