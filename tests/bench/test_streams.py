"""The two-stream overlap measure behind ``scripts/profile_titans_layer.py --overlap`` (``mnemotorch.bench.streams``),
on hand-made kernel intervals and a hand-written Chrome trace."""

from __future__ import annotations

import json

import pytest

from mnemotorch.bench.streams import kernels_from_chrome_trace, stream_overlap


def k(name, stream, ts, dur):
    return {"name": name, "stream": stream, "ts": float(ts), "dur": float(dur)}


def test_overlap_counts_only_other_streams_inside_the_key_intervals() -> None:
    kernels = [
        k("sweep", 7, 0, 100), k("sweep", 7, 200, 100),  # the key: [0, 100) and [200, 300)
        k("gemm", 13, 50, 100),  # 50 inside the first sweep, 50 in the gap
        k("gemm", 13, 250, 20),  # inside the second
        k("add", 13, 120, 60),  # in the gap only
        k("fill", 7, 10, 5),  # the key's own stream: not "other"
        k("copy", 21, 290, 30),  # a third stream: 10 inside
    ]
    r = stream_overlap(kernels, "sweep")
    assert r["key_streams"] == [7]
    assert r["key_ms"] == pytest.approx(0.2) and r["key_span_ms"] == pytest.approx(0.2)
    assert r["others_ms"] == pytest.approx((100 + 20 + 60 + 30) / 1e3)
    assert r["others_during_key_ms"] == pytest.approx((50 + 20 + 10) / 1e3)
    assert r["during_fraction"] == pytest.approx(80 / 210)
    assert r["during_by_kernel"][0] == {"kernel": "gemm", "ms": pytest.approx(0.07)}
    # the union of other-stream busy time inside the key: [50, 100) and [250, 270) + [290, 300)
    assert r["others_busy_during_key_ms"] == pytest.approx(0.08)


def test_overlapping_key_kernels_and_concurrent_others_are_not_double_counted_in_the_union() -> None:
    kernels = [k("sweep_a", 1, 0, 100), k("sweep_b", 1, 50, 100),  # span [0, 150)
               k("x", 2, 0, 150), k("y", 3, 0, 150)]  # two other streams busy the whole span
    r = stream_overlap(kernels, "sweep")
    assert r["key_ms"] == pytest.approx(0.2) and r["key_span_ms"] == pytest.approx(0.15)
    assert r["others_during_key_ms"] == pytest.approx(0.3)  # kernel time (both streams)
    assert r["others_busy_during_key_ms"] == pytest.approx(0.15)  # wall time with any other work
    assert stream_overlap(kernels, "absent")["others_during_key_ms"] == 0.0


def test_reads_kernel_events_of_a_chrome_trace(tmp_path) -> None:
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "sweep", "ts": 10, "dur": 5, "args": {"stream": 7}},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 50, "args": {}},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 12, "dur": 10, "args": {"stream": 13}},
        {"ph": "X", "cat": "kernel", "name": "no stream", "ts": 12, "dur": 10, "args": {}},
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 1},
    ]}
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    got = kernels_from_chrome_trace(str(path))
    assert got == [{"name": "sweep", "stream": 7, "ts": 10.0, "dur": 5.0}, {"name": "gemm", "stream": 13, "ts": 12.0, "dur": 10.0}]
    assert stream_overlap(got, "sweep")["others_during_key_ms"] == pytest.approx(0.003)


def test_idle_gaps_between_merged_kernels():
    """Idle time is the span minus the union of kernels over all streams; gaps name the kernels around them."""
    from mnemotorch.bench.streams import idle_gaps

    ks = [
        {"name": "a", "stream": 7, "ts": 0.0, "dur": 100.0},
        {"name": "b", "stream": 8, "ts": 50.0, "dur": 100.0},  # overlaps a: no gap
        {"name": "c", "stream": 7, "ts": 400.0, "dur": 100.0},  # 250 µs after b
        {"name": "d", "stream": 7, "ts": 510.0, "dur": 90.0},  # 10 µs after c
    ]
    r = idle_gaps(ks, top=5)
    assert abs(r["span_ms"] - 0.6) < 1e-9 and abs(r["busy_ms"] - 0.34) < 1e-9 and abs(r["idle_ms"] - 0.26) < 1e-9
    assert [(round(g["ms"], 6), g["after"], g["before"]) for g in r["gaps"]] == [(0.25, "b", "c"), (0.01, "c", "d")]
    assert idle_gaps([])["gaps"] == []


def test_cprofile_tables_lists_the_profiled_function_per_sort_key():
    """:func:`cprofile_tables` runs the function the given number of times under cProfile and returns one pstats
    table per sort key, naming the function with its call count."""
    from mnemotorch.bench.streams import cprofile_tables

    def busy_little_function():
        return sum(range(1000))

    tables = cprofile_tables(busy_little_function, 7, ("tottime", "cumulative"), 10)
    assert list(tables) == ["tottime", "cumulative"]
    for text in tables.values():
        line = next(ln for ln in text.splitlines() if "busy_little_function" in ln)
        assert line.split()[0] == "7"  # ncalls


def test_host_during_gaps_gives_the_window_between_the_gap_and_the_launch_to_the_innermost_host_ops(tmp_path) -> None:
    from mnemotorch.bench.streams import host_during_gaps

    ev = [
        # device: k1 [0, 10), k2 [50, 60) (a 40 µs gap, launched by the host at 45), k3 [61, 70) (launched at 5: not host-bound)
        {"ph": "X", "cat": "kernel", "name": "k1", "ts": 0, "dur": 10, "args": {"stream": 7, "correlation": 1}},
        {"ph": "X", "cat": "kernel", "name": "k2", "ts": 50, "dur": 10, "args": {"stream": 7, "correlation": 2}},
        {"ph": "X", "cat": "kernel", "name": "k3", "ts": 61, "dur": 9, "args": {"stream": 7, "correlation": 3}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 1, "dur": 1, "tid": 5, "args": {"correlation": 1}},
        {"ph": "X", "cat": "cuda_driver", "name": "cuLaunchKernel", "ts": 45, "dur": 2, "tid": 5, "args": {"correlation": 2}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 5, "dur": 1, "tid": 5, "args": {"correlation": 3}},
        # host, thread 5: an outer op [8, 30) with a child [12, 20) (its time not the outer's), then [32, 44); thread 6 ignored
        {"ph": "X", "cat": "cpu_op", "name": "aten::linear", "ts": 8, "dur": 22, "tid": 5},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 12, "dur": 8, "tid": 5},
        {"ph": "X", "cat": "user_annotation", "name": "launch_walk", "ts": 32, "dur": 12, "tid": 5},
        {"ph": "X", "cat": "cpu_op", "name": "aten::add", "ts": 20, "dur": 30, "tid": 6},
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": ev}))
    got = host_during_gaps(str(path))
    rows = got["gaps"]
    assert [r["before"] for r in rows] == ["k2", "k3"]
    first = rows[0]
    assert first["ms"] == pytest.approx(0.04) and first["host_bound"] is True
    # window [10, 45]: the linear's own time inside it 20 - 8 = 12 µs, its mm 8, launch_walk 12, the rest (35 - 32 = 3 µs)
    # in no op
    assert first["host_ops"] == [{"op": "aten::linear", "ms": pytest.approx(0.012)}, {"op": "launch_walk", "ms": pytest.approx(0.012)},
                                 {"op": "aten::mm", "ms": pytest.approx(0.008)}]
    assert first["other_ms"] == pytest.approx(0.003)
    assert rows[1]["host_bound"] is False and rows[1]["host_ops"] == []
    assert got["by_op"] == first["host_ops"]  # only the host-bound gap counts
