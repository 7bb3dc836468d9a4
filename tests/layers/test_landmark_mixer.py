"""The `landmark` mixer: exact mode vs the grouped-softmax reference, retrieval mode vs a per-query
retrieval reference (also streamed, chunked and through the staging fetch), the CPU block store
(linear growth, states stay values), the data transform and bad input."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from mnemotorch.layers import get_mixer
from mnemotorch.layers.landmark import LandmarkRetrievalState, LandmarkState, set_landmark_mode
from mnemotorch.ops.landmark import retrieval
from mnemotorch.ops.landmark.retrieval import BlockStore
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


@pytest.mark.parametrize("path", ["direct", "staged", "chunked"])
@pytest.mark.parametrize("granularity", ["token", "block"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_retrieval_mode_matches_per_query_reference(granularity, top_k, path, monkeypatch) -> None:
    # "staged": fetches go through the unique gather + staging buffer used across devices;
    # "chunked": inputs are processed internally in chunks of 4 positions.
    monkeypatch.setattr(retrieval, "_STAGE_SAME_DEVICE", path == "staged")
    chunk = 4 if path == "chunked" else None
    m = make(1, block_len=3, num_kv_heads=2, mode="retrieval", top_k=top_k, granularity=granularity, prefill_chunk=chunk)
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


@pytest.mark.parametrize("granularity", ["token", "block"])
def test_chunked_prefill_equals_one_pass_and_feeding_the_chunks(granularity) -> None:
    m = make(5, block_len=3, num_kv_heads=2, mode="retrieval", top_k=2, granularity=granularity, prefill_chunk=None)
    x = torch.randn(2, 61, 32, dtype=F64)
    with torch.no_grad():
        whole, s_whole = m(x)
        m.prefill_chunk = 7
        chunked, s_chunked = m(x)
        fed, s_fed = run_pieces(m, x, [7] * 8 + [5])
        # a state carried in: chunks count from the call's first position
        _, s_head = m(x[:, :10])
        tail, _ = m(x[:, 10:], s_head)
        tail_fed, _ = run_pieces(m, x, [10] + [7] * 7 + [2])
    assert torch.equal(chunked, fed)  # exactly what feeding the chunks one by one gives
    assert torch.equal(tail, tail_fed[:, 10:])
    assert rel(chunked, whole) <= 1e-12
    for name, t in s_chunked.tensors().items():
        assert torch.equal(t, s_fed.tensors()[name]), name
        assert rel(t, s_whole.tensors()[name]) <= 1e-12 if t.is_floating_point() else torch.equal(t, s_whole.tensors()[name])
    # the store was sized once for the whole call: no growth steps during a long prefill
    assert s_chunked.kv_store.allocations == 1 and s_chunked.kv_store.capacity == 61 // 4
    with pytest.raises(ValueError, match="prefill_chunk"):
        get_mixer("landmark", dim=32, num_heads=4, prefill_chunk=0)


def test_store_growth_is_linear_and_states_stay_values() -> None:
    # block_len=1: a block completes every 2 tokens; fed one token at a time, that is 150 appends
    m = make(4, block_len=1, num_kv_heads=2, mode="retrieval", top_k=2)
    x = torch.randn(2, 301, 32, dtype=F64)
    states = []
    with torch.no_grad():
        state = None
        for piece in x.split(1, dim=1):
            _, state = m(piece, state)
            states.append(state)
    n = 150
    assert state.store_k.shape[1] == n and state.landmark_k.shape[1] == n
    for store in (state.kv_store, state.landmark_store):
        # doubling: log2(n) growth steps, fewer than 2n blocks copied in all (a cat per block: n^2 / 2)
        assert store.allocations <= math.ceil(math.log2(n)) + 2, store.allocations
        assert store.blocks_copied < 2 * n, store.blocks_copied
    # earlier states are values: their views still show their blocks, unchanged by later appends
    early = states[40]  # 41 tokens: 20 complete blocks
    assert early.store_k.shape[1] == 20 and torch.equal(early.store_k, state.store_k[:, :20])
    assert torch.equal(early.landmark_k, state.landmark_k[:, :20])
    # continuing an earlier state (a branch) copies its store instead of overwriting later blocks
    snapshot = [t.clone() for t in state.tensors().values()]
    other = torch.randn(2, 30, 32, dtype=F64)
    with torch.no_grad():
        branched, b_state = m(other, early)
        fresh, _ = m(torch.cat([x[:, :41], other], dim=1))
    assert rel(branched, fresh[:, 41:]) <= 1e-12
    assert b_state.kv_store is not state.kv_store
    assert all(torch.equal(a, b) for a, b in zip(snapshot, state.tensors().values()))


def test_block_store_appends_in_place_and_doubles() -> None:
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 1000, 4, 2, 3, generator=g, dtype=F64)  # [B, nb, l + 1, Hkv, D]
    store = BlockStore.from_views((k[:, :0],))
    for i in range(1000):
        assert store.can_append(store.views())
        store.append((k[:, i : i + 1],))
    assert torch.equal(store.views()[0], k)
    assert store.allocations == 12 and store.capacity == 1024  # 0, 1, 2, 4, ..., 1024
    assert store.blocks_copied == 1023  # 1 + 2 + ... + 512: amortised one copy per block
    # a view that is not the newest state's may not append; a replaced tensor is not held
    assert store.holds(store.views(10)) and not store.can_append(store.views(10))
    assert not store.holds((store.views()[0].clone(),))


@pytest.mark.parametrize("staged", [False, True])
def test_block_store_fetch(staged, monkeypatch) -> None:
    monkeypatch.setattr(retrieval, "_STAGE_SAME_DEVICE", staged)
    g = torch.Generator().manual_seed(1)
    k = torch.randn(2, 9, 4, 2, 3, generator=g, dtype=F64)
    v = torch.randn(2, 9, 4, 2, 3, generator=g, dtype=F64)
    store = BlockStore.from_views((k, v), capacity=16)
    blocks = torch.randint(0, 9, (2, 4, 5), generator=g)  # 4 query heads on 2 KV heads
    blocks[:, :, 1] = blocks[:, :, 0]  # a block twice in one head
    blocks[:, 1] = blocks[:, 0]  # heads 0 and 1 share KV head 0 and pick the same blocks
    fk, fv = store.fetch(blocks, rep=2, device="cpu")
    bi, hi = torch.arange(2)[:, None, None], (torch.arange(4) // 2)[None, :, None]
    assert torch.equal(fk, k[bi, blocks, :, hi]) and torch.equal(fv, v[bi, blocks, :, hi])
    distinct = len({(b, h // 2, int(blocks[b, h, u])) for b in range(2) for h in range(4) for u in range(5)})
    assert store.rows_fetched == (distinct if staged else blocks.numel())  # staged: each block once
    fk2, _ = store.fetch(blocks.flip(-1), rep=2, device="cpu")  # the staging buffer is reused
    assert torch.equal(fk2, k[bi, blocks.flip(-1), :, hi])


def test_pinned_allocation_falls_back_without_cuda() -> None:
    t = retrieval._empty((3, 4), torch.float32, "cpu", pin=True)
    assert t.shape == (3, 4) and t.device.type == "cpu"
    assert t.is_pinned() == torch.cuda.is_available()


def test_reordered_and_copied_states_continue_correctly() -> None:
    m = make(7, block_len=3, num_kv_heads=2, mode="retrieval", top_k=1)
    x = torch.randn(3, 40, 32, dtype=F64)
    order = torch.tensor([2, 0, 0])
    with torch.no_grad():
        full, _ = m(x)
        full_reordered, _ = m(x[order])
        _, state = m(x[:, :25])
        twin = copy.deepcopy(state)
        state.index_select_batch(order)  # beam search: the views become new tensors
        y, _ = m(x[order, 25:], state)
        y_twin, _ = m(x[:, 25:], twin)
    assert rel(y, full_reordered[:, 25:]) <= 1e-12
    assert rel(y_twin, full[:, 25:]) <= 1e-12


def test_state_from_inference_mode_continues_outside_it() -> None:
    m = make(9, block_len=3, mode="retrieval", top_k=2)
    x = torch.randn(1, 60, 32, dtype=F64)
    with torch.no_grad():
        full, _ = m(x)
        _, state = m(x[:, :2])
    with torch.inference_mode():  # the store grows under inference mode and keeps spare capacity
        for piece in x[:, 2:30].split(1, dim=1):
            _, state = m(piece, state)
    assert state.kv_store.capacity > state.store_k.shape[1] and state.kv_store.buffers[0].is_inference()
    with torch.no_grad():
        y1, state = m(x[:, 30:32], state)  # completes a block that fits the spare capacity:
        y2, _ = m(x[:, 32:], state)  # no in-place write into an inference tensor, a copy first
    assert rel(torch.cat([y1, y2], 1), full[:, 30:]) <= 1e-12


def test_retrieval_mode_gradients_match_the_reference() -> None:
    m = make(6, block_len=3, num_kv_heads=2, mode="retrieval", top_k=2, prefill_chunk=5)
    x = torch.randn(1, 23, 32, dtype=F64, requires_grad=True)
    q, k, v = projected(m, x)
    ref = m.o_proj(landmark_retrieval_reference(q, k, v, 3, 2, "token", allow_fewer=True).reshape(1, 23, 32))
    w = torch.randn_like(ref)
    leaves = [x, *m.parameters()]
    ref_grads = torch.autograd.grad((ref * w).sum(), leaves)
    for sizes in ([23], [9, 1, 13]):
        y, _ = run_pieces(m, x, sizes)
        assert rel(y, ref) <= 1e-12
        for a, r in zip(torch.autograd.grad((y * w).sum(), leaves), ref_grads):
            assert rel(a, r) <= 1e-10


@pytest.mark.gpu
def test_retrieval_on_cuda_keeps_a_pinned_store() -> None:
    m = make(8, block_len=5, num_kv_heads=2, mode="retrieval", top_k=2)
    x = torch.randn(2, 97, 32, dtype=F64)
    with torch.no_grad():
        ref, _ = m(x)
        mc = copy.deepcopy(m).cuda()
        mc.prefill_chunk = 16
        y, state = run_pieces(mc, x.cuda(), [40, 1, 56])
    assert state.store_k.device.type == "cpu" and state.landmark_k.device.type == "cuda"
    assert state.kv_store.buffers[0].is_pinned()
    assert rel(y.cpu(), ref) <= 1e-12


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
