"""Train a tiny 2-D attention classifier on scikit-learn's bundled 8 x 8 digits (no download).

    python examples/digits_classifier.py --attention na2d     # neighborhood attention (NATTEN rules)
    python examples/digits_classifier.py --attention halo     # HaloNet blocked local attention

Every pixel is a token; see mnemotorch/tasks/digits.py and docs/mixers/vision_2d.md.
Needs scikit-learn (pip install scikit-learn).
"""

from __future__ import annotations

import argparse
import json

import torch

from mnemotorch.tasks.digits import ATTENTIONS, train_digits


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attention", choices=ATTENTIONS, default="na2d")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write the result (without per-step losses) here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = train_digits(
        args.attention, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device
    )
    summary = {k: v for k, v in result.items() if k != "losses"}
    summary["final_loss"] = sum(result["losses"][-10:]) / len(result["losses"][-10:])
    print(
        f"{args.attention}: test accuracy {summary['test_accuracy']:.4f} (train {summary['train_accuracy']:.4f}), "
        f"{summary['steps']} steps in {summary['seconds']:.1f} s, {summary['parameters']} parameters"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
