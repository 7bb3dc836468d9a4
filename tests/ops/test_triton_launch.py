"""The launch cache (ops/triton_launch.py): a hit launches the compiled kernel the first launch
returned, with every parameter in order; any change Triton could specialise on is a miss.

The compiled path needs a GPU; here a fake JIT kernel stands in for Triton's, so the cache's logic
(keys, argument order, fallbacks) is checked on the CPU. The GPU tests of the NA-2D / NA-1D /
sliding-window kernels run through it for real. Also the choice of Triton's newer bundled ptxas
(:func:`ptxas_for_build`, :func:`built_with_ptxas`)."""

from __future__ import annotations

import os
import types

import pytest
import torch

from mnemotorch.ops import triton_launch as tl_launch


class FakeCompiled:
    def __init__(self, tag):
        self.tag, self.function, self.packed_metadata, self.calls = tag, object(), ("meta", tag), []

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, g0, g1, g2, stream, function, packed, meta, enter, exit_, *args):
        assert function is self.function and packed == self.packed_metadata
        self.calls.append(((g0, g1, g2), stream, args))


class FakeKernel:
    """Stands in for a JITFunction ``k(x, n, s, A: constexpr, B: constexpr)``: compiles one
    FakeCompiled per distinct call and records what went through the normal path."""

    arg_names = ["x", "n", "s", "A", "B"]

    def __init__(self):
        self.normal = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.normal.append((grid, args, kwargs))
            return FakeCompiled(len(self.normal))
        return run


@pytest.fixture
def fake_triton(monkeypatch):
    runtime = types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None, interpret=False)
    monkeypatch.setattr(tl_launch, "_knobs", types.SimpleNamespace(runtime=runtime))
    active = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda dev: 1234)
    monkeypatch.setattr(tl_launch, "_driver", types.SimpleNamespace(active=active))
    monkeypatch.setattr(tl_launch, "enabled", lambda: True)
    return runtime


def test_hit_launches_the_compiled_kernel_with_all_parameters_in_order(fake_triton):
    k = FakeKernel()
    launch = tl_launch.CachedLaunch(k)
    x = torch.zeros(8)
    first = launch[(3, 2)](x, 7, 0.5, A=4, B=True, num_warps=4)
    assert len(k.normal) == 1 and launch.misses == 1
    again = launch[(5,)](x, 7, 0.5, A=4, B=True, num_warps=4)
    assert again is first and len(k.normal) == 1 and launch.hits == 1
    assert first.calls == [((5, 1, 1), 1234, (x, 7, 0.5, 4, True))]


@pytest.mark.parametrize("change", ["int", "float", "constexpr", "warps", "dtype", "alignment"])
def test_anything_triton_specialises_on_is_a_miss(fake_triton, change):
    k = FakeKernel()
    launch = tl_launch.CachedLaunch(k)
    x = torch.zeros(64)
    base = dict(args=(x, 16, 0.5), kw=dict(A=4, B=True, num_warps=4))
    launch[(1,)](*base["args"], **base["kw"])
    args, kw = list(base["args"]), dict(base["kw"])
    if change == "int":
        args[1] = 1  # Triton specialises n == 1 (and n % 16): any other value is another entry
    elif change == "float":
        args[2] = 0.25
    elif change == "constexpr":
        kw["A"] = 8
    elif change == "warps":
        kw["num_warps"] = 8
    elif change == "dtype":
        args[0] = x.to(torch.float64)
    else:
        args[0] = x[1:]  # 4-byte offset: not 16-byte aligned
    launch[(1,)](*args, **kw)
    assert len(k.normal) == 2 and launch.hits == 0


def test_uncacheable_calls_take_the_normal_path(fake_triton):
    k = FakeKernel()
    launch = tl_launch.CachedLaunch(k)
    x = torch.zeros(8)
    for _ in range(2):
        launch[(1,)](x, 7, 0.5, A=4, num_warps=4)  # B missing: the launcher would get too few parameters
        launch[(1,)](x, [7], 0.5, A=4, B=1, num_warps=4)  # an argument type the key does not know
    assert len(k.normal) == 4 and launch.hits == 0 and not launch.entries


def test_launch_hooks_and_the_switch_turn_the_cache_off(fake_triton, monkeypatch):
    k = FakeKernel()
    launch = tl_launch.CachedLaunch(k)
    x = torch.zeros(8)
    fake_triton.launch_enter_hook = lambda *a: None  # e.g. a profiler
    launch[(1,)](x, 7, 0.5, A=4, B=1)
    launch[(1,)](x, 7, 0.5, A=4, B=1)
    assert len(k.normal) == 2
    monkeypatch.undo()
    monkeypatch.setenv("MNEMO_LAUNCH_CACHE", "0")
    assert not tl_launch.enabled()


def test_entries_are_bounded(fake_triton):
    k = FakeKernel()
    launch = tl_launch.CachedLaunch(k, max_entries=3)
    x = torch.zeros(8)
    for n in range(5):
        launch[(1,)](x, n + 2, 0.5, A=4, B=1)
    assert list(launch.entries) and len(launch.entries) == 3
    launch[(1,)](x, 6, 0.5, A=4, B=1)  # the newest is kept
    assert launch.hits == 1


def test_launcher_is_one_per_kernel_object_and_follows_a_swapped_global(fake_triton):
    """``launcher(kernel)``: the same CachedLaunch for the same kernel (its hits accumulate across call sites); a
    wrapper a test puts in the kernel's place gets its own, so the wrapper sees the launches."""
    k, wrapper = FakeKernel(), FakeKernel()
    assert tl_launch.launcher(k) is tl_launch.launcher(k)
    x = torch.zeros(8)
    for _ in range(3):
        tl_launch.launcher(k)[(1,)](x, 7, 0.5, A=4, B=True)
    assert (tl_launch.launcher(k).hits, tl_launch.launcher(k).misses) == (2, 1)
    tl_launch.launcher(wrapper)[(1,)](x, 7, 0.5, A=4, B=True)
    assert len(wrapper.normal) == 1 and len(k.normal) == 1
    assert tl_launch.launcher(k) in tl_launch.launchers() and tl_launch.launcher(wrapper) in tl_launch.launchers()


def test_interpreter_never_caches(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not tl_launch.enabled()


def test_tma_row_view() -> None:
    """``[B, T, H, D]`` as ``[B * T, H * D]`` rows for a 2-D TMA descriptor, only where strides and alignment allow."""
    from mnemotorch.ops.triton_launch import tma_row_view

    t = torch.zeros(2, 8, 4, 16, dtype=torch.bfloat16)
    assert tma_row_view(t) == ([16, 64], [64, 1])
    assert tma_row_view(t.transpose(1, 2).contiguous().transpose(1, 2)) is None  # heads outer: rows not contiguous
    assert tma_row_view(t[..., :8]) is None  # a head-dim slice: stride(2) != D
    assert tma_row_view(torch.zeros(1, 8, 1, 4, dtype=torch.bfloat16)) is None  # 8-byte rows
    assert tma_row_view(t[:1, 1:]) == ([7, 64], [64, 1])  # offset by one row of 128 bytes: still aligned
    flat = torch.zeros(4 + 8 * 4 * 16, dtype=torch.bfloat16)
    assert tma_row_view(flat[4:].view(1, 8, 4, 16)) is None  # base 8 bytes off a 16-byte boundary


@pytest.mark.parametrize(
    "cap, used, newer, env, want",
    [
        ((9, 0), ("/t/ptxas", "12.8"), ("/t/ptxas-blackwell", "12.9"), {}, ("/t/ptxas-blackwell", (12, 9))),  # Triton 3.6
        ((9, 0), ("/t/ptxas-blackwell", "13.4"), ("/t/ptxas-blackwell", "13.4"), {}, (None, (13, 4))),  # Triton 3.9
        ((9, 0), ("/torch/bin/ptxas", "13.0"), ("/t/ptxas-blackwell", "12.9"), {}, (None, (13, 0))),  # set by inductor
        ((9, 0), ("/t/ptxas", "12.8"), ("/t/ptxas-blackwell", "12.8"), {}, (None, (12, 8))),  # nothing new enough
        ((9, 0), ("/t/ptxas", "12.8"), ("/t/ptxas-blackwell", "12.9"), {"MNEMO_BUNDLED_PTXAS": "0"}, (None, (12, 8))),  # switched off
        ((8, 0), ("/t/ptxas", "12.8"), ("/t/ptxas-blackwell", "12.9"), {}, (None, (12, 8))),  # offered on Hopper only
        ((10, 0), ("/t/ptxas-blackwell", "12.9"), ("/t/ptxas-blackwell", "12.9"), {}, (None, (12, 9))),
    ],
)
def test_ptxas_for_build(monkeypatch, cap, used, newer, env, want):
    """A kernel that needs ptxas 12.9 is built with the one Triton takes where that is new enough, else on Hopper with
    the newer one Triton bundles; the release it is built with comes back either way."""
    monkeypatch.delenv("MNEMO_BUNDLED_PTXAS", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(tl_launch, "_bundled_ptxas_tools", lambda arch: (used, newer))
    assert tl_launch.ptxas_for_build(cap, (12, 9)) == want


def test_built_with_ptxas_switches_triton_and_restores(monkeypatch):
    """Inside the block Triton's ptxas knob (and ``TRITON_PTXAS_PATH``) name the given binary; after it, what was
    there before; None changes nothing."""
    knobs = pytest.importorskip("triton.knobs")
    monkeypatch.delenv("TRITON_PTXAS_PATH", raising=False)
    path = knobs.nvidia.ptxas_blackwell.path  # a ptxas every Triton with Hopper support ships
    before = knobs.nvidia.ptxas.path
    with tl_launch.built_with_ptxas(None):
        assert knobs.nvidia.ptxas.path == before and "TRITON_PTXAS_PATH" not in os.environ
    with tl_launch.built_with_ptxas(path):
        assert knobs.nvidia.ptxas.path == path and os.environ["TRITON_PTXAS_PATH"] == path
    assert knobs.nvidia.ptxas.path == before and "TRITON_PTXAS_PATH" not in os.environ
