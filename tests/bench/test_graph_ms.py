"""``bench.block_sparse.graph_ms`` / ``capture_graph``: CUDA-graph replay timings of a forward + backward step.

The GPU tests (skipped on a machine without CUDA) run on the GPU machine with
``MNEMO_GPU_TESTS=1 python -m pytest -q -p no:cacheprovider tests/bench/test_graph_ms.py``: a replay
computes what an eager step computes (gradients returned by ``torch.autograd.grad`` as static outputs),
a step with a host sync is reported as not capturable, and the process goes on normally after that
failed capture (stream, allocator, random generator).
"""

from __future__ import annotations

import pytest
import torch

from mnemotorch.bench.block_sparse import GraphCaptureError, _capture_hint, _error_chain, capture_graph, graph_ms

gpu = pytest.mark.gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_without_cuda_it_raises_a_capture_error() -> None:
    with pytest.raises(GraphCaptureError, match=r"^not capturable: CUDA graphs need a CUDA device") as err:
        graph_ms(lambda: None)
    assert err.value.reason.startswith("CUDA graphs need a CUDA device")


def test_error_chain_puts_the_cause_first() -> None:
    try:
        try:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")
        except RuntimeError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")  # noqa: B904
    except RuntimeError as exc:
        text = _error_chain(exc)
    assert text == ("RuntimeError: CUDA error: operation not permitted when stream is capturing; "
                    "then RuntimeError: CUDA error: operation failed due to a previous error during capture")


def test_a_known_capture_failure_gets_its_hint() -> None:
    """The H100 failure of tests/gpu/test_swa_gpu.py's capture (an eager output kept with its graph)."""
    reason = ("AcceleratorError: CUDA error: operation would make the legacy stream depend on a capturing blocking stream")
    assert "AccumulateGrad" in _capture_hint(reason) and _capture_hint(reason).startswith(" [hint: ")
    assert _capture_hint("RuntimeError: CUDA error: operation not permitted when stream is capturing") == ""


def _linear_step():
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, 256, device="cuda", generator=gen).requires_grad_()
    gy = torch.randn(64, 256, device="cuda", generator=gen)
    params = [x, *lin.parameters()]

    def step():
        return torch.autograd.grad(lin(x), params, gy)

    return step, x, params


@gpu
def test_replay_equals_eager_and_is_timed() -> None:
    step, x, _ = _linear_step()
    eager = [g.clone() for g in step()]
    graph, static = capture_graph(step)
    with torch.no_grad():
        x.mul_(2.0)  # new input values go in place; the replay reads them
    graph.replay()
    torch.cuda.synchronize()
    eager2 = step()
    for a, b in zip(static, eager2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # the same work (cuBLAS may pick other kernels on another stream)
    assert any((a - b).abs().max() > 0 for a, b in zip(static, eager))  # the replay did use the new input
    del static
    graph.reset()
    ms = graph_ms(step, warmup=2, rep=5)
    assert 0 < ms < 1000


@gpu
def test_a_host_sync_is_not_capturable_and_the_process_recovers() -> None:
    step, x, params = _linear_step()
    stream_before = torch.cuda.current_stream()

    def syncing_step():
        grads = step()
        if grads[0].abs().sum().item() < 0:  # a host sync
            raise AssertionError
        return grads

    with pytest.raises(GraphCaptureError, match=r"^not capturable: ") as err:
        graph_ms(syncing_step, warmup=1, rep=2)
    assert "captur" in err.value.reason  # CUDA's "... when stream is capturing" / "... during capture"
    assert torch.cuda.current_stream() == stream_before
    assert not torch.cuda.is_current_stream_capturing()
    # the allocator, the default generator and the next capture work as before
    y = torch.randn(1024, 1024, device="cuda") @ torch.randn(1024, 1024, device="cuda")
    del y
    torch.cuda.synchronize()
    assert graph_ms(step, warmup=1, rep=3) > 0


@gpu
def test_a_step_returning_autograd_history_is_refused() -> None:
    lin = torch.nn.Linear(64, 64).cuda()
    x = torch.zeros(8, 64, device="cuda")
    with pytest.raises(ValueError, match="autograd history"):
        graph_ms(lambda: lin(x), warmup=1, rep=1)
