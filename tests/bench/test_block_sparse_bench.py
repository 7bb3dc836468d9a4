"""`mnemo bench kernels` (mnemotorch.bench.block_sparse): the full plan covers the issue's targets
in a budget-friendly order, and a tiny run goes end to end on the CPU (kernels in Triton's
interpreter, FlexAttention forward-only there)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mnemotorch.bench import block_sparse as bench

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (tests/conftest.py)")


@pytest.fixture
def restore_autotune():
    from mnemotorch.ops.block_sparse import triton as bs_triton

    mode = bs_triton._AUTOTUNE_MODE
    yield
    bs_triton.set_autotune(mode)


def test_full_plan_covers_the_issue_targets(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(bench, "sliding_window_case", lambda L, W, D, H, blocks, run: calls.append(("swa", L, W, D, H)))
    monkeypatch.setattr(bench, "neighborhood_case", lambda shape, k, D, H, **kw: calls.append(("na", tuple(shape), k, D, H, kw.get("tile_shape"))))
    monkeypatch.setattr(bench, "power_case", lambda L, *a, **kw: calls.append(("power", L)))
    monkeypatch.setattr(bench, "bias_case", lambda L, W, D, H, run: calls.append(("bias", L, W, D, H)))
    args = bench.build_parser().parse_args(["--cases", "swa,na1d,na2d,power,bias"])
    for _, job in bench._jobs(args, bench.Run("cpu"), ((128, 64),)):
        job()
    swa = [c for c in calls if c[0] == "swa"]
    assert sorted(c[1:4] for c in swa) == sorted((L, W, D) for L in (16384, 65536) for W in (1024, 4096) for D in (64, 128))
    assert all(c[4] == 16 for c in swa)
    assert ("na", (32768,), 2048, 128, 1, None) in calls
    assert ("na", (128, 128), 13, 64, 16, (8, 8)) in calls
    assert ("power", 65536) in calls and ("power", 131072) in calls
    # every kind early: W = 1024, D = 128 at both lengths, then NA, Power, the other windows/dims, the bias case
    assert calls[:6] == [("swa", 16384, 1024, 128, 16), ("swa", 65536, 1024, 128, 16), ("na", (32768,), 2048, 128, 1, None),
                         ("na", (128, 128), 13, 64, 16, (8, 8)), ("power", 65536), ("power", 131072)]
    assert calls[-1] == ("bias", 16384, 1024, 128, 16)
    with pytest.raises(SystemExit, match="unknown case"):
        bench._jobs(bench.build_parser().parse_args(["--cases", "swa,nope"]), bench.Run("cpu"), ((128, 64),))


def test_tiny_cpu_run_end_to_end(tmp_path, restore_autotune) -> None:
    out = tmp_path / "tiny.json"
    assert bench.main(["--tiny", "--device", "cpu", "--cases", "na1d,bias", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["device"] == "cpu" and rep["autotune"] == "small" and not rep["skipped"]
    na1d, bias = rep["speed"]
    assert na1d["case"] == "neighborhood_1d" and bias["case"] == "sliding_window_bias"
    for row in (na1d, bias):
        assert all("error" not in r for r in row["results"].values()), row["results"]
        assert row["results"]["ours"]["fwd_ms"] > 0 and row["results"]["ours"]["fwd_bwd_ms"] > 0
        assert row["rel_diff_vs_flex"] < 1e-5  # the kernel (interpreted, fp32) agrees with FlexAttention
    assert na1d["results"]["sdpa_dense"]["fwd_bwd_ms"] > 0
    assert bias["results"]["flex_score_mod"]["fwd_bwd_ms"] is None  # no FlexAttention backward on the CPU
    for c in rep["correctness"]:
        assert not c["nan"] and max(c["out"], c["dq"], c["dk"], c["dv"], c.get("dtable", 0.0)) <= 1e-5, c


def test_time_budget_skips_and_cpu_needs_tiny(tmp_path, restore_autotune) -> None:
    out = tmp_path / "b.json"
    assert bench.main(["--tiny", "--device", "cpu", "--cases", "swa,power", "--time-budget", "0", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["speed"] == [] and rep["skipped"][:2] == ["swa", "swa"] and "power" in rep["skipped"]
    assert bench.main(["--device", "cpu", "--out", str(out)]) == 2
    if not torch.cuda.is_available():
        assert bench.main(["--device", "cuda", "--out", str(out)]) == 2
