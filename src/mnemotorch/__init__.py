"""mnemotorch: memory mechanisms of modern sequence models in one PyTorch library."""

__version__ = "0.1.0"

from . import layers, ops  # noqa: E402,F401

try:  # models need transformers; keep `mnemotorch.ops`/`layers` usable without it
    from . import models  # noqa: F401
    from .models import MnemoConfig, MnemoForCausalLM  # noqa: F401
except ImportError as exc:  # pragma: no cover
    if "transformers" not in str(exc):
        raise

__all__ = ["MnemoConfig", "MnemoForCausalLM", "layers", "models", "ops"]
