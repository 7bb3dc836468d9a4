"""A tiny image classifier on scikit-learn's bundled digits: a working example of the 2-D attention.

``sklearn.datasets.load_digits`` ships 1,797 grey-scale 8 x 8 images of the digits 0-9 with the
library (no download). Every pixel is one token: an overlapping 3 x 3 convolution embeds each pixel
with its neighbours (NAT's tokenizer is overlapping convolutions too) + learned position embedding ->
``depth`` pre-norm blocks of (2-D attention + MLP) -> mean pool -> linear head. The attention is
:class:`~mnemotorch.layers.vision.NeighborhoodAttention2D` (``"na2d"``, dilation alternating 1, 2
as in DiNAT) or :class:`~mnemotorch.layers.vision.HaloAttention` (``"halo"``).

    from mnemotorch.tasks.digits import train_digits
    result = train_digits("na2d", epochs=20)     # 1-2 minutes on 2 CPU cores
    print(result["test_accuracy"])

Needs scikit-learn (``pip install scikit-learn``, part of the ``dev`` extras).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.vision import HaloAttention, NeighborhoodAttention2D

__all__ = ["ATTENTIONS", "DigitsClassifier", "evaluate_digits", "load_digits_split", "train_digits"]

ATTENTIONS = ("na2d", "halo")


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The digits images, shuffled with ``seed`` and split.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: images ``float32 [N, 8, 8]`` scaled to [0, 1]
        (the raw pixels are 0..16), labels ``int64 [N]``. The default split holds out 359 of the 1,797 images.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits task needs scikit-learn: pip install scikit-learn") from err
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"load_digits_split: test_fraction must be in (0, 1), got {test_fraction!r}")
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


class _Block(nn.Module):
    """Pre-norm transformer block on a feature map ``[B, H, W, C]``."""

    def __init__(self, attn: nn.Module, dim: int, mlp_ratio: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), attn
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitsClassifier(nn.Module):
    """Pixels as tokens -> 2-D attention blocks -> mean pool -> 10 logits.

    Args:
        attention: ``"na2d"`` (neighborhood attention; block ``i`` uses dilation
            ``dilations[i % len(dilations)]``) or ``"halo"`` (HaloNet blocks).
        dim, depth, num_heads, mlp_ratio: model size.
        kernel_size, dilations, rel_pos_bias: NA-2D knobs.
        block_size, halo_size: HaloNet knobs (the 8 x 8 map must be a multiple of block_size).
        image_size: side of the square input images.
    """

    def __init__(
        self,
        attention: str = "na2d",
        dim: int = 32,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: int = 2,
        kernel_size: int = 3,
        dilations: tuple[int, ...] = (1, 2),
        rel_pos_bias: bool = True,
        block_size: int = 4,
        halo_size: int = 1,
        image_size: int = 8,
        num_classes: int = 10,
    ):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"DigitsClassifier: attention must be one of {ATTENTIONS}, got {attention!r}")
        self.attention, self.image_size = attention, image_size
        # A single pixel value is one number: alone it would make every token a point on one line.
        self.embed = nn.Conv2d(1, dim, kernel_size=3, padding=1)
        self.pos = nn.Parameter(torch.randn(1, image_size, image_size, dim) * 0.1)

        def attn(i: int) -> nn.Module:
            if attention == "na2d":
                return NeighborhoodAttention2D(
                    dim, num_heads, kernel_size, dilation=dilations[i % len(dilations)], rel_pos_bias=rel_pos_bias
                )
            return HaloAttention(dim, num_heads, block_size, halo_size)

        self.blocks = nn.ModuleList(_Block(attn(i), dim, mlp_ratio) for i in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        """``images [B, S, S]`` (S = image_size) -> logits ``[B, num_classes]``."""
        if images.ndim != 3 or images.shape[1:] != (self.image_size, self.image_size):
            side = self.image_size
            raise ValueError(f"DigitsClassifier: images must have shape [batch, {side}, {side}], got {list(images.shape)}")
        x = self.embed(images.unsqueeze(1)).permute(0, 2, 3, 1) + self.pos  # [B, S, S, dim]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=(1, 2)))


@torch.no_grad()
def evaluate_digits(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Accuracy of ``model`` on images ``x [N, 8, 8]`` with labels ``y [N]``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(y), batch_size):
        logits = model(x[i : i + batch_size].to(device))
        correct += int((logits.argmax(-1).cpu() == y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / len(y)


def train_digits(
    attention: str = "na2d",
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 0.05,
    seed: int = 0,
    device: str | torch.device = "cpu",
    max_steps: int | None = None,
    progress: bool = True,
    **model_kwargs,
) -> dict:
    """Train a :class:`DigitsClassifier` with AdamW (warm-up + cosine schedule) and evaluate it.

    Args:
        attention: ``"na2d"`` or ``"halo"``.
        epochs, batch_size, lr, weight_decay, seed: the usual; ``seed`` fixes the split, the
            initialisation and the batch order.
        device: where to train.
        max_steps: stop early after this many steps (smoke tests).
        progress: show a tqdm progress bar.
        model_kwargs: passed to :class:`DigitsClassifier`.

    Returns:
        ``{"attention", "test_accuracy", "train_accuracy", "losses" (per step), "steps",
        "seconds", "parameters"}``.
    """
    from tqdm.auto import tqdm

    if attention not in ATTENTIONS:
        raise ValueError(f"train_digits: attention must be one of {ATTENTIONS}, got {attention!r}")
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"train_digits: {name} must be an int >= 1, got {v!r}")
    x_train, y_train, x_test, y_test = load_digits_split(seed=seed)
    torch.manual_seed(seed)
    model = DigitsClassifier(attention, **model_kwargs).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(y_train) / batch_size)
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=total, desc=f"digits/{attention}", disable=not progress)
    model.train()
    step = 0
    while step < total:
        order = torch.randperm(len(y_train), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(x_train[idx].to(device)), y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{sum(losses[-10:]) / 10:.3f}")
            if step >= total:
                break
    bar.close()
    seconds = time.perf_counter() - start
    return {
        "attention": attention,
        "test_accuracy": evaluate_digits(model, x_test, y_test),
        "train_accuracy": evaluate_digits(model, x_train, y_train),
        "losses": losses,
        "steps": step,
        "seconds": seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
