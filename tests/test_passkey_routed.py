"""configs/passkey_routed.yaml (issue #7: passkey at 4x-32x the training length for landmark and HCAM
beside attention): the grid is the one promised, every model has the same parameters, and the quick
mode's models build, train a step and score the longer test lengths on CPU."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

from mnemotorch.bench import load_experiment_config, plan_cells
from mnemotorch.models import MnemoConfig, MnemoForCausalLM
from mnemotorch.tasks import ByteTokenizer
from mnemotorch.tasks.synthetic import make_task

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "passkey_routed.yaml"


def spec(plan):
    return {"type": plan} if isinstance(plan, str) else plan


def build(cfg, plan, width):
    config = MnemoConfig(vocab_size=ByteTokenizer().vocab_size, hidden_size=width, layer_plan=plan, **cfg["model"])
    return MnemoForCausalLM(config)


def test_config_is_the_issue_grid():
    cfg = load_experiment_config(CONFIG)
    types = {name: spec(plan)["type"] for name, plan in cfg["mixers"].items()}
    assert {"attention", "landmark", "hcam", "sliding_window"} <= set(types.values())
    assert cfg["task"] == "needle" and cfg["task_params"] == {"kind": "passkey", "haystack": "synthetic", "tokenizer": "byte"}
    (setting,) = cfg["settings"]
    assert setting["length"] == 512
    assert [e["length"] // 512 for e in setting["eval"]] == [4, 8, 16, 32]
    # landmark: exact grouped softmax, and the paper's inference mode (top-k retrieval) kept on the device
    modes = {spec(p).get("mode", "exact") for p in cfg["mixers"].values() if spec(p)["type"] == "landmark"}
    assert modes == {"exact", "retrieval"}
    topk = next(spec(p) for p in cfg["mixers"].values() if spec(p).get("mode") == "retrieval")
    assert topk["offload_device"] is None and topk["top_k"] < 512 // (topk["block_len"] + 1)
    assert len(plan_cells(cfg)) == len(cfg["mixers"]) * len(cfg["widths"]) * len(cfg["learning_rates"])
    quick = load_experiment_config(CONFIG, quick=True)
    assert quick["experiment"] == "passkey_routed-quick" and set(quick["mixers"]) == set(cfg["mixers"])
    subprocess.run(["bash", "-n", str(REPO / "scripts" / "gpu_mqar_linear.sh")], check=True)


def test_every_model_has_the_same_parameters():
    cfg = load_experiment_config(CONFIG)
    (width,) = cfg["widths"]
    counts = {name: sum(p.numel() for p in build(cfg, plan, width).parameters()) for name, plan in cfg["mixers"].items()}
    assert len(set(counts.values())) == 1, counts
    assert counts["attention"] == 459_520


def test_quick_models_build_train_and_score_longer_inputs():
    cfg = load_experiment_config(CONFIG, quick=True)
    (setting,) = cfg["settings"]
    params = {**cfg["task_params"], **{k: v for k, v in setting.items() if k not in ("batch_size", "eval")}}
    train = make_task(cfg["task"], 2, seed=0, **params)
    longest = make_task(cfg["task"], 1, seed=1, **{**params, "length": setting["eval"][-1]["length"]})
    (width,) = cfg["widths"]
    for name, plan in cfg["mixers"].items():
        torch.manual_seed(0)
        model = build(cfg, plan, width)
        logits = model(input_ids=train.input_ids).logits
        assert logits.shape == (*train.input_ids.shape, model.config.vocab_size), name
        logits.float().logsumexp(-1).mean().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad), name
        model.eval()
        with torch.no_grad():
            out = model(input_ids=longest.input_ids).logits
        assert torch.isfinite(out).all(), name
