"""``scripts/ncu_summary.py`` reads the Nsight Compute exports committed under ``docs/results/ncu`` (the numbers the
results pages quote from them)."""

from pathlib import Path

import pytest
from script_module import load_script

ROOT = Path(__file__).resolve().parents[2]
NCU = ROOT / "docs" / "results" / "ncu"


def _module():
    return load_script("ncu_summary")


def test_raw_page_per_kernel_sums():
    mod = _module()
    titans = mod.raw_summary(str(NCU / "ncu_2026-11-27-s21_h100_titans_raw.csv.gz"))
    assert titans["_lmm_split_sweep_kernel"]["launches"] == 4
    assert titans["_lmm_split_sweep_kernel"]["ms"] == pytest.approx(7.365, abs=2e-3)
    assert titans["_lmm_update_vjp_kernel"]["dram_read_gb"] == pytest.approx(6.85, abs=0.01)
    na1d = mod.raw_summary(str(NCU / "ncu_2026-11-27-s21_h100_na1d_raw.csv.gz"))["_swa_fwd_kernel"]
    assert na1d["ms"] == pytest.approx(0.0817, abs=1e-4)  # 81.66 us: the unit is converted
    assert na1d["l2_pct"] == pytest.approx(71.3, abs=0.1)
    assert na1d["stall:barrier"] == pytest.approx(1.2046, abs=1e-3)


def test_sass_page_top_instruction(capsys):
    mod = _module()
    (block,) = mod.sass_summary(str(NCU / "ncu_2026-11-27-s21_h100_na1d_sass.csv.gz"), top=2)
    assert block["kernel"] == "_swa_fwd_kernel"
    assert block["top"][0]["sass"].startswith("WARPGROUP.DEPBAR")
    assert block["top"][0]["pct"] == pytest.approx(19.4, abs=0.5)
    assert mod.main(["--sass", str(NCU / "ncu_2026-11-27-s21_h100_na1d_sass.csv.gz"), "--top", "1"]) == 0
    assert "WARPGROUP.DEPBAR" in capsys.readouterr().out


def test_ncu_kernels_launch_overrides():
    mod = load_script("ncu_kernels")
    assert mod._launch("") == {}
    assert mod._launch("BM=128,BN=64,warps=8,stages=2,tma=1,one_loop=0,lazy=8") == {
        "BM": 128, "BN": 64, "warps": 8, "stages": 2, "tma": True, "one_loop": False, "lazy": 8.0}
