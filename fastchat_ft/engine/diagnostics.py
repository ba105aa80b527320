"""Diagnoses of the usual training failures, each with its fix: overfitting, underfitting, NaN/inf loss,
out of memory, and slow training (share of time waiting for data, model FLOPs utilisation).
Pure functions of numbers the loop already has; they print or raise, they never change training.
"""
from __future__ import annotations

import math

from fastchat_ft.errors import FastchatError

# dense bf16 peak FLOP/s, for MFU; devices not listed report achieved FLOP/s only
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12, "T4": 65e12}


class TrainingDiverged(FastchatError):
    """The loss became NaN or inf."""


def _flat_sources(sources) -> list[str]:
    """Sources as "file:line" strings, whether given flat ([(file, line), ...] or ["file:line", ...]) or per row
    ([[(file, line), ...], ...], as collate gives them)."""
    out = []
    for s in sources:
        if isinstance(s, list):
            out.extend(_flat_sources(s))
        elif isinstance(s, tuple) and len(s) == 2:
            out.append(f"{s[0]}:{s[1]}")
        else:
            out.append(str(s))
    return out


def describe_sources(batch: dict, show: int = 5) -> str:
    """Where the conversations of a batch came from: the first `show` as file:line, and how many in all
    (packed row indices when the rows carry no sources)."""
    sources = _flat_sources(batch.get("sources") or [])
    if sources:
        more = f" and {len(sources) - show} more" if len(sources) > show else ""
        noun = "conversation" if len(sources) == 1 else "conversations"
        return f"{len(sources)} {noun}: {', '.join(sources[:show])}{more}"
    rows = batch.get("row_ids")
    return f"packed rows {list(rows)}" if rows is not None else "unknown rows"


def bad_loss(step: int, value: float, batches: list[dict], skip: bool) -> str:
    """A NaN/inf loss: raise with the step and source lines, or (with --skip-bad-batches) say what is skipped."""
    where = "; ".join(describe_sources(b) for b in batches)
    if skip:
        return f"step {step}: loss is {value}; skipped this batch ({where})"
    raise TrainingDiverged(
        f"loss became {value} at optimizer step {step}; the batch held {where}",
        fix="look at those records (`fastchat-ft validate FILE` checks them; an extreme or broken record can be "
            "removed), lower learning_rate (or raise warmup_ratio), keep max_grad_norm at 1.0, or pass "
            "--skip-bad-batches to skip such batches and go on")


def overfitting(val_losses: list[float]) -> str | None:
    """Validation loss above its best for the last two evaluations."""
    if len(val_losses) < 3:
        return None
    best = min(val_losses[:-1])
    if val_losses[-1] > best * 1.01 and val_losses[-2] > best * 1.0:
        return (f"validation loss is rising ({best:.4f} -> {val_losses[-1]:.4f}): the model is overfitting. "
                "Fix: fewer num_epochs (the best checkpoint is the one at the lowest val_loss in metrics.jsonl), "
                "more data, or a smaller lora_r / learning_rate")
    return None


def underfitting(train_losses: list[float]) -> str | None:
    """Training loss flat (under 5% drop from the first to the last quarter) and still high."""
    if len(train_losses) < 8:
        return None
    q = max(1, len(train_losses) // 4)
    first, last = sum(train_losses[:q]) / q, sum(train_losses[-q:]) / q
    if last > 0.95 * first and last > 1.0:
        return (f"training loss barely moved ({first:.3f} -> {last:.3f}): the model is underfitting. "
                "Fix: more num_epochs or data, a higher learning_rate, or a larger lora_r / more lora_target_modules")
    return None


def oom_advice(cfg, estimate_gb: float | None) -> str:
    est = f" (dry-run estimate: {estimate_gb:.1f} GB peak)" if estimate_gb else ""
    return ("out of memory" + est + ". Lower micro_batch_size (raise gradient_accumulation_steps to keep the "
            "effective batch), lower sequence_len, set gradient_checkpointing: true, or use adapter: qlora. "
            "`fastchat-ft train --dry-run` prints the estimate for a config")


def flops_per_token(n_params: int, n_trainable: int) -> float:
    """Forward 2N; backward 2N for activation grads plus 2 per trainable weight (LoRA skips the rest)."""
    return 4.0 * n_params + 2.0 * n_trainable


def throughput_report(step_time_s: float, data_wait_s: float, tokens: int, n_params: int, n_trainable: int,
                      device_name: str) -> str:
    """One line on where the time goes and how busy the device is."""
    if step_time_s <= 0:
        return ""
    flops = flops_per_token(n_params, n_trainable) * tokens / step_time_s
    peak = next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)
    mfu = f", MFU {100 * flops / peak:.1f}%" if peak else ""
    share = 100 * data_wait_s / step_time_s
    advice = " (data loading is a bottleneck: pre-pack the data or raise the loader threads)" if share > 10 else ""
    return (f"time: {share:.1f}% waiting for data{advice}; model {flops / 1e12:.3f} TFLOP/s achieved"
            f"{mfu} on {device_name}")


def is_finite(value: float) -> bool:
    return math.isfinite(value)
