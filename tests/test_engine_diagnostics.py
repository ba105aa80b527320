"""Diagnostics: each failure is recognised from the numbers and comes with its fix; healthy runs say nothing."""
import pytest

from fastchat_ft import config
from fastchat_ft.engine import diagnostics as diag
from fastchat_ft.errors import ModelError
from fastchat_ft.model.lora import quantize_config


def test_overfitting_needs_two_evaluations_above_the_best():
    assert diag.overfitting([2.0, 1.5]) is None
    assert diag.overfitting([2.0, 1.5, 1.4, 1.3]) is None
    assert diag.overfitting([2.0, 1.5, 1.6]) is None  # one bump is noise
    msg = diag.overfitting([2.0, 1.5, 1.6, 1.7])
    assert "overfitting" in msg and "num_epochs" in msg


def test_underfitting_flat_and_high_loss():
    assert diag.underfitting([3.0] * 4) is None  # too few steps to judge
    assert "underfitting" in diag.underfitting([3.0, 3.01, 2.99, 3.0, 2.98, 3.0, 2.97, 2.99])
    assert diag.underfitting([3.0, 2.6, 2.2, 1.9, 1.6, 1.4, 1.2, 1.1]) is None
    assert diag.underfitting([0.5] * 8) is None  # flat but already low: converged


def test_bad_loss_names_step_and_rows():
    batches = [{"row_ids": [3, 7]}, {"sources": ["data.jsonl:12", "data.jsonl:40"]}]
    with pytest.raises(diag.TrainingDiverged) as e:
        diag.bad_loss(17, float("nan"), batches, skip=False)
    assert "step 17" in str(e.value) and "[3, 7]" in str(e.value) and "data.jsonl:12" in str(e.value)
    assert "--skip-bad-batches" in e.value.fix and "validate" in e.value.fix
    assert "skipped" in diag.bad_loss(17, float("inf"), batches, skip=True)


def test_sources_show_the_first_few_as_file_line_and_the_count():
    per_row = [[("a.jsonl", 1), ("a.jsonl", 9)], [("b.json", 4)]]  # as collate gives them
    assert diag.describe_sources({"sources": per_row}) == "3 conversations: a.jsonl:1, a.jsonl:9, b.json:4"
    flat = [("d.jsonl", n) for n in range(2, 30, 3)]  # as the engine's micro_batches gives them
    text = diag.describe_sources({"sources": flat, "row_ids": [0, 1]})
    assert text == "10 conversations: d.jsonl:2, d.jsonl:5, d.jsonl:8, d.jsonl:11, d.jsonl:14 and 5 more"
    assert diag.describe_sources({"sources": [("x.jsonl", 7)]}) == "1 conversation: x.jsonl:7"
    assert diag.describe_sources({}) == "unknown rows"


def test_nan_loss_names_the_planted_records_line_in_the_error_and_the_skip_log(tmp_path, monkeypatch, capsys):
    """Real ChatDataset rows through the real loop: the loss turns NaN exactly when the planted record is in the
    step; the error (and the --skip-bad-batches log) names its file:line and the step."""
    import json

    import numpy as np

    from conftest import shared_path
    from fastchat_ft.data import ChatDataset
    from fastchat_ft.engine import train as train_mod
    from fastchat_ft.engine.data import RunData
    from fastchat_ft.model.tiny import build_tiny_model

    tok = shared_path("tokenizers", "smollm2")
    tiny = build_tiny_model(tmp_path / "tiny", tok)
    rng = np.random.default_rng()
    planted = int(rng.integers(3, 14))
    data = tmp_path / "chat.jsonl"
    lines = []
    for i in range(1, 15):
        text = "POISON" if i == planted else f"answer {i} " + "word " * int(rng.integers(1, 30))
        lines.append("" if i == 2 else json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                                              {"role": "assistant", "content": text}]}))
    data.write_text("\n".join(lines) + "\n")
    rows = ChatDataset(data, str(tok), max_seq_len=64, cache=False, verbose=False)
    where = f"{data}:{planted}"
    real, steps = train_mod.backward_step, []

    def poisoned(model, batches, mode, amp):  # NaN exactly for the step that holds the planted record
        loss, n = real(model, batches, mode, amp)
        key = where  # sources flat per batch or per row: either way the key is found
        hit = any(s == key or (isinstance(s, list) and key in s) for b in batches for s in b["sources"])
        steps.append(hit)
        return (float("nan"), n) if hit else (loss, n)

    monkeypatch.setattr(train_mod, "backward_step", poisoned)
    cfg = {"base_model": str(tiny), "datasets": [{"path": str(data)}], "micro_batch_size": 2,
           "gradient_accumulation_steps": 1, "num_epochs": 1, "learning_rate": 1e-3, "eval_steps": 100,
           "save_steps": 100, "sample_prompts": 0, "lora_r": 2, "lora_alpha": 4, "seed": int(rng.integers(1000))}
    with pytest.raises(diag.TrainingDiverged) as e:
        train_mod.train(config.from_dict({**cfg, "output_dir": str(tmp_path / "stop")}), data=RunData(rows, []),
                        show_bar=False)
    bad_step = steps.index(True) + 1
    assert f"step {bad_step};" in str(e.value) and where in str(e.value)
    steps.clear()
    summary = train_mod.train(config.from_dict({**cfg, "output_dir": str(tmp_path / "skip")}),
                              data=RunData(rows, []), show_bar=False, skip_bad_batches=True)
    assert steps.count(True) == 1 and summary["steps"] == len(steps)
    log = [line for line in capsys.readouterr().err.splitlines() if "skipped this batch" in line]
    assert len(log) == 1 and log[0].startswith(f"step {steps.index(True) + 1}:") and where in log[0]


def test_throughput_and_oom_advice():
    line = diag.throughput_report(step_time_s=2.0, data_wait_s=0.5, tokens=1000, n_params=100_000_000,
                                  n_trainable=1_000_000, device_name="NVIDIA H100 80GB HBM3")
    assert "25.0% waiting for data" in line and "bottleneck" in line and "MFU" in line
    assert "MFU" not in diag.throughput_report(1.0, 0.0, 100, 10, 1, "CPU")
    advice = diag.oom_advice(config.TrainConfig(), 12.5)
    for words in ("micro_batch_size", "gradient_checkpointing", "sequence_len", "12.5 GB"):
        assert words in advice


def test_qlora_without_cuda_or_bitsandbytes_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this checks the CPU message")
    with pytest.raises(ModelError, match="QLoRA needs a CUDA GPU") as e:
        quantize_config()
    assert "adapter: lora" in e.value.fix


def test_cpu_and_cuda_out_of_memory_become_the_advice_and_other_errors_pass_through():
    import torch

    from fastchat_ft.engine.train import _oom_advice

    cfg = config.TrainConfig()
    for oom in (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: "
                             "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")):
        with pytest.raises(ModelError, match="out of memory") as e:
            with _oom_advice(cfg):
                raise oom
        assert "micro_batch_size" in str(e.value)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with _oom_advice(cfg):
            raise RuntimeError("shape mismatch")


def test_bf16_true_on_cpu_says_it_trains_in_fp32(monkeypatch, capsys):
    from types import SimpleNamespace

    import torch

    from fastchat_ft.engine.train import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device(SimpleNamespace(bf16=True)) == (torch.device("cpu"), None)
    assert "trains in fp32" in capsys.readouterr().err
    assert pick_device(SimpleNamespace(bf16="auto")) == (torch.device("cpu"), None)
    assert capsys.readouterr().err == ""
