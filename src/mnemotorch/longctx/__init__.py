"""Training-free memory for pretrained Hugging Face decoders (explicit / inference-time memory).

* :class:`EpisodicMemory` — EM-LLM (Fountas et al., 2024): surprise-segmented events, graph
  boundary refinement, two-stage retrieval, host-memory KV with a bounded device cache.
* :class:`InfLLM` — InfLLM (Xiao et al., 2024): the same machinery with fixed-size blocks.
* :func:`detect_retrieval_heads`, :func:`mask_heads` — retrieval heads (Wu et al., 2024).
* :class:`TCAAttention` — context-adaptive per-head sparse attention (You et al., 2025).
* ``pipeline("mnemo-longctx", ...)`` — prefill a context once, answer several questions.

Each memory is a dataclass used as a context manager: ``with memory(model): model.generate(...)``.
See docs/longctx.md.
"""

from .attention import episodic_attention, episodic_attention_reference
from .evaluate import default_budgets, evaluate_passkey_with_memory, make_memory
from .heads import RetrievalHeads, build_needle_prompt, detect_retrieval_heads, mask_heads, retrieval_scores
from .memory import SUPPORTED_MODEL_TYPES, EpisodicMemory, InfLLM, EpisodicMemoryError, memory_from_name
from .segmentation import (
    SurpriseThreshold,
    conductance,
    form_events,
    modularity,
    refine_boundaries,
    similarity_graph,
    surprise_boundaries_reference,
    token_surprise,
)
from .store import EventStore, select_events
from .pipeline import LongContextPipeline  # registers pipeline("mnemo-longctx")
from .tca import TCAAttention, TCABudgets, log_gaussian_configs, retain_counts, tca_attention, tca_attention_reference

__all__ = [
    "EpisodicMemory",
    "EventStore",
    "InfLLM",
    "LongContextPipeline",
    "EpisodicMemoryError",
    "RetrievalHeads",
    "SUPPORTED_MODEL_TYPES",
    "SurpriseThreshold",
    "build_needle_prompt",
    "conductance",
    "default_budgets",
    "evaluate_passkey_with_memory",
    "make_memory",
    "detect_retrieval_heads",
    "episodic_attention",
    "episodic_attention_reference",
    "form_events",
    "mask_heads",
    "memory_from_name",
    "modularity",
    "refine_boundaries",
    "retrieval_scores",
    "select_events",
    "TCAAttention",
    "TCABudgets",
    "log_gaussian_configs",
    "retain_counts",
    "tca_attention",
    "tca_attention_reference",
    "similarity_graph",
    "surprise_boundaries_reference",
    "token_surprise",
]
