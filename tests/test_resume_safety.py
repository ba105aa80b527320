"""--resume never replaces a run's later state, does nothing to a finished run, and refuses a checkpoint whose
data position no longer fits the training data (each leaves the run folder as it was)."""
import json
import shutil

import pytest
import yaml

from engine_fixtures import enter_root, fails_cleanly as _fails, snapshot as _snapshot, tiny_run_config
from fastchat_ft import cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A finished 6-step LoRA run (checkpoints at steps 3 and 6, final/) in root/runs/x, on its own copy of the data."""
    root = tmp_path_factory.mktemp("resume_safety")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTCHAT_FT_CACHE", str(root / "cache"))
        cfg, _ = tiny_run_config(root, 24, 4, sequence_len=128, micro_batch_size=1, gradient_accumulation_steps=1,
                                 sample_prompts=0, lora_r=4, lora_alpha=8, max_steps=6, save_steps=3,
                                 save_total_limit=5, eval_steps=100)
        run = root / "runs" / "x"
        assert cli.main(["train", str(cfg), "--output-dir", str(run)]) == 0
    return root, cfg, run


@pytest.fixture
def env(setup, monkeypatch):
    enter_root(setup[0], monkeypatch)
    return setup


def test_resume_from_an_older_checkpoint_keeps_the_later_ones(env, capsys):
    root, cfg, run = env
    before = _snapshot(run)
    _fails(capsys, ["train", str(cfg), "--output-dir", str(run), "--resume", str(run / "checkpoints" / "step-000003")],
           "step-000006", "final/", "--output-dir", "overwrite_output_dir")
    assert _snapshot(run) == before
    # the fix offered: the same checkpoint resumed into a new folder trains the remaining steps there
    other = root / "runs" / "from3"
    assert cli.main(["train", str(cfg), "--output-dir", str(other), "--resume",
                     str(run / "checkpoints" / "step-000003")]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert (other / "final").is_dir() and [p.name for p in (other / "checkpoints").iterdir()] == ["step-000006"]
    assert _snapshot(run) == before


@pytest.mark.parametrize("extra", [[], ["--set", "learning_rate=0.001"]])
def test_resuming_a_finished_run_writes_nothing(env, capsys, monkeypatch, extra):
    from fastchat_ft.model import load as load_mod

    _, cfg, run = env
    before = _snapshot(run)

    def no_model(*args, **kw):  # it used to build the model (and load the checkpoint) before saying so
        raise AssertionError("a model was loaded for a run that has nothing to train")

    monkeypatch.setattr(load_mod, "load_model", no_model)
    assert cli.main(["train", str(cfg), "--output-dir", str(run), "--resume", *extra]) == 0
    out = capsys.readouterr().out
    assert "already finished at step 6" in out and "max_steps" in out, out
    assert _snapshot(run) == before


def test_a_finished_checkpoint_resumed_into_a_new_folder_leaves_nothing_there(env, capsys):
    # it said "already finished" but left the new folder behind, with the tokenizer/ setup had written there
    import hashlib

    root, cfg, run = env
    before = _snapshot(run)
    last = str(run / "checkpoints" / "step-000006")
    new = root / "runs" / "more" / "x"
    assert cli.main(["train", str(cfg), "--output-dir", str(new), "--resume", last]) == 0
    assert "already finished at step 6" in capsys.readouterr().out
    assert not (root / "runs" / "more").exists()  # created by this start, parents included: all gone again
    mine = root / "mine"  # a folder that existed: what was in it stays, what this start added goes
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert cli.main(["train", str(cfg), "--output-dir", str(mine), "--resume", last]) == 0
    assert "already finished at step 6" in capsys.readouterr().out
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert _snapshot(mine) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}
    assert _snapshot(run) == before


def _data_run(root, cfg, name):
    """A config training on root/<name>.jsonl (a copy of train.jsonl) and its finished run's folder."""
    shutil.copyfile(root / "train.jsonl", root / f"{name}.jsonl")
    settings = yaml.safe_load(cfg.read_text())
    settings["datasets"] = [{"path": f"{name}.jsonl", "type": "chat_template"}]
    own = root / f"{name}.yaml"
    own.write_text(yaml.safe_dump(settings))
    run = root / "runs" / name
    assert cli.main(["train", str(own), "--output-dir", str(run)]) == 0
    return own, run


def test_resume_after_the_data_shrank_is_refused(env, capsys):
    root, cfg, _ = env
    own, run = _data_run(root, cfg, "shrunk")
    lines = (root / "shrunk.jsonl").read_text().splitlines(keepends=True)
    (root / "shrunk.jsonl").write_text("".join(lines[:2]))  # fewer rows than the checkpoint's batch position
    # a checkpoint from before the data fingerprint: the position check alone must catch it
    old = root / "old-step-3"
    shutil.copytree(run / "checkpoints" / "step-000003", old)
    state = json.loads((old / "trainer_state.json").read_text())
    assert state.pop("batch_in_epoch") == 3
    state.pop("data_fingerprint", None)
    (old / "trainer_state.json").write_text(json.dumps(dict(state, batch_in_epoch=3)))
    before = _snapshot(run)
    for ckpt in (run / "checkpoints" / "step-000003", old):
        _fails(capsys, ["train", str(own), "--output-dir", str(root / "runs" / "shrunk2"), "--resume", str(ckpt)],
               "training data", "changed", "--resume")
    assert _snapshot(run) == before and not (root / "runs" / "shrunk2").exists()


def test_resume_after_the_data_changed_is_refused(env, capsys):
    root, cfg, _ = env
    own, run = _data_run(root, cfg, "edited")
    lines = (root / "edited.jsonl").read_text().splitlines(keepends=True)
    (root / "edited.jsonl").write_text("".join(lines[1:] + lines[:1]))  # same rows, other order: other batches
    before = _snapshot(run)
    _fails(capsys, ["train", str(own), "--output-dir", str(root / "runs" / "edited2"), "--resume",
                    str(run / "checkpoints" / "step-000003")], "training data", "changed")
    assert _snapshot(run) == before and not (root / "runs" / "edited2").exists()


def test_checkpoints_and_the_final_model_get_the_normal_file_modes(env):
    """tempfile.mkdtemp stages them as 0700: another user (a serving container) could not read the model."""
    import os

    _, _, run = env
    umask = os.umask(0)
    os.umask(umask)
    for folder in (run / "final", *sorted((run / "checkpoints").iterdir())):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask, folder
        for f in folder.rglob("*"):
            assert f.stat().st_mode & 0o777 == (0o777 if f.is_dir() else 0o666) & ~umask, f


def test_a_save_stopped_while_it_replaces_a_checkpoint_leaves_none_half_deleted(tmp_path, monkeypatch):
    """A re-save of a step (a run into its folder again with overwrite_output_dir, final/ included) removed the old
    folder in place before renaming the new one there: killed part way, it left a half-deleted step-NNNNNN (or
    final/) that --resume (latest) then picked."""
    from pathlib import Path

    import torch

    from fastchat_ft.engine import checkpoint as ckpt
    from fastchat_ft.engine.schedule import build_scheduler

    monkeypatch.setattr(ckpt, "save_model_files", lambda folder, *a, **k: (folder / "weights").write_bytes(b"w"))
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    sched = build_scheduler(opt, 4, 0.0, "cosine")
    expected = {"weights", "trainer_state.json", "optimizer.pt", "scheduler.pt", "rng.pt"}
    for name in (None, "final"):
        args = (tmp_path, ckpt.TrainState(step=2), None, {"adapter": None}, tmp_path, opt, sched, 3)
        ckpt.save_checkpoint(*args, name=name)
        real = shutil.rmtree

        def killed_part_way(path, *a, **k):  # as a kill would leave it: some files gone, then nothing more runs
            files = [f for f in Path(path).iterdir() if f.is_file()] if Path(path).is_dir() else []
            files[0].unlink() if files else None
            raise KeyboardInterrupt

        monkeypatch.setattr(ckpt.shutil, "rmtree", killed_part_way)
        with pytest.raises(KeyboardInterrupt):
            ckpt.save_checkpoint(*args, name=name)
        monkeypatch.setattr(ckpt.shutil, "rmtree", real)
        for folder in [*ckpt.list_checkpoints(tmp_path), *[tmp_path / "final"] * bool(name)]:
            assert {f.name for f in folder.iterdir()} == expected, folder
    # the next save removes what the stopped ones left (a SIGKILL mid-save leaves its .step-NNNNNN.tmp-* too)
    ckpt.save_checkpoint(tmp_path, ckpt.TrainState(step=3), None, {"adapter": None}, tmp_path, opt, sched, 3)
    ckpt.save_checkpoint(tmp_path, ckpt.TrainState(step=3), None, {"adapter": None}, tmp_path, opt, sched, 3,
                         name="final")
    assert not [p.name for p in tmp_path.rglob(".*")]


def test_a_finished_run_without_its_final_model_gets_it_from_the_last_checkpoint(env, capsys):
    """A run killed while it wrote final/ (its last checkpoint at the last step) was called finished by --resume,
    which wrote nothing: final/, the folder export reads, never came."""
    root, cfg, run = env
    copy = root / "runs" / "no-final"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "final")
    (copy / ".final.tmp-killed").mkdir()  # what the killed write left
    assert cli.main(["train", str(cfg), "--output-dir", str(copy), "--resume"]) == 0
    assert "already finished at step 6" in capsys.readouterr().out
    final = _snapshot(copy / "final")
    assert final and final == _snapshot(copy / "checkpoints" / "step-000006")
    assert json.loads((copy / "final" / "trainer_state.json").read_text())["step"] == 6
    assert not (copy / ".final.tmp-killed").exists()


def test_a_rank_takes_the_copy_torchrun_passes_on_for_the_same_stop(monkeypatch):
    """A scheduler that signals every process of the job (Slurm, systemd) reaches a rank directly and again through
    torchrun: the copy aborted the rank without its checkpoint. Outside torchrun a second signal still aborts."""
    import signal

    from fastchat_ft.engine.checkpoint import StopFlag

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    with StopFlag() as stop:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # torchrun's copy, moments later
    assert stop.requested == "SIGTERM"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    with pytest.raises(KeyboardInterrupt), StopFlag():
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
