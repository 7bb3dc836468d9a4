"""The ``mnemo`` command: list, train -> eval -> generate, demo, and friendly errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mnemotorch.cli import main

TINY_TOML = """
steps = 4
batch_size = 4
eval_interval = 2
eval_batches = 2
log_interval = 1
save_interval = 0
device = "cpu"
num_threads = 1
[model]
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 2
layer_plan = [{ type = "sliding_window", window = 16 }, "attention"]
[data]
seq_len = 32
"""


def test_list_shows_registered_mixers(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "attention" in out and "sliding_window" in out
    # attention's KV cache at 1024 tokens, dim 256: keys + values = 2 * 1024 * 256 elements.
    line = next(line for line in out.splitlines() if line.startswith("attention "))
    assert str(2 * 1024 * 256) in line
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"attention", "sliding_window"} <= {r["name"] for r in rows}


def test_train_eval_generate(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    out_dir = tmp_path / "run"
    assert main(["train", str(config), "--no-progress", "--set", f"out_dir={out_dir}", "optim.lr=2e-3"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])  # the summary is printed as JSON at the end
    assert summary["steps"] == 4 and summary["checkpoint"] == str(out_dir / "checkpoint")
    assert (out_dir / "checkpoint" / "model.safetensors").is_file()
    assert (out_dir / "loss.png").is_file()

    assert main(["eval", str(out_dir / "checkpoint"), "--batches", "3", "--json"]) == 0
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    assert res["seq_len"] == 32 and 0 < res["loss"] < 10 and res["tokens"] == 3 * 8 * 32
    assert "ppl" in out

    # A run's out_dir works as well as its checkpoint directory.
    assert main(["generate", str(out_dir), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
    assert main(["generate", str(out_dir), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1"]) == 0
    assert capsys.readouterr().out == text  # seeded sampling is reproducible
    assert main(["generate", str(out_dir), "--prompt", "A", "--max-new-tokens", "5", "--temperature", "0"]) == 0

    # Validation perplexity vs training tokens, from the run's metrics.
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_ppl" in r]
    assert val and all(r["tokens_seen"] == r["step"] * 4 * 32 for r in val)  # batch 4 x 32 tokens
    assert main(["plot", str(out_dir), str(out_dir), "--out", str(tmp_path / "ppl.png")]) == 0
    assert (tmp_path / "ppl.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["plot", str(tmp_path / "nothing-here")]) != 0
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    for argv in (["eval", str(missing)], ["generate", str(missing), "--prompt", "x"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert str(missing) in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_bad_config_key_is_a_clear_error(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(TINY_TOML)
    assert main(["train", str(config), "--set", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "warmup_steps" in err
    assert main(["train", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--steps", "3", "--mixers", "attention", "--out", str(out), "--dim", "32", "--layers", "2",
            "--heads", "2", "--seq-len", "32", "--batch-size", "4", "--eval-batches", "2", "--threads", "1",
            "--sample-chars", "20"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "attention" in text and "val loss" in text and "sample from the best model" in text
    assert (out / "demo.png").stat().st_size > 1000
    report = json.loads((out / "demo.json").read_text())
    assert report["best"] == "attention"
    (row,) = report["results"]
    assert row["mixer"] == "attention" and row["parameters"] > 0 and row["val_curve"]
    assert row["state_size_1024"] == 2 * 2 * 1024 * 32  # 2 layers x (K + V) x 1024 tokens x dim 32
    assert isinstance(report["sample"], str)


def test_demo_rejects_unknown_mixer(tmp_path, capsys):
    assert main(["demo", "--mixers", "nope", "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("train", "eval", "generate", "list", "demo"):
        assert cmd in out
