"""``mnemo experiment CONFIG``: sweeps of mixers x widths x learning rates x task settings.

Every *cell* (one task setting, one mixer, one width, one learning rate) trains a fresh
:class:`~mnemotorch.models.MnemoForCausalLM` for a fixed number of steps (AdamW, linear warm-up
then cosine decay; bf16 autocast on CUDA) and measures accuracy on held-out examples. As in
Zoology (Arora et al. 2023), the reported number of a (setting, mixer, width) group is its
accuracy at the *best* learning rate. A cell that raises is recorded as failed, with its error,
and the sweep goes on. Results are written after every cell to ``<out_dir>/<name>.json``; running
again skips the cells already there (same cell id and same cell settings), so a sweep can be
split over several runs (``time_budget_s``). A Markdown table (``<name>.md``) and two plots
(``<name>_state_size.png``: accuracy vs. state size, ``<name>_seq_len.png``: accuracy vs.
sequence length) are rewritten at the end of each run. ``quick=True`` merges the config's
``quick:`` section over it and writes ``<name>-quick.*``, so toy runs never overwrite real ones.

Config (YAML, TOML or JSON file, or a dict)::

    experiment: mqar                      # output file stem
    description: free text for the report
    task: mqar                            # a name in mnemotorch.tasks.synthetic.TASKS
    task_params: {vocab_size: 8192}       # shared by every setting
    settings:                             # the task-setting axis; other keys are task params
      - {seq_len: 64, num_kv_pairs: 4, batch_size: 256}    # batch_size/steps/eval_batch_size override train:
      - {length: 512, eval: [{length: 1024}, {length: 2048}]}  # extra test sets (e.g. longer ones)
    data: {num_train: 100000, num_test: 3000, seed: 0}     # test examples use seed + 1
    model: {num_hidden_layers: 2, num_attention_heads: 1, intermediate_size: 0}   # other MnemoConfig fields
    mixers:                               # name -> layer plan (a mixer spec, or a list of specs)
      attention: attention
      sliding_window: {type: sliding_window, window: 16}
      landmark: {type: landmark, mode: exact, test_mode: {mode: retrieval, top_k: 4}}
                                          # test_mode (optional, per spec): after training and before
                                          # scoring, the layers built from that spec switch mode with
                                          # their mixer's set_mode(**test_mode) (mixers without set_mode
                                          # are rejected); not passed to the constructor
      landmark_tokens: {type: landmark, block_len: 50, landmark_tokens: true}
                                          # landmark_tokens (optional, landmark specs only): insert a
                                          # dedicated landmark token after every block_len ordinary
                                          # tokens of every batch, in training and at every test
                                          # length (see below); not passed to the constructor
    widths: [64, 128]                     # hidden_size
    learning_rates: [1.0e-4, 1.0e-3]
    train: {steps: 1000, batch_size: 64, eval_batch_size: 256, warmup_fraction: 0.1,
            weight_decay: 0.1, betas: [0.9, 0.98], min_lr_ratio: 0.0, grad_clip: 1.0,
            seed: 0, device: auto, precision: auto, cpu_threads: null,
            length_jitter: 0}             # precision: auto (bf16 autocast on CUDA) | bf16 | fp32
                                          # cpu_threads: torch threads on CPU (1 is fastest for
                                          # toy models on a busy machine)
                                          # length_jitter: P > 0 trains each step at one length
                                          # L - r, r uniform in [0, P) (see below)
    exclude:                              # optional: holes in the grid (a budget); each entry leaves
      - {mixer: moneta, width: 128}       # out every cell that matches all of its keys (mixer, width,
      - {mixer: [titans_mac, titans_mag], width: 160, lr: 3.0e-3}   # lr, setting = its label; a value
                                          # or a list). An entry that matches no cell is an error.
    anchors: [{mixer: attention, accuracy: 1.0, source: Zoology}]   # published numbers, shown in the report
    quick: {...}                          # overrides merged in by quick=True (mappings merge key
                                          # by key; lists and 'mixers' are replaced)

Accuracy is token accuracy over labelled positions (MQAR, copying) or exact match of the whole
answer (needle / passkey), as the task says. State size is ``model.state_size(seq_len)``: elements
of mixer state per sequence summed over layers (Zoology's accounting, see the Mixer protocol).

Length jitter (``train: {length_jitter: P}``, an int >= 0, default 0: every training batch at the
setting's length ``L``). With ``P > 0`` the training examples are built at the ``P`` lengths
``L - r``, ``r = 0 .. P-1`` (``data.num_train`` examples in all, split evenly; the examples of
length ``L - r`` with seed ``data.seed + 2 + r``, the test sets keep ``data.seed + 1``), each whole
at its length (the needle task fits the haystack around the instruction, needle, question and
answer: nothing is cropped), and every training step draws ``r`` uniformly and takes its batch from
that length (one length per batch, so batches stay rectangular; deterministic given ``train.seed``).
Test sets and lengths are unchanged. Why: a model trained at one length sees the question and the
answer at one fixed offset inside the block grid of a block-structured mixer and can learn that
offset -- on an H100, passkey trained at 512 bytes, landmark attention (50-token blocks, top-4
retrieval) scored 0.0 at every test length off 512's phase mod 50 (498, 546, 542, 534) but
0.935-0.96 at 2062 / 4112 / 8212 / 16362 (= 512 mod 50), and hcam without positions (32-token chunks)
0.875-0.925 at 2K-16K (multiples of 32) but 0.435 at 2064 and 0.075 at 16362
(configs/passkey_routed_phase.yaml); ``P`` at least the block length covers every phase. Supported
for the tasks with a free length parameter (``needle`` and ``passkey``: ``length``; others raise a
ValueError); ``P`` must be below every setting's length and at most ``data.num_train``. The cell
JSON records ``length_jitter`` and ``train_lengths`` (shortest, longest); a nonzero value is part of
the cell fingerprint (0 leaves the fingerprints of earlier results unchanged).

Landmark tokens (``landmark_tokens: true``; Mohtashami & Jaggi 2023). The ``landmark`` mixer reads
its layout from absolute positions: position ``p`` is a landmark iff ``p % (l + 1) == l``, with
``l`` its ``block_len`` (the paper's 50). With the option, the runner gives the model a dedicated
landmark token (id = the task's ``vocab_size``, so it collides with no task token and the model's
vocabulary grows by one) and inserts it after every ``l`` tokens of every batch
(:func:`~mnemotorch.ops.landmark.insert_landmarks`), in training and at every test length. Labels
move with their tokens (:func:`~mnemotorch.ops.landmark.labels_with_landmarks`): the label of
original token ``t`` sits at ``t + t // l`` and landmarks carry none, so the loss and the scores
cover exactly the same original positions as for the other models (the token before a landmark
still predicts the next ordinary token). A task of ``L`` tokens becomes ``L + L // l`` positions;
a cell's ``seq_len`` stays the task's ``L``, its ``state_size`` is taken at the longer input
(``input_len`` in the cell JSON). Every landmark layer of such a plan must set the option and share
one ``block_len``; on any other mixer it is an error. Without it the task's tokens go in unchanged
and every ``(l + 1)``-th ordinary token serves as the landmark slot. The cell JSON records
``landmark_tokens`` (block length, token id) and ``vocab_size``; the option is part of the cell
fingerprint, so results from before it are not reused.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_OUT_DIR", "load_experiment_config", "main_experiment", "plan_cells", "run_experiment"]

#: Where results go unless ``out_dir`` says otherwise (relative to the working directory).
DEFAULT_OUT_DIR = "docs/results"

_TOP_KEYS = {
    "experiment", "description", "task", "task_params", "settings", "data", "model", "mixers",
    "widths", "learning_rates", "train", "anchors", "exclude", "quick",
}
_REQUIRED = ("experiment", "task", "settings", "mixers", "widths", "learning_rates")
_TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 1000,
    "batch_size": 64,
    "eval_batch_size": 256,
    "warmup_fraction": 0.1,
    "weight_decay": 0.1,
    "betas": [0.9, 0.98],
    "min_lr_ratio": 0.0,
    "grad_clip": 1.0,
    "seed": 0,
    "device": "auto",
    "precision": "auto",
    "cpu_threads": None,
    "length_jitter": 0,
}
#: Tasks whose training length ``train.length_jitter`` varies: task name -> its length parameter.
#: Only tasks that build a whole example at any length (the needle builder fits the haystack around
#: the instruction, needle, question and answer); MQAR, for one, needs even lengths.
_JITTER_LENGTH_PARAM = {"needle": "length", "passkey": "length"}
_PRECISIONS = ("auto", "bf16", "fp32")
_DATA_DEFAULTS: dict[str, Any] = {"num_train": 10_000, "num_test": 1_000, "seed": 0}
# Keys of a setting (or an eval entry) that are not task parameters.
_SETTING_TRAIN_KEYS = {"steps", "batch_size", "eval_batch_size"}
_SETTING_META_KEYS = {"label", "eval"}
_EVAL_META_KEYS = {"label", "eval_batch_size", "num_test"}


# ----------------------------------------------------------------------------------------------
# config


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"experiment config {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    elif suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        data = tomllib.loads(text)
    elif suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"experiment config {str(path)!r}: expected a .yaml, .yml, .toml or .json file")
    if not isinstance(data, dict):
        raise ValueError(f"experiment config {str(path)!r} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: dicts merge recursively, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_experiment_config(config: dict[str, Any] | str | os.PathLike[str], quick: bool = False) -> dict[str, Any]:
    """Read and validate an experiment config; with ``quick`` merge its ``quick:`` section in.

    Returns the resolved config: defaults filled in (``train``, ``data``, ``model``), ``quick``
    replaced by a bool, and with ``quick`` the name suffixed ``-quick``.

    Raises:
        ValueError: unknown or missing keys, empty axes, malformed settings or mixers.
    """
    raw = copy.deepcopy(config) if isinstance(config, dict) else _read_config_file(Path(config))
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"experiment config: unknown key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}")
    quick_section = raw.pop("quick", None) or {}
    if not isinstance(quick_section, dict):
        raise ValueError(f"experiment config: 'quick' must be a mapping of overrides, got {type(quick_section).__name__}")
    if quick:
        bad = sorted(set(quick_section) - (_TOP_KEYS - {"quick"}))
        if bad:
            raise ValueError(f"experiment config: unknown key(s) {bad} in 'quick'")
        # Mappings of settings (task_params, data, model, train) merge key by key; 'mixers' is the
        # list of what to compare, so the quick section's replaces it (as lists are replaced).
        raw = _deep_merge(raw, {k: v for k, v in quick_section.items() if k != "mixers"})
        if "mixers" in quick_section:
            raw["mixers"] = copy.deepcopy(quick_section["mixers"])
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ValueError(f"experiment config: missing required key(s) {missing}")
    cfg: dict[str, Any] = {
        "experiment": str(raw["experiment"]) + ("-quick" if quick else ""),
        "description": str(raw.get("description", "")),
        "task": raw["task"],
        "task_params": dict(raw.get("task_params") or {}),
        "settings": raw["settings"],
        "data": _with_defaults(raw.get("data"), _DATA_DEFAULTS, "data"),
        # MnemoConfig's own defaults apply to what the config leaves out (hidden_size and
        # vocab_size come from the sweep and the task).
        "model": dict(raw.get("model") or {}),
        "mixers": raw["mixers"],
        "widths": raw["widths"],
        "learning_rates": raw["learning_rates"],
        "train": _with_defaults(raw.get("train"), _TRAIN_DEFAULTS, "train"),
        "anchors": raw.get("anchors") or [],
        "exclude": raw.get("exclude") or [],
        "quick": bool(quick),
    }
    from ..tasks.synthetic import TASKS

    if cfg["task"] not in TASKS:
        raise ValueError(f"experiment config: unknown task {cfg['task']!r}; tasks: {sorted(TASKS)}")
    name = cfg["experiment"]
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"experiment config: 'experiment' must be a plain file stem, got {name!r}")
    if not isinstance(cfg["settings"], list) or not cfg["settings"] or not all(isinstance(s, dict) for s in cfg["settings"]):
        raise ValueError("experiment config: 'settings' must be a non-empty list of mappings (task parameters)")
    for i, s in enumerate(cfg["settings"]):
        evals = s.get("eval", [])
        if not isinstance(evals, list) or not all(isinstance(e, dict) for e in evals):
            raise ValueError(f"experiment config: settings[{i}].eval must be a list of mappings (task-parameter overrides)")
    if not isinstance(cfg["mixers"], dict) or not cfg["mixers"]:
        raise ValueError("experiment config: 'mixers' must be a non-empty mapping name -> layer plan")
    for mixer, plan in cfg["mixers"].items():
        # validates the landmark_tokens and test_mode entries
        _split_test_mode(str(mixer), _split_landmark_tokens(str(mixer), plan)[0])
    for key in ("widths", "learning_rates"):
        values = cfg[key]
        if not isinstance(values, list) or not values:
            raise ValueError(f"experiment config: '{key}' must be a non-empty list")
    for w in cfg["widths"]:
        if isinstance(w, bool) or not isinstance(w, int) or w <= 0:
            raise ValueError(f"experiment config: widths must be positive ints, got {w!r}")
    cfg["learning_rates"] = [float(lr) for lr in cfg["learning_rates"]]
    if not all(lr > 0 and math.isfinite(lr) for lr in cfg["learning_rates"]):
        raise ValueError(f"experiment config: learning_rates must be positive, got {cfg['learning_rates']}")
    if cfg["train"]["precision"] not in _PRECISIONS:
        raise ValueError(f"experiment config: train.precision must be one of {list(_PRECISIONS)}, got {cfg['train']['precision']!r}")
    _check_length_jitter(cfg)
    reserved = sorted({"hidden_size", "vocab_size", "layer_plan"} & set(cfg["model"]))
    if reserved:
        raise ValueError(f"experiment config: model.{reserved[0]} is set by the sweep (widths / task / mixers), remove it from 'model'")
    if not isinstance(cfg["anchors"], list):
        raise ValueError("experiment config: 'anchors' must be a list of mappings")
    cfg["exclude"] = _check_exclude(cfg["exclude"])
    return cfg


def _check_length_jitter(cfg: dict[str, Any]) -> None:
    """Validate ``train.length_jitter`` of a resolved config (see the module docstring).

    Raises:
        ValueError: not an int >= 0; > 0 for a task without a free length parameter, with fewer
            training examples than lengths, or not below a setting's length.
    """
    p = cfg["train"]["length_jitter"]
    if isinstance(p, bool) or not isinstance(p, int) or p < 0:
        raise ValueError(f"experiment config: train.length_jitter must be an int >= 0 (0: no jitter), got {p!r}")
    if p == 0:
        return
    param = _JITTER_LENGTH_PARAM.get(cfg["task"])
    if param is None:
        raise ValueError(
            f"experiment config: train.length_jitter={p} is not supported for task {cfg['task']!r}; it needs a task "
            f"that builds whole examples at any length ({', '.join(sorted(_JITTER_LENGTH_PARAM))}); use 0"
        )
    for i, setting in enumerate(cfg["settings"]):
        length = {**cfg["task_params"], **setting}.get(param)
        if isinstance(length, int) and not isinstance(length, bool) and p >= length:
            raise ValueError(
                f"experiment config: train.length_jitter={p} must be smaller than settings[{i}].{param}={length} "
                f"(training lengths are {param} - r, 0 <= r < length_jitter)"
            )
    num_train = cfg["data"]["num_train"]
    if isinstance(num_train, int) and num_train < p:
        raise ValueError(
            f"experiment config: train.length_jitter={p} splits the training examples over {p} lengths, "
            f"so data.num_train ({num_train}) must be at least {p}"
        )

_EXCLUDE_KEYS = ("mixer", "width", "lr", "setting")


def _check_exclude(entries: Any) -> list[dict[str, list[Any]]]:
    """The ``exclude`` entries with every value as a list (learning rates as floats)."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) and e for e in entries):
        raise ValueError(f"experiment config: 'exclude' must be a list of non-empty mappings with keys {list(_EXCLUDE_KEYS)}, got {entries!r}")
    out = []
    for e in entries:
        unknown = sorted(set(e) - set(_EXCLUDE_KEYS))
        if unknown:
            raise ValueError(f"experiment config: exclude entry {e!r} has unknown key(s) {unknown}; allowed: {list(_EXCLUDE_KEYS)}")
        entry = {k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in e.items()}
        try:
            if "lr" in entry:
                entry["lr"] = [float(x) for x in entry["lr"]]
            if "width" in entry and not all(isinstance(w, int) and not isinstance(w, bool) for w in entry["width"]):
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"experiment config: exclude entry {e!r}: width must be ints and lr numbers") from None
        out.append(entry)
    return out


def _excluded(entry: dict[str, list[Any]], setting_label: str, mixer: str, width: int, lr: float) -> bool:
    """Whether one ``exclude`` entry matches a cell: every key it has holds the cell's value."""
    return (
        ("mixer" not in entry or mixer in entry["mixer"])
        and ("width" not in entry or width in entry["width"])
        and ("lr" not in entry or any(math.isclose(lr, x, rel_tol=1e-9) for x in entry["lr"]))
        and ("setting" not in entry or setting_label in [str(x) for x in entry["setting"]])
    )


def _with_defaults(section: Any, defaults: dict[str, Any], name: str) -> dict[str, Any]:
    section = dict(section or {})
    unknown = sorted(set(section) - set(defaults))
    if unknown:
        raise ValueError(f"experiment config: unknown key(s) {unknown} in '{name}'; allowed: {sorted(defaults)}")
    return {**defaults, **section}


def _split_landmark_tokens(mixer: str, plan: Any) -> tuple[Any, int | None]:
    """``(plan without landmark_tokens entries, l)`` of one mixer's layer plan: ``l`` is the
    ``block_len`` of its landmark layers when they ask for landmark tokens, else ``None``.

    Raises:
        ValueError: ``landmark_tokens`` that is not a bool or is set on a mixer without the landmark
            layout; in a plan with landmark tokens, a landmark layer that does not set it (the tokens
            are in the input every layer sees) or landmark layers with different ``block_len``.
    """
    from ..layers import list_mixers, mixer_class, mixer_kwargs
    from ..layers.landmark import LandmarkAttention

    def where(j: int) -> str:
        return f"experiment config: mixers.{mixer}" + (f"[{j}]" if isinstance(plan, list) else "")

    def is_landmark(name: Any) -> bool:
        return isinstance(name, str) and name in list_mixers() and issubclass(mixer_class(name), LandmarkAttention)

    specs = plan if isinstance(plan, list) else [plan]
    stripped: list[Any] = []
    flags: list[bool] = []
    for j, spec in enumerate(specs):
        flag = False
        if isinstance(spec, dict) and "landmark_tokens" in spec:
            spec = dict(spec)
            flag = spec.pop("landmark_tokens")
            if not isinstance(flag, bool):
                raise ValueError(f"{where(j)}: landmark_tokens must be true or false, got {flag!r}")
            if flag and not is_landmark(spec.get("type")):
                landmark_mixers = ", ".join(n for n in list_mixers() if is_landmark(n))
                raise ValueError(
                    f"{where(j)}: landmark_tokens: true inserts the landmark tokens whose layout a landmark "
                    f"mixer reads (position p is a landmark iff p % (block_len + 1) == block_len); mixer "
                    f"{spec.get('type')!r} has no such layout (landmark_tokens is for: {landmark_mixers})"
                )
        stripped.append(spec)
        flags.append(flag)
    out = stripped if isinstance(plan, list) else stripped[0]
    if not any(flags):
        return out, None
    block_lens = set()
    for j, (spec, flag) in enumerate(zip(stripped, flags)):
        name = spec if isinstance(spec, str) else spec.get("type") if isinstance(spec, dict) else None
        if not is_landmark(name):
            continue
        if not flag:
            raise ValueError(
                f"{where(j)}: another layer of this plan sets landmark_tokens: true, so the landmark tokens "
                f"are in the input every layer sees; this landmark layer must set it too"
            )
        block_len = spec.get("block_len", mixer_kwargs(name)["block_len"])
        if isinstance(block_len, bool) or not isinstance(block_len, int) or block_len < 1:
            raise ValueError(f"{where(j)}: block_len must be an int >= 1, got {block_len!r}")
        block_lens.add(block_len)
    if len(block_lens) != 1:
        raise ValueError(
            f"experiment config: mixers.{mixer}: the landmark layers of a plan with landmark_tokens must share "
            f"one block_len (the tokens have one layout), got {sorted(block_lens)}"
        )
    return out, block_lens.pop()


def _split_test_mode(mixer: str, plan: Any) -> tuple[Any, list[dict[str, Any] | None] | None]:
    """``(plan without test_mode entries, test modes)`` of one mixer's layer plan.

    The test modes are one per plan entry (one for a single spec, which every layer repeats), each a
    mapping of :meth:`set_mode` arguments or ``None``; ``None`` overall when no spec has a test mode.

    Raises:
        ValueError: a test_mode that is not a mapping with a ``mode``, names arguments the mixer's
            ``set_mode`` does not take, or belongs to a mixer without ``set_mode``.
    """
    import inspect

    from ..layers import list_mixers, mixer_class

    specs = plan if isinstance(plan, list) else [plan]
    stripped: list[Any] = []
    modes: list[dict[str, Any] | None] = []
    for j, spec in enumerate(specs):
        if not isinstance(spec, dict) or "test_mode" not in spec:
            stripped.append(spec)
            modes.append(None)
            continue
        where = f"experiment config: mixers.{mixer}" + (f"[{j}]" if isinstance(plan, list) else "")
        spec = dict(spec)
        test_mode = spec.pop("test_mode")
        name = spec.get("type")
        if name not in list_mixers():
            raise ValueError(f"{where}: test_mode needs a registered mixer 'type', got {name!r}")
        setter = getattr(mixer_class(name), "set_mode", None)
        if not callable(setter):
            raise ValueError(
                f"{where}: mixer {name!r} has no set_mode method, so it cannot switch mode for the test "
                f"(test_mode is supported by: {', '.join(n for n in list_mixers() if callable(getattr(mixer_class(n), 'set_mode', None)))})"
            )
        if not isinstance(test_mode, dict) or "mode" not in test_mode:
            raise ValueError(f"{where}: test_mode must be a mapping with a 'mode' key (arguments of {name}.set_mode), got {test_mode!r}")
        allowed = list(inspect.signature(setter).parameters)[1:]  # past self
        unknown = sorted(set(test_mode) - set(allowed))
        if unknown:
            raise ValueError(f"{where}: test_mode has unknown argument(s) {unknown}; {name}.set_mode takes {allowed}")
        stripped.append(spec)
        modes.append(dict(test_mode))
    if all(m is None for m in modes):
        return plan, None
    return (stripped if isinstance(plan, list) else stripped[0]), modes


def _apply_test_mode(model: Any, test_mode: list[dict[str, Any] | None] | None, dry_run: bool = False) -> list[dict[str, Any]]:
    """Switch the layers that have a test mode (``test_mode`` from :func:`_split_test_mode`); returns
    ``[{"layer": i, "type": ..., **mode}, ...]``. ``dry_run`` switches copies of the mixers, so bad
    values fail before training rather than after it."""
    if not test_mode:
        return []
    layers = model.model.layers
    applied = []
    for i, layer in enumerate(layers):
        mode = test_mode[0] if len(test_mode) == 1 else test_mode[i]
        if mode is None:
            continue
        mixer = copy.deepcopy(layer.mixer) if dry_run else layer.mixer
        mixer.set_mode(**mode)
        applied.append({"layer": i, "type": model.config.layer_plan[i]["type"], **mode})
    return applied


# ----------------------------------------------------------------------------------------------
# cells


@dataclass
class Cell:
    """One point of the sweep."""

    setting_index: int
    setting_label: str
    task_params: dict[str, Any]
    evals: list[dict[str, Any]]
    train: dict[str, Any]
    mixer: str
    layer_plan: Any
    width: int
    lr: float
    test_mode: list[dict[str, Any] | None] | None = None  # per plan entry, applied after training
    landmark_tokens: dict[str, int] | None = None  # {"block_len": l}: a landmark token after every l tokens
    fingerprint: str = ""
    id: str = field(default="")


def _setting_label(setting: dict[str, Any]) -> str:
    if "label" in setting:
        return str(setting["label"])
    params = {k: v for k, v in setting.items() if k not in _SETTING_TRAIN_KEYS | _SETTING_META_KEYS}
    return ",".join(f"{k}={v}" for k, v in params.items()) or "default"


def _eval_label(entry: dict[str, Any]) -> str:
    if "label" in entry:
        return str(entry["label"])
    params = {k: v for k, v in entry.items() if k not in _EVAL_META_KEYS}
    return ",".join(f"{k}={v}" for k, v in params.items()) or "default"


def plan_cells(cfg: dict[str, Any]) -> list[Cell]:
    """The cells of a resolved config, in run order (setting, mixer, width, learning rate), less
    those an ``exclude`` entry matches."""
    cells = []
    exclude = cfg.get("exclude") or []
    used = [False] * len(exclude)
    for i, setting in enumerate(cfg["settings"]):
        task_params = {**cfg["task_params"], **{k: v for k, v in setting.items() if k not in _SETTING_TRAIN_KEYS | _SETTING_META_KEYS}}
        train = {**cfg["train"], **{k: v for k, v in setting.items() if k in _SETTING_TRAIN_KEYS}}
        evals = [dict(e) for e in setting.get("eval", [])]
        label = _setting_label(setting)
        for mixer, full_plan in cfg["mixers"].items():
            plan, block_len = _split_landmark_tokens(str(mixer), full_plan)
            plan, test_mode = _split_test_mode(str(mixer), plan)
            landmark_tokens = None if block_len is None else {"block_len": block_len}
            for width in cfg["widths"]:
                for lr in cfg["learning_rates"]:
                    hits = [j for j, e in enumerate(exclude) if _excluded(e, label, str(mixer), width, lr)]
                    if hits:
                        for j in hits:
                            used[j] = True
                        continue
                    cell = Cell(i, label, task_params, evals, train, str(mixer), plan, width, lr, test_mode, landmark_tokens)
                    cell.id = f"{label}|{mixer}|d={width}|lr={lr:.3g}"
                    # Everything that changes the cell's result; resuming reruns a cell whose
                    # fingerprint differs from the stored one. The device is deliberately left out.
                    payload = {
                        "task": cfg["task"], "task_params": task_params, "evals": evals, "data": cfg["data"],
                        "model": cfg["model"], "layer_plan": plan, "width": width, "lr": lr,
                        # length_jitter only when set: cells without it keep their old fingerprints
                        "train": {k: v for k, v in train.items() if k != "device" and not (k == "length_jitter" and not v)},
                    }
                    if test_mode is not None:  # only then: cells without one keep their old fingerprints
                        payload["test_mode"] = test_mode
                    if landmark_tokens is not None:  # likewise (the token id is the task's vocab_size)
                        payload["landmark_tokens"] = landmark_tokens
                    cell.fingerprint = hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
                    cells.append(cell)
    unused = [e for e, u in zip(exclude, used) if not u]
    if unused:
        raise ValueError(f"experiment config: exclude entr{'y' if len(unused) == 1 else 'ies'} {unused} match{'es' if len(unused) == 1 else ''} "
                         "no cell of the grid (check the mixer names, widths, learning rates and setting labels)")
    if not cells:
        raise ValueError("experiment config: 'exclude' leaves no cell to run")
    ids = [c.id for c in cells]
    dupes = sorted({x for x in ids if ids.count(x) > 1})
    if dupes:
        raise ValueError(f"experiment config: duplicate cells {dupes} (give settings distinct 'label's)")
    return cells


# ----------------------------------------------------------------------------------------------
# training one cell


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _lr_lambda(steps: int, warmup: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _to_device(x: torch.Tensor, labels: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids [B, L], flat positions [M], targets [M])`` on ``device`` for a CPU batch.

    The labelled positions are found on the CPU, so the GPU never waits on a boolean mask (a
    data-dependent shape would synchronise every step); pinned copies go asynchronously.
    """
    flat = (labels != -100).flatten().nonzero().squeeze(1)
    targets = labels.flatten().index_select(0, flat)
    if device.type == "cuda":
        x, flat, targets = (t.pin_memory().to(device, non_blocking=True) for t in (x, flat, targets))
    return x.to(device), flat.to(device), targets.to(device)


def _with_landmarks(x: torch.Tensor, labels: torch.Tensor, landmark: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A CPU batch ``(input_ids, aligned labels)`` with a landmark token after every ``l`` tokens
    (``landmark = (l, token id)``; ``None``: unchanged); each label moves with its token, so the same
    original positions are scored in the same order, and landmarks carry no label."""
    if landmark is None:
        return x, labels
    from ..ops.landmark import insert_landmarks, labels_with_landmarks

    block_len, landmark_id = landmark
    return insert_landmarks(x, block_len, landmark_id), labels_with_landmarks(labels, block_len)


def _masked_logits(model: Any, x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Logits ``[M, V]`` at the ``M`` labelled positions only (``flat`` indexes ``[B * L]``): a
    Zoology model has V = 8192 and L up to 512, and the head over every position would dominate
    memory and time."""
    hidden = model.model(input_ids=x).last_hidden_state
    return model.lm_head(hidden.flatten(0, 1).index_select(0, flat))


@torch.no_grad()
def _evaluate(model: Any, data: Any, batch_size: int, device: torch.device, amp: bool,
              landmark: tuple[int, int] | None = None) -> dict[str, float]:
    model.eval()
    tok_right = tok_total = seq_right = seq_total = 0
    for lo in range(0, data.input_ids.shape[0], batch_size):
        ids, y = _with_landmarks(data.input_ids[lo : lo + batch_size], data.labels[lo : lo + batch_size], landmark)
        x, flat, targets = _to_device(ids, y, device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            pred = _masked_logits(model, x, flat).argmax(-1)
        right = (pred == targets).cpu()
        mask = y != -100
        wrong = torch.zeros_like(mask)
        wrong[mask] = ~right  # row-major order, as flat was taken
        rows = mask.any(dim=1)
        tok_right += int(right.sum())
        tok_total += int(mask.sum())
        seq_right += int((rows & ~wrong.any(dim=1)).sum())
        seq_total += int(rows.sum())
    model.train()
    return {
        "token_accuracy": tok_right / tok_total if tok_total else float("nan"),
        "sequence_accuracy": seq_right / seq_total if seq_total else float("nan"),
    }


def _train_and_eval(cell: Cell, cfg: dict[str, Any], train_sets: list[Any], tests: list[tuple[str, Any, int]], device: torch.device) -> dict[str, Any]:
    """Train and score one cell; ``train_sets`` are the training examples, one set per training
    length (one set unless ``train.length_jitter`` > 0, see :func:`_make_train_sets`)."""
    from ..layers.routing import routing_aux_loss, routing_layers, update_routing_centroids
    from ..models import MnemoConfig, MnemoForCausalLM

    t = cell.train
    torch.manual_seed(int(t["seed"]))
    train_data = train_sets[0]
    vocab_size, landmark = train_data.vocab_size, None
    if cell.landmark_tokens is not None:
        # a dedicated token: the first id past the task's vocabulary (the model's grows by one)
        landmark = (int(cell.landmark_tokens["block_len"]), int(train_data.vocab_size))
        vocab_size += 1
        top = max(int(d.input_ids.max()) for d in list(train_sets) + [data for _, data, _ in tests])
        if top >= landmark[1]:
            raise ValueError(f"landmark_tokens: the task's data holds token id {top} >= its vocab_size {landmark[1]}, the landmark token's id")
    config = MnemoConfig(vocab_size=vocab_size, hidden_size=cell.width, layer_plan=cell.layer_plan, **cfg["model"])
    model = MnemoForCausalLM(config).to(device)
    if landmark is not None:
        from ..layers.landmark import LandmarkAttention

        found = sorted({m.block_len for m in model.modules() if isinstance(m, LandmarkAttention)})
        if found != [landmark[0]]:  # the tokens' layout must be the one every landmark layer reads
            raise ValueError(f"landmark_tokens: tokens inserted every {landmark[0]} tokens, but the model's landmark layers have block_len {found}")
    _apply_test_mode(model, cell.test_mode, dry_run=True)  # a bad test mode fails now, not after training
    amp = t["precision"] == "bf16" or (t["precision"] == "auto" and device.type == "cuda")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norms: weight decay would pull them to 0
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": float(t["weight_decay"])}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cell.lr, betas=tuple(t["betas"]), fused=device.type == "cuda",
    )
    steps, batch_size = int(t["steps"]), int(t["batch_size"])
    warmup = max(1, int(round(float(t["warmup_fraction"]) * steps)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(steps, warmup, float(t["min_lr_ratio"])))
    # One epoch order per training set; with one set (no length_jitter) exactly the draws of a
    # single set, so the batches are those of a runner without the option.
    sizes = [int(d.input_ids.shape[0]) for d in train_sets]
    gen = torch.Generator().manual_seed(int(t["seed"]))
    orders = [torch.randperm(n, generator=gen) for n in sizes]
    positions = [0] * len(sizes)
    lengths = [d.seq_len for d in train_sets]
    losses: list[float] = []
    loss_sum = torch.zeros((), device=device)
    start = time.perf_counter()
    model.train()
    has_routing = bool(routing_layers(model))
    for step in range(steps):
        # length_jitter: each step's batch comes from one training length, drawn uniformly
        b = 0 if len(train_sets) == 1 else int(torch.randint(len(train_sets), (1,), generator=gen))
        data, n, pos = train_sets[b], sizes[b], positions[b]
        if pos + batch_size > n:  # epochs: a fresh permutation once the current one is used up
            orders[b], pos = torch.randperm(n, generator=gen), 0
        idx = orders[b][pos : pos + batch_size] if batch_size <= n else torch.randint(0, n, (batch_size,), generator=gen)
        positions[b] = pos + batch_size
        ids, y = _with_landmarks(data.input_ids[idx], data.labels[idx], landmark)
        if landmark is not None and step == 0:
            from ..ops.landmark import check_landmarks

            check_landmarks(ids, *landmark)  # the layout the landmark layers read (by construction)
        x, flat, targets = _to_device(ids, y, device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = _masked_logits(model, x, flat)
        loss = F.cross_entropy(logits.float(), targets)
        # routing layers: their commitment loss joins the backward and their centroids take one
        # online k-means step after the optimiser's, as in mnemotorch.train (the logged loss stays the task's)
        (loss + routing_aux_loss(model) if has_routing else loss).backward()
        if t["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(t["grad_clip"]))
        optimizer.step()
        if has_routing:
            update_routing_centroids(model)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        # Averaged over windows and read rarely: .item() every step would sync the GPU.
        if (step + 1) % max(1, steps // 20) == 0 or step + 1 == steps:
            window = (step % max(1, steps // 20)) + 1
            losses.append(float(loss_sum) / window)
            loss_sum.zero_()
    train_seconds = time.perf_counter() - start
    # e.g. landmark attention: trained with the exact grouped softmax, scored in retrieval mode
    test_modes = _apply_test_mode(model, cell.test_mode)
    metric = tests[0][1].metric
    results = []
    for label, data, eval_bs in tests:
        acc = _evaluate(model, data, eval_bs, device, amp, landmark)
        # seq_len: the task's tokens (the comparison's axis); the model reads input_len positions
        input_len = data.seq_len if landmark is None else data.seq_len + data.seq_len // landmark[0]
        results.append({
            "label": label, "seq_len": data.seq_len, "state_size": int(model.state_size(input_len)),
            "accuracy": acc[metric], "token_accuracy": acc["token_accuracy"], "num_examples": int(data.input_ids.shape[0]),
            **({"input_len": input_len} if landmark is not None else {}),
        })
    main = results[0]
    final_loss = losses[-1] if losses else float("nan")
    return {
        "status": "ok",
        "precision": "bf16 autocast" if amp else "fp32",
        "metric": metric,
        "accuracy": main["accuracy"],
        "token_accuracy": main["token_accuracy"],
        "seq_len": main["seq_len"],
        "state_size": main["state_size"],
        **({"input_len": main["input_len"]} if landmark is not None else {}),
        "evals": results[1:],
        "final_loss": final_loss,
        "diverged": not math.isfinite(final_loss),
        "loss_curve": losses,
        "params": sum(p.numel() for p in model.parameters()),
        "vocab_size": vocab_size,
        **({"landmark_tokens": {"block_len": landmark[0], "landmark_id": landmark[1]}} if landmark is not None else {}),
        "steps": steps,
        "batch_size": batch_size,
        # length_jitter: the shortest and longest training length (the tests' lengths are the setting's)
        **({"length_jitter": int(t["length_jitter"]), "train_lengths": [min(lengths), max(lengths)]} if int(t["length_jitter"]) else {}),
        "train_seconds": round(train_seconds, 3),
        **({"test_mode_layers": test_modes} if test_modes else {}),
    }


# ----------------------------------------------------------------------------------------------
# the sweep


def _environment(device: torch.device) -> dict[str, Any]:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device), "platform": platform.platform()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    # Write-then-rename: a run killed mid-write never leaves a truncated results file behind.
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def _finite_or_none(x: Any) -> Any:
    return x if not isinstance(x, float) or math.isfinite(x) else None


def _make_train_sets(task: str, data: dict[str, Any], task_params: dict[str, Any], jitter: int) -> list[Any]:
    """The training examples, as a list of ``TaskData`` of one length each.

    ``jitter`` = 0: one set of ``data.num_train`` examples at the setting's length (seed
    ``data.seed``). ``jitter`` = P > 0: P sets at lengths ``L - r``, ``r = 0 .. P-1``, with
    ``data.num_train`` examples in all (split as evenly as possible), set ``r`` built with seed
    ``data.seed + 2 + r`` (the test sets use ``data.seed + 1``). Each example is built whole at its
    length by the task (needle, question and answer included; nothing is cropped).
    """
    from ..tasks.synthetic import make_task

    num_train, seed = int(data["num_train"]), int(data["seed"])
    if jitter == 0:
        return [make_task(task, num_train, seed=seed, **task_params)]
    param = _JITTER_LENGTH_PARAM[task]
    length = int(task_params[param])
    sets = []
    for r in range(jitter):
        try:
            sets.append(make_task(task, num_train // jitter + (r < num_train % jitter), seed=seed + 2 + r,
                                  **{**task_params, param: length - r}))
        except ValueError as err:
            raise ValueError(f"train.length_jitter={jitter}: the training examples at {param}={length - r}: {err}") from err
    return sets


class _DataCache:
    """Task data for the current setting (a setting's cells share their train and test sets)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.key: Any = None
        self.value: Any = None

    def get(self, cell: Cell) -> tuple[Any, list[tuple[str, Any, int]]]:
        from ..tasks.synthetic import make_task

        key = json.dumps([cell.task_params, cell.evals, cell.train["length_jitter"]], sort_keys=True, default=str)
        if key != self.key:
            self.key, self.value = None, None  # free the previous setting's data first
            d, task = self.cfg["data"], self.cfg["task"]
            train = _make_train_sets(task, d, cell.task_params, int(cell.train["length_jitter"]))
            test_seed = int(d["seed"]) + 1
            tests = [("test", make_task(task, int(d["num_test"]), seed=test_seed, **cell.task_params), int(cell.train["eval_batch_size"]))]
            for entry in cell.evals:
                params = {**cell.task_params, **{k: v for k, v in entry.items() if k not in _EVAL_META_KEYS}}
                n = int(entry.get("num_test", d["num_test"]))
                bs = int(entry.get("eval_batch_size", cell.train["eval_batch_size"]))
                tests.append((_eval_label(entry), make_task(task, n, seed=test_seed, **params), bs))
            self.key, self.value = key, (train, tests)
        return self.value


def run_experiment(
    config: dict[str, Any] | str | os.PathLike[str],
    quick: bool = False,
    out_dir: str | os.PathLike[str] = DEFAULT_OUT_DIR,
    device: str | None = None,
    time_budget_s: float | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    only: Sequence[str] | None = None,
    report_only: bool = False,
) -> dict[str, Any]:
    """Run (or resume) a sweep and write ``<out_dir>/<name>.json``, ``.md`` and the plots.

    Args:
        config: a config path (YAML/TOML/JSON) or dict; see the module docstring.
        quick: merge the config's ``quick:`` section (toy sizes) and name the outputs ``<name>-quick``.
        out_dir: output folder (created).
        device: ``"cpu"``, ``"cuda"``, ...; default the config's ``train.device`` (``"auto"``:
            CUDA when available).
        time_budget_s: start no new cell after this many seconds (the results say
            ``"complete": false``; run again to continue).
        retry_failed: rerun cells recorded as failed (by default every recorded cell is skipped).
        progress: show a tqdm bar over cells.
        only: run only the cells whose id (``"<setting>|<mixer>|d=<width>|lr=<lr>"``) contains
            every one of these substrings, e.g. ``["seq_len=256", "|attention|"]``; the report
            still covers the whole sweep (other cells show as not run yet).
        report_only: run nothing; rewrite the Markdown report and plots from the stored JSON
            (keeping its recorded environment — e.g. after copying results back from a GPU machine).

    Returns:
        The results dict written to the JSON file, with ``"ran"``, ``"skipped"`` (cell counts of
        this run) added.
    """
    from . import report

    cfg = load_experiment_config(config, quick=quick)
    cells = plan_cells(cfg)
    dev = _resolve_device(device if device is not None else cfg["train"]["device"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{cfg['experiment']}.json"
    stored: dict[str, Any] = {}
    stored_env: dict[str, Any] | None = None
    if json_path.is_file():
        try:
            previous = json.loads(json_path.read_text(encoding="utf-8"))
            stored, stored_env = previous.get("cells", {}), previous.get("environment")
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"{str(json_path)!r} exists but is not a results file ({err}); move it away to start afresh") from None
    elif report_only:
        raise FileNotFoundError(f"report_only: no results file {str(json_path)!r} to report on")

    def done(cell: Cell) -> bool:
        rec = stored.get(cell.id)
        if not rec or rec.get("fingerprint") != cell.fingerprint:
            return False
        return rec.get("status") == "ok" or not retry_failed

    results: dict[str, Any] = {
        "experiment": cfg["experiment"],
        "description": cfg["description"],
        "task": cfg["task"],
        "quick": cfg["quick"],
        "config": cfg,
        "environment": stored_env if report_only and stored_env else _environment(dev),
        "cells": stored,
    }
    todo = [] if report_only else [c for c in cells if not done(c) and all(part in c.id for part in (only or ()))]
    skipped = sum(done(c) for c in cells)
    cache = _DataCache(cfg)
    t0 = time.perf_counter()
    ran = 0
    threads = torch.get_num_threads()
    if dev.type == "cpu" and cfg["train"]["cpu_threads"]:
        torch.set_num_threads(int(cfg["train"]["cpu_threads"]))
    try:
        ran = _run_cells(todo, cfg, cache, dev, stored, results, json_path, t0, time_budget_s, progress)
    finally:
        torch.set_num_threads(threads)
    current = [stored[c.id] for c in cells if c.id in stored and stored[c.id].get("fingerprint") == c.fingerprint]
    results["complete"] = len(current) == len(cells)
    results["best"] = report.best_cells(current)
    _write_json(json_path, results)
    report.write_report(results, cells, out)
    results["ran"], results["skipped"] = ran, skipped
    return results


def _run_cells(todo: list[Cell], cfg: dict[str, Any], cache: _DataCache, dev: torch.device, stored: dict[str, Any],
               results: dict[str, Any], json_path: Path, t0: float, time_budget_s: float | None, progress: bool) -> int:
    from tqdm import tqdm

    ran = 0
    bar = tqdm(todo, desc=cfg["experiment"], unit="cell", disable=not progress, file=sys.stderr)
    for cell in bar:
        if time_budget_s is not None and time.perf_counter() - t0 >= time_budget_s:
            break
        bar.set_postfix_str(cell.id[-48:])
        base = {
            "id": cell.id, "fingerprint": cell.fingerprint, "setting": cell.setting_label,
            "setting_index": cell.setting_index, "task_params": cell.task_params, "mixer": cell.mixer,
            "layer_plan": cell.layer_plan, "width": cell.width, "lr": cell.lr, "device": str(dev),
        }
        if cell.test_mode is not None:
            base["test_mode"] = cell.test_mode
        if cell.landmark_tokens is not None:
            base["landmark_tokens"] = cell.landmark_tokens  # the cell's record adds the token id
        start = time.perf_counter()
        try:
            train_sets, tests = cache.get(cell)
            record = {**base, **_train_and_eval(cell, cfg, train_sets, tests, dev)}
        except Exception as err:  # noqa: BLE001 -- a crashing cell must not stop the sweep
            tb = traceback.format_exc().strip().splitlines()
            record = {**base, "status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": "\n".join(tb[-12:])}
            if dev.type == "cuda":
                torch.cuda.empty_cache()  # an OOM in one cell must not starve the next
        record["seconds"] = round(time.perf_counter() - start, 3)
        record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        stored[cell.id] = {k: _finite_or_none(v) for k, v in record.items()}
        ran += 1
        results["complete"] = False
        _write_json(json_path, results)
    bar.close()
    return ran


def main_experiment(argv: Sequence[str] | None = None) -> int:
    """``mnemo experiment CONFIG [--quick] [--out DIR] [--device D] [--time-budget S] [--retry-failed] [--only S] [--report-only]``.

    Prints the Markdown report and a one-line summary; returns the exit status (0: the sweep ran,
    whether or not some cells failed — failures are results, recorded in the report).
    """
    parser = argparse.ArgumentParser(
        prog="mnemo experiment",
        description="Run a sweep (mixers x widths x learning rates x task settings) and write JSON, Markdown and plots.",
    )
    parser.add_argument("config", help="experiment config (.yaml, .toml or .json), e.g. configs/mqar.yaml")
    parser.add_argument("--quick", action="store_true", help="toy sizes from the config's 'quick:' section (CPU, minutes)")
    parser.add_argument("--out", default=DEFAULT_OUT_DIR, help=f"output folder (default {DEFAULT_OUT_DIR})")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: the config's train.device, auto)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="start no new cell after this long; run again to resume")
    parser.add_argument("--retry-failed", action="store_true", help="rerun cells recorded as failed")
    parser.add_argument("--only", action="append", default=None, metavar="SUBSTRING",
                        help="run only cells whose id contains this (repeatable: all must match), e.g. --only seq_len=256")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rewrite the Markdown report and plots from the stored JSON")
    args = parser.parse_args(argv)
    results = run_experiment(
        args.config, quick=args.quick, out_dir=args.out, device=args.device,
        time_budget_s=args.time_budget, retry_failed=args.retry_failed, progress=not args.no_progress, only=args.only,
        report_only=args.report_only,
    )
    out = Path(args.out)
    name = results["experiment"]
    cells = results["cells"].values()
    failed = sum(1 for c in cells if c.get("status") == "failed")
    print((out / f"{name}.md").read_text(encoding="utf-8"))
    print(
        f"ran {results['ran']} cell(s), skipped {results['skipped']} already done, {failed} failed; "
        f"{'complete' if results['complete'] else 'INCOMPLETE (run again to resume)'}\n"
        f"wrote {out / (name + '.json')}, {out / (name + '.md')}, {out / (name + '_state_size.png')}, {out / (name + '_seq_len.png')}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main_experiment())
