"""configs/lm_routing.yaml (issue #7: routing vs dense attention language modelling at equal
parameters) and its driver scripts/lm_compare.py: the config resolves into valid `mnemo train` configs,
the arms hold exactly the same parameters, routing has several clusters at the training context, and
the quick arms build and take a training step (routing's commitment loss and centroid update) on CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from script_module import load_script

from mnemotorch.layers.routing import routing_aux_loss, routing_layers, update_routing_centroids
from mnemotorch.models import MnemoConfig, MnemoForCausalLM

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "lm_routing.yaml"
SCRIPT = REPO / "scripts" / "lm_compare.py"


@pytest.fixture()
def lm_compare(monkeypatch, tmp_path):
    # "{shared}" in the config resolves to the shared data folder; the config check needs no files.
    monkeypatch.setenv("MNEMO_DATA_DIR", str(tmp_path))
    return load_script("lm_compare")


def layer_spec(plan):
    return {"type": plan} if isinstance(plan, str) else plan


def test_config_is_routing_vs_attention_at_equal_parameters(lm_compare, tmp_path):
    cfg = lm_compare.load_config(CONFIG)
    arms = cfg["arms"]
    assert {"attention", "routing"} <= set(arms)
    for arm in arms.values():
        assert arm["data"]["source"] == str(tmp_path / "gutenberg") and arm["data"]["tokenizer"] == "bpe"
    seq_len = arms["routing"]["data"]["seq_len"]
    assert 2048 <= seq_len <= 4096 and {a["data"]["seq_len"] for a in arms.values()} == {seq_len}
    routing = layer_spec(arms["routing"]["model"]["layer_plan"])
    assert routing["type"] == "routing" and routing.get("mode", "causal_exact") == "causal_exact"
    assert routing["num_clusters"] >= 4 and seq_len // routing["num_clusters"] >= 256   # several clusters of hundreds of tokens
    assert layer_spec(arms["attention"]["model"]["layer_plan"]) == {"type": "attention"}
    counts = {name: lm_compare.parameter_count(t) for name, t in arms.items()}
    assert len(set(counts.values())) == 1, counts
    contexts = cfg["eval"]["contexts"]
    assert contexts[0] == seq_len and max(contexts) > seq_len      # the training length and longer
    # everything but the model is shared by the arms
    strip = lambda t: {k: v for k, v in t.items() if k != "model"}  # noqa: E731
    assert strip(arms["routing"]) == strip(arms["attention"])


def test_quick_arms_build_and_train_a_step(lm_compare):
    cfg = lm_compare.load_config(CONFIG, quick=True)
    assert cfg["experiment"] == "lm_routing-quick"
    counts = {name: lm_compare.parameter_count(t) for name, t in cfg["arms"].items()}
    assert len(set(counts.values())) == 1, counts
    for name, tcfg in cfg["arms"].items():
        assert tcfg["device"] == "cpu"
        torch.manual_seed(0)
        model = MnemoForCausalLM(MnemoConfig(vocab_size=tcfg["data"]["vocab_size"], **tcfg["model"]))
        x = torch.randint(0, model.config.vocab_size, (2, tcfg["data"]["seq_len"]))
        out = model(input_ids=x, labels=x)
        has_routing = bool(routing_layers(model))
        assert has_routing == (name == "routing")
        loss = out.loss + routing_aux_loss(model) if has_routing else out.loss
        loss.backward()
        if has_routing:
            before = [m.centroids.clone() for m in routing_layers(model)]
            assert update_routing_centroids(model) == len(before)
            assert any(not torch.equal(b, m.centroids) for b, m in zip(before, routing_layers(model)))


def test_plan_prints_the_arms(monkeypatch, tmp_path):
    env = {"MNEMO_DATA_DIR": str(tmp_path), "PATH": str(Path(sys.executable).parent)}
    res = subprocess.run([sys.executable, str(SCRIPT), str(CONFIG), "--plan", "--quick"], capture_output=True, text=True,
                         env=env, cwd=REPO, check=True)
    assert "routing: 448,752 parameters" in res.stdout and "attention: 448,752 parameters" in res.stdout
