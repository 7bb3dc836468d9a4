#!/usr/bin/env python3
"""Language-model comparison at equal parameters: several `mnemo train` runs ("arms") that differ in
their model, each then scored by `mnemo eval books` (sliding-window perplexity and bits per byte on
long held-out documents) at the training context and longer.

`mnemo experiment` sweeps the token-level tasks of mnemotorch.tasks.synthetic only (it has no
language-modelling task), so this driver runs language-model comparisons such as configs/lm_routing.yaml:

    python scripts/lm_compare.py configs/lm_routing.yaml --out OUT            # GPU: arms side by side
    python scripts/lm_compare.py configs/lm_routing.yaml --quick --out /tmp/lm  # toy sizes on a CPU
    python scripts/lm_compare.py configs/lm_routing.yaml --plan                # arms and parameter counts only

Config (YAML):

    experiment: lm_routing            # output file stem
    description: free text
    train: {...}                      # a `mnemo train` config (mnemotorch.train.TrainConfig keys) shared by the arms;
                                      # "{shared}" in data.source is the shared data folder
                                      # (mnemotorch.bench.evaluate.find_shared_data: $MNEMO_DATA_DIR or ../shared/data)
    arms: {name: {...}, ...}          # per arm, overrides merged into `train` (usually model.hidden_size / layer_plan)
    eval: {contexts: [4096, 8192], stride_fraction: 0.5, batch_size: 4, max_tokens: null, data: null}
                                      # data: files/folders ("{shared}/..." allowed); null = the held-out
                                      # book + WikiText-2 test (mnemotorch.bench.evaluate.default_book_sources)
    anchors: [{model: ..., ppl: ..., source: ...}]
    quick: {...}                      # merged over the above with --quick (mappings key by key)

Outputs in --out (at most 3 files, so a GPU call brings everything back): <name>.json (per arm: the
resolved train config, parameters, the trainer's summary and validation curve, the books rows per
context), <name>.md (tables), <name>_rest.tgz (per-arm logs and metrics.jsonl). Runs (checkpoints) go
to --runs (default /tmp/lm_compare/<name>); an arm already in <name>.json with the same fingerprint is
not run again, and a cut-short arm resumes from its checkpoint (`mnemo train` resume=auto) while its
run directory exists (same machine).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

TOP_KEYS = {"experiment", "description", "train", "arms", "eval", "anchors", "quick"}
EVAL_DEFAULTS: dict[str, Any] = {"contexts": None, "stride_fraction": 0.5, "batch_size": 4, "max_tokens": None, "data": None}


def deep_merge(base: dict[str, Any], over: dict[str, Any] | None) -> dict[str, Any]:
    """The experiment runner's merge (dicts merge recursively, anything else replaces); ``None`` adds nothing."""
    from mnemotorch.bench.experiment import _deep_merge

    return _deep_merge(base, over or {})


def _shared(text: Any) -> Any:
    if not isinstance(text, str) or "{shared}" not in text:
        return text
    from mnemotorch.bench.evaluate import find_shared_data

    root = find_shared_data()
    if root is None:
        raise FileNotFoundError(f"{text!r}: no shared data folder ($MNEMO_DATA_DIR or ../shared/data)")
    return text.replace("{shared}", str(root))


def load_config(path: str | Path, quick: bool = False) -> dict[str, Any]:
    """The resolved comparison config: quick merged in, every arm's full train config built and
    checked by mnemotorch.train (unknown keys and bad values fail here, before anything runs)."""
    import yaml

    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(TOP_KEYS)}")
    q = raw.pop("quick", None) or {}
    if quick:
        raw = deep_merge(raw, q)
    for key in ("experiment", "train", "arms"):
        if key not in raw:
            raise ValueError(f"{path}: missing {key!r}")
    if not isinstance(raw["arms"], dict) or not raw["arms"]:
        raise ValueError(f"{path}: 'arms' must be a non-empty mapping name -> train overrides")
    ev = {**EVAL_DEFAULTS, **(raw.get("eval") or {})}
    bad = sorted(set(ev) - set(EVAL_DEFAULTS))
    if bad:
        raise ValueError(f"{path}: unknown eval key(s) {bad}; allowed: {sorted(EVAL_DEFAULTS)}")
    ev["contexts"] = [int(c) for c in (ev["contexts"] or [int(raw["train"].get("data", {}).get("seq_len", 128))])]
    from mnemotorch.train import config_from_dict

    arms = {}
    for name, over in raw["arms"].items():
        tcfg = deep_merge(raw["train"], over or {})
        tcfg.setdefault("data", {})["source"] = _shared(tcfg.get("data", {}).get("source"))
        config_from_dict(tcfg)  # raises on unknown keys / bad values
        arms[str(name)] = tcfg
    name = str(raw["experiment"]) + ("-quick" if quick else "")
    return {"experiment": name, "description": str(raw.get("description", "")), "arms": arms, "eval": ev,
            "anchors": raw.get("anchors") or [], "quick": quick}


def fingerprint(cfg: dict[str, Any], arm: str) -> str:
    payload = {"train": {k: v for k, v in cfg["arms"][arm].items() if k not in ("out_dir", "device")}, "eval": cfg["eval"]}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def parameter_count(tcfg: dict[str, Any]) -> int:
    """Parameters of an arm's model, with the vocabulary its tokenizer will have (BPE: data.vocab_size)."""
    from mnemotorch.models import MnemoConfig, MnemoForCausalLM
    from mnemotorch.tasks import ByteTokenizer
    from mnemotorch.train import config_from_dict

    c = config_from_dict(tcfg)
    vocab = c.data.vocab_size if c.data.tokenizer == "bpe" else ByteTokenizer().vocab_size
    model = MnemoForCausalLM(MnemoConfig(**c.model, vocab_size=vocab))
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# one arm (a worker process): train, then score


def run_arm(cfg: dict[str, Any], arm: str, runs: Path, device: str | None) -> dict[str, Any]:
    import torch

    from mnemotorch.bench.evaluate import EvalModel, default_book_sources, evaluate_books
    from mnemotorch.train import Trainer, config_from_dict

    tcfg = copy.deepcopy(cfg["arms"][arm])
    tcfg["out_dir"] = str(runs / arm)
    # A run directory left by another version of this arm is cleared (the trainer would resume from it).
    run_dir, fp = runs / arm, fingerprint(cfg, arm)
    marker = run_dir / "fingerprint.txt"
    if run_dir.exists() and (not marker.is_file() or marker.read_text().strip() != fp):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(fp + "\n")
    if device:
        tcfg["device"] = device
    c = config_from_dict(tcfg)
    t0 = time.time()
    trainer = Trainer(c, progress=False)
    summary = trainer.fit()
    train_s = time.time() - t0
    rows_path = Path(c.out_dir) / "metrics.jsonl"
    val = [json.loads(line) for line in rows_path.read_text().splitlines() if '"val_loss"' in line] if rows_path.is_file() else []
    model = trainer.model
    model.eval()
    em = EvalModel(model, trainer.tokenizer)
    ev = cfg["eval"]
    sources = [_shared(s) for s in ev["data"]] if ev["data"] else default_book_sources()
    dev = next(model.parameters()).device
    evals = []
    for ctx in ev["contexts"]:
        t1 = time.time()
        stride = max(1, int(round(ctx * float(ev["stride_fraction"]))))
        try:
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                res = evaluate_books(em, sources, mode="sliding", context=ctx, stride=stride, max_tokens=ev["max_tokens"],
                                     batch_size=int(ev["batch_size"]))
            evals.append({"context": ctx, "stride": stride, "rows": res["rows"], "seconds": round(time.time() - t1, 1)})
        except Exception as err:  # noqa: BLE001 -- e.g. an out-of-memory at the longest context: keep the rest
            evals.append({"context": ctx, "stride": stride, "error": f"{type(err).__name__}: {err}"})
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        print(f"[{arm}] context {ctx}: {evals[-1].get('error') or [(r['document'], round(r['ppl'], 2)) for r in res['rows']]}", flush=True)
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(dev)}
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
    return {
        "arm": arm, "fingerprint": fingerprint(cfg, arm), "status": "ok", "train_config": c.to_dict(),
        "parameters": summary["parameters"], "summary": summary, "val_curve": [{k: r[k] for k in ("step", "tokens_seen", "val_loss", "val_ppl") if k in r} for r in val],
        "train_seconds": round(train_s, 1), "evals": evals, "environment": env,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


# ------------------------------------------------------------------------------------------------
# report


def _fmt(x: Any, nd: int = 2) -> str:
    return "–" if x is None else f"{x:,.{nd}f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


def write_report(cfg: dict[str, Any], results: dict[str, Any], out: Path) -> Path:
    name, arms = cfg["experiment"], results["arms"]
    lines = [f"# {name}", "", cfg["description"].strip(), ""]
    env = next((a.get("environment") for a in arms.values() if a.get("environment")), {})
    lines += [f"Device: {env.get('gpu', env.get('device', '?'))}, torch {env.get('torch', '?')}; "
              f"{results.get('finished_at', '')}; wall time {results.get('wall_seconds', '?')} s.", ""]
    docs: list[str] = []
    for a in arms.values():
        for e in a.get("evals", []):
            for r in e.get("rows", []):
                if r["document"] not in docs:
                    docs.append(r["document"])
    ctxs = cfg["eval"]["contexts"]
    head = ["arm", "parameters", "steps", "train tokens", "train s", "tokens/s", "val ppl (trainer)"]
    head += [f"ppl @ {c} (all)" for c in ctxs] + [f"bpb @ {c} (all)" for c in ctxs]
    lines += ["## Summary (sliding-window perplexity over every held-out document; bits per byte)", "",
              "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for arm in cfg["arms"]:
        a = arms.get(arm)
        if a is None or a.get("status") != "ok":
            lines.append("| " + " | ".join([arm, (a or {}).get("status", "not run")] + ["–"] * (len(head) - 2)) + " |")
            continue
        s = a["summary"]
        tc = a["train_config"]
        pooled = {}
        for e in a["evals"]:
            rows = e.get("rows", [])
            pooled[e["context"]] = next((r for r in rows if r["document"] == "all"), rows[0] if len(rows) == 1 else None)
        cells = [arm, _fmt(a["parameters"]), _fmt(s["steps"]), _fmt(s["steps"] * tc["batch_size"] * tc["data"]["seq_len"]),
                 _fmt(a["train_seconds"], 0), _fmt(s.get("tokens_per_s"), 0), _fmt(s.get("val_ppl"))]
        cells += [_fmt((pooled.get(c) or {}).get("ppl")) for c in ctxs] + [_fmt((pooled.get(c) or {}).get("bpb"), 4) for c in ctxs]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Per document", "", "| arm | document | " + " | ".join(f"ppl @ {c}" for c in ctxs) + " |", "|" + " --- |" * (2 + len(ctxs))]
    for arm in cfg["arms"]:
        a = arms.get(arm) or {}
        for doc in docs:
            vals = []
            for c in ctxs:
                e = next((e for e in a.get("evals", []) if e["context"] == c), {})
                r = next((r for r in e.get("rows", []) if r["document"] == doc), None)
                vals.append(_fmt(r["ppl"]) if r else ("error" if e.get("error") else "–"))
            lines.append(f"| {arm} | {doc} | " + " | ".join(vals) + " |")
    errors = [(arm, e["context"], e["error"]) for arm, a in arms.items() for e in a.get("evals", []) if e.get("error")]
    errors += [(arm, "-", a.get("error")) for arm, a in arms.items() if a.get("status") == "failed"]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {arm} @ {c}: {err}" for arm, c, err in errors]
    curves = {arm: a.get("val_curve", []) for arm, a in arms.items() if a.get("val_curve")}
    if curves:
        lines += ["", "## Validation perplexity during training (trainer's split, training context)", ""]
        for arm, curve in curves.items():
            lines.append(f"- {arm}: " + ", ".join(f"{r['step']}: {r['val_ppl']:.1f}" for r in curve))
    if cfg["anchors"]:
        lines += ["", "## Published anchors", "", "| model | ppl | source |", "| --- | --- | --- |"]
        lines += [f"| {a.get('model', '')} | {a.get('ppl', '')} | {a.get('source', '')} |" for a in cfg["anchors"]]
    path = out / f"{name}.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--quick", action="store_true", help="merge the config's quick: section (toy sizes, CPU)")
    p.add_argument("--out", default="docs/results", help="folder for <name>.json / .md / _rest.tgz")
    p.add_argument("--runs", default=None, help="run directories (checkpoints); default /tmp/lm_compare/<name>")
    p.add_argument("--arms", default=None, help="comma-separated subset of the arms")
    p.add_argument("--parallel", type=int, default=None, help="arms trained side by side (default: all on CUDA, 1 otherwise)")
    p.add_argument("--deadline", type=float, default=None, help="seconds after the start by which every arm process is stopped")
    p.add_argument("--device", default=None, help="cpu | cuda (default: the config's device)")
    p.add_argument("--plan", action="store_true", help="print the arms and their parameter counts, run nothing")
    p.add_argument("--report-only", action="store_true", help="rewrite <name>.md from <name>.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    start = time.time()
    cfg = load_config(args.config, quick=args.quick)
    name = cfg["experiment"]
    out = Path(args.out)
    runs = Path(args.runs or f"/tmp/lm_compare/{name}")
    arms = [a for a in cfg["arms"] if not args.arms or a in args.arms.split(",")]

    if args.worker:  # one arm, in its own process; its record goes to runs/<arm>.result.json
        rec = run_arm(cfg, args.worker, runs, args.device)
        (runs / f"{args.worker}.result.json").write_text(json.dumps(rec, indent=1, default=str) + "\n")
        return 0

    if args.plan:
        for arm in arms:
            t = cfg["arms"][arm]
            print(f"{arm}: {parameter_count(t):,} parameters; model {json.dumps(t.get('model'))}; "
                  f"{t.get('steps')} steps x {t.get('batch_size')} x {t.get('data', {}).get('seq_len')} tokens")
        print(f"eval: {json.dumps(cfg['eval'])}")
        return 0

    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{name}.json"
    results: dict[str, Any] = json.loads(json_path.read_text()) if json_path.is_file() else {"experiment": name, "arms": {}}
    results["config"] = cfg
    if not args.report_only:
        todo = [a for a in arms if (results["arms"].get(a) or {}).get("fingerprint") != fingerprint(cfg, a)
                or results["arms"][a].get("status") != "ok"]
        import torch

        dev = args.device or cfg["arms"][arms[0]].get("device", "auto")
        on_cuda = dev == "cuda" or (dev == "auto" and torch.cuda.is_available())
        parallel = max(1, args.parallel or (len(todo) if on_cuda else 1))
        print(f"{name}: {len(todo)} arm(s) to run ({', '.join(todo) or 'none'}), {parallel} at a time; runs in {runs}", flush=True)
        pending, live = list(todo), {}
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}
        while pending or live:
            while pending and len(live) < parallel:
                arm = pending.pop(0)
                (runs / f"{arm}.result.json").unlink(missing_ok=True)
                cmd = [sys.executable, str(Path(__file__).resolve()), args.config, "--worker", arm, "--runs", str(runs)]
                cmd += (["--quick"] if args.quick else []) + (["--device", args.device] if args.device else [])
                log = open(runs / f"{arm}.log", "w")
                live[arm] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), log, time.time())
                print(f"[{time.time() - start:.0f}s] started {arm}", flush=True)
            time.sleep(1)
            for arm, (proc, log, t0) in list(live.items()):
                late = args.deadline is not None and time.time() - start > args.deadline
                if proc.poll() is None and not late:
                    continue
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                log.close()
                res = runs / f"{arm}.result.json"
                if proc.returncode == 0 and res.is_file():
                    results["arms"][arm] = json.loads(res.read_text())
                else:
                    tail = (runs / f"{arm}.log").read_text(errors="replace").strip().splitlines()[-5:]
                    why = "stopped at the deadline" if late else f"exit code {proc.returncode}"
                    results["arms"][arm] = {"arm": arm, "status": "failed", "error": f"{why}: " + " / ".join(tail)}
                del live[arm]
                print(f"[{time.time() - start:.0f}s] {arm}: {results['arms'][arm]['status']}", flush=True)
                json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
            if args.deadline is not None and time.time() - start > args.deadline:
                for arm in pending:
                    results["arms"].setdefault(arm, {"arm": arm, "status": "not run (deadline)"})
                pending = []
        results["wall_seconds"] = round(time.time() - start, 1)
        results["finished_at"] = time.strftime("%Y-%m-%d %H:%M")
        try:
            rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, timeout=10).stdout.strip()
            results["git_revision"] = rev
        except Exception:  # noqa: BLE001
            pass
        json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        with tarfile.open(out / f"{name}_rest.tgz", "w:gz") as tar:
            for arm in arms:
                for f in (runs / f"{arm}.log", runs / arm / "metrics.jsonl", runs / arm / "train_config.json", runs / arm / "loss.png"):
                    if f.is_file():
                        tar.add(f, arcname=f"{arm}/{f.name}")
    md = write_report(cfg, results, out)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
