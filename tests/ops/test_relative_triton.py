"""The fused relative-attention Triton kernel against the float64 reference (CPU interpreter).

Outputs and every gradient (q, k, v and the relative table E) in float32 must match the float64
reference to 1e-5 relative RMS; outputs are NaN-poisoned before each run (tests/conftest.py). The
cases cover both code paths of the kernel -- *near* tiles (the E band, skewed by a gather) and
*far* tiles (all distances clipped to R) -- queries after a cache, GQA, a shared table, head dims
below 16 and not a power of two, and lengths that are not multiples of the tile.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mnemotorch.ops.relative.triton as rel_triton
from mnemotorch.layers import get_mixer
from mnemotorch.ops.relative import relative_attention, relative_attention_reference

F64 = torch.float64
TOL = 1e-5  # ARCHITECTURE.md: float32 outputs and gradients, relative RMS


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(b, tq, tk, h, hkv, d, hr, max_distance, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, tq, h, d, dtype=F64, generator=g)
    k = torch.randn(b, tk, hkv, d, dtype=F64, generator=g)
    v = torch.randn(b, tk, hkv, d, dtype=F64, generator=g)
    e = torch.randn(hr, max_distance + 1, d, dtype=F64, generator=g)
    go = torch.randn(b, tq, h, d, dtype=F64, generator=g)
    return (q, k, v, e), go


def far_tiles(tq: int, tk: int, block: int, max_distance: int) -> int:
    """How many (query tile, key tile) pairs take the far path (every distance >= R)."""
    off = tk - tq
    return sum(max(off + qb * block - max_distance + 1, 0) // block for qb in range(-(-tq // block)))


def band_tiles_straddling_r(tq: int, tk: int, block: int, max_distance: int) -> int:
    """How many band (near) tiles hold distances below R and several above it (clipped to row R)."""
    off, count = tk - tq, 0
    for qb in range(-(-tq // block)):
        q0 = off + qb * block
        for kb in range(-(-min(tk, q0 + block) // block)):
            lo, hi = q0 - kb * block - block + 1, q0 - kb * block + block - 1
            count += lo < max_distance and hi > max_distance + 1
    return count


@pytest.fixture
def block(request, monkeypatch):
    monkeypatch.setattr(rel_triton, "FIXED_BLOCK", request.param)
    return request.param


# (B, Tq, Tk, H, Hkv, D, Hr, R)
CASES = {
    "clipped_far_tiles": (1, 64, 64, 2, 2, 16, 2, 5),
    "no_clipping_R_ge_L": (1, 37, 37, 2, 1, 8, 2, 60),
    "R1_two_rows": (1, 33, 33, 1, 1, 16, 1, 1),  # R = 0 would make dE exactly 0 (a per-row shift)
    "shared_table_gqa_d24": (2, 29, 29, 4, 2, 24, 1, 9),
    "after_cache_chunk": (1, 21, 53, 2, 1, 16, 2, 11),
    "decode_one_token": (2, 1, 40, 2, 2, 16, 2, 6),
    "d32_L64": (1, 64, 64, 2, 1, 32, 2, 20),
}


@pytest.mark.parametrize("block", [16], indirect=True)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_matches_float64_reference(case: str, block: int) -> None:
    b, tq, tk, h, hkv, d, hr, r = CASES[case]
    (q, k, v, e), go = inputs(b, tq, tk, h, hkv, d, hr, r)
    hi = [t.clone().requires_grad_(True) for t in (q, k, v, e)]
    ref = relative_attention_reference(*hi, form="skew" if tq == tk else "gather")
    ref_grads = torch.autograd.grad(ref, hi, go)
    lo = [t.float().requires_grad_(True) for t in (q, k, v, e)]
    out = relative_attention(*lo, backend="triton")
    grads = torch.autograd.grad(out, lo, go.float())
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel(out, ref) <= TOL
    for name, g, g_ref in zip(("q", "k", "v", "rel_emb"), grads, ref_grads):
        assert g.shape == g_ref.shape and g.dtype == torch.float32, name
        assert rel(g, g_ref) <= TOL, f"gradient of {name}: {rel(g, g_ref):.2e}"


def test_cases_cover_both_paths() -> None:
    # the suite above is only meaningful if it exercises far tiles (forward, dQ/dE and dK/dV) as
    # well as band tiles whose distances clip to R inside the band
    assert far_tiles(*CASES["clipped_far_tiles"][1:3], 16, CASES["clipped_far_tiles"][7]) >= 2
    assert far_tiles(*CASES["after_cache_chunk"][1:3], 16, CASES["after_cache_chunk"][7]) >= 1
    assert far_tiles(*CASES["no_clipping_R_ge_L"][1:3], 16, CASES["no_clipping_R_ge_L"][7]) == 0
    assert band_tiles_straddling_r(*CASES["d32_L64"][1:3], 16, CASES["d32_L64"][7]) >= 1


@pytest.mark.parametrize("block", [32], indirect=True)
def test_kernel_with_a_larger_tile(block: int) -> None:
    # 40 queries after 24 cached keys, R = 13, 32-wide tiles: one far tile, bands straddling R
    (q, k, v, e), go = inputs(1, 40, 64, 2, 1, 16, 2, 13, seed=3)
    assert far_tiles(40, 64, 32, 13) == 1 and band_tiles_straddling_r(40, 64, 32, 13) >= 1
    hi = [t.clone().requires_grad_(True) for t in (q, k, v, e)]
    ref = relative_attention_reference(*hi, form="gather")
    ref_grads = torch.autograd.grad(ref, hi, go)
    lo = [t.float().requires_grad_(True) for t in (q, k, v, e)]
    out = relative_attention(*lo, backend="triton")
    grads = torch.autograd.grad(out, lo, go.float())
    assert rel(out, ref) <= TOL
    for name, g, g_ref in zip(("q", "k", "v", "rel_emb"), grads, ref_grads):
        assert rel(g, g_ref) <= TOL, name


@pytest.mark.parametrize("block", [16], indirect=True)
def test_relative_term_matters(block: int) -> None:
    # guards against a kernel that ignores E: changing the table must change the output as much as
    # the reference says it does
    (q, k, v, e), _ = inputs(1, 40, 40, 2, 2, 16, 2, 4, seed=1)
    q, k, v, e = (t.float() for t in (q, k, v, e))
    out = relative_attention(q, k, v, e, backend="triton")
    out_zero = relative_attention(q, k, v, torch.zeros_like(e), backend="triton")
    ref_zero = relative_attention_reference(*(t.double() for t in (q, k, v)), torch.zeros_like(e).double())
    assert rel(out_zero, ref_zero) <= TOL
    assert rel(out, out_zero) > 1e-2


class _PeakNumel(TorchDispatchMode):
    """Largest tensor any aten op produces (a proxy for peak extra memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.peak = max(self.peak, t.numel())
        return out


@pytest.mark.parametrize("block", [16], indirect=True)
def test_kernel_memory_is_o_l_d(block: int) -> None:
    # One head, D = 16, L = 64: every tensor the op creates (outputs, LSE, delta, gradients, the
    # fp32 dE table) has at most L * D = 1024 elements, a quarter of one L x L score matrix.
    length, d = 64, 16
    (q, k, v, e), go = inputs(1, length, length, 1, 1, d, 1, length - 1)
    leaves = [t.float().requires_grad_(True) for t in (q, k, v, e)]
    with _PeakNumel() as probe:
        out = relative_attention(*leaves, backend="triton")
        out.backward(go.float())
    assert probe.peak <= length * d < length * length
    with _PeakNumel() as probe_ref:
        relative_attention_reference(*(t.detach() for t in leaves))
    assert probe_ref.peak >= length * length  # the probe does see the skew's L x L matrix


@pytest.mark.parametrize("block", [16], indirect=True)
def test_mixer_triton_backend_matches_reference(block: int) -> None:
    torch.manual_seed(0)
    ref_mixer = get_mixer("relative", dim=32, num_heads=2, max_distance=6, backend="reference")
    ker_mixer = get_mixer("relative", dim=32, num_heads=2, max_distance=6, backend="triton")
    ker_mixer.load_state_dict(ref_mixer.state_dict())
    with torch.no_grad():
        ref_mixer.rel_emb.normal_()  # large enough that the relative logits matter
        ker_mixer.rel_emb.copy_(ref_mixer.rel_emb)
    x = torch.randn(2, 24, 32)
    y_ref, _ = ref_mixer.double()(x.double())
    y, state = ker_mixer(x)
    assert rel(y, y_ref) <= TOL
    # one decoded token after the cache goes through the kernel too (Tq = 1 < Tk)
    x_next = torch.randn(2, 1, 32)
    y_next, _ = ker_mixer(x_next, state)
    y_full, _ = ref_mixer(torch.cat([x, x_next], 1).double())
    assert rel(y_next, y_full[:, -1:]) <= TOL


def test_auto_keeps_the_reference_on_cpu(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("the kernel must not run for CPU tensors with backend='auto'")

    monkeypatch.setattr(rel_triton, "relative_attention_triton", boom)
    (q, k, v, e), _ = inputs(1, 8, 8, 1, 1, 16, 1, 3)
    out = relative_attention(*(t.float() for t in (q, k, v, e)))
    assert out.shape == (1, 8, 1, 16)


def test_bad_inputs_for_the_kernel() -> None:
    (q, k, v, e), _ = inputs(1, 8, 8, 1, 1, 16, 1, 3)
    with pytest.raises(TypeError, match="dtypes"):
        relative_attention(q, k, v, e, backend="triton")  # float64: reference only
    with pytest.raises(ValueError, match="v's head dim"):
        relative_attention(q.float(), k.float(), v[..., :8].float(), e.float(), backend="triton")
    big = torch.randn(1, 4, 1, 272)
    with pytest.raises(ValueError, match="head dims"):
        relative_attention(big, big, big, torch.randn(1, 3, 272), backend="triton")
    with pytest.raises(ValueError, match="backend"):
        get_mixer("relative", dim=32, num_heads=2, backend="cuda")
