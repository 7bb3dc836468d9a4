"""configs/passkey_routed.yaml (issue #7: passkey at 4x-32x the training length for landmark and HCAM
beside attention): the grid is the one promised, every model has the same parameters but the
landmark models' one extra embedding row (their landmark token), and the quick mode's models build,
train a step and score the longer test lengths on CPU (landmark with its landmark tokens, in the
mode it is tested in)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

from mnemotorch.bench import load_experiment_config, plan_cells
from mnemotorch.layers.landmark import LandmarkAttention, set_landmark_mode
from mnemotorch.models import MnemoConfig, MnemoForCausalLM
from mnemotorch.ops.landmark import check_landmarks, insert_landmarks
from mnemotorch.tasks import ByteTokenizer
from mnemotorch.tasks.synthetic import make_task

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "passkey_routed.yaml"


def spec(plan):
    return {"type": plan} if isinstance(plan, str) else plan


def cells_by_mixer(cfg):
    """mixer -> its first cell (the layer plan it is built from, without test_mode, and its test mode)."""
    out = {}
    for cell in plan_cells(cfg):
        out.setdefault(cell.mixer, cell)
    return out


def build(cfg, cell, width):
    """The model the runner builds for ``cell``: landmark tokens get their own id past the bytes."""
    vocab = ByteTokenizer().vocab_size + (1 if cell.landmark_tokens else 0)
    config = MnemoConfig(vocab_size=vocab, hidden_size=width, layer_plan=cell.layer_plan, **cfg["model"])
    return MnemoForCausalLM(config)


def model_input(cell, ids):
    """What the runner feeds the cell's model: a landmark token after every block_len bytes, if asked."""
    if not cell.landmark_tokens:
        return ids
    return insert_landmarks(ids, cell.landmark_tokens["block_len"], ByteTokenizer().vocab_size)


def test_config_is_the_issue_grid():
    cfg = load_experiment_config(CONFIG)
    types = {name: spec(plan)["type"] for name, plan in cfg["mixers"].items()}
    assert {"attention", "landmark", "hcam", "sliding_window"} <= set(types.values())
    assert cfg["task"] == "needle" and cfg["task_params"] == {"kind": "passkey", "haystack": "synthetic", "tokenizer": "byte"}
    (setting,) = cfg["settings"]
    assert setting["length"] == 512
    assert [e["length"] // 512 for e in setting["eval"]] == [4, 8, 16, 32]
    # landmark as in the paper: trained with the exact grouped softmax, tested with top-k retrieval
    # (test_mode, applied by the runner after training); landmark_topk: top-k at train and test time.
    # Both keep their blocks on the device and retrieve fewer blocks than 512 tokens hold.
    cells = cells_by_mixer(cfg)
    paper, topk = cells["landmark"], cells["landmark_topk"]
    assert paper.layer_plan["mode"] == "exact" and "test_mode" not in paper.layer_plan
    (test_mode,) = paper.test_mode
    assert test_mode["mode"] == "retrieval"
    assert topk.layer_plan["mode"] == "retrieval" and topk.test_mode is None
    for cell, k in ((paper, test_mode["top_k"]), (topk, topk.layer_plan["top_k"])):
        assert cell.layer_plan["offload_device"] is None and k < 512 // (cell.layer_plan["block_len"] + 1)
    assert [c.mixer for c in cells.values() if c.test_mode] == ["landmark"]
    # both landmark models read dedicated landmark tokens, laid out with their own block length
    assert {c.mixer: c.landmark_tokens for c in cells.values() if c.landmark_tokens} == {
        name: {"block_len": cells[name].layer_plan["block_len"]} for name in ("landmark", "landmark_topk")
    }
    assert len(plan_cells(cfg)) == len(cfg["mixers"]) * len(cfg["widths"]) * len(cfg["learning_rates"])
    quick = load_experiment_config(CONFIG, quick=True)
    assert quick["experiment"] == "passkey_routed-quick" and set(quick["mixers"]) == set(cfg["mixers"])
    subprocess.run(["bash", "-n", str(REPO / "scripts" / "gpu_mqar_linear.sh")], check=True)


def test_every_model_has_the_same_parameters():
    """Same projections everywhere; the landmark models' vocabulary has one more token (the
    landmark), i.e. one more row of the tied embedding: + width parameters."""
    cfg = load_experiment_config(CONFIG)
    (width,) = cfg["widths"]
    cells = cells_by_mixer(cfg)
    counts = {name: sum(p.numel() for p in build(cfg, cell, width).parameters()) for name, cell in cells.items()}
    plain = {n: c for n, c in counts.items() if not cells[n].landmark_tokens}
    with_tokens = {n: c for n, c in counts.items() if cells[n].landmark_tokens}
    assert set(plain.values()) == {459_520}, counts
    assert set(with_tokens) == {"landmark", "landmark_topk"} and set(with_tokens.values()) == {459_520 + width} == {459_648}, counts


def test_quick_models_build_train_and_score_longer_inputs():
    cfg = load_experiment_config(CONFIG, quick=True)
    (setting,) = cfg["settings"]
    params = {**cfg["task_params"], **{k: v for k, v in setting.items() if k not in ("batch_size", "eval")}}
    train = make_task(cfg["task"], 2, seed=0, **params)
    longest = make_task(cfg["task"], 1, seed=1, **{**params, "length": setting["eval"][-1]["length"]})
    (width,) = cfg["widths"]
    for name, cell in cells_by_mixer(cfg).items():
        torch.manual_seed(0)
        model = build(cfg, cell, width)
        x = model_input(cell, train.input_ids)
        if cell.landmark_tokens:
            check_landmarks(x, cell.layer_plan["block_len"], ByteTokenizer().vocab_size)
        logits = model(input_ids=x).logits
        assert logits.shape == (*x.shape, model.config.vocab_size), name
        logits.float().logsumexp(-1).mean().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad), name
        model.eval()
        if cell.test_mode:
            (test_mode,) = cell.test_mode
            assert set_landmark_mode(model, **test_mode) == cfg["model"]["num_hidden_layers"], name
        assert all(m.mode == "retrieval" for m in model.modules() if isinstance(m, LandmarkAttention)), name  # both tested top-k
        with torch.no_grad():
            out = model(input_ids=model_input(cell, longest.input_ids)).logits
        assert torch.isfinite(out).all(), name


def test_quick_landmark_cells_run_with_landmark_tokens(tmp_path):
    """The runner on the quick config's landmark cells: trained and scored with a landmark token
    (id 257) after every block_len bytes, recorded in the cell JSON."""
    from mnemotorch.bench import run_experiment

    results = run_experiment(CONFIG, quick=True, out_dir=tmp_path, progress=False, only=["|landmark"])
    cells = {c["mixer"]: c for c in results["cells"].values()}
    assert set(cells) == {"landmark", "landmark_topk"} and results["ran"] == 2
    cfg = load_experiment_config(CONFIG, quick=True)
    (setting,) = cfg["settings"]
    for name, cell in cells.items():
        block_len = cfg["mixers"][name]["block_len"]
        assert cell["status"] == "ok", cell
        assert cell["landmark_tokens"] == {"block_len": block_len, "landmark_id": 257} and cell["vocab_size"] == 258
        lengths = [setting["length"]] + [e["length"] for e in setting["eval"]]
        assert [cell["input_len"]] + [e["input_len"] for e in cell["evals"]] == [n + n // block_len for n in lengths]
        assert [cell["seq_len"]] + [e["seq_len"] for e in cell["evals"]] == lengths


def test_jitter_config_is_the_phase_probe_trained_with_length_jitter():
    """configs/passkey_routed_jitter.yaml: the phase probe's task, model and training (twice the steps), with
    train.length_jitter covering every phase of the landmark blocks and HCAM chunks (also in quick
    mode), its landmark / hcam_nope mixers and attention with RoPE, and the promised test lengths."""
    phase = load_experiment_config(REPO / "configs" / "passkey_routed_phase.yaml")
    cfg = load_experiment_config(REPO / "configs" / "passkey_routed_jitter.yaml")
    assert cfg["train"] == {**phase["train"], "length_jitter": 64, "steps": 4000}  # twice the steps: 2,000 left it undertrained
    for key in ("task", "task_params", "data", "model", "widths", "learning_rates"):
        assert cfg[key] == phase[key], key
    (setting,), (phase_setting,) = cfg["settings"], phase["settings"]
    assert (setting["length"], setting["batch_size"]) == (phase_setting["length"], phase_setting["batch_size"]) == (512, 32)
    lengths = [498, 546, 2048, 2062, 4096, 4112, 8192, 8212, 16384, 16362, 16400]
    assert [(e["length"], e.get("eval_batch_size")) for e in setting["eval"]] == [(n, 16 if n >= 8192 else None) for n in lengths]
    assert list(cfg["mixers"]) == ["landmark_topk", "landmark", "hcam_nope", "attention"]
    assert all(cfg["mixers"][m] == phase["mixers"][m] for m in ("landmark_topk", "landmark", "hcam_nope"))
    assert cfg["mixers"]["attention"] == "attention"  # RoPE, as in passkey_routed.yaml
    for quick in (False, True):
        c = load_experiment_config(REPO / "configs" / "passkey_routed_jitter.yaml", quick=quick)
        blocks = [spec(p).get("block_len", spec(p).get("chunk_size")) for p in c["mixers"].values() if spec(p)["type"] != "attention"]
        assert blocks and all(c["train"]["length_jitter"] >= b for b in blocks), (quick, blocks)
