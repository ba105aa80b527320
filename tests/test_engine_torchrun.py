"""`fastchat-ft train --nproc 2` and `torchrun --nproc-per-node 2 -m fastchat_ft train` end to end on CPU (gloo)
with a tiny random Llama and the real loader: the run completes, one process writes the run directory, and the
logged losses equal a 1-process run with the same global batch (2 ranks x 1 micro-batch = 1 rank x 2)."""
import json
import os
import sys
from pathlib import Path

import pytest

from engine_fixtures import run_ok as _run
from engine_fixtures import tiny_run_config
STEPS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchrun")
    cfg, _ = tiny_run_config(tmp, 24, 4, sequence_len=128, micro_batch_size=2, gradient_accumulation_steps=1,
                             max_steps=STEPS, learning_rate=1e-2, lora_r=8, lora_alpha=16, eval_steps=STEPS,
                             sample_prompts=0, seed=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "FASTCHAT_FT_CACHE": str(tmp / "cache")}
    return tmp, cfg, env


def _losses(run: Path) -> list[float]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))  # one record per step: rank 1 logs nothing
    return [r["loss"] for r in steps]


def test_nproc_2_matches_one_process_with_the_same_global_batch(setup):
    tmp, cfg, env = setup
    cli = [sys.executable, "-m", "fastchat_ft", "train", str(cfg)]
    _run(cli + ["--output-dir", str(tmp / "one"), "--set", "gradient_accumulation_steps=2"], env, tmp)
    two = _run(cli + ["--output-dir", str(tmp / "two"), "--nproc", "2"], env, tmp)
    assert "launching:" in two.stderr and "--nproc-per-node=2" in two.stderr
    one_losses, two_losses = _losses(tmp / "one"), _losses(tmp / "two")
    # fp32 sums in a different order (all-reduce vs one process): equal to ~1e-6 relative
    assert two_losses == pytest.approx(one_losses, rel=1e-5, abs=1e-6)
    assert len(set(one_losses)) == STEPS  # the model moved: the steps differ
    # validation is split over the 2 ranks (each evaluates every other batch) and summed: 1 process's numbers
    val = {run: [(r["step"], r["val_loss"], r["val_token_acc"]) for r in map(json.loads, (tmp / run / "metrics.jsonl")
                                                                                   .read_text().splitlines())
                 if "val_loss" in r] for run in ("one", "two")}
    assert [v[0] for v in val["two"]] == [0, STEPS]
    flat = {run: [x for v in rows for x in v[1:]] for run, rows in val.items()}
    assert flat["two"] == pytest.approx(flat["one"], rel=1e-5)
    assert (tmp / "two" / "final" / "adapter_model.safetensors").is_file()
    # rank 0 alone writes the run directory: one final, one checkpoint, no leftover temp folders
    assert sorted(p.name for p in (tmp / "two" / "checkpoints").iterdir()) == [f"step-{STEPS:06d}"]
    assert not [p for p in (tmp / "two").rglob(".*tmp-*")]


def test_torchrun_module_entry_point(setup):
    tmp, cfg, env = setup
    out = tmp / "torchrun"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fastchat_ft",
          "train", str(cfg), "--output-dir", str(out), "--set", "max_steps=1"], env, tmp)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1]
    assert (out / "final" / "trainer_state.json").is_file()


def test_two_process_resume_with_dropout_is_exact(setup):
    """Each rank's RNG state is saved (rng.pt, rng-rank1.pt) and restored, so with LoRA dropout the resumed run
    draws the same masks as the uninterrupted one; without rank 1's file its masks, and so the losses, differ."""
    import shutil

    tmp, cfg, env = setup
    cli = [sys.executable, "-m", "fastchat_ft", "train", str(cfg), "--nproc", "2", "--set", "lora_dropout=0.3",
           "--set", "max_steps=4", "--set", "save_steps=2", "--set", "eval_steps=4"]
    _run(cli + ["--output-dir", str(tmp / "whole")], env, tmp)
    whole = _losses_of(tmp / "whole")
    ckpt = tmp / "whole" / "checkpoints" / "step-000002"
    assert (ckpt / "rng.pt").is_file() and (ckpt / "rng-rank1.pt").is_file()
    _run(cli + ["--output-dir", str(tmp / "resumed"), "--resume", str(ckpt)], env, tmp)
    resumed = _losses_of(tmp / "resumed")
    assert [s for s, _ in resumed] == [3, 4]
    assert [x for _, x in resumed] == pytest.approx([x for s, x in whole if s > 2], rel=1e-6, abs=1e-7)
    # the control: rank 1 without its saved state resumes with fresh dropout masks
    partial = tmp / "partial"
    shutil.copytree(ckpt, partial)
    (partial / "rng-rank1.pt").unlink()
    out = _run(cli + ["--output-dir", str(tmp / "fresh"), "--resume", str(partial)], env, tmp)
    assert "no rng-rank1.pt" in out.stderr
    fresh = [x for _, x in _losses_of(tmp / "fresh")]
    assert abs(fresh[0] - resumed[0][1]) > 1e-5


def _losses_of(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]
