"""`mnemo bench memory` (bench/neural_memory.py) on the CPU at tiny sizes: the JSON it writes, a missing
titans-pytorch reported as skipped, a peer's ratios, the profiler breakdown, and clear argument errors."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types

import pytest
import torch
from torch import nn

from mnemotorch.bench import BENCH_SUITES, run_bench_suite
from mnemotorch.bench import neural_memory as nm

FAST = ["--device", "cpu", "--quick", "--warmup", "0", "--rep", "1"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One quick run of every case (and the profile) with titans-pytorch made unimportable."""
    out = tmp_path_factory.mktemp("memory_bench") / "memory.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "titans_pytorch", None)  # import fails, find_spec says "not installed"
        assert nm.main([*FAST, "--profile", "--profile-top", "5", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_suite_registered() -> None:
    assert BENCH_SUITES["memory"][0] == "mnemotorch.bench.neural_memory:main"
    assert "titans-pytorch" in BENCH_SUITES["memory"][1]


def test_report_top_level(report) -> None:
    assert report["suite"] == "memory"
    assert report["cases"] == ["lmm", "mag_model", "decode"]
    for key in ("torch", "triton", "python", "device_type", "titans_pytorch"):
        assert key in report["env"]
    assert report["env"]["device_type"] == "cpu"
    assert report["spec"]["titans_pytorch_fwd_bwd_ms"] == 62.0 and report["spec"]["target_ours_fwd_bwd_ms"] == 12.0
    assert set(report["configs"]["ours"]) == {"matched", "default"}
    assert report["configs"]["titans_pytorch_default"]["depth"] == 2
    assert report["settings"]["tf32"] is False and report["total_seconds"] > 0


def test_lmm_rows(report) -> None:
    (row,) = report["lmm"]
    assert {k: row[k] for k in ("case", "L", "dim", "heads", "head_dim", "chunk_size", "B", "dtype", "chunks")} == {
        "case": "lmm", "L": 64, "dim": 32, "heads": 2, "head_dim": 16, "chunk_size": 16, "B": 1, "dtype": "bfloat16", "chunks": 4}
    for name in ("ours_matched", "ours_default"):
        r = row["results"][name]
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["peak_extra_gib"] is None  # no allocator stats on the CPU
        assert r["fwd_tflops"] > 0 and r["flops_fwd"]["total"] == r["flops_fwd"]["memory"] + r["flops_fwd"]["projections"]
        assert r["fwd_bwd_ms_per_chunk"] == pytest.approx(r["fwd_bwd_ms"] / 4)
    matched = row["results"]["ours_matched"]["config"]
    # the peer's default memory: 2-layer MLP, hidden 4 d_head, GELU, x + LN(f(x)), no clipping
    assert (matched["depth"], matched["hidden"], matched["activation"], matched["residual"], matched["layer_norm"]) == (2, 64, "gelu", True, True)
    assert matched["max_grad_norm"] is None and matched["memory_shapes"] == [[16, 64], [64, 16]]
    default = row["results"]["ours_default"]["config"]
    assert default["activation"] == "silu" and default["layer_norm"] is False


def test_missing_peer_is_skipped(report) -> None:
    peer = report["lmm"][0]["results"]["titans_pytorch"]
    assert peer == {"skipped": "titans_pytorch not installed"}
    assert report["env"]["titans_pytorch"] is None
    assert "speedup_fwd_bwd_vs_titans_pytorch" not in report["lmm"][0]["results"]["ours_matched"]


def test_code_path_recorded(report) -> None:
    path = report["code_path"]
    assert "neural_memory_chunked" in path["memory_function"]
    assert path["calls"]["neural_memory_chunked"] == 1 and path["calls"]["neural_memory_reference"] == 0
    assert path["segments_per_forward"] == 4  # the profiled forward: L = 64, chunks of 16
    assert path["calls"]["full_chunk_steps"] == 4 and path["calls"]["partial_segments"] == 0
    assert path["torch_compile"] is False and isinstance(path["triton_module"], bool)


def test_mag_model_rows(report) -> None:
    plans = [r["plan"] for r in report["mag_model"]]
    assert plans == ["titans_mag", "sliding_window"]
    mag = report["mag_model"][0]
    assert mag["layer_spec"] == {"type": "titans_mag", "window": 16, "chunk_size": 16}
    assert mag["step_ms"] > 0 and mag["tokens_per_s"] == pytest.approx(64 / (mag["step_ms"] * 1e-3))
    assert mag["autocast"] == "bfloat16" and mag["parameters"] > 0


def test_decode_rows(report) -> None:
    assert [r["plan"] for r in report["decode"]] == ["titans_lmm", "titans_mag"]
    for row in report["decode"]:
        assert [c["context"] for c in row["contexts"]] == [16, 48]
        for c in row["contexts"]:
            assert c["step_ms_median"] > 0 and c["prefill_ms"] > 0 and c["tokens_per_s"] > 0
        # a bounded state: the same number of elements whatever the context
        if row["plan"] == "titans_lmm":
            assert row["contexts"][0]["state_elements"] == row["contexts"][1]["state_elements"]
        assert row["latency_ratio_longest_vs_shortest_context"] > 0


class _FakeNeuralMemory(nn.Module):
    """Stands in for titans_pytorch.NeuralMemory: same constructor and call convention."""

    def __init__(self, dim, chunk_size=1, heads=1, dim_head=None):
        super().__init__()
        self.lin = nn.Linear(dim, dim, bias=False)
        self.memory_model = nn.Linear(dim_head, dim_head, bias=False)
        self.chunk_size, self.heads = chunk_size, heads

    def forward(self, x):
        return self.lin(x), None


def test_peer_runs_on_same_inputs_with_ratios(tmp_path, monkeypatch) -> None:
    fake = types.ModuleType("titans_pytorch")
    fake.__spec__ = importlib.machinery.ModuleSpec("titans_pytorch", None)
    fake.NeuralMemory = _FakeNeuralMemory
    fake.__version__ = "fake"
    monkeypatch.setitem(sys.modules, "titans_pytorch", fake)
    monkeypatch.setattr(nm, "_installed_version", lambda name: None)  # ignore a real titans-pytorch install
    out = tmp_path / "m.json"
    assert nm.main([*FAST, "--cases", "lmm", "--configs", "matched", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["lmm"][0]
    peer, ours = row["results"]["titans_pytorch"], row["results"]["ours_matched"]
    assert peer["fwd_ms"] > 0 and peer["version"] == "fake" and peer["config"]["heads"] == 2 and peer["config"]["chunk_size"] == 16
    assert ours["speedup_fwd_bwd_vs_titans_pytorch"] == pytest.approx(peer["fwd_bwd_ms"] / ours["fwd_bwd_ms"])
    assert ours["speedup_fwd_vs_titans_pytorch"] == pytest.approx(peer["fwd_ms"] / ours["fwd_ms"])


def test_peers_none_and_load_peer_reason(tmp_path) -> None:
    assert nm.load_peer("no_such_peer_package_xyz") == (None, "no_such_peer_package_xyz not installed")
    out = tmp_path / "m.json"
    assert nm.main([*FAST, "--cases", "lmm", "--configs", "default", "--peers", "none", "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["lmm"][0]["results"]) == {"ours_default"}


def test_compile_flag_times_compiled_beside_eager(tmp_path) -> None:
    """--compile: ours_<config>_compiled next to the eager row, first calls (compilation) apart from the medians."""
    from mnemotorch.ops.memory import chunked

    torch._dynamo.reset()
    chunked._COMPILED_STEPS.clear()
    out = tmp_path / "m.json"
    argv = [*FAST, "--cases", "lmm", "--configs", "matched", "--peers", "none", "--lengths", "32,48", "--compile",
            "--compile-backend", "aot_eager", "--profile", "--profile-top", "3", "--out", str(out)]
    try:
        assert nm.main(argv) == 0
    finally:
        torch._dynamo.reset()
        chunked._COMPILED_STEPS.clear()
    report = json.loads(out.read_text())
    assert report["settings"]["compile_memory"] == {"backend": "aot_eager", "mode": None}
    first, second = (row["results"] for row in report["lmm"])
    for res in (first, second):
        assert set(res) == {"ours_matched", "ours_matched_compiled"}
        eager, comp = res["ours_matched"], res["ours_matched_compiled"]
        assert eager["compile_memory"] is False and "first_fwd_s" not in eager
        assert comp["compile_memory"] == {"backend": "aot_eager", "mode": None}
        assert comp["first_fwd_s"] > 0 and comp["first_fwd_bwd_s"] > 0 and comp["fwd_ms"] > 0
        assert comp["speedup_fwd_bwd_vs_eager"] == pytest.approx(eager["fwd_bwd_ms"] / comp["fwd_bwd_ms"])
    # the profile (first job) compiled the step; the chunk step's shapes do not depend on L
    assert first["ours_matched_compiled"]["compiled_in_this_row"] is False
    assert second["ours_matched_compiled"]["compiled_in_this_row"] is False
    assert report["profile"]["code_path"]["torch_compile"] is False
    prof = report["profile_compiled"]
    assert prof["code_path"]["torch_compile"] == {"backend": "aot_eager", "mode": None}
    assert prof["code_path"]["calls"]["full_chunk_steps"] == 2 and prof["code_path"]["calls"]["partial_segments"] == 0
    assert prof["first_fwd_s"] > 0 and prof["first_fwd_bwd_s"] > 0 and prof["fwd_bwd"]["aten_kernel_ops"] > 0


def test_compile_only_needs_compile(capsys) -> None:
    with pytest.raises(SystemExit) as err:
        nm.main([*FAST, "--cases", "lmm", "--compile-only"])
    assert err.value.code == 2 and "--compile-only needs --compile" in capsys.readouterr().err


def test_profile_counts_ops_per_chunk(report) -> None:
    row = report["profile"]
    assert (row["L"], row["chunks"], row["config"]) == (64, 4, "matched")
    for phase in ("fwd", "fwd_bwd"):
        r = row[phase]
        assert r["aten_kernel_ops"] > 0 and r["aten_kernel_ops_per_chunk"] == pytest.approx(r["aten_kernel_ops"] / 4)
        assert len(r["top_ops"]) == 5 and all("self_cpu_ms" in t for t in r["top_ops"])
        assert "cuda_kernels" not in r  # CPU run: only the op-count estimate
    assert row["fwd_bwd"]["aten_kernel_ops"] > row["fwd"]["aten_kernel_ops"]


def test_flops_count() -> None:
    # one chunk of c = 2, one head, one 1x1 layer, dim 1: 2c²(c+1) + 2c(1+2) + 2c²·2 + 2·2·c
    f = nm.lmm_flops_fwd(2, 1, 1, 2, [(1, 1)])
    assert f["memory"] == 2 * 4 * 3 + 2 * 2 * 3 + 2 * 4 * 2 + 2 * 2 * 2
    assert f["projections"] == 2 * 2 * 1 * (3 + 3 + 2)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cases", "lmm,foo"], "unknown case 'foo'; choose from lmm, mag_model, decode"),
        (["--peers", "fla"], "unknown peer 'fla'; choose from titans_pytorch (or 'none')"),
        (["--lengths", "4096,-1"], "expected a comma list of positive integers, got '4096,-1'"),
        (["--dim", "abc"], "expected a positive integer, got 'abc'"),
        (["--dim", "100", "--heads", "16"], "--dim (100) must be divisible by --heads (16)"),
        (["--mag-hidden", "48", "--mag-heads", "16"], "even head dim"),
        (["--configs", "fast"], "unknown config 'fast'; choose from matched, default"),
        (["--device", "tpu"], "invalid choice: 'tpu'"),
        (["--warmup", "-1"], "--warmup must be >= 0"),
    ],
)
def test_bad_arguments_fail_clearly(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as err:
        nm.main(["--device", "cpu", *argv])
    assert err.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_missing_is_reported(capsys, tmp_path) -> None:
    assert run_bench_suite("memory", ["--out", str(tmp_path / "x.json")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


# --cuda-graph: CUDA-graph replay timings beside the eager ones (CUDA only; a no-op on the CPU)


def test_cuda_graph_flag_is_a_noop_on_the_cpu(tmp_path, capsys) -> None:
    out = tmp_path / "m.json"
    assert nm.main([*FAST, "--cases", "lmm", "--configs", "matched", "--peers", "none", "--cuda-graph", "--out", str(out)]) == 0
    assert "--cuda-graph ignored: CUDA graphs need CUDA" in capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert rep["settings"]["cuda_graph"] is False and "timing_modes" not in rep
    assert rep["cuda_graph_note"].startswith("--cuda-graph ignored")
    (row,) = rep["lmm"]
    assert set(row["results"]) == {"ours_matched"} and "timing" not in row["results"]["ours_matched"]
    assert "cuda_graph_summary" not in row


#: set by the graph_ms stand-in while it calls a step "as a capture would"
_CAPTURING = [False]
FWD_MS, FWD_BWD_MS = 0.25, 1.0


def _fake_graph_ms(calls: list):
    """A stand-in for graph_ms on the CPU: two warm-up calls (checking that the step returns no autograd
    history), then one call as a capture would see it: a ``Tensor.item`` raises there, which becomes a
    GraphCaptureError. Forward steps (a tensor returned) take FWD_MS, forward + backward steps FWD_BWD_MS."""
    from mnemotorch.bench.block_sparse import GraphCaptureError, _tensors_of

    def fake(step, warmup=3, rep=20):
        calls.append((warmup, rep))
        for _ in range(2):
            out = step()
            assert all(t.grad_fn is None for t in _tensors_of(out)), "a step returned a tensor with autograd history"
        _CAPTURING[0] = True
        try:
            out = step()
        except RuntimeError as exc:
            raise GraphCaptureError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            _CAPTURING[0] = False
        return FWD_MS if isinstance(out, torch.Tensor) else FWD_BWD_MS

    return fake


class _SyncInBackward(torch.autograd.Function):
    """Identity whose backward reads a value on the host (a capturable forward, a backward that is not)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if g.abs().sum().item() < 0:
            raise AssertionError
        return g


class _SyncingPeer(_FakeNeuralMemory):
    """A peer with parameters its forward does not use (as titans-pytorch's memory model) and a host sync in its backward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.unused = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return _SyncInBackward.apply(self.lin(x)), None


def test_cuda_graph_phase_on_the_cpu(monkeypatch) -> None:
    """The --cuda-graph plumbing of lmm_case, run on the CPU with a stand-in for graph_ms: graphed results of
    ours (eager and compiled) and of the peer beside the eager ones, their timing modes, the peer's unused
    parameter left out of the differentiated inputs, its backward's host sync recorded as not_capturable
    and not retried at the next length, the ratios against the peer's eager and graphed times, the summary."""
    from mnemotorch.ops.memory import chunked

    fake = types.ModuleType("titans_pytorch")
    fake.__spec__ = importlib.machinery.ModuleSpec("titans_pytorch", None)
    fake.NeuralMemory = _SyncingPeer
    fake.__version__ = "fake"
    monkeypatch.setitem(sys.modules, "titans_pytorch", fake)
    monkeypatch.setattr(nm, "_installed_version", lambda name: None)
    calls: list = []
    monkeypatch.setattr(nm, "graph_ms", _fake_graph_ms(calls))
    plain_item = torch.Tensor.item

    def item(self):
        if _CAPTURING[0]:
            raise RuntimeError("operation not permitted when stream is capturing (Tensor.item)")
        return plain_item(self)

    monkeypatch.setattr(torch.Tensor, "item", item)
    torch._dynamo.reset()
    chunked._COMPILED_STEPS.clear()
    failures: dict = {}
    try:
        # the compiled variant through dynamo's "eager" backend: the plumbing, not a compilation
        rows = [nm.lmm_case(L, 32, 2, 16, ["matched"], ("titans_pytorch",), torch.device("cpu"), torch.float32, warmup=0, rep=1,
                            compile_memory={"backend": "eager", "mode": None}, cuda_graph=True, graph_failures=failures)
                for L in (32, 48)]
    finally:
        torch._dynamo.reset()
        chunked._COMPILED_STEPS.clear()
    n_params = len(list(nm.build_ours(32, 2, 16, "matched", torch.device("cpu"), torch.float32).parameters()))
    for i, row in enumerate(rows):
        res = row["results"]
        assert set(res) == {"ours_matched", "ours_matched_compiled", "titans_pytorch",
                            "ours_matched_graphed", "ours_matched_compiled_graphed", "titans_pytorch_graphed"}
        for name in ("ours_matched", "ours_matched_compiled", "titans_pytorch"):
            assert res[name]["timing"] == "eager" and res[f"{name}_graphed"]["timing"] == "cuda_graph"
        for name in ("ours_matched_graphed", "ours_matched_compiled_graphed"):
            g = res[name]
            assert (g["fwd_ms"], g["fwd_bwd_ms"], g["peak_extra_gib"]) == (FWD_MS, FWD_BWD_MS, None)
            assert g["grad_inputs"] == 1 + n_params and "inputs_without_grad" not in g and "not_capturable" not in g
            assert g["speedup_fwd_bwd_vs_titans_pytorch"] == pytest.approx(res["titans_pytorch"]["fwd_bwd_ms"] / FWD_BWD_MS)
            assert g["speedup_fwd_vs_titans_pytorch_graphed"] == 1.0  # the peer's forward captured
            assert "speedup_fwd_bwd_vs_titans_pytorch_graphed" not in g  # its forward + backward did not
            assert g["fwd_bwd_ms_per_chunk"] == pytest.approx(FWD_BWD_MS / row["chunks"])
            slow = max(res[name[: -len("_graphed")]]["fwd_ms"], res[name[: -len("_graphed")]]["fwd_bwd_ms"]) > nm.GRAPH_SLOW_MS
            assert g["replays"] == ({"warmup": 1, "rep": 5} if slow else {"warmup": 3, "rep": 20})
        peer_g = res["titans_pytorch_graphed"]
        assert peer_g["fwd_ms"] == FWD_MS and peer_g["fwd_bwd_ms"] is None
        assert peer_g["inputs_without_grad"] == ["unused", "memory_model.weight"] and peer_g["grad_inputs"] == 2  # x, lin.weight
        assert ("not_retried" in peer_g) == (i == 1)
        reason = peer_g["not_capturable"]
        assert (reason.startswith("(L=32) forward + backward: RuntimeError: operation not permitted") if i else
                reason.startswith("forward + backward: RuntimeError: operation not permitted"))
        s = row["cuda_graph_summary"]
        e, p = res["ours_matched"]["fwd_bwd_ms"], res["titans_pytorch"]["fwd_bwd_ms"]
        assert s["fwd_bwd_ms"]["ours_matched"] == pytest.approx(
            {"eager": e, "graphed": FWD_BWD_MS, "host_ms": e - FWD_BWD_MS, "speedup_eager": p / e, "speedup_graphed": p / FWD_BWD_MS})
        assert s["fwd_bwd_ms"]["titans_pytorch_graphed"] is None and s["fwd_ms"]["titans_pytorch_graphed"] == FWD_MS
        assert s["fwd_ms"]["ours_matched_compiled"]["speedup_graphed_vs_graphed"] == 1.0
        line = nm._line(row)
        assert f"L={row['L']} fwd+bwd, CUDA graphs (x: titans_pytorch eager / ours)" in line
        assert "titans_pytorch_graphed: not capturable: " in line and f"ours_matched_graphed {FWD_MS:.2f}/{FWD_BWD_MS:.2f} ms" in line
    assert set(failures) == {"titans_pytorch:fwd_bwd"}
    # ours twice per length (fwd, fwd+bwd) x 2 variants, the peer's forward at both lengths and its backward once
    assert len(calls) == 2 * (4 + 1) + 1


def test_fused_flag_is_a_noop_on_the_cpu(tmp_path, capsys) -> None:
    out = tmp_path / "m.json"
    assert nm.main([*FAST, "--cases", "lmm", "--configs", "matched", "--peers", "none", "--fused", "--out", str(out)]) == 0
    assert "--fused ignored" in capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert rep["settings"]["fused"] is False and set(rep["lmm"][0]["results"]) == {"ours_matched"}


def test_fused_forward_row_through_the_interpreter(monkeypatch) -> None:
    """``ours_<config>_fused``: the layer with MNEMO_MEMORY_FUSED=1 runs the kernel (here through Triton's
    interpreter: the layer's CUDA-only gate is lifted), forward and training, and equals the chunked path."""
    import os

    from mnemotorch.layers.titans import TitansLMM
    from mnemotorch.ops.memory import fused_triton

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py)")
    monkeypatch.setattr(TitansLMM, "_use_fused_memory", lambda self, q, m: os.environ.get("MNEMO_MEMORY_FUSED") == "1")
    calls = []
    real = fused_triton.neural_memory_fused
    monkeypatch.setattr(fused_triton, "neural_memory_fused", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("MNEMO_MEMORY_FUSED", "keep")
    x = torch.randn(1, 40, 64, generator=torch.Generator().manual_seed(0))
    job: list = []
    r = nm.fused_forward("matched", 64, 4, 16, x, torch.device("cpu"), torch.float32, 0, 1, graph=job)
    assert calls and not r["inference"] and r["fwd_ms"] > 0 and r["first_call_s"] > 0 and r["fwd_bwd_ms"] > 0
    assert r["rel_rms_vs_chunked"] <= 1e-5 and r["rel_grad_x_vs_chunked"] <= 1e-5 and r["config"]["layer_norm"] is True
    assert r["backward_settings"]["group_elements"] > 0
    assert os.environ["MNEMO_MEMORY_FUSED"] == "keep"  # restored
    # the CUDA-graph job: the same layer, fused by its own flag (not the environment), every input reached
    call, names, inputs, used = job
    assert names[0] == "x" and len(names) == len(inputs) == len(used) and all(used)
    monkeypatch.setattr(TitansLMM, "_use_fused_memory", lambda self, q, m: self.fused_memory)
    n = len(calls)
    y = call()
    assert len(calls) == n + 1 and y.shape == x.shape


def test_fused_row_gets_a_cuda_graph_timing(monkeypatch) -> None:
    """``--fused --cuda-graph``: ``ours_<config>_fused_graphed`` from the fused layer's own captured call (here the
    stand-in timer over Triton's interpreter), with every input reached and no capture failure; the summary lists it
    beside the eager fused time."""
    import os

    from mnemotorch.layers.titans import TitansLMM

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py)")
    monkeypatch.setattr(TitansLMM, "_use_fused_memory", lambda self, q, m: self._fused_requested())
    calls: list = []
    monkeypatch.setattr(nm, "graph_ms", _fake_graph_ms(calls))
    row = nm.lmm_case(32, 64, 4, 16, ["matched"], (), torch.device("cpu"), torch.float32, warmup=0, rep=1, eager=False,
                      cuda_graph=True, fused=True)
    res = row["results"]
    assert set(res) == {"ours_matched_fused", "ours_matched_fused_graphed"}
    g = res["ours_matched_fused_graphed"]
    assert (g["fwd_ms"], g["fwd_bwd_ms"], g["timing"]) == (FWD_MS, FWD_BWD_MS, "cuda_graph") and "not_capturable" not in g
    n_params = len(list(nm.build_ours(64, 4, 16, "matched", torch.device("cpu"), torch.float32).parameters()))
    assert g["grad_inputs"] == 1 + n_params and len(calls) == 2
    e = res["ours_matched_fused"]["fwd_bwd_ms"]
    assert row["cuda_graph_summary"]["fwd_bwd_ms"]["ours_matched_fused"]["graphed"] == FWD_BWD_MS
    assert row["cuda_graph_summary"]["fwd_bwd_ms"]["ours_matched_fused"]["host_ms"] == pytest.approx(e - FWD_BWD_MS)
