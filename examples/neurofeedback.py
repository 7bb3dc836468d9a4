"""Neurofeedback reporting/control (Ji-An et al., 2025) on a tiny byte-level LM trained with our Trainer.

    python examples/neurofeedback.py --threads 2                             # trains ~1 min, then a few seconds of tasks
    python examples/neurofeedback.py --model runs/neurofeedback/checkpoint   # reuse a checkpoint

Sentences are lines of the Tiny Shakespeare validation split (text the model never trained on).
The axis is the first principal component of the mean residual stream at the middle layer; labels
are its median split (50/50). The model reporter is scored against chance (50%) and the oracle
reporter (100% by construction). See docs/analysis/neurofeedback.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _tiny_lm import train_or_load  # examples/_tiny_lm.py (the script's own folder is on sys.path)

from mnemotorch.analysis import NeurofeedbackProtocol
from mnemotorch.analysis._model import decoder_layers
from mnemotorch.tasks.corpus import load_text, split_text


def corpus_sentences(n: int) -> list[str]:
    """The first `n` distinct spoken lines (20-70 characters, not speaker names) of the validation split."""
    _, val = split_text(load_text("tinyshakespeare"), 0.1)
    out: list[str] = []
    for line in val.splitlines():
        line = line.strip()
        if 20 <= len(line) <= 70 and not line.endswith(":") and line not in out:
            out.append(line)
        if len(out) == n:
            break
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint dir to reuse (default: train a tiny model)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sentences", type=int, default=128)
    parser.add_argument("--context", type=int, default=8, help="in-context examples per query")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--run-dir", default="runs/neurofeedback")
    parser.add_argument("--out", default="runs/neurofeedback/neurofeedback.json")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()
    model, tok, info = train_or_load(args)
    layer = len(decoder_layers(model)) // 2  # the middle layer

    sentences = corpus_sentences(args.sentences)
    proto = NeurofeedbackProtocol(model, tok, layer=layer).fit(sentences, method="pca", component=0)
    t_task = time.time()
    reports = {}
    # threshold-free view of the model reporter: AUC of its logit margin logit("1") - logit("0") vs the truth
    first = [tok.encode(n)[0] for n in proto.label_names]
    margins: list[float] = []

    @torch.no_grad()
    def margin_reporter(prompt: str, sentence: str) -> int:
        logits = model(input_ids=torch.tensor([tok.encode(prompt)]), use_cache=False).logits[0, -1]
        margins.append(float(logits[first[1]] - logits[first[0]]))
        return int(margins[-1] > 0)

    r = proto.reporting_task(n_context=args.context, n_queries=args.queries, reporter=margin_reporter, seed=args.seed)
    pos = [m for m, t in zip(margins, r["targets"]) if t == 1]
    neg = [m for m, t in zip(margins, r["targets"]) if t == 0]
    auc = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))
    for name, rep in (("model", None), ("oracle", proto.oracle_reporter())):
        r = proto.reporting_task(n_context=args.context, n_queries=args.queries, reporter=rep, seed=args.seed)
        reports[name] = {"accuracy": r["accuracy"], "n": r["n"], "predicted_label_1_fraction": sum(r["predictions"]) / r["n"]}
    reports["model"]["margin_auc"] = round(auc, 4)
    reports["model"]["mean_margin"] = {"label_0": round(sum(neg) / len(neg), 4), "label_1": round(sum(pos) / len(pos), 4)}
    always_one = proto.reporting_task(n_context=args.context, n_queries=args.queries, reporter=lambda p, s: 1, seed=args.seed)
    reports["always_1"] = {"accuracy": always_one["accuracy"], "n": always_one["n"]}
    control = proto.control_task(n_context=args.context, n_queries=min(args.queries, 40), seed=args.seed)
    ordered = sorted(zip(proto.scores.tolist(), sentences))
    result = {
        "model": info, "layer": proto.layer, "axis": "PCA component 0", "n_sentences": len(sentences),
        "n_context": args.context, "chance": 0.5, "reporting": reports,
        "control": {"mean_a_target_0": round(control["mean_a"][0], 6), "mean_a_target_1": round(control["mean_a"][1], 6),
                    "difference": float(f"{control['difference']:.3g}"), "cohens_d": float(f"{control['cohens_d']:.3g}"), "n": control["n"]},
        "score_spread": {"min": round(ordered[0][0], 3), "max": round(ordered[-1][0], 3)},
        "lowest_a_sentences": [s for _, s in ordered[:3]], "highest_a_sentences": [s for _, s in ordered[-3:]],
        "task_seconds": round(time.time() - t_task, 1), "total_seconds": round(time.time() - t_start, 1),
    }
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
