"""Training: ``Trainer(cfg).fit()`` on CPU, one GPU, or many under ``torchrun`` (DDP / FSDP2).

>>> from mnemotorch.train import Trainer, load_config
>>> cfg = load_config("configs/tiny_shakespeare.toml", ["steps=100", "optim.lr=1e-3"])  # doctest: +SKIP
>>> summary = Trainer(cfg).fit()  # doctest: +SKIP

Checkpoints (``out_dir/checkpoint``) hold the model (``save_pretrained``), the tokenizer and the
trainer state; ``resume="auto"`` continues an interrupted run bit-for-bit on the same hardware.
"""

from .checkpoint import (
    CheckpointError,
    find_checkpoint,
    load_checkpoint_tokenizer,
    load_model,
    load_trainer_state,
    save_checkpoint,
    verify_checkpoint,
)
from .config import DataConfig, OptimConfig, TrainConfig, config_from_dict, load_config
from .plots import plot_curves, plot_loss_curve, plot_perplexity_vs_tokens
from .trainer import Trainer, WarmupCosine, autocast_dtype, build_optimizer, evaluate

__all__ = [
    "CheckpointError",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "Trainer",
    "WarmupCosine",
    "autocast_dtype",
    "build_optimizer",
    "config_from_dict",
    "evaluate",
    "find_checkpoint",
    "load_checkpoint_tokenizer",
    "load_config",
    "load_model",
    "load_trainer_state",
    "plot_curves",
    "plot_loss_curve",
    "plot_perplexity_vs_tokens",
    "save_checkpoint",
    "verify_checkpoint",
]
