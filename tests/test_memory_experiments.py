"""configs/mqar_memory.yaml and configs/passkey_titans.yaml (issue #5's quality runs): the grids are the
ones the configs' headers and the summary pages describe (cells, holes, state sizes, the
equal-parameter pairs, the 4x / 16x test lengths, the anchors), and the summary pages have the
markers scripts/gpu_mqar_linear.sh fills. Builds models, trains nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from mnemotorch.bench import load_experiment_config, plan_cells
from mnemotorch.models import MnemoConfig, MnemoForCausalLM
from mnemotorch.tasks import ByteTokenizer

REPO = Path(__file__).resolve().parents[1]
MQAR = REPO / "configs" / "mqar_memory.yaml"
PASSKEY = REPO / "configs" / "passkey_titans.yaml"


def build(cfg, cell, vocab):
    return MnemoForCausalLM(MnemoConfig(vocab_size=vocab, hidden_size=cell.width, layer_plan=cell.layer_plan, **cfg["model"]))


def test_mqar_memory_grid_and_state_sizes():
    cfg = load_experiment_config(MQAR)
    cells = plan_cells(cfg)
    lr_lo, lr_mid, lr_hi = 4.6416e-4, 2.1544e-3, 1.0e-2
    want = [(m, w, lr_mid) for m in ("attention", "titans_lmm", "gated_delta_net", "delta_net") for w in (64, 128)]
    want += [("moneta", 64, lr_mid), ("titans_lmm_c16", 64, lr_mid)]  # the first run's grid + the chunk-16 probe
    want += [(m, w, lr) for m, w in (("attention", 64), ("titans_lmm", 64), ("titans_lmm", 128), ("moneta", 64)) for lr in (lr_lo, lr_hi)]
    want += [(m, 64, lr) for m in ("titans_lmm_linear_lr1", "titans_lmm_lr1") for lr in (lr_lo, lr_mid)]  # write-strength probes
    assert sorted((c.mixer, c.width, c.lr) for c in cells) == sorted(want)
    (setting,) = cfg["settings"]
    assert (setting["seq_len"], setting["num_kv_pairs"]) == (128, 8) and cfg["train"]["precision"] == "fp32"
    for c in cells:  # Zoology's layout: the conv layer, then one layer of the memory
        if c.mixer != "attention":
            assert c.layer_plan[0] == {"type": "short_conv", "kernel_size": 3} and c.layer_plan[1]["type"] == ("titans_lmm" if c.mixer.startswith("titans_lmm") else c.mixer)
    # The state sizes the summary page's accounting table gives (L = 128).
    sizes = {(c.mixer, c.width): build(cfg, c, 8192).state_size(128) for c in cells}
    assert sizes == {
        ("attention", 64): 32768, ("attention", 128): 65536,
        ("titans_lmm", 64): 25408, ("titans_lmm", 128): 99968,
        ("gated_delta_net", 64): 4928, ("gated_delta_net", 128): 18048,
        ("delta_net", 64): 4928, ("delta_net", 128): 18048,
        ("moneta", 64): 17216, ("titans_lmm_c16", 64): 25408, ("titans_lmm_lr1", 64): 25408,
        ("titans_lmm_linear_lr1", 64): 3 * 64 * 64 + 9 * 64 + 4 * 64,
    }
    quick = load_experiment_config(MQAR, quick=True)
    assert set(quick["mixers"]) == set(cfg["mixers"]) and len(plan_cells(quick)) == 12


def test_passkey_titans_grid_equal_parameters_and_anchors():
    cfg = load_experiment_config(PASSKEY)
    cells = plan_cells(cfg)
    assert sorted((c.mixer, c.width) for c in cells) == sorted(
        [("titans_mac", 128), ("titans_mag", 128)] + [(m, w) for m in ("attention", "sliding_window", "swa_attention") for w in (128, 160)]
    )
    (setting,) = cfg["settings"]
    assert setting["length"] == 512 and [e["length"] // 512 for e in setting["eval"]] == [4, 16]
    params = {(c.mixer, c.width): sum(p.numel() for p in build(cfg, c, ByteTokenizer().vocab_size).parameters()) for c in cells}
    assert params[("titans_mac", 128)] == params[("titans_mag", 128)] == 639_256
    for m in ("attention", "sliding_window", "swa_attention"):
        assert params[(m, 160)] == 676_800 and params[(m, 128)] == 459_520
        assert params[(m, 160)] / params[("titans_mac", 128)] == pytest.approx(1.0, abs=0.06)  # the equal-parameter pair
    accs = " ".join(str(a["accuracy"]) for a in cfg["anchors"])
    assert all(x in accs for x in ("0.984", "0.974", "0.962"))  # Titans Table 2, S-NIAH passkey at 16K
    quick = load_experiment_config(PASSKEY, quick=True)
    assert set(quick["mixers"]) == set(cfg["mixers"]) and len(plan_cells(quick)) == 8


@pytest.mark.parametrize("name", ["mqar_memory", "passkey_titans"])
def test_summary_pages_have_the_markers(name):
    text = (REPO / "docs" / "results" / f"{name}_summary.md").read_text(encoding="utf-8")
    for tag in ("table", "run"):
        assert f"<!-- {name}:{tag}:begin -->" in text and f"<!-- {name}:{tag}:end -->" in text
