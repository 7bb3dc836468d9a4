"""TrainConfig loading: TOML/YAML files, ``key=value`` overrides, strict key and type checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from mnemotorch.train import TrainConfig, config_from_dict, load_config
from mnemotorch.train.config import parse_override_value

REPO = Path(__file__).resolve().parents[2]

TOML = """
steps = 7
batch_size = 8
out_dir = "runs/x"
[model]
hidden_size = 64
layer_plan = [{ type = "sliding_window", window = 16 }, "attention", "attention", "attention"]
[data]
tokenizer = "bpe"
seq_len = 64
[optim]
lr = 1e-3
"""

YAML = """
steps: 7
batch_size: 8
out_dir: runs/x
model:
  hidden_size: 64
  layer_plan: [{type: sliding_window, window: 16}, attention, attention, attention]
data:
  tokenizer: bpe
  seq_len: 64
optim:
  lr: 1.0e-3
"""


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg == TrainConfig()
    assert cfg.model["hidden_size"] == 128 and cfg.data.tokenizer == "byte"


def test_toml_and_yaml_give_the_same_config(tmp_path):
    (tmp_path / "c.toml").write_text(TOML)
    (tmp_path / "c.yaml").write_text(YAML)
    a, b = load_config(tmp_path / "c.toml"), load_config(tmp_path / "c.yaml")
    assert a == b
    assert a.steps == 7 and a.optim.lr == 1e-3 and a.data.tokenizer == "bpe" and a.data.seq_len == 64
    assert a.model["layer_plan"][0] == {"type": "sliding_window", "window": 16}
    # A partial [model] table keeps the other defaults.
    assert a.model["num_attention_heads"] == 4 and a.model["hidden_size"] == 64
    # Untouched sections keep their defaults.
    assert a.optim.beta2 == 0.95 and a.data.val_fraction == 0.1


def test_overrides_are_parsed_as_toml_or_yaml_scalars(tmp_path):
    (tmp_path / "c.toml").write_text(TOML)
    cfg = load_config(tmp_path / "c.toml", [
        "steps=11", "optim.lr=2e-4", "out_dir=runs/with/slashes", "data.source=null", "stop_at_step=3",
        'model.layer_plan=[{type="sliding_window", window=8}, "attention", "attention", "attention"]',
        "optim.warmup_steps=0", "resume=none", "num_threads=2",
    ])
    assert cfg.steps == 11 and cfg.optim.lr == 2e-4 and cfg.out_dir == "runs/with/slashes"
    assert cfg.data.source is None and cfg.stop_at_step == 3 and cfg.resume == "none" and cfg.num_threads == 2
    assert cfg.model["layer_plan"][0] == {"type": "sliding_window", "window": 8}
    assert parse_override_value("1") == 1 and parse_override_value("1.5") == 1.5
    assert parse_override_value("true") is True and parse_override_value("abc") == "abc"
    assert parse_override_value("[1, 2]") == [1, 2]


def test_int_widens_to_float_but_bool_is_not_an_int():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ValueError, match="steps"):
        load_config(None, ["steps=true"])


@pytest.mark.parametrize("text, key", [
    ("stepz = 3\n", "stepz"),
    ("[optim]\nlearning_rate = 3\n", "optim.learning_rate"),
    ("[data]\nseqlen = 3\n", "data.seqlen"),
    ("[model]\nhidden_sz = 3\n", "model.hidden_sz"),
])
def test_unknown_key_in_file_is_named_with_valid_keys(tmp_path, text, key):
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(ValueError) as err:
        load_config(tmp_path / "c.toml")
    msg = str(err.value)
    assert repr(key) in msg and "valid keys" in msg
    section = key.split(".")[0] if "." in key else None
    expected = {"optim": "warmup_steps", "data": "seq_len", "model": "num_attention_heads", None: "batch_size"}[section]
    assert expected in msg


@pytest.mark.parametrize("override, key", [
    ("stepz=3", "stepz"), ("optim.lrr=1", "optim.lrr"), ("nope.lr=1", "nope"), ("model.hidden_sz=1", "model.hidden_sz"),
])
def test_unknown_key_in_override_is_named(override, key):
    with pytest.raises(ValueError, match="valid keys") as err:
        load_config(None, [override])
    assert repr(key) in str(err.value)


@pytest.mark.parametrize("override, field", [
    ("steps=abc", "steps"),
    ("optim.lr=fast", "optim.lr"),
    ("data.tokenizer=wordpiece", "data.tokenizer"),
    ("device=tpu", "device"),
    ("data.seq_len=1.5", "data.seq_len"),
    ("optim=3", "optim"),
])
def test_wrong_type_names_the_field(override, field):
    with pytest.raises(ValueError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(field)


@pytest.mark.parametrize("override, needle", [
    ("model.vocab_size=300", "vocab_size"),
    ("grad_accum=3", "grad_accum"),
    ("steps=0", "steps"),
    ("stop_at_step=500", "stop_at_step"),
    ("data.val_fraction=1.5", "val_fraction"),
    ("model.num_attention_heads=3", "model"),
    ("model.layer_plan=[\"no_such_mixer\"]", "model"),
])
def test_invalid_values_are_rejected(override, needle):
    with pytest.raises(ValueError, match=needle):
        load_config(None, [override])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["steps"])
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "c.ini").write_text("")
    with pytest.raises(ValueError, match="format"):
        load_config(tmp_path / "c.ini")


@pytest.mark.parametrize("name", ["tiny_shakespeare.toml", "hybrid_swa_attention.toml"])
def test_example_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.steps > 0
    if name.startswith("hybrid"):
        plan = cfg.model["layer_plan"]
        assert plan[0] == {"type": "sliding_window", "window": 64} and plan[1] == "attention"
        assert len(plan) == cfg.model["num_hidden_layers"]


def test_round_trip_through_dict():
    cfg = load_config(None, ["steps=5", "optim.lr=0.01"])
    assert config_from_dict(cfg.to_dict()) == cfg


def test_lm_loss_row_normalization_weighs_rows_equally():
    import torch

    import torch.nn.functional as F

    from mnemotorch.train.trainer import lm_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[1, :5] = -100  # a sparsely labelled row (one target)
    labels[2] = -100  # no target at all: skipped
    tok = lm_loss(logits, labels, "token")
    assert torch.allclose(tok, F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1)))
    per = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), reduction="none").view(3, 6)
    row0 = per[0].mean()
    row1 = per[1, 5]
    assert torch.allclose(lm_loss(logits, labels, "row"), (row0 + row1) / 2)
    with pytest.raises(ValueError, match="normalization"):
        lm_loss(logits, labels, "sequence")
