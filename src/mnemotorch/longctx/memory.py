"""Training-free episodic memory for pretrained Hugging Face decoders: EM-LLM and InfLLM.

``EpisodicMemory`` (EM-LLM, Fountas et al., 2024) and ``InfLLM`` (Xiao et al., 2024) are
dataclasses used as context managers in the style of NVIDIA kvpress::

    memory = EpisodicMemory(n_init=4, n_local=64, n_mem=64, block=32)
    with memory(model):
        out = model.generate(input_ids, max_new_tokens=8)

On enter, every attention module's ``forward`` is replaced by the episodic attention, the causal
LM's ``forward`` by a wrapper that feeds long inputs in execution blocks, and (EM-LLM) a forward
hook on the final norm computes token surprise; on exit all of it is removed and the model is
bit-for-bit what it was. Memory state lives on this object, one per sequence of the batch.

Per layer and sequence, each query attends under one softmax to
``[initial tokens ‖ retrieved events ‖ not-yet-segmented remainder ‖ local window]``
(see :mod:`mnemotorch.longctx.attention` for positions). After each forward, tokens that left
the local window become events (surprise boundaries, or fixed blocks for InfLLM), whose KV go
to host memory, read back through an LRU device cache (:class:`~mnemotorch.longctx.store.EventStore`).
The Hugging Face cache only counts tokens (one scalar per token and layer), so ``generate()``
and manual cache loops keep working while the real KV lives here.
"""

from __future__ import annotations

import functools
import inspect
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .attention import episodic_attention, rotate
from .segmentation import SurpriseThreshold, form_events, refine_boundaries, similarity_graph, token_surprise
from .store import EventStore, select_events

__all__ = ["EpisodicMemory", "InfLLM", "EpisodicMemoryError", "SUPPORTED_MODEL_TYPES", "memory_from_name"]

#: ``config.model_type`` values whose attention layout (q/k/v/o projections, rotate-half RoPE,
#: optional per-head q/k RMSNorm) the episodic attention reproduces.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class EpisodicMemoryError(ValueError):
    """The memory cannot be applied to this model or this call (the message says why)."""


@dataclass
class _LayerState:
    hkv: int
    d: int
    store: EventStore
    dtype: torch.dtype
    device: torch.device
    queue: deque = field(default_factory=deque)

    def __post_init__(self) -> None:
        e = lambda *s: torch.empty(*s, dtype=self.dtype, device=self.device)  # noqa: E731
        self.init_k, self.init_v = e(self.hkv, 0, self.d), e(self.hkv, 0, self.d)
        self.pend_k, self.pend_v = e(self.hkv, 0, self.d), e(self.hkv, 0, self.d)
        self.work_k, self.work_kr, self.work_v = e(self.hkv, 0, self.d), e(self.hkv, 0, self.d), e(self.hkv, 0, self.d)
        f = torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype
        self.pend_s = torch.empty(self.hkv, 0, dtype=f, device=self.device)
        self.work_s = torch.empty(self.hkv, 0, dtype=f, device=self.device)


@dataclass
class _SeqState:
    """Bookkeeping of one sequence, shared by its layers (positions are absolute token indices)."""

    layers: list[_LayerState]
    threshold: SurpriseThreshold | None
    seen: int = 0  # tokens processed (committed) so far
    work_start: int = 0  # first position still in the local buffer
    init_len: int = 0  # initial tokens kept so far (<= n_init)
    pend_start: int = 0  # first position of the not-yet-segmented remainder
    flag_base: int = 0
    flags: list[bool] = field(default_factory=list)  # boundary flags of positions flag_base ..
    last_logprobs: Tensor | None = None
    surprises: list[float] = field(default_factory=list)  # every token's surprise, only when recording
    events: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class EpisodicMemory:
    """EM-LLM: surprise-segmented episodic memory with two-stage retrieval, for HF decoders with RoPE.

    Args:
        n_init: initial ("sink") tokens always attended (paper: 128).
        n_local: local window; memory sits at relative position ``n_local`` (paper: 4096).
            Must be below the model's ``max_position_embeddings``.
        n_mem: token budget of retrieved events per layer and step (paper: 4096).
        block: execution block: a long input is fed ``block`` tokens per forward, and retrieval
            runs once per block (paper: 512) and at every decode step.
        min_event, max_event: event sizes (paper: 8 and 128); ``max_event`` is also InfLLM's
            block size.
        gamma, surprise_window: token ``t`` is a boundary when its surprise exceeds
            ``mean + gamma * std`` of the previous ``surprise_window`` surprises (paper: γ = 1).
        refine: ``None``, ``"modularity"`` or ``"conductance"``: move boundaries on the key
            similarity graph (the number of events is unchanged).
        refine_layers: layers whose keys build that graph (``None``: all).
        repr_topk: representative keys per event: the mean of the ``repr_topk`` keys that
            received the most attention while in the local window (paper: 4).
        contiguity: fraction of ``n_mem`` for the contiguity buffer (±1 neighbours of similarity
            hits, kept as a queue across steps; paper ≈ 0.3). ``0`` disables it.
        retrieval_heads: ``(layer, head)`` pairs that read the episodic store; other heads see
            only the initial tokens and the local window (``None``: every head reads it).
        offload: keep event KV in host memory (pinned) when the model runs on an accelerator.
        cache_tokens: device cache of event KV per layer and sequence, in tokens (``None``:
            ``2 * n_mem``). Must hold at least ``n_mem``.
        record: keep a log of every retrieval (``self.log``) for inspection and tests.
    """

    n_init: int = 128
    n_local: int = 4096
    n_mem: int = 4096
    block: int = 512
    min_event: int = 8
    max_event: int = 128
    gamma: float = 1.0
    surprise_window: int = 128
    refine: str | None = None
    refine_layers: Sequence[int] | None = None
    repr_topk: int = 4
    contiguity: float = 0.3
    retrieval_heads: Iterable[tuple[int, int]] | None = None
    offload: bool = True
    cache_tokens: int | None = None
    record: bool = False

    segmenter = "surprise"  # class attribute: how tokens are grouped into events

    def __post_init__(self) -> None:
        for name, lo in (("n_init", 0), ("n_local", 1), ("n_mem", 1), ("block", 1), ("min_event", 1),
                         ("max_event", 1), ("surprise_window", 2), ("repr_topk", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
        if self.min_event > self.max_event:
            raise ValueError(f"min_event ({self.min_event}) must be <= max_event ({self.max_event})")
        if not isinstance(self.gamma, (int, float)) or self.gamma != self.gamma or self.gamma < 0:
            raise ValueError(f"gamma must be a number >= 0, got {self.gamma!r}")
        if not 0.0 <= float(self.contiguity) < 1.0:
            raise ValueError(f"contiguity must be in [0, 1), got {self.contiguity!r}")
        if self.refine not in (None, "modularity", "conductance"):
            raise ValueError(f"refine must be None, 'modularity' or 'conductance', got {self.refine!r}")
        if self.n_mem - self._contiguity_budget < self.max_event:
            raise ValueError(
                f"memory budget too small: n_mem * (1 - contiguity) = {self.n_mem - self._contiguity_budget} tokens "
                f"cannot hold one event of max_event={self.max_event} tokens")
        if self.cache_tokens is not None and self.cache_tokens < self.n_mem:
            raise ValueError(f"cache_tokens ({self.cache_tokens}) must be >= n_mem ({self.n_mem}): one step's events must fit")
        if self.retrieval_heads is not None:
            heads = []
            for item in self.retrieval_heads:
                if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, int) and x >= 0 for x in item)):
                    raise ValueError(f"retrieval_heads must be (layer, head) pairs of non-negative ints, got {item!r}")
                heads.append((int(item[0]), int(item[1])))
            self.retrieval_heads = heads
        self._model: nn.Module | None = None
        self._mnemo = False
        self._states: list[_SeqState] = []
        self._chunk: dict[str, Any] | None = None
        self.retrievals: list[int] = []
        self.log: list[dict[str, Any]] = []

    @property
    def _contiguity_budget(self) -> int:
        return int(float(self.contiguity) * self.n_mem)

    # ------------------------------------------------------------------ context manager

    def __call__(self, model: nn.Module) -> EpisodicMemory:
        """``with memory(model): ...`` applies the memory to ``model`` for the block."""
        if self._model is not None:
            raise EpisodicMemoryError("this memory is already applied to a model; exit that `with` block first")
        self._bind = model
        return self

    def __enter__(self) -> EpisodicMemory:
        model = getattr(self, "_bind", None)
        if model is None:
            raise EpisodicMemoryError("use `with memory(model):`, not `with memory:`")
        self._install(model)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._uninstall()

    # ------------------------------------------------------------------ checks

    def _check_mnemo(self, model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
        """Our own ``MnemoForCausalLM``: supported when every layer is the ``attention`` mixer with RoPE."""
        from ..layers.attention import CausalSelfAttention

        base = model.model
        layers = list(getattr(base, "layers", []))
        bad = []
        for i, layer in enumerate(layers):
            mixer = getattr(layer, "mixer", None)
            if type(mixer) is not CausalSelfAttention or not mixer.rope:
                name = model.config.layer_plan[i].get("type", type(mixer).__name__) if i < len(model.config.layer_plan) else type(mixer).__name__
                bad.append(f"{i} ({name})")
        if not layers or bad:
            raise EpisodicMemoryError(
                f"{type(self).__name__} supports MnemoForCausalLM only when every layer is the 'attention' mixer "
                f"(softmax attention with RoPE); unsupported layers: {', '.join(bad) or 'none found'}")
        n_layers, n_heads = len(layers), int(model.config.num_attention_heads)
        self._check_indices(n_layers, n_heads)
        return base, [layer.mixer for layer in layers]

    def _check_indices(self, n_layers: int, n_heads: int) -> None:
        for i in self.refine_layers or []:
            if not isinstance(i, int) or not 0 <= i < n_layers:
                raise EpisodicMemoryError(f"refine_layers entry {i!r} is not a layer index of this {n_layers}-layer model")
        for layer, head in self.retrieval_heads or []:
            if layer >= n_layers or head >= n_heads:
                raise EpisodicMemoryError(f"retrieval head ({layer}, {head}) is outside the model ({n_layers} layers x {n_heads} heads)")

    def _check_model(self, model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        supported = ", ".join(SUPPORTED_MODEL_TYPES)
        base = getattr(model, "model", None)
        self._mnemo = model_type == "mnemo"
        if self._mnemo and base is not None and hasattr(model, "lm_head"):
            return self._check_mnemo(model)
        if model_type not in SUPPORTED_MODEL_TYPES or base is None or not hasattr(model, "lm_head"):
            raise EpisodicMemoryError(
                f"{type(self).__name__} supports causal LMs with RoPE of model_type {supported} "
                f"(…ForCausalLM with .model and .lm_head), and our MnemoForCausalLM with only 'attention' layers; "
                f"got {type(model).__name__} with model_type={model_type!r}")
        if not isinstance(getattr(base, "rotary_emb", None), nn.Module):
            raise EpisodicMemoryError(f"{type(model).__name__} has no rotary embedding (model.model.rotary_emb): "
                               f"the memory needs RoPE; supported: {supported}")
        layers = getattr(base, "layers", None)
        attns = [getattr(layer, "self_attn", None) for layer in (layers or [])]
        need = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
        if not attns or any(a is None or not all(hasattr(a, n) for n in need) for a in attns):
            raise EpisodicMemoryError(f"unsupported attention layout in {type(model).__name__}: every layer needs "
                               f"self_attn with {', '.join(need)} (supported: {supported})")
        if getattr(config, "attn_logit_softcapping", None):
            raise EpisodicMemoryError("attention logit soft-capping is not supported")
        mp = getattr(config, "max_position_embeddings", None)
        if mp is not None and self.n_local >= int(mp):
            raise EpisodicMemoryError(f"n_local ({self.n_local}) must be < max_position_embeddings ({mp}): memory tokens "
                               f"sit at relative position n_local, which the model must have seen in training")
        for i, a in enumerate(attns):
            window = getattr(a, "sliding_window", None)
            if window is None and model_type == "mistral":
                window = getattr(config, "sliding_window", None)
            if window is not None and self.n_local > int(window):
                raise EpisodicMemoryError(f"layer {i} uses sliding-window attention of {window} tokens; n_local ({self.n_local}) "
                                   f"must not exceed it")
        self._check_indices(len(attns), int(config.num_attention_heads))
        return base, attns

    # ------------------------------------------------------------------ install / uninstall

    def _install(self, model: nn.Module) -> None:
        base, attns = self._check_model(model)
        self._model = model
        self._base = base
        self._attns = attns
        self._saved: list[tuple[nn.Module, Any]] = []
        self._handles: list[Any] = []
        n_heads = int(model.config.num_attention_heads)
        self._head_mask: list[Tensor | None] = []
        for i in range(len(attns)):
            if self.retrieval_heads is None:
                self._head_mask.append(None)
            else:
                m = torch.zeros(n_heads, dtype=torch.bool)
                for layer, head in self.retrieval_heads:
                    if layer == i:
                        m[head] = True
                self._head_mask.append(m)
        self.retrievals = [0] * len(attns)
        self.log = []
        self._states = []
        for i, attn in enumerate(attns):
            self._saved.append((attn, attn.__dict__.get("forward")))
            attn.forward = self._mixer_forward(attn, i) if self._mnemo else self._attention_forward(attn, i)
        original = model.forward
        self._saved.append((model, model.__dict__.get("forward")))

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            return self._model_forward(original, *args, **kwargs)

        model.forward = forward
        if self.segmenter == "surprise":
            self._handles.append(base.norm.register_forward_hook(self._norm_hook))

    def _uninstall(self) -> None:
        if self._model is None:
            return
        for h in self._handles:
            h.remove()
        for module, saved in self._saved:
            if saved is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = saved
        self._handles, self._saved = [], []
        self._model = None
        self._bind = None
        self._chunk = None
        # The states stay readable after exit (events, stores, log); the next enter clears them.

    # ------------------------------------------------------------------ model-level wrapper

    def _new_states(self, batch: int, dtype: torch.dtype, device: torch.device) -> None:
        cfg = self._model.config
        hkv = int(getattr(self._attns[0], "num_kv_heads", None) or getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        d = int(self._attns[0].head_dim)
        storage = torch.device("cpu") if (self.offload and device.type != "cpu") else device
        cache = self.cache_tokens if self.cache_tokens is not None else 2 * self.n_mem
        self._states = []
        for _ in range(batch):
            layers = [_LayerState(hkv, d, EventStore(device, storage, cache), dtype, device) for _ in self._attns]
            thr = SurpriseThreshold(self.surprise_window, self.gamma) if self.segmenter == "surprise" else None
            self._states.append(_SeqState(layers=layers, threshold=thr))

    def _model_forward(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        if args:
            names = list(inspect.signature(original).parameters)
            for name, value in zip(names, args):
                kwargs[name] = value
        if kwargs.get("inputs_embeds") is not None:
            raise EpisodicMemoryError(f"{type(self).__name__} needs input_ids (not inputs_embeds)")
        input_ids = kwargs.get("input_ids")
        if input_ids is None or input_ids.dim() != 2:
            raise EpisodicMemoryError("input_ids [batch, time] is required")
        if kwargs.get("labels") is not None:
            raise EpisodicMemoryError("labels are not supported under the memory; compute the loss from the logits")
        if kwargs.get("output_attentions"):
            raise EpisodicMemoryError("output_attentions is not supported under the memory (weights are never materialised)")
        b, t = input_ids.shape
        cache_key = "cache" if "cache" in kwargs else ("past_key_values" if "past_key_values" in kwargs else None)
        if cache_key is None:
            cache_key = "cache" if "cache" in inspect.signature(original).parameters else "past_key_values"
        cache = kwargs.get(cache_key)
        past = int(cache.get_seq_length()) if cache is not None else 0
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and not bool(mask.all()):
            raise EpisodicMemoryError("padded batches are not supported: the attention_mask must be all ones "
                               "(feed sequences of equal length, or one at a time)")
        if past == 0:
            self._new_states(b, self._model.lm_head.weight.dtype, input_ids.device)
        else:
            if len(self._states) != b or any(s.seen != past for s in self._states):
                raise EpisodicMemoryError(
                    f"the cache holds {past} tokens but the memory has seen "
                    f"{self._states[0].seen if self._states else 0} (batch {len(self._states)} vs {b}): "
                    "continue a sequence only with the cache returned under this memory")
        pos = kwargs.get("position_ids")
        expected = torch.arange(past, past + t, device=input_ids.device)
        if pos is not None and not bool((pos.reshape(-1, pos.shape[-1]) == expected).all()):
            raise EpisodicMemoryError("position_ids must be consecutive from the cache length (custom positions are not supported)")
        keep = kwargs.get("logits_to_keep", 0)
        if isinstance(keep, Tensor) or not isinstance(keep, int):
            raise EpisodicMemoryError("logits_to_keep must be an int under the memory")
        use_cache = kwargs.get("use_cache")
        logits, out = [], None
        placeholder = torch.ones(b, 1, 1, 1, dtype=torch.bool, device=input_ids.device)
        for lo in range(0, t, self.block):
            hi = min(t, lo + self.block)
            kw = dict(kwargs)
            # The mask is all ones and causality/windows are ours: a 4-D placeholder makes transformers
            # skip building a [chunk, context] mask that would grow with the context.
            kw["attention_mask"] = placeholder
            kw["input_ids"] = input_ids[:, lo:hi]
            kw["position_ids"] = expected[lo:hi][None].expand(b, -1)
            if kw.get("cache_position") is not None:  # transformers < 5.2x still passes it
                kw["cache_position"] = expected[lo:hi]
            kw[cache_key] = cache
            # Positions of this block among the last ``keep`` (all when keep == 0); a block with none
            # still runs (its keys enter the memory) but computes the head at one position only.
            wanted = hi - lo if keep == 0 else max(0, hi - max(lo, t - keep))
            kw["logits_to_keep"] = 0 if wanted == hi - lo else max(wanted, 1)
            self._chunk = {"ids": kw["input_ids"], "start": past + lo}
            try:
                out = original(**kw)
            finally:
                self._chunk = None
            self._end_chunk(hi - lo)
            if cache is None and use_cache is not False:
                cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            if wanted:
                logits.append(out.logits[:, -wanted:])
        full = torch.cat(logits, 1) if len(logits) > 1 else logits[0]
        if keep and full.shape[1] > keep:
            full = full[:, -keep:]
        out.logits = full
        return out

    # ------------------------------------------------------------------ surprise (EM-LLM)

    def _norm_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        chunk = self._chunk
        if chunk is None:
            return
        hidden = output[0] if isinstance(output, tuple) else output
        ids = chunk["ids"]
        head = self._model.lm_head
        with torch.no_grad():
            for b, st in enumerate(self._states):
                surprise = torch.full((ids.shape[1],), float("nan"), dtype=torch.float64)
                if st.last_logprobs is not None:
                    surprise[0] = -float(st.last_logprobs[ids[b, 0]])
                # Vocabulary projections in slices of 256 positions: all logits of a 512-token block
                # at a 128K vocabulary would be 256 MB.
                for lo in range(0, ids.shape[1], 256):
                    hi = min(ids.shape[1], lo + 256)
                    lp = torch.log_softmax(head(hidden[b, lo:hi]).float(), dim=-1)
                    nxt = ids[b, lo + 1:hi + 1]
                    if nxt.numel():
                        surprise[lo + 1:lo + 1 + nxt.numel()] = token_surprise(lp[: nxt.numel()], nxt).double().cpu()
                    if hi == ids.shape[1]:
                        st.last_logprobs = lp[-1].detach()
                if self.record:
                    st.surprises.extend(surprise.tolist())
                flags = st.threshold.update(surprise)
                st.flags.extend(bool(f) for f in flags)

    # ------------------------------------------------------------------ attention

    def _attention_forward(self, attn: nn.Module, layer: int) -> Any:
        def forward(hidden_states: Tensor, *args: Any, position_embeddings: Any = None, **kwargs: Any) -> tuple[Tensor, None]:
            return self._attention(attn, layer, hidden_states, position_embeddings, kwargs), None
        return forward

    def _mixer_forward(self, mixer: nn.Module, layer: int) -> Any:
        """MnemoForCausalLM: the ``attention`` mixer's ``forward(x, state) -> (y, state)``, episodic.

        The returned state only counts tokens (what ``MnemoCache.get_seq_length`` reads); the keys
        and values live in the memory, as with the Hugging Face cache.
        """
        from ..layers.base import MixerState
        from ..ops.rotary import rotary_cos_sin

        def forward(x: Tensor, state: Any = None) -> tuple[Tensor, Any]:
            chunk = self._chunk
            if chunk is None:
                raise EpisodicMemoryError("the episodic attention runs only inside the causal LM's forward "
                                          "(call the MnemoForCausalLM, not model.model)")
            seen = 0 if state is None else int(state.seen_tokens)
            c = x.shape[1]
            positions = torch.arange(chunk["start"], chunk["start"] + c, device=x.device)
            cos, sin = rotary_cos_sin(positions, mixer.head_dim, mixer.rope_theta, dtype=x.dtype)
            y = self._attention(mixer, layer, x, (cos[None], sin[None]), {})
            return y, MixerState(seen_tokens=seen + c)

        return forward

    def _memory_rotation(self, attn: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin ``[1, 1, D]`` of position ``n_local``: where every memory token sits for a query."""
        mpos = torch.full((1, 1), self.n_local, device=hidden.device, dtype=torch.long)
        if self._mnemo:
            from ..ops.rotary import rotary_cos_sin

            cos, sin = rotary_cos_sin(mpos[0], attn.head_dim, attn.rope_theta, dtype=hidden.dtype)
            return cos[None], sin[None]
        return self._base.rotary_emb(hidden, mpos)

    def _attention(self, attn: nn.Module, layer: int, hidden: Tensor, position_embeddings: Any, kwargs: dict) -> Tensor:
        chunk = self._chunk
        if chunk is None:
            raise EpisodicMemoryError("the episodic attention runs only inside the causal LM's forward "
                               "(call the model returned by from_pretrained, not model.model)")
        if position_embeddings is None:
            raise EpisodicMemoryError("the attention module received no position_embeddings (cos, sin): unsupported model")
        b, c, _ = hidden.shape
        d = attn.head_dim
        q = attn.q_proj(hidden).view(b, c, -1, d)
        k = attn.k_proj(hidden).view(b, c, -1, d)
        v = attn.v_proj(hidden).view(b, c, -1, d).transpose(1, 2)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, C, D]
        cos, sin = position_embeddings
        cos1, sin1 = cos.unsqueeze(1), sin.unsqueeze(1)
        q_loc, k_rot = rotate(q, cos1, sin1), rotate(k, cos1, sin1)
        mcos, msin = self._memory_rotation(attn, hidden)
        q_mem = rotate(q, mcos.unsqueeze(1).to(q.dtype), msin.unsqueeze(1).to(q.dtype))
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            # The HF cache only counts tokens (get_seq_length, masks); the KV lives in the memory.
            stub = hidden.new_zeros(b, 1, c, 1)
            cache.update(stub, stub, attn.layer_idx if hasattr(attn, "layer_idx") else layer)
        outs = []
        for i, st in enumerate(self._states):
            outs.append(self._attend_one(st, layer, attn, q_loc[i], q_mem[i], k[i], k_rot[i], v[i], chunk["start"]))
        o = torch.stack(outs).transpose(1, 2).reshape(b, c, -1).contiguous()
        return attn.o_proj(o)

    def _attend_one(self, st: _SeqState, layer: int, attn: nn.Module, q_loc: Tensor, q_mem: Tensor,
                    k: Tensor, k_rot: Tensor, v: Tensor, start: int) -> Tensor:
        ls = st.layers[layer]
        c = q_loc.shape[1]
        hkv = k.shape[0]
        g = q_loc.shape[0] // hkv
        heads = self._head_mask[layer]
        reads = heads is None or bool(heads.any())
        mem_k, mem_v = ls.init_k, ls.init_v
        if reads:
            ids = self._retrieve(ls, layer, q_mem, heads, g, start)
            if ids:
                ek, ev = ls.store.fetch(ids)
                mem_k, mem_v = torch.cat([mem_k, ek.to(k.dtype)], 1), torch.cat([mem_v, ev.to(v.dtype)], 1)
            mem_k, mem_v = torch.cat([mem_k, ls.pend_k], 1), torch.cat([mem_v, ls.pend_v], 1)
        work_k = torch.cat([ls.work_k, k], 1)
        work_kr = torch.cat([ls.work_kr, k_rot], 1)
        work_v = torch.cat([ls.work_v, v], 1)
        work_pos = torch.arange(st.work_start, start + c, device=k.device)
        q_pos = torch.arange(start, start + c, device=k.device)
        out, received = episodic_attention(
            q_loc, q_mem, mem_k, mem_v, ls.init_k.shape[1], work_k, work_kr, work_v, q_pos, work_pos,
            self.n_local, float(getattr(attn, "scaling", attn.head_dim ** -0.5)), heads)
        # Stored state is detached: the memory is for inference and must not keep autograd graphs alive.
        ls.work_k, ls.work_kr, ls.work_v = work_k.detach(), work_kr.detach(), work_v.detach()
        ls.work_s = torch.cat([ls.work_s, torch.zeros(hkv, c, dtype=ls.work_s.dtype, device=k.device)], 1) + received.detach().to(ls.work_s.dtype)
        return out

    def _retrieve(self, ls: _LayerState, layer: int, q_mem: Tensor, heads: Tensor | None, g: int, start: int) -> list[int]:
        """Once per layer and forward (execution block / decode step): the events to attend to."""
        self.retrievals[layer] += 1
        ids: list[int] = []
        if len(ls.store):
            qbar = q_mem.float().mean(1)  # [Hq, D]: the block's mean query
            kv_of = torch.arange(qbar.shape[0], device=qbar.device) // g
            if heads is not None:
                sel = heads.to(qbar.device)
                qbar, kv_of = qbar[sel], kv_of[sel]
            rk = ls.store.repr_keys.float()[:, kv_of]  # [E, Hsel, D]
            scores = torch.einsum("ehd,hd->e", rk, qbar)
            cont = self._contiguity_budget
            ids = select_events(scores.cpu(), ls.store.sizes, self.n_mem - cont, ls.queue if cont else None, cont)
        if self.record:
            self.log.append({"layer": layer, "start": start, "events": [ls.store.ranges[i] for i in ids]})
        return ids

    # ------------------------------------------------------------------ after each forward

    def _end_chunk(self, c: int) -> None:
        for st in self._states:
            st.seen += c
            self._commit(st)

    def _commit(self, st: _SeqState) -> None:
        """Move tokens that left the local window into the initial tokens or the remainder; close events."""
        n_ev = max(0, st.seen - self.n_local + 1 - st.work_start)
        if n_ev:
            to_init = min(n_ev, self.n_init - st.init_len)
            for ls in st.layers:
                if to_init:
                    ls.init_k = torch.cat([ls.init_k, ls.work_k[:, :to_init]], 1)
                    ls.init_v = torch.cat([ls.init_v, ls.work_v[:, :to_init]], 1)
                ls.pend_k = torch.cat([ls.pend_k, ls.work_k[:, to_init:n_ev]], 1)
                ls.pend_v = torch.cat([ls.pend_v, ls.work_v[:, to_init:n_ev]], 1)
                ls.pend_s = torch.cat([ls.pend_s, ls.work_s[:, to_init:n_ev]], 1)
                ls.work_k, ls.work_kr, ls.work_v = ls.work_k[:, n_ev:], ls.work_kr[:, n_ev:], ls.work_v[:, n_ev:]
                ls.work_s = ls.work_s[:, n_ev:]
            st.init_len += to_init
            if to_init:
                st.pend_start = st.init_len
            st.work_start += n_ev
        if st.work_start <= st.pend_start:
            return
        if self.segmenter == "surprise":
            def is_boundary(t: int) -> bool:
                return st.flags[t - st.flag_base]
            events = form_events(st.pend_start, st.work_start, is_boundary, self.min_event, self.max_event)
        else:
            events = form_events(st.pend_start, st.work_start, None, self.max_event, self.max_event)
        if not events:
            return
        if self.refine is not None and len(events) > 1:
            span = events[-1][1] - st.pend_start
            layers = range(len(st.layers)) if self.refine_layers is None else self.refine_layers
            adj = similarity_graph([st.layers[i].pend_k[:, :span] for i in layers])
            events = refine_boundaries(adj, st.pend_start, events, self.refine, self.min_event, self.max_event)
        for ls in st.layers:
            for a, e in events:
                lo, hi = a - st.pend_start, e - st.pend_start
                k, v, s = ls.pend_k[:, lo:hi], ls.pend_v[:, lo:hi], ls.pend_s[:, lo:hi]
                top = s.topk(min(self.repr_topk, hi - lo), dim=1).indices  # [Hkv, r]
                rk = k.gather(1, top[..., None].expand(-1, -1, k.shape[-1])).float().mean(1)
                ls.store.add(a, e, k, v, rk)
            cut = events[-1][1] - st.pend_start
            ls.pend_k, ls.pend_v, ls.pend_s = ls.pend_k[:, cut:], ls.pend_v[:, cut:], ls.pend_s[:, cut:]
        st.events.extend(events)
        st.pend_start = events[-1][1]
        if self.segmenter == "surprise":
            drop = st.pend_start - st.flag_base
            del st.flags[:drop]
            st.flag_base = st.pend_start

    # ------------------------------------------------------------------ snapshot (one context, several questions)

    _LAYER_TENSORS = ("init_k", "init_v", "pend_k", "pend_v", "pend_s", "work_k", "work_kr", "work_v", "work_s")

    def snapshot(self) -> dict[str, Any]:
        """The memory's state now, cheaply: tensors are never modified in place (every update makes
        a new tensor) and events are only appended, so references and lengths suffice.
        :meth:`restore` returns to it (how the ``mnemo-longctx`` pipeline answers each question
        from the same prefilled context)."""
        seqs = []
        for st in self._states:
            layers = [({n: getattr(ls, n) for n in self._LAYER_TENSORS}, deque(ls.queue), len(ls.store), ls.store.repr_keys)
                      for ls in st.layers]
            hist = st.threshold.history if st.threshold is not None else None
            seqs.append({"scalars": (st.seen, st.work_start, st.init_len, st.pend_start, st.flag_base),
                         "lists": (list(st.flags), list(st.surprises), list(st.events)),
                         "last_logprobs": st.last_logprobs, "history": hist, "layers": layers})
        return {"states": list(self._states), "seqs": seqs, "retrievals": list(self.retrievals), "log": len(self.log)}

    def restore(self, snap: dict[str, Any]) -> None:
        """Return to a :meth:`snapshot` taken on this memory (events added since are dropped)."""
        if len(snap["states"]) != len(self._states) or any(a is not b for a, b in zip(snap["states"], self._states)):
            raise EpisodicMemoryError("this snapshot belongs to another sequence of the memory (a new sequence was started since)")
        for st, saved in zip(self._states, snap["seqs"]):
            st.seen, st.work_start, st.init_len, st.pend_start, st.flag_base = saved["scalars"]
            st.flags, st.surprises, st.events = (list(x) for x in saved["lists"])
            st.last_logprobs = saved["last_logprobs"]
            if st.threshold is not None:
                st.threshold.history = saved["history"]
            for ls, (tensors, queue, n_events, repr_keys) in zip(st.layers, saved["layers"]):
                for name, t in tensors.items():
                    setattr(ls, name, t)
                ls.queue = deque(queue)
                store = ls.store
                for i in [j for j in store._cache if j >= n_events]:
                    a, b = store.ranges[i]
                    del store._cache[i]
                    store._cached -= b - a
                del store.ranges[n_events:], store.keys[n_events:], store.values[n_events:]
                store.repr_keys = repr_keys
        self.retrievals = list(snap["retrievals"])
        del self.log[snap["log"]:]

    # ------------------------------------------------------------------ introspection

    @property
    def surprises(self) -> list[list[float]]:
        """Per sequence, every token's surprise ``-log p(x_t | x_<t)`` (NaN for the first); needs ``record=True``."""
        return [list(s.surprises) for s in self._states]

    @property
    def events(self) -> list[list[tuple[int, int]]]:
        """Per sequence of the batch, the events formed so far (``(start, end)`` ranges)."""
        return [list(s.events) for s in self._states]

    def stores(self, seq: int = 0) -> list[EventStore]:
        """The event store of every layer of sequence ``seq``."""
        return [ls.store for ls in self._states[seq].layers]


@dataclass
class InfLLM(EpisodicMemory):
    """InfLLM (Xiao et al., 2024): the same machinery with fixed ``max_event``-token blocks and
    top-k block retrieval (no contiguity buffer, no surprise, no refinement)."""

    contiguity: float = 0.0

    segmenter = "fixed"

    def __post_init__(self) -> None:
        if self.refine is not None:
            raise ValueError("InfLLM uses fixed blocks: refine must be None")
        # min_event plays no part in fixed blocks; keep the shared check from rejecting a small block.
        self.min_event = min(self.min_event, self.max_event)
        super().__post_init__()


def memory_from_name(name: str, **kwargs: Any) -> EpisodicMemory | None:
    """``"em-llm"`` -> :class:`EpisodicMemory`, ``"infllm"`` -> :class:`InfLLM`, ``"none"`` -> ``None``."""
    key = name.lower().replace("_", "-")
    if key in ("none", "plain"):
        if kwargs:
            raise ValueError(f"memory 'none' takes no options, got {sorted(kwargs)}")
        return None
    if key in ("em-llm", "emllm", "episodic"):
        return EpisodicMemory(**kwargs)
    if key == "infllm":
        return InfLLM(**kwargs)
    raise ValueError(f"unknown memory {name!r}; choose em-llm, infllm or none")
