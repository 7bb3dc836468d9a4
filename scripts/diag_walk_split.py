"""Where the Titans walk at 32 hidden columns a program goes wrong on the GPU (docs/results/neural_memory.md, nineteenth session).

With ``LAUNCH["split_slice"] = 32`` (8 programs a head) the forward walk ran 5.2 -> 3.6 ms on an H100, but 8 of the 37
tests in ``tests/gpu/test_memory_fused_gpu.py`` failed: wrong outputs at 512 tokens and CUDA illegal memory accesses.
In Triton's interpreter, phase by phase, the same kernel matches the float64 chunked path. This separates the two
suspects on the device: each variant runs in its own process (an illegal access poisons the CUDA context) and
compares the fused forward's bf16 output with the fp32 chunked path's on the same rounded inputs (the bound is 5e-3):

* ``one_launch``: the GPU's form, every chunk in one launch with grid barriers between the phases;
* ``host_phases``: one launch per phase and chunk, ordered by the host (``LAUNCH["split_host_phases"]``), no barrier.

If only ``one_launch`` fails at 32 columns, the exchange between the head's programs is at fault (a race, or the barrier);
if both fail, the code Triton generates for the 32-column tiles is.

Result (H100, twentieth session): only ``one_launch`` failed at 32 columns, with Triton 3.6's bundled ptxas (12.8);
built with CUDA 13.0's ptxas (``TRITON_PTXAS_PATH``) it passed, so the fault is in the bundled ptxas's code for the
one-launch kernel (``fused_triton._split_slice``). ``--exact-keys 0`` runs the walk's key products as three bf16 products.

    PYTHONPATH=src python scripts/diag_walk_split.py [--slices 64,32] [--configs matched,silu_ln] [--t 512]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys

CONFIGS = {"matched": dict(activation="gelu", residual=True, layer_norm=True, max_grad_norm=None),
           "silu_ln": dict(activation="silu", residual=True, layer_norm=True, max_grad_norm=None),
           "default": dict(activation="silu", residual=True, layer_norm=False, max_grad_norm=1.0)}


def one(slice_: int, mode: str, config: str, t: int, phase3: str, carry: bool, keys: bool = True) -> dict:
    """One variant in this process: the relative error of the fused forward's output and state against fp32."""
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "gpu"))
    from test_memory_fused_gpu import make, rel  # the GPU tests' inputs (16 heads, d 64, hidden 256)

    from mnemotorch.ops.memory import neural_memory_chunked
    from mnemotorch.ops.memory import fused_triton
    from mnemotorch.ops.memory.fused_triton import neural_memory_fused_forward

    torch.backends.cuda.matmul.allow_tf32 = False
    fused_triton.LAUNCH.update(split_slice=slice_, split_host_phases=mode == "host_phases", split_phase3=phase3, split_carry=carry,
                              exact_keys=keys)
    cfg = CONFIGS[config]
    (q, k, v), gates, st = make(t, torch.bfloat16)
    with torch.no_grad():
        y_ref, s_ref = neural_memory_chunked(q.float(), k.float(), v.float(), *gates, st, 64, **cfg)
        runs = [neural_memory_fused_forward(q, k, v, *gates, st, 64, **cfg) for _ in range(2)]
    torch.cuda.synchronize()
    (y, s), (y2, _) = runs
    return {"y_err": rel(y, y_ref), "w1_err": rel(s.weights[0], s_ref.weights[0]), "runs_equal": bool(torch.equal(y, y2)),
            "finite": bool(torch.isfinite(y).all())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", default="64,32")
    ap.add_argument("--modes", default="one_launch,host_phases")
    ap.add_argument("--configs", default="matched,silu_ln")
    ap.add_argument("--phase3", default="auto", help="LAUNCH['split_phase3'] values (auto, registers, scratch, recompute)")
    ap.add_argument("--carry", default="0", help="LAUNCH['split_carry'] values (0, 1)")
    ap.add_argument("--exact-keys", default="1", help="LAUNCH['exact_keys'] values (1, 0)")
    ap.add_argument("--t", type=int, default=512)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per variant")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "diag_walk_split.json"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # (internal: run one variant, print its JSON)
    args = ap.parse_args()
    if args.one:
        sl, mode, config, t, p3, carry, keys = args.one.split(":")
        print(json.dumps(one(int(sl), mode, config, int(t), p3, carry == "1", keys == "1")), flush=True)
        return 0
    rows = []
    grid = itertools.product(args.slices.split(","), args.modes.split(","), args.configs.split(","), args.phase3.split(","),
                             args.carry.split(","), args.exact_keys.split(","))
    for sl, mode, config, p3, carry, keys in grid:
        if mode == "host_phases" and carry == "1":
            continue  # (the state carried in registers needs the one-launch walk)
        row = {"slice": int(sl), "mode": mode, "config": config, "t": args.t, "phase3": p3, "carry": carry == "1", "exact_keys": keys == "1"}
        try:
            out = subprocess.run([sys.executable, __file__, "--one", f"{sl}:{mode}:{config}:{args.t}:{p3}:{carry}:{keys}"], capture_output=True,
                                 text=True, timeout=args.timeout)
            last = [line for line in out.stdout.splitlines() if line.startswith("{")]
            row.update(json.loads(last[-1]) if last else {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:300]})
        except subprocess.TimeoutExpired:
            row["error"] = f"timed out after {args.timeout:.0f} s"
        print(json.dumps(row), flush=True)
        rows.append(row)
    with open(args.out, "w") as fh:
        json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
