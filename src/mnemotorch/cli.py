"""The ``mnemo`` command.

    mnemo train CONFIG [--set key=value ...]      train (also under torchrun for DDP/FSDP2)
    mnemo eval CHECKPOINT [--data SOURCE]         validation loss / perplexity of a checkpoint
    mnemo generate CHECKPOINT --prompt TEXT       sample text from a checkpoint
    mnemo list                                    registered token mixers
    mnemo demo [--steps N] [--mixers a,b]         train one small model per mixer, compare

Errors a user can fix (missing checkpoint, bad config key) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser"]

# Reference mixer configuration for `mnemo list` / `mnemo demo` state sizes (Zoology's accounting).
_REF_DIM, _REF_HEADS, _REF_SEQ_LEN = 256, 4, 1024


class UsageError(Exception):
    """An error caused by the command line or the user's files: printed without a traceback (exit 2)."""


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _out(msg: str = "") -> None:
    if _is_main_process():
        print(msg, flush=True)


def _format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain-text table (left-aligned text, right-aligned numbers)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(r[i], (int, float)) for r in rows) and bool(rows) for i in range(len(headers))]

    def fmt(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    lines = [fmt(list(headers)), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells]
    return "\n".join(lines)


def _num(x: float, digits: int = 4) -> float | str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, digits)


# ---------------------------------------------------------------------------------------------
# mnemo train
# ---------------------------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import Trainer, load_config

    overrides = [kv for group in (args.set or []) for kv in group]
    try:
        cfg = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from err
    from .train import CheckpointError

    try:
        summary = Trainer(cfg, progress=not args.no_progress).fit()
    except CheckpointError as err:
        raise UsageError(str(err)) from err
    _out(json.dumps(summary, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------
# Loading a checkpoint for eval / generate
# ---------------------------------------------------------------------------------------------


def _load_checkpoint(path: str, device: str) -> tuple[Any, Any, dict[str, Any] | None, Any]:
    from .train import CheckpointError, load_checkpoint_tokenizer, load_model
    from .train.checkpoint import load_train_config
    from .train.distributed import resolve_device

    p = Path(path)
    if not p.exists():
        raise UsageError(f"checkpoint directory {str(p)!r} does not exist")
    if p.is_dir() and not (p / "config.json").exists() and (p / "checkpoint").is_dir():
        p = p / "checkpoint"  # accept a run's out_dir too
    dev = resolve_device(device)
    try:
        model = load_model(p, dev)
        tok = load_checkpoint_tokenizer(p)
        train_cfg = load_train_config(p)
    except CheckpointError as err:
        raise UsageError(str(err)) from err
    model.eval()
    return model, tok, train_cfg, dev


# ---------------------------------------------------------------------------------------------
# mnemo eval
# ---------------------------------------------------------------------------------------------


def _cmd_eval(args: argparse.Namespace) -> int:
    from .tasks import encode_corpus, load_text, split_text
    from .train import evaluate

    model, tok, train_cfg, dev = _load_checkpoint(args.checkpoint, args.device)
    data_cfg = (train_cfg or {}).get("data", {})
    source = args.data if args.data is not None else data_cfg.get("source")
    val_fraction = data_cfg.get("val_fraction", 0.1)
    seq_len = args.seq_len or data_cfg.get("seq_len", 128)
    try:
        text = load_text(source)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from err
    _, val_text = split_text(text, val_fraction)
    tokens = encode_corpus(val_text, tok)
    t0 = time.perf_counter()
    res = evaluate(model, tokens, args.batch_size, seq_len, args.batches, device=dev)
    dt = time.perf_counter() - t0
    name = source if source is not None else "tinyshakespeare (bundled)"
    _out(f"data: {name}, validation split ({val_fraction:.0%}), seq_len {seq_len}, {res['tokens']:,} tokens scored in {dt:.1f}s")
    _out(f"loss {res['loss']:.4f}  ppl {res['ppl']:.3f}")
    if args.json:
        _out(json.dumps({"loss": res["loss"], "ppl": res["ppl"], "tokens": res["tokens"], "seq_len": seq_len, "data": source}))
    return 0


# ---------------------------------------------------------------------------------------------
# mnemo generate
# ---------------------------------------------------------------------------------------------


def generate_text(model: Any, tok: Any, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = 50, seed: int | None = 0, device: Any = None) -> str:
    """Continue ``prompt`` with ``model``; return only the generated text (the prompt excluded)."""
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    ids = tok.encode(prompt) if prompt else []
    if not ids:  # an empty prompt starts from the end-of-sequence token
        ids = [tok.eos_id if tok.eos_id is not None else 0]
    device = device if device is not None else next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.eos_id if tok.eos_id is not None else 0}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_k=top_k if top_k else None)
    else:
        kwargs.update(do_sample=False)
    with torch.no_grad():
        out = model.generate(input_ids, **kwargs)
    return tok.decode(out[0, input_ids.shape[1]:].tolist())


def _cmd_generate(args: argparse.Namespace) -> int:
    model, tok, _, dev = _load_checkpoint(args.checkpoint, args.device)
    if args.max_new_tokens <= 0:
        raise UsageError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    text = generate_text(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed, dev)
    _out(args.prompt + text)
    return 0


# ---------------------------------------------------------------------------------------------
# mnemo list
# ---------------------------------------------------------------------------------------------


def mixer_table(seq_len: int = _REF_SEQ_LEN) -> list[dict[str, Any]]:
    """One row per registered mixer: name, description, memory kind, state size at ``seq_len``.

    State sizes are elements per sequence for the reference mixer ``dim=256, num_heads=4``.
    """
    from .layers import get_mixer, list_mixers, mixer_info

    rows = []
    for name in list_mixers():
        info = mixer_info(name)
        try:
            size: int | str = int(get_mixer(name, dim=_REF_DIM, num_heads=_REF_HEADS).state_size(seq_len))
        except Exception as err:  # noqa: BLE001 - a mixer needing extra arguments still gets listed
            size = f"n/a ({type(err).__name__})"
        rows.append({"name": name, "description": info.get("description", ""), "memory_kind": info.get("memory_kind", ""),
                     "state_size": size})
    return rows


def _cmd_list(args: argparse.Namespace) -> int:
    rows = mixer_table(args.seq_len)
    if args.json:
        _out(json.dumps(rows, indent=2))
        return 0
    _out(_format_table(["mixer", "kind", f"state @ {args.seq_len} (elements/seq)", "description"],
                       [[r["name"], r["memory_kind"], r["state_size"], r["description"]] for r in rows]))
    _out(f"\nstate size: elements a sequence's memory holds after {args.seq_len} tokens, for dim={_REF_DIM}, heads={_REF_HEADS}")
    return 0


# ---------------------------------------------------------------------------------------------
# mnemo demo
# ---------------------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .layers import list_mixers
    from .train import Trainer, config_from_dict, plot_curves

    registered = list_mixers()
    mixers = [m.strip() for m in args.mixers.split(",") if m.strip()] if args.mixers else registered
    unknown = [m for m in mixers if m not in registered]
    if unknown:
        raise UsageError(f"unknown mixer(s) {unknown}; registered: {', '.join(registered)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    eval_interval = max(1, args.steps // 6)
    results: list[dict[str, Any]] = []
    trained: dict[str, Any] = {}
    t_all = time.perf_counter()
    _out(f"mnemo demo: {len(mixers)} mixer(s) x {args.steps} steps on Tiny Shakespeare (byte tokenizer), "
         f"dim {args.dim}, {args.layers} layers, seq {args.seq_len}, batch {args.batch_size}, "
         f"{torch.get_num_threads()} thread(s)")
    for name in mixers:
        cfg_dict = {
            "model": {"hidden_size": args.dim, "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
                      "layer_plan": [name] * args.layers},
            "data": {"tokenizer": "byte", "seq_len": args.seq_len},
            "optim": {"lr": args.lr, "warmup_steps": max(1, args.steps // 10)},
            "steps": args.steps, "batch_size": args.batch_size, "eval_interval": eval_interval,
            "eval_batches": args.eval_batches, "log_interval": max(1, args.steps // 20), "save_interval": 0,
            "out_dir": str(out / name), "seed": args.seed, "resume": "none", "distributed": "none",
            "num_threads": args.threads or None,
        }
        try:
            trainer = Trainer(config_from_dict(cfg_dict), verbose=False)
            summary = trainer.fit()
        except Exception as err:  # noqa: BLE001 - one broken mixer must not hide the others' results
            _out(f"  {name}: failed ({type(err).__name__}: {err})")
            results.append({"mixer": name, "error": f"{type(err).__name__}: {err}"})
            continue
        model = trainer.model
        curve = [(r["step"], r["val_loss"]) for r in trainer.history if "val_loss" in r]
        results.append({
            "mixer": name,
            "parameters": summary["parameters"],
            "val_loss": summary["val_loss"],
            "val_ppl": summary["val_ppl"],
            "train_loss": summary["train_loss"],
            "tokens_per_s": summary["tokens_per_s"],
            "state_size_1024": int(model.state_size(_REF_SEQ_LEN)),
            "elapsed_s": summary["elapsed_s"],
            "val_curve": curve,
            "checkpoint": summary["checkpoint"],
        })
        trained[name] = (model, trainer.tokenizer)

    ok = [r for r in results if "error" not in r]
    _out("")
    _out(_format_table(
        ["mixer", "params", "val loss", "ppl", "tokens/s", "state @1024"],
        [[r["mixer"], r["parameters"], _num(r["val_loss"]), _num(r["val_ppl"], 2), int(r["tokens_per_s"]) if math.isfinite(r["tokens_per_s"]) else "n/a",
          r["state_size_1024"]] if "error" not in r else [r["mixer"], "-", "failed", "-", "-", "-"] for r in results],
    ))
    _out("state @1024: elements of memory per sequence after 1024 tokens, summed over layers")
    plot_curves({r["mixer"]: r["val_curve"] for r in ok}, out / "demo.png",
                title=f"Tiny Shakespeare, byte-level, dim {args.dim} x {args.layers} layers")
    sample = None
    best = min(ok, key=lambda r: r["val_loss"]) if ok else None
    if best is not None and args.sample_chars > 0:
        model, tok = trained[best["mixer"]]
        model.eval()
        sample = generate_text(model, tok, args.prompt, max_new_tokens=args.sample_chars, temperature=0.8, top_k=50, seed=args.seed)
        _out(f"\nsample from the best model ({best['mixer']}, val loss {best['val_loss']:.3f}):\n")
        _out(args.prompt + sample)
    report = {
        "settings": {k: getattr(args, k) for k in ("steps", "dim", "layers", "heads", "seq_len", "batch_size", "eval_batches", "lr", "seed", "threads")},
        "torch_threads": torch.get_num_threads(),
        "results": results,
        "best": best["mixer"] if best else None,
        "sample": sample,
        "elapsed_s": time.perf_counter() - t_all,
    }
    (out / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    _out(f"\nwrote {out / 'demo.png'} and {out / 'demo.json'} ({report['elapsed_s']:.0f}s)")
    return 0 if ok else 1


def _cmd_experiment(args: argparse.Namespace) -> int:
    from .bench.experiment import main_experiment

    return int(main_experiment(list(args.rest or [])) or 0)


def _cmd_bench(args: argparse.Namespace) -> int:
    """Speed/quality micro-benchmarks; each suite has its own options after ``--``."""
    extra = list(args.rest or [])
    if extra[:1] == ["--"]:
        extra = extra[1:]
    if args.suite == "kernels":
        from .bench.block_sparse import main as bench_main

        return bench_main(extra)
    if args.suite == "hebbian":
        from .bench.hebbian_capacity import format_table, hebbian_capacity

        _out(format_table(hebbian_capacity()))
        return 0
    raise UsageError(f"unknown bench suite {args.suite!r}")


# ---------------------------------------------------------------------------------------------
# argument parsing
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnemo", description="mnemotorch: memory mechanisms for sequence models")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train a model from a TOML/YAML config (run under torchrun for DDP/FSDP2)")
    p.add_argument("config", help="path to a .toml or .yaml config")
    p.add_argument("--set", nargs="+", action="append", metavar="KEY=VALUE",
                   help="override config values, e.g. --set optim.lr=1e-3 steps=500")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint")
    p.add_argument("checkpoint", help="checkpoint directory (or a run's out_dir)")
    p.add_argument("--data", default=None, help="text source (default: the one the checkpoint was trained on)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: training seq_len)")
    p.add_argument("--batches", type=int, default=None, help="at most this many batches (default: the whole split)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("generate", help="generate text from a checkpoint")
    p.add_argument("checkpoint", help="checkpoint directory (or a run's out_dir)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("list", help="list registered token mixers")
    p.add_argument("--seq-len", type=int, default=_REF_SEQ_LEN, help="sequence length for the state size column")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("demo", help="train a small model per mixer on Tiny Shakespeare and compare them")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--mixers", default=None, help="comma-separated subset (default: every registered mixer)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (0 = PyTorch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-chars", type=int, default=200, help="length of the generated sample (0 = none)")
    p.add_argument("--prompt", default="ROMEO:")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("experiment", help="run a memory-task sweep (mixers x widths x learning rates x settings)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="CONFIG [--quick] [--out DIR] [--device] [--time-budget S] [--only K=V]")
    p.set_defaults(func=_cmd_experiment)

    p = sub.add_parser("bench", help="benchmarks: 'kernels' (GPU: block-sparse vs SDPA/Flex), 'hebbian' (capacity)")
    p.add_argument("suite", choices=["kernels", "hebbian"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the suite, e.g. -- --quick --out results.json")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mnemo`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        print(f"mnemo {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
