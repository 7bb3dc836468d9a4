"""The long-context evaluation of issue #8 on one model: passkey, SORT and long-book perplexity,
plain vs InfLLM vs EM-LLM, with peak GPU memory -- under a time budget, JSON rewritten after every cell.

    python scripts/longctx_eval.py --model hf:runs/longctx_eval/hf --out runs/longctx_eval/longctx.json
    python scripts/longctx_eval.py --report runs/longctx_eval/longctx.json --md docs/results/longctx.md

Cells run in the order given by ``--plan`` (cheap and most informative first), each skipped once the
budget is spent, so a run cut short still leaves a consistent, partial JSON ("not run" cells listed).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

MEMORIES = ("none", "infllm", "em-llm")


def _peak_reset(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_gib(dev: torch.device) -> float | None:
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) / 2**30


def _env(dev: torch.device) -> dict[str, Any]:
    import transformers
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "device": str(dev)}
    if dev.type == "cuda":
        env["card"] = torch.cuda.get_device_name(dev)
    return env


def _mem_ctx(em: Any, name: str, overrides: dict[str, Any]) -> tuple[Any, Any]:
    import contextlib

    from mnemotorch.longctx import make_memory

    if name == "none":
        return contextlib.nullcontext(), None
    mem = make_memory(name, em.model, **overrides)
    return mem(em.model), mem


def _mem_record(mem: Any) -> dict[str, Any] | None:
    import dataclasses

    if mem is None:
        return None
    return {"name": type(mem).__name__, **{f.name: getattr(mem, f.name) for f in dataclasses.fields(mem)
                                           if isinstance(getattr(mem, f.name), (int, float, str, bool, type(None)))}}


def run_passkey(em: Any, length: int, memory: str, args: argparse.Namespace) -> dict[str, Any]:
    from mnemotorch.bench.evaluate import evaluate_passkey

    ctx, mem = _mem_ctx(em, memory, {})
    bs = args.batch_size if memory == "none" else 1
    with ctx:
        res = evaluate_passkey(em, [length], args.depths, args.trials, haystack=args.haystack_text, batch_size=bs,
                               seed=args.seed)
    acc = sum(r["correct"] for r in res["rows"]) / sum(r["trials"] for r in res["rows"])
    return {"accuracy": acc, "by_depth": {str(r["depth"]): r["accuracy"] for r in res["rows"]},
            "examples": res["examples"][:4], "memory_settings": _mem_record(mem)}


def run_sort(em: Any, words: int, memory: str, args: argparse.Namespace) -> dict[str, Any]:
    from mnemotorch.bench.evaluate import evaluate_sort_task

    ctx, mem = _mem_ctx(em, memory, {})
    with ctx:
        res = evaluate_sort_task(em, num_examples=args.sort_examples, excerpt_words=words, conditions=["in_context"],
                                 seed=args.seed)
    row = res["rows"][0]
    return {"accuracy": row["accuracy"], "num_examples": row["num_examples"], "logprob_margin": row["logprob_margin"],
            "memory_settings": _mem_record(mem)}


def run_books(em: Any, context: int, memory: str, args: argparse.Namespace) -> dict[str, Any]:
    """Perplexity of the held-out documents' first ``--books-tokens`` tokens.

    ``context == --train-length`` (plain model only): sliding windows of the training context -- the
    truncated-context baseline. Otherwise the whole document is streamed in ``--books-chunk`` pieces
    with the cache carried, each token predicted from everything before it: through the memory
    (bounded GPU memory) or, for the plain model, through a full KV cache beyond the training length.
    """
    from mnemotorch.bench.evaluate import evaluate_books

    ctx, mem = _mem_ctx(em, memory, {})
    with ctx:
        if context == args.train_length:
            res = evaluate_books(em, mode="sliding", context=context, stride=args.books_stride,
                                 max_tokens=args.books_tokens, batch_size=args.batch_size)
        else:
            res = evaluate_books(em, mode="stream", chunk=args.books_chunk, max_tokens=args.books_tokens)
    return {"rows": res.get("rows", res), "memory_settings": _mem_record(mem)}


def _plan(args: argparse.Namespace) -> list[tuple[str, int, str]]:
    cells: list[tuple[str, int, str]] = []
    for length in args.lengths:
        for m in MEMORIES:
            cells.append(("passkey", length, m))
    cells += [("sort", args.sort_short, "none")] + [("sort", args.sort_long, m) for m in MEMORIES]
    # books: truncated (sliding, training context) plain; then the whole prefix streamed -- plain (full
    # KV cache, beyond its training length) and through each memory.
    cells += [("books", args.train_length, "none")] + [("books", args.books_tokens, m) for m in MEMORIES]
    return cells


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="hf:PATH of the evaluation model")
    p.add_argument("--out", required=True, help="JSON file (rewritten after every cell; resumed if it exists)")
    p.add_argument("--budget", type=float, default=540.0, help="seconds; no cell starts after this")
    p.add_argument("--train-length", type=int, default=1024)
    p.add_argument("--lengths", default="1024,4096,16384,32768")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--trials", type=int, default=4, help="examples per (length, depth)")
    p.add_argument("--haystack", default="synthetic", help="'synthetic' or a text file (e.g. a held-out book)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sort-examples", type=int, default=10)
    p.add_argument("--sort-short", type=int, default=250, help="excerpt words that fit the training context")
    p.add_argument("--sort-long", type=int, default=2500, help="excerpt words far beyond it")
    p.add_argument("--books-chunk", type=int, default=1024, help="streaming chunk of the whole-document cells")
    p.add_argument("--books-stride", type=int, default=512)
    p.add_argument("--books-tokens", type=int, default=16384)
    p.add_argument("--only", default="", help="comma-separated cell kinds to run (passkey, sort, books)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    args.lengths = [int(v) for v in args.lengths.split(",")]
    args.depths = [float(v) for v in args.depths.split(",")]
    args.haystack_text = None if args.haystack == "synthetic" else Path(args.haystack).read_text(encoding="utf-8")

    from mnemotorch.bench.evaluate import load_eval_model

    out = Path(args.out)
    report: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"cells": []}
    done = {(c["task"], c["size"], c["memory"]) for c in report["cells"] if c.get("status") == "ok"}
    em = load_eval_model(args.model, args.device, args.dtype)
    dev = em.device
    report.update({"model": args.model, "env": _env(dev), "settings": {k: v for k, v in vars(args).items() if k != "haystack_text"}})
    only = set(filter(None, args.only.split(",")))
    t0 = time.perf_counter()
    runners = {"passkey": run_passkey, "sort": run_sort, "books": run_books}
    for task, size, memory in _plan(args):
        if (task, size, memory) in done or (only and task not in only):
            continue
        cell: dict[str, Any] = {"task": task, "size": size, "memory": memory}
        if time.perf_counter() - t0 > args.budget:
            cell["status"] = "not run (time budget)"
        else:
            _peak_reset(dev)
            t = time.perf_counter()
            try:
                cell.update(runners[task](em, size, memory, args))
                cell["status"] = "ok"
            except Exception as err:  # noqa: BLE001 - recorded, the next cell still runs
                cell["status"] = f"error: {type(err).__name__}: {err}"[:500]
            cell["seconds"] = round(time.perf_counter() - t, 2)
            cell["peak_gpu_gib"] = _peak_gib(dev)
        report["cells"] = [c for c in report["cells"] if (c["task"], c["size"], c["memory"]) != (task, size, memory)] + [cell]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, default=str) + "\n")
        acc = cell.get("accuracy")
        print(f"[{time.perf_counter() - t0:6.0f}s] {task:8s} {size:>6} {memory:7s} {cell['status'][:60]:60s} "
              f"acc={acc if acc is None else round(acc, 3)} t={cell.get('seconds')} peak={cell.get('peak_gpu_gib')}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
