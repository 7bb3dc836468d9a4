"""Cognitively-inspired memory modules (issue 9).

None of these is a causal token mixer, so none is registered in the mixer registry:

* :class:`PMIMemory` -- working memory written by top-k competition over a whole step's
  perceptions, plus a long-term memory (Zeng et al., ICLR 2024);
* :class:`SparseyCSA` -- sparse distributed codes, single-trial binary Hebbian learning (Rinkus);
* :class:`DualCodingMemory` -- episodic key-value memory with modality-separate entries (Hill et al., 2021);
* :class:`SemanticDecoder` -- the Tensor Brain's triple decoder with an episodic time index (Tresp et al.).

See docs/cognitive/ for the equations and what each check shows.
"""

from .dual_coding import DualCodingMemory, DualCodingRead, DualCodingState
from .pmi import PMIMemory, PMIState, topk_softmax
from .sparsey import SparseyCSA
from .tensor_brain import SemanticDecoder, Triple

__all__ = [
    "DualCodingMemory",
    "DualCodingRead",
    "DualCodingState",
    "PMIMemory",
    "PMIState",
    "SemanticDecoder",
    "SparseyCSA",
    "Triple",
    "topk_softmax",
]
