"""What issue #4's sliding-window targets ask of a kernel, next to what a bench run measured.

Reads a ``mnemo bench kernels --cuda-graph`` JSON (default: the twenty-fourth session's full grid) and prints, per
cell, the graphed times of ours and Flex, the time 1.5x Flex leaves, and two floors from the H100's datasheet rates:

* tensor cores: the matrix products of the computed pairs at 989 TFLOP/s (dense bf16, H100 SXM5);
* exponentials: one ``exp2`` per computed pair at 3.9 T/s (the H100 SXM5's special-function rate, as the
  FlashAttention-3 paper gives it, Shah et al. 2024, section 3).

"no overlap" is their sum: a kernel that never runs exponentials while the tensor cores work cannot be faster.
Forward: 2 products per pair (``S = Q Kᵀ``, ``O = P V``); backward: 5 (``S``, ``dP``, ``dV``, ``dK``, ``dQ``) and
``exp2`` once more, plus the rates a backward would need, on the computed pairs, to leave 1.5x Flex's forward +
backward after our forward. Only arithmetic on measured times; nothing here is measured.

    python scripts/swa_targets_floor.py [--json docs/results/bench_kernels_....json] [--markdown]
"""
from __future__ import annotations

import argparse
import json

TENSOR = 989e12  # dense bf16 FLOP/s, H100 SXM5 datasheet
SFU = 3.9e12  # exp2 / s, H100 SXM5 (FlashAttention-3 paper)
DEFAULT = "docs/results/bench_kernels_2026-11-28-s24_h100_swa_na1d.json"


def rows(path: str) -> list[dict]:
    out = []
    for s in json.load(open(path))["speed"]:
        if s["case"] != "sliding_window":
            continue
        g = s["cuda_graph_summary"]
        med = {k: v["median"] for k, v in s["graph_rounds"]["flex"].items()}  # Flex's medians over graphed rounds
        ours_f, ours_fb = g["fwd_ms"]["ours"]["graphed"], g["fwd_bwd_ms"]["ours"]["graphed"]
        flex_f, flex_fb = g["fwd_ms"]["flex"]["graphed"], g["fwd_bwd_ms"]["flex"]["graphed"]
        pairs = s["computed_pairs"] * s["B"] * s["H"]
        d = s["D"]
        mm = lambda n: n * 2 * pairs * d / TENSOR * 1e3  # noqa: E731  n products, ms at peak
        ex = pairs / SFU * 1e3
        bwd_left = flex_fb / 1.5 - ours_f
        # dense causal SDPA's backward in the same run: 2.5x its forward's 2 L^2 D H FLOPs (the causal half)
        sd = {k: g[k]["sdpa_dense_causal"]["graphed"] for k in ("fwd_ms", "fwd_bwd_ms")}
        sdpa_bwd = 2.5 * 2 * s["L"] ** 2 * d * s["H"] * s["B"] / ((sd["fwd_bwd_ms"] - sd["fwd_ms"]) * 1e-3) / 1e12
        sdpa_fwd = 2 * s["L"] ** 2 * d * s["H"] * s["B"] / (sd["fwd_ms"] * 1e-3) / 1e12
        out.append(dict(
            cell=f"{s['L'] // 1024}K / W {s['W']} / D {d}",
            fwd=dict(ours=ours_f, flex=flex_f, need=flex_f / 1.5, tensor=mm(2), exp=ex, no_overlap=mm(2) + ex,
                     need_tflops=2 * 2 * pairs * d / (flex_f / 1.5 * 1e-3) / 1e12, sdpa_tflops=sdpa_fwd,
                     ratio_median=med["fwd_ms"]),
            bwd=dict(ours=ours_fb - ours_f, need=bwd_left, tensor=mm(5), exp=ex, no_overlap=mm(5) + ex,
                     need_tflops=5 * 2 * pairs * d / (bwd_left * 1e-3) / 1e12,
                     ours_tflops=5 * 2 * pairs * d / ((ours_fb - ours_f) * 1e-3) / 1e12,
                     sdpa_tflops=sdpa_bwd, ratio_median=med["fwd_bwd_ms"]),
        ))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=DEFAULT)
    ap.add_argument("--markdown", action="store_true", help="print the results page's tables")
    a = ap.parse_args()
    rs = rows(a.json)
    if not a.markdown:
        print(json.dumps(rs, indent=1))
        return
    ms, tf = "{:.3f}", "{:.0f}"  # times in ms, rates in TFLOP/s
    fwd_cols = [("ours fwd", "ours", ms), ("1.5x Flex leaves", "need", ms), ("rate that needs", "need_tflops", tf),
                ("dense SDPA fwd", "sdpa_tflops", tf), ("tensor floor", "tensor", ms), ("exp floor", "exp", ms),
                ("no-overlap floor", "no_overlap", ms), ("ours / no-overlap", "ours_vs_floor", "{:.2f}")]
    bwd_cols = [("ours bwd", "ours", ms), ("1.5x Flex leaves", "need", ms), ("rate that needs", "need_tflops", tf),
                ("ours", "ours_tflops", tf), ("dense SDPA bwd", "sdpa_tflops", tf), ("tensor floor", "tensor", ms),
                ("no-overlap floor", "no_overlap", ms)]
    for r in rs:
        r["fwd"]["ours_vs_floor"] = r["fwd"]["ours"] / r["fwd"]["no_overlap"]
    for part, cols in (("fwd", fwd_cols), ("bwd", bwd_cols)):
        print("| cell | " + " | ".join(c[0] for c in cols) + " |")
        print("| --- " * (len(cols) + 1) + "|")
        for r in rs:
            print(f"| {r['cell']} | " + " | ".join(fmt.format(r[part][key]) for _, key, fmt in cols) + " |")
        print()


if __name__ == "__main__":
    main()
