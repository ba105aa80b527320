"""`fastchat-ft analyze`: every number recomputed independently in Python from the loader's per-conversation
encoding (encode_chat) on fresh random data: counts, roles, token totals, nearest-rank percentiles, the
tokens one epoch reads and the packing estimate (equal to the loader's own ChatDataset under both overlong
policies), steps per epoch, the budget verdict, the diversity
inputs (distinct bigrams vs an exact count), and the PNG/JSON outputs."""
from __future__ import annotations

import json
import math
import random
import re

import numpy as np
import pytest

from fastchat_ft import _native
from fastchat_ft.cli import main
from fastchat_ft.data.analyze import analyze_file, format_report
from conftest import shared_path

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu river stone cloud maple ember").split()


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def make_records(rng, n):
    recs = []
    for _ in range(n):
        msgs = [{"role": "system", "content": sentence(rng, 5)}] if rng.random() < 0.4 else []
        for _ in range(rng.choice((1, 1, 2, 3))):
            msgs.append({"role": "user", "content": sentence(rng, rng.randint(3, 40))})
            msgs.append({"role": "assistant", "content": sentence(rng, rng.randint(3, 120))})
        recs.append({"messages": msgs})
    return recs


@pytest.fixture(scope="module")
def tok():
    from fastchat_ft.data.tokenize import LoaderTokenizer
    return LoaderTokenizer.from_any(shared_path("tokenizers", "smollm2"))


@pytest.mark.parametrize("seed,overlong", [(5, "drop"), (6, "truncate")])
def test_numbers_match_a_python_recount(tmp_path, tok, seed, overlong):
    from fastchat_ft.data import ChatDataset, encode_chat
    rng = random.Random(seed)
    recs = make_records(rng, 57)
    lines = [json.dumps(r) for r in recs]
    lines.insert(9, '{"messages": [')  # an invalid record: counted, left out of every other number
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(lines) + "\n")
    lengths, trainable = [], []
    for r in recs:
        ids, labels = encode_chat(r["messages"], tok)
        lengths.append(len(ids))
        trainable.append(int((labels != -100).sum()))
    lengths, trainable = np.array(lengths), np.array(trainable)
    max_seq_len = int(np.percentile(lengths, 80))
    res = analyze_file(f, tok, max_seq_len=max_seq_len, budget=int(lengths.sum()) // 2, micro_batch_size=2,
                       gradient_accumulation_steps=3, overlong=overlong)
    assert res["records"] == 58 and res["invalid_records"] == 1 and res["conversations"] == 57
    roles = {k: sum(m["role"] == k for r in recs for m in r["messages"]) for k in ("system", "user", "assistant", "tool")}
    assert res["role_counts"] == roles
    assert res["turns"]["total"] == sum(len(r["messages"]) for r in recs)
    n_user = np.array([sum(m["role"] == "user" for m in r["messages"]) for r in recs])
    assert res["multi_turn_ratio"] == pytest.approx((n_user >= 2).mean())
    assert res["tokens"]["total"] == lengths.sum() and res["tokens"]["trainable"] == trainable.sum()
    for q in (50, 90, 95, 99):
        assert res["lengths"][f"p{q}"] == int(np.percentile(lengths, q, method="inverted_cdf"))
    assert res["lengths"]["max"] == lengths.max()
    over = lengths > max_seq_len
    assert res["lengths"]["over_max_seq_len"] == over.sum()
    # What one epoch reads: the loader itself (ChatDataset applies the same overlong policy and packer).
    data = ChatDataset(f, tok, max_seq_len=max_seq_len, overlong=overlong, cache=False, verbose=False,
                       on_error="skip", rejects_path=tmp_path / "rejects.jsonl", self_check=0)
    st = data.stats
    assert res["tokens"]["trained_total"] == st.tokens
    assert res["tokens"]["trained_trainable"] == st.trainable_tokens
    p = res["packing"]
    assert p["conversations"] == st.conversations and p["packed_sequences"] == st.bins
    if overlong == "drop":
        assert st.tokens == lengths[~over].sum() and st.conversations == (~over).sum()
    else:
        assert st.truncated > 0  # the case is exercised
    assert p["efficiency"] == pytest.approx(st.tokens / (st.bins * max_seq_len))
    assert p["steps_per_epoch"] == math.ceil(st.bins / 6)
    assert p["steps_per_epoch_unpacked"] == math.ceil(st.conversations / 6)
    assert res["budget"]["met"] == (st.tokens >= lengths.sum() // 2)


def test_diversity_distinct_bigrams_and_duplicates(tmp_path, tok):
    rng = random.Random(9)
    recs = make_records(rng, 200)
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    res = analyze_file(f, tok)
    # Exact distinct-2 over user/assistant text, normalised as the native side does.
    grams, total = set(), 0
    for r in recs:
        text = " ".join(m["content"] for m in r["messages"] if m["role"] != "system") + " "
        words = _native.normalize_for_dedup(text).split()
        pairs = list(zip(words, words[1:])) if len(words) >= 2 else [tuple(words)]
        grams.update(pairs)
        total += len(pairs)
    assert res["diversity"]["distinct_2"] == pytest.approx(len(grams) / total, rel=0.03)  # HLL: ~1% error
    assert res["diversity"]["duplicate_share"] == 0
    # The same file with every record twice: half are exact duplicates and the score halves.
    f2 = tmp_path / "d2.jsonl"
    f2.write_text("\n".join(json.dumps(r) for r in recs + recs) + "\n")
    res2 = analyze_file(f2, tok)
    assert res2["diversity"]["exact_duplicates"] == 200 and res2["diversity"]["duplicate_share"] == 0.5
    assert res2["diversity"]["score"] == pytest.approx(res["diversity"]["score"] / 2, rel=0.05)


def test_budget_verdict(tmp_path, tok):
    rng = random.Random(2)
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in make_records(rng, 20)) + "\n")
    total = analyze_file(f, tok)["tokens"]["trained_total"]
    met = analyze_file(f, tok, budget=total)["budget"]
    short = analyze_file(f, tok, budget=total * 3)["budget"]
    assert met["met"] and met["missing_tokens"] == 0
    assert not short["met"] and short["missing_tokens"] == 2 * total and short["epochs_to_meet"] == pytest.approx(3)


def test_cli_json_and_plot(tmp_path, capsys):
    tok_dir = shared_path("tokenizers", "smollm2")
    src = shared_path("chat", "fastchat_dummy_conversation_sharegpt.json")
    png = tmp_path / "len.png"
    assert main(["analyze", str(src), "--tokenizer", str(tok_dir), "--json", "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["conversations"] == 500 and out["role_counts"]["user"] == 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["analyze", str(src), "--tokenizer", str(tok_dir), "--budget", "1000000000"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"budget\s+1000000000 tokens: NOT met", text)


@pytest.mark.parametrize("overlong", ["drop", "truncate"])
def test_single_turn_records_over_max_seq_len_count_in_the_lengths(tmp_path, tok, overlong):
    # A single exchange over max_seq_len is an error (no whole trained turn fits), so it was left out of the
    # lengths too: single-turn data always read "0 over max_seq_len" and percentiles below the limit.
    from fastchat_ft.data import encode_chat
    rng = random.Random(11)
    recs = []
    for _ in range(40):
        recs.append({"messages": [{"role": "user", "content": sentence(rng, rng.randint(3, 30))},
                                  {"role": "assistant", "content": sentence(rng, rng.randint(3, 90))}]})
    lines = [json.dumps(r) for r in recs]
    lines.insert(3, '{"messages": []}')  # another error: still left out of every number
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(lines) + "\n")
    lengths = np.array([len(encode_chat(r["messages"], tok)[0]) for r in recs])
    max_seq_len = int(np.percentile(lengths, 70))
    over = lengths > max_seq_len
    res = analyze_file(f, tok, max_seq_len=max_seq_len, overlong=overlong)
    assert res["issues"]["error:length.truncated_no_trainable"] == over.sum() > 5  # the case is exercised
    assert res["conversations"] == (~over).sum() and res["invalid_records"] == over.sum() + 1
    assert res["lengths"]["over_max_seq_len"] == over.sum()
    assert res["lengths"]["over_max_seq_len_share"] == pytest.approx(over.mean())
    assert res["lengths"]["conversations"] == len(recs)  # what the share is of: the report says "N of M over"
    assert f"{over.sum()} of {len(recs)} over max_seq_len" in format_report(res)
    for q in (50, 90, 95, 99):
        assert res["lengths"][f"p{q}"] == int(np.percentile(lengths, q, method="inverted_cdf"))
    assert res["lengths"]["max"] == lengths.max() and res["lengths"]["mean"] == pytest.approx(lengths.mean())
    assert res["tokens"]["total"] == lengths[~over].sum()  # tokens and packing: what trains, as before
    assert res["packing"]["conversations"] == (~over).sum()


def test_cli_counts_the_default_system_prompt_training_adds(tmp_path, capsys):
    # Training (system_prompt unset) gives a conversation without a system turn the model's default system prompt;
    # analyze counted without it: a third fewer tokens and fewer packed rows than training on such data.
    from fastchat_ft.data import ChatDataset
    from fastchat_ft.data.template_defaults import model_default_system
    from fastchat_ft.data.tokenize import LoaderTokenizer
    tok_dir = shared_path("tokenizers", "smollm2")
    system = model_default_system(str(tok_dir), "chatml")
    assert system  # SmolLM2's template adds one: the case is exercised
    rng = random.Random(4)
    recs = make_records(rng, 30)
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    as_training = ChatDataset(f, LoaderTokenizer.from_any(tok_dir), max_seq_len=512, cache=False, verbose=False,
                              system_prompt=system, self_check=0).stats
    assert main(["analyze", str(f), "--tokenizer", str(tok_dir), "--max-seq-len", "512", "--json"]) == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out)
    assert res["tokens"]["trained_total"] == as_training.tokens
    assert res["packing"]["packed_sequences"] == as_training.bins
    assert "default system prompt" in captured.err
    # --system-prompt '' counts without it, as training with system_prompt: ""
    assert main(["analyze", str(f), "--tokenizer", str(tok_dir), "--max-seq-len", "512", "--json",
                 "--system-prompt", ""]) == 0
    plain = ChatDataset(f, LoaderTokenizer.from_any(tok_dir), max_seq_len=512, cache=False, verbose=False,
                        self_check=0).stats
    assert json.loads(capsys.readouterr().out)["tokens"]["trained_total"] == plain.tokens < as_training.tokens
