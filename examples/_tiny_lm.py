"""Shared by the analysis examples: train a tiny byte-level attention LM on the bundled Tiny
Shakespeare with mnemotorch's Trainer (as `mnemo train` does), or load a checkpoint (``--model``)."""

from __future__ import annotations

import time


def train_or_load(args):
    from mnemotorch.train import Trainer, load_config
    from mnemotorch.train.checkpoint import load_checkpoint_tokenizer, load_model

    if args.model:
        return load_model(args.model).eval(), load_checkpoint_tokenizer(args.model), {"checkpoint": args.model}
    overrides = [
        f"steps={args.steps}", f"batch_size={args.batch_size}", "data.seq_len=128", f"eval_interval={args.steps}", "eval_batches=4",
        "log_interval=50", "save_interval=0", "device=cpu", "resume=none", f"out_dir={args.run_dir}", f"seed={args.seed}",
        f"model.hidden_size={args.dim}", f"model.num_hidden_layers={args.layers}", "model.num_attention_heads=4",
        'model.layer_plan="attention"', "optim.lr=3e-3",
    ]
    t0 = time.time()
    trainer = Trainer(load_config(None, overrides), progress=False, verbose=False)
    summary = trainer.fit()
    info = {"steps": summary["steps"], "val_loss": round(float(summary["val_loss"]), 4), "train_seconds": round(time.time() - t0, 1),
            "layers": args.layers, "dim": args.dim, "checkpoint": f"{args.run_dir}/checkpoint"}
    return trainer.model.eval(), trainer.tokenizer, info
