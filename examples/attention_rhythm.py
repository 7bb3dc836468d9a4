"""Train a tiny byte-level LM on Tiny Shakespeare, then plot its attention rhythm (WAAD / FAI).

    python examples/attention_rhythm.py                                   # about a minute on an idle 2-core CPU
    python examples/attention_rhythm.py --steps 600 --out docs/analysis/attention_rhythm.png

The model is trained with mnemotorch's own Trainer (as `mnemo train` does); the rhythm is measured
on a passage from the validation split (text the model never trained on). See
docs/analysis/attention_rhythm.md for the definitions (Preplan-and-Anchor, arXiv 2510.13554).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mnemotorch.analysis import attention_rhythm, plot_attention_rhythm
from mnemotorch.tasks.corpus import load_text, split_text
from mnemotorch.train import Trainer, load_config


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=120, help="length of the analysed passage")
    parser.add_argument("--run-dir", default="runs/attention_rhythm")
    parser.add_argument("--out", default="runs/attention_rhythm/attention_rhythm.png")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = [
        f"steps={args.steps}", f"batch_size={args.batch_size}", "data.seq_len=128", "eval_interval=100", "eval_batches=4",
        "log_interval=50", "save_interval=0", "device=cpu", "resume=none", f"out_dir={args.run_dir}",
        f"model.hidden_size={args.dim}", f"model.num_hidden_layers={args.layers}", "model.num_attention_heads=4",
        'model.layer_plan="attention"', "optim.lr=3e-3",
    ]
    t0 = time.time()
    trainer = Trainer(load_config(None, overrides), progress=False, verbose=False)
    summary = trainer.fit()
    train_s = time.time() - t0
    model, tok = trainer.model.eval(), trainer.tokenizer

    _, val = split_text(load_text("tinyshakespeare"), 0.1)
    start = val.index("\n\n") + 2  # the beginning of a speech
    ids = tok.encode(val[start:])[: args.tokens]
    rhythm = attention_rhythm(model, ids, tokenizer=tok)
    title = (f"{args.layers}x{args.dim} byte LM, {args.steps} steps (val loss {summary['val_loss']:.2f}): "
             f"local heads {rhythm.local_heads}, global heads {rhythm.global_heads}")
    plot_attention_rhythm(rhythm, args.out, title=title)

    result = {
        "steps": summary["steps"], "val_loss": round(float(summary["val_loss"]), 4), "train_seconds": round(train_s, 1),
        "layers_used": rhythm.settings["layers"], "local_heads": rhythm.local_heads, "global_heads": rhythm.global_heads,
        "spans": [[None if s != s else round(float(s), 2) for s in row] for row in rhythm.spans],
        "mean_waad": round(float(rhythm.waad.mean()), 3),
        "top_fai_tokens": sorted(
            ((round(float(f), 3), i, rhythm.tokens[i]) for i, f in enumerate(rhythm.fai.tolist()) if f == f), reverse=True
        )[:8],
        "plot": str(args.out),
    }
    print(json.dumps(result))
    Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
