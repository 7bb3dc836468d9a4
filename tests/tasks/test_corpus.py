"""Tests for mnemotorch.tasks.corpus: the bundled corpus, files, folders, errors, splitting."""

from __future__ import annotations

import builtins
import hashlib
from pathlib import Path

import pytest

from mnemotorch.tasks import load_text, split_text

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
# sha256 of karpathy/char-rnn data/tinyshakespeare/input.txt (shared/data/MANIFEST.sha256)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def test_bundled_corpus_is_tiny_shakespeare() -> None:
    text = load_text()
    assert load_text("tinyshakespeare") == text
    assert len(text) == 1_115_394
    assert text.startswith("First Citizen:\n")
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == SHAKESPEARE_SHA256


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="shared/data is not beside the checkout")
def test_bundled_corpus_equals_shared_file() -> None:
    assert load_text() == SHAKESPEARE.read_text(encoding="utf-8")
    assert load_text(SHAKESPEARE) == load_text(str(SHAKESPEARE))


def test_file_and_path_types(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_bytes("héllo wörld\r\n".encode("utf-8"))
    assert load_text(f) == "héllo wörld\r\n"  # text is returned exactly, line endings included
    assert load_text(str(f)) == "héllo wörld\r\n"
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfabc")
    assert load_text(bom) == "abc"


def test_non_utf8_file_error_names_file_and_offset(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café au lait".encode("latin-1"))  # 'é' is the lone byte 0xe9 at offset 3
    with pytest.raises(ValueError) as info:
        load_text(bad)
    message = str(info.value)
    assert str(bad) in message
    assert "byte offset 3" in message
    assert "UTF-8" in message


def test_non_utf8_file_in_directory_names_that_file(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"ok\xff")
    with pytest.raises(ValueError, match=r"b\.txt.*byte offset 2"):
        load_text(tmp_path)


def test_directory_files_sorted_by_name_and_joined(tmp_path: Path) -> None:
    # Written out of order so that creation order and name order differ.
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "c.txt").write_text("third", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "0.txt").write_text("not recursed into", encoding="utf-8")
    assert load_text(tmp_path) == "first\n\nsecond\n\nthird"


def test_empty_directory_error_names_directory(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("no txt here", encoding="utf-8")
    with pytest.raises(ValueError, match="contains no") as info:
        load_text(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_missing_path_error_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError) as info:
        load_text(missing)
    assert str(missing) in str(info.value)


def test_hf_source_without_datasets_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_datasets(name: str, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ImportError, match=r"pip install 'mnemotorch\[datasets\]'"):
        load_text("hf:wikitext:wikitext-2-raw-v1:train")


def test_hf_source_malformed() -> None:
    with pytest.raises(ValueError, match="NAME"):
        load_text("hf:")


def test_split_text_like_nanogpt() -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    train, val = split_text(text)
    assert (len(train), len(val)) == (900, 100)
    assert train + val == text
    train, val = split_text(text, val_fraction=0.25)
    assert (len(train), len(val)) == (750, 250)
    # The bundled corpus gives nanoGPT's split: int(n * 0.9).
    assert len(split_text(load_text())[0]) == int(1_115_394 * 0.9)


@pytest.mark.parametrize("bad", [0, 0.0, 1, 1.0, -0.1, 1.5, float("nan"), "0.1", None, True])
def test_split_text_rejects_bad_fraction(bad) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        split_text("abcdefghij", val_fraction=bad)


def test_split_text_too_short() -> None:
    with pytest.raises(ValueError, match="too short"):
        split_text("a")
