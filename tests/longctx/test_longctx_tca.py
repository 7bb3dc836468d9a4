"""TCA-Attention (context-adaptive per-head budgets) on tiny random Hugging Face decoders."""

from __future__ import annotations

import pytest
import torch

from mnemotorch.longctx import (
    TCAAttention,
    TCABudgets,
    log_gaussian_configs,
    mask_heads,
    retain_counts,
    tca_attention,
    tca_attention_reference,
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_candidates_and_retain_counts():
    cands = log_gaussian_configs(8)
    assert torch.allclose(cands.sum(1), torch.ones(len(cands), dtype=torch.float64))
    ks = torch.tensor([1.0, 2, 4, 8], dtype=torch.float64)
    ratio = (cands * ks).sum(1) / 8
    assert bool((ratio[1:] >= ratio[:-1]).all()) and float(ratio[-1]) == 1.0  # sparsest first, dense last
    for cand in cands:
        for n in (0, 1, 7, 30):
            counts = retain_counts(cand, n, 8)
            assert len(counts) == n and counts == sorted(counts, reverse=True)  # important blocks keep most
            for j, k in enumerate([1, 2, 4, 8]):
                assert abs(counts.count(k) - float(cand[j]) * n) <= 1.0
    assert retain_counts(cands[-1], 5, 8) == [8] * 5
    with pytest.raises(ValueError, match="power of two"):
        log_gaussian_configs(6)


def test_vectorised_matches_loop_reference_fp64():
    g = torch.Generator().manual_seed(0)
    hq, hkv, t, c, d, b = 4, 2, 90, 37, 8, 8
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((hq, c, d), (hkv, t, d), (hkv, t, d)))
    cands = log_gaussian_configs(b)
    configs = torch.stack([cands[0], cands[5], cands[12], cands[-1]])
    budgets = TCABudgets(configs[None], b)
    for n_init, n_local in ((3, 10), (0, 1), (4, 100)):
        ref = tca_attention_reference(q, k, v, configs, n_init, n_local, b, 0.3)
        out = tca_attention(q[None], k[None], v[None], lambda n: budgets.allocation(0, n), n_init, n_local, b, 0.3)[0]
        assert rel(out, ref) <= 1e-12
    # Sparse budgets did change the result (the test would notice a no-op selection).
    dense = tca_attention_reference(q, k, v, cands[-1].expand(hq, -1), 3, 10, b, 0.3)
    assert rel(tca_attention_reference(q, k, v, configs, 3, 10, b, 0.3), dense) > 1e-3


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_full_budget_equals_plain_model_fp64(kind, tiny):
    model = tiny(kind)
    ids = torch.randint(0, 257, (2, 120), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits
    tca = TCAAttention(n_init=4, n_local=16, block=8, record=True)  # dense budgets, 120 >> 4 + 16
    with tca(model):
        out = model(ids).logits
    assert rel(out, ref) <= 1e-12
    assert max(e["n_blocks"] for e in tca.log) == (120 - 8 - 16 - 4) // 8  # the selection ran on middle blocks
    # Sparse budgets, but initial tokens + local window cover the whole sequence: nothing to select.
    sparse = TCABudgets.uniform(2, 4, 8, log_gaussian_configs(8)[0])
    with TCAAttention(sparse, n_init=4, n_local=120, block=8)(model):
        assert rel(model(ids).logits, ref) <= 1e-12
    with TCAAttention(sparse, n_init=4, n_local=16, block=8)(model):
        assert rel(model(ids).logits, ref) > 1e-4


def test_full_budget_generate_fp32(tiny):
    model = tiny("llama", dtype=torch.float32)
    ids = torch.randint(0, 257, (1, 90), generator=torch.Generator().manual_seed(2))
    ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    tca = TCAAttention(n_init=4, n_local=16, block=8, record=True)
    with tca(model):
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref)
    decode = [e for e in tca.log if e["layer"] == 0][-5:]
    assert [e["start"] for e in decode] == list(range(90, 95))  # 5 decode steps, one tile each and all(e["n_blocks"] > 0 for e in decode)


def test_calibration_and_budgets_respected(tiny):
    model = tiny("llama")
    t, b, n_init, n_local = 160, 8, 4, 16
    ids = torch.randint(0, 257, (1, t), generator=torch.Generator().manual_seed(3))
    tca = TCAAttention(n_init=n_init, n_local=n_local, block=b)
    with mask_heads(model, [(0, 1)]):  # head (0, 1) attends uniformly: its recovered mass is known exactly
        budgets = tca.calibrate(model, ids, threshold=0.8)
    assert budgets is tca.budgets and budgets.configs.shape == (2, 4, 4)
    assert bool((budgets.recovered >= 0.8 - 1e-12).all())
    # Independent check for the uniform head: queries at p = t-b .. t-1, middle blocks before t-b.
    n_blocks = (t - b - n_local - n_init) // b
    cands = log_gaussian_configs(b)

    def uniform_mass(cand):
        dropped = n_blocks * b - sum(retain_counts(cand, n_blocks, b))
        return sum((p + 1 - dropped) / (p + 1) for p in range(t - b, t)) / b

    first_ok = next(c for c in cands if uniform_mass(c) >= 0.8 - 1e-12)
    assert torch.equal(budgets.configs[0, 1], first_ok)
    assert abs(float(budgets.recovered[0, 1]) - uniform_mass(first_ok)) <= 1e-12
    # Threshold 0 -> the sparsest candidate everywhere; threshold 1 -> dense everywhere.
    assert bool((tca.calibrate(model, ids, threshold=0.0).configs == cands[0]).all())
    assert bool((tca.calibrate(model, ids, threshold=1.0).keep_ratio == 1.0).all())
    # Online: every head keeps exactly what its calibrated configuration allots.
    tca = TCAAttention(budgets, n_init=n_init, n_local=n_local, block=b, record=True)
    with tca(model):
        model(ids)
    checked = 0
    for e in tca.log:
        if e["n_blocks"]:
            for h in range(4):
                allotted = sum(retain_counts(budgets.configs[e["layer"], h], e["n_blocks"], b))
                assert int(e["kept"][0, h]) == allotted <= budgets.keep_ratio[e["layer"], h] * e["n_blocks"] * b + 4 * b
                checked += 1
    assert checked > 0


def test_hooks_removed_on_exit(tiny):
    model = tiny("llama", dtype=torch.float32)
    ids = torch.randint(0, 257, (1, 80), generator=torch.Generator().manual_seed(4))
    before, impl = model(ids).logits, model.config._attn_implementation
    sparse = TCABudgets.uniform(2, 4, 8, log_gaussian_configs(8)[0])
    with TCAAttention(sparse, n_init=4, n_local=16, block=8)(model):
        assert model.config._attn_implementation == "mnemo_tca"
        assert not torch.equal(model(ids).logits, before)
    assert model.config._attn_implementation == impl
    assert all("_mnemo_tca" not in layer.self_attn.__dict__ for layer in model.model.layers)
    assert torch.equal(model(ids).logits, before)
    with pytest.raises(RuntimeError, match="boom"):
        with TCAAttention(sparse, n_init=4, n_local=16, block=8)(model):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == impl and torch.equal(model(ids).logits, before)


def test_errors(tiny):
    import transformers

    with pytest.raises(ValueError, match="block"):
        TCAAttention(block=12)
    with pytest.raises(ValueError, match="n_local"):
        TCAAttention(n_local=0)
    with pytest.raises(ValueError, match="calibrated for block 8"):
        TCAAttention(TCABudgets.dense(2, 4, 8), block=16)
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"\(layers, heads\)"):
        with TCAAttention(TCABudgets.dense(3, 4, 8), block=8)(model):
            pass
    with pytest.raises(ValueError, match="too short"):
        TCAAttention(n_init=4, n_local=16, block=8).calibrate(model, torch.randint(0, 257, (1, 30)))
    with pytest.raises(ValueError, match="threshold"):
        TCAAttention(block=8).calibrate(model, torch.randint(0, 257, (1, 30)), threshold=1.5)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(ValueError, match="llama, mistral, qwen2, qwen3"):
        with TCAAttention(block=8)(gpt2):
            pass
