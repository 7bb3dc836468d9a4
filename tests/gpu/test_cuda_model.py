"""CUDA checks of the foundation (run on the lent GPU by scripts/gpu_check.sh; skipped on CPU)."""

from __future__ import annotations

import pytest
import torch

from mnemotorch.layers import get_mixer, list_mixers, mixer_class
from mnemotorch.models import MnemoConfig, MnemoForCausalLM

pytestmark = pytest.mark.gpu


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("name", list_mixers())
def test_cuda_matches_cpu_float64(name):
    torch.manual_seed(0)
    m = get_mixer(name, dim=64, num_heads=4, **mixer_class(name).example_kwargs).double()
    x = torch.randn(2, 50, 64, dtype=torch.float64)
    ref, _ = m(x)
    out, _ = m.float().cuda()(x.float().cuda())
    assert rel(out.cpu(), ref) <= 1e-5


@pytest.mark.parametrize("name", list_mixers())
def test_cuda_streaming_fp32(name):
    torch.manual_seed(0)
    m = get_mixer(name, dim=64, num_heads=4, **mixer_class(name).example_kwargs).cuda()
    x = torch.randn(2, 40, 64, device="cuda")
    full, _ = m(x)
    state, outs = None, []
    for piece in torch.split(x, [1, 13, 2, 24], dim=1):
        y, state = m(piece, state)
        outs.append(y)
    assert rel(torch.cat(outs, 1), full) <= 1e-5


def test_bf16_autocast_forward_backward_and_generate():
    torch.manual_seed(0)
    cfg = MnemoConfig(vocab_size=97, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      layer_plan=[{"type": "sliding_window", "window": 16}, "attention"])
    model = MnemoForCausalLM(cfg).cuda()
    ids = torch.randint(0, 97, (4, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    prompt = ids[:, :8]
    gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False, pad_token_id=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(16):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(gen, seq)
