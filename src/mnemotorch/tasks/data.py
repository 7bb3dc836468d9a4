"""Token streams and batch samplers for language-model training and evaluation.

Design: a batch is a pure function of ``(seed, step)`` (training) or of the batch index
(evaluation), never of hidden iterator state or of the number of processes. That gives

* exact resume: restore ``{"step", "seed"}`` and the next batch is the one an uninterrupted
  run would have drawn;
* DDP == single process: the *global* batch is drawn first and each rank takes its contiguous
  slice of rows, so concatenating the ranks' batches in rank order gives the world_size=1 batch
  (and resuming on a different number of GPUs continues the same global stream).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from .tokenizer import Tokenizer

__all__ = ["IGNORE_INDEX", "NeedleMixBatches", "RandomWindowBatches", "SequentialBatches", "encode_corpus"]

#: Label of positions that carry no target (padding); the default ``ignore_index`` of
#: ``torch.nn.functional.cross_entropy`` and the Hugging Face convention.
IGNORE_INDEX = -100
# Multiplier that spreads seeds apart in the generator seed ``seed * _SEED_STRIDE + step``
# (a prime, so runs with different seeds share no batch for the first million steps).
_SEED_STRIDE = 1_000_003
# torch.Generator.manual_seed takes at most 64 bits.
_SEED_MOD = 1 << 64


def encode_corpus(text: str, tokenizer: Tokenizer) -> Tensor:
    """Encode a whole corpus into one token stream.

    Args:
        text: the corpus.
        tokenizer: any :class:`~mnemotorch.tasks.tokenizer.Tokenizer`.

    Returns:
        ``LongTensor [N]`` of token ids (no EOS added).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


def _check_tokens(tokens: Any) -> Tensor:
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D [N], got shape {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must have an integer dtype, got {tokens.dtype}")
    return tokens


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_shard(batch_size: int, rank: Any, world_size: Any) -> int:
    """Validate rank/world_size against the global batch; return the per-rank batch size."""
    world_size = _check_positive_int(world_size, "world_size")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    if batch_size % world_size != 0:
        raise ValueError(
            f"batch_size (the global batch) must be divisible by world_size: "
            f"batch_size={batch_size}, world_size={world_size}"
        )
    return batch_size // world_size


class RandomWindowBatches:
    """Random windows of a token stream, reproducible per step and shardable across ranks.

    Batch ``step`` draws ``batch_size`` start offsets uniformly from ``[0, N - seq_len - 1]``
    with a fresh ``torch.Generator`` seeded with ``seed * 1_000_003 + step`` (mod 2**64);
    this rank keeps rows ``[rank * b, (rank + 1) * b)``, ``b = batch_size // world_size``.
    For a start ``s``: ``inputs = tokens[s : s + seq_len]``, ``labels = tokens[s + 1 : s + seq_len + 1]``.

    Iterating yields batch ``step`` and advances ``step`` (the sampler is its own endless
    iterator); :meth:`state_dict` / :meth:`load_state_dict` save and restore ``step`` and
    ``seed`` for exact resume. :meth:`get_batch` reads any step without moving the counter.

    Args:
        tokens: ``[N]`` integer token stream (any integer dtype, e.g. ``uint16`` to save memory;
            batches come out as ``int64`` on the same device).
        batch_size: the GLOBAL batch size, summed over ranks; divisible by ``world_size``.
        seq_len: tokens per row; needs ``N >= seq_len + 1``.
        seed: stream seed.
        rank: this process's rank, in ``[0, world_size)``.
        world_size: number of data-parallel processes.
    """

    def __init__(
        self,
        tokens: Tensor,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.tokens = _check_tokens(tokens)
        self.batch_size = _check_positive_int(batch_size, "batch_size")
        self.seq_len = _check_positive_int(seq_len, "seq_len")
        self.local_batch_size = _check_shard(self.batch_size, rank, world_size)
        self.rank = rank
        self.world_size = world_size
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        n = self.tokens.numel()
        if n < self.seq_len + 1:
            raise ValueError(
                f"token stream too short: len(tokens)={n} but seq_len={self.seq_len} needs at "
                f"least seq_len + 1 = {self.seq_len + 1} tokens (inputs plus shifted labels)"
            )
        self.step = 0
        # Offsets 0..seq_len, added to each start: row i of the window is tokens[s_i + offsets].
        self._offsets = torch.arange(self.seq_len + 1, device=self.tokens.device)

    @property
    def num_start_positions(self) -> int:
        """Number of distinct windows, ``N - seq_len``."""
        return self.tokens.numel() - self.seq_len

    def global_starts(self, step: int) -> Tensor:
        """Start offsets of all ``batch_size`` rows of batch ``step`` (every rank): ``LongTensor [batch_size]``."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        generator = torch.Generator(device="cpu")
        generator.manual_seed((self.seed * _SEED_STRIDE + step) % _SEED_MOD)
        # Drawn on the CPU so the stream is the same whatever device the tokens live on.
        return torch.randint(
            0, self.num_start_positions, (self.batch_size,), generator=generator, dtype=torch.long
        )

    def get_batch(self, step: int) -> tuple[Tensor, Tensor]:
        """Batch number ``step`` for this rank.

        Returns:
            ``(input_ids, labels)``, each ``LongTensor [batch_size // world_size, seq_len]``,
            with ``labels[:, t] == input_ids[:, t + 1]`` for ``t < seq_len - 1``.
        """
        b = self.local_batch_size
        starts = self.global_starts(step)[self.rank * b : (self.rank + 1) * b]
        windows = self.tokens[starts.to(self.tokens.device)[:, None] + self._offsets].long()
        return windows[:, :-1], windows[:, 1:]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        batch = self.get_batch(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        """``{"step": next step to be drawn, "seed": seed}``."""
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore :meth:`state_dict`; the next batch is the one an uninterrupted run draws next.

        ``world_size`` may differ from the run that saved the state: the global stream is the same.
        """
        missing = {"step", "seed"} - set(state)
        if missing:
            raise KeyError(f"state is missing {sorted(missing)}; expected keys 'step' and 'seed'")
        step, seed = state["step"], state["seed"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state['step'] must be a non-negative int, got {step!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"state['seed'] must be an int, got {seed!r}")
        self.step, self.seed = step, seed

    def __repr__(self) -> str:
        return (
            f"RandomWindowBatches(n_tokens={self.tokens.numel()}, batch_size={self.batch_size}, "
            f"seq_len={self.seq_len}, seed={self.seed}, rank={self.rank}, "
            f"world_size={self.world_size}, step={self.step})"
        )


class SequentialBatches:
    """Non-overlapping windows covering a token stream in order, for evaluation.

    Window ``w`` predicts tokens ``w * seq_len + 1 ... (w + 1) * seq_len`` from the ones before:
    ``inputs = tokens[w*seq_len : (w+1)*seq_len]``, ``labels`` the same shifted by one. Global
    batch ``k`` holds windows ``k * batch_size ... (k + 1) * batch_size - 1``; this rank keeps
    rows ``[rank * b, (rank + 1) * b)``, ``b = batch_size // world_size``, so concatenating the
    ranks' batches gives the world_size=1 batch.

    With ``drop_last=False`` (default) every one of the ``N - 1`` targets is covered exactly
    once: the last window may be short and the last batch may have empty rows; the missing
    positions have ``labels == IGNORE_INDEX`` (-100) and ``input_ids == 0``. Every batch thus has
    the same shape and every rank the same number of batches (which FSDP needs); compute the
    loss as a sum over ``labels != IGNORE_INDEX`` divided by the count (see :attr:`num_targets`).
    With ``drop_last=True`` only full windows in full batches are used and nothing is padded.

    Args:
        tokens: ``[N]`` integer token stream, ``N >= 2`` (``N >= seq_len + 1`` with drop_last).
        batch_size: the GLOBAL batch size (rows), divisible by ``world_size``.
        seq_len: tokens per row.
        max_batches: keep only the first ``max_batches`` global batches (``None``: all).
        rank, world_size: data-parallel shard.
        drop_last: drop the short window and the incomplete last batch instead of padding.

    Iterating (any number of times) yields ``(input_ids, labels)``, each
    ``LongTensor [batch_size // world_size, seq_len]``; ``len()`` is the number of batches.
    """

    def __init__(
        self,
        tokens: Tensor,
        batch_size: int,
        seq_len: int,
        max_batches: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        self.tokens = _check_tokens(tokens)
        self.batch_size = _check_positive_int(batch_size, "batch_size")
        self.seq_len = _check_positive_int(seq_len, "seq_len")
        self.local_batch_size = _check_shard(self.batch_size, rank, world_size)
        self.rank = rank
        self.world_size = world_size
        self.drop_last = bool(drop_last)
        if max_batches is not None:
            _check_positive_int(max_batches, "max_batches")
        n = self.tokens.numel()
        n_targets = n - 1
        if self.drop_last:
            self.num_windows = n_targets // self.seq_len if n_targets > 0 else 0
            n_batches = self.num_windows // self.batch_size
            if n_batches == 0:
                raise ValueError(
                    f"token stream too short for one full batch with drop_last=True: "
                    f"len(tokens)={n} gives {self.num_windows} window(s) of seq_len={self.seq_len}, "
                    f"batch_size={self.batch_size} needs len(tokens) >= "
                    f"{self.batch_size * self.seq_len + 1}"
                )
        else:
            if n < 2:
                raise ValueError(
                    f"token stream too short: len(tokens)={n}, at least 2 tokens are needed "
                    f"(one input and its label)"
                )
            self.num_windows = -(-n_targets // self.seq_len)  # ceil: the last one may be short
            n_batches = -(-self.num_windows // self.batch_size)
        self.num_batches = n_batches if max_batches is None else min(n_batches, max_batches)
        # Targets visited by all ranks together, the denominator of a mean loss.
        self.num_targets = min(
            n_targets if not self.drop_last else self.num_windows * self.seq_len,
            self.num_batches * self.batch_size * self.seq_len,
        )
        self._positions = torch.arange(self.seq_len, device=self.tokens.device)

    def __len__(self) -> int:
        return self.num_batches

    def get_batch(self, index: int) -> tuple[Tensor, Tensor]:
        """Batch ``index`` (``0 <= index < len(self)``) for this rank.

        Returns:
            ``(input_ids, labels)``, each ``LongTensor [batch_size // world_size, seq_len]``.
        """
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_batches:
            raise IndexError(f"index must be an int in [0, {self.num_batches}), got {index!r}")
        b = self.local_batch_size
        first_window = index * self.batch_size + self.rank * b
        windows = torch.arange(first_window, first_window + b, device=self.tokens.device)
        pos = windows[:, None] * self.seq_len + self._positions  # [b, seq_len] input positions
        n = self.tokens.numel()
        # A position is real if its label exists (pos + 1 < N); padding only occurs without drop_last.
        valid = pos < n - 1
        safe = pos.clamp(max=n - 2)
        inputs = torch.where(valid, self.tokens[safe].long(), 0)
        labels = torch.where(valid, self.tokens[safe + 1].long(), IGNORE_INDEX)
        return inputs, labels

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for index in range(self.num_batches):
            yield self.get_batch(index)

    def __repr__(self) -> str:
        return (
            f"SequentialBatches(n_tokens={self.tokens.numel()}, batch_size={self.batch_size}, "
            f"seq_len={self.seq_len}, num_batches={self.num_batches}, rank={self.rank}, "
            f"world_size={self.world_size}, drop_last={self.drop_last})"
        )


class NeedleMixBatches:
    """Language-model batches with a fraction of rows replaced by needle-retrieval sequences.

    A model that is to be evaluated on long-context retrieval must first retrieve reliably
    *within* its training length; plain book text rarely asks it to. This sampler wraps a
    :class:`RandomWindowBatches` and, per row, with probability ``fraction`` replaces the window
    by a needle example (:func:`~mnemotorch.tasks.synthetic.make_needle_examples`: instruction,
    haystack with the needle at a uniform depth, question, answer) of exactly ``seq_len + 1``
    tokens, trained with the ordinary next-token loss on all of its tokens.

    Which rows are replaced, their kind, haystack, depth and needle are a pure function of
    ``(seed, step, row)`` drawn for the *global* batch, so the stream keeps the properties of the
    wrapped sampler (exact resume, DDP == single process); ``state_dict`` is the wrapped one's.

    Args:
        base: the book-text sampler (its ``seq_len`` and batch sizes are used).
        tokenizer: encodes the needle text (``" "`` must be one token).
        haystacks: texts to cut haystacks from; ``None`` stands for the synthetic filler.
        fraction: probability that a row is a needle example, in ``[0, 1]``.
        kinds: needle kinds drawn uniformly (``"passkey"``, ``"number"``, ``"word"``).
        seed: needle stream seed.
        loss: which next-token labels a needle row keeps (``-100`` elsewhere): ``"needle"``
            (default) the needle sentence, the question and the answer -- the needle repeats its
            value ("... is 12345. Remember it. 12345 is ..."), so it also trains copying -- but
            not the haystack, which adds no extra epochs of the training text; ``"answer"`` the
            answer tokens only; ``"all"`` every token.
    """

    def __init__(
        self,
        base: RandomWindowBatches,
        tokenizer: Tokenizer,
        haystacks: list[str | None],
        fraction: float,
        kinds: tuple[str, ...] | list[str] = ("passkey",),
        seed: int = 0,
        loss: str = "needle",
    ) -> None:
        from .synthetic.needle import NEEDLE_KINDS

        if loss not in ("needle", "answer", "all"):
            raise ValueError(f"loss must be 'needle', 'answer' or 'all', got {loss!r}")
        self.loss = loss
        if not isinstance(base, RandomWindowBatches):
            raise TypeError(f"base must be a RandomWindowBatches, got {type(base).__name__}")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
        kinds = tuple(kinds)
        if not kinds or any(k not in NEEDLE_KINDS for k in kinds):
            raise ValueError(f"kinds must be a non-empty list of {list(NEEDLE_KINDS)}, got {list(kinds)}")
        if not haystacks:
            raise ValueError("haystacks must list at least one text (or None for the synthetic filler)")
        self.base = base
        self.tokenizer = tokenizer
        self.haystacks = list(haystacks)
        self.fraction = float(fraction)
        self.kinds = kinds
        self.seed = int(seed)
        self._builders: dict[tuple[str, int], Any] = {}

    @property
    def step(self) -> int:
        return self.base.step

    def _builder(self, kind: str, h: int) -> Any:
        from .synthetic.needle import _HaystackBuilder

        if (kind, h) not in self._builders:
            self._builders[(kind, h)] = _HaystackBuilder(self.tokenizer, self.haystacks[h], kind, instruction=True)
        return self._builders[(kind, h)]

    def get_batch(self, step: int) -> tuple[Tensor, Tensor]:
        """Batch ``step`` of this rank: ``(input_ids, labels)``, ``LongTensor [b, seq_len]`` each."""
        import numpy as np

        x, y = self.base.get_batch(step)
        if self.fraction == 0.0:
            return x, y
        g = torch.Generator(device="cpu")
        g.manual_seed((self.seed * _SEED_STRIDE + step + 7919) % _SEED_MOD)
        n = self.base.batch_size
        replace = torch.rand(n, generator=g) < self.fraction
        kind_idx = torch.randint(0, len(self.kinds), (n,), generator=g)
        hay_idx = torch.randint(0, len(self.haystacks), (n,), generator=g)
        row_seeds = torch.randint(0, 2**62, (n,), generator=g)
        b = self.base.local_batch_size
        lo = self.base.rank * b
        x, y = x.clone(), y.clone()
        for r in range(b):
            i = lo + r
            if not bool(replace[i]):
                continue
            rng = np.random.default_rng(int(row_seeds[i]))
            builder = self._builder(self.kinds[int(kind_idx[i])], int(hay_idx[i]))
            ex = builder.build(self.base.seq_len + 1, float(rng.random()), rng)
            ids = ex.input_ids.to(x.device)
            x[r] = ids[:-1]
            if self.loss == "all":
                y[r] = ids[1:]
            elif self.loss == "answer":
                y[r] = ex.labels[:-1].to(x.device)  # ex.labels[t]: the answer token predicted at position t
            else:
                keep = torch.zeros(self.base.seq_len + 1, dtype=torch.bool)
                keep[ex.needle_span[0]:ex.needle_span[1]] = True  # tokens to predict: the needle ...
                keep[ex.haystack_span[1]:] = True  # ... and the question and answer after the haystack
                target = torch.where(keep, ex.input_ids, torch.full_like(ex.input_ids, IGNORE_INDEX))
                y[r] = target[1:].to(x.device)
        return x, y

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        batch = self.get_batch(self.base.step)
        self.base.step += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return self.base.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.base.load_state_dict(state)

    def __repr__(self) -> str:
        return f"NeedleMixBatches({self.base!r}, fraction={self.fraction}, kinds={list(self.kinds)}, haystacks={len(self.haystacks)})"
