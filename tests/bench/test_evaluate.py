"""``mnemo eval TASK MODEL``: books (sliding window / whole-document streaming), passkey, SORT, MQAR,
the old ``mnemo eval CHECKPOINT`` form, Hugging Face models given as ``hf:PATH``, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mnemotorch.bench.evaluate import (
    EvalModel,
    evaluate_books,
    evaluate_mqar,
    evaluate_passkey,
    evaluate_sort_task,
    load_eval_model,
    sliding_window_nll,
    sliding_window_windows,
    streaming_nll,
)
from mnemotorch.cli import main
from mnemotorch.models import MnemoConfig, MnemoForCausalLM
from mnemotorch.tasks import BPETokenizer, ByteTokenizer, load_text

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and immune to oversubscription
    yield
    torch.set_num_threads(threads)


def _tiny_mnemo(seed: int = 0) -> MnemoForCausalLM:
    torch.manual_seed(seed)
    config = MnemoConfig(vocab_size=257, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         layer_plan=[{"type": "sliding_window", "window": 16}, "attention"])
    return MnemoForCausalLM(config).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints in our layout (a random model; a constant-answer one), a tiny HF Llama, texts."""
    root = tmp_path_factory.mktemp("eval")
    text = load_text()
    ck = root / "ck"
    _tiny_mnemo().save_pretrained(ck)
    ByteTokenizer().save(ck)
    # Final norm weight 0 -> every logit is 0 -> " A" and " B" tie -> always "A".
    const = _tiny_mnemo(1)
    with torch.no_grad():
        const.model.norm.weight.zero_()
    const.save_pretrained(root / "const")
    ByteTokenizer().save(root / "const")

    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = BPETokenizer.train(text[:100_000], vocab_size=320)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=bpe.hf_tokenizer, bos_token=bpe.EOS_TOKEN, eos_token=bpe.EOS_TOKEN)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=bpe.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                                         bos_token_id=bpe.eos_id, eos_token_id=bpe.eos_id))
    llama.save_pretrained(root / "llama")
    hf_tok.save_pretrained(root / "llama")

    book = root / "book.txt"
    book.write_text(text[:6000])
    books = root / "books"
    books.mkdir()
    (books / "a.txt").write_text(text[10_000:12_000])
    (books / "b.txt").write_text(text[20_000:21_500])
    return {"root": root, "ck": ck, "const": root / "const", "llama": root / "llama", "book": book, "books": books}


# ---------------------------------------------------------------------------------------------
# perplexity


def test_windows_score_every_target_once_with_bounded_context():
    for n, c, s in [(2, 4, 2), (50, 8, 8), (50, 8, 3), (51, 8, 1), (9, 8, 8), (100, 16, 5)]:
        seen = []
        for start, first, last in sliding_window_windows(n, c, s):
            assert start < first <= last <= n - 1
            assert last - start <= c  # target t has t - start <= C tokens of context
            seen += range(first, last + 1)
        assert seen == list(range(1, n))


def test_sliding_window_with_stride_equal_to_context_is_plain_chunked_eval():
    from mnemotorch.train import evaluate

    model = _tiny_mnemo()
    tokens = torch.randint(0, 257, (5 * 32 + 1,), generator=torch.Generator().manual_seed(0))
    ours = sliding_window_nll(model, tokens, context=32, stride=32, batch_size=3)
    ref = evaluate(model, tokens, batch_size=4, seq_len=32)
    assert ours["tokens"] == ref["tokens"] == 5 * 32
    assert abs(ours["loss"] - ref["loss"]) <= 1e-5
    # Smaller strides give more context per token and still score each token once.
    half = sliding_window_nll(model, tokens, context=32, stride=8)
    assert half["tokens"] == tokens.numel() - 1 and math.isfinite(half["loss"])


def _full_forward_loss(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=tokens[None], use_cache=False).logits[0]
    return float(F.cross_entropy(logits[:-1].float(), tokens[1:]))


def test_whole_document_streaming_equals_one_forward(files):
    em = load_eval_model(files["ck"], "cpu")
    tokens = torch.tensor(em.encode(files["book"].read_text()[:300]))
    full = _full_forward_loss(em.model, tokens)
    for chunk in (1, 7, 64, 1000):
        res = streaming_nll(em, tokens, chunk=chunk)
        assert res["tokens"] == tokens.numel() - 1
        assert abs(res["loss"] - full) <= 1e-5, chunk
    # With a context covering the whole text, the sliding window is the full forward too.
    assert abs(sliding_window_nll(em, tokens, context=400)["loss"] - full) <= 1e-5


def test_books_cli_both_modes(files, tmp_path, capsys):
    out = tmp_path / "books.json"
    argv = ["eval", "books", str(files["ck"]), "--data", str(files["books"]), "--data", str(files["book"]),
            "--mode", "both", "--context", "64", "--stride", "32", "--chunk", "50", "--json-out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "bits/byte" in text and "a.txt" in text and "sliding" in text and "stream" in text
    report = json.loads(out.read_text())
    assert report["task"] == "books" and report["model_kind"] == "mnemo"
    rows = report["rows"]
    assert [r["document"] for r in rows] == ["a.txt", "a.txt", "b.txt", "b.txt", "book.txt", "book.txt", "all", "all"]
    for r in rows:
        # Byte tokenizer + an opening EOS token: every byte is a scored token.
        assert r["tokens"] == r["bytes"]
        assert r["bpb"] == pytest.approx(r["loss"] / math.log(2))
        assert r["ppl"] == pytest.approx(math.exp(r["loss"]))
    total = sum(r["tokens"] for r in rows if r["mode"] == "sliding" and r["document"] != "all")
    assert rows[-2]["tokens"] == total
    # --tokens scores exactly that many tokens per document; --no-bos skips the first one.
    assert main(["eval", "books", str(files["ck"]), "--data", str(files["book"]), "--tokens", "100", "--no-bos",
                 "--context", "32", "--json-out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["tokens"] == 99 and row["bytes"] == 100


# ---------------------------------------------------------------------------------------------
# passkey, SORT, MQAR


def test_passkey_cli_writes_table_json_and_heatmap(files, tmp_path, capsys):
    out = tmp_path / "pk" / "passkey.json"
    argv = ["eval", "passkey", str(files["ck"]), "--lengths", "128,160", "--depths", "0,0.5,1", "--trials", "2",
            "--no-instruction", "--json-out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "length \\ depth" in text and "0.5" in text and "mean" in text
    report = json.loads(out.read_text())
    assert report["lengths"] == [128, 160] and report["depths"] == [0.0, 0.5, 1.0]
    assert len(report["rows"]) == 6 and all(r["trials"] == 2 and 0 <= r["accuracy"] <= 1 for r in report["rows"])
    assert report["examples"] and all(len(e["answer"]) == 5 for e in report["examples"])
    png = out.with_suffix(".png")
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def test_passkey_counts_a_right_greedy_answer():
    """A model that copies the 5 digits after "The pass key is" scores 100%."""
    from mnemotorch.tasks.synthetic import make_needle_examples

    tok = ByteTokenizer()

    class Oracle(torch.nn.Module):
        """Predicts the next byte of the needle's value (read back from the prompt) after 'is'."""

        config = type("C", (), {"vocab_size": 257})()

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, input_ids, cache=None, use_cache=False, logits_to_keep=0):
            seq = input_ids if cache is None else torch.cat([cache, input_ids], dim=1)
            logits = torch.full((*seq.shape, 257), -1e9)
            for b in range(seq.shape[0]):
                text = tok.decode(seq[b].tolist())
                value = text.split("The pass key is ")[1][:5]
                answer = " " + value
                done = text.rsplit("The pass key is", 1)[1]
                nxt = answer[len(done)] if len(done) < len(answer) else " "
                logits[b, -1, ord(nxt)] = 0.0
            out = logits[:, -logits_to_keep:] if logits_to_keep else logits
            return type("O", (), {"logits": out, "cache": seq if use_cache else None})()

    em = EvalModel(Oracle(), tok, "hf", "oracle", _cache_kw="cache")
    res = evaluate_passkey(em, [140], [0.0, 1.0], trials=3, instruction=False)
    assert res["grid"] == [[1.0, 1.0]]
    ex = make_needle_examples(tok, 1, 140, 0.5, instruction=False)[0]
    assert ex.answer.strip().isdigit()


def test_sort_constant_answer_scores_exactly_half(files, capsys):
    em = load_eval_model(files["const"], "cpu")
    texts = [("shakespeare", load_text()[:60_000])]
    res = evaluate_sort_task(em, texts=texts, num_examples=6, excerpt_words=60, segment_words=8, chunk=32)
    assert [r["condition"] for r in res["rows"]] == ["in_context", "stream"]
    for r in res["rows"]:
        assert r["accuracy"] == 0.5 and r["chance"] == 0.5 and r["num_examples"] == 6
    # The same through the CLI with configs/sort.yaml (command-line options override the file).
    argv = ["eval", "sort", str(files["const"]), "--config", str(REPO / "configs" / "sort.yaml"), "--data", str(files["book"]),
            "--num-examples", "4", "--excerpt-words", "60", "--segment-words", "8", "--chunk", "64"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "in_context" in out and "stream" in out and "chance" in out
    # A random model still scores a valid accuracy.
    rand = evaluate_sort_task(load_eval_model(files["ck"], "cpu"), texts=texts, num_examples=4, excerpt_words=60,
                              segment_words=8, conditions=["in_context"])
    assert 0.0 <= rand["rows"][0]["accuracy"] <= 1.0


def test_mqar_eval(files, tmp_path, capsys):
    em = load_eval_model(files["ck"], "cpu", need_tokenizer=False)
    res = evaluate_mqar(em, [(32, 2), (64, 4)], num_examples=16, batch_size=5)
    assert [r["seq_len"] for r in res["rows"]] == [32, 64]
    for r in res["rows"]:
        assert r["vocab_size"] == 257 and 0 <= r["token_accuracy"] <= 1 and 0 <= r["sequence_accuracy"] <= r["token_accuracy"] + 1e-9
        assert r["state_size"] == em.model.state_size(r["seq_len"])
    out = tmp_path / "mqar.json"
    assert main(["eval", "mqar", str(files["ck"]), "--settings", "32:2", "--num-examples", "8", "--json-out", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][0]["num_kv_pairs"] == 2
    assert "token acc" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Hugging Face models, the old form, bad input


def test_hf_model_from_a_local_path(files, tmp_path, capsys):
    em = load_eval_model(f"hf:{files['llama']}", "cpu")
    assert em.kind == "hf" and em.start_id is not None
    tokens = torch.tensor(em.encode(files["book"].read_text()[:400]))
    full = _full_forward_loss(em.model, tokens)
    assert abs(streaming_nll(em, tokens, chunk=13)["loss"] - full) <= 1e-5  # chunked with its KV cache
    res = evaluate_books(em, texts=[("t", files["book"].read_text()[:1500])], mode="both", context=64, stride=32)
    assert {r["mode"] for r in res["rows"]} == {"sliding", "stream"}
    out = tmp_path / "hf.json"
    assert main(["eval", "passkey", f"hf:{files['llama']}", "--lengths", "160", "--depths", "0.5", "--trials", "2",
                 "--no-instruction", "--json-out", str(out)]) == 0
    assert json.loads(out.read_text())["model_kind"] == "hf"
    assert main(["eval", "sort", f"hf:{files['llama']}", "--data", str(files["book"]), "--num-examples", "2",
                 "--excerpt-words", "50", "--segment-words", "6", "--conditions", "in_context,stream"]) == 0
    assert "stream" in capsys.readouterr().out


def test_eval_with_a_training_free_memory(files, tmp_path, capsys):
    """``--memory`` wraps the evaluation in mnemotorch.longctx; with the local window covering the
    whole prompt (n_local >= length) the memory changes nothing, so the results equal the plain run."""
    common = ["eval", "passkey", f"hf:{files['llama']}", "--lengths", "160", "--depths", "0,1", "--trials", "2", "--no-instruction"]
    plain, mem = tmp_path / "plain.json", tmp_path / "mem.json"
    assert main(common + ["--json-out", str(plain)]) == 0
    assert main(common + ["--memory", "infllm", "--memory-arg", "n_local=256", "--memory-arg", "n_init=4",
                          "--json-out", str(mem)]) == 0
    a, b = json.loads(plain.read_text()), json.loads(mem.read_text())
    assert a["memory"] is None and b["memory"]["name"] == "InfLLM" and b["memory"]["n_local"] == 256
    assert a["grid"] == b["grid"] and a["examples"] == b["examples"]  # the decoded answers too
    assert main(["eval", "passkey", str(files["ck"]), "--memory", "em-llm", "--lengths", "160"]) == 2
    assert "Hugging Face decoders" in capsys.readouterr().err
    assert main(common + ["--memory", "infllm", "--memory-arg", "n_local"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_old_form_still_works(files, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    assert main(["eval", str(files["ck"]), "--batches", "2", "--seq-len", "32", "--json", "--json-out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-2])  # the last line says "wrote ..."
    assert printed["tokens"] == 2 * 8 * 32 and printed["seq_len"] == 32
    assert json.loads(out.read_text())["task"] == "ppl"
    assert main(["eval", "ppl", str(files["ck"]), "--batches", "1", "--seq-len", "16"]) == 0
    assert "ppl" in capsys.readouterr().out


@pytest.mark.parametrize("argv_fn,message", [
    (lambda f: ["eval", "books", str(f["root"] / "missing")], "does not exist"),
    (lambda f: ["eval", str(f["root"] / "missing")], "does not exist"),
    (lambda f: ["eval", "passkey", "hf:some-org/some-model"], "downloads nothing"),
    (lambda f: ["eval", "books", "hf:" + str(f["root"] / "nope")], "local"),
    (lambda f: ["eval", "books", str(f["ck"]), "--data", str(f["book"]), "--tokens", "100000"], "fewer than the 100000 requested"),
    (lambda f: ["eval", "books", str(f["ck"]), "--data", str(f["root"] / "nothing.txt")], "no such file"),
    (lambda f: ["eval", "books", str(f["ck"]), "--data", str(f["book"]), "--context", "8", "--stride", "16"], "stride"),
    (lambda f: ["eval", "passkey", str(f["ck"]), "--lengths", "20"], "shorter than"),
    (lambda f: ["eval", "passkey", str(f["ck"]), "--depths", "1.5", "--lengths", "200", "--no-instruction"], "depth"),
    (lambda f: ["eval", "sort", str(f["ck"]), "--data", str(f["book"]), "--excerpt-words", "5000"], "fewer than excerpt_words"),
    (lambda f: ["eval", "sort", str(f["ck"]), "--data", str(f["book"]), "--num-examples", "3"], "even"),
    (lambda f: ["eval", "mqar", str(f["ck"]), "--settings", "64:20"], "4 * num_kv_pairs"),
    (lambda f: ["eval", "mqar", str(f["ck"]), "--vocab-size", "1000"], "exceeds the model's vocabulary"),
    (lambda f: ["eval", "books"], "needs a MODEL"),
    (lambda f: ["eval", "bogus", str(f["ck"])], "unknown task"),
    (lambda f: ["eval", "books", str(f["ck"]), "--config", str(REPO / "configs" / "lm_books.yaml")], "unknown key"),
])
def test_bad_input_exits_2_with_a_message(files, capsys, argv_fn, message):
    assert main(argv_fn(files)) == 2
    err = capsys.readouterr().err
    assert err.startswith("mnemo eval: error:") and message in err


def test_configs_load():
    from mnemotorch.train import load_config

    cfg = load_config(REPO / "configs" / "lm_books.yaml")
    assert cfg.data.tokenizer == "bpe" and cfg.data.source.endswith("gutenberg") and cfg.data.seq_len == 512
    import yaml

    sort_cfg = yaml.safe_load((REPO / "configs" / "sort.yaml").read_text())
    assert sort_cfg["task"] == "sort" and sort_cfg["num_examples"] % 2 == 0


def test_held_out_book_is_not_in_the_lm_books_training_split():
    from mnemotorch.bench.evaluate import HELD_OUT_BOOKS, default_book_sources, find_shared_data
    from mnemotorch.tasks import split_text
    from mnemotorch.train import load_config

    root = find_shared_data()
    if root is None or not (root / "gutenberg").is_dir():
        pytest.skip("../shared/data/gutenberg is not here")
    cfg = load_config(REPO / "configs" / "lm_books.yaml")
    train, _ = split_text(load_text(root / "gutenberg"), cfg.data.val_fraction)
    for rel in HELD_OUT_BOOKS:
        book = (root / rel).read_text()
        assert book[:2000] not in train and book[-2000:] not in train
    assert [p.name for p in default_book_sources()][: len(HELD_OUT_BOOKS)] == [Path(r).name for r in HELD_OUT_BOOKS]
