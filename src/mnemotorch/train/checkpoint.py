"""Checkpoints: one directory a user can hand to ``from_pretrained``, written atomically.

Layout of ``out_dir/checkpoint/``::

    config.json, model.safetensors, ...   the model (``save_pretrained``; loadable with
                                          ``AutoModelForCausalLM.from_pretrained`` after ``import mnemotorch``)
    <tokenizer files>                     ``tokenizer.save(dir)``; read back with ``mnemotorch.tasks.load_tokenizer``
    trainer_state.pt                      optimizer, scheduler, step, RNG states, data sampler, TrainConfig

Everything is written to a temporary directory beside the target and then renamed into place, so
a crash never leaves a half-written ``checkpoint/``: either the previous one or the new one exists
(if the crash falls between the two renames, the previous one survives as ``.checkpoint.old`` and
:func:`find_checkpoint` picks it up).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import struct
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

__all__ = [
    "CHECKPOINT_DIRNAME",
    "TRAINER_STATE_FILE",
    "TRAIN_CONFIG_FILE",
    "load_train_config",
    "CheckpointError",
    "save_checkpoint",
    "find_checkpoint",
    "verify_checkpoint",
    "load_model",
    "load_trainer_state",
    "load_checkpoint_tokenizer",
    "capture_rng_state",
    "restore_rng_state",
]

CHECKPOINT_DIRNAME = "checkpoint"
TRAINER_STATE_FILE = "trainer_state.pt"
TRAIN_CONFIG_FILE = "train_config.json"
_OLD_DIRNAME = ".checkpoint.old"
_STATE_FORMAT = "mnemotorch.trainer_state"
_STATE_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, or not a mnemotorch checkpoint. The message names the file."""


# ---------------------------------------------------------------------------------------------
# RNG states (kept loadable with torch.load(weights_only=True): only tensors and plain Python).
# ---------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    # weights_only loading turns the inner tuple into a list; random.setstate insists on tuples.
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _fsync_tree(path: Path) -> None:
    """Flush file contents before the rename, so the rename never publishes unwritten data."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - directories cannot be fsynced on some filesystems
        pass


@contextlib.contextmanager
def _quiet_transformers_progress() -> Iterator[None]:
    """Hide transformers' "Writing model shards" bar, which would break the trainer's own bar."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def save_checkpoint(
    out_dir: str | os.PathLike[str],
    model: nn.Module,
    tokenizer: Any,
    trainer_state: dict[str, Any],
    model_state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``out_dir/checkpoint`` atomically and return its path.

    Args:
        model: the unwrapped ``MnemoForCausalLM`` (``save_pretrained`` is called on it).
        tokenizer: object with ``save(dir)``.
        trainer_state: optimizer/scheduler/step/RNG/data state (see ``Trainer``); stamped with a
            format tag so foreign files are recognised on load.
        model_state_dict: full (unsharded) weights to save instead of the module's own
            parameters, e.g. gathered from FSDP2 shards.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / CHECKPOINT_DIRNAME
    tmp = out / f".checkpoint.tmp-{os.getpid()}"
    old = out / _OLD_DIRNAME
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        with _quiet_transformers_progress():
            model.save_pretrained(tmp, state_dict=model_state_dict)  # type: ignore[operator]
        tokenizer.save(tmp)
        if "config" in trainer_state:  # human-readable copy; `mnemo eval` reads the data settings from it
            (tmp / TRAIN_CONFIG_FILE).write_text(json.dumps(trainer_state["config"], indent=2) + "\n")
        state = {"format": _STATE_FORMAT, "version": _STATE_VERSION, **trainer_state}
        torch.save(state, tmp / TRAINER_STATE_FILE)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # A directory cannot be renamed over a non-empty one, hence the two renames.
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def find_checkpoint(out_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint to resume from in ``out_dir``, or ``None`` if there is none."""
    out = Path(out_dir)
    for name in (CHECKPOINT_DIRNAME, _OLD_DIRNAME):
        candidate = out / name
        if (candidate / TRAINER_STATE_FILE).is_file():
            return candidate
    return None


def _check_safetensors_file(path: Path) -> None:
    """Validate a .safetensors file's header and length without loading the tensors."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{path}: truncated safetensors file (header of {n} bytes, file has {size})")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise CheckpointError(
            f"{path}: truncated or corrupt safetensors file (header says {8 + n + end} bytes, file has {size})"
        )


def verify_checkpoint(path: str | os.PathLike[str], *, need_trainer_state: bool = False) -> Path:
    """Check that ``path`` holds a complete model checkpoint; raise :class:`CheckpointError` naming what is wrong."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint directory {str(p)!r} does not exist")
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p / 'config.json'}: missing; {str(p)!r} is not a model checkpoint")
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{index}: unreadable safetensors index ({err})") from err
        files = [p / s for s in shards]
    else:
        files = [p / "model.safetensors"]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: missing weights file in checkpoint {str(p)!r}")
        _check_safetensors_file(f)
    if need_trainer_state and not (p / TRAINER_STATE_FILE).is_file():
        raise CheckpointError(f"{p / TRAINER_STATE_FILE}: missing; cannot resume training from {str(p)!r}")
    return p


def load_model(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> nn.Module:
    """Load the ``MnemoForCausalLM`` of a checkpoint (float32) after checking its files."""
    from ..models import MnemoForCausalLM

    p = verify_checkpoint(path)
    try:
        with _quiet_transformers_progress():
            model = MnemoForCausalLM.from_pretrained(p, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - re-raised with the checkpoint named
        raise CheckpointError(f"{p}: could not load the model ({type(err).__name__}: {err})") from err
    return model.to(device)


def load_trainer_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``trainer_state.pt`` (safely: ``weights_only=True``) and check it is ours."""
    f = Path(path) / TRAINER_STATE_FILE
    if not f.is_file():
        raise CheckpointError(f"{f}: missing; cannot resume training from {str(Path(path))!r}")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated zip, pickle error, foreign object
        raise CheckpointError(f"{f}: unreadable trainer state ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
        raise CheckpointError(f"{f}: not a mnemotorch trainer state (no format tag {_STATE_FORMAT!r})")
    if state.get("version") != _STATE_VERSION:
        raise CheckpointError(f"{f}: trainer state version {state.get('version')!r}; this mnemotorch reads version {_STATE_VERSION}")
    return state


def load_checkpoint_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The tokenizer saved in a checkpoint (error names the directory)."""
    from ..tasks import load_tokenizer

    p = Path(path)
    try:
        return load_tokenizer(p)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{p}: could not load the tokenizer ({type(err).__name__}: {err})") from err


def load_train_config(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The TrainConfig (as a dict) a checkpoint was trained with, or ``None`` if it has none."""
    f = Path(path) / TRAIN_CONFIG_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError as err:
        raise CheckpointError(f"{f}: invalid JSON ({err})") from err
