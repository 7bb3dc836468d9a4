"""Property tests of the synthetic memory tasks (MQAR, needle / passkey, SORT, copying, induction, AR)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnemotorch.tasks import BPETokenizer, ByteTokenizer, load_text
from mnemotorch.tasks.synthetic import (
    FILLER_SENTENCES,
    NEEDLE_KINDS,
    TaskDataset,
    associative_recall,
    evaluate_sort,
    induction_heads,
    make_needle_example,
    make_needle_examples,
    make_sort_examples,
    make_task,
    masked_cross_entropy,
    mqar_gap_probabilities,
    multiquery_ar,
    needle_in_haystack,
    selective_copying,
    sequence_accuracy,
    sort_oracle,
    sort_prompt,
    to_shifted_labels,
    token_accuracy,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
BOOK = SHARED / "data" / "gutenberg" / "pg1342_pride_and_prejudice.txt"
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def book_text() -> str:
    # A held-out public-domain book when the shared data is present; the bundled corpus otherwise.
    return BOOK.read_text(encoding="utf-8") if BOOK.is_file() else load_text()


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(load_text()[:100_000], vocab_size=400)


# ------------------------------------------------------------------------------------------------
# MQAR


@st.composite
def mqar_args(draw):
    pairs = draw(st.integers(1, 8))
    length = 2 * draw(st.integers(2 * pairs, 2 * pairs + 24))  # even, >= 4N
    vocab = draw(st.integers(length + 1, length + 300))
    return dict(
        num_examples=draw(st.integers(1, 12)), seq_len=length, num_kv_pairs=pairs, vocab_size=vocab,
        power_a=draw(st.sampled_from([0.01, 0.3, 1.0])), random_non_queries=draw(st.booleans()),
        seed=draw(st.integers(0, 2**40)),
    )


@SETTINGS
@given(mqar_args())
def test_mqar_properties(args):
    x, y = multiquery_ar(**args)
    n, length, pairs, vocab = args["num_examples"], args["seq_len"], args["num_kv_pairs"], args["vocab_size"]
    assert x.shape == y.shape == (n, length) and x.dtype == y.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < vocab
    keys, values = x[:, 0 : 2 * pairs : 2], x[:, 1 : 2 * pairs : 2]
    assert bool(((keys >= 1) & (keys < vocab // 2)).all()) and bool(((values >= vocab // 2) & (values < vocab)).all())
    for row in range(n):
        k, v = keys[row].tolist(), values[row].tolist()
        assert len(set(k)) == pairs and len(set(v)) == pairs  # unique keys (and values) per example
        pos = (y[row] != -100).nonzero().flatten().tolist()
        # Labels only at query positions: N of them, in the even slots after the pairs.
        assert len(pos) == pairs and all(p >= 2 * pairs and (p - 2 * pairs) % 2 == 0 for p in pos)
        pair_of = dict(zip(k, v))
        assert sorted(x[row, pos].tolist()) == sorted(k)  # every key is queried exactly once
        for p in pos:
            assert int(y[row, p]) == pair_of[int(x[row, p])]  # the label is the value paired with the key
        if not args["random_non_queries"]:
            rest = torch.ones(length, dtype=torch.bool)
            rest[: 2 * pairs] = False
            rest[pos] = False
            assert bool((x[row, rest] == 0).all())
    again = multiquery_ar(**args)
    assert torch.equal(again[0], x) and torch.equal(again[1], y)  # deterministic by seed


def test_mqar_seed_changes_examples():
    a = multiquery_ar(64, 64, 4, vocab_size=8192, seed=0)[0]
    b = multiquery_ar(64, 64, 4, vocab_size=8192, seed=1)[0]
    assert not torch.equal(a, b)


def test_mqar_zoology_docstring_example_shape():
    # Zoology's docstring example: L = 16, N = 2 -> 4 context tokens, queries in slots 0..5.
    x, y = multiquery_ar(1000, 16, 2, vocab_size=20, seed=3)
    pos = (y != -100).nonzero()[:, 1]
    assert int(pos.min()) >= 4 and int(pos.max()) <= 14 and bool((pos % 2 == 0).all())


def _gap_histogram(y: torch.Tensor, pairs: int, slots: int) -> np.ndarray:
    pos = (y != -100).nonzero()[:, 1]
    gaps = ((pos - 2 * pairs) // 2).numpy()
    return np.bincount(gaps, minlength=slots) / len(gaps)


@pytest.mark.parametrize("power_a", [0.01, 0.5, 1.0])
def test_mqar_single_query_gaps_follow_power_law(power_a):
    # With one query the gap is drawn once from p(g) ∝ a (g + 1)^(a - 1): compare histograms.
    length, pairs = 64, 1
    slots = (length - 2 * pairs) // 2
    _, y = multiquery_ar(20_000, length, pairs, vocab_size=128, power_a=power_a, seed=11)
    empirical = _gap_histogram(y, pairs, slots)
    expected = mqar_gap_probabilities(slots, power_a).numpy()
    assert 0.5 * np.abs(empirical - expected).sum() < 0.03  # total variation distance


def test_mqar_multi_query_gaps_match_sampling_without_replacement():
    # Several queries: gaps are successive draws without replacement (numpy's
    # choice(replace=False, p=p), which Zoology uses). Compare slot-inclusion frequencies.
    length, pairs, n = 128, 8, 6000
    slots = (length - 2 * pairs) // 2
    _, y = multiquery_ar(n, length, pairs, vocab_size=256, seed=5)
    ours = _gap_histogram(y, pairs, slots)
    p = mqar_gap_probabilities(slots, 0.01).numpy()
    rng = np.random.default_rng(0)
    ref = np.concatenate([rng.choice(slots, pairs, replace=False, p=p) for _ in range(n)])
    ref_hist = np.bincount(ref, minlength=slots) / len(ref)
    assert 0.5 * np.abs(ours - ref_hist).sum() < 0.03
    # and the power law's shape: queries cluster right after the pairs.
    assert ours[:4].sum() > ours[-4:].sum() * 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(seq_len=64, num_kv_pairs=4, vocab_size=64), r"V > L"),
        (dict(seq_len=64, num_kv_pairs=17, vocab_size=8192), r"4N <= L"),
        (dict(seq_len=63, num_kv_pairs=4, vocab_size=8192), r"even"),
        (dict(seq_len=64, num_kv_pairs=4, vocab_size=8192, power_a=0.0), r"power_a"),
    ],
)
def test_mqar_constraint_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        multiquery_ar(4, **kwargs)


# ------------------------------------------------------------------------------------------------
# needle / passkey


def _sentence_tokens(tokenizer, text: str) -> int:
    units = [u for u in re.split(r"(?<=[.!?])(?=\s)", text) if u.strip()]
    return max(len(tokenizer.encode(u)) for u in units) if units else 0


def _check_needle(ex, tokenizer, length, depth):
    assert ex.input_ids.shape == ex.labels.shape == (length,)
    assert tokenizer.decode(ex.input_ids.tolist()) == ex.prompt + ex.answer
    # The needle is present exactly once, and the answer appears nowhere else.
    assert ex.prompt.count(ex.needle.strip()) == 1
    assert not re.search(rf"(?<!\w){re.escape(ex.value)}(?!\w)", ex.prompt.replace(ex.needle, ""))
    a, b = ex.needle_span
    assert tokenizer.decode(ex.input_ids[a:b].tolist()) == ex.needle
    # The labels are the answer tokens, aligned to the positions that predict them.
    pos = (ex.labels != -100).nonzero().flatten()
    answer_ids = tokenizer.encode(ex.answer)
    assert pos.tolist() == list(range(length - len(answer_ids) - 1, length - 1))
    assert torch.equal(ex.labels[pos], ex.input_ids[pos + 1])
    # At the requested depth, to within one sentence of the haystack.
    h0, h1 = ex.haystack_span
    hay_tokens = h1 - h0 - (b - a)
    if hay_tokens:
        assert ex.achieved_depth == pytest.approx((a - h0) / hay_tokens)
        hay_text = tokenizer.decode(ex.input_ids[h0:h1].tolist()).replace(ex.needle, " ")
        slack = _sentence_tokens(tokenizer, hay_text) + 1
        assert abs(ex.achieved_depth - depth) * hay_tokens <= slack


@SETTINGS
@given(length=st.integers(130, 1500), depth=st.floats(0, 1), kind=st.sampled_from(NEEDLE_KINDS), seed=st.integers(0, 10**6))
def test_needle_synthetic_filler(length, depth, kind, seed):
    tok = ByteTokenizer()
    # RULER's templates take ~370 bytes; the rest is haystack.
    ex = make_needle_example(tok, length + 400, depth, kind=kind, seed=seed)
    _check_needle(ex, tok, length + 400, depth)
    assert sum(ex.prompt.count(s) for s in FILLER_SENTENCES) >= 3


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(length=st.integers(500, 3000), depth=st.floats(0, 1), kind=st.sampled_from(NEEDLE_KINDS), seed=st.integers(0, 10**6), use_bpe=st.booleans())
def test_needle_real_text(book_text, bpe, length, depth, kind, seed, use_bpe):
    tok = bpe if use_bpe else ByteTokenizer()
    ex = make_needle_example(tok, length, depth, kind=kind, haystack=book_text, seed=seed)
    _check_needle(ex, tok, length, depth)


def test_needle_batch_and_random_depths():
    tok = ByteTokenizer()
    x, y = needle_in_haystack(tok, 8, 300, kind="passkey", seed=0)
    assert x.shape == y.shape == (8, 300)
    assert ((y != -100).sum(dim=1) == 6).all()  # " 12345": 6 bytes, all predicted
    depths = [e.depth for e in make_needle_examples(tok, 50, 300, seed=1)]
    assert min(depths) < 0.2 and max(depths) > 0.8
    again = needle_in_haystack(tok, 8, 300, kind="passkey", seed=0)
    assert torch.equal(again[0], x)


@pytest.mark.parametrize("depth", [-0.01, 1.01, float("nan")])
def test_needle_depth_outside_unit_interval(depth):
    with pytest.raises(ValueError, match=r"depth must be a number in \[0, 1\]"):
        make_needle_example(ByteTokenizer(), 400, depth)


def test_needle_text_too_short_and_length_too_short():
    tok = ByteTokenizer()
    short = "One sentence here. Another one there. " * 5
    with pytest.raises(ValueError, match="too short"):
        make_needle_example(tok, 2000, 0.5, haystack=short)
    with pytest.raises(ValueError, match="shorter than the passkey prompt"):
        make_needle_example(tok, 50, 0.5)
    with pytest.raises(ValueError, match="kind must be one of"):
        make_needle_example(tok, 400, 0.5, kind="uuid")


# ------------------------------------------------------------------------------------------------
# SORT


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(half=st.integers(1, 20), segment=st.sampled_from([5, 20]), seed=st.integers(0, 10**6))
def test_sort_balanced_and_oracle(book_text, half, segment, seed):
    examples = make_sort_examples(book_text, 2 * half, excerpt_words=300, segment_words=segment, seed=seed)
    answers = [e.answer for e in examples]
    assert answers.count("A") == answers.count("B") == half  # a constant answer scores exactly 50%
    for e in examples:
        assert sort_oracle(e) == e.answer  # an exact string matcher with the text in context: 100%
        assert len(e.segment_a.split()) == len(e.segment_b.split()) == segment
        assert e.second_word - e.first_word - segment == e.distance >= 0
        assert e.excerpt in book_text
        assert sort_prompt(e).startswith(e.excerpt) and not sort_prompt(e, "no_context").startswith(e.excerpt)


def test_sort_distance_bins(book_text):
    examples = make_sort_examples(book_text, 20, excerpt_words=500, segment_words=20, min_distance=100, max_distance=200, seed=0)
    assert all(100 <= e.distance <= 200 for e in examples)


def test_sort_errors(book_text):
    with pytest.raises(ValueError, match="even"):
        make_sort_examples(book_text, 3)
    with pytest.raises(ValueError, match="fewer than excerpt_words"):
        make_sort_examples("a few words only", 2, excerpt_words=100)
    with pytest.raises(ValueError, match="2 \\* segment_words \\+ min_distance <= excerpt_words"):
        make_sort_examples(book_text, 2, excerpt_words=50, segment_words=20, min_distance=20)


class _AlwaysA(torch.nn.Module):
    """A 'model' whose next-token distribution always prefers the byte 'A' over 'B'."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, **kwargs):
        logits = torch.zeros(*input_ids.shape, 257)
        logits[..., ord("A")] = 5.0
        return type("Out", (), {"logits": logits})()


def test_sort_constant_answer_scores_exactly_half(book_text):
    examples = make_sort_examples(book_text, 10, excerpt_words=200, segment_words=10, seed=2)
    result = evaluate_sort(_AlwaysA(), ByteTokenizer(), examples)
    assert result["choices"] == ["A"] * 10
    assert result["accuracy"] == result["always_a_accuracy"] == 0.5


def test_sort_evaluator_runs_on_our_model_and_a_hf_model(book_text):
    from transformers import LlamaConfig, LlamaForCausalLM

    from mnemotorch.models import MnemoConfig, MnemoForCausalLM

    examples = make_sort_examples(book_text, 4, excerpt_words=60, segment_words=5, seed=0)
    tok = ByteTokenizer()
    torch.manual_seed(0)
    ours = MnemoForCausalLM(MnemoConfig(vocab_size=257, hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048))
    for model in (ours, hf):
        for condition in ("in_context", "no_context"):
            result = evaluate_sort(model, tok, examples, condition=condition)
            assert 0.0 <= result["accuracy"] <= 1.0 and len(result["choices"]) == 4


# ------------------------------------------------------------------------------------------------
# selective copying, induction heads, associative recall


@SETTINGS
@given(n=st.integers(1, 16), k=st.integers(1, 8), extra=st.integers(0, 40), vocab=st.integers(3, 20), seed=st.integers(0, 10**6))
def test_selective_copying(n, k, extra, vocab, seed):
    length = 2 * k + extra
    x, y = selective_copying(n, length, k, vocab_size=vocab, seed=seed)
    assert x.shape == y.shape == (n, length)
    context = length - k
    assert bool((x[:, context:] == vocab - 1).all())  # the markers
    assert bool((y[:, :context] == -100).all())
    for row in range(n):
        data = x[row, :context][x[row, :context] != 0]
        assert data.numel() == k and bool(((data >= 1) & (data <= vocab - 2)).all())
        assert torch.equal(y[row, context:], data)  # copy the data tokens in order


@SETTINGS
@given(n=st.integers(1, 16), length=st.integers(3, 64), vocab=st.integers(3, 30), seed=st.integers(0, 10**6))
def test_induction_heads(n, length, vocab, seed):
    x, y = induction_heads(n, length, vocab_size=vocab, seed=seed)
    trigger = vocab - 1
    assert bool(((y == -100).sum(dim=1) == length - 1).all())
    for row in range(n):
        where = (x[row] == trigger).nonzero().flatten().tolist()
        assert len(where) == 2 and where[1] == length - 1 and where[0] <= length - 3
        assert int(y[row, -1]) == int(x[row, where[0] + 1])


@SETTINGS
@given(n=st.integers(1, 16), pairs=st.integers(1, 10), extra=st.integers(0, 40), seed=st.integers(0, 10**6))
def test_associative_recall(n, pairs, extra, seed):
    vocab = 2 * pairs + extra + (extra % 2)
    x, y = associative_recall(n, pairs, vocab_size=vocab, seed=seed)
    assert x.shape == (n, 2 * pairs + 1)
    for row in range(n):
        keys, values = x[row, 0:-1:2].tolist(), x[row, 1:-1:2].tolist()
        assert len(set(keys)) == pairs and all(k < vocab // 2 for k in keys) and all(v >= vocab // 2 for v in values)
        assert int(y[row, -1]) == dict(zip(keys, values))[int(x[row, -1])]


def test_copy_task_constraint_errors():
    with pytest.raises(ValueError, match="seq_len - num_tokens >= num_tokens"):
        selective_copying(2, 10, 6)
    with pytest.raises(ValueError, match="num_kv_pairs <= vocab_size // 2"):
        associative_recall(2, 9, vocab_size=16)


# ------------------------------------------------------------------------------------------------
# metrics, dataset, registry


def test_metrics_and_label_helpers():
    labels = torch.tensor([[-100, 3, -100, 4], [-100, -100, 5, -100]])
    preds = torch.tensor([[0, 3, 0, 9], [0, 0, 5, 0]])
    assert token_accuracy(preds, labels) == pytest.approx(2 / 3)
    assert sequence_accuracy(preds, labels) == 0.5
    logits = torch.nn.functional.one_hot(preds, 10).float() * 10
    assert token_accuracy(logits, labels) == pytest.approx(2 / 3)
    assert masked_cross_entropy(logits, labels) > 0
    shifted = to_shifted_labels(labels)
    assert shifted.tolist() == [[-100, -100, 3, -100], [-100, -100, -100, 5]]


def test_aligned_labels_match_our_models_shifted_loss():
    # Our model's loss(labels=shifted) equals the aligned cross-entropy on the same logits.
    from mnemotorch.models import MnemoConfig, MnemoForCausalLM

    x, y = multiquery_ar(4, 32, 2, vocab_size=64, seed=0)
    model = MnemoForCausalLM(MnemoConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=0))
    out = model(input_ids=x, labels=to_shifted_labels(y))
    assert out.loss.item() == pytest.approx(masked_cross_entropy(out.logits, y).item(), rel=1e-5)


def test_dataset_and_registry():
    data = make_task("mqar", 10, seed=0, seq_len=32, num_kv_pairs=2, vocab_size=64)
    ds = TaskDataset(data.input_ids, data.labels)
    assert len(ds) == 10 and ds[3]["input_ids"].shape == (32,)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["labels"].shape == (4, 32)
    assert make_task("passkey", 2, length=200, instruction=False).metric == "sequence_accuracy"
    with pytest.raises(ValueError, match="unknown task"):
        make_task("nope", 1)
    with pytest.raises(TypeError, match="task 'mqar'"):
        make_task("mqar", 1, seq_len=32, num_kv_pairs=2, bogus=1)


def test_word_needle_value_never_inside_key() -> None:
    """Regression (found by hypothesis): key 'noble-spider' with value 'spider' leaked the answer into the question."""
    from mnemotorch.tasks.synthetic.needle import _HaystackBuilder
    import numpy as np

    builder = _HaystackBuilder(ByteTokenizer(), None, "word", True)
    rng = np.random.default_rng(0)
    for _ in range(2000):
        key, value = builder.draw_key_value(rng)
        assert value not in key.split("-")
