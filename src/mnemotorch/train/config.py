"""Training configuration: nested dataclasses, loaded from TOML or YAML with ``key=value`` overrides.

A config file mirrors the dataclasses::

    steps = 200
    batch_size = 16

    [model]                 # keyword arguments of MnemoConfig (vocab_size comes from the tokenizer)
    hidden_size = 128
    num_hidden_layers = 4
    num_attention_heads = 4

    [data]
    tokenizer = "byte"
    seq_len = 128

    [optim]
    lr = 3e-3

Overrides use dotted paths (``optim.lr=1e-3``, ``model.layer_plan=["attention","sliding_window"]``);
the value is parsed as a TOML value, then as YAML, then kept as a plain string, so ``out_dir=runs/x``
needs no quotes. Every key is checked: an unknown key or a value of the wrong type is a
``ValueError`` that names the key (and, for unknown keys, lists the valid ones).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

__all__ = ["DataConfig", "OptimConfig", "TrainConfig", "load_config", "config_from_dict", "parse_override_value"]


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes tokens."""

    #: ``None`` = bundled Tiny Shakespeare; otherwise anything ``mnemotorch.tasks.load_text`` accepts.
    source: str | None = None
    tokenizer: Literal["byte", "bpe"] = "byte"
    #: vocabulary size of a trained BPE tokenizer (ignored by the byte tokenizer).
    vocab_size: int = 1024
    #: BPE: every digit its own token (``BPETokenizer.train(split_digits=True)``).
    split_digits: bool = False
    val_fraction: float = 0.1
    seq_len: int = 128
    #: fraction of training rows replaced by needle-retrieval sequences (``NeedleMixBatches``);
    #: 0 = plain text. Validation stays plain text.
    needle_fraction: float = 0.0
    #: needle kinds mixed in (``"passkey"``, ``"number"``, ``"word"``).
    needle_kinds: list[str] = field(default_factory=lambda: ["passkey"])
    #: haystacks of the needle rows: ``"text"`` (the training text), ``"synthetic"`` (filler) or ``"both"``.
    needle_haystack: Literal["text", "synthetic", "both"] = "both"
    #: labels of needle rows: ``"needle"`` (needle, question, answer), ``"answer"`` or ``"all"``.
    needle_loss: Literal["needle", "answer", "all"] = "needle"


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    #: clip the global gradient norm to this value; 0 disables clipping (the norm is still logged).
    grad_clip: float = 1.0


def _default_model() -> dict[str, Any]:
    return {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4}


@dataclass
class TrainConfig:
    """Everything a training run needs; ``Trainer(cfg).fit()`` runs it."""

    #: keyword arguments of ``MnemoConfig`` except ``vocab_size``, which the tokenizer decides.
    model: dict[str, Any] = field(default_factory=_default_model)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    #: number of optimizer steps.
    steps: int = 200
    #: training loss: ``"token"`` = mean over labelled tokens; ``"row"`` = mean over rows of each
    #: row's token mean (``mnemotorch.train.trainer.lm_loss``), for batches mixing text rows with
    #: sparsely labelled rows such as answer-only needle rows.
    loss_normalization: Literal["token", "row"] = "token"
    #: sequences per optimizer step, summed over gradient-accumulation micro-steps and ranks.
    batch_size: int = 16
    grad_accum: int = 1
    #: evaluate every this many steps (and at the end); 0 = only at the end.
    eval_interval: int = 50
    eval_batches: int = 20
    log_interval: int = 10
    #: checkpoint every this many steps (and always at the end); 0 = only at the end.
    save_interval: int = 100
    out_dir: str = "runs/train"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: "auto" = bf16 autocast on CUDA when supported, fp32 otherwise. bf16 is never used on CPU.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    #: "auto" = DDP when launched by torchrun with WORLD_SIZE > 1, otherwise a single process.
    distributed: Literal["auto", "none", "ddp", "fsdp2"] = "auto"
    #: "auto" = continue from ``out_dir/checkpoint`` if present; "none" = start fresh; else a checkpoint path.
    resume: str = "auto"
    #: stop (and checkpoint) after this many steps as if interrupted; the schedule still spans ``steps``.
    stop_at_step: int | None = None
    #: ``torch.set_num_threads`` for CPU runs; ``None`` leaves PyTorch's default.
    num_threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/TOML friendly)."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Cross-field checks that types alone cannot express."""
        positive = {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "eval_batches": self.eval_batches,
            "log_interval": self.log_interval,
            "data.seq_len": self.data.seq_len,
            "data.vocab_size": self.data.vocab_size,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name, value in {"eval_interval": self.eval_interval, "save_interval": self.save_interval,
                            "optim.warmup_steps": self.optim.warmup_steps}.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.stop_at_step is not None and not 0 < self.stop_at_step <= self.steps:
            raise ValueError(f"stop_at_step must be in [1, steps={self.steps}] or None, got {self.stop_at_step}")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ValueError(f"num_threads must be > 0 or None, got {self.num_threads}")
        if not 0.0 < self.data.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.data.val_fraction}")
        if not 0.0 <= self.data.needle_fraction <= 1.0:
            raise ValueError(f"data.needle_fraction must be in [0, 1], got {self.data.needle_fraction}")
        from ..tasks.synthetic.needle import NEEDLE_KINDS

        bad = [k for k in self.data.needle_kinds if k not in NEEDLE_KINDS]
        if bad or not self.data.needle_kinds:
            raise ValueError(f"data.needle_kinds must be a non-empty list of {list(NEEDLE_KINDS)}, got {self.data.needle_kinds}")
        if not 0.0 <= self.optim.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.optim.min_lr_ratio}")
        for name in ("lr", "weight_decay", "grad_clip"):
            if getattr(self.optim, name) < 0 or not math.isfinite(getattr(self.optim, name)):
                raise ValueError(f"optim.{name} must be a finite number >= 0, got {getattr(self.optim, name)}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self.optim, name) < 1.0:
                raise ValueError(f"optim.{name} must be in [0, 1), got {getattr(self.optim, name)}")
        if "vocab_size" in self.model:
            raise ValueError("model.vocab_size is set from the tokenizer; remove it (use data.vocab_size for BPE)")
        if self.batch_size % self.grad_accum != 0:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")


# --------------------------------------------------------------------------------------------
# Building a TrainConfig from nested dicts, with strict key and type checks.
# --------------------------------------------------------------------------------------------


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ValueError as err:
                errors.append(err)
        raise ValueError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if value in typing.get_args(tp) and isinstance(value, str):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        # bool is an int subclass; `steps = true` is a mistake, not 1.
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return dict(value)
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(tp) or (Any,)
            return [v if item is Any else _coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    else:  # pragma: no cover - only the annotations above are used
        raise TypeError(f"{key}: unsupported annotation {tp!r}")
    raise ValueError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a table/mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        raise ValueError(
            f"unknown config key {prefix + str(unknown[0])!r}; valid keys"
            f"{' under ' + repr(prefix.rstrip('.')) if prefix else ''}: {', '.join(names)}"
        )
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        tp = hints[name]
        if _is_dataclass_type(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
            factory = defaults[name].default_factory
            if isinstance(kwargs[name], dict) and factory is not dataclasses.MISSING:
                # A partial [model] table changes only the keys it names, like the other sections.
                kwargs[name] = {**factory(), **kwargs[name]}
    return cls(**kwargs)


def _check_model_kwargs(model: dict[str, Any]) -> None:
    """Fail early (at config time) on keys that MnemoConfig would reject at model-build time."""
    try:
        from ..models import MnemoConfig
    except ImportError:  # models not importable (e.g. transformers missing): checked later
        return
    import inspect

    params = inspect.signature(MnemoConfig.__init__).parameters
    valid = [n for n, p in params.items() if n not in ("self", "vocab_size") and p.kind is p.POSITIONAL_OR_KEYWORD]
    unknown = [k for k in model if k not in valid]
    if unknown:
        raise ValueError(f"unknown config key {'model.' + unknown[0]!r}; valid keys under 'model': {', '.join(valid)}")
    try:
        MnemoConfig(vocab_size=256, **model)
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid [model] section: {err}") from err


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a nested dict (e.g. a parsed file)."""
    cfg = _build(TrainConfig, values, "")
    cfg.validate()
    _check_model_kwargs(cfg.model)
    return cfg


def _tomllib() -> Any:
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib


def parse_override_value(text: str) -> Any:
    """Parse the value of ``key=value`` as TOML, then YAML, else keep the raw string."""
    tomllib = _tomllib()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        import yaml

        value = yaml.safe_load(text)
        # YAML turns "a: b" into a mapping and "" into None; for a CLI value the string is meant.
        if value is None and text.strip().lower() not in ("null", "~", "none"):
            return text
        if isinstance(value, (dict,)) and ":" in text and not text.strip().startswith("{"):
            return text
        return value
    except Exception:  # noqa: BLE001 - any YAML failure means "not YAML": keep the string
        return text


def _apply_override(values: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like key=value (e.g. optim.lr=1e-3)")
    key, raw = override.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    value = parse_override_value(raw.strip())
    if key == "resume" and value is None:
        value = "none"
    node = values
    cls: type | None = TrainConfig
    for i, part in enumerate(parts[:-1]):
        hints = typing.get_type_hints(cls) if cls is not None else {}
        valid = [f.name for f in dataclasses.fields(cls)] if cls is not None else []
        if cls is not None and part not in valid:
            raise ValueError(f"unknown config key {'.'.join(parts[: i + 1])!r} in override {override!r}; valid keys: {', '.join(valid)}")
        tp = hints.get(part)
        if cls is not None and not (_is_dataclass_type(tp) or typing.get_origin(tp) is dict or tp is dict):
            raise ValueError(f"config key {'.'.join(parts[: i + 1])!r} is not a section; cannot set {key!r}")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"config key {'.'.join(parts[: i + 1])!r} is not a section; cannot set {key!r}")
        cls = tp if _is_dataclass_type(tp) else None  # inside `model` any key is passed to MnemoConfig
    node[parts[-1]] = value


def _read_file(path: Path) -> dict[str, Any]:
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".toml":
        tomllib = _tomllib()

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: invalid TOML: {err}") from err
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: invalid YAML: {err}") from err
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level of a config must be a mapping, got {type(data).__name__}")
        return data
    if suffix == ".json":
        return json.loads(text)
    raise ValueError(f"{path}: unknown config format {suffix!r}; use .toml, .yaml/.yml or .json")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load a :class:`TrainConfig` from a TOML/YAML file (or defaults when ``path`` is None).

    Args:
        path: ``.toml``, ``.yaml``/``.yml`` (or ``.json``) file; ``None`` = all defaults.
        overrides: ``"a.b=value"`` strings applied after the file, in order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown key (message names it and lists the valid keys), wrong type
            (message names the field and the expected type), or an invalid value.
    """
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist")
        values = _read_file(p)
    for override in overrides:
        _apply_override(values, override)
    return config_from_dict(values)
