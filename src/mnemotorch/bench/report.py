"""Tables and plots of experiment results (written by :mod:`mnemotorch.bench.experiment`).

``best_cells`` applies Zoology's protocol: per (setting, mixer, width), keep the learning rate
with the highest accuracy. ``write_report`` writes ``<name>.md`` and the two plots.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["best_cells", "markdown_report", "plot_accuracy_vs_seq_len", "plot_accuracy_vs_state_size", "write_report"]


def _acc(rec: dict[str, Any]) -> float:
    a = rec.get("accuracy")
    return a if isinstance(a, (int, float)) and math.isfinite(a) else -1.0


def best_cells(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (setting, mixer, width): the best learning rate among successful cells.

    Ties go to the smaller learning rate. Groups whose cells all failed appear with
    ``status: "failed"`` and the first error.
    """
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        groups[(rec["setting_index"], rec["setting"], rec["mixer"], rec["width"])].append(rec)
    out = []
    for (index, setting, mixer, width), recs in groups.items():
        ok = [r for r in recs if r.get("status") == "ok"]
        entry: dict[str, Any] = {
            "setting_index": index, "setting": setting, "mixer": mixer, "width": width,
            "accuracy_by_lr": {f"{r['lr']:.3g}": (r.get("accuracy") if r.get("status") == "ok" else None) for r in sorted(recs, key=lambda r: r["lr"])},
        }
        if ok:
            best = max(sorted(ok, key=lambda r: r["lr"]), key=_acc)
            entry.update({
                "status": "ok", "best_lr": best["lr"], "accuracy": best.get("accuracy"), "metric": best.get("metric"),
                "seq_len": best.get("seq_len"), "state_size": best.get("state_size"), "evals": best.get("evals", []),
                "params": best.get("params"),
            })
        else:
            entry.update({"status": "failed", "error": recs[0].get("error", "")})
        out.append(entry)
    out.sort(key=lambda e: (e["setting_index"], e["mixer"], e["width"]))
    return out


def _fmt_acc(x: Any) -> str:
    return "–" if x is None else f"{x:.3f}"


def _fmt_int(x: Any) -> str:
    if x is None:
        return "–"
    x = int(x)
    return f"{x / 1e6:.2f}M" if x >= 10**6 else f"{x / 1e3:.1f}k" if x >= 10**4 else str(x)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def markdown_report(results: dict[str, Any], cells: list[Any]) -> str:
    """The Markdown report: summary pivot, per-group detail, failed cells, anchors."""
    cfg = results["config"]
    records = [results["cells"][c.id] for c in cells if c.id in results["cells"] and results["cells"][c.id].get("fingerprint") == c.fingerprint]
    best = results.get("best") or best_cells(records)
    n_ok = sum(r.get("status") == "ok" for r in records)
    n_fail = sum(r.get("status") == "failed" for r in records)
    n_pending = len(cells) - len(records)
    env = results.get("environment", {})
    t = cfg["train"]
    batch = sorted({int(c.train["batch_size"]) for c in cells})
    steps = sorted({int(c.train["steps"]) for c in cells})
    lines = [f"# {results['experiment']}", ""]
    if cfg.get("description"):
        lines += [cfg["description"].strip(), ""]
    model = ", ".join(f"{k}={v}" for k, v in cfg["model"].items())
    lines += [
        f"Task `{cfg['task']}` ({', '.join(f'{k}={v}' for k, v in cfg['task_params'].items()) or 'defaults'}); "
        f"model: {model}; {'/'.join(map(str, steps))} steps, batch {'/'.join(map(str, batch))}, AdamW (wd {t['weight_decay']}), "
        f"warm-up {t['warmup_fraction']:.0%} + cosine; {cfg['data']['num_train']} train / {cfg['data']['num_test']} test examples"
        + (f", trained at lengths L - r, r uniform in [0, {t['length_jitter']}) per step (length_jitter)" if t.get("length_jitter") else "")
        + ". "
        f"Device: {env.get('gpu', env.get('device', '?'))}, torch {env.get('torch', '?')}.",
        "",
        f"Cells: {n_ok} ok, {n_fail} failed, {n_pending} not run yet"
        + (" (quick mode: toy sizes)." if cfg.get("quick") else "."),
        "",
    ]
    if cfg.get("exclude"):
        holes = "; ".join(", ".join(f"{k} {'/'.join(f'{v:.3g}' if k == 'lr' else str(v) for v in vals)}" for k, vals in e.items())
                          for e in cfg["exclude"])
        lines += [f"Left out of the grid by the config (`exclude`): {holes}.", ""]
    lines += [
        "Accuracy at the best learning rate per (setting, mixer, width), as in Zoology; "
        f"metric: {best[0].get('metric', 'accuracy') if best else 'accuracy'}. State size: elements of mixer state per sequence, "
        "summed over layers (`model.state_size(seq_len)`).",
        "",
    ]
    settings = []
    for e in best:
        if e["setting"] not in settings:
            settings.append(e["setting"])
    by_key = {(e["setting"], e["mixer"], e["width"]): e for e in best}
    mixers = list(dict.fromkeys(e["mixer"] for e in best))
    widths = sorted({e["width"] for e in best})
    rows = []
    for m in mixers:
        for w in widths:
            row = [m, str(w)]
            for s in settings:
                e = by_key.get((s, m, w))
                row.append("–" if e is None else "failed" if e["status"] == "failed" else f"{_fmt_acc(e['accuracy'])} ({_fmt_int(e['state_size'])})")
            rows.append(row)
    lines += ["## Summary: accuracy (state size)", ""] + _table(["mixer", "width"] + settings, rows) + [""]

    lrs = [f"{lr:.3g}" for lr in cfg["learning_rates"]]
    eval_labels = list(dict.fromkeys(ev["label"] for e in best for ev in e.get("evals", []) or []))
    header = ["setting", "mixer", "width", "params", "seq len", "state size", "best lr", "accuracy"] + [f"lr {x}" for x in lrs] + [f"eval {x}" for x in eval_labels]
    rows = []
    for e in best:
        if e["status"] == "ok":
            evs = {ev["label"]: ev for ev in e.get("evals", []) or []}
            rows.append([e["setting"], e["mixer"], str(e["width"]), _fmt_int(e.get("params")), str(e["seq_len"]), _fmt_int(e["state_size"]), f"{e['best_lr']:.3g}",
                         _fmt_acc(e["accuracy"])] + [_fmt_acc(e["accuracy_by_lr"].get(x)) for x in lrs]
                        + [_fmt_acc(evs[x]["accuracy"]) if x in evs else "–" for x in eval_labels])
        else:
            rows.append([e["setting"], e["mixer"], str(e["width"]), "–", "–", "–", "–", "failed"] + ["failed"] * len(lrs) + ["–"] * len(eval_labels))
    lines += ["## All groups", ""] + _table(header, rows) + [""]

    failed = [r for r in records if r.get("status") == "failed"]
    if failed:
        lines += ["## Failed cells", ""]
        lines += _table(["cell", "error"], [[f"`{r['id']}`", str(r.get("error", "")).replace("|", "\\|").replace("\n", " ")[:300]] for r in failed])
        lines += [""]
    anchors = cfg.get("anchors") or []
    if anchors:
        keys = list(dict.fromkeys(k for a in anchors for k in a))
        lines += ["## Published anchors (for comparison)", ""]
        lines += _table(keys, [[str(a.get(k, "")) for k in keys] for a in anchors]) + [""]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only: never open a window, works without a display
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_state_size(best: list[dict[str, Any]], path: Path, title: str) -> bool:
    """One panel per setting; per mixer, accuracy against state size over widths. False if no data."""
    ok = [e for e in best if e["status"] == "ok" and e.get("state_size")]
    if not ok:
        return False
    plt = _pyplot()
    from matplotlib import ticker

    settings = list(dict.fromkeys(e["setting"] for e in ok))
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.6), squeeze=False, sharey=True)
    mixers = list(dict.fromkeys(e["mixer"] for e in ok))
    for ax, s in zip(axes[0], settings):
        for i, m in enumerate(mixers):
            pts = sorted((e["state_size"], e["accuracy"]) for e in ok if e["setting"] == s and e["mixer"] == m)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}", label=m)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # minor labels collide on short ranges
        ax.set_title(s, fontsize=9)
        ax.set_xlabel("state size (elements)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].set_ylim(-0.02, 1.02)
    axes[0][-1].legend(fontsize=8, loc="center right")  # accuracy sits at 0 and 1: keep the legend in between
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_accuracy_vs_seq_len(best: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Per mixer, accuracy against sequence length (test sets and extra eval sets), best over widths."""
    points: dict[str, dict[int, float]] = defaultdict(dict)
    for e in best:
        if e["status"] != "ok":
            continue
        for seq_len, acc in [(e["seq_len"], e["accuracy"])] + [(ev["seq_len"], ev["accuracy"]) for ev in e.get("evals", []) or []]:
            if acc is None:
                continue
            points[e["mixer"]][seq_len] = max(acc, points[e["mixer"]].get(seq_len, -1.0))
    if not points:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (m, pts) in enumerate(points.items()):
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="o", color=f"C{i}", label=m)
    ax.set_xscale("log", base=2)
    from matplotlib import ticker

    lengths = sorted({x for pts in points.values() for x in pts})
    ax.set_xticks(lengths)
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{int(v)}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("accuracy (best width and lr)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(results: dict[str, Any], cells: list[Any], out_dir: Path) -> dict[str, Path]:
    """Write ``<name>.md``, ``<name>_state_size.png`` and ``<name>_seq_len.png`` into ``out_dir``."""
    name = results["experiment"]
    paths = {"markdown": out_dir / f"{name}.md"}
    paths["markdown"].write_text(markdown_report(results, cells) + "\n", encoding="utf-8")
    best = results.get("best") or []
    p = out_dir / f"{name}_state_size.png"
    if plot_accuracy_vs_state_size(best, p, f"{name}: accuracy vs state size"):
        paths["state_size_plot"] = p
    p = out_dir / f"{name}_seq_len.png"
    if plot_accuracy_vs_seq_len(best, p, f"{name}: accuracy vs sequence length"):
        paths["seq_len_plot"] = p
    return paths
