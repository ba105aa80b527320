"""The train loop on a tiny random Llama with synthetic packed rows: the run directory contract, resume
giving exactly the uninterrupted run, NaN handling, and the dry run's estimates."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import shared_path
from fastchat_ft import config
from fastchat_ft.errors import ConfigError
from fastchat_ft.engine import train as train_mod
from fastchat_ft.engine.data import RunData
from fastchat_ft.engine.diagnostics import TrainingDiverged
from fastchat_ft.model.tiny import build_tiny_model, random_packed_rows


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), shared_path("tokenizers", "smollm2"))


def make_cfg(tiny_dir, out, **kw):
    base = {"base_model": str(tiny_dir), "datasets": [{"path": "unused.jsonl"}], "output_dir": str(out),
            "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 6, "learning_rate": 5e-3,
            "eval_steps": 3, "save_steps": 3, "sample_prompts": 0, "lora_r": 4, "lora_alpha": 8, "seed": 5}
    base.update(kw)
    return config.from_dict(base)


def make_data(tmp_path, n_rows=10):
    val_file = tmp_path / "val.jsonl"
    val_file.write_text(json.dumps({"messages": [{"role": "user", "content": "Say hi."},
                                                 {"role": "assistant", "content": "Hi."}]}) + "\n")
    return RunData(random_packed_rows(n_rows, 2000, seed=1), random_packed_rows(3, 2000, seed=2),
                   [val_file], [val_file])


def test_run_directory_follows_the_contract(tiny_dir, tmp_path):
    out = tmp_path / "run"
    summary = train_mod.train(make_cfg(tiny_dir, out, sample_prompts=1, sample_max_new_tokens=4),
                              data=make_data(tmp_path), show_bar=False)
    for name in ("training_config.yaml", "run_manifest.json", "metrics.jsonl", "samples.jsonl", "loss_curve.png",
                 "data/train.jsonl", "data/splits.json", "final/adapter_model.safetensors", "final/trainer_state.json"):
        assert (out / name).is_file(), name
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000003", "step-000006"]
    ck = out / "checkpoints" / "step-000006"
    for name in ("adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "optimizer.pt",
                 "scheduler.pt", "rng.pt", "tokenizer.json", "tokenizer_config.json"):
        assert (ck / name).is_file(), name
    keys = load_file(str(ck / "adapter_model.safetensors")).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    conf = json.loads((ck / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(tiny_dir.resolve()) and conf["r"] == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all({"val_ppl", "val_token_acc"} <= r.keys() for r in evals)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(r["tokens_per_s"] > 0 and r["lr"] >= 0 for r in steps)
    assert summary["train_losses"][-1] < summary["train_losses"][0]
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["versions"]["torch"] and manifest["data"]["train"][0]["sha256"] and manifest["end_time"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {0, 3, 6} and all("output" in s for s in samples)
    assert config.load(out / "training_config.yaml").lora_r == 4


def test_a_new_run_never_replaces_an_earlier_one_silently(tiny_dir, tmp_path):
    out, data = tmp_path / "run", make_data(tmp_path)
    train_mod.train(make_cfg(tiny_dir, out, max_steps=1, eval_steps=100, save_steps=100), data=data, show_bar=False)
    before = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError) as err:
        train_mod.train(make_cfg(tiny_dir, out, max_steps=1), data=data, show_bar=False)
    assert err.value.field == "output_dir" and "final" in str(err.value)
    # no checkpoints/ (save_steps 100): --resume would fail, so the fix offers a new folder or the overwrite
    assert "--resume" not in err.value.fix and "--output-dir" in err.value.fix and "overwrite_output_dir" in err.value.fix
    assert (out / "metrics.jsonl").read_bytes() == before  # nothing of the earlier run was touched
    summary = train_mod.train(make_cfg(tiny_dir, out, max_steps=1, overwrite_output_dir=True), data=data,
                              show_bar=False)
    assert summary["steps"] == 1


def test_a_run_killed_in_its_first_save_is_not_offered_a_resume(tmp_path):
    # checkpoints/ held only the killed save's staging folder: the refusal offered --resume, which found nothing
    out = tmp_path / "run"
    (out / "checkpoints" / ".step-000002.tmp-killed").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(ConfigError) as err:
        train_mod.refuse_to_overwrite(out)
    assert "metrics.jsonl" in str(err.value) and "checkpoints" not in str(err.value)
    assert "--resume" not in err.value.fix and "overwrite_output_dir" in err.value.fix


def test_overwrite_output_dir_replaces_the_earlier_run(tiny_dir, tmp_path):
    # the earlier run's checkpoints (later steps) stayed and save_total_limit pruned the new run's own instead; its
    # final/ then made --resume say the run had finished at the earlier run's step; its samples stayed too
    data, kw = make_data(tmp_path), dict(sample_prompts=1, sample_max_new_tokens=2, eval_steps=100)
    out = tmp_path / "run"
    train_mod.train(make_cfg(tiny_dir, out, **kw), data=data, show_bar=False)
    again = dict(kw, max_steps=4, save_steps=1, save_total_limit=2)
    train_mod.train(make_cfg(tiny_dir, out, overwrite_output_dir=True, **again), data=data, show_bar=False,
                    stop_after=2)
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000001", "step-000002"]
    assert not (out / "final").exists()
    assert {json.loads(x)["step"] for x in (out / "samples.jsonl").read_text().splitlines()} == {0}
    summary = train_mod.train(make_cfg(tiny_dir, out, **again), data=data, show_bar=False, resume="latest")
    assert summary["steps"] == 4 and len(summary["train_losses"]) == 2


def test_resuming_another_folders_checkpoint_never_takes_over_a_run_there(tiny_dir, tmp_path):
    # --resume PATH skipped the check: into a folder holding a stopped run with older checkpoints, it trained on
    # there, keeping that run's metrics up to its own step and pruning that run's checkpoints
    from engine_fixtures import snapshot

    data, kw = make_data(tmp_path), dict(save_steps=100, eval_steps=100)
    train_mod.train(make_cfg(tiny_dir, tmp_path / "x", **kw), data=data, show_bar=False, stop_after=2)
    train_mod.train(make_cfg(tiny_dir, tmp_path / "y", **kw), data=data, show_bar=False, stop_after=1)
    before = snapshot(tmp_path / "y")
    with pytest.raises(ConfigError) as err:
        train_mod.train(make_cfg(tiny_dir, tmp_path / "y", **kw), data=data, show_bar=False,
                        resume=str(tmp_path / "x" / "checkpoints" / "step-000002"))
    assert err.value.field == "output_dir" and "checkpoints" in str(err.value)
    assert snapshot(tmp_path / "y") == before
    # its own checkpoint, named as a path, resumes as --resume alone does
    summary = train_mod.train(make_cfg(tiny_dir, tmp_path / "y", **kw), data=data, show_bar=False,
                              resume=str(tmp_path / "y" / "checkpoints" / "step-000001"))
    assert summary["steps"] == 6


@pytest.mark.parametrize("adapter", ["lora", None])
def test_resume_gives_the_uninterrupted_run(tiny_dir, tmp_path, adapter):
    # 10 rows / (2 x 2) = 3 steps per epoch: the resume point (step 4) is inside the second epoch;
    # lora_dropout makes the result depend on the restored RNG state too
    kw = dict(adapter=adapter, lora_dropout=0.1, max_steps=7, save_steps=2, eval_steps=100)
    data = make_data(tmp_path)
    full = train_mod.train(make_cfg(tiny_dir, tmp_path / "a", **kw), data=data, show_bar=False)
    part = train_mod.train(make_cfg(tiny_dir, tmp_path / "b", **kw), data=data, show_bar=False, stop_after=4)
    assert part["stopped"] and not (tmp_path / "b" / "final").exists()
    rest = train_mod.train(make_cfg(tiny_dir, tmp_path / "b", **kw), data=data, show_bar=False, resume="latest")
    assert part["train_losses"] + rest["train_losses"] == full["train_losses"]
    weights = "adapter_model.safetensors" if adapter else "model.safetensors"
    a, b = load_file(str(tmp_path / "a" / "final" / weights)), load_file(str(tmp_path / "b" / "final" / weights))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, 8))


def test_nan_loss_stops_with_the_step_or_is_skipped(tiny_dir, tmp_path, monkeypatch):
    real = train_mod.backward_step
    calls = {"n": 0}

    def flaky(model, batches, mode, amp):
        calls["n"] += 1
        loss, n = real(model, batches, mode, amp)
        return (float("nan"), n) if calls["n"] == 2 else (loss, n)

    monkeypatch.setattr(train_mod, "backward_step", flaky)
    with pytest.raises(TrainingDiverged, match="step 2.*packed rows"):
        train_mod.train(make_cfg(tiny_dir, tmp_path / "x"), data=make_data(tmp_path), show_bar=False)
    calls["n"] = 0
    summary = train_mod.train(make_cfg(tiny_dir, tmp_path / "y"), data=make_data(tmp_path), show_bar=False,
                              skip_bad_batches=True)
    assert summary["steps"] == 6
    records = [json.loads(x) for x in (tmp_path / "y" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [2]


def test_dry_run_estimates_and_trains_nothing(tiny_dir, tmp_path, capsys):
    out = tmp_path / "dry"
    result = train_mod.train(make_cfg(tiny_dir, out, dry_run_steps=2), data=make_data(tmp_path), dry_run=True)
    text = capsys.readouterr().out
    assert result["dry_run"] and result["steps"] == 6 and result["sec_per_step"] > 0
    assert result["peak_memory_gb"] > 0 and result["trainable_params"] > 0
    for words in ("trainable parameters", "packed rows", "s/step", "memory", "first packed rows"):
        assert words in text
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_sigterm_saves_a_checkpoint_and_stops(tiny_dir, tmp_path, monkeypatch):
    import signal

    real = train_mod.backward_step
    calls = {"n": 0}

    def term_at_two(model, batches, mode, amp):
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(signal.SIGTERM)  # as `kill` or a cluster scheduler would send it
        return real(model, batches, mode, amp)

    monkeypatch.setattr(train_mod, "backward_step", term_at_two)
    out = tmp_path / "term"
    summary = train_mod.train(make_cfg(tiny_dir, out, save_steps=100, eval_steps=100), data=make_data(tmp_path),
                              show_bar=False)
    assert summary["stopped"] == "SIGTERM" and summary["steps"] == 2
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert json.loads((out / "checkpoints" / "step-000002" / "trainer_state.json").read_text())["step"] == 2
    assert not (out / "final").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed afterwards


def test_a_stop_asked_between_steps_still_saves_a_checkpoint(tiny_dir, tmp_path, monkeypatch):
    # a signal during the loop's own work after a step (an evaluation here; logging, a save) ended the loop
    # without a checkpoint: exit 143 and "saving a checkpoint" said, yet the steps since the last save were lost
    import signal

    real = train_mod.evaluate
    calls = {"n": 0}

    def term_in_second_eval(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-2 evaluation (step 0's is the first)
            signal.raise_signal(signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "evaluate", term_in_second_eval)
    out = tmp_path / "term"
    summary = train_mod.train(make_cfg(tiny_dir, out, eval_steps=2, save_steps=100), data=make_data(tmp_path),
                              show_bar=False)
    assert summary["stopped"] == "SIGTERM" and summary["steps"] == 3  # the step under way when it was seen
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000003"]
    assert not (out / "final").exists()


def test_a_stop_seen_after_the_last_step_still_finishes_the_run(tiny_dir, tmp_path):
    # a stop after the last step skipped final/ and reported "stopped early at step 6 of 6" (exit 130/143); a
    # --resume then said the run had finished, so final/ was never written
    out = tmp_path / "run"
    summary = train_mod.train(make_cfg(tiny_dir, out, save_steps=100, eval_steps=100), data=make_data(tmp_path),
                              show_bar=False, stop_after=6)
    assert summary["stopped"] is None and summary["steps"] == 6
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert train_mod.stopped_status(summary) == 0


@pytest.mark.parametrize("eval_steps, stop, said", [
    (100, 2, "validation loss: none measured since the start (step 0: "), (2, 3, "last validation loss: ")])
def test_a_stopped_run_reports_its_last_validation_loss_not_a_before_after(tiny_dir, tmp_path, capsys, eval_steps,
                                                                          stop, said):
    # the final evaluation is skipped on a stop: the summary printed (and the manifest held) step 0's
    # validation loss "->" itself as the run's before/after
    out = tmp_path / "run"
    summary = train_mod.train(make_cfg(tiny_dir, out, eval_steps=eval_steps, save_steps=100), data=make_data(tmp_path),
                              show_bar=False, stop_after=stop)
    text = capsys.readouterr().out
    last = summary["val"][-1]
    assert last["step"] == (0 if eval_steps > stop else 2)
    assert f"{said}{last['val_loss']:.4f}" in text and f"at step {stop} of 6" in text, text
    assert not [line for line in text.splitlines() if "validation loss" in line and "->" in line], text
    result = json.loads((out / "run_manifest.json").read_text())["result"]
    assert "val_loss_before" not in result and "val_loss_after" not in result
    assert (result["val_loss_last"], result["val_loss_last_step"]) == (last["val_loss"], last["step"])


def test_a_resumed_run_counts_all_its_steps(tiny_dir, tmp_path, capsys):
    # the summary and the manifest's result counted the last session's steps only (4 here, not 6)
    out, data, kw = tmp_path / "run", make_data(tmp_path), dict(save_steps=100, eval_steps=100)
    train_mod.train(make_cfg(tiny_dir, out, **kw), data=data, show_bar=False, stop_after=2)
    capsys.readouterr()
    summary = train_mod.train(make_cfg(tiny_dir, out, **kw), data=data, show_bar=False, resume="latest")
    assert summary["steps"] == 6 and summary["session_steps"] == len(summary["train_losses"]) == 4
    assert "trained 6 steps (4 in this session)" in capsys.readouterr().out
    assert json.loads((out / "run_manifest.json").read_text())["result"]["steps"] == 6


def test_each_data_file_is_hashed_once_a_start(tiny_dir, tmp_path, monkeypatch):
    # the resume data fingerprint hashed the training files again after the run manifest had
    import hashlib

    from fastchat_ft.engine import data as data_mod, rundir

    real, hashed = data_mod.file_digest, []

    def counted(path):
        hashed.append(str(path))
        return real(path)

    monkeypatch.setattr(data_mod, "file_digest", counted)
    monkeypatch.setattr(rundir, "file_digest", counted, raising=False)  # the manifest's own import, before
    out, data = tmp_path / "run", make_data(tmp_path)  # one file, as the training and the validation data
    train_mod.train(make_cfg(tiny_dir, out, max_steps=1, eval_steps=100), data=data, show_bar=False)
    assert hashed == [str(data.train_files[0])]
    digest = real(data.train_files[0])
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["data"]["train"][0]["sha256"] == manifest["data"]["val"][0]["sha256"] == digest
    state = json.loads((out / "final" / "trainer_state.json").read_text())  # the fingerprint as before
    assert state["data_fingerprint"] == f"10 rows, files {hashlib.sha256(digest.encode()).hexdigest()[:16]}"


def test_a_start_on_data_files_hashes_each_once_loader_cache_included(tiny_dir, tmp_path, monkeypatch):
    # the loader's cache key hashed the files' bytes (blake2b) before the manifest hashed them again (sha256)
    import hashlib

    from engine_fixtures import DEMO
    from fastchat_ft.engine import data as data_mod

    fed = []  # for each hash object made during the start: every byte given to it

    class Counted:
        def __init__(self, h, data=b""):
            self.h, self.seen = h, bytearray(data)
            fed.append(self.seen)

        def update(self, data):
            self.seen += data
            self.h.update(data)

        def __getattr__(self, name):
            return getattr(self.h, name)

    for name in ("md5", "sha1", "sha256", "blake2b"):
        monkeypatch.setattr(hashlib, name, lambda data=b"", _make=getattr(hashlib, name), **kw:
                            Counted(_make(data, **kw), data))
    monkeypatch.setenv("FASTCHAT_FT_CACHE", str(tmp_path / "cache"))
    files = {}
    for name, lines in (("train.jsonl", 12), ("val.jsonl", 3)):
        files[name] = tmp_path / name
        files[name].write_text("".join((DEMO / name).read_text().splitlines(keepends=True)[:lines]))
    cfg = make_cfg(tiny_dir, tmp_path / "run", datasets=[{"path": str(files["train.jsonl"])}],
                   test_datasets=[{"path": str(files["val.jsonl"])}], system_prompt="", sequence_len=256,
                   max_steps=1, eval_steps=100, save_steps=100)
    train_mod.train(cfg, show_bar=False)
    times = {name: sum(path.read_bytes() in bytes(seen) for seen in fed) for name, path in files.items()}
    assert times == {"train.jsonl": 1, "val.jsonl": 1}
    manifest = json.loads((tmp_path / "run" / "run_manifest.json").read_text())
    assert manifest["data"]["train"][0]["sha256"] == data_mod.file_digest(files["train.jsonl"])
