"""Nearest-centroid assignment: the Triton kernel (``ops/routing/triton.py``, Triton interpreter on the
CPU) against the reference's chunked product and sum; chunk invariance (the streaming invariant's need)."""

from __future__ import annotations

import os

import pytest
import torch

from mnemotorch.ops.routing import nearest_centroid

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (tests/conftest.py)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,t,h,c,d", [(2, 150, 3, 5, 16), (1, 130, 2, 40, 64), (1, 70, 1, 3, 48)])
def test_kernel_matches_reference_and_ignores_chunking(b, t, h, c, d, dtype) -> None:
    g = torch.Generator().manual_seed(t + c)
    x = torch.nn.functional.layer_norm(torch.randn(b, t, h, d, generator=g), (d,)).to(dtype)
    mu = torch.randn(h, c, d, generator=g)
    mu[:, min(3, c - 1)] = mu[:, 1]  # exact ties: the lower index wins
    ids = nearest_centroid(x, mu, backend="triton")
    assert ids.dtype == torch.int64 and ids.shape == (b, t, h)
    assert torch.equal(ids, nearest_centroid(x, mu, backend="reference"))
    pieces = [nearest_centroid(x[:, s : s + n], mu, backend="triton") for s, n in ((0, 17), (17, 1), (18, t - 18))]
    assert torch.equal(torch.cat(pieces, 1), ids)
    # a strided view (the routing heads of a layer with local heads) is read in place
    wide = torch.cat([torch.randn(b, t, 1, d, generator=g).to(dtype), x], dim=2)
    assert torch.equal(nearest_centroid(wide[:, :, 1:], mu, backend="triton"), ids)


def test_backend_argument() -> None:
    x = torch.randn(1, 4, 2, 8)
    mu = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="backend"):
        nearest_centroid(x, mu, backend="fast")
    with pytest.raises(ValueError, match="float16"):
        nearest_centroid(x.double(), mu, backend="triton")
    assert torch.equal(nearest_centroid(x, mu), nearest_centroid(x, mu, backend="reference"))  # "auto" on the CPU
