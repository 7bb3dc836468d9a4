"""The generic mnemotorch decoder (`MnemoConfig`, `MnemoForCausalLM`), registered with HF Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import MnemoCache
from .configuration import MnemoConfig, normalize_layer_plan
from .modeling import MnemoBlock, MnemoForCausalLM, MnemoModel, MnemoPreTrainedModel

AutoConfig.register(MnemoConfig.model_type, MnemoConfig, exist_ok=True)
AutoModel.register(MnemoConfig, MnemoModel, exist_ok=True)
AutoModelForCausalLM.register(MnemoConfig, MnemoForCausalLM, exist_ok=True)

__all__ = ["MnemoBlock", "MnemoCache", "MnemoConfig", "MnemoForCausalLM", "MnemoModel", "MnemoPreTrainedModel", "normalize_layer_plan"]
