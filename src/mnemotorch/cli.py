"""The ``mnemo`` command.

    mnemo train CONFIG [--set key=value ...]      train (also under torchrun for DDP/FSDP2)
    mnemo eval CHECKPOINT [--data SOURCE]         validation loss / perplexity of a checkpoint
    mnemo eval TASK MODEL [options]               books | passkey | sort | mqar (MODEL: checkpoint or hf:PATH)
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


def _eval_ppl(args: argparse.Namespace, opts: dict[str, Any]) -> dict[str, Any]:
    """The original ``mnemo eval CHECKPOINT``: loss / perplexity on the validation split of the training corpus."""
    from .tasks import encode_corpus, load_text, split_text
    from .train import evaluate

    if args.model.startswith("hf:"):
        raise UsageError("task 'ppl' (validation split of the training corpus) needs one of our checkpoints; "
                         "for a Hugging Face model use 'mnemo eval books hf:PATH --data FILE'")
    model, tok, train_cfg, dev = _load_checkpoint(args.model, opts.get("device") or "auto")
    data_cfg = (train_cfg or {}).get("data", {})
    data = opts.get("data")
    if isinstance(data, list):
        if len(data) > 1:
            raise UsageError(f"task 'ppl' takes one --data source, got {len(data)}")
        data = data[0]
    source = data if data is not None else data_cfg.get("source")
    val_fraction = data_cfg.get("val_fraction", 0.1)
    seq_len = opts.get("seq_len") or data_cfg.get("seq_len", 128)
    try:
        text = load_text(source)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from err
    _, val_text = split_text(text, val_fraction)
    tokens = encode_corpus(val_text, tok)
    t0 = time.perf_counter()
    try:
        res = evaluate(model, tokens, opts.get("batch_size") or 8, seq_len, opts.get("batches"), device=dev)
    except ValueError as err:
        raise UsageError(str(err)) from err
    dt = time.perf_counter() - t0
    name = source if source is not None else "tinyshakespeare (bundled)"
    _out(f"data: {name}, validation split ({val_fraction:.0%}), seq_len {seq_len}, {res['tokens']:,} tokens scored in {dt:.1f}s")
    _out(f"loss {res['loss']:.4f}  ppl {res['ppl']:.3f}")
    return {"loss": res["loss"], "ppl": res["ppl"], "tokens": res["tokens"], "seq_len": seq_len, "data": source}


_EVAL_TASKS = ("ppl", "books", "passkey", "sort", "mqar")
# Options a --config file may set (the parser's dests); the command line wins over the file.
_EVAL_OPTION_KEYS = (
    "device", "dtype", "seed", "batch_size", "data", "seq_len", "batches", "mode", "context", "stride", "chunk",
    "tokens", "no_bos", "lengths", "depths", "trials", "kind", "haystack", "no_instruction", "plot", "num_examples",
    "excerpt_words", "segment_words", "conditions", "min_distance", "max_distance", "settings", "vocab_size", "power_a",
    "memory", "memory_arg",
)


def _memory_context(em: Any, opts: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
    """``--memory em-llm|infllm|none`` (+ ``--memory-arg key=value``): the context manager that applies
    the training-free memory of :mod:`mnemotorch.longctx` to a Hugging Face model, and its record."""
    import contextlib
    import dataclasses

    name = opts.get("memory")
    if not name or str(name).lower() == "none":
        if opts.get("memory_arg"):
            raise UsageError("--memory-arg needs --memory em-llm or infllm")
        return contextlib.nullcontext(), None
    overrides: dict[str, Any] = {}
    for item in opts.get("memory_arg") or []:
        key, sep, value = str(item).partition("=")
        if not sep:
            raise UsageError(f"--memory-arg: expected key=value, got {item!r}")
        try:
            overrides[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip().replace("-", "_")] = value
    if em.kind != "hf":
        raise UsageError(f"--memory {name}: applies to Hugging Face decoders (hf:PATH), not to {em.kind} models")
    from .longctx import make_memory

    try:
        mem = make_memory(str(name), em.model, **overrides)
    except (ValueError, TypeError) as err:
        raise UsageError(f"--memory {name}: {err}") from err
    record = {"name": type(mem).__name__, **{f.name: getattr(mem, f.name) for f in dataclasses.fields(mem)}}
    return mem(em.model), record


def _split_list(value: Any, cast: Any, name: str) -> list[Any]:
    """``"a,b"`` or ``[a, b]`` -> ``[cast(a), cast(b)]``."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        return [cast(v.strip() if isinstance(v, str) else v) for v in items if not (isinstance(v, str) and not v.strip())]
    except (TypeError, ValueError) as err:
        raise UsageError(f"--{name.replace('_', '-')}: cannot read {value!r} ({err})") from err


def _mqar_settings(value: Any) -> list[tuple[int, int]]:
    out = []
    for item in value if isinstance(value, (list, tuple)) else str(value).split(","):
        try:
            if isinstance(item, (list, tuple)):
                seq_len, pairs = item
            else:
                seq_len, pairs = str(item).strip().split(":")
            out.append((int(seq_len), int(pairs)))
        except (TypeError, ValueError):
            raise UsageError(f"--settings: expected SEQ_LEN:NUM_KV_PAIRS items such as 64:4,128:8, got {item!r}") from None
    return out


def _eval_options(args: argparse.Namespace) -> dict[str, Any]:
    """Options from ``--config`` (if any) overridden by those given on the command line."""
    opts: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"config {str(path)!r} does not exist")
        try:
            from .bench.experiment import _read_config_file

            raw = _read_config_file(path)
        except (ValueError, ImportError) as err:
            raise UsageError(str(err)) from err
        for key, value in raw.items():
            dest = key.replace("-", "_")
            if dest == "task":
                opts["task"] = value
            elif dest in _EVAL_OPTION_KEYS:
                opts[dest] = value
            else:
                raise UsageError(f"config {str(path)!r}: unknown key {key!r}; allowed: task, {', '.join(_EVAL_OPTION_KEYS)}")
    for key in _EVAL_OPTION_KEYS:
        value = getattr(args, key, None)
        if value is not None and value is not False:
            opts[key] = value
    return opts


def _eval_target(args: argparse.Namespace, opts: dict[str, Any]) -> tuple[str, str]:
    target = list(args.target)
    if len(target) > 2:
        raise UsageError(f"expected [TASK] MODEL, got {len(target)} arguments: {' '.join(target)}")
    if len(target) == 2:
        task, model = target
    elif target[0] in _EVAL_TASKS and not Path(target[0]).exists():
        raise UsageError(f"task {target[0]!r} needs a MODEL: a checkpoint directory, a run's out_dir or hf:PATH")
    else:
        task, model = opts.get("task", "ppl"), target[0]
    if task not in _EVAL_TASKS:
        raise UsageError(f"unknown task {task!r}; tasks: {', '.join(_EVAL_TASKS)}")
    return task, model


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    opts = _eval_options(args)
    opts["json_out"] = args.json_out
    task, args.model = _eval_target(args, opts)
    t0 = time.perf_counter()
    if task == "ppl":
        result: dict[str, Any] = _eval_ppl(args, opts)
        report = {"task": task, "model": args.model, **result}
        if args.json:
            _out(json.dumps(result))
    else:
        from .bench import evaluate as ev

        try:
            em = ev.load_eval_model(args.model, opts.get("device") or "auto", opts.get("dtype"), need_tokenizer=task != "mqar")
            memory, memory_record = _memory_context(em, opts)
            if memory_record is not None:
                _out(f"memory: {memory_record['name']} (" + ", ".join(f"{k}={v}" for k, v in memory_record.items() if k != "name") + ")")
            with memory:
                result = _eval_task(ev, em, task, opts)
            result["memory"] = memory_record
        except ev.EvalError as err:
            raise UsageError(str(err)) from err
        for note in result.get("notes", []):
            _out(f"note: {note}")
        report = {"task": task, "model": args.model, "model_kind": em.kind, **result,
                  "device": str(em.device), "torch": torch.__version__}
        if args.json:
            _out(json.dumps(report, default=str))
    report["elapsed_s"] = round(time.perf_counter() - t0, 3)
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, default=str) + "\n")
        _out(f"wrote {out}")
    return 0


def _eval_task(ev: Any, em: Any, task: str, opts: dict[str, Any]) -> dict[str, Any]:
    """Run one of the memory-suite tasks and print its table; returns the JSON-ready result."""
    seed = int(opts.get("seed", 0) or 0)
    batch_size = opts.get("batch_size")
    data = opts.get("data")
    sources = _split_list(data, str, "data") if data is not None else None
    _out(f"model: {em.source} ({em.kind}, {sum(p.numel() for p in em.model.parameters()):,} parameters, {em.device})")
    if task == "books":
        res = ev.evaluate_books(
            em, sources, mode=opts.get("mode", "sliding"), context=opts.get("context"), stride=opts.get("stride"),
            chunk=opts.get("chunk"), max_tokens=opts.get("tokens"), bos=not opts.get("no_bos", False), batch_size=batch_size or 8,
        )
        _out(_format_table(
            ["document", "mode", "window", "tokens", "loss", "ppl", "bits/byte"],
            [[r["document"], r["mode"], f"C={r['context']} S={r['stride']}" if r["mode"] == "sliding" else f"chunk {r['chunk']}",
              r["tokens"], _num(r["loss"]), _num(r["ppl"], 3), _num(r["bpb"])] for r in res["rows"]],
        ))
        _out("sliding: each token scored once with up to C tokens of context (stride S); "
             "stream: whole document, state carried across chunks")
        return res
    if task == "passkey":
        res = ev.evaluate_passkey(
            em, _split_list(opts.get("lengths", "512,1024,2048"), int, "lengths"),
            _split_list(opts.get("depths", "0,0.25,0.5,0.75,1"), float, "depths"), int(opts.get("trials", 10)),
            kind=opts.get("kind", "passkey"), haystack=_haystack_text(opts.get("haystack")), seed=seed,
            instruction=not opts.get("no_instruction", False), batch_size=batch_size or 8,
        )
        headers = ["length \\ depth"] + [f"{d:g}" for d in res["depths"]] + ["mean"]
        _out(_format_table(headers, [[n] + [round(a, 3) for a in row] + [round(sum(row) / len(row), 3)]
                                     for n, row in zip(res["lengths"], res["grid"])]))
        _out(f"accuracy of greedy decoding of the {res['settings']['kind']} over {res['settings']['trials']} trials per cell")
        plot = opts.get("plot") or (str(Path(opts["json_out"]).with_suffix(".png")) if opts.get("json_out") else None)
        if plot:
            res["plot"] = str(ev.plot_passkey_heatmap(res, plot, title=f"{Path(em.source).name}: passkey accuracy"))
            _out(f"wrote {res['plot']}")
        return res
    if task == "sort":
        conditions = opts.get("conditions")
        res = ev.evaluate_sort_task(
            em, sources, num_examples=int(opts.get("num_examples", 10)), excerpt_words=int(opts.get("excerpt_words", 250)),
            segment_words=int(opts.get("segment_words", 20)),
            conditions=_split_list(conditions, str, "conditions") if conditions is not None else None,
            min_distance=int(opts.get("min_distance", 0)), max_distance=opts.get("max_distance"), chunk=opts.get("chunk"), seed=seed,
        )
        _out(_format_table(["condition", "accuracy", "chance", "examples", "margin (nats)"],
                           [[r["condition"], _num(r["accuracy"]), r["chance"], r["num_examples"], _num(r["logprob_margin"])]
                            for r in res["rows"]]))
        _out("margin: mean log p(right answer) - log p(wrong answer); a constant answer scores exactly the chance level")
        return res
    # mqar
    res = ev.evaluate_mqar(
        em, _mqar_settings(opts.get("settings", "64:4,128:8,256:16,512:64")), int(opts.get("num_examples", 1000)),
        vocab_size=opts.get("vocab_size"), power_a=float(opts.get("power_a", 0.01)), seed=int(opts.get("seed", 1)),
        batch_size=batch_size or 64,
    )
    _out(_format_table(["L", "N", "V", "token acc", "sequence acc", "state size"],
                       [[r["seq_len"], r["num_kv_pairs"], r["vocab_size"], _num(r["token_accuracy"]), _num(r["sequence_accuracy"]),
                         r.get("state_size", "n/a")] for r in res["rows"]]))
    return res


def _haystack_text(source: Any) -> str | None:
    if source in (None, "synthetic"):
        return None
    from .tasks import load_text

    try:
        return load_text(source)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"--haystack: {err}") from err


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


def _cmd_export_llama(args: argparse.Namespace) -> int:
    from .models.export import ExportError, save_as_llama

    model, tok, train_cfg, _ = _load_checkpoint(args.checkpoint, "cpu")
    max_pos = args.max_positions
    if max_pos is None:
        max_pos = int(((train_cfg or {}).get("data") or {}).get("seq_len") or 0) or None
        if max_pos is None:
            raise UsageError("--max-positions is needed: the checkpoint has no training config with data.seq_len")
    try:
        path = save_as_llama(model, tok, args.out, max_pos)
    except ExportError as err:
        raise UsageError(str(err)) from err
    _out(f"wrote LlamaForCausalLM ({sum(p.numel() for p in model.parameters()):,} parameters, "
         f"max_position_embeddings={max_pos}) to {path}; evaluate it with --model hf:{path}")
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


def _demo_spec(name: str) -> dict:
    """The layer spec of mixer ``name`` in the demo: its ``demo_kwargs`` (settings that make sense
    for 128-token byte sequences on a CPU, e.g. a PowerAttention block size smaller than the
    sequence), else its defaults."""
    from .layers import mixer_class

    return {"type": name, **getattr(mixer_class(name), "demo_kwargs", {})}


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .layers import list_mixers
    from .train import Trainer, config_from_dict, plot_curves

    from .layers import mixer_class

    registered = list_mixers()
    default = [m for m in registered if getattr(mixer_class(m), "demo_default", True)]
    mixers = [m.strip() for m in args.mixers.split(",") if m.strip()] if args.mixers else default
    unknown = [m for m in mixers if m not in registered]
    if unknown:
        raise UsageError(f"unknown mixer(s) {unknown}; registered: {', '.join(registered)}")
    if not args.mixers and len(default) < len(registered):
        _out(f"not in the default demo (slow reference paths on a CPU; add with --mixers): "
             f"{', '.join(m for m in registered if m not in default)}")
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
                      "layer_plan": [_demo_spec(name)] * args.layers},
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


def _cmd_plot(args: argparse.Namespace) -> int:
    """Validation perplexity vs training tokens for one or more run directories."""
    from .train import plot_perplexity_vs_tokens

    runs = {}
    for run in args.runs:
        path = Path(run) / "metrics.jsonl" if Path(run).is_dir() else Path(run)
        if not path.is_file():
            raise UsageError(f"no metrics.jsonl in {run!r} (give a run directory of `mnemo train` or the file)")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not any("val_ppl" in r for r in rows):
            raise UsageError(f"{str(path)!r} has no validation rows (val_ppl) to plot")
        runs[Path(run).name if Path(run).is_dir() else Path(run).parent.name] = rows
    out = plot_perplexity_vs_tokens(runs, args.out, title=args.title)
    _out(f"wrote {out}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    """Speed/quality micro-benchmarks; each suite has its own options after ``--``."""
    extra = list(args.rest or [])
    if extra[:1] == ["--"]:
        extra = extra[1:]
    from .bench import run_bench_suite

    return run_bench_suite(args.suite, extra)


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

    p = sub.add_parser(
        "eval", help="evaluate a model: validation ppl (default), books, passkey, sort, mqar",
        usage="mnemo eval [TASK] MODEL [options]",
        description="mnemo eval [TASK] MODEL: TASK is ppl (default: loss on the training corpus' validation split), "
                    "books (long-document perplexity, sliding window and whole-document streaming), passkey "
                    "(accuracy per length x depth), sort (segment order, 50% chance) or mqar. MODEL is one of our "
                    "checkpoints (a checkpoint directory or a run's out_dir) or hf:PATH, a local Hugging Face "
                    "causal LM directory (nothing is downloaded). Options of other tasks are ignored.",
    )
    p.add_argument("target", nargs="+", metavar="[TASK] MODEL", help=f"task ({', '.join(_EVAL_TASKS)}; default ppl) and model")
    p.add_argument("--config", default=None, help="YAML/TOML/JSON file of option defaults (e.g. configs/sort.yaml)")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weights dtype (default float32)")
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    p.add_argument("--json-out", default=None, metavar="FILE", help="write the result as JSON to FILE")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="sequences per forward (ppl/books 8, passkey 8, mqar 64)")
    p.add_argument("--memory", default=None, choices=["none", "em-llm", "infllm"],
                   help="hf:PATH models: apply a training-free episodic memory (mnemotorch.longctx) during the evaluation")
    p.add_argument("--memory-arg", action="append", default=None, metavar="KEY=VALUE",
                   help="override a memory setting, e.g. n_local=512 (repeatable; values read as JSON when they parse)")
    p.add_argument("--data", action="append", default=None, metavar="SOURCE",
                   help="ppl: text source (default: the training corpus); books/sort: file or folder, repeatable "
                        "(default: held-out books + WikiText-2 test / the Book-SORT books in ../shared/data)")
    g = p.add_argument_group("ppl")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: training seq_len)")
    g.add_argument("--batches", type=int, default=None, help="at most this many batches (default: the whole split)")
    g = p.add_argument_group("books")
    g.add_argument("--mode", default=None, choices=["sliding", "stream", "both"], help="default sliding")
    g.add_argument("--context", type=int, default=None, help="sliding-window context C (default: training seq_len)")
    g.add_argument("--stride", type=int, default=None, help="sliding-window stride S <= C (default C/2)")
    g.add_argument("--chunk", type=int, default=None, help="stream / SORT-stream chunk size (default C)")
    g.add_argument("--tokens", type=int, default=None, help="score exactly the first N tokens of each document")
    g.add_argument("--no-bos", action="store_true", default=None, help="do not open documents with a BOS/EOS token")
    g = p.add_argument_group("passkey")
    g.add_argument("--lengths", default=None, help="comma-separated token lengths (default 512,1024,2048)")
    g.add_argument("--depths", default=None, help="comma-separated depths in [0, 1] (default 0,0.25,0.5,0.75,1)")
    g.add_argument("--trials", type=int, default=None, help="examples per (length, depth) (default 10)")
    g.add_argument("--kind", default=None, choices=["passkey", "number", "word"])
    g.add_argument("--haystack", default=None, help="synthetic (default) or a text source, e.g. a held-out book")
    g.add_argument("--no-instruction", action="store_true", default=None, help="omit the instruction sentence")
    g.add_argument("--plot", default=None, metavar="PNG", help="heat-map file (default: the --json-out path with .png)")
    g = p.add_argument_group("sort")
    g.add_argument("--num-examples", type=int, default=None, help="sort: per document, even (default 10); mqar: per setting (1000)")
    g.add_argument("--excerpt-words", type=int, default=None, help="default 250")
    g.add_argument("--segment-words", type=int, default=None, help="default 20")
    g.add_argument("--conditions", default=None, help="in_context,stream,no_context (default: in_context,stream; HF: in_context)")
    g.add_argument("--min-distance", type=int, default=None)
    g.add_argument("--max-distance", type=int, default=None)
    g = p.add_argument_group("mqar")
    g.add_argument("--settings", default=None, help="SEQ_LEN:NUM_KV_PAIRS list (default 64:4,128:8,256:16,512:64)")
    g.add_argument("--vocab-size", type=int, default=None, help="MQAR V (default: the model's vocabulary)")
    g.add_argument("--power-a", type=float, default=None)
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

    p = sub.add_parser("export-llama", help="save an attention-only checkpoint as a Hugging Face LlamaForCausalLM")
    p.add_argument("checkpoint", help="checkpoint directory (or a run's out_dir)")
    p.add_argument("out", help="output directory (config.json, model.safetensors, tokenizer)")
    p.add_argument("--max-positions", type=int, default=None,
                   help="max_position_embeddings (default: the training seq_len)")
    p.set_defaults(func=_cmd_export_llama)

    p = sub.add_parser("list", help="list registered token mixers")
    p.add_argument("--seq-len", type=int, default=_REF_SEQ_LEN, help="sequence length for the state size column")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("demo", help="train a small model per mixer on Tiny Shakespeare and compare them")
    p.add_argument("--steps", type=int, default=60)
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

    p = sub.add_parser("plot", help="plot validation perplexity vs training tokens of one or more runs")
    p.add_argument("runs", nargs="+", help="run directories of `mnemo train` (or their metrics.jsonl)")
    p.add_argument("--out", default="perplexity.png", help="output image (default perplexity.png)")
    p.add_argument("--title", default=None)
    p.set_defaults(func=_cmd_plot)

    from .bench import BENCH_SUITES

    p = sub.add_parser("bench", help="benchmarks: " + "; ".join(f"'{k}' ({v[1]})" for k, v in BENCH_SUITES.items()))
    p.add_argument("suite", choices=sorted(BENCH_SUITES))
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
