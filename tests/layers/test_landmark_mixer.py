"""The `landmark` mixer: exact mode vs the grouped-softmax reference, retrieval mode vs a per-query
retrieval reference (also streamed), the CPU block store, the data transform and bad input."""

from __future__ import annotations

import os

import pytest
import torch

from mnemotorch.layers import get_mixer
from mnemotorch.layers.landmark import LandmarkRetrievalState, LandmarkState, set_landmark_mode
from mnemotorch.ops.landmark import (
    check_landmarks,
    insert_landmarks,
    landmark_attention,
    landmark_grouped_attention_reference,
    landmark_labels,
    landmark_retrieval_reference,
    remove_landmarks,
    with_landmarks_length,
)
from mnemotorch.ops.rotary import apply_rotary, rotary_cos_sin

F64 = torch.float64


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make(seed=0, **kw):
    torch.manual_seed(seed)
    m = get_mixer("landmark", dim=32, num_heads=4, **kw).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))  # break symmetry beyond the init scale
    return m


def projected(m, x):
    """Queries, keys, values as the mixer builds them (RoPE at absolute positions)."""
    b, t, _ = x.shape
    q = m.q_proj(x).view(b, t, m.num_heads, m.head_dim)
    k = m.k_proj(x).view(b, t, m.num_kv_heads, m.head_dim)
    v = m.v_proj(x).view(b, t, m.num_kv_heads, m.head_dim)
    cos, sin = rotary_cos_sin(torch.arange(t), m.head_dim, m.rope_theta, dtype=x.dtype)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def run_pieces(m, x, sizes):
    state, outs = None, []
    for piece in x.split(sizes, dim=1):
        y, state = m(piece, state)
        outs.append(y)
    return torch.cat(outs, 1), state


def test_exact_mode_is_the_grouped_softmax() -> None:
    m = make(block_len=4, num_kv_heads=2)
    x = torch.randn(2, 31, 32, dtype=F64)
    y, state = m(x)
    q, k, v = projected(m, x)
    ref = m.o_proj(landmark_grouped_attention_reference(q, k, v, 4, form="grouped").reshape(2, 31, 32))
    assert rel(y, ref) <= 1e-12
    assert isinstance(state, LandmarkState) and state.k.shape == (2, 31, 2, 8)


@pytest.mark.parametrize("granularity", ["token", "block"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_retrieval_mode_matches_per_query_reference(granularity, top_k) -> None:
    m = make(1, block_len=3, num_kv_heads=2, mode="retrieval", top_k=top_k, granularity=granularity)
    x = torch.randn(2, 29, 32, dtype=F64)
    q, k, v = projected(m, x)
    ref = landmark_retrieval_reference(q, k, v, 3, top_k, granularity, allow_fewer=True)
    ref = m.o_proj(ref.reshape(2, 29, 32))
    full, state = m(x)
    assert rel(full, ref) <= 1e-12
    # streamed in uneven pieces and one token at a time: the same outputs (the selection is causal)
    for sizes in ([5, 1, 9, 14], [1] * 29) if top_k == 2 else ([5, 1, 9, 14],):
        streamed, s2 = run_pieces(m, x, sizes)
        assert rel(streamed, ref) <= 1e-12
    assert isinstance(state, LandmarkRetrievalState)
    assert state.store_k.shape == (2, 7, 4, 2, 8) and state.landmark_k.shape == (2, 7, 2, 8) and state.cur_k.shape[1] == 1
    assert m.state_size(29) == sum(t[0].numel() for t in state.tensors().values())


def test_retrieval_selection_matters_and_all_blocks_give_exact() -> None:
    x = torch.randn(1, 33, 32, dtype=F64)
    exact, _ = make(2, block_len=3)(x)
    everything, _ = make(2, block_len=3, mode="retrieval", top_k=8)(x)  # 8 = all earlier blocks
    assert rel(everything, exact) <= 1e-12
    one, _ = make(2, block_len=3, mode="retrieval", top_k=1)(x)
    assert rel(one, exact) > 1e-3  # dropping blocks changes the late outputs
    assert rel(one[:, :8], exact[:, :8]) <= 1e-12  # queries with <= 1 earlier block are untouched


def test_store_on_the_offload_device_and_mode_switch() -> None:
    m = make(3, block_len=3)
    x = torch.randn(1, 20, 32, dtype=F64)
    _, exact_state = m(x)
    model = torch.nn.Sequential(m)
    assert set_landmark_mode(model, "retrieval", top_k=2, granularity="block") == 1
    with pytest.raises(TypeError, match="LandmarkRetrievalState"):
        m(x, exact_state)
    _, state = m(x)
    assert state.store_k.device == torch.device("cpu") and state.selected.shape == (1, 4, 2)
    assert m.state_size(20) == sum(t[0].numel() for t in state.tensors().values())
    with pytest.raises(ValueError, match="mode"):
        m.set_mode("sparse")
    with pytest.raises(ValueError, match="top_k"):
        m.set_mode("retrieval", top_k=0)
    with pytest.raises(ValueError, match="granularity"):
        m.set_mode("retrieval", granularity="chunk")
    with pytest.raises(ValueError, match="block_len"):
        get_mixer("landmark", dim=32, num_heads=4, block_len=0)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")
def test_landmark_attention_kernel_path_fp32() -> None:
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 23, 2, 16, generator=g, dtype=F64) for _ in range(3))
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    out = landmark_attention(*leaves, block_len=4, backend="triton")
    go = torch.randn(out.shape, generator=g, dtype=F64)
    grads = torch.autograd.grad(out, leaves, go.float())
    hi = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = landmark_grouped_attention_reference(*hi, block_len=4)
    rgrads = torch.autograd.grad(ref, hi, go)
    assert rel(out, ref) <= 1e-5
    for name, a, r in zip("qkv", grads, rgrads):
        assert rel(a, r) <= 1e-5, name


def test_data_transform_and_clear_errors() -> None:
    ids = torch.arange(1, 11).reshape(1, 10)
    with_lm = insert_landmarks(ids, 3, landmark_id=0)
    assert with_lm.tolist() == [[1, 2, 3, 0, 4, 5, 6, 0, 7, 8, 9, 0, 10]]
    assert with_lm.shape[-1] == with_landmarks_length(10, 3)
    check_landmarks(with_lm, 3, 0)  # the layout is right: no error
    labels = landmark_labels(with_lm, 3, 0)
    assert (labels[0, [3, 7, 11]] == -100).all() and labels[0, 0] == 1
    assert remove_landmarks(with_lm, 3, dim=1).tolist() == ids.tolist()
    with pytest.raises(ValueError, match="missing landmark token at position 3"):
        check_landmarks(ids, 3, 0)
    broken = with_lm.clone()
    broken[0, 1] = 0
    with pytest.raises(ValueError, match="position 1, which is not a landmark position"):
        check_landmarks(broken, 3, 0)
    with pytest.raises(ValueError, match="block_len"):
        insert_landmarks(ids, 0, 0)
    with pytest.raises(TypeError, match="integer"):
        insert_landmarks(ids.float(), 3, 0)
    q = torch.randn(1, 13, 2, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"top_k \(4\) is larger than the number of blocks with a landmark \(3\)"):
        landmark_retrieval_reference(q, q, q, 3, top_k=4)
    with pytest.raises(ValueError, match="Tq == Tk"):
        landmark_retrieval_reference(q[:, 5:], q, q, 3, top_k=2, granularity="block")


def test_model_generates_in_retrieval_mode() -> None:
    from mnemotorch import MnemoConfig, MnemoForCausalLM

    torch.manual_seed(0)
    config = MnemoConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         layer_plan=[{"type": "landmark", "block_len": 3}, "attention"])
    model = MnemoForCausalLM(config).eval()
    set_landmark_mode(model, "retrieval", top_k=1)
    prompt = torch.randint(0, 40, (1, 9))
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    ids = prompt
    for _ in range(6):  # greedy decoding by repeated full passes
        ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert out.tolist() == ids.tolist()
