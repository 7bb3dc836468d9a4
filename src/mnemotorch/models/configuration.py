"""`MnemoConfig`: the configuration of the one generic mnemotorch decoder."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

# Keys the transformers base config writes to / reads from config.json on its own.
_BASE_KEYS_EXTRA = {
    "transformers_version", "architectures", "model_type", "auto_map", "_name_or_path", "name_or_path",
    "torch_dtype", "dtype", "_attn_implementation", "_experts_implementation", "attn_implementation",
    "_commit_hash", "output_loading_info",
}
_base_keys_cache: set[str] | None = None


def _base_config_keys() -> set[str]:
    global _base_keys_cache
    if _base_keys_cache is None:
        _base_keys_cache = set(PretrainedConfig().to_dict()) | _BASE_KEYS_EXTRA
    return _base_keys_cache


def normalize_layer_plan(layer_plan: Any, num_hidden_layers: int) -> list[dict[str, Any]]:
    """Turn a layer plan into one ``{"type": name, **kwargs}`` dict per layer.

    Accepts ``None`` (all ``"attention"``), a single mixer spec (repeated for every layer) or a
    list with one spec per layer; a spec is a mixer name or a dict with a ``"type"`` key.
    """
    from ..layers import mixer_kwargs
    from ..layers.registry import parse_mixer_spec

    if layer_plan is None:
        layer_plan = ["attention"] * num_hidden_layers
    elif isinstance(layer_plan, (str, dict)):
        layer_plan = [layer_plan] * num_hidden_layers
    if not isinstance(layer_plan, (list, tuple)):
        raise TypeError(f"layer_plan must be a list of mixer specs (names or dicts with 'type'), got {type(layer_plan).__name__}")
    if len(layer_plan) != num_hidden_layers:
        raise ValueError(f"layer_plan has {len(layer_plan)} entries but num_hidden_layers is {num_hidden_layers}")
    plan = []
    for i, spec in enumerate(layer_plan):
        name, kwargs = parse_mixer_spec(spec, f"layer_plan[{i}]")
        allowed = set(mixer_kwargs(name)) - {"dim", "num_heads"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise ValueError(f"layer_plan[{i}] ({name!r}): unknown argument(s) {unknown}; allowed: {sorted(allowed)}")
        plan.append({"type": spec} if isinstance(spec, str) else dict(spec))
    return plan


class MnemoConfig(PretrainedConfig):
    """Configuration of :class:`MnemoForCausalLM`.

    Args:
        vocab_size: number of token ids.
        hidden_size: model width ``dim``.
        num_hidden_layers: number of blocks.
        num_attention_heads: heads of every mixer.
        num_key_value_heads: key/value heads of attention mixers (GQA); default all heads.
        layer_plan: one mixer spec per layer -- a registered name (``"attention"``) or a dict
            (``{"type": "sliding_window", "window": 64}``); a single spec is repeated. Hybrids
            such as ``["sliding_window", "attention"] * 3`` need no new code.
        mlp_ratio: SwiGLU hidden size is ``round_up(2/3 * mlp_ratio * hidden_size, 64)``
            unless ``intermediate_size`` is given.
        intermediate_size: SwiGLU hidden size (overrides ``mlp_ratio``); ``0`` builds blocks
            without an MLP (mixer-only models, as in Zoology's MQAR recipe).
        rope_theta: RoPE base handed to mixers that take one.
        rms_norm_eps: RMSNorm epsilon.
        tie_word_embeddings: share the input embedding and the output head.
        initializer_range: std of the normal initialisation.
        use_cache: return a :class:`MnemoCache` from eval-mode forwards (needed by ``generate``).

    Unknown keyword arguments raise ``ValueError`` (a typo must not silently become a no-op).
    """

    model_type = "mnemo"

    def __init__(
        self,
        vocab_size: int = 257,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        layer_plan: Any = None,
        mlp_ratio: float = 4.0,
        intermediate_size: int | None = None,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        **kwargs: Any,
    ):
        unknown = sorted(set(kwargs) - _base_config_keys())
        if unknown:
            raise ValueError(
                f"MnemoConfig got unknown field(s) {unknown}; mnemo fields are vocab_size, hidden_size, num_hidden_layers, "
                "num_attention_heads, num_key_value_heads, layer_plan, mlp_ratio, intermediate_size, rope_theta, "
                "rms_norm_eps, tie_word_embeddings, initializer_range, use_cache"
            )
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size), ("num_hidden_layers", num_hidden_layers), ("num_attention_heads", num_attention_heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MnemoConfig.{name} must be a positive int, got {value!r}")
        if hidden_size % num_attention_heads:
            raise ValueError(f"MnemoConfig.hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})")
        if num_key_value_heads is not None and (num_key_value_heads <= 0 or num_attention_heads % num_key_value_heads):
            raise ValueError(f"MnemoConfig.num_key_value_heads must divide num_attention_heads ({num_attention_heads}), got {num_key_value_heads!r}")
        if intermediate_size is not None and (not isinstance(intermediate_size, int) or intermediate_size < 0):
            raise ValueError(f"MnemoConfig.intermediate_size must be an int >= 0 (0 = no MLP), got {intermediate_size!r}")
        if intermediate_size is None:
            intermediate_size = int(-(-int(2 * mlp_ratio * hidden_size / 3) // 64) * 64)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.layer_plan = normalize_layer_plan(layer_plan, num_hidden_layers)
        self.mlp_ratio = float(mlp_ratio)
        self.intermediate_size = int(intermediate_size)
        self.rope_theta = float(rope_theta)
        self.rms_norm_eps = float(rms_norm_eps)
        self.initializer_range = float(initializer_range)
        self.use_cache = bool(use_cache)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
