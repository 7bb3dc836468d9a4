"""Titans memory training stability (issue 5): depth-2 memories train on Tiny Shakespeare at lr 3e-3.

Before the stability bounds (per-token clipping of the surprise gradient, ``max_grad_norm``; the
momentum bound ``max_momentum``) a depth-2 ``titans_lmm`` reached memory weights of ~1e43 (NaN)
within a few AdamW steps at this learning rate. The models here are tiny so the test stays fast.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from mnemotorch.train import Trainer, config_from_dict

STEPS = 40
DIM, SEQ, BATCH = 32, 64, 4


def train(tmp_path, spec: dict, steps: int = STEPS, layers: int = 2) -> list[float]:
    cfg = config_from_dict({
        "model": {"hidden_size": DIM, "num_hidden_layers": layers, "num_attention_heads": 2, "layer_plan": [spec] * layers},
        "data": {"tokenizer": "byte", "seq_len": SEQ},
        "optim": {"lr": 3e-3, "warmup_steps": 4},
        "steps": steps, "batch_size": BATCH, "eval_interval": steps, "eval_batches": 1, "log_interval": 1, "save_interval": 0,
        "out_dir": str(tmp_path), "seed": 0, "resume": "none", "distributed": "none", "device": "cpu",
    })  # fmt: skip
    trainer = Trainer(cfg, progress=False, verbose=False)
    trainer.fit()
    return [r["loss"] for r in trainer.history if "loss" in r]


SPECS = {
    "titans_lmm": {"type": "titans_lmm", "depth": 2, "expansion": 2, "chunk_size": 16},
    "titans_mac": {"type": "titans_mac", "depth": 2, "expansion": 2, "chunk_size": 8, "segment_size": 16, "num_persistent": 2},
}


# 1-2 minutes each on a 2-core CPU, and at these sizes they pass on the unbounded update too (the
# memory gradients stay under the clip); the regression test is test_bounds_keep_large_steps_finite.
# Run them with MNEMO_SLOW_TESTS=1.
@pytest.mark.skipif(os.environ.get("MNEMO_SLOW_TESTS") != "1", reason="slow training smoke test; MNEMO_SLOW_TESTS=1 runs it")
@pytest.mark.parametrize("name", list(SPECS))
def test_depth2_memory_trains_without_nan_and_loss_falls(tmp_path, name: str) -> None:
    torch.manual_seed(0)
    losses = train(tmp_path, SPECS[name], layers=2 if name == "titans_lmm" else 1)
    assert len(losses) == STEPS
    assert all(math.isfinite(x) for x in losses), losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)  # byte-level loss starts near ln(256) = 5.5


# Step sizes far above the defaults (θ up to 1, starting at 0.5): the paper's unbounded update
# diverges at once; the default bounds keep the same model finite and learning.
HARSH = {"type": "titans_lmm", "depth": 2, "expansion": 2, "chunk_size": 16, "max_lr": 1.0, "init_theta": 0.5}


def test_bounds_keep_large_steps_finite(tmp_path) -> None:
    torch.manual_seed(0)
    losses = train(tmp_path / "bounded", HARSH, steps=20, layers=1)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5, losses
    torch.manual_seed(0)
    with pytest.raises(FloatingPointError, match="nan"):  # the same model without the bounds
        train(tmp_path / "paper", {**HARSH, "max_momentum": 1.0, "max_grad_norm": None, "init_eta": 0.99}, steps=20, layers=1)
