"""The experiment runner: the quick MQAR sweep end to end on CPU, failed cells, resume, configs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from mnemotorch.bench import load_experiment_config, main_experiment, plan_cells, run_experiment

REPO = Path(__file__).resolve().parents[2]
MQAR = REPO / "configs" / "mqar.yaml"
PASSKEY = REPO / "configs" / "passkey.yaml"


def tiny_config(**over) -> dict:
    cfg = {
        "experiment": "tiny",
        "task": "mqar",
        "task_params": {"vocab_size": 64},
        "settings": [{"seq_len": 16, "num_kv_pairs": 2}],
        "data": {"num_train": 64, "num_test": 32},
        "model": {"num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 0},
        "mixers": {"attention": "attention"},
        "widths": [16],
        "learning_rates": [1e-3],
        "train": {"steps": 3, "batch_size": 8, "eval_batch_size": 32, "device": "cpu", "cpu_threads": 1},
    }
    cfg.update(over)
    return cfg


def test_quick_mqar_runs_end_to_end_and_resumes(tmp_path, capsys):
    start = time.perf_counter()
    assert main_experiment([str(MQAR), "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    first = time.perf_counter() - start
    for suffix in (".json", ".md", "_state_size.png", "_seq_len.png"):
        path = tmp_path / f"mqar-quick{suffix}"
        assert path.is_file() and path.stat().st_size > 0, path
    results = json.loads((tmp_path / "mqar-quick.json").read_text())
    cells = results["cells"]
    assert len(cells) == 8 and all(c["status"] == "ok" for c in cells.values())
    assert results["complete"] is True and len(results["best"]) == 4  # 2 settings x 2 mixers x 1 width
    for c in cells.values():
        assert 0.0 <= c["accuracy"] <= 1.0 and c["state_size"] > 0
    # The Mixer accounting: attention's state grows with L, the window's does not.
    by = {(c["mixer"], c["seq_len"]): c["state_size"] for c in cells.values()}
    assert by[("attention", 64)] == 2 * by[("attention", 32)]
    assert by[("sliding_window", 64)] == by[("sliding_window", 32)]
    md = (tmp_path / "mqar-quick.md").read_text()
    assert "## Summary" in md and "Published anchors" in md and "| attention | 32 |" in md
    assert "ran 8 cell(s)" in capsys.readouterr().out

    # Resume: every cell is already in the JSON, so nothing trains.
    start = time.perf_counter()
    again = run_experiment(MQAR, quick=True, out_dir=tmp_path, progress=False)
    assert again["ran"] == 0 and again["skipped"] == 8
    assert time.perf_counter() - start < max(5.0, first / 4)


def test_failed_cell_is_recorded_and_the_sweep_continues(tmp_path):
    cfg = tiny_config(mixers={"bogus": "no_such_mixer", "attention": "attention"})
    results = run_experiment(cfg, out_dir=tmp_path, progress=False)
    cells = {c["mixer"]: c for c in results["cells"].values()}
    assert cells["bogus"]["status"] == "failed" and "unknown mixer 'no_such_mixer'" in cells["bogus"]["error"]
    assert cells["attention"]["status"] == "ok"  # the cell after the failure still ran
    md = (tmp_path / "tiny.md").read_text()
    assert "## Failed cells" in md and "| bogus | 16 |" in md and "failed" in md
    best = {b["mixer"]: b for b in results["best"]}
    assert best["bogus"]["status"] == "failed" and best["attention"]["status"] == "ok"
    # Failed cells are skipped on resume unless asked to retry.
    assert run_experiment(cfg, out_dir=tmp_path, progress=False)["ran"] == 0
    assert run_experiment(cfg, out_dir=tmp_path, progress=False, retry_failed=True)["ran"] == 1


def test_resume_runs_only_new_or_changed_cells(tmp_path):
    run_experiment(tiny_config(), out_dir=tmp_path, progress=False)
    wider = run_experiment(tiny_config(learning_rates=[1e-3, 3e-3]), out_dir=tmp_path, progress=False)
    assert wider["ran"] == 1 and wider["skipped"] == 1
    assert len(wider["best"]) == 1 and set(wider["best"][0]["accuracy_by_lr"]) == {"0.001", "0.003"}
    changed = tiny_config(learning_rates=[1e-3, 3e-3])
    changed["train"] = {**changed["train"], "steps": 4}  # a different recipe invalidates the cells
    assert run_experiment(changed, out_dir=tmp_path, progress=False)["ran"] == 2


def test_only_runs_the_selected_cells(tmp_path):
    cfg = tiny_config(mixers={"attention": "attention", "window": {"type": "sliding_window", "window": 4}})
    first = run_experiment(cfg, out_dir=tmp_path, progress=False, only=["|window|"])
    assert first["ran"] == 1 and first["complete"] is False
    assert [c["mixer"] for c in first["cells"].values()] == ["window"]
    rest = run_experiment(cfg, out_dir=tmp_path, progress=False)
    assert rest["ran"] == 1 and rest["skipped"] == 1 and rest["complete"] is True


def test_exclude_leaves_holes_in_the_grid(tmp_path):
    cfg = tiny_config(mixers={"attention": "attention", "window": {"type": "sliding_window", "window": 4}},
                      widths=[16, 32], learning_rates=[1e-3, 3e-3],
                      exclude=[{"mixer": "window", "width": 32}, {"mixer": ["attention"], "lr": [3e-3], "width": 16}])
    ids = [c.id for c in plan_cells(load_experiment_config(cfg))]
    assert len(ids) == 8 - 2 - 1
    assert not any("|window|d=32|" in i for i in ids) and "seq_len=16,num_kv_pairs=2|attention|d=16|lr=0.003" not in ids
    assert "seq_len=16,num_kv_pairs=2|attention|d=32|lr=0.003" in ids
    # By setting label too; the fingerprints of the cells left are those of the full grid.
    full = {c.id: c.fingerprint for c in plan_cells(load_experiment_config(tiny_config(widths=[16, 32])))}
    some = plan_cells(load_experiment_config(tiny_config(widths=[16, 32], exclude=[{"setting": "seq_len=16,num_kv_pairs=2", "width": 16}])))
    assert [c.id for c in some] == ["seq_len=16,num_kv_pairs=2|attention|d=32|lr=0.001"] and some[0].fingerprint == full[some[0].id]
    # The run is complete without the excluded cells.
    results = run_experiment(tiny_config(widths=[16, 32], exclude=[{"width": 32}]), out_dir=tmp_path, progress=False)
    assert results["ran"] == 1 and results["complete"] is True
    for bad, match in (
        ([{"mixer": "nope"}], "matches no cell"),
        ([{"width": 64}], "matches no cell"),
        ([{"colour": "red"}], "unknown key"),
        ([{}], "non-empty mappings"),
        ("attention", "non-empty mappings"),
        ([{"width": "16"}], "width must be ints"),
        ([{"width": [16, 32]}], "leaves no cell"),
    ):
        with pytest.raises(ValueError, match=match):
            plan_cells(load_experiment_config(tiny_config(widths=[16, 32], exclude=bad)))


def test_time_budget_stops_and_a_later_run_completes(tmp_path):
    partial = run_experiment(tiny_config(), out_dir=tmp_path, progress=False, time_budget_s=0)
    assert partial["ran"] == 0 and partial["complete"] is False
    assert "1 not run yet" in (tmp_path / "tiny.md").read_text()
    done = run_experiment(tiny_config(), out_dir=tmp_path, progress=False)
    assert done["ran"] == 1 and done["complete"] is True


def test_best_learning_rate_is_reported_per_group(tmp_path):
    results = run_experiment(tiny_config(learning_rates=[1e-5, 3e-2], train={**tiny_config()["train"], "steps": 20}),
                             out_dir=tmp_path, progress=False)
    (best,) = results["best"]
    accs = {c["lr"]: c["accuracy"] for c in results["cells"].values()}
    assert best["accuracy"] == max(accs.values()) and accs[best["best_lr"]] == best["accuracy"]


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        load_experiment_config(tiny_config(steps=3))
    cfg = tiny_config()
    del cfg["widths"]
    with pytest.raises(ValueError, match="missing required key"):
        load_experiment_config(cfg)
    with pytest.raises(ValueError, match="widths must be positive ints"):
        load_experiment_config(tiny_config(widths=[0]))
    with pytest.raises(ValueError, match="unknown task"):
        load_experiment_config(tiny_config(task="nope"))
    with pytest.raises(ValueError, match="set by the sweep"):
        load_experiment_config(tiny_config(model={"hidden_size": 8}))
    with pytest.raises(FileNotFoundError):
        load_experiment_config(tmp_path / "missing.yaml")
    # A task-level error (V <= L) is a failed cell, not a crash of the sweep.
    bad = run_experiment(tiny_config(task_params={"vocab_size": 16}), out_dir=tmp_path, progress=False)
    (cell,) = bad["cells"].values()
    assert cell["status"] == "failed" and "V > L" in cell["error"]


def test_mqar_config_is_the_zoology_recipe():
    cfg = load_experiment_config(MQAR)
    assert cfg["task_params"]["vocab_size"] == 8192
    assert [(s["seq_len"], s["num_kv_pairs"]) for s in cfg["settings"]] == [(64, 4), (128, 8), (256, 16), (512, 64)]
    assert cfg["model"]["num_hidden_layers"] == 2 and cfg["model"]["intermediate_size"] == 0
    assert cfg["widths"] == [64, 128, 256, 512] and len(cfg["learning_rates"]) == 4
    assert set(cfg["mixers"]) == {"attention", "sliding_window"}
    assert len(plan_cells(cfg)) == 4 * 2 * 4 * 4
    quick = load_experiment_config(MQAR, quick=True)
    assert quick["experiment"] == "mqar-quick" and quick["task_params"]["vocab_size"] == 128


def test_passkey_config_parses_and_its_quick_mode_runs(tmp_path):
    cfg = load_experiment_config(PASSKEY)
    cells = plan_cells(cfg)
    assert len(cells) == 1 * 2 * 2 * 2
    lengths = [e["length"] for e in cells[0].evals]
    assert cells[0].task_params["length"] == 512 and lengths == [1024, 2048, 4096, 8192, 16384]  # 2x-32x
    results = run_experiment(PASSKEY, quick=True, out_dir=tmp_path, progress=False)
    (cell,) = results["cells"].values()
    assert cell["status"] == "ok" and cell["metric"] == "sequence_accuracy"
    assert [e["seq_len"] for e in cell["evals"]] == [320]
    assert (tmp_path / "passkey-quick_seq_len.png").is_file()


def test_report_only_rewrites_the_report_from_stored_results(tmp_path):
    cfg = tiny_config()
    first = run_experiment(cfg, out_dir=tmp_path, progress=False)
    path = tmp_path / f"{first['experiment']}.json"
    stored = json.loads(path.read_text())
    stored["environment"] = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130"}  # as copied back from a GPU
    path.write_text(json.dumps(stored))
    (tmp_path / f"{first['experiment']}.md").unlink()
    again = run_experiment(cfg, out_dir=tmp_path, progress=False, report_only=True)
    assert again["ran"] == 0 and again["environment"]["device"] == "NVIDIA H100 80GB HBM3"
    assert "NVIDIA H100" in (tmp_path / f"{first['experiment']}.md").read_text()
    with pytest.raises(FileNotFoundError, match="no results file"):
        run_experiment(cfg, out_dir=tmp_path / "empty", progress=False, report_only=True)


def test_routing_cells_train_the_centroids(tmp_path, monkeypatch):
    """A routing mixer in a sweep gets what `mnemo train` gives it: the commitment loss in each
    backward and one online k-means step of its centroids after each optimiser step."""
    import mnemotorch.layers.routing as routing

    calls = {"aux": 0, "update": 0}
    aux, update = routing.routing_aux_loss, routing.update_routing_centroids

    def counted_aux(model):
        calls["aux"] += 1
        return aux(model)

    def counted_update(model, sync=True):
        calls["update"] += 1
        return update(model, sync=sync)

    monkeypatch.setattr(routing, "routing_aux_loss", counted_aux)
    monkeypatch.setattr(routing, "update_routing_centroids", counted_update)
    cfg = tiny_config(mixers={"routing": {"type": "routing", "num_clusters": 2}})
    path = tmp_path / "tiny.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    result = run_experiment(path, out_dir=tmp_path, progress=False)
    assert result["ran"] == 1
    cell = next(iter(json.loads((tmp_path / "tiny.json").read_text())["cells"].values()))
    assert cell["status"] == "ok", cell
    assert calls == {"aux": 3, "update": 3}


def test_test_mode_switches_landmark_layers_after_training(tmp_path, monkeypatch):
    """A spec's test_mode (landmark: trained exact, scored in retrieval mode, as in the paper) is
    applied to the layers built from that spec after the last training step and before scoring,
    and the cell's JSON records it; other layers and cells are untouched."""
    from mnemotorch.layers.landmark import LandmarkAttention

    seen = []
    forward = LandmarkAttention.forward

    def recording_forward(self, *args, **kwargs):
        seen.append((self.training, self.mode, self.top_k))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LandmarkAttention, "forward", recording_forward)
    landmark = {"type": "landmark", "block_len": 3, "mode": "exact", "test_mode": {"mode": "retrieval", "top_k": 2}}
    cfg = tiny_config(
        model={"num_hidden_layers": 2, "num_attention_heads": 1, "intermediate_size": 0},
        mixers={"landmark": landmark, "hybrid": [landmark, "attention"], "attention": "attention"},
    )
    cells = {c.mixer: c for c in plan_cells(load_experiment_config(cfg))}
    assert cells["landmark"].layer_plan == {"type": "landmark", "block_len": 3, "mode": "exact"}
    assert cells["hybrid"].test_mode == [{"mode": "retrieval", "top_k": 2}, None]
    assert cells["attention"].test_mode is None
    result = run_experiment(cfg, out_dir=tmp_path, progress=False)
    assert result["ran"] == 3
    stored = json.loads((tmp_path / "tiny.json").read_text())["cells"]
    by_mixer = {c["mixer"]: c for c in stored.values()}
    assert all(c["status"] == "ok" for c in by_mixer.values()), by_mixer
    assert by_mixer["landmark"]["test_mode"] == [{"mode": "retrieval", "top_k": 2}]
    assert by_mixer["landmark"]["test_mode_layers"] == [
        {"layer": i, "type": "landmark", "mode": "retrieval", "top_k": 2} for i in (0, 1)
    ]
    assert by_mixer["hybrid"]["test_mode_layers"] == [{"layer": 0, "type": "landmark", "mode": "retrieval", "top_k": 2}]
    assert "test_mode" not in by_mixer["attention"] and "test_mode_layers" not in by_mixer["attention"]
    # 3 training steps (exact) then scoring (retrieval, top-2) for each landmark layer: 2 + 1 of them
    training = [s for s in seen if s[0]]
    scoring = [s for s in seen if not s[0]]
    assert len(training) == 3 * 3 and set(training) == {(True, "exact", 4)}
    assert scoring and set(scoring) == {(False, "retrieval", 2)}


def test_test_mode_errors(tmp_path):
    with pytest.raises(ValueError, match="mixers.attention: mixer 'attention' has no set_mode"):
        load_experiment_config(tiny_config(mixers={"attention": {"type": "attention", "test_mode": {"mode": "retrieval"}}}))
    with pytest.raises(ValueError, match=r"mixers.mix\[1\]: mixer 'sliding_window' has no set_mode"):
        load_experiment_config(tiny_config(mixers={"mix": ["attention", {"type": "sliding_window", "window": 4, "test_mode": {"mode": "x"}}]}))
    with pytest.raises(ValueError, match="must be a mapping with a 'mode' key"):
        load_experiment_config(tiny_config(mixers={"lm": {"type": "landmark", "test_mode": "retrieval"}}))
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['k'\]"):
        load_experiment_config(tiny_config(mixers={"lm": {"type": "landmark", "test_mode": {"mode": "retrieval", "k": 2}}}))
    # a bad value fails the cell before training, not after it
    bad = run_experiment(tiny_config(mixers={"lm": {"type": "landmark", "block_len": 3, "test_mode": {"mode": "nope"}}}),
                         out_dir=tmp_path, progress=False)
    (cell,) = bad["cells"].values()
    assert cell["status"] == "failed" and "mode must be one of" in cell["error"] and "loss_curve" not in cell


LANDMARK_TOKENS = {"type": "landmark", "block_len": 3, "mode": "exact", "landmark_tokens": True,
                   "test_mode": {"mode": "retrieval", "top_k": 2}}


def test_landmark_tokens_in_every_batch_score_the_same_positions(tmp_path, monkeypatch):
    """landmark_tokens: true puts a dedicated token (id = the task's vocab_size) at every position
    p % (l + 1) == l of every training and test batch; without the landmarks each batch is the one
    the attention cell gets (same inputs, same labels), so loss and scores cover the same original
    positions. The cell JSON and the fingerprint record the option; the vocab grows by one."""
    import torch

    from mnemotorch.bench import experiment
    from mnemotorch.ops.landmark import check_landmarks, landmark_positions, remove_landmarks

    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    to_device = experiment._to_device

    def recording_to_device(x, labels, device):
        batches.append((x.clone(), labels.clone()))
        return to_device(x, labels, device)

    monkeypatch.setattr(experiment, "_to_device", recording_to_device)
    cfg = tiny_config(
        settings=[{"seq_len": 16, "num_kv_pairs": 2, "eval": [{"seq_len": 32, "num_kv_pairs": 2}]}],
        mixers={"attention": "attention", "landmark": LANDMARK_TOKENS},
    )
    seen = {}
    for mixer in ("attention", "landmark"):
        batches.clear()
        assert run_experiment(cfg, out_dir=tmp_path, progress=False, only=[f"|{mixer}|"])["ran"] == 1
        seen[mixer] = list(batches)
    assert len(seen["landmark"]) == len(seen["attention"]) == 3 + 1 + 1  # 3 steps, then test at 16 and 32
    for (x, y), (x0, y0) in zip(seen["landmark"], seen["attention"]):
        check_landmarks(x, 3, 64)  # the layout the mixer reads, and no stray landmark token
        assert x.shape[1] == x0.shape[1] + x0.shape[1] // 3
        assert (y[:, landmark_positions(x.shape[1], 3)] == -100).all()
        assert remove_landmarks(x, 3, dim=1).equal(x0) and remove_landmarks(y, 3, dim=1).equal(y0)

    cells = {c["mixer"]: c for c in json.loads((tmp_path / "tiny.json").read_text())["cells"].values()}
    lm, att = cells["landmark"], cells["attention"]
    assert lm["status"] == att["status"] == "ok", (lm, att)
    assert lm["landmark_tokens"] == {"block_len": 3, "landmark_id": 64} and lm["vocab_size"] == 65 and att["vocab_size"] == 64
    assert "landmark_tokens" not in att and "input_len" not in att
    assert lm["params"] == att["params"] + 16  # one more row of the tied embedding (width 16)
    assert (lm["seq_len"], lm["input_len"]) == (16, 21) and [(e["seq_len"], e["input_len"]) for e in lm["evals"]] == [(32, 42)]
    assert lm["test_mode_layers"] == [{"layer": 0, "type": "landmark", "mode": "retrieval", "top_k": 2}]
    # the option is in the fingerprint (results without it are not reused); other cells keep theirs
    without = dict(LANDMARK_TOKENS)
    del without["landmark_tokens"]
    a = {c.mixer: c for c in plan_cells(load_experiment_config(cfg))}
    b = {c.mixer: c for c in plan_cells(load_experiment_config({**cfg, "mixers": {"attention": "attention", "landmark": without}}))}
    assert a["landmark"].landmark_tokens == {"block_len": 3} and b["landmark"].landmark_tokens is None
    assert a["landmark"].layer_plan == b["landmark"].layer_plan == {"type": "landmark", "block_len": 3, "mode": "exact"}
    assert a["landmark"].fingerprint != b["landmark"].fingerprint and a["attention"].fingerprint == b["attention"].fingerprint
    off = {c.mixer: c for c in plan_cells(load_experiment_config({**cfg, "mixers": {"landmark": {**without, "landmark_tokens": False}}}))}
    assert off["landmark"].fingerprint == b["landmark"].fingerprint  # false is the default


def test_landmark_tokens_errors(tmp_path):
    def load(plan):
        return load_experiment_config(tiny_config(mixers={"m": plan}))

    with pytest.raises(ValueError, match=r"mixers.m: landmark_tokens: true .* mixer 'attention' has no such layout .*for: landmark"):
        load({"type": "attention", "landmark_tokens": True})
    with pytest.raises(ValueError, match=r"mixers.m\[0\]: .* mixer 'hybrid' has no such layout"):
        load([{"type": "hybrid", "mixers": ["short_conv", {"type": "landmark", "block_len": 3}], "landmark_tokens": True}, "attention"])
    with pytest.raises(ValueError, match="landmark_tokens must be true or false, got 'yes'"):
        load({"type": "landmark", "landmark_tokens": "yes"})
    with pytest.raises(ValueError, match=r"mixers.m\[1\]: another layer of this plan sets landmark_tokens: true"):
        load([LANDMARK_TOKENS, {"type": "landmark", "block_len": 3}])
    with pytest.raises(ValueError, match=r"mixers.m\[1\]: another layer"):
        load([LANDMARK_TOKENS, "landmark"])
    with pytest.raises(ValueError, match=r"must share one block_len .* got \[3, 4\]"):
        load([LANDMARK_TOKENS, {**LANDMARK_TOKENS, "block_len": 4}])
    # without block_len the mixer's own default (the paper's 50) gives the layout
    (cell,) = plan_cells(load({"type": "landmark", "landmark_tokens": True}))
    assert cell.landmark_tokens == {"block_len": 50}
    # mixed plans are fine when every landmark layer agrees; other layers just see the tokens
    (cell,) = plan_cells(load([LANDMARK_TOKENS, "attention"]))
    assert cell.landmark_tokens == {"block_len": 3} and cell.layer_plan[1] == "attention"
    # a landmark hidden in a composite mixer with another layout fails the cell before training
    plan = [LANDMARK_TOKENS, {"type": "hybrid", "mixers": ["short_conv", {"type": "landmark", "block_len": 4}]}]
    bad = run_experiment(tiny_config(mixers={"m": plan}, model={"num_hidden_layers": 2, "num_attention_heads": 1, "intermediate_size": 0}),
                         out_dir=tmp_path, progress=False)
    (cell,) = bad["cells"].values()
    assert cell["status"] == "failed" and "landmark layers have block_len [3, 4]" in cell["error"] and "loss_curve" not in cell


def passkey_config(length_jitter=None, **over) -> dict:
    """A tiny passkey sweep (byte tokenizer, no instruction: the prompt without haystack is 103 bytes)."""
    train = {"steps": 8, "batch_size": 4, "eval_batch_size": 4, "device": "cpu", "cpu_threads": 1}
    if length_jitter is not None:
        train["length_jitter"] = length_jitter
    return tiny_config(
        task="needle", task_params={"kind": "passkey", "haystack": "synthetic", "tokenizer": "byte", "instruction": False},
        settings=[{"length": 120, "eval": [{"length": 131}]}], data={"num_train": 24, "num_test": 4}, train=train, **over,
    )


def recorded_batches(monkeypatch):
    import torch

    from mnemotorch.bench import experiment

    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    to_device = experiment._to_device

    def recording_to_device(x, labels, device):
        batches.append((x.clone(), labels.clone()))
        return to_device(x, labels, device)

    monkeypatch.setattr(experiment, "_to_device", recording_to_device)
    return batches


def test_length_jitter_trains_at_several_lengths(tmp_path, monkeypatch):
    """train.length_jitter = P: each step's batch is at one length L - r, r in [0, P), with landmark
    tokens laid out for that length; the tests keep their lengths; the cell JSON, the resolved config
    and the fingerprint record the option."""
    from mnemotorch.ops.landmark import check_landmarks, remove_landmarks

    batches = recorded_batches(monkeypatch)
    cfg = passkey_config(length_jitter=8, mixers={"attention": "attention", "landmark": LANDMARK_TOKENS})
    seen = {}
    for mixer in ("attention", "landmark"):
        batches.clear()
        assert run_experiment(cfg, out_dir=tmp_path, progress=False, only=[f"|{mixer}|"])["ran"] == 1
        seen[mixer] = list(batches)
    train, tests = seen["attention"][:8], seen["attention"][8:]
    lengths = [x.shape[1] for x, _ in train]
    assert len(set(lengths)) >= 2 and all(113 <= n <= 120 for n in lengths), lengths
    assert [x.shape for x, _ in tests] == [(4, 120), (4, 131)]  # the test sets are unchanged
    assert len(seen["landmark"]) == len(seen["attention"])
    for (x, y), (x0, y0) in zip(seen["landmark"], seen["attention"]):  # same batches, with landmarks
        check_landmarks(x, 3, 257)
        assert remove_landmarks(x, 3, dim=1).equal(x0) and remove_landmarks(y, 3, dim=1).equal(y0)

    results = json.loads((tmp_path / "tiny.json").read_text())
    assert results["config"]["train"]["length_jitter"] == 8
    for c in results["cells"].values():
        assert c["status"] == "ok", c
        assert c["length_jitter"] == 8 and c["train_lengths"] == [113, 120] and c["seq_len"] == 120
        assert [e["seq_len"] for e in c["evals"]] == [131]
    jittered = {c.mixer: c.fingerprint for c in plan_cells(load_experiment_config(cfg))}
    plain = {c.mixer: c.fingerprint for c in plan_cells(load_experiment_config(passkey_config(mixers=cfg["mixers"])))}
    assert all(jittered[m] != plain[m] for m in plain)
    assert "r uniform in [0, 8) per step (length_jitter)" in (tmp_path / "tiny.md").read_text()


def test_length_jitter_examples_keep_their_needle_and_answer():
    """Every training example at a shorter length is built whole: one needle, the question, and
    the answer labels at the end; P sets of L - r tokens holding num_train examples in all,
    different pass keys per set, the same sets for the same seed."""
    import re

    from mnemotorch.bench import experiment
    from mnemotorch.tasks import ByteTokenizer

    tok = ByteTokenizer()
    params = passkey_config()["task_params"] | {"length": 120}
    sets = experiment._make_train_sets("needle", {"num_train": 26, "seed": 0}, params, 8)
    assert [d.seq_len for d in sets] == list(range(120, 112, -1))
    assert [d.input_ids.shape[0] for d in sets] == [4, 4, 3, 3, 3, 3, 3, 3]
    keys = []
    for d in sets:
        for ids, labels in zip(d.input_ids, d.labels):
            text = tok.decode(ids.tolist())
            needles = re.findall(r"The pass key is (\d{5})\. Remember it\. (\d{5}) is the pass key\.", text)
            assert len(needles) == 1 and needles[0][0] == needles[0][1], text
            key = needles[0][0]
            assert text.endswith(f"\nWhat is the pass key? The pass key is {key}"), text
            scored = (labels != -100).nonzero().squeeze(1).tolist()
            n = d.seq_len
            assert scored == list(range(n - 7, n - 1))  # the last prompt token and the answer but its last
            assert tok.decode(labels[scored].tolist()) == f" {key}"
            keys.append(key)
    assert len(set(keys)) > len(keys) // 2  # the sets are not copies of one another
    again = experiment._make_train_sets("needle", {"num_train": 26, "seed": 0}, params, 8)
    assert all(a.input_ids.equal(b.input_ids) and a.labels.equal(b.labels) for a, b in zip(sets, again))


def test_length_jitter_zero_is_the_unjittered_runner(tmp_path, monkeypatch):
    """length_jitter 0 (explicit or by default) trains on exactly the batches of the runner before
    the option (one training set, one generator: epochs of random permutations) and keeps every
    earlier cell fingerprint."""
    import torch

    from mnemotorch.tasks.synthetic import make_task

    batches = recorded_batches(monkeypatch)
    steps, bs, n = 7, 5, 12  # past the end of an epoch twice
    cfg = tiny_config(data={"num_train": n, "num_test": 8},
                      train={"steps": steps, "batch_size": bs, "eval_batch_size": 8, "device": "cpu", "cpu_threads": 1})
    data = make_task("mqar", n, seed=0, seq_len=16, num_kv_pairs=2, vocab_size=64)
    gen = torch.Generator().manual_seed(0)
    order, pos, expected = torch.randperm(n, generator=gen), 0, []
    for _ in range(steps):
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + bs]
        pos += bs
        expected.append((data.input_ids[idx], data.labels[idx]))
    for jitter in (None, 0):
        batches.clear()
        c = dict(cfg, train={**cfg["train"], **({} if jitter is None else {"length_jitter": jitter})})
        run_experiment(c, out_dir=tmp_path / str(jitter), progress=False)
        assert len(batches) == steps + 1
        for (x, y), (x0, y0) in zip(batches, expected):
            assert x.equal(x0) and y.equal(y0)
        (cell,) = json.loads((tmp_path / str(jitter) / "tiny.json").read_text())["cells"].values()
        assert "length_jitter" not in cell and "train_lengths" not in cell
    # results stored before the option keep their fingerprints
    for name in ("passkey_routed", "mqar_linear"):
        stored = json.loads((REPO / "docs" / "results" / f"{name}.json").read_text())["cells"]
        for cell in plan_cells(load_experiment_config(REPO / "configs" / f"{name}.yaml")):
            assert stored[cell.id]["fingerprint"] == cell.fingerprint, cell.id


def test_length_jitter_validation():
    for bad in (-1, True, 1.5, "8"):
        with pytest.raises(ValueError, match=r"train.length_jitter must be an int >= 0"):
            load_experiment_config(passkey_config(length_jitter=bad))
    with pytest.raises(ValueError, match=r"train.length_jitter=120 must be smaller than settings\[0\].length=120"):
        load_experiment_config(passkey_config(length_jitter=120))
    with pytest.raises(ValueError, match=r"train.length_jitter=30 splits .* data.num_train \(24\) must be at least 30"):
        load_experiment_config(passkey_config(length_jitter=30))
    with pytest.raises(ValueError, match=r"train.length_jitter=4 is not supported for task 'mqar'"):
        load_experiment_config(tiny_config(train={"length_jitter": 4}))
    assert load_experiment_config(tiny_config(train={"length_jitter": 0}))["train"]["length_jitter"] == 0
    assert load_experiment_config(tiny_config())["train"]["length_jitter"] == 0
    # a training length too short for the task's prompt: the cell fails with the option named
    from mnemotorch.bench import experiment

    with pytest.raises(ValueError, match=r"train.length_jitter=21: the training examples at length=102: .*shorter than"):
        experiment._make_train_sets("needle", {"num_train": 21, "seed": 0}, passkey_config()["task_params"] | {"length": 122}, 21)
