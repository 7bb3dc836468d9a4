"""The Gluon Hopper forward and backward (ops/block_sparse/swa_gluon.py, swa_gluon_bwd.py) on a CPU machine: they
compile to sm_90 with the installed Triton (Gluon is experimental and its API moves between releases; the GPU checks are
``tests/gpu/test_swa_gluon_gpu.py``), and the dispatch keeps it to the calls it supports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mnemotorch.ops.block_sparse import swa_gluon, swa_gluon_bwd, swa_triton

needs_gluon = pytest.mark.skipif(not swa_gluon.HAVE_GLUON, reason="this Triton has no Gluon Hopper API")


_COMPILE = """
import json, sys
from mnemotorch.ops.block_sparse import swa_gluon
out = []
for d, bn, stages, na1d, store_lo in json.loads(sys.argv[1]):
    k = swa_gluon.compile_sm90(d=d, bn=bn, stages=stages, na1d=na1d, store_lo=store_lo)
    ptx = k.asm["ptx"]
    out.append(dict(warps=k.metadata.num_warps, shared=k.metadata.shared, wgmma="wgmma.mma_async" in ptx,
                    setmaxnreg="setmaxnreg.inc" in ptx and "setmaxnreg.dec" in ptx, tma="cp.async.bulk.tensor" in ptx))
print("RESULT " + json.dumps(out))
"""
CASES = [(128, 64, 4, False, True), (64, 128, 3, True, False)]

_COMPILE_BWD = """
import json, sys
from mnemotorch.ops.block_sparse import swa_gluon_bwd
out = []
for d, stages, na1d, dq in json.loads(sys.argv[1]):
    k = swa_gluon_bwd.compile_sm90(d=d, stages=stages, na1d=na1d, dq=dq)
    ptx = k.asm["ptx"]
    out.append(dict(warps=k.metadata.num_warps, shared=k.metadata.shared, wgmma=ptx.count("wgmma.mma_async"),
                    atomics="red.relaxed.gpu.global.add.v2.f32" in ptx, tma="cp.async.bulk.tensor" in ptx,
                    bulk_reduce="cp.reduce.async.bulk.tensor" in ptx, bulk_wait="cp.async.bulk.wait_group.read" in ptx,
                    named_barriers=sorted(set(ln.split()[1] for ln in ptx.splitlines() if ln.strip().startswith("bar.sync")))))
print("RESULT " + json.dumps(out))
"""
BWD_CASES = [(128, 2, False, "shared"), (64, 3, True, "own"), (128, 2, False, "tma"), (64, 3, True, "tma")]


@needs_gluon
def test_kernel_compiles_for_sm90() -> None:
    """In a child process without ``TRITON_INTERPRET`` (this suite's conftest sets it, and under the
    interpreter Triton's standard-library functions that Gluon calls cannot be compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(CASES)], env=env, capture_output=True, text=True,
                       timeout=600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    for (d, bn, stages, _, _), k in zip(CASES, json.loads(lines[-1][7:])):
        # two consumer warp groups + a loader warp (padded to a warp group), registers moved to the consumers
        assert k["warps"] == 12 and k["wgmma"] and k["setmaxnreg"] and k["tma"], k
        assert k["shared"] >= (4 * swa_gluon.BM + 2 * stages * bn) * d * 2  # two query slots per group


@needs_gluon
def test_backward_compiles_for_sm90() -> None:
    """The backward: two consumer groups and a loader warp, wgmma products, TMA loads, dQ by 8-byte atomics (or TMA
    bulk reductions), and the groups' own barriers named (a CTA-wide ``bar.sync 0`` inside one partition would hang
    the others)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_BWD, json.dumps(BWD_CASES)], env=env, capture_output=True,
                       text=True, timeout=600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    for (d, stages, _, dq), k in zip(BWD_CASES, json.loads(lines[-1][7:])):
        assert k["warps"] == 12 and k["wgmma"] >= 2 * 7 and k["tma"], k
        # dQ by 8-byte element atomics, or (dq="tma") by TMA bulk reductions of each group's tile
        assert (k["atomics"], k["bulk_reduce"]) == ((False, True) if dq == "tma" else (True, False)), k
        assert k["bulk_wait"] == (dq == "tma"), k  # a staged tile is rewritten only after its reduction read it
        assert k["shared"] >= swa_gluon_bwd.smem_bytes(d, stages, dq_tma=dq == "tma"), k
        assert len(k["named_barriers"]) >= 2, k  # one per consumer group


def test_backward_dispatch_rows() -> None:
    q = torch.randn(1, 16, 2, 128, dtype=torch.bfloat16)
    # on in the D = 128 16-bit row (dQ by TMA bulk reductions: faster than the Triton kernels on the H100,
    # docs/results/block_sparse.md); it still needs a CUDA sm_90 device
    assert swa_triton.launch_config("dkdv", 128, torch.bfloat16)["gluon"] == dict(stages=2, dq="tma")
    assert swa_triton.launch_config("dkdv", 128, torch.float16, na1d=True)["gluon"] == dict(stages=2, dq="tma")
    with swa_triton.override_launch(dkdv=dict(gluon=dict(stages=2))):
        row = swa_triton.launch_config("dkdv", 128, torch.bfloat16)
    assert row["gluon"] == dict(stages=2)
    assert not swa_gluon_bwd.supported(q, q, q, q, 0.1, row)  # CPU tensors
    assert not swa_triton.launch_config("dkdv", 128, torch.float32).get("gluon")
    assert swa_triton.launch_config("dkdv", 64, torch.bfloat16)["gluon"] == dict(stages=3, dq="tma")
    with swa_triton.override_launch(dkdv=dict(fused_dq=True)):  # a Triton dK/dV override runs that kernel
        assert swa_triton.launch_config("dkdv", 128, torch.bfloat16)["gluon"] is False
    for bad in (dict(stages=0), dict(BN=128), dict(dq="both"), "yes"):
        with pytest.raises(ValueError, match="gluon"):
            swa_triton._check_tile("dkdv", dict(row, gluon=bad))
    # at D = 128: 3 ring slots fit with element atomics, 2 with the staged dQ tiles of dq="tma"
    assert swa_gluon_bwd.smem_bytes(128, 3) <= swa_gluon.SMEM_LIMIT
    assert swa_gluon_bwd.smem_bytes(128, 2, dq_tma=True) <= swa_gluon.SMEM_LIMIT
    for bad in (dict(stages=4), dict(stages=3, dq="tma")):
        with pytest.raises(ValueError, match="shared memory"):
            swa_gluon_bwd.backward(q, q, q, q, None, None, 8, 0.1, 0.1, False, bad)


def test_dispatch_stays_off_where_unsupported(monkeypatch) -> None:
    q = torch.randn(1, 16, 2, 128, dtype=torch.bfloat16)
    on = dict(gluon=dict(BN=64, stages=4))
    assert not swa_gluon.supported(q, q, q, 0.1, on)  # CPU tensors
    assert not swa_gluon.supported(q, q, q, 0.1, {})  # not asked for
    # the CPU forward with the row forced on runs the Triton kernel (here: the interpreter is not set up, so
    # only the config check is exercised)
    with swa_triton.override_launch(fwd=on):
        assert swa_triton.launch_config("fwd", 128, torch.bfloat16)["gluon"] == on["gluon"]
    assert swa_triton.launch_config("fwd", 128, torch.bfloat16, na1d=True)["gluon"]["BN"] in (64, 128)
    assert swa_triton.launch_config("fwd", 128, torch.bfloat16)["gluon"]  # the table's D = 128 16-bit row
    assert not swa_triton.launch_config("fwd", 128, torch.float32)["gluon"]
    assert swa_triton.launch_config("fwd", 64, torch.bfloat16)["gluon"]  # D = 64 too (twenty-third session)
    assert not swa_triton.launch_config("fwd", 256, torch.bfloat16)["gluon"]
    # an override of the Triton forward's parameters runs that kernel, not the Gluon one
    with swa_triton.override_launch(fwd=dict(BM=128)):
        assert swa_triton.launch_config("fwd", 128, torch.bfloat16)["gluon"] is False


def test_env_switch_fwd_keeps_only_the_gluon_forward(monkeypatch) -> None:
    """``MNEMO_SWA_GLUON=fwd``: the Gluon backward (and its fp32 dQ accumulator) does not run where it otherwise
    would. (``swa_gluon.supported`` is stubbed to stand for a CUDA sm_90 call; the forward's own check only
    refuses ``0``.)"""
    q = torch.randn(1, 16, 2, 128, dtype=torch.bfloat16)
    monkeypatch.setattr(swa_gluon, "supported", lambda *a: True)
    monkeypatch.setattr(swa_gluon_bwd, "tma_row_view", lambda t: t)
    row = swa_triton.launch_config("dkdv", 128, torch.bfloat16)
    for env, want in (("1", True), ("fwd", False)):
        monkeypatch.setenv("MNEMO_SWA_GLUON", env)
        assert swa_gluon_bwd.supported(q, q, q, q, 0.1, row) is want, env


@pytest.mark.parametrize("bad", [dict(BN=32), dict(stages=1), dict(BM=64), dict(persist=True), "yes"])
def test_bad_gluon_rows_raise(bad) -> None:
    cfg = dict(swa_triton.launch_config("fwd", 128, torch.bfloat16), gluon=bad)
    with pytest.raises(ValueError, match="gluon"):
        swa_triton._check_tile("fwd", cfg)
