"""Neurofeedback: balanced labels, torch-only axes, an oracle reporter at 100%, a random model near chance."""

from __future__ import annotations

import itertools

import pytest
import torch

from mnemotorch.analysis import NeurofeedbackProtocol, logistic_axis, median_split, pca_axis
from mnemotorch.tasks.tokenizer import ByteTokenizer

SUBJECTS = ["The cat", "A farmer", "My sister", "The old king", "A small boat", "The river"]
VERBS = ["sleeps near", "helps", "sings to", "watches"]
OBJECTS = ["the door.", "a friend.", "the hills.", "every child."]
SENTENCES = [" ".join(p) for p in itertools.islice(itertools.product(SUBJECTS, VERBS, OBJECTS), 0, 96, 3)]  # 32


def test_median_split_is_balanced_even_with_ties():
    s = torch.tensor([3.0, 1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 1.0])
    labels = median_split(s)
    assert int(labels.sum()) == 4 and labels[0] == 1 and labels[6] == 1 and labels[5] == 0
    assert int(median_split(torch.randn(9)).sum()) == 4


def test_pca_axis_is_the_top_eigenvector():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.5, 2.0, 0.1], dtype=torch.float64)
    x = x @ torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))[0]
    evals, evecs = torch.linalg.eigh(torch.cov(x.T))
    for c in (0, 1):
        w = pca_axis(x, c)
        ref = evecs[:, -1 - c]
        assert abs(float(w.norm()) - 1) < 1e-12 and abs(abs(float(w @ ref)) - 1) < 1e-10
        assert float(w[w.abs().argmax()]) > 0


def test_logistic_axis_finds_the_separating_direction():
    g = torch.Generator().manual_seed(1)
    true = torch.tensor([2.0, -1.0, 0.0, 0.5], dtype=torch.float64)
    x = torch.randn(400, 4, generator=g, dtype=torch.float64)
    y = (x @ true > 0).long()
    w = logistic_axis(x, y)
    assert float(((x @ w > 0).long() == y).double().mean()) > 0.97
    assert float(w @ true / true.norm()) > 0.95
    with pytest.raises(ValueError, match="both classes"):
        logistic_axis(x, torch.zeros(400))
    with pytest.raises(ValueError, match="labels has 3 entries"):
        logistic_axis(x, torch.tensor([0, 1, 0]))


@pytest.fixture
def protocol(mnemo):
    return NeurofeedbackProtocol(mnemo(dtype=torch.float32), ByteTokenizer(), layer=1).fit(SENTENCES)


def test_labels_balanced_and_oracle_is_perfect(protocol):
    assert len(protocol.labels) == 32 and int(protocol.labels.sum()) == 16
    assert torch.equal(protocol.labels, (protocol.scores > protocol.scores.median()).long())  # distinct scores: same as > median
    res = protocol.reporting_task(n_context=6, n_queries=24, reporter=protocol.oracle_reporter())
    assert res["accuracy"] == 1.0 and sum(res["targets"]) == 12
    flipped = protocol.reporting_task(n_context=6, n_queries=24, reporter=lambda p, s: 1 - protocol.oracle_reporter()(p, s))
    assert flipped["accuracy"] == 0.0


def test_random_model_reports_at_chance(protocol):
    res = protocol.reporting_task(n_context=4, n_queries=24, seed=0)
    assert 0.3 <= res["accuracy"] <= 0.7, res
    prompt = protocol.prompt([0, 1], "The end.")
    assert prompt.count("Label: ") == 3 and prompt.endswith("Sentence: The end.\nLabel: ")


def test_control_task_and_logistic_axis(protocol, mnemo):
    res = protocol.control_task(n_context=2, n_queries=4)
    assert res["n"] == 4 and set(res["mean_a"]) == {0, 1} and torch.isfinite(torch.tensor(res["difference"]))
    concept = [int("cat" in s or "king" in s) for s in SENTENCES]
    p = NeurofeedbackProtocol(mnemo(dtype=torch.float32), ByteTokenizer(), layer=0).fit(SENTENCES, method="logistic", concept_labels=concept)
    assert int(p.labels.sum()) == 16 and abs(float(p.axis.norm()) - 1) < 1e-6


def test_bad_arguments(mnemo):
    model, tok = mnemo(dtype=torch.float32), ByteTokenizer()
    with pytest.raises(ValueError, match="out of range"):
        NeurofeedbackProtocol(model, tok, layer=5)
    with pytest.raises(ValueError, match="label_names"):
        NeurofeedbackProtocol(model, tok, layer=0, label_names=("a", "a"))
    p = NeurofeedbackProtocol(model, tok, layer=0)
    with pytest.raises(RuntimeError, match="fit"):
        p.reporting_task()
    with pytest.raises(ValueError, match="concept_labels"):
        p.fit(SENTENCES, method="logistic")
    with pytest.raises(ValueError, match="too few"):
        p.fit(SENTENCES[:4]).reporting_task(n_context=8)
