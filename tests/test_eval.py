"""fastchat-ft eval: metrics on trainable tokens equal HF's own loss/accuracy on the same rows (reference:
transformers' forward with labels), never through full-vocab logits; baseline comparison, --json, and the
samples report with its memorisation check."""
import json

import pytest
import torch

from fastchat_ft.cli import main
from fastchat_ft.errors import DataError
from test_export_fixtures import chatty_run, tiny_run, write_jsonl  # noqa: F401 (fixtures)


def _need_engine_and_loader():
    data = pytest.importorskip("fastchat_ft.data")
    if not hasattr(data, "ChatDataset"):
        pytest.skip("fastchat_ft.data.ChatDataset has not landed yet")
    pytest.importorskip("fastchat_ft.engine.validation")


def _hf_reference(model, rows):
    """HF's causal-LM loss per row (mean over its shifted labels), token-weighted over rows; accuracy from
    the full logits' argmax."""
    total, n, correct = 0.0, 0, 0
    with torch.no_grad():
        for r in rows:
            ids = torch.as_tensor(r["input_ids"], dtype=torch.long)[None]
            labels = torch.as_tensor(r["labels"], dtype=torch.long)[None]
            out = model(input_ids=ids, labels=labels)
            k = int((labels[:, 1:] != -100).sum())
            total += float(out.loss) * k
            n += k
            pred = out.logits[:, :-1].argmax(-1)
            mask = labels[:, 1:] != -100
            correct += int((pred[mask] == labels[:, 1:][mask]).sum())
    return total / n, correct / n, n


def test_metrics_equal_hf_loss_without_full_logits(chatty_run, monkeypatch):
    _need_engine_and_loader()
    from fastchat_ft.engine.evaluate import encode_rows, metrics_of
    from fastchat_ft.inference import load_model
    loaded = load_model(chatty_run["run"], device="cpu")
    data = chatty_run["run"] / "data" / "val.jsonl"
    rows, _ = encode_rows(data, loaded.source.tokenizer_dir, "chatml", 512)
    assert len(rows) == len(chatty_run["val"])
    ref_loss, ref_acc, ref_n = _hf_reference(loaded.model, rows)

    def no_full_logits(*a, **k):
        raise AssertionError("eval must not run the lm_head over whole sequences")
    monkeypatch.setattr(loaded.model.lm_head, "forward", no_full_logits)
    m = metrics_of(loaded, data, "chatml", 512)
    assert m["n_tokens"] == ref_n and m["n_sequences"] == len(rows)
    assert m["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert m["token_acc"] == pytest.approx(ref_acc, abs=1e-9)
    assert m["ppl"] == pytest.approx(torch.tensor(ref_loss).exp().item(), rel=1e-5)


def test_baseline_json(tiny_run, capsys):
    _need_engine_and_loader()
    data = tiny_run["run"] / "data" / "val.jsonl"
    assert main(["eval", "--model", str(tiny_run["run"]), "--data", str(data), "--baseline", str(tiny_run["base"]),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    m, b, imp = res["model"], res["baseline"], res["improvement"]
    assert res["template"] == "chatml"  # the run config has no chat_template: the engine default
    assert m["n_tokens"] == b["n_tokens"] > 0 and m["loss"] != b["loss"]
    assert imp["loss"] == pytest.approx(m["loss"] - b["loss"])
    assert imp["token_acc_points"] == pytest.approx(100 * (m["token_acc"] - b["token_acc"]))


def test_table_output(tiny_run, capsys):
    _need_engine_and_loader()
    data = tiny_run["run"] / "data" / "val.jsonl"
    assert main(["eval", "--model", str(tiny_run["run"]), "--data", str(data), "--baseline",
                 str(tiny_run["base"])]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "token accuracy" in out and "baseline" in out and "pts" in out


def test_samples_report(chatty_run, tmp_path, capsys):
    _need_engine_and_loader()
    # one eval prompt copied from training (seen), the rest unseen
    rows = [chatty_run["train"][0]] + [{"messages": r["messages"]} for r in chatty_run["val"][:2]]
    data = write_jsonl(tmp_path / "eval.jsonl", rows)
    report = tmp_path / "samples.md"
    assert main(["eval", "--model", str(chatty_run["run"]), "--data", str(data), "--baseline",
                 str(chatty_run["base"]), "--samples", "3", "--report", str(report), "--max-new-tokens", "12"]) == 0
    text = report.read_text()
    assert text.count("\n## ") == 3 and text.count("**Fine-tuned answer**") == 3
    assert text.count("**Baseline answer**") == 3 and text.count("Longest n-gram shared") == 3
    assert text.count("(this prompt is in the training data)") == 1
    ref = [m["content"] for m in chatty_run["val"][0]["messages"] if m["role"] == "assistant"][-1]
    assert ref in text


def test_longest_shared_ngram():
    from fastchat_ft.engine.evaluate import TrainingAnswers
    ta = TrainingAnswers(["The cat sat on the mat today.", "dogs ran home quickly", "a b c d e f g"])
    assert ta.longest_shared("yesterday the cat sat on the rug") == (5, "the cat sat on the")
    assert ta.longest_shared("x y b c d e q") == (4, "b c d e")
    assert ta.longest_shared("nothing shared here") == (0, "")
    assert ta.longest_shared("home alone")[0] == 1


def test_missing_data_is_a_clean_error(tiny_run, tmp_path, capsys):
    with pytest.raises(DataError):
        from argparse import Namespace
        from fastchat_ft.engine.evaluate import run_eval
        run_eval(Namespace(model=str(tiny_run["run"]), data=str(tmp_path / "none.jsonl"), baseline=None,
                           template=None, max_seq_len=512, samples=0, json=False))
    assert main(["eval", "--model", str(tiny_run["run"]), "--data", str(tmp_path / "none.jsonl")]) == 1
    assert "not found" in capsys.readouterr().err


def test_conversations_the_loader_drops_are_reported(tiny_run, capsys):
    _need_engine_and_loader()
    data = tiny_run["run"] / "data" / "val.jsonl"
    tok = tiny_run["tokenizer"]
    lengths = [len(tok(tok.apply_chat_template(r["messages"], tokenize=False), add_special_tokens=False)["input_ids"])
               for r in tiny_run["val"]]
    limit = sorted(lengths)[len(lengths) // 2]
    assert main(["eval", "--model", str(tiny_run["run"]), "--data", str(data), "--max-seq-len", str(limit),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    too_long = sum(n > limit for n in lengths)
    assert too_long and res["model"]["loader"]["dropped_overlong"] == too_long
    assert res["model"]["n_sequences"] == len(lengths) - too_long


@pytest.mark.parametrize("option, value, dataset_kw", [
    ("think", "strip_history", {"think": "strip_history"}),
    ("excess_length_strategy", "truncate", {"overlong": "truncate"})])
def test_eval_reads_the_file_with_the_runs_loader_options(tiny_run, tmp_path, capsys, option, value, dataset_kw):
    # eval left the run's think / excess_length_strategy / allow_special_in_content out: it tokenized (or dropped)
    # conversations other than training's validation did, and its numbers were not the ones the run logged
    _need_engine_and_loader()
    import shutil

    from fastchat_ft.data import ChatDataset
    from fastchat_ft.engine.data import eval_batches
    from fastchat_ft.engine.validation import evaluate
    from fastchat_ft.inference import load_model
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    with open(run / "training_config.yaml", "a") as f:
        f.write(f"{option}: {value}\n")
    rows = [{"messages": [{"role": "user", "content": "the cat?"},
                          {"role": "assistant", "content": "<think>two dogs ran home quickly</think>the mat."},
                          {"role": "user", "content": "and the dogs?"},
                          {"role": "assistant", "content": "they ran home " + "quickly " * n}]} for n in (2, 40)]
    data = write_jsonl(tmp_path / "val.jsonl", rows)
    tok = tiny_run["tokenizer"]
    max_len = 4 + len(tok(tok.apply_chat_template(rows[0]["messages"], tokenize=False))["input_ids"])  # the short fits
    assert main(["eval", "--model", str(run), "--data", str(data), "--max-seq-len", str(max_len), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["model"]
    loaded = load_model(run, device="cpu")
    ds = ChatDataset([str(data)], str(loaded.source.tokenizer_dir), template="chatml", max_seq_len=max_len,
                     packing=False, seed=0, cache=False, **dataset_kw)
    want = evaluate(loaded.model, eval_batches([dict(r) for r in ds], 4))
    assert (got["n_tokens"], got["n_sequences"]) == (want.n_tokens, want.n_sequences)
    assert got["loss"] == pytest.approx(want.loss, rel=1e-6)


def test_max_seq_len_defaults_to_the_runs_sequence_len(tiny_run, tmp_path, capsys):
    # the default was 2048 whatever the run: eval kept conversations the run's validation left out (over its
    # sequence_len) and reported another loss than the run's
    _need_engine_and_loader()
    import re
    import shutil
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    tok = tiny_run["tokenizer"]
    lengths = [len(tok(tok.apply_chat_template(r["messages"], tokenize=False), add_special_tokens=False)["input_ids"])
               for r in tiny_run["val"]]
    limit = sorted(lengths)[len(lengths) // 2]
    too_long = sum(n > limit for n in lengths)
    assert too_long and max(lengths) < 2048  # 2048 would keep them all
    conf = run / "training_config.yaml"
    conf.write_text(re.sub(r"(?m)^sequence_len: .*$", f"sequence_len: {limit}", conf.read_text()))
    data = run / "data" / "val.jsonl"
    assert main(["eval", "--model", str(run), "--data", str(data), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["model"]["n_sequences"] == len(lengths) - too_long
    assert (res["max_seq_len"], res["max_seq_len_from"]) == (limit, "the run's sequence_len")
    assert res["model"]["loader"]["dropped_overlong"] == too_long
    assert main(["eval", "--model", str(run / "final"), "--data", str(data), "--json"]) == 0  # a checkpoint of it
    assert json.loads(capsys.readouterr().out)["max_seq_len"] == limit
    assert main(["eval", "--model", str(run), "--data", str(data), "--max-seq-len", "2048"]) == 0  # the flag wins
    out = capsys.readouterr().out
    assert f"{len(lengths)} conversations" in out and "max_seq_len 2048 (--max-seq-len)" in out
    assert main(["eval", "--model", str(tiny_run["base"]), "--data", str(data), "--json"]) == 0  # not a run
    res = json.loads(capsys.readouterr().out)
    assert (res["max_seq_len"], res["max_seq_len_from"]) == (2048, "default")
