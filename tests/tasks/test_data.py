"""Tests for mnemotorch.tasks.data: determinism, resume, DDP sharding, sequential coverage."""

from __future__ import annotations

import pytest
import torch

from mnemotorch.tasks import (
    ByteTokenizer,
    RandomWindowBatches,
    SequentialBatches,
    encode_corpus,
)
from mnemotorch.tasks.data import IGNORE_INDEX

# Distinct values, so a token's value is its position: windows can be read off directly.
TOKENS = torch.arange(1_000, dtype=torch.long)


def test_encode_corpus() -> None:
    ids = encode_corpus("héllo", ByteTokenizer())
    assert ids.dtype == torch.long and ids.shape == (6,)
    assert ids.tolist() == list("héllo".encode("utf-8"))


def test_random_batches_shapes_and_shift() -> None:
    tokens = torch.randint(0, 257, (500,), generator=torch.Generator().manual_seed(0))
    sampler = RandomWindowBatches(tokens, batch_size=8, seq_len=16, seed=3)
    x, y = sampler.get_batch(0)
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    # Every row is a contiguous window and labels are the next tokens of the stream.
    x, y = RandomWindowBatches(TOKENS, batch_size=8, seq_len=16, seed=3).get_batch(5)
    assert torch.equal(x, x[:, :1] + torch.arange(16))
    assert torch.equal(y, x + 1)


def test_random_batches_deterministic() -> None:
    a = RandomWindowBatches(TOKENS, batch_size=4, seq_len=8, seed=7)
    b = RandomWindowBatches(TOKENS, batch_size=4, seq_len=8, seed=7)
    for step in range(5):
        xa, ya = next(a)
        xb, yb = b.get_batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.step == 5 and b.step == 0  # get_batch does not move the counter
    # Different steps and different seeds give different batches.
    assert not torch.equal(a.get_batch(0)[0], a.get_batch(1)[0])
    c = RandomWindowBatches(TOKENS, batch_size=4, seq_len=8, seed=8)
    assert not torch.equal(a.get_batch(0)[0], c.get_batch(0)[0])
    # Random state elsewhere does not leak in.
    torch.manual_seed(123)
    assert torch.equal(a.get_batch(2)[0], b.get_batch(2)[0])


def test_random_batches_cover_all_start_positions() -> None:
    # Starts lie in [0, N - seq_len - 1]: both ends are reachable, nothing beyond.
    tokens = torch.arange(12)
    sampler = RandomWindowBatches(tokens, batch_size=64, seq_len=8, seed=0)
    starts = torch.cat([sampler.global_starts(s) for s in range(4)])
    assert set(starts.tolist()) == {0, 1, 2, 3}
    # The shortest stream that works: N = seq_len + 1, one window.
    x, y = RandomWindowBatches(torch.arange(9), batch_size=2, seq_len=8).get_batch(0)
    assert torch.equal(x, torch.arange(8).expand(2, 8)) and torch.equal(y, x + 1)


def test_random_batches_resume_equals_uninterrupted() -> None:
    uninterrupted = RandomWindowBatches(TOKENS, batch_size=4, seq_len=8, seed=11)
    expected = [next(uninterrupted) for _ in range(10)]

    first = RandomWindowBatches(TOKENS, batch_size=4, seq_len=8, seed=11)
    got = [next(first) for _ in range(4)]
    state = first.state_dict()
    assert state == {"step": 4, "seed": 11}

    resumed = RandomWindowBatches(TOKENS, batch_size=4, seq_len=8, seed=0)  # seed comes from state
    resumed.load_state_dict(state)
    got += [batch for _, batch in zip(range(6), resumed)]
    for (xe, ye), (xg, yg) in zip(expected, got, strict=True):
        assert torch.equal(xe, xg) and torch.equal(ye, yg)


@pytest.mark.parametrize("world_size", [2, 4])
def test_random_batches_ranks_concatenate_to_single_process(world_size: int) -> None:
    single = RandomWindowBatches(TOKENS, batch_size=8, seq_len=16, seed=5)
    ranks = [
        RandomWindowBatches(TOKENS, batch_size=8, seq_len=16, seed=5, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    for step in range(6):
        x, y = single.get_batch(step)
        parts = [next(r) for r in ranks]
        assert all(p[0].shape == (8 // world_size, 16) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_random_batches_small_dtypes() -> None:
    x, y = RandomWindowBatches(TOKENS.to(torch.int32), batch_size=2, seq_len=4).get_batch(0)
    xr, _ = RandomWindowBatches(TOKENS, batch_size=2, seq_len=4).get_batch(0)
    assert x.dtype == torch.long and torch.equal(x, xr)


def test_random_batches_argument_errors() -> None:
    with pytest.raises(ValueError, match="divisible by world_size"):
        RandomWindowBatches(TOKENS, batch_size=6, seq_len=8, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        RandomWindowBatches(TOKENS, batch_size=4, seq_len=8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="len\\(tokens\\)=8.*seq_len=8"):
        RandomWindowBatches(torch.arange(8), batch_size=2, seq_len=8)
    with pytest.raises(ValueError, match="seq_len"):
        RandomWindowBatches(TOKENS, batch_size=2, seq_len=0)
    with pytest.raises(ValueError, match="1-D"):
        RandomWindowBatches(TOKENS.view(10, 100), batch_size=2, seq_len=8)
    with pytest.raises(ValueError, match="integer dtype"):
        RandomWindowBatches(TOKENS.float(), batch_size=2, seq_len=8)
    sampler = RandomWindowBatches(TOKENS, batch_size=2, seq_len=8)
    with pytest.raises(KeyError, match="seed"):
        sampler.load_state_dict({"step": 3})


def test_sequential_batches_cover_in_order() -> None:
    n, seq_len, batch_size = 1_000, 16, 4
    batches = SequentialBatches(TOKENS, batch_size=batch_size, seq_len=seq_len)
    xs, ys = zip(*batches)
    assert len(xs) == len(batches) == -(-((n - 1 + seq_len - 1) // seq_len) // batch_size)
    assert all(x.shape == (batch_size, seq_len) for x in xs)
    x, y = torch.cat(xs).flatten(), torch.cat(ys).flatten()
    keep = y != IGNORE_INDEX
    # Every target 1..N-1 exactly once, in order, each with its preceding token as input.
    assert torch.equal(y[keep], TOKENS[1:])
    assert torch.equal(x[keep], TOKENS[:-1])
    assert batches.num_targets == n - 1 == int(keep.sum())
    # Padding comes only at the very end.
    assert bool(keep[: n - 1].all()) and not bool(keep[n - 1 :].any())
    # Re-iterable and deterministic.
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, batches))


def test_sequential_batches_drop_last_and_max_batches() -> None:
    batches = SequentialBatches(TOKENS, batch_size=4, seq_len=16, drop_last=True)
    assert len(batches) == (999 // 16) // 4
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert torch.equal(x.flatten(), TOKENS[: x.numel()])
    assert torch.equal(y, x + 1)
    limited = SequentialBatches(TOKENS, batch_size=4, seq_len=16, max_batches=2)
    assert len(limited) == 2 and limited.num_targets == 2 * 4 * 16
    assert torch.equal(limited.get_batch(1)[0], batches.get_batch(1)[0])
    with pytest.raises(IndexError):
        limited.get_batch(2)
    with pytest.raises(ValueError, match="too short"):
        SequentialBatches(torch.arange(10), batch_size=4, seq_len=16, drop_last=True)
    with pytest.raises(ValueError, match="too short"):
        SequentialBatches(torch.arange(1), batch_size=1, seq_len=4)


@pytest.mark.parametrize("drop_last", [False, True])
def test_sequential_batches_ranks_concatenate_to_single_process(drop_last: bool) -> None:
    single = SequentialBatches(TOKENS, batch_size=6, seq_len=10, drop_last=drop_last)
    ranks = [
        SequentialBatches(TOKENS, batch_size=6, seq_len=10, rank=r, world_size=3, drop_last=drop_last)
        for r in range(3)
    ]
    assert {len(r) for r in ranks} == {len(single)}  # every rank runs the same number of batches
    for whole, *parts in zip(single, *ranks):
        assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
        assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])
    with pytest.raises(ValueError, match="divisible by world_size"):
        SequentialBatches(TOKENS, batch_size=5, seq_len=10, world_size=2)


# ---------------------------------------------------------------------------------------------
# NeedleMixBatches
# ---------------------------------------------------------------------------------------------

def _needle_mix(fraction, rank=0, world_size=1, seed=0, loss="answer"):
    from mnemotorch.tasks import ByteTokenizer, NeedleMixBatches

    tokens = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0))
    text = "It was the best of times. It was the worst of times. " * 60
    base = RandomWindowBatches(tokens, 8, 400, seed=seed, rank=rank, world_size=world_size)
    return NeedleMixBatches(base, ByteTokenizer(), [None, text], fraction, seed=seed, loss=loss)


def test_needle_mix_replaces_a_fraction_of_rows_with_needles():
    from mnemotorch.tasks import ByteTokenizer

    tok = ByteTokenizer()
    mix = _needle_mix(0.5)
    n_needle = 0
    for step in range(20):
        x, y = mix.get_batch(step)
        assert x.shape == y.shape == (8, 400)
        for row in range(8):
            text = tok.decode(x[row].tolist() + y[row, -1:].tolist())
            if "The pass key is" in text:
                n_needle += 1
                assert "What is the pass key? The pass key is" in text
                # loss="answer": only the answer's tokens are labelled, and they are the next inputs.
                lab = (y[row] != -100).nonzero().flatten()
                assert 1 <= len(lab) <= 6 and lab[-1] == 399
                assert torch.equal(y[row, lab[:-1]], x[row, lab[:-1] + 1])
                assert tok.decode(y[row, lab].tolist()).strip().isdigit()
            else:
                assert torch.equal(x[row, 1:], y[row, :-1])
    assert 50 <= n_needle <= 110  # 160 rows at p = 0.5


def test_needle_mix_needle_loss_labels_the_needle_question_and_answer():
    from mnemotorch.tasks import ByteTokenizer

    tok = ByteTokenizer()
    x, y = _needle_mix(1.0, loss="needle").get_batch(0)
    for row in range(8):
        lab = (y[row] != -100).nonzero().flatten()
        assert torch.equal(y[row, lab], x[row, lab + 1] if lab[-1] < 399 else torch.cat([x[row, lab[:-1] + 1], y[row, -1:]]))
        labelled = tok.decode(y[row, lab].tolist())
        assert "The pass key is" in labelled and "What is the pass key?" in labelled
        assert "It was the" not in labelled and "grass is green" not in labelled  # no haystack
    x_all, y_all = _needle_mix(1.0, loss="all").get_batch(0)
    assert torch.equal(x_all, x) and torch.equal(x_all[:, 1:], y_all[:, :-1])
    assert torch.equal(_needle_mix(0.0).get_batch(3)[0], _needle_mix(0.0).base.get_batch(3)[0])


def test_needle_mix_is_a_pure_function_of_step_and_shards_like_the_base():
    full = _needle_mix(0.5)
    halves = [_needle_mix(0.5, rank=r, world_size=2) for r in range(2)]
    for step in (0, 5):
        x, _ = full.get_batch(step)
        assert torch.equal(torch.cat([h.get_batch(step)[0] for h in halves]), x)
        assert torch.equal(_needle_mix(0.5).get_batch(step)[0], x)
    it = _needle_mix(0.5)
    next(it), next(it)
    state = it.state_dict()
    again = _needle_mix(0.5)
    again.load_state_dict(state)
    assert torch.equal(next(again)[0], next(it)[0])


def test_needle_mix_rejects_bad_arguments():
    from mnemotorch.tasks import ByteTokenizer, NeedleMixBatches

    base = RandomWindowBatches(torch.randint(0, 256, (500,)), 2, 100)
    with pytest.raises(ValueError, match="fraction"):
        NeedleMixBatches(base, ByteTokenizer(), [None], 1.5)
    with pytest.raises(ValueError, match="kinds"):
        NeedleMixBatches(base, ByteTokenizer(), [None], 0.5, kinds=["haystack"])
    with pytest.raises(ValueError, match="haystacks"):
        NeedleMixBatches(base, ByteTokenizer(), [], 0.5)
