"""`mnemo bench routed` (routing attention vs routing-transformer / SDPA; landmark retrieval memory) on the
CPU at tiny sizes: the JSON has the expected keys, a missing peer is reported as skipped, a failing
implementation is recorded rather than raised, and bad arguments give clear errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from mnemotorch.bench import BENCH_SUITES, run_bench_suite
from mnemotorch.bench import routed
from mnemotorch.cli import main as cli_main

QUICK = ["--device", "cpu", "--quick"]


def _run(argv: list[str]) -> int:
    # one thread: the tiny CPU cases are slower with several threads on a busy machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_bench_suite("routed", argv)
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("routed") / "sub" / "routed.json"
    with pytest.MonkeyPatch.context() as mp:  # the peer is absent, whatever this machine has installed
        mp.setitem(sys.modules, "routing_transformer", None)
        mp.setitem(sys.modules, "routing_transformer.routing_transformer", None)
        assert _run([*QUICK, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_registered() -> None:
    assert BENCH_SUITES["routed"][0] == "mnemotorch.bench.routed:main"


def test_report_top_level(report) -> None:
    for key in ("suite", "env", "argv", "settings", "notes", "routing", "landmark", "landmark_summary", "stopped_early", "elapsed_s"):
        assert key in report, key
    assert report["suite"] == "routed" and report["stopped_early"] is False
    for key in ("torch", "triton", "python", "bench_device"):
        assert key in report["env"], key
    assert report["settings"]["device"] == "cpu" and report["settings"]["dtype"] == "float32"
    assert any("routing_transformer" in n for n in report["notes"])


def test_routing_rows(report) -> None:
    (row,) = report["routing"]
    for key in ("L", "B", "dim", "heads", "window", "num_clusters", "dtype", "results", "routing_stats", "config_ours", "seconds"):
        assert key in row, key
    assert row["num_clusters"] == row["L"] // row["window"]
    assert row["config_ours"]["mode"] == "causal_exact" and row["config_ours"]["shared_qk"] is True
    res = row["results"]
    assert set(res) == {"ours_block_sparse", "ours_flex", "ours_sdpa_masks", "routing_transformer", "sdpa_dense"}
    assert "needs CUDA" in res["ours_flex"]["skipped"] and "needs CUDA" in res["ours_block_sparse"]["skipped"]
    assert "not importable" in res["routing_transformer"]["skipped"]  # skipped, not crashed
    ours = res["ours_sdpa_masks"]
    for key in ("fwd_ms", "fwd_bwd_ms", "peak_extra_gib", "first_call_s", "speedup_fwd_vs_sdpa_dense", "speedup_fwd_bwd_vs_sdpa_dense"):
        assert key in ours, key
    assert ours["fwd_ms"] > 0 and ours["peak_extra_gib"] is None  # no memory reading on the CPU
    assert res["sdpa_dense"]["fwd_bwd_ms"] > 0
    stats = row["routing_stats"]
    assert stats["cluster_size_mean"] == row["L"] / row["num_clusters"]
    assert 0 < stats["flex_tiles_visited_fraction_of_causal"] <= 1
    assert stats["block_sparse_packed_rows_per_token"] >= 1 and stats["block_sparse_tiles"]["partial"] > 0


def test_landmark_rows(report) -> None:
    rows = report["landmark"]
    train = report["settings"]["landmark_train_len"]
    assert [r["L"] for r in rows] == [f * train for f in report["settings"]["landmark_factors"]]
    for row in rows:
        assert set(row["results"]) == {"retrieval_block", "retrieval_token", "exact"}
        for name, r in row["results"].items():
            for key in ("prefill_s", "prefill_ms_per_position", "decode_ms_per_token_median", "gpu_peak_extra_mib_prefill",
                        "gpu_peak_extra_mib_decode", "state_mib_gpu", "state_mib_cpu", "gpu_allocated_trace_mib"):
                assert key in r, (name, key)
        for name in ("retrieval_block", "retrieval_token"):
            assert row["results"][name]["state_mib_cpu"] > 0  # the KV blocks live in the CPU store
            assert "prefill_speedup_vs_exact" in row["results"][name]
    assert set(report["landmark_summary"]) == {"retrieval_block", "retrieval_token", "exact"}
    assert report["landmark_summary"]["exact"]["L"] == [r["L"] for r in rows]


def test_peer_runs_when_installed(tmp_path) -> None:
    pytest.importorskip("routing_transformer.routing_transformer")
    out = tmp_path / "r.json"
    assert _run([*QUICK, "--cases", "routing", "--routing-backends", "sdpa_masks", "--peers", "routing_transformer", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["routing"][0]["results"]
    assert res["routing_transformer"]["fwd_bwd_ms"] > 0
    assert "speedup_fwd_bwd_vs_routing_transformer" in res["ours_sdpa_masks"]


def test_failures_are_recorded(tmp_path, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(routed, "landmark_run", boom)
    out = tmp_path / "r.json"
    assert _run([*QUICK, "--cases", "landmark", "--landmark-factors", "2", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["landmark"][0]
    assert row["results"]["retrieval_block"] == {"error": "RuntimeError: boom"}


def test_time_budget_stops_before_the_next_case(tmp_path) -> None:
    out = tmp_path / "r.json"
    assert _run([*QUICK, "--time-budget", "0", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["stopped_early"] is True and rep["routing"] == [] and rep["landmark"] == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cases", "routing,bogus"], "--cases: unknown value(s) 'bogus'; choose from routing, landmark"),
        (["--lengths", "100"], "not a multiple of --window"),
        (["--lengths", "128,x"], "--lengths: expected a comma-separated list of integers"),
        (["--lengths", "0"], "--lengths: values must be >= 1"),
        (["--dim", "30", "--heads", "4"], "must be a multiple of --heads"),
        (["--peers", "flash"], "--peers: unknown value(s) 'flash'"),
        (["--routing-backends", "cuda"], "--routing-backends: unknown value(s) 'cuda'"),
        (["--landmark-granularities", "chunk"], "choose from block, token"),
        (["--landmark-top-k", "0"], "--landmark-top-k must be >= 1"),
        (["--landmark-factors", "2,-1"], "--landmark-factors: values must be >= 1"),
        (["--time-budget", "-1"], "--time-budget must be >= 0"),
        (["--device", "tpu"], "invalid choice: 'tpu'"),
    ],
)
def test_bad_arguments(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as err:
        routed.main([*QUICK, *argv])
    assert err.value.code == 2
    captured = capsys.readouterr().err
    assert "mnemo bench routed" in captured and message in captured


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_default_without_cuda_is_a_clear_error(tmp_path, capsys) -> None:
    assert routed.main(["--out", str(tmp_path / "r.json")]) == 2
    assert "--device cpu --quick" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_cli_passes_options_to_the_suite(capsys) -> None:
    with pytest.raises(SystemExit) as err:
        cli_main(["bench", "routed", "--", "--help"])
    assert err.value.code == 0
    out = capsys.readouterr().out
    assert "mnemo bench routed" in out and "--landmark-factors" in out and "--time-budget" in out
