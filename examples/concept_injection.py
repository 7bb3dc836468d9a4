"""Concept injection (Lindsey et al., 2025) on a tiny byte-level LM trained with our Trainer.

    python examples/concept_injection.py --threads 2                       # trains ~1 min, then a few seconds of trials
    python examples/concept_injection.py --model runs/concept_injection/checkpoint   # reuse a checkpoint

This is the *harness* on a tiny Tiny-Shakespeare byte model: it shows what the injection does to the
model's next-token distribution and its greedy continuations, each trial paired with a no-injection
control. A model this small cannot introspect, and nothing here claims that it does.
See docs/analysis/concept_injection.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _tiny_lm import train_or_load  # examples/_tiny_lm.py (the script's own folder is on sys.path)

from mnemotorch.analysis import ConceptInjector, concept_vector, residual_stream, run_injection_trials
from mnemotorch.analysis.injection import default_layer

CONCEPTS = ["king", "love", "death", "blood"]
BASELINE = ["house", "bread", "water", "horse", "night", "sword", "heart", "crown", "friend", "voice",
            "hand", "field", "morning", "letter", "father", "mother", "honour", "gold", "fire", "stone"]
PROMPT = "Do you detect an injected thought? If so, what is it about?\n"


@torch.no_grad()
def word_logprob(model, tok, prompt_ids: list[int], word: str) -> float:
    """Mean log p of the bytes of `word` after the prompt (teacher-forced)."""
    w = tok.encode(word)
    ids = torch.tensor([prompt_ids + w])
    logp = model(input_ids=ids, use_cache=False).logits[0].float().log_softmax(-1)
    n = len(prompt_ids)
    return float(sum(logp[n - 1 + k, w[k]] for k in range(len(w))) / len(w))


@torch.no_grad()
def next_dist(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float().softmax(-1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint dir to reuse (default: train a tiny model)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alphas", type=float, nargs="+", default=[4.0, 8.0, 16.0])
    parser.add_argument("--run-dir", default="runs/concept_injection")
    parser.add_argument("--out", default="runs/concept_injection/concept_injection.json")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()
    model, tok, info = train_or_load(args)
    layer = default_layer(model)
    vectors = {w: concept_vector(model, tok, w, BASELINE, layer=layer) for w in CONCEPTS}

    prompt_ids = tok.encode(PROMPT)
    start = len(prompt_ids) - 1
    resid_norm = float(residual_stream(model, prompt_ids, layer)[0].norm(dim=-1).mean())
    base = next_dist(model, prompt_ids)
    shifts = []
    for w, v in vectors.items():
        control_lp = word_logprob(model, tok, prompt_ids, w)
        row = {"concept": w, "vector_norm": round(float(v.norm()), 3), "control_word_logprob": round(control_lp, 3), "by_alpha": []}
        for a in args.alphas:
            with ConceptInjector(model, layer, v, alpha=a, start=start):
                lp = word_logprob(model, tok, prompt_ids, w)
                p = next_dist(model, prompt_ids)
            # log-prob of the concept word under injection, vs the other concepts' vectors (a specificity control)
            others = []
            for w2, v2 in vectors.items():
                if w2 != w:
                    with ConceptInjector(model, layer, v2, alpha=a, start=start):
                        others.append(word_logprob(model, tok, prompt_ids, w))
            kl = float((base * (base.clamp_min(1e-12).log() - p.clamp_min(1e-12).log())).sum())
            top = p.argmax().item()
            row["by_alpha"].append({
                "alpha": a, "word_logprob": round(lp, 3), "delta_vs_control": round(lp - control_lp, 3),
                "delta_other_concepts_mean": round(sum(others) / len(others) - control_lp, 3),
                "kl_next_token_control_to_injected": round(kl, 4), "top_next_byte": tok.decode([top]),
                "top_next_byte_control": tok.decode([base.argmax().item()]),
            })
        shifts.append(row)

    trials = run_injection_trials(model, tok, vectors, PROMPT, layer=layer, alphas=args.alphas, max_new_tokens=40)
    result = {
        "note": "harness demo on a tiny byte-level LM; not a claim of introspection",
        "model": info, "layer": layer, "prompt": PROMPT, "start": start, "mean_residual_norm_at_layer": round(resid_norm, 3),
        "baseline_words": BASELINE, "logprob_shift": shifts, "rates": trials.rates(),
        "changed_continuations": sum(r["injected"] != r["control"] for r in trials.trials),
        "trials": trials.trials, "total_seconds": round(time.time() - t_start, 1),
    }
    print(json.dumps({k: result[k] for k in ("model", "layer", "rates", "changed_continuations", "total_seconds")}))
    for r in shifts:
        print(r["concept"], r["control_word_logprob"], [(d["alpha"], d["delta_vs_control"], d["delta_other_concepts_mean"], d["kl_next_token_control_to_injected"]) for d in r["by_alpha"]])
    for t in trials.trials:
        print(t["concept"], t["alpha"], repr(t["injected"][:40]), "| control:", repr(t["control"][:40]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
