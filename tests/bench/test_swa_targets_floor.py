"""scripts/swa_targets_floor.py: the arithmetic behind docs/results/block_sparse.md's floor tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from script_module import load_script

ROOT = Path(__file__).resolve().parents[2]


def _mod():
    return load_script("swa_targets_floor")


def _cell(L, W, D, H, pairs, ours, flex, sdpa):
    """A bench row with the fields the script reads: ``ours`` / ``flex`` / ``sdpa`` are (fwd, fwd+bwd) ms."""
    ms = lambda f, fb: {"fwd_ms": {"graphed": f}, "fwd_bwd_ms": {"graphed": fb}}  # noqa: E731
    g = {k: {"ours": ms(*ours)[k], "flex": ms(*flex)[k], "sdpa_dense_causal": ms(*sdpa)[k]}
         for k in ("fwd_ms", "fwd_bwd_ms")}
    rounds = {"flex": {"fwd_ms": {"median": flex[0] / ours[0]}, "fwd_bwd_ms": {"median": flex[1] / ours[1]}}}
    return dict(case="sliding_window", L=L, W=W, D=D, H=H, B=1, computed_pairs=pairs, cuda_graph_summary=g,
                graph_rounds=rounds)


def test_floors_and_needed_rates(tmp_path) -> None:
    L, W, D, H, pairs = 4096, 512, 64, 2, 10**6
    row = _cell(L, W, D, H, pairs, ours=(0.02, 0.08), flex=(0.03, 0.12), sdpa=(0.1, 0.35))
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"speed": [row, {"case": "neighborhood_1d"}]}))
    (r,) = _mod().rows(str(path))  # the NA-1D row is skipped
    n = pairs * H
    f, b = r["fwd"], r["bwd"]
    assert f["need"] == pytest.approx(0.02) and b["need"] == pytest.approx(0.12 / 1.5 - 0.02)
    assert f["tensor"] == pytest.approx(2 * 2 * n * D / 989e12 * 1e3)
    assert b["tensor"] == pytest.approx(5 * 2 * n * D / 989e12 * 1e3)
    assert f["exp"] == b["exp"] == pytest.approx(n / 3.9e12 * 1e3)
    assert f["no_overlap"] == pytest.approx(f["tensor"] + f["exp"])
    assert f["need_tflops"] == pytest.approx(4 * n * D / 0.02e-3 / 1e12)
    assert b["need_tflops"] == pytest.approx(10 * n * D / (0.06e-3) / 1e12)
    assert b["ours_tflops"] == pytest.approx(10 * n * D / (0.06e-3) / 1e12)
    assert f["sdpa_tflops"] == pytest.approx(2 * L * L * D * H / 0.1e-3 / 1e12)
    assert b["sdpa_tflops"] == pytest.approx(5 * L * L * D * H / 0.25e-3 / 1e12)
    assert f["ratio_median"] == pytest.approx(1.5)


def test_committed_main_case() -> None:
    """The results page's main-case numbers come from the committed run."""
    mod = _mod()
    rs = {r["cell"]: r for r in mod.rows(str(ROOT / mod.DEFAULT))}
    main = rs["64K / W 1024 / D 128"]
    assert main["bwd"]["need"] == pytest.approx(3.059, abs=1e-3)
    assert main["fwd"]["ours"] == pytest.approx(1.153, abs=1e-3)
    assert len(rs) == 8
