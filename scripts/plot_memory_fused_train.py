"""Plot the fused Titans memory's training speed from the committed JSON (docs/results/neural_memory.md).

    python scripts/plot_memory_fused_train.py [--out docs/results/neural_memory_fused_train.png]

Left: the layer's forward + backward (bf16, dim 1024, 16 heads, chunk 64, H100) at 4K and 16K: our chunked path,
the fused path, titans-pytorch (``mnemo bench memory --fused``, neural_memory_2026-11-26d_h100_fused_train.json).
Right: the op's forward + backward at 16K as the backward was built up (the table in neural_memory.md; rows
from diag_memory_train_2026-11-26_h100.json and that page).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
# (label, matched ms, default ms): the op at 16K, neural_memory.md "How the backward got there"
STEPS = [
    ("eager sweep", 417.7, 541.6),
    ("compiled per chunk", 170.0, 222.4),
    ("blocks of 8", 134.8, 147.4),
    ("+ batched compiled", 114.1, 130.2),
    ("Triton sweep", 103.9, 108.1),
    ("split sweep", 78.2, 77.7),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(RESULTS / "neural_memory_fused_train.png"))
    args = ap.parse_args()
    bench = json.loads((RESULTS / "neural_memory_2026-11-26d_h100_fused_train.json").read_text())
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [("ours chunked (matched)", "ours_matched"), ("ours fused (matched)", "ours_matched_fused"),
              ("ours fused (default)", "ours_default_fused"), ("titans-pytorch", "titans_pytorch")]
    rows = bench["lmm"]
    width = 0.8 / len(series)
    for s, (label, key) in enumerate(series):
        xs = [i + (s - (len(series) - 1) / 2) * width for i in range(len(rows))]
        ys = [row["results"].get(key, {}).get("fwd_bwd_ms", float("nan")) for row in rows]
        bars = a.bar(xs, ys, width, label=label)
        a.bar_label(bars, fmt="%.0f", fontsize=7)
    a.set_xticks(range(len(rows)), [f"L = {row['L']}" for row in rows])
    a.set_yscale("log")
    a.set_ylabel("layer forward + backward (ms, log)")
    a.set_title("titans_lmm layer, bf16, H100")
    a.legend(fontsize=8)
    xs = range(len(STEPS))
    b.plot(xs, [m for _, m, _ in STEPS], "o-", label="matched")
    b.plot(xs, [d for _, _, d in STEPS], "s-", label="default (clip)")
    b.axhline(12, color="gray", ls="--", lw=1)
    b.text(0, 13, "issue target (12 ms)", fontsize=8, color="gray")
    b.set_xticks(list(xs), [s for s, _, _ in STEPS], rotation=25, ha="right", fontsize=8)
    b.set_yscale("log")
    b.set_ylabel("op forward + backward at 16K (ms, log)")
    b.set_title("the backward, step by step")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
