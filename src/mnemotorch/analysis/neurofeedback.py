"""Neurofeedback (Ji-An et al., 2025, "Language Models Are Capable of Metacognitive Monitoring and
Control of Their Internal Activations", arXiv 2505.13763).

A sentence's activation along an axis ``w`` at layer ``l`` is ``a = w^T h_bar``, where ``h_bar`` is
the residual stream after layer ``l`` averaged over the sentence's tokens. ``w`` is a logistic
regression direction (for some labelled property of the sentences) or a principal component of
the activations. Labels are a median split of ``a`` (so they are 50/50 by construction). The model
sees in-context ``(sentence, label)`` pairs and then:

* **reporting** — a new sentence: does the model name its label? (accuracy; chance is 50%)
* **control** — a target label: the model reads (or writes) a sentence under that instruction;
  does ``a`` move toward the target? (difference of means, and Cohen's d, between targets)

Everything runs in torch (no scikit-learn).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._model import as_ids, decoder_layers, encode, resolve_layer

__all__ = ["NeurofeedbackProtocol", "logistic_axis", "median_split", "pca_axis"]

Reporter = Callable[[str, str], int]


def _check_features(x: Tensor, argument: str = "features") -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[0] < 2 or not x.is_floating_point():
        raise ValueError(f"{argument} must be a float tensor [N >= 2, dim], got {getattr(x, 'shape', type(x))}")
    return x


def pca_axis(features: Tensor, component: int = 0) -> Tensor:
    """Unit principal axis ``component`` (0 = largest variance) of ``features [N, dim]``, ``[dim]``.

    The sign is fixed so that the entry of largest magnitude is positive (SVD signs are arbitrary).
    """
    x = _check_features(features)
    if not 0 <= component < min(x.shape):
        raise ValueError(f"component must be in [0, {min(x.shape) - 1}], got {component}")
    _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    w = vh[component]
    return w * torch.sign(w[w.abs().argmax()])


def logistic_axis(features: Tensor, labels: Tensor, *, l2: float = 1e-3, steps: int = 200) -> Tensor:
    """Unit direction of an L2-regularised logistic regression of ``labels`` (0/1) on ``features``.

    Fitted with L-BFGS on standardised features; the returned direction is mapped back to the raw
    feature space (``w_raw = w / std``) and normalised, so ``a = w^T h`` ranks like the classifier.
    """
    x = _check_features(features).double()
    y = torch.as_tensor(labels).double().flatten().to(x.device)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"labels has {y.shape[0]} entries for {x.shape[0]} feature rows")
    if not bool(((y == 0) | (y == 1)).all()) or y.min() == y.max():
        raise ValueError("labels must be 0/1 with both classes present")
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-12)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    raw = (w.detach() / sd).to(features.dtype)
    return raw / raw.norm().clamp_min(1e-30)


def median_split(scores: Tensor) -> Tensor:
    """Labels ``[N]`` (long): 1 for the ``N // 2`` highest scores, 0 for the rest.

    By rank rather than by comparing with the median, so ties cannot unbalance the classes:
    exactly half are 1 for even ``N`` (one fewer 1 than 0 for odd ``N``).
    """
    if not isinstance(scores, Tensor) or scores.ndim != 1 or scores.numel() < 2:
        raise ValueError(f"scores must be a 1-D tensor of at least 2 values, got {getattr(scores, 'shape', type(scores))}")
    order = torch.argsort(scores, descending=True, stable=True)
    labels = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    labels[order[: scores.shape[0] // 2]] = 1
    return labels


class NeurofeedbackProtocol:
    """The neurofeedback paradigm over a causal LM: axis, labels, reporting and control tasks.

    Args:
        model, tokenizer: a causal LM and its tokenizer (Hugging Face or ours).
        layer: decoder layer whose output (residual stream) is read.
        label_names: the two label strings shown to the model (their first tokens must differ).
        template: one in-context example; ``{sentence}`` and ``{label}`` are filled in.
        instruction: text before the examples.

    Call :meth:`fit` with the sentences first. Then ``scores`` (``a`` of each sentence),
    ``labels`` (median split), ``axis`` and ``threshold`` are set.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        layer: int,
        label_names: tuple[str, str] = ("0", "1"),
        template: str = "Sentence: {sentence}\nLabel: {label}\n",
        instruction: str = "",
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.layer = resolve_layer(model, layer)
        if len(label_names) != 2 or label_names[0] == label_names[1]:
            raise ValueError(f"label_names must be two different strings, got {label_names!r}")
        if "{sentence}" not in template or "{label}" not in template or template.index("{sentence}") > template.index("{label}"):
            raise ValueError("template must contain {sentence} followed by {label}")
        self.label_names = (str(label_names[0]), str(label_names[1]))
        self.template = template
        self.instruction = instruction
        self.sentences: list[str] = []
        self.axis: Tensor | None = None
        self.scores: Tensor | None = None
        self.labels: Tensor | None = None

    # ---- activations, axis, labels -------------------------------------------------------------

    @torch.no_grad()
    def activations(self, sentences: Sequence[str]) -> Tensor:
        """``h_bar`` of each sentence (read alone): mean residual stream after ``layer``, ``[N, dim]``."""
        from ._model import residual_stream

        if isinstance(sentences, str) or len(sentences) == 0:
            raise ValueError("sentences must be a non-empty list of strings")
        return torch.stack([residual_stream(self.model, encode(self.tokenizer, s), self.layer)[0].mean(0) for s in sentences])

    def fit(self, sentences: Sequence[str], *, method: str = "pca", component: int = 0, concept_labels: Sequence[int] | Tensor | None = None) -> NeurofeedbackProtocol:
        """Compute the axis and the median-split labels of ``sentences``.

        Args:
            method: ``"pca"`` (principal axis ``component``) or ``"logistic"`` (needs ``concept_labels``,
                0/1 per sentence, e.g. a sentiment or morality annotation).
        """
        if method not in ("pca", "logistic"):
            raise ValueError(f"method must be 'pca' or 'logistic', got {method!r}")
        feats = self.activations(sentences).double()
        if method == "pca":
            axis = pca_axis(feats, component)
        else:
            if concept_labels is None:
                raise ValueError("method='logistic' needs concept_labels (0/1 per sentence)")
            axis = logistic_axis(feats, torch.as_tensor(concept_labels))
        self.sentences = list(sentences)
        self.axis = axis
        self.scores = feats @ axis
        self.labels = median_split(self.scores)
        return self

    def _need_fit(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.axis is None or self.scores is None or self.labels is None:
            raise RuntimeError("call fit(sentences) first")
        return self.axis, self.scores, self.labels

    def project(self, sentences: Sequence[str]) -> Tensor:
        """``a = w^T h_bar`` of new sentences, ``[N]``."""
        axis, _, _ = self._need_fit()
        return self.activations(sentences).double() @ axis

    # ---- prompts ---------------------------------------------------------------------------------

    def prompt(self, examples: Sequence[int], query: str) -> str:
        """Instruction + the in-context examples (indices into the fitted sentences) + the query."""
        _, _, labels = self._need_fit()
        parts = [self.instruction]
        for i in examples:
            parts.append(self.template.format(sentence=self.sentences[i], label=self.label_names[int(labels[i])]))
        head = self.template[: self.template.index("{label}")]
        parts.append(head.format(sentence=query))
        return "".join(parts)

    def _episodes(self, n_context: int, n_queries: int, seed: int) -> list[tuple[list[int], int]]:
        """Balanced episodes: context examples half of each label, queries alternate labels."""
        _, _, labels = self._need_fit()
        if n_context < 0 or n_queries < 1:
            raise ValueError(f"need n_context >= 0 and n_queries >= 1, got {n_context}, {n_queries}")
        by = [[i for i in range(len(labels)) if int(labels[i]) == c] for c in (0, 1)]
        if n_context // 2 + (n_context % 2) + 1 > min(len(by[0]), len(by[1])):
            raise ValueError(f"{len(self.sentences)} fitted sentences are too few for {n_context} examples plus a query")
        rng = random.Random(seed)
        out = []
        for q in range(n_queries):
            target = q % 2
            pick = [rng.sample(by[c], len(by[c])) for c in (0, 1)]
            query = pick[target].pop()
            ctx = pick[0][: n_context // 2] + pick[1][: n_context - n_context // 2]
            rng.shuffle(ctx)
            out.append((ctx, query))
        return out

    # ---- tasks -----------------------------------------------------------------------------------

    def model_reporter(self) -> Reporter:
        """A reporter that asks the model: the label whose first token has the larger next-token logit."""
        ids = [encode(self.tokenizer, name) for name in self.label_names]
        if not ids[0] or not ids[1] or ids[0][0] == ids[1][0]:
            raise ValueError(f"label_names {self.label_names!r} must start with different tokens")
        first = (ids[0][0], ids[1][0])

        @torch.no_grad()
        def report(prompt: str, sentence: str) -> int:
            x = as_ids(encode(self.tokenizer, prompt), self.model)
            logits = self.model(input_ids=x, use_cache=False).logits[0, -1]
            return int(logits[first[1]] > logits[first[0]])

        return report

    def oracle_reporter(self) -> Reporter:
        """A reporter that knows the truth: the median-split label of the sentence's own ``a``."""
        axis, scores, labels = self._need_fit()
        # the threshold between the two classes of the fit
        lo, hi = scores[labels == 0].max(), scores[labels == 1].min()
        cut = (lo + hi) / 2

        def report(prompt: str, sentence: str) -> int:
            return int(float(self.project([sentence])[0]) > float(cut))

        return report

    def reporting_task(self, *, n_context: int = 8, n_queries: int = 20, reporter: Reporter | None = None, seed: int = 0) -> dict[str, Any]:
        """Accuracy of ``reporter`` (default: the model) at naming held-out sentences' labels.

        Queries are drawn from the fitted sentences, half of each label, never among their own
        episode's examples. Returns ``accuracy``, ``n``, and per-query ``predictions``/``targets``.
        """
        _, _, labels = self._need_fit()
        reporter = self.model_reporter() if reporter is None else reporter
        preds, targets = [], []
        for ctx, q in self._episodes(n_context, n_queries, seed):
            preds.append(int(reporter(self.prompt(ctx, self.sentences[q]), self.sentences[q])))
            targets.append(int(labels[q]))
        acc = sum(p == t for p, t in zip(preds, targets)) / len(targets)
        return {"accuracy": acc, "n": len(targets), "predictions": preds, "targets": targets}

    @torch.no_grad()
    def control_task(self, *, n_context: int = 8, n_queries: int = 20, control_template: str | None = None, seed: int = 0) -> dict[str, Any]:
        """Implicit control: the model reads a sentence after being told its target label; does ``a`` follow?

        Each query sentence is read twice, once under each target label, after the same examples
        (default instruction: the template's label line placed *before* the sentence). ``a`` is
        the axis projection of the query's tokens' mean residual stream in that context.
        Returns the mean ``a`` under each target, their difference and Cohen's d (positive when
        the model moves ``a`` toward the target).
        """
        axis, _, _ = self._need_fit()
        control_template = control_template or "Label: {label}\nSentence: "
        if "{label}" not in control_template:
            raise ValueError("control_template must contain {label}")
        a = {0: [], 1: []}
        for ctx, q in self._episodes(n_context, n_queries, seed):
            examples = self.prompt(ctx, "")
            examples = examples[: len(examples) - len(self.template[: self.template.index("{label}")].format(sentence=""))]
            sent = encode(self.tokenizer, self.sentences[q])
            for target in (0, 1):
                pre = encode(self.tokenizer, examples + control_template.format(label=self.label_names[target]))
                ids = as_ids(pre + sent, self.model)
                seen: list[Tensor] = []
                h = decoder_layers(self.model)[self.layer].register_forward_hook(
                    lambda m, args, out: seen.append((out if isinstance(out, Tensor) else out[0]).detach()))
                try:
                    self.model(input_ids=ids, use_cache=False)
                finally:
                    h.remove()
                a[target].append(float(seen[0][0, len(pre):].mean(0).double() @ axis))
        m0, m1 = (torch.tensor(a[c], dtype=torch.float64) for c in (0, 1))
        pooled = ((m0.var(unbiased=True) + m1.var(unbiased=True)) / 2).sqrt() if len(m0) > 1 else torch.tensor(float("nan"))
        diff = float(m1.mean() - m0.mean())
        return {"mean_a": {0: float(m0.mean()), 1: float(m1.mean())}, "difference": diff,
                "cohens_d": diff / float(pooled) if float(pooled) > 0 else float("nan"), "n": len(m0)}
