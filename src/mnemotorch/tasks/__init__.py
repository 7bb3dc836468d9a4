"""Tasks that measure memory: text corpora, tokenizers, token streams and batch samplers.

    text = load_text()                          # bundled Tiny Shakespeare
    train_text, val_text = split_text(text)     # first 90% / last 10%
    tok = build_tokenizer("bpe", train_text, vocab_size=1024)
    batches = RandomWindowBatches(encode_corpus(train_text, tok), batch_size=32, seq_len=256)
    input_ids, labels = next(batches)           # [32, 256] each, labels shifted by one
"""

from .corpus import BUNDLED_CORPORA, load_text, split_text
from .data import IGNORE_INDEX, NeedleMixBatches, RandomWindowBatches, SequentialBatches, encode_corpus
from .tokenizer import (
    TOKENIZER_KINDS,
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
)

__all__ = [
    "BUNDLED_CORPORA",
    "IGNORE_INDEX",
    "NeedleMixBatches",
    "TOKENIZER_KINDS",
    "BPETokenizer",
    "ByteTokenizer",
    "RandomWindowBatches",
    "SequentialBatches",
    "Tokenizer",
    "build_tokenizer",
    "encode_corpus",
    "load_text",
    "load_tokenizer",
    "split_text",
]

# Synthetic memory tasks (MQAR, passkey / needle, SORT, copying, induction); see docs/tasks.md.
from .synthetic import (  # noqa: E402
    associative_recall,
    evaluate_sort,
    induction_heads,
    make_needle_examples,
    make_sort_examples,
    make_task,
    multiquery_ar,
    needle_in_haystack,
    selective_copying,
    sequence_accuracy,
    token_accuracy,
)

__all__ += [
    "associative_recall",
    "evaluate_sort",
    "induction_heads",
    "make_needle_examples",
    "make_sort_examples",
    "make_task",
    "multiquery_ar",
    "needle_in_haystack",
    "selective_copying",
    "sequence_accuracy",
    "token_accuracy",
]
