import pytest
import torch

from mnemotorch.ops import causal_attention, sliding_window_attention
from mnemotorch.ops.attention import causal_attention_reference
from mnemotorch.ops.sliding_window import sliding_window_attention_reference


def qkv(b=2, tq=13, tk=13, h=4, hkv=2, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda t, hh: torch.randn(b, t, hh, d, generator=g, dtype=dtype)  # noqa: E731
    return mk(tq, h), mk(tk, hkv), mk(tk, hkv)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def dense_window_oracle(q, k, v, window):
    """Brute force: loop over queries, attend to the allowed keys only."""
    b, tq, h, d = q.shape
    tk = k.shape[1]
    k = k.repeat_interleave(h // k.shape[2], 2)
    v = v.repeat_interleave(h // v.shape[2], 2)
    out = torch.empty_like(q)
    for i in range(tq):
        p = tk - tq + i
        lo = max(0, p - window + 1)
        s = torch.einsum("bhd,bjhd->bhj", q[:, i], k[:, lo : p + 1]) * d**-0.5
        out[:, i] = torch.einsum("bhj,bjhd->bhd", s.softmax(-1), v[:, lo : p + 1])
    return out


@pytest.mark.parametrize("tq,tk", [(13, 13), (1, 13), (5, 13)])
def test_sdpa_matches_reference(tq, tk) -> None:
    q, k, v = qkv(tq=tq, tk=tk)
    assert rel(causal_attention(q, k, v), causal_attention_reference(q, k, v)) <= 1e-12


@pytest.mark.parametrize("window", [1, 3, 8, 13, 40])
@pytest.mark.parametrize("tq,tk", [(13, 13), (1, 13), (6, 13)])
def test_sliding_window_matches_bruteforce(window, tq, tk) -> None:
    q, k, v = qkv(tq=tq, tk=tk)
    assert rel(sliding_window_attention(q, k, v, window), dense_window_oracle(q, k, v, window)) <= 1e-12


def test_window_covering_everything_is_causal_attention() -> None:
    q, k, v = qkv()
    assert rel(sliding_window_attention_reference(q, k, v, 13), causal_attention_reference(q, k, v)) <= 1e-12


def test_window_one_returns_own_value() -> None:
    q, k, v = qkv(hkv=4)
    assert rel(sliding_window_attention(q, k, v, 1), v) <= 1e-12


def test_bad_arguments_named() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match="window"):
        sliding_window_attention(q, k, v, 0)
    with pytest.raises(ValueError, match="q must have shape"):
        causal_attention(q[0], k, v)
    with pytest.raises(ValueError, match="multiple"):
        causal_attention(q[:, :, :3], k, v)
    with pytest.raises(TypeError, match="dtype"):
        causal_attention(q.float(), k, v)
    with pytest.raises(ValueError, match="backend"):
        causal_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="fewer positions"):
        causal_attention(q, k[:, :3], v[:, :3])
