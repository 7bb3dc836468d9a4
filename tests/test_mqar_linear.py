"""configs/mqar_linear.yaml (issue #6: MQAR accuracy vs state size for the linear-attention family):
the grid is the one promised, and a tiny cell of every mixer in it trains, evaluates and reports on CPU."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from mnemotorch.bench import load_experiment_config, plan_cells, run_experiment

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "mqar_linear.yaml"
SCRIPT = REPO / "scripts" / "gpu_mqar_linear.sh"
SUMMARY = REPO / "docs" / "results" / "mqar_linear_summary.md"
MIXERS = {"attention", "sliding_window", "based", "linear_attention", "hebbian"}


def memory_layer(plan):
    """The spec of the mixer a plan is about: the plan itself, or the last layer of a
    ``[short_conv, mixer]`` plan (Zoology's conv layer, then the mixer)."""
    spec = plan[-1] if isinstance(plan, list) else plan
    return {"type": spec} if isinstance(spec, str) else spec


def test_config_is_the_issue_grid():
    cfg = load_experiment_config(CONFIG)
    types = {name: memory_layer(plan)["type"] for name, plan in cfg["mixers"].items()}
    assert set(types.values()) == MIXERS
    hebbian = next(memory_layer(plan) for plan in cfg["mixers"].values() if memory_layer(plan)["type"] == "hebbian")
    assert hebbian["rule"] == "delta"
    # As in Zoology's MQAR configs: every sub-quadratic mixer after a kernel-3 short conv layer
    # (Zoology's Hybrid alternates its configs over the 2 layers); attention alone, with RoPE.
    for name, plan in cfg["mixers"].items():
        if types[name] == "attention":
            assert memory_layer(plan) == {"type": "attention"}
        else:
            assert isinstance(plan, list) and len(plan) == 2, name
            assert plan[0] == {"type": "short_conv", "kernel_size": 3}, name
    # Zoology's recipe: 2 layers, no MLP, L = 256 with >= 16 key-value pairs, V = 8192.
    assert cfg["model"]["num_hidden_layers"] == 2 and cfg["model"]["intermediate_size"] == 0
    assert [(s["seq_len"], s["num_kv_pairs"] >= 16) for s in cfg["settings"]] == [(256, True)]
    assert cfg["task_params"]["vocab_size"] == 8192
    assert len(set(cfg["widths"])) >= 2 and len(cfg["learning_rates"]) >= 2
    assert len(plan_cells(cfg)) == len(types) * len(cfg["widths"]) * len(cfg["learning_rates"])
    # Every anchor says which of our mixers it stands beside (or none).
    for anchor in cfg["anchors"]:
        assert anchor["ours"] in set(cfg["mixers"]) | {"–"}, anchor
    quick = load_experiment_config(CONFIG, quick=True)
    assert quick["experiment"] == "mqar_linear-quick" and set(quick["mixers"]) == set(cfg["mixers"])


def test_summary_skeleton_and_script():
    text = SUMMARY.read_text(encoding="utf-8")
    for tag in ("table", "run"):
        assert f"<!-- mqar_linear:{tag}:begin -->" in text and f"<!-- mqar_linear:{tag}:end -->" in text
    assert "0.79 @ 9k" in text and "0.67 @ 9.4k" in text  # the anchors from the spec
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def tiny(raw: dict) -> dict:
    """The real config's mixers (their full specs) at toy sizes: one short cell per mixer and width."""
    cfg = copy.deepcopy(raw)
    cfg.pop("quick", None)
    cfg["experiment"] = "mqar_linear_tiny"
    cfg["task_params"]["vocab_size"] = 64
    cfg["settings"] = [{"seq_len": 32, "num_kv_pairs": 4, "batch_size": 8}]
    cfg["data"] = {"num_train": 32, "num_test": 16, "seed": 0}
    cfg["widths"] = [8, 16]
    cfg["learning_rates"] = [1.0e-2]
    cfg["train"].update(steps=2, eval_batch_size=16, device="cpu", cpu_threads=1)
    return cfg


def test_tiny_cell_of_each_mixer_runs_and_fills_the_summary(tmp_path):
    raw = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    cfg = tiny(raw)
    results = run_experiment(cfg, out_dir=tmp_path, progress=False)
    cells = list(results["cells"].values())
    assert len(cells) == 2 * len(raw["mixers"])
    failed = [(c["id"], c.get("error")) for c in cells if c["status"] != "ok"]
    assert not failed, failed
    size = {(c["mixer"], c["width"]): c["state_size"] for c in cells}
    for mixer in raw["mixers"]:
        assert 0 < size[(mixer, 8)] < size[(mixer, 16)], mixer  # the state grows with the width
    # The conv layer's (K - 1) * 2d inputs, then the delta rule's H * d^2 matrix.
    assert size[("hebbian_delta", 16)] == 2 * 2 * 16 + 16 * 16
    md = (tmp_path / "mqar_linear_tiny.md").read_text(encoding="utf-8")
    assert "Published anchors" in md and "DeltaNet" in md and (tmp_path / "mqar_linear_tiny_state_size.png").is_file()

    # The GPU script's filler puts these numbers beside the anchors (the page's other text untouched).
    tiny_yaml = tmp_path / "tiny.yaml"
    tiny_yaml.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    page = tmp_path / "summary.md"
    env = {**os.environ, "MQAR_CONFIG": str(tiny_yaml), "MQAR_SKELETON": str(SUMMARY), "RES": str(tmp_path / "res"),
           "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    subprocess.run(["bash", str(SCRIPT), "--fill", str(tmp_path / "mqar_linear_tiny.json"), str(page)],
                   check=True, env=env, cwd=REPO, capture_output=True, text=True)
    filled = page.read_text(encoding="utf-8")
    best = {(e["mixer"], e["width"]): e for e in json.loads((tmp_path / "mqar_linear_tiny.json").read_text())["best"]}
    e = best[("hebbian_delta", 16)]
    assert f"| hebbian_delta | 16 | 320 | **{e['accuracy']:.3f}** |" in filled
    assert "DeltaNet: 0.79 @ 9k, 0.96 @ 34k" in filled and "pending" not in filled
    assert filled.split("<!-- mqar_linear:table:begin -->")[0] == SUMMARY.read_text(encoding="utf-8").split("<!-- mqar_linear:table:begin -->")[0]
