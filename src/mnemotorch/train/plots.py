"""Loss-curve plots written beside the metrics (matplotlib Agg canvas: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["plot_loss_curve", "plot_curves", "plot_perplexity_vs_tokens"]


def _figure() -> tuple[Any, Any]:
    # A bare Figure on an Agg canvas, not pyplot: works headless and never changes the backend
    # (or the open figures) of a notebook/application that imported us.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig: Any, path: Path) -> None:
    # Write then rename so a reader (an image viewer refreshing the file) never sees half a PNG.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def plot_loss_curve(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Plot train loss (rows with ``"loss"``) and validation loss (rows with ``"val_loss"``) against step."""
    rows = list(rows)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = _figure()
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    out = Path(path)
    _save(fig, out)
    return out


def plot_curves(curves: Mapping[str, Sequence[tuple[float, float]]], path: str | os.PathLike[str], *,
                title: str | None = None, xlabel: str = "step", ylabel: str = "validation loss", logy: bool = False) -> Path:
    """One line per named curve of ``(x, y)`` points (e.g. the validation loss of each mixer)."""
    fig, ax = _figure()
    if logy:
        ax.set_yscale("log")
    for name, points in curves.items():
        if points:
            ax.plot(*zip(*points), "o-", label=name, linewidth=1.5, markersize=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend()
    fig.tight_layout()
    out = Path(path)
    _save(fig, out)
    return out


def plot_perplexity_vs_tokens(runs: Mapping[str, Iterable[Mapping[str, Any]]], path: str | os.PathLike[str], *,
                              title: str | None = None) -> Path:
    """Validation perplexity against training tokens, one line per run (``metrics.jsonl`` rows).

    Rows without ``tokens_seen`` (runs older than that field) are placed by ``step`` and the axis says so.
    """
    curves: dict[str, list[tuple[float, float]]] = {}
    by_tokens = True
    for name, rows in runs.items():
        val = [r for r in rows if "val_ppl" in r]
        by_tokens = by_tokens and all("tokens_seen" in r for r in val)
        curves[name] = [(r.get("tokens_seen", r["step"]), r["val_ppl"]) for r in val]
    out = plot_curves(curves, path, title=title, xlabel="training tokens" if by_tokens else "step",
                      ylabel="validation perplexity", logy=True)
    return out
