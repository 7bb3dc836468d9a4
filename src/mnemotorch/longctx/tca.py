"""Context-adaptive sparse attention with per-head budgets (TCA-Attention; You et al., 2025,
"Training-free Context-adaptive Attention for Efficient Long Context Modeling", arXiv:2512.09238).

Two phases, as in the paper:

* **Offline calibration** (:meth:`TCAAttention.calibrate`, one forward pass): every head gets a
  *sparsity configuration* ``p = [p_k | k in K]``, ``K = {1, 2, 4, ..., b}``: the fraction of
  context blocks (of ``b`` tokens) that keep ``k`` tokens. Candidates follow the paper's
  log-Gaussian family ``p_k ∝ exp(-(log2 k - mu)^2 / (2 sigma^2))``; each head takes the sparsest
  candidate whose selection still recovers ``threshold`` of the full attention mass of the
  calibration queries (dense, ``p = δ_b``, when none does).
* **Online selection** (prefill and decode alike): per query tile (``b`` queries during prefill,
  one during decoding) and head, the context between the ``n_init`` initial tokens and the local
  window is cut into blocks; blocks ranked by importance get the head's retain counts (the most
  important blocks the largest ``k``), and inside a block the ``k`` *core* tokens are the least
  redundant ones. The query attends, under one softmax, to initial tokens ‖ core tokens ‖ local
  window.

What is ours where the paper (as available to us) is silent — the block-importance score, the
redundancy metric, the calibration objective, rounding — is listed in docs/longctx.md.

Usage, in the kvpress style::

    tca = TCAAttention(n_init=4, n_local=64, block=16)
    tca.calibrate(model, calibration_ids, threshold=0.9)   # per-head budgets, one forward
    with tca(model):
        model.generate(input_ids, max_new_tokens=32)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["TCAAttention", "TCABudgets", "log_gaussian_configs", "retain_counts", "tca_attention", "tca_attention_reference"]

_IMPL = "mnemo_tca"
_ATTR = "_mnemo_tca"


def _retain_set(block: int) -> list[int]:
    """``K = {1, 2, 4, ..., block}`` (``block`` a power of two)."""
    return [2 ** i for i in range(int(math.log2(block)) + 1)]


def _check_block(block: int) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 1, got {block!r}")


def log_gaussian_configs(block: int, mus: Sequence[float] | None = None, sigmas: Sequence[float] = (0.5, 1.0, 2.0)) -> Tensor:
    """Candidate sparsity configurations ``[M, |K|]`` (rows sum to 1), sparsest first.

    ``p_k = φ(log2 k) / Σ_k' φ(log2 k')`` with ``φ(x) = exp(-(x - mu)^2 / (2 sigma^2))`` for every
    ``(mu, sigma)`` (``mus`` default: ``0, 0.5, ..., log2 block``); the dense configuration
    ``δ_block`` (every block keeps all its tokens) is always the last candidate.
    """
    _check_block(block)
    ks = torch.tensor(_retain_set(block), dtype=torch.float64)
    top = math.log2(block)
    if mus is None:
        mus = [i / 2 for i in range(int(2 * top) + 1)]
    if any(s <= 0 for s in sigmas):
        raise ValueError(f"sigmas must be > 0, got {list(sigmas)}")
    rows = []
    for mu in mus:
        for sigma in sigmas:
            phi = torch.exp(-(ks.log2() - float(mu)) ** 2 / (2 * float(sigma) ** 2))
            rows.append(phi / phi.sum())
    dense = torch.zeros(len(ks), dtype=torch.float64)
    dense[-1] = 1.0
    cands = torch.stack(rows) if rows else dense[None]
    ratio = (cands * ks).sum(1) / block
    cands = cands[torch.argsort(ratio, stable=True)]
    return torch.cat([cands, dense[None]])


def retain_counts(config: Tensor, n_blocks: int, block: int) -> list[int]:
    """Tokens kept by the block of each importance rank (most important first), ``[n_blocks]``.

    Ranks ``[round(c_{>k'} N), round(c_{>=k} N))`` keep ``k`` tokens, with ``c_{>=k}`` the cumulative
    proportion of retain counts ``>= k`` (largest first), so the most important blocks keep most.
    """
    ks = _retain_set(block)
    if config.shape[-1] != len(ks):
        raise ValueError(f"config has {config.shape[-1]} proportions but block {block} has {len(ks)} retain counts")
    out: list[int] = []
    cum = 0.0
    for j in range(len(ks) - 1, -1, -1):
        cum += float(config[j])
        end = n_blocks if j == 0 else min(n_blocks, int(math.floor(cum * n_blocks + 0.5)))
        out.extend([ks[j]] * max(0, end - len(out)))
    return out


@dataclass
class TCABudgets:
    """Per-head sparsity configurations: ``configs [L, H, |K|]`` over retain counts ``K = 1, 2, .., block``.

    ``keep_ratio [L, H]`` is the expected fraction of context tokens a head keeps; ``recovered``
    (after calibration) the attention mass its selection recovered on the calibration queries.
    """

    configs: Tensor
    block: int
    recovered: Tensor | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_block(self.block)
        if self.configs.dim() != 3 or self.configs.shape[-1] != len(_retain_set(self.block)):
            raise ValueError(f"configs must be [layers, heads, {len(_retain_set(self.block))}] for block {self.block}, "
                             f"got {tuple(self.configs.shape)}")
        self.configs = self.configs.double().cpu()

    @classmethod
    def dense(cls, layers: int, heads: int, block: int) -> TCABudgets:
        """Every head keeps every token: attention is exactly the model's."""
        c = torch.zeros(layers, heads, len(_retain_set(block)), dtype=torch.float64)
        c[..., -1] = 1.0
        return cls(c, block)

    @classmethod
    def uniform(cls, layers: int, heads: int, block: int, config: Tensor | Sequence[float]) -> TCABudgets:
        """The same configuration for every head."""
        c = torch.as_tensor(config, dtype=torch.float64)
        return cls(c.expand(layers, heads, -1).clone(), block)

    @property
    def keep_ratio(self) -> Tensor:
        ks = torch.tensor(_retain_set(self.block), dtype=torch.float64)
        return (self.configs * ks).sum(-1) / self.block

    def allocation(self, layer: int, n_blocks: int) -> Tensor:
        """``[H, n_blocks]`` retain count per head and importance rank."""
        return torch.tensor([retain_counts(self.configs[layer, h], n_blocks, self.block)
                             for h in range(self.configs.shape[1])], dtype=torch.long).reshape(self.configs.shape[1], n_blocks)


# ------------------------------------------------------------------------------ the attention


def _regions(q_start: int, n_init: int, n_local: int, block: int) -> tuple[int, int]:
    """``(n_blocks, mid_end)`` for a tile whose first query sits at ``q_start``: the middle is
    ``[n_init, mid_end)`` in whole blocks, ending at least ``n_local`` tokens before ``q_start``."""
    n_blocks = max(0, q_start - n_local - n_init) // block
    return n_blocks, n_init + n_blocks * block


def _middle_selection(qbar: Tensor, k_mid: Tensor, alloc: Tensor) -> Tensor:
    """Core tokens of the middle blocks, ``[B, Hq, N * b]`` bool.

    qbar ``[B, Hq, D]`` (the tile's mean query), k_mid ``[B, Hkv, N, b, D]``, alloc ``[Hq, N]``.
    Block importance: ``max_t <qbar, k_t>`` over the block. Redundancy of a token: cosine
    similarity of its key to the block's mean key; the ``k`` least redundant tokens are kept.
    """
    b_, hkv, n, blk, d = k_mid.shape
    hq = qbar.shape[1]
    g = hq // hkv
    kf = k_mid.to(torch.float64 if k_mid.dtype == torch.float64 else torch.float32)
    q = qbar.to(kf.dtype).view(b_, hkv, g, d)
    importance = torch.einsum("bkgd,bkntd->bkgnt", q, kf).amax(-1).reshape(b_, hq, n)
    order = torch.argsort(importance, dim=-1, descending=True, stable=True)  # [B, Hq, N] block at each rank
    kappa = torch.empty(b_, hq, n, dtype=torch.long, device=k_mid.device)
    kappa.scatter_(-1, order, alloc.to(k_mid.device)[None].expand(b_, -1, -1))  # retain count of each block
    mean = kf.mean(3, keepdim=True)
    redundancy = torch.nn.functional.cosine_similarity(kf, mean.expand_as(kf), dim=-1)  # [B, Hkv, N, b]
    rank = torch.argsort(torch.argsort(redundancy, dim=-1, stable=True), dim=-1, stable=True)
    rank = rank.repeat_interleave(g, dim=1)  # [B, Hq, N, b]
    return (rank < kappa[..., None]).reshape(b_, hq, n * blk)


def tca_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    alloc_of: Any,
    n_init: int,
    n_local: int,
    block: int,
    scaling: float,
    attention_mask: Tensor | None = None,
    record: list | None = None,
) -> Tensor:
    """Sparse attention of queries over a full KV cache with TCA core-token selection.

    Args:
        query: ``[B, Hq, C, D]`` (RoPE applied), the last ``C`` positions of the ``T`` keys.
        key, value: ``[B, Hkv, T, D]``, cache slots ``0 .. T-1``.
        alloc_of: ``n_blocks -> [Hq, n_blocks]`` retain counts by importance rank.
        n_init, n_local, block: initial tokens, local window, block size ``b``.
        scaling: logit scale.
        attention_mask: additive ``[B, 1, C, T]`` (``None``: causal).
        record: if a list, one ``(q_start, n_blocks, kept [B, Hq])`` per tile is appended.

    Returns ``[B, C, Hq, D]`` (the layout transformers' attention functions return).
    Queries are processed in tiles of ``block`` (prefill) that share one selection; half
    precision gets a float32 softmax.
    """
    bsz, hq, c, d = query.shape
    hkv, t = key.shape[1], key.shape[2]
    g = hq // hkv
    start = t - c
    sdtype = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    neg = torch.finfo(sdtype).min
    out = torch.empty(bsz, c, hq, d, dtype=query.dtype, device=query.device)
    pos_k = torch.arange(t, device=query.device)
    for lo in range(0, c, block):
        hi = min(c, lo + block)
        q = query[:, :, lo:hi]
        logits = torch.einsum("bkgcd,bktd->bkgct", q.reshape(bsz, hkv, g, hi - lo, d), key).reshape(bsz, hq, hi - lo, t)
        logits = logits.to(sdtype) * scaling
        if attention_mask is not None:
            logits = logits + attention_mask[:, :, lo:hi, :t].to(sdtype)
        else:
            pos_q = torch.arange(start + lo, start + hi, device=query.device)
            logits = logits.masked_fill(pos_k[None, None, None, :] > pos_q[None, None, :, None], neg)
        n_blocks, mid_end = _regions(start + lo, n_init, n_local, block)
        if n_blocks:
            k_mid = key[:, :, n_init:mid_end].reshape(bsz, hkv, n_blocks, block, d)
            keep = _middle_selection(q.mean(2), k_mid, alloc_of(n_blocks))
            allowed = torch.ones(bsz, hq, t, dtype=torch.bool, device=query.device)
            allowed[:, :, n_init:mid_end] = keep
            logits = logits.masked_fill(~allowed[:, :, None, :], neg)
            if record is not None:
                record.append((start + lo, n_blocks, keep.sum(-1).cpu()))
        elif record is not None:
            record.append((start + lo, 0, torch.zeros(bsz, hq, dtype=torch.long)))
        w = torch.softmax(logits, dim=-1).to(value.dtype)
        o = torch.einsum("bkgct,bktd->bkgcd", w.reshape(bsz, hkv, g, hi - lo, t), value)
        out[:, lo:hi] = o.reshape(bsz, hq, hi - lo, d).transpose(1, 2)
    return out


def tca_attention_reference(
    query: Tensor, key: Tensor, value: Tensor, configs: Tensor, n_init: int, n_local: int, block: int, scaling: float,
) -> Tensor:
    """Loop form of :func:`tca_attention` for one sequence (the specification, float64).

    query ``[Hq, C, D]``, key/value ``[Hkv, T, D]``, configs ``[Hq, |K|]`` (causal, no mask).
    Returns ``[C, Hq, D]``.
    """
    hq, c, d = query.shape
    hkv, t = key.shape[0], key.shape[1]
    g = hq // hkv
    start = t - c
    out = torch.zeros(c, hq, d, dtype=query.dtype)
    for h in range(hq):
        kv = h // g
        for lo in range(0, c, block):
            hi = min(c, lo + block)
            n_blocks, mid_end = _regions(start + lo, n_init, n_local, block)
            keep = set(range(n_init)) | set(range(mid_end, t))
            if n_blocks:
                qbar = query[h, lo:hi].mean(0)
                imp = []
                for j in range(n_blocks):
                    a = n_init + j * block
                    imp.append(max(float(qbar @ key[kv, a + i]) for i in range(block)))
                ranked = sorted(range(n_blocks), key=lambda j: (-imp[j], j))
                counts = retain_counts(configs[h], n_blocks, block)
                for r, j in enumerate(ranked):
                    a = n_init + j * block
                    kb = key[kv, a:a + block]
                    mean = kb.mean(0)
                    red = [float(kb[i] @ mean) / max(float(kb[i].norm() * mean.norm()), 1e-8) for i in range(block)]
                    core = sorted(range(block), key=lambda i: (red[i], i))[: counts[r]]
                    keep |= {a + i for i in core}
            for i in range(lo, hi):
                p = start + i
                js = sorted(j for j in keep if j <= p)
                logits = torch.stack([query[h, i] @ key[kv, j] for j in js]) * scaling
                w = torch.softmax(logits, 0)
                out[i, h] = (w[:, None] * value[kv, js]).sum(0)
    return out


# ------------------------------------------------------------------------------ the context manager


def _attention_fn(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:
    bound = module.__dict__.get(_ATTR)
    if bound is None:
        raise RuntimeError(f"attention implementation {_IMPL!r} is only usable inside `with TCAAttention(...)(model):`")
    tca, layer = bound
    return tca._attend(layer, module, query, key, value, attention_mask, scaling), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_IMPL, _attention_fn)
    try:  # an additive [B, 1, q, T] mask, as for eager attention (padding, sliding windows)
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        AttentionMaskInterface.register(_IMPL, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    except (ImportError, KeyError):  # older versions: the function builds a causal mask itself
        pass


@dataclass
class TCAAttention:
    """TCA-Attention for Hugging Face decoders: ``with tca(model): ...`` (see module docstring).

    Args:
        budgets: per-head configurations (:class:`TCABudgets`, from :meth:`calibrate`); ``None``:
            dense (every head keeps every token).
        n_init: initial tokens every query keeps (attention sinks).
        n_local: recent tokens every query keeps (the local window is ``n_local`` to
            ``n_local + block - 1`` tokens, so the middle consists of whole blocks).
        block: block size ``b`` (a power of two); also the prefill query tile.
        record: log ``(layer, q_start, n_blocks, kept [B, Hq])`` per tile in ``self.log``.
    """

    budgets: TCABudgets | None = None
    n_init: int = 4
    n_local: int = 256
    block: int = 64
    record: bool = False

    def __post_init__(self) -> None:
        for name, lo in (("n_init", 0), ("n_local", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
        _check_block(self.block)
        if self.budgets is not None:
            if not isinstance(self.budgets, TCABudgets):
                raise TypeError(f"budgets must be TCABudgets or None, got {type(self.budgets).__name__}")
            if self.budgets.block != self.block:
                raise ValueError(f"budgets were calibrated for block {self.budgets.block}, not block {self.block}")
        self._model: nn.Module | None = None
        self._bind: nn.Module | None = None
        self._calib: dict[int, Tensor] | None = None
        self._alloc_cache: dict[tuple[int, int], Tensor] = {}
        self.log: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ context manager

    def __call__(self, model: nn.Module) -> TCAAttention:
        if self._model is not None:
            raise RuntimeError("this TCAAttention is already applied to a model; exit that `with` block first")
        self._bind = model
        return self

    def __enter__(self) -> TCAAttention:
        if self._bind is None:
            raise RuntimeError("use `with tca(model):`, not `with tca:`")
        self._install(self._bind)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._uninstall()

    def _attention_modules(self, model: nn.Module) -> list[nn.Module]:
        from .memory import SUPPORTED_MODEL_TYPES

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        layers = getattr(getattr(model, "model", None), "layers", None)
        attns = [getattr(layer, "self_attn", None) for layer in (layers or [])]
        if model_type not in SUPPORTED_MODEL_TYPES or not attns or any(a is None for a in attns) \
                or not hasattr(model, "set_attn_implementation"):
            raise ValueError(f"TCAAttention supports Hugging Face causal LMs of model_type {', '.join(SUPPORTED_MODEL_TYPES)} "
                             f"(attention through transformers' AttentionInterface); got {type(model).__name__} "
                             f"with model_type={model_type!r}")
        if getattr(model.config, "attn_logit_softcapping", None):
            raise ValueError("attention logit soft-capping is not supported")
        n_heads = int(model.config.num_attention_heads)
        if self.budgets is not None and tuple(self.budgets.configs.shape[:2]) != (len(attns), n_heads):
            raise ValueError(f"budgets are for {tuple(self.budgets.configs.shape[:2])} (layers, heads), "
                             f"the model has ({len(attns)}, {n_heads})")
        return attns

    def _install(self, model: nn.Module) -> None:
        attns = self._attention_modules(model)
        _register()
        self._saved_impl = model.config._attn_implementation
        for i, attn in enumerate(attns):
            attn.__dict__[_ATTR] = (self, i)
        self._model = model
        self._attns = attns
        self.log = []
        self._alloc_cache = {}
        model.set_attn_implementation(_IMPL)

    def _uninstall(self) -> None:
        if self._model is None:
            return
        try:
            self._model.set_attn_implementation(self._saved_impl)
        finally:
            for attn in self._attns:
                attn.__dict__.pop(_ATTR, None)
            self._model, self._bind, self._attns = None, None, []

    # ------------------------------------------------------------------ attention

    def _alloc(self, layer: int, n_heads: int, n_blocks: int) -> Tensor:
        key = (layer, n_blocks)
        if key not in self._alloc_cache:
            if self.budgets is None:
                self._alloc_cache[key] = torch.full((n_heads, n_blocks), self.block, dtype=torch.long)
            else:
                self._alloc_cache[key] = self.budgets.allocation(layer, n_blocks)
        return self._alloc_cache[key]

    def _attend(self, layer: int, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                attention_mask: Tensor | None, scaling: float | None) -> Tensor:
        scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
        if self._calib is not None:
            self._record_calibration(layer, query, key, attention_mask, scale)
        rec: list | None = [] if self.record else None
        hq = query.shape[1]
        out = tca_attention(query, key, value, lambda n: self._alloc(layer, hq, n), self.n_init, self.n_local,
                            self.block, scale, attention_mask, rec)
        if rec is not None:
            self.log.extend({"layer": layer, "start": s, "n_blocks": n, "kept": k} for s, n, k in rec)
        return out

    # ------------------------------------------------------------------ calibration

    def _record_calibration(self, layer: int, query: Tensor, key: Tensor, attention_mask: Tensor | None, scale: float) -> None:
        """Full attention probabilities of the last ``block`` queries, and their selection inputs."""
        bsz, hq, c, d = query.shape
        hkv, t = key.shape[1], key.shape[2]
        g = hq // hkv
        n = min(self.block, c)
        q = query[:, :, c - n:]
        logits = torch.einsum("bkgcd,bktd->bkgct", q.reshape(bsz, hkv, g, n, d).double(), key.double()).reshape(bsz, hq, n, t) * scale
        if attention_mask is not None:
            logits = logits + attention_mask[:, :, c - n:, :t].double().clamp_min(-1e300)
        else:
            pos_q = torch.arange(t - n, t, device=query.device)
            logits = logits.masked_fill(torch.arange(t, device=query.device)[None, None, None, :] > pos_q[None, None, :, None], -math.inf)
        self._calib[layer] = (torch.softmax(logits, -1).mean(2).cpu(), q.mean(2).detach(), key.detach(), t - n)

    @torch.no_grad()
    def calibrate(self, model: nn.Module, input_ids: Tensor, threshold: float = 0.95,
                  mus: Sequence[float] | None = None, sigmas: Sequence[float] = (0.5, 1.0, 2.0)) -> TCABudgets:
        """Per-head budgets from ONE forward pass over ``input_ids [B, T]``; sets and returns ``self.budgets``.

        The forward runs dense attention (the model's outputs are unchanged); for the last
        ``block`` queries of every layer the full attention probabilities are kept. Each head then
        takes the sparsest candidate of :func:`log_gaussian_configs` whose online selection
        (applied to those queries as one tile) keeps at least ``threshold`` of their attention
        mass on average (initial tokens and local window count as kept).
        """
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a [batch, time] tensor")
        attns = self._attention_modules(model)
        need = self.n_init + self.n_local + 2 * self.block
        if input_ids.shape[1] < need:
            raise ValueError(f"calibration input of {input_ids.shape[1]} tokens is too short: the last {self.block} queries "
                             f"must see at least one middle block, i.e. n_init + n_local + 2 * block = {need} tokens")
        n_heads = int(model.config.num_attention_heads)
        saved, self.budgets = self.budgets, None
        self._calib = {}
        try:
            with self(model):
                model(input_ids=input_ids, use_cache=False)
            calib, self._calib = self._calib, None
        except BaseException:
            self._calib, self.budgets = None, saved
            raise
        cands = log_gaussian_configs(self.block, mus, sigmas)
        configs = torch.zeros(len(attns), n_heads, cands.shape[1], dtype=torch.float64)
        recovered = torch.zeros(len(attns), n_heads, dtype=torch.float64)
        n_blocks_seen = 0
        for layer in range(len(attns)):
            probs, qbar, key, q_start = calib[layer]
            n_blocks, mid_end = _regions(q_start, self.n_init, self.n_local, self.block)
            n_blocks_seen = n_blocks
            always = probs.sum(-1) - probs[..., self.n_init:mid_end].sum(-1)  # [B, Hq]
            mass = []
            for cand in cands:
                if n_blocks:
                    alloc = torch.tensor(retain_counts(cand, n_blocks, self.block)).expand(n_heads, -1)
                    bsz, hkv, _, d = key.shape
                    k_mid = key[:, :, self.n_init:mid_end].reshape(bsz, hkv, n_blocks, self.block, d)
                    keep = _middle_selection(qbar, k_mid, alloc).cpu()
                    kept = (probs[..., self.n_init:mid_end] * keep).sum(-1)
                else:
                    kept = torch.zeros_like(always)
                mass.append((always + kept).mean(0))  # [Hq], mean over the batch
            mass = torch.stack(mass)  # [M, Hq]
            for h in range(n_heads):
                ok = (mass[:, h] >= float(threshold) - 1e-12).nonzero()
                i = int(ok[0]) if len(ok) else len(cands) - 1
                configs[layer, h] = cands[i]
                recovered[layer, h] = mass[i, h]
        settings = {"threshold": float(threshold), "tokens": int(input_ids.shape[1]), "n_init": self.n_init,
                    "n_local": self.n_local, "calibration_blocks": n_blocks_seen, "candidates": int(cands.shape[0])}
        self.budgets = TCABudgets(configs, self.block, recovered, settings)
        return self.budgets
