"""Distillation: the chunked loss equals the full-logits reference built from torch's kl_div / cross_entropy
(values and gradients, every divergence, with temperature, softcap, bias, padded heads and ignored labels);
a short distillation lowers the student's validation KL to the teacher; a tokenizer mismatch is a clear
error naming both folders; and `fastchat-ft distill` runs end to end with a LoRA run directory as teacher.
Tiny random Llamas on a shared ~400-token tokenizer; nothing is downloaded."""
import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from fastchat_ft import cli
from fastchat_ft.engine import distill as distill_mod
from fastchat_ft.engine.distill_loss import Head, distill_loss, distill_loss_reference
from fastchat_ft.errors import ModelError
from fastchat_ft.model.tiny import build_tiny_model
from test_export_fixtures import make_base_model, make_conversations, make_lora_checkpoint, make_tokenizer, write_jsonl


# ----------------------------------------------------------------------------------------------- the loss

def _inputs(seed, n=53, hs=24, ht=40, vocab=61, pad_s=3, pad_t=0, dtype=torch.float64, bias=True):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, hs, generator=g, dtype=dtype).requires_grad_()
    ws = (torch.randn(vocab + pad_s, hs, generator=g, dtype=dtype) * 0.6).requires_grad_()
    bs = (torch.randn(vocab + pad_s, generator=g, dtype=dtype) * 0.5).requires_grad_() if bias else None
    xt = torch.randn(n, ht, generator=g, dtype=dtype)
    wt = (torch.randn(vocab + pad_t, ht, generator=g, dtype=dtype) * 0.6).requires_grad_()  # must get no grad
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.3] = -100
    return xs, ws, bs, xt, wt, labels


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature,alpha,softcap", [(1.0, 0.5, None), (2.5, 0.3, None), (0.7, 0.8, 4.0)])
def test_chunked_loss_equals_full_logits_reference(kind, temperature, alpha, softcap):
    xs, ws, bs, xt, wt, labels = _inputs(seed=hash((kind, temperature)) % 1000)
    kw = dict(kind=kind, temperature=temperature, alpha=alpha, beta=0.3, vocab=61, num_items=71)
    got = distill_loss(xs, Head(ws, bs, softcap), xt, Head(wt, None, softcap), labels, chunk_size=7, **kw)
    grads = torch.autograd.grad(got.loss, (xs, ws, bs))
    ref = distill_loss_reference(xs, Head(ws, bs, softcap), xt, Head(wt, None, softcap), labels, **kw)
    ref_grads = torch.autograd.grad(ref.loss, (xs, ws, bs))
    assert got.n_tokens == ref.n_tokens == int((labels != -100).sum())
    assert ref.divergence > 0.05 and ref.ce > 1.0  # a real signal, not two zeros agreeing
    for a, b in ((got.loss, ref.loss), (got.divergence, ref.divergence), (got.ce, ref.ce)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert int(got.n_correct) == int(ref.n_correct)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert grads[1][61:].abs().max() == 0  # padded head rows are outside the compared vocabulary
    assert wt.grad is None


def test_chunked_loss_float32_any_chunk_size_and_no_labels():
    xs, ws, _, xt, wt, labels = _inputs(seed=5, dtype=torch.float32, bias=False, pad_s=0, pad_t=4)
    ref = distill_loss_reference(xs.double(), Head(ws.double()), xt.double(), Head(wt.double()), labels, vocab=61,
                                 kind="jsd", temperature=2.0)
    ref_gx, = torch.autograd.grad(ref.loss, xs)
    for chunk in (1, 13, 1000):
        got = distill_loss(xs, Head(ws), xt, Head(wt), labels, vocab=61, kind="jsd", temperature=2.0, chunk_size=chunk)
        gx, = torch.autograd.grad(got.loss, xs)
        torch.testing.assert_close(got.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx, ref_gx, rtol=1e-4, atol=1e-6)
    none = torch.full_like(labels, -100)
    out = distill_loss(xs, Head(ws), xt, Head(wt), none, vocab=61)
    gx, gw = torch.autograd.grad(out.loss, (xs, ws))
    assert out.n_tokens == 0 and float(out.loss.detach()) == 0.0 and gx.abs().max() == 0 and gw.abs().max() == 0


def test_bf16_autocast_path_stays_close_to_the_fp32_reference():
    """Under autocast the activations and heads enter in bf16 (as on a GPU); the head gradient keeps the
    weight's fp32 dtype and the loss stays within bf16 rounding of the exact one."""
    xs, ws, _, xt, wt, labels = _inputs(seed=11, dtype=torch.float32, bias=False, pad_s=0)
    ref = distill_loss_reference(xs, Head(ws), xt, Head(wt), labels, vocab=61, kind="reverse_kl", temperature=1.5)
    ref_gw, = torch.autograd.grad(ref.loss, ws)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = distill_loss(xs, Head(ws), xt.bfloat16(), Head(wt), labels, vocab=61, kind="reverse_kl",
                           temperature=1.5, chunk_size=9)
    gx, gw = torch.autograd.grad(got.loss, (xs, ws))
    assert got.loss.dtype == torch.float32 and gw.dtype == torch.float32 and gx.dtype == torch.float32
    torch.testing.assert_close(got.loss, ref.loss, rtol=3e-2, atol=1e-3)
    torch.testing.assert_close(gw, ref_gw, rtol=5e-2, atol=2e-3)


def test_alpha_extremes_are_pure_divergence_and_pure_cross_entropy():
    xs, ws, _, xt, wt, labels = _inputs(seed=9, bias=False)
    kl = distill_loss(xs, Head(ws), xt, Head(wt), labels, vocab=61, alpha=1.0, temperature=2.0)
    ce = distill_loss(xs, Head(ws), xt, Head(wt), labels, vocab=61, alpha=0.0)
    keep = labels != -100
    zs = xs[keep] @ ws[:61].t()
    want_ce = torch.nn.functional.cross_entropy(zs, labels[keep])
    torch.testing.assert_close(ce.loss, want_ce)
    torch.testing.assert_close(kl.loss, 4.0 * kl.divergence / kl.n_tokens)  # T^2 scaling


def test_logits_exist_one_chunk_at_a_time(monkeypatch):
    """Both models' logits are only ever built for chunk_size rows at once, the student's once per chunk."""
    from fastchat_ft.engine import distill_loss as mod

    rows, real = [], mod._logits
    monkeypatch.setattr(mod, "_logits", lambda x, *a: (rows.append(x.shape[0]), real(x, *a))[1])
    xs, ws, bs, xt, wt, labels = _inputs(seed=3)
    out = distill_loss(xs, Head(ws, bs), xt, Head(wt), labels, vocab=61, chunk_size=8)
    torch.autograd.grad(out.loss, xs)  # backward recomputes nothing: the gradients were formed per chunk
    n = int((labels != -100).sum())
    assert max(rows) <= 8 and sum(rows) == 2 * n and len(rows) == 2 * -(-n // 8)


# ----------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A teacher base + LoRA run directory, a smaller student and a second tokenizer, on tiny data."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("distill")
    tok = make_tokenizer(root / "tok")
    make_base_model(root / "teacher_base", tok)
    make_lora_checkpoint(root / "teacher_run" / "final", root / "teacher_base", tok, seed=3)
    build_tiny_model(root / "student", root / "tok", seed=1)
    make_tokenizer(root / "tok_other", extra_special=["<|tool|>"])
    build_tiny_model(root / "other_model", root / "tok_other", seed=2)
    write_jsonl(root / "train.jsonl", make_conversations(48, seed=1))
    write_jsonl(root / "val.jsonl", make_conversations(8, seed=2))
    return root


def _args(root, out, teacher, **kw):
    base = dict(teacher=str(teacher), student=str(root / "student"), data=str(root / "train.jsonl"),
                val_data=str(root / "val.jsonl"), output_dir=str(out), loss="forward_kl", alpha=0.5, temperature=1.0,
                jsd_beta=0.5, chunk_size=None, adapter=None, learning_rate=3e-3, max_steps=10, config=None,
                resume=None, set=["micro_batch_size=4", "gradient_accumulation_steps=1", "sequence_len=128",
                                  "eval_steps=5", "sample_prompts=0", "warmup_ratio=0"])
    base.update(kw)
    return Namespace(**base)


def test_short_distillation_lowers_the_students_validation_kl(models, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCHAT_FT_CACHE", str(tmp_path / "cache"))
    cfg, opts = distill_mod.config_from_args(_args(models, tmp_path / "run", models / "teacher_base",
                                                   alpha=0.9, temperature=2.0, chunk_size=37))
    summary = distill_mod.distill(cfg, opts, show_bar=False)
    kls = summary["val_kl"]
    assert len(kls) == 3  # steps 0, 5, 10
    assert kls[0] > kls[1] > kls[2] and kls[-1] < 0.8 * kls[0], kls  # measured: 6.07 -> 4.04 -> 3.86
    # the step-0 record also holds the teacher's own CE on the same tokens
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["teacher_val_loss"] > 0


def test_tokenizer_mismatch_is_a_clear_error_naming_both_folders(models, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTCHAT_FT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    rc = cli.main(["distill", "--teacher", str(models / "other_model"), "--student", str(models / "student"),
                   "--data", str(models / "train.jsonl"), "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "tokenizers differ" in err and "<|tool|>" in err
    assert str(models / "other_model") in err and str(models / "student") in err
    assert not (out / "metrics.jsonl").exists()  # it failed before any packing or training
    with pytest.raises(ModelError, match="only the teacher has"):
        from transformers import AutoTokenizer
        distill_mod.check_same_tokenizer(AutoTokenizer.from_pretrained(models / "tok"), models / "tok",
                                         AutoTokenizer.from_pretrained(models / "tok_other"), models / "tok_other")


def test_distill_cli_end_to_end_with_a_lora_run_directory_teacher(models, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCHAT_FT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    rc = cli.main(["distill", "--teacher", str(models / "teacher_run"), "--student", str(models / "student"),
                   "--data", str(models / "train.jsonl"), "--val-data", str(models / "val.jsonl"),
                   "--loss", "jsd", "--alpha", "0.7", "--temperature", "1.5", "--chunk-size", "64",
                   "--adapter", "lora", "--learning-rate", "1e-2", "--max-steps", "8", "--output-dir", str(out),
                   "--set", "micro_batch_size=4", "--set", "gradient_accumulation_steps=1", "--set", "eval_steps=4",
                   "--set", "sequence_len=128", "--set", "sample_prompts=1", "--set", "sample_max_new_tokens=3",
                   "--set", "lora_r=4", "--set", "lora_alpha=8"])
    assert rc == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 8 and all(r["kl"] >= 0 and r["ce"] > 0 for r in steps)
    for r in steps:  # the logged loss is the mix the student was trained on
        assert r["loss"] == pytest.approx(0.7 * 1.5 ** 2 * r["kl"] + 0.3 * r["ce"], rel=1e-4)
    evals = [r for r in records if "val_kl" in r]
    assert [r["step"] for r in evals] == [0, 4, 8] and evals[-1]["val_kl"] < evals[0]["val_kl"]
    for name in ("final/adapter_model.safetensors", "final/adapter_config.json", "final/tokenizer.json",
                 "checkpoints/step-000008/optimizer.pt", "training_config.yaml", "samples.jsonl", "distill_config.json"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["command"] == "fastchat-ft distill" and manifest["distillation"]["loss"] == "jsd"
    assert manifest["teacher"] == str((models / "teacher_run").resolve())
    assert manifest["result"]["val_kl_after"] < manifest["result"]["val_kl_before"]
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((models / "student").resolve())


def test_resume_from_a_checkpoint_continues_exactly(models, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("FASTCHAT_FT_CACHE", str(tmp_path / "cache"))
    args = _args(models, tmp_path / "full", models / "teacher_run", max_steps=6)
    args.set = args.set + ["eval_steps=3", "save_total_limit=3"]
    full = distill_mod.distill(*distill_mod.config_from_args(args), show_bar=False)["train_losses"]
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "final")  # as a run stopped after step 3 would leave it
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-000006")
    args.output_dir = str(tmp_path / "resumed")
    resumed = distill_mod.distill(*distill_mod.config_from_args(args), show_bar=False,
                                  resume=str(tmp_path / "resumed" / "checkpoints" / "step-000003"))
    assert resumed["steps"] == 6  # the run's steps, not the 3 of this session
    manifest = json.loads((tmp_path / "resumed" / "run_manifest.json").read_text())
    assert manifest["result"]["steps"] == 6 and len(manifest["resumed_at"]) == 1
    # resumed once more, the run has nothing left to train: said before a student or teacher is loaded
    from fastchat_ft.model import load as load_mod

    def no_model(*args, **kw):
        raise AssertionError("a model was loaded for a run that has nothing to train")

    monkeypatch.setattr(load_mod, "load_model", no_model)
    again = distill_mod.distill(*distill_mod.config_from_args(args), show_bar=False, resume="latest")
    assert again["finished"] and again["steps"] == 6 and not again["train_losses"]
    assert resumed["train_losses"] == pytest.approx(full[3:], rel=1e-5)


def test_a_stopped_distillation_reports_its_last_validation_not_a_before_after(models, tmp_path, monkeypatch, capsys):
    # the final evaluation is skipped on a stop: the summary printed step 0's val KL (and loss) "->" itself
    import signal

    monkeypatch.setenv("FASTCHAT_FT_CACHE", str(tmp_path / "cache"))
    real, calls = distill_mod.distill_step, []

    def term_at_two(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)  # as `kill` or a cluster scheduler would send it
        return real(*args, **kw)

    monkeypatch.setattr(distill_mod, "distill_step", term_at_two)
    out = tmp_path / "run"
    args = _args(models, out, models / "teacher_base", max_steps=4)  # evaluations at steps 0 and 4 (the last)
    summary = distill_mod.distill(*distill_mod.config_from_args(args), show_bar=False)
    assert summary["stopped"] == "SIGTERM" and summary["val_kl"] and len(summary["val_kl"]) == 1
    text = capsys.readouterr().out
    assert (f"validation forward_kl to the teacher: none measured since the start (step 0: {summary['val_kl'][0]:.4f})"
            in text and "validation loss: none measured since the start" in text), text
    assert not [line for line in text.splitlines() if "validation" in line and "->" in line], text
    result = json.loads((out / "run_manifest.json").read_text())["result"]
    assert result["val_kl_last"] == summary["val_kl"][0] and result["val_kl_last_step"] == 0
    assert not {"val_kl_before", "val_kl_after", "val_loss_before", "val_loss_after"} & result.keys()


def test_a_stop_asked_during_an_evaluation_still_saves_the_next_steps_checkpoint(models, tmp_path, monkeypatch):
    # as in train: a signal landing in after_step's evaluation (or logging, save) ended the loop on the live flag
    # with no checkpoint, so the steps since the last save were lost
    import signal

    monkeypatch.setenv("FASTCHAT_FT_CACHE", str(tmp_path / "cache"))
    real, calls = distill_mod.evaluate, []

    def term_in_second_eval(*args, **kw):
        calls.append(1)
        if len(calls) == 2:  # the step-2 evaluation (step 0's is the first)
            signal.raise_signal(signal.SIGTERM)
        return real(*args, **kw)

    monkeypatch.setattr(distill_mod, "evaluate", term_in_second_eval)
    out = tmp_path / "run"
    args = _args(models, out, models / "teacher_base", max_steps=6)
    args.set = args.set + ["eval_steps=2", "save_steps=100"]
    summary = distill_mod.distill(*distill_mod.config_from_args(args), show_bar=False)
    assert summary["stopped"] == "SIGTERM" and summary["steps"] == 3  # the step under way when it was seen
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000003"]
    assert not (out / "final").exists()


def test_a_stop_seen_after_the_last_step_still_finishes_the_distillation(models, tmp_path, monkeypatch):
    # a stop during the last step skipped final/ and reported a stop at step 4 of 4 (exit 143); a --resume then
    # said the run had finished, so final/ was never written
    import signal

    from fastchat_ft.engine import train as train_mod

    monkeypatch.setenv("FASTCHAT_FT_CACHE", str(tmp_path / "cache"))
    real, calls = distill_mod.distill_step, []

    def term_in_last(*args, **kw):
        calls.append(1)
        if len(calls) == 4:
            signal.raise_signal(signal.SIGTERM)
        return real(*args, **kw)

    monkeypatch.setattr(distill_mod, "distill_step", term_in_last)
    out = tmp_path / "run"
    args = _args(models, out, models / "teacher_base", max_steps=4)
    summary = distill_mod.distill(*distill_mod.config_from_args(args), show_bar=False)
    assert summary["stopped"] is None and summary["steps"] == 4
    assert (out / "final" / "model.safetensors").is_file()
    assert train_mod.stopped_status(summary) == 0


def test_the_logged_lr_is_the_lr_the_step_used(models, tmp_path, monkeypatch):
    # the log read the scheduler after its step(): step k showed step k+1's lr (warmup over 2 of 4 steps logged
    # peak for step 1, not peak/2)
    monkeypatch.setenv("FASTCHAT_FT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = _args(models, out, models / "teacher_base", max_steps=4, learning_rate=1e-3)
    args.set = args.set + ["warmup_ratio=0.5", "lr_scheduler=linear", "eval_steps=100"]
    cfg, opts = distill_mod.config_from_args(args)
    distill_mod.distill(cfg, opts, show_bar=False)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "lr" in r]
    peak = cfg.resolved_learning_rate()
    # linear warmup over 2 steps (peak/2, peak), then linear decay from peak; the lr after step 4 (0) is unused
    assert lrs == pytest.approx([peak / 2, peak, peak, peak / 2], rel=1e-9), lrs


def test_resuming_another_folders_checkpoint_never_takes_over_a_run_there(models, tmp_path, monkeypatch, capsys):
    # --resume PATH skipped the output-folder check, so a stopped run in the folder was trained on and taken over
    from fastchat_ft.errors import ConfigError

    monkeypatch.setenv("FASTCHAT_FT_CACHE", str(tmp_path / "cache"))
    there = tmp_path / "y"
    (there / "checkpoints" / "step-000001").mkdir(parents=True)
    (there / "checkpoints" / "step-000001" / "model.safetensors").write_text("")
    (there / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    other = str(tmp_path / "x" / "checkpoints" / "step-000002")
    args = _args(models, there, models / "teacher_base", resume=other)
    with pytest.raises(ConfigError) as err:
        distill_mod.distill(*distill_mod.config_from_args(args), show_bar=False, resume=other)
    assert err.value.field == "output_dir" and "checkpoints" in str(err.value)
    # the CLI refuses before distill() (under --nproc, before torchrun starts the ranks)
    monkeypatch.setattr(distill_mod, "distill", lambda *a, **k: pytest.fail("run_distill did not check the folder"))
    rc = cli.main(["distill", "--teacher", str(models / "teacher_base"), "--student", str(models / "student"),
                   "--data", str(models / "train.jsonl"), "--output-dir", str(there), "--resume", other])
    assert rc == 1 and "output_dir" in capsys.readouterr().err
    assert (there / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'  # nothing of the run touched
