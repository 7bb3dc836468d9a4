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
    assert set(res) == {"ours_block_sparse", "ours_block_sparse_graphs", "ours_flex", "ours_sdpa_masks", "routing_transformer", "sdpa_dense"}
    for name in ("ours_flex", "ours_block_sparse", "ours_block_sparse_graphs"):
        assert "needs CUDA" in res[name]["skipped"], name
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


# ---------------------------------------------------------------------------------------------
# --cuda-graph: CUDA-graph replay timings beside the eager ones (CUDA only; a no-op on the CPU)


def test_cuda_graph_flag_parses() -> None:
    assert routed.build_parser().parse_args([]).cuda_graph is False
    assert routed.build_parser().parse_args(["--cuda-graph"]).cuda_graph is True


def test_cuda_graph_flag_is_a_noop_on_the_cpu(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "routing_transformer", None)
    monkeypatch.setitem(sys.modules, "routing_transformer.routing_transformer", None)
    out = tmp_path / "r.json"
    assert _run([*QUICK, "--cases", "routing", "--cuda-graph", "--out", str(out)]) == 0
    assert "--cuda-graph ignored: CUDA graphs need CUDA" in capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert rep["settings"]["cuda_graph"] is False and "timing_modes" not in rep
    assert any("--cuda-graph ignored" in n for n in rep["notes"])
    (row,) = rep["routing"]
    assert set(row["results"]) == {"ours_block_sparse", "ours_block_sparse_graphs", "ours_flex", "ours_sdpa_masks", "routing_transformer", "sdpa_dense"}
    assert row["results"]["ours_sdpa_masks"]["fwd_bwd_ms"] > 0 and "timing" not in row["results"]["ours_sdpa_masks"]
    assert "cuda_graph_summary" not in row


_aten = torch.ops.aten
#: ops that read tensor values on the host: a sync on CUDA, so not permitted during a capture
_HOST_SYNCS = {_aten._local_scalar_dense.default, _aten.is_nonzero.default, _aten.equal.default, _aten.nonzero.default,
               _aten.masked_select.default, _aten._unique2.default, _aten.unique_dim.default, _aten.unique_consecutive.default}


class _CaptureLike(torch.utils._python_dispatch.TorchDispatchMode):
    """What a capture refuses, watched on the CPU: an op that syncs with the host raises."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func in (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if func in _HOST_SYNCS or bool_index:
            raise RuntimeError(f"operation not permitted when stream is capturing ({func})")
        return func(*args, **kwargs)


def test_cuda_graph_phase_on_the_cpu(monkeypatch) -> None:
    """The --cuda-graph plumbing of routing_case, run on the CPU with a stand-in for graph_ms that calls the
    step as a capture would (a host sync raises GraphCaptureError) and checks graph_ms's contract on it (no
    autograd history returned, every call leaves the same state): the graphed results, their timing modes,
    a not-capturable implementation recorded (and not retried at the next length), ratios and summary."""
    from mnemotorch.bench.block_sparse import GraphCaptureError, _tensors_of
    from mnemotorch.layers import get_mixer

    calls: list[str] = []

    def fake_graph_ms(step, warmup=3, rep=20):
        for _ in range(2):  # warm-up
            out = step()
            assert all(t.grad_fn is None for t in _tensors_of(out)), "a step returned a tensor with autograd history"
        try:
            with _CaptureLike():
                out = step()
        except RuntimeError as exc:
            raise GraphCaptureError(f"{type(exc).__name__}: {exc}") from exc
        calls.append("captured")
        return 0.5

    dense_cls = type(get_mixer("attention", dim=32, num_heads=2))
    plain_forward = dense_cls.forward

    def syncing_forward(self, *args, **kwargs):
        y, st = plain_forward(self, *args, **kwargs)
        if float(y.detach().float().abs().sum()) < 0:  # a host sync, as in a peer that reads a value
            raise AssertionError
        return y, st

    monkeypatch.setattr(routed, "graph_ms", fake_graph_ms)
    monkeypatch.setattr(dense_cls, "forward", syncing_forward)
    monkeypatch.setitem(sys.modules, "routing_transformer", None)
    monkeypatch.setitem(sys.modules, "routing_transformer.routing_transformer", None)
    failures: dict = {}
    rows = [routed.routing_case(L, 32, 2, 32, torch.device("cpu"), torch.float32, backends=("sdpa_masks",), cuda_graph=True,
                                graph_failures=failures) for L in (64, 128)]
    for i, row in enumerate(rows):
        res = row["results"]
        assert set(res) == {"ours_sdpa_masks", "ours_sdpa_masks_graphed", "routing_transformer", "sdpa_dense", "sdpa_dense_graphed"}
        assert res["ours_sdpa_masks"]["timing"] == "eager" and res["sdpa_dense"]["timing"] == "eager"
        assert "timing" not in res["routing_transformer"]  # skipped: no timing
        ours_g, dense_g = res["ours_sdpa_masks_graphed"], res["sdpa_dense_graphed"]
        assert ours_g["timing"] == dense_g["timing"] == "cuda_graph"
        assert ours_g["fwd_ms"] == 0.5  # the forward captures; the forward + backward may or may not (masked SDPA)
        assert "error" not in ours_g and (ours_g["fwd_bwd_ms"] == 0.5 or "not_capturable" in ours_g)
        assert "fwd_ms" not in dense_g and "forward: RuntimeError: operation not permitted" in dense_g["not_capturable"]
        assert "_local_scalar_dense" in dense_g["not_capturable"]
        assert ("not_retried" in dense_g) == (i == 1)
        assert res["ours_sdpa_masks_graphed"]["speedup_fwd_vs_sdpa_dense"] == res["sdpa_dense"]["fwd_ms"] / 0.5
        assert "speedup_fwd_vs_sdpa_dense_graphed" not in res["ours_sdpa_masks"]
        s = row["cuda_graph_summary"]
        assert s["fwd_ms"]["ours_sdpa_masks"] == {"eager": res["ours_sdpa_masks"]["fwd_ms"], "graphed": 0.5}
        assert s["fwd_bwd_ms"]["routing_transformer_eager"] is None
        line = routed._routing_line(row)
        assert "sdpa_dense_graphed: not capturable: " in line and "fwd+bwd (x: routing_transformer eager" in line
    assert set(failures) >= {"sdpa_dense:fwd"} and failures["sdpa_dense:fwd"].startswith("(L=64) forward:")
    assert len(calls) >= 2  # ours' forward captured at both lengths


def test_cuda_graph_summary_ratios() -> None:
    res = {
        "ours_block_sparse": {"fwd_ms": 2.0, "fwd_bwd_ms": 4.0, "timing": "eager"},
        "ours_block_sparse_graphed": {"fwd_ms": 0.5, "fwd_bwd_ms": 1.0, "timing": "cuda_graph"},
        "routing_transformer": {"fwd_ms": 3.0, "fwd_bwd_ms": 5.0, "timing": "eager"},
        "routing_transformer_graphed": {"timing": "cuda_graph", "not_capturable": "forward: RuntimeError: x"},
    }
    s = routed._graph_summary(res)
    assert s["fwd_bwd_ms"]["ours_block_sparse"] == {"eager": 4.0, "graphed": 1.0, "speedup_eager": 1.25, "speedup_graphed": 5.0}
    assert s["fwd_ms"]["routing_transformer_graphed"] is None and s["fwd_ms"]["ours_block_sparse"]["speedup_graphed"] == 6.0
    lines = routed._graph_summary_lines({"L": 8192, "cuda_graph_summary": s})
    assert lines[0] == ("  L=8192 fwd+bwd (x: routing_transformer eager / ours): routing_transformer eager 5.00 ms || "
                        "ours_block_sparse eager 4.00 ms x1.25 | graphed 1.00 ms x5.00")
