"""Launch counts and CPU step times of an experiment config's cells, before spending GPU time on them.

For each mixer (and width) of a ``mnemo experiment`` config this builds the cell's model exactly as
the runner does (``MnemoForCausalLM`` from the layer plan, the task's vocabulary) and, on the CPU:

* ``--profile``: one training step (forward at the labelled positions, cross-entropy, backward;
  not the optimiser: fused AdamW + clipping are a few kernels on a GPU) and one no-grad forward at
  every test length under ``torch.profiler``; counts the *leaf* aten ops that launch a kernel
  (``bench.neural_memory._kernel_ops``: the CPU's estimate of GPU kernel launches, view / metadata
  ops excluded) and the top-level aten ops (one Python-side dispatch each). Batch 2: the counts do
  not depend on the batch size.
* ``--time N``: the median wall time of N real-size training steps (the setting's batch size, with
  AdamW), after one warm-up step -- a CPU number, to catch something pathological, not a GPU estimate.

    PYTHONPATH=src python scripts/step_probe.py configs/mqar_memory.yaml --profile --time 2
    PYTHONPATH=src python scripts/step_probe.py configs/passkey_titans.yaml --mixers titans_mag --widths 128 --profile

Prints one line per (mixer, width) and, with ``--json``, writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from mnemotorch.bench import load_experiment_config, plan_cells
from mnemotorch.bench.experiment import _masked_logits, _to_device
from mnemotorch.bench.neural_memory import _kernel_ops
from mnemotorch.models import MnemoConfig, MnemoForCausalLM
from mnemotorch.tasks.synthetic import make_task


def _count(fn) -> tuple[int, int, float]:
    """(leaf kernel-launching aten ops, top-level aten ops, wall ms) of one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    wall = (time.perf_counter() - t0) * 1e3
    events = list(prof.events())
    top = [e for e in events if e.name.startswith("aten::")
           and not (getattr(e, "cpu_parent", None) is not None and e.cpu_parent.name.startswith("aten::"))]
    return len(_kernel_ops(events)), len(top), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--quick", action="store_true", help="the config's quick section")
    ap.add_argument("--mixers", default=None, help="comma-separated subset of the config's mixers")
    ap.add_argument("--widths", default=None, help="comma-separated subset of the config's widths")
    ap.add_argument("--setting", type=int, default=0, help="index of the setting (default 0)")
    ap.add_argument("--profile", action="store_true", help="count launches of one train step and one test forward per length")
    ap.add_argument("--no-eval", action="store_true", help="with --profile: skip the test-length forwards")
    ap.add_argument("--time", type=int, default=0, metavar="N", help="time N real-size train steps (CPU)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_experiment_config(args.config, quick=args.quick)
    mixers = args.mixers.split(",") if args.mixers else list(cfg["mixers"])
    widths = [int(w) for w in args.widths.split(",")] if args.widths else cfg["widths"]
    seen, rows = set(), []
    for cell in plan_cells(cfg):
        if cell.setting_index != args.setting or cell.mixer not in mixers or cell.width not in widths:
            continue
        if (cell.mixer, cell.width) in seen:  # one row per (mixer, width): the lr does not matter here
            continue
        seen.add((cell.mixer, cell.width))
        task = cfg["task"]
        torch.manual_seed(0)
        probe = make_task(task, 2, seed=0, **cell.task_params)
        config = MnemoConfig(vocab_size=probe.vocab_size, hidden_size=cell.width, layer_plan=cell.layer_plan, **cfg["model"])
        model = MnemoForCausalLM(config)
        row = {"mixer": cell.mixer, "width": cell.width, "params": sum(p.numel() for p in model.parameters()),
               "seq_len": probe.seq_len, "state_size": int(model.state_size(probe.seq_len))}
        dev = torch.device("cpu")

        def train_step(data, opt=None):
            x, flat, targets = _to_device(data.input_ids, data.labels, dev)
            loss = F.cross_entropy(_masked_logits(model, x, flat).float(), targets)
            loss.backward()
            if opt is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:
                model.zero_grad(set_to_none=True)

        if args.profile:
            train_step(probe)  # warm-up (lazy inits, caches)
            row["train_kernel_ops"], row["train_top_ops"], row["train_ms_profiled"] = _count(lambda: train_step(probe))
            if not args.no_eval:
                for entry in cell.evals:
                    params = {**cell.task_params, **{k: v for k, v in entry.items() if k not in ("label", "eval_batch_size", "num_test")}}
                    data = make_task(task, 1, seed=1, **params)
                    x, flat, _ = _to_device(data.input_ids, data.labels, dev)

                    def fwd():
                        with torch.no_grad():
                            _masked_logits(model, x, flat)

                    fwd()
                    k, t, ms = _count(fwd)
                    row[f"eval_{data.seq_len}_kernel_ops"], row[f"eval_{data.seq_len}_top_ops"] = k, t
        if args.time:
            bs = int(cell.train["batch_size"])
            data = make_task(task, bs, seed=0, **cell.task_params)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            train_step(data, opt)
            times = []
            for _ in range(args.time):
                t0 = time.perf_counter()
                train_step(data, opt)
                times.append(time.perf_counter() - t0)
            row["cpu_step_s"] = round(statistics.median(times), 3)
            row["batch_size"] = bs
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
