"""Capacity of a Hebbian / delta-rule associative memory (the simulation of docs/mixers/hebbian.md).

Store ``N`` pairs of random unit keys ``k_i ∈ R^{d_k}`` and unit values ``v_i ∈ R^{d_v}`` in one
matrix memory ``M [d_v, d_k]``, then read every key back: ``ŷ_j = M k_j``. Two numbers per ``N``:

* **retrieval cosine** ``cos(ŷ_j, v_j)``, averaged over pairs and trials. For Hebb,
  ``ŷ_j = v_j + Σ_{i≠j} (k_iᵀ k_j) v_i`` and each cross-talk weight has variance ``1/d_k``, so
  ``cos ≈ 1 / √(1 + (N − 1)/d_k)`` (Qiao, 2025): 0.71 at ``N = d_k = 64``.
* **identification accuracy**: how often ``argmax_i v_iᵀ ŷ_j`` is ``j`` among the ``N`` stored values.
  For Hebb at ``d_k = d_v = 64``: ≈ 1.0, 0.98, 0.76, 0.33 at ``N`` = 64, 128, 256, 512.

Rules compared (each written through :func:`mnemotorch.ops.linear.hebbian_memory`):

* ``hebb``: one pass, ``M += v kᵀ``.
* ``delta_online``: one pass of the delta rule with η = 1, i.e. what the ``hebbian`` mixer does in a
  sequence. Each write replaces the answer for its key, so the latest pairs are exact and old ones
  are overwritten (a recency memory): a better mean cosine than Hebb well below capacity
  (N ≤ d_k/2: 0.84 vs 0.83 at N = 32), a worse one from N ≈ d_k on (0.67 vs 0.71 at N = 64).
* ``delta``: ``passes`` passes (default 10) over the pairs with the step decreasing as
  ``η_p = 1/(p + 1)`` for pass ``p = 0, 1, ...``. The first pass is ``delta_online``; the later ones
  are cyclic least-mean-squares (Kaczmarz) sweeps that approach the least-squares memory
  ``argmin_M Σ_i ‖M k_i − v_i‖²``; the shrinking step stops the sweeps oscillating when the pairs
  cannot all be stored (``N > d_k``). This is the rule that beats Hebb at every ``N``.
* ``least_squares``: that limit in closed form (``torch.linalg.lstsq``), for reference.

With orthonormal keys (``N ≤ d_k``) cross-talk vanishes and both rules recall exactly.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.linear import hebbian_memory

RULES = ("hebb", "delta_online", "delta", "least_squares")


@contextmanager
def _single_threaded() -> Iterator[None]:
    """Run on one intra-op thread, restoring the setting afterwards.

    The delta rule is thousands of sequential small updates ([trials, 64, 64] each): extra
    threads only add a synchronisation per op, which on a busy CPU made the simulation ~20x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def theory_cosine(n: int, d_k: int) -> float:
    """Expected Hebbian retrieval cosine ``1 / √(1 + (N − 1)/d_k)`` for random unit keys and values."""
    return 1.0 / math.sqrt(1.0 + (n - 1) / d_k)


def _random_unit(trials: int, n: int, d: int, gen: torch.Generator) -> Tensor:
    return F.normalize(torch.randn(trials, n, d, generator=gen, dtype=torch.float64), dim=-1)


def _orthonormal(trials: int, n: int, d: int, gen: torch.Generator) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(trials, d, d, generator=gen, dtype=torch.float64))
    return q[:, :, :n].transpose(1, 2)  # n orthonormal rows per trial


def write_memory(keys: Tensor, values: Tensor, rule: str, passes: int = 10) -> Tensor:
    """The memory ``M [trials, d_v, d_k]`` after storing ``keys [trials, N, d_k]``, ``values [trials, N, d_v]``."""
    if rule == "least_squares":
        # min ‖K Mᵀ − V‖: the fixed point the multi-pass delta rule approaches.
        return torch.linalg.lstsq(keys, values).solution.transpose(1, 2)
    k, v = keys.unsqueeze(2), values.unsqueeze(2)  # [trials, N, H=1, d]
    if rule == "hebb":
        return hebbian_memory(k, v, k, rule="hebb")[1][:, 0]
    m = None
    for p in range(1 if rule == "delta_online" else passes):
        _, m = hebbian_memory(k, v, k, rule="delta", lr=1.0 / (p + 1), initial_state=m)
    return m[:, 0]


def recall(memory: Tensor, keys: Tensor, values: Tensor) -> dict[str, float]:
    """Mean retrieval cosine and argmax identification accuracy of ``memory`` on the stored pairs."""
    read = torch.einsum("bvk,bnk->bnv", memory, keys)
    cosine = F.cosine_similarity(read, values, dim=-1).mean().item()
    scores = torch.einsum("bnv,bmv->bnm", read, values)  # read j against every stored value m
    target = torch.arange(keys.shape[1], device=keys.device)
    accuracy = (scores.argmax(-1) == target).double().mean().item()
    return {"cosine": cosine, "accuracy": accuracy}


def hebbian_capacity(
    n_values: tuple[int, ...] = (64, 128, 256, 512),
    d_k: int = 64,
    d_v: int = 64,
    trials: int = 16,
    delta_passes: int = 10,
    orthonormal_n: tuple[int, ...] = (16, 32, 64),
    seed: int = 0,
) -> dict[str, Any]:
    """Run the capacity simulation; returns a JSON-ready dict (``mnemo bench`` prints :func:`format_table`).

    Returns:
        ``{"config": {...}, "random": [{"n", "theory_cosine", "hebb": {"cosine", "accuracy"}, ...}],
        "orthonormal": [{"n", "hebb": {...}, "delta_online": {...}}], "seconds": float}``.
    """
    for name, n_list in (("n_values", n_values), ("orthonormal_n", orthonormal_n)):
        if not all(isinstance(n, int) and n >= 1 for n in n_list):
            raise ValueError(f"{name} must be positive ints, got {n_list!r}")
    if any(n > d_k for n in orthonormal_n):
        raise ValueError(f"orthonormal_n must be <= d_k ({d_k}): at most d_k keys can be orthonormal, got {orthonormal_n!r}")
    for name, value in (("d_k", d_k), ("d_v", d_v), ("trials", trials), ("delta_passes", delta_passes)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    random_rows, ortho_rows = [], []
    with _single_threaded(), torch.no_grad():
        for n in n_values:
            keys, values = _random_unit(trials, n, d_k, gen), _random_unit(trials, n, d_v, gen)
            row: dict[str, Any] = {"n": n, "theory_cosine": theory_cosine(n, d_k)}
            for rule in RULES:
                row[rule] = recall(write_memory(keys, values, rule, delta_passes), keys, values)
            random_rows.append(row)
        for n in orthonormal_n:
            keys, values = _orthonormal(trials, n, d_k, gen), _random_unit(trials, n, d_v, gen)
            ortho_rows.append({"n": n, **{rule: recall(write_memory(keys, values, rule), keys, values) for rule in ("hebb", "delta_online")}})
    return {
        "benchmark": "hebbian_capacity",
        "config": {
            "d_k": d_k,
            "d_v": d_v,
            "trials": trials,
            "seed": seed,
            "delta": {"passes": delta_passes, "lr_schedule": "1/(pass+1)"},
            "delta_online": {"passes": 1, "lr": 1.0},
        },
        "random": random_rows,
        "orthonormal": ortho_rows,
        "seconds": time.perf_counter() - start,
    }


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table of :func:`hebbian_capacity` results (cosine / accuracy per rule)."""
    cfg = results["config"]
    head = ["N", "theory cos", *(f"{r} cos / acc" for r in RULES)]
    lines = [
        f"Associative-memory capacity, random unit keys/values, d_k={cfg['d_k']}, d_v={cfg['d_v']}, "
        f"{cfg['trials']} trials (delta: {cfg['delta']['passes']} passes, lr {cfg['delta']['lr_schedule']})",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in results["random"]:
        cells = [str(row["n"]), f"{row['theory_cosine']:.3f}"] + [f"{row[r]['cosine']:.3f} / {row[r]['accuracy']:.3f}" for r in RULES]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Orthonormal keys:", "", "| N | hebb cos / acc | delta_online cos / acc |", "|---|---|---|"]
    for row in results["orthonormal"]:
        lines.append(f"| {row['n']} | {row['hebb']['cosine']:.6f} / {row['hebb']['accuracy']:.3f} | {row['delta_online']['cosine']:.6f} / {row['delta_online']['accuracy']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``mnemo bench hebbian [-- --json PATH]``: print the capacity table (and write the results)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="mnemo bench hebbian", description="Hebbian / delta-rule capacity")
    parser.add_argument("--json", default=None, help="also write the raw results to this JSON file")
    args = parser.parse_args(argv)
    results = hebbian_capacity()
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
