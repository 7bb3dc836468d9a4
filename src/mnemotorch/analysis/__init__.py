"""Analysis tools that look at memory inside a causal LM (ours or any Hugging Face model).

* :mod:`~mnemotorch.analysis.rhythm` — head span, local/global heads, WAAD and FAI (Preplan-and-Anchor).
* :mod:`~mnemotorch.analysis.injection` — concept vectors, :class:`ConceptInjector`, paired injection trials.
* :mod:`~mnemotorch.analysis.neurofeedback` — :class:`NeurofeedbackProtocol` (metacognitive reporting/control).
* :mod:`~mnemotorch.analysis.binding` — :class:`PairwiseBindingProbe` (IsSameObject).

Attention weights come from eager attention (``output_attentions=True``) for Hugging Face models
and from the mixers themselves for ours (:func:`attention_maps`).
"""

from ._model import attention_maps, decoder_layers, residual_stream
from .binding import PairwiseBindingProbe, sample_pairs, synthetic_object_patches
from .injection import ConceptInjector, InjectionTrials, concept_vector, default_layer, run_injection_trials
from .neurofeedback import NeurofeedbackProtocol, logistic_axis, median_split, pca_axis
from .rhythm import (
    AttentionRhythm,
    attention_rhythm,
    future_attention_influence,
    head_spans,
    middle_layers,
    plot_attention_rhythm,
    select_heads,
    windowed_attention_distance,
)

__all__ = [
    "AttentionRhythm",
    "ConceptInjector",
    "InjectionTrials",
    "NeurofeedbackProtocol",
    "PairwiseBindingProbe",
    "attention_maps",
    "attention_rhythm",
    "concept_vector",
    "decoder_layers",
    "default_layer",
    "future_attention_influence",
    "head_spans",
    "logistic_axis",
    "median_split",
    "middle_layers",
    "pca_axis",
    "plot_attention_rhythm",
    "residual_stream",
    "run_injection_trials",
    "sample_pairs",
    "select_heads",
    "synthetic_object_patches",
    "windowed_attention_distance",
]
