"""Checkpoints: exact (bitwise) resume, atomic writes, clear errors on damaged checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mnemotorch  # noqa: F401  (registers the Auto classes)
from mnemotorch.train import CheckpointError, Trainer, WarmupCosine, evaluate, load_config, load_model
from mnemotorch.train import checkpoint as ckpt_mod

# dim 32, 2 layers, seq 32, batch 4: a run of 12 steps takes a second or two on a CPU.
TINY = [
    "model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
    'model.layer_plan=[{type="sliding_window", window=8}, "attention"]',
    "data.seq_len=32", "batch_size=4", "steps=12", "log_interval=1", "eval_interval=4", "eval_batches=2",
    "save_interval=0", "device=cpu", "optim.warmup_steps=3", "num_threads=1",
]


def run(out_dir: Path, *extra: str) -> tuple[dict, Trainer]:
    trainer = Trainer(load_config(None, [*TINY, f"out_dir={out_dir}", *extra]), progress=False, verbose=False)
    return trainer.fit(), trainer


def rows(out_dir: Path, key: str) -> dict[int, float]:
    out = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if key in r:
            out[r["step"]] = r[key]
    return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("straight")
    summary, _ = run(out)
    return out, summary


def test_interrupted_and_resumed_run_is_bitwise_identical(straight, tmp_path):
    ref_dir, ref = straight
    part, _ = run(tmp_path, "stop_at_step=5")
    assert part["stopped_early"] and part["steps"] == 5
    assert json.loads((tmp_path / "checkpoint" / "train_config.json").read_text())["stop_at_step"] == 5
    resumed, _ = run(tmp_path)  # resume="auto" picks up out_dir/checkpoint
    assert resumed["steps"] == 12 and not resumed["stopped_early"]

    # Every logged training loss (before and after the interruption) and the final numbers are identical.
    a, b = rows(ref_dir, "loss"), rows(tmp_path, "loss")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert all(a[s] == b[s] for s in a), {s: (a[s], b[s]) for s in a if a[s] != b[s]}
    assert resumed["train_loss"] == ref["train_loss"]
    assert resumed["val_loss"] == ref["val_loss"]
    assert rows(ref_dir, "grad_norm") == rows(tmp_path, "grad_norm")
    # ... and so are the final weights.
    wa = load_file(ref_dir / "checkpoint" / "model.safetensors")
    wb = load_file(tmp_path / "checkpoint" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # metrics.jsonl was not duplicated: one row per step, the eval at the interruption kept.
    assert sorted(rows(tmp_path, "val_loss")) == [4, 5, 8, 12]


def test_resume_none_starts_over_and_resume_path(straight, tmp_path):
    ref_dir, ref = straight
    summary, _ = run(tmp_path, "resume=none", "steps=3", "stop_at_step=2")
    assert summary["steps"] == 2
    # An explicit checkpoint path continues from that checkpoint (here: the finished run).
    summary, _ = run(tmp_path / "other", f"resume={ref_dir / 'checkpoint'}")
    assert summary["steps"] == 12 and summary["val_loss"] == ref["val_loss"]
    with pytest.raises(CheckpointError, match="does-not-exist"):
        run(tmp_path / "x", f"resume={tmp_path / 'does-not-exist'}")


def test_checkpoint_is_a_from_pretrained_directory(straight):
    from transformers import AutoModelForCausalLM

    ref_dir, _ = straight
    ck = ref_dir / "checkpoint"
    names = {p.name for p in ck.iterdir()}
    assert {"config.json", "model.safetensors", "trainer_state.pt", "mnemo_tokenizer.json", "train_config.json"} <= names
    assert not any(p.name.startswith(".checkpoint") for p in ref_dir.iterdir())  # no temp dirs left
    auto = AutoModelForCausalLM.from_pretrained(ck)
    ours = load_model(ck)
    x = torch.randint(0, 257, (1, 10))
    torch.testing.assert_close(auto(input_ids=x).logits, ours(input_ids=x).logits)
    state = ckpt_mod.load_trainer_state(ck)
    assert state["step"] == 12 and state["data"]["step"] == 12 and "rng" in state and state["config"]["steps"] == 12


def test_failed_write_leaves_previous_checkpoint_intact(straight, tmp_path, monkeypatch):
    ref_dir, _ = straight
    # A finished run's out_dir; now make the next save die half-way through.
    summary, _ = run(tmp_path, "steps=2")
    before = (tmp_path / "checkpoint" / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_mod.torch, "save", boom)
    with pytest.raises(OSError, match="simulated"):
        run(tmp_path, "steps=4", "resume=none")
    monkeypatch.undo()
    assert (tmp_path / "checkpoint" / "model.safetensors").read_bytes() == before
    assert ckpt_mod.load_trainer_state(tmp_path / "checkpoint")["step"] == 2
    assert not any(p.name.startswith(".checkpoint") for p in tmp_path.iterdir())


def test_crash_between_renames_is_recovered(straight, tmp_path):
    import shutil

    ref_dir, _ = straight
    shutil.copytree(ref_dir / "checkpoint", tmp_path / ".checkpoint.old")
    assert ckpt_mod.find_checkpoint(tmp_path) == tmp_path / ".checkpoint.old"


def test_truncated_safetensors_raises_error_naming_the_file(straight, tmp_path):
    import shutil

    ref_dir, _ = straight
    ck = tmp_path / "checkpoint"
    shutil.copytree(ref_dir / "checkpoint", ck)
    f = ck / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        load_model(ck)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        run(tmp_path)  # resume="auto" finds the damaged checkpoint and refuses it
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(ck)
    f.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors.*missing"):
        load_model(ck)


def test_foreign_or_truncated_trainer_state_is_named(straight, tmp_path):
    import shutil

    ref_dir, _ = straight
    ck = tmp_path / "checkpoint"
    shutil.copytree(ref_dir / "checkpoint", ck)
    torch.save({"some": "thing"}, ck / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="trainer_state.pt.*not a mnemotorch"):
        ckpt_mod.load_trainer_state(ck)
    (ck / "trainer_state.pt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match="trainer_state.pt"):
        run(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing")


def test_grad_accumulation_matches_full_batch(tmp_path):
    full, _ = run(tmp_path / "a", "steps=4", "eval_interval=0")
    accum, _ = run(tmp_path / "b", "steps=4", "eval_interval=0", "grad_accum=2")
    a, b = rows(tmp_path / "a", "loss"), rows(tmp_path / "b", "loss")
    assert a.keys() == b.keys()
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-5, (s, a[s], b[s])
    assert abs(full["val_loss"] - accum["val_loss"]) <= 1e-5


def test_evaluate_matches_a_direct_computation(straight):
    from mnemotorch.tasks import ByteTokenizer, encode_corpus

    ref_dir, _ = straight
    model = load_model(ref_dir / "checkpoint")
    model.train()
    tokens = encode_corpus("To be, or not to be, that is the question. " * 5, ByteTokenizer())
    res = evaluate(model, tokens, batch_size=3, seq_len=16, max_batches=None)
    assert model.training  # evaluate restores the mode it found
    chunked = evaluate(model, tokens, batch_size=3, seq_len=16, micro_batch_size=2)
    assert chunked["tokens"] == res["tokens"] and abs(chunked["loss"] - res["loss"]) < 1e-6
    # Direct: every target of the stream scored once (windows of 16, the last one short).
    n = tokens.numel() - 1
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for s in range(0, n, 16):
            x = tokens[s:min(s + 16, n)][None]
            y = tokens[s + 1:min(s + 17, n + 1)][None]
            logits = model(input_ids=x, use_cache=False).logits
            total += torch.nn.functional.cross_entropy(logits[0], y[0], reduction="sum").item()
            count += y.numel()
    assert res["tokens"] == count == n
    assert abs(res["loss"] - total / count) < 1e-5
    assert abs(res["ppl"] - math.exp(res["loss"])) < 1e-9
    assert res["tokens"] > 0


def test_warmup_cosine_schedule():
    f = WarmupCosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [f(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and abs(f(9) - 0.55) < 1e-12 and abs(f(14) - 0.1) < 1e-12 and abs(f(100) - 0.1) < 1e-12
    g = WarmupCosine(warmup_steps=0, total_steps=10, min_ratio=0.0)
    assert g(0) == 1.0 and g(10) == 0.0


def test_outputs_written(straight):
    ref_dir, ref = straight
    assert (ref_dir / "loss.png").stat().st_size > 1000
    assert json.loads((ref_dir / "train_config.json").read_text())["steps"] == 12
    train_rows = [json.loads(line) for line in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    first = train_rows[0]
    assert set(first) == {"step", "lr", "loss", "grad_norm", "tokens_per_s"}
    assert ref["parameters"] > 0 and ref["tokens_per_s"] > 0 and math.isfinite(ref["val_ppl"])
    assert abs(ref["val_ppl"] - math.exp(ref["val_loss"])) < 1e-6 * ref["val_ppl"]
