"""``titans_lmm`` (the bench's configurations, bf16) on a real GPU: no host sync in the forward and the
forward + backward (``torch.cuda.set_sync_debug_mode("error")``), eager and with the chunk step compiled
by inductor (default mode: no CUDA graphs of its own), and a capture in one CUDA graph whose replay gives
the eager call's output and gradients -- what ``mnemo bench memory --cuda-graph`` times. The CPU side of
the same property: ``tests/layers/test_titans_capture.py``.

Run on the GPU machine: ``MNEMO_GPU_TESTS=1 python -m pytest -q -p no:cacheprovider tests/gpu/test_titans_graph_gpu.py``
"""

from __future__ import annotations

import pytest
import torch

from mnemotorch.bench.block_sparse import capture_graph
from mnemotorch.bench.neural_memory import build_ours

pytestmark = pytest.mark.gpu


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
@pytest.mark.parametrize("config", ["matched", "default"])
def test_layer_has_no_host_sync_and_captures_in_a_cuda_graph(config: str, compiled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    layer = build_ours(256, 4, 64, config, torch.device("cuda"), torch.bfloat16)
    layer.compile_memory = compiled  # the chunk step's shape of tests/ops/test_memory_compile.py's GPU test (B = 2): one compilation
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 8 * 64, 256, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    go = torch.randn(2, 8 * 64, 256, device="cuda", dtype=torch.bfloat16, generator=gen)
    params = [x, *layer.parameters()]

    def fwd():
        with torch.no_grad():
            return layer(x)[0]

    def fwd_bwd():
        return torch.autograd.grad(layer(x)[0], params, go)

    for step in (fwd, fwd_bwd):  # warm-up (the compilations), then one call that may not sync
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = [fwd(), *fwd_bwd()]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for step, ref in ((fwd, eager[:1]), (fwd_bwd, eager[1:])):
        graph, static_out = capture_graph(step, warmup=2)
        try:
            graph.replay()
            torch.cuda.synchronize()
            out = [static_out] if isinstance(static_out, torch.Tensor) else list(static_out)
            assert len(out) == len(ref)
            for i, (a, b) in enumerate(zip(out, ref)):
                assert rel(a, b) <= 1e-3, f"{step.__name__} output {i}: replay differs from the eager call ({rel(a, b):.2e})"
        finally:
            del static_out
            graph.reset()
