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
    assert "--skip-bad-batches" in e.value.fix
    assert "skipped" in diag.bad_loss(17, float("inf"), batches, skip=True)


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
