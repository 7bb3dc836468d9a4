"""Local Linear Attention mixer (Zuo et al., 2025, arXiv:2510.01450): ``lla``.

Queries, keys and values are projected as in softmax attention; each query's output is the
intercept of a kernel-weighted ridge regression of all past values on the past keys centred at the
query (``mnemotorch.ops.lla``). LLA depends on every past key individually -- the weights
``exp(τ q_iᵀk_j)`` and the local covariance ``Σ_i`` are query-dependent -- so, like softmax
attention, its state is the whole KV cache.

Positions: the paper defines LLA on plain projected queries and keys and does not prescribe a
positional encoding, so RoPE is off by default (``rope=False``; position reaches the layer through
the causal order and the neighbouring layers). ``rope=True`` rotates queries and keys as the
``attention`` mixer does; LLA stays relative-position invariant under it, because the intercept of
a ridge fit is unchanged by an orthogonal change of the covariates (rotate everything by ``R_{-i}``).
"""

from __future__ import annotations

from torch import Tensor

from ..ops.lla import DEFAULT_BLOCK_SIZE, DEFAULT_CG_ITERS, DEFAULT_RIDGE, SOLVERS, local_linear_attention
from ..ops.lla.reference import check_ridge, check_scale
from .attention import _QKVAttention
from .registry import register_mixer


@register_mixer("lla")
class LocalLinearAttention(_QKVAttention):
    """Causal multi-head Local Linear Attention with a KV-cache state.

    ``o_i = b̂_i``, the intercept of ``min_{b,W} Σ_{j≤i} w_ij ‖v_j − b − W(k_j − q_i)‖² + λ ω_i ‖W‖²``
    with ``w_ij = exp(τ q_iᵀk_j)``, per head, followed by an output projection. λ → ∞ gives softmax
    attention with temperature τ.

    Args:
        dim: model width.
        num_heads: query heads.
        ridge: λ > 0, the ridge penalty relative to the total kernel weight (dimensionless).
        scale: τ > 0, the kernel temperature; default ``head_dim ** -0.5``.
        solver: ``"solve"`` (closed form with ``torch.linalg.solve``, exact) or ``"cg"``
            (blockwise matrix-free conjugate gradient, O(T·D) memory).
        cg_iters: CG iterations of ``solver="cg"`` (fixed; exact after ``head_dim`` in exact arithmetic).
        block_size: key-tile length of ``solver="cg"``.
        precondition: Jacobi-precondition the CG.
        num_kv_heads: key/value heads (GQA; default ``num_heads``).
        rope: rotate queries and keys with RoPE (default off: the paper uses none).
        rope_theta: RoPE base when ``rope=True``.
        backend: ``"auto"`` (the Triton CG kernels for ``solver="cg"`` on CUDA, else plain PyTorch;
            ``MNEMO_LLA_KERNELS=0`` keeps it on plain PyTorch), ``"reference"`` (plain PyTorch) or
            ``"triton"`` (the kernels; ``solver="cg"`` only).

    State: ``KVState`` with all keys and values, ``state_size(T) = 2 · T · Hkv · head_dim``. A later
    call's queries see the cached keys exactly as in one call on the whole sequence.
    """

    description = "Local Linear Attention: per-query kernel-weighted local linear regression, intercept output (Zuo et al. 2025); KV state"
    example_kwargs = {"ridge": 0.5, "num_kv_heads": 2}
    # the exact solve costs a DxD system per query; 8 CG steps with a larger ridge keep the CPU demo short
    demo_kwargs = {"solver": "cg", "cg_iters": 8, "ridge": 10.0, "block_size": 128}

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ridge: float = DEFAULT_RIDGE,
        scale: float | None = None,
        solver: str = "solve",
        cg_iters: int = DEFAULT_CG_ITERS,
        block_size: int = DEFAULT_BLOCK_SIZE,
        precondition: bool = False,
        num_kv_heads: int | None = None,
        rope: bool = False,
        rope_theta: float = 10000.0,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads, num_kv_heads=num_kv_heads, rope_theta=rope_theta, backend=backend, rope=rope)
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {list(SOLVERS)}, got {solver!r}")
        for name, value in (("cg_iters", cg_iters), ("block_size", block_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(precondition, bool):
            raise TypeError(f"precondition must be a bool, got {precondition!r}")
        if backend not in ("auto", "reference", "triton"):
            raise ValueError(f"backend must be one of ['auto', 'reference', 'triton'], got {backend!r}")
        if backend == "triton" and solver != "cg":
            raise ValueError(f"backend 'triton' runs solver='cg' (the kernels are the blockwise conjugate gradient), got solver={solver!r}")
        self.ridge = check_ridge("lla", ridge)
        self.scale = None if scale is None else check_scale("lla", scale, self.head_dim)
        self.solver = solver
        self.cg_iters = cg_iters
        self.block_size = block_size
        self.precondition = precondition

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return local_linear_attention(
            q,
            k,
            v,
            ridge=self.ridge,
            scale=self.scale,
            solver=self.solver,
            cg_iters=self.cg_iters,
            block_size=self.block_size,
            precondition=self.precondition,
            backend=self.backend,
        )

    def state_size(self, seq_len: int) -> int:
        return 2 * seq_len * self.num_kv_heads * self.head_dim

    def extra_repr(self) -> str:
        extra = f", cg_iters={self.cg_iters}, block_size={self.block_size}, precondition={self.precondition}" if self.solver == "cg" else ""
        return f"ridge={self.ridge}, scale={self.scale}, solver={self.solver!r}{extra}, num_kv_heads={self.num_kv_heads}, rope={self.rope}"


__all__ = ["LocalLinearAttention"]

