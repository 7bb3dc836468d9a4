"""The trainer drives routing's explicit API: commitment loss in the backward, k-means step after each update."""

from __future__ import annotations

import torch

from mnemotorch.train import Trainer, config_from_dict


def test_trainer_updates_routing_centroids(tmp_path, monkeypatch) -> None:
    from mnemotorch.layers.routing import RoutingAttention

    calls = {"update": 0, "aux": 0}
    orig_update, orig_aux = RoutingAttention.update_centroids, RoutingAttention.routing_aux_loss

    def counting_update(self, *a, **k):
        calls["update"] += 1
        return orig_update(self, *a, **k)

    def counting_aux(self, *a, **k):
        calls["aux"] += 1
        return orig_aux(self, *a, **k)

    monkeypatch.setattr(RoutingAttention, "update_centroids", counting_update)
    monkeypatch.setattr(RoutingAttention, "routing_aux_loss", counting_aux)
    cfg = config_from_dict({
        "steps": 3, "batch_size": 4, "eval_interval": 3, "eval_batches": 1, "log_interval": 1, "save_interval": 0,
        "out_dir": str(tmp_path), "resume": "none", "device": "cpu",
        "model": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "layer_plan": [{"type": "routing", "num_clusters": 4, "top_w": 8}]},
        "data": {"seq_len": 32},
    })
    trainer = Trainer(cfg, progress=False, verbose=False)
    summary = trainer.fit()
    assert torch.isfinite(torch.tensor(summary["val_loss"]))
    assert calls == {"update": 3, "aux": 3}  # one layer, 3 optimizer steps, 1 micro-batch each
    mixers = [m for m in trainer.model.modules() if isinstance(m, RoutingAttention)]
    # the EMA counts start at 1 and move towards the observed cluster sizes
    assert mixers and not torch.allclose(mixers[0].ema_counts, torch.ones_like(mixers[0].ema_counts))
