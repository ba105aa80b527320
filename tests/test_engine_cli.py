"""`fastchat-ft train` end to end on a tiny random Llama with the real loader (ChatDataset) and the bundled
demo data: the run directory appears, and config mistakes are reported without a traceback."""
import json
import subprocess
import sys

import pytest

from engine_fixtures import tiny_run_config
from fastchat_ft import cli, config


@pytest.fixture()
def tiny_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCHAT_FT_CACHE", str(tmp_path / "cache"))
    cfg, _ = tiny_run_config(tmp_path, 40, 6, sequence_len=128, micro_batch_size=4, gradient_accumulation_steps=1,
                             num_epochs=2, learning_rate=1e-2, lora_r=8, lora_alpha=16, evals_per_epoch=1,
                             sample_prompts=1, sample_max_new_tokens=4)
    return tmp_path, cfg


def test_train_cli_runs_end_to_end_and_validation_loss_falls(tiny_setup):
    tmp_path, cfg = tiny_setup
    out = tmp_path / "run"
    assert cli.main(["train", str(cfg), "--output-dir", str(out), "--set", "seed=3"]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert evals[0]["step"] == 0 and len(evals) >= 2
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3  # 12 steps move even a random model
    for name in ("final/adapter_model.safetensors", "final/tokenizer.json", "samples.jsonl", "data/val.jsonl"):
        assert (out / name).is_file(), name
    saved = config.load(out / "training_config.yaml")
    assert saved.seed == 3 and saved.sequence_len == 128
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["loader_stats"]["conversations"] == 40 and manifest["result"]["val_loss_after"] < 11


def test_train_cli_dry_run_exits_without_training(tiny_setup, capsys):
    tmp_path, cfg = tiny_setup
    out = tmp_path / "dry"
    assert cli.main(["train", str(cfg), "--output-dir", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "optimizer steps" in text and "s/step" in text and "<|im_start|>" in text
    assert not (out / "metrics.jsonl").exists()


def test_data_without_a_config_validates_on_its_own_held_out_share_not_the_demo(tmp_path):
    """train --data mine.jsonl on the bundled config used to validate on the demo's val.jsonl: now a val_set_size
    share of --data (5% unless set), or --val-data; a config file's own test_datasets stay; --max-steps sets
    max_steps."""
    from fastchat_ft.engine.train import train_config

    mine, theirs = tmp_path / "mine.jsonl", tmp_path / "val.jsonl"
    for p in (mine, theirs):
        p.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")

    def cfg(*argv):
        return train_config(cli.build_parser().parse_args(["train", *argv]))

    demo = cfg()
    assert [d["path"] for d in demo.test_datasets] and demo.test_datasets[0]["path"].endswith("demo/val.jsonl")
    own = cfg("--data", str(mine), "--max-steps", "7")
    assert own.test_datasets == [] and own.val_set_size == 0.05 and own.max_steps == 7
    assert cfg("--data", str(mine), "--set", "val_set_size=3").val_set_size == 3
    given = cfg("--data", str(mine), "--val-data", str(theirs))
    assert [d["path"] for d in given.test_datasets] == [str(theirs.resolve())] and given.val_set_size == 0
    yaml = tmp_path / "run.yaml"
    yaml.write_text(f"datasets:\n  - path: {mine}\ntest_datasets:\n  - path: {theirs}\n")
    kept = cfg(str(yaml), "--data", str(mine))
    assert [d["path"] for d in kept.test_datasets] == [str(theirs.resolve())]
    assert cli.main(["train", "--max-steps", "0", "--dry-run"]) == 1  # refused before anything loads


def test_config_mistakes_print_the_key_and_fix_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rank: 8\n")
    out = subprocess.run([sys.executable, "-m", "fastchat_ft", "train", str(bad)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1
    assert "lora_rank" in out.stderr and "did you mean 'lora_r'" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "fastchat_ft", "train", "--set", "adapter=lorra", "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "did you mean 'lora'" in out.stderr and "Traceback" not in out.stderr


FAKE_TORCHRUN = """import os, pathlib, signal, sys, time
mark = pathlib.Path(sys.argv[0]).with_suffix(".log")
def stop(signum, frame):  # as torchrun would: hand it to the ranks, wait for them to save, exit
    mark.write_text(mark.read_text() + f"got {signum}\\n")
    time.sleep(0.5)
    mark.write_text(mark.read_text() + "saved\\n")
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
mark.write_text(f"started as pid {os.getpid()}\\n")
time.sleep(5)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_nproc_launcher_hands_a_stop_signal_to_torchrun_and_waits(tmp_path, sig):
    # `train --nproc N` re-launches under torchrun: SIGTERM (`kill`, a container stop) killed the launcher alone,
    # leaving torchrun and its ranks training on unsignalled; Ctrl-C SIGKILLed torchrun and returned while the ranks
    # were still saving. The process now becomes torchrun, which gets the signal itself.
    import signal
    import time

    fake = tmp_path / "torchrun.py"
    fake.write_text(f"#!{sys.executable}\n" + FAKE_TORCHRUN)
    fake.chmod(0o755)
    code = ("import shutil, sys; from fastchat_ft.engine import distributed as d; "
            f"shutil.which = lambda name: {str(fake)!r}; sys.exit(d.relaunch_with_torchrun(2, ['train', 'x.yaml']))")
    launcher = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    mark = fake.with_suffix(".log")
    deadline = time.time() + 60
    while not (mark.is_file() and "started" in mark.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    launcher.send_signal(getattr(signal, sig))
    rc = launcher.wait(timeout=60)
    log = mark.read_text()
    assert f"got {int(getattr(signal, sig))}" in log and "saved" in log, log
    assert rc == 128 + int(getattr(signal, sig)), (rc, launcher.stderr.read())


def test_nproc_launcher_hands_torchrun_a_terminals_ctrl_c_once(tmp_path):
    # a terminal's Ctrl-C goes to its whole process group: with a launcher passing signals on, torchrun got it from
    # there and again from the launcher, and the second SIGINT cut its shutdown short before the ranks had saved
    import os
    import signal
    import time

    fake = tmp_path / "torchrun.py"
    fake.write_text(f"#!{sys.executable}\n" + FAKE_TORCHRUN)
    fake.chmod(0o755)
    code = ("import shutil, sys; from fastchat_ft.engine import distributed as d; "
            f"shutil.which = lambda name: {str(fake)!r}; sys.exit(d.relaunch_with_torchrun(2, ['train', 'x.yaml']))")
    launcher = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, start_new_session=True)  # its own group
    mark = fake.with_suffix(".log")
    deadline = time.time() + 60
    while not (mark.is_file() and "started" in mark.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGINT)  # as the terminal sends it
    assert launcher.wait(timeout=60) == 130
    # the two SIGINTs may merge into one delivery, so what is checked is that there is no launcher in between
    assert f"started as pid {launcher.pid}" in mark.read_text()
    assert mark.read_text().count(f"got {int(signal.SIGINT)}") == 1, mark.read_text()
