"""The landmark data transform against a brute-force layout: insert_landmarks puts the landmark token
exactly where the `landmark` mixer expects it (p % (l + 1) == l), and labels_with_landmarks /
landmark_index keep every label with its own token, so the scored original positions are unchanged."""

from __future__ import annotations

import pytest
import torch

from mnemotorch.ops.landmark import (
    check_landmarks,
    insert_landmarks,
    labels_with_landmarks,
    landmark_index,
    landmark_positions,
    remove_landmarks,
    with_landmarks_length,
)
from mnemotorch.tasks import ByteTokenizer
from mnemotorch.tasks.synthetic import make_task

LM = 99  # landmark id in these tests; the task tokens below are < 99


def brute_force_layout(length: int, block_len: int) -> list[int | None]:
    """Walk the sequence: each ordinary token t in order, and a landmark (None) after every block_len of them."""
    out: list[int | None] = []
    for t in range(length):
        out.append(t)
        if (t + 1) % block_len == 0:
            out.append(None)
    return out


@pytest.mark.parametrize("block_len", [1, 2, 3, 5, 7, 50])
def test_transform_matches_a_brute_force_layout(block_len: int) -> None:
    gen = torch.Generator().manual_seed(block_len)
    for length in range(0, 3 * block_len + 4):
        ids = torch.randint(0, LM, (2, length), generator=gen)
        labels = torch.where(torch.rand(2, length, generator=gen) < 0.3, torch.randint(0, LM, (2, length), generator=gen), -100)
        layout = brute_force_layout(length, block_len)
        out_ids, out_labels = insert_landmarks(ids, block_len, LM), labels_with_landmarks(labels, block_len)
        assert out_ids.shape == out_labels.shape == (2, len(layout)) and len(layout) == with_landmarks_length(length, block_len)
        for p, t in enumerate(layout):
            # the landmark positions are exactly those the mixer reads as landmarks
            assert (t is None) == bool(p % (block_len + 1) == block_len) == bool(landmark_positions(len(layout), block_len)[p])
            want_ids = [LM, LM] if t is None else ids[:, t].tolist()
            want_labels = [-100, -100] if t is None else labels[:, t].tolist()
            assert out_ids[:, p].tolist() == want_ids and out_labels[:, p].tolist() == want_labels, (length, p)
        # the mapping: token t sits at landmark_index[t]; the inverse drops the landmarks again
        assert landmark_index(length, block_len).tolist() == [p for p, t in enumerate(layout) if t is not None]
        assert remove_landmarks(out_ids, block_len, dim=-1).equal(ids) and remove_landmarks(out_labels, block_len, dim=1).equal(labels)
        check_landmarks(out_ids, block_len, LM)  # the layout the mixer assumes, no stray landmark
        # the scored (row, original position) pairs, in row-major order, are the same
        idx = landmark_index(length, block_len)
        orig = [(b, t) for b in range(2) for t in range(length) if labels[b, t] != -100]
        moved = [(b, int((idx == p).nonzero()[0])) for b in range(2) for p in range(len(layout)) if out_labels[b, p] != -100]
        assert moved == orig


def test_passkey_answer_positions_survive_the_transform() -> None:
    """Passkey with a landmark token every 15 bytes (id 257, past the byte vocabulary): the labelled
    positions hold the same input byte and target digit as before, each target is the next ordinary
    byte after its position, and the exact-match row mask is unchanged."""
    block_len, lm_id = 15, ByteTokenizer().vocab_size
    data = make_task("needle", 4, seed=0, length=128, kind="passkey", haystack="synthetic", tokenizer="byte", instruction=False)
    assert int(data.input_ids.max()) < lm_id == data.vocab_size
    x, y = insert_landmarks(data.input_ids, block_len, lm_id), labels_with_landmarks(data.labels, block_len)
    idx = landmark_index(data.seq_len, block_len)
    assert x[:, idx].equal(data.input_ids) and y[:, idx].equal(data.labels)
    assert (y[:, landmark_positions(x.shape[1], block_len)] == -100).all()
    assert (y != -100).sum(1).tolist() == (data.labels != -100).sum(1).tolist() == [6] * 4  # " NNNNN"
    for b, p in (y != -100).nonzero().tolist():
        nxt = p + 1 if (p + 1) % (block_len + 1) != block_len else p + 2  # skip the landmark
        assert int(y[b, p]) == int(x[b, nxt])
