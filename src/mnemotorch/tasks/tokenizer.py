"""Tokenizers: a byte tokenizer with no training, and a byte-level BPE trained in seconds.

Both follow the small :class:`Tokenizer` protocol and save to a directory holding a
``mnemo_tokenizer.json`` descriptor, so :func:`load_tokenizer` can bring either back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "DESCRIPTOR_FILE",
    "TOKENIZER_KINDS",
    "BPETokenizer",
    "ByteTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "load_tokenizer",
]

#: Name of the file, inside a tokenizer directory, that says which tokenizer it holds.
DESCRIPTOR_FILE = "mnemo_tokenizer.json"
#: Kinds accepted by :func:`build_tokenizer` and the ``"type"`` of a descriptor file.
TOKENIZER_KINDS: tuple[str, ...] = ("byte", "bpe")
# Version of the descriptor format, written so that a future change can be detected on load.
_FORMAT_VERSION = 1


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of mnemotorch needs from a tokenizer.

    Ids are integers in ``[0, vocab_size)``; ``eos_id`` (if not ``None``) marks the end of a
    document. ``save(directory)`` writes a ``mnemo_tokenizer.json`` descriptor that
    :func:`load_tokenizer` reads back.
    """

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, directory: str | os.PathLike[str]) -> None: ...


def _as_id_list(ids: Sequence[int] | Any, argument: str = "ids") -> list[int]:
    """Accept a list/tuple of ints, or a 1-D tensor/array (anything with ``tolist``)."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    ids = list(ids)
    for i in ids:
        if isinstance(i, list):
            raise ValueError(f"{argument} must be a flat sequence of ints, got a nested sequence")
    return ids


def _write_descriptor(directory: Path, payload: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    body = {"type": payload.pop("type"), "format_version": _FORMAT_VERSION, **payload}
    (directory / DESCRIPTOR_FILE).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")


def _read_descriptor(directory: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    path = Path(directory).expanduser() / DESCRIPTOR_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer descriptor {str(path)!r}: the directory was not written by a "
            f"mnemotorch tokenizer's save() (expected a {DESCRIPTOR_FILE} file)"
        )
    try:
        descriptor = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"tokenizer descriptor {str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(descriptor, dict) or descriptor.get("type") not in TOKENIZER_KINDS:
        found = descriptor.get("type") if isinstance(descriptor, dict) else descriptor
        raise ValueError(
            f"tokenizer descriptor {str(path)!r} has type {found!r}; "
            f"expected one of {list(TOKENIZER_KINDS)}"
        )
    version = descriptor.get("format_version", _FORMAT_VERSION)
    if version != _FORMAT_VERSION:
        raise ValueError(
            f"tokenizer descriptor {str(path)!r} has format_version {version!r}; this version "
            f"of mnemotorch reads format_version {_FORMAT_VERSION}"
        )
    return path, descriptor


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, id 256 is end-of-sequence.

    Needs no training and can represent any text, so it is the default for smoke tests and
    character-level memory tasks. ``vocab_size == 257``.
    """

    #: Id of the end-of-sequence token (one past the last byte).
    EOS_ID = 256

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eos_id(self) -> int:
        return self.EOS_ID

    def encode(self, text: str) -> list[int]:
        """``text`` → its UTF-8 bytes as ints, length ``len(text.encode())``. No EOS is added."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Ids → text. Ids ≥ 256 (EOS) are skipped; a broken UTF-8 sequence — as a model may
        generate — becomes U+FFFD rather than an error."""
        id_list = _as_id_list(ids)
        negative = [i for i in id_list if i < 0]
        if negative:
            raise ValueError(f"ids must be non-negative, got {negative[0]}")
        return bytes(i for i in id_list if i < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``directory/mnemo_tokenizer.json`` (creating the directory)."""
        _write_descriptor(Path(directory).expanduser(), {"type": "byte"})

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ByteTokenizer:
        """Read a tokenizer saved by :meth:`save`."""
        path, descriptor = _read_descriptor(directory)
        if descriptor["type"] != "byte":
            raise ValueError(f"{str(path)!r} describes a {descriptor['type']!r} tokenizer, not 'byte'")
        return cls()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(ByteTokenizer)

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eos_id=256)"


def _safe_chunks(text: str, chunk_chars: int = 1 << 16) -> list[str]:
    """Cut ``text`` into pieces of about ``chunk_chars`` characters at newlines that have a
    non-whitespace character on both sides.

    Why: the HF tokenizer pre-tokenizes and encodes one string on one thread, and a 1 MB string
    takes seconds; pieces can go through ``encode_batch`` in parallel. A cut at ``X\\nY`` (X, Y
    not whitespace) leaves the ByteLevel pre-tokenization unchanged — the newline is a pre-token
    of its own either way and BPE merges never cross pre-tokens — so the ids are exactly those of
    encoding the whole string (checked in the tests). Python's ``isspace`` is a superset of the
    regex ``\\s``, so doubtful cuts are skipped, never taken.
    """
    pieces: list[str] = []
    start, n = 0, len(text)
    while n - start > chunk_chars:
        idx = text.find("\n", start + chunk_chars)
        while idx != -1 and not (
            idx + 1 < n and not text[idx - 1].isspace() and not text[idx + 1].isspace()
        ):
            idx = text.find("\n", idx + 1)
        if idx == -1:
            break
        pieces.append(text[start : idx + 1])
        start = idx + 1
    pieces.append(text[start:])
    return pieces


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) backed by Hugging Face ``tokenizers``.

    Byte-level means every string is representable (no unknown token) and
    ``decode(encode(text)) == text`` for any text that does not contain the literal special
    token ``"<|endoftext|>"``: like GPT-2, that string in the input is read as the EOS token,
    which is how corpora mark document boundaries. :meth:`decode` drops EOS.

    Build one with :meth:`train`, or :meth:`load` a saved one.
    """

    #: The single special token; it gets id 0.
    EOS_TOKEN = "<|endoftext|>"
    _TOKENIZER_FILE = "tokenizer.json"

    def __init__(self, tokenizer: Any) -> None:
        """Wrap a ``tokenizers.Tokenizer`` that has the ``<|endoftext|>`` token (use
        :meth:`train` or :meth:`load` rather than calling this directly)."""
        eos = tokenizer.token_to_id(self.EOS_TOKEN)
        if eos is None:
            raise ValueError(f"tokenizer must have the special token {self.EOS_TOKEN!r}")
        self._tokenizer = tokenizer
        self._eos_id: int = eos

    @classmethod
    def train(
        cls,
        text_or_texts: str | Iterable[str],
        vocab_size: int = 1024,
        show_progress: bool = False,
        split_digits: bool = False,
    ) -> BPETokenizer:
        """Train a byte-level BPE on a text or an iterable of texts (documents).

        The result is a pure function of the input: the same texts and ``vocab_size`` give the
        same merges and ids in any process. Training on ~1 MB takes about a second.

        Args:
            text_or_texts: the training text, or several texts (pre-tokens never span two).
            vocab_size: the largest vocabulary wanted, counting the 256 byte tokens and EOS;
                at least 257. A small corpus may end with fewer merges than asked for.
            show_progress: show the ``tokenizers`` progress bar.
            split_digits: every digit is its own token (as in Llama's tokenizer), so a number
                is spelled the same way wherever it occurs -- what copying numbers needs.
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
            raise ValueError(
                f"vocab_size must be an int >= 257 (256 byte tokens + {cls.EOS_TOKEN}), "
                f"got {vocab_size!r}"
            )
        texts = [text_or_texts] if isinstance(text_or_texts, str) else list(text_or_texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text_or_texts[{i}] must be a str, got {type(t).__name__}")
        if not any(texts):
            raise ValueError("text_or_texts is empty: nothing to train the BPE on")

        tokenizer = HFTokenizer(models.BPE())
        # add_prefix_space=False: adding a space would break decode(encode(text)) == text.
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if split_digits:
            # Digits first (isolated), then the byte-level split of each piece.
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            tokenizer.pre_tokenizer = byte_level
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[cls.EOS_TOKEN],
            # All 256 byte symbols, seen in the corpus or not, so that any text is encodable.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )

        def pieces() -> Iterator[str]:
            for t in texts:
                yield from _safe_chunks(t)

        tokenizer.train_from_iterator(pieces(), trainer=trainer)
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def hf_tokenizer(self) -> Any:
        """The wrapped ``tokenizers.Tokenizer`` (e.g. for ``PreTrainedTokenizerFast``)."""
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        """``text`` → ids. Long texts are encoded in parallel pieces with identical results."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        pieces = _safe_chunks(text)
        if len(pieces) == 1:
            return list(self._tokenizer.encode(text, add_special_tokens=False).ids)
        encodings = self._tokenizer.encode_batch(pieces, add_special_tokens=False)
        return [i for enc in encodings for i in enc.ids]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids → text; EOS is dropped."""
        id_list = _as_id_list(ids)
        bad = [i for i in id_list if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids must be in [0, {self.vocab_size}), got {bad[0]}")
        return self._tokenizer.decode(id_list, skip_special_tokens=True)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json`` (the HF tokenizer) and ``mnemo_tokenizer.json``."""
        directory = Path(directory).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(directory / self._TOKENIZER_FILE))
        _write_descriptor(
            directory,
            {
                "type": "bpe",
                "tokenizer_file": self._TOKENIZER_FILE,
                "vocab_size": self.vocab_size,
                "eos_token": self.EOS_TOKEN,
                "eos_id": self.eos_id,
            },
        )

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> BPETokenizer:
        """Read a tokenizer saved by :meth:`save`."""
        from tokenizers import Tokenizer as HFTokenizer

        path, descriptor = _read_descriptor(directory)
        if descriptor["type"] != "bpe":
            raise ValueError(f"{str(path)!r} describes a {descriptor['type']!r} tokenizer, not 'bpe'")
        file = path.parent / descriptor.get("tokenizer_file", cls._TOKENIZER_FILE)
        if not file.is_file():
            raise FileNotFoundError(f"BPE tokenizer file {str(file)!r} (named in {str(path)!r}) is missing")
        tok = cls(HFTokenizer.from_file(str(file)))
        if "vocab_size" in descriptor and descriptor["vocab_size"] != tok.vocab_size:
            raise ValueError(
                f"{str(file)!r} has vocab_size {tok.vocab_size} but {str(path)!r} "
                f"records {descriptor['vocab_size']}: the files do not belong together"
            )
        return tok

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def load_tokenizer(directory: str | os.PathLike[str]) -> ByteTokenizer | BPETokenizer:
    """Load whichever tokenizer was saved in ``directory`` (read from ``mnemo_tokenizer.json``).

    Raises:
        FileNotFoundError: ``directory/mnemo_tokenizer.json`` does not exist.
        ValueError: the file is not a mnemotorch tokenizer descriptor.
    """
    _, descriptor = _read_descriptor(directory)
    if descriptor["type"] == "byte":
        return ByteTokenizer.load(directory)
    return BPETokenizer.load(directory)


def build_tokenizer(
    kind: str, text: str | None = None, vocab_size: int = 1024, split_digits: bool = False
) -> ByteTokenizer | BPETokenizer:
    """Make a tokenizer of ``kind``: ``"byte"`` (``text``, ``vocab_size`` and ``split_digits``
    unused) or ``"bpe"`` (trained on ``text`` to ``vocab_size`` tokens; ``split_digits`` as in
    :meth:`BPETokenizer.train`)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if text is None:
            raise ValueError("kind='bpe' needs text to train on; got text=None")
        return BPETokenizer.train(text, vocab_size=vocab_size, split_digits=split_digits)
    raise ValueError(f"kind must be one of {list(TOKENIZER_KINDS)}, got {kind!r}")
