"""Tests for mnemotorch.tasks.tokenizer: byte and BPE tokenizers, saving and loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mnemotorch.tasks import (
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    build_tokenizer,
    load_text,
    load_tokenizer,
)
from mnemotorch.tasks.tokenizer import _safe_chunks

SAMPLE = "Hello, wörld! Ünïcödé — 日本語 and emoji 🙂.\nSecond line\ttab.\n\n"


@pytest.fixture(scope="module")
def corpus() -> str:
    # ~100 KB of the bundled corpus: enough for real merges, fast to train on.
    return load_text()[:100_000]


@pytest.fixture(scope="module")
def bpe(corpus: str) -> BPETokenizer:
    return BPETokenizer.train(corpus, vocab_size=512)


def test_byte_tokenizer_basics() -> None:
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    ids = tok.encode(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == SAMPLE
    assert tok.decode(ids + [tok.eos_id]) == SAMPLE  # EOS is skipped
    assert tok.decode(torch.tensor(ids)) == SAMPLE  # tensors are accepted
    assert tok.decode([0xC3]) == "\ufffd"  # a broken sequence decodes to U+FFFD, not an error
    with pytest.raises(ValueError, match="non-negative"):
        tok.decode([-1])


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trip_any_text(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_byte_tokenizer_save_load(tmp_path: Path) -> None:
    ByteTokenizer().save(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "mnemo_tokenizer.json").read_text())["type"] == "byte"
    assert isinstance(load_tokenizer(tmp_path / "tok"), ByteTokenizer)


def test_bpe_train_basics(bpe: BPETokenizer, corpus: str) -> None:
    assert isinstance(bpe, Tokenizer)
    assert bpe.vocab_size == 512
    assert bpe.eos_id == 0
    ids = bpe.encode(corpus)
    assert len(ids) < len(corpus) / 2  # merges compress the text
    assert bpe.decode(ids) == corpus
    # Byte-level: characters never seen in training still round-trip.
    assert bpe.decode(bpe.encode(SAMPLE)) == SAMPLE
    # The special token in the text is read as EOS, and decode drops it.
    assert bpe.encode("a<|endoftext|>b")[1] == bpe.eos_id
    assert bpe.decode(bpe.encode("a<|endoftext|>b")) == "ab"


def test_bpe_save_load_round_trip(bpe: BPETokenizer, corpus: str, tmp_path: Path) -> None:
    bpe.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    descriptor = json.loads((tmp_path / "mnemo_tokenizer.json").read_text())
    assert descriptor["type"] == "bpe"
    for loaded in (BPETokenizer.load(tmp_path), load_tokenizer(tmp_path)):
        assert isinstance(loaded, BPETokenizer)
        assert (loaded.vocab_size, loaded.eos_id) == (bpe.vocab_size, bpe.eos_id)
        assert loaded.encode(corpus) == bpe.encode(corpus)
        assert loaded.encode(SAMPLE) == bpe.encode(SAMPLE)


def test_bpe_training_is_deterministic(bpe: BPETokenizer, corpus: str) -> None:
    again = BPETokenizer.train(corpus, vocab_size=512)
    assert again.hf_tokenizer.to_str() == bpe.hf_tokenizer.to_str()


def test_bpe_chunked_encoding_equals_whole_encoding(bpe: BPETokenizer, corpus: str) -> None:
    # Cut into many small pieces; encoding them separately must give the ids of the whole.
    pieces = _safe_chunks(corpus, chunk_chars=2_000)
    assert len(pieces) > 10 and "".join(pieces) == corpus
    whole = bpe.hf_tokenizer.encode(corpus).ids
    assert [i for p in pieces for i in bpe.hf_tokenizer.encode(p).ids] == whole
    assert bpe.encode(corpus) == whole


def test_bpe_rejects_bad_arguments(bpe: BPETokenizer) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train("abc", vocab_size=100)
    with pytest.raises(ValueError, match="empty"):
        BPETokenizer.train("")
    with pytest.raises(ValueError, match="ids"):
        bpe.decode([bpe.vocab_size])


def test_load_tokenizer_on_foreign_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="mnemo_tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "mnemo_tokenizer.json").write_text('{"type": "sentencepiece"}')
    with pytest.raises(ValueError, match="mnemo_tokenizer.json.*sentencepiece"):
        load_tokenizer(tmp_path)
    (tmp_path / "mnemo_tokenizer.json").write_text("not json")
    with pytest.raises(ValueError, match="mnemo_tokenizer.json.*not valid JSON"):
        load_tokenizer(tmp_path)


def test_bpe_load_reports_missing_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "mnemo_tokenizer.json").write_text('{"type": "bpe"}')
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_build_tokenizer() -> None:
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)
    tok = build_tokenizer("bpe", "the cat sat on the mat " * 50, vocab_size=300)
    assert isinstance(tok, BPETokenizer)
    assert tok.vocab_size <= 300
    with pytest.raises(ValueError, match="text"):
        build_tokenizer("bpe")
    with pytest.raises(ValueError, match=r"\['byte', 'bpe'\]"):
        build_tokenizer("wordpiece")
