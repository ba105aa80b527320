"""Bad input to `train` and `distill`: each is a clear error (no traceback) naming the flag, key or file and a fix,
given before a model loads where the value alone decides; existing runs and inputs are left as they were."""
import hashlib

import pytest

from engine_fixtures import enter_root, fails_cleanly as _fails, snapshot as _snapshot, tiny_run_config
from fastchat_ft import cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model, data, config and a finished 2-step LoRA run in root/runs/tinyrun."""
    root = tmp_path_factory.mktemp("bad_input")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTCHAT_FT_CACHE", str(root / "cache"))
        cfg, model = tiny_run_config(root, 12, 4, sequence_len=128, micro_batch_size=4, gradient_accumulation_steps=1,
                                     sample_prompts=0, lora_r=4, lora_alpha=8)
        run = root / "runs" / "tinyrun"
        assert cli.main(["train", str(cfg), "--output-dir", str(run), "--set", "max_steps=2"]) == 0
    return root, cfg, model, run


@pytest.fixture
def env(setup, monkeypatch):
    enter_root(setup[0], monkeypatch)
    return setup


@pytest.fixture
def no_model_load(monkeypatch):
    """A check that ran after the model started loading fails the test (and its traceback fails _fails)."""
    def refuse(*_a, **_kw):
        raise AssertionError("a model was looked up before the bad value was refused")

    for name in ("resolve_base_model", "load_model"):
        monkeypatch.setattr(f"fastchat_ft.model.load.{name}", refuse)


def _distill(model, *more):
    return ["distill", "--teacher", str(model), "--student", str(model), "--data", "train.jsonl",
            "--val-data", "val.jsonl", "--max-steps", "2", "--set", "micro_batch_size=4",
            "--set", "sequence_len=128", "--set", "sample_prompts=0", *more]


def test_distill_refuses_to_overwrite_an_existing_run(env, capsys):
    root, _, model, run = env
    before = _snapshot(run)
    _fails(capsys, _distill(model, "--output-dir", str(run)), "already holds a run", "--resume",
           "overwrite_output_dir")
    assert _snapshot(run) == before  # final/, training_config.yaml, run_manifest.json, metrics: all as they were


@pytest.mark.parametrize("command", ["train", "distill"])
def test_an_output_dir_that_is_a_file_is_refused_up_front(env, capsys, no_model_load, command):
    root, cfg, model, _ = env
    (root / "small.jsonl").write_text("keep me\n")
    argv = (["train", str(cfg)] if command == "train" else _distill(model)) + ["--output-dir", "small.jsonl"]
    _fails(capsys, argv, "--output-dir", "small.jsonl", "is a file")
    assert (root / "small.jsonl").read_text() == "keep me\n"


@pytest.mark.parametrize("command", ["train", "distill"])
def test_nproc_below_one_is_refused(env, capsys, no_model_load, command):
    root, cfg, model, _ = env
    argv = (["train", str(cfg), "--dry-run"] if command == "train" else _distill(model)) + ["--nproc", "0"]
    _fails(capsys, argv + ["--output-dir", "runs/nproc"], "--nproc", "at least 1")
    assert not (root / "runs" / "nproc").exists()


@pytest.mark.parametrize("command", ["train", "distill"])
@pytest.mark.parametrize("setting, key", [("seed=-1", "seed"), ("num_epochs=.nan", "num_epochs"),
                                          ("learning_rate=.inf", "learning_rate")])
def test_impossible_config_values_are_refused_before_the_model_loads(env, capsys, no_model_load, command, setting, key):
    root, cfg, model, _ = env
    argv = ["train", str(cfg), "--dry-run"] if command == "train" else _distill(model)
    _fails(capsys, argv + ["--set", setting, "--output-dir", "runs/values"], f"'{key}'")
    assert not (root / "runs" / "values").exists()


def test_a_folder_given_as_data_or_config_says_it_is_a_folder(env, capsys, no_model_load):
    root, cfg, model, _ = env
    (root / "afolder").mkdir(exist_ok=True)
    _fails(capsys, ["train", str(cfg), "--data", "afolder", "--output-dir", "runs/f"], "afolder", "--data",
           "is a folder")
    _fails(capsys, ["train", "afolder"], "afolder", "is a folder")
    _fails(capsys, _distill(model, "--output-dir", "runs/f")[:5] + ["--data", "afolder"], "--data", "is a folder")
    assert not (root / "runs" / "f").exists()


def test_a_missing_data_file_fix_fits_where_the_path_came_from(env, capsys, no_model_load):
    root, cfg, model, _ = env
    err = _fails(capsys, ["train", str(cfg), "--data", "nonexist.jsonl", "--output-dir", "runs/m"],
                 "nonexist.jsonl", "--data", "not found", "current folder")
    assert "config file" not in err  # no config file named that path
    argv = _distill(model, "--output-dir", "runs/m")
    argv[argv.index("train.jsonl")] = "nonexist.jsonl"
    err = _fails(capsys, argv, "nonexist.jsonl", "--data", "current folder")
    assert "config file" not in err
    # named in the config file: relative to that file
    _fails(capsys, ["train", str(cfg), "--set", "test_datasets=[{path: gone.jsonl}]", "--output-dir", "runs/m"],
           "gone.jsonl", "test_datasets")
    bad = root / "bad.yaml"
    bad.write_text(cfg.read_text().replace("val.jsonl", "gone.jsonl"))
    _fails(capsys, ["train", str(bad), "--output-dir", "runs/m"], "gone.jsonl", "relative to that file")
    assert not (root / "runs" / "m").exists()


def test_a_failed_run_leaves_no_empty_run_folder_and_keeps_an_existing_one(env, capsys):
    root, cfg, _, _ = env
    _fails(capsys, ["train", str(cfg), "--set", "base_model=nonexist_model", "--output-dir", "new/deep/run"],
           "nonexist_model")
    assert not (root / "new").exists()  # the run created new/deep/run: all of it goes again
    existing = root / "mine"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    _fails(capsys, ["train", str(cfg), "--set", "base_model=nonexist_model", "--output-dir", str(existing)],
           "nonexist_model")
    assert _snapshot(existing) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}
    (root / "empty").mkdir()
    _fails(capsys, ["train", str(cfg), "--set", "base_model=nonexist_model", "--output-dir", "empty"],
           "nonexist_model")
    assert (root / "empty").is_dir()  # it existed before the run: never removed


def test_resuming_a_checkpoint_of_another_shape_is_a_clear_error(env, capsys):
    root, cfg, _, run = env
    before = _snapshot(run)
    ckpt = run / "checkpoints" / "step-000002"
    # lora_r 8 vs the checkpoint's 4: the same key names, other shapes (as another base model's hidden size)
    _fails(capsys, ["train", str(cfg), "--output-dir", "runs/other", "--resume", str(ckpt), "--set", "max_steps=3",
                    "--set", "lora_r=8"], str(ckpt), "do not fit", "(4, ", "(8, ", "base_model")
    # a LoRA checkpoint resumed as a full fine-tune
    _fails(capsys, ["train", str(cfg), "--output-dir", "runs/other", "--resume", str(ckpt), "--set", "max_steps=3",
                    "--set", "adapter=null"], str(ckpt), "--resume", "no full model weights")
    assert _snapshot(run) == before
    assert not (root / "runs" / "other").exists()


def test_distill_resuming_a_checkpoint_of_another_shape_is_a_clear_error(env, capsys):
    root, _, model, run = env
    before = _snapshot(run)
    ckpt = run / "checkpoints" / "step-000002"  # lora_r 4; distill's LoRA here is lora_r 16
    # --max-steps 3: at 2 the run is finished, which is said before any model (or checkpoint) is loaded
    _fails(capsys, _distill(model, "--adapter", "lora", "--max-steps", "3", "--output-dir", "runs/d_other",
                            "--resume", str(ckpt)), str(ckpt), "do not fit")
    assert _snapshot(run) == before
    assert not (root / "runs" / "d_other").exists()


def test_a_run_stopped_before_its_first_checkpoint_is_not_overwritten(env, capsys):
    root, cfg, _, _ = env
    early = root / "runs" / "early"
    early.mkdir(parents=True)
    (early / "metrics.jsonl").write_text('{"step": 1, "loss": 3.2}\n')  # what such a run leaves besides its config
    before = _snapshot(early)
    err = _fails(capsys, ["train", str(cfg), "--output-dir", str(early)], "already holds a run", "metrics.jsonl",
                 "--output-dir")
    assert "--resume" not in err  # no checkpoint to resume from: that fix would fail again
    assert _snapshot(early) == before


def test_a_dry_run_writes_nothing_into_an_existing_run(env, capsys):
    root, cfg, _, run = env
    before = _snapshot(run)
    assert cli.main(["train", str(cfg), "--dry-run", "--output-dir", str(run), "--set", "chat_template=llama3"]) == 0
    assert _snapshot(run) == before  # its tokenizer/ (extended for another template) stays as the run left it


def test_a_dry_run_into_a_new_folder_leaves_no_folder_behind(env, capsys):
    root, cfg, _, _ = env
    assert cli.main(["train", str(cfg), "--dry-run", "--output-dir", "dry/new"]) == 0
    assert not (root / "dry").exists()


def test_train_called_directly_names_a_folder_given_as_dataset(env):
    from fastchat_ft.config import load
    from fastchat_ft.engine.train import train
    from fastchat_ft.errors import DataError

    root, cfg_path, _, _ = env
    cfg = load(str(cfg_path), [])
    cfg.datasets = [{"path": str(root), "type": "chat_template"}]  # skips the CLI's up-front checks
    cfg.output_dir = str(root / "runs" / "direct")
    with pytest.raises(DataError, match="is a folder"):
        train(cfg, dry_run=True)


def test_distill_blames_a_bad_set_value_on_the_set_item(env, capsys, no_model_load):
    _, _, model, _ = env
    _fails(capsys, _distill(model, "--set", "max_step=3", "--output-dir", "runs/s"), "--set max_step=3",
           "unknown key")


def test_distill_resume_of_a_finished_run_does_nothing_and_an_older_checkpoint_is_refused(env, capsys):
    root, _, model, _ = env
    run = root / "runs" / "dfin"
    assert cli.main(_distill(model, "--output-dir", str(run), "--set", "save_steps=1")) == 0
    capsys.readouterr()
    before = _snapshot(run)
    assert cli.main(_distill(model, "--output-dir", str(run), "--resume")) == 0
    assert "already finished at step 2" in capsys.readouterr().out
    older = run / "checkpoints" / "step-000001"
    assert (older / "trainer_state.json").is_file() and (run / "final").is_dir()
    _fails(capsys, _distill(model, "--output-dir", str(run), "--resume", str(older)), "--resume", "final")
    assert _snapshot(run) == before  # final/, the newer checkpoint and the record: as they were


@pytest.mark.parametrize("stopped, status", [("SIGINT", 130), ("SIGTERM", 143), (None, 0)])
def test_a_run_stopped_by_a_signal_exits_non_zero(env, monkeypatch, stopped, status):
    """`train && export` must not go on with a half-trained model: a stop (checkpoint saved) is 128 + signal."""
    from fastchat_ft.engine import train as train_mod

    _, cfg, _, _ = env
    monkeypatch.setattr(train_mod, "train", lambda *a, **kw: {"stopped": stopped, "steps": 1})
    assert cli.main(["train", str(cfg), "--output-dir", "runs/sig"]) == status
