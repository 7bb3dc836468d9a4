"""The BASED linear-attention layer: the ``based`` mixer (Arora et al., 2024).

BASED ("Simple linear attention language models balance the recall-throughput tradeoff") mixes
three layer types; this module is its *global* one, linear attention with the 2nd-order Taylor
feature map, per head::

    q_t = W_Q x_t ∈ R^{d},  k_t = W_K x_t ∈ R^{d}   (d = ``feature_dim``, 16 by default)
    v_t = W_V x_t ∈ R^{Dv}                           (Dv = dim / H)
    κ(q, k) = φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d)   (φ = ``taylor``: 1 + d + d² features)
    y_t = Σ_{s≤t} κ(q_t, k_s) v_s / (Σ_{s≤t} κ(q_t, k_s) + ε)
    out_t = W_O [y_t^{(1)}; ...; y_t^{(H)}]

No bias, no positional encoding and no short convolution on q/k/v: the BASED reference layer
(``based/models/mixers/linear_attention.py`` in HazyResearch/based) has none -- local order comes
from the neighbouring sliding-window and gated-convolution layers (see
:func:`mnemotorch.models.presets.based_layer_plan`). Its optional output-RMSNorm variant is not
implemented. ε defaults to 1e-6 (the reference uses 1e-12); since κ ≥ 1/2, the denominator is at
least t/2 and ε never matters in practice.

The computation is :class:`~mnemotorch.layers.linear_attention.LinearAttention` with
``feature="taylor"`` and a small ``feature_dim``: the chunked form for calls with ``T > 1``
(training, prefill) and the recurrent step for ``T = 1`` (decoding), carrying
``(S [B, H, Dφ, Dv], z [B, H, Dφ])`` with ``Dφ = 1 + d + d²`` (273 for d = 16).
"""

from __future__ import annotations

from ..ops.linear import DEFAULT_EPS
from .linear_attention import LinearAttention, LinearAttentionState
from .registry import register_mixer

__all__ = ["BasedLinearAttention", "LinearAttentionState"]


@register_mixer("based")
class BasedLinearAttention(LinearAttention):
    """BASED linear attention: Taylor (2nd-order) feature map on small q/k projections, normalised.

    Args:
        dim: model width.
        num_heads: heads ``H``; values have ``head_dim = dim / H`` channels.
        feature_dim: ``d``, the per-head width of the query/key projections before the Taylor map
            (default 16, as BASED). The state holds ``Dφ = 1 + d + d²`` features per head.
        chunk_size: chunk length of the chunked (training / prefill) form.
        eps: ε of the denominator (default 1e-6; the kernel is ≥ 1/2 so the denominator is ≥ t/2).

    State: ``LinearAttentionState(S [B, H, Dφ, Dv], z [B, H, Dφ])``:
    ``state_size = H · (Dφ · Dv + Dφ)`` elements whatever the length. (Zoology's accounting counts
    only the ``d(d+1)/2 + d + 1`` distinct features of the symmetric outer product; this state keeps
    the full outer product, so it holds ``1 + d + d²``.)
    """

    description = "BASED linear attention: Taylor 2nd-order feature map on small q/k (d=16), normalised; (S, z) state (Arora et al. 2024)"
    example_kwargs = {"feature_dim": 4, "chunk_size": 8}

    def __init__(self, dim: int, num_heads: int, feature_dim: int = 16, chunk_size: int = 64, eps: float = DEFAULT_EPS):
        super().__init__(dim, num_heads, feature="taylor", feature_dim=feature_dim, normalize=True, chunk_size=chunk_size, eps=eps)

    def extra_repr(self) -> str:
        return f"feature_dim={self.feature_dim}, expanded_dim={self.expanded_dim}, chunk_size={self.chunk_size}, eps={self.eps}"
