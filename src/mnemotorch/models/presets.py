"""Layer-plan presets: published hybrid stacks as ``MnemoConfig(layer_plan=...)`` lists.

>>> from mnemotorch.models.presets import based_layer_plan
>>> [spec["type"] for spec in based_layer_plan(5)]
['short_conv', 'based', 'sliding_window', 'short_conv', 'short_conv']
"""

from __future__ import annotations

from typing import Any

__all__ = ["based_layer_plan"]


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"based_layer_plan: {name} must be an int >= 1, got {value!r}")
    return value


def based_layer_plan(
    num_layers: int,
    window: int = 128,
    feature_dim: int = 16,
    *,
    conv_kernel_size: int = 3,
    conv_expand: int = 2,
) -> list[dict[str, Any]]:
    """The BASED layer mix (Arora et al., 2024): 1 in 5 layers linear attention, 1 in 5 sliding window, the rest gated short convs.

    The order is that of the released 360M reference model (HazyResearch/based,
    ``train/configs/experiment/reference/based-360m.yaml``: 27 layers, linear attention at layers
    1, 6, 11, 16, 21, sliding-window attention at 2, 7, 12, 17, 22, gated convolutions elsewhere,
    counting from 0). In general: the layers are grouped in fives, ``[short_conv, based,
    sliding_window, short_conv, short_conv]``; layers after the last full group are ``short_conv``
    (the reference's layers 25 and 26). With fewer than 5 layers the single partial group keeps
    its ``based`` and ``sliding_window`` layers, so ``num_layers`` must be at least 3.

    Args:
        num_layers: number of blocks (``MnemoConfig.num_hidden_layers``), at least 3.
        window: sliding-window size ``W`` (keys per query, itself included). The paper's models
            use 64–256; the 360M reference config uses 256.
        feature_dim: per-head q/k width ``d`` before the Taylor map of the ``based`` layers (16 in BASED).
        conv_kernel_size: taps of the gated short convolutions (3 in BASED).
        conv_expand: inner width of the gated convolutions as a multiple of ``dim`` (2 in the
            360M reference: ``expand_proj=4`` split into conv and gate halves).

    Returns:
        One spec dict per layer, e.g. ``MnemoConfig(num_hidden_layers=10, layer_plan=based_layer_plan(10))``.
    """
    _positive_int("num_layers", num_layers)
    if num_layers < 3:
        raise ValueError(f"based_layer_plan: num_layers must be >= 3 (one based, one sliding_window, one short_conv layer), got {num_layers}")
    for name, value in (("window", window), ("feature_dim", feature_dim), ("conv_kernel_size", conv_kernel_size), ("conv_expand", conv_expand)):
        _positive_int(name, value)
    groups = max(1, num_layers // 5)
    plan: list[dict[str, Any]] = []
    for i in range(num_layers):
        slot = i % 5 if i < 5 * groups else None
        if slot == 1:
            plan.append({"type": "based", "feature_dim": feature_dim})
        elif slot == 2:
            plan.append({"type": "sliding_window", "window": window})
        else:
            plan.append({"type": "short_conv", "kernel_size": conv_kernel_size, "expand": conv_expand})
    return plan
