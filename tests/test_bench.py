"""`fastchat-ft bench` machinery on a tiny random Llama: the three runs (HF Trainer padded, HF Trainer flattened,
fastchat-ft) give the same loss at every step (reference: HF Trainer + PEFT), the JSON has its fields, a
disagreement fails the bench, the engine reads the plan's micro-batches in plan order, and the FLOP count's
forward part equals torch's FlopCounterMode on the engine's own forward."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared_path
from fastchat_ft import bench
from fastchat_ft.bench_runners import rows_in_engine_order
from fastchat_ft.cli import build_parser
from fastchat_ft.model.tiny import build_tiny_model


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    model = build_tiny_model(tmp / "tiny", shared_path("tokenizers", "smollm2"), seed=3, layers=2, hidden=48,
                             heads=4, kv_heads=2, intermediate=80)
    args = build_parser().parse_args(["bench", "--base-model", str(model), "--steps", "3", "--out", str(tmp / "out"),
                                      "--threads", "1", "--micro-batch", "3", "--grad-accum", "2", "--lora-r", "4"])
    code = bench.run_bench(args)
    doc = json.loads((tmp / "out" / "vs_hf_trainer-cpu.json").read_text())
    return code, doc, tmp / "out"


def test_three_runs_agree_step_by_step_and_json_has_the_fields(bench_result):
    code, doc, out = bench_result
    assert code == 0
    for key in ("date", "machine", "versions", "load_average", "baselines", "command"):
        assert key in doc
    assert {"torch", "transformers", "peft"} <= set(doc["versions"])
    res = doc["results"][0]
    assert res["losses_agree"] and res["disagreements"] == []
    assert res["plan"]["steps"] == 3 and res["plan"]["micro_batch"] == 3 and res["plan"]["grad_accum"] == 2
    assert len(res["schedule"]) == 3 * 3 * 2
    runs = res["runs"]
    ref = runs["hf_padded"]["losses"]
    assert len(ref) == 3
    for name in bench.RUNNERS:
        r = runs[name]
        for key in ("data_prep_s", "tokens_per_s", "trainable_tokens_per_s", "step_time_s", "mfu", "peak_memory_mb",
                    "final_train_loss", "val_loss_start", "val_loss_end"):
            assert np.isfinite(r[key]), (name, key)
        assert 0 < r["trainable_tokens_per_s"] < r["tokens_per_s"]
        assert r["cpu_s"] > 0 and np.isfinite(r["tokens_per_cpu_s"])  # CPU time of the same steps, load-robust
        assert 0 < r["mfu"] < 1.5 and r["peak_memory_mb"] > 50
        # CPU: the matmul rate probed at every step's end, and the best rate of the run is at least each probe's
        assert len(r["probe_rates"]) == 3 and min(r["probe_rates"]) > 0 and len(r["step_mfu"]) == 2
        assert r["mfu_vs_best_rate"] <= r["mfu"] and res["matmul_flops_per_s_best"] >= max(r["probe_rates"])
        np.testing.assert_allclose(r["losses"], ref, rtol=1e-4, atol=1e-4)
        assert r["val_loss_end"] < r["val_loss_start"]  # three steps of training moved the model
    assert runs["tokens"]["timed_padded_batches"] >= runs["tokens"]["timed_non_padding"] > 0
    assert res["matmul_flops_per_s"]["peak"] > 0
    # each runner says what attention it ran: HF its implementation, the engine per conversation on CPU
    assert runs["hf_padded"]["attention"] == "sdpa"
    assert runs["hf_flat"]["attention"].startswith("sdpa with a block-diagonal mask")
    assert runs["fastchat_ft"]["attention"].startswith("per conversation: one native CPU attention call per layer")
    assert res["plan"]["data"] == "the bundled demo"
    table = bench.format_table(res)
    assert "(c) per conversation: one native CPU attention call" in table and "of (a)'s batch tokens" in table
    assert "MFU vs best rate (%)" in table and "GEMM rate measured at its two ends" in table
    assert (out / "vs_hf_trainer-cpu.png").stat().st_size > 1000


def test_a_disagreement_fails_the_bench_loudly(bench_result, tmp_path, capsys):
    _, doc, _ = bench_result
    res = json.loads(json.dumps(doc["results"][0]))
    res["runs"]["fastchat_ft"]["losses"][1] *= 1.01  # a 1% drift at step 2
    res["disagreements"] = bench.check_agreement(res["runs"], "float32")
    assert len(res["disagreements"]) == 1 and "fastchat_ft step 2" in res["disagreements"][0]
    assert bench.write_report([res], tmp_path, "cpu", (0.0, 0.0, 0.0)) == 1
    assert "FAIL" in capsys.readouterr().err
    assert json.loads((tmp_path / "vs_hf_trainer-cpu.json").read_text())["results"][0]["disagreements"]


def test_engine_reads_the_plan_micro_batches_in_plan_order():
    from fastchat_ft.engine.data import step_rows

    for n, accum, seed in ((12, 3, 0), (7, 2, 5), (5, 5, 42)):
        micro = [{"id": i} for i in range(n)]
        rows = rows_in_engine_order(micro, accum, seed)
        steps = -(-n // accum)
        read = [rows[i]["id"] for s in range(steps) for mb in step_rows(n, 1, accum, seed, 0, s) for i in mb]
        assert read == list(range(n))


def test_schedule_covers_every_conversation_before_repeating():
    sched = bench.schedule(10, per_step=4, steps=5, seed=1)
    assert len(sched) == 20 and sorted(sched[:10]) == list(range(10)) and sorted(sched[10:]) == list(range(10))[:10]


def test_forward_flops_match_torch_flop_counter_on_the_engine_forward(tmp_path):
    """The forward part of the FLOP count (decoder matmuls incl. LoRA, lm_head at label positions only) against
    torch.utils.flop_counter on the engine's loss forward (attention aside: the counter skips CPU SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastchat_ft.engine.loss import loss_sum, to_device
    from fastchat_ft.model.load import load_model
    from fastchat_ft.model.lora import add_lora
    from fastchat_ft.model.tiny import random_packed_rows

    torch.manual_seed(0)
    folder = build_tiny_model(tmp_path / "m", shared_path("tokenizers", "smollm2"), layers=3, hidden=48, heads=4,
                              kv_heads=2, intermediate=72)
    model = load_model(folder)
    targets = ["q_proj", "v_proj", "down_proj"]
    add_lora(model, 4, 8, 0.0, targets)
    cfg = json.loads((folder / "config.json").read_text())
    row = random_packed_rows(1, 1000, seed=7, max_convs=3, min_len=9, max_len=31)[0]
    from fastchat_ft.data.collate import collate

    batch = to_device(collate([row]), torch.device("cpu"))
    n_labels = int(batch["targets"].labels.numel())
    # no_grad: the training forward also forms the lm_head's input gradient (fused CE), which is backward work
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        loss_sum(model, batch, "token", n_labels)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    # torch's counter has no formula for the CPU flash-attention kernel; LoRA adds its B product with addmm
    assert set(counts) <= {"aten.mm", "aten.addmm"}
    lengths = [int(x) for x in row["seq_lens"]]
    parts = bench.flop_parts(cfg, {"r": 4, "target_modules": targets}, lengths, n_labels)
    assert sum(counts.values()) == pytest.approx(parts["forward"] - parts["attention_forward"], rel=1e-9)
    assert parts["lm_head_forward"] == 2 * n_labels * cfg["vocab_size"] * cfg["hidden_size"]


def test_engine_step_rows_train_like_micro_batch_rows(tmp_path):
    """--engine-rows step (each optimizer step's conversations as one packed row, grad_accum 1) is the same training
    as one row per micro-batch: per-step loss normalisation makes losses equal up to float reassociation."""
    from fastchat_ft.bench_runners import run_engine

    model = build_tiny_model(tmp_path / "tiny", shared_path("tokenizers", "smollm2"), seed=4, layers=2, hidden=48,
                             heads=4, kv_heads=2, intermediate=80)
    args = build_parser().parse_args(["bench", "--base-model", str(model), "--steps", "3", "--threads", "1",
                                      "--micro-batch", "3", "--grad-accum", "2", "--lora-r", "4", "--engine-rows", "step"])
    plan = bench.build_plan(args, str(model), str(model), "cpu", "float32", bench.CPU_DEFAULTS)
    assert plan["engine_rows"] == "step"
    assert plan["cpu_merge_tokens"] == 1024  # the engine's default, recorded in the plan
    whole = run_engine(plan)
    per_micro = run_engine({**plan, "engine_rows": "micro_batch", "cpu_merge_tokens": 0})
    merged = run_engine({**plan, "engine_rows": "micro_batch"})  # the engine joins the micro-batches on CPU
    assert whole["data_digest"] == per_micro["data_digest"] and len(whole["losses"]) == 3
    np.testing.assert_allclose(whole["losses"], per_micro["losses"], rtol=2e-5, atol=0)
    np.testing.assert_allclose(merged["losses"], per_micro["losses"], rtol=2e-5, atol=0)
    assert abs(whole["val_loss_end"] - per_micro["val_loss_end"]) <= 2e-5 * abs(per_micro["val_loss_end"])
    assert abs(whole["losses"][2] - whole["losses"][0]) > 1e-3  # training moved the loss, so the check has teeth


def test_step_times_leave_the_probes_out_and_mfu_pairs_each_step_with_the_rate_around_it():
    """summarise on hand-made step clocks: a step runs from the end of the probe after the previous step to its own
    end; MFU divides each step's FLOPs by the mean of the two probes around it times its seconds; the run without
    probes (a GPU run) keeps the old end-to-end timing and one MFU against the best rate."""
    cfg = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
           "num_key_value_heads": 2, "vocab_size": 32}
    lora = {"r": 2, "target_modules": ["q_proj"]}
    plan = {"micro_batch": 1, "grad_accum": 1, "steps": 3, "schedule": [0, 1, 2], "lora": lora}
    lengths, labels = [5, 7, 9], [2, 3, 4]
    probed = {"step_ends": [10.0, 13.0, 20.0], "step_resumes": [11.0, 14.0, 21.0], "probe_rates": [1e3, 3e3, 2e3],
              "step_cpu_ends": [5.0, 9.0, 16.0], "step_cpu_resumes": [6.0, 10.0, 17.0]}
    plain = {"step_ends": [10.0, 13.0, 20.0], "step_cpu_ends": [5.0, 9.0, 16.0]}
    common = {"prep_s": 0.1, "peak_memory_mb": 100, "losses": [3.0, 2.0, 1.0], "val_loss_start": 3.0,
              "val_loss_end": 1.0, "lengths": lengths, "label_tokens": labels}
    raw = {"hf_padded": {**common, **plain}, "hf_flat": {**common, **plain}, "fastchat_ft": {**common, **probed}}
    out = bench.summarise(plan, raw, cfg, peak_flops=4e3)
    f1, f2 = (bench.useful_flops(cfg, lora, [lengths[i]], labels[i]) for i in (1, 2))
    c, a = out["fastchat_ft"], out["hf_padded"]
    assert c["timed_s"] == pytest.approx((13 - 11) + (20 - 14)) and c["cpu_s"] == pytest.approx((9 - 6) + (16 - 10))
    assert c["step_mfu"] == pytest.approx([f1 / (2 * 2e3), f2 / (6 * 2.5e3)])
    assert c["mfu"] == pytest.approx((f1 + f2) / (2 * 2e3 + 6 * 2.5e3))
    assert c["mfu_vs_best_rate"] == pytest.approx((f1 + f2) / 8 / 4e3)
    assert a["timed_s"] == pytest.approx(10) and a["cpu_s"] == pytest.approx(11) and "probe_rates" not in a
    assert a["mfu"] == a["mfu_vs_best_rate"] == pytest.approx((f1 + f2) / 10 / 4e3)
    assert c["step_time_median_s"] == pytest.approx(4) and a["step_time_median_s"] == pytest.approx(5)


def test_rounds_report_each_runners_median_round_and_keep_every_round():
    def summary(tps):
        return {"tokens": {"timed_non_padding": 10}, **{n: {"tokens_per_s": t, "peak_memory_mb": 100 + t, "mark": t,
                                                            "mfu": t / 1000}
                                                        for n, t in zip(bench.RUNNERS, tps)}}
    runs = bench.combine_rounds([summary((100, 7, 30)), summary((300, 5, 10)), summary((200, 6, 20))])
    assert [runs[n]["mark"] for n in bench.RUNNERS] == [200, 6, 20]  # the middle round of each, chosen apart
    assert runs["hf_padded"]["tokens_per_s_rounds"] == [100, 300, 200]
    assert runs["fastchat_ft"]["peak_memory_mb_rounds"] == [130, 110, 120] and runs["fastchat_ft"]["median_of_rounds"] == 3
    assert runs["fastchat_ft"]["mfu_rounds"] == [0.03, 0.01, 0.02]
    two = bench.combine_rounds([summary((100, 1, 1)), summary((300, 2, 2))])
    assert two["hf_padded"]["mark"] == 100  # even count: the lower middle
    table = bench.format_table({"runs": {**runs, **{n: {**runs[n], **{k: 1.0 for k in (
        "data_prep_s", "tokens_per_cpu_s", "trainable_tokens_per_s", "step_time_s", "mfu", "final_train_loss",
        "val_loss_start", "val_loss_end")}} for n in bench.RUNNERS}}})
    assert "every round" in table and "100/300/200" in table


def test_cuda_mode_without_a_gpu_is_a_clear_error(monkeypatch, capsys):
    from fastchat_ft.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--device", "cuda", "--steps", "2"]) != 0
    err = capsys.readouterr().err
    assert "--device" in err and "no CUDA GPU is visible" in err and "Traceback" not in err


@pytest.mark.parametrize("flags, field", [
    (["--micro-batch", "-1"], "--micro-batch"), (["--lora-r", "0"], "--lora-r"), (["--steps", "1"], "--steps"),
    (["--grad-accum", "0"], "--grad-accum"), (["--threads", "0"], "--threads"), (["--lr", "0"], "--lr"),
    (["--models", "llama-1b,llama-70b"], "--models"), (["--cpu-merge-tokens", "-5"], "--cpu-merge-tokens"),
    (["--seed", "-1"], "--seed"), (["--lr", "nan"], "--lr"), (["--val-data", "missing.jsonl"], "--val-data"),
    (["--out", "a_file.txt"], "--out"),
])
def test_impossible_flags_are_refused_before_anything_loads(monkeypatch, capsys, tmp_path, flags, field):
    from fastchat_ft.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file.txt").write_text("not a folder")

    def no_loading(*_args, **_kwargs):
        raise AssertionError("a model was looked up before the flags were checked")

    monkeypatch.setattr("fastchat_ft.model.load.resolve_base_model", no_loading)
    assert main(["bench", *flags]) != 0
    err = capsys.readouterr().err
    assert f"field '{field}'" in err and "fix:" in err and "Traceback" not in err


def test_gpu_multi_turn_data_is_valid_chatml_with_a_wide_deterministic_length_spread(tmp_path):
    from fastchat_ft import bench_data
    from fastchat_ft.config import ASSETS
    from fastchat_ft.data.validate import validate_file

    train, val = bench_data.write_multi_turn(ASSETS / "demo" / "train.jsonl", tmp_path / "a", 300, 20, seed=7)
    again, _ = bench_data.write_multi_turn(ASSETS / "demo" / "train.jsonl", tmp_path / "b", 300, 20, seed=7)
    assert train.read_bytes() == again.read_bytes()  # seeded: every runner and every round sees the same data
    assert train.read_bytes() != val.read_bytes()
    convs = [json.loads(line)["messages"] for line in train.read_text().splitlines()]
    assert len(convs) == 300 and len(val.read_text().splitlines()) == 20
    exchanges = np.array([sum(m["role"] == "assistant" for m in c) for c in convs])
    assert exchanges.min() >= 1 and exchanges.max() <= bench_data.MULTI_TURN_MAX
    # a spread like real chat sets: short and long conversations in the same micro-batches
    assert np.percentile(exchanges, 10) <= 4 and np.percentile(exchanges, 90) >= 20
    assert abs(np.median(exchanges) - bench_data.MULTI_TURN_MEDIAN) <= 2
    report = validate_file(train)
    assert report.ok and report.records == 300, report.counts()


def test_gpu_micro_batch_shrinks_with_gpu_memory_and_keeps_the_effective_batch():
    sizes = [bench.gpu_micro_batch(m, gib) for m in bench.GPU_MODELS for gib in (141, 80, 40, 24)]
    assert all(s["micro_batch"] * s["grad_accum"] == 32 for s in sizes)
    assert bench.gpu_micro_batch("llama-1b", 141)["micro_batch"] == 16  # the measured H200 configuration
    assert bench.gpu_micro_batch("llama-1b", 80)["micro_batch"] == 8
    assert bench.gpu_micro_batch("llama-8b", 80)["micro_batch"] < bench.gpu_micro_batch("llama-1b", 80)["micro_batch"]
    assert bench.gpu_micro_batch("some-other", 80) == {}


def test_a_runner_out_of_gpu_memory_names_the_flags_that_fit(monkeypatch, tmp_path):
    import subprocess

    from fastchat_ft.errors import ConfigError

    def oom(*a, **k):
        return subprocess.CompletedProcess(a, 1, stdout="", stderr="torch.OutOfMemoryError: CUDA out of memory. "
                                                                    "Tried to allocate 31.31 GiB")
    monkeypatch.setattr(bench.subprocess, "run", oom)
    with pytest.raises(ConfigError) as err:
        bench.run_worker("hf_padded", {"micro_batch": 16, "grad_accum": 2}, tmp_path, 4)
    assert "(a) HF Trainer, padded ran out of GPU memory" in str(err.value)
    assert "--micro-batch 8 --grad-accum 4" in str(err.value)
    # nothing left to halve: the hint changes rather than repeating the same memory
    assert "--seq-len" in str(bench.out_of_memory("hf_flat", {"micro_batch": 1, "grad_accum": 32}))
    step_rows = bench.out_of_memory("fastchat_ft", {"micro_batch": 16, "grad_accum": 2, "engine_rows": "step"})
    assert "--engine-rows step" in str(step_rows)


def test_gpu_mode_writes_multi_turn_data_and_sizes_micro_batches_by_gpu_memory(monkeypatch, tmp_path):
    """The GPU branch of run_bench up to the runs (no GPU here): the random models, the data and the plan."""
    import types

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=80 * 2**30))
    tiny = build_tiny_model(tmp_path / "tiny", shared_path("tokenizers", "smollm2"), seed=3, layers=1, hidden=32,
                            heads=2, kv_heads=1, intermediate=48)
    monkeypatch.setattr(bench, "_random_llama", lambda folder, shape, tok: tiny)
    plans = []

    def fake_bench_one(plan, model_cfg, workdir, label):
        plans.append(plan)
        assert Path(plan["train_file"]).is_file() and Path(plan["val_file"]).is_file()  # still there during the runs
        return {"label": label}
    monkeypatch.setattr(bench, "bench_one", fake_bench_one)
    monkeypatch.setattr(bench, "format_table", lambda res: "")
    monkeypatch.setattr(bench, "write_report", lambda results, out, device, load: len(results))
    args = build_parser().parse_args(["bench", "--device", "cuda", "--steps", "2", "--tokenizer", str(tiny)])
    assert bench.run_bench(args) == 2
    assert [(p["micro_batch"], p["grad_accum"]) for p in plans] == [(8, 4), (2, 16)]  # llama-1b, llama-8b at 80 GiB
    assert all(p["dtype"] == "bfloat16" and p["data"] == bench_data_description() for p in plans)
    assert plans[0]["conversations"] > 900  # the ~1000 multi-turn conversations, not the demo's 146
    assert args.data is None  # the caller's arguments are left as given


def bench_data_description():
    from fastchat_ft import bench_data

    return bench_data.DESCRIPTION


def test_engine_attention_choice_by_device_precision_and_opt_out(monkeypatch, tmp_path):
    from fastchat_ft.engine.loss import packed_attention_wanted
    from fastchat_ft.model import attention

    model = build_tiny_model(tmp_path / "m", shared_path("tokenizers", "smollm2"), seed=1, layers=1, hidden=32,
                             heads=2, kv_heads=1, intermediate=48)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert packed_attention_wanted(model, cpu)
    assert not packed_attention_wanted(model, cuda)  # fp32, no autocast: transformers' path on the GPU
    model.to(torch.bfloat16)
    assert packed_attention_wanted(model, cuda) == (attention._varlen_kernel() is not None)
    for off in ("0", "false", "OFF"):
        monkeypatch.setenv("FASTCHAT_FT_VARLEN", off)
        assert not packed_attention_wanted(model, cuda) and packed_attention_wanted(model, cpu)
    assert attention.describe(model, device="cuda", half=True).startswith("sdpa with a block-diagonal mask")
    assert attention.use_packed_attention(model)
    assert "native CPU attention" in attention.describe(model, device="cpu", half=False)
    monkeypatch.setenv("FASTCHAT_FT_CPU_ATTENTION", "0")
    assert attention.describe(model, device="cpu", half=False).endswith("causal SDPA for each conversation of the row")
    if attention._varlen_kernel() is not None:
        assert "varlen" in attention.describe(model, device="cuda", half=True)
