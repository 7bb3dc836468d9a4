"""Memory-quality evaluation of a trained model: ``mnemo eval TASK MODEL``.

One module for the four evaluations of the memory benchmark suite, for our checkpoints and for
any local Hugging Face causal LM (``"hf:PATH"``):

* :func:`evaluate_books` — perplexity and bits per byte on long documents, by the standard
  **sliding window** (context ``C``, stride ``S``: every token scored exactly once, with between
  ``C - S`` and ``C`` tokens of context; :func:`sliding_window_nll`) and by **whole-document
  streaming** (the document fed in chunks with the model's state carried across them;
  :func:`streaming_nll`). For our models the streaming invariant makes streaming exactly one
  forward pass over the whole document, at any length; Hugging Face models carry their KV cache.
* :func:`evaluate_passkey` — passkey retrieval accuracy on a grid of lengths x depths, answers
  decoded greedily; :func:`plot_passkey_heatmap` draws the grid.
* :func:`evaluate_sort_task` — SORT (which of two segments came first) with the 50% chance level,
  in the ``in_context`` condition and the ``stream`` condition (the excerpt is read first, the
  state carried, then the question is asked without the text).
* :func:`evaluate_mqar` — MQAR token accuracy of a model trained on MQAR.

Models are wrapped in an :class:`EvalModel` (``load_eval_model(spec)``), which hides the few
differences between our ``MnemoForCausalLM`` and a Hugging Face model (cache keyword, special
tokens, default context). Every function also accepts a bare model (wrapped on the fly).

    from mnemotorch.bench.evaluate import load_eval_model, evaluate_books
    em = load_eval_model("runs/lm_books")                 # or "hf:/path/to/llama"
    res = evaluate_books(em, ["book.txt"], mode="both", context=512, stride=256)
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "EvalError",
    "EvalModel",
    "HELD_OUT_BOOKS",
    "WIKITEXT2_TEST",
    "BOOKSORT_DIR",
    "default_book_sources",
    "default_sort_sources",
    "evaluate_books",
    "evaluate_mqar",
    "evaluate_passkey",
    "evaluate_sort_task",
    "find_shared_data",
    "load_documents",
    "load_eval_model",
    "plot_passkey_heatmap",
    "sliding_window_nll",
    "streaming_nll",
]

#: Books of ``shared/data/gutenberg`` never trained on by ``configs/lm_books.yaml`` (its
#: ``val_fraction`` puts the split point before the first of them).
HELD_OUT_BOOKS: tuple[str, ...] = ("gutenberg/pg98_a_tale_of_two_cities.txt",)
#: WikiText-2 test split (tokenized v1 text, as shipped by the PyTorch examples).
WIKITEXT2_TEST = "wikitext-2/test.txt"
#: The Book-SORT books (Pink et al. 2024), the default texts of the SORT evaluation.
BOOKSORT_DIR = "booksort"
_HF_PREFIX = "hf:"
_SORT_CONDITIONS = ("in_context", "stream", "no_context")


class EvalError(ValueError):
    """A problem with the user's input (model path, data, task parameters): the message says what."""


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def find_shared_data() -> Path | None:
    """The project's shared data folder (``shared/data``), or ``None`` if there is none.

    Looked up in order: ``$MNEMO_DATA_DIR``; ``../shared/data`` and ``shared/data`` from the
    working directory; the same beside the repository holding this package (src layout).
    """
    env = os.environ.get("MNEMO_DATA_DIR")
    if env:
        return Path(env) if Path(env).is_dir() else None
    repo = Path(__file__).resolve().parents[3]
    for base in (Path.cwd(), repo):
        for rel in ("../shared/data", "shared/data"):
            candidate = (base / rel).resolve()
            if candidate.is_dir():
                return candidate
    return None


def default_book_sources() -> list[Path]:
    """The held-out books (:data:`HELD_OUT_BOOKS`) and WikiText-2 test, where the shared data exists."""
    root = find_shared_data()
    if root is None:
        raise EvalError("no shared data folder (../shared/data) found for the default books; pass --data FILE_OR_FOLDER")
    paths = [root / rel for rel in (*HELD_OUT_BOOKS, WIKITEXT2_TEST) if (root / rel).is_file()]
    if not paths:
        raise EvalError(f"{root} holds none of the default books {list(HELD_OUT_BOOKS) + [WIKITEXT2_TEST]}; pass --data FILE_OR_FOLDER")
    return paths


def default_sort_sources() -> list[Path]:
    """The Book-SORT books (``shared/data/booksort``), falling back to the held-out books."""
    root = find_shared_data()
    if root is not None and (root / BOOKSORT_DIR).is_dir():
        return [root / BOOKSORT_DIR]
    if root is not None:
        books = [root / rel for rel in HELD_OUT_BOOKS if (root / rel).is_file()]
        if books:
            return books
    raise EvalError("no shared data folder (../shared/data/booksort) found for the default SORT texts; pass --data FILE_OR_FOLDER")


def load_documents(sources: Iterable[str | os.PathLike[str]]) -> list[tuple[str, str]]:
    """``(name, text)`` per document: a file is one document, a folder gives one per ``*.txt`` in it.

    Raises:
        EvalError: a path does not exist, a folder has no ``*.txt``, a file is not UTF-8 or is empty.
    """
    from ..tasks import load_text

    docs: list[tuple[str, str]] = []
    for src in sources:
        path = Path(src).expanduser()
        if not path.exists():
            raise EvalError(f"data {str(src)!r}: no such file or directory")
        files = sorted(p for p in path.glob("*.txt") if p.is_file()) if path.is_dir() else [path]
        if not files:
            raise EvalError(f"data folder {str(path)!r} contains no *.txt files")
        for f in files:
            try:
                text = load_text(f)
            except ValueError as err:
                raise EvalError(str(err)) from err
            if not text.strip():
                raise EvalError(f"data file {str(f)!r} is empty")
            docs.append((f.name if path.is_dir() or len(files) == 1 else str(f), text))
    if not docs:
        raise EvalError("no data given")
    return docs


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


def _cache_keyword(model: nn.Module) -> str:
    """``"cache"`` or ``"past_key_values"``: transformers renamed the argument during 5.x."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class EvalModel:
    """A causal LM ready for evaluation, with its tokenizer.

    Attributes:
        model: ``MnemoForCausalLM`` (``kind="mnemo"``) or a Hugging Face causal LM (``"hf"``), in eval mode.
        tokenizer: ours (``encode``/``decode``/``eos_id``) or a Hugging Face tokenizer; ``None``
            for token-level tasks (MQAR).
        kind: ``"mnemo"`` or ``"hf"``.
        source: the path (or spec) it was loaded from.
        train_config: the training config of our checkpoints (a dict), else ``None``.
    """

    model: nn.Module
    tokenizer: Any = None
    kind: str = "mnemo"
    source: str = ""
    train_config: dict[str, Any] | None = None
    _cache_kw: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ("mnemo", "hf"):
            raise ValueError(f"kind must be 'mnemo' or 'hf', got {self.kind!r}")
        self.model.eval()
        if not self._cache_kw:
            self._cache_kw = _cache_keyword(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise EvalError(f"model {self.source!r} has no tokenizer; this evaluation needs one")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens."""
        tok = self._need_tokenizer()
        if self.kind == "hf" and not hasattr(tok, "eos_id"):
            with _quiet_hf_logging():
                return list(tok(text, add_special_tokens=False)["input_ids"])
        return list(tok.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        tok = self._need_tokenizer()
        if self.kind == "hf" and not hasattr(tok, "eos_id"):
            return tok.decode(list(ids), skip_special_tokens=True)
        return tok.decode(list(ids))

    @property
    def prefix_ids(self) -> list[int]:
        """Ids the tokenizer puts before a text by default (a Hugging Face BOS), else ``[]``."""
        tok = self.tokenizer
        if tok is None or self.kind != "hf" or hasattr(tok, "eos_id"):
            return []
        with_special = tok("a")["input_ids"]
        without = tok("a", add_special_tokens=False)["input_ids"]
        n = len(with_special) - len(without)
        return list(with_special[:n]) if n > 0 and with_special[n:] == without else []

    @property
    def start_id(self) -> int | None:
        """The token that opens a document for perplexity (HF: BOS, else EOS; ours: EOS)."""
        tok = self.tokenizer
        if tok is None:
            return None
        if hasattr(tok, "eos_id"):
            return tok.eos_id
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(tok, name, None)
            if value is not None:
                return int(value)
        return None

    @property
    def max_positions(self) -> int | None:
        """The longest input a Hugging Face model is configured for (``None``: unbounded / ours)."""
        if self.kind != "hf":
            return None
        value = getattr(self.model.config, "max_position_embeddings", None)
        return int(value) if value else None

    @property
    def default_context(self) -> int:
        """Context for sliding-window perplexity: the training ``seq_len`` (ours), else ≤ 2048."""
        if self.train_config:
            seq = (self.train_config.get("data") or {}).get("seq_len")
            if seq:
                return int(seq)
        return min(self.max_positions or 512, 2048) if self.kind == "hf" else 512

    @torch.no_grad()
    def forward(self, input_ids: Tensor, cache: Any = None, use_cache: bool = False,
                logits_to_keep: int = 0) -> tuple[Tensor, Any]:
        """``input_ids [B, T]`` -> ``(logits [B, T or logits_to_keep, V], cache)``.

        With ``use_cache`` the returned cache continues the sequence in the next call (our
        ``MnemoCache`` of mixer states, or a Hugging Face KV cache).
        """
        x = input_ids.to(self.device)
        kwargs: dict[str, Any] = {"input_ids": x, "use_cache": use_cache}
        if cache is not None:
            kwargs[self._cache_kw] = cache
        if logits_to_keep:
            kwargs["logits_to_keep"] = int(logits_to_keep)
        out = self.model(**kwargs)
        new_cache = None
        if use_cache:
            for name in ("cache", "past_key_values"):
                value = getattr(out, name, None)
                if value is not None:
                    new_cache = value
                    break
        return out.logits, new_cache


@contextlib.contextmanager
def _quiet_hf_logging() -> Any:
    """Silence transformers' "sequence longer than the model's maximum" warnings while tokenizing books."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _as_eval_model(model: Any) -> EvalModel:
    if isinstance(model, EvalModel):
        return model
    if isinstance(model, nn.Module):
        from ..models import MnemoForCausalLM

        return EvalModel(model, None, "mnemo" if isinstance(model, MnemoForCausalLM) else "hf", type(model).__name__)
    raise TypeError(f"model must be an EvalModel or a torch.nn.Module causal LM, got {type(model).__name__}")


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError("device 'cuda' was asked for but no CUDA device is available")
    return dev


def load_eval_model(spec: str | os.PathLike[str], device: str | torch.device | None = "auto",
                    dtype: str | torch.dtype | None = None, need_tokenizer: bool = True) -> EvalModel:
    """Load a model to evaluate.

    Args:
        spec: one of our checkpoints (a ``checkpoint/`` directory or a run's ``out_dir``), or
            ``"hf:PATH"``: a local Hugging Face causal-LM directory with its tokenizer, loaded with
            ``AutoModelForCausalLM`` / ``AutoTokenizer`` (``local_files_only``: nothing is downloaded).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...
        dtype: weights dtype (``"float32"`` default, ``"bfloat16"``, ``"float16"``).
        need_tokenizer: ``False`` loads a model without a tokenizer (token-level tasks such as MQAR).

    Raises:
        EvalError: the path does not exist, is not a local directory, or is not a loadable model.
    """
    from ..train import CheckpointError, load_checkpoint_tokenizer, load_model
    from ..train.checkpoint import load_train_config

    dev = _resolve_device(device)
    torch_dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if isinstance(dtype, str) and dtype not in _DTYPES:
        raise EvalError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    text = str(spec)
    if text.startswith(_HF_PREFIX):
        path = Path(text[len(_HF_PREFIX):]).expanduser()
        if not path.is_dir():
            raise EvalError(
                f"{text!r}: no local directory {str(path)!r}. hf:PATH must be a local Hugging Face model "
                "directory (config.json, weights, tokenizer files); mnemo eval downloads nothing"
            )
        if (path / "mnemo_tokenizer.json").is_file():
            return load_eval_model(path, device, dtype, need_tokenizer)  # one of ours, given as hf:
        import mnemotorch  # noqa: F401 - registers our model class with the Auto classes
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not (path / "config.json").is_file():
            raise EvalError(f"{text!r}: {str(path / 'config.json')!r} is missing; not a Hugging Face model directory")
        from ..train.checkpoint import _quiet_transformers_progress

        try:
            with _quiet_transformers_progress():
                model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch_dtype or torch.float32)
        except Exception as err:  # noqa: BLE001 - re-raised with the path named
            raise EvalError(f"{text!r}: could not load the model ({type(err).__name__}: {err})") from err
        tok = None
        if need_tokenizer:
            try:
                tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except Exception as err:  # noqa: BLE001
                raise EvalError(f"{text!r}: could not load the tokenizer ({type(err).__name__}: {err})") from err
        return EvalModel(model.to(dev), tok, "hf", text)

    path = Path(text).expanduser()
    if not path.exists():
        raise EvalError(f"model {text!r} does not exist (give a checkpoint directory, a run's out_dir, or hf:PATH)")
    if path.is_dir() and not (path / "config.json").exists() and (path / "checkpoint").is_dir():
        path = path / "checkpoint"  # a run's out_dir
    try:
        model = load_model(path, dev)
        tok = load_checkpoint_tokenizer(path) if need_tokenizer else None
        train_cfg = load_train_config(path)
    except CheckpointError as err:
        raise EvalError(str(err)) from err
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    if tok is not None and tok.vocab_size > model.config.vocab_size:
        raise EvalError(f"{path}: tokenizer vocab_size {tok.vocab_size} > model vocab_size {model.config.vocab_size}")
    return EvalModel(model, tok, "mnemo", text, train_cfg)


# ---------------------------------------------------------------------------------------------
# perplexity
# ---------------------------------------------------------------------------------------------


def _as_tokens(tokens: Any) -> Tensor:
    t = torch.as_tensor(tokens, dtype=torch.long)
    if t.dim() != 1:
        raise EvalError(f"tokens must be 1-D [N], got shape {tuple(t.shape)}")
    if t.numel() < 2:
        raise EvalError(f"need at least 2 tokens to score a next-token prediction, got {t.numel()}")
    return t


def _check_pos(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EvalError(f"{name} must be a positive int, got {value!r}")
    return value


def _ppl_result(nll: float, count: int) -> dict[str, Any]:
    loss = nll / count
    return {"nll_sum": nll, "tokens": count, "loss": loss, "ppl": math.exp(min(loss, 700.0))}


def sliding_window_windows(num_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows of the strided protocol over a stream of ``num_tokens`` tokens.

    Targets are the positions ``1 .. N-1`` (each predicted from the tokens before it). Window
    ``k`` reads tokens ``[s, t_last)`` with ``s = k * stride``, ``t_last = min(s + context, N - 1)``,
    and scores the targets ``t_first .. t_last`` not scored by an earlier window; target ``t``
    then has ``t - s ≤ context`` tokens of context, and at least ``context - stride`` once the
    first window is past. ``stride == context`` gives disjoint windows (plain chunked evaluation).

    Returns:
        ``[(s, t_first, t_last), ...]``.
    """
    windows = []
    next_t, s = 1, 0
    while next_t <= num_tokens - 1:
        last = min(s + context, num_tokens - 1)
        windows.append((s, next_t, last))
        next_t = last + 1
        s += stride
    return windows


@torch.no_grad()
def sliding_window_nll(model: Any, tokens: Any, context: int, stride: int | None = None,
                       batch_size: int = 8) -> dict[str, Any]:
    """Summed and mean next-token NLL of ``tokens`` by the sliding-window protocol.

    Every target (positions ``1 .. N-1``) is scored exactly once, with up to ``context`` tokens
    of context (see :func:`sliding_window_windows`); windows of the same shape run in batches,
    and the head is computed only at the scored positions (``logits_to_keep``).

    Args:
        model: an :class:`EvalModel` or a causal LM module.
        tokens: ``[N]`` token ids.
        context: tokens per window ``C``.
        stride: ``S`` in ``[1, C]``; default ``C // 2``.
        batch_size: windows per forward.

    Returns:
        ``{"nll_sum", "tokens", "loss" (nats/token), "ppl"}``.
    """
    em = _as_eval_model(model)
    ids = _as_tokens(tokens)
    context = _check_pos(context, "context")
    stride = max(1, context // 2) if stride is None else _check_pos(stride, "stride")
    if stride > context:
        raise EvalError(f"stride must be <= context (every token needs a window), got stride={stride} > context={context}")
    batch_size = _check_pos(batch_size, "batch_size")
    windows = sliding_window_windows(ids.numel(), context, stride)
    nll, count = 0.0, 0
    i = 0
    while i < len(windows):
        s0, f0, l0 = windows[i]
        shape = (l0 - s0, l0 - f0 + 1)
        group = [windows[i]]
        while (len(group) < batch_size and i + len(group) < len(windows)
               and (windows[i + len(group)][2] - windows[i + len(group)][0],
                    windows[i + len(group)][2] - windows[i + len(group)][1] + 1) == shape):
            group.append(windows[i + len(group)])
        i += len(group)
        x = torch.stack([ids[s:last] for s, _, last in group])
        y = torch.stack([ids[first:last + 1] for _, first, last in group]).to(em.device)
        logits, _ = em.forward(x, logits_to_keep=shape[1])
        nll += float(F.cross_entropy(logits[:, -shape[1]:].flatten(0, 1).float(), y.flatten(), reduction="sum"))
        count += y.numel()
    return _ppl_result(nll, count)


@torch.no_grad()
def streaming_nll(model: Any, tokens: Any, chunk: int = 512) -> dict[str, Any]:
    """Summed and mean next-token NLL of the whole of ``tokens``, fed in chunks with the state carried.

    Every target ``1 .. N-1`` is predicted from *all* the tokens before it. For our models the
    per-layer mixer states travel in a ``MnemoCache``, and by the streaming invariant the result
    equals one forward pass over the whole sequence (up to float rounding) at any length and
    chunk size; memory is whatever the mixers keep (a full KV cache for attention, a bounded
    window or a fixed-size matrix for the others). Hugging Face models carry their KV cache
    (positions beyond ``max_position_embeddings`` are the model's own business).

    Returns:
        ``{"nll_sum", "tokens", "loss", "ppl"}``.
    """
    em = _as_eval_model(model)
    ids = _as_tokens(tokens)
    chunk = _check_pos(chunk, "chunk")
    n = ids.numel()
    cache = None
    nll, count = 0.0, 0
    for lo in range(0, n - 1, chunk):
        hi = min(lo + chunk, n - 1)
        logits, cache = em.forward(ids[lo:hi][None], cache=cache, use_cache=True)
        y = ids[lo + 1:hi + 1].to(logits.device)
        nll += float(F.cross_entropy(logits[0].float(), y, reduction="sum"))
        count += y.numel()
    return _ppl_result(nll, count)


def _bpb(nll: float, num_bytes: int) -> float:
    return nll / math.log(2) / num_bytes if num_bytes else float("nan")


def evaluate_books(
    model: Any,
    sources: Sequence[str | os.PathLike[str]] | None = None,
    *,
    texts: Sequence[tuple[str, str]] | None = None,
    mode: str = "sliding",
    context: int | None = None,
    stride: int | None = None,
    chunk: int | None = None,
    max_tokens: int | None = None,
    bos: bool = True,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Perplexity and bits per byte on long documents.

    Args:
        model: an :class:`EvalModel` (with a tokenizer).
        sources: files or folders (one document per ``*.txt``); default
            :func:`default_book_sources` (held-out books + WikiText-2 test).
        texts: ``(name, text)`` documents instead of ``sources``.
        mode: ``"sliding"`` (:func:`sliding_window_nll`), ``"stream"`` (:func:`streaming_nll`,
            whole document) or ``"both"``.
        context: sliding-window context (default :attr:`EvalModel.default_context`).
        stride: sliding-window stride (default ``context // 2``).
        chunk: streaming chunk size (default ``context``).
        max_tokens: score exactly the first ``max_tokens`` tokens of each document (a document
            with fewer is an error); default the whole document.
        bos: open each document with the model's start token (:attr:`EvalModel.start_id`) so
            that its first token is scored too and bits per byte count every byte exactly; with
            ``False`` the first token is not scored (bits per byte still divide by all bytes).
        batch_size: windows per forward (sliding).

    Returns:
        ``{"rows": [{"document", "mode", "context", "stride", "chunk", "tokens", "bytes",
        "loss", "ppl", "bpb", "seconds"}, ...], "settings": {...}, "notes": [...]}``; with several documents,
        a row ``document="all"`` per mode pools them (token-weighted loss, byte-weighted bpb).
    """
    em = _as_eval_model(model)
    if mode not in ("sliding", "stream", "both"):
        raise EvalError(f"mode must be 'sliding', 'stream' or 'both', got {mode!r}")
    if texts is None:
        texts = load_documents(sources if sources else default_book_sources())
    context = _check_pos(context if context is not None else em.default_context, "context")
    stride = _check_pos(stride if stride is not None else max(1, context // 2), "stride")
    if stride > context:
        raise EvalError(f"stride must be <= context, got stride={stride} > context={context}")
    chunk = _check_pos(chunk if chunk is not None else context, "chunk")
    if max_tokens is not None:
        _check_pos(max_tokens, "max_tokens")
    start = em.start_id if bos else None
    if bos and start is None:
        raise EvalError("the tokenizer has no BOS/EOS token to open a document; use bos=False (--no-bos)")
    modes = ["sliding", "stream"] if mode == "both" else [mode]
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    totals = {m: [0.0, 0, 0] for m in modes}
    for name, text in texts:
        ids = em.encode(text)
        if max_tokens is not None:
            if len(ids) < max_tokens:
                raise EvalError(f"document {name!r} has {len(ids)} tokens, fewer than the {max_tokens} requested (max_tokens / --tokens)")
            ids = ids[:max_tokens]
            num_bytes = len(em.decode(ids).encode("utf-8"))
        else:
            num_bytes = len(text.encode("utf-8"))
        seq = torch.tensor(([start] if start is not None else []) + ids, dtype=torch.long)
        if seq.numel() < 2:
            raise EvalError(f"document {name!r} is too short: {len(ids)} token(s)")
        if em.max_positions and "stream" in modes and seq.numel() > em.max_positions:
            notes.append(f"{name}: {seq.numel()} tokens exceed the model's max_position_embeddings={em.max_positions}; "
                         "whole-document (stream) results beyond it extrapolate")
        for m in modes:
            t0 = time.perf_counter()
            res = sliding_window_nll(em, seq, context, stride, batch_size) if m == "sliding" else streaming_nll(em, seq, chunk)
            rows.append({
                "document": name, "mode": m, "context": context if m == "sliding" else None,
                "stride": stride if m == "sliding" else None, "chunk": chunk if m == "stream" else None,
                "tokens": res["tokens"], "bytes": num_bytes, "loss": res["loss"], "ppl": res["ppl"],
                "bpb": _bpb(res["nll_sum"], num_bytes), "seconds": round(time.perf_counter() - t0, 3),
            })
            tot = totals[m]
            tot[0] += res["nll_sum"]
            tot[1] += res["tokens"]
            tot[2] += num_bytes
    if len(texts) > 1:
        for m in modes:
            nll, count, num_bytes = totals[m]
            r = _ppl_result(nll, count)
            rows.append({"document": "all", "mode": m, "context": context if m == "sliding" else None,
                         "stride": stride if m == "sliding" else None, "chunk": chunk if m == "stream" else None,
                         "tokens": count, "bytes": num_bytes, "loss": r["loss"], "ppl": r["ppl"],
                         "bpb": _bpb(nll, num_bytes), "seconds": None})
    settings = {"mode": mode, "context": context, "stride": stride, "chunk": chunk, "max_tokens": max_tokens,
                "bos": bos, "documents": [n for n, _ in texts]}
    return {"rows": rows, "settings": settings, "notes": notes}


# ---------------------------------------------------------------------------------------------
# passkey
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _greedy(em: EvalModel, prompts: Tensor, steps: int) -> Tensor:
    """Greedy continuation ``[B, steps]`` of ``prompts [B, P]`` (prefill once, then one token at a time)."""
    logits, cache = em.forward(prompts, use_cache=True, logits_to_keep=1)
    out = []
    nxt = logits[:, -1].argmax(-1)
    for i in range(steps):
        out.append(nxt)
        if i + 1 < steps:
            logits, cache = em.forward(nxt[:, None], cache=cache, use_cache=True, logits_to_keep=1)
            nxt = logits[:, -1].argmax(-1)
    return torch.stack(out, dim=1).cpu()


def _answer_matches(generated: str, value: str) -> bool:
    return re.match(rf"\s*{re.escape(value)}(?![0-9A-Za-z])", generated) is not None


def evaluate_passkey(
    model: Any,
    lengths: Sequence[int] = (512, 1024, 2048),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    trials: int = 10,
    *,
    kind: str = "passkey",
    haystack: str | None = None,
    seed: int = 0,
    instruction: bool = True,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Needle retrieval accuracy on a grid of lengths x depths, answers decoded greedily.

    Each cell builds ``trials`` examples with :func:`~mnemotorch.tasks.synthetic.make_needle_examples`
    (exactly ``length`` tokens, prompt plus answer; a Hugging Face tokenizer's BOS is prepended
    to the prompt), feeds the prompt, decodes as many tokens as the answer has, greedily, and
    counts an example right when the decoded text is the value (e.g. the 5 digits), not followed
    by another digit or letter.

    Args:
        kind: ``"passkey"``, ``"number"`` or ``"word"``.
        haystack: ``None`` for the synthetic filler, or a real text (e.g. a held-out book).
        seed: cell ``(i, j)`` uses seed ``seed + 1000 * i + j``.

    Returns:
        ``{"rows": [{"length", "depth", "accuracy", "correct", "trials"}], "lengths", "depths",
        "grid" ([len(lengths)][len(depths)] accuracies), "examples" (a few decoded answers),
        "settings", "notes"}``.
    """
    from ..tasks.synthetic import make_needle_examples

    em = _as_eval_model(model)
    trials = _check_pos(trials, "trials")
    batch_size = _check_pos(batch_size, "batch_size")
    lengths = [_check_pos(int(v), "length") for v in lengths]
    depths = [float(d) for d in depths]
    for d in depths:
        if not 0.0 <= d <= 1.0 or math.isnan(d):
            raise EvalError(f"depth must be in [0, 1] (0 = start of the haystack, 1 = end), got {d}")
    notes = []
    too_long = [n for n in lengths if em.max_positions and n > em.max_positions]
    if too_long:
        notes.append(f"lengths {too_long} exceed the model's max_position_embeddings={em.max_positions}")
    tok = em._need_tokenizer()
    prefix = em.prefix_ids
    rows, grid, samples = [], [], []
    for i, length in enumerate(lengths):
        grid_row = []
        for j, depth in enumerate(depths):
            try:
                examples = make_needle_examples(tok, trials, length, depth, kind, haystack, seed + 1000 * i + j, instruction)
            except ValueError as err:
                raise EvalError(str(err)) from err
            correct = 0
            # Same prompt length <=> same answer length (examples have exactly `length` tokens).
            groups: dict[int, list[Any]] = {}
            for ex in examples:
                n_answer = int((ex.labels != -100).sum())
                groups.setdefault(ex.input_ids.numel() - n_answer, []).append(ex)
            for p_len, exs in groups.items():
                n_answer = length - p_len
                for lo in range(0, len(exs), batch_size):
                    batch = exs[lo:lo + batch_size]
                    prompts = torch.stack([torch.cat([torch.tensor(prefix, dtype=torch.long), e.input_ids[:p_len]]) for e in batch])
                    gen = _greedy(em, prompts, n_answer)
                    for e, g in zip(batch, gen):
                        text = em.decode(g.tolist())
                        ok = _answer_matches(text, e.value)
                        correct += ok
                        if len(samples) < 20 and (not ok or len(samples) < 5):
                            samples.append({"length": length, "depth": depth, "answer": e.value, "generated": text, "correct": ok})
            acc = correct / trials
            grid_row.append(acc)
            rows.append({"length": length, "depth": depth, "accuracy": acc, "correct": correct, "trials": trials})
        grid.append(grid_row)
    settings = {"lengths": lengths, "depths": depths, "trials": trials, "kind": kind,
                "haystack": "synthetic" if haystack is None else "text", "seed": seed, "instruction": instruction}
    return {"rows": rows, "lengths": lengths, "depths": depths, "grid": grid, "examples": samples, "settings": settings,
            "notes": notes}


def plot_passkey_heatmap(result: dict[str, Any], path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Accuracy heat map (lengths on the y axis, depths on the x axis) of :func:`evaluate_passkey`'s result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = result["grid"]
    lengths, depths = result["lengths"], result["depths"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(depths), 1.0 + 0.6 * len(lengths)), dpi=120)
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="lower")
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("length (tokens)")
    for i in range(len(lengths)):
        for j in range(len(depths)):
            ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(title or f"{result['settings']['kind']} retrieval, {result['settings']['trials']} trials per cell", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------
# SORT
# ---------------------------------------------------------------------------------------------


def _sort_continuations(em: EvalModel, prompt: str) -> list[list[int]]:
    conts = []
    for ans in ("A", "B"):
        full = em.encode(prompt + " " + ans)
        body = em.encode(prompt)
        conts.append(full[len(body):] if full[:len(body)] == body else em.encode(" " + ans))
    return conts


@torch.no_grad()
def _score_after_state(em: EvalModel, cache: Any, prompt_ids: list[int], conts: list[list[int]]) -> list[float]:
    """``log p(cont | state, prompt)`` for each continuation; ``cache`` holds the state (not modified)."""
    common = 0
    while all(len(c) > common + 1 for c in conts) and len({c[common] for c in conts}) == 1:
        common += 1
    head = prompt_ids + conts[0][:common]
    rests = [c[common:] for c in conts]
    state = copy.deepcopy(cache)
    logits, state = em.forward(torch.tensor([head]), cache=state, use_cache=True)
    first = logits[0, -1].float().log_softmax(-1)
    scores = []
    for rest in rests:
        score = float(first[rest[0]])
        if len(rest) > 1:
            lg, _ = em.forward(torch.tensor([rest[:-1]]), cache=copy.deepcopy(state), use_cache=True)
            lp = lg[0].float().log_softmax(-1)
            score += float(lp.gather(1, torch.tensor(rest[1:], device=lp.device)[:, None]).sum())
        scores.append(score)
    return scores


@torch.no_grad()
def _sort_stream(em: EvalModel, examples: list[Any], chunk: int) -> dict[str, Any]:
    """SORT after streaming the excerpt: read it (chunks, state carried), then ask without it."""
    from ..tasks.synthetic import sort_prompt

    choices, margins = [], []
    for ex in examples:
        text_ids = em.prefix_ids + em.encode(ex.excerpt + "\n\n")
        cache = None
        for lo in range(0, len(text_ids), chunk):
            _, cache = em.forward(torch.tensor([text_ids[lo:lo + chunk]]), cache=cache, use_cache=True)
        prompt = sort_prompt(ex, "no_context")
        prompt_ids = em.encode(prompt)
        scores = _score_after_state(em, cache, prompt_ids, _sort_continuations(em, prompt))
        choice = "AB"[int(scores[1] > scores[0])]  # ties answer "A", as evaluate_sort does
        choices.append(choice)
        right = "AB".index(ex.answer)
        margins.append(scores[right] - scores[1 - right])
    correct = sum(c == ex.answer for c, ex in zip(choices, examples))
    return {"accuracy": correct / len(examples), "num_examples": len(examples),
            "always_a_accuracy": sum(ex.answer == "A" for ex in examples) / len(examples),
            "choices": choices, "logprob_margin": float(sum(margins) / len(margins))}


def evaluate_sort_task(
    model: Any,
    sources: Sequence[str | os.PathLike[str]] | None = None,
    *,
    texts: Sequence[tuple[str, str]] | None = None,
    num_examples: int = 10,
    excerpt_words: int = 250,
    segment_words: int = 20,
    conditions: Sequence[str] | None = None,
    min_distance: int = 0,
    max_distance: int | None = None,
    chunk: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """SORT accuracy (which of two segments came first), per condition, with the 50% chance level.

    ``num_examples`` (even) balanced examples are drawn from each document with
    :func:`~mnemotorch.tasks.synthetic.make_sort_examples`, so exactly half the answers are "A"
    and a constant answer scores exactly 50%. Conditions:

    * ``"in_context"``: :func:`~mnemotorch.tasks.synthetic.evaluate_sort` — the excerpt, then the question;
    * ``"stream"``: the excerpt (and a blank line) is fed first, in chunks of ``chunk`` tokens
      with the model's state carried, then the question *without* the text is scored from that
      state: the text was "seen earlier in a stream" and can only be answered from memory. For
      full attention the carried KV cache makes this the in-context condition with a different
      question wording; for bounded-state mixers (sliding window, recurrent) it tests what the
      state kept;
    * ``"no_context"``: the question alone (only the weights can know the book).

    Returns:
        ``{"rows": [{"condition", "accuracy", "chance", "num_examples", "always_a_accuracy",
        "logprob_margin"}], "by_document": [...], "settings"}``.
    """
    from ..tasks.synthetic import evaluate_sort, make_sort_examples

    em = _as_eval_model(model)
    em._need_tokenizer()
    if conditions is None:
        conditions = ["in_context", "stream"] if em.kind == "mnemo" else ["in_context"]
    conditions = list(conditions)
    bad = [c for c in conditions if c not in _SORT_CONDITIONS]
    if bad or not conditions:
        raise EvalError(f"SORT conditions must be among {list(_SORT_CONDITIONS)}, got {conditions}")
    if texts is None:
        texts = load_documents(sources if sources else default_sort_sources())
    chunk = _check_pos(chunk if chunk is not None else em.default_context, "chunk")
    tok = em.tokenizer
    pooled: dict[str, list[tuple[dict[str, Any], int]]] = {c: [] for c in conditions}
    by_doc = []
    for d, (name, text) in enumerate(texts):
        try:
            examples = make_sort_examples(text, num_examples, excerpt_words, segment_words, min_distance, max_distance, seed + d)
        except (ValueError, TypeError) as err:
            raise EvalError(f"document {name!r}: {err}") from err
        for cond in conditions:
            if cond == "stream":
                res = _sort_stream(em, examples, chunk)
            else:
                res = evaluate_sort(em.model, tok, examples, cond, device=em.device)
            pooled[cond].append((res, len(examples)))
            by_doc.append({"document": name, "condition": cond, "accuracy": res["accuracy"],
                           "num_examples": res["num_examples"], "logprob_margin": res["logprob_margin"]})
    rows = []
    for cond in conditions:
        n = sum(k for _, k in pooled[cond])
        rows.append({
            "condition": cond,
            "accuracy": sum(r["accuracy"] * k for r, k in pooled[cond]) / n,
            "chance": 0.5,
            "num_examples": n,
            "always_a_accuracy": sum(r["always_a_accuracy"] * k for r, k in pooled[cond]) / n,
            "logprob_margin": sum(r["logprob_margin"] * k for r, k in pooled[cond]) / n,
        })
    settings = {"num_examples_per_document": num_examples, "excerpt_words": excerpt_words, "segment_words": segment_words,
                "conditions": conditions, "min_distance": min_distance, "max_distance": max_distance, "chunk": chunk,
                "seed": seed, "documents": [n for n, _ in texts]}
    return {"rows": rows, "by_document": by_doc, "settings": settings}


# ---------------------------------------------------------------------------------------------
# MQAR
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_mqar(
    model: Any,
    settings: Sequence[tuple[int, int]] = ((64, 4), (128, 8), (256, 16), (512, 64)),
    num_examples: int = 1000,
    *,
    vocab_size: int | None = None,
    power_a: float = 0.01,
    random_non_queries: bool = False,
    seed: int = 1,
    batch_size: int = 64,
) -> dict[str, Any]:
    """MQAR accuracy of a model trained on MQAR, at each ``(seq_len, num_kv_pairs)``.

    Examples come from :func:`~mnemotorch.tasks.synthetic.multiquery_ar` (Zoology semantics);
    ``seed=1`` matches the test sets of ``mnemo experiment`` (data seed + 1). The prediction at a
    query is the argmax of the logits there (token accuracy over queries; sequence accuracy: all
    queries of an example right).

    Args:
        vocab_size: MQAR's ``V``; default the model's vocabulary (the experiment runner builds
            models with ``vocab_size = V``).
    """
    from ..tasks.synthetic import multiquery_ar

    em = _as_eval_model(model)
    V = em.vocab_size if vocab_size is None else _check_pos(vocab_size, "vocab_size")
    if V > em.vocab_size:
        raise EvalError(f"MQAR vocab_size {V} exceeds the model's vocabulary ({em.vocab_size})")
    num_examples = _check_pos(num_examples, "num_examples")
    rows = []
    for seq_len, pairs in settings:
        try:
            x, y = multiquery_ar(num_examples, int(seq_len), int(pairs), V, power_a, random_non_queries, seed)
        except (ValueError, TypeError) as err:
            raise EvalError(f"MQAR (L={seq_len}, N={pairs}): {err}") from err
        tok_right = tok_total = seq_right = 0
        for lo in range(0, num_examples, batch_size):
            xb, yb = x[lo:lo + batch_size].to(em.device), y[lo:lo + batch_size].to(em.device)
            mask = yb != -100
            if em.kind == "mnemo":  # the head only at the queries: V x L logits per row add up
                hidden = em.model.model(input_ids=xb).last_hidden_state
                pred = em.model.lm_head(hidden[mask]).argmax(-1)
            else:
                logits, _ = em.forward(xb)
                pred = logits[mask].argmax(-1)
            right = torch.zeros_like(mask)
            right[mask] = pred == yb[mask]
            tok_right += int(right.sum())
            tok_total += int(mask.sum())
            seq_right += int(((right | ~mask).all(dim=1) & mask.any(dim=1)).sum())
        row = {"seq_len": int(seq_len), "num_kv_pairs": int(pairs), "vocab_size": V, "num_examples": num_examples,
               "token_accuracy": tok_right / tok_total, "sequence_accuracy": seq_right / num_examples}
        if em.kind == "mnemo":
            row["state_size"] = int(em.model.state_size(int(seq_len)))
        rows.append(row)
    return {"rows": rows, "settings": {"settings": [list(s) for s in settings], "num_examples": num_examples,
                                       "vocab_size": V, "power_a": power_a, "random_non_queries": random_non_queries, "seed": seed}}
