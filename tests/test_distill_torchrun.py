"""`fastchat-ft distill` under torchrun (2 gloo processes on CPU). Unit: one step's student gradients from 2
ranks, each with its own micro-batches (one rank with none), equal 1 process with all of them. End to end: the
logged losses, KL and CE equal a 1-process run with the same global batch, rank 0 alone writes the run
directory, and the final student weights agree."""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastchat_ft.engine import distill as distill_mod
from fastchat_ft.engine import distributed as dist_mod
from fastchat_ft.engine.data import micro_batches, step_rows
from fastchat_ft.engine.loss import to_device
from fastchat_ft.model.tiny import build_tiny_model, random_packed_rows, tiny_llama_config
from test_export_fixtures import make_base_model, make_conversations, make_tokenizer, write_jsonl

pytestmark = pytest.mark.usefixtures("gloo_on_cpu")  # gloo on CPU, also on a GPU machine

STEPS = 4
VOCAB, MICRO, ACCUM = 211, 2, 2


def _tiny(seed: int, hidden: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(VOCAB, hidden=hidden, layers=2, heads=4, kv_heads=2, intermediate=48))


def _step(world: int, rank: int, n_rows: int):
    rows = random_packed_rows(n_rows, VOCAB, seed=4)
    idx = step_rows(len(rows), MICRO, ACCUM * 2, seed=1, epoch=0, step_in_epoch=0)
    mine = idx[rank * ACCUM:(rank + 1) * ACCUM] if world > 1 else idx
    student, teacher = _tiny(0, 32).train(), _tiny(1, 48).eval().requires_grad_(False)
    batches = [to_device(b, torch.device("cpu")) for b in micro_batches(rows, mine)]
    opts = distill_mod.DistillOptions(teacher="unused", loss="jsd", alpha=0.6, temperature=1.5)
    rep = dist_mod.replicate(student)
    parts = distill_mod.distill_step(student, teacher, batches, opts, VOCAB, contextlib.nullcontext(), rep)
    return parts, {k: p.grad.clone() for k, p in student.named_parameters()}


def _worker(rank, store, out, n_rows):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.save(_step(2, rank, n_rows), f"{out}.{rank}")
    dist_mod.shutdown()


@pytest.mark.parametrize("n_rows", [3], ids=["rank-without-batches"])  # the end-to-end test has both ranks busy
def test_distill_step_on_two_ranks_matches_one_process(tmp_path, n_rows):
    out = str(tmp_path / "grads")
    mp.spawn(_worker, args=(str(tmp_path / "store"), out, n_rows), nprocs=2, join=True)
    parts1, g1 = _step(1, 0, n_rows)
    for rank in (0, 1):
        parts2, g2 = torch.load(f"{out}.{rank}", weights_only=True)
        assert parts2["n_label"] == parts1["n_label"] > 0
        for key in ("loss", "kl", "ce"):
            assert parts2[key] == pytest.approx(parts1[key], rel=1e-6), key
        for k in g1:
            torch.testing.assert_close(g2[k], g1[k], rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_torchrun")
    tok = make_tokenizer(root / "tok")
    make_base_model(root / "teacher", tok)
    build_tiny_model(root / "student", root / "tok", seed=1)
    write_jsonl(root / "train.jsonl", make_conversations(40, seed=1))
    write_jsonl(root / "val.jsonl", make_conversations(6, seed=2))
    return root


def _distill(root, out, accum: int, launcher: list[str], extra: tuple = ()):
    cmd = launcher + ["-m", "fastchat_ft", "distill", "--teacher", str(root / "teacher"), "--student",
                      str(root / "student"), "--data", str(root / "train.jsonl"), "--val-data", str(root / "val.jsonl"),
                      "--loss", "forward_kl", "--alpha", "0.7", "--temperature", "2", "--learning-rate", "3e-3",
                      "--max-steps", str(STEPS), "--output-dir", str(out),
                      "--set", "micro_batch_size=2", "--set", f"gradient_accumulation_steps={accum}",
                      "--set", "sequence_len=128", "--set", f"eval_steps={STEPS}", "--set", "save_steps=2",
                      "--set", "sample_prompts=0", "--set", "warmup_ratio=0", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "FASTCHAT_FT_CACHE": str(root / "cache")}
    res = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert ("launching:" in res.stderr) == bool(extra)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_process_distill_matches_one_process(models):
    one = _distill(models, models / "one", 2, [sys.executable])
    two = _distill(models, models / "two", 1, [sys.executable], ["--nproc", "2"])  # re-launches under torchrun
    steps_one = [r for r in one if "loss" in r]
    steps_two = [r for r in two if "loss" in r]
    assert [r["step"] for r in steps_two] == list(range(1, STEPS + 1))  # rank 0 alone logs
    for key in ("loss", "kl", "ce"):  # fp32 sums in another order: equal to ~1e-6 relative
        assert [r[key] for r in steps_two] == pytest.approx([r[key] for r in steps_one], rel=1e-5), key
    assert len({r["loss"] for r in steps_one}) == STEPS
    val_one = [r["val_kl"] for r in one if "val_kl" in r]
    val_two = [r["val_kl"] for r in two if "val_kl" in r]
    assert len(val_two) == 2 and val_two == pytest.approx(val_one, rel=1e-5) and val_two[1] < val_two[0]
    from safetensors.torch import load_file

    w1 = load_file(str(models / "one" / "final" / "model.safetensors"))
    w2 = load_file(str(models / "two" / "final" / "model.safetensors"))
    # Training moves each weight by ~7.5e-3 here (lr 3e-3); the two runs' fp32 sums in different orders (a merged
    # step row vs one micro-batch per rank) differ by ~1e-7 relative, and Adam's g / sqrt(v) turns that into up to
    # ~1e-5 on weights whose gradient is near zero (seen: 9.7e-6 on one gate_proj element of 8192 with the native
    # CPU kernels, 3.7e-6 with only the attention one). 2e-5 is 0.3% of the update; the per-step losses above agree to 1e-5.
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=2e-5)
    ckpt = models / "two" / "checkpoints" / "step-000002"
    assert (ckpt / "rng.pt").is_file() and (ckpt / "rng-rank1.pt").is_file()
    assert not [p for p in (models / "two").rglob(".*tmp-*")]
