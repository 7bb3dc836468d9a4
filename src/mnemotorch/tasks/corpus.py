"""Text corpora: the bundled default corpus, local files and folders, Hugging Face datasets.

Everything here returns plain ``str``; tokenisation lives in :mod:`mnemotorch.tasks.tokenizer`
and token streams / batches in :mod:`mnemotorch.tasks.data`.
"""

from __future__ import annotations

import gzip
import math
import os
from importlib import resources
from pathlib import Path

__all__ = ["BUNDLED_CORPORA", "load_text", "split_text"]

#: Names accepted by :func:`load_text` for corpora shipped inside the package.
#: Maps the name to the file under ``mnemotorch/data``.
BUNDLED_CORPORA: dict[str, str] = {"tinyshakespeare": "tinyshakespeare.txt.gz"}

_DEFAULT_CORPUS = "tinyshakespeare"
_HF_PREFIX = "hf:"
# Documents of a folder are joined with a blank line so that no word of one file runs into the
# first word of the next, and a paragraph break marks the document boundary for the model.
_DOCUMENT_SEPARATOR = "\n\n"


def load_text(source: str | os.PathLike[str] | None = None) -> str:
    """Load a text corpus as one string.

    Args:
        source: where the text comes from:

            * ``None`` or ``"tinyshakespeare"``: the corpus bundled with the package
              (Tiny Shakespeare, 1,115,394 characters; see ``mnemotorch/data/README.md``).
              A bundled name wins over a file of the same name in the working directory;
              pass ``"./tinyshakespeare"`` to mean the file.
            * a path to a file: its text, decoded as strict UTF-8 (a leading byte-order mark
              is dropped).
            * a path to a directory: every ``*.txt`` file directly in it, sorted by file name,
              joined with a blank line (``"\\n\\n"``).
            * ``"hf:NAME[:CONFIG][:SPLIT]"``: a Hugging Face dataset (needs the optional
              ``datasets`` package); the rows of its ``text`` column joined with ``"\\n"``.
              ``SPLIT`` defaults to ``"train"`` and may itself contain colons
              (``"hf:wikitext:wikitext-2-raw-v1:train[:10%]"``).

    Returns:
        The text.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: a file is not valid UTF-8 (the message names the file and byte offset),
            a directory holds no ``*.txt`` file, or an ``hf:`` spec is malformed or the dataset
            has no ``text`` column.
        ImportError: an ``hf:`` source was asked for but ``datasets`` is not installed.
    """
    if source is None:
        return _load_bundled(_DEFAULT_CORPUS)
    if isinstance(source, str):
        if source in BUNDLED_CORPORA:
            return _load_bundled(source)
        if source.startswith(_HF_PREFIX):
            return _load_hf(source)
    elif not isinstance(source, os.PathLike):
        raise TypeError(
            f"source must be None, a str or an os.PathLike, got {type(source).__name__}"
        )

    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"source {str(source)!r}: no such file or directory (and not a bundled corpus name: "
            f"{sorted(BUNDLED_CORPORA)}, nor an 'hf:NAME[:CONFIG][:SPLIT]' spec)"
        )
    if path.is_dir():
        files = sorted((p for p in path.glob("*.txt") if p.is_file()), key=lambda p: p.name)
        if not files:
            raise ValueError(f"source directory {str(path)!r} contains no *.txt files")
        return _DOCUMENT_SEPARATOR.join(_read_utf8_file(p) for p in files)
    return _read_utf8_file(path)


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """Split a text into a training part (the beginning) and a validation part (the end).

    As in nanoGPT, the split is by position, not random, so that validation text is never seen
    during training even in part: ``n_train = int(len(text) * (1 - val_fraction))``.
    For Tiny Shakespeare and ``val_fraction=0.1`` this gives the usual 90% / 10% split.

    Args:
        text: the corpus.
        val_fraction: share of characters for validation, strictly between 0 and 1.

    Returns:
        ``(train, val)`` with ``train + val == text``, both non-empty.

    Raises:
        ValueError: ``val_fraction`` is not in (0, 1), or ``text`` is too short for both parts
            to be non-empty.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, (int, float))
        or not math.isfinite(val_fraction)
        or not 0.0 < val_fraction < 1.0
    ):
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    n_train = int(len(text) * (1.0 - val_fraction))
    if n_train == 0 or n_train == len(text):
        raise ValueError(
            f"text of length {len(text)} is too short to split with val_fraction={val_fraction}: "
            f"the training part would have {n_train} characters and the validation part "
            f"{len(text) - n_train}"
        )
    return text[:n_train], text[n_train:]


def _decode_utf8(data: bytes, origin: str) -> str:
    """Strict UTF-8 decode; errors name ``origin`` and the byte offset (bad data is never guessed at)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{origin}: invalid UTF-8 at byte offset {err.start} "
            f"(byte 0x{data[err.start]:02x}: {err.reason}); UTF-8 text was expected. "
            f"Re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`."
        ) from None
    # A byte-order mark is an encoding artefact, not text: a model should never learn it.
    return text.removeprefix("\ufeff")


def _read_utf8_file(path: Path) -> str:
    return _decode_utf8(path.read_bytes(), origin=f"file {str(path)!r}")


def _load_bundled(name: str) -> str:
    resource = resources.files("mnemotorch") / "data" / BUNDLED_CORPORA[name]
    with resource.open("rb") as fh:
        data = gzip.decompress(fh.read())
    return _decode_utf8(data, origin=f"bundled corpus {name!r}")


def _load_hf(spec: str) -> str:
    # maxsplit=2: a split expression such as "train[:10%]" contains a colon itself.
    parts = spec[len(_HF_PREFIX) :].split(":", 2)
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    if not name:
        raise ValueError(f"source {spec!r}: expected 'hf:NAME[:CONFIG][:SPLIT]' with a non-empty NAME")
    try:
        import datasets  # optional dependency: imported only when asked for
    except ImportError as err:
        raise ImportError(
            f"source {spec!r} needs the Hugging Face `datasets` package; "
            "install it with: pip install 'mnemotorch[datasets]'"
        ) from err
    dataset = datasets.load_dataset(name, config, split=split)
    columns = list(dataset.column_names)
    if "text" not in columns:
        raise ValueError(
            f"source {spec!r}: the dataset has no 'text' column (columns: {columns})"
        )
    return "\n".join(dataset["text"])
