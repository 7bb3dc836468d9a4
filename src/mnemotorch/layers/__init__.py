"""Token mixers (the Mixer protocol) and their registry.

>>> from mnemotorch.layers import get_mixer, list_mixers
>>> "attention" in list_mixers()
True
>>> mixer = get_mixer("sliding_window", dim=64, num_heads=4, window=16)
"""

from .base import Mixer, MixerState
from .registry import get_mixer, list_mixers, mixer_class, mixer_info, mixer_kwargs, register_mixer

# Importing the modules registers their mixers.
from . import attention  # noqa: F401,E402
from . import linear_attention  # noqa: F401,E402
from . import pattern_attention  # noqa: F401,E402
from .attention import CausalSelfAttention, KVState, SlidingWindowAttention  # noqa: E402

__all__ = [
    "CausalSelfAttention",
    "KVState",
    "Mixer",
    "MixerState",
    "SlidingWindowAttention",
    "get_mixer",
    "list_mixers",
    "mixer_class",
    "mixer_info",
    "mixer_kwargs",
    "register_mixer",
]
from . import based, short_conv  # noqa: F401,E402  (registers `based` and `short_conv`)
from . import hcam, relative  # noqa: F401,E402  (registers `hcam` and `relative`)
from . import titans  # noqa: F401,E402  (registers `titans_lmm`)
from . import routing  # noqa: F401,E402  (registers `routing`)
from . import lla  # noqa: F401,E402  (registers `lla`)
from . import titans_variants  # noqa: F401,E402  (registers `titans_mac`, `titans_mag`, `titans_mal`)
from . import miras  # noqa: F401,E402  (registers `moneta`, `yaad`, `memora`, `delta_net`, `gated_delta_net`)
from . import landmark  # noqa: F401,E402  (registers `landmark`)
from . import hybrid  # noqa: F401,E402  (registers `hybrid`: sub-mixers in sequence inside one block)
from .vision import HaloAttention, NeighborhoodAttention2D  # noqa: F401,E402  (2-D modules, not registered mixers)
