"""The one generic decoder of mnemotorch.

embedding -> N x (RMSNorm -> mixer -> residual -> RMSNorm -> SwiGLU -> residual) -> RMSNorm -> head.
The mixer of each block comes from the config's layer plan, so every mechanism (and every hybrid)
uses this one modelling file.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..layers import Mixer, get_mixer, mixer_kwargs
from ..layers.base import MixerState
from .cache import MnemoCache
from .configuration import MnemoConfig

# transformers renamed the cache argument/field from `past_key_values` to `cache` during 5.x.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class SwiGLU(nn.Module):
    """``W_down (silu(W_gate x) * W_up x)`` (Shazeer, 2020)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def build_mixer(config: MnemoConfig, spec: dict[str, Any]) -> Mixer:
    """Instantiate the mixer of one layer-plan entry, filling shared settings it accepts."""
    name = spec["type"]
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    accepted = mixer_kwargs(name)
    shared = {"num_kv_heads": config.num_key_value_heads, "rope_theta": config.rope_theta}
    for key, value in shared.items():
        if key in accepted and key not in kwargs and value is not None:
            kwargs[key] = value
    return get_mixer(name, dim=config.hidden_size, num_heads=config.num_attention_heads, **kwargs)


class MnemoBlock(nn.Module):
    """Pre-norm residual block: mixer then SwiGLU."""

    def __init__(self, config: MnemoConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.mixer_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mixer = build_mixer(config, config.layer_plan[layer_idx])
        # intermediate_size == 0 drops the MLP (Zoology's MQAR models are mixer-only).
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if config.intermediate_size else None
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size) if config.intermediate_size else None

    def forward(self, x: Tensor, state: MixerState | None = None) -> tuple[Tensor, MixerState | None]:
        h, state = self.mixer(self.mixer_norm(x), state)
        x = x + h
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x, state


class MnemoPreTrainedModel(PreTrainedModel):
    config_class = MnemoConfig
    base_model_prefix = "model"
    _no_split_modules = ["MnemoBlock"]
    supports_gradient_checkpointing = False
    _is_stateful = True  # assisted decoding needs rollback, which recurrent states cannot do

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache: the model creates its own MnemoCache.
        return False

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, Mixer) and hasattr(module, "reset_mixer_parameters"):
            module.reset_mixer_parameters()


class MnemoModel(MnemoPreTrainedModel):
    """The decoder trunk: ``input_ids [B, T]`` -> hidden states ``[B, T, dim]``."""

    def __init__(self, config: MnemoConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MnemoBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        cache: MnemoCache | None = None,
        **unused: Any,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [B, T] or inputs_embeds [B, T, dim]")
        if input_ids is not None:
            if not isinstance(input_ids, Tensor) or input_ids.ndim != 2 or input_ids.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"input_ids must be an integer tensor [batch, time], got {getattr(input_ids, 'shape', input_ids)!r}")
            if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
                raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), got range [{int(input_ids.min())}, {int(input_ids.max())}]")
            inputs_embeds = self.embed_tokens(input_ids)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            state = cache.states[i] if cache is not None else None
            x, state = layer(x, state)
            if cache is not None:
                cache.states[i] = state
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), **{_CACHE_FIELD: cache})


class MnemoForCausalLM(MnemoPreTrainedModel, GenerationMixin):
    """Generic decoder LM over any layer plan of registered mixers.

    Works with the Hugging Face stack: ``AutoModelForCausalLM.from_config(MnemoConfig(...))``,
    ``save_pretrained``/``from_pretrained`` (safetensors) and ``generate()``, whose per-layer mixer
    states travel in a :class:`MnemoCache`.

    Padding is not supported yet: an ``attention_mask`` with zeros raises an error.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MnemoConfig):
        super().__init__(config)
        self.model = MnemoModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def state_size(self, seq_len: int) -> int:
        """Elements of memory state held per sequence after ``seq_len`` tokens, summed over layers."""
        return sum(layer.mixer.state_size(seq_len) for layer in self.model.layers)

    def _resolve_cache(self, cache: Any, use_cache: bool) -> MnemoCache | None:
        if isinstance(cache, MnemoCache):
            return cache
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            raise TypeError(f"a mnemo model needs a MnemoCache to continue a sequence, got a filled {type(cache).__name__}")
        return MnemoCache(self.config.num_hidden_layers) if use_cache else None

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: MnemoCache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        past_key_values: MnemoCache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """``input_ids [B, T]`` -> logits ``[B, T, vocab]``; with ``labels [B, T]`` also the shifted LM loss.

        Positions come from the cache (tokens already seen), so ``position_ids`` is not needed.
        """
        if attention_mask is not None and not bool((attention_mask != 0).all()):
            raise NotImplementedError("MnemoForCausalLM does not support padding yet: attention_mask must be all ones")
        if cache is None:
            cache = past_key_values
        if use_cache is None:
            use_cache = cache is not None or (not self.training and self.config.use_cache)
        cache = self._resolve_cache(cache, use_cache)
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, cache=cache)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        cache: MnemoCache | None = None,
        past_key_values: MnemoCache | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> dict[str, Any]:
        # Feed only the tokens the mixer states have not seen yet; the states know the positions.
        cache = cache if cache is not None else past_key_values
        seen = cache.get_seq_length() if isinstance(cache, MnemoCache) else 0
        inputs: dict[str, Any] = {"use_cache": use_cache, _CACHE_FIELD: cache}
        if inputs_embeds is not None and seen == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, seen:].contiguous()
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        return inputs
