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
    # the record of what ran: no Gluon forward off sm_90; the launch rows of the three kernels
    kernels = na1d["results"]["ours"]["kernels"]
    assert kernels["forward"] == "triton" and set(kernels["launch"]) == {"fwd", "dkdv", "dq"}
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


# ---------------------------------------------------------------------------------------------
# --cuda-graph: CUDA-graph replay timings beside the eager ones (CUDA only; a no-op on the CPU)


def test_cuda_graph_flag_parses() -> None:
    assert bench.build_parser().parse_args([]).cuda_graph is False
    assert bench.build_parser().parse_args(["--cuda-graph"]).cuda_graph is True


def test_cuda_graph_flag_is_a_noop_on_the_cpu(tmp_path, capsys, restore_autotune) -> None:
    out = tmp_path / "g.json"
    assert bench.main(["--tiny", "--device", "cpu", "--cases", "na1d", "--cuda-graph", "--skip-correctness", "--out", str(out)]) == 0
    assert "--cuda-graph ignored: CUDA graphs need CUDA" in capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert rep["cuda_graph"] is False and "timing_modes" not in rep and "--cuda-graph ignored" in rep["cuda_graph_note"]
    (row,) = rep["speed"]
    assert set(row["results"]) == {"ours", "sdpa_dense", "flex_row_major"}  # eager only, as without the flag
    assert row["results"]["ours"]["fwd_bwd_ms"] > 0 and "timing" not in row["results"]["ours"]
    assert "cuda_graph_summary" not in row and not any("graphed" in k for k in row)


#: set by the graph_ms stand-in while it calls a step "as a capture would"
_CAPTURING = [False]


def _host_sync(t: torch.Tensor) -> None:
    """A host read of a value, refused like a CUDA capture refuses it (a sync) while a step is 'captured'."""
    if _CAPTURING[0]:
        raise RuntimeError("operation not permitted when stream is capturing (host read of a tensor value)")
    if float(t.detach().abs().sum()) < 0:
        raise AssertionError


class _SyncInBackward(torch.autograd.Function):
    """Identity whose backward reads a value on the host (a capturable forward, a backward that is not)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        _host_sync(g)
        return g


FWD_MS, FWD_BWD_MS = 0.25, 1.0


def _fake_graph_ms(calls: list):
    """A stand-in for graph_ms on the CPU: warm-up calls, then one call as a capture would see it (a
    ``_host_sync`` raises GraphCaptureError); checks the step returns no autograd history. Forward steps
    (a tensor returned) take FWD_MS, forward + backward steps (the gradients) FWD_BWD_MS."""

    def fake(step, warmup=3, rep=20):
        calls.append((warmup, rep))
        for _ in range(2):
            out = step()
            assert all(t.grad_fn is None for t in bench._tensors_of(out)), "a step returned a tensor with autograd history"
        _CAPTURING[0] = True
        try:
            out = step()
        except RuntimeError as exc:
            raise bench.GraphCaptureError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            _CAPTURING[0] = False
        return FWD_MS if isinstance(out, torch.Tensor) else FWD_BWD_MS

    return fake


def test_cuda_graph_phase_on_the_cpu(monkeypatch, capsys) -> None:
    """The --cuda-graph plumbing of the cases, run on the CPU with a stand-in for graph_ms: graphed results
    beside the eager ones with their timing modes, the ratios in both modes, a forward that does not
    capture (SDPA with a host sync) and a forward + backward that does not (ours with a host sync in its
    backward) recorded as not_capturable and not retried in the next case of the kind, the graphed SDPA
    result reused with the eager one, the summary and its printed lines."""
    import torch.nn.functional as F

    from mnemotorch.ops import block_sparse as ops

    calls: list = []
    monkeypatch.setattr(bench, "graph_ms", _fake_graph_ms(calls))
    plain_sdpa, plain_ours = F.scaled_dot_product_attention, ops.block_sparse_attention

    def syncing_sdpa(*args, **kwargs):
        out = plain_sdpa(*args, **kwargs)
        _host_sync(out)  # in the forward
        return out

    monkeypatch.setattr(F, "scaled_dot_product_attention", syncing_sdpa)
    monkeypatch.setattr(ops, "block_sparse_attention", lambda *a, **kw: _SyncInBackward.apply(plain_ours(*a, **kw)))
    run = bench.Run("cpu", ("sdpa", "flex"), flex_compile=False, dtype=torch.float32, cuda_graph=True)
    rows = [bench.sliding_window_case(L, 32, 32, H=2, run=run) for L in (128, 256)]
    rows.append(bench.power_case(256, 32, 2, block_size=16, run=run))  # same SDPA shape as the second row

    for i, row in enumerate(rows):
        res = row["results"]
        assert all(res[n]["timing"] == "eager" for n in res if not n.endswith("_graphed"))
        assert all(res[n]["timing"] == "cuda_graph" for n in res if n.endswith("_graphed"))
        ours_e, ours_g, sdpa_e, sdpa_g = res["ours"], res["ours_graphed"], res["sdpa_dense_causal"], res["sdpa_dense_causal_graphed"]
        # ours: the forward captures, the forward + backward does not (tried in the first case of each kind only)
        assert ours_g["fwd_ms"] == FWD_MS and ours_g["fwd_bwd_ms"] is None and ours_g["peak_extra_gib"] is None
        assert ours_g["fwd_tflops_computed"] > 0 and "error" not in ours_g
        assert ours_g["not_capturable"].startswith("(sliding_window L=128) forward + backward: " if i == 1 else "forward + backward: ")
        assert "host read of a tensor value" in ours_g["not_capturable"] and ("not_retried" in ours_g) == (i == 1)
        # SDPA: its forward does not capture; not retried in the next sliding-window case, reused in the power case
        assert "fwd_ms" not in sdpa_g and "host read of a tensor value" in sdpa_g["not_capturable"]
        assert sdpa_g["not_capturable"].startswith("forward: " if i == 0 else "(sliding_window L=128) forward: ")
        assert ("not_retried" in sdpa_g) == (i > 0) and sdpa_g.get("reused", False) == (i == 2) == sdpa_e.get("reused", False)
        # ratios peer / ours: eager vs eager unchanged; ours graphed vs each peer graphed and eager
        assert row["speedup_fwd_vs_sdpa_dense_causal"] == sdpa_e["fwd_ms"] / ours_e["fwd_ms"]
        assert row["speedup_fwd_graphed_vs_sdpa_dense_causal"] == sdpa_e["fwd_ms"] / FWD_MS
        assert "speedup_fwd_bwd_graphed_vs_sdpa_dense_causal" not in row  # no graphed fwd+bwd of ours
        assert "speedup_fwd_graphed_vs_sdpa_dense_causal_graphed" not in row and "speedup_fwd_vs_sdpa_dense_causal_graphed" not in row
        s = row["cuda_graph_summary"]
        assert s["fwd_ms"]["ours"] == {"eager": ours_e["fwd_ms"], "graphed": FWD_MS, "host_ms": ours_e["fwd_ms"] - FWD_MS}
        assert s["fwd_ms"]["sdpa_dense_causal"] == {"eager": sdpa_e["fwd_ms"], "graphed": None,
                                                    "speedup_eager": sdpa_e["fwd_ms"] / ours_e["fwd_ms"], "speedup_graphed": None,
                                                    "speedup_ours_graphed_vs_eager": sdpa_e["fwd_ms"] / FWD_MS}
        text = bench._line(row)
        assert "fwd, CUDA graphs (x: peer / ours): ours eager" in text and "sdpa_dense_causal_graphed: not capturable: " in text
        assert "| ours_graphed" not in text  # graphed results only in the summary lines
    for row in rows[:2]:  # flex: forward only on the CPU; its forward captures
        res = row["results"]
        assert res["flex_graphed"]["fwd_ms"] == FWD_MS and res["flex_graphed"]["fwd_bwd_ms"] is None
        assert "not_capturable" not in res["flex_graphed"]
        assert row["speedup_fwd_graphed_vs_flex_graphed"] == 1.0
        assert row["speedup_fwd_graphed_vs_flex"] == res["flex"]["fwd_ms"] / FWD_MS
        assert row["cuda_graph_summary"]["fwd_ms"]["flex"]["speedup_graphed"] == 1.0
    assert set(run.graph_failures) == {("sliding_window", "ours", "fwd_bwd"), ("sliding_window", "sdpa_dense_causal", "fwd"),
                                       ("power", "ours", "fwd_bwd")}
    assert run.graph_jobs == []
    # captures tried: swa 1 (ours fwd, fwd+bwd, sdpa fwd, flex fwd), swa 2 (ours fwd, flex fwd), power (ours fwd, fwd+bwd)
    assert len(calls) == 8
    assert "  sdpa_dense_causal_graphed: not capturable: forward: " in capsys.readouterr().out


def test_cuda_graph_ratios_when_every_capture_works(monkeypatch) -> None:
    """Both modes captured for ours and SDPA (NA-1D at tiny size): every ratio and the summary line."""
    monkeypatch.setattr(bench, "graph_ms", _fake_graph_ms([]))
    run = bench.Run("cpu", ("sdpa",), flex_compile=False, dtype=torch.float32, cuda_graph=True)
    c = bench.TINY["na1d"]
    row = bench.neighborhood_case(c["shape"], c["kernel"], c["D"], c["H"], run=run)
    res = row["results"]
    assert set(res) == {"ours", "ours_graphed", "sdpa_dense", "sdpa_dense_graphed"}
    for name in ("ours_graphed", "sdpa_dense_graphed"):
        assert res[name] == {**res[name], "timing": "cuda_graph", "fwd_ms": FWD_MS, "fwd_bwd_ms": FWD_BWD_MS}
        assert "not_capturable" not in res[name]
    e = res["sdpa_dense"]
    assert row["speedup_fwd_graphed_vs_sdpa_dense_graphed"] == 1.0 and row["speedup_fwd_bwd_graphed_vs_sdpa_dense_graphed"] == 1.0
    assert row["speedup_fwd_bwd_graphed_vs_sdpa_dense"] == e["fwd_bwd_ms"] / FWD_BWD_MS
    assert row["speedup_fwd_bwd_vs_sdpa_dense"] == e["fwd_bwd_ms"] / res["ours"]["fwd_bwd_ms"]
    d = row["cuda_graph_summary"]["fwd_bwd_ms"]["sdpa_dense"]
    assert d["speedup_graphed"] == 1.0 and d["speedup_ours_graphed_vs_eager"] == e["fwd_bwd_ms"] / FWD_BWD_MS
    lines = bench._graph_summary_lines(row)
    assert len(lines) == 2 and lines[0].startswith(f"  L={row['L']} fwd+bwd, CUDA graphs (x: peer / ours): ours eager ")
    assert f"graphed {FWD_BWD_MS:.3f} ms x1.00 (ours graphed vs its eager x{e['fwd_bwd_ms'] / FWD_BWD_MS:.2f})" in lines[0]


def test_graph_rounds_record_the_spread(monkeypatch, capsys) -> None:
    """--graph-rounds 3: every graphed implementation timed three times, interleaved, with the ratio of each
    round and its min / median / max per peer (the stand-in timer makes every ratio 1)."""
    calls: list = []
    monkeypatch.setattr(bench, "graph_ms", _fake_graph_ms(calls))
    run = bench.Run("cpu", ("sdpa",), flex_compile=False, dtype=torch.float32, cuda_graph=True, graph_rounds=3)
    c = bench.TINY["na1d"]
    row = bench.neighborhood_case(c["shape"], c["kernel"], c["D"], c["H"], run=run)
    res = row["results"]
    for name in ("ours_graphed", "sdpa_dense_graphed"):
        assert res[name]["fwd_ms_rounds"] == [FWD_MS] * 3 and res[name]["fwd_bwd_ms_rounds"] == [FWD_BWD_MS] * 3
    assert len(calls) == 2 * 2 * 3  # (fwd, fwd+bwd) x (ours, SDPA) x 3 rounds
    g = row["graph_rounds"]
    assert g["rounds"] == 3 and set(g) == {"rounds", "ratios", "sdpa_dense"}
    for metric in ("fwd_ms", "fwd_bwd_ms"):
        assert g["sdpa_dense"][metric] == {"per_round": [1.0] * 3, "min": 1.0, "median": 1.0, "max": 1.0}
    assert "sdpa_dense / ours, fwd, 3 graphed rounds: min x1.00, median x1.00, max x1.00" in capsys.readouterr().out
    assert bench.build_parser().parse_args(["--graph-rounds", "4"]).graph_rounds == 4


def test_measure_graphed_options() -> None:
    """The shared helper (also used by mnemo bench routed): slow calls get fewer replays; no backward asked,
    none tried; a forward that does not capture stops there."""
    seen: list = []

    def timer(step, **kw):
        seen.append(kw)
        step()
        return 2.0

    x = torch.randn(3, requires_grad=True)
    r = bench.measure_graphed(lambda: x * 2, torch.ones(3), [x], slow=True, timer=timer)
    assert r == {"timing": "cuda_graph", "fwd_ms": 2.0, "fwd_bwd_ms": 2.0, "peak_extra_gib": None}
    assert seen == [{"warmup": 1, "rep": 5}] * 2
    seen.clear()
    assert bench.measure_graphed(lambda: x * 2, torch.ones(3), [x], backward=False, timer=timer)["fwd_bwd_ms"] is None
    assert seen == [{}]

    def refuse(step, **kw):
        raise bench.GraphCaptureError("RuntimeError: nope")

    assert bench.measure_graphed(lambda: x * 2, torch.ones(3), [x], timer=refuse) == {
        "timing": "cuda_graph", "not_capturable": "forward: RuntimeError: nope"}
