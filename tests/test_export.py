"""fastchat-ft export: merged model and PEFT adapter. References: transformers' from_pretrained (the merged
folder loads as is, same logits as the engine's model), peft's PeftModel (the adapter loads, same logits), and
the self-check failing on a model that never stops."""
import json
import os
from argparse import Namespace

import pytest
import torch

from fastchat_ft.cli import main
from fastchat_ft.errors import FastchatError, ModelError
from fastchat_ft.export import run_export, write_merged
from fastchat_ft.inference import load_model
from test_export_fixtures import chatty_run, tiny_run, tiny_run_new_tokens  # noqa: F401 (fixtures)


def _args(run, out, **kw):
    base = dict(run_dir=str(run), out=str(out), merge=False, adapter=False, gguf=None, four_bit=False, notes=None)
    base.update(kw)
    return Namespace(**base)


def _ids(vocab, n=21, seed=3):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def merged_export(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "merged"
    notes = out.parent / "notes.md"
    notes.write_text("Answers were written by hand for the weather bot.")
    assert main(["export", str(tiny_run["run"]), "--out", str(out), "--notes", str(notes)]) == 0
    return out


def test_merged_folder_loads_in_transformers_with_engine_logits(tiny_run, merged_export):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(merged_export).eval()
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_run["peft_model"](input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)
    tok = AutoTokenizer.from_pretrained(merged_export)
    assert tok.chat_template == tiny_run["tokenizer"].chat_template
    assert json.loads((merged_export / "tokenizer_config.json").read_text())["chat_template"] == tok.chat_template
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    gen = json.loads((merged_export / "generation_config.json").read_text())
    assert im_end in gen["eos_token_id"] and tok.eos_token_id in gen["eos_token_id"]
    assert im_end in json.loads((merged_export / "config.json").read_text())["eos_token_id"]


def test_merged_export_writes_artifacts_and_card(tiny_run, merged_export):
    for name in ("training_config.yaml", "run_manifest.json", "loss_curve.png", "dataset_info.json",
                 "generation_notes.md", "README.md", "data/train.jsonl", "data/val.jsonl", "data/splits.json",
                 "training_logs/metrics.jsonl"):
        assert (merged_export / name).is_file(), name
    umask = os.umask(0)
    os.umask(umask)
    for p in merged_export.glob("*.safetensors"):  # not the 0600 safetensors leaves behind
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p.name
    info = json.loads((merged_export / "dataset_info.json").read_text())
    assert "analyze_error" not in info["train"]  # the numbers come from `fastchat-ft analyze`
    assert info["train"]["conversations"] == len(tiny_run["train"])
    assert info["val"]["conversations"] == len(tiny_run["val"])
    multi = sum(sum(m["role"] == "assistant" for m in r["messages"]) > 1 for r in tiny_run["train"])
    assert info["train"]["multi_turn_ratio"] == pytest.approx(multi / len(tiny_run["train"]))
    tok = tiny_run["tokenizer"]
    n_tokens = sum(len(tok(tok.apply_chat_template(r["messages"], tokenize=False), add_special_tokens=False)
                       ["input_ids"]) for r in tiny_run["train"])
    assert info["train"]["tokens"]["total"] == n_tokens
    notes = (merged_export / "generation_notes.md").read_text()
    assert "written by hand for the weather bot" in notes and "6.0000 before training, 2.9000 after" in notes
    card = (merged_export / "README.md").read_text()
    assert "| loss | 6.0000 | 2.9000 |" in card and "| lora_r | 4 |" in card and "Passed: yes" in card
    assert "<|im_end|>" in card
    splits = json.loads((merged_export / "data" / "splits.json").read_text())
    assert len(splits["train"]["sha256"]) == 64


def test_export_refuses_to_overwrite_or_write_inside_run(tiny_run, merged_export, tmp_path):
    with pytest.raises(FastchatError, match="not empty"):
        run_export(_args(tiny_run["run"], merged_export))
    with pytest.raises(FastchatError, match="inside the run"):
        run_export(_args(tiny_run["run"], tiny_run["run"] / "export"))
    assert not (tiny_run["run"] / "export").exists()


def test_self_check_fails_on_a_model_that_never_stops(chatty_run, tmp_path, capsys):
    out = tmp_path / "chatty"
    with pytest.raises(ModelError, match="did not stop") as err:
        run_export(_args(chatty_run["run"], out))
    assert not out.exists() and (tmp_path / "chatty.failed" / "config.json").is_file()
    assert err.value.file == str(tmp_path / "chatty.failed")  # the kept folder, not the vanished staging one
    assert str(err.value).startswith(str(tmp_path / "chatty.failed"))
    assert "[FAIL] stops within" in capsys.readouterr().out
    assert main(["export", str(chatty_run["run"]), "--out", str(tmp_path / "chatty2")]) == 1  # CLI: error, no traceback


def test_sharded_save_loads(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM
    loaded = load_model(tiny_run["run"], device="cpu")
    write_merged(loaded, tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    ids = _ids(loaded.model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits,
                                   loaded.model(ids).logits)


def test_export_bf16_keeps_float32_merge(tiny_run, tmp_path):
    out = tmp_path / "bf16"
    run_export(_args(tiny_run["run"], out, dtype="bfloat16"))
    conf = json.loads((out / "config.json").read_text())
    assert conf["dtype"] == "bfloat16"
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    ref = load_model(tiny_run["run"], device="cpu").model.model.layers[0].self_attn.q_proj.weight
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, ref.detach().to(torch.bfloat16))  # rounded once, from the float32 merge


@pytest.mark.parametrize("fixture", ["tiny_run", "tiny_run_new_tokens"])
def test_adapter_export_loads_in_peft(fixture, request, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    run = request.getfixturevalue(fixture)
    out = tmp_path / "adapter"
    run_export(_args(run["run"], out, adapter=True))
    conf = json.loads((out / "adapter_config.json").read_text())
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    # vLLM accepts only lora_A/lora_B tensors in an adapter: whole tensors must not be in it
    assert keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert not conf.get("modules_to_save")
    if fixture == "tiny_run_new_tokens":
        assert conf["base_model_name_or_path"] == str((out / "base").resolve())
        assert (out / "base" / "config.json").is_file()
    else:
        assert conf["base_model_name_or_path"] == str(run["base"].resolve()) and not (out / "base").exists()
    base = AutoModelForCausalLM.from_pretrained(conf["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, out).eval()
    ids = _ids(base.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, run["peft_model"](input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_adapter_export_refused_for_full_finetune(tiny_run, tmp_path):
    with pytest.raises(ModelError, match="full fine-tune"):
        run_export(_args(tiny_run["base"], tmp_path / "x", adapter=True))


def test_4bit_without_cuda_is_a_clear_error(tiny_run, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(FastchatError, match="CUDA"):
        run_export(_args(tiny_run["run"], tmp_path / "q", four_bit=True))
    assert not (tmp_path / "q").exists()


def test_export_of_an_engine_lora_checkpoint_matches_the_engine(tmp_path):
    """The engine's own LoRA (fastchat_ft.model.lora, PEFT layout) through export: the merged folder and the
    adapter loaded by peft give the engine model's logits."""
    lora = pytest.importorskip("fastchat_ft.model.lora")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from test_export_fixtures import make_base_model, make_tokenizer
    tok = make_tokenizer(tmp_path / "tok")
    make_base_model(tmp_path / "base", tok)
    engine = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    lora.add_lora(engine, r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in engine.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    conf = lora.adapter_config(engine, str(tmp_path / "base"), 8, 16, 0.0, ["q_proj", "v_proj", "up_proj"])
    lora.save_adapter(engine, run / "final", conf)
    tok.save_pretrained(run / "final")
    ids = _ids(len(tok))
    with torch.no_grad():
        ref = engine(ids).logits
    run_export(_args(run, tmp_path / "merged"))
    run_export(_args(run, tmp_path / "adapter", adapter=True))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                               tmp_path / "adapter").eval()
        via_peft = peft_model(input_ids=ids).logits
    torch.testing.assert_close(merged, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(via_peft, ref, atol=1e-4, rtol=1e-4)


def test_dataset_info_falls_back_when_analyze_cannot_run(tiny_run):
    from fastchat_ft.export_artifacts import analyze_split, split_summary
    path = tiny_run["run"] / "data" / "train.jsonl"
    d = analyze_split(path, tiny_run["run"] / "final", tiny_run["tokenizer"], {"chat_template": "no-such-template"})
    assert "analyze_error" in d
    s = split_summary(d)
    assert s["examples"] == len(tiny_run["train"]) and s["tokens"] > 0
    good = split_summary(analyze_split(path, tiny_run["run"] / "final", tiny_run["tokenizer"], {}))
    assert good["examples"] == s["examples"] and good["tokens"] == s["tokens"]  # both count template tokens
    assert good["multi_turn_ratio"] == pytest.approx(s["multi_turn_ratio"], abs=1e-4)


def test_split_files_reads_every_splits_json_form(tiny_run, tmp_path):
    from fastchat_ft.export_artifacts import split_files
    train, val = tiny_run["run"] / "data" / "train.jsonl", tiny_run["run"] / "data" / "val.jsonl"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "splits.json").write_text(json.dumps({
        "train": [{"path": str(train), "sha256": "x"}, {"path": str(tmp_path / "gone.jsonl")}],
        "val": str(val)}))
    assert split_files(tmp_path) == {"train": train, "val": val}
    (tmp_path / "data" / "val.jsonl").write_text("{}\n")  # a copied split wins over the recorded path
    assert split_files(tmp_path)["val"] == tmp_path / "data" / "val.jsonl"


@pytest.mark.parametrize("eval_steps, result, said", [
    ([0], {"stopped": "SIGINT", "val_loss_last": 6.0, "val_loss_last_step": 0},
     "6.0000 before training, the only measurement (the run was stopped (SIGINT) at step 5"),
    ([0, 3], {"stopped": "SIGINT", "val_loss_last": 4.1, "val_loss_last_step": 3},
     "6.0000 before training, 4.1000 at step 3, the last measurement (the run was stopped (SIGINT) at step 5"),
    ([0], None, "6.0000 before training, the only measurement\n"),  # a crash: no result in the manifest
])
def test_notes_of_a_stopped_run_give_its_last_measured_validation_loss(tmp_path, eval_steps, result, said):
    # a stopped run skips its final evaluation: the notes compared the step-0 loss with itself ("6.0 ... 6.0 after")
    out, _, _ = _artifacts_of_a_small_run(tmp_path, eval_steps, result)
    notes = (out / "generation_notes.md").read_text()
    assert said in notes, notes
    assert " after" not in notes, notes


@pytest.mark.parametrize("eval_steps, result, rows, note", [
    ([0], {"stopped": "SIGINT", "val_loss_last": 6.0, "val_loss_last_step": 0},
     ["| metric | before training | after training |", "| loss | 6.0000 | n/a |"],
     "Not measured after training: the run was stopped (SIGINT) at step 5, before its final evaluation; the first "
     "measurement is the only one."),
    ([0, 3], {"stopped": "SIGTERM", "val_loss_last": 4.1, "val_loss_last_step": 3},
     ["| metric | before training | last measured (step 3) |", "| loss | 6.0000 | 4.1000 |",
      "| perplexity | 387.4205 | 58.6937 |"],
     "The last column is the last measurement, not one after training: the run was stopped (SIGTERM) at step 5, "
     "before its final evaluation."),
    ([0, 3], {"val_loss_before": 6.0, "val_loss_after": 4.1}, ["| metric | before training | after training |",
                                                               "| loss | 6.0000 | 4.1000 |"], None),  # finished
])
def test_model_card_of_a_stopped_run_gives_its_last_measured_validation_loss(tmp_path, eval_steps, result, rows,
                                                                             note):
    # a stopped run skips its final evaluation: the card's "after training" was step 0's loss again (6.0 | 6.0)
    from fastchat_ft.model_card import model_card
    out, source, artifacts = _artifacts_of_a_small_run(tmp_path, eval_steps, {"stopped": None, **result})
    card = model_card(out, source, {"mode": "adapter"}, artifacts, {})
    evaluation = card[card.index("## Evaluation"):card.index("Trained for")]
    for row in rows:
        assert row in evaluation, evaluation
    assert (note in evaluation) if note else ("stopped" not in evaluation), evaluation
    assert "| loss | 6.0000 | 6.0000 |" not in evaluation, evaluation


def _artifacts_of_a_small_run(tmp_path, eval_steps, result):
    """write_artifacts on a 5-step run with validation losses 6.0 (step 0) and 4.1 (step 3) at `eval_steps` and a
    manifest with `result` (None: no result, as after a crash). Returns the output folder, source and artifacts."""
    from types import SimpleNamespace

    from fastchat_ft.export_artifacts import write_artifacts
    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    out.mkdir()
    val = {0: 6.0, 3: 4.1}
    metrics = [{"step": s, "loss": 6.0 - s / 10, "lr": 1e-4} for s in range(1, 6)]
    metrics += [{"step": s, "val_loss": val[s], "val_ppl": 2.7 ** val[s], "val_token_acc": 0.1} for s in eval_steps]
    metrics.sort(key=lambda m: m["step"])
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    manifest = {"result": {"steps": 5, "tokens_per_s": 100.0, **result}} if result else {"device": "cpu"}
    (run / "run_manifest.json").write_text(json.dumps(manifest))
    source = SimpleNamespace(run_dir=run, path=run / "checkpoints" / "step-000005", tokenizer_dir=None, base=None,
                             kind="lora")
    return out, source, write_artifacts(source, None, out)


# ----------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("flags, words", [
    (["--dtype", "bogus"], ["--dtype", "bogus"]),
    (["--check-max-new-tokens", "-5"], ["--check-max-new-tokens", "at least 1"]),
    (["--check-max-new-tokens", "0"], ["--check-max-new-tokens", "at least 1"]),
    (["--notes", "nonexist.txt"], ["--notes", "nonexist.txt", "not found"]),
])
def test_impossible_flags_are_refused_before_the_model_loads(tiny_run, tmp_path, monkeypatch, capsys, flags, words):
    import fastchat_ft.export as export_mod

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(export_mod, "load_model", no_load)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "myexp.failed").mkdir()
    (tmp_path / "myexp.failed" / "mine.txt").write_text("mine")
    assert main(["export", str(tiny_run["run"]), "--out", "myexp", *flags]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "fix:" in err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "myexp").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["myexp.failed"]
    assert (tmp_path / "myexp.failed" / "mine.txt").read_text() == "mine"  # it used to be deleted


def test_an_out_path_under_a_file_is_refused_before_the_model_loads(tiny_run, tmp_path, monkeypatch, capsys):
    import fastchat_ft.export as export_mod

    monkeypatch.setattr(export_mod, "load_model", lambda *a, **kw: pytest.fail("loaded before the check"))
    (tmp_path / "afile").write_text("x")
    assert main(["export", str(tiny_run["run"]), "--out", str(tmp_path / "afile" / "exp")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--out" in err and "is a file" in err and "fix:" in err


def test_a_failed_export_never_deletes_a_folder_it_did_not_write(tiny_run, tmp_path, monkeypatch, capsys):
    import fastchat_ft.export_artifacts as artifacts

    def broken(*a, **kw):
        raise ModelError("artifacts broke")

    monkeypatch.setattr(artifacts, "write_artifacts", broken)  # fails after the merged weights are staged
    out = tmp_path / "myexp"
    (tmp_path / "myexp.failed").mkdir()
    (tmp_path / "myexp.failed" / "mine.txt").write_text("mine")
    for _ in range(2):
        with pytest.raises(ModelError, match="artifacts broke"):
            run_export(_args(tiny_run["run"], out))
    # the user's folder is untouched; the failed export went to the next free name, and the second failure
    # replaced the first's (it carries the export's marker) instead of piling up
    assert [p.name for p in (tmp_path / "myexp.failed").iterdir()] == ["mine.txt"]
    kept = tmp_path / "myexp.failed-2"
    assert (kept / "config.json").is_file() and (kept / ".fastchat-ft-failed-export").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["myexp.failed", "myexp.failed-2"]
    assert "kept in" in capsys.readouterr().out


def test_gguf_of_an_adapter_export_is_the_merged_model_and_passes_the_self_check(tiny_run, tmp_path):
    """--adapter --gguf: the GGUF holds the merged model (llama.cpp has no use for a PEFT folder); the self-check
    used to look for it in the adapter's base model folder (OSError)."""
    out = tmp_path / "ex"
    run_export(_args(tiny_run["run"], out, adapter=True, gguf="f16"))
    assert (out / "model-f16.gguf").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "ex.failed").exists()
    assert "model-f16.gguf: GGUF for llama.cpp / Ollama (merged weights" in (out / "README.md").read_text()


def test_the_model_cards_python_snippet_runs_on_the_export(merged_export):
    # apply_chat_template(return_tensors="pt") gives a BatchEncoding in transformers 5: the card's snippet
    # passed it to generate() as a tensor and failed with an AttributeError
    import re
    card = (merged_export / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("256", "8")
    ns = {"PATH": str(merged_export)}
    exec(snippet, ns)  # noqa: S102 - our own card's code on our own export
    new = ns["out"][0, ns["inputs"]["input_ids"].shape[1]:].tolist()
    assert new and new[-1] == ns["tok"].convert_tokens_to_ids("<|im_end|>")  # the tiny model ends its turn


def test_the_adapter_cards_vllm_command_admits_the_adapters_rank(tiny_run, tmp_path):
    # the card's `vllm serve ... --enable-lora` line left vLLM's --max-lora-rank at 16: a rank-32 adapter failed there
    import shutil

    from fastchat_ft.inference import resolve_model
    from fastchat_ft.model_card import model_card
    ckpt = tmp_path / "adapter"
    shutil.copytree(tiny_run["run"] / "final", ckpt)
    conf = json.loads((ckpt / "adapter_config.json").read_text())
    (ckpt / "adapter_config.json").write_text(json.dumps({**conf, "r": 32}))
    card = model_card(tmp_path, resolve_model(ckpt), {"mode": "adapter", "adapter": {"base_copy": None}}, {}, {})
    line = next(x for x in card.splitlines() if x.startswith("vllm serve"))
    assert "--max-lora-rank 32" in line
