"""How far the fused Titans-memory kernels' bf16 results lie from the fp32 chunked path, per precision of their
products (``fused_triton.LAUNCH["half_precision"]`` for the products that feed the state,
``["half_read_precision"]`` for the read and its transpose), on the cases and inputs of
``tests/gpu/test_memory_fused_gpu.py``: the test bounds are 5e-3 (outputs, state) and 1e-2 (gradients); this
prints how much of them each precision uses.

GPU only:  PYTHONPATH=src python scripts/diag_memory_precision.py --precisions tf32x3/tf32,bf16x3/tf32 --out prec.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "gpu"))
from test_memory_fused_gpu import CONFIGS, GRAD_NAMES, make, rel, train_grads  # noqa: E402  (the tests' own cases)

from mnemotorch.ops.memory import fused_triton, neural_memory_chunked  # noqa: E402
from mnemotorch.ops.memory.fused_triton import neural_memory_fused, neural_memory_fused_forward  # noqa: E402

CASES = [("default", 4096), ("default", 16384), ("matched", 512), ("silu_ln", 512)]


def forward_errors(case, refs: dict) -> dict:
    name, t = case
    cfg = CONFIGS[name]
    (q, k, v), gates, st = make(t, torch.bfloat16)
    with torch.no_grad():
        if ("fwd", case) not in refs:
            refs[("fwd", case)] = neural_memory_chunked(q.float(), k.float(), v.float(), *gates, st, 64, **cfg)
        y_ref, s_ref = refs[("fwd", case)]
        y, s = neural_memory_fused_forward(q, k, v, *gates, st, 64, **cfg)
    out = {"y": rel(y, y_ref)}
    for key in ("weights", "momentum"):
        for i, (a, b) in enumerate(zip(getattr(s, key), getattr(s_ref, key))):
            out[f"{key}[{i}]"] = rel(a, b)
    return out


def training_errors(case, refs: dict) -> dict:
    name, t = case
    cfg = CONFIGS[name]
    (q, k, v), gates, st = make(t, torch.bfloat16)
    if ("train", case) not in refs:
        y_ref, g_ref = train_grads(neural_memory_chunked, (q.float(), k.float(), v.float()), gates, st, cfg)
        refs[("train", case)] = (y_ref.detach(), [g.detach() for g in g_ref])
    y_ref, g_ref = refs[("train", case)]
    y, g = train_grads(neural_memory_fused, (q, k, v), gates, st, cfg)
    return {"y": rel(y, y_ref), **{n: rel(a, b) for n, a, b in zip(GRAD_NAMES, g, g_ref)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precisions", default="tf32x3/tf32,bf16x3/tf32",
                    help="state/read[/sweep] precisions (the sweep's: LAUNCH['sweep_precision'], default the state's)")
    ap.add_argument("--out", default="diag_memory_precision.json")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    saved = fused_triton.LAUNCH["half_precision"], fused_triton.LAUNCH["half_read_precision"], fused_triton.LAUNCH["sweep_precision"]
    refs: dict = {}
    rows = []
    for pair in args.precisions.split(","):
        state_prec, read_prec, *sweep_prec = pair.split("/")
        fused_triton.LAUNCH["half_precision"], fused_triton.LAUNCH["half_read_precision"] = state_prec, read_prec
        fused_triton.LAUNCH["sweep_precision"] = sweep_prec[0] if sweep_prec else None
        for kind, fn in (("forward", forward_errors), ("training", training_errors)):
            for case in CASES:
                t0 = time.perf_counter()
                errs = fn(case, refs)
                bound = 5e-3 if kind == "forward" else 1e-2
                worst = max((v / (5e-3 if k in ("y", "weights[0]", "weights[1]", "momentum[0]", "momentum[1]") else bound), k) for k, v in errs.items())
                row = {"precision": pair, "kind": kind, "config": case[0], "t": case[1], "errors": errs,
                       "worst_fraction_of_bound": worst[0], "worst": worst[1], "s": time.perf_counter() - t0}  # fmt: skip
                print(json.dumps(row), flush=True)
                rows.append(row)
    fused_triton.LAUNCH["half_precision"], fused_triton.LAUNCH["half_read_precision"], fused_triton.LAUNCH["sweep_precision"] = saved
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": __import__("triton").__version__}
    with open(args.out, "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
