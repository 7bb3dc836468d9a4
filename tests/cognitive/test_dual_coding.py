"""Dual-coding episodic memory (Hill et al., 2021): synthetic fast mapping."""

from __future__ import annotations

import pytest
import torch

from mnemotorch.cognitive import DualCodingMemory

DIM, BETA = 64, 64.0


def unit(*shape: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


def fast_mapping_accuracy(num_objects: int, g: torch.Generator, query_known_names: bool = True, episodes: int = 20) -> float:
    """Each episode: N objects, each seen and named once ("this is a dax"), interleaved with unnamed
    views of the same objects; then every name is a query and the visual read-out must pick its object."""
    memory = DualCodingMemory(DIM, DIM, inverse_temperature=BETA)
    hits = total = 0
    for _ in range(episodes):
        objects = unit(1, num_objects, DIM, g=g)     # visual embeddings
        names = unit(1, num_objects, DIM, g=g)       # language embeddings of the novel words
        state = None
        for i in torch.randperm(num_objects, generator=g).tolist():
            state = memory.write(state, visual=objects[:, i], language=names[:, i])
            j = int(torch.randint(num_objects, (1,), generator=g))  # an unnamed look at some object
            state = memory.write(state, visual=objects[:, j])
        queries = names if query_known_names else unit(1, num_objects, DIM, g=g)
        for i in range(num_objects):
            read = memory.read(state, queries[:, i], modality="language")
            guess = int((objects[0] @ read.visual[0]).argmax())
            hits += guess == i
            total += 1
    return hits / total


@pytest.mark.parametrize("num_objects", [3, 5, 10])
def test_fast_mapping_retrieval_is_near_perfect(num_objects: int) -> None:
    g = torch.Generator().manual_seed(num_objects)
    assert fast_mapping_accuracy(num_objects, g) >= 0.97


def test_unknown_names_score_chance() -> None:
    g = torch.Generator().manual_seed(7)
    acc = fast_mapping_accuracy(5, g, query_known_names=False, episodes=200)  # 1000 queries
    assert abs(acc - 1 / 5) < 0.05  # chance = 1/N; binomial sd ~ 0.013


def test_entries_are_separate_and_reads_are_cross_modal() -> None:
    g = torch.Generator().manual_seed(1)
    memory = DualCodingMemory(DIM, DIM, inverse_temperature=1e3)
    v, l_ = unit(1, 3, DIM, g=g), unit(1, 3, DIM, g=g)
    state = memory.write(None, visual=v[:, 0])                 # step 0: visual only
    state = memory.write(state, visual=v[:, 1], language=l_[:, 1])
    state = memory.write(state, language=l_[:, 2])             # step 2: language only
    assert state.has_visual.tolist() == [[True, True, False]] and state.has_language.tolist() == [[False, True, True]]
    by_name = memory.read(state, l_[:, 1], modality="language")
    assert by_name.weights[0, 1, 1] > 0.999                      # the language entry of step 1 ...
    assert torch.allclose(by_name.visual, v[:, 1], atol=1e-6)   # ... returns the object seen then
    by_sight = memory.read(state, v[:, 1], modality="visual")
    assert by_sight.weights[0, 0, 1] > 0.999 and torch.allclose(by_sight.language, l_[:, 1], atol=1e-6)
    # Absent entries get exactly zero weight.
    assert by_name.weights[0, 1, 0] == 0 and by_name.weights[0, 0, 2] == 0
    assert torch.allclose(by_name.weights.sum((1, 2)), torch.ones(1, dtype=torch.float64))


def test_learned_projections_and_gradients() -> None:
    memory = DualCodingMemory(12, 8, key_dim=6)
    state = memory.write(None, visual=torch.randn(2, 12), language=torch.randn(2, 8))
    state = memory.write(state, visual=torch.randn(2, 12))
    read = memory.read(state, torch.randn(2, 8), modality="language")
    (read.visual.sum() + read.language.sum()).backward()
    assert memory.queries["language"].weight.grad.abs().sum() > 0
    assert memory.keys["visual"].weight.grad.abs().sum() > 0


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(ValueError, match="key_dim"):
        DualCodingMemory(8, 6)
    memory = DualCodingMemory(8, 8)
    with pytest.raises(ValueError, match="neither"):
        memory.write(None)
    with pytest.raises(ValueError, match="language"):
        memory.write(None, visual=torch.randn(2, 8), language=torch.randn(2, 7))
    state = memory.write(None, visual=torch.randn(2, 8))
    with pytest.raises(ValueError, match="modality"):
        memory.read(state, torch.randn(2, 8), modality="audio")
    with pytest.raises(ValueError, match="query"):
        memory.read(state, torch.randn(2, 5), modality="visual")
    with pytest.raises(ValueError, match="batch size"):
        memory.write(state, visual=torch.randn(3, 8))
    with pytest.raises(ValueError, match="empty"):
        memory.read(memory.init_state(2), torch.randn(2, 8), modality="visual")
